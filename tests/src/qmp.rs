//! A QMP client for control-plane tests: the `qemu.qmp` Python library (the independent
//! client managers use), driven through `tests/qmp/driver.py` one request per line, plus a
//! raw-socket client for input no well-behaved library would send.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// `tests/qmp/driver.py` in the source tree.
pub fn driver_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qmp/driver.py")
}

/// A qemu.qmp client in a Python process.
pub struct QmpClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// How a file's fd is passed with a command (`send_fd_scm`).
#[derive(Clone, Copy, Debug)]
pub enum FdMode {
    ReadOnly,
    ReadWrite,
    ReadWriteDirect,
}

impl FdMode {
    fn as_str(self) -> &'static str {
        match self {
            FdMode::ReadOnly => "ro",
            FdMode::ReadWrite => "rw",
            FdMode::ReadWriteDirect => "rw-direct",
        }
    }
}

impl QmpClient {
    /// Connects to the QMP socket at `path` (negotiating capabilities, as qemu.qmp does).
    pub fn connect(path: &Path) -> Result<QmpClient> {
        let mut child = Command::new("python3")
            .arg(driver_script())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the qemu.qmp driver (python3)")?;
        let stdin = child.stdin.take().context("driver stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("driver stdout")?);
        let mut client = QmpClient {
            child,
            stdin,
            stdout,
        };
        let r = client.request(json!({"op": "connect", "path": path}))?;
        if r["ok"] != true {
            bail!("qemu.qmp could not connect to {}: {r}", path.display());
        }
        Ok(client)
    }

    fn request(&mut self, req: Value) -> Result<Value> {
        writeln!(self.stdin, "{req}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the qemu.qmp driver exited (request {req})");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command: `Ok(return value)` or `Err((class, desc))` for a QMP error.
    pub fn execute(
        &mut self,
        cmd: &str,
        args: Value,
    ) -> Result<std::result::Result<Value, (String, String)>> {
        self.execute_with_fd(cmd, args, None)
    }

    /// Runs a command, sending an fd of `file` (opened as `mode`) just before it.
    pub fn execute_with_fd(
        &mut self,
        cmd: &str,
        args: Value,
        fd: Option<(&Path, FdMode)>,
    ) -> Result<std::result::Result<Value, (String, String)>> {
        let mut req = json!({"op": "execute", "cmd": cmd, "args": args});
        if let Some((path, mode)) = fd {
            req["fd"] = json!({"path": path, "mode": mode.as_str()});
        }
        let r = self.request(req)?;
        if r["ok"] == true {
            return Ok(Ok(r["return"].clone()));
        }
        match (r["class"].as_str(), r["desc"].as_str()) {
            (Some(class), Some(desc)) => Ok(Err((class.to_string(), desc.to_string()))),
            _ => bail!("{cmd}: the driver failed: {r}"),
        }
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Result<Value> {
        match self.execute(cmd, args.clone())? {
            Ok(v) => Ok(v),
            Err((class, desc)) => bail!("{cmd} {args}: {class}: {desc}"),
        }
    }

    /// Adds `file` (opened as `mode`) to fd set `set`; returns the fd number vublk holds.
    pub fn add_fd(&mut self, set: u64, file: &Path, mode: FdMode, opaque: &str) -> Result<i64> {
        let r = self.execute_with_fd(
            "add-fd",
            json!({"fdset-id": set, "opaque": opaque}),
            Some((file, mode)),
        )?;
        match r {
            Ok(v) => v["fd"].as_i64().context("add-fd returned no fd"),
            Err((class, desc)) => bail!("add-fd {}: {class}: {desc}", file.display()),
        }
    }

    /// Waits until every event in `names` was seen (in any order); returns all events seen.
    pub fn events(&mut self, names: &[&str], timeout: Duration) -> Result<Vec<Value>> {
        let r = self.request(json!({
            "op": "events", "names": names, "timeout": timeout.as_secs_f64()
        }))?;
        if r["ok"] != true {
            bail!("events {names:?} not all seen: {r}");
        }
        Ok(r["return"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP connection on a bare socket, for malformed input and fd floods.
pub struct RawQmp {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl RawQmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<RawQmp> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut raw = RawQmp { stream, reader };
        let greeting = raw.read()?;
        if greeting.get("QMP").is_none() {
            bail!("no greeting: {greeting}");
        }
        raw.send(br#"{"execute": "qmp_capabilities"}"#)?;
        let r = raw.read()?;
        if r.get("return").is_none() {
            bail!("qmp_capabilities failed: {r}");
        }
        Ok(raw)
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Sends `bytes` with `fds` attached in one message.
    pub fn send_with_fds(&mut self, bytes: &[u8], fds: &[RawFd]) -> Result<()> {
        let iov = [std::io::IoSlice::new(bytes)];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(fds)];
        nix::sys::socket::sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )?;
        Ok(())
    }

    /// Reads the next message (reply or event).
    pub fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the server closed the connection");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Reads until a reply (not an event) arrives.
    pub fn reply(&mut self) -> Result<Value> {
        loop {
            let m = self.read()?;
            if m.get("event").is_none() {
                return Ok(m);
            }
        }
    }
}

/// The number of fds process `pid` has open.
pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}
