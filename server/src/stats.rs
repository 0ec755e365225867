//! I/O accounting per virtqueue, for `query-blockstats`.
//!
//! Queue workers count each completed request (lock-free atomics, one set per queue, kept by
//! the device so the figures survive VMM reconnects and medium changes); the control thread
//! reads them and renders QEMU's `BlockDeviceStats` member names, plus a latency histogram per
//! operation kind in the shape of QEMU's `BlockLatencyHistogramInfo`. It does not know where
//! requests come from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Upper bounds (ns) of the latency histogram's bins; the last bin counts everything slower.
pub const LATENCY_BOUNDARIES_NS: [u64; 10] = [
    10_000,
    50_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    1_000_000_000,
];

/// What a request was, for accounting (QEMU's `BlockAcctType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcctKind {
    Read,
    /// WRITE and WRITE_ZEROES (QEMU accounts write-zeroes as writes).
    Write,
    Flush,
    /// DISCARD.
    Unmap,
}

impl AcctKind {
    const ALL: [AcctKind; 4] = [
        AcctKind::Read,
        AcctKind::Write,
        AcctKind::Flush,
        AcctKind::Unmap,
    ];

    fn prefix(self) -> &'static str {
        match self {
            AcctKind::Read => "rd",
            AcctKind::Write => "wr",
            AcctKind::Flush => "flush",
            AcctKind::Unmap => "unmap",
        }
    }
}

#[derive(Default)]
struct KindStats {
    ops: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
    total_time_ns: AtomicU64,
    histogram: [AtomicU64; LATENCY_BOUNDARIES_NS.len() + 1],
}

/// The counters of one queue.
pub struct QueueStats {
    kinds: [KindStats; 4],
    wr_highest_offset: AtomicU64,
    /// Nanoseconds after `epoch` of the last completion (0: none yet).
    last_completion_ns: AtomicU64,
    epoch: Instant,
}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats {
            kinds: Default::default(),
            wr_highest_offset: AtomicU64::new(0),
            last_completion_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl QueueStats {
    fn kind(&self, kind: AcctKind) -> &KindStats {
        &self.kinds[kind as usize]
    }

    /// Counts a request that completed (successfully or not) after `latency`. `end` is the
    /// byte offset just past a write, for `wr_highest_offset`.
    pub fn done(&self, kind: AcctKind, bytes: u64, ok: bool, latency: Duration, end: u64) {
        let k = self.kind(kind);
        if ok {
            k.ops.fetch_add(1, Ordering::Relaxed);
            k.bytes.fetch_add(bytes, Ordering::Relaxed);
            if kind == AcctKind::Write {
                self.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
            }
        } else {
            k.failed.fetch_add(1, Ordering::Relaxed);
        }
        let ns = nanos(latency);
        k.total_time_ns.fetch_add(ns, Ordering::Relaxed);
        let bin = LATENCY_BOUNDARIES_NS
            .iter()
            .position(|&b| ns < b)
            .unwrap_or(LATENCY_BOUNDARIES_NS.len());
        k.histogram[bin].fetch_add(1, Ordering::Relaxed);
        self.last_completion_ns
            .store(nanos(self.epoch.elapsed()).max(1), Ordering::Relaxed);
    }

    /// Counts a request refused before any I/O (bad sector, bad length, read-only device).
    pub fn invalid(&self, kind: AcctKind) {
        self.kind(kind).invalid.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for kind in AcctKind::ALL {
            let k = self.kind(kind);
            let i = kind as usize;
            s.ops[i] = k.ops.load(Ordering::Relaxed);
            s.bytes[i] = k.bytes.load(Ordering::Relaxed);
            s.failed[i] = k.failed.load(Ordering::Relaxed);
            s.invalid[i] = k.invalid.load(Ordering::Relaxed);
            s.time[i] = k.total_time_ns.load(Ordering::Relaxed);
            for (bin, counter) in k.histogram.iter().enumerate() {
                s.histogram[i][bin] = counter.load(Ordering::Relaxed);
            }
        }
        s.wr_highest_offset = self.wr_highest_offset.load(Ordering::Relaxed);
        let last = self.last_completion_ns.load(Ordering::Relaxed);
        s.idle_ns = (last != 0).then(|| nanos(self.epoch.elapsed()).saturating_sub(last));
        s
    }
}

/// A point-in-time copy of one queue's (or the sum of all queues') counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    ops: [u64; 4],
    bytes: [u64; 4],
    failed: [u64; 4],
    invalid: [u64; 4],
    time: [u64; 4],
    histogram: [[u64; LATENCY_BOUNDARIES_NS.len() + 1]; 4],
    wr_highest_offset: u64,
    /// Nanoseconds since the last completion; `None` before the first.
    idle_ns: Option<u64>,
}

