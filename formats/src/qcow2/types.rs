//! Units of qcow2 addressing: offsets in the guest's and the host file's byte spaces, cluster
//! indices in each, and the geometry that converts between them.
//!
//! Owns: the newtypes (a guest offset is never passed where a host offset is expected), their
//! checked arithmetic, and the two-level lookups' index arithmetic (guest offset -> L1 index,
//! L2 index, offset in cluster; host cluster -> refcount table index, refcount block index), as
//! qcow2.rst's "Cluster mapping" and "Host cluster management" sections give them. It does not
//! know what the tables contain (`entries.rs`) or where they are (`header.rs`).

use std::fmt;

use super::limits::{
    MAX_CLUSTER_BITS, MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS,
};

/// A byte offset in the virtual disk the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file (or a backing file) on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// The index of a cluster of the virtual disk (guest offset / cluster size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestCluster(pub u64);

/// The index of a cluster of the image file (host offset / cluster size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

macro_rules! offset_ops {
    ($t:ident, $space:literal) => {
        impl $t {
            /// `self + len`, or `None` on overflow.
            pub fn checked_add(self, len: u64) -> Option<$t> {
                self.0.checked_add(len).map($t)
            }

            /// `self - len`, or `None` below zero.
            pub fn checked_sub(self, len: u64) -> Option<$t> {
                self.0.checked_sub(len).map($t)
            }

            /// The distance from `earlier` to `self`, or `None` if `earlier` is past `self`.
            pub fn checked_distance_from(self, earlier: $t) -> Option<u64> {
                self.0.checked_sub(earlier.0)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($space, " {:#x}"), self.0)
            }
        }
    };
}

offset_ops!(GuestOffset, "guest offset");
offset_ops!(HostOffset, "host offset");

impl fmt::Display for GuestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest cluster {}", self.0)
    }
}

impl fmt::Display for HostCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host cluster {}", self.0)
    }
}

/// Why a geometry could not be built from header fields.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error(
        "cluster_bits {cluster_bits} is unsupported: cluster sizes are 2^{min}..=2^{max} bytes"
    )]
    ClusterBits {
        cluster_bits: u32,
        min: u32,
        max: u32,
    },
    #[error(
        "cluster_bits {cluster_bits} is too small for extended L2 entries (at least {min}: \
         subclusters must be 512 bytes or more)"
    )]
    ExtendedL2ClusterBits { cluster_bits: u32, min: u32 },
    #[error("refcount_order {refcount_order} is too large (at most {max}: 64-bit refcounts)")]
    RefcountOrder { refcount_order: u32, max: u32 },
}

/// Where a guest offset is found through the two-level lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestLocation {
    /// Index into the active L1 table.
    pub l1_index: u64,
    /// Index into the L2 table that L1 entry points to.
    pub l2_index: u64,
    /// Byte offset inside the guest (and host) cluster.
    pub offset_in_cluster: u64,
}

/// The size of clusters and L2 tables of one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterGeometry {
    cluster_bits: u32,
    /// log2 of the bytes of one L2 entry: 3 (64-bit entries) or 4 (extended L2, 128 bits).
    l2_entry_bits: u32,
}

