//! The backend-to-frontend channel (vhost-user "back-end communication"), used for one
//! message: `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, after a resize or medium change.
//!
//! The `vhost` crate parses `VHOST_USER_SET_BACKEND_REQ_FD` itself and hands the handler a
//! `Backend` that has no way to send this message. So the connection loop peeks at each
//! message's header before the crate reads it ([`peek_backend_req_fd`]); for that one request
//! it peeks the ancillary data too, which gives vublk its own copy of the channel's fd (a
//! peek installs a duplicate and leaves the message for the crate). Sending is then a
//! 12-byte header with no payload, and with REPLY_ACK negotiated, reading the frontend's
//! `u64` reply. It does not know about disks or QMP.

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// `VHOST_USER_SET_BACKEND_REQ_FD` (front-end message 21).
const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (back-end message 2).
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: version 1 in bits 0-1; bit 3 asks for a reply (REPLY_ACK).
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Header flag bit 2 marks a reply.
const FLAG_REPLY: u32 = 0x4;
/// How long to wait for the frontend's acknowledgement: QEMU answers from its main loop at
/// once; a frontend that does not answer must not hold the control thread.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Looks at the next message on the vhost-user connection without consuming it; when it is
/// SET_BACKEND_REQ_FD, returns a duplicate of the fd it carries. Blocks until a header
/// arrives; `Ok(None)` for any other message (or end of stream: the crate then sees it too).
pub fn peek_backend_req_fd(conn: BorrowedFd<'_>) -> nix::Result<Option<OwnedFd>> {
    let mut header = [0u8; 4];
    let got = nix::sys::socket::recv(conn.as_raw_fd(), &mut header, MsgFlags::MSG_PEEK)?;
    if got < header.len() || u32::from_le_bytes(header) != SET_BACKEND_REQ_FD {
        return Ok(None);
    }
    let mut iov = [IoSliceMut::new(&mut header)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_PEEK | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut found = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in this process for this peek; nothing
                // else owns it, so wrapping it once is sound (extra ones are closed on drop).
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if found.is_none() {
                    found = Some(owned);
                }
            }
        }
    }
    Ok(found)
}

/// vublk's end of the backend channel.
pub struct BackendChannel {
    sock: UnixStream,
    reply_ack: bool,
}

/// Why a notification could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot write to the backend channel")]
    Send(#[source] std::io::Error),
    #[error("no acknowledgement from the frontend")]
    Reply(#[source] std::io::Error),
    #[error("the frontend refused the message (reply {0})")]
    Refused(u64),
    #[error("the frontend's reply is malformed")]
    BadReply,
}

impl BackendChannel {
    /// `reply_ack`: VHOST_USER_PROTOCOL_F_REPLY_ACK was negotiated.
    pub fn new(fd: OwnedFd, reply_ack: bool) -> std::io::Result<BackendChannel> {
        let sock = UnixStream::from(fd);
        sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
        sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(BackendChannel { sock, reply_ack })
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG and, with REPLY_ACK, waits for the answer.
    pub fn send_config_change(&mut self) -> Result<(), ChannelError> {
        let flags = FLAG_VERSION_1 | if self.reply_ack { FLAG_NEED_REPLY } else { 0 };
        let header = encode_header(BACKEND_CONFIG_CHANGE_MSG, flags, 0);
        self.sock.write_all(&header).map_err(ChannelError::Send)?;
        if !self.reply_ack {
            return Ok(());
        }
        let mut reply = [0u8; 20];
        self.sock
            .read_exact(&mut reply)
            .map_err(ChannelError::Reply)?;
        decode_ack(&reply, BACKEND_CONFIG_CHANGE_MSG)
    }
}

fn encode_header(request: u32, flags: u32, size: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&request.to_le_bytes());
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}

/// Checks a REPLY_ACK answer: a reply to `request` carrying a u64 that is 0 on success.
fn decode_ack(reply: &[u8; 20], request: u32) -> Result<(), ChannelError> {
    let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    if word(0) != request || word(4) & FLAG_REPLY == 0 || word(8) != 8 {
        return Err(ChannelError::BadReply);
    }
    let mut value = [0u8; 8];
    value.copy_from_slice(&reply[12..20]);
    match u64::from_le_bytes(value) {
        0 => Ok(()),
        v => Err(ChannelError::Refused(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_peek_finds_the_channel_fd_and_leaves_the_message() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let (channel_a, _channel_b) = UnixStream::pair().expect("socketpair");
        let header = encode_header(SET_BACKEND_REQ_FD, FLAG_VERSION_1, 0);
        let iov = [std::io::IoSlice::new(&header)];
        let fds = [channel_a.as_raw_fd()];
        nix::sys::socket::sendmsg::<()>(
            theirs.as_raw_fd(),
            &iov,
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        let dup = peek_backend_req_fd(ours.as_fd())
            .expect("peek")
            .expect("an fd");
        assert_ne!(dup.as_raw_fd(), channel_a.as_raw_fd());
        // The message is still there, whole, for the vhost crate.
        let mut again = [0u8; 12];
        let n = nix::sys::socket::recv(ours.as_raw_fd(), &mut again, MsgFlags::MSG_DONTWAIT)
            .expect("recv");
        assert_eq!(n, 12);
        assert_eq!(again, header);
    }

    #[test]
    fn other_messages_yield_no_fd() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        (&theirs)
            .write_all(&encode_header(1, FLAG_VERSION_1, 0))
            .expect("write");
        assert!(peek_backend_req_fd(ours.as_fd()).expect("peek").is_none());
    }

    #[test]
    fn config_change_is_sent_and_its_ack_checked() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let mut channel = BackendChannel::new(OwnedFd::from(ours), true).expect("channel");
        let frontend = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut h = [0u8; 12];
            theirs.read_exact(&mut h).expect("header");
            let mut reply =
                encode_header(BACKEND_CONFIG_CHANGE_MSG, FLAG_VERSION_1 | FLAG_REPLY, 8).to_vec();
            reply.extend_from_slice(&0u64.to_le_bytes());
            theirs.write_all(&reply).expect("reply");
            h
        });
        channel.send_config_change().expect("acknowledged");
        let h = frontend.join().expect("frontend");
        assert_eq!(h, encode_header(BACKEND_CONFIG_CHANGE_MSG, 0x9, 0));
    }

    #[test]
    fn a_refusal_or_garbage_reply_is_an_error() {
        let mut reply = [0u8; 20];
        reply[..12].copy_from_slice(&encode_header(2, 0x5, 8));
        reply[12] = 1;
        assert!(matches!(
            decode_ack(&reply, 2),
            Err(ChannelError::Refused(1))
        ));
        reply[..12].copy_from_slice(&encode_header(3, 0x5, 8));
        assert!(matches!(decode_ack(&reply, 2), Err(ChannelError::BadReply)));
    }
}
