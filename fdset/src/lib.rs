//! File descriptors as vublk receives them from its manager.
//!
//! Owns: the spelling of a file argument (`fd:N`, `/dev/fdset/N`, or a path), and the checks
//! that an inherited or received fd is fit for the role it is given (type, access mode, flags).
//! Fd sets themselves (QEMU's `add-fd`/`remove-fd`) come with the control plane. It does not
//! know about images or formats: it answers "is this fd usable as a readable/writable image".

mod error;
mod spec;
mod status;

pub use error::FdError;
pub use spec::{FileSpec, SpecError};
pub use status::{check_image_fd, check_socket_fd, AccessMode, FdStatus, FileKind, ImageAccess};
