//! Step 5: seccomp allowlists, one per thread role.
//!
//! [`apply_process_filter`] installs, on the still single-threaded main thread, the union of
//! every role's allowlist (other syscalls fail with EPERM, so `openat`, `socket`, `connect`
//! and friends are refused), a filter answering `clone3` with ENOSYS (glibc then starts threads
//! with `clone`, whose flags a filter can check: only CLONE_THREAD is allowed), and one that
//! kills the process on `execve`, `ptrace` and `process_vm_*`. Every thread inherits them.
//! Each thread then calls [`enter`] with its role, which stacks its own, narrower allowlist.
//! Filters are inherited by the threads a thread starts, so a role that starts threads also
//! allows what they need: the vhost-user thread starts queue workers, the control thread
//! starts metadata threads for new media.
//!
//! `mmap` and `mprotect` are allowed only without PROT_EXEC, and `prctl` only for naming a
//! thread and for installing these filters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{SandboxError, StepOutcome};

/// `BLKGETSIZE64` (`_IOR(0x12, 114, size_t)`), which libc does not name.
const BLKGETSIZE64: u64 = 0x8008_1272;

/// Set once the process filter is installed: threads then install their role's filter.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// What a thread does, which decides the syscalls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Setup, then waiting for SIGTERM/SIGINT or `quit`; flushes on exit.
    Main,
    /// The vhost-user message loop; starts the queue workers of each connection.
    VhostUser,
    /// A queue worker: its io_uring, eventfds, guest memory.
    Worker,
    /// The QMP server; opens new media (starting their metadata threads) and resizes.
    Control,
    /// A writable qcow2 medium's metadata thread.
    Meta,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Main,
        Role::VhostUser,
        Role::Worker,
        Role::Control,
        Role::Meta,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::VhostUser => "vhost-user",
            Role::Worker => "worker",
            Role::Control => "control",
            Role::Meta => "meta",
        }
    }

    /// The names of the threads that run this role (`vublk-q*` for workers).
    pub fn thread_names(self) -> &'static str {
        match self {
            Role::Main => "vublk",
            Role::VhostUser => "vublk-vhost-user",
            Role::Worker => "vublk-q*",
            Role::Control => "vublk-control",
            Role::Meta => "vublk-meta",
        }
    }

    /// The syscalls of this role's own code, without those of the threads it starts.
    fn own(self) -> &'static [Syscall] {
        match self {
            Role::Main => MAIN,
            Role::VhostUser => VHOST_USER,
            Role::Worker => WORKER,
            Role::Control => CONTROL,
            Role::Meta => META,
        }
    }

    /// The roles of the threads this role starts.
    fn children(self) -> &'static [Role] {
        match self {
            Role::VhostUser => &[Role::Worker],
            Role::Control => &[Role::Meta],
            Role::Main | Role::Worker | Role::Meta => &[],
        }
    }

    /// Every syscall a thread of this role may make: its own, its children's and the common.
    pub fn allowlist(self) -> Vec<Syscall> {
        let mut all: Vec<Syscall> = COMMON.to_vec();
        all.extend_from_slice(self.own());
        for child in self.children() {
            all.extend(child.allowlist());
        }
        all.sort_by_key(|s| s.name);
        all.dedup_by_key(|s| s.name);
        all
    }
}

/// One allowed syscall, with an optional argument constraint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syscall {
    pub name: &'static str,
    nr: i64,
    only: Only,
}

/// Argument constraints the filters check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Only {
    Any,
    /// `clone` starting a thread (CLONE_THREAD set in the flags).
    Thread,
    /// `mmap`/`mprotect` without PROT_EXEC (argument 2).
    NoExec,
    /// `prctl` with PR_SET_NAME or PR_SET_NO_NEW_PRIVS.
    NameOrNoNewPrivs,
    /// `ioctl` with FIONBIO (std's `set_nonblocking`).
    Fionbio,
    /// `ioctl` with FIONBIO, or BLKGETSIZE64 (the size of a block device given as a new
    /// medium).
    FionbioOrBlockSize,
}

