//! qcow2 metadata updates: allocating writes with copy-on-write, write-zeroes and discard.
//!
//! Runs on the disk's metadata thread with blocking I/O (see [`crate::Storage`]), one update
//! at a time, which serializes every allocation (and so every allocating write to the same
//! guest cluster); writes to allocated clusters never come here and run in parallel on the
//! queues. Each step completes before the next starts, in the order `formats/QCOW2-WRITES.md`
//! gives: data, then the L2 entry (a new or copied L2 table, then its L1 entry), then the
//! release of what is no longer referenced. An in-memory entry changes only after its write
//! completed, so a request that maps through it can rely on what it sees being on the file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::MutexGuard;

use crate::qcow2::cache::L2Table;
use crate::qcow2::layer::WriterState;
use crate::qcow2::refcount::meta_unit;
use crate::qcow2::{
    decode_l1_entry, decode_l2_entry, encode_l1_entry, encode_l2_entry, GuestOffset, HostOffset,
    L1Entry, L2Entry, Qcow2Layer, Version,
};
use crate::{decompress_cluster, AlignedBuf, FileId, Layer, MapError, MapKind, Piece, Storage};
use crate::{Update, UpdateError};

/// Bit 1 of incompatible_features: "Corrupt bit".
const CORRUPT_BIT: u64 = 1 << 1;
/// Byte offset of incompatible_features in a version 3 header.
const INCOMPATIBLE_FEATURES_OFFSET: usize = 72;

/// Where a guest cluster's L2 entry lives, as found.
struct Slot {
    l1_index: u64,
    l2_index: u64,
    /// The L2 table and whether the L1 entry says it is ours alone (COPIED); `None` when the
    /// L1 entry is unallocated.
    table: Option<(HostOffset, bool, L2Table)>,
    entry: L2Entry,
}

