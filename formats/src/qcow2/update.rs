//! qcow2 metadata updates: allocating writes with copy-on-write, write-zeroes and discard.
//!
//! Runs on the disk's metadata thread (see [`crate::Storage`]), which serializes every
//! allocation decision (and so every allocating write to the same guest cluster); writes to
//! allocated clusters never come here and run in parallel on the queues. A batch of writes runs
//! in rounds of distinct guest clusters; each round's writes of one kind go out together, in
//! the order `formats/QCOW2-WRITES.md` gives: zero ranges, data (with the L2 units that may go
//! with it), L2 units and new or copied L2 tables, L1 entries; the release of what is no
//! longer referenced waits for a sync after that. An in-memory entry changes only after its
//! write completed, and points only at data already written (or at a never-written cluster
//! that reads as zero, as the guest cluster did).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

use crate::qcow2::cache::L2Table;
use crate::qcow2::layer::WriterState;
use crate::qcow2::refcount::meta_unit;

use crate::qcow2::{
    decode_l1_entry, decode_l2_entry, encode_l1_entry, encode_l2_entry, ClusterGeometry,
    GuestOffset, HostOffset, L1Entry, L2Entry, Qcow2Layer, Version,
};
use crate::{
    decompress_cluster, AlignedBuf, BatchOp, FileId, Layer, MapError, MapKind, Piece, Storage,
};
use crate::{Update, UpdateError};

/// Bit 1 of incompatible_features: "Corrupt bit".
const CORRUPT_BIT: u64 = 1 << 1;
/// Byte offset of incompatible_features in a version 3 header.
const INCOMPATIBLE_FEATURES_OFFSET: usize = 72;

/// How one guest cluster's part of a write is done.
enum ClusterPlan<'d> {
    /// Allocated and ours alone: write at this host offset (of the cluster).
    InPlace {
        host: u64,
    },
    Alloc(Alloc<'d>),
}

/// A guest cluster getting a new host cluster (or filling its preallocated one).
struct Alloc<'d> {
    job: usize,
    l1_index: u64,
    l2_index: u64,
    table: Option<(HostOffset, bool, L2Table)>,
    old: L2Entry,
    /// The host cluster the data goes to.
    target: u64,
    /// Zero the whole cluster before the data write (the rest of it reads as zero).
    zero_first: bool,
    /// The cluster read as zero before and the new host cluster was never written: its L2
    /// entry may be written together with the data (if the entry lands first, the cluster
    /// still reads as zero, which it did before).
    early: bool,
    data: AllocData<'d>,
    /// Where the chunk starts in its write's data.
    data_offset: usize,
    /// The L2 entry that points at `target`.
    new_raw: u64,
}

/// What an allocation writes into its host cluster.
enum AllocData<'d> {
    /// The whole cluster, composed with copy-on-write data.
    Whole(AlignedBuf),
    /// Only the guest's bytes, `at` bytes into the cluster.
    Chunk { at: u64, bytes: &'d [u8] },
}

/// New entries for one aligned unit of an L2 table that is ours.
struct UnitWrite {
    unit: usize,
    table: HostOffset,
    /// Written together with the data (every new entry in it is early).
    early: bool,
    /// The unit's bytes, with `entries` applied.
    bytes: Vec<u8>,
    held: L2Table,
    entries: Vec<(usize, u64)>,
    /// Indexes into the round's allocations.
    allocs: Vec<usize>,
}

impl UnitWrite {
    /// Where the unit starts in the image file.
    fn offset(&self, per_unit: usize) -> u64 {
        self.table.0 + (self.unit * per_unit) as u64 * 8
    }
}

