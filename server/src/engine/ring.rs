//! One io_uring, restricted to the operations vublk uses on the files it registered.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, register::Restriction, squeue, IoUring};

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
/// open files or sockets. READ also serves the worker's kick and wake eventfds.
const ALLOWED_OPCODES: [u8; 8] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
    opcode::AsyncCancel::CODE,
    opcode::Nop::CODE,
];

/// A queue's ring: the one place its worker waits, for completions of disk I/O and of reads
/// on its kick and wake eventfds alike.
pub struct QueueRing {
    ring: IoUring,
    /// Entries that did not fit in the submission queue; pushed first on the next submit.
    backlog: VecDeque<squeue::Entry>,
    /// Slots of the fixed-file table: `files.len()` image files, then the extra slots.
    slots: u32,
}

impl QueueRing {
    /// Creates a ring of `entries` SQEs for `queue`, registers `files` as fixed files
    /// `0..files.len()` followed by `extra_slots` empty slots (for eventfds the worker
    /// installs with [`set_file`](Self::set_file)), restricts it to [`ALLOWED_OPCODES`] on
    /// fixed files, and enables it. Must be called on the thread that will submit.
    pub fn new(
        queue: u16,
        entries: u32,
        files: &[RawFd],
        extra_slots: u32,
    ) -> Result<QueueRing, EngineError> {
        let step = |step| {
            move |source| EngineError::Setup {
                queue,
                step,
                source,
            }
        };
        let ring = build_ring(entries)?;
        let submitter = ring.submitter();
        let mut table: Vec<RawFd> = files.to_vec();
        table.extend(std::iter::repeat_n(-1, extra_slots as usize));
        if !table.is_empty() {
            submitter
                .register_files(&table)
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
            backlog: VecDeque::new(),
            slots: u32::try_from(table.len()).unwrap_or(u32::MAX),
        })
    }

    /// Installs `fd` (or clears the slot with `None`) in fixed-file slot `slot`.
    pub fn set_file(&self, slot: u32, fd: Option<RawFd>) -> io::Result<()> {
        if slot >= self.slots {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.ring
            .submitter()
            .register_files_update(slot, &[fd.unwrap_or(-1)])
            .map(drop)
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

    fn fill_from_backlog(&mut self) {
        let mut sq = self.ring.submission();
        while let Some(entry) = self.backlog.front() {
            // SAFETY: entries in the backlog were pushed under `push`'s contract.
            if unsafe { sq.push(entry) }.is_err() {
                break;
            }
            self.backlog.pop_front();
        }
    }

    /// Submits everything queued and, if `wait`, blocks until at least one completion is
    /// posted. A busy kernel (EBUSY/EAGAIN) or a signal (EINTR) leaves entries queued for the
    /// next call; nothing is dropped.
    pub fn submit(&mut self, wait: bool) -> io::Result<()> {
        self.fill_from_backlog();
        let result = if wait {
            self.ring.submit_and_wait(1)
        } else {
            self.ring.submit()
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::EINTR)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Takes every posted completion as `(user_data, result)`.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        let cq = self.ring.completion();
        out.extend(cq.map(|cqe| (cqe.user_data(), cqe.result())));
    }
}

/// Builds a disabled ring with the cheapest task-run mode the kernel has: DEFER_TASKRUN runs
/// completion work only when the worker waits (batching it), which is possible because the
/// worker waits nowhere else.
fn build_ring(entries: u32) -> Result<IoUring, EngineError> {
    let attempts: [fn(&mut io_uring::Builder) -> &mut io_uring::Builder; 3] = [
        |b| b.setup_single_issuer().setup_defer_taskrun(),
        |b| b.setup_coop_taskrun(),
        |b| b,
    ];
    let mut last = None;
    for attempt in attempts {
        let mut builder = IoUring::builder();
        builder.setup_r_disabled();
        attempt(&mut builder);
        match builder.build(entries) {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(source) => return Err(EngineError::Unavailable { source }),
        }
    }
    Err(EngineError::Unavailable {
        source: last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)),
    })
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
    use std::os::fd::AsRawFd;

    fn wait_one(ring: &mut QueueRing) -> (u64, i32) {
        ring.submit(true).unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        out[0]
    }

    #[test]
    fn fixed_file_read_is_allowed() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"hello ring").unwrap();
        let mut ring = QueueRing::new(0, 8, &[file.as_raw_fd()], 1).unwrap();
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
        let mut ring = QueueRing::new(0, 8, &[file.as_raw_fd()], 1).unwrap();
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
        let mut ring = QueueRing::new(0, 8, &[file.as_raw_fd()], 1).unwrap();
        let entry = opcode::Fsync::new(io_uring::types::Fd(file.as_raw_fd()))
            .build()
            .user_data(2);
        // SAFETY: fsync passes no buffers.
        unsafe { ring.push(entry) };
        assert_eq!(wait_one(&mut ring), (2, -libc::EACCES));
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn an_eventfd_installed_in_an_extra_slot_can_be_read() {
        let evt = EventFd::new(0).unwrap();
        let mut ring = QueueRing::new(0, 8, &[], 1).unwrap();
        ring.set_file(0, Some(evt.as_raw_fd())).unwrap();
        let mut value = 0u64;
        let entry = opcode::Read::new(
            io_uring::types::Fixed(0),
            (&mut value as *mut u64).cast(),
            8,
        )
        .build()
        .flags(squeue::Flags::FIXED_FILE)
        .user_data(3);
        // SAFETY: `value` outlives the completion, which is reaped below.
        unsafe { ring.push(entry) };
        ring.submit(false).unwrap();
        evt.write(5).unwrap();
        ring.submit(true).unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert_eq!(out, vec![(3, 8)]);
        assert_eq!(value, 5);
        assert!(ring.set_file(1, None).is_err());
    }
}
