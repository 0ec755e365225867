//! Refcounts of a writable qcow2 image: lookups, write-through updates and the allocator.
//!
//! Owns: the refcount table (loaded whole: at most 8 MiB), a small cache of refcount blocks,
//! and cluster allocation. Every refcount change is written to the image before the call
//! returns; no refcount is kept dirty in memory.
//!
//! Ordering, so that any crash leaves an image `qemu-img check` calls consistent (leaks
//! allowed):
//! - Allocation hands out clusters whose refcount is already 1 in the file: the allocator
//!   reserves a batch and writes the refcounts; they are fdatasynced ([`Refcounts::make_durable`])
//!   before the first L2 or L1 write that can make one of them reachable. A crash leaks what was
//!   reserved and unused.
//! - A new refcount block describes itself and is written (and synced) before the table entry
//!   that points to it; a grown refcount table is written and synced before the header points
//!   to it, and the old table is freed after.
//! - A dropped reference is released ([`Refcounts::release_later`]) only when the layer calls
//!   [`Refcounts::release_pending`], after it wrote back and fdatasynced the tables that
//!   stopped pointing at the cluster.
//!
//! The allocator's cursor only moves forward within a session: a cluster freed in this session
//! is never handed out again before a restart, so a guest write still in flight to it can only
//! land in a cluster nothing uses. Freed clusters are punched out of the file, so the host
//! gets the space back at once.

use std::collections::{HashMap, VecDeque};

use crate::qcow2::limits::{MAX_HOST_OFFSET, MAX_REFCOUNT_TABLE_BYTES};
use crate::qcow2::{
    decode_refcount_table_entry, encode_refcount_table_entry, refcount_get, refcount_set,
    refcount_update, ClusterGeometry, HostCluster, HostOffset, RefcountGeometry,
    RefcountTableEntry,
};
use crate::{FileId, Storage, UpdateError};

/// Byte offset of refcount_table_offset in the header (followed by refcount_table_clusters).
const REFCOUNT_TABLE_FIELDS_OFFSET: usize = 48;

/// Bytes of refcount blocks kept in memory (clean: every update writes through).
const BLOCK_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Bytes of clusters reserved per batch (one fdatasync each): large enough that allocation
/// costs a sync per several MiB written, small enough that a crash leaks little.
const RESERVE_BATCH_BYTES: u64 = 8 * 1024 * 1024;

/// Metadata is written in aligned units of this many bytes (or one cluster, if smaller), so
/// O_DIRECT fds work on devices with 4 KiB logical blocks.
pub(crate) fn meta_unit(cluster_size: u64) -> u64 {
    cluster_size.min(4096)
}

/// The refcount state of one writable image.
#[derive(Debug)]
pub(crate) struct Refcounts {
    fd: i32,
    cluster: ClusterGeometry,
    geometry: RefcountGeometry,
    table_offset: HostOffset,
    table_clusters: u32,
    /// Raw (host order) refcount table entries, as many as the table's clusters hold.
    table: Vec<u64>,
    /// Refcount blocks read, by table index.
    blocks: HashMap<u64, Vec<u8>>,
    /// Next host cluster the allocator looks at.
    cursor: u64,
    /// Clusters whose refcount 1 is durable and that nothing references yet.
    reserved: VecDeque<u64>,
    /// Clusters to release after the next fdatasync.
    pending_release: Vec<u64>,
    /// Largest host cluster count the image may grow to.
    limit: u64,
    /// Clusters that became refcount metadata since the layer last took this list.
    pub(crate) new_metadata: Vec<u64>,
    /// Refcounts of a reserved batch were written but not yet fdatasynced.
    unsynced: bool,
}

impl Refcounts {
    /// Reads the refcount table of an image whose header says where it is.
    pub(crate) fn load(
        io: &dyn Storage,
        fd: i32,
        cluster: ClusterGeometry,
        geometry: RefcountGeometry,
        table_offset: HostOffset,
        table_clusters: u32,
        limit_bytes: u64,
    ) -> Result<Refcounts, UpdateError> {
        let bytes = u64::from(table_clusters) * cluster.cluster_size();
        let mut raw = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
        io.read_at(FileId(0), table_offset.0, &mut raw)
            .map_err(|source| UpdateError::Io {
                fd,
                what: format!("reading the refcount table at {}", table_offset.0),
                source,
            })?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let limit = limit_bytes.min(MAX_HOST_OFFSET) / cluster.cluster_size();
        Ok(Refcounts {
            fd,
            cluster,
            geometry,
            table_offset,
            table_clusters,
            table,
            blocks: HashMap::new(),
            cursor: 0,
            reserved: VecDeque::new(),
            pending_release: Vec::new(),
            limit,
            new_metadata: Vec::new(),
            unsynced: false,
        })
    }

