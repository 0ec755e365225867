//! Command-line options of `vublk-bench`, parsed once into a validated [`Options`].
//!
//! Owns the option syntax, the defaults and the `--help` text. It knows nothing about how a
//! backend is started or how a workload is driven; it only names them ([`Backend`],
//! [`Workload`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::workload::{Op, Workload};

/// Repetitions when neither `--reps` nor `--quick` is given.
const DEFAULT_REPS: u32 = 5;
/// Measured seconds per workload. Five reps of six workloads on three backends at four seconds
/// (plus warm-up) take about seven minutes, the budget for a default run.
const DEFAULT_SECONDS: f64 = 4.0;
/// Warm-up before each measured interval: enough for the daemon to settle, short enough not to
/// dominate the run time.
const DEFAULT_WARMUP: f64 = 1.0;
/// `--quick`: one repetition of three seconds, a smoke check.
const QUICK_REPS: u32 = 1;
const QUICK_SECONDS: f64 = 3.0;
const QUICK_WARMUP: f64 = 0.5;
/// Default image size: 1 GiB, large enough that random 4k I/O does not sit in one device cache
/// line, small enough to create in a few seconds.
const DEFAULT_SIZE_MIB: u64 = 1024;
/// Upper bound on `--reps` and on `--seconds`, so a typo cannot start a day-long run.
const MAX_REPS: u32 = 100;
const MAX_SECONDS: f64 = 3600.0;
/// Default virtual size of a qcow2-overlay overlay: 64 GiB is 1 Mi clusters of 64 KiB, so a
/// workload that allocates the default budget (64 Ki clusters) finds at least 94 % of the
/// clusters it hits unallocated; its L2 tables (8 MiB) fit both daemons' default caches.
const DEFAULT_OVERLAY_GIB: u64 = 64;
/// Largest `--overlay-gib`: the overlay is sparse, but its L2 tables must still fit the L2
/// caches (32 MiB in both daemons covers 256 GiB at 64 KiB clusters).
const MAX_OVERLAY_GIB: u64 = 256;
/// Default allocation budget of one qcow2-overlay workload: 4 GiB of clusters, so the overlay,
/// the raw image and fio's copy of it stay near 6 GiB of disk at worst.
const DEFAULT_OVERLAY_BUDGET_MIB: u64 = 4096;

pub const HELP: &str = "\
vublk-bench: compare vublk with qemu-storage-daemon (and the host ceiling, fio) on one image

USAGE:
    vublk-bench [OPTIONS]

OPTIONS:
    --backends LIST     comma-separated subset of vublk,qsd,host [default: vublk,qsd,host]
                        (host = fio with ioengine=io_uring, direct=1 on the same file)
    --workloads LIST    comma-separated subset of the workloads below [default: all; the
                        read workloads for qcow2-compressed, the write workloads for
                        qcow2-overlay]
    --image-kind KIND   what the daemons serve [default: raw]:
                          raw               the raw image, read-write
                          qcow2             a fully allocated qcow2 (64 KiB clusters) converted
                                            from the raw image, read-write: writes go in place.
                                            Restored from a pristine copy before every daemon
                                            start
                          qcow2-compressed  the same with every cluster zlib-compressed, from a
                                            compressible raw image, served read-only
                          qcow2-overlay     a fresh, empty qcow2 overlay (64 KiB clusters) over
                                            the raw image per workload, read-write: every write
                                            to a new cluster allocates it (first-write
                                            allocation, copy-on-write from the raw image)
                        host (fio) always runs on a raw file, as a reference
    --overlay-gib N     virtual size of a qcow2-overlay overlay, so that random 4k writes keep
                        hitting unallocated clusters [default: 64]
    --overlay-budget-mib N
                        at most N MiB of clusters a qcow2-overlay workload may allocate: the
                        measured interval ends early once the requests issued could have
                        allocated that much, which bounds the overlay's disk use [default: 4096]
    --reps N            repetitions; backends run in rotated order each rep [default: 5]
    --seconds S         measured seconds per workload [default: 4]
    --warmup S          warm-up seconds before each measured interval [default: 1]
    --quick             1 rep, 3 s, 0.5 s warm-up (explicit --reps/--seconds/--warmup win)
    --image PATH        raw image to use; created fully written if missing, kept afterwards.
                        With --image-kind raw its contents are OVERWRITTEN by the write
                        workloads. With a qcow2 --image-kind it is the source of the qcow2 file
                        or the overlay's backing file, and only read (fio writes to a copy)
    --size-mib N        size of a created image in MiB [default: 1024]
    --dir DIR           work directory (image, sockets, daemon logs) is a fresh temporary
                        directory inside DIR, removed at exit [default: target/vublk-bench]
    --keep              keep the work directory at exit (also after an error), to inspect the
                        images and daemon logs; it may hold several GiB
    --vublk-bin PATH    vublk binary [default: $VUBLK_BIN, else target/release/vublk]
    --fio PATH          fio binary [default: fio]
    --json PATH         also write every raw sample and the medians as JSON to PATH
    -h, --help          this text

