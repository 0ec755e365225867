//! Blocking positioned I/O on a disk's files, for the metadata path only.
//!
//! Owns: the [`Storage`] contract that format updates (qcow2 allocation, COW, discard) run
//! on, and [`FileStorage`], its implementation over the image fds. The guest data path never
//! comes here: the server's queue workers move guest bytes through io_uring, and hand only the
//! requests a layer cannot map in place to one metadata thread per disk, which calls
//! [`crate::Layer::update`] with a `Storage`. Tests put a fault-injecting `Storage` in its place.

use std::io;
use std::os::fd::RawFd;

use crate::{AlignedBuf, FileId, ImageFile, BUFFER_ALIGN};

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
}

/// [`Storage`] over image fds with pread/pwrite/fdatasync/fallocate.
///
/// O_DIRECT fds get their bytes through an aligned buffer; offsets and lengths must then be
/// multiples of the device's logical block size, which the callers keep (metadata is written
/// in units of 512 bytes or more, aligned).
pub struct FileStorage<'a> {
    files: Vec<&'a ImageFile>,
}

impl<'a> FileStorage<'a> {
    pub fn new(files: Vec<&'a ImageFile>) -> FileStorage<'a> {
        FileStorage { files }
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

fn pread_full(fd: RawFd, offset: u64, buf: &mut [u8]) -> io::Result<()> {
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
