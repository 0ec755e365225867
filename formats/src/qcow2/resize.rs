//! Offline resize of a qcow2 image, for QMP `block_resize`: the image's layer is closed and
//! nothing else uses the file while [`resize_with`] runs.
//!
//! Owns: the resize rules (QEMU's `qcow2_co_truncate` with preallocation off, as `qemu-img
//! resize` runs it), the L1 table's relocation when a grown disk needs more entries than its
//! clusters hold, and a small allocator that places the new table at the end of the image
//! together with the refcount blocks (and, if needed, the bigger refcount table) that count
//! it. It does not know fds, layers, caches or the control protocol; it does its I/O through
//! a [`Storage`] over the one image file, so tests can stop it after any write.
//!
//! Crash ordering (a process or host crash at any point leaves an image `qemu-img check`
//! calls consistent, leaks allowed, whose size is the old or the new one):
//! 1. refcounts of the new clusters are set to 1 (new refcount blocks are written and synced
//!    before the refcount table entry or header field that makes them live) and synced;
//! 2. the new L1 table (old entries, then zeroes) is written and synced;
//! 3. size, l1_size and l1_table_offset change in one write of the header's first unit,
//!    synced;
//! 4. the old L1 table's clusters (and an old refcount table's) are released and synced.
//!
//! What it refuses instead of doing: shrinking over clusters that hold data (QEMU discards
//! them; here the caller discards first), growing where backing file data would show
//! through (QEMU writes zero clusters there), and growing over data mapped past the old end.
//! Differences from QEMU that are not refusals: the L1 table grows in place when its last
//! cluster has room (QEMU always moves it), a shrink keeps l1_size and the file's length (as
//! QEMU keeps l1_size), and the header fields go out in the header's first aligned unit
//! (O_DIRECT fds need it), not in QEMU's two small writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::ops::Range;
use std::os::fd::RawFd;

use super::entries::{
    decode_l1_entry, decode_l2_entry, decode_refcount_table_entry, encode_refcount_table_entry,
    refcount_get, refcount_set, refcount_update, EncodeError, EntryError, L1Entry, L2Entry,
    RefcountError, RefcountTableEntry,
};
use super::header::{HeaderError, Qcow2Header, Unsupported, Version};
use super::limits::{
    HEADER_READ_LIMIT, MAX_HOST_OFFSET, MAX_L1_TABLE_BYTES, MAX_REFCOUNT_TABLE_BYTES,
    MAX_VIRTUAL_SIZE,
};
use super::refcount::meta_unit;
use super::types::{
    ClusterGeometry, GuestCluster, GuestOffset, HostCluster, HostOffset, RefcountGeometry,
};
use crate::{FileId, FileStorage, ImageFile, Storage};

/// Header byte offsets (qcow2.rst, "Header"): size (8 bytes), l1_size (4), l1_table_offset
/// (8), refcount_table_offset (8), refcount_table_clusters (4), autoclear_features (8, v3).
const SIZE_OFFSET: usize = 24;
const L1_SIZE_OFFSET: usize = 36;
const L1_TABLE_OFFSET_OFFSET: usize = 40;
const REFCOUNT_TABLE_OFFSET_OFFSET: usize = 48;
const REFCOUNT_TABLE_CLUSTERS_OFFSET: usize = 56;
const AUTOCLEAR_FEATURES_OFFSET: usize = 88;

/// QEMU's BDRV_SECTOR_SIZE: "The new size must be a multiple of 512".
const SECTOR_SIZE: u64 = 512;

/// Rounds of sizing the new refcount structures (each round can only add blocks or table
/// clusters, and a handful settle it; the bound turns a sizing bug into an error, not a hang).
const MAX_AREA_SIZING_ROUNDS: u32 = 64;

