//! qcow2 table entries: L1, L2 and refcount table entries as typed values, and refcount block
//! entries of every width, decoded from and encoded to their on-disk bits.
//!
//! Owns: the bit layouts of qcow2.rst's "Cluster mapping" and "Host cluster management"
//! sections, every reserved-bit and alignment check on an entry (an error names the table and
//! the index at fault), and the read range of a compressed cluster. It does not know where the
//! tables are, how they are cached, or what to do with an error (the engine marks the image
//! corrupt); extended L2 entries (128 bits) are not decoded: such images are refused at open.

use std::fmt;

use super::header::Version;
use super::limits::{MAX_COMPRESSED_READ_CLUSTERS, MAX_HOST_OFFSET};
use super::types::{ClusterGeometry, HostCluster, HostOffset, RefcountGeometry};

/// L1 entry "63: 0 for an L2 table that is unused or requires COW, 1 if its refcount is
/// exactly one"; L2 entry "63: ... 1 for standard clusters whose refcount is exactly one".
pub const COPIED: u64 = 1 << 63;
/// L2 entry "62: 0 for standard clusters, 1 for compressed clusters".
pub const COMPRESSED: u64 = 1 << 62;
/// Standard cluster descriptor "Bit 0: If set to 1, the cluster reads as all zeros".
pub const ZERO: u64 = 1;
/// Bits 9-55: the offset field of L1 entries and of standard cluster descriptors.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry "Bit 0 - 8: Reserved (set to 0)" and "56 - 62: Reserved (set to 0)".
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Standard cluster descriptor "1 - 8: Reserved (set to 0)" and "56 - 61: Reserved (set to 0)".
pub const L2_STANDARD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry "Bit 0 - 8: Reserved (set to 0)".
pub const REFTABLE_RESERVED_MASK: u64 = 0x1ff;
/// Compressed data is counted in 512-byte sectors.
pub const COMPRESSED_SECTOR_SIZE: u64 = 512;

/// The table an entry was read from, for errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableRef {
    ActiveL1,
    L2 { offset: HostOffset },
    RefcountTable,
    RefcountBlock { offset: HostOffset },
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableRef::ActiveL1 => f.write_str("active L1 table"),
            TableRef::L2 { offset } => write!(f, "L2 table at {offset}"),
            TableRef::RefcountTable => f.write_str("refcount table"),
            TableRef::RefcountBlock { offset } => write!(f, "refcount block at {offset}"),
        }
    }
}

/// An entry read from an image that breaks the spec: the image is corrupt.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("{table} entry {index} ({raw:#018x}): reserved bits {bits:#x} are set")]
    ReservedBits {
        table: TableRef,
        index: u64,
        raw: u64,
        bits: u64,
    },
    #[error("{table} entry {index} ({raw:#018x}): offset {offset:#x} is not cluster aligned")]
    Misaligned {
        table: TableRef,
        index: u64,
        raw: u64,
        offset: u64,
    },
    #[error("{table} entry {index} ({raw:#018x}): COPIED is set but the offset is 0")]
    CopiedWithoutOffset {
        table: TableRef,
        index: u64,
        raw: u64,
    },
    #[error("{table} entry {index} ({raw:#018x}): zero flag in a version 2 image")]
    ZeroFlagInV2 {
        table: TableRef,
        index: u64,
        raw: u64,
    },
    #[error("{table} entry {index} ({raw:#018x}): COPIED is set on a compressed cluster")]
    CompressedCopied {
        table: TableRef,
        index: u64,
        raw: u64,
    },
    #[error(
        "{table} entry {index} ({raw:#018x}): {len} bytes at {offset:#x} reach past host \
         offset {limit:#x}"
    )]
    BeyondLimit {
        table: TableRef,
        index: u64,
        raw: u64,
        offset: u64,
        len: u64,
        limit: u64,
    },
}

/// A value that cannot be encoded as an entry (a bug in the caller, not in an image).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{offset} is not cluster aligned")]
    Misaligned { offset: HostOffset },
    #[error("{offset} (+{len} bytes) is at or past the host offset limit {limit:#x}")]
    BeyondLimit {
        offset: HostOffset,
        len: u64,
        limit: u64,
    },
    #[error("host offset 0 cannot be allocated: it is the header")]
    ZeroOffset,
    #[error("version 2 images have no zero flag")]
    ZeroFlagInV2,
    #[error("compressed data of {len} bytes is empty or spans more than {max} bytes")]
    CompressedLength { len: u64, max: u64 },
}

/// An active L1 table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L1Entry {
    /// "If the offset is 0, the L2 table and all clusters described by this L2 table are
    /// unallocated."
    Unallocated,
    L2Table {
        offset: HostOffset,
        /// Bit 63: the L2 table's refcount is exactly one (writable in place).
        copied: bool,
    },
}