/// `stringify!(SYS_read)` without its `SYS_` prefix.
const fn syscall_name(constant: &'static str) -> &'static str {
    constant.split_at(4).1
}

macro_rules! sys {
    ($nr:ident) => {
        Syscall {
            name: syscall_name(stringify!($nr)),
            nr: libc::$nr,
            only: Only::Any,
        }
    };
    ($nr:ident, $only:expr) => {
        Syscall {
            name: syscall_name(stringify!($nr)),
            nr: libc::$nr,
            only: $only,
        }
    };
}

/// Every thread: memory, locks, signal masks, logging to stderr, naming itself and installing
/// its role filter. (What only some roles need is in their lists, even where several share it:
/// the test `tests/tests/seccomp_allowlist.rs` checks each role uses what its list holds.)
const COMMON: &[Syscall] = &[
    sys!(SYS_write),                         // stderr log lines, eventfd pokes
    sys!(SYS_close),                         // dropping fds
    sys!(SYS_futex),                         // Mutex, Condvar, channels, thread join
    sys!(SYS_mmap, Only::NoExec),            // allocator, thread stacks, guest memory regions
    sys!(SYS_munmap),                        // allocator, a thread's signal stack when it ends
    sys!(SYS_mprotect, Only::NoExec),        // thread stack guard pages, allocator arenas
    sys!(SYS_madvise),                       // allocator returning memory, an ended thread's stack
    sys!(SYS_rt_sigprocmask),                // thread start and end mask signals
    sys!(SYS_sigaltstack),                   // Rust's stack overflow handler, per thread
    sys!(SYS_clock_gettime), // Instant::now, log timestamps (when the vDSO is not used)
    sys!(SYS_restart_syscall), // a wait interrupted by SIGSTOP/SIGCONT resumes
    sys!(SYS_prctl, Only::NameOrNoNewPrivs), // thread names; installing the role filter
    sys!(SYS_seccomp),       // installing the role filter
    // The crash paths: Rust's SIGSEGV/SIGBUS handler puts the default action back and returns
    // so the fault kills the process (instead of looping in the handler), and abort() raises
    // SIGABRT at the calling thread.
    sys!(SYS_rt_sigaction),
    sys!(SYS_rt_sigreturn),
    sys!(SYS_getpid),
    sys!(SYS_tgkill),
];

/// The main thread after setup (it starts the other threads before narrowing its filter).
const MAIN: &[Syscall] = &[
    sys!(SYS_poll),                // waiting for a signal or quit
    sys!(SYS_read),                // the signalfd
    sys!(SYS_shutdown),            // ending the vhost-user connection on SIGTERM
    sys!(SYS_fdatasync),           // flushing the medium on exit
    sys!(SYS_fcntl),               // std's debug-build check that an fd is open before closing it
    sys!(SYS_brk),                 // the allocator trimming its main heap (the disk freed on exit)
    sys!(SYS_exit_group),          // the process ends
    sys!(SYS_clone, Only::Thread), // the vhost-user, control and first metadata threads
];

/// The vhost-user thread.
const VHOST_USER: &[Syscall] = &[
    sys!(SYS_recvmsg),              // vhost-user messages with fds
    sys!(SYS_sendmsg),              // replies
    sys!(SYS_recvfrom),             // peeking at the next message
    sys!(SYS_accept4),              // the next frontend
    sys!(SYS_poll),                 // waiting for a frontend or shutdown
    sys!(SYS_getsockopt),           // SO_PEERCRED
    sys!(SYS_setsockopt),           // backend channel timeouts
    sys!(SYS_shutdown),             // a connection accepted while shutdown was being requested
    sys!(SYS_ioctl, Only::Fionbio), // set_nonblocking on the listener and connections
    sys!(SYS_fcntl),                // try_clone (F_DUPFD_CLOEXEC); std's debug check before close
    sys!(SYS_statx),                // checking the socket file is still vublk's before removing it
    sys!(SYS_eventfd2),             // each queue's wake eventfd
    sys!(SYS_memfd_create),         // the inflight region (GET_INFLIGHT_FD)
    sys!(SYS_ftruncate),            // sizing it
    sys!(SYS_sched_yield), // std's sync_channel backing off (a worker reporting it started)
    sys!(SYS_clone, Only::Thread), // queue workers
    sys!(SYS_rseq),        // glibc registers a new thread
    sys!(SYS_set_robust_list), // glibc, a new thread
    sys!(SYS_sched_getaffinity), // glibc, a new thread's attributes
    sys!(SYS_gettid),      // Rust's thread start
    sys!(SYS_exit),        // the thread ends
];

/// A queue worker.
const WORKER: &[Syscall] = &[
    sys!(SYS_io_uring_setup), // its ring, restricted before it is enabled
    sys!(SYS_io_uring_enter),
    sys!(SYS_io_uring_register), // restrictions, fixed files, enabling
    sys!(SYS_preadv),            // O_NONBLOCK fds whose I/O io_uring answered EAGAIN
    sys!(SYS_pwritev2),          // the same for writes (RWF_DSYNC for writethrough)
    sys!(SYS_fcntl),             // std's debug-build check that an fd is open before closing it
    sys!(SYS_brk),               // the allocator trimming its main heap after a free here
    sys!(SYS_getrandom),         // HashMap seeds
    sys!(SYS_clock_nanosleep),   // backing off after an io_uring_enter failure
    sys!(SYS_sched_yield),       // std's channels backing off (jobs for the metadata thread)
    sys!(SYS_rseq),              // glibc registers a new thread
    sys!(SYS_set_robust_list),   // glibc, a new thread
    sys!(SYS_sched_getaffinity), // glibc, a new thread's attributes
    sys!(SYS_gettid),            // Rust's thread start
    sys!(SYS_exit),              // the thread ends
];

/// The control thread.
const CONTROL: &[Syscall] = &[
    sys!(SYS_poll), // clients, listener, events, shutdown
    sys!(SYS_accept4),
    sys!(SYS_recvmsg),                         // commands with fds
    sys!(SYS_sendto),                          // replies and events; the backend channel
    sys!(SYS_recvfrom),                        // backend channel replies
    sys!(SYS_read),                            // the event queue's eventfd
    sys!(SYS_shutdown),                        // ending the vhost-user connection on quit
    sys!(SYS_ioctl, Only::FionbioOrBlockSize), // set_nonblocking; a block device medium's size
    sys!(SYS_fcntl),                           // F_GETFL of passed fds, F_DUPFD_CLOEXEC for fd sets
    sys!(SYS_newfstatat),                      // fstat of passed fds (through glibc)
    sys!(SYS_statx), // checking the socket file is still vublk's before removing it
    sys!(SYS_ftruncate), // block_resize of a raw medium
    sys!(SYS_fdatasync), // flushing a medium before a change
    sys!(SYS_fallocate), // punching freed clusters in qcow2 resize
    sys!(SYS_pread64), // qcow2 resize: header, tables
    sys!(SYS_pwrite64),
    sys!(SYS_getrandom),           // HashMap seeds
    sys!(SYS_clock_nanosleep),     // backing off after a poll failure
    sys!(SYS_clone, Only::Thread), // metadata threads of new media
    #[cfg(feature = "sandbox-probe")]
    sys!(SYS_io_uring_register), // x-sandbox-probe's restricted queue ring (test builds only)
    sys!(SYS_rseq),                // glibc registers a new thread
    sys!(SYS_set_robust_list),     // glibc, a new thread
    sys!(SYS_sched_getaffinity),   // glibc, a new thread's attributes
    sys!(SYS_gettid),              // Rust's thread start
    sys!(SYS_exit),                // the thread ends
];

/// A metadata thread.
const META: &[Syscall] = &[
    sys!(SYS_pread64),
    sys!(SYS_pwrite64),
    sys!(SYS_fdatasync),
    sys!(SYS_fallocate),      // punching freed clusters, zeroing ranges
    sys!(SYS_ftruncate),      // growing the file
    sys!(SYS_newfstatat),     // the file's size (fstat through glibc)
    sys!(SYS_io_uring_setup), // its batch ring
    sys!(SYS_io_uring_enter),
    sys!(SYS_getrandom),         // HashMap seeds
    sys!(SYS_clock_nanosleep),   // backing off after a batch ring failure
    sys!(SYS_sched_yield),       // std's channels backing off (the job queue)
    sys!(SYS_rseq),              // glibc registers a new thread
    sys!(SYS_set_robust_list),   // glibc, a new thread
    sys!(SYS_sched_getaffinity), // glibc, a new thread's attributes
    sys!(SYS_gettid),            // Rust's thread start
    sys!(SYS_exit),              // the thread ends
];

/// The syscalls killed outright: running code, or reading another process.
const KILLED: &[Syscall] = &[
    sys!(SYS_execve),
    sys!(SYS_execveat),
    sys!(SYS_ptrace),
    sys!(SYS_process_vm_readv),
    sys!(SYS_process_vm_writev),
];

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
}

