//! A real QEMU guest for the end-to-end tests: it boots the Debian cloud kernel under TCG with a
//! `vhost-user-blk-pci` disk on a backend's socket, runs one job (fio write+verify, verify only,
//! or a sysfs report) and powers off.
//!
//! Owns: building the guest artifacts (`tests/e2e/build-guest.sh`, cached in `target/e2e`),
//! the QEMU command line, a hard timeout, capturing the serial console and QEMU's stderr, and
//! parsing the guest's `VUBLK-E2E-RESULT` / `VUBLK-E2E-INFO` lines (their format is defined in
//! `tests/e2e/guest-init.sh`), a report of where QEMU and the backend are stuck when the
//! timeout fires, and a host-side oracle that reads fio's verification headers straight from
//! the image file. It knows nothing about which backend serves the socket: start one with
//! [`crate::daemon::Daemon`] first.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::daemon::target_dir;

/// Marker of the guest's one result line.
pub const RESULT_MARKER: &str = "VUBLK-E2E-RESULT";
/// Marker of the `info` job's `key=value` lines.
pub const INFO_MARKER: &str = "VUBLK-E2E-INFO";
/// Default hard limit for one guest run: boot plus a small fio job takes 4-10 s under TCG on an
/// idle host; the margin covers a loaded two-core CI machine.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Guest RAM. The initramfs (fio and its ~80 MiB of shared libraries) is unpacked into it.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Console lines quoted in error messages.
const ERROR_TAIL_LINES: usize = 40;
/// How often the fixture checks whether QEMU has exited once its console reached end-of-file
/// (QEMU closes stdout only when it exits, so this loop normally ends at its first check).
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The kernel and initramfs the guest boots.
#[derive(Clone, Debug)]
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `guest.env` from the build: kernel package, kernel version and the modules packed.
    pub manifest: PathBuf,
}

impl GuestArtifacts {
    /// Path of the build script.
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/build-guest.sh")
    }

    /// Where the artifacts are cached: `target/e2e`.
    pub fn default_dir() -> PathBuf {
        target_dir().join("e2e")
    }

    /// Builds (or finds up to date) the artifacts in [`Self::default_dir`], once per process.
    ///
    /// Fails, with the script's output, when the kernel package cannot be fetched or the
    /// initramfs cannot be built: an end-to-end test must never skip silently.
    pub fn build() -> Result<GuestArtifacts> {
        static BUILT: OnceLock<Result<GuestArtifacts, String>> = OnceLock::new();
        BUILT
            .get_or_init(|| Self::build_into(&Self::default_dir()).map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(|e| anyhow!(e))
    }

    /// Runs the build script for `dir` (it skips the work when its outputs are current).
    pub fn build_into(dir: &Path) -> Result<GuestArtifacts> {
        let script = Self::script();
        let output = Command::new("bash")
            .arg(&script)
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!(
                "{} {} failed ({}):\n{}{}",
                script.display(),
                dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let artifacts = GuestArtifacts {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
            manifest: dir.join("guest.env"),
        };
        for path in [&artifacts.kernel, &artifacts.initrd, &artifacts.manifest] {
            if !path.is_file() {
                bail!(
                    "{} succeeded but did not produce {}",
                    script.display(),
                    path.display()
                );
            }
        }
        Ok(artifacts)
    }
}

/// fio I/O engine used by the guest's `write` and `verify` jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEngine {
    Libaio,
    IoUring,
}

impl IoEngine {
    fn as_str(self) -> &'static str {
        match self {
            IoEngine::Libaio => "libaio",
            IoEngine::IoUring => "io_uring",
        }
    }
}

/// The fio workload of a `write` or `verify` job. A `verify` only proves persistence when it
/// uses the exact parameters of the `write` it checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FioJob {
    /// Bytes of the disk covered, from `offset`.
    pub size: u64,
    /// First byte of the disk covered.
    pub offset: u64,
    /// fio `--randseed`: which offsets and block sizes are written, in which order.
    pub seed: u64,
    pub ioengine: IoEngine,
    pub iodepth: u32,
    /// fio `--bssplit`, e.g. `4k/90:1m/10`; `None` keeps the guest's default
    /// (`4k/55:16k/20:64k/15:256k/5:1m/5`).
    pub bssplit: Option<String>,
}

