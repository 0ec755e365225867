//! `vublk-bench`: measures vublk against qemu-storage-daemon, and both against the host.
//!
//! Serves one fully written raw image with O_DIRECT and one queue from each backend in turn
//! (rotating the order every repetition), drives the same six workloads through the same
//! `blkio` vhost-user-blk client, samples the daemon's CPU time from `/proc/<pid>/stat`, runs
//! fio with io_uring on the file itself as the host ceiling, and prints medians across
//! repetitions as markdown (optionally every raw sample as JSON). With `--image-kind qcow2` or
//! `qcow2-compressed` the daemons instead serve, read-only, a fully allocated qcow2 converted
//! from the raw image (checked against it before the workloads), only the read workloads run,
//! and fio still runs on the raw image as a reference. See `tests/bench/README.md`.
//! The daemons are started through the test fixture ([`vublk_tests::daemon`]), so the command
//! lines are exactly those the tests use.
//!
//! The submodules live in `vublk-bench/` (a crate root resolves `mod` next to itself, hence the
//! `#[path]` attributes).

#[path = "vublk-bench/args.rs"]
mod args;
#[path = "vublk-bench/client.rs"]
mod client;
#[path = "vublk-bench/cpu.rs"]
mod cpu;
#[path = "vublk-bench/fio.rs"]
mod fio;
#[path = "vublk-bench/image.rs"]
mod image;
#[path = "vublk-bench/report.rs"]
mod report;
#[path = "vublk-bench/sample.rs"]
mod sample;
#[path = "vublk-bench/workload.rs"]
mod workload;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use vublk_tests::daemon::{target_dir, BackendKind, Daemon, DiskOptions};

use crate::args::{Backend, ImageKind, Options, Parsed};
use crate::client::{Client, Timing};
use crate::cpu::CpuClock;
use crate::image::{Fill, Qcow2Image};
use crate::report::{Record, Results};
use crate::workload::{Offsets, Op, Pattern, Workload};

/// qemu-storage-daemon, as the fixture runs it.
const QSD_BIN: &str = "/usr/bin/qemu-storage-daemon";
/// How long a daemon may take to exit after SIGTERM before it is killed and the run fails.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_POLL: Duration = Duration::from_millis(10);
/// Bytes of a daemon's log quoted in an error message.
const LOG_TAIL_BYTES: usize = 2000;
/// vublk's L2 table cache per qcow2 layer (`formats/src/qcow2/cache.rs`,
/// `DEFAULT_L2_CACHE_BYTES`; this crate does not depend on `vublk-formats`).
const VUBLK_L2_CACHE_BYTES: u64 = 32 << 20;
/// Reads of each size compared with the raw image before the workloads on a qcow2 kind.
const VERIFY_READS: u64 = 32;
/// Their sizes: within one 64 KiB cluster, and across two. The names seed their offsets.
const VERIFY_SIZES: [(&str, u64); 2] = [("verify-4k", 4096), ("verify-128k", 128 * 1024)];