impl Snapshot {
    fn add(&mut self, other: &Snapshot) {
        for i in 0..4 {
            self.ops[i] += other.ops[i];
            self.bytes[i] += other.bytes[i];
            self.failed[i] += other.failed[i];
            self.invalid[i] += other.invalid[i];
            self.time[i] += other.time[i];
            for (bin, n) in other.histogram[i].iter().enumerate() {
                self.histogram[i][bin] += n;
            }
        }
        self.wr_highest_offset = self.wr_highest_offset.max(other.wr_highest_offset);
        self.idle_ns = match (self.idle_ns, other.idle_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// QEMU's `BlockDeviceStats` members (those that apply), plus the latency histograms.
    pub fn to_qmp(&self) -> Value {
        let mut m = Map::new();
        for kind in AcctKind::ALL {
            let i = kind as usize;
            let p = kind.prefix();
            if kind != AcctKind::Flush {
                m.insert(format!("{p}_bytes"), json!(self.bytes[i]));
            }
            m.insert(format!("{p}_operations"), json!(self.ops[i]));
            m.insert(format!("failed_{p}_operations"), json!(self.failed[i]));
            m.insert(format!("invalid_{p}_operations"), json!(self.invalid[i]));
            m.insert(format!("{p}_total_time_ns"), json!(self.time[i]));
            if kind != AcctKind::Flush {
                m.insert(format!("{p}_merged"), json!(0));
            }
            if kind != AcctKind::Unmap {
                m.insert(
                    format!("{p}_latency_histogram"),
                    json!({
                        "boundaries": LATENCY_BOUNDARIES_NS,
                        "bins": self.histogram[i],
                    }),
                );
            }
        }
        m.insert("wr_highest_offset".into(), json!(self.wr_highest_offset));
        if let Some(idle) = self.idle_ns {
            m.insert("idle_time_ns".into(), json!(idle));
        }
        m.insert("account_invalid".into(), json!(true));
        m.insert("account_failed".into(), json!(true));
        m.insert("timed_stats".into(), json!([]));
        Value::Object(m)
    }
}

/// The device's counters: one set per queue.
pub struct DeviceStats {
    queues: Vec<QueueStats>,
}

impl DeviceStats {
    pub fn new(num_queues: u16) -> DeviceStats {
        DeviceStats {
            queues: (0..num_queues).map(|_| QueueStats::default()).collect(),
        }
    }

    pub fn queue(&self, index: u16) -> Option<&QueueStats> {
        self.queues.get(usize::from(index))
    }

    /// Each queue's snapshot and their sum.
    pub fn snapshot(&self) -> (Vec<Snapshot>, Snapshot) {
        let per_queue: Vec<Snapshot> = self.queues.iter().map(QueueStats::snapshot).collect();
        let mut total = Snapshot::default();
        for s in &per_queue {
            total.add(s);
        }
        (per_queue, total)
    }
}

impl std::fmt::Debug for DeviceStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceStats({} queues)", self.queues.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_qemu_named_members_and_sum_across_queues() {
        let stats = DeviceStats::new(2);
        let q0 = stats.queue(0).expect("queue 0");
        let q1 = stats.queue(1).expect("queue 1");
        q0.done(AcctKind::Read, 4096, true, Duration::from_micros(20), 0);
        q1.done(AcctKind::Read, 512, true, Duration::from_millis(2), 0);
        q1.done(
            AcctKind::Write,
            8192,
            true,
            Duration::from_micros(5),
            1 << 20,
        );
        q1.done(
            AcctKind::Write,
            8192,
            false,
            Duration::from_micros(5),
            1 << 30,
        );
        q0.invalid(AcctKind::Unmap);
        let (per_queue, total) = stats.snapshot();
        let t = total.to_qmp();
        assert_eq!(t["rd_operations"], 2);
        assert_eq!(t["rd_bytes"], 4608);
        assert_eq!(t["wr_operations"], 1);
        assert_eq!(t["failed_wr_operations"], 1);
        assert_eq!(t["invalid_unmap_operations"], 1);
        assert_eq!(
            t["wr_highest_offset"],
            1 << 20,
            "a failed write does not count"
        );
        assert_eq!(t["rd_total_time_ns"], 2_020_000);
        let bins = t["rd_latency_histogram"]["bins"]
            .as_array()
            .expect("bins")
            .clone();
        assert_eq!(bins.len(), LATENCY_BOUNDARIES_NS.len() + 1);
        assert_eq!(bins[1], 1, "20 µs is in [10 µs, 50 µs)");
        assert_eq!(bins[5], 1, "2 ms is in [1 ms, 5 ms)");
        assert_eq!(per_queue[0].to_qmp()["rd_operations"], 1);
        assert!(t.get("idle_time_ns").is_some());
        assert!(t.get("flush_bytes").is_none(), "QEMU has no flush_bytes");
    }

    #[test]
    fn idle_time_is_absent_before_any_completion() {
        let stats = DeviceStats::new(1);
        assert!(stats.snapshot().1.to_qmp().get("idle_time_ns").is_none());
    }
}
