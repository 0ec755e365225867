//! The medium a device serves: the format layer over the image fds (or nothing, after an
//! eject), its capacity and access mode, and where each of its files came from.
//!
//! A medium is opened during setup and again for each medium change. Its fds come from a
//! [`FdSource`] (inherited fds and fd sets); every fd is checked for its type, access mode and
//! flags whatever its origin. Paths (for trying vublk by hand) are opened only during setup,
//! here and nowhere else. The device-level facts (features, serial, cache mode) live in
//! `device.rs`.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use vublk_fdset::{check_image_fd, FdError, FdStatus, FileSpec, ImageAccess};
use vublk_formats::qcow2::Qcow2Layer;
use vublk_formats::{Format, ImageFile, ImageFileOptions, Layer, OpenError, RawLayer};

use crate::args::FormatArg;
use crate::config::{CacheMode, DiskConfig};
use crate::updater::{UpdateJob, UpdateReply, Updater};
use std::os::fd::AsRawFd;

/// Why the disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{spec}")]
    Fd {
        spec: FileSpec,
        #[source]
        source: FdError,
    },
    #[error("{path}: cannot open")]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{spec}: a raw image has no backing file, but another --backing layer was given below it"
    )]
    BackingUnderRaw { spec: FileSpec },
    #[error("{spec}: refused by the sVirt label check: {reason}")]
    Label { spec: FileSpec, reason: String },
    #[error("{spec}: this fd is already used for another file of the chain")]
    FdReused { spec: FileSpec },
    #[error("{path}: paths are only opened during setup; pass an fd set (/dev/fdset/N) instead")]
    PathRefused { path: PathBuf },
    #[error("{spec}")]
    Resolve {
        spec: FileSpec,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{spec}")]
    Open {
        spec: FileSpec,
        #[source]
        source: OpenError,
    },
    #[error("{spec}: cannot start the metadata thread")]
    Updater {
        spec: FileSpec,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--image {spec}: the disk is {size} bytes, not a multiple of --logical-block-size {lbs}"
    )]
    BlockSize { spec: FileSpec, size: u64, lbs: u32 },
}

/// A file of the chain as the manager gave it, for `query-block`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// The spelling the manager used (`fd:N`, `/dev/fdset/N`, or a path).
    pub file: String,
    pub format: Format,
    pub read_only: bool,
    /// The fd set the file came from, and the opaque text the manager attached to its fd.
    pub fdset: Option<u64>,
    pub opaque: Option<String>,
}

/// An fd for a file of the chain, as a [`FdSource`] resolves it.
pub struct ResolvedFd {
    pub fd: OwnedFd,
    /// Kept alive as long as the medium (an fd set's record of its dup).
    pub hold: Option<Hold>,
    pub fdset: Option<u64>,
    pub opaque: Option<String>,
}

/// Where the fds of a chain come from: inherited fds and `--add-fd` sets during setup, fd
/// sets filled over the control socket afterwards.
pub trait FdSource {
    /// An fd for `spec` (never a path) fit for `need`. The caller checks its type and flags.
    fn resolve(&mut self, spec: &FileSpec, need: ImageAccess) -> Result<ResolvedFd, DiskError>;
    /// Whether a path may be opened (only during setup, for trying vublk by hand).
    fn paths_allowed(&self) -> bool;
}

/// Something that must live as long as a medium uses an fd (an fd set's record of its dup).
pub type Hold = Arc<dyn std::any::Any + Send + Sync>;

/// Called with a message when a layer finds its image inconsistent and marks it corrupt.
pub type CorruptionHook = Arc<dyn Fn(String) + Send + Sync>;

