//! A minimal split-virtqueue driver for protocol tests: guest memory, rings and virtio-blk
//! request framing, written byte by byte so that a test can build any chain, hostile ones
//! included.
//!
//! Owns: the guest memory (a memfd mapped into the test process, to be handed to the backend
//! with `VHOST_USER_SET_MEM_TABLE`), the split-ring layout (descriptor table, available ring,
//! used ring) inside it, descriptor chains placed exactly as the caller describes them (direct,
//! indirect, patched afterwards), publishing on the available ring, reaping the used ring while
//! waiting on a call eventfd with a timeout, and parsing the 60-byte `virtio_blk_config`.
//! It deliberately knows nothing about the vhost-user protocol: the test wires this memory and
//! these ring addresses to a backend with the `vhost` crate's `Frontend` (a dev-dependency).
//! It trusts nothing the device writes back either: used elements are reported raw.

use std::cell::Cell;
use std::fmt;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// Size of one split-ring descriptor (`struct virtq_desc`: addr, len, flags, next).
pub const DESC_SIZE: u64 = 16;
/// `VIRTQ_DESC_F_NEXT`: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: the buffer is device-writable.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Alignment the driver gives every ring part (more than the spec's 16/2/4 bytes).
const RING_ALIGN: u64 = 4096;

/// virtio-blk sector size: `sector` fields and `capacity` count 512-byte units.
pub const SECTOR_SIZE: u64 = 512;
/// Size of `struct virtio_blk_req`'s header: type (le32), reserved (le32), sector (le64).
pub const BLK_HEADER_LEN: u32 = 16;
/// Request types (virtio 1.2, 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Status values the device writes in the last byte of the chain.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// What the driver stores in a status byte before submitting: no valid status, so a byte still
/// holding it was never written by the device.
pub const STATUS_CANARY: u8 = 0xa5;
/// Length of the GET_ID answer (`VIRTIO_BLK_ID_BYTES`).
pub const BLK_ID_BYTES: u32 = 20;
/// Size of one discard / write-zeroes segment: sector (le64), num_sectors (le32), flags (le32).
pub const DISCARD_SEGMENT_LEN: u32 = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`, the only defined segment flag.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Bytes of `struct virtio_blk_config` up to and including `write_zeroes_may_unmap` and its
/// padding (virtio 1.2, 5.2.4).
pub const BLK_CONFIG_LEN: usize = 60;

/// What went wrong in the driver itself (never a verdict on the device under test).
#[derive(Debug)]
pub enum VringError {
    /// A system call on the memfd, the mapping or an eventfd failed.
    Sys {
        what: &'static str,
        errno: nix::errno::Errno,
    },
    /// A guest address range the driver was asked to touch is not inside its guest memory.
    OutOfRange { gpa: u64, len: u64 },
    /// A ring field address is not aligned for a volatile access of its width.
    Misaligned { gpa: u64, align: u64 },
    /// The bump allocator has no room left for `len` bytes.
    OutOfMemory { len: u64, free: u64 },
    /// A chain of `len` descriptors cannot be placed in a queue of `size` entries.
    ChainLength { len: usize, size: u16 },
    /// No used element appeared on `queue` within `waited`.
    Timeout { queue: u16, waited: Duration },
    /// The config space reply is shorter than `virtio_blk_config`.
    ShortConfig { len: usize },
}

impl fmt::Display for VringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VringError::Sys { what, errno } => write!(f, "{what} failed: {errno}"),
            VringError::OutOfRange { gpa, len } => {
                write!(
                    f,
                    "guest range {gpa:#x}+{len:#x} is outside the driver's memory"
                )
            }
            VringError::Misaligned { gpa, align } => {
                write!(f, "guest address {gpa:#x} is not {align}-byte aligned")
            }
            VringError::OutOfMemory { len, free } => {
                write!(f, "guest memory exhausted: {len} bytes wanted, {free} free")
            }
            VringError::ChainLength { len, size } => {
                write!(
                    f,
                    "a chain of {len} descriptors does not fit a queue of {size}"
                )
            }
            VringError::Timeout { queue, waited } => {
                write!(f, "no used element on queue {queue} within {waited:?}")
            }
            VringError::ShortConfig { len } => {
                write!(f, "config space is {len} bytes, want {BLK_CONFIG_LEN}")
            }
        }
    }
}

impl std::error::Error for VringError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VringError::Sys { errno, .. } => Some(errno),
            VringError::OutOfRange { .. }
            | VringError::Misaligned { .. }
            | VringError::OutOfMemory { .. }
            | VringError::ChainLength { .. }
            | VringError::Timeout { .. }
            | VringError::ShortConfig { .. } => None,
        }
    }
}

fn sys(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> VringError {
    move |errno| VringError::Sys { what, errno }
}

/// One region of guest memory, as `VHOST_USER_SET_MEM_TABLE` describes it.
#[derive(Clone, Copy, Debug)]
pub struct MemRegion<'a> {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    /// Where the region is mapped in this (the frontend's) process.
    pub userspace_addr: u64,
    pub mmap_offset: u64,
    pub fd: BorrowedFd<'a>,
}

/// Guest memory: one memfd, mapped shared into the test at a guest-physical base address.
///
/// All access goes through raw pointers into the mapping (never Rust references), because the
/// backend process writes the same pages concurrently. Buffers are handed out by a bump
/// allocator and never freed: a test makes few requests and the memfd is sparse.
pub struct GuestMemory {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    size: u64,
    base: u64,
    next: Cell<u64>,
}

impl GuestMemory {
    /// Creates `size` bytes of zeroed guest memory at guest-physical address `base`.
    pub fn new(size: u64, base: u64) -> Result<Self, VringError> {
        let len = usize::try_from(size)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or(VringError::OutOfMemory { len: size, free: 0 })?;
        base.checked_add(size).ok_or(VringError::OutOfRange {
            gpa: base,
            len: size,
        })?;
        let fd = memfd_create(c"vublk-test-guest", MFdFlags::MFD_CLOEXEC)
            .map_err(sys("memfd_create"))?;
        let file_len =
            i64::try_from(size).map_err(|_| VringError::OutOfMemory { len: size, free: 0 })?;
        nix::unistd::ftruncate(&fd, file_len).map_err(sys("ftruncate guest memfd"))?;
        // SAFETY: mapping a fresh memfd of exactly `len` bytes at an address of the kernel's
        // choosing cannot alias any existing Rust object; the mapping is owned by the returned
        // value and unmapped once, in `Drop`.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(sys("mmap guest memory"))?;
        Ok(GuestMemory {
            fd,
            ptr: ptr.cast(),
            size,
            base,
            next: Cell::new(0),
        })
    }

    /// The region to pass to `VHOST_USER_SET_MEM_TABLE`.
    pub fn region(&self) -> MemRegion<'_> {
        MemRegion {
            guest_phys_addr: self.base,
            memory_size: self.size,
            userspace_addr: self.ptr.as_ptr() as u64,
            mmap_offset: 0,
            fd: self.fd.as_fd(),
        }
    }

    /// First guest-physical address of the memory.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// First guest-physical address past the memory.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    /// The frontend virtual address of `gpa` (what `VHOST_USER_SET_VRING_ADDR` carries).
    pub fn user_addr(&self, gpa: u64) -> Result<u64, VringError> {
        let offset = self.offset(gpa, 0)?;
        Ok(self.ptr.as_ptr() as u64 + offset as u64)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two) and returns their address.
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64, VringError> {
        let free = self.size - self.next.get();
        let start = self
            .next
            .get()
            .checked_next_multiple_of(align.max(1))
            .filter(|s| s.checked_add(len).is_some_and(|end| end <= self.size))
            .ok_or(VringError::OutOfMemory { len, free })?;
        self.next.set(start + len);
        Ok(self.base + start)
    }

    /// Offset of `gpa..gpa+len` in the mapping, if the whole range is inside it.
    fn offset(&self, gpa: u64, len: u64) -> Result<usize, VringError> {
        let out = || VringError::OutOfRange { gpa, len };
        let start = gpa.checked_sub(self.base).ok_or_else(out)?;
        let end = start.checked_add(len).ok_or_else(out)?;
        if end > self.size {
            return Err(out());
        }
        usize::try_from(start).map_err(|_| out())
    }

    /// Pointer to `gpa..gpa+len` after a bounds check.
    fn ptr(&self, gpa: u64, len: u64) -> Result<*mut u8, VringError> {
        let offset = self.offset(gpa, len)?;
        // SAFETY: `offset(gpa, len)` checked `offset + len <= self.size`, so the result stays
        // inside the single mapping `self.ptr .. self.ptr + self.size`.
        Ok(unsafe { self.ptr.as_ptr().add(offset) })
    }

    /// Pointer to a naturally aligned field of `align` bytes at `gpa`.
    fn field(&self, gpa: u64, align: u64) -> Result<*mut u8, VringError> {
        if gpa % align != 0 {
            return Err(VringError::Misaligned { gpa, align });
        }
        self.ptr(gpa, align)
    }

    /// Copies `data` to guest memory at `gpa`.
    ///
    /// Only for buffers the driver owns (not yet published, or already returned as used): the
    /// device does not touch them meanwhile, so a plain copy races with nothing.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), VringError> {
        let dst = self.ptr(gpa, data.len() as u64)?;
        // SAFETY: `dst` points at `data.len()` bytes inside the live mapping (bounds checked by
        // `ptr`); the mapping never overlaps `data`, which is ordinary Rust memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copies `len` bytes of guest memory at `gpa` out (same ownership rule as [`Self::write`]).
    pub fn read(&self, gpa: u64, len: u64) -> Result<Vec<u8>, VringError> {
        let src = self.ptr(gpa, len)?;
        let len = usize::try_from(len).map_err(|_| VringError::OutOfRange { gpa, len })?;
        let mut out = vec![0u8; len];
        // SAFETY: `src` points at `len` bytes inside the live mapping (bounds checked by
        // `ptr`), and `out` is a distinct, freshly allocated buffer of the same length.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len) };
        Ok(out)
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<(), VringError> {
        let dst = self.ptr(gpa, len)?;
        let len = usize::try_from(len).map_err(|_| VringError::OutOfRange { gpa, len })?;
        // SAFETY: `dst` points at `len` bytes inside the live mapping (bounds checked by `ptr`).
        unsafe { std::ptr::write_bytes(dst, byte, len) };
        Ok(())
    }

    /// Reads one byte (a status byte) with a volatile load: the device may write it any time.
    pub fn read_u8(&self, gpa: u64) -> Result<u8, VringError> {
        let p = self.field(gpa, 1)?;
        // SAFETY: `p` is in bounds (checked by `field`) and a u8 is always aligned.
        Ok(unsafe { p.read_volatile() })
    }

    /// Writes one byte with a volatile store.
    pub fn write_u8(&self, gpa: u64, v: u8) -> Result<(), VringError> {
        let p = self.field(gpa, 1)?;
        // SAFETY: `p` is in bounds (checked by `field`) and a u8 is always aligned.
        unsafe { p.write_volatile(v) };
        Ok(())
    }

    /// Reads a little-endian ring field shared with the device.
    pub fn read_u16(&self, gpa: u64) -> Result<u16, VringError> {
        let p = self.field(gpa, 2)?.cast::<u16>();
        // SAFETY: `field` checked that 2 bytes at `p` are in bounds and 2-byte aligned; the
        // mapping base is page aligned, so the pointer is aligned too.
        Ok(u16::from_le(unsafe { p.read_volatile() }))
    }

    /// Writes a little-endian ring field shared with the device.
    pub fn write_u16(&self, gpa: u64, v: u16) -> Result<(), VringError> {
        let p = self.field(gpa, 2)?.cast::<u16>();
        // SAFETY: as in `read_u16`: in bounds and 2-byte aligned.
        unsafe { p.write_volatile(v.to_le()) };
        Ok(())
    }

    /// Reads a little-endian 32-bit field shared with the device.
    pub fn read_u32(&self, gpa: u64) -> Result<u32, VringError> {
        let p = self.field(gpa, 4)?.cast::<u32>();
        // SAFETY: `field` checked that 4 bytes at `p` are in bounds and 4-byte aligned.
        Ok(u32::from_le(unsafe { p.read_volatile() }))
    }

    /// Writes a little-endian 32-bit field shared with the device.
    pub fn write_u32(&self, gpa: u64, v: u32) -> Result<(), VringError> {
        let p = self.field(gpa, 4)?.cast::<u32>();
        // SAFETY: as in `read_u32`: in bounds and 4-byte aligned.
        unsafe { p.write_volatile(v.to_le()) };
        Ok(())
    }

    /// Writes a little-endian 64-bit field shared with the device.
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), VringError> {
        let p = self.field(gpa, 8)?.cast::<u64>();
        // SAFETY: `field` checked that 8 bytes at `p` are in bounds and 8-byte aligned.
        unsafe { p.write_volatile(v.to_le()) };
        Ok(())
    }

    /// Reads a little-endian 64-bit field.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, VringError> {
        let p = self.field(gpa, 8)?.cast::<u64>();
        // SAFETY: `field` checked that 8 bytes at `p` are in bounds and 8-byte aligned.
        Ok(u64::from_le(unsafe { p.read_volatile() }))
    }

    /// Allocates a virtio-blk request header for `req_type` at `sector`.
    pub fn alloc_header(&self, req_type: u32, sector: u64) -> Result<u64, VringError> {
        let gpa = self.alloc(u64::from(BLK_HEADER_LEN), 16)?;
        self.write(gpa, &blk_header(req_type, sector))?;
        Ok(gpa)
    }

    /// Allocates a status byte preset to [`STATUS_CANARY`].
    pub fn alloc_status(&self) -> Result<u64, VringError> {
        let gpa = self.alloc(1, 1)?;
        self.write_u8(gpa, STATUS_CANARY)?;
        Ok(gpa)
    }

    /// Allocates a page-aligned data buffer of `len` bytes filled with `byte`.
    pub fn alloc_filled(&self, len: u64, byte: u8) -> Result<u64, VringError> {
        let gpa = self.alloc(len, 4096)?;
        self.fill(gpa, len, byte)?;
        Ok(gpa)
    }

    /// Allocates a page-aligned buffer holding `data`.
    pub fn alloc_data(&self, data: &[u8]) -> Result<u64, VringError> {
        let gpa = self.alloc(data.len() as u64, 4096)?;
        self.write(gpa, data)?;
        Ok(gpa)
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // `size` fit a usize when the mapping was made.
        let len = usize::try_from(self.size).unwrap_or(usize::MAX);
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, owned by `self` alone, and no
        // pointer into it outlives `self` (every accessor takes `&self`).
        let _ = unsafe { munmap(self.ptr.cast(), len) };
    }
}

/// The 16-byte virtio-blk request header.
pub fn blk_header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
pub fn discard_segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// A split-ring descriptor exactly as stored in the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Writes descriptor `index` of the table at `table` (ring or indirect table).
pub fn write_desc_at(
    mem: &GuestMemory,
    table: u64,
    index: u64,
    desc: Desc,
) -> Result<(), VringError> {
    let gpa = index
        .checked_mul(DESC_SIZE)
        .and_then(|o| table.checked_add(o))
        .ok_or(VringError::OutOfRange {
            gpa: table,
            len: index,
        })?;
    mem.write_u64(gpa, desc.addr)?;
    mem.write_u32(gpa + 8, desc.len)?;
    mem.write_u16(gpa + 12, desc.flags)?;
    mem.write_u16(gpa + 14, desc.next)
}

/// Reads descriptor `index` of the table at `table`.
pub fn read_desc_at(mem: &GuestMemory, table: u64, index: u64) -> Result<Desc, VringError> {
    let gpa = table + index * DESC_SIZE;
    Ok(Desc {
        addr: mem.read_u64(gpa)?,
        len: mem.read_u32(gpa + 8)?,
        flags: mem.read_u16(gpa + 12)?,
        next: mem.read_u16(gpa + 14)?,
    })
}

/// One buffer of a chain, in driver terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub write: bool,
}

impl Segment {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Segment {
            addr,
            len,
            write: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Segment {
            addr,
            len,
            write: true,
        }
    }

    fn desc(self, next: Option<u16>) -> Desc {
        let mut flags = if self.write { VRING_DESC_F_WRITE } else { 0 };
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT;
        }
        Desc {
            addr: self.addr,
            len: self.len,
            flags,
            next: next.unwrap_or(0),
        }
    }
}

/// An element of the used ring, as the device wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index of the chain the device returned.
    pub id: u32,
    /// Bytes the device says it wrote into the chain.
    pub len: u32,
}

/// Ring addresses in the frontend's address space, for `VHOST_USER_SET_VRING_ADDR`.
#[derive(Clone, Copy, Debug)]
pub struct VringUserAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// One split virtqueue laid out in a [`GuestMemory`].
///
/// Chains are placed at consecutive descriptor indices, round robin; a caller that waits for
/// each request before submitting more than a queue's worth never overwrites a live chain.
#[derive(Debug)]
pub struct SplitQueue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    next_desc: u16,
    next_avail: u16,
    last_used: u16,
}

impl SplitQueue {
    /// Lays out queue `index` of `size` entries (a power of two) in `mem`, zeroed.
    pub fn new(
        mem: &GuestMemory,
        index: u16,
        size: u16,
        event_idx: bool,
    ) -> Result<Self, VringError> {
        let n = u64::from(size);
        let desc_len = DESC_SIZE * n;
        // flags, idx, ring[n], used_event
        let avail_len = 2 + 2 + 2 * n + 2;
        // flags, idx, ring[n] of (id, len), avail_event
        let used_len = 2 + 2 + 8 * n + 2;
        let desc = mem.alloc(desc_len, RING_ALIGN)?;
        let avail = mem.alloc(avail_len, RING_ALIGN)?;
        let used = mem.alloc(used_len, RING_ALIGN)?;
        for (gpa, len) in [(desc, desc_len), (avail, avail_len), (used, used_len)] {
            mem.fill(gpa, len, 0)?;
        }
        Ok(SplitQueue {
            index,
            size,
            desc,
            avail,
            used,
            event_idx,
            next_desc: 0,
            next_avail: 0,
            last_used: 0,
        })
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest address of the descriptor table.
    pub fn desc_table(&self) -> u64 {
        self.desc
    }

    /// The index the next published chain will take in the available ring (also what
    /// `VHOST_USER_SET_VRING_BASE` must carry for a fresh queue: 0).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Ring addresses as the frontend sees them.
    pub fn user_addrs(&self, mem: &GuestMemory) -> Result<VringUserAddrs, VringError> {
        Ok(VringUserAddrs {
            desc: mem.user_addr(self.desc)?,
            avail: mem.user_addr(self.avail)?,
            used: mem.user_addr(self.used)?,
        })
    }

    /// Overwrites descriptor `index` of the ring's table (for hostile patches).
    pub fn write_desc(&self, mem: &GuestMemory, index: u16, desc: Desc) -> Result<(), VringError> {
        write_desc_at(mem, self.desc, u64::from(index), desc)
    }

    /// Reads descriptor `index` of the ring's table.
    pub fn read_desc(&self, mem: &GuestMemory, index: u16) -> Result<Desc, VringError> {
        read_desc_at(mem, self.desc, u64::from(index))
    }

    /// Reserves `len` consecutive descriptor indices and returns the first and the count.
    fn reserve(&mut self, len: usize) -> Result<(u16, u16), VringError> {
        let too_long = VringError::ChainLength {
            len,
            size: self.size,
        };
        let n = u16::try_from(len).map_err(|_| too_long)?;
        if n == 0 || n > self.size {
            return Err(VringError::ChainLength {
                len,
                size: self.size,
            });
        }
        if u32::from(self.next_desc) + u32::from(n) > u32::from(self.size) {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        self.next_desc = (head + n) % self.size;
        Ok((head, n))
    }

    /// Writes `segs` as a chain of direct descriptors and returns its head (not yet published).
    pub fn add_chain(&mut self, mem: &GuestMemory, segs: &[Segment]) -> Result<u16, VringError> {
        let (head, n) = self.reserve(segs.len())?;
        // `reserve` guaranteed 1 <= n and head + n <= size, so the indices do not wrap.
        let last = head + (n - 1);
        for (index, seg) in (head..).zip(segs) {
            let next = (index < last).then_some(index + 1);
            self.write_desc(mem, index, seg.desc(next))?;
        }
        Ok(head)
    }

    /// Writes `segs` as an indirect table of `segs.len()` entries behind one ring descriptor
    /// and returns that descriptor's index (not yet published). Returns the table address too,
    /// so a test can patch entries.
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemory,
        segs: &[Segment],
    ) -> Result<(u16, u64), VringError> {
        // `next` is a u16, so a table has at most u16::MAX entries here (and at least one).
        let count =
            u16::try_from(segs.len())
                .ok()
                .filter(|&n| n > 0)
                .ok_or(VringError::ChainLength {
                    len: segs.len(),
                    size: self.size,
                })?;
        let table_len = u64::from(count) * DESC_SIZE;
        let table = mem.alloc(table_len, 16)?;
        for (i, seg) in (0u16..).zip(segs) {
            let next = (i + 1 < count).then_some(i + 1);
            write_desc_at(mem, table, u64::from(i), seg.desc(next))?;
        }
        // At most 65535 * 16 bytes: fits a u32.
        let table_len32 = u32::from(count) * 16;
        let (head, _) = self.reserve(1)?;
        self.write_desc(
            mem,
            head,
            Desc {
                addr: table,
                len: table_len32,
                flags: VRING_DESC_F_INDIRECT,
                next: 0,
            },
        )?;
        Ok((head, table))
    }

    /// Makes the chain at `head` available to the device (the caller kicks afterwards).
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) -> Result<(), VringError> {
        let slot = u64::from(self.next_avail % self.size);
        mem.write_u16(self.avail + 4 + 2 * slot, head)?;
        // The ring entry must be visible before the index that exposes it (virtio 1.2, 2.7.13).
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.write_u16(self.avail + 2, self.next_avail)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Stores a raw available index, as a broken or hostile driver would.
    pub fn set_avail_idx_raw(&mut self, mem: &GuestMemory, idx: u16) -> Result<(), VringError> {
        fence(Ordering::SeqCst);
        self.next_avail = idx;
        mem.write_u16(self.avail + 2, idx)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// The device's current used index.
    pub fn used_idx(&self, mem: &GuestMemory) -> Result<u16, VringError> {
        mem.read_u16(self.used + 2)
    }

    /// Takes the next used element, if the device has returned one.
    pub fn pop_used(&mut self, mem: &GuestMemory) -> Result<Option<UsedElem>, VringError> {
        let used_idx = self.used_idx(mem)?;
        // Read the element only after seeing the index that covers it.
        fence(Ordering::SeqCst);
        if used_idx == self.last_used {
            return Ok(None);
        }
        let slot = u64::from(self.last_used % self.size);
        let elem = self.used + 4 + 8 * slot;
        let used = UsedElem {
            id: mem.read_u32(elem)?,
            len: mem.read_u32(elem + 4)?,
        };
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // used_event: ask for a call on the very next used element (virtio 1.2, 2.7.10).
            mem.write_u16(self.avail + 4 + 2 * u64::from(self.size), self.last_used)?;
            fence(Ordering::SeqCst);
        }
        Ok(Some(used))
    }

    /// Waits up to `timeout` for the next used element, sleeping on the `call` eventfd.
    pub fn wait_used(
        &mut self,
        mem: &GuestMemory,
        call: BorrowedFd<'_>,
        timeout: Duration,
    ) -> Result<UsedElem, VringError> {
        let start = Instant::now();
        loop {
            if let Some(used) = self.pop_used(mem)? {
                return Ok(used);
            }
            let remaining = timeout.saturating_sub(start.elapsed());
            if remaining.is_zero() {
                return Err(VringError::Timeout {
                    queue: self.index,
                    waited: timeout,
                });
            }
            wait_readable(call, remaining)?;
        }
    }
}

/// Waits until `fd` (an eventfd) is readable or `timeout` passes, and consumes its counter.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool, VringError> {
    // Round up so a sub-millisecond remainder still waits, and cap at what poll accepts.
    let ms = timeout.as_millis().saturating_add(1).min(i32::MAX as u128);
    let poll_timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ready = match nix::poll::poll(&mut fds, poll_timeout) {
        Ok(n) => n > 0,
        Err(nix::errno::Errno::EINTR) => false,
        Err(errno) => {
            return Err(VringError::Sys {
                what: "poll",
                errno,
            })
        }
    };
    if ready {
        let mut counter = [0u8; 8];
        match nix::unistd::read(fd, &mut counter) {
            Ok(_) | Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => {
                return Err(VringError::Sys {
                    what: "read call eventfd",
                    errno,
                })
            }
        }
    }
    Ok(ready)
}

/// `struct virtio_blk_config`, the fields a block driver reads (virtio 1.2, 5.2.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors, whatever `blk_size` is.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    /// Byte 32: 1 = write-back cache (CONFIG_WCE).
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// Parses the first [`BLK_CONFIG_LEN`] bytes of a config space read.
    pub fn parse(b: &[u8]) -> Result<Self, VringError> {
        if b.len() < BLK_CONFIG_LEN {
            return Err(VringError::ShortConfig { len: b.len() });
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Ok(BlkConfig {
            capacity: u64_at(0),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            // 16..20: geometry (cylinders le16, heads u8, sectors u8), unused here.
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            writeback: b[32],
            // 33: unused0
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parse_reads_fields_at_spec_offsets() {
        let mut raw = [0u8; BLK_CONFIG_LEN];
        raw[0..8].copy_from_slice(&0x1_0000_0002u64.to_le_bytes());
        raw[12..16].copy_from_slice(&254u32.to_le_bytes());
        raw[20..24].copy_from_slice(&4096u32.to_le_bytes());
        raw[32] = 1;
        raw[34..36].copy_from_slice(&3u16.to_le_bytes());
        raw[40..44].copy_from_slice(&7u32.to_le_bytes());
        raw[56] = 1;

        let cfg = BlkConfig::parse(&raw).unwrap();

        assert_eq!(cfg.capacity, 0x1_0000_0002);
        assert_eq!(cfg.seg_max, 254);
        assert_eq!(cfg.blk_size, 4096);
        assert_eq!(cfg.writeback, 1);
        assert_eq!(cfg.num_queues, 3);
        assert_eq!(cfg.max_discard_seg, 7);
        assert_eq!(cfg.write_zeroes_may_unmap, 1);
    }

    #[test]
    fn chain_descriptors_link_in_order_and_mark_direction() {
        let mem = GuestMemory::new(1 << 20, 0x10_0000).unwrap();
        let mut q = SplitQueue::new(&mem, 0, 8, false).unwrap();

        let head = q
            .add_chain(
                &mem,
                &[
                    Segment::readable(0x10_1000, 16),
                    Segment::writable(0x10_2000, 512),
                    Segment::writable(0x10_3000, 1),
                ],
            )
            .unwrap();

        assert_eq!(head, 0);
        let d: Vec<Desc> = (0..3).map(|i| q.read_desc(&mem, i).unwrap()).collect();
        assert_eq!(d[0].flags, VRING_DESC_F_NEXT);
        assert_eq!(d[0].next, 1);
        assert_eq!(d[1].flags, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE);
        assert_eq!(d[2].flags, VRING_DESC_F_WRITE);
        assert_eq!(d[2].addr, 0x10_3000);
    }

    #[test]
    fn chains_wrap_to_index_zero_when_the_tail_is_too_short() {
        let mem = GuestMemory::new(1 << 20, 0).unwrap();
        let mut q = SplitQueue::new(&mem, 0, 4, false).unwrap();
        let seg = Segment::readable(0, 1);

        let first = q.add_chain(&mem, &[seg, seg, seg]).unwrap();
        let second = q.add_chain(&mem, &[seg, seg]).unwrap();

        assert_eq!((first, second), (0, 0));
    }

    #[test]
    fn memory_access_outside_the_region_is_refused() {
        let mem = GuestMemory::new(4096, 0x1000).unwrap();

        let below = mem.read(0x800, 16);
        let straddle = mem.write(0x1ff0, &[0u8; 32]);
        let overflow = mem.read(u64::MAX - 4, 16);

        assert!(matches!(below, Err(VringError::OutOfRange { .. })));
        assert!(matches!(straddle, Err(VringError::OutOfRange { .. })));
        assert!(matches!(overflow, Err(VringError::OutOfRange { .. })));
    }

    #[test]
    fn published_chain_appears_in_avail_ring_and_used_elements_are_reaped() {
        let mem = GuestMemory::new(1 << 20, 0).unwrap();
        let mut q = SplitQueue::new(&mem, 0, 8, true).unwrap();
        let head = q.add_chain(&mem, &[Segment::readable(0, 1)]).unwrap();

        q.publish(&mem, head).unwrap();
        // Play the device: return the chain with len 7.
        mem.write_u32(q.used + 4, u32::from(head)).unwrap();
        mem.write_u32(q.used + 8, 7).unwrap();
        mem.write_u16(q.used + 2, 1).unwrap();
        let used = q.pop_used(&mem).unwrap();

        assert_eq!(mem.read_u16(q.avail + 2).unwrap(), 1);
        assert_eq!(used, Some(UsedElem { id: 0, len: 7 }));
        assert_eq!(mem.read_u16(q.avail + 4 + 2 * 8).unwrap(), 1, "used_event");
        assert_eq!(q.pop_used(&mem).unwrap(), None);
    }
}
