//! Step 2: new mount, network, IPC and UTS namespaces, and an empty root.
//!
//! As root the namespaces are created directly; unprivileged, a user namespace comes first,
//! mapping vublk's own uid and gid only (so its own files keep their owner; every other uid,
//! a peer's included, then reads as the overflow uid 65534, which is why `--vmm-uid` needs a
//! vublk started as root). The
//! new root is an empty, read-only tmpfs entered with pivot_root: no path outside it can be
//! named again. The network namespace has only a downed loopback, so even a socket() that got
//! past seccomp reaches nothing. Fds opened before keep working: they do not depend on paths.

use std::ffi::CStr;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chdir, getegid, geteuid, pivot_root};

use super::{SandboxError, StepOutcome};

const ROOT_FS_OPTIONS: &CStr = c"size=4k,nr_inodes=8,mode=0555";

fn failed(step: &'static str) -> impl Fn(nix::Error) -> SandboxError {
    move |e| SandboxError::Failed {
        step,
        source: std::io::Error::from(e),
    }
}

/// Writes the user namespace's one-to-one map of vublk's own uid and gid.
fn map_own_ids(uid: u32, gid: u32) -> std::io::Result<()> {
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    Ok(())
}

pub fn apply() -> Result<StepOutcome, SandboxError> {
    let mut made = Vec::new();
    if !geteuid().is_root() {
        let (uid, gid) = (geteuid().as_raw(), getegid().as_raw());
        if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER) {
            return Ok(StepOutcome::Unavailable(format!(
                "unprivileged, and no user namespace can be created ({e}); mount, network, IPC and UTS namespaces need one"
            )));
        }
        map_own_ids(uid, gid).map_err(|source| SandboxError::Failed {
            step: "namespaces",
            source,
        })?;
        made.push("user");
    }
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if let Err(e) = unshare(flags) {
        return Ok(StepOutcome::Unavailable(format!(
            "cannot create mount, network, IPC and UTS namespaces ({e})"
        )));
    }
    made.extend(["mount", "network", "IPC", "UTS"]);
    let _ = nix::unistd::sethostname("vublk");
    empty_root()?;
    Ok(StepOutcome::Applied(format!(
        "{} namespaces; root is an empty read-only tmpfs",
        made.join(", ")
    )))
}

/// A directory every Linux system has, over which the new root is mounted (in the private
/// mount namespace only). Mounting over "/" itself would not do: looking up "/" does not cross
/// a mount stacked on the root.
const STAGING_DIR: &str = "/proc";

/// Replaces the root with an empty tmpfs: mounted over [`STAGING_DIR`], entered, pivoted onto
/// itself, the old root detached, then made read-only.
fn empty_root() -> Result<(), SandboxError> {
    let err = failed("namespaces");
    // Nothing done here may propagate back to the host's mounts.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(&err)?;
    let fs_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("vublk"),
        STAGING_DIR,
        Some("tmpfs"),
        fs_flags,
        Some(ROOT_FS_OPTIONS),
    )
    .map_err(&err)?;
    // pivot_root(".", ".") stacks the old root on the tmpfs, and the detach removes it.
    chdir(STAGING_DIR).map_err(&err)?;
    pivot_root(".", ".").map_err(&err)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(&err)?;
    chdir("/").map_err(&err)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | fs_flags,
        None::<&str>,
    )
    .map_err(&err)?;
    Ok(())
}
