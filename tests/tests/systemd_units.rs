//! The shipped systemd units and vhost-user backend descriptor (`systemd/`), checked with
//! systemd's own tools: `systemd-analyze security --offline=yes` rates the service's exposure at
//! 1.0 or less, `systemd-analyze verify` accepts both units, the service's system call filter
//! (expanded with `systemd-analyze syscall-filter`, in systemd's order semantics) still allows
//! every call vublk's own sandbox makes and denies the ones it must never need, the socket unit
//! hands vublk the control socket as fd 3 and the vhost-user socket as fd 4, and the descriptor
//! is a `block` backend naming the binary the service runs.
//!
//! Without `systemd-analyze` the checks that need it say SKIPPED on stderr (uncaptured) and
//! return; the checks of the files' text and of the descriptor run anyway.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failure is the test failing"
)]

use std::collections::BTreeSet;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The highest exposure the service may be rated (the target).
const MAX_EXPOSURE: f64 = 1.0;

/// Where the units, the descriptor and their README live.
fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn service_path() -> PathBuf {
    systemd_dir().join("vublk@.service")
}

fn socket_path() -> PathBuf {
    systemd_dir().join("vublk@.socket")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The `Key=value` settings of a unit file in file order (comments and section headers left out;
/// the units use no line continuations).
fn settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter(|l| !l.starts_with('['))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not a setting: {l}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

fn values<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The one value of `key`; a key given twice would make a reader guess which one counts.
fn single<'a>(settings: &'a [(String, String)], key: &str) -> &'a str {
    match values(settings, key).as_slice() {
        [v] => v,
        other => panic!("{key}= should be set exactly once, found {other:?}"),
    }
}

/// Runs `systemd-analyze ARGS`, or returns `None` (after saying SKIPPED) when it is not
/// installed.
fn systemd_analyze(args: &[&str], test: &str) -> Option<Output> {
    match Command::new("systemd-analyze")
        .args(args)
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .output()
    {
        Ok(out) => Some(out),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // Straight to the process's stderr, past libtest's capture of eprintln!, so that a
            // skip is seen in a passing run too.
            let note =
                format!("SKIPPED {test}: systemd-analyze is not installed (package systemd)\n");
            let _ = std::io::stderr().write_all(note.as_bytes());
            None
        }
        Err(e) => panic!("running systemd-analyze {args:?}: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The number after "Overall exposure level for UNIT:" in `systemd-analyze security` output.
fn overall_exposure(output: &str) -> f64 {
    let line = output
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{output}"));
    let (_, rating) = line.rsplit_once(": ").unwrap();
    let number = rating.split_whitespace().next().unwrap();
    number
        .parse()
        .unwrap_or_else(|e| panic!("exposure {number:?} in {line:?}: {e}"))
}

#[test]
fn service_exposure_is_at_most_1_0() {
    let service = service_path();
    let Some(out) = systemd_analyze(
        &["security", "--offline=yes", service.to_str().unwrap()],
        "service_exposure_is_at_most_1_0",
    ) else {
        return;
    };
    let output = text(&out);
    assert!(
        out.status.success(),
        "systemd-analyze security failed:\n{output}"
    );
    let exposure = overall_exposure(&output);
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} is above {MAX_EXPOSURE:.1}:\n{output}"
    );
}

#[test]
fn units_pass_systemd_analyze_verify() {
    // An instance (VM "vm1") of each template, side by side, as systemd would load them.
    let dir = tempfile::tempdir().unwrap();
    let service = dir.path().join("vublk@vm1.service");
    let socket = dir.path().join("vublk@vm1.socket");
    std::fs::copy(service_path(), &service).unwrap();
    std::fs::copy(socket_path(), &socket).unwrap();
    let Some(out) = systemd_analyze(
        &[
            "verify",
            "--man=no",
            service.to_str().unwrap(),
            socket.to_str().unwrap(),
        ],
        "units_pass_systemd_analyze_verify",
    ) else {
        return;
    };
    let output = text(&out);
    // The one complaint tolerated: the binary is not installed on this machine.
    let binary = exec_binary();
    let missing = format!("Command {binary} is not executable: No such file or directory");
    let tolerated = |l: &str| !Path::new(&binary).exists() && l.ends_with(&missing);
    let other: Vec<&str> = output
        .lines()
        .filter(|l| !l.trim().is_empty() && !tolerated(l))
        .collect();
    assert!(
        other.is_empty(),
        "systemd-analyze verify complains:\n{output}"
    );
    if output.lines().all(|l| l.trim().is_empty()) {
        assert!(out.status.success(), "verify failed silently");
    }
}

