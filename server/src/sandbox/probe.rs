//! `x-sandbox-probe`: a test-only control command (cargo feature `sandbox-probe`, never in a
//! production build) that attempts, inside the serving daemon, what confinement must forbid,
//! and reports each outcome, so the tests check the real process rather than a library call.
//!
//! Each attempt returns "ok" or the errno name. `execve` is not attempted here: seccomp kills
//! the process for it, which the test observes from outside (`{"execve": true}`).

use std::ffi::CString;

use io_uring::{opcode, types};
use serde_json::{json, Value};

use crate::engine::QueueRing;

fn outcome(rc: i64) -> Value {
    if rc >= 0 {
        json!("ok")
    } else {
        json!(format!(
            "{:?}",
            nix::errno::Errno::from_raw(i32::try_from(-rc).unwrap_or(0))
        ))
    }
}

fn last_error() -> i64 {
    -i64::from(nix::errno::Errno::last_raw())
}

/// Opens `path` read-only.
fn open(path: &str) -> Value {
    let Ok(c) = CString::new(path) else {
        return json!("bad path");
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by open and is owned here.
        unsafe { libc::close(fd) };
        return json!("ok");
    }
    outcome(last_error())
}

/// Creates a socket of `family` and connects it to `addr`.
fn connect(family: libc::c_int, addr: &dyn nix::sys::socket::SockaddrLike) -> Value {
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return json!({"socket": outcome(last_error())});
    }
    let result = nix::sys::socket::connect(fd, addr);
    // SAFETY: `fd` was just returned by socket and is owned here.
    unsafe { libc::close(fd) };
    json!({"socket": "ok", "connect": match result {
        Ok(()) => json!("ok"),
        Err(e) => json!(format!("{e:?}")),
    }})
}

/// Builds a ring restricted like a queue's and submits an opcode outside the allowlist.
fn io_uring_openat() -> Value {
    let mut ring = match QueueRing::new(0, 4, &[], 1) {
        Ok(ring) => ring,
        Err(e) => return json!({"setup": e.to_string()}),
    };
    let path = c"/etc/passwd";
    let entry = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
        .build()
        .user_data(7);
    // SAFETY: the path is a static string; the entry points at nothing else.
    unsafe { ring.push(entry) };
    if let Err(e) = ring.submit(true) {
        return json!({"submit": e.to_string()});
    }
    let mut cqes = Vec::new();
    ring.reap(&mut cqes);
    match cqes.first() {
        Some((_, res)) => json!({"openat": outcome(i64::from(*res))}),
        None => json!({"openat": "no completion"}),
    }
}

/// Runs every attempt; `unix` is a listening unix socket path and `tcp_port` a listening TCP
/// port on 127.0.0.1, both opened by the test.
pub fn run(unix: Option<&str>, tcp_port: Option<u16>, execve: bool) -> Value {
    if execve {
        let prog = c"/bin/true";
        let argv = [prog.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: argv and envp are NUL-terminated arrays of valid strings. If it returns, it
        // failed and nothing changed.
        let rc = unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        return json!({"execve": outcome(i64::from(rc).min(last_error()))});
    }
    let mut report = json!({
        "open /etc/passwd": open("/etc/passwd"),
        "open /": open("/"),
        "io_uring opcode outside the allowlist": io_uring_openat(),
    });
    if let Some(path) = unix {
        if let Ok(addr) = nix::sys::socket::UnixAddr::new(path) {
            report["connect unix"] = connect(libc::AF_UNIX, &addr);
        }
    }
    if let Some(port) = tcp_port {
        let addr = nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, port);
        report["connect tcp"] = connect(libc::AF_INET, &addr);
    }
    report
}