/// A medium: the format layer over the image fds, or nothing (ejected).
pub struct Disk {
    layer: Option<Arc<dyn Layer>>,
    /// The metadata thread, for a layer that can need one (writable qcow2), once started.
    updater: std::sync::OnceLock<Updater>,
    /// Told when the metadata thread finds the image inconsistent.
    on_corrupt: Option<CorruptionHook>,
    capacity_bytes: u64,
    read_only: bool,
    /// Top first.
    chain: Vec<LayerInfo>,
    /// The fds of the chain in the order they were resolved (bottom-up), with their holds.
    opened: Vec<(RawFd, Option<Hold>)>,
    /// What the medium was opened from (to reopen it after a resize).
    config: DiskConfig,
    /// The virtual size of the layer below the top one.
    backing_size: Option<u64>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("capacity_bytes", &self.capacity_bytes)
            .field("read_only", &self.read_only)
            .field("chain", &self.chain)
            .finish()
    }
}

impl Disk {
    /// Opens `disk` (the image and its backing chain), taking fds from `source`.
    pub fn open(
        disk: &DiskConfig,
        source: &mut dyn FdSource,
        on_corrupt: CorruptionHook,
    ) -> Result<Disk, DiskError> {
        let spec = disk.image.clone();
        let mut opened = Vec::new();
        let mut chain = Vec::new();
        let mut backing_size = None;
        let layer: Arc<dyn Layer> = Arc::from(open_chain(
            disk,
            source,
            &mut opened,
            &mut chain,
            &mut backing_size,
        )?);
        let mut capacity_bytes = layer.virtual_size();
        let lbs = disk.logical_block_size;
        if capacity_bytes % u64::from(lbs) != 0 {
            // The guest can only address whole logical blocks: serve the whole ones.
            log::warn!(
                "--image {spec}: {capacity_bytes} bytes is not a multiple of the logical block size {lbs}; the tail is not served"
            );
            capacity_bytes -= capacity_bytes % u64::from(lbs);
            if capacity_bytes == 0 {
                return Err(DiskError::BlockSize {
                    spec,
                    size: layer.virtual_size(),
                    lbs,
                });
            }
        }
        let needs_updater = layer.format() == Format::Qcow2 && !layer.read_only();
        Ok(Disk {
            read_only: layer.read_only(),
            layer: Some(layer),
            updater: std::sync::OnceLock::new(),
            on_corrupt: needs_updater.then_some(on_corrupt),
            capacity_bytes,
            chain,
            opened,
            config: disk.clone(),
            backing_size,
        })
    }

    /// No medium: capacity 0, every request fails.
    pub fn empty() -> Disk {
        Disk {
            layer: None,
            updater: std::sync::OnceLock::new(),
            on_corrupt: None,
            capacity_bytes: 0,
            read_only: true,
            chain: Vec::new(),
            opened: Vec::new(),
            config: DiskConfig {
                image: FileSpec::Fd(-1),
                format: FormatArg::Raw,
                backing: Vec::new(),
                read_only: true,
                cache: None,
                discard: false,
                serial: Vec::new(),
                logical_block_size: 512,
            },
            backing_size: None,
        }
    }

    pub fn layer(&self) -> Option<&dyn Layer> {
        self.layer.as_deref()
    }

    pub fn is_empty(&self) -> bool {
        self.layer.is_none()
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn chain(&self) -> &[LayerInfo] {
        &self.chain
    }

    /// Starts the metadata thread a writable qcow2 medium needs (separate from opening, so
    /// that the first medium's thread starts after confinement and inherits it).
    pub fn start(&self) -> Result<(), DiskError> {
        let (Some(layer), Some(hook)) = (&self.layer, &self.on_corrupt) else {
            return Ok(());
        };
        if self.updater.get().is_some() {
            return Ok(());
        }
        let updater = Updater::spawn(Arc::clone(layer), Arc::clone(hook)).map_err(|source| {
            DiskError::Updater {
                spec: self.config.image.clone(),
                source,
            }
        })?;
        let _ = self.updater.set(updater);
        Ok(())
    }

    /// Whether a metadata thread serves this disk (writable qcow2): FLUSH goes through it.
    pub fn has_updater(&self) -> bool {
        self.on_corrupt.is_some()
    }

    /// Hands a request the layer cannot map in place to the metadata thread; false when there
    /// is none (or it is gone), and the caller fails the request.
    pub fn submit_update(&self, job: UpdateJob, reply: UpdateReply) -> bool {
        self.updater.get().is_some_and(|u| u.submit(job, reply))
    }

    /// The raw fds to register with each queue's ring, indexed by `FileId`.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.files().into_iter().map(ImageFile::raw_fd).collect()
    }

