//! The disk a device serves: the format layer over the image fds, plus the virtio-blk facts
//! derived from it (capacity, feature set, serial, the guest-writable cache mode).
//!
//! Opening happens once during setup, before confinement: fds are validated and paths (for
//! trying vublk by hand) are opened here and nowhere else.

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use vublk_fdset::{check_image_fd, FdError, FdStatus, FileSpec, ImageAccess};
use vublk_formats::qcow2::Qcow2Layer;
use vublk_formats::{Format, ImageFile, ImageFileOptions, Layer, OpenError, RawLayer};

use crate::args::FormatArg;
use crate::config::{CacheMode, DeviceConfig, DiskConfig};
use crate::updater::{UpdateJob, UpdateReply, Updater};
use crate::virtio_blk::config_space::BlkConfig;
use crate::virtio_blk::features::{DeviceParams, MAX_DISCARD_SECTORS};
use crate::virtio_blk::request::Geometry;
use crate::virtio_blk::VIRTIO_BLK_ID_BYTES;

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
    #[error("{spec}: fd sets are filled by --add-fd or the control socket, which this build does not have yet")]
    FdSetUnsupported { spec: FileSpec },
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

/// A served disk, shared by every queue worker and every connection.
#[derive(Debug)]
pub struct Disk {
    layer: Arc<dyn Layer>,
    /// The metadata thread, for a layer that can need one (writable qcow2).
    updater: Option<Updater>,
    params: DeviceParams,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// The configuration space; the driver may change `writeback` through it.
    config: Mutex<BlkConfig>,
    /// Mirror of `config.writeback` read on the fast path.
    writeback: AtomicBool,
}

impl Disk {
    /// Opens `disk` (the image and its backing chain) as the device `device` describes.
    pub fn open(disk: &DiskConfig, device: &DeviceConfig) -> Result<Disk, DiskError> {
        let spec = disk.image.clone();
        let layer: Arc<dyn Layer> = Arc::from(open_chain(disk)?);
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
        let params = DeviceParams {
            capacity_bytes,
            logical_block_size: lbs,
            read_only: disk.read_only,
            discard: disk.discard,
            num_queues: device.num_queues,
            queue_size: device.queue_size,
        };
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        serial[..disk.serial.len()].copy_from_slice(&disk.serial);
        let updater = if layer.format() == Format::Qcow2 && !layer.read_only() {
            Some(
                Updater::spawn(Arc::clone(&layer))
                    .map_err(|source| DiskError::Updater { spec, source })?,
            )
        } else {
            None
        };
        Ok(Disk {
            layer,
            updater,
            params,
            serial,
            config: Mutex::new(params.config()),
            writeback: AtomicBool::new(true),
        })
    }

    pub fn layer(&self) -> &dyn Layer {
        self.layer.as_ref()
    }

    /// Whether a metadata thread serves this disk (writable qcow2): FLUSH goes through it.
    pub fn has_updater(&self) -> bool {
        self.updater.is_some()
    }

    /// Hands a request the layer cannot map in place to the metadata thread; false when there
    /// is none (or it is gone), and the caller fails the request.
    pub fn submit_update(&self, job: UpdateJob, reply: UpdateReply) -> bool {
        self.updater.as_ref().is_some_and(|u| u.submit(job, reply))
    }

    pub fn params(&self) -> &DeviceParams {
        &self.params
    }

    pub fn serial(&self) -> &[u8; VIRTIO_BLK_ID_BYTES] {
        &self.serial
    }

    /// What requests are checked against.
    pub fn geometry(&self) -> Geometry {
        let features = self.params.features();
        let has = |bit: u32| features & (1 << bit) != 0;
        use crate::virtio_blk::feature::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES};
        Geometry {
            capacity_bytes: self.params.capacity_bytes,
            logical_block_size: self.params.logical_block_size,
            read_only: self.params.read_only,
            discard: has(VIRTIO_BLK_F_DISCARD),
            write_zeroes: has(VIRTIO_BLK_F_WRITE_ZEROES),
            max_dwz_sectors: MAX_DISCARD_SECTORS,
        }
    }

    pub fn config(&self) -> BlkConfig {
        *self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a driver write to the configuration space.
    pub fn write_config(&self, offset: u32, data: &[u8], wce_negotiated: bool) {
        let mut config = self.config.lock().unwrap_or_else(|e| e.into_inner());
        if config.write(offset, data, wce_negotiated) {
            log::info!(
                "guest set the write cache to {}",
                if config.writeback == 1 {
                    "writeback"
                } else {
                    "writethrough"
                }
            );
        }
        self.writeback
            .store(config.writeback == 1, Ordering::Release);
    }

    /// Writeback cache: writes complete before they are durable; FLUSH makes them so.
    /// Writethrough: each write is durable when it completes.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Acquire)
    }

    /// The raw fds to register with each queue's ring, indexed by `FileId`.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.layer
            .files()
            .into_iter()
            .map(ImageFile::raw_fd)
            .collect()
    }

    /// Each file's options, indexed by `FileId`.
    pub fn file_options(&self) -> Vec<ImageFileOptions> {
        self.layer
            .files()
            .into_iter()
            .map(|f| f.options().clone())
            .collect()
    }

    /// fdatasyncs every writable file (used on shutdown), after the metadata thread (if any)
    /// finished its queue and closed the layer.
    pub fn sync(&self) -> std::io::Result<()> {
        if let Some(updater) = &self.updater {
            updater.shutdown();
        }
        for file in self.layer.files() {
            if file.options().writable {
                nix::unistd::fdatasync(file).map_err(std::io::Error::from)?;
            }
        }
        Ok(())
    }
}

