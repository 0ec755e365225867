//! Where vhost-user connections come from, and serving them one at a time.
//!
//! Setup ([`Endpoint::prepare`]) binds the listening socket or validates an inherited fd
//! before confinement. [`serve`] then accepts (or connects) and serves frontends in turn until
//! shutdown: a frontend that disconnects is not a reason to exit, and the next one is served
//! the same disk.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, UnixAddr,
};
use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vublk_fdset::{check_socket_fd, FdError, FdStatus};

use super::backend_channel::{peek_backend_req_fd, BackendChannel};
use super::handler::BlkHandler;
use crate::config::VhostUserSocket;
use crate::device::{ConnectionInfo, Device};
use crate::events::Event;

/// Backoff between attempts to connect to a VMM that is not listening (yet).
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// Why the vhost-user socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("--socket-path {path}: cannot listen")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--socket-path {path}: exists and is not a socket; refusing to replace it")]
    NotASocketPath { path: PathBuf },
    #[error("--fd {fd}")]
    Fd {
        fd: RawFd,
        #[source]
        source: FdError,
    },
    #[error("--fd {fd}: not a unix stream socket")]
    NotUnixStream { fd: RawFd },
    #[error("--fd {fd}: an abstract unix socket; vublk only serves a socket with a path (its file's owner and mode decide who may connect)")]
    Abstract { fd: RawFd },
    #[error("--fd {fd}: cannot query the socket")]
    Query {
        fd: RawFd,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create the shutdown eventfd")]
    EventFd(#[source] io::Error),
}

/// A prepared source of vhost-user connections.
pub enum Endpoint {
    /// A listening socket, with the path vublk bound it to and that file's inode (removed again
    /// on exit); `None` for an inherited listener, whose path belongs to the manager.
    Listener(UnixListener, Option<(PathBuf, u64)>),
    /// An inherited, already connected socket: served once.
    Connected(Option<UnixStream>),
    Connect(PathBuf),
}

impl Endpoint {
    /// Binds, validates or records the socket; called during setup.
    pub fn prepare(socket: &VhostUserSocket) -> Result<Endpoint, ConnectionError> {
        match socket {
            VhostUserSocket::Listen(path) => {
                let listener = bind(path)?;
                // The inode of the socket file, to recognise it again on exit.
                let ino = std::fs::symlink_metadata(path)
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .ok();
                Ok(Endpoint::Listener(
                    listener,
                    ino.map(|ino| (path.clone(), ino)),
                ))
            }
            VhostUserSocket::Inherited(fd) => adopt(*fd),
            VhostUserSocket::Connect(path) => Ok(Endpoint::Connect(path.clone())),
        }
    }
}

fn bind(path: &Path) -> Result<UnixListener, ConnectionError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A stale socket from an earlier run: replace it.
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            return Err(ConnectionError::NotASocketPath {
                path: path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| ConnectionError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

fn adopt(fd: RawFd) -> Result<Endpoint, ConnectionError> {
    let status = FdStatus::of_raw(fd).map_err(|source| ConnectionError::Fd { fd, source })?;
    check_socket_fd(&status).map_err(|source| ConnectionError::Fd { fd, source })?;
    // SAFETY: `fd` is open (just inspected) and handed to vublk as its vhost-user socket;
    // nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let query = |source| ConnectionError::Query { fd, source };
    if getsockopt(&owned, sockopt::SockType).map_err(query)? != SockType::Stream {
        return Err(ConnectionError::NotUnixStream { fd });
    }
    let addr: UnixAddr = getsockname(fd).map_err(query)?;
    if addr.family() != Some(AddressFamily::Unix) {
        return Err(ConnectionError::NotUnixStream { fd });
    }
    // An abstract socket has no file whose owner and mode limit who connects; any process in
    // the network namespace can reach it.
    if addr.as_abstract().is_some() {
        return Err(ConnectionError::Abstract { fd });
    }
    nix::fcntl::fcntl(
        owned.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(query)?;
    if getsockopt(&owned, sockopt::AcceptConn).map_err(query)? {
        Ok(Endpoint::Listener(UnixListener::from(owned), None))
    } else {
        Ok(Endpoint::Connected(Some(UnixStream::from(owned))))
    }
}

/// Lets another thread stop [`serve`]: wakes a blocked accept/connect and shuts the current
/// connection down, which ends its message loop.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

struct ShutdownInner {
    evt: EventFd,
    requested: Mutex<bool>,
    current: Mutex<Option<UnixStream>>,
}

impl Shutdown {
    pub fn new() -> Result<Shutdown, ConnectionError> {
        Ok(Shutdown {
            inner: Arc::new(ShutdownInner {
                evt: EventFd::new(EFD_NONBLOCK).map_err(ConnectionError::EventFd)?,
                requested: Mutex::new(false),
                current: Mutex::new(None),
            }),
        })
    }

    pub fn request(&self) {
        *self
            .inner
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = true;
        let _ = self.inner.evt.write(1);
        if let Some(conn) = self
            .inner
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits for SIGTERM/SIGINT on `signals` (returns its number) or a shutdown request from
    /// another thread (`quit` on the control socket; returns `None`).
    pub fn wait_for_signal_or_request(
        &self,
        signals: &nix::sys::signalfd::SignalFd,
    ) -> Option<u32> {
        loop {
            if self.requested() {
                return None;
            }
            let mut fds = [
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(evt_fd(&self.inner.evt), PollFlags::POLLIN),
            ];
            let _ = poll(&mut fds, PollTimeout::NONE);
            if self.requested() {
                return None;
            }
            match signals.read_signal() {
                Ok(Some(info)) => return Some(info.ssi_signo),
                Ok(None) => {}
                Err(nix::Error::EINTR) | Err(nix::Error::EAGAIN) => {}
                Err(e) => {
                    log::error!("reading the signalfd failed: {e}");
                    return None;
                }
            }
        }
    }

    /// Readable once shutdown is requested (for other threads' poll loops).
    pub fn fd(&self) -> BorrowedFd<'_> {
        evt_fd(&self.inner.evt)
    }

    pub fn requested(&self) -> bool {
        *self
            .inner
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn set_current(&self, conn: Option<UnixStream>) {
        *self.inner.current.lock().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    /// Waits until `fd` is readable or shutdown is requested; false on shutdown.
    fn wait_readable(&self, fd: BorrowedFd<'_>, timeout: Option<Duration>) -> bool {
        let timeout = match timeout {
            Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let mut fds = [
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(evt_fd(&self.inner.evt), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, timeout);
        !self.requested()
    }
}

/// Serves frontends from `endpoint` one at a time until shutdown is requested; with
/// `vmm_uid`, only a peer running as that uid (SO_PEERCRED) is served.
pub fn serve(endpoint: Endpoint, device: &Arc<Device>, shutdown: &Shutdown, vmm_uid: Option<u32>) {
    match endpoint {
        Endpoint::Listener(listener, bound) => {
            if let Err(e) = listener.set_nonblocking(true) {
                log::error!("cannot make the vhost-user listener non-blocking: {e}");
            }
            while shutdown.wait_readable(listener.as_fd(), None) {
                match listener.accept() {
                    Ok((stream, _)) => serve_one(stream, device, shutdown, vmm_uid),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => log::warn!("vhost-user accept failed: {e}"),
                }
            }
            if let Some((path, ino)) = bound {
                remove_own_socket(&path, ino);
            }
        }
        Endpoint::Connected(mut stream) => {
            if let Some(stream) = stream.take() {
                serve_one(stream, device, shutdown, vmm_uid);
            }
            log::warn!("the inherited vhost-user connection ended; waiting for SIGTERM");
            let _ = shutdown.wait_readable(evt_fd(&shutdown.inner.evt), None);
        }
        Endpoint::Connect(path) => {
            let mut backoff = RECONNECT_MIN;
            while !shutdown.requested() {
                match UnixStream::connect(&path) {
                    Ok(stream) => {
                        let started = std::time::Instant::now();
                        serve_one(stream, device, shutdown, vmm_uid);
                        if started.elapsed() < RECONNECT_MAX {
                            // The connection ended at once (a failing VMM, or vublk could not
                            // serve it): back off instead of spinning.
                            let _ =
                                shutdown.wait_readable(evt_fd(&shutdown.inner.evt), Some(backoff));
                            backoff = (backoff * 2).min(RECONNECT_MAX);
                        } else {
                            backoff = RECONNECT_MIN;
                        }
                    }
                    Err(e) => {
                        log::debug!("--connect {}: {e}; retrying in {backoff:?}", path.display());
                        let _ = shutdown.wait_readable(evt_fd(&shutdown.inner.evt), Some(backoff));
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                    }
                }
            }
        }
    }
}

/// Removes the socket file vublk bound, so no VMM finds a dead socket after vublk has gone;
/// but only if the path still names the file vublk created (a successor may have bound it).
fn remove_own_socket(path: &Path, ino: u64) {
    use std::os::unix::fs::MetadataExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == ino) {
        let _ = std::fs::remove_file(path);
    }
}

/// Serves one frontend until it disconnects or shutdown is requested.
fn serve_one(stream: UnixStream, device: &Arc<Device>, shutdown: &Shutdown, vmm_uid: Option<u32>) {
    let peer = stream.as_raw_fd();
    if let Some(want) = vmm_uid {
        match getsockopt(&stream, sockopt::PeerCredentials) {
            Ok(creds) if creds.uid() == want => {}
            Ok(creds) => {
                log::warn!(
                    "vhost-user connection from uid {} (pid {}) refused: --vmm-uid is {want}",
                    creds.uid(),
                    creds.pid()
                );
                return;
            }
            Err(e) => {
                log::warn!("vhost-user connection refused: cannot read its credentials: {e}");
                return;
            }
        }
    }
    if let Err(e) = stream.set_nonblocking(false) {
        log::warn!("vhost-user connection: cannot make it blocking: {e}");
        return;
    }
    let handler = match BlkHandler::new(Arc::clone(device)) {
        Ok(h) => Arc::new(Mutex::new(h)),
        Err(e) => {
            log::error!("cannot serve a vhost-user connection: {e}");
            return;
        }
    };
    shutdown.set_current(stream.try_clone().ok());
    if shutdown.requested() {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    let creds = getsockopt(&stream, sockopt::PeerCredentials).ok();
    log::info!(
        "vhost-user frontend connected (fd {peer}, pid {:?}, uid {:?})",
        creds.map(|c| c.pid()),
        creds.map(|c| c.uid())
    );
    device.set_connection(Some(ConnectionInfo {
        peer_pid: creds.map(|c| c.pid()),
        peer_uid: creds.map(|c| c.uid()),
        ..ConnectionInfo::default()
    }));
    device.events().emit(Event::VhostUserConnected {
        device: device.id().to_string(),
    });
    let peek = stream.try_clone();
    let mut requests = BackendReqHandler::from_stream(stream, Arc::clone(&handler));
    loop {
        // The vhost crate keeps SET_BACKEND_REQ_FD's fd to itself; look first and keep a copy.
        if let Ok(peek) = &peek {
            match peek_backend_req_fd(peek.as_fd()) {
                Ok(Some(fd)) => {
                    let (reply_ack, usable) = {
                        let h = handler.lock().unwrap_or_else(|e| e.into_inner());
                        (h.reply_ack(), h.config_change_negotiated())
                    };
                    if usable {
                        match BackendChannel::new(fd, reply_ack) {
                            Ok(channel) => device.set_channel(Some(channel)),
                            Err(e) => log::warn!("vhost-user backend channel unusable: {e}"),
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => log::debug!("vhost-user: cannot peek at the next message: {e}"),
            }
        }
        match requests.handle_request() {
            Ok(()) => {}
            Err(vhost::vhost_user::Error::Disconnected)
            | Err(vhost::vhost_user::Error::PartialMessage)
            | Err(vhost::vhost_user::Error::SocketBroken(_)) => {
                log::info!("vhost-user frontend disconnected");
                break;
            }
            Err(e) => {
                if shutdown.requested() {
                    break;
                }
                log::warn!("vhost-user message failed: {e}; closing the connection");
                break;
            }
        }
    }
    drop(requests);
    shutdown.set_current(None);
    device.set_channel(None);
    handler.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    device.set_connection(None);
    device.events().emit(Event::VhostUserDisconnected {
        device: device.id().to_string(),
    });
}

fn evt_fd(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the eventfd is owned by `evt`, which the returned borrow cannot outlive.
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}