    fn files(&self) -> Vec<&ImageFile> {
        self.layer.as_ref().map(|l| l.files()).unwrap_or_default()
    }

    /// Each file's options, indexed by `FileId`.
    pub fn file_options(&self) -> Vec<ImageFileOptions> {
        self.files()
            .into_iter()
            .map(|f| f.options().clone())
            .collect()
    }

    /// Stops the metadata thread (which closes the layer: reserved clusters returned, dirty
    /// state written) and fdatasyncs every writable file. Used on shutdown and before a
    /// medium is replaced; the disk serves nothing that needs the metadata thread afterwards.
    pub fn sync(&self) -> std::io::Result<()> {
        if let Some(updater) = self.updater.get() {
            updater.shutdown();
        }
        for file in self.files() {
            if file.options().writable {
                nix::unistd::fdatasync(file).map_err(std::io::Error::from)?;
            }
        }
        Ok(())
    }

    pub fn config(&self) -> &DiskConfig {
        &self.config
    }

    /// Whether the top image's fd has O_DIRECT.
    pub fn direct(&self) -> bool {
        self.files().first().is_some_and(|f| f.options().direct)
    }

    /// The chain's fds in the order they were resolved (bottom-up), with their holds, for
    /// reopening the same files.
    pub fn opened(&self) -> &[(RawFd, Option<Hold>)] {
        &self.opened
    }

    /// Changes the virtual size in the image file itself: ftruncate for raw, header and L1
    /// table for qcow2. Only on a closed medium ([`sync`](Self::sync) first); the caller
    /// reopens it to serve the new size.
    pub fn resize_file(&self, size: u64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(layer) = &self.layer else {
            return Err("no medium".into());
        };
        let Some(top) = layer.files().into_iter().next() else {
            return Err("no medium".into());
        };
        match layer.format() {
            Format::Raw => {
                let len = i64::try_from(size).map_err(|_| "size out of range")?;
                nix::unistd::ftruncate(top, len).map_err(|e| {
                    format!(
                        "{}: cannot truncate fd {} to {size} bytes: {e}",
                        self.config.image,
                        top.raw_fd()
                    )
                })?;
                Ok(())
            }
            Format::Qcow2 => vublk_formats::qcow2::resize(top, size, self.backing_size)
                .map(drop)
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) }),
        }
    }
}

/// Opens the backing chain bottom-up, then the image on top of it.
fn open_chain(
    disk: &DiskConfig,
    source: &mut dyn FdSource,
    opened: &mut Vec<(RawFd, Option<Hold>)>,
    chain: &mut Vec<LayerInfo>,
    backing_size: &mut Option<u64>,
) -> Result<Box<dyn Layer>, DiskError> {
    // Paths in the chain follow the image's cache mode; fds keep their own O_DIRECT flag.
    let path_cache = disk.cache.or(Some(CacheMode::Writeback));
    let mut below: Option<Box<dyn Layer>> = None;
    for (depth, layer) in disk.backing.iter().enumerate().rev() {
        let role = format!("backing {}", depth + 1);
        let cache = match layer.file {
            FileSpec::Path(_) => path_cache,
            FileSpec::Fd(_) | FileSpec::FdSet(_) => None,
        };
        let (file, info) = open_file(&layer.file, &role, false, cache, source, opened)?;
        let opened = open_layer(&layer.file, layer.format, file, below.take())?;
        chain.push(LayerInfo {
            format: opened.format(),
            ..info
        });
        below = Some(opened);
    }
    *backing_size = below.as_ref().map(|b| b.virtual_size());
    let (file, info) = open_file(
        &disk.image,
        "image",
        !disk.read_only,
        disk.cache,
        source,
        opened,
    )?;
    let top = open_layer(&disk.image, disk.format, file, below)?;
    chain.push(LayerInfo {
        format: top.format(),
        ..info
    });
    chain.reverse();
    Ok(top)
}

