//! Readiness for systemd (`Type=notify`): `READY=1` on `$NOTIFY_SOCKET`.
//!
//! The socket is connected during setup (confined, vublk can create no socket) and the message
//! sent once vublk is confined and serving, so "ready" means "ready and sandboxed".

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// A connection to systemd's notification socket.
pub struct Notifier {
    sock: UnixDatagram,
}

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket); `None` when
    /// the variable is not set.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let target = target.into_encoded_bytes();
        let addr = match target.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(std::path::Path::new(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&target),
            ))?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.connect_addr(&addr)?;
        Ok(Some(Notifier { sock }))
    }

    pub fn ready(&self) -> io::Result<()> {
        self.sock.send(b"READY=1\n").map(drop)
    }
}