impl Default for FioJob {
    /// 32 MiB of direct random writes, mostly 4 KiB blocks with some up to 1 MiB, queue depth 8.
    fn default() -> Self {
        FioJob {
            size: 32 << 20,
            offset: 0,
            seed: 1,
            ioengine: IoEngine::Libaio,
            iodepth: 8,
            bssplit: None,
        }
    }
}

impl FioJob {
    fn kernel_params(&self) -> Vec<String> {
        let mut params = vec![
            format!("vublk.size={}", self.size),
            format!("vublk.offset={}", self.offset),
            format!("vublk.seed={}", self.seed),
            format!("vublk.ioengine={}", self.ioengine.as_str()),
            format!("vublk.iodepth={}", self.iodepth),
        ];
        if let Some(bssplit) = &self.bssplit {
            params.push(format!("vublk.bssplit={bssplit}"));
        }
        params
    }
}

/// `FIO_HDR_MAGIC` from fio's `verify.h`: the first two bytes (little endian) of every block
/// fio writes with `--verify`.
const FIO_HDR_MAGIC: u16 = 0xacca;
/// Bytes of fio's `struct verify_header` read here: magic (u16), verify_type (u16), len (u32),
/// rand_seed (u64), offset (u64).
const FIO_HDR_PREFIX_LEN: usize = 24;

/// Checks, on the host and without fio, that `image` holds what a guest [`Job::Write`] of `job`
/// wrote: the range `job.offset..job.offset + job.size` must be tiled by fio's verify intervals
/// (each as long as the smallest block size, since the job mixes block sizes), each starting
/// with a verify header that names its own offset. This catches a backend that reads and
/// writes at the same wrong place, which the guest's own verification cannot see.
///
/// Returns the number of verify intervals found. The image must be a raw file and the daemon must have
/// made the data visible to other readers of the file (any cache mode does, once the guest's
/// writes completed).
pub fn check_fio_blocks_in_image(image: &Path, job: &FioJob) -> Result<u64> {
    use std::os::unix::fs::FileExt;

    let file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let end = job
        .offset
        .checked_add(job.size)
        .context("job offset + size overflows")?;
    let mut pos = job.offset;
    let mut blocks = 0u64;
    let mut header = [0u8; FIO_HDR_PREFIX_LEN];
    while pos < end {
        file.read_exact_at(&mut header, pos)
            .with_context(|| format!("reading {} at {pos}", image.display()))?;
        let magic = u16::from_le_bytes([header[0], header[1]]);
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut offset_bytes = [0u8; 8];
        offset_bytes.copy_from_slice(&header[16..24]);
        let offset = u64::from_le_bytes(offset_bytes);
        if magic != FIO_HDR_MAGIC || offset != pos || len == 0 {
            bail!(
                "{}: no fio block at offset {pos} (block {blocks} of the range {}..{end}): \
                 magic {magic:#06x}, len {len}, header offset {offset}",
                image.display(),
                job.offset
            );
        }
        pos = pos
            .checked_add(u64::from(len))
            .context("block length overflows")?;
        blocks += 1;
    }
    if pos != end {
        bail!(
            "{}: the last fio block ends at {pos}, past the job's end {end}",
            image.display()
        );
    }
    Ok(blocks)
}

/// What the guest does once booted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Job {
    /// fio writes the range with verification headers and reads it back (`--do_verify=1`).
    Write(FioJob),
    /// fio only reads and verifies what a previous `Write` with the same parameters wrote.
    Verify(FioJob),
    /// Prints the disk's sysfs attributes (size, ro, serial, queues...) as `INFO` lines.
    Info,
    /// Reads the first `bytes` bytes of the disk and reports their md5 as `md5=` on the result
    /// line (works on a read-only disk).
    Checksum { bytes: u64 },
    /// Prints `INFO watch size=SECTORS head=HEX` at start and whenever the disk's size or its
    /// first 16 bytes change (the host resizes or swaps the medium meanwhile); passes after
    /// `changes` changes.
    Watch { changes: u32 },
}

