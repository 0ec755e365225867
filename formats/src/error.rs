//! Errors from opening an image, each naming the fd and its role in the chain.

use std::os::fd::RawFd;

use crate::qcow2::HeaderError;

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("fd {fd} ({role}): cannot read its size")]
    Size {
        fd: RawFd,
        role: String,
        #[source]
        source: nix::Error,
    },
    #[error(
        "fd {fd} ({role}): {size} bytes is larger than the largest supported disk ({max} bytes)"
    )]
    TooLarge {
        fd: RawFd,
        role: String,
        size: u64,
        max: u64,
    },
    #[error("fd {fd} ({role}): cannot read {len} bytes at offset {offset}")]
    Read {
        fd: RawFd,
        role: String,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("fd {fd} ({role}): not a qcow2 image vublk can open")]
    Header {
        fd: RawFd,
        role: String,
        #[source]
        source: HeaderError,
    },
    #[error("fd {fd} ({role}): the image has a backing file (\"{name}\") but no --backing layer was given for it")]
    MissingBacking {
        fd: RawFd,
        role: String,
        name: String,
    },
    #[error("fd {fd} ({role}): a --backing layer was given but the image has no backing file")]
    UnexpectedBacking { fd: RawFd, role: String },
    #[error("fd {fd} ({role}): the image says its backing file is {image_says}, but the --backing layer given is {given}")]
    BackingFormat {
        fd: RawFd,
        role: String,
        image_says: String,
        given: String,
    },
    #[error("fd {fd} ({role}): the image is marked corrupt; it can only be served read-only (repair it with `qemu-img check -r all`)")]
    CorruptWritable { fd: RawFd, role: String },
    #[error("fd {fd} ({role}): the image is dirty (it was not closed cleanly while using lazy refcounts); repair it with `qemu-img check -r all` before serving it writable, or serve it with --read-only")]
    DirtyWritable { fd: RawFd, role: String },
    #[error("fd {fd} ({role}): {what} shares host cluster {offset:#x} with other metadata; the image is inconsistent: serve it --read-only, or check it with `qemu-img check`")]
    Overlap {
        fd: RawFd,
        role: String,
        what: String,
        offset: u64,
    },
    #[error("fd {fd} ({role}): cannot prepare the image for writing")]
    Update {
        fd: RawFd,
        role: String,
        #[source]
        source: crate::UpdateError,
    },
}