    fn io_err(&self, what: String) -> impl FnOnce(std::io::Error) -> UpdateError {
        let fd = self.fd;
        move |source| UpdateError::Io { fd, what, source }
    }

    fn corrupt(&self, detail: String) -> UpdateError {
        UpdateError::Corrupt {
            fd: self.fd,
            detail,
        }
    }

    fn cluster_size(&self) -> u64 {
        self.cluster.cluster_size()
    }

    /// The refcount table's first cluster and its length in clusters.
    pub(crate) fn table_clusters(&self) -> (u64, u64) {
        (
            self.table_offset.0 / self.cluster_size(),
            u64::from(self.table_clusters),
        )
    }

    /// Every allocated refcount block: (table index, host cluster).
    pub(crate) fn block_clusters(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (i, &raw) in self.table.iter().enumerate() {
            if let Ok(RefcountTableEntry::Block { offset }) =
                decode_refcount_table_entry(raw, i as u64, &self.cluster)
            {
                out.push((i as u64, offset.0 / self.cluster_size()));
            }
        }
        out
    }

    /// The block at table index `idx`: `None` when it is not allocated (all refcounts 0).
    fn block_offset(&self, idx: u64) -> Result<Option<HostOffset>, UpdateError> {
        let Some(&raw) = usize::try_from(idx).ok().and_then(|i| self.table.get(i)) else {
            return Ok(None);
        };
        match decode_refcount_table_entry(raw, idx, &self.cluster) {
            Ok(RefcountTableEntry::Unallocated) => Ok(None),
            Ok(RefcountTableEntry::Block { offset }) => Ok(Some(offset)),
            Err(e) => Err(self.corrupt(e.to_string())),
        }
    }

    /// Loads block `idx` into the cache; false when it is not allocated.
    fn load_block(&mut self, io: &dyn Storage, idx: u64) -> Result<bool, UpdateError> {
        if self.blocks.contains_key(&idx) {
            return Ok(true);
        }
        let Some(offset) = self.block_offset(idx)? else {
            return Ok(false);
        };
        let cap = usize::try_from((BLOCK_CACHE_BYTES / self.cluster_size()).max(4)).unwrap_or(4);
        if self.blocks.len() >= cap {
            // Clean blocks: dropping any one costs only a re-read.
            if let Some(&victim) = self.blocks.keys().next() {
                self.blocks.remove(&victim);
            }
        }
        let mut block = vec![0u8; usize::try_from(self.cluster_size()).unwrap_or(0)];
        io.read_at(FileId(0), offset.0, &mut block)
            .map_err(self.io_err(format!("reading refcount block {idx} at {}", offset.0)))?;
        self.blocks.insert(idx, block);
        Ok(true)
    }

    /// Writes the aligned unit of block `idx` that holds entry `index`.
    fn write_block_unit(&self, io: &dyn Storage, idx: u64, index: u64) -> Result<(), UpdateError> {
        let Some(offset) = self.block_offset(idx)? else {
            return Err(self.corrupt(format!("refcount block {idx} vanished")));
        };
        let unit = meta_unit(self.cluster_size());
        let byte = index * u64::from(self.geometry.refcount_bits()) / 8;
        let start = byte / unit * unit;
        let Some(block) = self.blocks.get(&idx) else {
            return Err(self.corrupt(format!("refcount block {idx} not cached")));
        };
        let range = usize::try_from(start).unwrap_or(0)..usize::try_from(start + unit).unwrap_or(0);
        io.write_at(FileId(0), offset.0 + start, &block[range])
            .map_err(self.io_err(format!("writing refcount block {idx} at {}", offset.0)))
    }

    /// Adds `delta` to the refcount of `cluster` and writes it through. Returns the new value.
    pub(crate) fn add(
        &mut self,
        io: &dyn Storage,
        cluster: u64,
        delta: i64,
    ) -> Result<u64, UpdateError> {
        let loc = self.geometry.locate(HostCluster(cluster));
        if !self.load_block(io, loc.table_index)? {
            return Err(self.corrupt(format!(
                "cluster {cluster} is in use but has no refcount block"
            )));
        }
        let geometry = self.geometry;
        let fd = self.fd;
        let Some(block) = self.blocks.get_mut(&loc.table_index) else {
            return Err(self.corrupt(format!("refcount block {} not cached", loc.table_index)));
        };
        let new = refcount_update(block, loc.block_index, delta, &geometry).map_err(|e| {
            UpdateError::Corrupt {
                fd,
                detail: format!("host cluster {cluster}: {e}"),
            }
        })?;
        self.write_block_unit(io, loc.table_index, loc.block_index)?;
        Ok(new)
    }

