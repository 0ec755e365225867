//! Hostile qcow2 images against the real binary: each image is crafted to exhaust memory or
//! CPU on probe, open or read, or to crash the daemon. Every `vublk probe` and `vublk serve`
//! runs in a box ([`Boxed`]: RLIMIT_AS, no core dumps, a deadline), so an unbounded allocation
//! shows up as an abort (a signal) and a hang as a kill, and both fail the test loudly.
//!
//! The contract checked, per image:
//! - invalid header: `probe` and `serve` exit by themselves, non-zero, within the deadline,
//!   and stderr names the field at fault;
//! - well-formed but using a feature vublk does not serve: `probe` exits 0 and lists it in
//!   `x-unsupported`, `serve` refuses naming it;
//! - valid but nasty tables or compressed data: `probe` exits 0, `serve` listens, every read
//!   through libblkio either returns data (checked where the right bytes are known) or fails
//!   with an I/O error, the daemon stays alive, a later read still works, and SIGTERM still
//!   stops it cleanly.
//!
//! Images start from `qemu-img create` and are patched byte by byte
//! ([`vublk_tests::hostile`]). Where the crafted bytes have a right answer (compressed streams
//! that should decode), `qemu-io` confirms it first, so a test cannot pass on a crafting bug.

#![allow(
    clippy::unwrap_used,
    reason = "a test binary: the helpers panic like the #[test] fns that clippy already exempts"
)]

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::errno::Errno;
use tempfile::TempDir;
use vublk_tests::blk::{BlkClient, BlkError};
use vublk_tests::daemon::{Daemon, DiskOptions};
use vublk_tests::hostile::{
    self, deflate_run, field, l2_compressed, l2_standard, max_compressed_sectors, tail, zstd_frame,
    zstd_rle_frame, Boxed, Exit, Qcow2File,
};
use vublk_tests::images::QEMU_IO;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// RLIMIT_AS for every vublk process. Measured on the debug build (x86_64, glibc): `vublk
/// probe` runs under 16 MiB; `vublk serve` of a 1 GiB qcow2 image starts under 64 MiB, and
/// serving one libblkio client peaks at a VmPeak of 203 MiB (the tests print it: the binary,
/// thread stacks and per-thread malloc arenas of the main, vhost-user and queue threads, the
/// io_uring ring, the client's mapped memory), 235 MiB with a 32 MiB L1 table (read once,
/// decoded once). 512 MiB is more than twice the worst of these, while any allocation sized
/// by an image field past vublk's limits (a 2^31-entry snapshot table, a 4 GiB L1, a 2 GiB
/// zstd window, a 1 GiB decompression bomb) exceeds it and aborts the process, which the tests
/// see as a signal.
const ADDRESS_SPACE_LIMIT: u64 = 512 * MIB;
/// How long a probe may run, or serve take to exit or start listening, before it is killed
/// and the test fails as a hang. Every case here finishes in well under a second.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(15);
const BOX: Boxed = Boxed {
    address_space: ADDRESS_SPACE_LIMIT,
    timeout: PROCESS_TIMEOUT,
};

/// The default qcow2 geometry: 64 KiB clusters.
const CLUSTER: u64 = 64 * KIB;
/// The base image's virtual size: two L1 entries with 64 KiB clusters.
const DISK: u64 = GIB;
/// The pattern `qemu-io` writes into guest cluster 0 of the data images.
const DATA_BYTE: u8 = 0x5a;

// ---------------------------------------------------------------------------------------------
// Fixture.

struct Scratch {
    dir: TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fresh, empty qcow2 image of `size` bytes with `cluster` byte clusters.
    fn image(&self, size: u64, cluster: u64, opts: &str) -> Qcow2File {
        Qcow2File::create(&self.path("hostile.qcow2"), size, cluster, opts).unwrap()
    }

    /// The default image: 1 GiB, 64 KiB clusters, nothing allocated.
    fn default_image(&self) -> Qcow2File {
        self.image(DISK, CLUSTER, "")
    }

    /// An image whose guest cluster 0 holds [`DATA_BYTE`] (64 KiB of it), so L1 entry 0 points
    /// at an L2 table whose entry 0 points at a data cluster.
    fn data_image(&self, size: u64, cluster: u64, opts: &str) -> Qcow2File {
        let img = self.image(size, cluster, opts);
        img.qemu_io(&format!("write -P {DATA_BYTE:#x} 0 64k"))
            .unwrap();
        img
    }

