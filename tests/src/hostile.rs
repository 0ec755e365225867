//! Hostile qcow2 images crafted byte by byte, and running vublk on them in a box: an
//! address-space limit, no core dumps, and a deadline.
//!
//! Owns: patching the big-endian header fields and table entries of an image that
//! `qemu-img create` made valid (field offsets from qcow2.rst), encoding L1/L2 entries,
//! crafting compressed payloads (a fixed-Huffman deflate stream of any length, zstd frames
//! declaring any window, raw or run-length), and [`Boxed`], which applies the resource limits
//! to a `Command` and reports how the process ended. It knows nothing about vublk's internals: the expectations
//! (which error names which field) live in the tests.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::daemon::{BackendKind, Daemon, DiskOptions};
use crate::images::{QEMU_IMG, QEMU_IO};

/// qcow2 header field offsets (qcow2.rst, "Header").
pub mod field {
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
}

/// L1/L2 entry bit 63: "refcount is exactly one" (QEMU sets it on everything it allocates).
pub const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;

/// A standard L2 entry (or an L1 entry) pointing at `host_offset`, with COPIED set as QEMU does.
pub fn l2_standard(host_offset: u64) -> u64 {
    COPIED | host_offset
}

/// A compressed-cluster L2 descriptor (qcow2.rst "Compressed Clusters Descriptor"): the host
/// offset in bits 0..x-1 and the count of additional 512-byte sectors in bits x..61, where
/// x = 62 - (cluster_bits - 8). `additional_sectors` is masked to the field's width.
pub fn l2_compressed(host_offset: u64, additional_sectors: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let sectors = additional_sectors & max_compressed_sectors(cluster_bits);
    COMPRESSED | (sectors << x) | (host_offset & ((1 << x) - 1))
}

/// The largest value the sector count field of a compressed descriptor holds.
pub fn max_compressed_sectors(cluster_bits: u32) -> u64 {
    (1 << (cluster_bits - 8)) - 1
}

/// A qcow2 file open for patching.
pub struct Qcow2File {
    path: PathBuf,
    file: File,
}

impl Qcow2File {
    /// `qemu-img create -f qcow2 -o cluster_size=...,<extra> path size`, opened for patching.
    pub fn create(path: &Path, size: u64, cluster_size: u64, extra_opts: &str) -> Result<Self> {
        let mut opts = format!("cluster_size={cluster_size}");
        if !extra_opts.is_empty() {
            opts.push(',');
            opts.push_str(extra_opts);
        }
        run_tool(
            Command::new(QEMU_IMG)
                .args(["create", "-q", "-f", "qcow2", "-o", &opts])
                .arg(path)
                .arg(size.to_string()),
        )?;
        Self::open(path)
    }

    /// Opens an existing file for patching.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Qcow2File {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs one `qemu-io` command on the image (e.g. `write -P 0x5a 0 64k`, `write -c ...`),
    /// while the image is still valid.
    pub fn qemu_io(&self, cmd: &str) -> Result<()> {
        run_tool(
            Command::new(QEMU_IO)
                .args(["-f", "qcow2", "-c", cmd])
                .arg(&self.path),
        )
        .map(drop)
    }

    pub fn put_bytes(&self, at: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, at)
            .with_context(|| format!("writing {} bytes at {at}", bytes.len()))
    }

    pub fn put_u32(&self, at: u64, value: u32) -> Result<()> {
        self.put_bytes(at, &value.to_be_bytes())
    }

    pub fn put_u64(&self, at: u64, value: u64) -> Result<()> {
        self.put_bytes(at, &value.to_be_bytes())
    }

    pub fn get_u32(&self, at: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.file.read_exact_at(&mut b, at)?;
        Ok(u32::from_be_bytes(b))
    }

    pub fn get_u64(&self, at: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, at)?;
        Ok(u64::from_be_bytes(b))
    }

    pub fn cluster_bits(&self) -> Result<u32> {
        self.get_u32(field::CLUSTER_BITS)
    }

    pub fn cluster_size(&self) -> Result<u64> {
        Ok(1 << self.cluster_bits()?)
    }

    pub fn l1_table_offset(&self) -> Result<u64> {
        self.get_u64(field::L1_TABLE_OFFSET)
    }

    pub fn refcount_table_offset(&self) -> Result<u64> {
        self.get_u64(field::REFCOUNT_TABLE_OFFSET)
    }

    pub fn header_length(&self) -> Result<u32> {
        self.get_u32(field::HEADER_LENGTH)
    }

    /// The raw L1 entry `index`.
    pub fn l1_entry(&self, index: u64) -> Result<u64> {
        self.get_u64(self.l1_table_offset()? + 8 * index)
    }

    pub fn set_l1_entry(&self, index: u64, raw: u64) -> Result<()> {
        self.put_u64(self.l1_table_offset()? + 8 * index, raw)
    }

    /// Host offset of the L2 table that L1 entry `l1_index` points to (bits 9-55).
    pub fn l2_table_offset(&self, l1_index: u64) -> Result<u64> {
        let offset = self.l1_entry(l1_index)? & 0x00ff_ffff_ffff_fe00;
        ensure!(offset != 0, "L1 entry {l1_index} has no L2 table");
        Ok(offset)
    }

    /// Writes entry `index` of the L2 table that L1 entry 0 points to.
    pub fn set_l2_entry(&self, index: u64, raw: u64) -> Result<()> {
        self.put_u64(self.l2_table_offset(0)? + 8 * index, raw)
    }

    pub fn len(&self) -> Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).context("resizing the image")
    }

    /// Appends `bytes` at the next cluster boundary past the end of the file and returns
    /// their host offset.
    pub fn append_cluster_aligned(&self, bytes: &[u8]) -> Result<u64> {
        let at = self.len()?.next_multiple_of(self.cluster_size()?);
        self.put_bytes(at, bytes)?;
        Ok(at)
    }
}

