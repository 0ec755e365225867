//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split virtqueues.
//!
//! vublk allocates a shared memory region (a memfd) on GET_INFLIGHT_FD; the frontend keeps it
//! and hands it to the next vublk with SET_INFLIGHT_FD after a crash or restart. Per queue, the
//! region records which descriptor heads were taken off the avail ring and not yet returned,
//! in the layout and order the vhost-user spec ("Inflight I/O tracking") gives, so a new
//! vublk resubmits exactly those, oldest first, and continues popping after them:
//!
//! - taking head `i`: `desc[i].counter = counter++`, `desc[i].inflight = 1`;
//! - returning `i`: `desc[i].next = last_batch_head`, `last_batch_head = i`, the used ring's
//!   idx moves, then `desc[i].inflight = 0`, `used_idx = ` the used ring's idx;
//! - reconnecting: if `used_idx` differs from the used ring's idx, the last return was
//!   published but not recorded: clear `desc[last_batch_head].inflight`; then every head still
//!   in flight is resubmitted in counter order, and the avail ring is read from
//!   `used idx + in flight` on (QEMU restores the ring's last_avail_idx to its used idx when the
//!   backend dies).
//!
//! The region is guest-independent memory written only by vublk; the frontend only keeps it.
//! A hostile frontend can still hand over garbage: every field read from it is bounded.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// Bytes of a queue region's header: features (u64), version, desc_num, last_batch_head,
/// used_idx (u16 each).
const HEADER_BYTES: usize = 16;
/// Bytes of one `DescStateSplit`: inflight (u8), padding [u8; 5], next (u16), counter (u64).
const DESC_BYTES: usize = 16;
/// Queue regions are aligned like libvhost-user's, so the region is portable between backends.
const REGION_ALIGN: usize = 64;
/// The layout version this code writes and reads.
const VERSION: u16 = 1;

/// The bytes of one queue's region for a queue of `queue_size`.
pub fn queue_region_bytes(queue_size: u16) -> usize {
    (HEADER_BYTES + DESC_BYTES * usize::from(queue_size)).next_multiple_of(REGION_ALIGN)
}

/// Why a region could not be created or taken over.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("cannot create the inflight memfd")]
    Create(#[source] std::io::Error),
    #[error("cannot map the inflight region ({size} bytes at offset {offset})")]
    Map {
        size: u64,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("inflight region of {size} bytes is too small for {num_queues} queue(s) of {queue_size} ({need} bytes needed)")]
    TooSmall {
        size: u64,
        num_queues: u16,
        queue_size: u16,
        need: u64,
    },
}

/// A mapped inflight region.
pub struct InflightRegion {
    base: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the region is plain shared memory; every access goes through InflightQueue, whose
// methods are only called by the one worker that owns the queue (the handler hands each queue
// its own view), so no two threads write the same bytes.
unsafe impl Send for InflightRegion {}
// SAFETY: as above: shared references only hand out per-queue views.
unsafe impl Sync for InflightRegion {}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe the mapping made in `map`, unmapped once here.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a fresh, zeroed region for `num_queues` queues of `queue_size`.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(Arc<InflightRegion>, File), InflightError> {
        let size = queue_region_bytes(queue_size) * usize::from(num_queues);
        let fd = nix::sys::memfd::memfd_create(
            c"vublk-inflight",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(|e| InflightError::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(size as u64).map_err(InflightError::Create)?;
        let region = Self::map(&file, size as u64, 0, num_queues, queue_size)?;
        for q in 0..num_queues {
            if let Some(queue) = region.queue(q) {
                queue.initialize();
            }
        }
        Ok((region, file))
    }

    /// SET_INFLIGHT_FD: maps the region the frontend kept.
    pub fn map(
        file: &File,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Arc<InflightRegion>, InflightError> {
        let need = (queue_region_bytes(queue_size) * usize::from(num_queues)) as u64;
        if size < need || num_queues == 0 || queue_size == 0 {
            return Err(InflightError::TooSmall {
                size,
                num_queues,
                queue_size,
                need,
            });
        }
        let map_err = |source| InflightError::Map {
            size,
            offset,
            source,
        };
        let len = usize::try_from(size).map_err(|_| map_err(std::io::Error::other("too large")))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| map_err(std::io::Error::other("offset too large")))?;
        // SAFETY: a fresh shared mapping of `len` bytes of the file at `off`; the kernel picks
        // the address; nothing else in this process refers to it yet.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| map_err(std::io::Error::other("null mapping")))?;
        Ok(Arc::new(InflightRegion {
            base,
            len,
            num_queues,
            queue_size,
        }))
    }

    /// The view of queue `index`, or `None` past the region.
    fn queue(&self, index: u16) -> Option<InflightView<'_>> {
        if index >= self.num_queues {
            return None;
        }
        let start = queue_region_bytes(self.queue_size) * usize::from(index);
        // SAFETY: `start` plus the queue's region lies within the mapping (checked against
        // `need` in `map`).
        let base = unsafe { self.base.as_ptr().add(start) };
        Some(InflightView {
            base,
            desc_num: self.queue_size,
            _region: std::marker::PhantomData,
        })
    }