/// Decodes entry `index` of the active L1 table.
pub fn decode_l1_entry(
    raw: u64,
    index: u64,
    geometry: &ClusterGeometry,
) -> Result<L1Entry, EntryError> {
    let table = TableRef::ActiveL1;
    // "Bit 0 - 8: Reserved (set to 0)"; "56 - 62: Reserved (set to 0)".
    if raw & L1_RESERVED_MASK != 0 {
        return Err(EntryError::ReservedBits {
            table,
            index,
            raw,
            bits: raw & L1_RESERVED_MASK,
        });
    }
    let offset = raw & OFFSET_MASK;
    let copied = raw & COPIED != 0;
    // "Must be aligned to a cluster boundary."
    if !geometry.is_cluster_aligned(offset) {
        return Err(EntryError::Misaligned {
            table,
            index,
            raw,
            offset,
        });
    }
    if offset == 0 {
        // Bit 63 is "0 for an L2 table that is unused".
        if copied {
            return Err(EntryError::CopiedWithoutOffset { table, index, raw });
        }
        return Ok(L1Entry::Unallocated);
    }
    Ok(L1Entry::L2Table {
        offset: HostOffset(offset),
        copied,
    })
}

/// Encodes an L1 entry.
pub fn encode_l1_entry(entry: L1Entry, geometry: &ClusterGeometry) -> Result<u64, EncodeError> {
    match entry {
        L1Entry::Unallocated => Ok(0),
        L1Entry::L2Table { offset, copied } => {
            let raw = encode_cluster_offset(offset, geometry)?;
            Ok(raw | if copied { COPIED } else { 0 })
        }
    }
}

/// A cluster-aligned, nonzero host offset below 2^56, as bits 9-55.
fn encode_cluster_offset(
    offset: HostOffset,
    geometry: &ClusterGeometry,
) -> Result<u64, EncodeError> {
    if offset.0 == 0 {
        return Err(EncodeError::ZeroOffset);
    }
    if !geometry.is_cluster_aligned(offset.0) {
        return Err(EncodeError::Misaligned { offset });
    }
    if offset.0 >= MAX_HOST_OFFSET {
        return Err(EncodeError::BeyondLimit {
            offset,
            len: 0,
            limit: MAX_HOST_OFFSET,
        });
    }
    Ok(offset.0)
}

/// A compressed cluster: where its bytes are and how many to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedCluster {
    host_offset: HostOffset,
    /// "Number of additional 512-byte sectors used for the compressed data, beyond the sector
    /// containing the offset".
    additional_sectors: u64,
}

impl CompressedCluster {
    /// Describes `len` compressed bytes stored at `host_offset` (any byte alignment), as a
    /// writer of compressed clusters does.
    pub fn new(
        host_offset: HostOffset,
        len: u64,
        geometry: &ClusterGeometry,
    ) -> Result<CompressedCluster, EncodeError> {
        let max = MAX_COMPRESSED_READ_CLUSTERS * geometry.cluster_size();
        let field_max = compressed_sectors_mask(geometry);
        let last = host_offset
            .0
            .checked_add(len)
            .and_then(|end| end.checked_sub(1));
        let additional_sectors = match last {
            Some(last) if len > 0 => {
                last / COMPRESSED_SECTOR_SIZE - host_offset.0 / COMPRESSED_SECTOR_SIZE
            }
            _ => return Err(EncodeError::CompressedLength { len, max }),
        };
        if additional_sectors > field_max {
            return Err(EncodeError::CompressedLength { len, max });
        }
        if host_offset.0 == 0 {
            return Err(EncodeError::ZeroOffset);
        }
        let c = CompressedCluster {
            host_offset,
            additional_sectors,
        };
        if c.end().0 > MAX_HOST_OFFSET {
            return Err(EncodeError::BeyondLimit {
                offset: host_offset,
                len,
                limit: MAX_HOST_OFFSET,
            });
        }
        Ok(c)
    }

    pub fn host_offset(&self) -> HostOffset {
        self.host_offset
    }

    pub fn additional_sectors(&self) -> u64 {
        self.additional_sectors
    }

    /// How many bytes to read at [`Self::host_offset`]: to the end of the last sector the
    /// descriptor counts (QEMU's csize). The compressed stream may end earlier ("decompression
    /// stops when it has produced a cluster of data"). At most twice the cluster size.
    pub fn read_len(&self) -> u64 {
        (self.additional_sectors + 1) * COMPRESSED_SECTOR_SIZE
            - self.host_offset.0 % COMPRESSED_SECTOR_SIZE
    }

    /// One past the last byte to read.
    pub fn end(&self) -> HostOffset {
        HostOffset(self.host_offset.0 + self.read_len())
    }

    /// The first and last host clusters the compressed bytes touch ("Some of these sectors may
    /// reside in the next contiguous host cluster"), for refcounting.
    pub fn host_clusters(&self, geometry: &ClusterGeometry) -> (HostCluster, HostCluster) {
        (
            geometry.host_cluster(self.host_offset),
            geometry.host_cluster(HostOffset(self.end().0 - 1)),
        )
    }
}

