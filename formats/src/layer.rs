//! The layer contract: a format maps a guest range to pieces; the engine moves the bytes.
//!
//! Mapping is synchronous and does no I/O. When a format needs metadata it does not hold (a
//! qcow2 L2 table), `map` answers [`MapError::NeedTables`]: the engine reads those bytes through
//! its ring, hands them to [`Layer::load_table`], and maps again. `map` names every table the
//! range lacks at once, so they load in parallel and the range is mapped twice at most.

use std::fmt::Debug;

use crate::qcow2::CompressionType;
use crate::{ImageFile, Storage};

/// Index of a file in a disk's file table (the chain's files, top layer first), which is also
/// its io_uring registered-file slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId(pub u32);

impl FileId {
    /// This id as seen from a layer whose own files start `base` slots later.
    pub fn shifted(self, base: u32) -> FileId {
        FileId(self.0 + base)
    }
}

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!("unknown format '{other}' (raw or qcow2)")),
        }
    }
}

/// What the guest does to the mapped range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Read,
    Write,
    /// Make the range read as zeroes; `unmap` allows deallocating it.
    WriteZeroes {
        unmap: bool,
    },
    /// The guest no longer needs the range (contents afterwards are unspecified).
    Discard,
}

/// Where one contiguous part of a guest range lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes at `offset` in file `file`.
    Data { file: FileId, offset: u64, len: u64 },
    /// `len` bytes that read as zeroes and need no I/O.
    Zero { len: u64 },
    /// `len` bytes from inside one compressed cluster: read `read_len` bytes at `offset` of
    /// `file`, decompress one cluster of `cluster_size` bytes, and take `skip..skip + len`.
    Compressed {
        file: FileId,
        offset: u64,
        read_len: u64,
        algorithm: CompressionType,
        cluster_size: u64,
        skip: u64,
        len: u64,
    },
}

impl Piece {
    pub fn len(&self) -> u64 {
        match *self {
            Piece::Data { len, .. } | Piece::Zero { len } | Piece::Compressed { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same piece with its file id moved by `base` (a backing layer's pieces, seen from
    /// the layer above).
    pub fn shifted(self, base: u32) -> Piece {
        match self {
            Piece::Data { file, offset, len } => Piece::Data {
                file: file.shifted(base),
                offset,
                len,
            },
            Piece::Zero { len } => Piece::Zero { len },
            Piece::Compressed {
                file,
                offset,
                read_len,
                algorithm,
                cluster_size,
                skip,
                len,
            } => Piece::Compressed {
                file: file.shifted(base),
                offset,
                read_len,
                algorithm,
                cluster_size,
                skip,
                len,
            },
        }
    }
}

/// Metadata a layer needs before it can map: `len` bytes at `offset` of `file`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableLoad {
    pub file: FileId,
    pub offset: u64,
    pub len: u64,
    /// When the layer found the table missing: a load may return bytes from before an update
    /// that happened after this, which the layer then refuses (see the qcow2 L2 cache).
    pub stamp: u64,
}

impl TableLoad {
    pub fn shifted(self, base: u32) -> TableLoad {
        TableLoad {
            file: self.file.shifted(base),
            ..self
        }
    }
}

/// Why a range could not be mapped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("guest range {offset}+{len} is past the end of the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
    /// Not an error: load these tables (every one the range needs that is not cached) and map
    /// again.
    #[error("{} metadata table(s) must be loaded first", .0.len())]
    NeedTables(Vec<TableLoad>),
    #[error("image metadata is inconsistent: {0}")]
    Corrupt(String),
    /// Not an error: the range cannot be served in place (a qcow2 cluster must be allocated,
    /// copied or deallocated); hand the request to [`Layer::update`] on the metadata thread.
    #[error("the request needs a metadata update")]
    NeedUpdate,
}

/// A guest request that changes metadata, run by [`Layer::update`].
#[derive(Clone, Copy, Debug)]
pub enum Update<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    /// Make every completed write durable (fdatasync), then release what waited for it.
    Flush,
}

/// Why a metadata update failed. The guest request fails; nothing already acknowledged is
/// lost.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("the disk is read-only")]
    ReadOnly,
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("fd {fd}: {what}")]
    Io {
        fd: std::os::fd::RawFd,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The image was found inconsistent; it is now marked corrupt and served read-only.
    #[error("fd {fd}: image marked corrupt: {detail}")]
    Corrupt {
        fd: std::os::fd::RawFd,
        detail: String,
    },
    #[error("fd {fd}: {detail}")]
    NoSpace {
        fd: std::os::fd::RawFd,
        detail: String,
    },
}

/// A disk image format over one or more files.
///
/// `map` appends pieces whose lengths add up to exactly `len`, in guest order.
pub trait Layer: Send + Sync + Debug {
    fn format(&self) -> Format;

    /// The size the guest sees, in bytes.
    fn virtual_size(&self) -> u64;

    /// The files of this layer and the layers below it; a [`FileId`] indexes this list.
    fn files(&self) -> Vec<&ImageFile>;

    fn read_only(&self) -> bool;

    fn map(
        &self,
        kind: MapKind,
        offset: u64,
        len: u64,
        out: &mut Vec<Piece>,
    ) -> Result<(), MapError>;

    /// Takes the bytes of a table `map` asked for with [`MapError::NeedTables`]. A load the
    /// layer refuses as possibly stale is not an error: mapping again asks for it anew.
    fn load_table(&self, load: TableLoad, bytes: &[u8]) -> Result<(), MapError>;

    /// Runs a request `map` answered with [`MapError::NeedUpdate`], with blocking I/O on
    /// `io` (the disk's files, indexed like [`Layer::files`]). Called from one thread per disk.
    fn update(&self, io: &dyn Storage, update: Update<'_>) -> Result<(), UpdateError> {
        let _ = (io, update);
        Err(UpdateError::ReadOnly)
    }

    /// Runs several updates (from any queues; independent of each other), in parallel where
    /// the layer can; one result per update, in order.
    fn update_batch(
        &self,
        io: &dyn Storage,
        updates: &[Update<'_>],
    ) -> Vec<Result<(), UpdateError>> {
        updates.iter().map(|u| self.update(io, *u)).collect()
    }

    /// Makes everything the layer wrote durable and returns what it reserved but did not use
    /// (at a clean shutdown, from the same thread as `update`).
    fn close(&self, io: &dyn Storage) -> Result<(), UpdateError> {
        let _ = io;
        Ok(())
    }
}

/// Checks that `offset + len` lies within `size`, for every layer's `map`.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), MapError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(MapError::OutOfRange { offset, len, size }),
    }
}
