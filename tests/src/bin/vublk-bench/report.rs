//! Turns the raw samples of a run into the markdown tables and the JSON document.
//!
//! Medians are taken across repetitions. Ratios are paired: vublk/QSD (and vublk/host) is
//! computed within each repetition, where the two ran minutes apart on the same machine, and
//! the median of those ratios is reported. This module does no I/O besides formatting.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::args::Backend;
use crate::image::{Allocation, Check};
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

/// What one workload on a fresh qcow2 overlay allocated.
#[derive(Clone, Debug)]
pub struct AllocRecord {
    pub rep: u32,
    pub backend: Backend,
    pub workload: &'static str,
    /// Requests submitted in all (warm-up, measured interval and drain).
    pub requests: u64,
    /// Clusters one request covers (its size over the cluster size, at least 1).
    pub clusters_per_request: u64,
    pub allocation: Allocation,
    /// Whether the allocation budget ended the measured interval early.
    pub cut_short: bool,
    pub measured_s: f64,
}

impl AllocRecord {
    /// Share of the requests that allocated: each allocating request of a random 4 KiB
    /// workload allocates one cluster, each of a sequential 128 KiB one two whole clusters.
    pub fn allocating_fraction(&self) -> Option<f64> {
        let max = self.requests * self.clusters_per_request;
        (max > 0).then(|| self.allocation.clusters as f64 / max as f64)
    }

    /// Share of the allocated clusters that lie over the backing file's data.
    pub fn over_backing_fraction(&self) -> Option<f64> {
        let a = &self.allocation;
        (a.clusters > 0).then(|| a.clusters_over_backing as f64 / a.clusters as f64)
    }
}

/// `qemu-img check` of an image after a daemon wrote to it.
#[derive(Clone, Debug)]
pub struct CheckRecord {
    pub rep: u32,
    pub backend: Backend,
    /// The workload, when each had its own image (the overlay); otherwise all of them.
    pub workload: Option<&'static str>,
    pub check: Check,
}

/// All samples of a run.
#[derive(Default)]
pub struct Results {
    pub records: Vec<Record>,
    /// The command line each daemon was started with (the last one, they differ only in paths).
    pub daemon_commands: BTreeMap<&'static str, String>,
    /// Per overlay workload run: what it allocated.
    pub allocations: Vec<AllocRecord>,
    /// Per writable qcow2 image a daemon served: its check afterwards.
    pub checks: Vec<CheckRecord>,
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

    /// Table of what the overlay workloads allocated, medians across reps per backend.
    pub fn markdown_alloc(&self, workloads: &[Workload], backends: &[Backend]) -> String {
        let mut out = String::new();
        out.push_str(
            "| workload | backend | requests issued | clusters allocated | allocating requests \
             | clusters over backing data | overlay file MiB | measured s | cut short by budget |\n",
        );
        out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|\n");
        for w in workloads {
            for &b in backends {
                let runs: Vec<&AllocRecord> = self
                    .allocations
                    .iter()
                    .filter(|a| a.workload == w.name && a.backend == b)
                    .collect();
                if runs.is_empty() {
                    continue;
                }
                let med = |f: &dyn Fn(&AllocRecord) -> Option<f64>| {
                    median(&runs.iter().filter_map(|a| f(a)).collect::<Vec<_>>())
                };
                let cells = [
                    fmt(med(&|a| Some(a.requests as f64)), 0),
                    fmt(med(&|a| Some(a.allocation.clusters as f64)), 0),
                    pct(med(&|a| a.allocating_fraction())),
                    pct(med(&|a| a.over_backing_fraction())),
                    fmt(
                        med(&|a| Some(a.allocation.file_bytes as f64 / f64::from(1 << 20))),
                        0,
                    ),
                    fmt(med(&|a| Some(a.measured_s)), 2),
                    format!(
                        "{}/{}",
                        runs.iter().filter(|a| a.cut_short).count(),
                        runs.len()
                    ),
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
        let allocations: Vec<Value> = self
            .allocations
            .iter()
            .map(|a| {
                json!({
                    "rep": a.rep + 1,
                    "backend": a.backend.name(),
                    "workload": a.workload,
                    "requests": a.requests,
                    "clusters_per_request": a.clusters_per_request,
                    "clusters_allocated": a.allocation.clusters,
                    "clusters_over_backing": a.allocation.clusters_over_backing,
                    "allocating_fraction": a.allocating_fraction(),
                    "overlay_file_bytes": a.allocation.file_bytes,
                    "overlay_disk_bytes": a.allocation.disk_bytes,
                    "measured_s": a.measured_s,
                    "cut_short_by_budget": a.cut_short,
                })
            })
            .collect();
        let checks: Vec<Value> = self
            .checks
            .iter()
            .map(|c| {
                json!({
                    "rep": c.rep + 1,
                    "backend": c.backend.name(),
                    "workload": c.workload,
                    "corruptions": c.check.corruptions,
                    "leaks": c.check.leaks,
                    "allocated_clusters": c.check.allocated_clusters,
                })
            })
            .collect();
        json!({
            "meta": meta,
            "daemon_commands": self.daemon_commands,
            "samples": samples,
            "medians": medians,
            "allocations": allocations,
            "qemu_img_checks": checks,
        })
    }
}

/// Formats an optional fraction as a percentage with one decimal, "–" when absent.
fn pct(v: Option<f64>) -> String {
    match v {
        Some(f) => format!("{:.1} %", f * 100.0),
        None => "–".to_string(),
    }
}

/// Formats an optional number with `decimals` places, "–" when absent.
fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "–".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Workload;

    fn alloc(rep: u32, requests: u64, clusters: u64, cut_short: bool) -> AllocRecord {
        AllocRecord {
            rep,
            backend: Backend::Vublk,
            workload: "write-128k-qd8",
            requests,
            clusters_per_request: 2,
            allocation: Allocation {
                clusters,
                clusters_over_backing: clusters / 4,
                file_bytes: clusters << 16,
                disk_bytes: clusters << 16,
            },
            cut_short,
            measured_s: 4.0,
        }
    }

    #[test]
    fn allocating_fraction_counts_every_cluster_a_request_covers() {
        let a = alloc(0, 1000, 1500, false);

        assert_eq!(
            (a.allocating_fraction(), a.over_backing_fraction()),
            (Some(0.75), Some(375.0 / 1500.0))
        );
    }

    #[test]
    fn allocation_table_shows_medians_and_how_many_runs_the_budget_cut() {
        let results = Results {
            allocations: vec![alloc(0, 1000, 2000, true), alloc(1, 3000, 6000, false)],
            ..Results::default()
        };
        let [.., w128k] = Workload::ALL;

        let table = results.markdown_alloc(&[w128k], &[Backend::Vublk, Backend::Qsd]);

        assert_eq!(
            table.lines().nth(2),
            Some("| write-128k-qd8 | vublk | 2000 | 4000 | 100.0 % | 25.0 % | 250 | 4.00 | 1/2 |")
        );
    }
}
