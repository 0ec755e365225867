//! An image file: one fd the manager passed, with what vublk knows about it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::stat::{fstat, SFlag};

use crate::{AlignedBuf, OpenError, BUFFER_ALIGN};

/// `BLKGETSIZE64` (linux/fs.h): `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// How an image fd was validated and will be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFileOptions {
    /// What the fd is for, for error messages: "image", "backing 1", ...
    pub role: String,
    pub writable: bool,
    /// The fd has O_DIRECT: buffers and offsets must be aligned.
    pub direct: bool,
    /// The fd has O_NONBLOCK: io_uring may answer -EAGAIN.
    pub nonblock: bool,
}

/// One image fd, owned.
#[derive(Debug)]
pub struct ImageFile {
    fd: OwnedFd,
    options: ImageFileOptions,
    is_block_device: bool,
}

impl ImageFile {
    /// Wraps an fd that the caller has already validated (see `vublk_fdset::check_image_fd`).
    pub fn new(fd: OwnedFd, options: ImageFileOptions) -> Result<ImageFile, OpenError> {
        let stat = fstat(fd.as_fd()).map_err(|source| OpenError::Size {
            fd: fd.as_raw_fd(),
            role: options.role.clone(),
            source,
        })?;
        let is_block_device =
            SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFBLK;
        Ok(ImageFile {
            fd,
            options,
            is_block_device,
        })
    }

    pub fn options(&self) -> &ImageFileOptions {
        &self.options
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The file's current size in bytes (st_size, or BLKGETSIZE64 for a block device).
    pub fn size(&self) -> Result<u64, OpenError> {
        let err = |source| OpenError::Size {
            fd: self.raw_fd(),
            role: self.options.role.clone(),
            source,
        };
        if self.is_block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer, which points to
            // a live, properly aligned u64 on this stack frame; the fd is owned by `self`.
            let ret = unsafe { libc::ioctl(self.raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
            if ret < 0 {
                return Err(err(nix::Error::last()));
            }
            Ok(size)
        } else {
            let stat = fstat(self.fd.as_fd()).map_err(err)?;
            Ok(u64::try_from(stat.st_size).unwrap_or(0))
        }
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Reads `len` bytes at `offset` with blocking preads, for setup only (before serving):
    /// aligned to 4 KiB so O_DIRECT fds work; bytes past the end of the file read as zeroes.
    pub fn read_at(&self, offset: u64, len: u64) -> Result<Vec<u8>, OpenError> {
        const ALIGN: u64 = BUFFER_ALIGN as u64;
        let err = |source| OpenError::Read {
            fd: self.raw_fd(),
            role: self.options.role.clone(),
            offset,
            len,
            source,
        };
        let start = offset / ALIGN * ALIGN;
        let end = offset
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(ALIGN))
            .ok_or_else(|| err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
        let total = usize::try_from(end - start)
            .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
        let mut buf = AlignedBuf::new(total)
            .ok_or_else(|| err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
        crate::storage::pread_full(self.raw_fd(), start, buf.as_mut_slice()).map_err(err)?;
        let skip = usize::try_from(offset - start).unwrap_or(0);
        let want = usize::try_from(len).unwrap_or(0);
        Ok(buf.as_mut_slice()[skip..skip + want].to_vec())
    }
}

impl AsFd for ImageFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