/// A new L2 table (empty, or a copy of one shared with a snapshot) for one L1 entry.
struct NewTable {
    l1_index: u64,
    cluster: u64,
    bytes: Vec<u8>,
    /// The shared table it replaces.
    old: Option<HostOffset>,
    allocs: Vec<usize>,
    written: bool,
}

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

    /// Entry point from [`Layer::update_batch`]: consecutive writes run as one batch (see
    /// [`Qcow2Layer::write_batch`]), anything else one by one, in order.
    pub(super) fn run_updates(
        &self,
        io: &dyn Storage,
        updates: &[Update<'_>],
    ) -> Vec<Result<(), UpdateError>> {
        if self.read_only() {
            return updates.iter().map(|_| Err(UpdateError::ReadOnly)).collect();
        }
        let mut w = match self.lock_writer() {
            Ok(w) => w,
            Err(_) => return updates.iter().map(|_| Err(UpdateError::ReadOnly)).collect(),
        };
        let mut results = Vec::with_capacity(updates.len());
        let mut i = 0;
        while i < updates.len() {
            if self.corrupt.load(Ordering::Relaxed) {
                results.push(Err(UpdateError::ReadOnly));
                i += 1;
                continue;
            }
            let writes: Vec<(u64, &[u8])> = updates[i..]
                .iter()
                .map_while(|u| match *u {
                    Update::Write { offset, data } => Some((offset, data)),
                    _ => None,
                })
                .collect();
            let done = if writes.is_empty() {
                vec![match updates[i] {
                    Update::Write { offset, data } => self.write(io, &mut w, offset, data),
                    Update::WriteZeroes { offset, len, unmap } => {
                        self.write_zeroes(io, &mut w, offset, len, unmap)
                    }
                    Update::Discard { offset, len } => self.discard(io, &mut w, offset, len),
                    Update::Flush => self.sync_metadata(io, &mut w),
                }]
            } else {
                self.write_batch(io, &mut w, &writes)
            };
            i += done.len();
            for result in &done {
                if let Err(UpdateError::Corrupt { detail, .. }) = result {
                    self.mark_corrupt(io, detail);
                }
            }
            results.extend(done);
        }
        let new_metadata = std::mem::take(&mut w.refcounts.new_metadata);
        if !new_metadata.is_empty() {
            self.metadata
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .extend(new_metadata);
        }
        results
    }

    /// FLUSH: fdatasyncs (every completed request's data and metadata is already on the
    /// file), then releases the clusters whose last reference the synced writes dropped.
    fn sync_metadata(&self, io: &dyn Storage, w: &mut WriterState) -> Result<(), UpdateError> {
        io.sync(FileId(0))
            .map_err(self.io_err("fdatasync".into()))?;
        w.refcounts.synced();
        w.refcounts.release_pending(io)
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
        self.sync_metadata(io, &mut w)?;
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
        self.write_batch(io, w, &[(offset, data)])
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Writes every `(offset, data)`: in rounds whose writes touch distinct guest clusters
    /// (a write that shares a cluster with an earlier one waits for the next round, and then
    /// finds that cluster allocated). One result per write, in order.
    fn write_batch(
        &self,
        io: &dyn Storage,
        w: &mut WriterState,
        writes: &[(u64, &[u8])],
    ) -> Vec<Result<(), UpdateError>> {
        let cs = self.geometry().cluster_size();
        let size = self.virtual_size();
        let mut results: Vec<Result<(), UpdateError>> = writes
            .iter()
            .map(|&(offset, data)| {
                crate::layer::check_range(offset, data.len() as u64, size).map_err(Into::into)
            })
            .collect();
        let mut remaining: Vec<usize> = (0..writes.len())
            .filter(|&i| results[i].is_ok() && !writes[i].1.is_empty())
            .collect();
        while !remaining.is_empty() {
            let mut claimed = HashSet::new();
            let mut round = Vec::new();
            let mut later = Vec::new();
            for i in remaining {
                let (offset, data) = writes[i];
                let clusters = offset / cs..=(offset + data.len() as u64 - 1) / cs;
                // A write that waits also holds its clusters: a later write over them must not
                // overtake it.
                if clusters.clone().any(|c| claimed.contains(&c)) {
                    later.push(i);
                } else {
                    round.push(i);
                }
                claimed.extend(clusters);
            }
            self.write_round(io, w, writes, &round, &mut results);
            remaining = later;
        }
        results
    }

    /// Runs one round: plans every cluster (allocating, composing copy-on-write data), then
    /// in parallel batches: zero ranges, data, L2 entries and new L2 tables, L1 entries; the
    /// in-memory tables change last, for what was written.
    fn write_round(
        &self,
        io: &dyn Storage,
        w: &mut WriterState,
        writes: &[(u64, &[u8])],
        round: &[usize],
        results: &mut [Result<(), UpdateError>],
    ) {
        let g = *self.geometry();
        let cs = g.cluster_size();
        let mut in_place: Vec<(usize, u64, &[u8])> = Vec::new();
        let mut allocs: Vec<Alloc<'_>> = Vec::new();
        for &job in round {
            let (offset, data) = writes[job];
            let mut done = 0usize;
            while done < data.len() {
                let pos = offset + done as u64;
                let in_cluster = pos % cs;
                let n = usize::try_from((cs - in_cluster).min((data.len() - done) as u64))
                    .unwrap_or(usize::MAX);
                match self.plan_cluster(io, w, job, pos, &data[done..done + n], done) {
                    Ok(ClusterPlan::InPlace { host }) => {
                        in_place.push((job, host + in_cluster, &data[done..done + n]))
                    }
                    Ok(ClusterPlan::Alloc(a)) => allocs.push(a),
                    Err(e) => {
                        results[job] = Err(e);
                        break;
                    }
                }
                done += n;
            }
        }
        let ok = |results: &[Result<(), UpdateError>], job: usize| results[job].is_ok();

        // Zero ranges: clusters written in part whose old contents read as zero.
        let mut ops = Vec::new();
        let mut owners = Vec::new();
        for a in allocs.iter().filter(|a| a.zero_first && ok(results, a.job)) {
            ops.push(BatchOp::ZeroRange {
                file: FileId(0),
                offset: a.target * cs,
                len: cs,
            });
            owners.push(vec![a.job]);
        }
        self.run_and_fail(io, &ops, &owners, results, "zeroing a new cluster");

        // L2 entries in tables that are ours, grouped by aligned unit. A unit whose every new
        // entry is early is written together with the data; the others after it.
        let unit = meta_unit(cs);
        let per_unit = usize::try_from(unit / 8).unwrap_or(1);
        let mut unit_writes: Vec<UnitWrite> = Vec::new();
        {
            let mut by_unit: BTreeMap<(u64, usize), Vec<usize>> = BTreeMap::new();
            for (i, a) in allocs.iter().enumerate() {
                if let (Some((offset, true, _)), true) = (&a.table, ok(results, a.job)) {
                    let l2 = usize::try_from(a.l2_index).unwrap_or(usize::MAX);
                    by_unit
                        .entry((offset.0, l2 / per_unit))
                        .or_default()
                        .push(i);
                }
            }
            for ((table, unit_no), members) in by_unit {
                let Some((_, _, held)) = &allocs[members[0]].table else {
                    continue;
                };
                unit_writes.push(UnitWrite {
                    unit: unit_no,
                    table: HostOffset(table),
                    held: Arc::clone(held),
                    entries: Vec::new(),
                    early: members.iter().all(|&i| allocs[i].early),
                    allocs: members,
                    bytes: Vec::new(),
                });
            }
        }
        let any_early = unit_writes.iter().any(|u| u.early);
        if any_early {
            // The early entries point at clusters from a reserved batch: refcounts first.
            if let Err(e) = w.refcounts.make_durable(io) {
                let detail = e.to_string();
                for u in unit_writes.iter().filter(|u| u.early) {
                    for &i in &u.allocs {
                        self.fail(results, allocs[i].job, &detail);
                    }
                }
            }
        }
        for u in unit_writes.iter_mut().filter(|u| u.early) {
            u.entries = new_entries(&allocs, &u.allocs, results);
            let first = u.unit * per_unit;
            u.bytes = table_bytes_with(&u.held, first..first + per_unit, &u.entries);
        }

        // Data, in place and into the new clusters (and the early L2 units).
        let mut ops = Vec::new();
        let mut owners = Vec::new();
        for &(job, host, bytes) in in_place.iter().filter(|(job, ..)| ok(results, *job)) {
            ops.push(BatchOp::Write {
                file: FileId(0),
                offset: host,
                data: bytes,
            });
            owners.push(vec![job]);
        }
        // Whole clusters of one write that landed in consecutive host clusters go out as one
        // write (the allocator hands out clusters in order), as a guest's large sequential
        // write would on a raw disk.
        // Whole clusters in consecutive host clusters (the allocator hands them out in order)
        // go out as one vectored write, within a write and across writes: a sequential guest
        // stream becomes one large write, as on a raw disk, instead of one per cluster (each
        // of which a file system may serialize on the inode when it allocates).
        enum DataWrite {
            /// Host offset and (job, from, to) ranges of the jobs' data, in order.
            Run(u64, Vec<(usize, usize, usize)>),
            One(usize),
        }
        const MAX_RUN_BYTES: usize = 8 << 20;
        let mut plan: Vec<DataWrite> = Vec::new();
        for (i, a) in allocs
            .iter()
            .enumerate()
            .filter(|(_, a)| ok(results, a.job))
        {
            match &a.data {
                AllocData::Chunk { at: 0, bytes } if bytes.len() as u64 == cs => {
                    let from = a.data_offset;
                    let to = from + bytes.len();
                    let host = a.target * cs;
                    if let Some(DataWrite::Run(start, parts)) = plan.last_mut() {
                        let len: usize = parts.iter().map(|&(_, f, t)| t - f).sum();
                        if *start + len as u64 == host && len + bytes.len() <= MAX_RUN_BYTES {
                            match parts.last_mut() {
                                Some((job, _, t)) if *job == a.job && *t == from => *t = to,
                                _ => parts.push((a.job, from, to)),
                            }
                            continue;
                        }
                    }
                    plan.push(DataWrite::Run(host, vec![(a.job, from, to)]));
                }
                _ => plan.push(DataWrite::One(i)),
            }
        }
        let run_parts: Vec<Vec<&[u8]>> = plan
            .iter()
            .map(|p| match p {
                DataWrite::Run(_, parts) => parts
                    .iter()
                    .map(|&(job, from, to)| &writes[job].1[from..to])
                    .collect(),
                DataWrite::One(_) => Vec::new(),
            })
            .collect();
        for (p, bufs) in plan.iter().zip(&run_parts) {
            match p {
                DataWrite::Run(host, parts) => {
                    ops.push(match bufs.as_slice() {
                        [one] => BatchOp::Write {
                            file: FileId(0),
                            offset: *host,
                            data: one,
                        },
                        many => BatchOp::WriteParts {
                            file: FileId(0),
                            offset: *host,
                            parts: many,
                        },
                    });
                    owners.push(parts.iter().map(|&(job, _, _)| job).collect());
                }
                DataWrite::One(i) => {
                    let a = &allocs[*i];
                    let (at, bytes) = match &a.data {
                        AllocData::Whole(buf) => (0, buf.as_slice()),
                        AllocData::Chunk { at, bytes } => (*at, *bytes),
                    };
                    ops.push(BatchOp::Write {
                        file: FileId(0),
                        offset: a.target * cs + at,
                        data: bytes,
                    });
                    owners.push(vec![a.job]);
                }
            }
        }
        let data_ops = ops.len();
        let early_units: Vec<usize> = (0..unit_writes.len())
            .filter(|&k| unit_writes[k].early && !unit_writes[k].entries.is_empty())
            .collect();
        for &k in &early_units {
            let u = &unit_writes[k];
            ops.push(BatchOp::Write {
                file: FileId(0),
                offset: u.offset(per_unit),
                data: &u.bytes,
            });
        }
        let batch_results = if round.len() == 1 {
            io.run_batch_one_request(&ops)
        } else {
            io.run_batch(&ops)
        };
        let (data_results, early_results) =
            batch_results.split_at(data_ops.min(batch_results.len()));
        for (r, jobs) in data_results.iter().zip(&owners) {
            if let Err(e) = r {
                let detail = format!("writing guest data: {e}");
                for &job in jobs {
                    self.fail(results, job, &detail);
                }
            }
        }
        // An early unit's entries are on the file even if a data write failed (such a cluster
        // reads as zero, as before): memory follows the file either way.
        let mut unit_ok: Vec<Option<bool>> = vec![None; unit_writes.len()];
        for (&k, r) in early_units.iter().zip(early_results) {
            unit_ok[k] = Some(r.is_ok());
            if let Err(e) = r {
                let detail = format!("writing the L2 table at {}: {e}", unit_writes[k].table.0);
                for &i in &unit_writes[k].allocs {
                    self.fail(results, allocs[i].job, &detail);
                }
            }
        }

        // The other units, with the entries of the writes whose data is on the file.
        let mut late_units: Vec<usize> = Vec::new();
        for (k, u) in unit_writes.iter_mut().enumerate() {
            if u.early {
                continue;
            }
            u.entries = new_entries(&allocs, &u.allocs, results);
            if u.entries.is_empty() {
                continue;
            }
            let first = u.unit * per_unit;
            u.bytes = table_bytes_with(&u.held, first..first + per_unit, &u.entries);
            late_units.push(k);
        }

        // New or copied L2 tables, whole, for L1 entries without a table of ours.
        let mut by_l1: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, a) in allocs.iter().enumerate() {
            if ok(results, a.job) && !matches!(a.table, Some((_, true, _))) {
                by_l1.entry(a.l1_index).or_default().push(i);
            }
        }
        let mut new_tables: Vec<NewTable> = Vec::new();
        for (l1_index, members) in &by_l1 {
            let table = allocs[members[0]].table.clone();
            let entries: Vec<(usize, u64)> = members
                .iter()
                .map(|&i| {
                    (
                        usize::try_from(allocs[i].l2_index).unwrap_or(usize::MAX),
                        allocs[i].new_raw,
                    )
                })
                .collect();
            // Not ours: none yet, or shared with a snapshot (copied).
            let shared_or_none = table;
            let bytes = new_table_bytes(&g, shared_or_none.as_ref().map(|(_, _, t)| t), &entries);
            let placed = w
                .refcounts
                .allocate(io)
                .and_then(|c| self.check_overlap(c).map(|()| c));
            match placed {
                Ok(cluster) => new_tables.push(NewTable {
                    l1_index: *l1_index,
                    cluster,
                    bytes,
                    old: shared_or_none.map(|(o, _, _)| o),
                    allocs: members.clone(),
                    written: false,
                }),
                Err(e) => {
                    let detail = e.to_string();
                    for &i in members {
                        self.fail(results, allocs[i].job, &detail);
                    }
                }
            }
        }
        // Late units and new tables, after the data: their entries point at written clusters
        // whose refcounts must be durable first.
        if !late_units.is_empty() || !new_tables.is_empty() {
            if let Err(e) = w.refcounts.make_durable(io) {
                let detail = e.to_string();
                for &k in &late_units {
                    for &i in &unit_writes[k].allocs {
                        self.fail(results, allocs[i].job, &detail);
                    }
                }
                for t in &new_tables {
                    for &i in &t.allocs {
                        self.fail(results, allocs[i].job, &detail);
                    }
                }
                late_units.clear();
                new_tables.clear();
            }
        }
        let mut ops: Vec<BatchOp<'_>> = Vec::new();
        for &k in &late_units {
            let u = &unit_writes[k];
            ops.push(BatchOp::Write {
                file: FileId(0),
                offset: u.offset(per_unit),
                data: &u.bytes,
            });
        }
        for t in &new_tables {
            ops.push(BatchOp::Write {
                file: FileId(0),
                offset: t.cluster * cs,
                data: &t.bytes,
            });
        }
        let l2_results = io.run_batch(&ops);
        let (late_results, table_results) =
            l2_results.split_at(late_units.len().min(l2_results.len()));
        for (&k, r) in late_units.iter().zip(late_results) {
            unit_ok[k] = Some(r.is_ok());
            if let Err(e) = r {
                let detail = format!("writing the L2 table at {}: {e}", unit_writes[k].table.0);
                for &i in &unit_writes[k].allocs {
                    self.fail(results, allocs[i].job, &detail);
                }
            }
        }
        // Memory follows every unit that reached the file; what those entries replaced is
        // released after the next sync.
        for (u, written) in unit_writes.iter().zip(&unit_ok) {
            if *written != Some(true) {
                continue;
            }
            for &(l2, raw) in &u.entries {
                self.l2.update_entry(u.table.0, l2, raw, &u.held);
            }
            for &i in &u.allocs {
                let a = &allocs[i];
                let l2 = usize::try_from(a.l2_index).unwrap_or(usize::MAX);
                if u.entries.iter().any(|&(e, _)| e == l2) {
                    self.release_entry(w, a.old, Some(a.target));
                }
            }
        }
        for (t, r) in new_tables.iter_mut().zip(table_results) {
            match r {
                Ok(()) => t.written = true,
                Err(e) => {
                    let detail = format!("writing a new L2 table at {}: {e}", t.cluster * cs);
                    for &i in &t.allocs {
                        self.fail(results, allocs[i].job, &detail);
                    }
                }
            }
        }
        if new_tables.iter().any(|t| t.written) {
            // Before L1 makes the tables reachable: the refcounts of everything they point at
            // must be durable, and a table in a reused cluster too (old bytes there must never
            // be read as entries after a host crash).
            let reused = new_tables
                .iter()
                .any(|t| t.written && t.cluster < w.fresh_from);
            let synced = if reused {
                io.sync(FileId(0)).map(|()| w.refcounts.synced())
            } else {
                w.refcounts
                    .make_durable(io)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            };
            if let Err(e) = synced {
                let detail = format!("fdatasync: {e}");
                for t in new_tables.iter_mut().filter(|t| t.written) {
                    t.written = false;
                    for &i in &t.allocs {
                        self.fail(results, allocs[i].job, &detail);
                    }
                }
            }
        }

        // L1 entries for the new tables, grouped by unit.
        let mut l1_units: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (k, t) in new_tables.iter().enumerate().filter(|(_, t)| t.written) {
            let i = usize::try_from(t.l1_index).unwrap_or(usize::MAX);
            l1_units.entry(i / per_unit).or_default().push(k);
        }
        let mut ops_bytes = Vec::new();
        let mut groups = Vec::new();
        for (unit_no, ks) in &l1_units {
            let first = unit_no * per_unit;
            let overrides: Vec<(usize, u64)> = ks
                .iter()
                .filter_map(|&k| {
                    let t = &new_tables[k];
                    Some((
                        usize::try_from(t.l1_index).ok()?,
                        self.l1_entry_for(t.cluster * cs)?,
                    ))
                })
                .collect();
            let bytes = table_bytes_with(&self.l1, first..first + per_unit, &overrides);
            ops_bytes.push((self.header.l1_table_offset().0 + first as u64 * 8, bytes));
            groups.push(ks.clone());
        }
        let ops: Vec<BatchOp<'_>> = ops_bytes
            .iter()
            .map(|(offset, bytes)| BatchOp::Write {
                file: FileId(0),
                offset: *offset,
                data: bytes,
            })
            .collect();
        let l1_results = io.run_batch(&ops);
        for (ks, r) in groups.iter().zip(l1_results) {
            for &k in ks {
                let t = &new_tables[k];
                match &r {
                    Ok(()) => {
                        self.metadata
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(t.cluster);
                        self.l2.insert(t.cluster * cs, &t.bytes);
                        if let (Some(a), Some(raw)) = (
                            usize::try_from(t.l1_index)
                                .ok()
                                .and_then(|i| self.l1.get(i)),
                            self.l1_entry_for(t.cluster * cs),
                        ) {
                            a.store(raw, Ordering::Release);
                        }
                        if let Some(old) = t.old {
                            // The snapshot keeps the old table; this L1 no longer counts it.
                            w.refcounts.release_later(old.0 / cs);
                        }
                        for &i in &t.allocs {
                            self.release_entry(w, allocs[i].old, Some(allocs[i].target));
                        }
                    }
                    Err(e) => {
                        let detail = format!("writing the L1 table: {e}");
                        for &i in &t.allocs {
                            self.fail(results, allocs[i].job, &detail);
                        }
                    }
                }
            }
        }
    }

    /// The raw L1 entry pointing at an L2 table at `offset` (ours alone).
    fn l1_entry_for(&self, offset: u64) -> Option<u64> {
        encode_l1_entry(
            L1Entry::L2Table {
                offset: HostOffset(offset),
                copied: true,
            },
            self.geometry(),
        )
        .ok()
    }

    /// Fails `job` with an I/O error (keeping the first error).
    fn fail(&self, results: &mut [Result<(), UpdateError>], job: usize, detail: &str) {
        if let Some(r @ Ok(())) = results.get_mut(job) {
            *r = Err(UpdateError::Io {
                fd: self.fd(),
                what: detail.to_string(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
    }

    /// Runs a batch and fails the owners of every operation that failed.
    fn run_and_fail(
        &self,
        io: &dyn Storage,
        ops: &[BatchOp<'_>],
        owners: &[Vec<usize>],
        results: &mut [Result<(), UpdateError>],
        what: &str,
    ) {
        if ops.is_empty() {
            return;
        }
        for (r, jobs) in io.run_batch(ops).into_iter().zip(owners) {
            if let Err(e) = r {
                let detail = format!("{what}: {e}");
                for &job in jobs {
                    self.fail(results, job, &detail);
                }
            }
        }
    }

    /// Decides how one guest cluster's part of a write is done; allocates and composes the
    /// copy-on-write data when the cluster cannot be written in place.
    fn plan_cluster<'d>(
        &self,
        io: &dyn Storage,
        w: &mut WriterState,
        job: usize,
        pos: u64,
        chunk: &'d [u8],
        data_offset: usize,
    ) -> Result<ClusterPlan<'d>, UpdateError> {
        let g = *self.geometry();
        let cs = g.cluster_size();
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
                return Ok(ClusterPlan::InPlace {
                    host: host_offset.0,
                });
            }
        }
        // A preallocated zero cluster that is ours is filled in place.
        let (target, never_written) = match slot.entry {
            L2Entry::Zero {
                preallocated: Some(h),
                copied: true,
            } if table_copied => (h.0 / cs, false),
            _ => {
                let c = w.refcounts.allocate(io)?;
                (c, c >= w.fresh_from)
            }
        };
        self.check_overlap(target)?;
        let reads_zero = match slot.entry {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => !self.backing_covers(pos - in_cluster),
            L2Entry::Normal { .. } | L2Entry::Compressed(_) => false,
        };
        let (data, zero_first) = if chunk.len() as u64 == cs {
            (
                AllocData::Chunk {
                    at: 0,
                    bytes: chunk,
                },
                false,
            )
        } else if reads_zero {
            // Write only the guest's bytes. The rest of the cluster must read as zero: a new
            // cluster past the end of the file at open was never written (the allocator hands
            // each out once per session), so it is a hole or past the end already; any other
            // (reused free space, a preallocated zero cluster) is zeroed first, cheaply
            // (fallocate).
            (
                AllocData::Chunk {
                    at: in_cluster,
                    bytes: chunk,
                },
                !never_written,
            )
        } else {
            let mut buf = AlignedBuf::new(usize::try_from(cs).unwrap_or(0)).ok_or_else(|| {
                self.io_err("cluster buffer".into())(std::io::Error::from_raw_os_error(
                    libc::ENOMEM,
                ))
            })?;
            self.fill_cow(io, pos - in_cluster, slot.entry, buf.as_mut_slice())?;
            let start = usize::try_from(in_cluster).unwrap_or(0);
            buf.as_mut_slice()[start..start + chunk.len()].copy_from_slice(chunk);
            (AllocData::Whole(buf), false)
        };
        let new_raw = encode_l2_entry(
            L2Entry::Normal {
                host_offset: HostOffset(target * cs),
                copied: true,
            },
            &g,
            self.header.version(),
        )
        .map_err(|e| self.corrupt_err(format!("encoding an L2 entry: {e}")))?;
        Ok(ClusterPlan::Alloc(Alloc {
            job,
            l1_index: slot.l1_index,
            l2_index: slot.l2_index,
            table: slot.table,
            old: slot.entry,
            target,
            zero_first,
            early: reads_zero && never_written,
            data,
            data_offset,
            new_raw,
        }))
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
                let bytes =
                    table_bytes_with(table, first..first + per_unit, &[(l2_index, raw_new)]);
                io.write_at(FileId(0), offset.0 + first as u64 * 8, &bytes)
                    .map_err(self.io_err(format!("writing the L2 table at {}", offset.0)))?;
                self.l2.update_entry(offset.0, l2_index, raw_new, table);
                Ok(())
            }
            shared_or_none => {
                let bytes = new_table_bytes(
                    &g,
                    shared_or_none.as_ref().map(|(_, _, t)| t),
                    &[(l2_index, raw_new)],
                );
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
                    w.refcounts.synced();
                } else {
                    // The table's own refcount, before L1 makes it reachable.
                    w.refcounts.make_durable(io)?;
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
        let raw = self
            .l1_entry_for(table)
            .ok_or_else(|| self.corrupt_err(format!("cannot encode an L1 entry for {table}")))?;
        let per_unit = usize::try_from(meta_unit(g.cluster_size()) / 8).unwrap_or(1);
        let i = usize::try_from(index).unwrap_or(usize::MAX);
        let first = i / per_unit * per_unit;
        let bytes = table_bytes_with(&self.l1, first..first + per_unit, &[(i, raw)]);
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
                self.write(io, w, pos, &zeroes)?;
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
            self.sync_metadata(io, w)?;
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
            self.sync_metadata(io, w)?;
        }
        Ok(())
    }
}

