//! Fd sets (`add-fd`/`remove-fd`/`query-fdsets`, `/dev/fdset/N`) and named fds
//! (`getfd`/`closefd`), with the semantics of QEMU >= 9.1.
//!
//! Owns: the fds the manager handed over for later use, which set each belongs to, the choice of
//! member when a set is opened, and the liveness of the dups handed out (a [`DupHandle`] per dup).
//! It does not know where fds come from (SCM_RIGHTS, an inherited `--add-fd`), nor the control
//! protocol that drives it, nor whether an fd is fit to be an image: `add-fd` is permissive, as in
//! QEMU, and checks happen when the dup is used ([`crate::check_image_fd`]).
//!
//! Behaviour checked against QEMU 10.0.2 (`qemu-system-x86_64 -machine none`, QMP through the
//! `qemu.qmp` library, fds passed with `send_fd_scm`):
//! - `add-fd` without `fdset-id` takes the lowest id not in use, counting from 0 (sets 1 and 3
//!   present: the next two are 0, then 2, then 4). A set kept alive only by dups counts as in use.
//! - `query-fdsets` lists the sets by *descending* id and, within a set, the fds *oldest first*
//!   (QEMU keeps both lists newest/lowest first and builds the answer by prepending), e.g.
//!   `[{"fdset-id": 4, ...}, {"fdset-id": 3, "fds": [{"fd": 11, "opaque": "ro"},
//!   {"fd": 12, "opaque": "rw"}, {"fd": 13}]}, ...]` after adding 11, 12, 13 to set 3 in that
//!   order. `opaque` is absent when it was not given. [`FdSets::query`] returns the same order.
//! - Opening `/dev/fdset/N` takes the *newest* member whose `O_ACCMODE` and `O_DIRECT` both match
//!   (two O_RDWR fds of different files in one set: the dup is of the one added last).
//! - `remove-fd` closes the member at once, even while a dup is in use; the set then stays listed
//!   as `{"fds": [], "fdset-id": N}` until the last dup is closed, and disappears after.
//! - Error texts: `File descriptor named 'fdset-id:99' not found`,
//!   `File descriptor named 'fdset-id:3, fd:999' not found` (also when the fd is in another set),
//!   `Parameter 'fdname' expects a name not starting with a digit`,
//!   `File descriptor named 'nope' not found` (closefd). QEMU's open errors are
//!   `Failed to find fdset /dev/fdset/77` (ENOENT) and
//!   `Failed to find file descriptor with matching flags=0x4000` (EACCES); ours say more.
//! - `getfd` with an existing name replaces (and closes) the old fd; an empty name is accepted.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Weak};

use crate::{AccessMode, FdError, FdStatus};

/// Most fds one set may hold. A set holds the variants of one file (read-only, read-write, with
/// and without O_DIRECT: four at most in practice); 64 leaves room while bounding what a buggy
/// manager can pile up.
pub const MAX_FDS_PER_SET: usize = 64;

/// Most fd sets at once. One VM's images, each with a handful of backing layers, need tens;
/// 1024 bounds the bookkeeping a buggy manager can make the daemon keep.
pub const MAX_FD_SETS: usize = 1024;

/// Highest fd set id: QEMU's `fdset-id` is an int64 that must be non-negative.
pub const MAX_FDSET_ID: u64 = i64::MAX as u64;

/// Most named fds (`getfd`) at once, for the same reason as [`MAX_FD_SETS`].
pub const MAX_NAMED_FDS: usize = 1024;

/// Why an fd set operation failed; each variant names the set and the fd at fault.
#[derive(Debug, thiserror::Error)]
pub enum FdSetError {
    #[error("fd set id {fdset_id} is out of range (at most {MAX_FDSET_ID}); fd {fd} was closed")]
    IdOutOfRange { fdset_id: u64, fd: RawFd },
    #[error("cannot add fd {fd}: there are already {limit} fd sets; fd {fd} was closed")]
    TooManySets { fd: RawFd, limit: usize },
    #[error(
        "cannot add fd {fd} to fd set {fdset_id}: it already holds {limit} fds; fd {fd} was closed"
    )]
    TooManyFds {
        fdset_id: u64,
        fd: RawFd,
        limit: usize,
    },
    /// QEMU's `remove-fd` error, word for word.
    #[error("File descriptor named '{}' not found", RemoveTarget(*.fdset_id, *.fd))]
    NotFound { fdset_id: u64, fd: Option<RawFd> },
    #[error("fd set {fdset_id} does not exist: no fd was added to /dev/fdset/{fdset_id}")]
    NoSuchSet { fdset_id: u64 },
    #[error("fd set {fdset_id} has no fd opened {need}; it holds {present}")]
    NoMatch {
        fdset_id: u64,
        need: Need,
        present: Members,
    },
    #[error("fd {fd} of fd set {fdset_id} could not be inspected")]
    Inspect {
        fdset_id: u64,
        fd: RawFd,
        #[source]
        source: FdError,
    },
    #[error("fd {fd} of fd set {fdset_id} could not be duplicated")]
    Dup {
        fdset_id: u64,
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("fd {fd} is not in any fd set")]
    NotAMember { fd: RawFd },
}

