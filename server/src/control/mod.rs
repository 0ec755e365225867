//! The manager's control socket: a QMP server on one thread.
//!
//! One thread polls the listening socket, every client, the event queue and the shutdown
//! eventfd. Sockets are non-blocking and every client has its own input splitter and output
//! buffer, so a client that sends half a command, or never reads its replies, holds up
//! neither I/O (which never touches this thread) nor other clients; a client whose unread
//! output passes [`MAX_PENDING_OUTPUT`] is disconnected. Fds arriving with SCM_RIGHTS wait
//! for the next command the client sends and are closed if it does not take them.
//!
//! The wire format is in `framing.rs` and `qmp.rs`, the commands in `commands.rs`; this
//! module owns sockets and the loop.

mod commands;
mod framing;
mod qmp;

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt, SockType};
use vublk_fdset::{check_socket_fd, recv_with_fds, FdError, FdStatus, FdsTruncated, RecvError};

use crate::config::{ControlSocket, DiskConfig};
use crate::device::Device;
use crate::fds::ManagerFds;
use crate::vhost_user::connection::Shutdown;
use commands::{Outcome, State};
use framing::JsonSplitter;

/// Clients connected at once; more wait in the listen backlog until one leaves.
const MAX_CLIENTS: usize = 8;
/// Unread replies and events one client may leave queued before it is disconnected.
const MAX_PENDING_OUTPUT: usize = 4 << 20;
/// Bytes read per receive.
const READ_CHUNK: usize = 64 << 10;
/// Fds a client may have sent that no command took yet; past this they are closed at once.
const MAX_PENDING_FDS: usize = vublk_fdset::MAX_FDS_PER_MESSAGE;

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("--control {path}: cannot listen")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--control {path}: exists and is not a socket; refusing to replace it")]
    NotASocketPath { path: PathBuf },
    #[error("--control fd:{fd}")]
    Fd {
        fd: RawFd,
        #[source]
        source: FdError,
    },
    #[error("--control fd:{fd}: not a unix stream socket")]
    NotUnixStream { fd: RawFd },
    #[error("--control fd:{fd}: cannot query the socket")]
    Query {
        fd: RawFd,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start the control thread")]
    Thread(#[source] io::Error),
}

/// A prepared control socket.
pub enum ControlEndpoint {
    /// Listening; with the path vublk bound (removed again on exit) and its inode.
    Listener(UnixListener, Option<(PathBuf, u64)>),
    /// An inherited connected socket: one client, served until it leaves.
    Connected(UnixStream),
}

impl ControlEndpoint {
    /// Binds the path or validates the inherited fd; called during setup.
    pub fn prepare(socket: &ControlSocket) -> Result<ControlEndpoint, ControlError> {
        match socket {
            ControlSocket::Listen(path) => {
                match std::fs::symlink_metadata(path) {
                    Ok(meta) if meta.file_type().is_socket() => {
                        let _ = std::fs::remove_file(path);
                    }
                    Ok(_) => return Err(ControlError::NotASocketPath { path: path.clone() }),
                    Err(_) => {}
                }
                let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
                    path: path.clone(),
                    source,
                })?;
                let ino = std::fs::symlink_metadata(path)
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .ok();
                Ok(ControlEndpoint::Listener(
                    listener,
                    ino.map(|ino| (path.clone(), ino)),
                ))
            }
            ControlSocket::Inherited(fd) => {
                let fd = *fd;
                let status =
                    FdStatus::of_raw(fd).map_err(|source| ControlError::Fd { fd, source })?;
                check_socket_fd(&status).map_err(|source| ControlError::Fd { fd, source })?;
                // SAFETY: `fd` is open (just inspected) and handed to vublk as its control
                // socket; nothing else in this process owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                let query = |source| ControlError::Query { fd, source };
                if getsockopt(&owned, sockopt::SockType).map_err(query)? != SockType::Stream {
                    return Err(ControlError::NotUnixStream { fd });
                }
                nix::fcntl::fcntl(
                    owned.as_fd(),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                )
                .map_err(query)?;
                if getsockopt(&owned, sockopt::AcceptConn).map_err(query)? {
                    Ok(ControlEndpoint::Listener(UnixListener::from(owned), None))
                } else {
                    Ok(ControlEndpoint::Connected(UnixStream::from(owned)))
                }
            }
        }
    }
}