    /// A handle to queue `index` that keeps the region mapped.
    pub fn queue_handle(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        (index < self.num_queues).then(|| InflightQueue {
            region: Arc::clone(self),
            index,
        })
    }
}

/// One queue's region, owned by that queue's worker.
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    index: u16,
}

impl std::fmt::Debug for InflightQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InflightQueue({})", self.index)
    }
}

/// Raw accessors of one queue region (volatile: the memory outlives this process).
struct InflightView<'a> {
    base: *mut u8,
    desc_num: u16,
    _region: std::marker::PhantomData<&'a InflightRegion>,
}

impl InflightView<'_> {
    fn read_u16(&self, at: usize) -> u16 {
        // SAFETY: callers pass offsets inside this queue's region (header fields or a
        // descriptor entry below desc_num); u16 fields are 2-byte aligned in the layout.
        unsafe { std::ptr::read_volatile(self.base.add(at).cast::<u16>()) }
    }
    fn write_u16(&self, at: usize, v: u16) {
        // SAFETY: as in read_u16.
        unsafe { std::ptr::write_volatile(self.base.add(at).cast::<u16>(), v) }
    }
    fn read_u64(&self, at: usize) -> u64 {
        // SAFETY: as in read_u16; u64 fields are 8-byte aligned (regions are 64-aligned).
        unsafe { std::ptr::read_volatile(self.base.add(at).cast::<u64>()) }
    }
    fn write_u64(&self, at: usize, v: u64) {
        // SAFETY: as in read_u64.
        unsafe { std::ptr::write_volatile(self.base.add(at).cast::<u64>(), v) }
    }
    fn read_u8(&self, at: usize) -> u8 {
        // SAFETY: as in read_u16.
        unsafe { std::ptr::read_volatile(self.base.add(at)) }
    }
    fn write_u8(&self, at: usize, v: u8) {
        // SAFETY: as in read_u16.
        unsafe { std::ptr::write_volatile(self.base.add(at), v) }
    }

    const VERSION_AT: usize = 8;
    const DESC_NUM_AT: usize = 10;
    const LAST_BATCH_AT: usize = 12;
    const USED_IDX_AT: usize = 14;

    fn desc(head: u16) -> usize {
        HEADER_BYTES + DESC_BYTES * usize::from(head)
    }

    fn initialize(&self) {
        self.write_u64(0, 0);
        self.write_u16(Self::DESC_NUM_AT, self.desc_num);
        self.write_u16(Self::LAST_BATCH_AT, 0);
        self.write_u16(Self::USED_IDX_AT, 0);
        fence(Ordering::Release);
        self.write_u16(Self::VERSION_AT, VERSION);
    }
}

/// What recovery found on a queue (SET_INFLIGHT_FD after a restart).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to resubmit, oldest first.
    pub resubmit: Vec<u16>,
    /// Where the avail ring is read from next: the used idx plus the heads in flight.
    pub next_avail: u16,
    /// The next counter value.
    pub counter: u64,
}

