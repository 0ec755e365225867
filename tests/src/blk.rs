//! A small synchronous vhost-user-blk client on the `blkio` crate (libblkio's
//! `virtio-blk-vhost-user` driver), the independent "VMM" of the integration tests.
//!
//! Owns: connecting to a backend's socket, one mapped I/O buffer shared with the backend (blkio
//! requires request buffers to live in its memory regions), and one blocking call per request
//! (read, write, flush, discard, write-zeroes) that submits, waits with a timeout and reports
//! the request's errno. It splits buffers into segments within the limits the device advertises
//! (size_max, seg_max), as a well-behaved driver does. It knows nothing about the daemon under
//! test: everything it learns comes over the socket. Hostile requests are not its job (see
//! [`crate::vring`]).

use std::fmt;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use nix::errno::Errno;

/// libblkio's driver for vhost-user-blk sockets.
const DRIVER: &str = "virtio-blk-vhost-user";
/// How long one request may take before the client declares the daemon stuck.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused connection is retried (a daemon between bind and listen).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between connection attempts while the socket refuses.
const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(10);
/// How long connecting, negotiating and starting may take before the daemon counts as hung.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of the client's I/O buffer, mapped into the daemon: the largest request it can make.
pub const BUFFER_SIZE: usize = 4 << 20;

/// Request kinds, to name the failed one in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// Why a client call failed.
#[derive(Debug)]
pub enum BlkError {
    /// Setting up the connection failed at `step` (connect, start, map the buffer, ...).
    Setup {
        step: &'static str,
        source: blkio::Error,
    },
    /// The request completed with an error: `errno` is what the device status mapped to
    /// (EIO for VIRTIO_BLK_S_IOERR, ENOTSUP for UNSUPP) or what blkio refused locally (EBADF
    /// for a write on a read-only connection, EINVAL for an unaligned offset).
    Request {
        op: Op,
        queue: usize,
        offset: u64,
        len: u64,
        errno: Errno,
    },
    /// The daemon did not finish the vhost-user setup within `waited`.
    SetupTimeout { waited: Duration },
    /// Waiting for the completion failed or timed out: the daemon is stuck or gone.
    Wait {
        op: Op,
        queue: usize,
        source: blkio::Error,
    },
    /// The request does not fit the client's buffer or the device's segment limits.
    TooLarge { op: Op, len: u64, why: String },
    /// No such queue on this connection.
    NoSuchQueue { queue: usize, num_queues: usize },
    /// An earlier request timed out; its buffers may still be in use, so the client stops.
    Poisoned,
}

impl BlkError {
    /// The errno a failed request completed with, if it got that far.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            BlkError::Request { errno, .. } => Some(*errno),
            BlkError::Setup { source, .. } => Some(Errno::from_raw(source.errno().raw_os_error())),
            BlkError::Wait { .. }
            | BlkError::SetupTimeout { .. }
            | BlkError::TooLarge { .. }
            | BlkError::NoSuchQueue { .. }
            | BlkError::Poisoned => None,
        }
    }
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::Setup { step, .. } => write!(f, "blkio setup failed at {step}"),
            BlkError::SetupTimeout { waited } => {
                write!(
                    f,
                    "the daemon did not complete the vhost-user setup within {waited:?}"
                )
            }
            BlkError::Request {
                op,
                queue,
                offset,
                len,
                errno,
            } => write!(
                f,
                "{op:?} of {len} bytes at offset {offset} on queue {queue} failed: {errno}"
            ),
            BlkError::Wait { op, queue, .. } => {
                write!(f, "waiting for {op:?} on queue {queue} failed")
            }
            BlkError::TooLarge { op, len, why } => write!(f, "{op:?} of {len} bytes: {why}"),
            BlkError::NoSuchQueue { queue, num_queues } => {
                write!(
                    f,
                    "queue {queue} does not exist (connection has {num_queues})"
                )
            }
            BlkError::Poisoned => write!(f, "an earlier request timed out; client unusable"),
        }
    }
}

impl std::error::Error for BlkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BlkError::Setup { source, .. } | BlkError::Wait { source, .. } => Some(source),
            BlkError::Request { .. }
            | BlkError::SetupTimeout { .. }
            | BlkError::TooLarge { .. }
            | BlkError::NoSuchQueue { .. }
            | BlkError::Poisoned => None,
        }
    }
}

