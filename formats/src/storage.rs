//! Blocking positioned I/O on a disk's files, for the metadata path only.
//!
//! Owns: the [`Storage`] contract that format updates (qcow2 allocation, COW, discard) run
//! on, and [`FileStorage`], its implementation over the image fds. The guest data path never
//! comes here: the server's queue workers move guest bytes through io_uring, and hand only the
//! requests a layer cannot map in place to one metadata thread per disk, which calls
//! [`crate::Layer::update`] with a `Storage`. Tests put a fault-injecting `Storage` in its place.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

use crate::{AlignedBuf, FileId, ImageFile, BUFFER_ALIGN};

/// One operation of a batch ([`Storage::run_batch`]): the operations of a batch are
/// independent and may complete in any order.
#[derive(Clone, Copy, Debug)]
pub enum BatchOp<'a> {
    Write {
        file: FileId,
        offset: u64,
        data: &'a [u8],
    },
    /// Make `len` bytes at `offset` read as zeroes, growing the file if needed.
    ZeroRange { file: FileId, offset: u64, len: u64 },
    /// `parts`, one after the other, from `offset` (one vectored write).
    WriteParts {
        file: FileId,
        offset: u64,
        parts: &'a [&'a [u8]],
    },
}

impl BatchOp<'_> {
    /// Runs the operation with blocking calls on `storage`.
    pub fn run_blocking(&self, storage: &(impl Storage + ?Sized)) -> io::Result<()> {
        match *self {
            BatchOp::Write { file, offset, data } => storage.write_at(file, offset, data),
            BatchOp::ZeroRange { file, offset, len } => storage.zero_range(file, offset, len),
            BatchOp::WriteParts {
                file,
                offset,
                parts,
            } => {
                let mut at = offset;
                for part in parts {
                    storage.write_at(file, at, part)?;
                    at += part.len() as u64;
                }
                Ok(())
            }
        }
    }
}

/// Most operations a batch has in flight at once.
const BATCH_DEPTH: u32 = 64;