/// x = 62 - (cluster_bits - 8): the offset takes bits 0..x-1.
fn compressed_offset_bits(geometry: &ClusterGeometry) -> u32 {
    62 - (geometry.cluster_bits() - 8)
}

/// The sector count field (bits x..61) holds cluster_bits - 8 bits.
fn compressed_sectors_mask(geometry: &ClusterGeometry) -> u64 {
    (1 << (geometry.cluster_bits() - 8)) - 1
}

/// An L2 table entry (standard 64-bit entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Reads from the backing file, or zeroes without one.
    Unallocated,
    /// "the cluster reads as all zeros. The host cluster offset can be used to describe a
    /// preallocation, but it won't be used for reading data from this cluster, nor is data
    /// read from the backing file".
    Zero {
        preallocated: Option<HostOffset>,
        copied: bool,
    },
    Normal {
        host_offset: HostOffset,
        copied: bool,
    },
    Compressed(CompressedCluster),
}

/// Decodes entry `index` of the L2 table at `table_offset`.
pub fn decode_l2_entry(
    raw: u64,
    table_offset: HostOffset,
    index: u64,
    geometry: &ClusterGeometry,
    version: Version,
) -> Result<L2Entry, EntryError> {
    let table = TableRef::L2 {
        offset: table_offset,
    };
    let copied = raw & COPIED != 0;
    if raw & COMPRESSED != 0 {
        // Bit 63: "0 for clusters that are unused, compressed or require COW".
        if copied {
            return Err(EntryError::CompressedCopied { table, index, raw });
        }
        let x = compressed_offset_bits(geometry);
        let offset = raw & ((1 << x) - 1);
        let additional_sectors = (raw >> x) & compressed_sectors_mask(geometry);
        let c = CompressedCluster {
            host_offset: HostOffset(offset),
            additional_sectors,
        };
        // "If cluster_bits is small enough that this field includes bits beyond 55, those
        // upper bits must be set to 0"; no byte may be read at or past 2^56.
        let len = c
            .read_len()
            .min(MAX_COMPRESSED_READ_CLUSTERS * geometry.cluster_size());
        if offset >= MAX_HOST_OFFSET || offset + len > MAX_HOST_OFFSET {
            return Err(EntryError::BeyondLimit {
                table,
                index,
                raw,
                offset,
                len,
                limit: MAX_HOST_OFFSET,
            });
        }
        return Ok(L2Entry::Compressed(c));
    }
    // Standard cluster descriptor: "1 - 8: Reserved (set to 0)", "56 - 61: Reserved".
    if raw & L2_STANDARD_RESERVED_MASK != 0 {
        return Err(EntryError::ReservedBits {
            table,
            index,
            raw,
            bits: raw & L2_STANDARD_RESERVED_MASK,
        });
    }
    let zero = raw & ZERO != 0;
    // Bit 0: "With version 2 or with extended L2 entries (see the next section), this is
    // always 0."
    if zero && version == Version::V2 {
        return Err(EntryError::ZeroFlagInV2 { table, index, raw });
    }
    let offset = raw & OFFSET_MASK;
    // "Bits 9-55 of host cluster offset. Must be aligned to a cluster boundary."
    if !geometry.is_cluster_aligned(offset) {
        return Err(EntryError::Misaligned {
            table,
            index,
            raw,
            offset,
        });
    }
    // "The offset may only be 0 with bit 63 set (indicating a host cluster offset of 0) when
    // an external data file is used" (and images with one are refused at open).
    if offset == 0 && copied {
        return Err(EntryError::CopiedWithoutOffset { table, index, raw });
    }
    Ok(match (zero, offset) {
        (true, 0) => L2Entry::Zero {
            preallocated: None,
            copied,
        },
        (true, _) => L2Entry::Zero {
            preallocated: Some(HostOffset(offset)),
            copied,
        },
        (false, 0) => L2Entry::Unallocated,
        (false, _) => L2Entry::Normal {
            host_offset: HostOffset(offset),
            copied,
        },
    })
}

