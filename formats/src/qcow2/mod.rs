//! qcow2 (versions 2 and 3): the pure metadata modules, and the layer built on them.
//!
//! Pure (bytes in, validated types and plans out, per QEMU's docs/interop/qcow2.rst quoted
//! beside each check): the hostile-image limits (`limits`), offset and cluster units
//! (`types`), the header and its extensions (`header`, `extensions`), table entry codecs
//! (`entries`). With I/O: the bounded probe (`probe`: one fstat, one bounded pread), the
//! layer (`layer`, `cache`: tables arrive as bytes the server's engine read through io_uring),
//! and the metadata path (`refcount`, `update`, and `resize` on a closed image) through the
//! `Storage` trait. It does not assemble backing chains (every layer is an fd the manager
//! passed; a backing file name in an image is only reported).
//!
//! The split between reporting and refusing: [`Qcow2Header::parse`] accepts every well-formed
//! header, including features vublk does not serve, so that a probe can describe them;
//! [`Qcow2Header::parse_supported`] (what opening calls) also refuses those ([`Unsupported`]).

mod cache;
pub mod entries;
pub mod extensions;
pub mod header;
mod layer;
pub mod limits;
pub mod probe;
mod refcount;
mod resize;
pub mod types;
mod update;

pub use cache::{L2Cache, L2Table, DEFAULT_L2_CACHE_BYTES};
pub use entries::{
    decode_l1_entry, decode_l2_entry, decode_refcount_table_entry, encode_l1_entry,
    encode_l2_entry, encode_refcount_table_entry, refcount_get, refcount_set, refcount_update,
    CompressedCluster, EncodeError, EntryError, L1Entry, L2Entry, RefcountError,
    RefcountTableEntry, TableRef,
};
pub use extensions::{FeatureName, FeatureType, HeaderExtension};
pub use header::{
    CompressionType, CryptMethod, HeaderError, HeaderPatch, Qcow2Header, Table, Unsupported,
    Version,
};
pub use layer::Qcow2Layer;
pub use probe::{probe, probe_fd, ProbeError, ProbeInfo};
pub use resize::{resize, resize_with, ResizeError, ResizeOutcome};
pub use types::{
    ClusterGeometry, GeometryError, GuestCluster, GuestLocation, GuestOffset, HostCluster,
    HostOffset, RefcountGeometry, RefcountLocation,
};

#[cfg(test)]
mod tests;