/// How QEMU names the target of a failed `remove-fd`.
struct RemoveTarget(u64, Option<RawFd>);

impl fmt::Display for RemoveTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(fd) => write!(f, "fdset-id:{}, fd:{fd}", self.0),
            None => write!(f, "fdset-id:{}", self.0),
        }
    }
}

/// What the user of an fd set needs from the fd it gets: both must match the member exactly,
/// as QEMU compares `O_ACCMODE | O_DIRECT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub access: AccessMode,
    pub direct: bool,
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let direct = if self.direct { "with" } else { "without" };
        write!(f, "{} {direct} O_DIRECT", self.access)
    }
}

/// The members of a set and how each is opened, newest first, for [`FdSetError::NoMatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Members(pub Vec<(RawFd, Need)>);

impl fmt::Display for Members {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no fds (all were removed)");
        }
        for (i, (fd, mode)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}fd {fd} {mode}")?;
        }
        Ok(())
    }
}

/// The answer to a successful add: where the fd went and its number here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddedFd {
    pub fdset_id: u64,
    pub fd: RawFd,
}

/// One set as `query-fdsets` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdSetInfo {
    pub fdset_id: u64,
    /// Oldest first, as QEMU prints them.
    pub fds: Vec<FdInfo>,
}

/// One member as `query-fdsets` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdInfo {
    pub fd: RawFd,
    pub opaque: Option<String>,
}

/// A dup handed out of a set: the fd, the handle that keeps the set listed, and which member
/// it duplicates (its number and opaque text, for reporting where a file came from).
#[derive(Debug)]
pub struct Opened {
    pub fd: OwnedFd,
    pub handle: DupHandle,
    pub member: RawFd,
    pub opaque: Option<String>,
}

/// Keeps an fd set listed while the dup it came with is in use. Drop it when the dup is closed;
/// the set forgets it at its next operation.
#[derive(Debug)]
pub struct DupHandle {
    fdset_id: u64,
    _live: Arc<DupLive>,
}

impl DupHandle {
    /// The set the dup came from.
    pub fn fdset_id(&self) -> u64 {
        self.fdset_id
    }
}

/// What the [`DupHandle`]s of one set share; the set holds a `Weak` to it.
#[derive(Debug)]
struct DupLive;

#[derive(Debug)]
struct Member {
    fd: OwnedFd,
    opaque: Option<String>,
}

#[derive(Debug, Default)]
struct FdSet {
    /// Oldest first; the newest is the last.
    members: Vec<Member>,
    /// Alive while any dup handed out from this set is.
    dups: Weak<DupLive>,
}

impl FdSet {
    fn dups_live(&self) -> bool {
        self.dups.strong_count() > 0
    }

    /// A set with no fds and no dup in use is gone, as in QEMU's `monitor_fdset_cleanup`.
    fn is_dead(&self) -> bool {
        self.members.is_empty() && !self.dups_live()
    }

    fn handle(&mut self, fdset_id: u64) -> DupHandle {
        let live = match self.dups.upgrade() {
            Some(live) => live,
            None => {
                let live = Arc::new(DupLive);
                self.dups = Arc::downgrade(&live);
                live
            }
        };
        DupHandle {
            fdset_id,
            _live: live,
        }
    }
}

/// Dups `fd` with F_DUPFD_CLOEXEC (std's `try_clone_to_owned`), so the dup shares the file
/// description (and its status flags) and does not leak across exec.
fn dup_cloexec(fdset_id: u64, fd: BorrowedFd<'_>) -> Result<OwnedFd, FdSetError> {
    fd.try_clone_to_owned().map_err(|source| FdSetError::Dup {
        fdset_id,
        fd: fd.as_raw_fd(),
        source,
    })
}

