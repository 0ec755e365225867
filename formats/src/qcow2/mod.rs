//! qcow2 (versions 2 and 3) metadata, pure: bytes in, validated types and plans out.
//!
//! Owns: the hostile-image limits (`limits`), offset and cluster units (`types`), the header
//! and its extensions (`header`, `extensions`), table entry codecs (`entries`) and the bounded
//! probe (`probe`), all per QEMU's docs/interop/qcow2.rst, quoted beside each check. Nothing
//! here does I/O except [`probe_fd`] (one fstat, one bounded pread): the server's engine reads
//! and writes the tables through io_uring and hands the bytes in. It does not know fds,
//! caches, io_uring, or how a backing chain is assembled (every layer is an fd the manager
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
pub use types::{
    ClusterGeometry, GeometryError, GuestCluster, GuestLocation, GuestOffset, HostCluster,
    HostOffset, RefcountGeometry, RefcountLocation,
};

#[cfg(test)]
mod tests;
