//! Disk image formats as layers that map guest I/O onto the fds the manager passed.
//!
//! Owns: the [`Layer`] contract (a layer answers "where do these guest bytes live": in which
//! file at which offset, or nowhere because they read as zeroes), the image files a layer
//! stands on, and the raw format. It does not do I/O on guest data: the server's engine moves
//! the bytes. qcow2 joins here on the same contract.

mod buffer;
mod compress;
mod error;
mod file;
mod layer;
pub mod qcow2;
mod raw;
mod storage;

pub use buffer::{AlignedBuf, BUFFER_ALIGN};
pub use compress::{decompress_cluster, DecompressError};
pub use error::OpenError;
pub use file::{ImageFile, ImageFileOptions};
pub use layer::{FileId, Format, Layer, MapError, MapKind, Piece, TableLoad, Update, UpdateError};
pub use raw::RawLayer;
pub use storage::{BatchOp, FileStorage, Storage};