/// The big-endian bytes of `table[range]`, with the `(index, value)` overrides.
fn table_bytes_with(
    table: &[AtomicU64],
    range: std::ops::Range<usize>,
    overrides: &[(usize, u64)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(range.len() * 8);
    for i in range {
        let v = overrides
            .iter()
            .find(|(j, _)| *j == i)
            .map(|&(_, v)| v)
            .unwrap_or_else(|| table.get(i).map_or(0, |e| e.load(Ordering::Acquire)));
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// The `(L2 index, entry)` pairs of the allocations `members` whose write has not failed.
fn new_entries(
    allocs: &[Alloc<'_>],
    members: &[usize],
    results: &[Result<(), UpdateError>],
) -> Vec<(usize, u64)> {
    members
        .iter()
        .filter(|&&i| results[allocs[i].job].is_ok())
        .map(|&i| {
            (
                usize::try_from(allocs[i].l2_index).unwrap_or(usize::MAX),
                allocs[i].new_raw,
            )
        })
        .collect()
}

/// A whole new L2 table: a copy of `shared` (a table shared with a snapshot), or empty, with
/// the `(index, value)` entries set.
fn new_table_bytes(
    g: &ClusterGeometry,
    shared: Option<&L2Table>,
    entries: &[(usize, u64)],
) -> Vec<u8> {
    let n = usize::try_from(g.l2_entries()).unwrap_or(0);
    match shared {
        Some(t) => table_bytes_with(t, 0..n, entries),
        None => table_bytes_with(&[], 0..n, entries),
    }
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