    /// `vublk probe IMAGE [extra]` in the box; fails the test if it was killed or died by a
    /// signal.
    fn probe(&self, image: &Path, extra: &[&str]) -> Exit {
        let mut args: Vec<&OsStr> = vec![OsStr::new("probe"), image.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        let exit = BOX
            .run(self.dir.path(), &args)
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_exited_by_itself(&exit, &format!("vublk probe {}", image.display()));
        exit
    }

    /// `vublk serve` of `image` read-only in the box: the daemon, or how it exited.
    fn serve(&self, image: &Path) -> Result<Daemon, Exit> {
        let opts = DiskOptions {
            format: "qcow2".to_string(),
            read_only: true,
            ..DiskOptions::raw(image)
        };
        BOX.serve(&opts, &self.path("vhost.sock"), &self.path("serve.stderr"))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn serve_stderr(&self) -> String {
        hostile::read_lossy(&self.path("serve.stderr"))
    }
}

/// The process ended by itself: an exit code, not a signal (an abort on a failed allocation
/// under RLIMIT_AS, a segfault, a panic=abort).
fn assert_exited_by_itself(exit: &Exit, what: &str) {
    assert!(
        exit.status.signal().is_none() && exit.status.code().is_some(),
        "CRASH: {what} was killed by signal {:?} after {:?}; stderr tail:\n{}",
        exit.status.signal(),
        exit.elapsed,
        tail(&exit.stderr)
    );
}

/// A non-zero exit whose stderr contains every one of `needles`.
fn assert_refused(exit: &Exit, what: &str, needles: &[&str]) {
    assert_exited_by_itself(exit, what);
    assert!(
        !exit.status.success(),
        "WRONG ACCEPTANCE: {what} exited 0; stdout:\n{}\nstderr:\n{}",
        exit.stdout,
        tail(&exit.stderr)
    );
    for needle in needles {
        assert!(
            exit.stderr.contains(needle),
            "{what} refused, but stderr does not name {needle:?}:\n{}",
            exit.stderr
        );
    }
    eprintln!(
        "{what}: refused in {:?} ({}): {}",
        exit.elapsed,
        exit.status,
        exit.stderr.trim()
    );
}

/// `vublk probe` refuses the image, naming `needles`.
fn probe_refuses(s: &Scratch, image: &Path, needles: &[&str]) {
    let exit = s.probe(image, &[]);
    assert_refused(&exit, "vublk probe", needles);
}

/// `vublk probe` exits 0 and its JSON contains each of `needles` (e.g. an `x-unsupported`
/// entry); returns the JSON.
fn probe_reports(s: &Scratch, image: &Path, extra: &[&str], needles: &[&str]) -> String {
    let exit = s.probe(image, extra);
    assert!(
        exit.status.success(),
        "vublk probe {extra:?} refused an image it should report: {}",
        exit.stderr
    );
    let json: serde_json::Value = serde_json::from_str(&exit.stdout)
        .unwrap_or_else(|e| panic!("probe printed no JSON ({e}): {}", exit.stdout));
    for needle in needles {
        assert!(
            exit.stdout.contains(needle),
            "vublk probe does not report {needle:?}:\n{}",
            exit.stdout
        );
    }
    eprintln!("vublk probe {extra:?}: reported in {:?}", exit.elapsed);
    json.to_string()
}

/// `vublk serve` exits by itself, non-zero, before listening, naming `needles`.
fn serve_refuses(s: &Scratch, image: &Path, needles: &[&str]) {
    match s.serve(image) {
        Ok(daemon) => {
            let pid = daemon.pid();
            drop(daemon);
            panic!(
                "WRONG ACCEPTANCE: vublk serve (pid {pid}) listens on an image it must refuse; \
                 stderr:\n{}",
                s.serve_stderr()
            );
        }
        Err(exit) => assert_refused(&exit, "vublk serve", needles),
    }
}

/// Both probe and serve refuse the image, naming `needles`.
fn refused(s: &Scratch, image: &Path, needles: &[&str]) {
    probe_refuses(s, image, needles);
    serve_refuses(s, image, needles);
}

/// A well-formed image using a feature vublk does not serve: probe reports it in
/// `x-unsupported`, serve refuses naming it.
fn unsupported(s: &Scratch, image: &Path, reported: &str, serve_needles: &[&str]) {
    let json = probe_reports(s, image, &[], &["x-unsupported", reported]);
    let unsupported = serde_json::from_str::<serde_json::Value>(&json).unwrap()["format-specific"]
        ["data"]["x-unsupported"]
        .to_string();
    assert!(
        unsupported.contains(reported),
        "{reported:?} is not in x-unsupported: {unsupported}"
    );
    serve_refuses(s, image, serve_needles);
}

// ---------------------------------------------------------------------------------------------
// Serving a valid but nasty image.

/// A served image with a connected client.
struct Served<'a> {
    scratch: &'a Scratch,
    daemon: Daemon,
    client: BlkClient,
}

impl<'a> Served<'a> {
    /// Probes (which must succeed: the header is valid), serves and connects.
    fn start(s: &'a Scratch, image: &Path, virtual_size: u64) -> Served<'a> {
        let json = probe_reports(s, image, &[], &[]);
        assert!(
            json.contains(&format!("\"virtual-size\":{virtual_size}")),
            "probe reports another virtual size than {virtual_size}: {json}"
        );
        let daemon = match s.serve(image) {
            Ok(daemon) => daemon,
            Err(exit) => panic!(
                "vublk serve refused a valid image ({}): {}",
                exit.status, exit.stderr
            ),
        };
        let client = BlkClient::connect_read_only(&daemon.socket, 1).unwrap_or_else(|e| {
            panic!(
                "connecting: {e} ({e:?}); daemon stderr:\n{}",
                tail(&s.serve_stderr())
            )
        });
        assert_eq!(client.capacity(), virtual_size, "capacity");
        Served {
            scratch: s,
            daemon,
            client,
        }
    }

    /// One read: its data, or the errno of an I/O error. A timeout or a dead daemon fails the
    /// test (that is a hang or a crash, not an error).
    fn read(&mut self, what: &str, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        let result = self.client.read(offset, usize::try_from(len).unwrap());
        let outcome = match result {
            Ok(data) => Ok(data),
            Err(BlkError::Request { errno, .. }) => Err(errno),
            Err(e) => {
                let status = self.daemon.child.try_wait().unwrap();
                panic!(
                    "{what}: read of {len} bytes at {offset} neither completed nor failed: {e} \
                     ({e:?}); daemon status: {status:?}; stderr:\n{}",
                    tail(&self.scratch.serve_stderr())
                )
            }
        };
        self.assert_alive(what);
        eprintln!(
            "{what}: read {len} at {offset:#x}: {}",
            match &outcome {
                Ok(data) => describe(data),
                Err(errno) => format!("I/O error {errno}"),
            }
        );
        outcome
    }

    /// A read that must either fail or return `len` bytes all equal to `byte`.
    fn read_byte_or_error(&mut self, what: &str, offset: u64, len: u64, byte: u8) {
        if let Ok(data) = self.read(what, offset, len) {
            assert_uniform(what, &data, byte);
        }
    }

    /// A read that must fail with an I/O error.
    fn read_error(&mut self, what: &str, offset: u64, len: u64) {
        if let Ok(data) = self.read(what, offset, len) {
            panic!(
                "WRONG ACCEPTANCE: {what}: a read vublk must refuse returned {}",
                describe(&data)
            );
        }
    }

    /// A read that must return `len` bytes all equal to `byte`.
    fn read_byte(&mut self, what: &str, offset: u64, len: u64, byte: u8) {
        match self.read(what, offset, len) {
            Ok(data) => assert_uniform(what, &data, byte),
            Err(errno) => panic!("{what}: read of {len} bytes at {offset:#x} failed: {errno}"),
        }
    }

    fn assert_alive(&mut self, what: &str) {
        if let Some(status) = self.daemon.child.try_wait().unwrap() {
            panic!(
                "CRASH: the daemon exited ({status}, signal {:?}) after {what}; stderr:\n{}",
                status.signal(),
                tail(&self.scratch.serve_stderr())
            );
        }
    }

    /// After the nasty reads: `benign` (offset, len, byte) still reads correctly, the daemon
    /// is alive, and SIGTERM stops it cleanly (exit 0, no signal).
    fn finish(mut self, benign: (u64, u64, u8)) {
        let (offset, len, byte) = benign;
        self.read_byte("a later ordinary read", offset, len, byte);
        let peak = hostile::vm_peak(self.daemon.pid());
        eprintln!(
            "daemon VmPeak: {} MiB (RLIMIT_AS {} MiB)",
            peak.map_or(-1, |p| i64::try_from(p / MIB).unwrap()),
            ADDRESS_SPACE_LIMIT / MIB
        );
        drop(self.client);
        let status = self.daemon.terminate().unwrap();
        assert!(
            status.success(),
            "the daemon did not stop cleanly on SIGTERM ({status}, signal {:?}); stderr:\n{}",
            status.signal(),
            tail(&self.scratch.serve_stderr())
        );
    }
}

fn assert_uniform(what: &str, data: &[u8], byte: u8) {
    if let Some(i) = data.iter().position(|&b| b != byte) {
        panic!(
            "{what}: byte {i} is {:#04x}, expected {byte:#04x} throughout ({})",
            data[i],
            describe(data)
        );
    }
}

/// "N bytes of 0xXX" or "N bytes, first 0xXX, mixed".
fn describe(data: &[u8]) -> String {
    match data.first() {
        None => "0 bytes".to_string(),
        Some(&first) if data.iter().all(|&b| b == first) => {
            format!("{} bytes of {first:#04x}", data.len())
        }
        Some(&first) => format!("{} bytes, first {first:#04x}, mixed", data.len()),
    }
}

/// Asserts QEMU reads `len` bytes of `byte` at `offset` of `image`: the crafted bytes mean
/// what the test thinks they mean.
fn qemu_reads(image: &Path, offset: u64, len: u64, byte: u8) {
    let out = Command::new(QEMU_IO)
        .args(["-r", "-f", "qcow2", "-c"])
        .arg(format!("read -P {byte:#x} {offset} {len}"))
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io does not read {len} bytes of {byte:#x} at {offset:#x}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// The box itself.

#[test]
fn the_box_enforces_its_address_space_limit() {
    // Without this, every "bounded memory" verdict below could be vacuous: a probe of a valid
    // image must not succeed with a 4 MiB address space (less than the binary's own mapping).
    let s = Scratch::new();
    let img = s.default_image();
    let tiny = Boxed {
        address_space: 4 * MIB,
        timeout: PROCESS_TIMEOUT,
    };
    let result = tiny.run(s.dir.path(), &[OsStr::new("probe"), img.path().as_os_str()]);
    if let Ok(exit) = &result {
        assert!(
            !exit.status.success(),
            "vublk probe succeeded with RLIMIT_AS 4 MiB: the limit is not applied"
        );
    }
    let ok = s.probe(img.path(), &[]);
    assert!(ok.status.success(), "probe in the box: {}", ok.stderr);
}

// ---------------------------------------------------------------------------------------------
// Invalid headers: probe and serve refuse, naming the field.

#[test]
fn cluster_bits_8_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::CLUSTER_BITS, 8).unwrap();
    refused(&s, img.path(), &["cluster_bits 8"]);
}

#[test]
fn cluster_bits_22_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::CLUSTER_BITS, 22).unwrap();
    refused(&s, img.path(), &["cluster_bits 22"]);
}