    /// A cluster whose refcount is 1 on disk, durably, for the caller to use.
    pub(crate) fn allocate(&mut self, io: &dyn Storage) -> Result<u64, UpdateError> {
        if self.reserved.is_empty() {
            self.refill(io)?;
        }
        self.reserved
            .pop_front()
            .ok_or_else(|| self.corrupt("allocator reserved nothing".into()))
    }

    /// Remembers that the last reference to `cluster` was dropped by a write not yet synced.
    pub(crate) fn release_later(&mut self, cluster: u64) {
        self.pending_release.push(cluster);
    }

    /// Releases what waited for a sync (freed clusters are punched out). The caller has
    /// written every table that stopped referencing them and fdatasynced.
    pub(crate) fn release_pending(&mut self, io: &dyn Storage) -> Result<(), UpdateError> {
        let pending = std::mem::take(&mut self.pending_release);
        for cluster in pending {
            if self.add(io, cluster, -1)? == 0 {
                let cs = self.cluster_size();
                io.punch_hole(FileId(0), cluster * cs, cs)
                    .map_err(self.io_err(format!("punching freed host cluster {cluster}")))?;
            }
        }
        Ok(())
    }

    /// At a clean shutdown, after the caller wrote back and synced every table: releases
    /// reserved clusters and pending releases, durably.
    pub(crate) fn close(&mut self, io: &dyn Storage) -> Result<(), UpdateError> {
        let reserved: Vec<u64> = self.reserved.drain(..).collect();
        self.pending_release.extend(reserved);
        self.release_pending(io)?;
        io.sync(FileId(0)).map_err(self.io_err("fdatasync".into()))
    }

