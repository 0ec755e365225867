//! Reading a descriptor chain by its head index, for requests resubmitted after a restart
//! (they are no longer in the avail ring). Guest memory is hostile: every index, length and
//! table address is bounded, and a chain longer than the queue, a loop, a nested or empty
//! indirect table, or memory outside the guest's makes the chain malformed.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::virtio_blk::request::Descriptor;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const DESC_BYTES: u64 = 16;

struct Raw {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read<M: GuestMemory>(mem: &M, table: u64, index: u16) -> Option<Raw> {
    let at = table.checked_add(u64::from(index) * DESC_BYTES)?;
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    Some(Raw {
        addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        flags: u16::from_le_bytes([b[12], b[13]]),
        next: u16::from_le_bytes([b[14], b[15]]),
    })
}

/// The chain starting at `head` in the descriptor table at `table` of a queue of `size`;
/// the flag is true when the chain is malformed (the request is then refused).
pub fn chain_at<M: GuestMemory>(
    mem: &M,
    table: u64,
    size: u16,
    head: u16,
) -> (Vec<Descriptor>, bool) {
    let mut out = Vec::new();
    if head >= size {
        return (out, true);
    }
    let (mut table, mut limit, mut index, mut indirect) = (table, size, head, false);
    // "A driver MUST NOT create a descriptor chain longer than the Queue Size of the device":
    // at most `size` descriptors in all, indirect ones included.
    while out.len() < usize::from(size) {
        let Some(d) = read(mem, table, index) else {
            return (out, true);
        };
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            // Only the main table may point at an indirect table, once, as the whole chain.
            if indirect || !out.is_empty() || d.len == 0 || u64::from(d.len) % DESC_BYTES != 0 {
                return (out, true);
            }
            let entries = u64::from(d.len) / DESC_BYTES;
            let Ok(entries) = u16::try_from(entries) else {
                return (out, true);
            };
            if entries > size {
                return (out, true);
            }
            (table, limit, index, indirect) = (d.addr, entries, 0, true);
            continue;
        }
        out.push(Descriptor {
            addr: GuestAddress(d.addr),
            len: d.len,
            writable: d.flags & VIRTQ_DESC_F_WRITE != 0,
        });
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return (out, false);
        }
        if d.next >= limit {
            return (out, true);
        }
        index = d.next;
    }
    (out, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).expect("memory")
    }

    fn put(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&b, GuestAddress(table + u64::from(i) * 16))
            .expect("write");
    }

    #[test]
    fn direct_and_indirect_chains_are_read_and_loops_refused() {
        let m = mem();
        put(&m, 0, 2, 0x1000, 16, VIRTQ_DESC_F_NEXT, 5);
        put(
            &m,
            0,
            5,
            0x2000,
            512,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            7,
        );
        put(&m, 0, 7, 0x3000, 1, VIRTQ_DESC_F_WRITE, 0);
        let (chain, bad) = chain_at(&m, 0, 8, 2);
        assert!(!bad);
        assert_eq!(chain.len(), 3);
        assert!(!chain[0].writable && chain[1].writable);

        put(&m, 0, 1, 0x4000, 48, VIRTQ_DESC_F_INDIRECT, 0);
        put(&m, 0x4000, 0, 0x1000, 16, VIRTQ_DESC_F_NEXT, 1);
        put(
            &m,
            0x4000,
            1,
            0x2000,
            512,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            2,
        );
        put(&m, 0x4000, 2, 0x3000, 1, VIRTQ_DESC_F_WRITE, 0);
        let (chain, bad) = chain_at(&m, 0, 8, 1);
        assert!(!bad);
        assert_eq!(chain.len(), 3);

        // A loop: 3 -> 4 -> 3.
        put(&m, 0, 3, 0x1000, 16, VIRTQ_DESC_F_NEXT, 4);
        put(&m, 0, 4, 0x1000, 16, VIRTQ_DESC_F_NEXT, 3);
        assert!(chain_at(&m, 0, 8, 3).1);
        // Out of range head and next, nested indirect, table outside memory.
        assert!(chain_at(&m, 0, 8, 8).1);
        put(&m, 0, 6, 0x1000, 16, VIRTQ_DESC_F_NEXT, 9);
        assert!(chain_at(&m, 0, 8, 6).1);
        put(&m, 0x4000, 0, 0x4000, 48, VIRTQ_DESC_F_INDIRECT, 0);
        assert!(chain_at(&m, 0, 8, 1).1);
        put(&m, 0, 0, 1 << 40, 48, VIRTQ_DESC_F_INDIRECT, 0);
        assert!(chain_at(&m, 0, 8, 0).1);
    }
}
