//! In-flight requests and their I/O operations: what each SQE is doing, how far it got, and
//! what a completion result means for it. The decisions in [`classify`] are pure and
//! unit-tested; the worker applies them.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};

pub use vublk_formats::AlignedBuf;

use crate::virtio_blk::request::Segment;

/// What an operation asks of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    /// fdatasync.
    Flush,
    /// fallocate(PUNCH_HOLE | KEEP_SIZE); unsupported means "nothing to do".
    Discard,
    /// fallocate(ZERO_RANGE or PUNCH_HOLE, KEEP_SIZE); unsupported falls back to writing zeroes.
    ZeroRange {
        punch: bool,
    },
    /// Writing zeroes from the worker's zero buffer, chunk by chunk.
    WriteZeroBuffer,
    /// Reading into the op's own buffer for the worker to use ([`ReadPurpose`]), not into
    /// guest memory.
    ReadInto,
}

/// What a [`OpKind::ReadInto`] read is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPurpose {
    /// A metadata table the layer asked for.
    Table(vublk_formats::TableLoad),
    /// A compressed cluster: the stream starts `input_skip` bytes into the buffer and is
    /// `input_len` long; the guest wants `len` bytes from `cluster_skip` of the decompressed
    /// cluster.
    Compressed {
        algorithm: vublk_formats::qcow2::CompressionType,
        cluster_size: u64,
        input_skip: u64,
        input_len: u64,
        cluster_skip: u64,
    },
}

/// One operation on one file.
pub struct IoOp {
    pub kind: OpKind,
    /// Fixed-file index.
    pub file: u32,
    /// File offset of the next byte to transfer.
    pub offset: u64,
    /// Bytes still to transfer (or to fallocate).
    pub remaining: u64,
    pub total: u64,
    /// The remaining buffers (reads and writes).
    pub iov: Vec<libc::iovec>,
    /// The guest bytes this op covers, for bounce copy-out and zero fill at end of file.
    pub guest: Vec<Segment>,
    /// Set when O_DIRECT alignment forced a copy, and for [`OpKind::ReadInto`].
    pub bounce: Option<AlignedBuf>,
    pub purpose: Option<ReadPurpose>,
    pub done: bool,
}

impl IoOp {
    pub fn new(kind: OpKind, file: u32, offset: u64, len: u64) -> IoOp {
        IoOp {
            kind,
            file,
            offset,
            remaining: len,
            total: len,
            iov: Vec::new(),
            guest: Vec::new(),
            bounce: None,
            purpose: None,
            done: false,
        }
    }
}

/// A popped descriptor chain being served.
pub struct InFlight {
    pub head: u16,
    pub status_addr: GuestAddress,
    /// Keeps guest memory mapped while the kernel may still write into it.
    pub mem: Arc<GuestMemoryMmap>,
    pub ops: Vec<IoOp>,
    pub pending: usize,
    pub status: u8,
    /// Bytes written into device-writable buffers, status byte excluded.
    pub written: u32,
    /// The request, kept so it can be planned again after a table load.
    pub request: Option<crate::virtio_blk::request::Op>,
    /// Table loads so far, the distinct tables among them, and how often a table had to be
    /// loaded again: these bound the map/load loop.
    pub loads: u32,
    pub loaded: std::collections::HashSet<(vublk_formats::FileId, u64)>,
    pub repeated_loads: u32,
    /// Bytes of op buffers this request holds (counted against the queue's budget).
    pub buffer_bytes: u64,
    /// When the request was popped, for latency accounting.
    pub started: std::time::Instant,
}

/// What to do after a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The op is finished successfully.
    Done,
    /// The op failed with this errno.
    Failed(i32),
    /// Submit the (advanced) op again.
    Resubmit,
    /// The fd is O_NONBLOCK and io_uring said EAGAIN: do it synchronously.
    Synchronous,
    /// A read hit end of file: the rest reads as zeroes.
    ZeroFillRest,
    /// fallocate cannot zero this file: write zeroes instead.
    FallBackToWrite,
}