impl Job {
    /// The job's name on the kernel command line and in the result line.
    pub fn name(&self) -> &'static str {
        match self {
            Job::Write(_) => "write",
            Job::Verify(_) => "verify",
            Job::Info => "info",
            Job::Checksum { .. } => "checksum",
            Job::Watch { .. } => "watch",
        }
    }

    fn kernel_params(&self) -> Vec<String> {
        let mut params = vec![format!("vublk.job={}", self.name())];
        match self {
            Job::Write(fio) | Job::Verify(fio) => params.extend(fio.kernel_params()),
            Job::Info => {}
            Job::Checksum { bytes } => params.push(format!("vublk.size={bytes}")),
            Job::Watch { changes } => params.push(format!("vublk.changes={changes}")),
        }
        params
    }
}

/// How to run one guest.
#[derive(Clone, Debug)]
pub struct GuestOptions {
    /// The backend's vhost-user socket (QEMU connects as the client).
    pub socket: PathBuf,
    pub job: Job,
    /// `num-queues` of the `vhost-user-blk-pci` device. The guest's virtio_blk uses at most
    /// one queue per CPU, so set `cpus` too to see more than one.
    pub num_queues: u16,
    /// `$VUBLK_QEMU`, else `/usr/bin/qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Extra `key=value` properties of the `vhost-user-blk-pci` device (e.g. `queue-size=128`).
    pub device_props: Vec<String>,
    /// `reconnect-ms` of the socket chardev: QEMU reconnects after the backend goes away.
    pub reconnect_ms: Option<u32>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Extra kernel command line words.
    pub extra_append: Vec<String>,
    /// Extra QEMU arguments, appended last.
    pub extra_args: Vec<String>,
    /// Hard limit: QEMU is killed and the run fails when it has not exited by then.
    /// `$VUBLK_E2E_TIMEOUT_SECS`, else [`DEFAULT_TIMEOUT`].
    pub timeout: Duration,
    /// Also write the serial console to this file as it arrives.
    pub console_log: Option<PathBuf>,
    /// Kernel and initramfs; `None` builds them with [`GuestArtifacts::build`].
    pub artifacts: Option<GuestArtifacts>,
    /// Processes (name, pid), typically the backend, whose thread stacks a timeout reports
    /// along with QEMU's.
    pub diagnose: Vec<(String, u32)>,
}

impl GuestOptions {
    /// One vCPU, 512 MiB, one queue, running `job` against `socket`.
    pub fn new(socket: impl Into<PathBuf>, job: Job) -> Self {
        GuestOptions {
            socket: socket.into(),
            job,
            num_queues: 1,
            qemu: std::env::var_os("VUBLK_QEMU").map_or_else(
                || PathBuf::from("/usr/bin/qemu-system-x86_64"),
                PathBuf::from,
            ),
            device_props: Vec::new(),
            reconnect_ms: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: 1,
            extra_append: Vec::new(),
            extra_args: Vec::new(),
            timeout: std::env::var("VUBLK_E2E_TIMEOUT_SECS")
                .ok()
                .and_then(|secs| secs.parse().ok())
                .map_or(DEFAULT_TIMEOUT, Duration::from_secs),
            console_log: None,
            artifacts: None,
            diagnose: Vec::new(),
        }
    }

    /// The kernel command line.
    pub fn append(&self) -> String {
        // quiet: kernel messages would interleave with the guest's result lines on ttyS0.
        // panic=-1: a dead init reboots at once, which -no-reboot turns into QEMU exiting.
        // edd=off: the boot stub would otherwise read the disk through SeaBIOS's virtio-blk
        // driver, which spins forever, silently, if the backend never completes that read.
        let mut words = vec![
            "console=ttyS0".to_string(),
            "panic=-1".to_string(),
            "quiet".to_string(),
            "edd=off".to_string(),
        ];
        words.extend(self.job.kernel_params());
        words.extend(self.extra_append.iter().cloned());
        words.join(" ")
    }

