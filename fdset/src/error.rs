//! Errors about fds handed to vublk, each naming the fd at fault.

use std::os::fd::RawFd;

/// Why an fd cannot be used in the role it was given.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("fd {fd} is not open")]
    Closed { fd: RawFd },
    #[error("fd {fd} could not be inspected")]
    Inspect {
        fd: RawFd,
        #[source]
        source: nix::Error,
    },
    #[error("fd {fd} is a {kind}, but an image must be a regular file or a block device")]
    NotAnImage { fd: RawFd, kind: crate::FileKind },
    #[error("fd {fd} is a {kind}, but a unix socket was expected")]
    NotASocket { fd: RawFd, kind: crate::FileKind },
    #[error("fd {fd} is opened {mode}, but the image must be readable")]
    NotReadable { fd: RawFd, mode: crate::AccessMode },
    #[error("fd {fd} is opened {mode}, but the image is served read-write: pass an O_RDWR fd or use --read-only")]
    NotWritable { fd: RawFd, mode: crate::AccessMode },
    #[error("fd {fd} has O_APPEND set: every write would go to the end of the file")]
    Append { fd: RawFd },
    #[error("fd {fd} lacks O_DIRECT, which --cache none needs: open it with O_DIRECT or use --cache writeback")]
    DirectMissing { fd: RawFd },
    #[error("fd {fd} has O_DIRECT, but --cache writeback was asked for: open it without O_DIRECT or use --cache none")]
    DirectUnexpected { fd: RawFd },
}