/// Decides what a completion `res` means for `op`, advancing it on partial transfers.
/// `nonblock`: the op's fd has O_NONBLOCK.
pub fn classify(op: &mut IoOp, res: i32, nonblock: bool) -> Next {
    if res < 0 {
        let errno = -res;
        return match (errno, op.kind) {
            (libc::EINTR, _) => Next::Resubmit,
            (libc::EAGAIN, _) if nonblock => Next::Synchronous,
            (libc::EAGAIN, _) => Next::Resubmit,
            (libc::EOPNOTSUPP, OpKind::Discard) => Next::Done,
            (libc::EOPNOTSUPP | libc::EINVAL, OpKind::ZeroRange { .. }) => Next::FallBackToWrite,
            (errno, _) => Next::Failed(errno),
        };
    }
    match op.kind {
        OpKind::Flush | OpKind::Discard | OpKind::ZeroRange { .. } => Next::Done,
        OpKind::Read | OpKind::ReadInto | OpKind::Write | OpKind::WriteZeroBuffer => {
            let n = u64::try_from(res).unwrap_or(0);
            if n == 0 && op.remaining > 0 {
                return if matches!(op.kind, OpKind::Read | OpKind::ReadInto) {
                    Next::ZeroFillRest
                } else {
                    Next::Failed(libc::ENOSPC)
                };
            }
            let n = n.min(op.remaining);
            op.remaining -= n;
            op.offset += n;
            if op.kind != OpKind::WriteZeroBuffer {
                super::segments::advance(&mut op.iov, usize::try_from(n).unwrap_or(usize::MAX));
            }
            if op.remaining == 0 {
                Next::Done
            } else {
                Next::Resubmit
            }
        }
    }
}

/// Whether a request needing `need` bytes of buffers may start while `in_use` bytes are held:
/// within `max`, or alone (so a request larger than the budget still makes progress).
pub fn admit_buffers(in_use: u64, need: u64, max: u64) -> bool {
    need == 0 || in_use == 0 || in_use.saturating_add(need) <= max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, len: u64) -> IoOp {
        IoOp::new(kind, 0, 4096, len)
    }

    #[test]
    fn full_transfer_is_done() {
        let mut o = op(OpKind::Read, 4096);
        assert_eq!(classify(&mut o, 4096, false), Next::Done);
        assert_eq!(o.remaining, 0);
    }

    #[test]
    fn short_transfer_advances_and_resubmits() {
        let mut o = op(OpKind::Write, 4096);
        assert_eq!(classify(&mut o, 1024, false), Next::Resubmit);
        assert_eq!((o.offset, o.remaining), (4096 + 1024, 3072));
    }

    #[test]
    fn read_at_eof_zero_fills_and_write_of_zero_bytes_fails() {
        let mut r = op(OpKind::Read, 4096);
        assert_eq!(classify(&mut r, 0, false), Next::ZeroFillRest);
        let mut w = op(OpKind::Write, 4096);
        assert_eq!(classify(&mut w, 0, false), Next::Failed(libc::ENOSPC));
    }

    #[test]
    fn eagain_on_nonblocking_fd_goes_synchronous() {
        let mut o = op(OpKind::Read, 4096);
        assert_eq!(classify(&mut o, -libc::EAGAIN, true), Next::Synchronous);
        assert_eq!(classify(&mut o, -libc::EAGAIN, false), Next::Resubmit);
        assert_eq!(classify(&mut o, -libc::EINTR, true), Next::Resubmit);
    }

    #[test]
    fn unsupported_discard_is_done_and_zero_range_falls_back() {
        let mut d = op(OpKind::Discard, 4096);
        assert_eq!(classify(&mut d, -libc::EOPNOTSUPP, false), Next::Done);
        let mut z = op(OpKind::ZeroRange { punch: false }, 4096);
        assert_eq!(
            classify(&mut z, -libc::EOPNOTSUPP, false),
            Next::FallBackToWrite
        );
    }

    #[test]
    fn io_errors_fail_with_their_errno() {
        let mut o = op(OpKind::Write, 4096);
        assert_eq!(classify(&mut o, -libc::EIO, false), Next::Failed(libc::EIO));
        let mut f = op(OpKind::Flush, 0);
        assert_eq!(
            classify(&mut f, -libc::ENOSPC, false),
            Next::Failed(libc::ENOSPC)
        );
    }

    #[test]
    fn buffer_budget_admits_within_max_or_alone() {
        assert!(
            admit_buffers(0, 100 << 20, 32 << 20),
            "alone, even past the budget"
        );
        assert!(admit_buffers(16 << 20, 16 << 20, 32 << 20));
        assert!(!admit_buffers(16 << 20, (16 << 20) + 1, 32 << 20));
        assert!(admit_buffers(u64::MAX, 0, 32 << 20), "no buffers needed");
        assert!(!admit_buffers(u64::MAX, 1, 32 << 20), "no overflow");
    }
}
