//! The qcow2 layer: maps guest ranges through the L1 and (cached) L2 tables to data in the
//! image file, zeroes, compressed clusters, or the backing layer below.
//!
//! Opening reads the header and the active L1 table with blocking reads (setup, before
//! serving). Mapping never does I/O: an L2 table that is not cached is asked for with
//! `MapError::NeedTables`, which the engine loads through its ring. A write maps in place when
//! its clusters are allocated and not shared (COPIED); anything else (allocation, COW,
//! discard, write-zeroes) answers `MapError::NeedUpdate` and runs in `update.rs` on the disk's
//! metadata thread.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crate::layer::check_range;
use crate::qcow2::cache::{L2Cache, DEFAULT_L2_CACHE_BYTES};
use crate::qcow2::limits::{HEADER_READ_LIMIT, SNAPSHOT_ENTRY_MIN_BYTES};
use crate::qcow2::refcount::{meta_unit, Refcounts};
use crate::qcow2::{
    decode_l1_entry, decode_l2_entry, ClusterGeometry, GuestLocation, GuestOffset, HostOffset,
    L1Entry, L2Entry, Qcow2Header, Version,
};
use crate::{
    FileId, FileStorage, Format, ImageFile, Layer, MapError, MapKind, OpenError, Piece, Storage,
    TableLoad, Update, UpdateError,
};

/// Byte offset of autoclear_features in a version 3 header.
const AUTOCLEAR_FEATURES_OFFSET: usize = 88;

/// How far past its size at open a writable image may grow, beyond the virtual size and its
/// metadata: clusters freed in a session are only reused after a restart, so a guest that
/// discards and rewrites needs room; the bound keeps a hostile guest from filling the host.
pub const GROWTH_SLACK_BYTES: u64 = 1 << 30;

/// What only the metadata thread changes.
#[derive(Debug)]
pub(super) struct WriterState {
    pub(super) refcounts: Refcounts,
    /// Host clusters at or past this index were past the end of the file at open.
    pub(super) fresh_from: u64,
}

/// One qcow2 image over its file, with the layer below it (if any).
#[derive(Debug)]
pub struct Qcow2Layer {
    pub(super) file: ImageFile,
    pub(super) header: Qcow2Header,
    pub(super) geometry: ClusterGeometry,
    /// Raw L1 entries, decoded on use; stored by the metadata thread after the write.
    pub(super) l1: Vec<AtomicU64>,
    pub(super) l2: L2Cache,
    pub(super) backing: Option<Box<dyn Layer>>,
    pub(super) writable: bool,
    /// Set when the image was found inconsistent: the disk turns read-only.
    pub(super) corrupt: AtomicBool,
    /// Host clusters that hold metadata (header, L1, refcounts, L2 tables, snapshot table):
    /// guest data is never written there (QEMU's overlap check).
    pub(super) metadata: RwLock<HashSet<u64>>,
    pub(super) writer: Option<Mutex<WriterState>>,
}

impl Qcow2Layer {
    /// Opens `file` as qcow2 over `backing`. `backing` must be given exactly when the image
    /// names a backing file (the name is reported, never opened), in the format it names.
    pub fn open(file: ImageFile, backing: Option<Box<dyn Layer>>) -> Result<Qcow2Layer, OpenError> {
        Self::open_with_l2_cache(file, backing, DEFAULT_L2_CACHE_BYTES)
    }

