//! A bounded cache of L2 tables, shared by every queue of a disk and its metadata thread.
//!
//! Tables are kept decoded as native `u64` entries behind an `Arc`, so a mapping holds one
//! while it reads entries and eviction never invalidates it. Entries are atomics: the metadata
//! thread, the only writer, stores an entry after its write to the image completed, and readers
//! see either the old or the new mapping, never a torn one. Full means evict the least recently
//! used table, never fail.
//!
//! A table read by a queue worker may race with the metadata thread updating that table: the
//! read can return the bytes from before the update. Two rules keep such a stale copy out:
//! a table already cached is never replaced by a load (the cached copy is kept current), and a
//! load stamped before the table's last update is refused when the table was evicted in
//! between ([`L2Cache::insert_load`]); the worker then loads it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Default bytes of L2 tables cached per qcow2 layer: 32 MiB maps 256 GiB of guest data with
/// 64 KiB clusters (QEMU's default cache maps 32 GiB, but reads here never wait on a lock
/// while a table is loaded, so a larger resident set is the cheaper trade).
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// One cached table's entries.
pub type L2Table = Arc<[AtomicU64]>;

/// One cached table: its entries, when it was last used, and when it was last updated.
struct Entry {
    table: L2Table,
    last_used: u64,
    updated: u64,
}

/// An LRU cache of L2 tables keyed by host offset.
pub struct L2Cache {
    inner: Mutex<Inner>,
    capacity: usize,
}

struct Inner {
    tables: HashMap<u64, Entry>,
    clock: u64,
    /// Tables updated and then evicted, with the stamp of their last update.
    evicted_updates: HashMap<u64, u64>,
}

impl std::fmt::Debug for L2Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2Cache")
            .field("capacity", &self.capacity)
            .finish()
    }
}