/// Positioned, blocking reads and writes on the files of a disk (indexed by [`FileId`]).
///
/// Implementations must complete a call before returning: a later call observes it, which is
/// the ordering the metadata path relies on for process crashes. `sync` makes every completed
/// write durable, which host crashes need.
pub trait Storage {
    /// Fills `buf` from `offset`; bytes past the end of the file read as zeroes.
    fn read_at(&self, file: FileId, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, file: FileId, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// fdatasync.
    fn sync(&self, file: FileId) -> io::Result<()>;
    /// Deallocates `len` bytes at `offset` (they read as zeroes afterwards); advisory: a file
    /// that cannot punch holes keeps the bytes.
    fn punch_hole(&self, file: FileId, offset: u64, len: u64) -> io::Result<()>;

    /// Grows the file to at least `len` bytes (the new part reads as zeroes); never shrinks it.
    fn grow_to(&self, file: FileId, len: u64) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeroes (growing the file), cheaply where the file
    /// system can, else by writing zeroes.
    fn zero_range(&self, file: FileId, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![
            0u8;
            usize::try_from(len)
                .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?
        ];
        self.write_at(file, offset, &zeroes)
    }

    /// [`Storage::run_batch`] for the operations of a single request (its data and its L2
    /// entry), where latency matters more than overlap with other requests.
    fn run_batch_one_request(&self, ops: &[BatchOp<'_>]) -> Vec<io::Result<()>> {
        self.run_batch(ops)
    }

    /// Runs independent operations, in parallel where the implementation can; one result per
    /// operation, in order. Every operation has completed (or failed) when this returns.
    fn run_batch(&self, ops: &[BatchOp<'_>]) -> Vec<io::Result<()>> {
        ops.iter().map(|op| op.run_blocking(self)).collect()
    }
}

/// [`Storage`] over image fds with pread/pwrite/fdatasync/fallocate.
///
/// O_DIRECT fds get their bytes through an aligned buffer; offsets and lengths must then be
/// multiples of the device's logical block size, which the callers keep (metadata is written
/// in units of 512 bytes or more, aligned).
pub struct FileStorage<'a> {
    files: Vec<&'a ImageFile>,
    /// The ring batches run on, created on first use (`None` inside: io_uring unavailable,
    /// batches run one operation at a time).
    ring: RefCell<Option<Option<IoUring>>>,
}

impl<'a> FileStorage<'a> {
    pub fn new(files: Vec<&'a ImageFile>) -> FileStorage<'a> {
        FileStorage {
            files,
            ring: RefCell::new(None),
        }
    }

    fn fd(&self, file: FileId) -> io::Result<(RawFd, bool)> {
        self.files
            .get(file.0 as usize)
            .map(|f| (f.raw_fd(), f.options().direct))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }
}

fn off(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

fn is_aligned(ptr: *const u8, len: usize) -> bool {
    (ptr as usize) % BUFFER_ALIGN == 0 && len % 512 == 0
}

impl Storage for FileStorage<'_> {
    fn read_at(&self, file: FileId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (fd, direct) = self.fd(file)?;
        if direct && !(is_aligned(buf.as_ptr(), buf.len()) && offset % 4096 == 0) {
            // Read the enclosing aligned range (compressed clusters start anywhere).
            let align = BUFFER_ALIGN as u64;
            let start = offset / align * align;
            let skip = usize::try_from(offset - start)
                .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let total = (skip + buf.len()).next_multiple_of(BUFFER_ALIGN);
            let mut bounce =
                AlignedBuf::new(total).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
            pread_full(fd, start, bounce.as_mut_slice())?;
            let n = buf.len();
            buf.copy_from_slice(&bounce.as_slice()[skip..skip + n]);
            return Ok(());
        }
        pread_full(fd, offset, buf)
    }

    fn write_at(&self, file: FileId, offset: u64, buf: &[u8]) -> io::Result<()> {
        let (fd, direct) = self.fd(file)?;
        if direct && !is_aligned(buf.as_ptr(), buf.len()) {
            let mut bounce = AlignedBuf::new(buf.len())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
            bounce.as_mut_slice()[..buf.len()].copy_from_slice(buf);
            return pwrite_full(fd, offset, &bounce.as_slice()[..buf.len()]);
        }
        pwrite_full(fd, offset, buf)
    }

    fn sync(&self, file: FileId) -> io::Result<()> {
        let (fd, _) = self.fd(file)?;
        loop {
            // SAFETY: fdatasync takes no pointers; the fd is owned by an ImageFile borrowed
            // for the lifetime of `self`.
            if unsafe { libc::fdatasync(fd) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn grow_to(&self, file: FileId, len: u64) -> io::Result<()> {
        let (fd, _) = self.fd(file)?;
        let image = self
            .files
            .get(file.0 as usize)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        if image.is_block_device() {
            // A block device has the size it has; past it, writes fail on their own.
            return Ok(());
        }
        let current = image.size().map_err(|e| io::Error::other(e.to_string()))?;
        if current >= len {
            return Ok(());
        }
        // SAFETY: ftruncate takes no pointers; the fd is borrowed for the lifetime of `self`.
        if unsafe { libc::ftruncate(fd, off(len)?) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn zero_range(&self, file: FileId, offset: u64, len: u64) -> io::Result<()> {
        let (fd, _) = self.fd(file)?;
        // SAFETY: fallocate takes no pointers; the fd is borrowed for the lifetime of `self`.
        let ret =
            unsafe { libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, off(offset)?, off(len)?) };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP)
            | Some(libc::ENOSYS)
            | Some(libc::EINVAL)
            | Some(libc::ENODEV) => self.write_zeroes(file, offset, len),
            _ => Err(e),
        }
    }

    fn run_batch(&self, ops: &[BatchOp<'_>]) -> Vec<io::Result<()>> {
        self.run_batch_for(ops, false)
    }

    fn run_batch_one_request(&self, ops: &[BatchOp<'_>]) -> Vec<io::Result<()>> {
        self.run_batch_for(ops, true)
    }

    fn punch_hole(&self, file: FileId, offset: u64, len: u64) -> io::Result<()> {
        let (fd, _) = self.fd(file)?;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate takes no pointers; the fd is borrowed for the lifetime of `self`.
        let ret = unsafe { libc::fallocate(fd, mode, off(offset)?, off(len)?) };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Advisory: a file system or device without hole punching keeps the bytes.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV) => Ok(()),
            _ => Err(e),
        }
    }
}

impl FileStorage<'_> {
    fn run_batch_for(&self, ops: &[BatchOp<'_>], inline_first: bool) -> Vec<io::Result<()>> {
        if ops.len() <= 1 {
            // Nothing to overlap: a plain syscall costs no io_uring worker hand-off (an
            // allocating O_DIRECT write is not done inline by io_uring on most file systems).
            return ops.iter().map(|op| self.run_one(op)).collect();
        }
        let mut slot = self.ring.borrow_mut();
        let ring = slot.get_or_insert_with(|| match IoUring::new(BATCH_DEPTH) {
            Ok(ring) => Some(ring),
            Err(e) => {
                log::warn!("metadata batches run one by one: no io_uring ({e})");
                None
            }
        });
        match ring {
            Some(ring) => self.run_on_ring(ring, ops, inline_first),
            None => ops.iter().map(|op| self.run_one(op)).collect(),
        }
    }

    fn run_one(&self, op: &BatchOp<'_>) -> io::Result<()> {
        op.run_blocking(self)
    }

    /// Writes zeroes, in chunks of at most 1 MiB (aligned, so O_DIRECT fds work).
    fn write_zeroes(&self, file: FileId, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = AlignedBuf::new(usize::try_from(len.min(CHUNK)).unwrap_or(1))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let mut done = 0;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK)).unwrap_or(0);
            self.write_at(file, offset + done, &zeroes.as_slice()[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Runs `ops` on `ring`, at most [`BATCH_DEPTH`] at a time. A short write, or a zero range
    /// the file system refuses, is finished with a blocking call.
    fn run_on_ring(
        &self,
        ring: &mut IoUring,
        ops: &[BatchOp<'_>],
        inline_first: bool,
    ) -> Vec<io::Result<()>> {
        let mut results: Vec<Option<io::Result<()>>> = (0..ops.len()).map(|_| None).collect();
        // O_DIRECT needs aligned memory: such writes go through a copy.
        let mut bounces: Vec<Option<AlignedBuf>> = (0..ops.len()).map(|_| None).collect();
        // The iovec arrays of vectored writes, alive until their completions.
        let mut iovecs: Vec<Vec<libc::iovec>> = (0..ops.len()).map(|_| Vec::new()).collect();
        // With `inline_first` (one request's data and its L2 entry), the first operation runs
        // on this thread while the ring has the others: an allocating O_DIRECT write is usually
        // handed to an io_uring worker thread, a hop a plain syscall does not pay. Batches of
        // several requests are all on the ring (measured: inline work there delays the rest).
        let inline_first = inline_first && ops.len() >= 2;
        let mut next = usize::from(inline_first);
        let mut in_flight = 0usize;
        let mut first_done = !inline_first;
        while next < ops.len() || in_flight > 0 || !first_done {
            while next < ops.len() && in_flight < BATCH_DEPTH as usize {
                let i = next;
                next += 1;
                let entry = match self.entry_for(&ops[i], &mut bounces[i], &mut iovecs[i]) {
                    Ok(entry) => entry.user_data(i as u64),
                    Err(e) => {
                        results[i] = Some(Err(e));
                        continue;
                    }
                };
                // SAFETY: the entry points into `ops[i]`'s data (borrowed for this call),
                // `bounces[i]` or `iovecs[i]`, all alive until every completion is reaped
                // below (neither vector is resized meanwhile).
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    next -= 1;
                    break;
                }
                in_flight += 1;
            }
            if !first_done {
                first_done = true;
                if in_flight > 0 {
                    if let Err(e) = ring.submit() {
                        log::warn!("metadata batch: io_uring submit failed: {e}");
                    }
                }
                results[0] = ops.first().map(|op| self.run_one(op));
                continue;
            }
            if in_flight == 0 {
                continue;
            }
            if let Err(e) = ring.submit_and_wait(1) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Not expected; wait for what is in flight one by one, then fail the rest.
                log::error!("metadata batch: io_uring_enter failed: {e}");
                while in_flight > 0 {
                    if ring.submit_and_wait(1).is_err() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    for cqe in ring.completion() {
                        in_flight -= 1;
                        let i = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
                        if let Some(r) = results.get_mut(i) {
                            *r = Some(Err(io::Error::from_raw_os_error(libc::EIO)));
                        }
                    }
                }
                break;
            }
            let done: Vec<(usize, i32)> = ring
                .completion()
                .map(|cqe| {
                    (
                        usize::try_from(cqe.user_data()).unwrap_or(usize::MAX),
                        cqe.result(),
                    )
                })
                .collect();
            for (i, res) in done {
                in_flight -= 1;
                let Some(op) = ops.get(i) else { continue };
                results[i] = Some(self.finish(op, res));
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(io::Error::from_raw_os_error(libc::EIO))))
            .collect()
    }

    fn entry_for(
        &self,
        op: &BatchOp<'_>,
        bounce: &mut Option<AlignedBuf>,
        iovecs: &mut Vec<libc::iovec>,
    ) -> io::Result<io_uring::squeue::Entry> {
        match *op {
            BatchOp::WriteParts {
                file,
                offset,
                parts,
            } => {
                let (fd, direct) = self.fd(file)?;
                let total: usize = parts.iter().map(|p| p.len()).sum();
                if direct && !parts.iter().all(|p| is_aligned(p.as_ptr(), p.len())) {
                    let mut b = AlignedBuf::new(total)
                        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
                    let mut at = 0;
                    for part in parts {
                        b.as_mut_slice()[at..at + part.len()].copy_from_slice(part);
                        at += part.len();
                    }
                    let ptr = b.as_mut_ptr().cast_const();
                    *bounce = Some(b);
                    let len = u32::try_from(total)
                        .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
                    return Ok(opcode::Write::new(types::Fd(fd), ptr, len)
                        .offset(offset)
                        .build());
                }
                *iovecs = parts
                    .iter()
                    .map(|p| libc::iovec {
                        iov_base: p.as_ptr().cast_mut().cast(),
                        iov_len: p.len(),
                    })
                    .collect();
                let count = u32::try_from(iovecs.len())
                    .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
                Ok(opcode::Writev::new(types::Fd(fd), iovecs.as_ptr(), count)
                    .offset(offset)
                    .build())
            }
            BatchOp::Write { file, offset, data } => {
                let (fd, direct) = self.fd(file)?;
                let len = u32::try_from(data.len())
                    .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
                let ptr = if direct && !is_aligned(data.as_ptr(), data.len()) {
                    let mut b = AlignedBuf::new(data.len())
                        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
                    b.as_mut_slice()[..data.len()].copy_from_slice(data);
                    let ptr = b.as_mut_ptr().cast_const();
                    *bounce = Some(b);
                    ptr
                } else {
                    data.as_ptr()
                };
                Ok(opcode::Write::new(types::Fd(fd), ptr, len)
                    .offset(offset)
                    .build())
            }
            BatchOp::ZeroRange { file, offset, len } => {
                let (fd, _) = self.fd(file)?;
                Ok(opcode::Fallocate::new(types::Fd(fd), len)
                    .offset(offset)
                    .mode(libc::FALLOC_FL_ZERO_RANGE)
                    .build())
            }
        }
    }

    /// The result of one batch operation from its completion.
    fn finish(&self, op: &BatchOp<'_>, res: i32) -> io::Result<()> {
        match *op {
            BatchOp::WriteParts {
                file,
                offset,
                parts,
            } => {
                if res < 0 {
                    return Err(io::Error::from_raw_os_error(-res));
                }
                // A short write: the rest, part by part.
                let mut skip = usize::try_from(res).unwrap_or(0);
                let mut at = offset;
                for part in parts {
                    let done = skip.min(part.len());
                    skip -= done;
                    if done < part.len() {
                        self.write_at(file, at + done as u64, &part[done..])?;
                    }
                    at += part.len() as u64;
                }
                Ok(())
            }
            BatchOp::Write { file, offset, data } => {
                if res < 0 {
                    return Err(io::Error::from_raw_os_error(-res));
                }
                let n = usize::try_from(res).unwrap_or(0).min(data.len());
                if n < data.len() {
                    self.write_at(file, offset + n as u64, &data[n..])
                } else {
                    Ok(())
                }
            }
            BatchOp::ZeroRange { file, offset, len } => match -res {
                0 => Ok(()),
                libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV => {
                    self.write_zeroes(file, offset, len)
                }
                errno => Err(io::Error::from_raw_os_error(errno)),
            },
        }
    }
}

/// Fills `buf` from `offset` with preads; past the end of the file it reads as zeroes.
pub(crate) fn pread_full(fd: RawFd, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a live, exclusively borrowed buffer of `rest.len()` bytes.
        let n = unsafe {
            libc::pread(
                fd,
                rest.as_mut_ptr().cast(),
                rest.len(),
                off(offset + done as u64)?,
            )
        };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => {
                rest.fill(0);
                return Ok(());
            }
            n => done += n.unsigned_abs(),
        }
    }
    Ok(())
}

fn pwrite_full(fd: RawFd, offset: u64, buf: &[u8]) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: `rest` is a live buffer of `rest.len()` bytes, only read by the kernel.
        let n = unsafe {
            libc::pwrite(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                off(offset + done as u64)?,
            )
        };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(io::Error::from_raw_os_error(libc::EIO)),
            n => done += n.unsigned_abs(),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageFileOptions;
    use std::os::fd::OwnedFd;

    fn image(file: std::fs::File) -> ImageFile {
        ImageFile::new(
            OwnedFd::from(file),
            ImageFileOptions {
                role: "image".into(),
                writable: true,
                direct: false,
                nonblock: false,
            },
        )
        .unwrap()
    }

    #[test]
    fn writes_read_back_and_past_the_end_reads_zeroes() {
        let file = image(tempfile::tempfile().unwrap());
        let storage = FileStorage::new(vec![&file]);
        storage.write_at(FileId(0), 4096, &[7u8; 100]).unwrap();
        let mut buf = [1u8; 8192];
        storage.read_at(FileId(0), 0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..4196].iter().all(|&b| b == 7));
        assert!(buf[4196..].iter().all(|&b| b == 0), "past EOF reads zero");
        storage.sync(FileId(0)).unwrap();
        storage.punch_hole(FileId(0), 4096, 4096).unwrap();
        storage.read_at(FileId(0), 4096, &mut buf[..100]).unwrap();
        assert!(
            buf[..100].iter().all(|&b| b == 0),
            "punched range reads zero"
        );
        assert_eq!(
            storage
                .read_at(FileId(1), 0, &mut buf)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EBADF)
        );
    }
}