/// How to connect.
#[derive(Clone, Copy, Debug)]
pub struct ConnectOptions {
    pub num_queues: usize,
    /// Must be set for a device that offers VIRTIO_BLK_F_RO: blkio refuses to start a
    /// read-write connection to it (EROFS), and refuses writes locally (EBADF) on a read-only one.
    pub read_only: bool,
}

/// A connected, started blkio client with one mapped I/O buffer.
pub struct BlkClient {
    // Field order is drop order: queues before the Blkio instance that owns the driver.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    read_only: bool,
    max_segment_len: usize,
    max_segments: usize,
    poisoned: bool,
    next_user_data: usize,
}

fn setup(step: &'static str) -> impl FnOnce(blkio::Error) -> BlkError {
    move |source| BlkError::Setup { step, source }
}

impl BlkClient {
    /// Connects read-write with `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: usize) -> Result<Self, BlkError> {
        Self::connect_with(
            socket,
            ConnectOptions {
                num_queues,
                read_only: false,
            },
        )
    }

    /// Connects read-only with `num_queues` queues.
    pub fn connect_read_only(socket: &Path, num_queues: usize) -> Result<Self, BlkError> {
        Self::connect_with(
            socket,
            ConnectOptions {
                num_queues,
                read_only: true,
            },
        )
    }

    /// Connects, negotiates, starts the queues and maps the I/O buffer.
    ///
    /// A socket that exists but refuses connections (bound, not yet listening) is retried for
    /// up to [`CONNECT_TIMEOUT`]; any other failure is returned at once. blkio's vhost-user
    /// messages block without a timeout, so the setup runs on a helper thread and a daemon
    /// that does not answer within [`SETUP_TIMEOUT`] fails the call instead of hanging the
    /// test (the thread stays blocked until the daemon dies).
    pub fn connect_with(socket: &Path, opts: ConnectOptions) -> Result<Self, BlkError> {
        let (tx, rx) = mpsc::channel();
        let path = socket.to_path_buf();
        std::thread::Builder::new()
            .name("blkio-connect".into())
            .spawn(move || {
                // The receiver is gone only if the caller already gave up.
                let _ = tx.send(Self::connect_retrying(&path, opts));
            })
            .map_err(|e| BlkError::Setup {
                step: "spawn the setup thread",
                source: blkio::Error::from_io_error(e, blkio::Errno::AGAIN),
            })?;
        rx.recv_timeout(SETUP_TIMEOUT)
            .unwrap_or(Err(BlkError::SetupTimeout {
                waited: SETUP_TIMEOUT,
            }))
    }

    fn connect_retrying(socket: &Path, opts: ConnectOptions) -> Result<Self, BlkError> {
        let start = Instant::now();
        loop {
            match Self::connect_once(socket, opts) {
                Err(BlkError::Setup {
                    step: "connect",
                    source,
                }) if source.errno() == blkio::Errno::CONNREFUSED
                    && start.elapsed() < CONNECT_TIMEOUT =>
                {
                    std::thread::sleep(CONNECT_RETRY_INTERVAL);
                }
                other => return other,
            }
        }
    }

    fn connect_once(socket: &Path, opts: ConnectOptions) -> Result<Self, BlkError> {
        let path = socket.to_str().ok_or(BlkError::Setup {
            step: "socket path to UTF-8",
            source: blkio::Error::new(blkio::Errno::INVAL, "socket path is not UTF-8"),
        })?;
        let num_queues = i32::try_from(opts.num_queues).map_err(|_| BlkError::Setup {
            step: "num-queues",
            source: blkio::Error::new(blkio::Errno::INVAL, "too many queues"),
        })?;
        let mut blkio = Blkio::new(DRIVER).map_err(setup("new"))?;
        blkio.set_str("path", path).map_err(setup("set path"))?;
        blkio
            .set_bool("read-only", opts.read_only)
            .map_err(setup("set read-only"))?;
        blkio.connect().map_err(setup("connect"))?;
        blkio
            .set_i32("num-queues", num_queues)
            .map_err(setup("set num-queues"))?;
        let started = blkio.start().map_err(setup("start"))?;
        let align = blkio
            .get_u64("mem-region-alignment")
            .map_err(setup("get mem-region-alignment"))?;
        let len = (BUFFER_SIZE as u64).next_multiple_of(align.max(1));
        let len = usize::try_from(len).map_err(|_| BlkError::Setup {
            step: "buffer size",
            source: blkio::Error::new(blkio::Errno::OVERFLOW, "alignment too large"),
        })?;
        let region = blkio
            .alloc_mem_region(len)
            .map_err(setup("alloc_mem_region"))?;
        blkio
            .map_mem_region(&region)
            .map_err(setup("map_mem_region"))?;
        let capacity = blkio.get_u64("capacity").map_err(setup("get capacity"))?;
        let read_only = blkio
            .get_bool("read-only")
            .map_err(setup("get read-only"))?;
        let positive = |v: i32| usize::try_from(v).ok().filter(|&v| v > 0);
        let max_segment_len = blkio
            .get_i32("max-segment-len")
            .map_err(setup("get max-segment-len"))?;
        let max_segments = blkio
            .get_i32("max-segments")
            .map_err(setup("get max-segments"))?;
        Ok(BlkClient {
            queues: started.queues,
            blkio,
            region,
            capacity,
            read_only,
            // 0 means "no limit" for the segment length; at least one segment is always allowed.
            max_segment_len: positive(max_segment_len).unwrap_or(usize::MAX),
            max_segments: positive(max_segments).unwrap_or(1),
            poisoned: false,
            next_user_data: 1,
        })
    }

    /// Device size in bytes (config `capacity` * 512).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether this connection is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Largest segment the device accepts (size_max), `usize::MAX` when it sets no limit.
    pub fn max_segment_len(&self) -> usize {
        self.max_segment_len
    }

    /// Most data segments per request (seg_max).
    pub fn max_segments(&self) -> usize {
        self.max_segments
    }

    /// A blkio property, for tests that check what the device advertised.
    pub fn property_u64(&self, name: &str) -> Result<u64, BlkError> {
        self.blkio.get_u64(name).map_err(setup("get property"))
    }

    /// A blkio property, for tests that check what the device advertised.
    pub fn property_i32(&self, name: &str) -> Result<i32, BlkError> {
        self.blkio.get_i32(name).map_err(setup("get property"))
    }

    /// Requests on queue `queue` instead of queue 0.
    pub fn queue(&mut self, queue: usize) -> QueueClient<'_> {
        QueueClient {
            client: self,
            queue,
        }
    }

    /// Reads `len` bytes at `offset` on queue 0.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, BlkError> {
        self.queue(0).read(offset, len)
    }

    /// Writes `data` at `offset` on queue 0.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BlkError> {
        self.queue(0).write(offset, data)
    }

    /// Flushes on queue 0.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        self.queue(0).flush()
    }

    /// Discards `len` bytes at `offset` on queue 0.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlkError> {
        self.queue(0).discard(offset, len)
    }

    /// Zeroes `len` bytes at `offset` on queue 0, allowing deallocation when `unmap`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), BlkError> {
        self.queue(0).write_zeroes(offset, len, unmap)
    }

    /// Submits one write of `len` bytes of `fill` at each of `offsets` on queue 0, makes sure
    /// the device was notified, and disconnects without waiting for any completion: a VMM
    /// that vanishes with requests in flight.
    pub fn abandon_with_writes_in_flight(
        mut self,
        offsets: &[u64],
        len: usize,
        fill: u8,
    ) -> Result<(), BlkError> {
        self.check_buffer(Op::Write, len)?;
        self.fill_buffer(fill, len);
        let buf = self.region.addr as *const u8;
        for &offset in offsets {
            let user_data = self.user_data();
            // Each request points into the mapped region, which lives until `self` drops;
            // the daemon may still be writing from it when the socket closes, which is the point.
            self.queues[0].write(offset, buf, len, user_data, ReqFlags::empty());
        }
        // min_completions = 0 with no room for completions: only submits and notifies.
        let mut timeout = REQUEST_TIMEOUT;
        self.queues[0]
            .do_io(&mut [], 0, Some(&mut timeout), None)
            .map_err(|source| BlkError::Wait {
                op: Op::Write,
                queue: 0,
                source,
            })?;
        Ok(())
    }

    fn user_data(&mut self) -> usize {
        self.next_user_data = self.next_user_data.wrapping_add(1);
        self.next_user_data
    }

    fn check_buffer(&self, op: Op, len: usize) -> Result<(), BlkError> {
        if self.poisoned {
            return Err(BlkError::Poisoned);
        }
        if len > self.region.len {
            return Err(BlkError::TooLarge {
                op,
                len: len as u64,
                why: format!("client buffer is {} bytes", self.region.len),
            });
        }
        Ok(())
    }

    /// Copies `data` to the start of the mapped buffer.
    fn copy_to_buffer(&mut self, data: &[u8]) {
        // `check_buffer` ran first: data.len() <= region.len.
        let len = data.len().min(self.region.len);
        // SAFETY: the region is `region.len` bytes mapped read-write by blkio and kept mapped
        // until `self.blkio` drops; `len <= region.len`; no request is in flight (every call
        // waits for its completion, and a timed-out client is poisoned and never copies again),
        // so the device is not accessing the buffer; `data` is ordinary memory, not the region.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.region.addr as *mut u8, len) };
    }

    /// Fills the first `len` bytes of the mapped buffer with `byte`.
    fn fill_buffer(&mut self, byte: u8, len: usize) {
        let len = len.min(self.region.len);
        // SAFETY: as in `copy_to_buffer`: in bounds, mapped, and not in use by the device.
        unsafe { std::ptr::write_bytes(self.region.addr as *mut u8, byte, len) };
    }

    /// Copies the first `len` bytes of the mapped buffer out.
    fn copy_from_buffer(&self, len: usize) -> Vec<u8> {
        let len = len.min(self.region.len);
        let mut out = vec![0u8; len];
        // SAFETY: as in `copy_to_buffer`: in bounds, mapped, and the request that filled it has
        // completed, so the device no longer writes it; `out` is a distinct allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(self.region.addr as *const u8, out.as_mut_ptr(), len)
        };
        out
    }

    /// Splits the first `total` bytes of the buffer into iovecs of the given lengths, or of
    /// at most `max_segment_len` each when `lens` is `None`, within the device's limits.
    fn iovecs(
        &self,
        op: Op,
        total: usize,
        lens: Option<&[usize]>,
    ) -> Result<Vec<blkio::iovec>, BlkError> {
        let too_large = |why: String| BlkError::TooLarge {
            op,
            len: total as u64,
            why,
        };
        let lens: Vec<usize> = match lens {
            Some(lens) => lens.to_vec(),
            None if total == 0 => Vec::new(),
            None => {
                let step = self.max_segment_len;
                (0..total.div_ceil(step))
                    .map(|i| step.min(total - i * step))
                    .collect()
            }
        };
        if lens.iter().sum::<usize>() != total {
            return Err(too_large(format!("segments {lens:?} do not add up")));
        }
        if lens.len() > self.max_segments {
            return Err(too_large(format!(
                "{} segments exceed the device's seg_max {} (size_max {})",
                lens.len(),
                self.max_segments,
                self.max_segment_len
            )));
        }
        if let Some(big) = lens.iter().find(|&&l| l > self.max_segment_len) {
            return Err(too_large(format!(
                "segment of {big} bytes exceeds the device's size_max {}",
                self.max_segment_len
            )));
        }
        let mut at = 0usize;
        Ok(lens
            .iter()
            .map(|&len| {
                let iov = blkio::iovec {
                    iov_base: (self.region.addr + at) as *mut libc::c_void,
                    iov_len: len,
                };
                at += len;
                iov
            })
            .collect())
    }

    /// Waits for the one outstanding request on `queue` and maps its result.
    fn complete(
        &mut self,
        op: Op,
        queue: usize,
        user_data: usize,
        offset: u64,
        len: u64,
    ) -> Result<(), BlkError> {
        let mut completions = [const { MaybeUninit::<Completion>::uninit() }; 1];
        let mut timeout = REQUEST_TIMEOUT;
        let result = self.queues[queue].do_io(&mut completions, 1, Some(&mut timeout), None);
        let n = match result {
            Ok(n) => n,
            Err(source) => {
                self.poisoned = true;
                return Err(BlkError::Wait { op, queue, source });
            }
        };
        if n != 1 {
            self.poisoned = true;
            return Err(BlkError::Wait {
                op,
                queue,
                source: blkio::Error::new(blkio::Errno::IO, format!("{n} completions, want 1")),
            });
        }
        // SAFETY: `do_io` returned 1, so it initialized `completions[0]`.
        let completion = unsafe { completions[0].assume_init_read() };
        if completion.user_data != user_data {
            self.poisoned = true;
            return Err(BlkError::Wait {
                op,
                queue,
                source: blkio::Error::new(
                    blkio::Errno::IO,
                    format!(
                        "completion for request {} while waiting for {user_data}",
                        completion.user_data
                    ),
                ),
            });
        }
        if completion.ret < 0 {
            return Err(BlkError::Request {
                op,
                queue,
                offset,
                len,
                errno: Errno::from_raw(-completion.ret),
            });
        }
        Ok(())
    }
}

