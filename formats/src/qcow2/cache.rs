//! A bounded cache of L2 tables, shared by every queue of a disk.
//!
//! Tables are kept decoded as raw big-endian-swapped `u64` entries behind an `Arc`, so a
//! mapping holds one while it reads entries and eviction never invalidates it. Full means
//! evict the least recently used table, never fail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Default bytes of L2 tables cached per qcow2 layer: 32 MiB maps 256 GiB of guest data with
/// 64 KiB clusters (QEMU's default cache maps 32 GiB, but reads here never wait on a lock
/// while a table is loaded, so a larger resident set is the cheaper trade).
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// One cached table: its entries and when it was last used.
struct Entry {
    table: Arc<[u64]>,
    last_used: u64,
}

/// An LRU cache of L2 tables keyed by host offset.
pub struct L2Cache {
    inner: Mutex<Inner>,
    capacity: usize,
}

struct Inner {
    tables: HashMap<u64, Entry>,
    clock: u64,
}

impl std::fmt::Debug for L2Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2Cache")
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least one).
    pub fn new(capacity: usize) -> L2Cache {
        L2Cache {
            inner: Mutex::new(Inner {
                tables: HashMap::new(),
                clock: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    pub fn get(&self, offset: u64) -> Option<Arc<[u64]>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        inner.tables.get_mut(&offset).map(|e| {
            e.last_used = now;
            Arc::clone(&e.table)
        })
    }

    /// Inserts a table read from disk (big-endian entries), evicting the least recently used
    /// one when full.
    pub fn insert(&self, offset: u64, bytes: &[u8]) -> Arc<[u64]> {
        let table: Arc<[u64]> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        if !inner.tables.contains_key(&offset) && inner.tables.len() >= self.capacity {
            if let Some(victim) = inner
                .tables
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| *k)
            {
                inner.tables.remove(&victim);
            }
        }
        inner.tables.insert(
            offset,
            Entry {
                table: Arc::clone(&table),
                last_used: now,
            },
        );
        table
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tables
            .len()
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
        assert_eq!(cache.get(4096).unwrap()[0], 0x8000_0000_0001_0000);
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
        assert_eq!(held[0], 7);
    }
}
