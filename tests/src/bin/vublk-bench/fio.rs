//! The host ceiling: fio with `ioengine=io_uring, direct=1` straight on the image file.
//!
//! Runs one fio job per workload and turns its `--output-format=json` report into a
//! [`Sample`]. The sample's CPU time is fio's own (user + system), i.e. the client side, not
//! comparable to a daemon's; the table therefore shows only fio's IOPS.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::sample::Sample;
use crate::workload::{Op, Workload};

/// Runs `workload` with fio on `image` (`size` bytes) for `warmup` + `measure`.
pub fn run(
    fio: &Path,
    image: &Path,
    size: u64,
    workload: &Workload,
    warmup: Duration,
    measure: Duration,
) -> Result<Sample> {
    let mut cmd = Command::new(fio);
    cmd.arg(format!("--name={}", workload.name))
        .arg(format!("--filename={}", image.display()))
        .arg(format!("--size={size}"))
        .arg("--ioengine=io_uring")
        .arg("--direct=1")
        .arg(format!("--rw={}", workload.fio_rw()))
        .arg(format!("--bs={}", workload.block_size))
        .arg(format!("--iodepth={}", workload.queue_depth))
        .arg("--numjobs=1")
        .arg("--time_based")
        .arg(format!("--runtime={}ms", measure.as_millis().max(1)))
        .arg(format!("--ramp_time={}ms", warmup.as_millis()))
        // Uniform random offsets with replacement, like the blkio client.
        .arg("--norandommap")
        .arg("--randrepeat=0")
        // Percentiles of the total (submission to completion) latency, like the blkio client.
        .arg("--lat_percentiles=1")
        .arg("--percentile_list=99")
        .arg("--output-format=json");
    let out = cmd
        .output()
        .with_context(|| format!("running {} (is fio installed?)", fio.display()))?;
    if !out.status.success() {
        bail!(
            "fio {} failed ({}): {}",
            workload.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let json: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "fio {}: output is not JSON: {}",
            workload.name,
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    parse(&json, workload.op).with_context(|| format!("fio {}: unexpected JSON", workload.name))
}

/// Extracts a [`Sample`] from fio's JSON report of one job.
fn parse(json: &Value, op: Op) -> Result<Sample> {
    let job = json
        .pointer("/jobs/0")
        .context("no jobs[0] in fio's report")?;
    if let Some(err) = job.get("error").and_then(Value::as_i64) {
        if err != 0 {
            bail!("fio job error {err}");
        }
    }
    let dir = match op {
        Op::Read => "read",
        Op::Write => "write",
    };
    let stats = job.get(dir).with_context(|| format!("no {dir} section"))?;
    let num = |v: &Value, ptr: &str| -> Result<f64> {
        v.pointer(ptr)
            .and_then(Value::as_f64)
            .with_context(|| format!("missing number {ptr}"))
    };
    let ios = stats
        .get("total_ios")
        .and_then(Value::as_u64)
        .context("missing total_ios")?;
    let bytes = stats
        .get("io_bytes")
        .and_then(Value::as_u64)
        .context("missing io_bytes")?;
    let runtime_ms = num(stats, "/runtime")?;
    if runtime_ms <= 0.0 || ios == 0 {
        bail!("fio measured nothing (runtime {runtime_ms} ms, {ios} I/Os)");
    }
    let elapsed = Duration::from_secs_f64(runtime_ms / 1e3);
    let lat_mean_us = num(stats, "/lat_ns/mean")? / 1e3;
    let lat_p99_us = num(stats, "/lat_ns/percentile/99.000000")? / 1e3;
    let cpu_pct = num(job, "/usr_cpu")? + num(job, "/sys_cpu")?;
    let cpu = Duration::from_secs_f64((cpu_pct / 100.0 * elapsed.as_secs_f64()).max(0.0));
    Ok(Sample {
        ios,
        bytes,
        elapsed,
        lat_mean_us,
        lat_p99_us,
        cpu: Some(cpu),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_iops_latency_and_cpu_of_the_requested_direction() {
        let json: Value = serde_json::from_str(
            r#"{"jobs":[{"error":0,"usr_cpu":10.0,"sys_cpu":40.0,
                "read":{"total_ios":2000,"io_bytes":8192000,"runtime":1000,
                        "lat_ns":{"mean":50000.0,"percentile":{"99.000000":80000}}},
                "write":{"total_ios":0,"io_bytes":0,"runtime":0}}]}"#,
        )
        .unwrap();

        let s = parse(&json, Op::Read).unwrap();

        assert_eq!(
            (
                s.ios,
                s.iops(),
                s.lat_mean_us,
                s.lat_p99_us,
                s.cpu_us_per_io()
            ),
            (2000, 2000.0, 50.0, 80.0, Some(250.0))
        );
    }
}