/// The image of a run: what the daemons serve, and the raw file fio (and the data check) read.
struct Target {
    kind: ImageKind,
    /// The file the daemons serve: `raw` itself, or the qcow2 converted from it.
    served: PathBuf,
    raw: PathBuf,
    /// Disk size in bytes (the raw file's, the qcow2's virtual size).
    size: u64,
    qcow2: Option<Qcow2Image>,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let result = args::parse(argv.iter().skip(1).cloned()).and_then(|parsed| match parsed {
        Parsed::Help => {
            print!("{}", args::HELP);
            Ok(())
        }
        Parsed::Run(opts) => run(&opts, &argv),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain without anyhow's backtrace, which RUST_BACKTRACE would add.
            eprintln!("vublk-bench: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options, argv: &[String]) -> Result<()> {
    let vublk_bin = if opts.backends.contains(&Backend::Vublk) {
        Some(resolve_vublk_bin(opts.vublk_bin.as_deref())?)
    } else {
        None
    };
    if opts.backends.contains(&Backend::Qsd) {
        ensure!(
            Path::new(QSD_BIN).exists(),
            "{QSD_BIN} not found: install it (Debian: qemu-utils) or drop qsd \
             from --backends"
        );
    }
    let fio_version = if opts.backends.contains(&Backend::Host) {
        Some(tool_version(&opts.fio, "--version").with_context(|| {
            format!(
                "{} --version failed: install fio or drop host from --backends",
                opts.fio.display()
            )
        })?)
    } else {
        None
    };

    let base = match &opts.dir {
        Some(d) => d.clone(),
        None => target().join("vublk-bench"),
    };
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    warn_stale_workdirs(&base);
    let workdir = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a work directory in {}", base.display()))?;
    let workdir_path = workdir
        .path()
        .canonicalize()
        .context("resolving the work directory")?;

    let image = match &opts.image {
        Some(p) => p.clone(),
        None => workdir_path.join("disk.raw"),
    };
    let fill = match opts.image_kind {
        ImageKind::Qcow2Compressed => Fill::Compressible,
        ImageKind::Raw | ImageKind::Qcow2 => Fill::Random,
    };
    let size = image::prepare(&image, opts.size, fill)?;
    let image = image
        .canonicalize()
        .with_context(|| format!("resolving {}", image.display()))?;
    let target = if opts.image_kind.is_qcow2() {
        let qcow2_path = workdir_path.join("disk.qcow2");
        let compress = opts.image_kind == ImageKind::Qcow2Compressed;
        let qcow2 = image::convert_qcow2(&image, &qcow2_path, compress)?;
        ensure!(
            qcow2.virtual_size == size,
            "{} has a virtual size of {} bytes, its source {size}",
            qcow2_path.display(),
            qcow2.virtual_size
        );
        Target {
            kind: opts.image_kind,
            served: qcow2_path,
            raw: image,
            size,
            qcow2: Some(qcow2),
        }
    } else {
        Target {
            kind: ImageKind::Raw,
            served: image.clone(),
            raw: image,
            size,
            qcow2: None,
        }
    };

    let timing = Timing {
        warmup: opts.warmup,
        measure: opts.seconds,
    };
    let per_backend = (opts.warmup + opts.seconds).as_secs_f64() * opts.workloads.len() as f64;
    eprintln!(
        "vublk-bench: {} reps x {} backends x {} workloads, about {:.0} s",
        opts.reps,
        opts.backends.len(),
        opts.workloads.len(),
        per_backend * f64::from(opts.reps) * opts.backends.len() as f64
    );
    let load_at_start = read_trimmed("/proc/loadavg");

    let mut results = Results::default();
    let mut orders = Vec::new();
    for rep in 0..opts.reps {
        let order = rotated(&opts.backends, rep);
        orders.push(order.iter().map(|b| b.name()).collect::<Vec<_>>().join(","));
        for backend in order {
            let records = match backend {
                Backend::Host => run_host(opts, &target.raw, size, timing, rep),
                Backend::Vublk | Backend::Qsd => {
                    run_daemon(opts, backend, &target, timing, rep, &workdir_path).map(
                        |(records, cmd)| {
                            results.daemon_commands.insert(backend.name(), cmd);
                            records
                        },
                    )
                }
            }
            .with_context(|| format!("rep {}, backend {}", rep + 1, backend.name()))?;
            results.records.extend(records);
        }
    }

    let command = argv
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let qsd_version = opts
        .backends
        .contains(&Backend::Qsd)
        .then(|| tool_version(Path::new(QSD_BIN), "--version").ok())
        .flatten();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = read_trimmed("/proc/sys/kernel/osrelease");

    println!("## vublk-bench results\n");
    println!("- command: `{command}`");
    println!(
        "- reps: {} (medians across reps); {:.1} s measured per workload after {:.1} s warm-up",
        opts.reps,
        opts.seconds.as_secs_f64(),
        opts.warmup.as_secs_f64()
    );
    match &target.qcow2 {
        None => println!(
            "- image: {} ({} MiB raw, O_DIRECT, 1 queue)",
            target.served.display(),
            size >> 20
        ),
        Some(q) => {
            println!(
                "- image kind: {}, served read-only by both daemons (vublk `--format qcow2 \
                 --read-only`, QSD qcow2 node and export read-only), O_DIRECT, 1 queue",
                target.kind.name()
            );
            println!(
                "- image: {} ({} MiB virtual, {} KiB clusters, {}/{} clusters allocated, {} \
                 compressed, file {:.1} MiB = {:.1} % of the raw size), made by `{}`",
                target.served.display(),
                size >> 20,
                q.cluster_size >> 10,
                q.allocated_clusters,
                q.total_clusters,
                q.compressed_clusters,
                q.file_bytes as f64 / f64::from(1 << 20),
                q.file_bytes as f64 * 100.0 / size as f64,
                q.command
            );
            let l2 = q.l2_metadata_bytes();
            let qsd_l2 = q.qemu_default_l2_cache_bytes();
            let coverage = match (l2 <= VUBLK_L2_CACHE_BYTES, l2 <= qsd_l2) {
                (true, true) => "Both hold every L2 table of this image once warm",
                (true, false) => "vublk holds every L2 table of this image once warm, QSD not",
                (false, true) => "QSD holds every L2 table of this image once warm, vublk not",
                (false, false) => "Neither holds every L2 table of this image",
            };
            println!(
                "- qcow2 metadata cache: the image has {} KiB of L2 tables. vublk caches up \
                 to {} MiB of L2 tables per layer; QSD runs with QEMU's defaults (no cache \
                 options given): l2-cache-size = min(32 MiB, all L2 tables of the image) on \
                 Linux = {} KiB here, l2-cache-entry-size = cluster size, \
                 refcount-cache-size = 4 clusters, cache-clean-interval = 600 s. {coverage}",
                l2 >> 10,
                VUBLK_L2_CACHE_BYTES >> 20,
                qsd_l2 >> 10
            );
            if opts.backends.iter().any(|&b| b != Backend::Host) {
                println!(
                    "- data check: before the workloads, {VERIFY_READS} reads of 4 KiB and \
                     {VERIFY_READS} of 128 KiB through each daemon matched the raw image"
                );
            }
        }
    }
    println!("- backend order per rep: {}", orders.join(" / "));
    println!("- machine: {cpus} CPUs, Linux {kernel}, load average at start {load_at_start}");
    if let Some(v) = &qsd_version {
        println!("- qsd: {v}");
    }
    if let Some(v) = &fio_version {
        println!("- host: {v}, ioengine=io_uring direct=1");
    }
    if let Some(b) = &vublk_bin {
        println!("- vublk: {}", b.display());
    }
    println!();
    let host_on_raw = target.kind.is_qcow2();
    print!("{}", results.markdown(&opts.workloads, host_on_raw));
    println!(
        "\nratio and % of host: median over reps of the per-rep ratio of IOPS; \
         CPU µs/IO: daemon utime+stime over the measured interval / I/Os completed"
    );
    if host_on_raw {
        println!(
            "\nhost = fio on the raw source image, not on the qcow2 file: a reference for \
             what the storage does without qcow2 and without vhost-user, not a ceiling for \
             this format"
        );
    }
    println!();
    println!("### Detail\n");
    print!(
        "{}",
        results.markdown_detail(&opts.workloads, &opts.backends)
    );

    if let Some(path) = &opts.json {
        let meta = json!({
            "command": argv,
            "reps": opts.reps,
            "seconds": opts.seconds.as_secs_f64(),
            "warmup_s": opts.warmup.as_secs_f64(),
            "image": target.served.display().to_string(),
            "image_bytes": size,
            "image_kind": target.kind.name(),
            "raw_image": target.raw.display().to_string(),
            "qcow2": target.qcow2.as_ref().map(|q| json!({
                "command": q.command,
                "cluster_size": q.cluster_size,
                "total_clusters": q.total_clusters,
                "allocated_clusters": q.allocated_clusters,
                "compressed_clusters": q.compressed_clusters,
                "file_bytes": q.file_bytes,
                "l2_metadata_bytes": q.l2_metadata_bytes(),
                "vublk_l2_cache_max_bytes": VUBLK_L2_CACHE_BYTES,
                "qsd_default_l2_cache_bytes": q.qemu_default_l2_cache_bytes(),
            })),
            "backends": opts.backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
            "workloads": opts.workloads.iter().map(|w| json!({
                "name": w.name,
                "fio_rw": w.fio_rw(),
                "block_size": w.block_size,
                "queue_depth": w.queue_depth,
            })).collect::<Vec<_>>(),
            "backend_order_per_rep": orders,
            "cpus": cpus,
            "kernel": kernel,
            "load_at_start": load_at_start,
            "qsd_version": qsd_version,
            "fio_version": fio_version,
            "vublk_bin": vublk_bin.as_ref().map(|b| b.display().to_string()),
            "cpu_note": "cpu_s is the daemon's utime+stime for vublk and qsd, fio's own usr+sys for host",
        });
        let doc = results.to_json(&opts.workloads, &opts.backends, meta);
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("raw samples written to {}", path.display());
    }
    Ok(())
}

/// Runs every workload through fio on the image.
fn run_host(
    opts: &Options,
    image: &Path,
    size: u64,
    timing: Timing,
    rep: u32,
) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for w in &opts.workloads {
        let sample = fio::run(&opts.fio, image, size, w, timing.warmup, timing.measure)?;
        progress(rep, opts.reps, Backend::Host, w, &sample);
        records.push(Record {
            rep,
            backend: Backend::Host,
            workload: w.name,
            sample,
        });
    }
    Ok(records)
}

/// Starts `backend` on the image, runs every workload through one blkio client, stops it.
/// Returns the samples and the daemon's command line.
fn run_daemon(
    opts: &Options,
    backend: Backend,
    target: &Target,
    timing: Timing,
    rep: u32,
    workdir: &Path,
) -> Result<(Vec<Record>, String)> {
    let kind = match backend {
        Backend::Vublk => BackendKind::Vublk,
        Backend::Qsd => BackendKind::Qsd,
        Backend::Host => bail!("host is not a daemon"),
    };
    let socket = workdir.join(format!("{}.sock", backend.name()));
    let log_path = workdir.join(format!("{}-rep{}.log", backend.name(), rep + 1));
    let disk = DiskOptions {
        direct: true,
        num_queues: 1,
        format: if target.kind.is_qcow2() {
            "qcow2"
        } else {
            "raw"
        }
        .to_string(),
        read_only: target.kind.is_qcow2(),
        ..DiskOptions::raw(&target.served)
    };
    let mut cmd = Daemon::command(kind, &disk, &socket);
    let cmdline = format!("{cmd:?}");
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    cmd.stdout(log.try_clone()?).stderr(log);
    let mut daemon = Daemon::spawn(kind, &mut cmd, &socket)
        .with_context(|| format!("starting {cmdline}{}", log_tail(&log_path)))?;

    let outcome = drive(opts, backend, &mut daemon, target, timing, rep);
    match outcome {
        Ok(records) => {
            stop(daemon).with_context(|| format!("stopping it{}", log_tail(&log_path)))?;
            Ok((records, cmdline))
        }
        Err(e) => {
            let state = match daemon.child.try_wait() {
                Ok(Some(s)) => format!("has exited ({s})"),
                Ok(None) => "is still running".to_string(),
                Err(e) => format!("is in an unknown state ({e})"),
            };
            let name = backend.name();
            // Flattened so the log comes last, after the whole cause chain.
            let e = e.context(format!("{name} daemon {state}"));
            Err(anyhow!("{e:#}{}", log_tail(&log_path)))
        }
    }
}

/// Connects the blkio client to a started daemon and runs every workload (for a qcow2 kind,
/// after checking some data against the raw image).
fn drive(
    opts: &Options,
    backend: Backend,
    daemon: &mut Daemon,
    target: &Target,
    timing: Timing,
    rep: u32,
) -> Result<Vec<Record>> {
    let size = target.size;
    let cpu = CpuClock::new(daemon.pid())?;
    let max_bytes = opts
        .workloads
        .iter()
        .map(|w| w.queue_depth * usize::try_from(w.block_size).unwrap_or(usize::MAX))
        .chain(
            VERIFY_SIZES
                .iter()
                .filter(|_| target.kind.is_qcow2())
                .map(|&(_, bs)| usize::try_from(bs).unwrap_or(usize::MAX)),
        )
        .max()
        .unwrap_or(0);
    let mut client = Client::connect(&daemon.socket, target.kind.is_qcow2(), max_bytes)?;
    ensure!(
        client.capacity() == size,
        "backend reports a capacity of {} bytes, the image has {size}",
        client.capacity()
    );
    if target.kind.is_qcow2() {
        let mut alive = || match daemon.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("the daemon exited: {status}"),
            Err(e) => Err(e).context("checking on the daemon"),
        };
        verify_data(&mut client, &target.raw, &mut alive)
            .context("checking the served data against the raw image")?;
    }
    let mut records = Vec::new();
    for w in &opts.workloads {
        if let Some(status) = daemon.child.try_wait()? {
            bail!("daemon exited before {}: {status}", w.name);
        }
        let mut alive = || match daemon.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("the daemon exited: {status}"),
            Err(e) => Err(e).context("checking on the daemon"),
        };
        let sample = client
            .run(w, timing, &cpu, &mut alive)
            .with_context(|| format!("workload {}", w.name))?;
        progress(rep, opts.reps, backend, w, &sample);
        records.push(Record {
            rep,
            backend,
            workload: w.name,
            sample,
        });
    }
    Ok(records)
}

