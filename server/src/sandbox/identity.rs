//! Step 3: who vublk is and what it may still become.
//!
//! In order: rlimits (raising NOFILE may need a capability still held), the capability
//! bounding set (needs CAP_SETPCAP, so before the identity changes), the `--user` identity,
//! then every capability (permitted, effective, inheritable, ambient), no_new_privs, and not
//! dumpable (a VMM running as the same uid cannot ptrace vublk or pidfd_getfd its image fds;
//! set last, as an identity change resets it).

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{geteuid, setgroups, setresgid, setresuid, Gid, Uid};

use super::{SandboxError, StepOutcome};
use crate::config::User;

/// Open fds: 509 guest memory regions (QEMU's vhost-user slot limit), a chain of 17 image
/// fds twice over during a medium change, fd set members, sockets and eventfds, with room.
const NOFILE_LIMIT: u64 = 2048;
/// Threads beyond those the uid already runs: each VMM connection starts one per queue (at
/// most 16), plus the metadata threads of old and new media during a change.
const NPROC_HEADROOM: u64 = 256;

fn io_failed(step: &'static str) -> impl Fn(nix::Error) -> SandboxError {
    move |e| SandboxError::Failed {
        step,
        source: std::io::Error::from(e),
    }
}

/// RLIMIT_NPROC counts every task of the uid system-wide: count them (before /proc goes).
pub fn nproc_limit(user: Option<User>) -> Option<u64> {
    let uid = user.map_or_else(|| nix::unistd::getuid().as_raw(), |u| u.uid);
    let mut tasks = 0u64;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        if field("Uid:") == Some(u64::from(uid)) {
            tasks += field("Threads:").unwrap_or(1);
        }
    }
    Some(tasks + NPROC_HEADROOM)
}

pub fn set_limits(nproc: Option<u64>) -> Result<StepOutcome, SandboxError> {
    let err = io_failed("rlimits");
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(&err)?;
    let nofile = NOFILE_LIMIT.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, nofile, nofile).map_err(&err)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(&err)?;
    let mut what = format!("NOFILE {nofile}, CORE 0");
    if let Some(n) = nproc {
        setrlimit(Resource::RLIMIT_NPROC, n, n).map_err(&err)?;
        what.push_str(&format!(", NPROC {n}"));
    }
    Ok(StepOutcome::Applied(what))
}

/// Drops every capability from the bounding set, so none can come back through exec or a
/// file capability.
pub fn drop_bounding_set() -> Result<StepOutcome, SandboxError> {
    let mut dropped = 0;
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_READ only reads the calling thread's bounding set.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if present < 0 {
            break; // past the last capability this kernel knows
        }
        if present == 0 {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP changes only the calling thread's bounding set.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Ok(StepOutcome::Unavailable(format!(
                "cannot drop capability {cap} from the bounding set ({})",
                std::io::Error::last_os_error()
            )));
        }
        dropped += 1;
    }
    Ok(StepOutcome::Applied(format!(
        "{dropped} capabilities dropped from the bounding set"
    )))
}

pub fn drop_identity(user: Option<User>) -> Result<StepOutcome, SandboxError> {
    let Some(user) = user else {
        return Ok(StepOutcome::Applied(format!(
            "kept uid {} (no --user)",
            geteuid()
        )));
    };
    if geteuid().as_raw() == user.uid {
        return Ok(StepOutcome::Applied(format!(
            "already uid {} (--user)",
            user.uid
        )));
    }
    if !geteuid().is_root() {
        return Ok(StepOutcome::Unavailable(format!(
            "--user {}:{} needs vublk to start as root; it runs as uid {}",
            user.uid,
            user.gid,
            geteuid()
        )));
    }
    let err = io_failed("identity");
    let gid = Gid::from_raw(user.gid);
    let uid = Uid::from_raw(user.uid);
    setgroups(&[gid]).map_err(&err)?;
    setresgid(gid, gid, gid).map_err(&err)?;
    setresuid(uid, uid, uid).map_err(&err)?;
    Ok(StepOutcome::Applied(format!(
        "now uid {} gid {}",
        user.uid, user.gid
    )))
}

/// The capset(2) header and data, version 3 (two 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

pub fn drop_capabilities() -> Result<StepOutcome, SandboxError> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL only clears the calling thread's ambient set.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two data structs, which live on this stack frame
    // for the duration of the call; pid 0 is the calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            std::ptr::addr_of_mut!(header),
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(SandboxError::Failed {
            step: "capabilities",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(StepOutcome::Applied(
        "permitted, effective, inheritable and ambient sets empty".into(),
    ))
}

pub fn no_new_privs() -> Result<StepOutcome, SandboxError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes no pointers and only affects this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::Failed {
            step: "no_new_privs",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(StepOutcome::Applied("set".into()))
}

pub fn not_dumpable() -> Result<StepOutcome, SandboxError> {
    // SAFETY: PR_SET_DUMPABLE takes no pointers and only affects this process.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(SandboxError::Failed {
            step: "not dumpable",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(StepOutcome::Applied(
        "no ptrace or pidfd_getfd by processes of the same uid".into(),
    ))
}
