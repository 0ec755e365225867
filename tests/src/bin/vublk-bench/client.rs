//! The benchmark's vhost-user-blk client: one `blkio` `virtio-blk-vhost-user` connection with
//! one queue, driving a [`Workload`] at a fixed queue depth and timing every request.
//!
//! The same client, with the same offsets and the same buffers, drives every backend, so any
//! difference in the numbers is the backend's. It does not know how the backend was started;
//! it is given a socket and a [`CpuClock`] for the process behind it.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};

use crate::cpu::CpuClock;
use crate::sample::{Latencies, Sample};
use crate::workload::{Offsets, Op, Workload};

/// How long to keep retrying the vhost-user connection while the daemon finishes `listen()`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_RETRY: Duration = Duration::from_millis(10);
/// No completion for this long means the backend is stuck.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the backend's liveness is checked while waiting for completions, so a crashed
/// daemon is reported at once rather than after [`IO_TIMEOUT`].
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);
/// Virtqueue size requested from the backend: QEMU's default for virtio-blk, and far above the
/// 3 descriptors x 32 requests of the deepest workload, so requests never wait in blkio's
/// backlog.
const QUEUE_SIZE: i32 = 256;
/// Byte written into every write buffer (a non-zero pattern, so no backend can shortcut zeroes).
pub const WRITE_PATTERN: u8 = 0xa5;
/// Latency samples pre-allocated per measured second, and at most in total (growing beyond
/// this is harmless, only slower).
const LAT_RESERVE_PER_SECOND: u64 = 100_000;
const LAT_RESERVE_MAX: usize = 10_000_000;

/// Measured and warm-up durations of one workload run.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub measure: Duration,
}

/// What one workload run submitted in all, warm-up and drain included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Issued {
    /// Requests submitted (and completed) from the first to the last.
    pub requests: u64,
    /// Whether the request budget ended the measured interval before its time.
    pub cut_short: bool,
}

/// A started blkio connection with one queue and one buffer region mapped into the backend.
pub struct Client {
    // `queue` holds an Arc on blkio's region registry; declared first so it drops first.
    queue: Blkioq,
    region: MemoryRegion,
    capacity: u64,
    blkio: Blkio,
}

impl Client {
    /// Connects to the vhost-user-blk socket (read-only if `read_only`: a read-only backend
    /// refuses a read-write connection), starts one queue and maps a buffer region large
    /// enough for `max_in_flight_bytes`.
    pub fn connect(socket: &Path, read_only: bool, max_in_flight_bytes: usize) -> Result<Client> {
        let path = socket
            .to_str()
            .with_context(|| format!("socket path {} is not UTF-8", socket.display()))?;
        let mut blkio = connect_with_retry(path, read_only)?;
        blkio
            .set_i32("num-queues", 1)
            .context("blkio: setting num-queues=1")?;
        blkio
            .set_i32("queue-size", QUEUE_SIZE)
            .context("blkio: setting queue-size")?;
        let capacity = blkio
            .get_u64("capacity")
            .context("blkio: reading capacity")?;
        let mut started = blkio.start().context("blkio: start")?;
        let queue = started
            .queues
            .pop()
            .context("blkio: start returned no queue")?;

        let align = blkio
            .get_u64("mem-region-alignment")
            .context("blkio: reading mem-region-alignment")?;
        let page = 4096;
        let align = usize::try_from(align.max(page)).context("mem-region-alignment")?;
        let len = max_in_flight_bytes
            .checked_next_multiple_of(align)
            .context("buffer region size overflows")?;
        let region = blkio
            .alloc_mem_region(len)
            .context("blkio: alloc_mem_region")?;
        fill_region(&region, WRITE_PATTERN);
        blkio
            .map_mem_region(&region)
            .context("blkio: map_mem_region")?;

        Ok(Client {
            queue,
            region,
            capacity,
            blkio,
        })
    }

    /// Disk size the backend reports, bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Largest request the backend accepts as a single segment (0: no limit announced).
    pub fn max_request_bytes(&self) -> Result<u64> {
        let seg = self.blkio.get_i32("max-segment-len")?;
        let transfer = self.blkio.get_i32("max-transfer")?;
        let limit = [seg, transfer]
            .into_iter()
            .filter(|&v| v > 0)
            .min()
            .unwrap_or(0);
        Ok(u64::try_from(limit)?)
    }