/// Reads [`VERIFY_READS`] random 4 KiB blocks and as many 128 KiB blocks (which span two
/// 64 KiB clusters) through the backend and compares them with the raw image, so a backend
/// that is fast because it returns the wrong data cannot go unnoticed.
fn verify_data(
    client: &mut Client,
    raw: &Path,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let file = File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    for (name, block_size) in VERIFY_SIZES {
        let check = Workload {
            name,
            op: Op::Read,
            pattern: Pattern::Random,
            block_size,
            queue_depth: 1,
        };
        let mut offsets = Offsets::new(&check, client.capacity())?;
        let len = usize::try_from(check.block_size)?;
        let mut expected = vec![0u8; len];
        for _ in 0..VERIFY_READS {
            let offset = offsets.next_offset();
            let got = client.read_at(offset, len, alive)?;
            file.read_exact_at(&mut expected, offset)
                .with_context(|| format!("reading {} at {offset}", raw.display()))?;
            if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
                bail!(
                    "{len}-byte read at {offset}: byte {} is {:#04x}, the raw image has {:#04x}",
                    offset + i as u64,
                    got[i],
                    expected[i]
                );
            }
        }
    }
    Ok(())
}

/// Sends SIGTERM and waits for a clean exit (status 0, or killed by that SIGTERM).
fn stop(mut daemon: Daemon) -> Result<()> {
    let pid = Pid::from_raw(i32::try_from(daemon.pid())?);
    kill(pid, Signal::SIGTERM).context("sending SIGTERM")?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        if let Some(status) = daemon.child.try_wait()? {
            let by_sigterm = status.signal() == Some(Signal::SIGTERM as i32);
            ensure!(
                status.success() || by_sigterm,
                "{:?} exited uncleanly after SIGTERM: {status}",
                daemon.kind
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            // Dropping `daemon` kills it.
            bail!(
                "{:?} did not exit within {STOP_TIMEOUT:?} of SIGTERM",
                daemon.kind
            );
        }
        std::thread::sleep(STOP_POLL);
    }
}

