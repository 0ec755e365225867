//! What an fd is (file type, access mode, status flags) and whether it fits a role.
//!
//! [`FdStatus::of`] asks the kernel (fstat, F_GETFL); [`check_image_fd`] and [`check_socket_fd`]
//! are pure decisions on an [`FdStatus`], so every refusal is unit-tested without real fds.

use std::fmt;
use std::os::fd::{BorrowedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{fstat, SFlag};

use crate::FdError;

/// The type of the file behind an fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    BlockDevice,
    Directory,
    Socket,
    CharDevice,
    Fifo,
    Symlink,
    Other,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Regular => "regular file",
            FileKind::BlockDevice => "block device",
            FileKind::Directory => "directory",
            FileKind::Socket => "socket",
            FileKind::CharDevice => "character device",
            FileKind::Fifo => "fifo",
            FileKind::Symlink => "symbolic link",
            FileKind::Other => "file of unknown type",
        })
    }
}

/// The access mode an fd was opened with (`O_ACCMODE` of its status flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessMode {
    ReadOnly,
    WriteOnly,
    ReadWrite,
}

impl fmt::Display for AccessMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessMode::ReadOnly => "O_RDONLY",
            AccessMode::WriteOnly => "O_WRONLY",
            AccessMode::ReadWrite => "O_RDWR",
        })
    }
}

/// What the kernel says about an fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdStatus {
    pub fd: RawFd,
    pub kind: FileKind,
    pub access: AccessMode,
    pub append: bool,
    pub direct: bool,
    pub nonblock: bool,
}

impl FdStatus {
    /// Inspects `fd` with fstat and F_GETFL. A closed fd gives [`FdError::Closed`].
    pub fn of(fd: BorrowedFd<'_>) -> Result<FdStatus, FdError> {
        use std::os::fd::AsRawFd;
        let raw = fd.as_raw_fd();
        let inspect = |source: nix::Error| match source {
            nix::Error::EBADF => FdError::Closed { fd: raw },
            source => FdError::Inspect { fd: raw, source },
        };
        let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL).map_err(inspect)?);
        let stat = fstat(fd).map_err(inspect)?;
        Ok(FdStatus {
            fd: raw,
            kind: kind_of_mode(stat.st_mode),
            access: match flags & OFlag::O_ACCMODE {
                m if m == OFlag::O_RDONLY => AccessMode::ReadOnly,
                m if m == OFlag::O_WRONLY => AccessMode::WriteOnly,
                _ => AccessMode::ReadWrite,
            },
            append: flags.contains(OFlag::O_APPEND),
            direct: flags.contains(OFlag::O_DIRECT),
            nonblock: flags.contains(OFlag::O_NONBLOCK),
        })
    }

    /// Inspects a raw fd number that may or may not be open.
    pub fn of_raw(fd: RawFd) -> Result<FdStatus, FdError> {
        if fd < 0 {
            return Err(FdError::Closed { fd });
        }
        // SAFETY: the borrow lives only for the two inspection syscalls below, during which
        // nothing in this process closes `fd`; if it is not open, the syscalls fail with EBADF,
        // which is reported, and no memory is touched through it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        Self::of(borrowed)
    }
}

fn kind_of_mode(mode: libc::mode_t) -> FileKind {
    match SFlag::from_bits_truncate(mode) & SFlag::S_IFMT {
        t if t == SFlag::S_IFREG => FileKind::Regular,
        t if t == SFlag::S_IFBLK => FileKind::BlockDevice,
        t if t == SFlag::S_IFDIR => FileKind::Directory,
        t if t == SFlag::S_IFSOCK => FileKind::Socket,
        t if t == SFlag::S_IFCHR => FileKind::CharDevice,
        t if t == SFlag::S_IFIFO => FileKind::Fifo,
        t if t == SFlag::S_IFLNK => FileKind::Symlink,
        _ => FileKind::Other,
    }
}

/// What an image fd must allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageAccess {
    /// The image is served read-write.
    pub writable: bool,
    /// `Some(true)`: `--cache none` (O_DIRECT required); `Some(false)`: `--cache writeback`
    /// (O_DIRECT refused); `None`: the fd's own flag decides.
    pub direct: Option<bool>,
}