WORKLOADS:
    randread-4k-qd1  randread-4k-qd32  randwrite-4k-qd1  randwrite-4k-qd32
    read-128k-qd8    write-128k-qd8
";

/// One of the things being measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    /// vublk serving the image, driven by the blkio client.
    Vublk,
    /// qemu-storage-daemon serving the image, driven by the same blkio client.
    Qsd,
    /// fio with io_uring straight on the image file: what the host can do at best.
    Host,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Vublk, Backend::Qsd, Backend::Host];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Vublk => "vublk",
            Backend::Qsd => "qsd",
            Backend::Host => "host",
        }
    }

    fn parse(s: &str) -> Result<Backend> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .with_context(|| format!("unknown backend {s:?} (expected vublk, qsd or host)"))
    }
}

/// What the daemons serve. The benchmark always creates (or is given) a raw image; the qcow2
/// kinds are converted from it, or (the overlay) made over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// The raw image itself, read-write: all six workloads.
    Raw,
    /// A qcow2 image with every cluster allocated and uncompressed, read-write: all six
    /// workloads, writes in place.
    Qcow2,
    /// A qcow2 image with every cluster zlib-compressed, read-only: the read workloads.
    Qcow2Compressed,
    /// An empty qcow2 overlay over the raw image, read-write, fresh for every workload: the
    /// write workloads, nearly every one of whose requests allocates a cluster.
    Qcow2Overlay,
}

