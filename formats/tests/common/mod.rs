//! Test support shared by the formats crate's integration tests.

#![allow(dead_code, reason = "each test binary uses a part of it")]

use std::cell::Cell;
use std::io;

use vublk_formats::{FileId, FileStorage, Storage};

/// Storage that completes the first `budget` writes (and punches) and fails every call after,
/// like a process killed after its Nth write: what completed stays, nothing else happens.
pub struct StopAfter<'a> {
    inner: FileStorage<'a>,
    budget: Cell<u64>,
    stopped: Cell<bool>,
}

impl<'a> StopAfter<'a> {
    /// Lets `budget` writes through to `inner`.
    pub fn new(inner: FileStorage<'a>, budget: u64) -> Self {
        StopAfter {
            inner,
            budget: Cell::new(budget),
            stopped: Cell::new(false),
        }
    }

    /// Whether a write was refused (the budget ran out).
    pub fn stopped(&self) -> bool {
        self.stopped.get()
    }
}

impl StopAfter<'_> {
    fn spend(&self) -> io::Result<()> {
        if self.stopped.get() || self.budget.get() == 0 {
            self.stopped.set(true);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.budget.set(self.budget.get() - 1);
        Ok(())
    }
}

impl Storage for StopAfter<'_> {
    fn read_at(&self, file: FileId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.stopped.get() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(file, offset, buf)
    }

    fn write_at(&self, file: FileId, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.spend()?;
        self.inner.write_at(file, offset, buf)
    }

    fn sync(&self, file: FileId) -> io::Result<()> {
        if self.stopped.get() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync(file)
    }

    fn punch_hole(&self, file: FileId, offset: u64, len: u64) -> io::Result<()> {
        self.spend()?;
        self.inner.punch_hole(file, offset, len)
    }

    fn grow_to(&self, file: FileId, len: u64) -> io::Result<()> {
        self.spend()?;
        self.inner.grow_to(file, len)
    }

    /// The operations of a batch may complete in any order: here the last first, so a stop
    /// can fall between an L2 entry and the data it points at when they share a batch.
    fn run_batch(&self, ops: &[vublk_formats::BatchOp<'_>]) -> Vec<io::Result<()>> {
        let mut results: Vec<io::Result<()>> =
            ops.iter().rev().map(|op| op.run_blocking(self)).collect();
        results.reverse();
        results
    }
}