/// Encodes an L2 entry.
pub fn encode_l2_entry(
    entry: L2Entry,
    geometry: &ClusterGeometry,
    version: Version,
) -> Result<u64, EncodeError> {
    let copied_bit = |copied: bool| if copied { COPIED } else { 0 };
    match entry {
        L2Entry::Unallocated => Ok(0),
        L2Entry::Zero {
            preallocated,
            copied,
        } => {
            if version == Version::V2 {
                return Err(EncodeError::ZeroFlagInV2);
            }
            let offset = match preallocated {
                Some(o) => encode_cluster_offset(o, geometry)?,
                None if copied => return Err(EncodeError::ZeroOffset),
                None => 0,
            };
            Ok(offset | ZERO | copied_bit(copied))
        }
        L2Entry::Normal {
            host_offset,
            copied,
        } => Ok(encode_cluster_offset(host_offset, geometry)? | copied_bit(copied)),
        L2Entry::Compressed(c) => {
            let x = compressed_offset_bits(geometry);
            if c.host_offset.0 >= (1 << x).min(MAX_HOST_OFFSET) || c.end().0 > MAX_HOST_OFFSET {
                return Err(EncodeError::BeyondLimit {
                    offset: c.host_offset,
                    len: c.read_len(),
                    limit: MAX_HOST_OFFSET,
                });
            }
            if c.additional_sectors > compressed_sectors_mask(geometry) {
                return Err(EncodeError::CompressedLength {
                    len: c.read_len(),
                    max: MAX_COMPRESSED_READ_CLUSTERS * geometry.cluster_size(),
                });
            }
            Ok(COMPRESSED | c.host_offset.0 | (c.additional_sectors << x))
        }
    }
}

/// A refcount table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefcountTableEntry {
    /// "If this is 0, the corresponding refcount block has not yet been allocated. All
    /// refcounts managed by this refcount block are 0."
    Unallocated,
    Block {
        offset: HostOffset,
    },
}

/// Decodes entry `index` of the refcount table.
pub fn decode_refcount_table_entry(
    raw: u64,
    index: u64,
    geometry: &ClusterGeometry,
) -> Result<RefcountTableEntry, EntryError> {
    let table = TableRef::RefcountTable;
    // "Bit 0 - 8: Reserved (set to 0)".
    if raw & REFTABLE_RESERVED_MASK != 0 {
        return Err(EntryError::ReservedBits {
            table,
            index,
            raw,
            bits: raw & REFTABLE_RESERVED_MASK,
        });
    }
    // "Must be aligned to a cluster boundary."
    if !geometry.is_cluster_aligned(raw) {
        return Err(EntryError::Misaligned {
            table,
            index,
            raw,
            offset: raw,
        });
    }
    if raw == 0 {
        return Ok(RefcountTableEntry::Unallocated);
    }
    // A refcount block is read like any metadata: below 2^56.
    if raw >= MAX_HOST_OFFSET || raw + geometry.cluster_size() > MAX_HOST_OFFSET {
        return Err(EntryError::BeyondLimit {
            table,
            index,
            raw,
            offset: raw,
            len: geometry.cluster_size(),
            limit: MAX_HOST_OFFSET,
        });
    }
    Ok(RefcountTableEntry::Block {
        offset: HostOffset(raw),
    })
}

/// Encodes a refcount table entry.
pub fn encode_refcount_table_entry(
    entry: RefcountTableEntry,
    geometry: &ClusterGeometry,
) -> Result<u64, EncodeError> {
    match entry {
        RefcountTableEntry::Unallocated => Ok(0),
        RefcountTableEntry::Block { offset } => encode_cluster_offset(offset, geometry),
    }
}

/// A refcount block access that does not fit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefcountError {
    #[error("refcount index {index} is outside a block of {entries} entries")]
    IndexOutOfBlock { index: u64, entries: u64 },
    #[error("refcount {value} does not fit in {bits} bits (max {max})")]
    Overflow { value: u64, bits: u32, max: u64 },
    #[error("refcount {refcount} cannot drop by {delta}")]
    Underflow { refcount: u64, delta: u64 },
}

/// Where entry `index` lies in a block: (first byte, byte count, shift within the byte).
fn refcount_position(
    block_len: usize,
    index: u64,
    geometry: &RefcountGeometry,
) -> Result<(usize, usize, u32), RefcountError> {
    let bits = u64::from(geometry.refcount_bits());
    let entries = (block_len as u64 * 8 / bits).min(geometry.block_entries());
    let out_of_block = RefcountError::IndexOutOfBlock { index, entries };
    if index >= entries {
        return Err(out_of_block);
    }
    let (byte, width, shift) = if bits < 8 {
        // "If refcount_bits implies a sub-byte width, note that bit 0 means the least
        // significant bit in this context": entry i sits at bit (i % per_byte) * bits of byte
        // i / per_byte.
        let per_byte = 8 / bits;
        (index / per_byte, 1, (index % per_byte) * bits)
    } else {
        // Wider entries are big-endian, like every number in qcow2.
        (index * (bits / 8), bits / 8, 0)
    };
    // index < entries <= block_len * 8 / bits, so the byte range lies inside the block.
    match (
        usize::try_from(byte),
        usize::try_from(width),
        u32::try_from(shift),
    ) {
        (Ok(byte), Ok(width), Ok(shift)) => Ok((byte, width, shift)),
        _ => Err(out_of_block),
    }
}