fn open_file(
    spec: &FileSpec,
    role: &str,
    writable: bool,
    cache: Option<CacheMode>,
    source: &mut dyn FdSource,
    opened: &mut Vec<(RawFd, Option<Hold>)>,
) -> Result<(ImageFile, LayerInfo), DiskError> {
    let want_direct = cache.map(|c| c == CacheMode::None);
    let need = ImageAccess {
        writable,
        direct: want_direct,
    };
    let resolved = match spec {
        FileSpec::Path(path) if source.paths_allowed() => ResolvedFd {
            fd: open_path(path, writable, want_direct.unwrap_or(false))?,
            hold: None,
            fdset: None,
            opaque: None,
        },
        _ => source.resolve(spec, need)?,
    };
    let fd_err = |source| DiskError::Fd {
        spec: spec.clone(),
        source,
    };
    // Same checks for every fd, whatever its origin: a directory, a socket, a wrong access
    // mode or O_APPEND is refused with the fd named.
    let status = FdStatus::of(resolved.fd.as_fd()).map_err(fd_err)?;
    let need = ImageAccess {
        writable,
        direct: match spec {
            FileSpec::Path(_) => Some(want_direct.unwrap_or(false)),
            _ => want_direct,
        },
    };
    check_image_fd(&status, need).map_err(fd_err)?;
    crate::sandbox::check_image_label(resolved.fd.as_fd(), writable).map_err(|reason| {
        DiskError::Label {
            spec: spec.clone(),
            reason,
        }
    })?;
    opened.push((resolved.fd.as_raw_fd(), resolved.hold));
    let info = LayerInfo {
        file: spec.to_string(),
        format: Format::Raw,
        read_only: !writable,
        fdset: resolved.fdset,
        opaque: resolved.opaque,
    };
    let file = ImageFile::new(
        resolved.fd,
        ImageFileOptions {
            role: role.to_string(),
            writable,
            direct: status.direct,
            nonblock: status.nonblock,
        },
    )
    .map_err(|source| DiskError::Open {
        spec: spec.clone(),
        source,
    })?;
    Ok((file, info))
}

fn open_layer(
    spec: &FileSpec,
    format: FormatArg,
    file: ImageFile,
    backing: Option<Box<dyn Layer>>,
) -> Result<Box<dyn Layer>, DiskError> {
    let open_err = |source| DiskError::Open {
        spec: spec.clone(),
        source,
    };
    Ok(match format {
        FormatArg::Raw => {
            if backing.is_some() {
                return Err(DiskError::BackingUnderRaw { spec: spec.clone() });
            }
            Box::new(RawLayer::open(file).map_err(open_err)?)
        }
        FormatArg::Qcow2 => Box::new(Qcow2Layer::open(file, backing).map_err(open_err)?),
    })
}

/// Takes ownership of an fd the manager passed on the command line, after checking it is
/// open; close-on-exec is set on it (vublk never execs, but a leak is a leak).
pub fn adopt_inherited(spec: &FileSpec, fd: RawFd) -> Result<OwnedFd, DiskError> {
    let fd_err = |source| DiskError::Fd {
        spec: spec.clone(),
        source,
    };
    FdStatus::of_raw(fd).map_err(fd_err)?;
    // SAFETY: `fd` was just inspected and is open; F_SETFD touches no memory. FD_CLOEXEC is
    // per descriptor, so the manager's copy is unaffected.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|source| fd_err(FdError::Inspect { fd, source }))?;
    // SAFETY: the manager handed this fd to vublk for its exclusive use as the image; it is
    // open (checked above) and nothing else in this process owns it (each `fd:N` is taken
    // once: the config refuses a number used twice), so taking ownership once is sound.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a path during setup (for trying vublk by hand).
fn open_path(path: &std::path::Path, writable: bool, direct: bool) -> Result<OwnedFd, DiskError> {
    let mut options = OpenOptions::new();
    options.read(true).write(writable);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(path).map_err(|source| DiskError::Path {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(OwnedFd::from(file))
}
