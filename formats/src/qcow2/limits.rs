//! Caps on every size a qcow2 image controls, so that probing or opening a hostile image is
//! bounded in memory and time.
//!
//! Owns: the numbers, each with the reason it has the value it has. Most mirror QEMU's own
//! implementation limits (so every image QEMU opens, vublk opens too); a few are vublk's own
//! bounds on what a probe reads. It does not know how they are checked: `header.rs`,
//! `entries.rs` and `types.rs` quote these constants beside each check.

/// Smallest cluster: 512 bytes. qcow2.rst: cluster_bits "must not be less than 9".
pub const MIN_CLUSTER_BITS: u32 = 9;

/// Largest cluster: 2 MiB. qcow2.rst: "QEMU as of today has an implementation limit of 2 MB as
/// the maximum cluster size"; compressed-cluster descriptors also assume it.
pub const MAX_CLUSTER_BITS: u32 = 21;

/// With Extended L2 Entries a cluster has 32 subclusters of at least 512 bytes, so clusters are
/// at least 16 KiB (qcow2.rst: "cluster_bits must be at least 14").
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;

/// How many bytes from the start of the file a probe reads, and where the header, its
/// extensions and the backing file name must end. QEMU writes all of them in a few hundred
/// bytes; 64 KiB leaves room for large feature tables while keeping a probe one small read.
pub const HEADER_READ_LIMIT: usize = 64 * 1024;

/// Longest backing file name. qcow2.rst: backing_file_size "Must not be longer than 1023
/// bytes".
pub const MAX_BACKING_FILE_NAME_LEN: u64 = 1023;

/// Longest backing format name: QEMU keeps it in a 16-byte buffer with its terminating NUL and
/// refuses longer ones ("ext_backing_format: len=... too large").
pub const MAX_BACKING_FORMAT_LEN: u32 = 15;

/// Largest active L1 table, in bytes: QEMU's QCOW_MAX_L1_SIZE (qcow2.rst: "QEMU has an
/// implementation limit of 32 MB as the maximum L1 table size"). Loaded whole at open.
pub const MAX_L1_TABLE_BYTES: u64 = 32 * 1024 * 1024;

/// Largest refcount table, in bytes: QEMU's QCOW_MAX_REFTABLE_SIZE (qcow2.rst: "QEMU has an
/// implementation limit of 8 MB as the maximum refcount table size"). Loaded whole at open.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 * 1024 * 1024;

/// Widest refcount entry: 2^6 = 64 bits. qcow2.rst: refcount_order "may not exceed 6".
pub const MAX_REFCOUNT_ORDER: u32 = 6;

/// refcount_order of every version 2 image. qcow2.rst: "For version 2 images, the order is
/// always assumed to be 4 (i.e. refcount_bits = 16)".
pub const V2_REFCOUNT_ORDER: u32 = 4;

/// A compressed cluster's stored bytes span at most this many clusters: its descriptor counts
/// at most 2^(cluster_bits - 8) sectors of 512 bytes, i.e. two clusters; a read of a
/// compressed cluster is capped at this multiple of the cluster size.
pub const MAX_COMPRESSED_READ_CLUSTERS: u64 = 2;

/// First host offset that no qcow2 metadata may reach (exclusive bound): L1, L2 and refcount
/// table entries keep bits 9-55 of the offset (qcow2.rst: "a virtual cluster must currently
/// map to a host offset below 64 PB (56 bits)").
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Largest virtual disk: the same bound as a raw disk (2^56 bytes). qcow2's own tables cannot
/// populate more than 56 bits of clusters, and the L1 limit above binds first for clusters
/// smaller than 2 MiB.
pub const MAX_VIRTUAL_SIZE: u64 = crate::raw::MAX_DISK_SIZE;

/// Most internal snapshots: QEMU's QCOW_MAX_SNAPSHOTS. The snapshot table is never loaded by
/// vublk; only its count and offset are validated.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Smallest snapshot table entry (its fixed part), in bytes: the snapshot table spans at least
/// `nb_snapshots` times this, which is what the offset check uses.
pub const SNAPSHOT_ENTRY_MIN_BYTES: u64 = 40;

/// Most bitmaps: QEMU's QCOW2_MAX_BITMAPS (qcow2.rst: "QEMU currently only supports up to 65535
/// bitmaps per image"). The bitmap directory is never loaded by vublk.
pub const MAX_BITMAPS: u32 = 65535;

/// Largest bitmap directory, in bytes: QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE (1 KiB per
/// bitmap). Only validated, never loaded.
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;

/// Most header extensions: QEMU writes at most six known ones; the cap bounds the parse loop
/// and its allocations independently of [`HEADER_READ_LIMIT`].
pub const MAX_HEADER_EXTENSIONS: usize = 128;