#[test]
fn cluster_bits_u32_max_is_refused() {
    // A shift by cluster_bits before the range check would overflow.
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::CLUSTER_BITS, u32::MAX).unwrap();
    refused(&s, img.path(), &["cluster_bits 4294967295"]);
}

#[test]
fn v3_header_length_below_104_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::HEADER_LENGTH, 96).unwrap();
    refused(&s, img.path(), &["header_length 96", "104"]);
}

#[test]
fn header_length_not_a_multiple_of_8_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::HEADER_LENGTH, 108).unwrap();
    refused(&s, img.path(), &["header_length 108", "multiple of 8"]);
}

#[test]
fn l1_table_over_32_mib_is_refused() {
    // One entry past QEMU's 32 MiB L1 limit; the header says the table lies past the end of
    // the file, so nothing but the check stops a 32 MiB + 8 allocation and read.
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::L1_SIZE, u32::try_from(32 * MIB / 8 + 1).unwrap())
        .unwrap();
    refused(&s, img.path(), &["L1 table", "33554440 bytes", "33554432"]);
}

#[test]
fn l1_size_u32_max_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::L1_SIZE, u32::MAX).unwrap();
    refused(&s, img.path(), &["L1 table", "34359738360 bytes"]);
}

#[test]
fn l1_size_too_small_for_the_virtual_size_is_refused() {
    // 1 GiB with 64 KiB clusters needs 2 entries (512 MiB each).
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::L1_SIZE, 1).unwrap();
    refused(&s, img.path(), &["l1_size 1", "too small", "needs 2"]);
}

