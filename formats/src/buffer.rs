//! A zeroed heap buffer aligned for O_DIRECT, shared by setup-time reads here and the server's
//! bounce, table and zero buffers.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: enough for O_DIRECT on any logical block size.
pub const BUFFER_ALIGN: usize = 4096;

/// A zeroed heap buffer aligned to [`BUFFER_ALIGN`], for O_DIRECT bounces and zero writes.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len())
            .finish()
    }
}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes (at least one).
    pub fn new(len: usize) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), BUFFER_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Never true: a buffer holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed at allocation) bytes and owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout in `new`.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned_and_zeroed() {
        let b = AlignedBuf::new(8192).unwrap();
        assert_eq!(b.as_mut_ptr() as usize % BUFFER_ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }
}