    /// The QEMU command for these options and `artifacts`.
    pub fn command(&self, artifacts: &GuestArtifacts) -> Command {
        let mut chardev = format!(
            "socket,id=vu0,path={}",
            qemu_opt_escape(&self.socket.to_string_lossy())
        );
        if let Some(ms) = self.reconnect_ms {
            chardev.push_str(&format!(",reconnect-ms={ms}"));
        }
        let mut device = format!(
            "vhost-user-blk-pci,chardev=vu0,num-queues={}",
            self.num_queues
        );
        for prop in &self.device_props {
            device.push(',');
            device.push_str(prop);
        }
        let mut cmd = Command::new(&self.qemu);
        // TCG: KVM does not boot a stock kernel on every host this runs on. -no-reboot turns
        // the guest's power-off (or a panic) into QEMU exiting. -nic none: no NIC, so no iPXE
        // option ROM to load at every boot.
        cmd.args(["-accel", "tcg", "-nographic", "-no-reboot", "-nic", "none"])
            .arg("-m")
            .arg(format!("{}M", self.memory_mib))
            .arg("-smp")
            .arg(self.cpus.to_string())
            // vhost-user needs guest RAM the backend can map: a shared memfd.
            .arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                self.memory_mib
            ))
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(chardev)
            .arg("-device")
            .arg(device)
            .arg("-kernel")
            .arg(&artifacts.kernel)
            .arg("-initrd")
            .arg(&artifacts.initrd)
            .arg("-append")
            .arg(self.append())
            .args(&self.extra_args);
        cmd
    }
}

/// QEMU option values double a literal comma.
fn qemu_opt_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The guest's verdict on its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestStatus {
    Pass,
    Fail,
}

/// The parsed `VUBLK-E2E-RESULT` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestResult {
    pub job: String,
    pub status: GuestStatus,
    /// Every `key=value` word of the line, `job` and `status` included (`rc`, `reason`...).
    pub fields: BTreeMap<String, String>,
}

impl GuestResult {
    /// Parses the last result line of `console`; `None` if there is none.
    pub fn parse(console: &str) -> Result<Option<GuestResult>> {
        let Some(line) = console
            .lines()
            .rev()
            .find_map(|line| line.split_once(RESULT_MARKER).map(|(_, rest)| rest))
        else {
            return Ok(None);
        };
        let fields: BTreeMap<String, String> = line
            .split_whitespace()
            .filter_map(|word| word.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let job = fields
            .get("job")
            .with_context(|| format!("result line without job=: {line:?}"))?
            .clone();
        let status = match fields.get("status").map(String::as_str) {
            Some("PASS") => GuestStatus::Pass,
            Some("FAIL") => GuestStatus::Fail,
            other => bail!("result line with status {other:?}: {line:?}"),
        };
        Ok(Some(GuestResult {
            job,
            status,
            fields,
        }))
    }
}

/// The `info` job's report, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Capacity in 512-byte sectors (`/sys/block/vda/size`).
    pub size_sectors: u64,
    pub read_only: bool,
    /// `/sys/block/vda/serial`; `None` when the device did not answer VIRTIO_BLK_T_GET_ID.
    pub serial: Option<String>,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    /// `write back` or `write through`.
    pub write_cache: String,
    /// Negotiated virtio feature bits as sysfs prints them: character `n` is bit `n`.
    pub features: String,
    /// Names of the `/sys/block/vda/mq/*` directories (one per hardware queue).
    pub mq: Vec<String>,
}

impl DiskInfo {
    /// Whether virtio feature bit `bit` was negotiated.
    pub fn has_feature(&self, bit: usize) -> bool {
        self.features.as_bytes().get(bit) == Some(&b'1')
    }