#[test]
fn l1_table_offset_unaligned_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    let l1 = img.l1_table_offset().unwrap();
    img.put_u64(field::L1_TABLE_OFFSET, l1 + 0x200).unwrap();
    refused(&s, img.path(), &["L1 table", "not aligned"]);
}

#[test]
fn l1_table_offset_beyond_2_56_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u64(field::L1_TABLE_OFFSET, 1 << 56).unwrap();
    refused(&s, img.path(), &["L1 table", "0x100000000000000"]);
}

#[test]
fn l1_table_offset_near_u64_max_is_refused() {
    // offset + size would overflow a u64 if added unchecked.
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u64(field::L1_TABLE_OFFSET, u64::MAX - (CLUSTER - 1))
        .unwrap();
    refused(&s, img.path(), &["L1 table"]);
}

#[test]
fn refcount_table_clusters_huge_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::REFCOUNT_TABLE_CLUSTERS, u32::MAX)
        .unwrap();
    refused(&s, img.path(), &["refcount table", "8388608"]);
}

#[test]
fn refcount_order_7_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::REFCOUNT_ORDER, 7).unwrap();
    refused(&s, img.path(), &["refcount_order 7"]);
}

#[test]
fn virtual_size_2_62_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u64(field::SIZE, 1 << 62).unwrap();
    refused(&s, img.path(), &["virtual size 4611686018427387904"]);
}

#[test]
fn backing_file_offset_outside_cluster_0_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u64(field::BACKING_FILE_OFFSET, 2 * CLUSTER)
        .unwrap();
    img.put_u32(field::BACKING_FILE_SIZE, 8).unwrap();
    refused(
        &s,
        img.path(),
        &["backing_file_offset 0x20000", "cluster 0"],
    );
}

#[test]
fn backing_file_name_beyond_64_kib_is_refused() {
    // With 2 MiB clusters an offset of 128 KiB is inside cluster 0, but past the 64 KiB a
    // probe reads.
    let s = Scratch::new();
    let img = s.image(DISK, 2 * MIB, "");
    img.put_bytes(128 * KIB, b"base.qcow2").unwrap();
    img.put_u64(field::BACKING_FILE_OFFSET, 128 * KIB).unwrap();
    img.put_u32(field::BACKING_FILE_SIZE, 10).unwrap();
    refused(&s, img.path(), &["backing file name", "65536"]);
}

#[test]
fn backing_file_offset_inside_the_header_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u64(field::BACKING_FILE_OFFSET, 8).unwrap();
    img.put_u32(field::BACKING_FILE_SIZE, 8).unwrap();
    refused(
        &s,
        img.path(),
        &["backing_file_offset 0x8", "inside the header"],
    );
}

#[test]
fn backing_file_name_of_2000_bytes_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_bytes(4 * KIB, &[b'a'; 2000]).unwrap();
    img.put_u64(field::BACKING_FILE_OFFSET, 4 * KIB).unwrap();
    img.put_u32(field::BACKING_FILE_SIZE, 2000).unwrap();
    refused(&s, img.path(), &["backing_file_size 2000", "1023"]);
}

#[test]
fn header_extension_running_past_the_cluster_is_refused() {
    // QEMU's first extension (the feature name table) at header_length, with a length that
    // runs far past cluster 0.
    let s = Scratch::new();
    let img = s.default_image();
    let first = u64::from(img.header_length().unwrap());
    img.put_u32(first + 4, 0xffff_fff0).unwrap();
    refused(&s, img.path(), &["4294967280 bytes", "extension area"]);
}