/// Starts the control thread.
pub fn spawn(
    endpoint: ControlEndpoint,
    device: Arc<Device>,
    fds: ManagerFds,
    template: DiskConfig,
    shutdown: Shutdown,
    tray_open: bool,
) -> Result<JoinHandle<()>, ControlError> {
    std::thread::Builder::new()
        .name("vublk-control".into())
        .spawn(move || {
            crate::sandbox::seccomp::enter(crate::sandbox::seccomp::Role::Control);
            let mut server = Server {
                state: State::new(device, fds, template, tray_open),
                clients: Vec::new(),
                next_client: 0,
            };
            server.run(endpoint, &shutdown);
        })
        .map_err(ControlError::Thread)
}

/// One control connection.
struct Client {
    id: u64,
    stream: UnixStream,
    input: JsonSplitter,
    output: VecDeque<u8>,
    /// `qmp_capabilities` done: commands are accepted and events are sent.
    negotiated: bool,
    /// Fds received and not yet taken by a command.
    fds: Vec<OwnedFd>,
    /// A receive brought more fds than fit; reported against the next command.
    truncated: Option<FdsTruncated>,
    closing: bool,
}

struct Server {
    state: State,
    clients: Vec<Client>,
    next_client: u64,
}

impl Server {
    fn run(&mut self, endpoint: ControlEndpoint, shutdown: &Shutdown) {
        let (listener, bound) = match endpoint {
            ControlEndpoint::Listener(l, bound) => (Some(l), bound),
            ControlEndpoint::Connected(stream) => {
                self.add_client(stream);
                (None, None)
            }
        };
        if let Some(l) = &listener {
            if let Err(e) = l.set_nonblocking(true) {
                log::error!("control: cannot make the listener non-blocking: {e}");
            }
        }
        while !shutdown.requested() && !self.state.quit_requested() {
            self.poll_once(listener.as_ref(), shutdown);
        }
        // Replies to `quit` go out before the sockets close, as far as each client reads them
        // now: a client that does not read must not hold up the exit.
        for client in &mut self.clients {
            flush_output(client);
        }
        if self.state.quit_requested() {
            shutdown.request();
        }
        if let Some((path, ino)) = bound {
            use std::os::unix::fs::MetadataExt;
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == ino) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    fn poll_once(&mut self, listener: Option<&UnixListener>, shutdown: &Shutdown) {
        let device = Arc::clone(self.state.device());
        let events = device.events();
        let mut pollfds = vec![
            PollFd::new(shutdown.fd(), PollFlags::POLLIN),
            PollFd::new(events.fd(), PollFlags::POLLIN),
        ];
        let accepting = listener.filter(|_| self.clients.len() < MAX_CLIENTS);
        if let Some(l) = accepting {
            pollfds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        let first_client = pollfds.len();
        for client in &self.clients {
            let mut flags = PollFlags::POLLIN;
            if !client.output.is_empty() {
                flags |= PollFlags::POLLOUT;
            }
            // SAFETY: the stream outlives this poll call (the borrow ends with `pollfds`).
            let fd = unsafe { BorrowedFd::borrow_raw(client.stream.as_raw_fd()) };
            pollfds.push(PollFd::new(fd, flags));
        }
        if let Err(e) = poll(&mut pollfds, PollTimeout::NONE) {
            if e != nix::Error::EINTR {
                log::error!("control: poll failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            return;
        }
        let ready: Vec<PollFlags> = pollfds
            .iter()
            .map(|p| p.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(pollfds);
        if !ready[1].is_empty() {
            self.broadcast_events();
        }
        if let Some(l) = accepting {
            if !ready[2].is_empty() {
                self.accept(l);
            }
        }
        let count = self.clients.len();
        for (i, flags) in ready[first_client..].iter().enumerate().take(count) {
            if flags.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                self.read_client(i, shutdown);
            }
        }
        for client in &mut self.clients {
            flush_output(client);
        }
        self.clients.retain(|c| {
            if c.closing {
                log::info!("control: client {} left", c.id);
            }
            !c.closing
        });
    }

    fn accept(&mut self, listener: &UnixListener) {
        match listener.accept() {
            Ok((stream, _)) => self.add_client(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::warn!("control: accept failed: {e}"),
        }
    }

    fn add_client(&mut self, stream: UnixStream) {
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("control: cannot make a client non-blocking: {e}");
            return;
        }
        let id = self.next_client;
        self.next_client += 1;
        log::info!("control: client {id} connected");
        let mut client = Client {
            id,
            stream,
            input: JsonSplitter::new(),
            output: VecDeque::new(),
            negotiated: false,
            fds: Vec::new(),
            truncated: None,
            closing: false,
        };
        queue_output(
            &mut client,
            &qmp::greeting(commands::VERSION, commands::PACKAGE),
        );
        self.clients.push(client);
    }

    /// Reads what the client sent and runs every complete command in it.
    fn read_client(&mut self, index: usize, shutdown: &Shutdown) {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let Some(client) = self.clients.get_mut(index) else {
                return;
            };
            if client.closing {
                return;
            }
            match recv_with_fds(client.stream.as_fd(), &mut buf) {
                Ok(received) => {
                    if received.bytes == 0 && received.fds.is_empty() {
                        client.closing = true;
                        return;
                    }
                    if let Some(t) = received.truncated {
                        log::warn!("control: client {}: {t}", client.id);
                        client.truncated = Some(t);
                    }
                    for fd in received.fds {
                        if client.fds.len() < MAX_PENDING_FDS {
                            client.fds.push(fd);
                        } else {
                            client.truncated = Some(FdsTruncated {
                                fds_closed: 1,
                                limit: MAX_PENDING_FDS,
                            });
                        }
                    }
                    client.input.push(&buf[..received.bytes]);
                    self.run_commands(index, shutdown);
                    if received.bytes < buf.len() {
                        return;
                    }
                }
                Err(RecvError::WouldBlock { .. }) => return,
                Err(e) => {
                    log::info!("control: client {}: {e}", client.id);
                    client.closing = true;
                    return;
                }
            }
        }
    }

    fn run_commands(&mut self, index: usize, shutdown: &Shutdown) {
        loop {
            let Some(client) = self.clients.get_mut(index) else {
                return;
            };
            let Some(frame) = client.input.next() else {
                return;
            };
            let reply = match frame {
                Err(e) => {
                    // Fds sent for a command that could not even be read are not kept for
                    // the next one.
                    client.fds.clear();
                    client.truncated = None;
                    qmp::frame_error_reply(&e)
                }
                Ok(bytes) => {
                    let fds = std::mem::take(&mut client.fds);
                    let truncated = client.truncated.take();
                    let negotiated = client.negotiated;
                    let outcome = self.state.execute(&bytes, negotiated, fds, truncated);
                    let Some(client) = self.clients.get_mut(index) else {
                        return;
                    };
                    match outcome {
                        Outcome::Reply(v) => v,
                        Outcome::Negotiated(v) => {
                            client.negotiated = true;
                            v
                        }
                        Outcome::Quit(v) => {
                            queue_output(client, &v);
                            shutdown.request();
                            return;
                        }
                    }
                }
            };
            let Some(client) = self.clients.get_mut(index) else {
                return;
            };
            queue_output(client, &reply);
            // Events a command caused (tray moves) go out right after its reply.
            self.broadcast_events();
        }
    }

    fn broadcast_events(&mut self) {
        let (events, dropped) = self.state.device().events().drain();
        if dropped > 0 {
            log::warn!("control: {dropped} events were dropped (no client read them in time)");
        }
        for stamped in events {
            let (name, data) = stamped.event.to_qmp();
            let message = qmp::event(name, Some(data), stamped.at);
            for client in self.clients.iter_mut().filter(|c| c.negotiated) {
                queue_output(client, &message);
            }
        }
    }
}

fn queue_output(client: &mut Client, message: &serde_json::Value) {
    let mut line = qmp::to_line(message);
    if client.output.len() + line.len() > MAX_PENDING_OUTPUT {
        log::warn!(
            "control: client {} does not read its replies; disconnecting it",
            client.id
        );
        client.closing = true;
        return;
    }
    client.output.extend(line.drain(..));
}

fn flush_output(client: &mut Client) {
    while !client.output.is_empty() && !client.closing {
        let (front, _) = client.output.as_slices();
        match client.stream.write(front) {
            Ok(0) => {
                client.closing = true;
            }
            Ok(n) => {
                client.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => client.closing = true,
        }
    }
}
