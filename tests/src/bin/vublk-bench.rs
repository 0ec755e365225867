//! `vublk-bench`: measures vublk against qemu-storage-daemon, and both against the host.
//!
//! Serves one fully written raw image with O_DIRECT and one queue from each backend in turn
//! (rotating the order every repetition), drives the same six workloads through the same
//! `blkio` vhost-user-blk client, samples the daemon's CPU time from `/proc/<pid>/stat`, runs
//! fio with io_uring on the file itself as the host ceiling, and prints medians across
//! repetitions as markdown (optionally every raw sample as JSON).
//!
//! `--image-kind` makes the daemons serve qcow2 instead, each kind measuring one path:
//! - `qcow2`: a fully allocated qcow2 converted from the raw image, read-write, restored from a
//!   pristine copy before every daemon start; all six workloads, writes land in place.
//! - `qcow2-compressed`: the same with compressed clusters, read-only; the read workloads.
//! - `qcow2-overlay`: a fresh, empty, large overlay over the raw image (an explicit raw backing
//!   layer) for every workload, read-write; the write workloads, nearly every request of which
//!   allocates a cluster (first-write allocation, copy-on-write from the backing layer). Each
//!   overlay's allocated clusters are counted, and it is deleted after its workload; a request
//!   budget bounds its size.
//!
//! On a qcow2 kind the served data is compared with the raw image before the workloads, every
//! write workload's first requests are read back after it (the written blocks and the rest of
//! their clusters), and a written image must pass `qemu-img check`. fio then runs on the raw
//! image (a copy of it when the workloads write) as a reference. See `tests/bench/README.md`.
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
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use vublk_tests::daemon::{target_dir, BackendKind, Backing, Daemon, DiskOptions};

use crate::args::{Backend, ImageKind, Options, Parsed};
use crate::client::{Client, Issued, Timing, WRITE_PATTERN};
use crate::cpu::CpuClock;
use crate::image::{Check, Fill, Overlay, Qcow2Image, QCOW2_CLUSTER_SIZE};
use crate::report::{AllocRecord, CheckRecord, Record, Results};
use crate::workload::{Offsets, Op, Pattern, Workload};

/// qemu-storage-daemon, as the fixture runs it.
const QSD_BIN: &str = "/usr/bin/qemu-storage-daemon";
/// How long a daemon may take to exit after SIGTERM before it is killed and the run fails.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_POLL: Duration = Duration::from_millis(10);
/// Bytes of a daemon's log (or of `qemu-img check`'s report) quoted in an error message.
const LOG_TAIL_BYTES: usize = 2000;
/// vublk's L2 table cache per qcow2 layer (`formats/src/qcow2/cache.rs`,
/// `DEFAULT_L2_CACHE_BYTES`; this crate does not depend on `vublk-formats`).
const VUBLK_L2_CACHE_BYTES: u64 = 32 << 20;
/// vublk's refcount block cache per writable qcow2 image (`formats/src/qcow2/refcount.rs`,
/// `BLOCK_CACHE_BYTES`).
const VUBLK_REFCOUNT_CACHE_BYTES: u64 = 8 << 20;
/// QEMU's largest default `l2-cache-size` on Linux (`DEFAULT_L2_CACHE_MAX_SIZE`,
/// `block/qcow2.h`, since QEMU 3.1; `read_cache_sizes` in `block/qcow2.c` takes the smaller of
/// it and all L2 tables of the image).
const QEMU_L2_CACHE_MAX_BYTES: u64 = 32 << 20;
/// QEMU's default (and minimum) `refcount-cache-size`, in clusters (`MIN_REFCOUNT_CACHE_SIZE`,
/// `block/qcow2.h`; the default since QEMU 2.12, before which it was a quarter of the L2
/// cache).
const QEMU_REFCOUNT_CACHE_CLUSTERS: u64 = 4;
/// Bits per refcount in the images this tool makes (qemu-img's default).
const REFCOUNT_BITS: u64 = 16;
/// Reads of each size compared with the raw image before the workloads on a qcow2 kind.
const VERIFY_READS: u64 = 32;
/// Their sizes: within one 64 KiB cluster, and across two. The names seed their offsets.
const VERIFY_SIZES: [(&str, u64); 2] = [("verify-4k", 4096), ("verify-128k", 128 * 1024)];
/// Requests of a write workload read back after it on a qcow2 kind, each with the rest of its
/// cluster(s).
const VERIFY_WRITTEN: u64 = 16;
/// Granularity of that check: each 4 KiB must hold the written pattern or the data beneath.
const VERIFY_BLOCK: usize = 4096;