#[test]
fn ten_thousand_tiny_header_extensions_are_refused() {
    // 2 MiB clusters so that all 10000 empty extensions (8 bytes each) fit in cluster 0: only
    // the extension count can stop the loop early.
    let s = Scratch::new();
    let img = s.image(DISK, 2 * MIB, "");
    let first = u64::from(img.header_length().unwrap());
    let mut area = Vec::with_capacity(10_001 * 8);
    for i in 0..10_000u32 {
        // Distinct unknown magics, so no duplicate check trips first.
        area.extend_from_slice(&(0x7000_0000 + i).to_be_bytes());
        area.extend_from_slice(&0u32.to_be_bytes());
    }
    area.extend_from_slice(&[0; 8]); // end of the extension area
    img.put_bytes(first, &area).unwrap();
    refused(&s, img.path(), &["more than 128 header extensions"]);
}

#[test]
fn nb_snapshots_2_31_with_garbage_offset_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::NB_SNAPSHOTS, 1 << 31).unwrap();
    img.put_u64(field::SNAPSHOTS_OFFSET, 0xdead_beef_cafe_f00d)
        .unwrap();
    refused(&s, img.path(), &["nb_snapshots 2147483648", "65536"]);
}

#[test]
fn compression_type_2_without_its_feature_bit_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_bytes(field::COMPRESSION_TYPE, &[2]).unwrap();
    refused(
        &s,
        img.path(),
        &["compression_type 2", "incompatible bit 3"],
    );
}

#[test]
fn image_truncated_to_100_bytes_is_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.set_len(100).unwrap();
    refused(&s, img.path(), &["version 3 header", "104", "100 bytes"]);
}

#[test]
fn empty_file_is_refused_as_qcow2() {
    let s = Scratch::new();
    let path = s.path("empty.qcow2");
    std::fs::File::create(&path).unwrap();
    // Without a format, an empty file probes as an empty raw disk, as with qemu-img.
    probe_reports(
        &s,
        &path,
        &[],
        &["\"format\": \"raw\"", "\"virtual-size\": 0"],
    );
    let exit = s.probe(&path, &["--format", "qcow2"]);
    assert_refused(&exit, "vublk probe --format qcow2", &["qcow2 magic"]);
    serve_refuses(&s, &path, &["magic"]);
}

// ---------------------------------------------------------------------------------------------
// Well-formed headers using features vublk does not serve: probe reports, serve refuses.

#[test]
fn unknown_incompatible_bit_is_reported_and_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u64(field::INCOMPATIBLE_FEATURES, 1 << 40).unwrap();
    unsupported(
        &s,
        img.path(),
        "unknown incompatible feature(s): bit 40",
        &["unknown incompatible feature", "bit 40"],
    );
}

#[test]
fn crypt_method_aes_is_reported_and_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    img.put_u32(field::CRYPT_METHOD, 1).unwrap();
    unsupported(&s, img.path(), "encryption: aes", &["encryption", "aes"]);
}

#[test]
fn compression_type_2_is_reported_and_refused() {
    let s = Scratch::new();
    let img = s.default_image();
    // The compression type bit (3) with compression_type 2, which no spec defines.
    img.put_u64(field::INCOMPATIBLE_FEATURES, 1 << 3).unwrap();
    img.put_bytes(field::COMPRESSION_TYPE, &[2]).unwrap();
    unsupported(
        &s,
        img.path(),
        "compression type 2",
        &["compression type 2"],
    );
}

// ---------------------------------------------------------------------------------------------
// Valid but nasty: served, every read returns data or an I/O error, the daemon survives.

#[test]
fn l1_table_at_the_32_mib_limit_is_served() {
    // 4 Mi L1 entries (exactly 32 MiB) at the end of a sparse file, for a 2 PiB disk that
    // needs all of them; the last entry points at an L2 table far past the end of the file.
    const L1_ENTRIES: u64 = 32 * MIB / 8;
    let s = Scratch::new();
    let img = s.data_image(DISK, CLUSTER, "");
    let size = L1_ENTRIES * (CLUSTER / 8) * CLUSTER;
    let old_l1 = img.l1_entry(0).unwrap();
    let l1 = img.len().unwrap().next_multiple_of(CLUSTER);
    img.set_len(l1 + 32 * MIB).unwrap();
    img.put_u64(l1, old_l1).unwrap();
    img.put_u64(l1 + 8 * (L1_ENTRIES - 1), l2_standard(1 << 50))
        .unwrap();
    img.put_u64(field::L1_TABLE_OFFSET, l1).unwrap();
    img.put_u32(field::L1_SIZE, u32::try_from(L1_ENTRIES).unwrap())
        .unwrap();
    img.put_u64(field::SIZE, size).unwrap();
    qemu_reads(img.path(), 0, CLUSTER, DATA_BYTE);

    let mut served = Served::start(&s, img.path(), size);
    served.read_byte("guest cluster 0", 0, CLUSTER, DATA_BYTE);
    served.read_byte_or_error("the L2 table past EOF", size - MIB, MIB, 0);
    served.read_byte("an unallocated L1 entry", size / 2, MIB, 0);
    served.finish((CLUSTER, CLUSTER, 0));
}