/// The vublk binary: `--vublk-bin`, else `$VUBLK_BIN`, else `target/release/vublk`. Exported
/// as `VUBLK_BIN` so the fixture's command line uses it.
fn resolve_vublk_bin(flag: Option<&Path>) -> Result<PathBuf> {
    let bin = match flag {
        Some(b) => b.to_path_buf(),
        None => match std::env::var_os("VUBLK_BIN") {
            Some(b) => PathBuf::from(b),
            None => target().join("release").join("vublk"),
        },
    };
    ensure!(
        bin.is_file(),
        "vublk binary not found at {}: run `cargo build --release --bins`, pass --vublk-bin, \
         or drop vublk from --backends",
        bin.display()
    );
    let bin = bin
        .canonicalize()
        .with_context(|| format!("resolving {}", bin.display()))?;
    // Still single-threaded here: nothing else reads the environment concurrently.
    std::env::set_var("VUBLK_BIN", &bin);
    Ok(bin)
}

/// Points at `run-*` directories left in `base` by interrupted runs (or running ones): each may
/// hold a full-size image.
fn warn_stale_workdirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let stale: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("run-"))
        .collect();
    if !stale.is_empty() {
        eprintln!(
            "note: {} other work directories in {} ({}), from interrupted or concurrent runs; \
             remove them if no run is active",
            stale.len(),
            base.display(),
            stale.join(", ")
        );
    }
}

