//! One measurement of one workload on one backend, and the latency recorder that feeds it.
//!
//! Pure arithmetic: this module neither drives I/O nor knows which backend produced a sample.

use std::time::Duration;

use serde_json::{json, Value};

/// The outcome of one measured interval.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Requests completed inside the measured interval.
    pub ios: u64,
    /// Bytes those requests moved.
    pub bytes: u64,
    /// Length of the measured interval.
    pub elapsed: Duration,
    /// Mean submission-to-completion latency, microseconds.
    pub lat_mean_us: f64,
    /// 99th percentile of the same, microseconds.
    pub lat_p99_us: f64,
    /// CPU time the measured process used in the interval: the daemon for vublk and QSD, fio
    /// itself for the host run. `None` if it was not measured.
    pub cpu: Option<Duration>,
}

impl Sample {
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64()
    }

    /// Throughput in MB/s (10^6 bytes per second).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }

    /// CPU microseconds per completed request.
    pub fn cpu_us_per_io(&self) -> Option<f64> {
        let cpu = self.cpu?;
        (self.ios > 0).then(|| cpu.as_secs_f64() * 1e6 / self.ios as f64)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "ios": self.ios,
            "bytes": self.bytes,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "iops": self.iops(),
            "mb_per_s": self.mb_per_s(),
            "lat_mean_us": self.lat_mean_us,
            "lat_p99_us": self.lat_p99_us,
            "cpu_s": self.cpu.map(|c| c.as_secs_f64()),
            "cpu_us_per_io": self.cpu_us_per_io(),
        })
    }
}

/// Collects per-request latencies of one interval.
#[derive(Default)]
pub struct Latencies {
    /// Nanoseconds, saturated at `u32::MAX` (4.3 s, far beyond any sane request).
    ns: Vec<u32>,
    sum_ns: u128,
}

impl Latencies {
    pub fn with_capacity(n: usize) -> Latencies {
        Latencies {
            ns: Vec::with_capacity(n),
            sum_ns: 0,
        }
    }

    pub fn record(&mut self, latency: Duration) {
        let ns = u32::try_from(latency.as_nanos()).unwrap_or(u32::MAX);
        self.ns.push(ns);
        self.sum_ns += u128::from(ns);
    }

    /// Mean in microseconds; 0 when empty.
    pub fn mean_us(&self) -> f64 {
        if self.ns.is_empty() {
            return 0.0;
        }
        self.sum_ns as f64 / self.ns.len() as f64 / 1e3
    }

    /// Nearest-rank percentile (`percent` in 1..=100) in microseconds; 0 when empty. Reorders
    /// the recorded values.
    pub fn percentile_us(&mut self, percent: usize) -> f64 {
        if self.ns.is_empty() {
            return 0.0;
        }
        let n = self.ns.len();
        // Nearest rank: ceil(percent/100 * n), 1-based, kept within 1..=n.
        let rank = (percent.saturating_mul(n).div_ceil(100)).clamp(1, n);
        let (_, v, _) = self.ns.select_nth_unstable(rank - 1);
        f64::from(*v) / 1e3
    }
}

/// Median of `values` (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_count_is_mean_of_middle_two() {
        let values = [4.0, 1.0, 3.0, 2.0];

        let m = median(&values);

        assert_eq!(m, Some(2.5));
    }

    #[test]
    fn p99_of_one_to_hundred_microseconds_is_ninety_nine() {
        let mut lat = Latencies::default();
        for us in (1..=100).rev() {
            lat.record(Duration::from_micros(us));
        }

        let p99 = lat.percentile_us(99);

        assert_eq!(p99, 99.0);
    }

    #[test]
    fn cpu_per_io_divides_cpu_time_by_completed_requests() {
        let sample = Sample {
            ios: 1000,
            bytes: 4096 * 1000,
            elapsed: Duration::from_secs(1),
            lat_mean_us: 0.0,
            lat_p99_us: 0.0,
            cpu: Some(Duration::from_millis(10)),
        };

        let per_io = sample.cpu_us_per_io();

        assert_eq!(per_io, Some(10.0));
    }
}