fn decode(bytes: &[u8]) -> L2Table {
    bytes
        .chunks_exact(8)
        .map(|c| {
            AtomicU64::new(u64::from_be_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]))
        })
        .collect()
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least one).
    pub fn new(capacity: usize) -> L2Cache {
        L2Cache {
            inner: Mutex::new(Inner {
                tables: HashMap::new(),
                clock: 0,
                evicted_updates: HashMap::new(),
            }),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, offset: u64) -> Option<L2Table> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        inner.tables.get_mut(&offset).map(|e| {
            e.last_used = now;
            Arc::clone(&e.table)
        })
    }

    /// The stamp a load must carry: taken when a mapping finds a table missing, before the
    /// read is issued.
    pub fn stamp(&self) -> u64 {
        let mut inner = self.lock();
        inner.clock += 1;
        inner.clock
    }

    /// Inserts a table a worker read (big-endian entries) for a load stamped `stamp`. Keeps
    /// the cached copy if there is one; refuses (`None`) bytes that may predate an update.
    pub fn insert_load(&self, offset: u64, bytes: &[u8], stamp: u64) -> Option<L2Table> {
        let mut inner = self.lock();
        if let Some(e) = inner.tables.get(&offset) {
            return Some(Arc::clone(&e.table));
        }
        if inner
            .evicted_updates
            .get(&offset)
            .is_some_and(|&u| u >= stamp)
        {
            return None;
        }
        Some(self.insert_locked(&mut inner, offset, decode(bytes)))
    }

    /// Inserts a table the metadata thread read or built itself (so it is current), keeping
    /// the cached copy if there is one.
    pub fn insert(&self, offset: u64, bytes: &[u8]) -> L2Table {
        let mut inner = self.lock();
        if let Some(e) = inner.tables.get(&offset) {
            return Arc::clone(&e.table);
        }
        self.insert_locked(&mut inner, offset, decode(bytes))
    }

    /// Stores entry `index` = `value` of the table at `offset`, after its write to the image
    /// completed: in `held` (the copy the writer worked from) and in whichever copy is cached
    /// now (a worker may have loaded one since), and stamps the update.
    pub fn update_entry(&self, offset: u64, index: usize, value: u64, held: &L2Table) {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if let Some(e) = held.get(index) {
            e.store(value, Ordering::Release);
        }
        if let Some(e) = inner.tables.get_mut(&offset) {
            if let Some(slot) = e.table.get(index) {
                slot.store(value, Ordering::Release);
            }
            e.updated = now;
        } else {
            // Evicted since the writer looked it up: its copy (current) becomes the cached one
            // again.
            inner.evicted_updates.insert(offset, now);
            self.insert_locked(&mut inner, offset, Arc::clone(held));
            if let Some(e) = inner.tables.get_mut(&offset) {
                e.updated = now;
            }
        }
    }

    fn insert_locked(&self, inner: &mut Inner, offset: u64, table: L2Table) -> L2Table {
        inner.clock += 1;
        let now = inner.clock;
        if inner.tables.len() >= self.capacity {
            if let Some(victim) = inner
                .tables
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| *k)
            {
                if let Some(e) = inner.tables.remove(&victim) {
                    if e.updated > 0 {
                        inner.evicted_updates.insert(victim, e.updated);
                    }
                }
            }
        }
        inner.evicted_updates.remove(&offset);
        inner.tables.insert(
            offset,
            Entry {
                table: Arc::clone(&table),
                last_used: now,
                updated: 0,
            },
        );
        table
    }

    pub fn len(&self) -> usize {
        self.lock().tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(first: u64) -> Vec<u8> {
        let mut v = first.to_be_bytes().to_vec();
        v.extend_from_slice(&[0; 8]);
        v
    }

    #[test]
    fn inserted_table_is_decoded_big_endian() {
        let cache = L2Cache::new(2);
        cache.insert(4096, &table(0x8000_0000_0001_0000));
        assert_eq!(
            cache.get(4096).unwrap()[0].load(Ordering::Relaxed),
            0x8000_0000_0001_0000
        );
        assert!(cache.get(8192).is_none());
    }

    #[test]
    fn full_cache_evicts_the_least_recently_used() {
        let cache = L2Cache::new(2);
        cache.insert(1, &table(1));
        cache.insert(2, &table(2));
        assert!(cache.get(1).is_some());
        cache.insert(3, &table(3));
        assert!(cache.get(2).is_none(), "2 was least recently used");
        assert!(cache.get(1).is_some());
        assert!(cache.get(3).is_some());
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_held_table_survives_eviction() {
        let cache = L2Cache::new(1);
        let held = cache.insert(1, &table(7));
        cache.insert(2, &table(8));
        assert_eq!(held[0].load(Ordering::Relaxed), 7);
    }

    #[test]
    fn a_load_never_replaces_the_cached_copy() {
        let cache = L2Cache::new(2);
        let stamp = cache.stamp();
        let cached = cache.insert(1, &table(5));
        cache.update_entry(1, 0, 6, &cached);
        let got = cache.insert_load(1, &table(5), stamp).unwrap();
        assert_eq!(got[0].load(Ordering::Relaxed), 6, "the updated copy stays");
    }

    #[test]
    fn a_load_older_than_an_update_of_an_evicted_table_is_refused() {
        let cache = L2Cache::new(1);
        let stale_stamp = cache.stamp();
        let held = cache.insert(1, &table(5));
        cache.update_entry(1, 0, 6, &held);
        cache.insert(2, &table(9)); // evicts table 1
        assert!(cache.insert_load(1, &table(5), stale_stamp).is_none());
        let fresh_stamp = cache.stamp();
        assert_eq!(
            cache.insert_load(1, &table(6), fresh_stamp).unwrap()[0].load(Ordering::Relaxed),
            6
        );
    }

    #[test]
    fn an_update_reaches_a_copy_loaded_after_the_writer_read_its_own() {
        let cache = L2Cache::new(1);
        let held = cache.insert(1, &table(5));
        cache.insert(2, &table(9)); // evicts the writer's copy, never updated
        let stamp = cache.stamp();
        let loaded = cache.insert_load(1, &table(5), stamp).unwrap();
        cache.update_entry(1, 0, 6, &held);
        assert_eq!(loaded[0].load(Ordering::Relaxed), 6);
        assert_eq!(held[0].load(Ordering::Relaxed), 6);
    }
}