impl Qcow2Layer {
    fn lock_writer(&self) -> Result<MutexGuard<'_, WriterState>, UpdateError> {
        match &self.writer {
            Some(w) => Ok(w.lock().unwrap_or_else(|e| e.into_inner())),
            None => Err(UpdateError::ReadOnly),
        }
    }

    fn io_err(&self, what: String) -> impl FnOnce(std::io::Error) -> UpdateError {
        let fd = self.fd();
        move |source| UpdateError::Io { fd, what, source }
    }

    fn corrupt_err(&self, detail: String) -> UpdateError {
        UpdateError::Corrupt {
            fd: self.fd(),
            detail,
        }
    }

    /// Entry point from [`Layer::update`].
    pub(super) fn run_update(
        &self,
        io: &dyn Storage,
        update: Update<'_>,
    ) -> Result<(), UpdateError> {
        if self.read_only() {
            return Err(UpdateError::ReadOnly);
        }
        let mut w = self.lock_writer()?;
        let result = match update {
            Update::Write { offset, data } => self.write(io, &mut w, offset, data),
            Update::WriteZeroes { offset, len, unmap } => {
                self.write_zeroes(io, &mut w, offset, len, unmap)
            }
            Update::Discard { offset, len } => self.discard(io, &mut w, offset, len),
        };
        let new_metadata = std::mem::take(&mut w.refcounts.new_metadata);
        if !new_metadata.is_empty() {
            self.metadata
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .extend(new_metadata);
        }
        if let Err(UpdateError::Corrupt { detail, .. }) = &result {
            self.mark_corrupt(io, detail);
        }
        result
    }

    pub(super) fn close_writer(&self, io: &dyn Storage) -> Result<(), UpdateError> {
        let Some(w) = &self.writer else {
            return Ok(());
        };
        let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
        if self.corrupt.load(Ordering::Relaxed) {
            // Never touch refcounts of an image found inconsistent: leaks are safe.
            return io.sync(FileId(0)).map_err(self.io_err("fdatasync".into()));
        }
        w.refcounts.close(io)
    }

    /// Sets the corrupt bit (v3) and turns the disk read-only, as QEMU does.
    fn mark_corrupt(&self, io: &dyn Storage, detail: &str) {
        if self.corrupt.swap(true, Ordering::Relaxed) {
            return;
        }
        log::error!(
            "fd {}: qcow2 image is inconsistent ({detail}); marked corrupt, now served read-only; check it with `qemu-img check`",
            self.fd()
        );
        if self.header.version() != Version::V3 {
            return;
        }
        let unit = usize::try_from(meta_unit(self.geometry().cluster_size())).unwrap_or(512);
        let mut head = vec![0u8; unit];
        let f = INCOMPATIBLE_FEATURES_OFFSET;
        let written = io.read_at(FileId(0), 0, &mut head).and_then(|()| {
            let mut bits = [0u8; 8];
            bits.copy_from_slice(&head[f..f + 8]);
            let bits = u64::from_be_bytes(bits) | CORRUPT_BIT;
            head[f..f + 8].copy_from_slice(&bits.to_be_bytes());
            io.write_at(FileId(0), 0, &head)?;
            io.sync(FileId(0))
        });
        if let Err(e) = written {
            log::error!("fd {}: cannot set the corrupt bit: {e}", self.fd());
        }
    }

    /// The L2 table at `offset`, from the cache or read now.
    fn table_blocking(&self, io: &dyn Storage, offset: HostOffset) -> Result<L2Table, UpdateError> {
        if let Some(t) = self.l2.get(offset.0) {
            return Ok(t);
        }
        let cs = self.geometry().cluster_size();
        let mut bytes = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        io.read_at(FileId(0), offset.0, &mut bytes)
            .map_err(self.io_err(format!("reading the L2 table at {}", offset.0)))?;
        Ok(self.l2.insert(offset.0, &bytes))
    }

    fn slot(&self, io: &dyn Storage, pos: u64) -> Result<Slot, UpdateError> {
        let g = *self.geometry();
        let loc = g.locate(GuestOffset(pos));
        let raw = usize::try_from(loc.l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .map(|a| a.load(Ordering::Acquire))
            .ok_or_else(|| self.corrupt_err(format!("guest offset {pos} is past the L1 table")))?;
        let l1 =
            decode_l1_entry(raw, loc.l1_index, &g).map_err(|e| self.corrupt_err(e.to_string()))?;
        let (table, entry) = match l1 {
            L1Entry::Unallocated => (None, L2Entry::Unallocated),
            L1Entry::L2Table { offset, copied } => {
                let t = self.table_blocking(io, offset)?;
                let raw = usize::try_from(loc.l2_index)
                    .ok()
                    .and_then(|i| t.get(i))
                    .map(|e| e.load(Ordering::Acquire))
                    .ok_or_else(|| self.corrupt_err("L2 index outside its table".into()))?;
                let entry = decode_l2_entry(raw, offset, loc.l2_index, &g, self.header.version())
                    .map_err(|e| self.corrupt_err(e.to_string()))?;
                (Some((offset, copied, t)), entry)
            }
        };
        Ok(Slot {
            l1_index: loc.l1_index,
            l2_index: loc.l2_index,
            table,
            entry,
        })
    }

    /// Whether the backing chain has bytes at guest offset `pos` (else it reads as zero).
    fn backing_covers(&self, pos: u64) -> bool {
        self.backing
            .as_ref()
            .is_some_and(|b| b.virtual_size() > pos)
    }

    fn write(
        &self,
        io: &dyn Storage,
        w: &mut WriterState,
        offset: u64,
        data: &[u8],
    ) -> Result<(), UpdateError> {
        let cs = self.geometry().cluster_size();
        crate::layer::check_range(offset, data.len() as u64, self.virtual_size())?;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_cluster = pos % cs;
            let n = usize::try_from((cs - in_cluster).min((data.len() - done) as u64))
                .unwrap_or(usize::MAX);
            self.write_cluster(io, w, pos, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes `chunk` (inside one guest cluster) at guest offset `pos`.
    fn write_cluster(
        &self,
        io: &dyn Storage,
        w: &mut WriterState,
        pos: u64,
        chunk: &[u8],
    ) -> Result<(), UpdateError> {
        let cs = self.geometry().cluster_size();
        let in_cluster = pos % cs;
        let slot = self.slot(io, pos)?;
        let table_copied = slot.table.as_ref().is_some_and(|t| t.1);
        // Allocated and ours alone: in place (a write that raced with this one's allocation).
        if let L2Entry::Normal {
            host_offset,
            copied: true,
        } = slot.entry
        {
            if table_copied {
                self.check_overlap(host_offset.0 / cs)?;
                return io
                    .write_at(FileId(0), host_offset.0 + in_cluster, chunk)
                    .map_err(self.io_err(format!("writing guest data at host {}", host_offset.0)));
            }
        }
        // A preallocated zero cluster that is ours: fill it in place.
        let target = match slot.entry {
            L2Entry::Zero {
                preallocated: Some(h),
                copied: true,
            } if table_copied => h.0 / cs,
            _ => w.refcounts.allocate(io)?,
        };
        self.check_overlap(target)?;
        let mut buf = AlignedBuf::new(usize::try_from(cs).unwrap_or(0)).ok_or_else(|| {
            self.io_err("cluster buffer".into())(std::io::Error::from_raw_os_error(libc::ENOMEM))
        })?;
        if chunk.len() as u64 != cs {
            self.fill_cow(io, pos - in_cluster, slot.entry, buf.as_mut_slice())?;
        }
        let start = usize::try_from(in_cluster).unwrap_or(0);
        buf.as_mut_slice()[start..start + chunk.len()].copy_from_slice(chunk);
        io.write_at(FileId(0), target * cs, buf.as_slice())
            .map_err(self.io_err(format!(
                "writing guest cluster {} to host cluster {target}",
                pos / cs
            )))?;
        let new = L2Entry::Normal {
            host_offset: HostOffset(target * cs),
            copied: true,
        };
        self.link(io, w, &slot, new)?;
        self.release_entry(w, slot.entry, Some(target));
        Ok(())
    }

    /// Fills `buf` (one cluster) with what guest cluster at `start` reads as now.
    fn fill_cow(
        &self,
        io: &dyn Storage,
        start: u64,
        entry: L2Entry,
        buf: &mut [u8],
    ) -> Result<(), UpdateError> {
        let cs = self.geometry().cluster_size();
        match entry {
            L2Entry::Zero { .. } => buf.fill(0),
            L2Entry::Unallocated => {
                buf.fill(0);
                if let Some(backing) = &self.backing {
                    let covered = backing.virtual_size().saturating_sub(start).min(cs);
                    if covered > 0 {
                        let n = usize::try_from(covered).unwrap_or(0);
                        read_layer(backing.as_ref(), io, 1, start, &mut buf[..n])?;
                    }
                }
            }
            L2Entry::Normal { host_offset, .. } => {
                io.read_at(FileId(0), host_offset.0, buf).map_err(
                    self.io_err(format!("reading host cluster at {} for COW", host_offset.0)),
                )?
            }
            L2Entry::Compressed(c) => {
                let mut input = vec![0u8; usize::try_from(c.read_len()).unwrap_or(0)];
                io.read_at(FileId(0), c.host_offset().0, &mut input)
                    .map_err(self.io_err(format!(
                        "reading compressed cluster at {}",
                        c.host_offset().0
                    )))?;
                decompress_cluster(self.header.compression_type(), &input, buf).map_err(|e| {
                    self.corrupt_err(format!(
                        "compressed cluster at host {} for guest offset {start}: {e}",
                        c.host_offset().0
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Refuses to write guest data over metadata.
    fn check_overlap(&self, host_cluster: u64) -> Result<(), UpdateError> {
        if host_cluster == 0 || self.is_metadata(host_cluster) {
            return Err(self.corrupt_err(format!(
                "guest data would overwrite metadata in host cluster {host_cluster}"
            )));
        }
        Ok(())
    }

    /// Drops the references `old` held, after the write that replaced it (and keeps `kept`).
    fn release_entry(&self, w: &mut WriterState, old: L2Entry, kept: Option<u64>) {
        let cs = self.geometry().cluster_size();
        match old {
            L2Entry::Normal { host_offset, .. }
            | L2Entry::Zero {
                preallocated: Some(host_offset),
                ..
            } => {
                let c = host_offset.0 / cs;
                if Some(c) != kept {
                    w.refcounts.release_later(c);
                }
            }
            L2Entry::Compressed(c) => {
                let (first, last) = c.host_clusters(self.geometry());
                for h in first.0..=last.0 {
                    w.refcounts.release_later(h);
                }
            }
            L2Entry::Unallocated
            | L2Entry::Zero {
                preallocated: None, ..
            } => {}
        }
    }

    /// Points the slot's guest cluster at `new`: in its L2 table when that table is ours, else
    /// in a new (or copied) L2 table linked from L1.
    fn link(
        &self,
        io: &dyn Storage,
        w: &mut WriterState,
        slot: &Slot,
        new: L2Entry,
    ) -> Result<(), UpdateError> {
        let g = *self.geometry();
        let cs = g.cluster_size();
        let raw_new = encode_l2_entry(new, &g, self.header.version())
            .map_err(|e| self.corrupt_err(format!("encoding an L2 entry: {e}")))?;
        let l2_index = usize::try_from(slot.l2_index).unwrap_or(usize::MAX);
        match &slot.table {
            Some((offset, true, table)) => {
                let unit = meta_unit(cs);
                let per_unit = usize::try_from(unit / 8).unwrap_or(1);
                let first = l2_index / per_unit * per_unit;
                let bytes = table_bytes(table, first..first + per_unit, l2_index, raw_new);
                io.write_at(FileId(0), offset.0 + first as u64 * 8, &bytes)
                    .map_err(self.io_err(format!("writing the L2 table at {}", offset.0)))?;
                self.l2.update_entry(offset.0, l2_index, raw_new, table);
                Ok(())
            }
            shared_or_none => {
                let entries = usize::try_from(g.l2_entries()).unwrap_or(0);
                let bytes = match shared_or_none {
                    Some((_, _, table)) => table_bytes(table, 0..entries, l2_index, raw_new),
                    None => {
                        let mut b = vec![0u8; entries * 8];
                        b[l2_index * 8..l2_index * 8 + 8].copy_from_slice(&raw_new.to_be_bytes());
                        b
                    }
                };
                let new_table = w.refcounts.allocate(io)?;
                self.check_overlap(new_table)?;
                io.write_at(FileId(0), new_table * cs, &bytes).map_err(
                    self.io_err(format!("writing a new L2 table at {}", new_table * cs)),
                )?;
                if new_table < w.fresh_from {
                    // A reused cluster holds old bytes: the table must be durable before L1
                    // points at it, or a host crash could expose them as entries.
                    io.sync(FileId(0))
                        .map_err(self.io_err("fdatasync".into()))?;
                }
                self.metadata
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(new_table);
                self.l2.insert(new_table * cs, &bytes);
                self.set_l1(io, slot.l1_index, new_table * cs)?;
                if let Some((old, _, _)) = shared_or_none {
                    // The snapshot keeps the old table; this L1 no longer counts it.
                    w.refcounts.release_later(old.0 / cs);
                }
                Ok(())
            }
        }
    }

    fn set_l1(&self, io: &dyn Storage, index: u64, table: u64) -> Result<(), UpdateError> {
        let g = *self.geometry();
        let raw = encode_l1_entry(
            L1Entry::L2Table {
                offset: HostOffset(table),
                copied: true,
            },
            &g,
        )
        .map_err(|e| self.corrupt_err(format!("encoding an L1 entry: {e}")))?;
        let unit = meta_unit(g.cluster_size());
        let per_unit = (unit / 8) as usize;
        let i = usize::try_from(index).unwrap_or(usize::MAX);
        let first = i / per_unit * per_unit;
        let mut bytes = Vec::with_capacity(per_unit * 8);
        for j in first..first + per_unit {
            let v = if j == i {
                raw
            } else {
                self.l1.get(j).map_or(0, |a| a.load(Ordering::Acquire))
            };
            bytes.extend_from_slice(&v.to_be_bytes());
        }
        // The L1 table may end inside the unit; the rest of its cluster is padding that
        // QEMU keeps zero, as this writes it.
        let at = self.header.l1_table_offset().0 + first as u64 * 8;
        io.write_at(FileId(0), at, &bytes)
            .map_err(self.io_err(format!("writing the L1 table at {at}")))?;
        if let Some(a) = self.l1.get(i) {
            a.store(raw, Ordering::Release);
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        io: &dyn Storage,
        w: &mut WriterState,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), UpdateError> {
        crate::layer::check_range(offset, len, self.virtual_size())?;
        let cs = self.geometry().cluster_size();
        let end = offset + len;
        let mut pos = offset;
        let mut released = false;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            let slot = self.slot(io, pos)?;
            let reads_zero = match slot.entry {
                L2Entry::Zero { .. } => true,
                L2Entry::Unallocated => !self.backing_covers(pos - pos % cs),
                _ => false,
            };
            if reads_zero {
                pos += n;
                continue;
            }
            if n < cs || self.header.version() == Version::V2 {
                // Part of a cluster, or no zero flag (v2): write zeroes as data, as QEMU's
                // block layer does when the format cannot.
                let zeroes = vec![0u8; usize::try_from(n).unwrap_or(0)];
                self.write_cluster(io, w, pos, &zeroes)?;
                pos += n;
                continue;
            }
            let table_copied = slot.table.as_ref().is_some_and(|t| t.1);
            let keep = match slot.entry {
                L2Entry::Normal {
                    host_offset,
                    copied: true,
                } if table_copied && !unmap => Some(host_offset),
                _ => None,
            };
            let new = L2Entry::Zero {
                preallocated: keep,
                copied: keep.is_some(),
            };
            self.link(io, w, &slot, new)?;
            self.release_entry(w, slot.entry, keep.map(|h| h.0 / cs));
            released |= keep.is_none();
            pos += n;
        }
        if released {
            w.refcounts.sync_and_release(io)?;
        }
        Ok(())
    }

    fn discard(
        &self,
        io: &dyn Storage,
        w: &mut WriterState,
        offset: u64,
        len: u64,
    ) -> Result<(), UpdateError> {
        crate::layer::check_range(offset, len, self.virtual_size())?;
        let cs = self.geometry().cluster_size();
        // Only whole clusters: a discard of part of a cluster is a no-op, as in QEMU.
        let first = offset.div_ceil(cs) * cs;
        let end = (offset + len) / cs * cs;
        let mut pos = first;
        let mut released = false;
        while pos < end {
            let slot = self.slot(io, pos)?;
            // v3 over a backing file: the zero flag, so the backing data does not show
            // through; otherwise deallocate (QEMU does the same for v2).
            let new = if self.header.version() == Version::V3 && self.backing_covers(pos) {
                L2Entry::Zero {
                    preallocated: None,
                    copied: false,
                }
            } else {
                L2Entry::Unallocated
            };
            let unchanged = matches!(
                (slot.entry, new),
                (L2Entry::Unallocated, L2Entry::Unallocated)
                    | (
                        L2Entry::Zero {
                            preallocated: None,
                            ..
                        },
                        L2Entry::Zero { .. }
                    )
            );
            if !unchanged {
                self.link(io, w, &slot, new)?;
                self.release_entry(w, slot.entry, None);
                released = true;
            }
            pos += cs;
        }
        if released {
            w.refcounts.sync_and_release(io)?;
        }
        Ok(())
    }
}

/// The big-endian bytes of `table[range]`, with entry `index` replaced by `value`.
fn table_bytes(
    table: &[AtomicU64],
    range: std::ops::Range<usize>,
    index: usize,
    value: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(range.len() * 8);
    for i in range {
        let v = if i == index {
            value
        } else {
            table.get(i).map_or(0, |e| e.load(Ordering::Acquire))
        };
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// Reads guest bytes of `layer` (whose files start at `base` in `io`) with blocking I/O,
/// loading the tables it needs: for copy-on-write from a backing layer.
pub(crate) fn read_layer(
    layer: &dyn Layer,
    io: &dyn Storage,
    base: u32,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), UpdateError> {
    let len = buf.len() as u64;
    let mut pieces = Vec::new();
    let mut rounds = 0;
    loop {
        pieces.clear();
        match layer.map(MapKind::Read, offset, len, &mut pieces) {
            Ok(()) => break,
            Err(MapError::NeedTables(loads)) if rounds < 64 => {
                rounds += 1;
                for load in loads {
                    let mut bytes = vec![0u8; usize::try_from(load.len).unwrap_or(0)];
                    io.read_at(load.file.shifted(base), load.offset, &mut bytes)
                        .map_err(|source| UpdateError::Io {
                            fd: fd_of(layer, load.file),
                            what: format!("reading a backing table at {}", load.offset),
                            source,
                        })?;
                    layer.load_table(load, &bytes)?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut at = 0usize;
    for piece in &pieces {
        let n = usize::try_from(piece.len()).unwrap_or(0);
        let out = &mut buf[at..at + n];
        match *piece {
            Piece::Zero { .. } => out.fill(0),
            Piece::Data { file, offset, .. } => io
                .read_at(file.shifted(base), offset, out)
                .map_err(|source| UpdateError::Io {
                    fd: fd_of(layer, file),
                    what: format!("reading backing data at {offset} for COW"),
                    source,
                })?,
            Piece::Compressed {
                file,
                offset,
                read_len,
                algorithm,
                cluster_size,
                skip,
                ..
            } => {
                let mut input = vec![0u8; usize::try_from(read_len).unwrap_or(0)];
                io.read_at(file.shifted(base), offset, &mut input)
                    .map_err(|source| UpdateError::Io {
                        fd: fd_of(layer, file),
                        what: format!("reading a backing compressed cluster at {offset}"),
                        source,
                    })?;
                let mut cluster = vec![0u8; usize::try_from(cluster_size).unwrap_or(0)];
                let want = usize::try_from(skip).unwrap_or(0) + n;
                decompress_cluster(algorithm, &input, &mut cluster[..want]).map_err(|e| {
                    MapError::Corrupt(format!(
                        "fd {}: compressed cluster at {offset}: {e}",
                        fd_of(layer, file)
                    ))
                })?;
                out.copy_from_slice(&cluster[want - n..want]);
            }
        }
        at += n;
    }
    Ok(())
}

/// The fd of file `file` of `layer`, for error messages.
fn fd_of(layer: &dyn Layer, file: FileId) -> i32 {
    layer
        .files()
        .get(file.0 as usize)
        .map_or(-1, |f| f.raw_fd())
}