/// The program `ExecStart=` runs.
fn exec_binary() -> String {
    let service = settings(&read(&service_path()));
    let exec = single(&service, "ExecStart");
    exec.split_whitespace().next().unwrap().to_string()
}

#[test]
fn socket_unit_passes_control_as_fd_3_and_vhost_user_as_fd_4() {
    let socket = settings(&read(&socket_path()));
    let listen = values(&socket, "ListenStream");
    assert_eq!(listen.len(), 2, "two sockets, in fd order: {listen:?}");
    assert!(
        listen[0].ends_with("/control.sock"),
        "fd 3 is the control socket: {listen:?}"
    );
    assert!(
        listen[1].ends_with("/vhost-user.sock"),
        "fd 4 is the vhost-user socket: {listen:?}"
    );
    // One instance per VM: the paths are per instance.
    assert!(listen.iter().all(|p| p.contains("%i")), "{listen:?}");
    // Both are path sockets (never abstract), and the manager's is not beside the VMM's.
    assert!(listen.iter().all(|p| p.starts_with('/')), "{listen:?}");
    let control_dir = Path::new(listen[0]).parent().unwrap();
    let vhost_dir = Path::new(listen[1]).parent().unwrap();
    assert_ne!(
        control_dir, vhost_dir,
        "the control socket needs its own 0700 directory"
    );
    assert!(
        values(&socket, "ExecStartPre")
            .iter()
            .any(|c| c.contains("-m 0700") && c.ends_with(control_dir.to_str().unwrap())),
        "the control socket's directory is made root-only before binding"
    );
    assert_eq!(single(&socket, "Accept"), "no");
    assert_eq!(single(&socket, "SocketMode"), "0600");

    let service = settings(&read(&service_path()));
    let exec = single(&service, "ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    let has = |a: &str, b: &str| args.windows(2).any(|w| w == [a, b]);
    assert!(has("--control", "fd:3"), "{exec}");
    assert!(has("--fd", "4"), "{exec}");
    assert_eq!(args.get(1), Some(&"serve"), "{exec}");
    assert_eq!(single(&service, "Requires"), "vublk@%i.socket");
}

#[test]
fn service_is_notify_and_unprivileged() {
    let service = settings(&read(&service_path()));
    assert_eq!(single(&service, "Type"), "notify");
    assert_eq!(single(&service, "NotifyAccess"), "main");
    assert_eq!(single(&service, "NoNewPrivileges"), "yes");
    assert_eq!(single(&service, "CapabilityBoundingSet"), "");
    assert_eq!(single(&service, "AmbientCapabilities"), "");
    assert_eq!(single(&service, "DynamicUser"), "yes");
    assert_eq!(single(&service, "ProtectSystem"), "strict");
    assert_eq!(single(&service, "PrivateNetwork"), "yes");
    assert_eq!(single(&service, "PrivateDevices"), "yes");
    assert_eq!(single(&service, "RestrictAddressFamilies"), "AF_UNIX");
    assert_eq!(single(&service, "MemoryDenyWriteExecute"), "yes");
    assert_eq!(single(&service, "LockPersonality"), "yes");
    // vublk's own sandbox: a user namespace (it is unprivileged), then mount, net, IPC, UTS.
    let ns: BTreeSet<&str> = single(&service, "RestrictNamespaces")
        .split_whitespace()
        .collect();
    assert_eq!(ns, BTreeSet::from(["ipc", "mnt", "net", "user", "uts"]));
    // vublk is unprivileged from the start: no identity to drop to.
    let exec = single(&service, "ExecStart");
    assert!(!exec.contains("--user"), "{exec}");
}

/// The system calls a `SystemCallFilter=` item names, groups expanded (recursively) with
/// `systemd-analyze syscall-filter`.
fn expand(item: &str, test: &str) -> Option<BTreeSet<String>> {
    if !item.starts_with('@') {
        return Some(BTreeSet::from([item.to_string()]));
    }
    let out = systemd_analyze(&["syscall-filter", item], test)?;
    assert!(out.status.success(), "{item}: {}", text(&out));
    let mut calls = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        calls.extend(expand(name, test)?);
    }
    Some(calls)
}