#[test]
fn l2_entries_pointing_far_past_the_end_of_the_file_are_served() {
    let s = Scratch::new();
    let img = s.data_image(DISK, CLUSTER, "");
    img.set_l2_entry(1, l2_standard(1 << 40)).unwrap();
    img.set_l2_entry(2, l2_standard((1 << 56) - CLUSTER))
        .unwrap();
    // Reserved bit 56 set, and a misaligned offset: corrupt entries.
    img.set_l2_entry(3, l2_standard(1 << 56 | 0x5_0000))
        .unwrap();
    img.set_l2_entry(4, l2_standard(0x5_0200)).unwrap();
    // An L1 entry whose L2 table lies 1 TiB past the end of the file.
    img.set_l1_entry(1, l2_standard(1 << 40)).unwrap();

    let mut served = Served::start(&s, img.path(), DISK);
    served.read_byte_or_error("an L2 entry 1 TiB past EOF", CLUSTER, CLUSTER, 0);
    served.read_byte_or_error("an L2 entry just below 2^56", 2 * CLUSTER, CLUSTER, 0);
    served.read_error("an L2 entry with reserved bit 56", 3 * CLUSTER, CLUSTER);
    served.read_error("an L2 entry with a misaligned offset", 4 * CLUSTER, CLUSTER);
    served.read_byte_or_error("all five at once", 0, 5 * CLUSTER, DATA_BYTE);
    served.read_byte_or_error("an L2 table 1 TiB past EOF", 512 * MIB, MIB, 0);
    served.read_byte_or_error("an L2 entry 1 TiB past EOF, again", CLUSTER, CLUSTER, 0);
    served.finish((0, CLUSTER, DATA_BYTE));
}

#[test]
fn every_l2_entry_pointing_at_the_same_host_cluster_is_served() {
    let s = Scratch::new();
    let img = s.data_image(DISK, CLUSTER, "");
    let data = img.l2_table_offset(0).unwrap() + CLUSTER;
    assert_eq!(
        img.get_u64(img.l2_table_offset(0).unwrap()).unwrap(),
        l2_standard(data),
        "qemu-img put guest cluster 0 right after its L2 table"
    );
    let table: Vec<u8> = (0..CLUSTER / 8)
        .flat_map(|_| l2_standard(data).to_be_bytes())
        .collect();
    img.put_bytes(img.l2_table_offset(0).unwrap(), &table)
        .unwrap();
    qemu_reads(img.path(), 500 * MIB, MIB, DATA_BYTE);

    let mut served = Served::start(&s, img.path(), DISK);
    for (what, offset) in [("the first 4 MiB", 0), ("the last 4 MiB", 508 * MIB)] {
        served.read_byte_or_error(what, offset, 4 * MIB, DATA_BYTE);
    }
    served.finish((512 * MIB, CLUSTER, 0));
}

#[test]
fn l2_tables_at_the_header_l1_and_refcount_table_are_served() {
    // L1 entry 1 makes the L1 table its own L2 table, entry 2 the refcount table, and the real
    // L2 table maps a cluster at host offset 0 (the header) and one at the L2 table itself.
    let s = Scratch::new();
    let img = s.data_image(2 * GIB, CLUSTER, "");
    let l1 = img.l1_table_offset().unwrap();
    let l2 = img.l2_table_offset(0).unwrap();
    img.set_l1_entry(1, l2_standard(l1)).unwrap();
    img.set_l1_entry(2, l2_standard(img.refcount_table_offset().unwrap()))
        .unwrap();
    img.set_l1_entry(3, l2_standard(0)).unwrap();
    img.set_l2_entry(1, l2_standard(0)).unwrap();
    img.set_l2_entry(2, l2_standard(l2)).unwrap();

    let mut served = Served::start(&s, img.path(), 2 * GIB);
    for (what, offset) in [
        ("the L1 table as an L2 table", 512 * MIB),
        ("the refcount table as an L2 table", GIB),
        ("an L1 entry with COPIED and offset 0", 1536 * MIB),
        ("an L2 entry at the header", CLUSTER),
        ("an L2 entry at its own table", 2 * CLUSTER),
    ] {
        let _ = served.read(what, offset, CLUSTER);
        let _ = served.read(what, offset, 4 * CLUSTER);
    }
    served.finish((0, CLUSTER, DATA_BYTE));
}

/// Compressed descriptors with the largest sector count the field holds, on an image with
/// `cluster` byte clusters: a valid stream at the very end of the file (so the read runs past
/// it), garbage from the header, a stream far past the end of the file, and (where the offset
/// field is wide enough, clusters under 16 KiB) one whose bytes would cross 2^56.
fn compressed_max_sector_count(cluster: u64) {
    let s = Scratch::new();
    let img = s.data_image(64 * MIB, cluster, "");
    let bits = img.cluster_bits().unwrap();
    let max = max_compressed_sectors(bits);
    let good = deflate_run(0x43, usize::try_from(cluster).unwrap());
    // The stored bytes end at EOF; the descriptor claims max + 1 sectors.
    let at = img.append_cluster_aligned(&good).unwrap();
    img.set_l2_entry(1, l2_compressed(at, max, bits)).unwrap();
    img.set_l2_entry(2, l2_compressed(0x70, max, bits)).unwrap();
    img.set_l2_entry(3, l2_compressed(1 << 40, max, bits))
        .unwrap();
    let offset_bits = 62 - (bits - 8);
    if offset_bits > 56 {
        img.set_l2_entry(4, l2_compressed((1 << 56) - 256, max, bits))
            .unwrap();
    }
    qemu_reads(img.path(), cluster, cluster, 0x43);

    let mut served = Served::start(&s, img.path(), 64 * MIB);
    served.read_byte("a valid stream read past EOF", cluster, cluster, 0x43);
    let _ = served.read("header bytes as a stream", 2 * cluster, cluster);
    served.read_byte_or_error("a stream 1 TiB past EOF", 3 * cluster, cluster, 0);
    if offset_bits > 56 {
        served.read_error("a stream crossing 2^56", 4 * cluster, cluster);
    }
    let _ = served.read("all of them at once", 0, (5 * cluster).min(4 * MIB));
    served.read_byte("the valid stream again", cluster, cluster, 0x43);
    served.finish((0, (64 * KIB).min(cluster), DATA_BYTE));
}