/// Requests on one queue of a [`BlkClient`].
pub struct QueueClient<'a> {
    client: &'a mut BlkClient,
    queue: usize,
}

impl QueueClient<'_> {
    fn check_queue(&self) -> Result<(), BlkError> {
        if self.queue >= self.client.queues.len() {
            return Err(BlkError::NoSuchQueue {
                queue: self.queue,
                num_queues: self.client.queues.len(),
            });
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`, split into segments within the device's limits.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, BlkError> {
        self.read_segments(offset, len, None)
    }

    /// Reads into segments of exactly `lens` bytes (a scatter list), returned concatenated.
    pub fn readv(&mut self, offset: u64, lens: &[usize]) -> Result<Vec<u8>, BlkError> {
        self.read_segments(offset, lens.iter().sum(), Some(lens))
    }

    fn read_segments(
        &mut self,
        offset: u64,
        len: usize,
        lens: Option<&[usize]>,
    ) -> Result<Vec<u8>, BlkError> {
        self.check_queue()?;
        self.client.check_buffer(Op::Read, len)?;
        let iov = self.client.iovecs(Op::Read, len, lens)?;
        let user_data = self.client.user_data();
        let iovcnt = u32::try_from(iov.len()).unwrap_or(u32::MAX);
        // blkio keeps `iov`'s address until the request is enqueued, which may be as late as
        // the `do_io` in `complete`; `iov` lives until this function returns (or forever if
        // the wait fails, see below).
        self.client.queues[self.queue].readv(
            offset,
            iov.as_ptr(),
            iovcnt,
            user_data,
            ReqFlags::empty(),
        );
        let result = self
            .client
            .complete(Op::Read, self.queue, user_data, offset, len as u64);
        if matches!(result, Err(BlkError::Wait { .. })) {
            // The request may still sit in blkio's backlog pointing at `iov`.
            std::mem::forget(iov);
        }
        result?;
        Ok(self.client.copy_from_buffer(len))
    }

    /// Writes `data` at `offset`, split into segments within the device's limits.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BlkError> {
        self.write_segments(offset, data, None)
    }

    /// Writes `data` from segments of exactly `lens` bytes (a gather list).
    pub fn writev(&mut self, offset: u64, data: &[u8], lens: &[usize]) -> Result<(), BlkError> {
        self.write_segments(offset, data, Some(lens))
    }

    fn write_segments(
        &mut self,
        offset: u64,
        data: &[u8],
        lens: Option<&[usize]>,
    ) -> Result<(), BlkError> {
        self.check_queue()?;
        self.client.check_buffer(Op::Write, data.len())?;
        let iov = self.client.iovecs(Op::Write, data.len(), lens)?;
        self.client.copy_to_buffer(data);
        let user_data = self.client.user_data();
        let iovcnt = u32::try_from(iov.len()).unwrap_or(u32::MAX);
        // See `read_segments` for how long `iov` must live.
        self.client.queues[self.queue].writev(
            offset,
            iov.as_ptr(),
            iovcnt,
            user_data,
            ReqFlags::empty(),
        );
        let result =
            self.client
                .complete(Op::Write, self.queue, user_data, offset, data.len() as u64);
        if matches!(result, Err(BlkError::Wait { .. })) {
            std::mem::forget(iov);
        }
        result
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        self.check_queue()?;
        self.client.check_buffer(Op::Flush, 0)?;
        let user_data = self.client.user_data();
        self.client.queues[self.queue].flush(user_data, ReqFlags::empty());
        self.client.complete(Op::Flush, self.queue, user_data, 0, 0)
    }

    /// Discards `len` bytes at `offset`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlkError> {
        self.check_queue()?;
        self.client.check_buffer(Op::Discard, 0)?;
        let user_data = self.client.user_data();
        self.client.queues[self.queue].discard(offset, len, user_data, ReqFlags::empty());
        self.client
            .complete(Op::Discard, self.queue, user_data, offset, len)
    }

    /// Zeroes `len` bytes at `offset`; `unmap` lets the device deallocate them.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), BlkError> {
        self.check_queue()?;
        self.client.check_buffer(Op::WriteZeroes, 0)?;
        let user_data = self.client.user_data();
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.client.queues[self.queue].write_zeroes(offset, len, user_data, flags);
        self.client
            .complete(Op::WriteZeroes, self.queue, user_data, offset, len)
    }
}