    fn from_map(info: &BTreeMap<String, String>) -> Result<DiskInfo> {
        let get = |key: &str| -> Result<&str> {
            info.get(key)
                .map(String::as_str)
                .with_context(|| format!("guest info has no {key}: {info:?}"))
        };
        let num = |key: &str| -> Result<u64> {
            get(key)?
                .parse()
                .with_context(|| format!("guest info {key} is not a number: {info:?}"))
        };
        Ok(DiskInfo {
            size_sectors: num("size")?,
            read_only: num("ro")? != 0,
            serial: info.get("serial").cloned(),
            logical_block_size: u32::try_from(num("logical_block_size")?)?,
            physical_block_size: u32::try_from(num("physical_block_size")?)?,
            write_cache: get("write_cache")?.to_string(),
            features: get("features")?.to_string(),
            mq: get("mq")?
                .split(',')
                .filter(|q| !q.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }
}

/// Everything a finished guest run produced.
#[derive(Debug)]
pub struct GuestOutput {
    pub result: GuestResult,
    /// The `info` job's `key=value` lines (empty for other jobs).
    pub info: BTreeMap<String, String>,
    /// The whole serial console (BIOS, kernel and init output).
    pub console: String,
    pub qemu_stderr: String,
    pub exit_status: ExitStatus,
    pub elapsed: Duration,
}

impl GuestOutput {
    pub fn passed(&self) -> bool {
        self.result.status == GuestStatus::Pass
    }

    /// Ok if the guest reported PASS, else an error quoting the console's tail.
    pub fn expect_pass(&self) -> Result<()> {
        if self.passed() {
            return Ok(());
        }
        bail!(
            "guest job {} failed: {:?}\n--- console tail ---\n{}\n--- qemu stderr ---\n{}",
            self.result.job,
            self.result.fields,
            tail(&self.console, ERROR_TAIL_LINES),
            self.qemu_stderr
        )
    }

    /// The `info` job's report.
    pub fn disk_info(&self) -> Result<DiskInfo> {
        DiskInfo::from_map(&self.info)
    }
}

impl fmt::Display for GuestOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest job {} {:?} in {:.1?} ({})",
            self.result.job, self.result.status, self.elapsed, self.exit_status
        )
    }
}

/// The `key=value` pairs of every `INFO` line in `console`.
pub fn parse_info(console: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|line| line.split_once(INFO_MARKER).map(|(_, rest)| rest))
        .filter_map(|rest| rest.trim().split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_end().to_string()))
        .collect()
}

/// Kernel frames quoted per thread in a timeout report.
const REPORT_KERNEL_FRAMES: usize = 8;
/// Limit on gdb's run time in a timeout report: it must not become a second hang.
const REPORT_GDB_TIMEOUT: &str = "30";

/// Every thread of `pid` with its state and kernel stack (readable as root), plus user-space
/// backtraces when gdb is installed: enough to tell a guest spinning in TCG from a QEMU vCPU
/// blocked on a vhost-user reply, or a backend thread stuck in io_uring.
pub fn process_report(name: &str, pid: u32) -> String {
    let mut report = format!("--- {name} (pid {pid}) threads ---\n");
    let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks,
        Err(e) => return format!("{report}cannot list threads: {e}\n"),
    };
    let mut tids: Vec<String> = tasks
        .filter_map(|t| t.ok().map(|t| t.file_name().to_string_lossy().into_owned()))
        .collect();
    tids.sort();
    for tid in tids {
        let dir = format!("/proc/{pid}/task/{tid}");
        let read =
            |file: &str| std::fs::read_to_string(format!("{dir}/{file}")).unwrap_or_default();
        let state = read("status")
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        report.push_str(&format!("{tid} {} [{state}]\n", read("comm").trim()));
        for frame in read("stack").lines().take(REPORT_KERNEL_FRAMES) {
            report.push_str(&format!("    {frame}\n"));
        }
    }
    let gdb = Command::new("timeout")
        .args([REPORT_GDB_TIMEOUT, "gdb", "-batch", "-nx", "-p"])
        .arg(pid.to_string())
        .args(["-ex", "thread apply all bt 15"])
        .stdin(Stdio::null())
        .output();
    match gdb {
        Ok(out) if out.status.success() => {
            report.push_str(&format!("--- {name} (pid {pid}) gdb backtraces ---\n"));
            let text = String::from_utf8_lossy(&out.stdout);
            for line in text
                .lines()
                .filter(|l| l.starts_with('#') || l.starts_with("Thread"))
            {
                report.push_str(line);
                report.push('\n');
            }
        }
        Ok(out) => report.push_str(&format!("(gdb backtraces unavailable: {})\n", out.status)),
        Err(e) => report.push_str(&format!("(gdb backtraces unavailable: {e})\n")),
    }
    report
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running QEMU guest, killed and reaped on drop unless waited for.
pub struct Guest {
    child: Child,
    job: &'static str,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    console: Arc<Mutex<Vec<u8>>>,
    console_eof: Receiver<()>,
    console_reader: Option<JoinHandle<()>>,
    stderr_reader: Option<JoinHandle<Vec<u8>>>,
    command_line: String,
    diagnose: Vec<(String, u32)>,
}