fn rules_for(s: &Syscall) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let cond = |arg, op, value| SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value);
    Ok(match s.only {
        Only::Any => Vec::new(),
        Only::Thread => vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
        Only::NoExec => vec![SeccompRule::new(vec![cond(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?],
        Only::Fionbio => vec![SeccompRule::new(vec![cond(
            1,
            SeccompCmpOp::Eq,
            libc::FIONBIO,
        )?])?],
        Only::FionbioOrBlockSize => vec![
            SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, libc::FIONBIO)?])?,
            SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, BLKGETSIZE64)?])?,
        ],
        Only::NameOrNoNewPrivs => vec![
            SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])?,
            SeccompRule::new(vec![cond(
                0,
                SeccompCmpOp::Eq,
                libc::PR_SET_NO_NEW_PRIVS as u64,
            )?])?,
        ],
    })
}

fn compile(
    syscalls: &[Syscall],
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for s in syscalls {
        let r = rules_for(s).map_err(|e| format!("{}: {e}", s.name))?;
        rules.entry(s.nr).or_default().extend(r);
    }
    let filter = SeccompFilter::new(rules, mismatch, matched, arch()).map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// The allowlist (EPERM for the rest) plus the clone3 and kill filters.
fn install(allowed: &[Syscall]) -> Result<(), String> {
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let allow = compile(allowed, eperm, SeccompAction::Allow)?;
    let clone3 = compile(
        &[sys!(SYS_clone3)],
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    let kill = compile(KILLED, SeccompAction::Allow, SeccompAction::KillProcess)?;
    for program in [&allow, &clone3, &kill] {
        seccompiler::apply_filter(program).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Installs the process-wide filter (the union of every role) on the calling thread, which
/// must be the only one.
pub fn apply_process_filter() -> Result<StepOutcome, SandboxError> {
    let mut all: Vec<Syscall> = Role::ALL.iter().flat_map(|r| r.allowlist()).collect();
    all.sort_by_key(|s| s.name);
    all.dedup_by_key(|s| s.name);
    install(&all).map_err(|e| SandboxError::Failed {
        step: "seccomp",
        source: std::io::Error::other(e),
    })?;
    ACTIVE.store(true, Ordering::Release);
    let counts: Vec<String> = Role::ALL
        .iter()
        .map(|r| format!("{} {}", r.name(), r.allowlist().len()))
        .collect();
    Ok(StepOutcome::Applied(format!(
        "{} syscalls allowed process-wide; per role: {}",
        all.len(),
        counts.join(", ")
    )))
}

/// Every role's allowlist as JSON (`vublk x-seccomp-allowlist`), for reviewing and for the
/// test that checks the lists against the syscalls a workload makes: role name -> syscall
/// names, plus which thread names run each role.
pub fn allowlists_json() -> serde_json::Value {
    let mut roles = serde_json::Map::new();
    for role in Role::ALL {
        let names: Vec<&str> = role.allowlist().iter().map(|s| s.name).collect();
        let own: Vec<&str> = role.own().iter().chain(COMMON).map(|s| s.name).collect();
        roles.insert(
            role.name().to_string(),
            serde_json::json!({
                "threads": role.thread_names(),
                "allowed": names,
                "own": own,
                "children": role.children().iter().map(|c| c.name()).collect::<Vec<_>>(),
            }),
        );
    }
    serde_json::Value::Object(roles)
}

/// Narrows the calling thread's filter to `role` (when the process is confined). A failure is
/// logged: the process-wide filter still holds.
pub fn enter(role: Role) {
    if !ACTIVE.load(Ordering::Acquire) {
        return;
    }
    if let Err(e) = install(&role.allowlist()) {
        log::error!(
            "sandbox: cannot install the {} seccomp filter: {e}",
            role.name()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_and_spawners_include_their_children() {
        for role in Role::ALL {
            let list = role.allowlist();
            compile(&list, SeccompAction::Errno(1), SeccompAction::Allow).expect("compiles");
            for child in role.children() {
                for s in child.allowlist() {
                    assert!(list.contains(&s), "{} lacks {}", role.name(), s.name);
                }
            }
        }
    }

    #[test]
    fn the_forbidden_calls_are_in_no_allowlist() {
        for role in Role::ALL {
            let names: Vec<_> = role.allowlist().iter().map(|s| s.name).collect();
            for bad in [
                "open", "openat", "openat2", "socket", "connect", "execve", "execveat", "ptrace",
                "bind", "listen", "unshare", "mount", "kill",
            ] {
                assert!(!names.contains(&bad), "{} allows {bad}", role.name());
            }
        }
    }

    #[test]
    fn workers_cannot_accept_or_clone() {
        let names: Vec<_> = Role::Worker.allowlist().iter().map(|s| s.name).collect();
        for s in ["accept4", "clone", "recvmsg", "ftruncate"] {
            assert!(!names.contains(&s), "worker allows {s}");
        }
    }
}