#[test]
fn syscall_filter_keeps_what_the_sandbox_needs() {
    const TEST: &str = "syscall_filter_keeps_what_the_sandbox_needs";
    let service = settings(&read(&service_path()));
    let lines = values(&service, "SystemCallFilter");
    assert!(
        !lines[0].starts_with('~'),
        "the first line makes it an allow list"
    );
    // systemd's semantics for an allow list: @default is always allowed, then each line in
    // order adds its calls, or removes them when it starts with '~'.
    let Some(mut allowed) = expand("@default", TEST) else {
        return;
    };
    for line in lines {
        let (deny, items) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        for item in items.split_whitespace() {
            let Some(calls) = expand(item, TEST) else {
                return;
            };
            if deny {
                allowed.retain(|c| !calls.contains(c));
            } else {
                allowed.extend(calls);
            }
        }
    }
    // What vublk calls: its confinement steps at startup (issue 5's list: namespaces and the
    // empty root, capability drop, rlimits through prlimit64, Landlock, seccomp), the setup
    // before them, and every call its own per-role seccomp allowlists let through afterwards.
    let needed = [
        // confinement
        "close_range",
        "unshare",
        "mount",
        "pivot_root",
        "umount2",
        "chdir",
        "prctl",
        "capset",
        "prlimit64",
        "landlock_create_ruleset",
        "landlock_add_rule",
        "landlock_restrict_self",
        "seccomp",
        // setup: /proc reads and writes before the root goes, $NOTIFY_SOCKET
        "openat",
        "getdents64",
        "socket",
        "connect",
        "rt_sigaction",
        // serving
        "accept4",
        "brk",
        "clock_gettime",
        "clock_nanosleep",
        "clone",
        "close",
        "eventfd2",
        "exit",
        "exit_group",
        "fallocate",
        "fcntl",
        "fdatasync",
        "fstat",
        "ftruncate",
        "futex",
        "getpid",
        "getrandom",
        "getsockopt",
        "gettid",
        "io_uring_enter",
        "io_uring_register",
        "io_uring_setup",
        "ioctl",
        "lseek",
        "madvise",
        "mmap",
        "mprotect",
        "mremap",
        "munmap",
        "newfstatat",
        "poll",
        "pread64",
        "preadv",
        "pwrite64",
        "pwritev",
        "pwritev2",
        "read",
        "recvfrom",
        "recvmsg",
        "restart_syscall",
        "rseq",
        "rt_sigprocmask",
        "rt_sigreturn",
        "sched_getaffinity",
        "sched_yield",
        "sendmsg",
        "sendto",
        "set_robust_list",
        "setsockopt",
        "shutdown",
        "sigaltstack",
        "statx",
        "write",
        "writev",
    ];
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|c| !allowed.contains(*c))
        .collect();
    assert!(missing.is_empty(), "the filter denies {missing:?}");
    // What it must never need: another identity, other processes' memory, the kernel's knobs.
    let forbidden = [
        "setresuid",
        "setuid",
        "setgroups",
        "chown",
        "chroot",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_getfd",
        "kcmp",
        "userfaultfd",
        "setns",
        "bpf",
        "perf_event_open",
        "init_module",
        "kexec_load",
        "reboot",
        "swapon",
        "settimeofday",
        "add_key",
        "keyctl",
        "open_by_handle_at",
    ];
    let present: Vec<&str> = forbidden
        .into_iter()
        .filter(|c| allowed.contains(*c))
        .collect();
    assert!(present.is_empty(), "the filter allows {present:?}");
}

#[test]
fn backend_descriptor_is_a_block_backend_naming_the_service_binary() {
    let path = systemd_dir().join("50-vublk.json");
    let json: Value = serde_json::from_str(&read(&path)).unwrap();
    let obj = json.as_object().unwrap();
    // QEMU's docs/interop/vhost-user.json, VhostUserBackend: description, type, binary, *tags.
    for key in obj.keys() {
        assert!(
            ["description", "type", "binary", "tags"].contains(&key.as_str()),
            "{key} is not a VhostUserBackend member"
        );
    }
    assert_eq!(json["type"], "block");
    assert!(json["description"].is_string());
    let binary = json["binary"].as_str().unwrap();
    assert!(Path::new(binary).is_absolute(), "{binary}");
    assert_eq!(
        binary,
        exec_binary(),
        "the descriptor and the unit run one binary"
    );
}