/// All fd sets of the daemon.
#[derive(Debug, Default)]
pub struct FdSets {
    sets: BTreeMap<u64, FdSet>,
}

impl FdSets {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the sets that have neither fds nor a dup in use.
    fn prune(&mut self) {
        self.sets.retain(|_, set| !set.is_dead());
    }

    /// The lowest id not in use, counting from 0 (QEMU's first free id).
    fn lowest_free_id(&self) -> u64 {
        let mut next = 0;
        for &id in self.sets.keys() {
            if id != next {
                break;
            }
            next += 1;
        }
        next
    }

    /// `add-fd`: puts `fd` into set `fdset_id`, creating it, or into a new set with the lowest
    /// free id. Any fd is accepted. On error `fd` is closed.
    pub fn add(
        &mut self,
        fd: OwnedFd,
        fdset_id: Option<u64>,
        opaque: Option<String>,
    ) -> Result<AddedFd, FdSetError> {
        self.prune();
        let raw = fd.as_raw_fd();
        let id = match fdset_id {
            Some(id) if id > MAX_FDSET_ID => {
                return Err(FdSetError::IdOutOfRange {
                    fdset_id: id,
                    fd: raw,
                })
            }
            Some(id) => id,
            None => self.lowest_free_id(),
        };
        if !self.sets.contains_key(&id) && self.sets.len() >= MAX_FD_SETS {
            return Err(FdSetError::TooManySets {
                fd: raw,
                limit: MAX_FD_SETS,
            });
        }
        let set = self.sets.entry(id).or_default();
        if set.members.len() >= MAX_FDS_PER_SET {
            return Err(FdSetError::TooManyFds {
                fdset_id: id,
                fd: raw,
                limit: MAX_FDS_PER_SET,
            });
        }
        set.members.push(Member { fd, opaque });
        Ok(AddedFd {
            fdset_id: id,
            fd: raw,
        })
    }

    /// `remove-fd`: closes member `fd` of the set, or every member when `fd` is `None`, at once.
    /// The set stays listed (with no fds) while a dup of it is in use.
    pub fn remove(&mut self, fdset_id: u64, fd: Option<RawFd>) -> Result<(), FdSetError> {
        self.prune();
        let not_found = FdSetError::NotFound { fdset_id, fd };
        let set = self.sets.get_mut(&fdset_id).ok_or(not_found)?;
        match fd {
            Some(fd) => {
                let at = set
                    .members
                    .iter()
                    .position(|m| m.fd.as_raw_fd() == fd)
                    .ok_or(FdSetError::NotFound {
                        fdset_id,
                        fd: Some(fd),
                    })?;
                drop(set.members.remove(at));
            }
            None => set.members.clear(),
        }
        self.prune();
        Ok(())
    }

