//! Spawning a vhost-user-blk backend daemon for a test and waiting for its socket.
//!
//! Both vublk and qemu-storage-daemon are started through [`Daemon`], so a test or the
//! benchmark can run the same workload against either one.

use std::ffi::OsString;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a daemon may take to start listening before the fixture gives up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of the workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The vublk binary under test: `$VUBLK_BIN`, else `target/release/vublk` when asked for with
/// `VUBLK_PROFILE=release`, else `target/debug/vublk`. The README's test command builds it first.
pub fn vublk_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("VUBLK_BIN") {
        return PathBuf::from(bin);
    }
    let profile = std::env::var("VUBLK_PROFILE").unwrap_or_else(|_| "debug".to_string());
    let bin = target_dir().join(profile).join("vublk");
    assert!(
        bin.exists(),
        "vublk binary not found at {}: run `cargo build --bins` first (the README's test command does)",
        bin.display()
    );
    bin
}

/// Which backend a fixture runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Vublk,
    /// `/usr/bin/qemu-storage-daemon --export type=vhost-user-blk`, the incumbent.
    Qsd,
}

/// Options shared by both backends.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    pub image: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    pub read_only: bool,
    /// O_DIRECT (`cache.direct=on` for QSD, `--cache none` for vublk).
    pub direct: bool,
    pub num_queues: u16,
    /// The image's backing chain, nearest first: the image's own backing file, then that
    /// file's backing file, and so on. Every layer is handed to the daemon explicitly and
    /// opened read-only; neither daemon opens a backing file by the name written in an image.
    pub backing: Vec<Backing>,
    pub extra_args: Vec<String>,
}

/// One layer of a backing chain, as the manager hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    /// A path, or for vublk any spelling its `--backing` accepts (`fd:N`, `/dev/fdset/N`).
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
}

impl Backing {
    pub fn new(path: impl Into<PathBuf>, format: &str) -> Self {
        Backing {
            path: path.into(),
            format: format.to_string(),
        }
    }

    /// vublk's `--backing` value: `PATH,format=FORMAT`.
    fn vublk_arg(&self) -> OsString {
        let mut arg = self.path.clone().into_os_string();
        arg.push(",format=");
        arg.push(&self.format);
        arg
    }
}

/// `path` as a value inside a QEMU option string, where a comma must be doubled.
fn qemu_opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

impl DiskOptions {
    pub fn raw(image: impl Into<PathBuf>) -> Self {
        DiskOptions {
            image: image.into(),
            format: "raw".to_string(),
            read_only: false,
            direct: false,
            num_queues: 1,
            backing: Vec::new(),
            extra_args: Vec::new(),
        }
    }
}

/// A running backend daemon, killed (SIGKILL) and reaped on drop unless stopped before.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub kind: BackendKind,
}