    /// Reads `len` bytes at `offset` through the backend, as one request outside any workload
    /// (to check that the backend serves the expected data).
    pub fn read_at(
        &mut self,
        offset: u64,
        len: usize,
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<u8>> {
        ensure!(
            len <= self.region.len,
            "a {len}-byte read does not fit the {}-byte buffer region",
            self.region.len
        );
        let mut completions = [MaybeUninit::uninit()];
        self.submit(Op::Read, 0, offset, len);
        let n = self.wait(&mut completions, alive)?;
        ensure!(n == 1, "expected one completion, got {n}");
        // SAFETY: do_io returned 1 and initialised that many elements (see `run`).
        let c = unsafe { completions[0].assume_init_ref() };
        ensure!(
            c.user_data == 0,
            "completion for unknown request {}",
            c.user_data
        );
        if c.ret != 0 {
            bail!(
                "read of {len} bytes at {offset} failed: {}",
                std::io::Error::from_raw_os_error(-c.ret)
            );
        }
        // SAFETY: the region is a live mapping of `region.len >= len` bytes at `region.addr`
        // until the `Blkio` drops (not before `self` does); the only request was completed, so
        // the backend no longer writes to it while this slice exists.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, len) };
        let data = buf.to_vec();
        // Restore the write pattern the region holds between requests.
        buf.fill(WRITE_PATTERN);
        Ok(data)
    }

    /// Runs `workload` for `timing.warmup` then measures it for `timing.measure`, keeping
    /// `workload.queue_depth` requests in flight. `cpu` reads the backend's CPU time at the
    /// edges of the measured interval; `alive` fails if the backend has gone away.
    ///
    /// With `max_requests`, no more than that many requests are submitted in all: once the
    /// last is, the measured interval ends at the next completion (and the run fails if it
    /// had not yet begun, i.e. the budget ran out during the warm-up).
    pub fn run(
        &mut self,
        workload: &Workload,
        timing: Timing,
        max_requests: Option<u64>,
        cpu: &CpuClock,
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<(Sample, Issued)> {
        let qd = workload.queue_depth;
        let bs = workload.block_size;
        let bs_usize = usize::try_from(bs)?;
        ensure!(
            qd.checked_mul(bs_usize)
                .is_some_and(|total| total <= self.region.len),
            "{}: {qd} x {bs} bytes do not fit the {}-byte buffer region",
            workload.name,
            self.region.len
        );
        let limit = self.max_request_bytes()?;
        ensure!(
            limit == 0 || bs <= limit,
            "{}: backend accepts at most {limit} bytes per request",
            workload.name
        );
        if workload.op == Op::Write {
            // A read workload before this one left the data it read in the buffers.
            self.fill_pattern();
        }
        let mut offsets = Offsets::new(workload, self.capacity)?;
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..qd).map(|_| MaybeUninit::uninit()).collect();
        let mut submitted_at = vec![Instant::now(); qd];
        let mut slot_offset = vec![0u64; qd];
        let reserve = timing
            .measure
            .as_secs()
            .saturating_add(1)
            .saturating_mul(LAT_RESERVE_PER_SECOND);
        let mut lat = Latencies::with_capacity(
            usize::try_from(reserve).map_or(LAT_RESERVE_MAX, |r| r.min(LAT_RESERVE_MAX)),
        );

        let budget = max_requests.unwrap_or(u64::MAX);
        ensure!(
            budget >= qd as u64,
            "{}: a budget of {budget} requests is below the queue depth",
            workload.name
        );
        let start = Instant::now();
        let warm_end = start + timing.warmup;
        let measure_end = warm_end + timing.measure;
        for slot in 0..qd {
            slot_offset[slot] = offsets.next_offset();
            self.submit(workload.op, slot, slot_offset[slot], bs_usize);
            submitted_at[slot] = start;
        }
        let mut in_flight = qd;
        let mut submitted = qd as u64;
        let mut cut_short = false;

        // A batch of completions observed at `now` counts iff t0 < now <= t1, where t0 is the
        // first observation at or after `warm_end` and t1 the first at or after `measure_end`.
        let mut t0: Option<(Instant, crate::cpu::CpuTicks)> = None;
        let mut t1: Option<(Instant, crate::cpu::CpuTicks)> = None;
        let mut ios = 0u64;
        while in_flight > 0 {
            let n = self.wait(&mut completions, alive)?;
            let now = Instant::now();
            let counting = t0.is_some() && t1.is_none();
            let spent = submitted >= budget;
            if t0.is_none() && now >= warm_end {
                t0 = Some((now, cpu.read()?));
            } else if counting && (now >= measure_end || spent) {
                cut_short = now < measure_end;
                t1 = Some((now, cpu.read()?));
            }
            let stopped = t1.is_some() || spent;
            for c in &completions[..n] {
                // SAFETY: do_io returned `n`, and blkio initializes exactly the first `n`
                // elements of the slice it is given before returning that count
                // (CompletionBacklog::fill_completions and the driver's drain_completions each
                // write one element per completion they count).
                let c = unsafe { c.assume_init_ref() };
                let slot = c.user_data;
                ensure!(slot < qd, "completion for unknown request {slot}");
                if c.ret != 0 {
                    bail!(
                        "{} failed at offset {}: {}",
                        workload.name,
                        slot_offset[slot],
                        std::io::Error::from_raw_os_error(-c.ret)
                    );
                }
                in_flight -= 1;
                if counting {
                    lat.record(now.duration_since(submitted_at[slot]));
                    ios += 1;
                }
                if !stopped && submitted < budget {
                    slot_offset[slot] = offsets.next_offset();
                    self.submit(workload.op, slot, slot_offset[slot], bs_usize);
                    submitted_at[slot] = now;
                    in_flight += 1;
                    submitted += 1;
                }
            }
        }

        ensure!(
            t0.is_some(),
            "{}: all {submitted} requests of the budget were done before the warm-up ended",
            workload.name
        );
        let ((t0, cpu0), (t1, cpu1)) = t0.zip(t1).context("measured interval never ended")?;
        let sample = Sample {
            ios,
            bytes: ios * bs,
            elapsed: t1.duration_since(t0),
            lat_mean_us: lat.mean_us(),
            lat_p99_us: lat.percentile_us(99),
            cpu: Some(cpu.elapsed(cpu0, cpu1)),
        };
        let issued = Issued {
            requests: submitted,
            cut_short,
        };
        Ok((sample, issued))
    }

    /// Fills the whole buffer region with [`WRITE_PATTERN`], between requests.
    fn fill_pattern(&mut self) {
        // SAFETY: the region is a live mapping of `region.len` bytes at `region.addr` until the
        // `Blkio` drops (not before `self` does). `run` and `read_at` return `Ok` only once
        // every request they submitted completed, and the benchmark drops a client after an
        // `Err`; so no request is in flight and the backend does not access the region while
        // this slice exists.
        let buf =
            unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) };
        buf.fill(WRITE_PATTERN);
    }

    /// Submits queued requests and waits for at least one completion, checking `alive` every
    /// [`LIVENESS_INTERVAL`] and giving up after [`IO_TIMEOUT`].
    fn wait(
        &mut self,
        completions: &mut [MaybeUninit<Completion>],
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<usize> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let mut timeout = LIVENESS_INTERVAL;
            match self.queue.do_io(completions, 1, Some(&mut timeout), None) {
                Ok(n) => return Ok(n),
                Err(e) if e.errno() == Errno::TIME => {
                    alive()?;
                    ensure!(
                        Instant::now() < deadline,
                        "no completion within {IO_TIMEOUT:?}: the backend is stuck"
                    );
                }
                Err(e) => bail!("blkio do_io: {e}"),
            }
        }
    }

    /// Queues one request on `slot`'s buffer; it is submitted by the next `do_io`.
    fn submit(&mut self, op: Op, slot: usize, offset: u64, len: usize) {
        // In bounds: `run` checked that queue_depth * len fits the region.
        let buf = (self.region.addr + slot * len) as *mut u8;
        match op {
            Op::Read => self.queue.read(offset, buf, len, slot, ReqFlags::empty()),
            Op::Write => self.queue.write(offset, buf, len, slot, ReqFlags::empty()),
        }
    }
}

/// Creates and connects a blkio instance, retrying while the socket refuses connections (the
/// daemon has created it but not yet called `listen()`).
fn connect_with_retry(path: &str, read_only: bool) -> Result<Blkio> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").context("blkio: new")?;
        blkio.set_str("path", path).context("blkio: setting path")?;
        blkio
            .set_bool("read-only", read_only)
            .context("blkio: setting read-only")?;
        match blkio.connect() {
            Ok(()) => return Ok(blkio),
            Err(e)
                if matches!(e.errno(), Errno::CONNREFUSED | Errno::NOENT)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(e) => return Err(e).with_context(|| format!("blkio: connecting to {path}")),
        }
    }
}

/// Fills a freshly allocated, not yet mapped, region with `byte`.
fn fill_region(region: &MemoryRegion, byte: u8) {
    // SAFETY: `region` was just returned by `Blkio::alloc_mem_region`: a live, private to this
    // process until mapped, read-write MAP_SHARED mapping of exactly `region.len` bytes at
    // `region.addr`, page aligned, that stays mapped until the `Blkio` is dropped (after this
    // call returns). It is not yet mapped into the backend and no request uses it, so nothing
    // else accesses it while this slice exists.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    buf.fill(byte);
}