impl ClusterGeometry {
    /// qcow2.rst, cluster_bits: "Must not be less than 9"; QEMU: at most 21 (2 MiB). Extended
    /// L2 entries: "cluster_bits must be at least 14".
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Result<ClusterGeometry, GeometryError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(GeometryError::ClusterBits {
                cluster_bits,
                min: MIN_CLUSTER_BITS,
                max: MAX_CLUSTER_BITS,
            });
        }
        if extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(GeometryError::ExtendedL2ClusterBits {
                cluster_bits,
                min: MIN_EXTENDED_L2_CLUSTER_BITS,
            });
        }
        Ok(ClusterGeometry {
            cluster_bits,
            l2_entry_bits: if extended_l2 { 4 } else { 3 },
        })
    }

    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes of one L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_size(&self) -> u64 {
        1 << self.l2_entry_bits
    }

    /// log2 of the entries in one L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - self.l2_entry_bits
    }

    /// qcow2.rst: "l2_entries = (cluster_size / sizeof(uint64_t))" (halved with extended L2).
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }

    /// Guest bytes one L2 table maps: cluster_size * l2_entries (at most 2^39).
    pub fn bytes_per_l2_table(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }

    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    pub fn is_cluster_aligned(&self, offset: u64) -> bool {
        self.offset_in_cluster(offset) == 0
    }

    /// How many clusters hold `bytes` bytes (rounded up).
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    pub fn guest_cluster(&self, offset: GuestOffset) -> GuestCluster {
        GuestCluster(offset.0 >> self.cluster_bits)
    }

    pub fn host_cluster(&self, offset: HostOffset) -> HostCluster {
        HostCluster(offset.0 >> self.cluster_bits)
    }

    /// The first byte of a guest cluster, or `None` past 2^64.
    pub fn guest_cluster_start(&self, cluster: GuestCluster) -> Option<GuestOffset> {
        cluster.0.checked_mul(self.cluster_size()).map(GuestOffset)
    }

    /// The first byte of a host cluster, or `None` past 2^64.
    pub fn host_cluster_start(&self, cluster: HostCluster) -> Option<HostOffset> {
        cluster.0.checked_mul(self.cluster_size()).map(HostOffset)
    }

    /// qcow2.rst: "l2_index = (offset / cluster_size) % l2_entries; l1_index = (offset /
    /// cluster_size) / l2_entries".
    pub fn locate(&self, offset: GuestOffset) -> GuestLocation {
        let cluster = offset.0 >> self.cluster_bits;
        GuestLocation {
            l1_index: cluster >> self.l2_bits(),
            l2_index: cluster & (self.l2_entries() - 1),
            offset_in_cluster: self.offset_in_cluster(offset.0),
        }
    }

    /// L1 entries needed to map a disk of `virtual_size` bytes (QEMU's size_to_l1).
    pub fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.bytes_per_l2_table())
    }
}

/// Where the refcount of a host cluster is found through the two-level lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountLocation {
    /// Index into the refcount table.
    pub table_index: u64,
    /// Index of the entry inside that refcount block.
    pub block_index: u64,
}

/// The width of refcounts and the size of refcount blocks of one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountGeometry {
    cluster_bits: u32,
    refcount_order: u32,
}