impl Guest {
    /// Boots a guest with `opts`, waits for it to power off and parses its result.
    ///
    /// A guest reporting FAIL is an `Ok` output (see [`GuestOutput::expect_pass`]); an error
    /// means no verdict: QEMU failed to start or exited without a result line, or the timeout
    /// expired (QEMU is then killed).
    pub fn run(opts: &GuestOptions) -> Result<GuestOutput> {
        Self::spawn(opts)?.wait()
    }

    /// Starts QEMU; the guest runs while the caller does something else (e.g. to the backend).
    pub fn spawn(opts: &GuestOptions) -> Result<Guest> {
        let artifacts = match &opts.artifacts {
            Some(a) => a.clone(),
            None => GuestArtifacts::build()?,
        };
        let mut cmd = opts.command(&artifacts);
        let command_line = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut log = match &opts.console_log {
            Some(path) => {
                Some(File::create(path).with_context(|| format!("creating {}", path.display()))?)
            }
            None => None,
        };
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", opts.qemu.display()))?;
        let mut stdout = child.stdout.take().context("QEMU stdout not piped")?;
        let mut stderr = child.stderr.take().context("QEMU stderr not piped")?;

        let console = Arc::new(Mutex::new(Vec::new()));
        let (eof_tx, console_eof) = mpsc::channel();
        let sink = Arc::clone(&console);
        let console_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let chunk = &buf[..n];
                        if let Some(file) = log.as_mut() {
                            // The log is a debugging aid: losing it must not fail the run.
                            let _ = file.write_all(chunk);
                        }
                        sink.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .extend_from_slice(chunk);
                    }
                }
            }
            let _ = eof_tx.send(());
        });
        let stderr_reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = stderr.read_to_end(&mut out);
            out
        });
        Ok(Guest {
            child,
            job: opts.job.name(),
            started,
            deadline: started + opts.timeout,
            timeout: opts.timeout,
            console,
            console_eof,
            console_reader: Some(console_reader),
            stderr_reader: Some(stderr_reader),
            command_line,
            diagnose: opts.diagnose.clone(),
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console received so far.
    pub fn console_so_far(&self) -> String {
        let bytes = self.console.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits until QEMU exits (the guest powers off after its result line) or the timeout.
    pub fn wait(mut self) -> Result<GuestOutput> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let exited = match self.console_eof.recv_timeout(remaining) {
            // QEMU closes its stdout when it exits; reap it within what is left of the timeout.
            Ok(()) | Err(RecvTimeoutError::Disconnected) => self.reap_until_deadline()?,
            Err(RecvTimeoutError::Timeout) => None,
        };
        let Some(exit_status) = exited else {
            // Where everything is stuck, taken before the kill changes it.
            let mut stacks = process_report("QEMU", self.child.id());
            for (name, pid) in &self.diagnose {
                stacks.push_str(&process_report(name, *pid));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            let (console, stderr) = self.collect();
            bail!(
                "guest job {} timed out after {:?}; QEMU killed\ncommand: {}\n--- console tail ---\n{}\n--- qemu stderr ---\n{}\n{stacks}",
                self.job,
                self.timeout,
                self.command_line,
                tail(&console, ERROR_TAIL_LINES),
                stderr
            );
        };
        let elapsed = self.started.elapsed();
        let (console, qemu_stderr) = self.collect();
        let result = GuestResult::parse(&console)?;
        let Some(result) = result else {
            bail!(
                "guest job {} ended without a result line (QEMU {exit_status})\ncommand: {}\n--- console tail ---\n{}\n--- qemu stderr ---\n{}",
                self.job,
                self.command_line,
                tail(&console, ERROR_TAIL_LINES),
                qemu_stderr
            );
        };
        if result.job != self.job {
            bail!(
                "guest ran job {} but job {} was asked for\n--- console tail ---\n{}",
                result.job,
                self.job,
                tail(&console, ERROR_TAIL_LINES)
            );
        }
        Ok(GuestOutput {
            result,
            info: parse_info(&console),
            console,
            qemu_stderr,
            exit_status,
            elapsed,
        })
    }

    /// Reaps QEMU, checking at [`EXIT_POLL_INTERVAL`] until the deadline; `None` on timeout.
    fn reap_until_deadline(&mut self) -> Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= self.deadline {
                return Ok(None);
            }
            std::thread::sleep(EXIT_POLL_INTERVAL);
        }
    }

    /// Joins the reader threads (QEMU must be dead) and returns console and stderr.
    fn collect(&mut self) -> (String, String) {
        if let Some(reader) = self.console_reader.take() {
            let _ = reader.join();
        }
        let stderr = self
            .stderr_reader
            .take()
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default();
        (
            self.console_so_far(),
            String::from_utf8_lossy(&stderr).into_owned(),
        )
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_is_found_after_firmware_escape_sequences() {
        let console = "booting\n\x1b[2Jinit: x\nVUBLK-E2E-RESULT job=write status=FAIL rc=1 reason=fio\r\n[ 4.3] reboot: Power down\n";

        let result = GuestResult::parse(console).unwrap().unwrap();

        assert_eq!(result.job, "write");
        assert_eq!(result.status, GuestStatus::Fail);
        assert_eq!(result.fields["rc"], "1");
    }

    #[test]
    fn console_without_result_line_has_no_result() {
        let result = GuestResult::parse("Kernel panic - not syncing\n").unwrap();

        assert_eq!(result, None);
    }

    #[test]
    fn info_lines_become_a_disk_info() {
        let console = "\x1b[2JVUBLK-E2E-INFO size=524288\r\nVUBLK-E2E-INFO ro=0\nVUBLK-E2E-INFO serial=vublk 01\nVUBLK-E2E-INFO logical_block_size=512\nVUBLK-E2E-INFO physical_block_size=4096\nVUBLK-E2E-INFO write_cache=write back\nVUBLK-E2E-INFO features=0110001001\nVUBLK-E2E-INFO mq=0,1\n";

        let info = DiskInfo::from_map(&parse_info(console)).unwrap();

        assert_eq!(info.size_sectors, 524288);
        assert_eq!(info.serial.as_deref(), Some("vublk 01"));
        assert_eq!(info.mq, vec!["0", "1"]);
        assert!(info.has_feature(9));
    }

    #[test]
    fn socket_path_commas_are_doubled_for_qemu() {
        let opts = GuestOptions::new("/tmp/a,b.sock", Job::Info);
        let artifacts = GuestArtifacts {
            kernel: "k".into(),
            initrd: "i".into(),
            manifest: "m".into(),
        };

        let cmd = opts.command(&artifacts);

        assert!(cmd
            .get_args()
            .any(|a| a == "socket,id=vu0,path=/tmp/a,,b.sock"));
    }
}
