//! Receiving bytes and fds (SCM_RIGHTS) from a unix stream socket.
//!
//! Owns: one `recvmsg` with a control buffer for [`MAX_FDS_PER_MESSAGE`] fds, MSG_CMSG_CLOEXEC
//! so no received fd survives an exec, and the fate of the fds when the control buffer was too
//! small (MSG_CTRUNC): every fd that did arrive is closed at once and the truncation is reported
//! next to the bytes, which still count. It does not know what the bytes mean nor which command
//! the fds belong to (they attach to the next command parsed, which is the caller's business).

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{cmsg_space, recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

/// Most fds one message can carry: Linux's `SCM_MAX_FD` (253). A sender cannot pass more in one
/// `sendmsg` (EINVAL), so a control buffer of this size never truncates a well-formed message.
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Bytes of control buffer for [`MAX_FDS_PER_MESSAGE`] fds (`CMSG_SPACE`).
const CONTROL_BYTES: usize = cmsg_space::<[RawFd; MAX_FDS_PER_MESSAGE]>();

/// How many times a `recvmsg` interrupted by a signal is retried before EINTR is reported.
/// Signals are rare and this daemon handles few; a storm of them is worth reporting.
const EINTR_RETRIES: usize = 16;

/// A control buffer aligned for `cmsghdr`, which nix and the kernel read in place.
#[repr(C, align(8))]
struct ControlBuffer([u8; CONTROL_BYTES]);

const _: () = assert!(std::mem::align_of::<libc::cmsghdr>() <= 8);

/// What one `recvmsg` gave.
#[derive(Debug)]
pub struct Received {
    /// Bytes written to the caller's buffer; 0 means the peer closed the connection.
    pub bytes: usize,
    /// The fds that arrived, close-on-exec, in the sender's order; always empty when
    /// `truncated` is set.
    pub fds: Vec<OwnedFd>,
    /// The message carried more fds than the control buffer holds. The fds that did arrive are
    /// already closed; `bytes` are good and should be processed, and this error reported against
    /// the command the fds were meant for (the next one parsed).
    pub truncated: Option<FdsTruncated>,
}

/// A message carried more fds than fit; the ones that arrived were closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "a message on the socket carried more fds than the limit of {limit}: the {fds_closed} that arrived were closed"
)]
pub struct FdsTruncated {
    pub fds_closed: usize,
    pub limit: usize,
}

/// Why nothing could be received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The socket is non-blocking and has nothing to read yet.
    #[error("socket {sock} has nothing to read yet")]
    WouldBlock { sock: RawFd },
    #[error("cannot receive into an empty buffer from socket {sock}")]
    EmptyBuffer { sock: RawFd },
    #[error("receiving from socket {sock} failed")]
    Recv {
        sock: RawFd,
        #[source]
        source: Errno,
    },
}

/// Receives bytes into `buf` and the fds sent with them, from a unix stream socket that may be
/// blocking or not. See [`Received`] for a truncated message.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Received, RecvError> {
    let mut control = ControlBuffer([0; CONTROL_BYTES]);
    recv_into(sock, buf, &mut control.0, MAX_FDS_PER_MESSAGE)
}