impl InflightQueue {
    fn view(&self) -> Option<InflightView<'_>> {
        self.region.queue(self.index)
    }

    /// Head `head` was taken off the avail ring.
    pub fn begin(&self, head: u16, counter: u64) {
        let Some(v) = self.view() else { return };
        if head >= v.desc_num {
            return;
        }
        let at = InflightView::desc(head);
        v.write_u64(at + 8, counter);
        fence(Ordering::Release);
        v.write_u8(at, 1);
    }

    /// Before `head` goes on the used ring.
    pub fn pre_put(&self, head: u16) {
        let Some(v) = self.view() else { return };
        if head >= v.desc_num {
            return;
        }
        let last = v.read_u16(InflightView::LAST_BATCH_AT);
        v.write_u16(InflightView::desc(head) + 6, last);
        v.write_u16(InflightView::LAST_BATCH_AT, head);
        fence(Ordering::Release);
    }

    /// After `head` went on the used ring, whose idx is now `used_idx`.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        let Some(v) = self.view() else { return };
        if head >= v.desc_num {
            return;
        }
        fence(Ordering::Release);
        v.write_u8(InflightView::desc(head), 0);
        fence(Ordering::Release);
        v.write_u16(InflightView::USED_IDX_AT, used_idx);
    }

    /// Reconciles the region with the used ring's idx and lists what to resubmit. A region
    /// never initialized (version 0) is initialized and has nothing in flight.
    pub fn recover(&self, used_ring_idx: u16) -> Recovery {
        let Some(v) = self.view() else {
            return Recovery {
                next_avail: used_ring_idx,
                ..Recovery::default()
            };
        };
        if v.read_u16(InflightView::VERSION_AT) != VERSION
            || v.read_u16(InflightView::DESC_NUM_AT) != v.desc_num
        {
            v.initialize();
            v.write_u16(InflightView::USED_IDX_AT, used_ring_idx);
            return Recovery {
                next_avail: used_ring_idx,
                ..Recovery::default()
            };
        }
        if v.read_u16(InflightView::USED_IDX_AT) != used_ring_idx {
            // The last return reached the used ring but not the region: it is done.
            let last = v.read_u16(InflightView::LAST_BATCH_AT);
            if last < v.desc_num {
                v.write_u8(InflightView::desc(last), 0);
            }
            fence(Ordering::Release);
            v.write_u16(InflightView::USED_IDX_AT, used_ring_idx);
        }
        let mut inflight: Vec<(u64, u16)> = (0..v.desc_num)
            .filter(|&h| v.read_u8(InflightView::desc(h)) == 1)
            .map(|h| (v.read_u64(InflightView::desc(h) + 8), h))
            .collect();
        inflight.sort_unstable();
        let counter = inflight.last().map_or(0, |(c, _)| c.wrapping_add(1));
        let count = u16::try_from(inflight.len()).unwrap_or(u16::MAX);
        Recovery {
            resubmit: inflight.into_iter().map(|(_, h)| h).collect(),
            next_avail: used_ring_idx.wrapping_add(count),
            counter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_vublk_resubmits_what_the_old_one_left_in_flight_oldest_first() {
        let (region, file) = InflightRegion::create(2, 8).expect("create");
        let q = region.queue_handle(1).expect("queue 1");
        // Heads 3, 5, 1 taken in that order; 5 completes (used idx 1); 1 is put on the used
        // ring (idx 2) but the process dies before recording it.
        q.begin(3, 0);
        q.begin(5, 1);
        q.begin(1, 2);
        q.pre_put(5);
        q.post_put(5, 1);
        q.pre_put(1);
        drop(q);
        drop(region);

        let region =
            InflightRegion::map(&file, file.metadata().expect("len").len(), 0, 2, 8).expect("map");
        let q = region.queue_handle(1).expect("queue 1");
        let r = q.recover(2);
        assert_eq!(r.resubmit, [3], "5 completed, 1 reached the used ring");
        assert_eq!(
            r.next_avail, 3,
            "the avail ring continues after the used idx and 3"
        );
        assert_eq!(r.counter, 1);
        // Queue 0 was untouched.
        let r0 = region.queue_handle(0).expect("queue 0").recover(0);
        assert_eq!(r0, Recovery::default());
    }

    #[test]
    fn resubmission_follows_the_counter_not_the_head_number() {
        let (region, _file) = InflightRegion::create(1, 16).expect("create");
        let q = region.queue_handle(0).expect("queue");
        for (counter, head) in [(10u64, 9u16), (11, 2), (12, 15)] {
            q.begin(head, counter);
        }
        let r = q.recover(0);
        assert_eq!(r.resubmit, [9, 2, 15]);
        assert_eq!(r.next_avail, 3);
        assert_eq!(r.counter, 13);
    }

    #[test]
    fn garbage_from_the_frontend_is_bounded() {
        let (region, file) = InflightRegion::create(1, 4).expect("create");
        drop(region);
        // Too small for what the frontend claims.
        assert!(InflightRegion::map(&file, 64, 0, 4, 256).is_err());
        let region = InflightRegion::map(&file, 128, 0, 1, 4).expect("map");
        let q = region.queue_handle(0).expect("queue");
        // Out-of-range heads are ignored, not written past the region.
        q.begin(4, 0);
        q.pre_put(u16::MAX);
        q.post_put(9, 1);
        assert!(region.queue_handle(1).is_none());
    }
}
