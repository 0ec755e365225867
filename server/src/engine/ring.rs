//! One io_uring, restricted to the operations vublk uses on the files it registered.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, register::Restriction, squeue, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a ring could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("io_uring is unavailable (disabled by kernel.io_uring_disabled, a seccomp profile, or a kernel without it): {source}")]
    Unavailable {
        #[source]
        source: io::Error,
    },
    #[error("queue {queue}: io_uring setup step '{step}' failed")]
    Setup {
        queue: u16,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The opcodes a queue ring may run. Everything else is refused by the kernel once the ring
/// is enabled (IORING_REGISTER_RESTRICTIONS), so a bug cannot turn the ring into a way to
/// open files or sockets.
const ALLOWED_OPCODES: [u8; 6] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Write::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
    opcode::Nop::CODE,
];

/// A queue's ring with its completion eventfd and submission backlog.
pub struct QueueRing {
    ring: IoUring,
    completion_evt: EventFd,
    /// Entries that did not fit in the submission queue; pushed first on the next submit.
    backlog: VecDeque<squeue::Entry>,
}

impl QueueRing {
    /// Creates a ring of `entries` SQEs for `queue`, registers `files` as fixed files 0..n and
    /// the completion eventfd, restricts it to [`ALLOWED_OPCODES`] on fixed files, and enables it.
    pub fn new(queue: u16, entries: u32, files: &[RawFd]) -> Result<QueueRing, EngineError> {
        let step = |step| {
            move |source| EngineError::Setup {
                queue,
                step,
                source,
            }
        };
        let mut builder = IoUring::builder();
        builder
            .setup_r_disabled()
            .setup_coop_taskrun()
            .setup_single_issuer();
        let ring = match builder.build(entries) {
            Ok(ring) => ring,
            // Older kernels lack COOP_TASKRUN/SINGLE_ISSUER: retry with only R_DISABLED.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
                .setup_r_disabled()
                .build(entries)
                .map_err(|source| EngineError::Unavailable { source })?,
            Err(source) => return Err(EngineError::Unavailable { source }),
        };
        let completion_evt = EventFd::new(EFD_NONBLOCK).map_err(step("eventfd"))?;
        let submitter = ring.submitter();
        submitter
            .register_eventfd(completion_evt.as_raw_fd())
            .map_err(step("register eventfd"))?;
        if !files.is_empty() {
            submitter
                .register_files(files)
                .map_err(step("register files"))?;
        }
        let mut restrictions: Vec<Restriction> = ALLOWED_OPCODES
            .iter()
            .map(|&op| Restriction::sqe_op(op))
            .collect();
        restrictions.push(Restriction::register_op(
            io_uring_sys_consts::IORING_REGISTER_FILES_UPDATE,
        ));
        restrictions.push(Restriction::sqe_flags_allowed(
            squeue::Flags::FIXED_FILE.bits() | squeue::Flags::ASYNC.bits(),
        ));
        restrictions.push(Restriction::sqe_flags_required(
            squeue::Flags::FIXED_FILE.bits(),
        ));
        submitter
            .register_restrictions(&mut restrictions)
            .map_err(step("register restrictions"))?;
        submitter
            .register_enable_rings()
            .map_err(step("enable ring"))?;
        Ok(QueueRing {
            ring,
            completion_evt,
            backlog: VecDeque::new(),
        })
    }

    /// The eventfd the kernel signals when completions are posted.
    pub fn completion_fd(&self) -> RawFd {
        self.completion_evt.as_raw_fd()
    }

    /// Clears the completion eventfd before reaping.
    pub fn ack_completion_event(&self) {
        // EAGAIN (no event pending) is the normal case when reaping eagerly.
        let _ = self.completion_evt.read();
    }

    /// Queues an entry for the next [`submit`](Self::submit).
    ///
    /// # Safety
    /// Every buffer and iovec the entry points to must stay valid and unmoved until its
    /// completion is reaped.
    pub unsafe fn push(&mut self, entry: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(entry);
            return;
        }
        let mut sq = self.ring.submission();
        // SAFETY: forwarded from this function's contract: the caller keeps the entry's
        // buffers alive until completion.
        if unsafe { sq.push(&entry) }.is_err() {
            drop(sq);
            self.backlog.push_back(entry);
        }
    }

    /// Moves backlog into the SQ and submits everything queued. A busy kernel (EBUSY/EAGAIN)
    /// leaves entries queued for the next call; nothing is dropped.
    pub fn submit(&mut self) -> io::Result<()> {
        loop {
            {
                let mut sq = self.ring.submission();
                while let Some(entry) = self.backlog.front() {
                    // SAFETY: entries in the backlog were pushed under `push`'s contract.
                    if unsafe { sq.push(entry) }.is_err() {
                        break;
                    }
                    self.backlog.pop_front();
                }
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EAGAIN)
                        || e.raw_os_error() == Some(libc::EINTR) =>
                {
                    // Completions must be reaped first; the caller will reap and resubmit.
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            if self.backlog.is_empty() || self.ring.submission().is_full() {
                return Ok(());
            }
        }
    }

    /// Whether entries wait in the backlog.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Takes every posted completion as `(user_data, result)`.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        let cq = self.ring.completion();
        out.extend(cq.map(|cqe| (cqe.user_data(), cqe.result())));
    }
}

/// Register opcodes the io-uring crate does not name.
mod io_uring_sys_consts {
    /// `IORING_REGISTER_FILES_UPDATE` (include/uapi/linux/io_uring.h).
    pub const IORING_REGISTER_FILES_UPDATE: u8 = 6;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn wait_one(ring: &mut QueueRing) -> (u64, i32) {
        ring.submit().unwrap();
        ring.ring.submit_and_wait(1).unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        out[0]
    }

    #[test]
    fn fixed_file_read_is_allowed() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"hello ring").unwrap();
        let mut ring = QueueRing::new(0, 8, &[file.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 10];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let entry = opcode::Readv::new(io_uring::types::Fixed(0), &iov, 1)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(7);
        // SAFETY: `iov` and `buf` outlive the completion, which wait_one reaps.
        unsafe { ring.push(entry) };
        assert_eq!(wait_one(&mut ring), (7, 10));
        assert_eq!(&buf, b"hello ring");
    }

    #[test]
    fn opcodes_outside_the_allowlist_are_refused() {
        let file = tempfile::tempfile().unwrap();
        let mut ring = QueueRing::new(0, 8, &[file.as_raw_fd()]).unwrap();
        let path = c"/etc/passwd";
        let entry = opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(1);
        // SAFETY: the path is a static C string.
        unsafe { ring.push(entry) };
        assert_eq!(wait_one(&mut ring), (1, -libc::EACCES));
    }

    #[test]
    fn non_fixed_files_are_refused() {
        let file = tempfile::tempfile().unwrap();
        let mut ring = QueueRing::new(0, 8, &[file.as_raw_fd()]).unwrap();
        let entry = opcode::Fsync::new(io_uring::types::Fd(file.as_raw_fd()))
            .build()
            .user_data(2);
        // SAFETY: fsync passes no buffers.
        unsafe { ring.push(entry) };
        assert_eq!(wait_one(&mut ring), (2, -libc::EACCES));
    }
}