#[test]
fn compressed_max_sector_count_64k_clusters() {
    compressed_max_sector_count(CLUSTER);
}

#[test]
fn compressed_max_sector_count_2m_clusters() {
    // 13 bits of sector count: a 4 MiB read for one 2 MiB cluster.
    compressed_max_sector_count(2 * MIB);
}

#[test]
fn compressed_max_sector_count_512_byte_clusters() {
    // x = 61: the offset field reaches past 2^56.
    compressed_max_sector_count(512);
}

#[test]
fn zstd_2_gib_window_fails_and_zstd_bomb_stops_at_one_cluster() {
    let s = Scratch::new();
    let img = s.data_image(DISK, CLUSTER, "compression_type=zstd");
    let bits = img.cluster_bits().unwrap();
    let payload = vec![0x33; usize::try_from(CLUSTER).unwrap()];
    // Control: the same frame with a 64 KiB window decodes.
    let small = zstd_frame(16, &payload);
    let at = img.append_cluster_aligned(&small).unwrap();
    img.set_l2_entry(1, l2_compressed(at, small.len() as u64 / 512, bits))
        .unwrap();
    let huge = zstd_frame(31, &payload);
    let at = img.append_cluster_aligned(&huge).unwrap();
    img.set_l2_entry(2, l2_compressed(at, huge.len() as u64 / 512, bits))
        .unwrap();
    // A bomb: 1 GiB of 0x44 in 8192 RLE blocks (32 KiB of frame) with an allowed window,
    // and its control, one cluster of 0x45 in one RLE block. QEMU reads the control but
    // refuses the bomb (EIO: its zstd path wants the frame to end with the cluster); vublk
    // may either refuse it or stop at one cluster.
    let bomb = zstd_rle_frame(17, 0x44, usize::try_from(GIB).unwrap());
    let at = img.append_cluster_aligned(&bomb).unwrap();
    img.set_l2_entry(3, l2_compressed(at, bomb.len() as u64 / 512, bits))
        .unwrap();
    let rle = zstd_rle_frame(17, 0x45, usize::try_from(CLUSTER).unwrap());
    let at = img.append_cluster_aligned(&rle).unwrap();
    img.set_l2_entry(4, l2_compressed(at, 0, bits)).unwrap();
    qemu_reads(img.path(), CLUSTER, CLUSTER, 0x33);
    qemu_reads(img.path(), 4 * CLUSTER, CLUSTER, 0x45);

    let mut served = Served::start(&s, img.path(), DISK);
    served.read_byte("a zstd frame with a 64 KiB window", CLUSTER, CLUSTER, 0x33);
    served.read_error("a zstd frame with a 2 GiB window", 2 * CLUSTER, CLUSTER);
    served.read_error("a zstd frame with a 2 GiB window, again", 2 * CLUSTER, 512);
    served.read_byte("one RLE block of one cluster", 4 * CLUSTER, CLUSTER, 0x45);
    served.read_byte_or_error("a zstd bomb of RLE blocks", 3 * CLUSTER, CLUSTER, 0x44);
    served.read_byte_or_error("the zstd bomb, one sector", 3 * CLUSTER + 512, 512, 0x44);
    served.read_byte("the 64 KiB window frame again", CLUSTER, CLUSTER, 0x33);
    served.finish((0, CLUSTER, DATA_BYTE));
}

#[test]
fn deflate_bomb_decompresses_one_cluster_only() {
    // 16 MiB of 0x41 in about 100 KiB of deflate, inside one compressed cluster: decoding
    // must stop at 64 KiB. A stream that ends short of a cluster is an I/O error.
    let s = Scratch::new();
    let img = s.data_image(DISK, CLUSTER, "");
    let bits = img.cluster_bits().unwrap();
    let bomb = deflate_run(0x41, usize::try_from(16 * MIB).unwrap());
    assert!(
        bomb.len() as u64 <= 2 * CLUSTER,
        "bomb is {} bytes",
        bomb.len()
    );
    let at = img.append_cluster_aligned(&bomb).unwrap();
    img.set_l2_entry(1, l2_compressed(at, bomb.len() as u64 / 512, bits))
        .unwrap();
    let short = deflate_run(0x42, 1000);
    let at = img.append_cluster_aligned(&short).unwrap();
    img.set_l2_entry(2, l2_compressed(at, 0, bits)).unwrap();
    qemu_reads(img.path(), CLUSTER, CLUSTER, 0x41);

    let mut served = Served::start(&s, img.path(), DISK);
    served.read_byte("a deflate bomb", CLUSTER, CLUSTER, 0x41);
    served.read_error("a stream of 1000 bytes", 2 * CLUSTER, CLUSTER);
    served.read_byte("the bomb again, mid-cluster", CLUSTER + 4096, 4096, 0x41);
    served.finish((0, CLUSTER, DATA_BYTE));
}