/// The workspace's `target/` directory, without the fixture's `tests/..` detour when it exists.
fn target() -> PathBuf {
    let dir = target_dir();
    dir.canonicalize().unwrap_or(dir)
}

/// `backends` rotated left by `rep`, so each backend takes each position equally often
/// (with two backends: alternating order).
fn rotated(backends: &[Backend], rep: u32) -> Vec<Backend> {
    let mut order = backends.to_vec();
    if !order.is_empty() {
        let k = usize::try_from(rep).unwrap_or(0) % order.len();
        order.rotate_left(k);
    }
    order
}

fn progress(rep: u32, reps: u32, backend: Backend, w: &Workload, s: &sample::Sample) {
    let cpu = s
        .cpu_us_per_io()
        .map_or_else(|| "-".to_string(), |c| format!("{c:.2}"));
    eprintln!(
        "[rep {}/{reps}] {:<5} {:<18} {:>9.0} IOPS {:>8.1} MB/s  lat {:>7.1} µs  p99 {:>7.1} µs  CPU {cpu} µs/IO",
        rep + 1,
        backend.name(),
        w.name,
        s.iops(),
        s.mb_per_s(),
        s.lat_mean_us,
        s.lat_p99_us,
    );
}

/// First line of `<tool> <arg>`'s standard output.
fn tool_version(tool: &Path, arg: &str) -> Result<String> {
    let out = Command::new(tool).arg(arg).output()?;
    ensure!(
        out.status.success(),
        "{} {arg}: {}",
        tool.display(),
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "?".to_string(), |s| s.trim().to_string())
}

