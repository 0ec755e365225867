//! File descriptors as vublk receives them from its manager.
//!
//! Owns: the spelling of a file argument (`fd:N`, `/dev/fdset/N`, or a path), the checks that an
//! inherited or received fd is fit for the role it is given (type, access mode, flags), QEMU's fd
//! sets and named fds as pure bookkeeping ([`FdSets`], [`NamedFds`]: `add-fd`, `remove-fd`,
//! `query-fdsets`, opening `/dev/fdset/N`, `getfd`, `closefd`), and receiving fds over a unix
//! socket ([`recv_with_fds`]). It does not know the control protocol that drives the sets, nor
//! images or formats: it answers "is this fd usable as a readable/writable image" and "which fd
//! does this name stand for".

mod error;
mod scm;
mod sets;
mod spec;
mod status;

pub use error::FdError;
pub use scm::{recv_with_fds, FdsTruncated, Received, RecvError, MAX_FDS_PER_MESSAGE};
pub use sets::{
    AddedFd, DupHandle, FdInfo, FdSetError, FdSetInfo, FdSets, Members, NamedFdError, NamedFds,
    Need, Opened, MAX_FDSET_ID, MAX_FDS_PER_SET, MAX_FD_SETS, MAX_NAMED_FDS,
};
pub use spec::{FileSpec, SpecError};
pub use status::{check_image_fd, check_socket_fd, AccessMode, FdStatus, FileKind, ImageAccess};