// ---------------------------------------------------------------------------------------------
// Writable: opening for writing reads more (the refcount table) and builds the metadata map.

/// The largest L1 table (32 MiB, every entry a distinct L2 table) and the largest refcount
/// table (8 MiB, every entry a distinct block), opened read-write in the box: vublk starts
/// within the memory limit, writes (an allocation, whose tables lie past the end of the file)
/// and reads back, and stops cleanly.
#[test]
fn largest_l1_and_refcount_tables_are_served_writable_within_the_box() {
    const L1_ENTRIES: u64 = 32 * MIB / 8;
    const REFCOUNT_ENTRIES: u64 = 8 * MIB / 8;
    let s = Scratch::new();
    let img = s.data_image(DISK, CLUSTER, "");
    let size = L1_ENTRIES * (CLUSTER / 8) * CLUSTER;
    let end = img.len().unwrap().next_multiple_of(CLUSTER);
    // Tables at the end of the (sparse) file: L1, then the refcount table, then the tables
    // they point at, all distinct clusters far past them.
    let l1 = end;
    let refcount_table = l1 + 32 * MIB;
    let tables = refcount_table + 8 * MIB;
    img.set_len(tables).unwrap();
    let old_l1 = img.l1_entry(0).unwrap();
    let old_block = img
        .get_u64(img.get_u64(field::REFCOUNT_TABLE_OFFSET).unwrap())
        .unwrap();
    let mut l1_bytes = Vec::new();
    for i in 0..L1_ENTRIES {
        let entry = if i == 0 {
            old_l1
        } else {
            l2_standard(tables + (REFCOUNT_ENTRIES + i) * CLUSTER)
        };
        l1_bytes.extend_from_slice(&entry.to_be_bytes());
    }
    img.put_bytes(l1, &l1_bytes).unwrap();
    let mut rt_bytes = Vec::new();
    for i in 0..REFCOUNT_ENTRIES {
        let entry = if i == 0 {
            old_block
        } else {
            tables + i * CLUSTER
        };
        rt_bytes.extend_from_slice(&entry.to_be_bytes());
    }
    img.put_bytes(refcount_table, &rt_bytes).unwrap();
    // Refcount 1 (16-bit entries in block 0) for the new L1 and refcount table clusters, so
    // the image is consistent and the allocator finds free clusters after them.
    let first = l1 / CLUSTER;
    let count = (tables - l1) / CLUSTER;
    assert!(
        first + count <= CLUSTER / 2,
        "block 0 covers the new tables"
    );
    let ones: Vec<u8> = (0..count).flat_map(|_| [0u8, 1]).collect();
    img.put_bytes(old_block + 2 * first, &ones).unwrap();
    img.put_u64(field::L1_TABLE_OFFSET, l1).unwrap();
    img.put_u32(field::L1_SIZE, u32::try_from(L1_ENTRIES).unwrap())
        .unwrap();
    img.put_u64(field::REFCOUNT_TABLE_OFFSET, refcount_table)
        .unwrap();
    img.put_u32(
        field::REFCOUNT_TABLE_CLUSTERS,
        u32::try_from(8 * MIB / CLUSTER).unwrap(),
    )
    .unwrap();
    img.put_u64(field::SIZE, size).unwrap();

    let opts = DiskOptions {
        format: "qcow2".to_string(),
        ..DiskOptions::raw(img.path())
    };
    let daemon = BOX
        .serve(&opts, &s.path("vhost.sock"), &s.path("serve.stderr"))
        .unwrap_or_else(|e| panic!("{e:#}"))
        .unwrap_or_else(|exit| {
            panic!(
                "vublk serve refused or died opening the image writable ({}): {}",
                exit.status, exit.stderr
            )
        });
    let mut client = BlkClient::connect(&daemon.socket, 1)
        .unwrap_or_else(|e| panic!("connecting: {e}; stderr:\n{}", tail(&s.serve_stderr())));
    // Guest cluster 0 is allocated: in place. A cluster under L1 entry 1 allocates (its L2
    // table, past the end of the file, reads as zeroes).
    let at = CLUSTER / 8 * CLUSTER;
    for offset in [0, at] {
        client.write(offset, &[0x5a; 4096]).unwrap_or_else(|e| {
            panic!(
                "write at {offset}: {e}; stderr:\n{}",
                tail(&s.serve_stderr())
            )
        });
        assert_uniform("written data", &client.read(offset, 4096).unwrap(), 0x5a);
    }
    let peak = hostile::vm_peak(daemon.pid());
    eprintln!(
        "daemon VmPeak: {} MiB (RLIMIT_AS {} MiB)",
        peak.map_or(-1, |p| i64::try_from(p / MIB).unwrap()),
        ADDRESS_SPACE_LIMIT / MIB
    );
    drop(client);
    let status = daemon.terminate().unwrap();
    assert!(
        status.success(),
        "the daemon did not stop cleanly ({status}); stderr:\n{}",
        tail(&s.serve_stderr())
    );
}