/// The image of a run: what the daemons serve, and the raw files fio and the data checks read.
struct Target {
    kind: ImageKind,
    /// The file the daemons serve: `raw` itself, the qcow2 converted from it (for `qcow2`
    /// restored from `pristine` before every daemon start), or the overlay (made afresh for
    /// every workload, deleted after it).
    served: PathBuf,
    raw: PathBuf,
    raw_size: u64,
    /// Disk size the daemons serve, bytes: the raw file's, the qcow2's or the overlay's virtual
    /// size.
    size: u64,
    /// The file fio runs on: `raw`, or a copy of it when fio writes and `raw` must keep the
    /// data the qcow2 images are checked against.
    host_image: PathBuf,
    /// The converted image (`qcow2`, `qcow2-compressed`).
    qcow2: Option<Qcow2Image>,
    /// `qcow2`: the converted image every served copy is restored from.
    pristine: Option<PathBuf>,
    /// `qcow2-overlay`: the first, empty overlay, as made.
    overlay: Option<Overlay>,
    /// `qcow2-overlay`: bytes of clusters one workload may allocate at most.
    overlay_budget: u64,
}

impl Target {
    /// What the daemons serve, and how: O_DIRECT, one queue, the format, read-only or not, and
    /// for the overlay the raw image as its explicit backing layer.
    fn disk_options(&self) -> DiskOptions {
        DiskOptions {
            direct: true,
            num_queues: 1,
            format: if self.kind.is_qcow2() { "qcow2" } else { "raw" }.to_string(),
            read_only: self.kind.read_only(),
            backing: if self.kind == ImageKind::Qcow2Overlay {
                vec![Backing::new(&self.raw, "raw")]
            } else {
                Vec::new()
            },
            ..DiskOptions::raw(&self.served)
        }
    }

    /// The most requests `w` may issue: on an overlay, as many as could allocate the budget if
    /// every one allocated (a request allocates at most its own size rounded up to a cluster).
    fn request_budget(&self, w: &Workload) -> Option<u64> {
        (self.kind == ImageKind::Qcow2Overlay)
            .then(|| self.overlay_budget / w.block_size.max(QCOW2_CLUSTER_SIZE))
    }

    /// Bytes of L2 tables that map the whole served qcow2 image, and its cluster size.
    fn l2_metadata(&self) -> Option<(u64, u64)> {
        match (&self.qcow2, &self.overlay) {
            (Some(q), _) => Some((q.l2_metadata_bytes(), q.cluster_size)),
            (None, Some(o)) => Some((o.l2_metadata_bytes(), o.cluster_size)),
            (None, None) => None,
        }
    }
}

/// The raw image's bytes, and zeroes past its end: what a freshly restored qcow2 image or a
/// fresh overlay over the raw image reads anywhere.
struct Beneath {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Beneath {
    fn open(raw: &Path, len: u64) -> Result<Beneath> {
        Ok(Beneath {
            file: File::open(raw).with_context(|| format!("opening {}", raw.display()))?,
            path: raw.to_path_buf(),
            len,
        })
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        if offset < self.len {
            let n = usize::try_from((self.len - offset).min(buf.len() as u64))?;
            self.file
                .read_exact_at(&mut buf[..n], offset)
                .with_context(|| format!("reading {} at {offset}", self.path.display()))?;
        }
        Ok(())
    }
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
    // Dropping `workdir` removes the directory, even when `run` fails.
    let _workdir = if opts.keep {
        eprintln!("keeping {}", workdir.keep().display());
        None
    } else {
        Some(workdir)
    };