/// Runs a QEMU tool to completion, failing with its stderr.
fn run_tool(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Compressed payloads.

/// Writes deflate's bit stream: fields LSB first, Huffman codes MSB first (RFC 1951 3.1.1).
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    nbits: u32,
}

impl BitWriter {
    fn bits(&mut self, value: u32, n: u32) {
        self.acc |= u64::from(value) << self.nbits;
        self.nbits += n;
        while self.nbits >= 8 {
            self.out.push(self.acc.to_le_bytes()[0]);
            self.acc >>= 8;
            self.nbits -= 8;
        }
    }

    fn code(&mut self, code: u32, len: u32) {
        self.bits(code.reverse_bits() >> (32 - len), len);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.nbits > 0 {
            self.out.push(self.acc.to_le_bytes()[0]);
        }
        self.out
    }
}

/// A raw deflate stream (no zlib header, as qcow2 stores it) that inflates to `out_len` bytes
/// of `byte`: one literal, then back-references of distance 1 in one fixed-Huffman block. A
/// length-258 match costs 13 bits, so 1 MiB of output takes about 6.6 KiB: with `out_len`
/// above the cluster size it is a decompression bomb. `byte` must be below 144 (an 8-bit
/// literal code) and `out_len` must not be 2 or 3.
pub fn deflate_run(byte: u8, out_len: usize) -> Vec<u8> {
    /// Symbol 285 (length 258): codes 280-287 are the 8 bits 0xc0 + (symbol - 280).
    const LEN_258_CODE: u32 = 0xc5;
    let mut w = BitWriter {
        out: Vec::new(),
        acc: 0,
        nbits: 0,
    };
    w.bits(1, 1); // BFINAL
    w.bits(1, 2); // BTYPE 01: fixed Huffman codes
    if out_len > 0 {
        // Literals 0-143: the 8 bits 0x30 + value.
        w.code(0x30 + u32::from(byte), 8);
    }
    let rest = out_len.saturating_sub(1);
    let (mut long, mut short) = (rest / 258, rest % 258);
    // Matches are 3..=258 bytes: a remainder of 1 or 2 borrows one long match.
    if (short == 1 || short == 2) && long > 0 {
        long -= 1;
        short += 258;
    }
    for _ in 0..long {
        w.code(LEN_258_CODE, 8);
        w.code(0, 5); // distance code 0 (distance 1): 5 bits, no extra bits
    }
    while short >= 3 {
        // Lengths 3..=10 are symbols 257-264, the 7-bit codes length - 2, without extra bits.
        let len = match short {
            3..=10 => short,
            11 | 12 => short - 3,
            _ => 10,
        };
        w.code(u32::try_from(len - 2).unwrap_or(1), 7);
        w.code(0, 5);
        short -= len;
    }
    w.code(0, 7); // end of block, symbol 256
    w.finish()
}

/// zstd Block_Maximum_Size (RFC 8878): "the smallest of Window_Size and 128 KiB".
fn zstd_block_max(window_log: u32) -> usize {
    (128 * 1024).min(1 << window_log.min(17))
}

/// A zstd frame header (RFC 8878) whose Window_Descriptor declares 2^`window_log` bytes
/// (`window_log` 10..=41): no content size, not single-segment (so the decoder must honour
/// the window), no checksum, no dictionary.
fn zstd_header(window_log: u32) -> Vec<u8> {
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd];
    // Frame_Header_Descriptor: every flag clear.
    out.push(0);
    // Window_Descriptor: Exponent (5 bits) = window_log - 10, Mantissa 0.
    let exponent = u8::try_from(window_log.saturating_sub(10)).unwrap_or(31) & 0x1f;
    out.push(exponent << 3);
    out
}

