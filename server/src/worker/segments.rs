//! Guest data segments: cutting a request's buffers at piece boundaries and turning them into
//! host iovecs. Pure except for address translation through `GuestMemoryBackend`.

use vm_memory::{Address, GuestMemoryBackend};

use crate::virtio_blk::request::Segment;

/// The part of `segs` covering bytes `start..start + len` of their concatenation.
pub fn carve(segs: &[Segment], start: u64, len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    let end = start.saturating_add(len);
    for seg in segs {
        let seg_start = pos;
        let seg_end = pos + u64::from(seg.len);
        pos = seg_end;
        if seg_end <= start {
            continue;
        }
        if seg_start >= end {
            break;
        }
        let from = start.max(seg_start) - seg_start;
        let to = end.min(seg_end) - seg_start;
        // Both lie within `seg.len`, a u32.
        let (Ok(from32), Ok(to32)) = (u32::try_from(from), u32::try_from(to)) else {
            break;
        };
        out.push(Segment {
            addr: seg.addr.unchecked_add(from),
            len: to32 - from32,
        });
    }
    out
}

/// Host iovecs for `segs` in `mem`, split where a segment crosses a memory region.
/// `None` if any byte is outside guest memory (the request parser has already checked this,
/// so it only happens if the memory table changed underneath, which fails the request).
pub fn iovecs<M: GuestMemoryBackend>(mem: &M, segs: &[Segment]) -> Option<Vec<libc::iovec>> {
    let mut out = Vec::with_capacity(segs.len());
    for seg in segs {
        for slice in mem.get_slices(seg.addr, seg.len as usize) {
            let slice = slice.ok()?;
            let guard = slice.ptr_guard_mut();
            out.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(out)
}

/// Drops the first `n` bytes from `iov` (after a short read or write).
pub fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop_count = 0;
    for v in iov.iter_mut() {
        if n == 0 {
            break;
        }
        if n >= v.iov_len {
            n -= v.iov_len;
            drop_count += 1;
        } else {
            // SAFETY: `n < iov_len`, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    iov.drain(..drop_count);
}

/// Whether every iovec is aligned to `align` in address and length (O_DIRECT's rule).
pub fn aligned(iov: &[libc::iovec], align: usize) -> bool {
    iov.iter()
        .all(|v| (v.iov_base as usize) % align == 0 && v.iov_len % align == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn carve_inside_one_segment() {
        assert_eq!(carve(&[seg(1000, 4096)], 512, 1024), vec![seg(1512, 1024)]);
    }

    #[test]
    fn carve_across_segments() {
        let segs = [seg(0, 512), seg(10_000, 1024), seg(50_000, 512)];
        assert_eq!(
            carve(&segs, 256, 1536),
            vec![seg(256, 256), seg(10_000, 1024), seg(50_000, 256)]
        );
    }

    #[test]
    fn carve_of_everything_is_identity() {
        let segs = [seg(0, 512), seg(4096, 512)];
        assert_eq!(carve(&segs, 0, 1024), segs.to_vec());
        assert!(carve(&segs, 1024, 512).is_empty());
    }

    #[test]
    fn iovecs_split_at_region_boundaries() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 4096),
            (GuestAddress(4096), 4096),
        ])
        .unwrap();
        let iov = iovecs(&mem, &[seg(2048, 4096)]).unwrap();
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_len + iov[1].iov_len, 4096);
        assert!(iovecs(&mem, &[seg(6000, 4096)]).is_none());
    }

    #[test]
    fn advance_drops_and_trims() {
        let mut buf = [0u8; 100];
        let base = buf.as_mut_ptr();
        let mut iov = vec![
            libc::iovec {
                iov_base: base.cast(),
                iov_len: 10,
            },
            libc::iovec {
                // SAFETY: 10 is within the 100-byte buffer.
                iov_base: unsafe { base.add(10) }.cast(),
                iov_len: 90,
            },
        ];
        advance(&mut iov, 15);
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_len, 85);
        // SAFETY: 15 is within the 100-byte buffer.
        assert_eq!(iov[0].iov_base, unsafe { base.add(15) }.cast());
    }

    #[test]
    fn alignment_checks_base_and_length() {
        let iov = [libc::iovec {
            iov_base: 4096usize as *mut libc::c_void,
            iov_len: 512,
        }];
        assert!(aligned(&iov, 512));
        let odd = [libc::iovec {
            iov_base: 4100usize as *mut libc::c_void,
            iov_len: 512,
        }];
        assert!(!aligned(&odd, 512));
    }
}