    let target = prepare_target(opts, &workdir_path)?;
    let size = target.size;

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
                Backend::Host => run_host(opts, &target.host_image, target.raw_size, timing, rep),
                Backend::Vublk | Backend::Qsd => run_backend(
                    opts,
                    backend,
                    &target,
                    timing,
                    rep,
                    &workdir_path,
                    &mut results,
                ),
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
    print_image(opts, &target, &results);
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
            "\nhost = fio on the raw source image{}, not on the qcow2 file: a reference for \
             what the storage does without qcow2 and without vhost-user, not a ceiling for \
             this format",
            if target.host_image == target.raw {
                ""
            } else {
                " (a copy of it, as fio writes)"
            }
        );
    }
    if target.kind == ImageKind::Qcow2Overlay {
        println!("\n### Allocation\n");
        print!(
            "{}",
            results.markdown_alloc(&opts.workloads, &opts.backends)
        );
        println!(
            "\nrequests issued: in all, warm-up and drain included; clusters allocated: the \
             overlay's own clusters after the run (`qemu-img map`); allocating requests: \
             clusters allocated / (requests issued x clusters per request), an estimate of \
             the share of requests that allocated (a random 4 KiB request allocates one \
             cluster or none, a sequential 128 KiB one two whole clusters); clusters over \
             backing data: the share of allocated clusters below the end of the {} MiB raw \
             backing file, where a 4 KiB write copies the other 60 KiB of the cluster from \
             it (beyond it the copied data is zeroes; a whole-cluster write copies nothing); \
             measured s: shorter than asked when the budget ended it; medians over reps",
            target.raw_size >> 20
        );
    }
    println!();
    println!("### Detail\n");
    print!(
        "{}",
        results.markdown_detail(&opts.workloads, &opts.backends)
    );

    if let Some(path) = &opts.json {
        let (l2_bytes, cluster_size) = target.l2_metadata().unwrap_or((0, 0));
        let meta = json!({
            "command": argv,
            "reps": opts.reps,
            "seconds": opts.seconds.as_secs_f64(),
            "warmup_s": opts.warmup.as_secs_f64(),
            "image": target.served.display().to_string(),
            "image_bytes": size,
            "image_kind": target.kind.name(),
            "read_only": target.kind.read_only(),
            "raw_image": target.raw.display().to_string(),
            "raw_image_bytes": target.raw_size,
            "host_image": target.host_image.display().to_string(),
            "qcow2": target.qcow2.as_ref().map(|q| json!({
                "command": q.command,
                "cluster_size": q.cluster_size,
                "total_clusters": q.total_clusters,
                "allocated_clusters": q.allocated_clusters,
                "compressed_clusters": q.compressed_clusters,
                "file_bytes": q.file_bytes,
                "restored_before_each_daemon_start": target.pristine.is_some(),
            })),
            "overlay": target.overlay.as_ref().map(|o| json!({
                "command": o.command,
                "virtual_size": o.virtual_size,
                "cluster_size": o.cluster_size,
                "empty_file_bytes": o.file_bytes,
                "backing": target.raw.display().to_string(),
                "backing_format": "raw",
                "allocation_budget_bytes": target.overlay_budget,
            })),
            "metadata_cache": target.l2_metadata().map(|_| json!({
                "l2_metadata_bytes": l2_bytes,
                "vublk_l2_cache_max_bytes": VUBLK_L2_CACHE_BYTES,
                "vublk_refcount_cache_max_bytes": VUBLK_REFCOUNT_CACHE_BYTES,
                "qsd_default_l2_cache_bytes": l2_bytes.min(QEMU_L2_CACHE_MAX_BYTES),
                "qsd_default_refcount_cache_bytes": QEMU_REFCOUNT_CACHE_CLUSTERS * cluster_size,
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

/// Makes (or checks) the raw image and, for a qcow2 kind, the qcow2 image or a first overlay,
/// and fio's copy of the raw image when fio writes and the raw image must stay as it is.
fn prepare_target(opts: &Options, workdir: &Path) -> Result<Target> {
    let image = match &opts.image {
        Some(p) => p.clone(),
        None => workdir.join("disk.raw"),
    };
    let fill = match opts.image_kind {
        ImageKind::Qcow2Compressed => Fill::Compressible,
        ImageKind::Raw | ImageKind::Qcow2 | ImageKind::Qcow2Overlay => Fill::Random,
    };
    let raw_size = image::prepare(&image, opts.size, fill)?;
    let raw = image
        .canonicalize()
        .with_context(|| format!("resolving {}", image.display()))?;
    let mut target = Target {
        kind: opts.image_kind,
        served: raw.clone(),
        raw: raw.clone(),
        raw_size,
        size: raw_size,
        host_image: raw.clone(),
        qcow2: None,
        pristine: None,
        overlay: None,
        overlay_budget: opts.overlay_budget,
    };
    match opts.image_kind {
        ImageKind::Raw => return Ok(target),
        ImageKind::Qcow2 | ImageKind::Qcow2Compressed => {
            let served = workdir.join("disk.qcow2");
            let writable = opts.image_kind == ImageKind::Qcow2;
            // A writable image is converted once and copied before every daemon start.
            let converted = if writable {
                workdir.join("disk.pristine.qcow2")
            } else {
                served.clone()
            };
            let compress = opts.image_kind == ImageKind::Qcow2Compressed;
            let qcow2 = image::convert_qcow2(&raw, &converted, compress)?;
            ensure!(
                qcow2.virtual_size == raw_size,
                "{} has a virtual size of {} bytes, its source {raw_size}",
                converted.display(),
                qcow2.virtual_size
            );
            target.served = served;
            target.qcow2 = Some(qcow2);
            target.pristine = writable.then_some(converted);
        }
        ImageKind::Qcow2Overlay => {
            ensure!(
                opts.overlay_size >= raw_size,
                "--overlay-gib {} is smaller than the {} MiB raw image",
                opts.overlay_size >> 30,
                raw_size >> 20
            );
            let served = workdir.join("disk.overlay.qcow2");
            let overlay = image::create_overlay(&raw, &served, opts.overlay_size)?;
            eprintln!("overlays: {} (one per workload)", overlay.command);
            std::fs::remove_file(&served)
                .with_context(|| format!("removing {}", served.display()))?;
            target.served = served;
            target.size = overlay.virtual_size;
            target.overlay = Some(overlay);
        }
    }
    let fio_writes =
        opts.backends.contains(&Backend::Host) && opts.workloads.iter().any(|w| w.op == Op::Write);
    if fio_writes {
        let copy = workdir.join("host.raw");
        eprintln!("copying {} for fio's writes...", raw.display());
        image::copy_file(&raw, &copy)?;
        target.host_image = copy;
    }
    Ok(target)
}

/// The report lines on what was served and how.
fn print_image(opts: &Options, target: &Target, results: &Results) {
    let daemons = opts.backends.iter().any(|&b| b != Backend::Host);
    match target.kind {
        ImageKind::Raw => println!(
            "- image: {} ({} MiB raw, read-write, O_DIRECT, 1 queue)",
            target.served.display(),
            target.size >> 20
        ),
        ImageKind::Qcow2Compressed => println!(
            "- image kind: {}, served read-only by both daemons (vublk `--format qcow2 \
             --read-only`, QSD qcow2 node and export read-only), O_DIRECT, 1 queue, no \
             backing file",
            target.kind.name()
        ),
        ImageKind::Qcow2 => println!(
            "- image kind: {}, served read-write by both daemons (vublk `--format qcow2`, QSD \
             qcow2 node and export writable), O_DIRECT, 1 queue, no backing file; every \
             cluster is allocated, so writes land in place (no allocation, no copy-on-write). \
             The served file is restored from the pristine conversion (`cp --sparse=always \
             --reflink=never`, synced, dropped from the page cache) before every daemon start, \
             so every backend and rep starts from the same bytes",
            target.kind.name()
        ),
        ImageKind::Qcow2Overlay => {
            if let Some(o) = &target.overlay {
                println!(
                    "- image kind: {}: for every (backend, rep, workload) a fresh, empty qcow2 \
                     overlay, {} GiB virtual (sparse), {} KiB clusters, {} KiB as made, by \
                     `{}`; served read-write by both daemons with the raw image ({} MiB, \
                     fully written) as its explicit backing layer, read-only (vublk \
                     `--format qcow2 --backing RAW,format=raw`, QSD qcow2 node whose backing \
                     is a raw node), O_DIRECT, 1 queue; deleted after its workload",
                    target.kind.name(),
                    o.virtual_size >> 30,
                    o.cluster_size >> 10,
                    o.file_bytes >> 10,
                    o.command,
                    target.raw_size >> 20
                );
                println!(
                    "- allocation: the first write to a cluster allocates it and fills the \
                     rest of it from the backing layer: the raw image's data below {} MiB, \
                     zeroes beyond its end (so most random 4 KiB writes copy zeroes). A \
                     workload may issue at most {} MiB / max(request size, cluster size) \
                     requests (the allocation budget, which bounds the overlay's size); \
                     reaching it ends the measured interval early. See the Allocation table",
                    target.raw_size >> 20,
                    target.overlay_budget >> 20
                );
            }
        }
    }
    if let Some(q) = &target.qcow2 {
        println!(
            "- image: {} ({} MiB virtual, {} KiB clusters, {}/{} clusters allocated, {} \
             compressed, file {:.1} MiB = {:.1} % of the raw size), made by `{}`",
            target.served.display(),
            target.size >> 20,
            q.cluster_size >> 10,
            q.allocated_clusters,
            q.total_clusters,
            q.compressed_clusters,
            q.file_bytes as f64 / f64::from(1 << 20),
            q.file_bytes as f64 * 100.0 / target.size as f64,
            q.command
        );
    }
    if let Some((l2, cluster_size)) = target.l2_metadata() {
        print_metadata_caches(target.kind, l2, cluster_size);
    }
    if target.kind.is_qcow2() && daemons {
        println!(
            "- data check: before the workloads, {VERIFY_READS} reads of 4 KiB and \
             {VERIFY_READS} of 128 KiB{} through each daemon matched the raw image",
            if target.kind == ImageKind::Qcow2Overlay {
                " (within the raw image's range)"
            } else {
                ""
            }
        );
        if !target.kind.read_only() && opts.workloads.iter().any(|w| w.op == Op::Write) {
            println!(
                "- write check: after each write workload, the clusters of its first \
                 {VERIFY_WRITTEN} requests read back through the daemon held the written \
                 pattern where written and the data beneath elsewhere (per 4 KiB)"
            );
        }
    }
    if !results.checks.is_empty() {
        let corrupt = results
            .checks
            .iter()
            .filter(|c| c.check.corruptions > 0)
            .count();
        let leaky: Vec<String> = results
            .checks
            .iter()
            .filter(|c| c.check.leaks > 0)
            .map(|c| {
                format!(
                    "{} rep {}{}: {} leaked clusters",
                    c.backend.name(),
                    c.rep + 1,
                    c.workload.map(|w| format!(" {w}")).unwrap_or_default(),
                    c.check.leaks
                )
            })
            .collect();
        println!(
            "- qemu-img check after every daemon run that wrote: {} images, {corrupt} with \
             corruptions, {}",
            results.checks.len(),
            if leaky.is_empty() {
                "none with leaks".to_string()
            } else {
                format!("leaks: {}", leaky.join("; "))
            }
        );
    }
}

/// The report line on both daemons' qcow2 metadata caches for an image whose L2 tables take
/// `l2` bytes (once all exist).
fn print_metadata_caches(kind: ImageKind, l2: u64, cluster_size: u64) {
    let qsd_l2 = l2.min(QEMU_L2_CACHE_MAX_BYTES);
    let qsd_entry = if qsd_l2 < l2 { 4096 } else { cluster_size };
    let qsd_refcount = QEMU_REFCOUNT_CACHE_CLUSTERS * cluster_size;
    // One refcount block (a cluster) holds cluster_size * 8 / REFCOUNT_BITS refcounts.
    let covered = |cache: u64| cache * 8 / REFCOUNT_BITS * cluster_size;
    let coverage = match (l2 <= VUBLK_L2_CACHE_BYTES, l2 <= qsd_l2) {
        (true, true) => "Both can hold every L2 table of this image",
        (true, false) => "vublk can hold every L2 table of this image, QSD not",
        (false, true) => "QSD can hold every L2 table of this image, vublk not",
        (false, false) => "Neither can hold every L2 table of this image",
    };
    let writes = if kind.read_only() {
        " (the refcount caches are unused: read-only)".to_string()
    } else {
        format!(
            ". vublk writes every L2 and refcount update through before the request \
             completes (its caches hold clean copies); QSD's caches are write-back (written on \
             eviction or flush; the client sends no flush). Refcount blocks cover {} GiB of \
             image file in vublk's cache, {} GiB in QSD's",
            covered(VUBLK_REFCOUNT_CACHE_BYTES) >> 30,
            covered(qsd_refcount) >> 30
        )
    };
    println!(
        "- qcow2 metadata caches: the image's L2 tables, once all exist, take {} KiB. vublk \
         caches at most {} MiB of L2 tables per qcow2 layer (`DEFAULT_L2_CACHE_BYTES`, \
         `formats/src/qcow2/cache.rs`) plus, for a writable image, at most {} MiB of refcount \
         blocks (`BLOCK_CACHE_BYTES`, `formats/src/qcow2/refcount.rs`); QSD runs with QEMU's \
         defaults (no cache options given): l2-cache-size = min(32 MiB, all L2 tables of the \
         image) on Linux = {} KiB here, l2-cache-entry-size = {} KiB, refcount-cache-size = \
         {QEMU_REFCOUNT_CACHE_CLUSTERS} clusters = {} KiB (the default since QEMU 2.12), \
         cache-clean-interval = 600 s. {coverage}{writes}",
        l2 >> 10,
        VUBLK_L2_CACHE_BYTES >> 20,
        VUBLK_REFCOUNT_CACHE_BYTES >> 20,
        qsd_l2 >> 10,
        qsd_entry >> 10,
        qsd_refcount >> 10,
    );
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
        progress(rep, opts.reps, Backend::Host, w, &sample, None);
        records.push(Record {
            rep,
            backend: Backend::Host,
            workload: w.name,
            sample,
        });
    }
    Ok(records)
}

/// Runs every workload on `backend` as the image kind asks: one daemon for all of them (on a
/// freshly restored copy for `qcow2`), or one per workload on a fresh overlay. Records the
/// daemon's command line, the checks of written images and the overlays' allocations in
/// `results`.
fn run_backend(
    opts: &Options,
    backend: Backend,
    target: &Target,
    timing: Timing,
    rep: u32,
    workdir: &Path,
    results: &mut Results,
) -> Result<Vec<Record>> {
    let log_stem = format!("{}-rep{}", backend.name(), rep + 1);
    match target.kind {
        ImageKind::Raw | ImageKind::Qcow2Compressed => {
            let run = run_daemon(
                opts,
                backend,
                target,
                &opts.workloads,
                timing,
                rep,
                workdir,
                &log_stem,
            )?;
            results.daemon_commands.insert(backend.name(), run.cmdline);
            Ok(run.records.into_iter().map(|(r, _)| r).collect())
        }
        ImageKind::Qcow2 => {
            let pristine = target
                .pristine
                .as_ref()
                .context("no pristine qcow2 image")?;
            image::copy_file(pristine, &target.served)?;
            let run = run_daemon(
                opts,
                backend,
                target,
                &opts.workloads,
                timing,
                rep,
                workdir,
                &log_stem,
            )?;
            let check = check_written(&target.served, &run.log)?;
            results.checks.push(CheckRecord {
                rep,
                backend,
                workload: None,
                check,
            });
            results.daemon_commands.insert(backend.name(), run.cmdline);
            Ok(run.records.into_iter().map(|(r, _)| r).collect())
        }
        ImageKind::Qcow2Overlay => {
            let mut records = Vec::new();
            for w in &opts.workloads {
                image::create_overlay(&target.raw, &target.served, target.size)?;
                let log_stem = format!("{log_stem}-{}", w.name);
                let outcome = run_daemon(
                    opts,
                    backend,
                    target,
                    std::slice::from_ref(w),
                    timing,
                    rep,
                    workdir,
                    &log_stem,
                )
                .and_then(|run| {
                    let check = check_written(&target.served, &run.log)?;
                    let allocation =
                        image::allocation(&target.served, QCOW2_CLUSTER_SIZE, target.raw_size)?;
                    Ok((run, check, allocation))
                });
                // Deleted whatever happened: it may be gigabytes.
                let _ = std::fs::remove_file(&target.served);
                let (run, check, allocation) =
                    outcome.with_context(|| format!("workload {} on a fresh overlay", w.name))?;
                results.checks.push(CheckRecord {
                    rep,
                    backend,
                    workload: Some(w.name),
                    check,
                });
                for (record, issued) in run.records {
                    let a = AllocRecord {
                        rep,
                        backend,
                        workload: w.name,
                        requests: issued.requests,
                        clusters_per_request: (w.block_size / QCOW2_CLUSTER_SIZE).max(1),
                        allocation,
                        cut_short: issued.cut_short,
                        measured_s: record.sample.elapsed.as_secs_f64(),
                    };
                    eprintln!(
                        "        {} allocated {} clusters for {} requests ({}), overlay {} MiB",
                        backend.name(),
                        allocation.clusters,
                        issued.requests,
                        a.allocating_fraction()
                            .map_or_else(|| "-".to_string(), |f| format!("{:.1} %", f * 100.0)),
                        allocation.file_bytes >> 20
                    );
                    results.allocations.push(a);
                    records.push(record);
                }
                results.daemon_commands.insert(backend.name(), run.cmdline);
            }
            Ok(records)
        }
    }
}

/// Runs `qemu-img check` on an image a daemon wrote; corruptions fail the run (with the check's
/// report and the daemon's log), leaks are only reported.
fn check_written(image: &Path, log: &Path) -> Result<Check> {
    let check = image::check(image)?;
    if check.corruptions > 0 {
        let report = Command::new(image::QEMU_IMG)
            .arg("check")
            .arg(image)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let tail = &report[report.len().saturating_sub(LOG_TAIL_BYTES)..];
        bail!(
            "qemu-img check found {} corruptions in {} after the daemon wrote it:\n{}{}",
            check.corruptions,
            image.display(),
            tail.trim_end(),
            log_tail(log)
        );
    }
    Ok(check)
}

/// A finished daemon run.
struct DaemonRun {
    records: Vec<(Record, Issued)>,
    cmdline: String,
    log: PathBuf,
}

/// Starts `backend` on the target's image, runs `workloads` through one blkio client, stops it.
#[allow(clippy::too_many_arguments)]
fn run_daemon(
    opts: &Options,
    backend: Backend,
    target: &Target,
    workloads: &[Workload],
    timing: Timing,
    rep: u32,
    workdir: &Path,
    log_stem: &str,
) -> Result<DaemonRun> {
    let kind = match backend {
        Backend::Vublk => BackendKind::Vublk,
        Backend::Qsd => BackendKind::Qsd,
        Backend::Host => bail!("host is not a daemon"),
    };
    let socket = workdir.join(format!("{}.sock", backend.name()));
    let log_path = workdir.join(format!("{log_stem}.log"));
    let disk = target.disk_options();
    let mut cmd = Daemon::command(kind, &disk, &socket);
    let cmdline = format!("{cmd:?}");
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    cmd.stdout(log.try_clone()?).stderr(log);
    let mut daemon = Daemon::spawn(kind, &mut cmd, &socket)
        .with_context(|| format!("starting {cmdline}{}", log_tail(&log_path)))?;

    let outcome = drive(opts, backend, &mut daemon, target, workloads, timing, rep);
    match outcome {
        Ok(records) => {
            stop(daemon).with_context(|| format!("stopping it{}", log_tail(&log_path)))?;
            Ok(DaemonRun {
                records,
                cmdline,
                log: log_path,
            })
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

/// Fails if the daemon has exited.
fn check_alive(child: &mut Child) -> Result<()> {
    match child.try_wait() {
        Ok(None) => Ok(()),
        Ok(Some(status)) => bail!("the daemon exited: {status}"),
        Err(e) => Err(e).context("checking on the daemon"),
    }
}

/// Connects the blkio client to a started daemon and runs `workloads` (on a qcow2 kind, after
/// checking some data against the raw image, and reading back what each write workload wrote).
fn drive(
    opts: &Options,
    backend: Backend,
    daemon: &mut Daemon,
    target: &Target,
    workloads: &[Workload],
    timing: Timing,
    rep: u32,
) -> Result<Vec<(Record, Issued)>> {
    let size = target.size;
    let cpu = CpuClock::new(daemon.pid())?;
    let qcow2 = target.kind.is_qcow2();
    let max_bytes = workloads
        .iter()
        .map(|w| w.queue_depth * usize::try_from(w.block_size).unwrap_or(usize::MAX))
        .chain(
            VERIFY_SIZES
                .iter()
                .map(|&(_, bs)| bs)
                .chain(workloads.iter().map(written_span))
                .filter(|_| qcow2)
                .map(|bs| usize::try_from(bs).unwrap_or(usize::MAX)),
        )
        .max()
        .unwrap_or(0);
    let mut client = Client::connect(&daemon.socket, target.kind.read_only(), max_bytes)?;
    ensure!(
        client.capacity() == size,
        "backend reports a capacity of {} bytes, the image has {size}",
        client.capacity()
    );
    let beneath = Beneath::open(&target.raw, target.raw_size)?;
    if qcow2 {
        verify_data(&mut client, &beneath, &mut || {
            check_alive(&mut daemon.child)
        })
        .context("checking the served data against the raw image")?;
    }
    let mut records = Vec::new();
    for w in workloads {
        if let Some(status) = daemon.child.try_wait()? {
            bail!("daemon exited before {}: {status}", w.name);
        }
        let mut alive = || check_alive(&mut daemon.child);
        let (sample, issued) = client
            .run(w, timing, target.request_budget(w), &cpu, &mut alive)
            .with_context(|| format!("workload {}", w.name))?;
        progress(rep, opts.reps, backend, w, &sample, Some(issued));
        if qcow2 && w.op == Op::Write {
            verify_written(&mut client, &beneath, w, issued.requests, &mut alive)
                .with_context(|| format!("reading back what {} wrote", w.name))?;
        }
        records.push((
            Record {
                rep,
                backend,
                workload: w.name,
                sample,
            },
            issued,
        ));
    }
    Ok(records)
}

/// Reads [`VERIFY_READS`] random 4 KiB blocks and as many 128 KiB blocks (which span two
/// 64 KiB clusters) within the raw image's range through the backend and compares them with
/// the raw image, so a backend that is fast because it returns the wrong data cannot go
/// unnoticed.
fn verify_data(
    client: &mut Client,
    beneath: &Beneath,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let range = client.capacity().min(beneath.len);
    for (name, block_size) in VERIFY_SIZES {
        let check = Workload {
            name,
            op: Op::Read,
            pattern: Pattern::Random,
            block_size,
            queue_depth: 1,
        };
        let mut offsets = Offsets::new(&check, range)?;
        let len = usize::try_from(check.block_size)?;
        let mut expected = vec![0u8; len];
        for _ in 0..VERIFY_READS {
            let offset = offsets.next_offset();
            let got = client.read_at(offset, len, alive)?;
            beneath.read(offset, &mut expected)?;
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

/// Bytes read back around each request of `w` by [`verify_written`]: its whole cluster(s).
fn written_span(w: &Workload) -> u64 {
    w.block_size.max(QCOW2_CLUSTER_SIZE)
}

/// Reads back, through the backend, the cluster(s) of the first [`VERIFY_WRITTEN`] requests
/// write workload `w` issued (the offset sequence is deterministic; all of them completed) and
/// checks every 4 KiB of them: where a request wrote, the write pattern; elsewhere the pattern
/// (another request wrote there) or the data beneath (the raw image, zeroes past its end), so
/// an allocation that lost the write or copied the wrong data cannot go unnoticed.
fn verify_written(
    client: &mut Client,
    beneath: &Beneath,
    w: &Workload,
    requests: u64,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let mut offsets = Offsets::new(w, client.capacity())?;
    let span = written_span(w);
    let len = usize::try_from(span)?;
    let mut expected = vec![0u8; len];
    for _ in 0..VERIFY_WRITTEN.min(requests) {
        let offset = offsets.next_offset();
        let start = offset / span * span;
        let got = client.read_at(start, len, alive)?;
        beneath.read(start, &mut expected)?;
        let blocks = got.chunks(VERIFY_BLOCK).zip(expected.chunks(VERIFY_BLOCK));
        for (i, (got, expected)) in blocks.enumerate() {
            let at = start + (i * VERIFY_BLOCK) as u64;
            let pattern = got.iter().all(|&b| b == WRITE_PATTERN);
            if (offset..offset + w.block_size).contains(&at) {
                ensure!(
                    pattern,
                    "the 4 KiB at {at}, written with {WRITE_PATTERN:#04x} bytes, read back \
                     with byte 0 = {:#04x}",
                    got[0]
                );
            } else if !pattern && got != expected {
                let j = got
                    .iter()
                    .zip(expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                bail!(
                    "byte {} (in the cluster of the write at {offset}) is {:#04x}: neither \
                     the written pattern nor the data beneath ({:#04x})",
                    at + j as u64,
                    got[j],
                    expected[j]
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

fn progress(
    rep: u32,
    reps: u32,
    backend: Backend,
    w: &Workload,
    s: &sample::Sample,
    issued: Option<Issued>,
) {
    let cpu = s
        .cpu_us_per_io()
        .map_or_else(|| "-".to_string(), |c| format!("{c:.2}"));
    let cut = match issued {
        Some(i) if i.cut_short => format!(
            "  (budget reached: measured {:.2} s)",
            s.elapsed.as_secs_f64()
        ),
        _ => String::new(),
    };
    eprintln!(
        "[rep {}/{reps}] {:<5} {:<18} {:>9.0} IOPS {:>8.1} MB/s  lat {:>7.1} µs  p99 {:>7.1} µs  CPU {cpu} µs/IO{cut}",
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

    fn parse_run(argv: &[&str]) -> Options {
        match args::parse(argv.iter().map(|a| a.to_string())).unwrap() {
            Parsed::Run(opts) => *opts,
            Parsed::Help => panic!("expected options"),
        }
    }

    fn names(opts: &Options) -> Vec<&'static str> {
        opts.workloads.iter().map(|w| w.name).collect()
    }

    #[test]
    fn qcow2_compressed_defaults_to_the_read_workloads() {
        let opts = parse_run(&["--image-kind", "qcow2-compressed"]);

        assert_eq!(
            (opts.image_kind, names(&opts)),
            (
                ImageKind::Qcow2Compressed,
                vec!["randread-4k-qd1", "randread-4k-qd32", "read-128k-qd8"]
            )
        );
    }

    #[test]
    fn qcow2_is_writable_and_defaults_to_all_workloads() {
        let opts = parse_run(&["--image-kind=qcow2"]);

        assert_eq!(
            (opts.image_kind.read_only(), names(&opts).len()),
            (false, Workload::ALL.len())
        );
    }

    #[test]
    fn qcow2_overlay_defaults_to_the_write_workloads() {
        let opts = parse_run(&["--image-kind", "qcow2-overlay"]);

        assert_eq!(
            (opts.image_kind, names(&opts)),
            (
                ImageKind::Qcow2Overlay,
                vec!["randwrite-4k-qd1", "randwrite-4k-qd32", "write-128k-qd8"]
            )
        );
    }

    #[test]
    fn qcow2_compressed_refuses_write_workloads() {
        let argv = [
            "--image-kind=qcow2-compressed",
            "--workloads",
            "randread-4k-qd1,write-128k-qd8",
        ]
        .map(String::from);

        let err = args::parse(argv).err().expect("write workload accepted");

        assert!(err.to_string().contains("write-128k-qd8"), "{err}");
    }

    #[test]
    fn qcow2_overlay_refuses_read_workloads() {
        let argv = [
            "--image-kind=qcow2-overlay",
            "--workloads",
            "randwrite-4k-qd1,randread-4k-qd32",
        ]
        .map(String::from);

        let err = args::parse(argv).err().expect("read workload accepted");

        assert!(err.to_string().contains("randread-4k-qd32"), "{err}");
    }

    #[test]
    fn overlay_size_and_budget_default_to_64_gib_and_4_gib() {
        let opts = parse_run(&["--image-kind", "qcow2-overlay"]);

        assert_eq!(
            (opts.overlay_size, opts.overlay_budget),
            (64 << 30, 4 << 30)
        );
    }

    #[test]
    fn overlay_size_and_budget_are_parsed_in_gib_and_mib() {
        let opts = parse_run(&["--overlay-gib=8", "--overlay-budget-mib", "512"]);

        assert_eq!(
            (opts.overlay_size, opts.overlay_budget),
            (8 << 30, 512 << 20)
        );
    }

    #[test]
    fn overlay_size_and_budget_must_be_in_range() {
        for argv in [
            ["--overlay-gib", "0"],
            ["--overlay-gib", "257"],
            ["--overlay-budget-mib", "0"],
        ] {
            assert!(args::parse(argv.map(String::from)).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn overlay_budget_counts_a_request_as_at_least_one_cluster() {
        let mut target = Target {
            kind: ImageKind::Qcow2Overlay,
            served: PathBuf::new(),
            raw: PathBuf::new(),
            raw_size: 1 << 30,
            size: 64 << 30,
            host_image: PathBuf::new(),
            qcow2: None,
            pristine: None,
            overlay: None,
            overlay_budget: 1 << 30,
        };
        let [_, _, w4k, _, _, w128k] = Workload::ALL;

        let overlay = (target.request_budget(&w4k), target.request_budget(&w128k));
        target.kind = ImageKind::Qcow2;
        let qcow2 = target.request_budget(&w4k);

        assert_eq!((overlay, qcow2), ((Some(16384), Some(8192)), None));
    }

    #[test]
    fn overlay_disk_has_the_raw_image_as_explicit_backing() {
        let target = Target {
            kind: ImageKind::Qcow2Overlay,
            served: PathBuf::from("/w/disk.overlay.qcow2"),
            raw: PathBuf::from("/w/disk.raw"),
            raw_size: 1 << 30,
            size: 64 << 30,
            host_image: PathBuf::new(),
            qcow2: None,
            pristine: None,
            overlay: None,
            overlay_budget: 1 << 30,
        };

        let disk = target.disk_options();

        assert_eq!(
            (
                disk.format.as_str(),
                disk.read_only,
                disk.direct,
                disk.backing
            ),
            (
                "qcow2",
                false,
                true,
                vec![Backing::new("/w/disk.raw", "raw")]
            )
        );
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