/// Reads refcount `index` of a refcount block (big-endian entries of refcount_bits bits).
pub fn refcount_get(
    block: &[u8],
    index: u64,
    geometry: &RefcountGeometry,
) -> Result<u64, RefcountError> {
    let (start, width, shift) = refcount_position(block.len(), index, geometry)?;
    let bytes = block.get(start..start + width).unwrap_or_default();
    let value = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    Ok((value >> shift) & geometry.max_refcount())
}

/// Writes refcount `index` of a refcount block; a value wider than the entry is an overflow.
pub fn refcount_set(
    block: &mut [u8],
    index: u64,
    value: u64,
    geometry: &RefcountGeometry,
) -> Result<(), RefcountError> {
    let max = geometry.max_refcount();
    if value > max {
        return Err(RefcountError::Overflow {
            value,
            bits: geometry.refcount_bits(),
            max,
        });
    }
    let (start, width, shift) = refcount_position(block.len(), index, geometry)?;
    let Some(bytes) = block.get_mut(start..start + width) else {
        return Err(RefcountError::IndexOutOfBlock {
            index,
            entries: geometry.block_entries(),
        });
    };
    if geometry.refcount_bits() < 8 {
        // max and value are below 2^refcount_bits <= 2^4 here, so they fit in a byte.
        let mask = u8::try_from(max).unwrap_or(u8::MAX) << shift;
        let value = u8::try_from(value).unwrap_or(u8::MAX) << shift;
        for b in bytes.iter_mut() {
            *b = (*b & !mask) | value;
        }
    } else {
        let be = value.to_be_bytes();
        bytes.copy_from_slice(&be[8 - width..]);
    }
    Ok(())
}

