//! Startup checks of the real `vublk serve` binary: bad fds from the manager get a clear error
//! naming the fd, odd-but-valid fds (O_NONBLOCK, O_RDONLY with --read-only) are served, and a
//! process where io_uring is forbidden fails with an error that says so.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers unwrap: a failure is the test failing"
)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use vublk_tests::blk::BlkClient;
use vublk_tests::daemon::{pass_fds, run_vublk_expecting_exit, vublk_bin, BackendKind, Daemon};

const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// The fd number the image is passed as.
const IMAGE_FD: i32 = 10;

fn image(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("disk.img");
    let f = File::create(&path).unwrap();
    f.set_len(4 << 20).unwrap();
    path
}

/// Runs `vublk serve --image fd:10 --format raw --socket-path ... extra` with `fd` as fd 10 and
/// returns its stderr, asserting that it failed.
fn startup_error(dir: &tempfile::TempDir, fd: i32, extra: &[&str]) -> String {
    let sock = dir.path().join("vu.sock");
    let sock = sock.to_str().unwrap();
    let image = format!("fd:{IMAGE_FD}");
    let mut args = vec![
        "serve",
        "--image",
        &image,
        "--format",
        "raw",
        "--socket-path",
        sock,
    ];
    args.extend_from_slice(extra);
    let (status, stderr) =
        run_vublk_expecting_exit(&args, &[(fd, IMAGE_FD)], EXIT_TIMEOUT).unwrap();
    assert!(
        !status.success(),
        "vublk should refuse to start; stderr: {stderr}"
    );
    stderr
}

#[test]
fn closed_image_fd_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    let (status, stderr) = run_vublk_expecting_exit(
        &[
            "serve",
            "--image",
            "fd:57",
            "--format",
            "raw",
            "--socket-path",
            sock.to_str().unwrap(),
        ],
        &[],
        EXIT_TIMEOUT,
    )
    .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("fd 57 is not open"), "stderr: {stderr}");
}

#[test]
fn directory_as_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = File::open(dir.path()).unwrap();
    let err = startup_error(&dir, d.as_raw_fd(), &[]);
    assert!(err.contains("fd 10 is a directory"), "stderr: {err}");
}

#[test]
fn socket_as_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    let err = startup_error(&dir, a.as_raw_fd(), &[]);
    assert!(err.contains("fd 10 is a socket"), "stderr: {err}");
}

#[test]
fn read_only_fd_for_a_writable_disk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = File::open(image(&dir)).unwrap();
    let err = startup_error(&dir, f.as_raw_fd(), &[]);
    assert!(err.contains("fd 10 is opened O_RDONLY"), "stderr: {err}");
    assert!(
        err.contains("--read-only"),
        "the error should say how to fix it: {err}"
    );
}

#[test]
fn append_fd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .append(true)
        .open(image(&dir))
        .unwrap();
    let err = startup_error(&dir, f.as_raw_fd(), &[]);
    assert!(err.contains("fd 10 has O_APPEND"), "stderr: {err}");
}

#[test]
fn cache_none_on_fd_without_o_direct_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image(&dir))
        .unwrap();
    let err = startup_error(&dir, f.as_raw_fd(), &["--cache", "none"]);
    assert!(err.contains("fd 10 lacks O_DIRECT"), "stderr: {err}");
}

#[test]
fn regular_file_as_vhost_user_fd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image(&dir))
        .unwrap();
    let img = image(&dir);
    let (status, stderr) = run_vublk_expecting_exit(
        &[
            "serve",
            "--image",
            img.to_str().unwrap(),
            "--format",
            "raw",
            "--fd",
            "11",
        ],
        &[(f.as_raw_fd(), 11)],
        EXIT_TIMEOUT,
    )
    .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("--fd 11") && stderr.contains("unix socket"),
        "stderr: {stderr}"
    );
}

#[test]
fn abstract_listening_socket_as_vhost_user_fd_is_refused() {
    use std::os::linux::net::SocketAddrExt;
    let dir = tempfile::tempdir().unwrap();
    let name = format!("vublk-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let img = image(&dir);
    let (status, stderr) = run_vublk_expecting_exit(
        &[
            "serve",
            "--image",
            img.to_str().unwrap(),
            "--format",
            "raw",
            "--fd",
            "11",
        ],
        &[(listener.as_raw_fd(), 11)],
        EXIT_TIMEOUT,
    )
    .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("--fd 11") && stderr.contains("abstract"),
        "stderr: {stderr}"
    );
}

/// Starts vublk on `fd` passed as the image and returns the daemon.
fn serve_fd(dir: &tempfile::TempDir, fd: i32, extra: &[&str]) -> Daemon {
    let sock = dir.path().join("vu.sock");
    let mut cmd = Command::new(vublk_bin());
    cmd.args([
        "serve",
        "--image",
        &format!("fd:{IMAGE_FD}"),
        "--format",
        "raw",
        "--num-queues",
        "1",
    ])
    .arg("--socket-path")
    .arg(&sock)
    .args(extra);
    pass_fds(&mut cmd, &[(fd, IMAGE_FD)]);
    Daemon::spawn(BackendKind::Vublk, &mut cmd, &sock).unwrap()
}

#[test]
fn nonblocking_fd_serves_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .unwrap();
    let daemon = serve_fd(&dir, f.as_raw_fd(), &[]);
    let mut client = BlkClient::connect(&daemon.socket, 1).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    client.write(1 << 20, &data).unwrap();
    assert_eq!(client.read(1 << 20, data.len()).unwrap(), data);
    drop(client);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[1 << 20..(1 << 20) + data.len()], &data[..]);
}

#[test]
fn rdonly_fd_serves_a_read_only_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    std::fs::write(&path, vec![0x5a; 4 << 20]).unwrap();
    let f = File::open(&path).unwrap();
    let daemon = serve_fd(&dir, f.as_raw_fd(), &["--read-only"]);
    let mut client = BlkClient::connect_read_only(&daemon.socket, 1).unwrap();
    assert!(client.read_only());
    assert_eq!(client.read(0, 4096).unwrap(), vec![0x5a; 4096]);
}

#[test]
fn direct_fd_with_cache_none_serves() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let daemon = serve_fd(&dir, f.as_raw_fd(), &["--cache", "none"]);
    let mut client = BlkClient::connect(&daemon.socket, 1).unwrap();
    let data = vec![0xc3u8; 8192];
    client.write(4096, &data).unwrap();
    assert_eq!(client.read(4096, 8192).unwrap(), data);
}

#[test]
fn io_uring_forbidden_by_seccomp_fails_with_a_clear_error() {
    use std::collections::BTreeMap;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let sock = dir.path().join("vu.sock");
    // A container-style profile: io_uring_setup answers EPERM, everything else is allowed.
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_io_uring_setup, vec![]);
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .unwrap();
    let program: seccompiler::BpfProgram = filter.try_into().unwrap();
    let mut cmd = Command::new(vublk_bin());
    cmd.args(["serve", "--format", "raw", "--image"])
        .arg(&path)
        .arg("--socket-path")
        .arg(&sock)
        .stderr(std::process::Stdio::piped());
    // SAFETY: the closure only installs a prebuilt BPF program (prctl and seccomp syscalls),
    // allocating nothing between fork and exec.
    unsafe {
        cmd.pre_exec(move || seccompiler::apply_filter(&program).map_err(std::io::Error::other));
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("io_uring is unavailable"),
        "stderr: {stderr}"
    );
}