/// Decides whether an fd with `status` can serve as an image with `need`.
pub fn check_image_fd(status: &FdStatus, need: ImageAccess) -> Result<(), FdError> {
    let fd = status.fd;
    match status.kind {
        FileKind::Regular | FileKind::BlockDevice => {}
        kind @ (FileKind::Directory
        | FileKind::Socket
        | FileKind::CharDevice
        | FileKind::Fifo
        | FileKind::Symlink
        | FileKind::Other) => return Err(FdError::NotAnImage { fd, kind }),
    }
    match (status.access, need.writable) {
        (AccessMode::WriteOnly, _) => {
            return Err(FdError::NotReadable {
                fd,
                mode: status.access,
            })
        }
        (AccessMode::ReadOnly, true) => {
            return Err(FdError::NotWritable {
                fd,
                mode: status.access,
            })
        }
        (AccessMode::ReadOnly, false) | (AccessMode::ReadWrite, _) => {}
    }
    if status.append {
        return Err(FdError::Append { fd });
    }
    match (need.direct, status.direct) {
        (Some(true), false) => Err(FdError::DirectMissing { fd }),
        (Some(false), true) => Err(FdError::DirectUnexpected { fd }),
        (Some(true), true) | (Some(false), false) | (None, _) => Ok(()),
    }
}

/// Decides whether an fd with `status` can serve as a unix socket (vhost-user or control).
pub fn check_socket_fd(status: &FdStatus) -> Result<(), FdError> {
    match status.kind {
        FileKind::Socket => Ok(()),
        kind => Err(FdError::NotASocket {
            fd: status.fd,
            kind,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn regular_rdwr() -> FdStatus {
        FdStatus {
            fd: 5,
            kind: FileKind::Regular,
            access: AccessMode::ReadWrite,
            append: false,
            direct: false,
            nonblock: false,
        }
    }

    const RW: ImageAccess = ImageAccess {
        writable: true,
        direct: None,
    };
    const RO: ImageAccess = ImageAccess {
        writable: false,
        direct: None,
    };

    #[test]
    fn regular_rdwr_fd_serves_read_write() {
        assert!(check_image_fd(&regular_rdwr(), RW).is_ok());
    }

    #[test]
    fn block_device_is_an_image() {
        let status = FdStatus {
            kind: FileKind::BlockDevice,
            ..regular_rdwr()
        };
        assert!(check_image_fd(&status, RW).is_ok());
    }

    #[test]
    fn directory_and_socket_are_refused_as_images() {
        for kind in [FileKind::Directory, FileKind::Socket, FileKind::Fifo] {
            let status = FdStatus {
                kind,
                ..regular_rdwr()
            };
            assert!(matches!(
                check_image_fd(&status, RW),
                Err(FdError::NotAnImage { fd: 5, .. })
            ));
        }
    }

    #[test]
    fn rdonly_fd_is_refused_for_read_write_but_serves_read_only() {
        let status = FdStatus {
            access: AccessMode::ReadOnly,
            ..regular_rdwr()
        };
        assert!(matches!(
            check_image_fd(&status, RW),
            Err(FdError::NotWritable { fd: 5, .. })
        ));
        assert!(check_image_fd(&status, RO).is_ok());
    }

    #[test]
    fn wronly_fd_is_refused_even_read_only() {
        let status = FdStatus {
            access: AccessMode::WriteOnly,
            ..regular_rdwr()
        };
        assert!(matches!(
            check_image_fd(&status, RO),
            Err(FdError::NotReadable { .. })
        ));
    }

    #[test]
    fn append_fd_is_refused() {
        let status = FdStatus {
            append: true,
            ..regular_rdwr()
        };
        assert!(matches!(
            check_image_fd(&status, RW),
            Err(FdError::Append { fd: 5 })
        ));
    }

    #[test]
    fn cache_none_needs_o_direct_and_writeback_refuses_it() {
        let none = ImageAccess {
            writable: true,
            direct: Some(true),
        };
        let writeback = ImageAccess {
            writable: true,
            direct: Some(false),
        };
        let direct = FdStatus {
            direct: true,
            ..regular_rdwr()
        };
        assert!(matches!(
            check_image_fd(&regular_rdwr(), none),
            Err(FdError::DirectMissing { .. })
        ));
        assert!(check_image_fd(&direct, none).is_ok());
        assert!(matches!(
            check_image_fd(&direct, writeback),
            Err(FdError::DirectUnexpected { .. })
        ));
        assert!(check_image_fd(&direct, RW).is_ok());
    }

    #[test]
    fn socket_check_names_the_kind() {
        assert!(matches!(
            check_socket_fd(&regular_rdwr()),
            Err(FdError::NotASocket {
                kind: FileKind::Regular,
                ..
            })
        ));
    }

    #[test]
    fn status_of_real_files_reads_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let status = FdStatus::of(file.as_fd()).unwrap();
        assert_eq!(status.kind, FileKind::Regular);
        assert_eq!(status.access, AccessMode::WriteOnly);
        assert!(status.append);
        let dirfile = std::fs::File::open(dir.path()).unwrap();
        assert_eq!(
            FdStatus::of(dirfile.as_fd()).unwrap().kind,
            FileKind::Directory
        );
    }

    #[test]
    fn status_of_closed_fd_is_closed_error() {
        assert!(matches!(
            FdStatus::of_raw(1_000_000),
            Err(FdError::Closed { fd: 1_000_000 })
        ));
    }
}