impl RefcountGeometry {
    /// qcow2.rst, refcount_order: "This value may not exceed 6 (i.e. refcount_bits = 64)".
    pub fn new(cluster_bits: u32, refcount_order: u32) -> Result<RefcountGeometry, GeometryError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(GeometryError::ClusterBits {
                cluster_bits,
                min: MIN_CLUSTER_BITS,
                max: MAX_CLUSTER_BITS,
            });
        }
        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(GeometryError::RefcountOrder {
                refcount_order,
                max: MAX_REFCOUNT_ORDER,
            });
        }
        Ok(RefcountGeometry {
            cluster_bits,
            refcount_order,
        })
    }

    pub fn refcount_order(&self) -> u32 {
        self.refcount_order
    }

    /// refcount_bits = 1 << refcount_order: 1, 2, 4, ..., 64.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The largest refcount an entry holds: 2^refcount_bits - 1.
    pub fn max_refcount(&self) -> u64 {
        u64::MAX >> (64 - self.refcount_bits())
    }

    /// log2 of the entries in one refcount block (one cluster).
    pub fn block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }

    /// qcow2.rst: "refcount_block_entries = (cluster_size * 8 / refcount_bits)".
    pub fn block_entries(&self) -> u64 {
        1 << self.block_bits()
    }

    /// qcow2.rst: "refcount_block_index = (offset / cluster_size) % refcount_block_entries;
    /// refcount_table_index = (offset / cluster_size) / refcount_block_entries".
    pub fn locate(&self, cluster: HostCluster) -> RefcountLocation {
        RefcountLocation {
            table_index: cluster.0 >> self.block_bits(),
            block_index: cluster.0 & (self.block_entries() - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_refuses_cluster_bits_outside_9_to_21() {
        assert_eq!(
            ClusterGeometry::new(8, false),
            Err(GeometryError::ClusterBits {
                cluster_bits: 8,
                min: 9,
                max: 21
            })
        );
        assert!(ClusterGeometry::new(22, false).is_err());
        assert!(ClusterGeometry::new(9, false).is_ok());
        assert!(ClusterGeometry::new(21, false).is_ok());
    }

    #[test]
    fn extended_l2_needs_16k_clusters_and_halves_l2_entries() {
        assert_eq!(
            ClusterGeometry::new(13, true),
            Err(GeometryError::ExtendedL2ClusterBits {
                cluster_bits: 13,
                min: 14
            })
        );
        let g = ClusterGeometry::new(16, true).unwrap();
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.l2_entry_size(), 16);
    }

    #[test]
    fn locate_splits_a_guest_offset_per_the_spec_formula() {
        let g = ClusterGeometry::new(16, false).unwrap();
        // 64 KiB clusters, 8192 entries per L2 table: one L2 table maps 512 MiB.
        assert_eq!(g.bytes_per_l2_table(), 512 << 20);
        let off = GuestOffset((3 << 29) + (5 << 16) + 123);
        assert_eq!(
            g.locate(off),
            GuestLocation {
                l1_index: 3,
                l2_index: 5,
                offset_in_cluster: 123
            }
        );
        assert_eq!(g.guest_cluster(off), GuestCluster(3 * 8192 + 5));
    }

    #[test]
    fn l1_entries_for_rounds_up_and_never_overflows() {
        let g = ClusterGeometry::new(9, false).unwrap();
        assert_eq!(g.l1_entries_for(0), 0);
        assert_eq!(g.l1_entries_for(1), 1);
        assert_eq!(g.l1_entries_for(32768), 1);
        assert_eq!(g.l1_entries_for(32769), 2);
        assert_eq!(g.l1_entries_for(u64::MAX), 1 << 49);
    }

    #[test]
    fn cluster_starts_are_checked() {
        let g = ClusterGeometry::new(21, false).unwrap();
        assert_eq!(
            g.host_cluster_start(HostCluster(3)),
            Some(HostOffset(6 << 20))
        );
        assert_eq!(g.host_cluster_start(HostCluster(u64::MAX)), None);
        assert_eq!(g.guest_cluster_start(GuestCluster(1 << 43)), None);
    }

    #[test]
    fn offset_arithmetic_is_checked() {
        assert_eq!(HostOffset(u64::MAX).checked_add(1), None);
        assert_eq!(GuestOffset(5).checked_sub(6), None);
        assert_eq!(HostOffset(10).checked_distance_from(HostOffset(4)), Some(6));
        assert_eq!(HostOffset(0x200).to_string(), "host offset 0x200");
    }

    #[test]
    fn refcount_geometry_per_width() {
        let g = RefcountGeometry::new(16, 4).unwrap();
        assert_eq!(g.refcount_bits(), 16);
        assert_eq!(g.block_entries(), 32768);
        assert_eq!(g.max_refcount(), 0xffff);
        assert_eq!(
            g.locate(HostCluster(32768 * 2 + 7)),
            RefcountLocation {
                table_index: 2,
                block_index: 7
            }
        );
        assert_eq!(RefcountGeometry::new(9, 0).unwrap().max_refcount(), 1);
        assert_eq!(RefcountGeometry::new(9, 0).unwrap().block_entries(), 4096);
        assert_eq!(
            RefcountGeometry::new(9, 6).unwrap().max_refcount(),
            u64::MAX
        );
        assert_eq!(
            RefcountGeometry::new(16, 7),
            Err(GeometryError::RefcountOrder {
                refcount_order: 7,
                max: 6
            })
        );
    }
}