    /// [`Qcow2Layer::open`] with an L2 cache of `l2_cache_bytes` (at least one table).
    pub fn open_with_l2_cache(
        file: ImageFile,
        backing: Option<Box<dyn Layer>>,
        l2_cache_bytes: u64,
    ) -> Result<Qcow2Layer, OpenError> {
        let fd = file.raw_fd();
        let role = file.options().role.clone();
        let size = file.size()?;
        let head_len = size.min(HEADER_READ_LIMIT as u64);
        let head = file.read_at(0, head_len)?;
        let header = Qcow2Header::parse_supported(&head).map_err(|source| OpenError::Header {
            fd,
            role: role.clone(),
            source,
        })?;
        let writable = file.options().writable;
        if writable {
            if header.is_corrupt() {
                return Err(OpenError::CorruptWritable { fd, role });
            }
            if header.is_dirty() {
                return Err(OpenError::DirtyWritable { fd, role });
            }
        }
        match (header.backing_file(), &backing) {
            (Some(name), None) => {
                return Err(OpenError::MissingBacking {
                    fd,
                    role,
                    name: String::from_utf8_lossy(name).into_owned(),
                })
            }
            (None, Some(_)) => return Err(OpenError::UnexpectedBacking { fd, role }),
            (Some(name), Some(layer)) => {
                if let Some(fmt) = header.backing_format() {
                    let image_says = String::from_utf8_lossy(fmt).into_owned();
                    let given = layer.format().to_string();
                    if image_says != given {
                        return Err(OpenError::BackingFormat {
                            fd,
                            role,
                            image_says,
                            given,
                        });
                    }
                }
                log::info!(
                    "fd {fd} ({role}): names its backing file \"{}\"; served from the {} layer the manager passed",
                    String::from_utf8_lossy(name),
                    layer.format()
                );
            }
            (None, None) => {}
        }
        let l1_bytes = file.read_at(header.l1_table_offset().0, header.l1_table_bytes())?;
        let l1: Vec<AtomicU64> = l1_bytes
            .chunks_exact(8)
            .map(|c| {
                AtomicU64::new(u64::from_be_bytes([
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                ]))
            })
            .collect();
        let geometry = header.geometry();
        let tables = usize::try_from(l2_cache_bytes / geometry.cluster_size()).unwrap_or(1);
        let mut layer = Qcow2Layer {
            file,
            header,
            geometry,
            l1,
            l2: L2Cache::new(tables),
            backing,
            writable,
            corrupt: AtomicBool::new(false),
            metadata: RwLock::new(HashSet::new()),
            writer: None,
        };
        if writable {
            layer.open_for_writing(size)?;
        }
        Ok(layer)
    }

