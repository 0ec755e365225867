//! No fd leaks, counted in /proc/self/fd.
//!
//! Every test here holds `SERIAL` for its whole run: the count covers the whole process, so no
//! other test of this binary may open or close fds meanwhile (the unit tests, which run in
//! parallel, prove closing with pipe EOFs instead).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup should panic"
)]

use std::fs::OpenOptions;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, MutexGuard};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use vublk_fdset::{recv_with_fds, AccessMode, FdSets, NamedFds, Need, Opened};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn open(path: &std::path::Path, need: Need) -> OwnedFd {
    let mut options = OpenOptions::new();
    match need.access {
        AccessMode::ReadOnly => options.read(true),
        AccessMode::WriteOnly => options.write(true),
        AccessMode::ReadWrite => options.read(true).write(true),
    };
    if need.direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path).unwrap().into()
}

const RO: Need = Need {
    access: AccessMode::ReadOnly,
    direct: false,
};
const RW: Need = Need {
    access: AccessMode::ReadWrite,
    direct: false,
};
const RW_DIRECT: Need = Need {
    access: AccessMode::ReadWrite,
    direct: true,
};

fn send(sock: &OwnedFd, bytes: &[u8], fds: &[RawFd]) {
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

#[test]
fn fd_sets_hold_what_they_count_and_close_it_all() {
    let _serial = serial();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("image");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let before = open_fds();
    let mut sets = FdSets::new();
    let mut named = NamedFds::new();

    sets.add(open(&path, RO), Some(0), None).unwrap();
    sets.add(open(&path, RW), Some(0), None).unwrap();
    sets.add(open(&path, RW_DIRECT), Some(0), None).unwrap();
    let other = sets.add(open(&path, RW), None, None).unwrap();
    named.insert("a".into(), open(&path, RO)).unwrap();
    named.insert("a".into(), open(&path, RO)).unwrap();
    let held = open_fds() - before;
    let Opened {
        fd: dup, handle, ..
    } = sets.open(0, RW_DIRECT).unwrap();
    let with_dup = open_fds() - before;
    sets.remove(0, None).unwrap();
    sets.remove(other.fdset_id, Some(other.fd)).unwrap();
    let after_remove = open_fds() - before;
    drop((dup, handle));
    let listed = sets.query();
    named.close("a").unwrap();

    assert_eq!(
        held, 5,
        "four set members, one named fd (the first 'a' was closed)"
    );
    assert_eq!(with_dup, 6);
    assert_eq!(after_remove, 2, "the dup and the named fd are left");
    assert!(listed.is_empty());
    assert_eq!((sets.len_fds(), named.len()), (0, 0));
    assert_eq!(open_fds(), before);
}

#[test]
fn received_fds_are_all_closed_when_dropped() {
    let _serial = serial();
    let (tx, rx) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let before = open_fds();
    send(&tx, b" ", &vec![tx.as_raw_fd(); 200]);
    let mut buf = [0u8; 8];

    let got = recv_with_fds(rx.as_fd(), &mut buf).unwrap();
    let while_held = open_fds() - before;
    drop(got);

    assert_eq!(while_held, 200);
    assert_eq!(open_fds(), before);
}

/// Near RLIMIT_NOFILE the kernel installs what it can and sets MSG_CTRUNC: a real truncation
/// with the full-size control buffer.
#[test]
fn truncation_at_the_fd_limit_closes_what_arrived() {
    let _serial = serial();
    let (tx, rx) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    send(&tx, b"{}", &[tx.as_raw_fd(); 5]);
    let mut buf = [0u8; 8];
    let before = open_fds();
    // The limit caps fd numbers and new fds take the lowest free ones: two placeholders find
    // the two lowest free numbers; with the limit just above the second, exactly two of the
    // five fit.
    let first = std::fs::File::open("/dev/null").unwrap();
    let second = std::fs::File::open("/dev/null").unwrap();
    let limit = u64::try_from(second.as_raw_fd()).unwrap() + 1;
    drop((first, second));
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, limit, hard).unwrap();

    let got = recv_with_fds(rx.as_fd(), &mut buf);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    let got = got.unwrap();

    assert_eq!(&buf[..got.bytes], b"{}");
    assert!(got.fds.is_empty());
    assert_eq!(got.truncated.map(|t| t.fds_closed), Some(2));
    assert_eq!(open_fds(), before);
}
