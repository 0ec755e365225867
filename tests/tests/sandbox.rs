//! Confinement, checked on the real serving daemon: its `/proc/<pid>` status (seccomp mode 2
//! on every thread, no_new_privs, no capabilities, not dumpable), the fds it keeps, and the
//! test-only `x-sandbox-probe` command (built with the `sandbox-probe` feature, as
//! `tests/run.sh` builds it) that attempts forbidden operations inside the daemon and reports
//! each errno. `execve` kills the daemon (seccomp), seen from outside as SIGSYS. Also:
//! `--sandbox off`, `--user`, `--vmm-uid`, and READY=1 on `$NOTIFY_SOCKET`.

#![allow(
    clippy::unwrap_used,
    reason = "a test binary: the helpers panic like the #[test] fns that clippy already exempts"
)]

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use vublk_tests::blk::BlkClient;
use vublk_tests::daemon::{pass_fds, vublk_bin, BackendKind, Daemon};
use vublk_tests::qmp::{QmpClient, RawQmp};

const MIB: u64 = 1024 * 1024;

fn status_field(pid: u32, task: Option<&str>, field: &str) -> String {
    let path = match task {
        Some(tid) => format!("/proc/{pid}/task/{tid}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let status = std::fs::read_to_string(path).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0x6b; 4 << 20]).unwrap();
    p
}

fn start(dir: &Path, extra: &[&str], fds: &[(i32, i32)]) -> Daemon {
    let socket = dir.join("vu.sock");
    let mut cmd = Command::new(vublk_bin());
    // These tests are about the confined daemon, whatever the suite's default.
    cmd.env_remove("VUBLK_SANDBOX");
    cmd.arg("serve")
        .arg("--image")
        .arg(image(dir))
        .args(["--format", "raw", "--num-queues", "2", "--socket-path"])
        .arg(&socket)
        .arg("--control")
        .arg(dir.join("qmp.sock"))
        .args(extra);
    pass_fds(&mut cmd, fds);
    let daemon = Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket).unwrap();
    // The sockets are bound before confinement: wait until the daemon is confined.
    for _ in 0..500 {
        if dir.join("qmp.sock").exists() && status_field(daemon.pid(), None, "Seccomp") == "2" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    daemon
}

/// Whether the running binary was built with the probe command.
fn has_probe(qmp: &mut QmpClient) -> bool {
    let commands = qmp.ok("query-commands", json!({})).unwrap();
    commands
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "x-sandbox-probe")
}

#[test]
fn every_thread_of_a_serving_daemon_is_confined_and_leaked_fds_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    // A file the "manager" leaks into vublk at fd 20: it must not survive setup.
    let leaked = std::fs::File::open("/etc/hostname").unwrap();
    let daemon = start(dir.path(), &[], &[(leaked.as_raw_fd(), 20)]);
    let pid = daemon.pid();
    // Queue workers exist once a frontend is connected.
    let mut guest = BlkClient::connect(&daemon.socket, 2).unwrap();
    assert_eq!(guest.read(0, 4096).unwrap(), vec![0x6b; 4096]);
    assert_eq!(status_field(pid, None, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, None, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, None, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, None, "CapBnd"), "0000000000000000");
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = task.unwrap().file_name().into_string().unwrap();
        let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        assert_eq!(
            status_field(pid, Some(&tid), "Seccomp"),
            "2",
            "thread {tid} ({}) runs without a seccomp filter",
            name.trim()
        );
        let filters: u32 = status_field(pid, Some(&tid), "Seccomp_filters")
            .parse()
            .unwrap();
        names.push((name.trim().to_string(), filters));
    }
    for (name, filters) in &names {
        if name.starts_with("vublk-") {
            assert!(
                *filters > 3,
                "{name} has {filters} filters: no role filter on top of the process one"
            );
        }
    }
    assert!(
        names.iter().any(|(n, _)| n == "vublk-q1"),
        "two queue workers run: {names:?}"
    );
    let targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|t| t.display().to_string())
        .collect();
    assert!(
        !targets.iter().any(|t| t == "/etc/hostname"),
        "the leaked fd is still open: {targets:?}"
    );
    // The mount namespace differs, so does the network one.
    for ns in ["mnt", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "vublk shares the test's {ns} namespace");
    }
    guest.write(0, &[0x6c; 4096]).unwrap();
    drop(guest);
    assert!(daemon.terminate().unwrap().success());
}

#[test]
fn forbidden_operations_fail_inside_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), &[], &[]);
    let mut qmp = QmpClient::connect(&dir.path().join("qmp.sock")).unwrap();
    assert!(
        has_probe(&mut qmp),
        "this vublk was built without --features sandbox-probe (tests/run.sh builds it so)"
    );
    let unix_path = dir.path().join("listening.sock");
    let _unix = std::os::unix::net::UnixListener::bind(&unix_path).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let report = qmp
        .ok(
            "x-sandbox-probe",
            json!({"unix": unix_path, "tcp-port": port}),
        )
        .unwrap();
    eprintln!("probe: {report}");
    assert_ne!(report["open /etc/passwd"], "ok", "{report}");
    assert_ne!(report["open /"], "ok", "{report}");
    assert_eq!(report["connect unix"]["socket"], "EPERM", "{report}");
    assert_eq!(report["connect tcp"]["socket"], "EPERM", "{report}");
    assert_eq!(
        report["io_uring opcode outside the allowlist"]["openat"], "EACCES",
        "{report}"
    );
    // The I/O path still works confined.
    let mut guest = BlkClient::connect(&daemon.socket, 1).unwrap();
    guest.write(MIB, &[1; 4096]).unwrap();
    assert_eq!(guest.read(MIB, 4096).unwrap(), vec![1; 4096]);
    drop(guest);

    // execve: seccomp kills the process.
    let mut raw = RawQmp::connect(&dir.path().join("qmp.sock")).unwrap();
    raw.send(br#"{"execute": "x-sandbox-probe", "arguments": {"execve": true}}"#)
        .unwrap();
    let mut daemon = daemon;
    let status = daemon.child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "execve must kill vublk with SIGSYS: {status}"
    );
}