/// The last bytes of a daemon log, formatted to append to an error message.
fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read(path) else {
        return String::new();
    };
    if text.is_empty() {
        return String::new();
    }
    let tail = &text[text.len().saturating_sub(LOG_TAIL_BYTES)..];
    format!(
        "\n--- daemon log ({}) ---\n{}",
        path.display(),
        String::from_utf8_lossy(tail).trim_end()
    )
}

/// Quotes an argument for display if the shell would split or expand it.
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_alternates_two_backends() {
        let backends = [Backend::Vublk, Backend::Qsd];

        let orders: Vec<Vec<Backend>> = (0..3).map(|rep| rotated(&backends, rep)).collect();

        assert_eq!(
            orders,
            vec![
                vec![Backend::Vublk, Backend::Qsd],
                vec![Backend::Qsd, Backend::Vublk],
                vec![Backend::Vublk, Backend::Qsd],
            ]
        );
    }

    #[test]
    fn qcow2_kinds_default_to_the_read_workloads() {
        let argv = ["--image-kind", "qcow2-compressed"].map(String::from);

        let Parsed::Run(opts) = args::parse(argv).unwrap() else {
            panic!("expected options");
        };

        let names: Vec<&str> = opts.workloads.iter().map(|w| w.name).collect();
        assert_eq!(
            (opts.image_kind, names),
            (
                ImageKind::Qcow2Compressed,
                vec!["randread-4k-qd1", "randread-4k-qd32", "read-128k-qd8"]
            )
        );
    }

    #[test]
    fn qcow2_kinds_refuse_write_workloads() {
        let argv = [
            "--image-kind=qcow2",
            "--workloads",
            "randread-4k-qd1,write-128k-qd8",
        ]
        .map(String::from);

        let err = args::parse(argv).err().expect("write workload accepted");

        assert!(err.to_string().contains("write-128k-qd8"), "{err}");
    }

    #[test]
    fn quick_defaults_yield_to_explicit_seconds() {
        let argv = ["--seconds", "2", "--quick"].map(String::from);

        let Parsed::Run(opts) = args::parse(argv).unwrap() else {
            panic!("expected options");
        };

        assert_eq!((opts.reps, opts.seconds), (1, Duration::from_secs(2)));
    }
}