    /// Loads what writing needs (the refcount table, the metadata map) and clears the
    /// autoclear bits vublk does not keep in sync, before any write.
    fn open_for_writing(&mut self, file_size: u64) -> Result<(), OpenError> {
        let fd = self.file.raw_fd();
        let role = self.file.options().role.clone();
        let cs = self.geometry.cluster_size();
        let update_err = |e: UpdateError| OpenError::Update {
            fd,
            role: role.clone(),
            source: e,
        };
        let storage = FileStorage::new(vec![&self.file]);
        let metadata_bound = self.header.size() / cs * 8 * 3 + 64 * cs;
        let limit = file_size
            .saturating_add(self.header.size())
            .saturating_add(metadata_bound)
            .saturating_add(GROWTH_SLACK_BYTES);
        let refcounts = Refcounts::load(
            &storage,
            fd,
            self.geometry,
            self.header.refcount_geometry(),
            self.header.refcount_table_offset(),
            self.header.refcount_table_clusters(),
            limit,
        )
        .map_err(update_err)?;
        // Every metadata structure must own its clusters: an image whose refcount blocks,
        // refcount table, L1 or L2 tables share a cluster (with each other or the header)
        // would have vublk's refcount or table writes land in another structure. QEMU's
        // overlap check refuses such writes; here the image is refused writable at open.
        let mut metadata: HashSet<u64> = HashSet::new();
        let mut claim = |cluster: u64, what: String| -> Result<(), OpenError> {
            if metadata.insert(cluster) {
                Ok(())
            } else {
                Err(OpenError::Overlap {
                    fd,
                    role: role.clone(),
                    what,
                    offset: cluster * cs,
                })
            }
        };
        claim(0, "the header".into())?;
        let l1_first = self.header.l1_table_offset().0 / cs;
        for c in l1_first..l1_first + self.header.l1_table_bytes().div_ceil(cs).max(1) {
            claim(c, "the L1 table".into())?;
        }
        let (rt_first, rt_clusters) = refcounts.table_clusters();
        for c in rt_first..rt_first + rt_clusters {
            claim(c, "the refcount table".into())?;
        }
        for (index, c) in refcounts.block_clusters() {
            claim(c, format!("refcount block {index}"))?;
        }
        for (i, raw) in self.l1.iter().enumerate() {
            if let Ok(L1Entry::L2Table { offset, .. }) =
                decode_l1_entry(raw.load(Ordering::Relaxed), i as u64, &self.geometry)
            {
                claim(offset.0 / cs, format!("the L2 table of L1 entry {i}"))?;
            }
        }
        if self.header.nb_snapshots() > 0 {
            let first = self.header.snapshots_offset().0 / cs;
            let bytes = u64::from(self.header.nb_snapshots()) * SNAPSHOT_ENTRY_MIN_BYTES;
            for c in first..first + bytes.div_ceil(cs).max(1) {
                claim(c, "the snapshot table".into())?;
            }
        }
        if self.header.version() == Version::V3 && self.header.autoclear_features() != 0 {
            let unit = usize::try_from(meta_unit(cs)).unwrap_or(512);
            let mut head = vec![0u8; unit];
            let io_err = |what: &str| {
                let what = what.to_string();
                let role = role.clone();
                move |source| OpenError::Update {
                    fd,
                    role,
                    source: UpdateError::Io { fd, what, source },
                }
            };
            storage
                .read_at(FileId(0), 0, &mut head)
                .map_err(io_err("reading the header"))?;
            let a = AUTOCLEAR_FEATURES_OFFSET;
            head[a..a + 8].copy_from_slice(&0u64.to_be_bytes());
            storage
                .write_at(FileId(0), 0, &head)
                .map_err(io_err("clearing the autoclear features"))?;
            storage
                .sync(FileId(0))
                .map_err(io_err("fdatasync after clearing the autoclear features"))?;
            log::info!(
                "fd {fd} ({role}): cleared autoclear features {:#x} (bitmaps are not kept in sync by vublk)",
                self.header.autoclear_features()
            );
            self.header.clear_autoclear_features();
        }
        *self.metadata.get_mut().unwrap_or_else(|e| e.into_inner()) = metadata;
        self.writer = Some(Mutex::new(WriterState {
            refcounts,
            fresh_from: file_size.div_ceil(cs),
        }));
        Ok(())
    }

    pub(super) fn fd(&self) -> i32 {
        self.file.raw_fd()
    }

    pub(super) fn geometry(&self) -> &ClusterGeometry {
        &self.geometry
    }