    fn entries_per_table_cluster(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Reserves the next batch of free clusters.
    fn refill(&mut self, io: &dyn Storage) -> Result<(), UpdateError> {
        let want = (RESERVE_BATCH_BYTES / self.cluster_size()).clamp(8, 1024) as usize;
        let mut got = Vec::with_capacity(want);
        // Units of the current block changed in memory and not written yet: written before
        // another block is touched (the cache may evict it).
        let mut dirty: Option<(u64, Vec<u64>)> = None;
        while got.len() < want {
            let c = self.cursor;
            if c >= self.limit {
                if got.is_empty() {
                    return Err(UpdateError::NoSpace {
                        fd: self.fd,
                        detail: format!(
                            "the image would grow past its bound of {} bytes",
                            self.limit * self.cluster_size()
                        ),
                    });
                }
                break;
            }
            let loc = self.geometry.locate(HostCluster(c));
            if dirty
                .as_ref()
                .is_some_and(|(idx, _)| *idx != loc.table_index)
            {
                self.write_dirty(io, dirty.take())?;
            }
            if !self.load_block(io, loc.table_index)? {
                self.write_dirty(io, dirty.take())?;
                self.create_block(io, loc.table_index)?;
                continue;
            }
            let geometry = self.geometry;
            let fd = self.fd;
            let corrupt = |e: crate::qcow2::RefcountError| UpdateError::Corrupt {
                fd,
                detail: format!("host cluster {c}: {e}"),
            };
            let Some(block) = self.blocks.get_mut(&loc.table_index) else {
                return Err(self.corrupt(format!("refcount block {} not cached", loc.table_index)));
            };
            let rc = refcount_get(block, loc.block_index, &geometry).map_err(corrupt)?;
            if rc == 0 && c > 0 {
                refcount_set(block, loc.block_index, 1, &geometry).map_err(corrupt)?;
                let (_, entries) = dirty.get_or_insert_with(|| (loc.table_index, Vec::new()));
                entries.push(loc.block_index);
                got.push(c);
            }
            self.cursor += 1;
        }
        self.write_dirty(io, dirty)?;
        // The file covers every reserved cluster: an L2 entry may reach the file before the
        // data that would have extended it, and QEMU counts a reference past the end of the
        // file as corruption. The new part is a hole (reads as zero); after a crash, what was
        // reserved and unused shows as leaked clusters inside the file, which `qemu-img check
        // -r leaks` reclaims.
        if let Some(&last) = got.last() {
            let end = (last + 1) * self.cluster_size();
            io.grow_to(FileId(0), end)
                .map_err(self.io_err(format!("growing the file to {end} bytes")))?;
        }
        // Not synced here: the tables that will point at these clusters call
        // `make_durable` before any write that makes them reachable.
        self.unsynced = true;
        self.reserved.extend(got);
        Ok(())
    }

    /// Makes the refcounts of reserved clusters durable (fdatasync) if a batch was reserved
    /// since the last sync: called before an L2 or L1 write that could make one reachable, so
    /// that a host crash never leaves a referenced cluster with refcount 0.
    pub(crate) fn make_durable(&mut self, io: &dyn Storage) -> Result<(), UpdateError> {
        if self.unsynced {
            io.sync(FileId(0))
                .map_err(self.io_err("fdatasync".into()))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Records an fdatasync done by the caller.
    pub(crate) fn synced(&mut self) {
        self.unsynced = false;
    }

    /// Writes the units of one block holding the given entries.
    fn write_dirty(
        &self,
        io: &dyn Storage,
        dirty: Option<(u64, Vec<u64>)>,
    ) -> Result<(), UpdateError> {
        let Some((idx, entries)) = dirty else {
            return Ok(());
        };
        let unit = meta_unit(self.cluster_size());
        let bits = u64::from(self.geometry.refcount_bits());
        let mut last_unit = None;
        for index in entries {
            let unit_no = index * bits / 8 / unit;
            if last_unit != Some(unit_no) {
                self.write_block_unit(io, idx, index)?;
                last_unit = Some(unit_no);
            }
        }
        Ok(())
    }

    /// Allocates refcount block `idx` at the cursor, which lies inside the range that block
    /// describes, so the block counts itself.
    fn create_block(&mut self, io: &dyn Storage, idx: u64) -> Result<(), UpdateError> {
        let per_table_cluster = self.entries_per_table_cluster();
        if idx >= u64::from(self.table_clusters) * per_table_cluster {
            return self.grow_table(io, idx);
        }
        let c = self.cursor;
        let cs = self.cluster_size();
        let loc = self.geometry.locate(HostCluster(c));
        debug_assert_eq!(loc.table_index, idx);
        let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        refcount_set(&mut block, loc.block_index, 1, &self.geometry)
            .map_err(|e| self.corrupt(format!("new refcount block {idx}: {e}")))?;
        io.write_at(FileId(0), c * cs, &block)
            .map_err(self.io_err(format!("writing new refcount block {idx} at {}", c * cs)))?;
        io.sync(FileId(0))
            .map_err(self.io_err("fdatasync".into()))?;
        let entry = encode_refcount_table_entry(
            RefcountTableEntry::Block {
                offset: HostOffset(c * cs),
            },
            &self.cluster,
        )
        .map_err(|e| self.corrupt(format!("new refcount block {idx}: {e}")))?;
        let i = usize::try_from(idx).unwrap_or(usize::MAX);
        self.table[i] = entry;
        self.write_table_unit(io, idx)?;
        self.blocks.insert(idx, block);
        self.new_metadata.push(c);
        self.cursor += 1;
        Ok(())
    }

    /// Writes the aligned unit of the refcount table holding entry `idx`.
    fn write_table_unit(&self, io: &dyn Storage, idx: u64) -> Result<(), UpdateError> {
        let unit = meta_unit(self.cluster_size());
        let per_unit = unit / 8;
        let first = idx / per_unit * per_unit;
        let mut bytes = Vec::with_capacity(usize::try_from(unit).unwrap_or(0));
        for i in first..first + per_unit {
            let raw = usize::try_from(i)
                .ok()
                .and_then(|i| self.table.get(i))
                .copied()
                .unwrap_or(0);
            bytes.extend_from_slice(&raw.to_be_bytes());
        }
        io.write_at(FileId(0), self.table_offset.0 + first * 8, &bytes)
            .map_err(self.io_err(format!(
                "writing the refcount table at {}",
                self.table_offset.0
            )))
    }

    /// Moves the refcount table to a larger one that has room for block `idx`. The new area
    /// starts at the cursor: refcount blocks for the area itself, then the new table.
    fn grow_table(&mut self, io: &dyn Storage, idx: u64) -> Result<(), UpdateError> {
        let cs = self.cluster_size();
        let per_table_cluster = self.entries_per_table_cluster();
        let block_bits = self.geometry.block_bits();
        let start = self.cursor;
        let first_block = start >> block_bits;
        debug_assert!(first_block <= idx);
        // Find sizes that cover themselves: blocks for [start, start + area), and a table
        // with room for every block index up to the area's end (doubled, for headroom).
        let mut nblocks = 1u64;
        let mut table_clusters = 1u64;
        let area = loop {
            let area = loop {
                let area = nblocks + table_clusters;
                let last_block = (start + area - 1) >> block_bits;
                let entries = (last_block.max(idx) + 1) * 2;
                let need = entries.div_ceil(per_table_cluster);
                if need <= table_clusters {
                    break area;
                }
                table_clusters = need;
            };
            let needed = ((start + area - 1) >> block_bits) - first_block + 1;
            if needed <= nblocks {
                break area;
            }
            nblocks = needed;
        };
        if table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(UpdateError::NoSpace {
                fd: self.fd,
                detail: format!("the refcount table would pass {MAX_REFCOUNT_TABLE_BYTES} bytes"),
            });
        }
        if start + area > self.limit {
            return Err(UpdateError::NoSpace {
                fd: self.fd,
                detail: format!(
                    "the image would grow past its bound of {} bytes",
                    self.limit * cs
                ),
            });
        }
        // The blocks, each counting the area clusters in its range.
        let mut new_table = self.table.clone();
        new_table.resize(
            usize::try_from(table_clusters * per_table_cluster).unwrap_or(0),
            0,
        );
        let mut new_blocks = Vec::new();
        for b in 0..nblocks {
            let block_idx = first_block + b;
            let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
            // A block already allocated in range (not expected past the old table) is kept.
            if self.block_offset(block_idx)?.is_some() {
                return Err(self.corrupt(format!(
                    "refcount block {block_idx} exists past the refcount table"
                )));
            }
            for c in start..start + area {
                let loc = self.geometry.locate(HostCluster(c));
                if loc.table_index == block_idx {
                    refcount_set(&mut block, loc.block_index, 1, &self.geometry)
                        .map_err(|e| self.corrupt(format!("new refcount block: {e}")))?;
                }
            }
            let at = (start + b) * cs;
            io.write_at(FileId(0), at, &block)
                .map_err(self.io_err(format!("writing new refcount block at {at}")))?;
            let i = usize::try_from(block_idx).unwrap_or(usize::MAX);
            let entry = encode_refcount_table_entry(
                RefcountTableEntry::Block {
                    offset: HostOffset(at),
                },
                &self.cluster,
            )
            .map_err(|e| self.corrupt(format!("new refcount block: {e}")))?;
            match new_table.get_mut(i) {
                Some(slot) => *slot = entry,
                None => return Err(self.corrupt("refcount table sizing".into())),
            }
            new_blocks.push((block_idx, block));
        }
        let table_at = (start + nblocks) * cs;
        let mut bytes = Vec::with_capacity(new_table.len() * 8);
        for raw in &new_table {
            bytes.extend_from_slice(&raw.to_be_bytes());
        }
        io.write_at(FileId(0), table_at, &bytes)
            .map_err(self.io_err(format!("writing the new refcount table at {table_at}")))?;
        io.sync(FileId(0))
            .map_err(self.io_err("fdatasync".into()))?;
        // Point the header at it: refcount_table_offset and refcount_table_clusters.
        let unit = meta_unit(cs);
        let mut head = vec![0u8; usize::try_from(unit).unwrap_or(0)];
        io.read_at(FileId(0), 0, &mut head)
            .map_err(self.io_err("reading the header".into()))?;
        let f = REFCOUNT_TABLE_FIELDS_OFFSET;
        head[f..f + 8].copy_from_slice(&table_at.to_be_bytes());
        let clusters = u32::try_from(table_clusters).unwrap_or(u32::MAX);
        head[f + 8..f + 12].copy_from_slice(&clusters.to_be_bytes());
        io.write_at(FileId(0), 0, &head)
            .map_err(self.io_err("writing the header".into()))?;
        io.sync(FileId(0))
            .map_err(self.io_err("fdatasync".into()))?;
        let old_first = self.table_offset.0 / cs;
        let old_clusters = u64::from(self.table_clusters);
        self.table = new_table;
        self.table_offset = HostOffset(table_at);
        self.table_clusters = clusters;
        for (idx, block) in new_blocks {
            self.blocks.insert(idx, block);
        }
        self.cursor = start + area;
        self.new_metadata.extend(start..start + area);
        log::info!(
            "fd {}: refcount table moved to {table_at} ({clusters} clusters)",
            self.fd
        );
        for c in old_first..old_first + old_clusters {
            self.release_later(c);
        }
        Ok(())
    }
}