/// Block_Header: Last_Block (bit 0), Block_Type (bits 1-2), Block_Size (bits 3-23).
fn zstd_block_header(out: &mut Vec<u8>, last: bool, block_type: u32, size: usize) {
    let header = (u32::try_from(size).unwrap_or(0) << 3) | (block_type << 1) | u32::from(last);
    out.extend_from_slice(&header.to_le_bytes()[..3]);
}

/// A zstd frame declaring a 2^`window_log` byte window and holding `payload` as raw blocks.
pub fn zstd_frame(window_log: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = zstd_header(window_log);
    let chunks: Vec<&[u8]> = payload.chunks(zstd_block_max(window_log)).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        zstd_block_header(&mut out, i + 1 == chunks.len(), 0, chunk.len());
        out.extend_from_slice(chunk);
    }
    out
}

/// A zstd frame declaring a 2^`window_log` byte window whose RLE blocks regenerate
/// `out_len` bytes of `byte`, four bytes per block: a decompression bomb when `out_len` is
/// far above the cluster size.
pub fn zstd_rle_frame(window_log: u32, byte: u8, out_len: usize) -> Vec<u8> {
    let mut out = zstd_header(window_log);
    let block = zstd_block_max(window_log);
    let mut left = out_len;
    while left > 0 {
        let size = left.min(block);
        left -= size;
        zstd_block_header(&mut out, left == 0, 1, size);
        out.push(byte);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running vublk in a box.

/// How a boxed process ended by itself.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Resource limits for one vublk process.
#[derive(Clone, Copy, Debug)]
pub struct Boxed {
    /// RLIMIT_AS, bytes.
    pub address_space: u64,
    /// How long the process may run (probe) or take to start listening (serve).
    pub timeout: Duration,
}

impl Boxed {
    /// Applies RLIMIT_AS and RLIMIT_CORE 0 to `cmd`'s child.
    pub fn apply(&self, cmd: &mut Command) {
        let address_space = self.address_space;
        // SAFETY: the closure runs in the forked child before exec and only calls setrlimit,
        // which is async-signal-safe; it allocates nothing and touches only its own copies of
        // two integers.
        unsafe {
            cmd.pre_exec(move || {
                let limits = [(libc::RLIMIT_AS, address_space), (libc::RLIMIT_CORE, 0)];
                for (resource, value) in limits {
                    let lim = libc::rlimit {
                        rlim_cur: value,
                        rlim_max: value,
                    };
                    if libc::setrlimit(resource, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// Runs `args` of vublk in the box to completion, its stdout and stderr in files under
    /// `dir`. Fails (loudly, naming the command) if it had to be killed at the deadline.
    pub fn run(&self, dir: &Path, args: &[&std::ffi::OsStr]) -> Result<Exit> {
        let mut cmd = Command::new(crate::daemon::vublk_bin());
        cmd.args(args);
        let (out_path, err_path) = (dir.join("run.stdout"), dir.join("run.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out_path)?)
            .stderr(File::create(&err_path)?);
        self.apply(&mut cmd);
        let start = Instant::now();
        let mut child = cmd.spawn().context("spawning vublk")?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Exit {
                    status,
                    stdout: read_lossy(&out_path),
                    stderr: read_lossy(&err_path),
                    elapsed: start.elapsed(),
                });
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "KILLED: vublk {args:?} did not exit within {:?} (a hang); stderr tail: {}",
                    self.timeout,
                    tail(&read_lossy(&err_path))
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts `vublk serve` on `opts` in the box: either it exits by itself before listening
    /// (`Err(exit)`), or it listens on `socket` (`Ok(daemon)`, stderr going to `stderr_path`).
    /// Fails loudly if it does neither within the timeout.
    pub fn serve(
        &self,
        opts: &DiskOptions,
        socket: &Path,
        stderr_path: &Path,
    ) -> Result<std::result::Result<Daemon, Exit>> {
        let mut cmd = Daemon::command(BackendKind::Vublk, opts, socket);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(stderr_path)?);
        self.apply(&mut cmd);
        let _ = std::fs::remove_file(socket);
        let start = Instant::now();
        let child = cmd.spawn().context("spawning vublk serve")?;
        let mut daemon = Daemon {
            child,
            socket: socket.to_path_buf(),
            kind: BackendKind::Vublk,
        };
        if daemon.wait_listening(self.timeout).is_ok() {
            return Ok(Ok(daemon));
        }
        match daemon.child.try_wait()? {
            Some(status) => Ok(Err(Exit {
                status,
                stdout: String::new(),
                stderr: read_lossy(stderr_path),
                elapsed: start.elapsed(),
            })),
            None => bail!(
                "KILLED: vublk serve neither exited nor listened within {:?} (a hang); \
                 stderr tail: {}",
                self.timeout,
                tail(&read_lossy(stderr_path))
            ),
        }
    }
}

/// A file's contents as text, empty if unreadable.
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last few lines of `text`, for failure messages.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// `VmPeak` of a live process in bytes, from /proc/PID/status.
pub fn vm_peak(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmPeak:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