impl Daemon {
    /// Builds the command line for `kind` serving `opts` on `socket`.
    pub fn command(kind: BackendKind, opts: &DiskOptions, socket: &Path) -> Command {
        match kind {
            BackendKind::Vublk => {
                let mut cmd = Command::new(vublk_bin());
                cmd.arg("serve")
                    .arg("--image")
                    .arg(&opts.image)
                    .arg("--format")
                    .arg(&opts.format)
                    .arg("--socket-path")
                    .arg(socket)
                    .arg("--num-queues")
                    .arg(opts.num_queues.to_string())
                    .arg("--cache")
                    .arg(if opts.direct { "none" } else { "writeback" });
                for layer in &opts.backing {
                    cmd.arg("--backing").arg(layer.vublk_arg());
                }
                if opts.read_only {
                    cmd.arg("--read-only");
                }
                cmd.args(&opts.extra_args);
                cmd
            }
            BackendKind::Qsd => {
                let mut cmd = Command::new("/usr/bin/qemu-storage-daemon");
                // The explicit graph, deepest layer first (a node must exist before another
                // names it): per layer a file node and a format node whose `backing` is the
                // next layer's format node, or null for a qcow2 layer at the bottom, so QSD
                // never opens a backing file by the name in an image. JSON, because the
                // dotted-key syntax has no spelling for null (`backing=null` names a node).
                let nodes =
                    std::iter::once((opts.image.as_path(), opts.format.as_str(), opts.read_only))
                        .chain(
                            opts.backing
                                .iter()
                                .map(|b| (b.path.as_path(), b.format.as_str(), true)),
                        )
                        .enumerate()
                        .collect::<Vec<_>>();
                let depth = nodes.len();
                for &(i, (path, format, read_only)) in nodes.iter().rev() {
                    let file = serde_json::json!({
                        "driver": "file",
                        "node-name": format!("file{i}"),
                        "filename": path,
                        "cache": { "direct": opts.direct },
                        "aio": "io_uring",
                        "read-only": read_only,
                    });
                    let mut node = serde_json::json!({
                        "driver": format,
                        "node-name": format!("disk{i}"),
                        "file": format!("file{i}"),
                        "read-only": read_only,
                    });
                    if i + 1 < depth {
                        node["backing"] = format!("disk{}", i + 1).into();
                    } else if format == "qcow2" {
                        node["backing"] = serde_json::Value::Null;
                    }
                    cmd.arg("--blockdev")
                        .arg(file.to_string())
                        .arg("--blockdev")
                        .arg(node.to_string());
                }
                cmd.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable={},num-queues={}",
                    qemu_opt_path(socket),
                    if opts.read_only { "off" } else { "on" },
                    opts.num_queues
                ));
                cmd.args(&opts.extra_args);
                cmd
            }
        }
    }

    /// Starts `kind` serving `opts` on `socket` and waits until the socket accepts a connection.
    pub fn start(kind: BackendKind, opts: &DiskOptions, socket: &Path) -> Result<Daemon> {
        let mut cmd = Self::command(kind, opts, socket);
        Self::spawn(kind, &mut cmd, socket)
    }

    /// Spawns an already built command and waits for `socket` to accept a connection.
    pub fn spawn(kind: BackendKind, cmd: &mut Command, socket: &Path) -> Result<Daemon> {
        let _ = std::fs::remove_file(socket);
        cmd.stdin(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
        let mut daemon = Daemon {
            child,
            socket: socket.to_path_buf(),
            kind,
        };
        daemon.wait_listening(STARTUP_TIMEOUT)?;
        Ok(daemon)
    }

    /// Polls until the daemon's socket exists; fails early if the daemon exits first.
    ///
    /// Only the socket file is checked, never connected to: a probe connection would be taken
    /// by the daemon as its frontend.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{:?} exited before listening: {status}", self.kind);
            }
            if self.socket.exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{:?} did not create {} within {timeout:?}",
                    self.kind,
                    self.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> Result<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to a unix socket, retrying until `timeout` (for sockets a peer creates).
pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("connecting to {}", path.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Makes `cmd`'s child inherit each `(fd, target)` pair as fd number `target`, as a manager
/// passes image and socket fds. The parent's fds are left as they are (close-on-exec).
pub fn pass_fds(cmd: &mut Command, fds: &[(std::os::fd::RawFd, std::os::fd::RawFd)]) {
    use std::os::unix::process::CommandExt;
    let fds = fds.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only calls dup2 and fcntl,
    // which are async-signal-safe; it allocates nothing (the Vec was built before fork).
    unsafe {
        cmd.pre_exec(move || {
            for &(fd, target) in &fds {
                if fd == target {
                    // Same number: just clear close-on-exec.
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Runs vublk with `args` to completion (it is expected to fail at startup) and returns its
/// exit status and stderr.
pub fn run_vublk_expecting_exit(
    args: &[&str],
    fds: &[(std::os::fd::RawFd, std::os::fd::RawFd)],
    timeout: Duration,
) -> Result<(ExitStatus, String)> {
    let mut cmd = Command::new(vublk_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    pass_fds(&mut cmd, fds);
    let mut child = cmd.spawn().context("spawning vublk")?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                std::io::Read::read_to_string(&mut err, &mut stderr)?;
            }
            return Ok((status, stderr));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("vublk {args:?} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