/// Opens the backing chain bottom-up, then the image on top of it.
fn open_chain(disk: &DiskConfig) -> Result<Box<dyn Layer>, DiskError> {
    // Paths in the chain follow the image's cache mode; fds keep their own O_DIRECT flag.
    let path_cache = disk.cache.or(Some(CacheMode::Writeback));
    let mut below: Option<Box<dyn Layer>> = None;
    for (depth, layer) in disk.backing.iter().enumerate().rev() {
        let role = format!("backing {}", depth + 1);
        let cache = match layer.file {
            FileSpec::Path(_) => path_cache,
            FileSpec::Fd(_) | FileSpec::FdSet(_) => None,
        };
        let file = open_file(&layer.file, &role, false, cache)?;
        below = Some(open_layer(&layer.file, layer.format, file, below.take())?);
    }
    let file = open_file(&disk.image, "image", !disk.read_only, disk.cache)?;
    open_layer(&disk.image, disk.format, file, below)
}

fn open_file(
    spec: &FileSpec,
    role: &str,
    writable: bool,
    cache: Option<CacheMode>,
) -> Result<ImageFile, DiskError> {
    let (fd, direct, nonblock) = open_image(spec, writable, cache)?;
    ImageFile::new(
        fd,
        ImageFileOptions {
            role: role.to_string(),
            writable,
            direct,
            nonblock,
        },
    )
    .map_err(|source| DiskError::Open {
        spec: spec.clone(),
        source,
    })
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

/// Opens or adopts the image fd; returns it with its O_DIRECT and O_NONBLOCK flags.
fn open_image(
    spec: &FileSpec,
    writable: bool,
    cache: Option<CacheMode>,
) -> Result<(OwnedFd, bool, bool), DiskError> {
    let want_direct = cache.map(|c| c == CacheMode::None);
    match spec {
        FileSpec::Fd(fd) => {
            let fd = *fd;
            let fd_err = |source| DiskError::Fd {
                spec: spec.clone(),
                source,
            };
            let status = FdStatus::of_raw(fd).map_err(fd_err)?;
            check_image_fd(
                &status,
                ImageAccess {
                    writable,
                    direct: want_direct,
                },
            )
            .map_err(fd_err)?;
            // Inherited fds lack close-on-exec; vublk never execs, but a leak is a leak.
            // FD_CLOEXEC is per descriptor, so the manager's copy is unaffected.
            // SAFETY: `fd` was just inspected and is open; F_SETFD touches no memory.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                .map_err(|source| fd_err(FdError::Inspect { fd, source }))?;
            // SAFETY: the manager handed this fd to vublk for its exclusive use as the image;
            // it is open (checked above) and nothing else in this process owns it, so taking
            // ownership once here is sound.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok((owned, status.direct, status.nonblock))
        }
        FileSpec::Path(path) => {
            let direct = want_direct.unwrap_or(false);
            let mut options = OpenOptions::new();
            options.read(true).write(writable);
            if direct {
                options.custom_flags(libc::O_DIRECT);
            }
            let file = options.open(path).map_err(|source| DiskError::Path {
                path: path.clone(),
                source,
            })?;
            let owned = OwnedFd::from(file);
            // Same checks as for an fd: a directory or a socket path is refused clearly.
            let status =
                FdStatus::of(std::os::fd::AsFd::as_fd(&owned)).map_err(|source| DiskError::Fd {
                    spec: spec.clone(),
                    source,
                })?;
            check_image_fd(
                &status,
                ImageAccess {
                    writable,
                    direct: Some(direct),
                },
            )
            .map_err(|source| DiskError::Fd {
                spec: spec.clone(),
                source,
            })?;
            Ok((owned, direct, false))
        }
        FileSpec::FdSet(_) => Err(DiskError::FdSetUnsupported { spec: spec.clone() }),
    }
}