/// Adds `delta` (which may be negative) to refcount `index` and returns the new value;
/// refuses to wrap past 0 or the width's maximum.
pub fn refcount_update(
    block: &mut [u8],
    index: u64,
    delta: i64,
    geometry: &RefcountGeometry,
) -> Result<u64, RefcountError> {
    let refcount = refcount_get(block, index, geometry)?;
    let new = if delta >= 0 {
        let d = delta.unsigned_abs();
        refcount.checked_add(d).ok_or(RefcountError::Overflow {
            value: u64::MAX,
            bits: geometry.refcount_bits(),
            max: geometry.max_refcount(),
        })?
    } else {
        let d = delta.unsigned_abs();
        refcount
            .checked_sub(d)
            .ok_or(RefcountError::Underflow { refcount, delta: d })?
    };
    refcount_set(block, index, new, geometry)?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g(cluster_bits: u32) -> ClusterGeometry {
        ClusterGeometry::new(cluster_bits, false).unwrap()
    }

    const L2: HostOffset = HostOffset(0x50000);

    #[test]
    fn l1_entries_decode() {
        let g = g(16);
        assert_eq!(decode_l1_entry(0, 0, &g), Ok(L1Entry::Unallocated));
        assert_eq!(
            decode_l1_entry(COPIED | 0x30000, 1, &g),
            Ok(L1Entry::L2Table {
                offset: HostOffset(0x30000),
                copied: true
            })
        );
        assert_eq!(
            decode_l1_entry(0x30000, 1, &g),
            Ok(L1Entry::L2Table {
                offset: HostOffset(0x30000),
                copied: false
            })
        );
    }

    #[test]
    fn l1_entry_refusals_name_the_table_and_index() {
        let g = g(16);
        for bit in [0, 8, 56, 62] {
            let raw = 0x30000 | (1 << bit);
            assert_eq!(
                decode_l1_entry(raw, 7, &g),
                Err(EntryError::ReservedBits {
                    table: TableRef::ActiveL1,
                    index: 7,
                    raw,
                    bits: 1 << bit
                })
            );
        }
        assert_eq!(
            decode_l1_entry(0x30200, 3, &g),
            Err(EntryError::Misaligned {
                table: TableRef::ActiveL1,
                index: 3,
                raw: 0x30200,
                offset: 0x30200
            })
        );
        assert_eq!(
            decode_l1_entry(COPIED, 4, &g),
            Err(EntryError::CopiedWithoutOffset {
                table: TableRef::ActiveL1,
                index: 4,
                raw: COPIED
            })
        );
        let msg = decode_l1_entry(0x30200, 3, &g).unwrap_err().to_string();
        assert!(msg.contains("active L1 table entry 3"), "{msg}");
    }

    #[test]
    fn l2_standard_entries_decode() {
        let g = g(16);
        let d = |raw| decode_l2_entry(raw, L2, 0, &g, Version::V3);
        assert_eq!(d(0), Ok(L2Entry::Unallocated));
        assert_eq!(
            d(COPIED | 0x70000),
            Ok(L2Entry::Normal {
                host_offset: HostOffset(0x70000),
                copied: true
            })
        );
        assert_eq!(
            d(ZERO),
            Ok(L2Entry::Zero {
                preallocated: None,
                copied: false
            })
        );
        assert_eq!(
            d(COPIED | 0x70000 | ZERO),
            Ok(L2Entry::Zero {
                preallocated: Some(HostOffset(0x70000)),
                copied: true
            })
        );
    }

    #[test]
    fn l2_entry_refusals_name_the_table_and_index() {
        let g = g(16);
        let table = TableRef::L2 { offset: L2 };
        for bit in [1, 8, 56, 61] {
            let raw = 0x70000 | (1 << bit);
            assert_eq!(
                decode_l2_entry(raw, L2, 9, &g, Version::V3),
                Err(EntryError::ReservedBits {
                    table,
                    index: 9,
                    raw,
                    bits: 1 << bit
                })
            );
        }
        assert_eq!(
            decode_l2_entry(0x70200, L2, 9, &g, Version::V3),
            Err(EntryError::Misaligned {
                table,
                index: 9,
                raw: 0x70200,
                offset: 0x70200
            })
        );
        assert_eq!(
            decode_l2_entry(ZERO, L2, 9, &g, Version::V2),
            Err(EntryError::ZeroFlagInV2 {
                table,
                index: 9,
                raw: ZERO
            })
        );
        assert_eq!(
            decode_l2_entry(COPIED, L2, 9, &g, Version::V3),
            Err(EntryError::CopiedWithoutOffset {
                table,
                index: 9,
                raw: COPIED
            })
        );
        assert_eq!(
            decode_l2_entry(COPIED | COMPRESSED | 0x1234, L2, 9, &g, Version::V3),
            Err(EntryError::CompressedCopied {
                table,
                index: 9,
                raw: COPIED | COMPRESSED | 0x1234
            })
        );
        let msg = decode_l2_entry(0x70200, L2, 9, &g, Version::V3)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("L2 table at host offset 0x50000 entry 9"),
            "{msg}"
        );
    }

    #[test]
    fn compressed_entry_splits_at_x_and_computes_the_read_range() {
        // 64 KiB clusters: x = 62 - (16 - 8) = 54; 8 bits of sector count.
        let g = g(16);
        let raw = COMPRESSED | (3 << 54) | 0x12_3456;
        let Ok(L2Entry::Compressed(c)) = decode_l2_entry(raw, L2, 0, &g, Version::V2) else {
            panic!("not compressed");
        };
        assert_eq!(c.host_offset(), HostOffset(0x12_3456));
        assert_eq!(c.additional_sectors(), 3);
        // Four sectors from the one holding the offset, minus the offset into it (0x56).
        assert_eq!(c.read_len(), 4 * 512 - 0x56);
        assert_eq!(c.end(), HostOffset(0x12_3456 + 4 * 512 - 0x56));
        assert_eq!(c.host_clusters(&g), (HostCluster(0x12), HostCluster(0x12)));
        assert_eq!(
            encode_l2_entry(L2Entry::Compressed(c), &g, Version::V2),
            Ok(raw)
        );
    }

    #[test]
    fn compressed_offsets_at_or_past_2_56_are_refused() {
        // 512-byte clusters: x = 61, so offset bits 56..60 exist and must be 0.
        let g = g(9);
        let raw = COMPRESSED | (1 << 56);
        assert_eq!(
            decode_l2_entry(raw, L2, 2, &g, Version::V3),
            Err(EntryError::BeyondLimit {
                table: TableRef::L2 { offset: L2 },
                index: 2,
                raw,
                offset: 1 << 56,
                len: 512,
                limit: MAX_HOST_OFFSET
            })
        );
        // The last sector straddling 2^56 is refused as well.
        let raw = COMPRESSED | (1 << 61) | ((1 << 56) - 100);
        assert!(matches!(
            decode_l2_entry(raw, L2, 2, &g, Version::V3),
            Err(EntryError::BeyondLimit { .. })
        ));
    }

    #[test]
    fn compressed_cluster_new_counts_sectors_like_qemu() {
        let g = g(16);
        // QEMU: nb_csectors = ((offset + len - 1) >> 9) - (offset >> 9).
        let c = CompressedCluster::new(HostOffset(0x10100), 1000, &g).unwrap();
        assert_eq!(
            c.additional_sectors(),
            ((0x10100 + 999) >> 9) - (0x10100 >> 9)
        );
        assert!(c.read_len() >= 1000);
        assert_eq!(
            CompressedCluster::new(HostOffset(0x10100), 0, &g),
            Err(EncodeError::CompressedLength {
                len: 0,
                max: 2 << 16
            })
        );
        // 2 clusters + 1 byte starting mid-sector do not fit the 8-bit sector count.
        assert!(CompressedCluster::new(HostOffset(0x10100), 2 << 16, &g).is_err());
        assert_eq!(
            CompressedCluster::new(HostOffset(0), 10, &g),
            Err(EncodeError::ZeroOffset)
        );
    }

    #[test]
    fn encoders_refuse_what_cannot_be_an_entry() {
        let g = g(16);
        assert_eq!(
            encode_l1_entry(
                L1Entry::L2Table {
                    offset: HostOffset(0x100),
                    copied: false
                },
                &g
            ),
            Err(EncodeError::Misaligned {
                offset: HostOffset(0x100)
            })
        );
        assert_eq!(
            encode_l2_entry(
                L2Entry::Normal {
                    host_offset: HostOffset(MAX_HOST_OFFSET),
                    copied: true
                },
                &g,
                Version::V3
            ),
            Err(EncodeError::BeyondLimit {
                offset: HostOffset(MAX_HOST_OFFSET),
                len: 0,
                limit: MAX_HOST_OFFSET
            })
        );
        assert_eq!(
            encode_l2_entry(
                L2Entry::Zero {
                    preallocated: None,
                    copied: false
                },
                &g,
                Version::V2
            ),
            Err(EncodeError::ZeroFlagInV2)
        );
        assert_eq!(
            encode_l2_entry(
                L2Entry::Normal {
                    host_offset: HostOffset(0),
                    copied: true
                },
                &g,
                Version::V3
            ),
            Err(EncodeError::ZeroOffset)
        );
    }

    #[test]
    fn refcount_table_entries() {
        let g = g(16);
        assert_eq!(
            decode_refcount_table_entry(0, 0, &g),
            Ok(RefcountTableEntry::Unallocated)
        );
        assert_eq!(
            decode_refcount_table_entry(0x20000, 0, &g),
            Ok(RefcountTableEntry::Block {
                offset: HostOffset(0x20000)
            })
        );
        assert!(matches!(
            decode_refcount_table_entry(0x20001, 5, &g),
            Err(EntryError::ReservedBits {
                table: TableRef::RefcountTable,
                index: 5,
                ..
            })
        ));
        assert!(matches!(
            decode_refcount_table_entry(0x20200, 5, &g),
            Err(EntryError::Misaligned { .. })
        ));
        assert!(matches!(
            decode_refcount_table_entry(1 << 60, 5, &g),
            Err(EntryError::BeyondLimit { .. })
        ));
        assert_eq!(
            encode_refcount_table_entry(
                RefcountTableEntry::Block {
                    offset: HostOffset(0x20000)
                },
                &g
            ),
            Ok(0x20000)
        );
    }

    #[test]
    fn refcount_bit_layout_per_width() {
        let rg = |order| RefcountGeometry::new(9, order).unwrap();
        let mut block = [0u8; 512];
        // 1 bit: "bit 0 means the least significant bit".
        refcount_set(&mut block, 0, 1, &rg(0)).unwrap();
        refcount_set(&mut block, 15, 1, &rg(0)).unwrap();
        assert_eq!(block[..2], [0x01, 0x80]);
        // 4 bits: entry 1 is the high nibble of byte 0.
        let mut block = [0u8; 512];
        refcount_set(&mut block, 1, 0xa, &rg(2)).unwrap();
        assert_eq!(block[0], 0xa0);
        assert_eq!(refcount_get(&block, 1, &rg(2)), Ok(0xa));
        assert_eq!(refcount_get(&block, 0, &rg(2)), Ok(0));
        // 16 bits: big-endian.
        let mut block = [0u8; 512];
        refcount_set(&mut block, 1, 0x1234, &rg(4)).unwrap();
        assert_eq!(block[2..4], [0x12, 0x34]);
        // 64 bits.
        refcount_set(&mut block, 63, u64::MAX - 1, &rg(6)).unwrap();
        assert_eq!(refcount_get(&block, 63, &rg(6)), Ok(u64::MAX - 1));
    }

    #[test]
    fn refcount_overflow_underflow_and_range() {
        let rg = |order| RefcountGeometry::new(9, order).unwrap();
        let mut block = [0u8; 512];
        assert_eq!(
            refcount_set(&mut block, 0, 2, &rg(0)),
            Err(RefcountError::Overflow {
                value: 2,
                bits: 1,
                max: 1
            })
        );
        assert_eq!(
            refcount_set(&mut block, 4096, 1, &rg(0)),
            Err(RefcountError::IndexOutOfBlock {
                index: 4096,
                entries: 4096
            })
        );
        assert_eq!(
            refcount_get(&block, 64, &rg(6)),
            Err(RefcountError::IndexOutOfBlock {
                index: 64,
                entries: 64
            })
        );
        assert_eq!(refcount_update(&mut block, 3, 1, &rg(3)), Ok(1));
        assert_eq!(
            refcount_update(&mut block, 3, -2, &rg(3)),
            Err(RefcountError::Underflow {
                refcount: 1,
                delta: 2
            })
        );
        refcount_set(&mut block, 3, 255, &rg(3)).unwrap();
        assert_eq!(
            refcount_update(&mut block, 3, 1, &rg(3)),
            Err(RefcountError::Overflow {
                value: 256,
                bits: 8,
                max: 255
            })
        );
        assert_eq!(refcount_get(&block, 3, &rg(3)), Ok(255));
    }

    fn arb_l2_entry(cluster_bits: u32, v3: bool) -> impl Strategy<Value = L2Entry> {
        let clusters = 1u64..(MAX_HOST_OFFSET >> cluster_bits);
        let aligned = clusters.prop_map(move |c| HostOffset(c << cluster_bits));
        let compressed = (1u64..(1 << 40), 0u64..(1 << (cluster_bits - 8))).prop_map(
            |(offset, additional_sectors)| {
                L2Entry::Compressed(CompressedCluster {
                    host_offset: HostOffset(offset),
                    additional_sectors,
                })
            },
        );
        // Zero entries exist only in v3; COPIED needs an offset.
        let zero = (prop::option::of(aligned.clone()), any::<bool>()).prop_map(
            move |(preallocated, copied)| match (v3, preallocated) {
                (false, _) => L2Entry::Unallocated,
                (true, None) => L2Entry::Zero {
                    preallocated: None,
                    copied: false,
                },
                (true, p) => L2Entry::Zero {
                    preallocated: p,
                    copied,
                },
            },
        );
        prop_oneof![
            Just(L2Entry::Unallocated),
            (aligned, any::<bool>()).prop_map(|(host_offset, copied)| L2Entry::Normal {
                host_offset,
                copied
            }),
            zero,
            compressed,
        ]
    }

    fn arb_geometry_and_entry() -> impl Strategy<Value = (u32, bool, L2Entry)> {
        (9u32..=21, any::<bool>())
            .prop_flat_map(|(bits, v3)| (Just(bits), Just(v3), arb_l2_entry(bits, v3)))
    }

    proptest! {
        #[test]
        fn l2_entries_round_trip((bits, v3, entry) in arb_geometry_and_entry()) {
            let g = g(bits);
            let version = if v3 { Version::V3 } else { Version::V2 };
            let raw = encode_l2_entry(entry, &g, version).unwrap();
            prop_assert_eq!(decode_l2_entry(raw, L2, 0, &g, version), Ok(entry));
        }

        #[test]
        fn l1_entries_round_trip(bits in 9u32..=21, cluster in 1u64..(1 << 35), copied: bool) {
            let g = g(bits);
            let entry = L1Entry::L2Table { offset: HostOffset(cluster << bits), copied };
            let raw = encode_l1_entry(entry, &g).unwrap();
            prop_assert_eq!(decode_l1_entry(raw, 0, &g), Ok(entry));
        }

        #[test]
        fn any_l2_word_decodes_without_panic_and_compressed_reads_are_capped(
            bits in 9u32..=21,
            raw: u64,
        ) {
            let g = g(bits);
            match decode_l2_entry(raw, L2, 0, &g, Version::V3) {
                Ok(L2Entry::Compressed(c)) => {
                    prop_assert!(c.read_len() <= MAX_COMPRESSED_READ_CLUSTERS * g.cluster_size());
                    prop_assert!(c.end().0 <= MAX_HOST_OFFSET);
                    // Decoding is exact: the word encodes back to itself.
                    prop_assert_eq!(encode_l2_entry(L2Entry::Compressed(c), &g, Version::V3), Ok(raw));
                }
                Ok(e) => prop_assert_eq!(encode_l2_entry(e, &g, Version::V3), Ok(raw)),
                Err(_) => {}
            }
        }

        #[test]
        fn compressed_cluster_new_covers_the_bytes(
            bits in 9u32..=21,
            offset in 1u64..(1 << 40),
            len_seed: u64,
        ) {
            let g = g(bits);
            let len = 1 + len_seed % g.cluster_size();
            let c = CompressedCluster::new(HostOffset(offset), len, &g).unwrap();
            prop_assert!(c.read_len() >= len);
            prop_assert!(c.read_len() < len + 512);
            let raw = encode_l2_entry(L2Entry::Compressed(c), &g, Version::V3).unwrap();
            prop_assert_eq!(decode_l2_entry(raw, L2, 0, &g, Version::V3), Ok(L2Entry::Compressed(c)));
        }

        #[test]
        fn refcount_set_then_get_leaves_neighbours_alone(
            order in 0u32..=6,
            index_seed: u64,
            value_seed: u64,
            fill: u8,
        ) {
            let rg = RefcountGeometry::new(9, order).unwrap();
            let mut block = [fill; 512];
            let before = block;
            let index = index_seed % rg.block_entries();
            let value = value_seed & rg.max_refcount();
            refcount_set(&mut block, index, value, &rg).unwrap();
            prop_assert_eq!(refcount_get(&block, index, &rg), Ok(value));
            for other in [index.wrapping_sub(1), index + 1] {
                if other < rg.block_entries() {
                    prop_assert_eq!(
                        refcount_get(&block, other, &rg),
                        refcount_get(&before, other, &rg)
                    );
                }
            }
        }
    }
}
