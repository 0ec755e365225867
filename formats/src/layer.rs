//! The layer contract: a format maps a guest byte range to pieces; the engine moves the bytes.

use std::fmt::Debug;

use crate::ImageFile;

/// Index of a file in a layer's file table, which is also its io_uring registered-file slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId(pub u32);

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
}

impl Piece {
    pub fn len(&self) -> u64 {
        match *self {
            Piece::Data { len, .. } | Piece::Zero { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a range could not be mapped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("guest range {offset}+{len} is past the end of the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
}

/// A disk image format over one or more files.
///
/// `map` appends pieces whose lengths add up to exactly `len`, in guest order.
pub trait Layer: Send + Sync + Debug {
    fn format(&self) -> Format;

    /// The size the guest sees, in bytes.
    fn virtual_size(&self) -> u64;

    /// The files this layer reads and writes; a [`FileId`] indexes this slice.
    fn files(&self) -> &[ImageFile];

    fn read_only(&self) -> bool;

    fn map(
        &self,
        kind: MapKind,
        offset: u64,
        len: u64,
        out: &mut Vec<Piece>,
    ) -> Result<(), MapError>;
}

/// Checks that `offset + len` lies within `size`, for every layer's `map`.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), MapError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(MapError::OutOfRange { offset, len, size }),
    }
}