    /// `query-fdsets`, in QEMU's order: sets by descending id, fds oldest first.
    pub fn query(&mut self) -> Vec<FdSetInfo> {
        self.prune();
        self.sets
            .iter()
            .rev()
            .map(|(&fdset_id, set)| FdSetInfo {
                fdset_id,
                fds: set
                    .members
                    .iter()
                    .map(|m| FdInfo {
                        fd: m.fd.as_raw_fd(),
                        opaque: m.opaque.clone(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Opens `/dev/fdset/{fdset_id}`: dups (close-on-exec) the newest member whose access mode
    /// and O_DIRECT flag both equal `need`. The set stays listed while the handle lives.
    pub fn open(&mut self, fdset_id: u64, need: Need) -> Result<Opened, FdSetError> {
        self.prune();
        let set = self
            .sets
            .get_mut(&fdset_id)
            .ok_or(FdSetError::NoSuchSet { fdset_id })?;
        let mut present = Vec::with_capacity(set.members.len());
        let mut chosen = None;
        for member in set.members.iter().rev() {
            let fd = member.fd.as_fd();
            let status = FdStatus::of(fd).map_err(|source| FdSetError::Inspect {
                fdset_id,
                fd: fd.as_raw_fd(),
                source,
            })?;
            let mode = Need {
                access: status.access,
                direct: status.direct,
            };
            if mode == need {
                chosen = Some((fd, member.opaque.clone()));
                break;
            }
            present.push((fd.as_raw_fd(), mode));
        }
        let Some((fd, opaque)) = chosen else {
            return Err(FdSetError::NoMatch {
                fdset_id,
                need,
                present: Members(present),
            });
        };
        let member = fd.as_raw_fd();
        let dup = dup_cloexec(fdset_id, fd)?;
        Ok(Opened {
            fd: dup,
            handle: set.handle(fdset_id),
            member,
            opaque,
        })
    }

    /// The set and the fd of member number `fd`, for resolving `fd:N` when N was added to a set.
    pub fn fd_by_number(&self, fd: RawFd) -> Option<(u64, BorrowedFd<'_>)> {
        self.sets.iter().find_map(|(&id, set)| {
            set.members
                .iter()
                .find(|m| m.fd.as_raw_fd() == fd)
                .map(|m| (id, m.fd.as_fd()))
        })
    }

    /// Dups (close-on-exec) member number `fd`, whatever its flags; the handle keeps its set
    /// listed like one from [`FdSets::open`].
    pub fn dup_member(&mut self, fd: RawFd) -> Result<Opened, FdSetError> {
        let (fdset_id, dup) = match self.fd_by_number(fd) {
            Some((fdset_id, member)) => (fdset_id, dup_cloexec(fdset_id, member)?),
            None => return Err(FdSetError::NotAMember { fd }),
        };
        let set = self
            .sets
            .get_mut(&fdset_id)
            .ok_or(FdSetError::NotAMember { fd })?;
        let opaque = set
            .members
            .iter()
            .find(|m| m.fd.as_raw_fd() == fd)
            .and_then(|m| m.opaque.clone());
        Ok(Opened {
            fd: dup,
            handle: set.handle(fdset_id),
            member: fd,
            opaque,
        })
    }

    /// Every fd the sets hold (dups handed out are their holders', not counted).
    pub fn len_fds(&self) -> usize {
        self.sets.values().map(|set| set.members.len()).sum()
    }
}

/// Why a named-fd operation failed, naming the fd name at fault.
#[derive(Debug, thiserror::Error)]
pub enum NamedFdError {
    /// QEMU's `getfd` error, word for word: a name starting with a digit would read as `fd:N`.
    #[error("Parameter 'fdname' expects a name not starting with a digit")]
    NameStartsWithDigit { name: String },
    /// QEMU's `closefd` error, word for word.
    #[error("File descriptor named '{name}' not found")]
    NotFound { name: String },
    #[error("cannot keep fd '{name}': there are already {limit} named fds; the fd was closed")]
    TooMany { name: String, limit: usize },
}

/// Named single fds (`getfd`/`closefd`).
#[derive(Debug, Default)]
pub struct NamedFds {
    fds: BTreeMap<String, OwnedFd>,
}

impl NamedFds {
    pub fn new() -> Self {
        Self::default()
    }

    /// `getfd`: keeps `fd` under `name`, closing any fd that had that name. On error `fd` is
    /// closed.
    pub fn insert(&mut self, name: String, fd: OwnedFd) -> Result<(), NamedFdError> {
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(NamedFdError::NameStartsWithDigit { name });
        }
        if !self.fds.contains_key(&name) && self.fds.len() >= MAX_NAMED_FDS {
            return Err(NamedFdError::TooMany {
                name,
                limit: MAX_NAMED_FDS,
            });
        }
        drop(self.fds.insert(name, fd));
        Ok(())
    }

    /// `closefd`: closes the fd named `name`.
    pub fn close(&mut self, name: &str) -> Result<(), NamedFdError> {
        match self.fds.remove(name) {
            Some(fd) => {
                drop(fd);
                Ok(())
            }
            None => Err(NamedFdError::NotFound {
                name: name.to_string(),
            }),
        }
    }

    /// Hands over the fd named `name` to a user (QEMU's `monitor_get_fd`): it is no longer named.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.fds.remove(name)
    }

    /// How many named fds are held.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::io::{ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;

    const RDWR: Need = Need {
        access: AccessMode::ReadWrite,
        direct: false,
    };
    const RDONLY: Need = Need {
        access: AccessMode::ReadOnly,
        direct: false,
    };
    const RDWR_DIRECT: Need = Need {
        access: AccessMode::ReadWrite,
        direct: true,
    };
    const WRONLY: Need = Need {
        access: AccessMode::WriteOnly,
        direct: false,
    };

    /// A file in /var/tmp (not tmpfs, so O_DIRECT works) and ways to open it.
    struct Image {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    }

    impl Image {
        fn new() -> Image {
            let dir = tempfile::tempdir_in("/var/tmp").unwrap();
            let path = dir.path().join("image");
            std::fs::write(&path, vec![0u8; 4096]).unwrap();
            Image { _dir: dir, path }
        }

        fn open(&self, need: Need) -> OwnedFd {
            let mut options = OpenOptions::new();
            match need.access {
                AccessMode::ReadOnly => options.read(true),
                AccessMode::WriteOnly => options.write(true),
                AccessMode::ReadWrite => options.read(true).write(true),
            };
            if need.direct {
                options.custom_flags(libc::O_DIRECT);
            }
            options.open(&self.path).unwrap().into()
        }
    }

    /// A pipe whose write end goes into a set: the read end sees EOF exactly when every copy of
    /// the write end is closed, which proves closing without counting the process's fds (tests
    /// run in parallel threads and open fds of their own).
    struct CloseProbe {
        read: File,
    }

    impl CloseProbe {
        fn new() -> (CloseProbe, OwnedFd) {
            let (read, write) = nix::unistd::pipe().unwrap();
            nix::fcntl::fcntl(
                &read,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .unwrap();
            (CloseProbe { read: read.into() }, write)
        }

        fn all_writers_closed(&mut self) -> bool {
            match self.read.read(&mut [0u8; 1]) {
                Ok(0) => true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                other => panic!("unexpected read from probe pipe: {other:?}"),
            }
        }
    }

    #[test]
    fn add_without_id_takes_lowest_free_id() {
        let image = Image::new();
        let mut sets = FdSets::new();
        sets.add(image.open(RDONLY), Some(1), None).unwrap();
        sets.add(image.open(RDONLY), Some(3), None).unwrap();

        let ids: Vec<u64> = (0..3)
            .map(|_| sets.add(image.open(RDONLY), None, None).unwrap().fdset_id)
            .collect();

        assert_eq!(ids, [0, 2, 4]);
    }

    #[test]
    fn add_reports_set_and_fd_number() {
        let image = Image::new();
        let fd = image.open(RDONLY);
        let raw = fd.as_raw_fd();
        let mut sets = FdSets::new();

        let added = sets.add(fd, Some(7), None).unwrap();

        assert_eq!(
            added,
            AddedFd {
                fdset_id: 7,
                fd: raw
            }
        );
    }

    #[test]
    fn query_lists_sets_descending_and_fds_oldest_first_like_qemu() {
        let image = Image::new();
        let mut sets = FdSets::new();
        let a = sets
            .add(image.open(RDONLY), Some(3), Some("ro".into()))
            .unwrap();
        let b = sets
            .add(image.open(RDWR), Some(3), Some("rw".into()))
            .unwrap();
        let c = sets.add(image.open(RDWR), None, None).unwrap();

        let listed = sets.query();

        assert_eq!(
            listed,
            [
                FdSetInfo {
                    fdset_id: 3,
                    fds: vec![
                        FdInfo {
                            fd: a.fd,
                            opaque: Some("ro".into())
                        },
                        FdInfo {
                            fd: b.fd,
                            opaque: Some("rw".into())
                        },
                    ],
                },
                FdSetInfo {
                    fdset_id: 0,
                    fds: vec![FdInfo {
                        fd: c.fd,
                        opaque: None
                    }],
                },
            ]
        );
    }

    #[test]
    fn open_dups_the_newest_matching_fd() {
        let older = Image::new();
        let newer = Image::new();
        let mut sets = FdSets::new();
        sets.add(older.open(RDWR), Some(0), None).unwrap();
        sets.add(newer.open(RDWR), Some(0), None).unwrap();
        sets.add(older.open(RDONLY), Some(0), None).unwrap();

        let Opened {
            fd: dup, handle, ..
        } = sets.open(0, RDWR).unwrap();

        let target = std::fs::read_link(format!("/proc/self/fd/{}", dup.as_raw_fd())).unwrap();
        assert_eq!(target, newer.path);
        assert_eq!(handle.fdset_id(), 0);
    }

    #[test]
    fn open_matches_o_direct_as_well_as_access_mode() {
        let image = Image::new();
        let mut sets = FdSets::new();
        let plain = sets.add(image.open(RDWR), Some(0), None).unwrap();
        let direct = sets.add(image.open(RDWR_DIRECT), Some(0), None).unwrap();

        let Opened {
            fd: dup_plain,
            handle: _h1,
            ..
        } = sets.open(0, RDWR).unwrap();
        let Opened {
            fd: dup_direct,
            handle: _h2,
            ..
        } = sets.open(0, RDWR_DIRECT).unwrap();

        assert!(!FdStatus::of(dup_plain.as_fd()).unwrap().direct);
        assert!(FdStatus::of(dup_direct.as_fd()).unwrap().direct);
        assert_ne!(plain.fd, direct.fd);
    }

    #[test]
    fn open_dup_is_close_on_exec() {
        let image = Image::new();
        let mut sets = FdSets::new();
        sets.add(image.open(RDONLY), Some(0), None).unwrap();

        let Opened {
            fd: dup,
            handle: _handle,
            ..
        } = sets.open(0, RDONLY).unwrap();

        let flags = nix::fcntl::fcntl(&dup, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn open_without_matching_mode_names_set_wanted_and_present_modes() {
        let image = Image::new();
        let mut sets = FdSets::new();
        let ro = sets.add(image.open(RDONLY), Some(5), None).unwrap();

        let err = sets.open(5, RDWR_DIRECT).unwrap_err();

        assert_eq!(
            err.to_string(),
            format!(
                "fd set 5 has no fd opened O_RDWR with O_DIRECT; it holds fd {} O_RDONLY without O_DIRECT",
                ro.fd
            )
        );
    }

    #[test]
    fn open_unknown_set_is_no_such_set() {
        let mut sets = FdSets::new();

        let err = sets.open(77, RDONLY).unwrap_err();

        assert!(matches!(err, FdSetError::NoSuchSet { fdset_id: 77 }));
    }

    #[test]
    fn remove_errors_use_qemu_text() {
        let image = Image::new();
        let mut sets = FdSets::new();
        sets.add(image.open(RDONLY), Some(3), None).unwrap();

        let no_set = sets.remove(99, None).unwrap_err();
        let no_fd = sets.remove(3, Some(999)).unwrap_err();

        assert_eq!(
            no_set.to_string(),
            "File descriptor named 'fdset-id:99' not found"
        );
        assert_eq!(
            no_fd.to_string(),
            "File descriptor named 'fdset-id:3, fd:999' not found"
        );
    }

    #[test]
    fn remove_of_an_fd_in_another_set_is_not_found() {
        let image = Image::new();
        let mut sets = FdSets::new();
        let added = sets.add(image.open(RDONLY), Some(7), None).unwrap();
        sets.add(image.open(RDONLY), Some(8), None).unwrap();

        let err = sets.remove(8, Some(added.fd)).unwrap_err();

        assert!(
            matches!(err, FdSetError::NotFound { fdset_id: 8, fd: Some(fd) } if fd == added.fd)
        );
        assert_eq!(sets.len_fds(), 2);
    }

    #[test]
    fn remove_one_fd_closes_it_and_keeps_the_others() {
        let (mut probe, write) = CloseProbe::new();
        let image = Image::new();
        let mut sets = FdSets::new();
        let piped = sets.add(write, Some(2), None).unwrap();
        let kept = sets.add(image.open(RDONLY), Some(2), None).unwrap();

        sets.remove(2, Some(piped.fd)).unwrap();

        assert!(probe.all_writers_closed());
        assert_eq!(
            sets.query()[0].fds,
            [FdInfo {
                fd: kept.fd,
                opaque: None
            }]
        );
    }

    #[test]
    fn remove_last_fd_without_dups_drops_the_set() {
        let (mut probe, write) = CloseProbe::new();
        let mut sets = FdSets::new();
        sets.add(write, Some(0), None).unwrap();

        sets.remove(0, None).unwrap();

        assert!(probe.all_writers_closed());
        assert_eq!(sets.query(), []);
        assert_eq!(sets.len_fds(), 0);
    }

    #[test]
    fn remove_while_dup_live_closes_fd_and_keeps_set_listed_empty() {
        let (mut probe, write) = CloseProbe::new();
        let mut sets = FdSets::new();
        sets.add(write, Some(4), None).unwrap();
        let Opened {
            fd: dup, handle, ..
        } = sets.open(4, WRONLY).unwrap();

        sets.remove(4, None).unwrap();
        let listed = sets.query();
        let closed_with_dup_live = probe.all_writers_closed();
        drop(dup);

        assert_eq!(
            listed,
            [FdSetInfo {
                fdset_id: 4,
                fds: vec![]
            }]
        );
        assert!(!closed_with_dup_live, "only the dup still holds the pipe");
        assert!(probe.all_writers_closed());
        drop(handle);
    }

    #[test]
    fn dropping_the_last_dup_handle_drops_an_empty_set() {
        let image = Image::new();
        let mut sets = FdSets::new();
        sets.add(image.open(RDONLY), Some(4), None).unwrap();
        let Opened {
            fd: _dup1,
            handle: handle1,
            ..
        } = sets.open(4, RDONLY).unwrap();
        let Opened {
            fd: _dup2,
            handle: handle2,
            ..
        } = sets.open(4, RDONLY).unwrap();
        sets.remove(4, None).unwrap();

        drop(handle1);
        let with_one_handle = sets.query().len();
        drop(handle2);

        assert_eq!(with_one_handle, 1);
        assert_eq!(sets.query(), []);
    }

    #[test]
    fn set_kept_by_a_dup_is_not_a_free_id_and_takes_new_fds() {
        let image = Image::new();
        let mut sets = FdSets::new();
        sets.add(image.open(RDONLY), None, None).unwrap();
        let Opened {
            fd: _dup,
            handle: _handle,
            ..
        } = sets.open(0, RDONLY).unwrap();
        sets.remove(0, None).unwrap();

        let fresh = sets.add(image.open(RDONLY), None, None).unwrap();
        let again = sets.add(image.open(RDWR), Some(0), None).unwrap();

        assert_eq!(fresh.fdset_id, 1);
        assert_eq!(again.fdset_id, 0);
        assert_eq!(
            sets.query()[1].fds,
            [FdInfo {
                fd: again.fd,
                opaque: None
            }]
        );
    }

    #[test]
    fn remove_fd_on_a_set_emptied_but_kept_by_a_dup_is_not_found_and_whole_set_is_ok() {
        let image = Image::new();
        let mut sets = FdSets::new();
        let added = sets.add(image.open(RDONLY), Some(0), None).unwrap();
        let Opened {
            fd: _dup,
            handle: _handle,
            ..
        } = sets.open(0, RDONLY).unwrap();
        sets.remove(0, None).unwrap();

        let one = sets.remove(0, Some(added.fd));
        let all = sets.remove(0, None);

        assert!(matches!(one, Err(FdSetError::NotFound { fdset_id: 0, .. })));
        assert!(all.is_ok());
    }

    #[test]
    fn open_of_a_set_emptied_but_kept_by_a_dup_lists_no_fds() {
        let image = Image::new();
        let mut sets = FdSets::new();
        sets.add(image.open(RDONLY), Some(0), None).unwrap();
        let Opened {
            fd: _dup,
            handle: _handle,
            ..
        } = sets.open(0, RDONLY).unwrap();
        sets.remove(0, None).unwrap();

        let err = sets.open(0, RDONLY).unwrap_err();

        assert_eq!(
            err.to_string(),
            "fd set 0 has no fd opened O_RDONLY without O_DIRECT; it holds no fds (all were removed)"
        );
    }

    #[test]
    fn fd_by_number_and_dup_member_find_a_member() {
        let image = Image::new();
        let mut sets = FdSets::new();
        let added = sets.add(image.open(RDONLY), Some(6), None).unwrap();

        let found = sets
            .fd_by_number(added.fd)
            .map(|(id, fd)| (id, fd.as_raw_fd()));
        let Opened {
            fd: dup, handle, ..
        } = sets.dup_member(added.fd).unwrap();
        let missing = sets.dup_member(-1).unwrap_err();

        assert_eq!(found, Some((6, added.fd)));
        assert_ne!(dup.as_raw_fd(), added.fd);
        assert_eq!(handle.fdset_id(), 6);
        assert!(matches!(missing, FdSetError::NotAMember { fd: -1 }));
    }

    #[test]
    fn dup_member_keeps_the_set_listed() {
        let image = Image::new();
        let mut sets = FdSets::new();
        let added = sets.add(image.open(RDONLY), Some(6), None).unwrap();
        let Opened {
            fd: _dup, handle, ..
        } = sets.dup_member(added.fd).unwrap();

        sets.remove(6, None).unwrap();
        let listed = sets.query().len();
        drop(handle);

        assert_eq!(listed, 1);
        assert_eq!(sets.query(), []);
    }

    #[test]
    fn add_beyond_fds_per_set_bound_fails_and_closes_the_fd() {
        let image = Image::new();
        let mut sets = FdSets::new();
        for _ in 0..MAX_FDS_PER_SET {
            sets.add(image.open(RDONLY), Some(0), None).unwrap();
        }
        let (mut probe, write) = CloseProbe::new();
        let raw = write.as_raw_fd();

        let err = sets.add(write, Some(0), None).unwrap_err();

        assert!(matches!(
            err,
            FdSetError::TooManyFds { fdset_id: 0, fd, limit: MAX_FDS_PER_SET } if fd == raw
        ));
        assert!(probe.all_writers_closed());
        assert_eq!(sets.len_fds(), MAX_FDS_PER_SET);
    }

    /// Raises the soft RLIMIT_NOFILE so a bound test can hold `fds` fds besides the others.
    fn allow_open_fds(fds: u64) {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let want = fds + 1024;
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert!(
            hard >= want,
            "RLIMIT_NOFILE hard limit {hard} is below the {want} this test needs"
        );
        if soft < want {
            setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
        }
    }

    #[test]
    fn add_beyond_set_count_bound_fails_but_existing_set_still_takes_fds() {
        allow_open_fds(2 * MAX_FD_SETS as u64);
        let (_probe, write) = CloseProbe::new();
        let mut sets = FdSets::new();
        for _ in 0..MAX_FD_SETS {
            sets.add(dup_cloexec(0, write.as_fd()).unwrap(), None, None)
                .unwrap();
        }

        let new_set = sets.add(dup_cloexec(0, write.as_fd()).unwrap(), None, None);
        let existing = sets.add(dup_cloexec(0, write.as_fd()).unwrap(), Some(0), None);

        assert!(matches!(
            new_set,
            Err(FdSetError::TooManySets {
                limit: MAX_FD_SETS,
                ..
            })
        ));
        assert!(existing.is_ok());
        assert_eq!(sets.len_fds(), MAX_FD_SETS + 1);
    }

    #[test]
    fn add_with_id_above_int64_fails() {
        let (probe, write) = CloseProbe::new();
        let mut sets = FdSets::new();

        let err = sets.add(write, Some(MAX_FDSET_ID + 1), None).unwrap_err();
        let max = sets.add(probe.read.into(), Some(MAX_FDSET_ID), None);

        assert!(matches!(err, FdSetError::IdOutOfRange { .. }));
        assert_eq!(max.unwrap().fdset_id, MAX_FDSET_ID);
    }

    #[test]
    fn named_fd_refuses_a_leading_digit_with_qemu_text() {
        let (mut probe, write) = CloseProbe::new();
        let mut named = NamedFds::new();

        let err = named.insert("1abc".into(), write).unwrap_err();

        assert_eq!(
            err.to_string(),
            "Parameter 'fdname' expects a name not starting with a digit"
        );
        assert!(probe.all_writers_closed());
        assert!(named.is_empty());
    }

    #[test]
    fn named_fd_insert_replaces_and_closes_the_old_one() {
        let (mut old_probe, old) = CloseProbe::new();
        let (mut new_probe, new) = CloseProbe::new();
        let mut named = NamedFds::new();
        named.insert("disk".into(), old).unwrap();

        named.insert("disk".into(), new).unwrap();

        assert!(old_probe.all_writers_closed());
        assert!(!new_probe.all_writers_closed());
        assert_eq!(named.len(), 1);
    }

    #[test]
    fn named_fd_close_and_take() {
        let (mut probe, write) = CloseProbe::new();
        let (_probe2, write2) = CloseProbe::new();
        let mut named = NamedFds::new();
        named.insert("a".into(), write).unwrap();
        named.insert("b".into(), write2).unwrap();

        named.close("a").unwrap();
        let missing = named.close("a").unwrap_err();
        let taken = named.take("b");

        assert!(probe.all_writers_closed());
        assert_eq!(missing.to_string(), "File descriptor named 'a' not found");
        assert!(taken.is_some());
        assert!(named.take("b").is_none());
    }

    #[test]
    fn named_fds_are_bounded_but_replacing_at_the_bound_works() {
        allow_open_fds(2 * MAX_NAMED_FDS as u64);
        let (_probe, write) = CloseProbe::new();
        let mut named = NamedFds::new();
        for i in 0..MAX_NAMED_FDS {
            named
                .insert(format!("fd{i}"), dup_cloexec(0, write.as_fd()).unwrap())
                .unwrap();
        }

        let over = named.insert("one-more".into(), dup_cloexec(0, write.as_fd()).unwrap());
        let replace = named.insert("fd0".into(), dup_cloexec(0, write.as_fd()).unwrap());

        assert!(matches!(
            over,
            Err(NamedFdError::TooMany {
                limit: MAX_NAMED_FDS,
                ..
            })
        ));
        assert!(replace.is_ok());
        assert_eq!(named.len(), MAX_NAMED_FDS);
    }
}