/// Why an image was not resized. Unless the variant says otherwise nothing was written; an
/// error after the first write (I/O) leaves the image at its old or its new size, consistent.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("fd {fd} ({role}) is read-only: a resize writes the image")]
    ReadOnly { fd: RawFd, role: String },
    #[error("new size {size} is not a multiple of 512 bytes")]
    Unaligned { size: u64 },
    #[error("new size {size} exceeds the largest supported disk ({max} bytes)")]
    TooLarge { size: u64, max: u64 },
    #[error(
        "new size {size} needs an L1 table of {entries} entries ({bytes} bytes), more than \
         the limit of {max} bytes"
    )]
    L1TooLarge {
        size: u64,
        entries: u64,
        bytes: u64,
        max: u64,
    },
    #[error("the image header is not valid qcow2")]
    Header(#[source] HeaderError),
    #[error("the image uses a feature vublk does not resize")]
    Unsupported(#[source] Unsupported),
    #[error(
        "the image is marked corrupt (incompatible bit 1): repair it with `qemu-img check -r \
         all` first"
    )]
    Corrupt,
    #[error(
        "the image is dirty (incompatible bit 0: its refcounts may be stale): repair it with \
         `qemu-img check -r all` first"
    )]
    Dirty,
    #[error(
        "a version 2 image with {nb_snapshots} internal snapshot(s) is not resized (QEMU \
         refuses it too: v2 snapshots need not record their disk size)"
    )]
    SnapshotsInV2 { nb_snapshots: u32 },
    #[error("the image names a backing file, but no backing size was given")]
    BackingSizeMissing,
    #[error(
        "a backing size ({backing_size} bytes) was given, but the image names no backing file"
    )]
    UnexpectedBacking { backing_size: u64 },
    #[error(
        "growing from {old_size} to {new_size} bytes would show the backing file's data \
         (it has {backing_size} bytes) at guest bytes {old_size}..{shown_end}, where QEMU \
         shows zeroes; vublk does not write the zero clusters that would hide it"
    )]
    BackingWouldShow {
        old_size: u64,
        new_size: u64,
        backing_size: u64,
        shown_end: u64,
    },
    #[error(
        "cannot shrink to {new_size} bytes: {cluster} ({offset}) is allocated at {host}; \
         discard everything past the new end first"
    )]
    AllocatedPastEnd {
        new_size: u64,
        cluster: GuestCluster,
        offset: GuestOffset,
        host: HostOffset,
    },
    #[error(
        "cannot grow from {old_size} bytes: {cluster} ({offset}), past the current end, holds \
         data at {host} that the guest would see"
    )]
    DataPastEnd {
        old_size: u64,
        cluster: GuestCluster,
        offset: GuestOffset,
        host: HostOffset,
    },
    #[error("the image has an invalid table entry")]
    Entry(#[source] EntryError),
    #[error("refcount of {cluster}")]
    Refcount {
        cluster: HostCluster,
        #[source]
        source: RefcountError,
    },
    #[error("{cluster} is in use but no refcount block covers it")]
    MissingRefcountBlock { cluster: HostCluster },
    #[error("{cluster} lies past every used cluster but has refcount {refcount}")]
    NotFree { cluster: HostCluster, refcount: u64 },
    #[error("the new tables would reach {end}, past the host offset limit {limit:#x}")]
    HostOffsetLimit { end: HostOffset, limit: u64 },
    #[error("the refcount table would grow to {bytes} bytes, more than the limit of {max}")]
    RefcountTableTooLarge { bytes: u64, max: u64 },
    #[error("sizing the new refcount structures did not settle in {rounds} rounds")]
    AreaSizing { rounds: u32 },
    #[error("encoding a table entry (a vublk bug)")]
    Encode(#[source] EncodeError),
    #[error("the updated header would not parse (a vublk bug); the header was not written")]
    HeaderPatch(#[source] HeaderError),
    #[error("{what} at {offset}")]
    Io {
        what: &'static str,
        offset: HostOffset,
        #[source]
        source: io::Error,
    },
    #[error("fdatasync after {after}")]
    Sync {
        after: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What a resize changed, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResizeOutcome {
    pub old_size: u64,
    pub new_size: u64,
    pub old_l1_offset: HostOffset,
    pub new_l1_offset: HostOffset,
    pub old_l1_entries: u32,
    pub new_l1_entries: u32,
    /// Where the refcount table moved, when the new L1 table's refcounts needed a bigger one.
    pub refcount_table_moved_to: Option<HostOffset>,
}

impl ResizeOutcome {
    fn unchanged(header: &Qcow2Header) -> ResizeOutcome {
        ResizeOutcome {
            old_size: header.size(),
            new_size: header.size(),
            old_l1_offset: header.l1_table_offset(),
            new_l1_offset: header.l1_table_offset(),
            old_l1_entries: header.l1_size(),
            new_l1_entries: header.l1_size(),
            refcount_table_moved_to: None,
        }
    }

    /// The active L1 table now lives somewhere else (the old clusters were released).
    pub fn l1_moved(&self) -> bool {
        self.old_l1_offset != self.new_l1_offset
    }
}

impl fmt::Display for ResizeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.old_size == self.new_size {
            return write!(f, "size unchanged at {} bytes", self.old_size);
        }
        write!(f, "{} -> {} bytes", self.old_size, self.new_size)?;
        if self.l1_moved() {
            write!(
                f,
                "; L1 table moved from {} ({} entries) to {} ({} entries)",
                self.old_l1_offset, self.old_l1_entries, self.new_l1_offset, self.new_l1_entries
            )?;
        } else if self.old_l1_entries != self.new_l1_entries {
            write!(
                f,
                "; L1 table at {} grew in place from {} to {} entries",
                self.new_l1_offset, self.old_l1_entries, self.new_l1_entries
            )?;
        }
        if let Some(at) = self.refcount_table_moved_to {
            write!(f, "; refcount table moved to {at}")?;
        }
        Ok(())
    }
}

/// Resizes the qcow2 image in `file` to `new_size` bytes. `backing_size` is the virtual size
/// of the backing layer, given exactly when the image names a backing file. The image's layer
/// must be closed: nothing else may read or write the file until this returns.
pub fn resize(
    file: &ImageFile,
    new_size: u64,
    backing_size: Option<u64>,
) -> Result<ResizeOutcome, ResizeError> {
    if !file.options().writable {
        return Err(ResizeError::ReadOnly {
            fd: file.raw_fd(),
            role: file.options().role.clone(),
        });
    }
    let io = FileStorage::new(vec![file]);
    resize_with(&io, new_size, backing_size)
}

/// [`resize`] on the image that is file 0 of `io`.
pub fn resize_with(
    io: &dyn Storage,
    new_size: u64,
    backing_size: Option<u64>,
) -> Result<ResizeOutcome, ResizeError> {
    // QEMU: "The new size must be a multiple of 512".
    if new_size % SECTOR_SIZE != 0 {
        return Err(ResizeError::Unaligned { size: new_size });
    }
    if new_size > MAX_VIRTUAL_SIZE {
        return Err(ResizeError::TooLarge {
            size: new_size,
            max: MAX_VIRTUAL_SIZE,
        });
    }
    let (head, header) = HeaderBytes::read(io)?;
    check_resizable(&header, backing_size)?;
    let old_size = header.size();
    if new_size == old_size {
        return Ok(ResizeOutcome::unchanged(&header));
    }
    let l1 = ActiveL1::read(io, &header)?;
    let mut image = Image {
        io,
        geometry: header.geometry(),
        header,
        head,
        l1,
    };
    if new_size < old_size {
        image.shrink(new_size)
    } else {
        image.grow(new_size, backing_size)
    }
}

/// The refusals that do not depend on the direction: QEMU opens neither corrupt nor
/// (without repairing) dirty images writable, and refuses v2 images with snapshots.
fn check_resizable(header: &Qcow2Header, backing_size: Option<u64>) -> Result<(), ResizeError> {
    // "Corrupt bit. If this bit is set then any data structure may be corrupt and the image
    // must not be written to (unless for regaining consistency)."
    if header.is_corrupt() {
        return Err(ResizeError::Corrupt);
    }
    // "Dirty bit. If this bit is set then refcounts may be inconsistent": the allocator below
    // trusts them.
    if header.is_dirty() {
        return Err(ResizeError::Dirty);
    }
    header.check_supported().map_err(ResizeError::Unsupported)?;
    // QEMU's qcow2_co_truncate: "Can't resize a v2 image which has snapshots".
    if header.version() == Version::V2 && header.nb_snapshots() > 0 {
        return Err(ResizeError::SnapshotsInV2 {
            nb_snapshots: header.nb_snapshots(),
        });
    }
    match (header.backing_file(), backing_size) {
        (Some(_), None) => Err(ResizeError::BackingSizeMissing),
        (None, Some(backing_size)) => Err(ResizeError::UnexpectedBacking { backing_size }),
        _ => Ok(()),
    }
}

fn io_err(what: &'static str, offset: u64) -> impl FnOnce(io::Error) -> ResizeError {
    move |source| ResizeError::Io {
        what,
        offset: HostOffset(offset),
        source,
    }
}

fn sync(io: &dyn Storage, after: &'static str) -> Result<(), ResizeError> {
    io.sync(FileId(0))
        .map_err(|source| ResizeError::Sync { after, source })
}

fn be64(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

fn to_usize(n: u64) -> Result<usize, ResizeError> {
    usize::try_from(n).map_err(|_| ResizeError::Io {
        what: "sizing a buffer",
        offset: HostOffset(n),
        source: io::Error::from_raw_os_error(libc::ENOMEM),
    })
}

/// The file's first bytes (header, extensions, backing file name) as read, to patch fields in.
struct HeaderBytes {
    bytes: Vec<u8>,
    /// Bytes rewritten by an update: one aligned unit holding every field changed here.
    unit: usize,
}

impl HeaderBytes {
    fn read(io: &dyn Storage) -> Result<(HeaderBytes, Qcow2Header), ResizeError> {
        let mut bytes = vec![0u8; HEADER_READ_LIMIT];
        io.read_at(FileId(0), 0, &mut bytes)
            .map_err(io_err("reading the header", 0))?;
        let header = Qcow2Header::parse(&bytes).map_err(ResizeError::Header)?;
        // At most 4 KiB, and the header is at least a 512-byte cluster.
        let unit = to_usize(meta_unit(header.cluster_size()))?;
        Ok((HeaderBytes { bytes, unit }, header))
    }

    /// Sets `fields` (byte offset, big-endian value) with one write of the header's first
    /// unit (every field lies in its first 512 bytes, one sector), after checking that the
    /// result parses; then fdatasyncs. Returns the header as now written.
    fn update(
        &mut self,
        io: &dyn Storage,
        fields: &[(usize, &[u8])],
        what: &'static str,
    ) -> Result<Qcow2Header, ResizeError> {
        let mut bytes = self.bytes.clone();
        for (at, value) in fields {
            bytes[*at..*at + value.len()].copy_from_slice(value);
        }
        let header = Qcow2Header::parse(&bytes).map_err(ResizeError::HeaderPatch)?;
        io.write_at(FileId(0), 0, &bytes[..self.unit])
            .map_err(io_err(what, 0))?;
        sync(io, what)?;
        self.bytes = bytes;
        Ok(header)
    }
}

/// The active L1 table as on disk: every entry of the clusters it occupies.
struct ActiveL1 {
    /// Raw entries: `entries` live ones, then the rest of the last cluster.
    raw: Vec<u64>,
    entries: u64,
    offset: HostOffset,
    clusters: u64,
}

impl ActiveL1 {
    fn read(io: &dyn Storage, header: &Qcow2Header) -> Result<ActiveL1, ResizeError> {
        let cs = header.cluster_size();
        // The header check bounds the table to MAX_L1_TABLE_BYTES.
        let clusters = header.l1_table_bytes().div_ceil(cs);
        let mut bytes = vec![0u8; to_usize(clusters * cs)?];
        if clusters > 0 {
            let at = header.l1_table_offset().0;
            io.read_at(FileId(0), at, &mut bytes)
                .map_err(io_err("reading the L1 table", at))?;
        }
        Ok(ActiveL1 {
            raw: be64(&bytes),
            entries: u64::from(header.l1_size()),
            offset: header.l1_table_offset(),
            clusters,
        })
    }

    /// The live entries.
    fn live(&self) -> &[u64] {
        let n = usize::try_from(self.entries).unwrap_or(usize::MAX);
        &self.raw[..n.min(self.raw.len())]
    }

    /// True when the table's clusters already hold entries `entries..wanted` and they are
    /// all 0, so l1_size can grow to `wanted` without moving the table.
    fn extends_in_place_to(&self, wanted: u64) -> bool {
        let (Ok(from), Ok(to)) = (usize::try_from(self.entries), usize::try_from(wanted)) else {
            return false;
        };
        self.raw
            .get(from..to)
            .is_some_and(|tail| tail.iter().all(|&e| e == 0))
    }
}

/// Which L2 entries past an end count as in use.
#[derive(Clone, Copy)]
enum Holding {
    /// The entry keeps a host cluster (data, compressed, preallocated zero): shrinking
    /// would strand it.
    HostCluster,
    /// The entry reads as data: growing would show it.
    Data,
}

impl Holding {
    fn host(self, entry: &L2Entry) -> Option<HostOffset> {
        match (self, *entry) {
            (_, L2Entry::Normal { host_offset, .. }) => Some(host_offset),
            (_, L2Entry::Compressed(c)) => Some(c.host_offset()),
            (Holding::HostCluster, L2Entry::Zero { preallocated, .. }) => preallocated,
            (Holding::Data, L2Entry::Zero { .. }) | (_, L2Entry::Unallocated) => None,
        }
    }
}

struct Image<'a> {
    io: &'a dyn Storage,
    header: Qcow2Header,
    geometry: ClusterGeometry,
    head: HeaderBytes,
    l1: ActiveL1,
}

impl Image<'_> {
    /// The first guest cluster in `range` whose L2 entry holds a host cluster as `holding`
    /// says, with that host offset. Clusters past the L1 table hold nothing.
    fn first_holding(
        &self,
        range: Range<u64>,
        holding: Holding,
    ) -> Result<Option<(GuestCluster, HostOffset)>, ResizeError> {
        let l2_entries = self.geometry.l2_entries();
        let l2_bits = self.geometry.l2_bits();
        let end = range.end.min(self.l1.entries.saturating_mul(l2_entries));
        let mut cluster = range.start;
        // One L1 entry per round: bounded by l1_size.
        while cluster < end {
            let l1_index = cluster >> l2_bits;
            let next = (l1_index + 1) << l2_bits;
            let raw = usize::try_from(l1_index)
                .ok()
                .and_then(|i| self.l1.live().get(i))
                .copied()
                .unwrap_or(0);
            let entry =
                decode_l1_entry(raw, l1_index, &self.geometry).map_err(ResizeError::Entry)?;
            if let L1Entry::L2Table { offset, .. } = entry {
                let mut bytes = vec![0u8; to_usize(self.geometry.cluster_size())?];
                self.io
                    .read_at(FileId(0), offset.0, &mut bytes)
                    .map_err(io_err("reading an L2 table", offset.0))?;
                let table = be64(&bytes);
                for c in cluster..next.min(end) {
                    let index = c & (l2_entries - 1);
                    let raw = usize::try_from(index)
                        .ok()
                        .and_then(|i| table.get(i))
                        .copied()
                        .unwrap_or(0);
                    let entry =
                        decode_l2_entry(raw, offset, index, &self.geometry, self.header.version())
                            .map_err(ResizeError::Entry)?;
                    if let Some(host) = holding.host(&entry) {
                        return Ok(Some((GuestCluster(c), host)));
                    }
                }
            }
            cluster = next;
        }
        Ok(None)
    }

    /// Header fields every update writes along: autoclear features cleared (v3), as before
    /// any write vublk makes ("An implementation may only write to an image with unknown
    /// auto-clear features if it clears the respective bits from this field first"; the
    /// bitmaps would describe a disk of the old size).
    fn autoclear_field(&self) -> Option<(usize, &'static [u8])> {
        if self.header.version() == Version::V3 && self.header.autoclear_features() != 0 {
            Some((AUTOCLEAR_FEATURES_OFFSET, &[0u8; 8]))
        } else {
            None
        }
    }

    fn outcome(&self, written: &Qcow2Header, moved: Option<HostOffset>) -> ResizeOutcome {
        if self.header.autoclear_features() != written.autoclear_features() {
            log::info!(
                "resize: cleared autoclear features {:#x} (bitmaps are not resized by vublk)",
                self.header.autoclear_features()
            );
        }
        ResizeOutcome {
            old_size: self.header.size(),
            new_size: written.size(),
            old_l1_offset: self.header.l1_table_offset(),
            new_l1_offset: written.l1_table_offset(),
            old_l1_entries: self.header.l1_size(),
            new_l1_entries: written.l1_size(),
            refcount_table_moved_to: moved,
        }
    }

    /// Shrinks when nothing past the new end keeps a host cluster: only the size changes
    /// (l1_size too stays, as QEMU leaves it; the entries past the end are unallocated, or
    /// point at L2 tables that map nothing, which stay).
    fn shrink(&mut self, new_size: u64) -> Result<ResizeOutcome, ResizeError> {
        let first = new_size.div_ceil(self.geometry.cluster_size());
        if let Some((cluster, host)) = self.first_holding(first..u64::MAX, Holding::HostCluster)? {
            return Err(ResizeError::AllocatedPastEnd {
                new_size,
                cluster,
                offset: GuestOffset(cluster.0 << self.geometry.cluster_bits()),
                host,
            });
        }
        let size = new_size.to_be_bytes();
        let mut fields = vec![(SIZE_OFFSET, &size[..])];
        fields.extend(self.autoclear_field());
        let written = self.head.update(self.io, &fields, "writing the new size")?;
        Ok(self.outcome(&written, None))
    }

    fn grow(
        &mut self,
        new_size: u64,
        backing_size: Option<u64>,
    ) -> Result<ResizeOutcome, ResizeError> {
        let old_size = self.header.size();
        // QEMU zeroes [old, new) when the backing file reaches past the old end; vublk
        // refuses instead where backing data would show.
        if let Some(backing_size) = backing_size {
            if backing_size > old_size {
                return Err(ResizeError::BackingWouldShow {
                    old_size,
                    new_size,
                    backing_size,
                    shown_end: backing_size.min(new_size),
                });
            }
        }
        let entries = self.geometry.l1_entries_for(new_size);
        let bytes = entries.saturating_mul(8);
        // QEMU's QCOW_MAX_L1_SIZE ("Failed to grow the L1 table: File too large").
        if bytes > MAX_L1_TABLE_BYTES {
            return Err(ResizeError::L1TooLarge {
                size: new_size,
                entries,
                bytes,
                max: MAX_L1_TABLE_BYTES,
            });
        }
        let new_l1_size = u32::try_from(entries).map_err(|_| ResizeError::L1TooLarge {
            size: new_size,
            entries,
            bytes,
            max: MAX_L1_TABLE_BYTES,
        })?;
        // Clusters past the old end must read as zeroes once they are inside the disk.
        let cs = self.geometry.cluster_size();
        if let Some((cluster, host)) =
            self.first_holding(old_size.div_ceil(cs)..new_size.div_ceil(cs), Holding::Data)?
        {
            return Err(ResizeError::DataPastEnd {
                old_size,
                cluster,
                offset: GuestOffset(cluster.0 << self.geometry.cluster_bits()),
                host,
            });
        }
        let size = new_size.to_be_bytes();
        let autoclear = self.autoclear_field();
        if entries <= self.l1.entries {
            let mut fields = vec![(SIZE_OFFSET, &size[..])];
            fields.extend(autoclear);
            let written = self.head.update(self.io, &fields, "writing the new size")?;
            return Ok(self.outcome(&written, None));
        }
        if self.l1.extends_in_place_to(entries) {
            let l1_size = new_l1_size.to_be_bytes();
            let mut fields = vec![(SIZE_OFFSET, &size[..]), (L1_SIZE_OFFSET, &l1_size[..])];
            fields.extend(autoclear);
            let written = self
                .head
                .update(self.io, &fields, "writing the new size and l1_size")?;
            return Ok(self.outcome(&written, None));
        }
        self.relocate_l1(new_size, new_l1_size, autoclear)
    }

    /// Moves the active L1 table to new clusters with room for `new_l1_size` entries and
    /// switches the header to it together with the new size.
    fn relocate_l1(
        &mut self,
        new_size: u64,
        new_l1_size: u32,
        autoclear: Option<(usize, &'static [u8])>,
    ) -> Result<ResizeOutcome, ResizeError> {
        let cs = self.geometry.cluster_size();
        let table_bytes = u64::from(new_l1_size) * 8;
        let clusters = table_bytes.div_ceil(cs);
        let mut refs = Refs::load(self.io, &self.header)?;
        // Nothing the image's own metadata uses may be handed out, even if a refcount
        // said otherwise.
        let l1_end = self.l1.offset.0 / cs + self.l1.clusters;
        let area = refs.allocate(clusters, l1_end, &mut self.head)?;
        let at = area.start * cs;
        let mut table = vec![0u8; to_usize(clusters * cs)?];
        for (slot, raw) in table.chunks_exact_mut(8).zip(self.l1.live()) {
            slot.copy_from_slice(&raw.to_be_bytes());
        }
        self.io
            .write_at(FileId(0), at, &table)
            .map_err(io_err("writing the new L1 table", at))?;
        sync(self.io, "writing the new L1 table")?;
        let size = new_size.to_be_bytes();
        let l1_size = new_l1_size.to_be_bytes();
        let l1_offset = at.to_be_bytes();
        // size, l1_size and l1_table_offset: bytes 24..48 of one sector, in one write.
        let mut fields = vec![
            (SIZE_OFFSET, &size[..]),
            (L1_SIZE_OFFSET, &l1_size[..]),
            (L1_TABLE_OFFSET_OFFSET, &l1_offset[..]),
        ];
        fields.extend(autoclear);
        let written = self
            .head
            .update(self.io, &fields, "switching to the new L1 table")?;
        // Nothing points at the old clusters any more (durably): a crash from here leaks.
        let first = self.l1.offset.0 / cs;
        refs.release(first..first + self.l1.clusters)?;
        if let Some((old, old_clusters)) = area.old_refcount_table {
            let first = old.0 / cs;
            refs.release(first..first + old_clusters)?;
        }
        sync(self.io, "releasing the old tables")?;
        Ok(self.outcome(&written, area.new_refcount_table))
    }
}

/// Where [`Refs::allocate`] put the clusters asked for.
struct Area {
    /// First host cluster of the run asked for.
    start: u64,
    /// The refcount table replaced by a bigger one, to release after the switch.
    old_refcount_table: Option<(HostOffset, u64)>,
    new_refcount_table: Option<HostOffset>,
}

/// New refcount structures for an area: the table indices that need a new block (placed in
/// this order right after the clusters asked for), then the clusters of a bigger refcount
/// table (0: the current table indexes every block).
#[derive(Debug, PartialEq, Eq)]
struct AreaSize {
    new_blocks: Vec<u64>,
    table_clusters: u64,
    /// One past the area's last host cluster.
    end: u64,
}

/// Sizes an area of `wanted` clusters at host cluster `start` that counts itself: refcount
/// blocks missing for any of its clusters come right after the `wanted` clusters, and if
/// the table (of `table_entries` entries) cannot index one of them, a bigger table follows
/// the blocks. More blocks or a bigger table make the area longer, which may need more of
/// both: sized again until nothing changes (QEMU's qcow2_refcount_area solves the same).
fn size_area(
    start: u64,
    wanted: u64,
    cluster: &ClusterGeometry,
    refcount: &RefcountGeometry,
    table_entries: u64,
    has_block: impl Fn(u64) -> bool,
) -> Result<AreaSize, ResizeError> {
    let cs = cluster.cluster_size();
    let per_table_cluster = cs / 8;
    let block_bits = refcount.block_bits();
    let cluster_limit = MAX_HOST_OFFSET >> cluster.cluster_bits();
    let beyond = |end: u64| ResizeError::HostOffsetLimit {
        end: HostOffset(end.saturating_mul(cs)),
        limit: MAX_HOST_OFFSET,
    };
    let (mut blocks, mut table) = (0u64, 0u64);
    for _ in 0..MAX_AREA_SIZING_ROUNDS {
        let end = start
            .checked_add(wanted)
            .and_then(|e| e.checked_add(blocks))
            .and_then(|e| e.checked_add(table))
            .ok_or_else(|| beyond(u64::MAX))?;
        if end > cluster_limit {
            return Err(beyond(end));
        }
        let first = start >> block_bits;
        let last = (end - 1) >> block_bits;
        let new_blocks: Vec<u64> = (first..=last).filter(|&i| !has_block(i)).collect();
        let table_clusters = if last >= table_entries {
            (last + 1).div_ceil(per_table_cluster)
        } else {
            0
        };
        if new_blocks.len() as u64 == blocks && table_clusters == table {
            let bytes = table_clusters * cs;
            if bytes > MAX_REFCOUNT_TABLE_BYTES {
                return Err(ResizeError::RefcountTableTooLarge {
                    bytes,
                    max: MAX_REFCOUNT_TABLE_BYTES,
                });
            }
            return Ok(AreaSize {
                new_blocks,
                table_clusters,
                end,
            });
        }
        blocks = new_blocks.len() as u64;
        table = table_clusters;
    }
    Err(ResizeError::AreaSizing {
        rounds: MAX_AREA_SIZING_ROUNDS,
    })
}

/// The refcount structures of the image, as far as allocating one area at its end and
/// releasing the old tables needs them. Every change is written before the call returns.
struct Refs<'a> {
    io: &'a dyn Storage,
    cluster: ClusterGeometry,
    refcount: RefcountGeometry,
    table_offset: HostOffset,
    table_clusters: u64,
    /// Raw refcount table entries (all of its clusters).
    raw: Vec<u64>,
    /// The same, decoded once: where each block is.
    blocks_at: Vec<Option<HostOffset>>,
    /// Blocks read or written, by table index.
    blocks: HashMap<u64, Vec<u8>>,
}

impl<'a> Refs<'a> {
    fn load(io: &'a dyn Storage, header: &Qcow2Header) -> Result<Refs<'a>, ResizeError> {
        let cluster = header.geometry();
        let at = header.refcount_table_offset().0;
        // At most MAX_REFCOUNT_TABLE_BYTES (checked by the header parse).
        let mut bytes = vec![0u8; to_usize(header.refcount_table_bytes())?];
        io.read_at(FileId(0), at, &mut bytes)
            .map_err(io_err("reading the refcount table", at))?;
        let raw = be64(&bytes);
        let blocks_at = raw
            .iter()
            .enumerate()
            .map(
                |(i, &e)| match decode_refcount_table_entry(e, i as u64, &cluster) {
                    Ok(RefcountTableEntry::Block { offset }) => Ok(Some(offset)),
                    Ok(RefcountTableEntry::Unallocated) => Ok(None),
                    Err(e) => Err(ResizeError::Entry(e)),
                },
            )
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Refs {
            io,
            cluster,
            refcount: header.refcount_geometry(),
            table_offset: header.refcount_table_offset(),
            table_clusters: u64::from(header.refcount_table_clusters()),
            raw,
            blocks_at,
            blocks: HashMap::new(),
        })
    }

    fn cs(&self) -> u64 {
        self.cluster.cluster_size()
    }

    fn block_at(&self, idx: u64) -> Option<HostOffset> {
        usize::try_from(idx)
            .ok()
            .and_then(|i| self.blocks_at.get(i))
            .copied()
            .flatten()
    }

    /// Reads block `idx` into the cache; false when the table has none there.
    fn load_block(&mut self, idx: u64) -> Result<bool, ResizeError> {
        if self.blocks.contains_key(&idx) {
            return Ok(true);
        }
        let Some(offset) = self.block_at(idx) else {
            return Ok(false);
        };
        let mut block = vec![0u8; to_usize(self.cs())?];
        self.io
            .read_at(FileId(0), offset.0, &mut block)
            .map_err(io_err("reading a refcount block", offset.0))?;
        self.blocks.insert(idx, block);
        Ok(true)
    }

    /// Refcount block `idx`, loaded, for a change to `cluster`'s refcount; an error naming the
    /// cluster when the refcount table has no block there.
    fn block_of(&mut self, idx: u64, cluster: HostCluster) -> Result<&mut Vec<u8>, ResizeError> {
        if !self.load_block(idx)? {
            return Err(ResizeError::MissingRefcountBlock { cluster });
        }
        self.blocks
            .get_mut(&idx)
            .ok_or(ResizeError::MissingRefcountBlock { cluster })
    }

    /// Writes the aligned unit of block `idx` that starts at byte `unit_start`.
    fn write_block_unit(&self, idx: u64, unit_start: u64) -> Result<(), ResizeError> {
        let unit = meta_unit(self.cs());
        let (Some(offset), Some(block)) = (self.block_at(idx), self.blocks.get(&idx)) else {
            return Err(ResizeError::MissingRefcountBlock {
                cluster: HostCluster(idx << self.refcount.block_bits()),
            });
        };
        let at = offset.0 + unit_start;
        let range = to_usize(unit_start)?..to_usize(unit_start + unit)?;
        self.io
            .write_at(FileId(0), at, &block[range])
            .map_err(io_err("writing a refcount block", at))
    }

    /// The byte where the aligned unit holding refcount `index` of a block starts.
    fn unit_of(&self, index: u64) -> u64 {
        let unit = meta_unit(self.cs());
        index * u64::from(self.refcount.refcount_bits()) / 8 / unit * unit
    }

    /// The first host cluster at or past `floor` after which every refcount is 0, and past
    /// every refcount block and the refcount table: the image's end as its refcounts see it
    /// (the file may be longer, or a block device).
    fn end_of_used(&mut self, floor: u64) -> Result<u64, ResizeError> {
        let cs = self.cs();
        let table_end = self.table_offset.0 / cs + self.table_clusters;
        let blocks_end = self
            .blocks_at
            .iter()
            .flatten()
            .map(|o| o.0 / cs + 1)
            .max()
            .unwrap_or(0);
        let mut end = floor.max(table_end).max(blocks_end).max(1);
        // The last block with a nonzero refcount holds the last used cluster.
        for idx in (0..self.blocks_at.len() as u64).rev() {
            if !self.load_block(idx)? {
                continue;
            }
            let Some(block) = self.blocks.get(&idx) else {
                continue;
            };
            let Some(byte) = block.iter().rposition(|&b| b != 0) else {
                continue;
            };
            // The entries holding that byte (several for sub-byte refcounts).
            let bits = u64::from(self.refcount.refcount_bits());
            let byte = byte as u64;
            let low = byte * 8 / bits;
            let high = ((byte + 1) * 8 / bits).saturating_sub(1).max(low);
            for index in (low..=high).rev() {
                let rc = refcount_get(block, index, &self.refcount).map_err(|source| {
                    ResizeError::Refcount {
                        cluster: HostCluster((idx << self.refcount.block_bits()) + index),
                        source,
                    }
                })?;
                if rc != 0 {
                    end = end.max((idx << self.refcount.block_bits()) + index + 1);
                    return Ok(end);
                }
            }
        }
        Ok(end)
    }

    /// Allocates `wanted` contiguous clusters past every used cluster (and at or past
    /// `floor`) and makes their refcount 1, durably, before returning. New refcount blocks
    /// (and a new refcount table, if the old one cannot index them) follow the run; each is
    /// written and synced before what makes it live, and an old table is left for the
    /// caller to release once nothing points at it.
    fn allocate(
        &mut self,
        wanted: u64,
        floor: u64,
        head: &mut HeaderBytes,
    ) -> Result<Area, ResizeError> {
        let cs = self.cs();
        let start = self.end_of_used(floor)?;
        let size = {
            let blocks_at = &self.blocks_at;
            size_area(
                start,
                wanted,
                &self.cluster,
                &self.refcount,
                blocks_at.len() as u64,
                |i| {
                    usize::try_from(i)
                        .ok()
                        .and_then(|i| blocks_at.get(i))
                        .is_some_and(Option::is_some)
                },
            )?
        };
        let blocks_start = start + wanted;
        let table_start = blocks_start + size.new_blocks.len() as u64;
        let mut new_blocks: BTreeMap<u64, (u64, Vec<u8>)> = BTreeMap::new();
        for (k, &idx) in size.new_blocks.iter().enumerate() {
            new_blocks.insert(idx, (blocks_start + k as u64, vec![0u8; to_usize(cs)?]));
        }
        // Refcount 1 for every cluster of the area, in a new block or an existing one.
        let mut dirty: BTreeSet<(u64, u64)> = BTreeSet::new();
        for c in start..size.end {
            let loc = self.refcount.locate(HostCluster(c));
            let rc_err = |source| ResizeError::Refcount {
                cluster: HostCluster(c),
                source,
            };
            if let Some((_, block)) = new_blocks.get_mut(&loc.table_index) {
                refcount_set(block, loc.block_index, 1, &self.refcount).map_err(rc_err)?;
                continue;
            }
            let unit_start = self.unit_of(loc.block_index);
            let refcounts = self.refcount;
            let block = self.block_of(loc.table_index, HostCluster(c))?;
            let refcount = refcount_get(block, loc.block_index, &refcounts).map_err(rc_err)?;
            if refcount != 0 {
                return Err(ResizeError::NotFree {
                    cluster: HostCluster(c),
                    refcount,
                });
            }
            refcount_set(block, loc.block_index, 1, &refcounts).map_err(rc_err)?;
            dirty.insert((loc.table_index, unit_start));
        }
        // Unreferenced until the table points at them: a crash leaves bytes nothing uses.
        for (c, block) in new_blocks.values() {
            self.io
                .write_at(FileId(0), c * cs, block)
                .map_err(io_err("writing a new refcount block", c * cs))?;
        }
        // A crash from here leaks the area (refcount 1, unreferenced), never worse.
        for &(idx, unit_start) in &dirty {
            self.write_block_unit(idx, unit_start)?;
        }
        let mut entries = Vec::with_capacity(new_blocks.len());
        for (&idx, (c, _)) in &new_blocks {
            let entry = encode_refcount_table_entry(
                RefcountTableEntry::Block {
                    offset: HostOffset(c * cs),
                },
                &self.cluster,
            )
            .map_err(ResizeError::Encode)?;
            entries.push((idx, entry, HostOffset(c * cs)));
        }
        let mut old_refcount_table = None;
        let mut new_refcount_table = None;
        if size.table_clusters == 0 {
            sync(self.io, "writing new refcount blocks")?;
            let unit = meta_unit(cs);
            let mut units = BTreeSet::new();
            for &(idx, entry, offset) in &entries {
                let i = to_usize(idx)?;
                self.raw[i] = entry;
                self.blocks_at[i] = Some(offset);
                units.insert(idx * 8 / unit * unit);
            }
            for unit_start in units {
                let first = to_usize(unit_start / 8)?;
                let last = to_usize((unit_start + unit) / 8)?;
                let mut bytes = Vec::with_capacity(to_usize(unit)?);
                for raw in &self.raw[first..last.min(self.raw.len())] {
                    bytes.extend_from_slice(&raw.to_be_bytes());
                }
                let at = self.table_offset.0 + unit_start;
                self.io
                    .write_at(FileId(0), at, &bytes)
                    .map_err(io_err("writing the refcount table", at))?;
            }
        } else {
            let len = to_usize(size.table_clusters * (cs / 8))?;
            let mut raw = self.raw.clone();
            raw.resize(len, 0);
            let mut blocks_at = self.blocks_at.clone();
            blocks_at.resize(len, None);
            for &(idx, entry, offset) in &entries {
                let i = to_usize(idx)?;
                raw[i] = entry;
                blocks_at[i] = Some(offset);
            }
            let mut bytes = Vec::with_capacity(len * 8);
            for e in &raw {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            let at = table_start * cs;
            self.io
                .write_at(FileId(0), at, &bytes)
                .map_err(io_err("writing the new refcount table", at))?;
            sync(self.io, "writing the new refcount table")?;
            let offset = at.to_be_bytes();
            let clusters = u32::try_from(size.table_clusters)
                .map_err(|_| ResizeError::RefcountTableTooLarge {
                    bytes: size.table_clusters * cs,
                    max: MAX_REFCOUNT_TABLE_BYTES,
                })?
                .to_be_bytes();
            head.update(
                self.io,
                &[
                    (REFCOUNT_TABLE_OFFSET_OFFSET, &offset[..]),
                    (REFCOUNT_TABLE_CLUSTERS_OFFSET, &clusters[..]),
                ],
                "switching to the new refcount table",
            )?;
            old_refcount_table = Some((self.table_offset, self.table_clusters));
            new_refcount_table = Some(HostOffset(at));
            self.raw = raw;
            self.blocks_at = blocks_at;
            self.table_offset = HostOffset(at);
            self.table_clusters = size.table_clusters;
        }
        for (idx, (_, block)) in new_blocks {
            self.blocks.insert(idx, block);
        }
        sync(self.io, "setting the refcounts of the new clusters")?;
        Ok(Area {
            start,
            old_refcount_table,
            new_refcount_table,
        })
    }

    /// Drops one reference to each cluster of `clusters` (nothing points at them any more,
    /// durably); freed clusters are punched out of the file. The caller syncs.
    fn release(&mut self, clusters: Range<u64>) -> Result<(), ResizeError> {
        let mut dirty = BTreeSet::new();
        let mut freed = Vec::new();
        for c in clusters {
            let loc = self.refcount.locate(HostCluster(c));
            let unit_start = self.unit_of(loc.block_index);
            let refcounts = self.refcount;
            let block = self.block_of(loc.table_index, HostCluster(c))?;
            let left =
                refcount_update(block, loc.block_index, -1, &refcounts).map_err(|source| {
                    ResizeError::Refcount {
                        cluster: HostCluster(c),
                        source,
                    }
                })?;
            if left == 0 {
                freed.push(c);
            }
            dirty.insert((loc.table_index, unit_start));
        }
        for (idx, unit_start) in dirty {
            self.write_block_unit(idx, unit_start)?;
        }
        let cs = self.cs();
        for c in freed {
            self.io
                .punch_hole(FileId(0), c * cs, cs)
                .map_err(io_err("punching a released cluster", c * cs))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometries(cluster_bits: u32, refcount_order: u32) -> (ClusterGeometry, RefcountGeometry) {
        (
            ClusterGeometry::new(cluster_bits, false).unwrap(),
            RefcountGeometry::new(cluster_bits, refcount_order).unwrap(),
        )
    }

    #[test]
    fn an_area_inside_an_existing_block_needs_nothing_new() {
        let (c, r) = geometries(16, 4);
        let size = size_area(100, 4, &c, &r, 8192, |i| i == 0).unwrap();
        assert_eq!(
            size,
            AreaSize {
                new_blocks: vec![],
                table_clusters: 0,
                end: 104
            }
        );
    }

    #[test]
    fn an_area_past_its_blocks_gets_blocks_that_count_themselves() {
        // 512-byte clusters, 16-bit refcounts: a block covers 256 clusters.
        let (c, r) = geometries(9, 4);
        // 512 clusters from 250: [250, 762) spans blocks 0..=2, of which only 0 exists.
        let size = size_area(250, 512, &c, &r, 64, |i| i == 0).unwrap();
        // Blocks 1 and 2 are new, at 762 and 763: the area ends at 764, still in block 2.
        assert_eq!(
            size,
            AreaSize {
                new_blocks: vec![1, 2],
                table_clusters: 0,
                end: 764
            }
        );
    }

    #[test]
    fn a_table_that_cannot_index_the_new_blocks_is_replaced_by_a_bigger_one() {
        // 512-byte clusters, 64-bit refcounts: a block covers 64 clusters; a one-cluster
        // table indexes 64 blocks, 4096 clusters.
        let (c, r) = geometries(9, 6);
        let size = size_area(4000, 200, &c, &r, 64, |i| i < 63).unwrap();
        // [4000, 4200 + k + t): blocks 62..=65 (62 exists), and a table of 2 clusters.
        assert_eq!(size.new_blocks, vec![63, 64, 65]);
        assert_eq!(size.table_clusters, 2);
        assert_eq!(size.end, 4000 + 200 + 3 + 2);
    }

    #[test]
    fn an_area_past_the_host_offset_limit_is_refused() {
        let (c, r) = geometries(9, 4);
        let err = size_area((1 << 47) - 2, 4, &c, &r, 64, |_| true).unwrap_err();
        assert!(matches!(err, ResizeError::HostOffsetLimit { .. }), "{err}");
    }

    #[test]
    fn outcome_display_names_what_moved() {
        let o = ResizeOutcome {
            old_size: 1 << 20,
            new_size: 1 << 30,
            old_l1_offset: HostOffset(0x600),
            new_l1_offset: HostOffset(0x40000),
            old_l1_entries: 32,
            new_l1_entries: 32768,
            refcount_table_moved_to: None,
        };
        assert!(o.l1_moved());
        assert_eq!(
            o.to_string(),
            "1048576 -> 1073741824 bytes; L1 table moved from host offset 0x600 (32 entries) \
             to host offset 0x40000 (32768 entries)"
        );
    }
}
