//! The fds the manager gave vublk: fd sets (from `--add-fd` and `add-fd`), named fds
//! (`getfd`), and how a chain's `FILE` arguments resolve against them.
//!
//! Two sources resolve files for `disk.rs`: during setup ([`SetupSource`]), `fd:N` adopts an
//! inherited fd and paths may be opened; afterwards ([`ControlSource`], for medium changes),
//! `fd:N` must name an fd the manager added to a set (it is dup'ed; vublk never adopts an
//! arbitrary fd number, which could be one of its own), and paths are refused. `/dev/fdset/N`
//! works in both, picking the newest member with the access mode and O_DIRECT flag needed.

use std::collections::{HashSet, VecDeque};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use vublk_fdset::{AccessMode, FdSetError, FdSets, FileSpec, ImageAccess, NamedFds, Need};

use crate::config::AddFd;
use crate::disk::{adopt_inherited, Disk, DiskError, FdSource, ResolvedFd};

/// Every fd the manager handed over that is not (yet) part of a medium.
#[derive(Debug, Default)]
pub struct ManagerFds {
    pub sets: FdSets,
    pub named: NamedFds,
}

/// Why `--add-fd` failed.
#[derive(Debug, thiserror::Error)]
pub enum AddFdError {
    #[error("--add-fd fd={fd}: the fd is not open")]
    Closed { fd: RawFd },
    #[error("--add-fd fd={fd},set={set}")]
    Set {
        fd: RawFd,
        set: u64,
        #[source]
        source: FdSetError,
    },
}

impl ManagerFds {
    /// Applies the command line's `--add-fd` options: each fd is taken over (close-on-exec
    /// set) and put in its set.
    pub fn from_command_line(add_fds: &[AddFd]) -> Result<ManagerFds, AddFdError> {
        let mut fds = ManagerFds::default();
        for add in add_fds {
            let fd = add.fd;
            // SAFETY: F_GETFD on a number only reads the descriptor table.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(AddFdError::Closed { fd });
            }
            // SAFETY: F_SETFD only changes this descriptor's close-on-exec flag.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            // SAFETY: the manager passed `fd` for vublk to keep in a set; it is open (checked
            // above) and no other part of vublk owns it (the config refuses reuse).
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            fds.sets
                .add(owned, Some(add.set), add.opaque.clone())
                .map_err(|source| AddFdError::Set {
                    fd,
                    set: add.set,
                    source,
                })?;
        }
        Ok(fds)
    }
}

fn need_of(access: ImageAccess, direct: bool) -> Need {
    Need {
        access: if access.writable {
            AccessMode::ReadWrite
        } else {
            AccessMode::ReadOnly
        },
        direct,
    }
}

/// Opens fd set `set` for `access`. Without a cache mode the fd's own flag decides, so a
/// member without O_DIRECT is taken first, then one with it.
fn open_set(
    sets: &mut FdSets,
    spec: &FileSpec,
    set: u64,
    access: ImageAccess,
) -> Result<ResolvedFd, DiskError> {
    let first = sets.open(set, need_of(access, access.direct.unwrap_or(false)));
    let opened = match (first, access.direct) {
        (Err(FdSetError::NoMatch { .. }), None) => sets.open(set, need_of(access, true)),
        (other, _) => other,
    };
    let opened = opened.map_err(|source| DiskError::Resolve {
        spec: spec.clone(),
        source: Box::new(source),
    })?;
    Ok(ResolvedFd {
        fd: opened.fd,
        hold: Some(Arc::new(opened.handle)),
        fdset: Some(set),
        opaque: opened.opaque,
    })
}

/// Resolves files during setup.
pub struct SetupSource<'a> {
    pub fds: &'a mut ManagerFds,
    /// `fd:N` numbers already taken (each inherited fd serves one file).
    pub adopted: HashSet<RawFd>,
}

impl FdSource for SetupSource<'_> {
    fn resolve(&mut self, spec: &FileSpec, need: ImageAccess) -> Result<ResolvedFd, DiskError> {
        match spec {
            FileSpec::Fd(fd) => {
                if !self.adopted.insert(*fd) {
                    return Err(DiskError::FdReused { spec: spec.clone() });
                }
                Ok(ResolvedFd {
                    fd: adopt_inherited(spec, *fd)?,
                    hold: None,
                    fdset: None,
                    opaque: None,
                })
            }
            FileSpec::FdSet(set) => open_set(&mut self.fds.sets, spec, *set, need),
            FileSpec::Path(path) => Err(DiskError::PathRefused { path: path.clone() }),
        }
    }

    fn paths_allowed(&self) -> bool {
        true
    }
}

/// Resolves files for a medium change over the control socket.
pub struct ControlSource<'a> {
    pub fds: &'a mut ManagerFds,
}

impl FdSource for ControlSource<'_> {
    fn resolve(&mut self, spec: &FileSpec, need: ImageAccess) -> Result<ResolvedFd, DiskError> {
        match spec {
            FileSpec::Fd(fd) => {
                let opened =
                    self.fds
                        .sets
                        .dup_member(*fd)
                        .map_err(|source| DiskError::Resolve {
                            spec: spec.clone(),
                            source: Box::new(source),
                        })?;
                Ok(ResolvedFd {
                    fdset: Some(opened.handle.fdset_id()),
                    fd: opened.fd,
                    hold: Some(Arc::new(opened.handle)),
                    opaque: opened.opaque,
                })
            }
            FileSpec::FdSet(set) => open_set(&mut self.fds.sets, spec, *set, need),
            FileSpec::Path(path) => Err(DiskError::PathRefused { path: path.clone() }),
        }
    }

    fn paths_allowed(&self) -> bool {
        false
    }
}

/// Resolves the files of a medium being reopened (after a resize) to dups of the fds it was
/// opened from, in the same order, keeping their fd sets' holds.
pub struct ReopenSource {
    next: VecDeque<ResolvedFd>,
}

impl ReopenSource {
    /// Dups every fd of `disk`'s chain (which must stay open until the reopen is done).
    pub fn new(disk: &Disk) -> std::io::Result<ReopenSource> {
        let mut next = VecDeque::new();
        // `opened` is in resolve order (bottom-up), `chain` top first.
        for ((fd, hold), info) in disk.opened().iter().zip(disk.chain().iter().rev()) {
            // SAFETY: `fd` belongs to `disk`'s open layer, which the caller keeps alive for
            // the duration of this borrow.
            let borrowed = unsafe { BorrowedFd::borrow_raw(*fd) };
            next.push_back(ResolvedFd {
                fd: borrowed.try_clone_to_owned()?,
                hold: hold.clone(),
                fdset: info.fdset,
                opaque: info.opaque.clone(),
            });
        }
        Ok(ReopenSource { next })
    }
}

impl FdSource for ReopenSource {
    fn resolve(&mut self, spec: &FileSpec, _need: ImageAccess) -> Result<ResolvedFd, DiskError> {
        self.next
            .pop_front()
            .ok_or_else(|| DiskError::FdReused { spec: spec.clone() })
    }

    fn paths_allowed(&self) -> bool {
        false
    }
}
