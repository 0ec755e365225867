//! CPU time consumed by a process, read from `/proc/<pid>/stat`.
//!
//! `utime + stime` there is the sum over all of the process's threads, live and exited,
//! io_uring workers included, in clock ticks (`sysconf(_SC_CLK_TCK)`, normally 100 Hz). This
//! module knows nothing about which process it is reading or why.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::unistd::{sysconf, SysconfVar};

/// Field numbers (1-based, as in proc(5)) of `utime` and `stime` in `/proc/<pid>/stat`.
const UTIME_FIELD: usize = 14;
const STIME_FIELD: usize = 15;

/// Reads a process's accumulated CPU time.
pub struct CpuClock {
    pid: u32,
    ticks_per_second: u64,
}

/// One reading of a process's user and system time, in clock ticks.
#[derive(Clone, Copy, Debug)]
pub struct CpuTicks(u64);

impl CpuClock {
    pub fn new(pid: u32) -> Result<CpuClock> {
        let tck = sysconf(SysconfVar::CLK_TCK)
            .context("sysconf(_SC_CLK_TCK)")?
            .context("sysconf(_SC_CLK_TCK) has no value")?;
        let ticks_per_second = u64::try_from(tck)
            .ok()
            .filter(|&t| t > 0)
            .with_context(|| format!("sysconf(_SC_CLK_TCK) returned {tck}"))?;
        Ok(CpuClock {
            pid,
            ticks_per_second,
        })
    }

    pub fn read(&self) -> Result<CpuTicks> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_stat(&stat).with_context(|| format!("parsing {path}: {stat:?}"))
    }

    /// CPU time between two readings.
    pub fn elapsed(&self, from: CpuTicks, to: CpuTicks) -> Duration {
        let ticks = to.0.saturating_sub(from.0);
        Duration::from_secs_f64(ticks as f64 / self.ticks_per_second as f64)
    }
}

/// Extracts `utime + stime` from the text of `/proc/<pid>/stat`.
///
/// The second field (`comm`) is in parentheses and may itself contain spaces and parentheses,
/// so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Result<CpuTicks> {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        bail!("no ')' closing the comm field");
    };
    // `rest` starts at field 3 (state).
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        let raw = fields
            .get(n - 3)
            .with_context(|| format!("field {n} missing"))?;
        raw.parse::<u64>()
            .with_context(|| format!("field {n} is not a number: {raw:?}"))
    };
    let total = field(UTIME_FIELD)?
        .checked_add(field(STIME_FIELD)?)
        .context("utime + stime overflows")?;
    Ok(CpuTicks(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_stat_sums_utime_and_stime_after_a_comm_with_spaces_and_parens() {
        let stat = "42 (qemu (storage) d) S 1 42 42 0 -1 4194560 100 0 0 0 17 25 0 0 20 0 3 0";

        let ticks = parse_stat(stat).unwrap();

        assert_eq!(ticks.0, 42);
    }

    #[test]
    fn parse_stat_rejects_a_truncated_line() {
        let stat = "42 (x) S 1 42";

        let result = parse_stat(stat);

        assert!(result.is_err());
    }
}