impl ImageKind {
    pub const ALL: [ImageKind; 4] = [
        ImageKind::Raw,
        ImageKind::Qcow2,
        ImageKind::Qcow2Compressed,
        ImageKind::Qcow2Overlay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Raw => "raw",
            ImageKind::Qcow2 => "qcow2",
            ImageKind::Qcow2Compressed => "qcow2-compressed",
            ImageKind::Qcow2Overlay => "qcow2-overlay",
        }
    }

    /// Whether the daemons serve a qcow2 file rather than the raw image.
    pub fn is_qcow2(self) -> bool {
        self != ImageKind::Raw
    }

    /// Whether the daemons serve the image read-only.
    pub fn read_only(self) -> bool {
        self == ImageKind::Qcow2Compressed
    }

    /// Whether workloads in direction `op` measure what this kind is about: no writes on a
    /// read-only image, and only writes (allocations) on an overlay.
    pub fn runs(self, op: Op) -> bool {
        match self {
            ImageKind::Raw | ImageKind::Qcow2 => true,
            ImageKind::Qcow2Compressed => op == Op::Read,
            ImageKind::Qcow2Overlay => op == Op::Write,
        }
    }

    fn parse(s: &str) -> Result<ImageKind> {
        ImageKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .with_context(|| {
                let names: Vec<&str> = ImageKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown image kind {s:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// Validated options of one run.
#[derive(Clone, Debug)]
pub struct Options {
    pub backends: Vec<Backend>,
    pub workloads: Vec<Workload>,
    pub image_kind: ImageKind,
    pub reps: u32,
    pub seconds: Duration,
    pub warmup: Duration,
    pub image: Option<PathBuf>,
    pub size: u64,
    /// Virtual size of a qcow2-overlay overlay, bytes.
    pub overlay_size: u64,
    /// Bytes of clusters one qcow2-overlay workload may allocate at most.
    pub overlay_budget: u64,
    pub dir: Option<PathBuf>,
    /// Keep the work directory at exit.
    pub keep: bool,
    pub vublk_bin: Option<PathBuf>,
    pub fio: PathBuf,
    pub json: Option<PathBuf>,
}

/// What the command line asked for: run with options, or print help.
pub enum Parsed {
    Run(Box<Options>),
    Help,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed> {
    let mut backends = None;
    let mut workloads = None;
    let mut image_kind = ImageKind::Raw;
    let mut reps = None;
    let mut seconds = None;
    let mut warmup = None;
    let mut quick = false;
    let mut keep = false;
    let mut image = None;
    let mut size_mib = DEFAULT_SIZE_MIB;
    let mut overlay_gib = DEFAULT_OVERLAY_GIB;
    let mut overlay_budget_mib = DEFAULT_OVERLAY_BUDGET_MIB;
    let mut dir = None;
    let mut vublk_bin = None;
    let mut fio = PathBuf::from("fio");
    let mut json = None;

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .with_context(|| format!("option {name} needs a value")),
            }
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--quick" => quick = true,
            "--keep" => keep = true,
            "--backends" => backends = Some(parse_list(&value()?, Backend::parse)?),
            "--workloads" => workloads = Some(parse_list(&value()?, Workload::parse)?),
            "--image-kind" => image_kind = ImageKind::parse(&value()?)?,
            "--reps" => reps = Some(parse_num::<u32>("--reps", &value()?)?),
            "--seconds" => seconds = Some(parse_num::<f64>("--seconds", &value()?)?),
            "--warmup" => warmup = Some(parse_num::<f64>("--warmup", &value()?)?),
            "--image" => image = Some(PathBuf::from(value()?)),
            "--size-mib" => size_mib = parse_num::<u64>("--size-mib", &value()?)?,
            "--overlay-gib" => overlay_gib = parse_num::<u64>("--overlay-gib", &value()?)?,
            "--overlay-budget-mib" => {
                overlay_budget_mib = parse_num::<u64>("--overlay-budget-mib", &value()?)?;
            }
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--vublk-bin" => vublk_bin = Some(PathBuf::from(value()?)),
            "--fio" => fio = PathBuf::from(value()?),
            "--json" => json = Some(PathBuf::from(value()?)),
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }

    let reps = reps.unwrap_or(if quick { QUICK_REPS } else { DEFAULT_REPS });
    if reps == 0 || reps > MAX_REPS {
        bail!("--reps must be between 1 and {MAX_REPS}, got {reps}");
    }
    let seconds = seconds.unwrap_or(if quick {
        QUICK_SECONDS
    } else {
        DEFAULT_SECONDS
    });
    if !(0.1..=MAX_SECONDS).contains(&seconds) {
        bail!("--seconds must be between 0.1 and {MAX_SECONDS}, got {seconds}");
    }
    let warmup = warmup.unwrap_or(if quick { QUICK_WARMUP } else { DEFAULT_WARMUP });
    if !(0.0..=MAX_SECONDS).contains(&warmup) {
        bail!("--warmup must be between 0 and {MAX_SECONDS}, got {warmup}");
    }
    let size = size_mib
        .checked_mul(1 << 20)
        .filter(|&s| s > 0)
        .with_context(|| format!("--size-mib {size_mib} is zero or too large"))?;

    if !(1..=MAX_OVERLAY_GIB).contains(&overlay_gib) {
        bail!("--overlay-gib must be between 1 and {MAX_OVERLAY_GIB}, got {overlay_gib}");
    }
    let overlay_size = overlay_gib << 30;
    let overlay_budget = overlay_budget_mib
        .checked_mul(1 << 20)
        .filter(|&b| b > 0)
        .with_context(|| {
            format!("--overlay-budget-mib {overlay_budget_mib} is zero or too large")
        })?;

    let workloads = dedup(workloads.unwrap_or_else(|| {
        Workload::ALL
            .into_iter()
            .filter(|w| image_kind.runs(w.op))
            .collect()
    }));
    let refused: Vec<&str> = workloads
        .iter()
        .filter(|w| !image_kind.runs(w.op))
        .map(|w| w.name)
        .collect();
    if !refused.is_empty() {
        let why = if image_kind.read_only() {
            "is served read-only"
        } else {
            "measures first-write allocation, with write workloads only"
        };
        bail!(
            "--image-kind {} {why}: drop {} from --workloads",
            image_kind.name(),
            refused.join(", ")
        );
    }

    Ok(Parsed::Run(Box::new(Options {
        backends: dedup(backends.unwrap_or_else(|| Backend::ALL.to_vec())),
        workloads,
        image_kind,
        reps,
        seconds: Duration::from_secs_f64(seconds),
        warmup: Duration::from_secs_f64(warmup),
        image,
        size,
        overlay_size,
        overlay_budget,
        dir,
        keep,
        vublk_bin,
        fio,
        json,
    })))
}

fn parse_list<T>(s: &str, item: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let list = s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(item)
        .collect::<Result<Vec<T>>>()?;
    if list.is_empty() {
        bail!("empty list {s:?}");
    }
    Ok(list)
}

fn parse_num<T: std::str::FromStr>(opt: &str, s: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    s.parse::<T>()
        .with_context(|| format!("{opt}: cannot parse {s:?}"))
}

/// Removes repeated entries, keeping the first occurrence's position.
fn dedup<T: PartialEq + Copy>(list: Vec<T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(list.len());
    for item in list {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}