#[test]
fn sandbox_off_applies_nothing_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vu.sock");
    let mut cmd = Command::new(vublk_bin());
    cmd.arg("serve")
        .arg("--image")
        .arg(image(dir.path()))
        .args(["--format", "raw", "--sandbox", "off", "--socket-path"])
        .arg(&socket)
        .stderr(std::process::Stdio::piped());
    let mut daemon = Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket).unwrap();
    assert_eq!(status_field(daemon.pid(), None, "Seccomp"), "0");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = daemon.child.wait_with_output_ref();
    assert!(out.contains("sandbox: OFF"), "{out}");
}

trait WaitOutput {
    fn wait_with_output_ref(&mut self) -> String;
}

impl WaitOutput for std::process::Child {
    fn wait_with_output_ref(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).unwrap();
        }
        let _ = self.wait();
        err
    }
}

#[test]
fn user_drops_identity_and_vmm_uid_refuses_other_peers() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(
        dir.path(),
        &["--user", "65534:65534", "--vmm-uid", "0"],
        &[],
    );
    assert_eq!(
        status_field(daemon.pid(), None, "Uid"),
        "65534\t65534\t65534\t65534"
    );
    assert_eq!(
        status_field(daemon.pid(), None, "Gid"),
        "65534\t65534\t65534\t65534"
    );
    // The image fd was opened as root during setup; nobody serves it now.
    let mut guest = BlkClient::connect(&daemon.socket, 1).unwrap();
    guest.write(0, &[0x70; 4096]).unwrap();
    assert_eq!(guest.read(0, 4096).unwrap(), vec![0x70; 4096]);
    drop(guest);
    assert!(daemon.terminate().unwrap().success());

    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), &["--vmm-uid", "4242"], &[]);
    assert!(
        BlkClient::connect(&daemon.socket, 1).is_err(),
        "a peer that is not uid 4242 must be refused"
    );
    assert!(daemon.terminate().unwrap().success());
}

#[test]
fn ready_is_sent_on_notify_socket_once_confined() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let socket = dir.path().join("vu.sock");
    let mut cmd = Command::new(vublk_bin());
    cmd.arg("serve")
        .arg("--image")
        .arg(image(dir.path()))
        .args(["--format", "raw", "--socket-path"])
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify)
        .env_remove("VUBLK_SANDBOX");
    let daemon = Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket).unwrap();
    let mut buf = [0u8; 64];
    let n = listener.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1\n");
    assert_eq!(status_field(daemon.pid(), None, "Seccomp"), "2");
    assert!(daemon.terminate().unwrap().success());
}

#[test]
fn an_unavailable_layer_stops_startup_unless_weak_is_accepted() {
    // As an unprivileged user with user namespaces forbidden (a seccomp filter here stands in
    // for an old or locked-down kernel), "on" refuses to start and names the layer; "weak"
    // starts and says what is missing.
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    for (mode, expect_start) in [("on", false), ("weak", true)] {
        let socket = dir.path().join(format!("{mode}.sock"));
        let mut cmd = Command::new(vublk_bin());
        cmd.arg("serve")
            .arg("--image")
            .arg(&img)
            .args([
                "--format",
                "raw",
                "--read-only",
                "--sandbox",
                mode,
                "--socket-path",
            ])
            .arg(&socket)
            .stderr(std::process::Stdio::piped());
        forbid_unshare(&mut cmd);
        // Started means confined and serving: READY=1 on --ready-fd comes after the sandbox.
        let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
        cmd.args(["--ready-fd", "9"]);
        pass_fds(&mut cmd, &[(ready_w.as_raw_fd(), 9)]);
        let mut child = cmd.spawn().unwrap();
        drop(ready_w);
        let mut ready = String::new();
        let _ = std::io::Read::read_to_string(&mut std::fs::File::from(ready_r), &mut ready);
        let started = ready == "READY=1\n" && child.try_wait().unwrap().is_none();
        let _ = child.kill();
        let err = child.wait_with_output_ref();
        assert_eq!(started, expect_start, "--sandbox {mode}: {err}");
        assert!(err.contains("namespaces"), "--sandbox {mode}: {err}");
    }
}

/// Makes `unshare` fail with EPERM in the child (before exec), as on a kernel without
/// namespaces.
fn forbid_unshare(cmd: &mut Command) {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    use std::os::unix::process::CommandExt;
    let filter = SeccompFilter::new(
        [(libc::SYS_unshare, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .unwrap();
    let program: seccompiler::BpfProgram = filter.try_into().unwrap();
    // SAFETY: the closure runs in the forked child before exec and only installs a seccomp
    // filter compiled before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || seccompiler::apply_filter(&program).map_err(std::io::Error::other));
    }
}
