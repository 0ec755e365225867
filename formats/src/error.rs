//! Errors from opening an image, each naming the fd or file at fault.

use std::os::fd::RawFd;

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
}