    pub(super) fn is_metadata(&self, host_cluster: u64) -> bool {
        self.metadata
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&host_cluster)
    }

    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }

    /// How many files the backing layers hold (their ids start at 1).
    fn backing_files(&self) -> usize {
        self.backing.as_ref().map_or(0, |b| b.files().len())
    }

    /// The L2 entry for `loc`, or `NeedTables` when its table is not cached.
    pub(super) fn l2_entry(&self, loc: &GuestLocation) -> Result<L2Entry, MapError> {
        let Some(raw) = usize::try_from(loc.l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .map(|a| a.load(Ordering::Acquire))
        else {
            // The header check sized L1 for the whole disk; past it nothing is allocated.
            return Ok(L2Entry::Unallocated);
        };
        let corrupt = |e: &dyn std::fmt::Display| {
            MapError::Corrupt(format!("fd {}: {e}", self.file.raw_fd()))
        };
        let l2_offset =
            match decode_l1_entry(raw, loc.l1_index, &self.geometry).map_err(|e| corrupt(&e))? {
                L1Entry::Unallocated => return Ok(L2Entry::Unallocated),
                L1Entry::L2Table { offset, .. } => offset,
            };
        let Some(table) = self.l2.get(l2_offset.0) else {
            return Err(MapError::NeedTables(vec![TableLoad {
                file: FileId(0),
                offset: l2_offset.0,
                len: self.geometry.cluster_size(),
                stamp: self.l2.stamp(),
            }]));
        };
        let raw = usize::try_from(loc.l2_index)
            .ok()
            .and_then(|i| table.get(i))
            .map(|e| e.load(Ordering::Acquire))
            .ok_or_else(|| corrupt(&"L2 index outside its table"))?;
        decode_l2_entry(
            raw,
            l2_offset,
            loc.l2_index,
            &self.geometry,
            self.header.version(),
        )
        .map_err(|e| corrupt(&e))
    }

    /// Maps `len` unallocated bytes at `offset` to the backing layer, or zeroes past its end.
    fn map_backing(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<(), MapError> {
        let Some(backing) = &self.backing else {
            push(out, Piece::Zero { len });
            return Ok(());
        };
        let covered = backing.virtual_size().saturating_sub(offset).min(len);
        if covered > 0 {
            // The backing layer maps into its own list, in its own FileId space: merging its
            // first piece into `out`'s last (another file with the same id) would be wrong.
            let mut below = Vec::new();
            backing
                .map(MapKind::Read, offset, covered, &mut below)
                .map_err(|e| match e {
                    MapError::NeedTables(loads) => {
                        MapError::NeedTables(loads.into_iter().map(|l| l.shifted(1)).collect())
                    }
                    other => other,
                })?;
            for piece in below {
                push(out, piece.shifted(1));
            }
        }
        if covered < len {
            push(out, Piece::Zero { len: len - covered });
        }
        Ok(())
    }
}

/// Appends `piece`, merging it into the previous one when they continue each other.
fn push(out: &mut Vec<Piece>, piece: Piece) {
    if let Some(last) = out.last_mut() {
        match (last, piece) {
            (Piece::Zero { len }, Piece::Zero { len: more }) => {
                *len += more;
                return;
            }
            (
                Piece::Data { file, offset, len },
                Piece::Data {
                    file: f2,
                    offset: o2,
                    len: more,
                },
            ) if *file == f2 && offset.checked_add(*len) == Some(o2) => {
                *len += more;
                return;
            }
            _ => {}
        }
    }
    out.push(piece);
}

impl Layer for Qcow2Layer {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.header.size()
    }

    fn files(&self) -> Vec<&ImageFile> {
        let mut files = vec![&self.file];
        if let Some(backing) = &self.backing {
            files.extend(backing.files());
        }
        files
    }

    fn read_only(&self) -> bool {
        !self.writable || self.corrupt.load(Ordering::Relaxed)
    }

    fn map(
        &self,
        kind: MapKind,
        offset: u64,
        len: u64,
        out: &mut Vec<Piece>,
    ) -> Result<(), MapError> {
        check_range(offset, len, self.virtual_size())?;
        match kind {
            MapKind::Read | MapKind::Write => {}
            MapKind::WriteZeroes { .. } | MapKind::Discard => {
                return Err(if self.read_only() {
                    MapError::ReadOnly
                } else {
                    MapError::NeedUpdate
                });
            }
        }
        let writing = kind == MapKind::Write;
        if writing && self.read_only() {
            return Err(MapError::ReadOnly);
        }
        // A write with a cluster that cannot be written in place goes to the metadata thread,
        // once every table the range needs is known to be cached.
        let mut needs_update = false;
        let cluster_size = self.geometry.cluster_size();
        let table_span = self.geometry.bytes_per_l2_table();
        let start = out.len();
        let mut pos = offset;
        let end = offset + len;
        // Tables the range needs that are not cached: mapping goes on past them to name them
        // all, and only fails (asking for them) at the end.
        let mut missing: Vec<TableLoad> = Vec::new();
        // One load per table (the same table is named once per cluster of the backing range
        // it maps), with the earliest stamp, which is the conservative one.
        let need = |loads: Vec<TableLoad>, missing: &mut Vec<TableLoad>| {
            for load in loads {
                match missing
                    .iter_mut()
                    .find(|m| (m.file, m.offset, m.len) == (load.file, load.offset, load.len))
                {
                    Some(m) => m.stamp = m.stamp.min(load.stamp),
                    None => missing.push(load),
                }
            }
        };
        while pos < end {
            let loc = self.geometry.locate(GuestOffset(pos));
            let n = (end - pos).min(cluster_size - loc.offset_in_cluster);
            let entry = match self.l2_entry(&loc) {
                Ok(entry) => entry,
                Err(MapError::NeedTables(loads)) => {
                    need(loads, &mut missing);
                    // The rest of this L2 table's span is unknown too.
                    pos = (pos / table_span + 1)
                        .checked_mul(table_span)
                        .map_or(end, |next| next.min(end));
                    continue;
                }
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            };
            if writing {
                match entry {
                    L2Entry::Normal {
                        host_offset,
                        copied: true,
                    } if !self.is_metadata(host_offset.0 / cluster_size) => {
                        push(
                            out,
                            Piece::Data {
                                file: FileId(0),
                                offset: host_offset.0 + loc.offset_in_cluster,
                                len: n,
                            },
                        );
                    }
                    _ => needs_update = true,
                }
                pos += n;
                continue;
            }
            let mapped = match entry {
                L2Entry::Unallocated => self.map_backing(pos, n, out),
                L2Entry::Zero { .. } => {
                    push(out, Piece::Zero { len: n });
                    Ok(())
                }
                L2Entry::Normal { host_offset, .. } => {
                    let HostOffset(host) = host_offset;
                    push(
                        out,
                        Piece::Data {
                            file: FileId(0),
                            offset: host + loc.offset_in_cluster,
                            len: n,
                        },
                    );
                    Ok(())
                }
                L2Entry::Compressed(c) => {
                    push(
                        out,
                        Piece::Compressed {
                            file: FileId(0),
                            offset: c.host_offset().0,
                            read_len: c.read_len(),
                            algorithm: self.header.compression_type(),
                            cluster_size,
                            skip: loc.offset_in_cluster,
                            len: n,
                        },
                    );
                    Ok(())
                }
            };
            match mapped {
                Ok(()) => {}
                Err(MapError::NeedTables(loads)) => need(loads, &mut missing),
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            }
            pos += n;
        }
        if !missing.is_empty() {
            out.truncate(start);
            return Err(MapError::NeedTables(missing));
        }
        if needs_update {
            out.truncate(start);
            return Err(MapError::NeedUpdate);
        }
        Ok(())
    }

    fn update(&self, io: &dyn Storage, update: Update<'_>) -> Result<(), UpdateError> {
        self.run_updates(io, &[update])
            .pop()
            .unwrap_or(Err(UpdateError::ReadOnly))
    }

    fn update_batch(
        &self,
        io: &dyn Storage,
        updates: &[Update<'_>],
    ) -> Vec<Result<(), UpdateError>> {
        self.run_updates(io, updates)
    }

    fn close(&self, io: &dyn Storage) -> Result<(), UpdateError> {
        self.close_writer(io)
    }

    fn load_table(&self, load: TableLoad, bytes: &[u8]) -> Result<(), MapError> {
        if load.file == FileId(0) {
            if bytes.len() as u64 != self.geometry.cluster_size() {
                return Err(MapError::Corrupt(format!(
                    "fd {}: L2 table at {} read as {} bytes",
                    self.file.raw_fd(),
                    load.offset,
                    bytes.len()
                )));
            }
            // A refused load (it may predate an update) is simply asked for again.
            let _ = self.l2.insert_load(load.offset, bytes, load.stamp);
            return Ok(());
        }
        match (&self.backing, load.file.0.checked_sub(1)) {
            (Some(backing), Some(id)) if (id as usize) < self.backing_files() => backing
                .load_table(
                    TableLoad {
                        file: FileId(id),
                        ..load
                    },
                    bytes,
                ),
            _ => Err(MapError::Corrupt(format!(
                "table load for unknown file {:?}",
                load.file
            ))),
        }
    }
}
