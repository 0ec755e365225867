//! Turns the raw samples of a run into the markdown tables and the JSON document.
//!
//! Medians are taken across repetitions. Ratios are paired: vublk/QSD (and vublk/host) is
//! computed within each repetition, where the two ran minutes apart on the same machine, and
//! the median of those ratios is reported. This module does no I/O besides formatting.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::args::Backend;
use crate::sample::{median, Sample};
use crate::workload::Workload;

/// One sample with its coordinates in the run.
#[derive(Clone, Debug)]
pub struct Record {
    /// 0-based repetition.
    pub rep: u32,
    pub backend: Backend,
    pub workload: &'static str,
    pub sample: Sample,
}

/// All samples of a run.
#[derive(Default)]
pub struct Results {
    pub records: Vec<Record>,
    /// The command line each daemon was started with (the last one, they differ only in paths).
    pub daemon_commands: BTreeMap<&'static str, String>,
}

impl Results {
    fn samples(&self, workload: &str, backend: Backend) -> Vec<&Record> {
        self.records
            .iter()
            .filter(|r| r.workload == workload && r.backend == backend)
            .collect()
    }

    /// Median across reps of `f` for one workload on one backend.
    fn median_of(
        &self,
        workload: &str,
        backend: Backend,
        f: impl Fn(&Sample) -> f64,
    ) -> Option<f64> {
        let values: Vec<f64> = self
            .samples(workload, backend)
            .iter()
            .map(|r| f(&r.sample))
            .collect();
        median(&values)
    }

    /// Median across reps of `num`'s IOPS over `den`'s IOPS within the same rep.
    fn paired_ratio(&self, workload: &str, num: Backend, den: Backend) -> Option<f64> {
        let dens = self.samples(workload, den);
        let ratios: Vec<f64> = self
            .samples(workload, num)
            .iter()
            .filter_map(|n| {
                let d = dens.iter().find(|d| d.rep == n.rep)?;
                let d = d.sample.iops();
                (d > 0.0).then(|| n.sample.iops() / d)
            })
            .collect();
        median(&ratios)
    }

    fn cpu_median(&self, workload: &str, backend: Backend) -> Option<f64> {
        let values: Vec<f64> = self
            .samples(workload, backend)
            .iter()
            .filter_map(|r| r.sample.cpu_us_per_io())
            .collect();
        median(&values)
    }

    /// The main table, one row per workload, in the format the README explains. With
    /// `host_on_raw` the daemons served a qcow2 image and the host columns, fio on the raw
    /// source image, are labelled as such.
    pub fn markdown(&self, workloads: &[Workload], host_on_raw: bool) -> String {
        use Backend::{Host, Qsd, Vublk};
        let (host_iops, host_pct) = if host_on_raw {
            ("host fio IOPS (raw file)", "vublk % of host (raw)")
        } else {
            ("host fio IOPS", "vublk % of host")
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| workload | vublk IOPS | QSD IOPS | ratio vublk/QSD | vublk MB/s | QSD MB/s \
             | vublk lat µs | QSD lat µs | vublk CPU µs/IO | QSD CPU µs/IO | {host_iops} \
             | {host_pct} |",
        );
        out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for w in workloads {
            let n = w.name;
            let cells = [
                fmt(self.median_of(n, Vublk, Sample::iops), 0),
                fmt(self.median_of(n, Qsd, Sample::iops), 0),
                fmt(self.paired_ratio(n, Vublk, Qsd), 2),
                fmt(self.median_of(n, Vublk, Sample::mb_per_s), 1),
                fmt(self.median_of(n, Qsd, Sample::mb_per_s), 1),
                fmt(self.median_of(n, Vublk, |s| s.lat_mean_us), 1),
                fmt(self.median_of(n, Qsd, |s| s.lat_mean_us), 1),
                fmt(self.cpu_median(n, Vublk), 2),
                fmt(self.cpu_median(n, Qsd), 2),
                fmt(self.median_of(n, Host, Sample::iops), 0),
                fmt(self.paired_ratio(n, Vublk, Host).map(|r| r * 100.0), 0),
            ];
            let _ = writeln!(out, "| {n} | {} |", cells.join(" | "));
        }
        out
    }

    /// Secondary table: p99 latency and the spread of IOPS across reps, per backend.
    pub fn markdown_detail(&self, workloads: &[Workload], backends: &[Backend]) -> String {
        let mut out = String::new();
        out.push_str("| workload | backend | IOPS median | IOPS min | IOPS max | lat µs mean | lat µs p99 | QSD-relative IOPS |\n");
        out.push_str("|---|---|--:|--:|--:|--:|--:|--:|\n");
        for w in workloads {
            for &b in backends {
                let samples = self.samples(w.name, b);
                if samples.is_empty() {
                    continue;
                }
                let iops: Vec<f64> = samples.iter().map(|r| r.sample.iops()).collect();
                let min = iops.iter().copied().reduce(f64::min);
                let max = iops.iter().copied().reduce(f64::max);
                let rel = if b == Backend::Qsd {
                    None
                } else {
                    self.paired_ratio(w.name, b, Backend::Qsd)
                };
                let cells = [
                    fmt(median(&iops), 0),
                    fmt(min, 0),
                    fmt(max, 0),
                    fmt(self.median_of(w.name, b, |s| s.lat_mean_us), 1),
                    fmt(self.median_of(w.name, b, |s| s.lat_p99_us), 1),
                    fmt(rel, 2),
                ];
                let _ = writeln!(out, "| {} | {} | {} |", w.name, b.name(), cells.join(" | "));
            }
        }
        out
    }

    /// Every raw sample plus the medians, as JSON.
    pub fn to_json(&self, workloads: &[Workload], backends: &[Backend], meta: Value) -> Value {
        let samples: Vec<Value> = self
            .records
            .iter()
            .map(|r| {
                json!({
                    "rep": r.rep + 1,
                    "backend": r.backend.name(),
                    "workload": r.workload,
                    "sample": r.sample.to_json(),
                })
            })
            .collect();
        let mut medians = Vec::new();
        for w in workloads {
            for &b in backends {
                if self.samples(w.name, b).is_empty() {
                    continue;
                }
                medians.push(json!({
                    "workload": w.name,
                    "backend": b.name(),
                    "iops": self.median_of(w.name, b, Sample::iops),
                    "mb_per_s": self.median_of(w.name, b, Sample::mb_per_s),
                    "lat_mean_us": self.median_of(w.name, b, |s| s.lat_mean_us),
                    "lat_p99_us": self.median_of(w.name, b, |s| s.lat_p99_us),
                    "cpu_us_per_io": self.cpu_median(w.name, b),
                    "iops_ratio_to_qsd": self.paired_ratio(w.name, b, Backend::Qsd),
                    "iops_ratio_to_host": self.paired_ratio(w.name, b, Backend::Host),
                }));
            }
        }
        json!({
            "meta": meta,
            "daemon_commands": self.daemon_commands,
            "samples": samples,
            "medians": medians,
        })
    }
}

/// Formats an optional number with `decimals` places, "–" when absent.
fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "–".to_string(),
    }
}