/// [`recv_with_fds`] with a control buffer of the caller's size (tests provoke MSG_CTRUNC with
/// a small one); `limit` is the fd count reported on truncation. `control` must be zeroed and
/// start aligned for `cmsghdr`.
fn recv_into(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    control: &mut [u8],
    limit: usize,
) -> Result<Received, RecvError> {
    let raw_sock = sock.as_raw_fd();
    if buf.is_empty() {
        return Err(RecvError::EmptyBuffer { sock: raw_sock });
    }
    let flags = MsgFlags::MSG_CMSG_CLOEXEC;
    let mut attempts = 0;
    let (bytes, raw_fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<UnixAddr>(raw_sock, &mut iov, Some(&mut *control), flags) {
            Ok(msg) => {
                let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                // nix refuses to walk the control messages of a truncated message (ENOBUFS);
                // those fds are found by `fds_in_control` below instead.
                let raw_fds: Vec<RawFd> = match msg.cmsgs() {
                    Ok(cmsgs) => cmsgs
                        .filter_map(|cmsg| match cmsg {
                            ControlMessageOwned::ScmRights(fds) => Some(fds),
                            _ => None,
                        })
                        .flatten()
                        .collect(),
                    Err(_) => Vec::new(),
                };
                break (msg.bytes, raw_fds, truncated);
            }
            Err(Errno::EINTR) if attempts < EINTR_RETRIES => attempts += 1,
            Err(Errno::EAGAIN) => return Err(RecvError::WouldBlock { sock: raw_sock }),
            Err(source) => {
                return Err(RecvError::Recv {
                    sock: raw_sock,
                    source,
                })
            }
        }
    };
    let raw_fds = if truncated {
        fds_in_control(control)
    } else {
        raw_fds
    };
    let fds: Vec<OwnedFd> = raw_fds
        .into_iter()
        .filter(|&fd| fd >= 0)
        .map(|fd| {
            // SAFETY: `fd` comes from an SCM_RIGHTS control message the kernel wrote in this
            // `recvmsg`: the kernel installed it in this process's fd table just now, nothing
            // else in the process knows its number, and each number is taken exactly once here,
            // so the `OwnedFd` is its only owner.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect();
    if truncated {
        let fds_closed = fds.len();
        drop(fds);
        return Ok(Received {
            bytes,
            fds: Vec::new(),
            truncated: Some(FdsTruncated { fds_closed, limit }),
        });
    }
    Ok(Received {
        bytes,
        fds,
        truncated: None,
    })
}

/// Byte offsets of a `cmsghdr` (Linux, glibc and musl): `cmsg_len: size_t`, `cmsg_level: int`,
/// `cmsg_type: int`, then the data, each header aligned to `size_t`.
const CMSG_LEN_BYTES: usize = std::mem::size_of::<libc::size_t>();
const CMSG_HEADER_BYTES: usize = std::mem::size_of::<libc::cmsghdr>();

/// The fds in the SCM_RIGHTS messages of a control buffer the kernel filled, read without nix
/// (which refuses truncated buffers). On MSG_CTRUNC Linux still writes a well-formed header for
/// the fds that fit (`scm_detach_fds`), and the buffer was zeroed, so a zero length ends the walk.
fn fds_in_control(control: &[u8]) -> Vec<RawFd> {
    const FD_BYTES: usize = std::mem::size_of::<RawFd>();
    let mut fds = Vec::new();
    let mut at = 0;
    // Every header takes at least CMSG_HEADER_BYTES, so this bounds the walk.
    for _ in 0..control.len() / CMSG_HEADER_BYTES {
        let Some(header) = control
            .get(at..)
            .and_then(|rest| rest.get(..CMSG_HEADER_BYTES))
        else {
            break;
        };
        let (len, rest) = header.split_at(CMSG_LEN_BYTES);
        let (level, kind) = rest.split_at(std::mem::size_of::<libc::c_int>());
        let len = read_ne_usize(len);
        let level = read_ne_int(level);
        let kind = read_ne_int(kind);
        if len < CMSG_HEADER_BYTES {
            break;
        }
        let Some(data) = at
            .checked_add(len)
            .and_then(|end| control.get(at + CMSG_HEADER_BYTES..end))
        else {
            break;
        };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            fds.extend(data.chunks_exact(FD_BYTES).map(read_ne_int));
        }
        // CMSG_ALIGN: round up to size_t.
        let Some(next) = len
            .checked_add(CMSG_LEN_BYTES - 1)
            .map(|l| l & !(CMSG_LEN_BYTES - 1))
            .and_then(|l| at.checked_add(l))
        else {
            break;
        };
        at = next;
    }
    fds
}

fn read_ne_usize(bytes: &[u8]) -> usize {
    let mut raw = [0u8; CMSG_LEN_BYTES];
    raw.copy_from_slice(bytes);
    usize::from_ne_bytes(raw)
}

fn read_ne_int(bytes: &[u8]) -> libc::c_int {
    let mut raw = [0u8; std::mem::size_of::<libc::c_int>()];
    raw.copy_from_slice(bytes);
    libc::c_int::from_ne_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{ErrorKind, IoSlice, Read};
    use std::os::fd::{AsFd, AsRawFd};

    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use nix::sys::socket::{
        sendmsg, socketpair, AddressFamily, ControlMessage, SockFlag, SockType,
    };

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn send(sock: &OwnedFd, bytes: &[u8], fds: &[RawFd]) {
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let sent = sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(sent, bytes.len());
    }

    /// A pipe: copies of its write end are sent; the read end sees EOF once every copy is
    /// closed, which proves closing without counting the process's fds (tests run in parallel).
    struct CloseProbe {
        read: File,
        write: OwnedFd,
    }

    impl CloseProbe {
        fn new() -> CloseProbe {
            let (read, write) = nix::unistd::pipe().unwrap();
            fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
            CloseProbe {
                read: read.into(),
                write,
            }
        }

        /// Closes the sender's copy and says whether any other copy remains open.
        fn others_open(self) -> bool {
            let CloseProbe { mut read, write } = self;
            drop(write);
            match read.read(&mut [0u8; 1]) {
                Ok(0) => false,
                Err(e) if e.kind() == ErrorKind::WouldBlock => true,
                other => panic!("unexpected read from probe pipe: {other:?}"),
            }
        }
    }

    fn is_cloexec(fd: &OwnedFd) -> bool {
        fcntl(fd, FcntlArg::F_GETFD).unwrap() & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn one_fd_with_one_space_byte_as_qemu_qmp_sends_it() {
        let (tx, rx) = pair();
        let probe = CloseProbe::new();
        send(&tx, b" ", &[probe.write.as_raw_fd()]);
        let mut buf = [0u8; 64];

        let got = recv_with_fds(rx.as_fd(), &mut buf).unwrap();

        assert_eq!((got.bytes, &buf[..1]), (1, &b" "[..]));
        assert_eq!(got.fds.len(), 1);
        assert!(is_cloexec(&got.fds[0]));
        assert!(got.truncated.is_none());
        drop(got);
        assert!(!probe.others_open());
    }

    #[test]
    fn three_fds_with_a_command() {
        let (tx, rx) = pair();
        let probe = CloseProbe::new();
        let w = probe.write.as_raw_fd();
        let text = br#"{"execute": "add-fd", "arguments": {"fdset-id": 1}}"#;
        send(&tx, text, &[w, w, w]);
        let mut buf = [0u8; 256];

        let got = recv_with_fds(rx.as_fd(), &mut buf).unwrap();

        assert_eq!(&buf[..got.bytes], text);
        assert_eq!(got.fds.len(), 3);
        assert!(got.fds.iter().all(is_cloexec));
        drop(got);
        assert!(!probe.others_open());
    }

    #[test]
    fn two_hundred_fds_all_arrive() {
        let (tx, rx) = pair();
        let probe = CloseProbe::new();
        let many = vec![probe.write.as_raw_fd(); 200];
        send(&tx, b"x", &many);
        let mut buf = [0u8; 8];

        let got = recv_with_fds(rx.as_fd(), &mut buf).unwrap();

        assert_eq!(got.fds.len(), 200);
        assert!(got.truncated.is_none());
        assert!(got.fds.iter().all(is_cloexec));
        drop(got);
        assert!(!probe.others_open());
    }

    #[test]
    fn the_most_fds_a_sender_can_pass_all_arrive() {
        let (tx, rx) = pair();
        let probe = CloseProbe::new();
        let many = vec![probe.write.as_raw_fd(); MAX_FDS_PER_MESSAGE];
        send(&tx, b"x", &many);
        let mut buf = [0u8; 8];

        let got = recv_with_fds(rx.as_fd(), &mut buf).unwrap();

        assert_eq!(got.fds.len(), MAX_FDS_PER_MESSAGE);
        assert!(got.truncated.is_none());
        drop(got);
        assert!(!probe.others_open());
    }

    #[test]
    fn truncated_message_closes_arrived_fds_and_keeps_the_bytes() {
        let (tx, rx) = pair();
        let probe = CloseProbe::new();
        let w = probe.write.as_raw_fd();
        send(&tx, b"{}", &[w, w, w, w, w]);
        // CMSG_SPACE of one fd is 24 bytes on x86_64, which the kernel fills with up to two.
        let mut control = ControlBuffer([0; CONTROL_BYTES]);
        let small = cmsg_space::<RawFd>();
        let mut buf = [0u8; 8];

        let got = recv_into(rx.as_fd(), &mut buf, &mut control.0[..small], 1).unwrap();

        assert_eq!(&buf[..got.bytes], b"{}");
        assert!(got.fds.is_empty());
        let truncated = got.truncated.unwrap();
        assert!(truncated.fds_closed >= 1, "{truncated:?}");
        assert!(!probe.others_open());
    }

    #[test]
    fn truncated_message_with_no_control_room_at_all() {
        let (tx, rx) = pair();
        let probe = CloseProbe::new();
        send(&tx, b"{}", &[probe.write.as_raw_fd()]);
        let mut control = ControlBuffer([0; CONTROL_BYTES]);
        let mut buf = [0u8; 8];

        let got = recv_into(rx.as_fd(), &mut buf, &mut control.0[..0], 0).unwrap();

        assert_eq!(got.bytes, 2);
        assert_eq!(
            got.truncated,
            Some(FdsTruncated {
                fds_closed: 0,
                limit: 0
            })
        );
        assert!(!probe.others_open());
    }

    #[test]
    fn bytes_without_fds() {
        let (tx, rx) = pair();
        send(&tx, b"hello", &[]);
        let mut buf = [0u8; 8];

        let got = recv_with_fds(rx.as_fd(), &mut buf).unwrap();

        assert_eq!((got.bytes, got.fds.len()), (5, 0));
    }

    #[test]
    fn fds_attach_to_their_own_message_only() {
        let (tx, rx) = pair();
        let probe = CloseProbe::new();
        send(&tx, b" ", &[probe.write.as_raw_fd()]);
        send(&tx, b"{}", &[]);
        let mut buf = [0u8; 64];

        let first = recv_with_fds(rx.as_fd(), &mut buf).unwrap();
        let second = recv_with_fds(rx.as_fd(), &mut buf).unwrap();

        assert_eq!((first.bytes, first.fds.len()), (1, 1));
        assert_eq!((second.bytes, second.fds.len()), (2, 0));
    }

    #[test]
    fn peer_closed_gives_zero_bytes() {
        let (tx, rx) = pair();
        drop(tx);
        let mut buf = [0u8; 8];

        let got = recv_with_fds(rx.as_fd(), &mut buf).unwrap();

        assert_eq!((got.bytes, got.fds.len()), (0, 0));
    }

    #[test]
    fn nonblocking_socket_with_nothing_to_read_would_block() {
        let (_tx, rx) = pair();
        fcntl(&rx, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        let mut buf = [0u8; 8];

        let err = recv_with_fds(rx.as_fd(), &mut buf).unwrap_err();

        assert!(matches!(err, RecvError::WouldBlock { sock } if sock == rx.as_raw_fd()));
    }

    #[test]
    fn empty_buffer_is_refused_rather_than_read_as_eof() {
        let (_tx, rx) = pair();

        let err = recv_with_fds(rx.as_fd(), &mut []).unwrap_err();

        assert!(matches!(err, RecvError::EmptyBuffer { .. }));
    }

    #[test]
    fn control_walk_reads_fds_and_stops_at_zeroed_header() {
        let mut control = ControlBuffer([0; CONTROL_BYTES]);
        let header = &mut control.0[..];
        let len = CMSG_HEADER_BYTES + 2 * 4;
        header[..CMSG_LEN_BYTES].copy_from_slice(&len.to_ne_bytes());
        header[CMSG_LEN_BYTES..CMSG_LEN_BYTES + 4].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        header[CMSG_LEN_BYTES + 4..CMSG_HEADER_BYTES]
            .copy_from_slice(&libc::SCM_RIGHTS.to_ne_bytes());
        header[CMSG_HEADER_BYTES..CMSG_HEADER_BYTES + 4].copy_from_slice(&7i32.to_ne_bytes());
        header[CMSG_HEADER_BYTES + 4..len].copy_from_slice(&9i32.to_ne_bytes());

        let fds = fds_in_control(&control.0);

        assert_eq!(fds, [7, 9]);
    }

    #[test]
    fn control_walk_ignores_a_length_past_the_buffer() {
        let mut control = [0u8; 32];
        control[..CMSG_LEN_BYTES].copy_from_slice(&usize::MAX.to_ne_bytes());

        let fds = fds_in_control(&control);

        assert!(fds.is_empty());
    }
}
