//! The fixed set of workloads and the offset generator every client uses.
//!
//! A workload is direction, pattern, block size and queue depth; it is defined here once so the
//! blkio client and fio run exactly the same thing. This module does no I/O.

use anyhow::{Context, Result};

/// Direction of a workload's requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// How a workload picks offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random block-aligned offsets over the whole image (with replacement).
    Random,
    /// Consecutive blocks, wrapping at the end of the image.
    Sequential,
}

/// One benchmark workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: &'static str,
    pub op: Op,
    pub pattern: Pattern,
    /// Bytes per request.
    pub block_size: u64,
    /// Requests kept in flight.
    pub queue_depth: usize,
}

const KIB: u64 = 1024;

impl Workload {
    /// Every workload, in the order they run and are reported.
    pub const ALL: [Workload; 6] = [
        Workload::new("randread-4k-qd1", Op::Read, Pattern::Random, 4 * KIB, 1),
        Workload::new("randread-4k-qd32", Op::Read, Pattern::Random, 4 * KIB, 32),
        Workload::new("randwrite-4k-qd1", Op::Write, Pattern::Random, 4 * KIB, 1),
        Workload::new("randwrite-4k-qd32", Op::Write, Pattern::Random, 4 * KIB, 32),
        Workload::new("read-128k-qd8", Op::Read, Pattern::Sequential, 128 * KIB, 8),
        Workload::new(
            "write-128k-qd8",
            Op::Write,
            Pattern::Sequential,
            128 * KIB,
            8,
        ),
    ];

    const fn new(
        name: &'static str,
        op: Op,
        pattern: Pattern,
        block_size: u64,
        queue_depth: usize,
    ) -> Workload {
        Workload {
            name,
            op,
            pattern,
            block_size,
            queue_depth,
        }
    }

    pub fn parse(s: &str) -> Result<Workload> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name == s)
            .with_context(|| {
                let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name).collect();
                format!(
                    "unknown workload {s:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }

    /// fio's `rw=` value for this workload.
    pub fn fio_rw(&self) -> &'static str {
        match (self.op, self.pattern) {
            (Op::Read, Pattern::Random) => "randread",
            (Op::Write, Pattern::Random) => "randwrite",
            (Op::Read, Pattern::Sequential) => "read",
            (Op::Write, Pattern::Sequential) => "write",
        }
    }

    /// A deterministic seed per workload, so every backend sees the same offset sequence.
    fn seed(&self) -> u64 {
        self.name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

/// Produces the offsets of one workload over an image of `blocks` blocks.
pub struct Offsets {
    pattern: Pattern,
    block_size: u64,
    blocks: u64,
    next_block: u64,
    rng: SplitMix64,
}

impl Offsets {
    /// `image_size` must hold at least one block; the tail that is not a whole block is unused.
    pub fn new(workload: &Workload, image_size: u64) -> Result<Offsets> {
        let blocks = image_size / workload.block_size;
        anyhow::ensure!(
            blocks > 0,
            "image of {image_size} bytes is smaller than one {} block of {}",
            workload.block_size,
            workload.name
        );
        Ok(Offsets {
            pattern: workload.pattern,
            block_size: workload.block_size,
            blocks,
            next_block: 0,
            rng: SplitMix64(workload.seed()),
        })
    }

    /// Byte offset of the next request.
    pub fn next_offset(&mut self) -> u64 {
        let block = match self.pattern {
            // Modulo bias is below 2^-40 for any image this tool creates.
            Pattern::Random => self.rng.next() % self.blocks,
            Pattern::Sequential => {
                let b = self.next_block;
                self.next_block = (b + 1) % self.blocks;
                b
            }
        };
        block * self.block_size
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast and good enough for offsets.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
