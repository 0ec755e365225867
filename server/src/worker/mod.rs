//! The queue worker: one thread per virtqueue, owning that queue's io_uring.
//!
//! It pops descriptor chains, parses them (`virtio_blk::request`), asks the disk's layer where
//! the bytes live, submits SQEs that point straight into guest memory, and completes each
//! request exactly once with a status, whatever fails. The vhost-user handler controls it
//! through [`QueueShared`]: start, stop-and-drain (GET_VRING_BASE), and exit.

mod chain;
mod ops;
mod segments;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, squeue, types};
use vhost_user_backend::{VringMutex, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vublk_formats::{decompress_cluster, ImageFileOptions, MapError, MapKind, Piece, TableLoad};

use crate::updater::UpdateJob;

use crate::device::Device;
use crate::disk::Disk;
use crate::engine::{EngineError, QueueRing};
use crate::events::{Event, IoOperation};
use crate::stats::AcctKind;
use crate::vhost_user::inflight::InflightQueue;
use crate::virtio_blk::request::{self, Descriptor, DiskRange, Op, Outcome, Request, Segment};
use crate::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use ops::{classify, AlignedBuf, InFlight, IoOp, Next, OpKind, ReadPurpose};

/// The vring type shared between the handler and a worker.
pub type Vring = VringMutex<GuestMemoryAtomic<GuestMemoryMmap>>;

/// Low bits of `user_data` that name the request's slot in the in-flight table: slots never
/// outnumber the requests a queue can hold (at most 1024, see MAX_QUEUE_SIZE), so 20 bits leave
/// room; the op index takes the bits above, up to the tag byte.
const SLOT_BITS: u32 = 20;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
/// Ops one request may have: the op index must stay below the tag byte of `user_data`.
const MAX_OPS_PER_REQUEST: usize = 1 << (56 - SLOT_BITS);
/// Size of the zero buffer used when fallocate cannot zero a range.
const ZERO_BUFFER_LEN: usize = 1 << 20;
/// O_DIRECT memory alignment vublk assumes for guest buffers.
const DIRECT_ALIGN: usize = 512;
/// `user_data` tags of the worker's own reads, above any `op << SLOT_BITS | slot`.
const TAG_MASK: u64 = 0xff00_0000_0000_0000;
const TAG_WAKE: u64 = 0xf100_0000_0000_0000;
const TAG_KICK: u64 = 0xf200_0000_0000_0000;
const TAG_CANCEL: u64 = 0xf300_0000_0000_0000;
/// Fixed-file slots for image files: the image and the deepest backing chain. A medium
/// change installs the new chain's fds in these slots; unused ones are empty.
const IMAGE_SLOTS: u32 = 17;
const _: () = assert!(IMAGE_SLOTS as usize == crate::config::MAX_BACKING_DEPTH + 1);
/// Fixed-file slots after the image files: the wake eventfd, then the kick eventfd.
const EXTRA_SLOTS: u32 = 2;
/// Times one request may ask for a table it already loaded (another queue's loads evicted it
/// in between) before it fails: each distinct table is loaded once per request otherwise, so
/// a request always progresses unless the cache thrashes.
const MAX_REPEATED_TABLE_LOADS: u32 = 8;
/// Distinct tables one request may load: a 64 MiB request over 512-byte clusters spans 2048
/// L2 tables per layer, and a chain has at most 17 layers.
const MAX_TABLE_LOADS_PER_REQUEST: u32 = 2048 * 17 + 17;
/// Bytes of buffers (O_DIRECT bounces, compressed clusters, tables) one queue may hold at once:
/// a hostile guest reading 2 MiB compressed clusters with a full queue would otherwise make the
/// worker allocate gigabytes.
const MAX_BUFFER_BYTES_PER_QUEUE: u64 = 32 << 20;
/// Pause after an unexpected io_uring_enter failure.
const SUBMIT_ERROR_BACKOFF: std::time::Duration = std::time::Duration::from_millis(10);
/// With at least this many requests in flight, the worker looks at the avail ring after each
/// batch of completions instead of asking the driver to kick.
const POLL_AVAIL_MIN_IN_FLIGHT: usize = 4;

/// What the handler asks of a worker.
#[derive(Debug, Default)]
struct Control {
    /// Incremented by each stop request; the worker echoes it in `stopped` once drained.
    stop_requested: u64,
    stopped: u64,
    /// Medium changes in progress: while non-zero the worker pops nothing.
    paused: u32,
    exit: bool,
}

/// State shared between the vhost-user handler and one queue's worker.
pub struct QueueShared {
    pub index: u16,
    pub vring: Vring,
    /// Bumped after every change of the vring's kick fd. The worker compares epochs, not fd
    /// numbers: a new kick fd often reuses the number of the one it replaces.
    kick_epoch: AtomicU64,
    /// Wakes the worker to re-read `control` and the vring's kick fd.
    wake: EventFd,
    control: Mutex<Control>,
    changed: Condvar,
    /// Results from the metadata thread: (token, ok), posted before it pokes `wake`.
    update_replies: Mutex<Vec<(u64, bool)>>,
    /// This queue's inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), if negotiated.
    inflight: Mutex<Option<Arc<InflightQueue>>>,
    /// Set when the queue is (re)started (SET_VRING_KICK): the worker reconciles the inflight
    /// region and resubmits what a previous vublk left in flight before it pops.
    recover: std::sync::atomic::AtomicBool,
}

impl QueueShared {
    pub fn new(index: u16, vring: Vring) -> std::io::Result<Arc<QueueShared>> {
        Ok(Arc::new(QueueShared {
            index,
            vring,
            kick_epoch: AtomicU64::new(0),
            wake: EventFd::new(EFD_NONBLOCK)?,
            control: Mutex::new(Control::default()),
            changed: Condvar::new(),
            update_replies: Mutex::new(Vec::new()),
            inflight: Mutex::new(None),
            recover: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Replaces the vring's kick fd (SET_VRING_KICK, or `None` when the ring stops) and tells
    /// the worker, which re-arms its read on the new one.
    pub fn set_kick(&self, fd: Option<std::fs::File>) {
        self.vring.set_kick(fd);
        self.kick_epoch.fetch_add(1, Ordering::AcqRel);
        self.poke();
    }

    /// Installs this queue's inflight region (or removes it).
    pub fn set_inflight(&self, inflight: Option<Arc<InflightQueue>>) {
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) = inflight;
    }

    /// Asks the worker to reconcile the inflight region before it next pops.
    pub fn request_recovery(&self) {
        self.recover.store(true, Ordering::Release);
    }

    /// Tells the worker that the vring changed (kick fd, enable, ready).
    pub fn poke(&self) {
        if let Err(e) = self.wake.write(1) {
            log::error!("queue {}: cannot wake worker: {e}", self.index);
        }
    }

    /// Stops the queue: no new requests are popped, and this returns once every request
    /// already popped has completed (GET_VRING_BASE must report a quiescent ring).
    pub fn stop_and_drain(&self) {
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        control.stop_requested += 1;
        let want = control.stop_requested;
        self.poke();
        while control.stopped < want && !control.exit {
            control = self
                .changed
                .wait(control)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops popping requests and returns once every request already popped has completed;
    /// the queue stays stopped until [`resume`](Self::resume) (a medium change).
    pub fn pause(&self) {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .paused += 1;
        self.stop_and_drain();
    }

    /// Ends a [`pause`](Self::pause).
    pub fn resume(&self) {
        {
            let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
            c.paused = c.paused.saturating_sub(1);
        }
        self.poke();
    }

    /// Asks the worker to drain and exit.
    pub fn request_exit(&self) {
        self.control.lock().unwrap_or_else(|e| e.into_inner()).exit = true;
        self.changed.notify_all();
        self.poke();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // Only after a panic: the kernel may still write into these buffers after the
            // ring is closed, so they are leaked rather than freed for reuse.
            log::error!(
                "queue {}: worker ended with {} requests in flight; leaking their buffers",
                self.shared.index,
                self.in_flight
            );
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(self.zero_buffer.take());
        }
    }
}

/// Marks the queue stopped and exited when its worker thread ends for any reason (a panic
/// included), so the handler never waits forever in `stop_and_drain`.
struct ExitGuard(Arc<QueueShared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let mut c = self.0.control.lock().unwrap_or_else(|e| e.into_inner());
        c.exit = true;
        c.stopped = c.stop_requested;
        self.0.changed.notify_all();
    }
}

/// Starts the worker thread for `shared`.
pub fn spawn(
    shared: Arc<QueueShared>,
    device: Arc<Device>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
) -> Result<JoinHandle<()>, EngineError> {
    let queue = shared.index;
    let queue_size = u32::from(device.params().queue_size);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(format!("vublk-q{queue}"))
        .spawn(move || {
            // From the first instruction: however this thread ends, a handler waiting for the
            // queue to drain is released.
            let _guard = ExitGuard(Arc::clone(&shared));
            crate::sandbox::seccomp::enter(crate::sandbox::seccomp::Role::Worker);
            // The ring is created on the thread that submits to it: with SINGLE_ISSUER the
            // kernel binds it to the task that enables it. Each request has at most one op
            // per piece; twice the queue size leaves room, and the backlog absorbs the rest.
            let (disk, generation) = device.disk();
            let files = disk.raw_fds();
            let mut table: Vec<RawFd> = files.clone();
            table.resize(IMAGE_SLOTS as usize, -1);
            let wake_slot = IMAGE_SLOTS;
            let setup = QueueRing::new(
                queue,
                (queue_size * 2 + 4).next_power_of_two(),
                &table,
                EXTRA_SLOTS,
            )
            .and_then(|ring| {
                ring.set_file(wake_slot, Some(shared.wake.as_raw_fd()))
                    .map_err(|source| EngineError::Setup {
                        queue,
                        step: "install the wake eventfd",
                        source,
                    })?;
                Ok(ring)
            });
            let ring = match setup {
                Ok(ring) => {
                    let _ = ready_tx.send(Ok(()));
                    ring
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut worker = Worker {
                shared,
                file_options: disk.file_options(),
                raw_fds: files,
                disk,
                generation,
                device,
                mem,
                ring,
                wake_slot,
                kick_slot: wake_slot + 1,
                kick_epoch: 0,
                kick_armed: false,
                kick_generation: 0,
                kicked: false,
                avail_polling: false,
                was_runnable: false,
                wake_value: Box::new(0),
                kick_value: Box::new(0),
                slots: Vec::new(),
                free: Vec::new(),
                in_flight: 0,
                cqes: Vec::new(),
                pieces: Vec::new(),
                zero_buffer: None,
                buffer_bytes: 0,
                deferred: std::collections::VecDeque::new(),
                signal: false,
                broken: false,
                updating: std::collections::HashMap::new(),
                next_update_token: 0,
                inflight: None,
                inflight_counter: 0,
            };
            worker.run();
        })
        .map_err(|source| EngineError::Setup {
            queue,
            step: "spawn worker thread",
            source,
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(EngineError::Setup {
                queue,
                step: "start worker thread",
                source: std::io::Error::other("worker exited during setup"),
            })
        }
    }
}

/// How planning a request ended when it did not produce its ops.
enum Planned {
    NeedTables(Vec<TableLoad>),
    /// The metadata thread must run it (qcow2 allocation, COW, discard, write-zeroes).
    NeedUpdate,
    Failed,
}

struct Worker {
    shared: Arc<QueueShared>,
    device: Arc<Device>,
    /// The medium this worker serves, and the device generation it belongs to.
    disk: Arc<Disk>,
    generation: u64,
    /// The disk's files' options and fds, indexed by `FileId`.
    file_options: Vec<ImageFileOptions>,
    raw_fds: Vec<RawFd>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ring: QueueRing,
    wake_slot: u32,
    kick_slot: u32,
    /// The kick epoch whose fd is installed in `kick_slot`, and whether a read is armed on it.
    kick_epoch: u64,
    kick_armed: bool,
    /// Tells the armed kick read apart from cancelled ones.
    kick_generation: u64,
    /// A kick arrived and the avail ring has not been looked at since.
    kicked: bool,
    /// Kicks are suppressed: look at the avail ring after completions.
    avail_polling: bool,
    was_runnable: bool,
    /// Buffers the kernel writes the eventfd counters into; boxed so they never move.
    wake_value: Box<u64>,
    kick_value: Box<u64>,
    /// In-flight table: `user_data & SLOT_MASK` indexes it.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    cqes: Vec<(u64, i32)>,
    pieces: Vec<Piece>,
    zero_buffer: Option<AlignedBuf>,
    /// Bytes of op buffers held by requests in flight.
    buffer_bytes: u64,
    /// Requests popped and planned but waiting for buffer budget.
    deferred: std::collections::VecDeque<InFlight>,
    /// The used ring changed since the last notification check.
    signal: bool,
    /// The avail ring was found corrupt: stop popping until the queue is set up again.
    broken: bool,
    /// Requests at the metadata thread, by token.
    updating: std::collections::HashMap<u64, InFlight>,
    next_update_token: u64,
    /// The inflight region of this queue, and the next counter value to record in it.
    inflight: Option<Arc<InflightQueue>>,
    inflight_counter: u64,
}

impl Worker {
    fn run(&mut self) {
        let q = self.shared.index;
        log::debug!("queue {q}: worker started");
        self.arm_wake();
        loop {
            let (stop_requested, stopped, paused, exit) = {
                let c = self
                    .shared
                    .control
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                (c.stop_requested, c.stopped, c.paused, c.exit)
            };
            let idle = self.in_flight == 0 && self.deferred.is_empty();
            if idle && self.device.generation() != self.generation {
                self.take_medium();
            }
            let stopping = stop_requested > stopped
                || exit
                || paused > 0
                || self.device.generation() != self.generation;
            if stopping && idle {
                let mut c = self
                    .shared
                    .control
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                c.stopped = c.stop_requested;
                self.broken = false;
                self.shared.changed.notify_all();
                if c.exit {
                    break;
                }
            }
            let runnable = !stopping && self.runnable();
            // Look at the avail ring after a kick, and once when the queue (re)starts: the
            // driver may have queued requests before its kick fd was installed.
            if runnable && self.shared.recover.swap(false, Ordering::AcqRel) {
                self.recover_inflight();
            }
            if runnable && (self.kicked || self.avail_polling || !self.was_runnable) {
                self.kicked = false;
                self.process_avail();
            }
            self.was_runnable = runnable;
            self.sync_kick();
            self.notify_guest();
            // The one place the worker waits: completions, kicks and wakes all arrive as CQEs.
            if let Err(e) = self.ring.submit(true) {
                // Not expected (EBUSY, EAGAIN and EINTR are absorbed by `submit`); back off so
                // a persistent failure cannot turn this loop into a busy spin.
                log::error!("queue {q}: io_uring submit failed: {e}");
                std::thread::sleep(SUBMIT_ERROR_BACKOFF);
            }
            self.reap();
            self.take_update_replies();
            self.launch_deferred();
            self.notify_guest();
        }
        log::debug!("queue {q}: worker exited");
    }

    /// Switches to the device's current medium: its fds go into the ring's image slots. Only
    /// called with nothing in flight, so no op refers to the old medium's files.
    fn take_medium(&mut self) {
        let (disk, generation) = self.device.disk();
        let files = disk.raw_fds();
        for slot in 0..IMAGE_SLOTS {
            let fd = files.get(slot as usize).copied();
            if let Err(e) = self.ring.set_file(slot, fd) {
                // The ring still holds the old files: stay on the old generation (which pops
                // nothing while the device's differs) and try again on the next wake.
                log::error!(
                    "queue {}: cannot install image fd in slot {slot}: {e}; requests wait",
                    self.shared.index
                );
                return;
            }
        }
        self.file_options = disk.file_options();
        self.raw_fds = files;
        self.disk = disk;
        self.generation = generation;
        log::debug!(
            "queue {}: serving medium generation {generation}",
            self.shared.index
        );
    }

    /// The ring is set up, enabled and has a kick fd.
    fn runnable(&self) -> bool {
        if self.broken {
            return false;
        }
        let state = self.shared.vring.get_ref();
        state.is_enabled() && state.get_queue().ready() && state.get_kick().is_some()
    }

    fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_value;
        let entry = opcode::Read::new(types::Fixed(self.wake_slot), buf.cast(), 8)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(TAG_WAKE);
        // SAFETY: `wake_value` is boxed, owned by the worker and outlives the ring.
        unsafe { self.ring.push(entry) };
    }

    fn arm_kick(&mut self) {
        let buf: *mut u64 = &mut *self.kick_value;
        let entry = opcode::Read::new(types::Fixed(self.kick_slot), buf.cast(), 8)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(TAG_KICK | self.kick_generation);
        // SAFETY: `kick_value` is boxed, owned by the worker and outlives the ring.
        unsafe { self.ring.push(entry) };
    }

    /// Keeps a read armed on the vring's current kick fd: when the handler installed a new
    /// one (or removed it), the old read is cancelled and the slot updated.
    fn sync_kick(&mut self) {
        // Epoch first, fd second: the handler bumps the epoch after replacing the fd, so a
        // replacement racing with this read is seen again on the next loop.
        let epoch = self.shared.kick_epoch.load(Ordering::Acquire);
        if epoch == self.kick_epoch {
            return;
        }
        if self.kick_armed {
            let entry = opcode::AsyncCancel::new(TAG_KICK | self.kick_generation)
                .build()
                .flags(squeue::Flags::FIXED_FILE)
                .user_data(TAG_CANCEL);
            // SAFETY: a cancel request points at no buffer.
            unsafe { self.ring.push(entry) };
            // Cancel before the slot changes, so the old read is found and ended.
            if let Err(e) = self.ring.submit(false) {
                log::error!(
                    "queue {}: cannot cancel the old kick read: {e}",
                    self.shared.index
                );
            }
            self.kick_armed = false;
        }
        self.kick_epoch = epoch;
        self.kick_generation = (self.kick_generation + 1) & !TAG_MASK;
        // Install the fd while holding the vring lock: the handler cannot close it (and let
        // its number be reused by an unrelated fd) between reading the number and registering.
        let state = self.shared.vring.get_ref();
        let want = state.get_kick().as_ref().map(|k| k.as_raw_fd());
        let installed = self.ring.set_file(self.kick_slot, want);
        drop(state);
        if let Err(e) = installed {
            log::error!(
                "queue {}: cannot install the kick fd: {e}",
                self.shared.index
            );
            return;
        }
        if want.is_some() {
            self.arm_kick();
            self.kick_armed = true;
            // A kick may have been lost with the old fd: look at the ring once.
            self.kicked = true;
        }
    }

    /// Handles every posted completion.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        self.ring.reap(&mut cqes);
        for &(user_data, res) in &cqes {
            match user_data & TAG_MASK {
                TAG_WAKE => {
                    if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
                        log::error!("queue {}: wake read failed: {res}", self.shared.index);
                    }
                    self.arm_wake();
                }
                TAG_KICK => {
                    let current = user_data == TAG_KICK | self.kick_generation;
                    if current && self.kick_armed {
                        self.kicked = true;
                        if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
                            log::error!("queue {}: kick read failed: {res}", self.shared.index);
                            self.kick_armed = false;
                        } else {
                            self.arm_kick();
                        }
                    }
                }
                TAG_CANCEL => {}
                _ => self.on_completion(user_data, res),
            }
        }
        self.cqes = cqes;
    }

    /// Pops every available chain and starts it, then decides how the next ones are noticed:
    /// by a kick, or (while enough requests are in flight that a completion will come soon)
    /// by looking again after the next completions, with kicks suppressed. Suppressing kicks
    /// while busy saves the driver a notification per request.
    fn process_avail(&mut self) {
        let mem: Arc<GuestMemoryMmap> = self.mem.memory().into_inner();
        let geo = self.device.geometry(&self.disk);
        loop {
            let Some(chains) = self.pop_chains(&mem) else {
                return;
            };
            for (head, descs, truncated) in chains {
                self.handle_chain(head, &descs, truncated, &mem, &geo);
            }
            if self.in_flight >= POLL_AVAIL_MIN_IN_FLIGHT {
                self.avail_polling = true;
                return;
            }
            self.avail_polling = false;
            let more = self
                .shared
                .vring
                .get_mut()
                .get_queue_mut()
                .enable_notification(mem.as_ref());
            match more {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    log::error!(
                        "queue {}: cannot enable notifications: {e}",
                        self.shared.index
                    );
                    return;
                }
            }
        }
    }

    /// Parses one chain and starts it, or completes it at once when it is refused.
    fn handle_chain(
        &mut self,
        head: u16,
        descs: &[Descriptor],
        truncated: bool,
        mem: &Arc<GuestMemoryMmap>,
        geo: &request::Geometry,
    ) {
        match request::parse(descs, truncated, mem.as_ref(), geo) {
            Ok(req) => self.start(head, req, mem),
            Err(rejection) => {
                self.account_invalid(rejection.req_type);
                log::debug!(
                    "queue {}: request {head} rejected: {}",
                    self.shared.index,
                    rejection.reason
                );
                match rejection.outcome() {
                    Outcome::Status(status) => {
                        if let Some(addr) = rejection.status {
                            self.complete_now(head, addr, status, 0, mem);
                        }
                    }
                    Outcome::NoStatus => self.add_used(head, 0),
                }
            }
        }
    }

    /// The queue (re)started: takes its inflight region, reconciles it with the used ring,
    /// moves the avail index past what is in flight and resubmits those requests, oldest
    /// first (a previous vublk popped them and died before completing them).
    fn recover_inflight(&mut self) {
        self.inflight = self
            .shared
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(inflight) = self.inflight.clone() else {
            return;
        };
        let mem: Arc<GuestMemoryMmap> = self.mem.memory().into_inner();
        let (used, table, size) = {
            let state = self.shared.vring.get_ref();
            let queue = state.get_queue();
            let used = queue.used_idx(mem.as_ref(), Ordering::Acquire);
            (used, queue.desc_table(), queue.size())
        };
        let Ok(used) = used else {
            log::error!(
                "queue {}: used ring unreadable; inflight requests not resubmitted",
                self.shared.index
            );
            return;
        };
        let recovery = inflight.recover(used.0);
        self.inflight_counter = recovery.counter;
        self.shared
            .vring
            .get_mut()
            .get_queue_mut()
            .set_next_avail(recovery.next_avail);
        // A previous vublk may have put completions on the used ring whose interrupt the guest
        // never got (it died, or the VMM was tearing the connection down): one interrupt now
        // makes the driver look. A spurious one costs the guest nothing.
        if let Err(e) = self.shared.vring.signal_used_queue() {
            log::debug!("queue {}: cannot signal the guest: {e}", self.shared.index);
        }
        if recovery.resubmit.is_empty() {
            return;
        }
        log::info!(
            "queue {}: resubmitting {} request(s) left in flight by a previous vublk",
            self.shared.index,
            recovery.resubmit.len()
        );
        let geo = self.device.geometry(&self.disk);
        for head in recovery.resubmit {
            let (descs, bad) = chain::chain_at(mem.as_ref(), table, size, head);
            self.handle_chain(head, &descs, bad, &mem, &geo);
        }
    }

    /// Takes every available chain off the ring with notifications disabled. `None` when the
    /// avail ring is corrupt (the queue is then stopped until the driver sets it up again).
    fn pop_chains(&mut self, mem: &GuestMemoryMmap) -> Option<Vec<(u16, Vec<Descriptor>, bool)>> {
        let mut chains = Vec::new();
        let mut state = self.shared.vring.get_mut();
        let queue = state.get_queue_mut();
        let max_chain = usize::from(queue.size());
        let _ = queue.disable_notification(mem);
        match queue.iter(mem) {
            Ok(iter) => {
                for chain in iter {
                    let head = chain.head_index();
                    let mut descs = Vec::new();
                    let mut last_has_next = false;
                    for d in chain {
                        // "A driver MUST NOT create a descriptor chain longer than the Queue
                        // Size of the device" (2.7.5.3.1), indirect tables included: a
                        // longer one is malformed.
                        if descs.len() == max_chain {
                            last_has_next = true;
                            break;
                        }
                        descs.push(Descriptor {
                            addr: d.addr(),
                            len: d.len(),
                            writable: d.is_write_only(),
                        });
                        last_has_next = d.has_next();
                    }
                    if let Some(inflight) = &self.inflight {
                        inflight.begin(head, self.inflight_counter);
                        self.inflight_counter = self.inflight_counter.wrapping_add(1);
                    }
                    chains.push((head, descs, last_has_next));
                }
                Some(chains)
            }
            Err(e) => {
                log::error!(
                    "queue {}: avail ring is corrupt ({e}); queue stopped until the driver resets it",
                    self.shared.index
                );
                self.broken = true;
                None
            }
        }
    }

    fn add_used(&mut self, head: u16, len: u32) {
        if let Some(inflight) = &self.inflight {
            inflight.pre_put(head);
        }
        let added = self.shared.vring.add_used(head, len);
        if let (Some(inflight), Ok(())) = (&self.inflight, &added) {
            let used = self.shared.vring.get_ref().get_queue().next_used();
            inflight.post_put(head, used);
        }
        if let Err(e) = added {
            log::error!(
                "queue {}: cannot add used element {head}: {e}",
                self.shared.index
            );
        }
        self.signal = true;
    }

    /// Writes the status byte and returns the chain.
    fn complete_now(
        &mut self,
        head: u16,
        status_addr: GuestAddress,
        status: u8,
        written: u32,
        mem: &GuestMemoryMmap,
    ) {
        // The parser checked the status byte is in guest memory.
        if let Err(e) = mem.write_obj(status, status_addr) {
            log::error!(
                "queue {}: cannot write status of {head}: {e}",
                self.shared.index
            );
            self.add_used(head, 0);
            return;
        }
        self.add_used(head, written.saturating_add(1));
    }

    fn notify_guest(&mut self) {
        if !self.signal {
            return;
        }
        self.signal = false;
        match self.shared.vring.needs_notification() {
            Ok(true) => {
                if let Err(e) = self.shared.vring.signal_used_queue() {
                    log::error!("queue {}: cannot signal the guest: {e}", self.shared.index);
                }
            }
            Ok(false) => {}
            Err(e) => log::error!("queue {}: used ring unreadable: {e}", self.shared.index),
        }
    }

    /// Turns a parsed request into ops and submits them (or completes it at once).
    fn start(&mut self, head: u16, req: Request, mem: &Arc<GuestMemoryMmap>) {
        let inflight = InFlight {
            head,
            status_addr: req.status,
            mem: Arc::clone(mem),
            ops: Vec::new(),
            pending: 0,
            status: VIRTIO_BLK_S_OK,
            written: 0,
            request: Some(req.op),
            loads: 0,
            loaded: std::collections::HashSet::new(),
            repeated_loads: 0,
            buffer_bytes: 0,
            started: std::time::Instant::now(),
        };
        self.launch(inflight);
    }

    /// Plans `inflight`'s request (again, after a table load) and submits its ops, or a table
    /// load when the layer needs one first.
    fn launch(&mut self, mut inflight: InFlight) {
        inflight.ops.clear();
        inflight.status = VIRTIO_BLK_S_OK;
        let Some(op) = inflight.request.take() else {
            return;
        };
        let planned = self.plan(&mut inflight, &op);
        inflight.request = Some(op);
        match planned {
            Ok(()) => {}
            Err(Planned::NeedTables(loads)) => {
                inflight.ops.clear();
                for load in loads {
                    inflight.loads += 1;
                    if !inflight.loaded.insert((load.file, load.offset)) {
                        inflight.repeated_loads += 1;
                    }
                    match read_into_op(load.file.0, load.offset, load.len, ReadPurpose::Table(load))
                    {
                        Some(op) => inflight.ops.push(op),
                        None => return self.finish_now(inflight, VIRTIO_BLK_S_IOERR),
                    }
                }
                if inflight.loads > MAX_TABLE_LOADS_PER_REQUEST
                    || inflight.repeated_loads > MAX_REPEATED_TABLE_LOADS
                {
                    log::error!(
                        "queue {}: request {} still needs metadata after {} loads ({} repeated)",
                        self.shared.index,
                        inflight.head,
                        inflight.loads,
                        inflight.repeated_loads
                    );
                    inflight.ops.clear();
                    return self.finish_now(inflight, VIRTIO_BLK_S_IOERR);
                }
            }
            Err(Planned::NeedUpdate) => {
                inflight.ops.clear();
                return self.send_update(inflight);
            }
            Err(Planned::Failed) => return self.finish_now(inflight, VIRTIO_BLK_S_IOERR),
        }
        if inflight.ops.is_empty() {
            return self.finish_now(inflight, VIRTIO_BLK_S_OK);
        }
        if inflight.ops.len() >= MAX_OPS_PER_REQUEST || self.slots.len() as u64 > SLOT_MASK {
            log::error!(
                "queue {}: request {} needs {} ops, more than one request may have",
                self.shared.index,
                inflight.head,
                inflight.ops.len()
            );
            inflight.ops.clear();
            return self.finish_now(inflight, VIRTIO_BLK_S_IOERR);
        }
        // Buffers the worker allocates (bounces, compressed clusters, tables) are bounded per
        // queue: a request that would pass the budget waits until earlier ones free theirs
        // (one request alone may always run, so every request makes progress).
        let need: u64 = inflight
            .ops
            .iter()
            .filter_map(|op| op.bounce.as_ref())
            .map(|b| b.len() as u64)
            .sum();
        if !ops::admit_buffers(self.buffer_bytes, need, MAX_BUFFER_BYTES_PER_QUEUE) {
            log::debug!(
                "queue {}: request {} waits for buffer budget ({} of {} bytes held)",
                self.shared.index,
                inflight.head,
                self.buffer_bytes,
                MAX_BUFFER_BYTES_PER_QUEUE
            );
            inflight.ops.clear();
            self.deferred.push_back(inflight);
            return;
        }
        self.buffer_bytes += need;
        inflight.buffer_bytes = need;
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        inflight.pending = inflight.ops.len();
        let op_count = inflight.ops.len();
        self.slots[slot] = Some(inflight);
        self.in_flight += 1;
        for idx in 0..op_count {
            self.push_op(slot, idx);
        }
    }

    /// Hands `inflight` to the disk's metadata thread; it completes when the reply arrives
    /// (see [`Worker::take_update_replies`]).
    fn send_update(&mut self, inflight: InFlight) {
        let job = match inflight.request.as_ref() {
            Some(Op::Write { range, data }) => {
                let Ok(len) = usize::try_from(range.len) else {
                    return self.finish_now(inflight, VIRTIO_BLK_S_IOERR);
                };
                let Some(mut bytes) = AlignedBuf::new(len) else {
                    return self.finish_now(inflight, VIRTIO_BLK_S_IOERR);
                };
                if read_guest(&inflight.mem, data, &mut bytes.as_mut_slice()[..len]).is_err() {
                    return self.finish_now(inflight, VIRTIO_BLK_S_IOERR);
                }
                UpdateJob::Write {
                    offset: range.offset,
                    data: bytes,
                    len,
                }
            }
            Some(Op::WriteZeroes { ranges, unmap }) => UpdateJob::WriteZeroes {
                ranges: ranges.iter().map(|r| (r.offset, r.len)).collect(),
                unmap: *unmap && self.device.params().discard,
            },
            Some(Op::Discard { ranges }) => UpdateJob::Discard {
                ranges: ranges.iter().map(|r| (r.offset, r.len)).collect(),
            },
            Some(Op::Flush) => UpdateJob::Flush,
            _ => return self.finish_now(inflight, VIRTIO_BLK_S_IOERR),
        };
        let token = self.next_update_token;
        self.next_update_token += 1;
        let shared = Arc::clone(&self.shared);
        let reply = Box::new(move |ok: bool| {
            shared
                .update_replies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((token, ok));
            shared.poke();
        });
        self.updating.insert(token, inflight);
        self.in_flight += 1;
        if !self.disk.submit_update(job, reply) {
            log::warn!(
                "queue {}: the metadata thread is gone; failing the request",
                self.shared.index
            );
            if let Some(inflight) = self.updating.remove(&token) {
                self.in_flight -= 1;
                self.finish_now(inflight, VIRTIO_BLK_S_IOERR);
            }
        }
    }

    /// Completes the requests the metadata thread finished.
    fn take_update_replies(&mut self) {
        if self.updating.is_empty() {
            return;
        }
        let replies = std::mem::take(
            &mut *self
                .shared
                .update_replies
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for (token, ok) in replies {
            if let Some(inflight) = self.updating.remove(&token) {
                self.in_flight -= 1;
                let status = if ok {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                self.finish_now(inflight, status);
            }
        }
    }

    /// Starts requests that waited for buffer budget, oldest first, while budget is free.
    fn launch_deferred(&mut self) {
        while self.buffer_bytes < MAX_BUFFER_BYTES_PER_QUEUE {
            let Some(next) = self.deferred.pop_front() else {
                return;
            };
            let waiting = self.deferred.len();
            self.launch(next);
            if self.deferred.len() > waiting {
                // Deferred again: it goes back to the front and waits for more completions.
                if let Some(back) = self.deferred.pop_back() {
                    self.deferred.push_front(back);
                }
                return;
            }
        }
    }

    /// Completes a request that has no I/O left in flight.
    fn finish_now(&mut self, inflight: InFlight, status: u8) {
        let written = if status == VIRTIO_BLK_S_OK {
            inflight.written
        } else {
            0
        };
        self.account(&inflight, status == VIRTIO_BLK_S_OK);
        let mem = Arc::clone(&inflight.mem);
        self.complete_now(inflight.head, inflight.status_addr, status, written, &mem);
    }

    fn plan(&mut self, inflight: &mut InFlight, op: &Op) -> Result<(), Planned> {
        match op {
            Op::Read { range, data } => {
                inflight.written = u32::try_from(range.len).unwrap_or(u32::MAX);
                self.plan_rw(inflight, MapKind::Read, *range, data)
            }
            Op::Write { range, data } => self.plan_rw(inflight, MapKind::Write, *range, data),
            Op::Flush if self.disk.is_empty() => Err(Planned::Failed),
            Op::Flush if self.disk.has_updater() => {
                // The metadata thread keeps L2 entries in memory: it writes them, then syncs.
                Err(Planned::NeedUpdate)
            }
            Op::Flush => {
                for (i, file) in self.file_options.iter().enumerate() {
                    if file.writable {
                        let idx = u32::try_from(i).unwrap_or(u32::MAX);
                        inflight.ops.push(IoOp::new(OpKind::Flush, idx, 0, 0));
                    }
                }
                Ok(())
            }
            Op::GetId { data } => {
                inflight.written = write_serial(&inflight.mem, data, self.device.serial());
                Ok(())
            }
            Op::Discard { ranges } => self.plan_fallocate(inflight, MapKind::Discard, ranges),
            Op::WriteZeroes { ranges, unmap } => {
                let punch = *unmap && self.device.params().discard;
                self.plan_fallocate(inflight, MapKind::WriteZeroes { unmap: punch }, ranges)
            }
        }
    }

    /// Counts a request refused before any I/O, by its type when the header was readable.
    fn account_invalid(&self, req_type: Option<u32>) {
        use crate::virtio_blk::{
            VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_WRITE_ZEROES,
        };
        let kind = match req_type {
            Some(VIRTIO_BLK_T_IN) => AcctKind::Read,
            Some(VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_WRITE_ZEROES) => AcctKind::Write,
            Some(VIRTIO_BLK_T_FLUSH) => AcctKind::Flush,
            Some(VIRTIO_BLK_T_DISCARD) => AcctKind::Unmap,
            _ => return,
        };
        if let Some(stats) = self.device.stats().queue(self.shared.index) {
            stats.invalid(kind);
        }
    }

    /// Counts a finished request, and reports a failed read or write to the manager.
    fn account(&self, inflight: &InFlight, ok: bool) {
        let Some(op) = inflight.request.as_ref() else {
            return;
        };
        let (kind, bytes, end) = match op {
            Op::Read { range, .. } => (AcctKind::Read, range.len, 0),
            Op::Write { range, .. } => (
                AcctKind::Write,
                range.len,
                range.offset.saturating_add(range.len),
            ),
            Op::WriteZeroes { ranges, .. } => (
                AcctKind::Write,
                ranges.iter().map(|r| r.len).sum(),
                ranges
                    .iter()
                    .map(|r| r.offset.saturating_add(r.len))
                    .max()
                    .unwrap_or(0),
            ),
            Op::Discard { ranges } => (AcctKind::Unmap, ranges.iter().map(|r| r.len).sum(), 0),
            Op::Flush => (AcctKind::Flush, 0, 0),
            Op::GetId { .. } => return,
        };
        if let Some(stats) = self.device.stats().queue(self.shared.index) {
            stats.done(kind, bytes, ok, inflight.started.elapsed(), end);
        }
        if !ok && matches!(kind, AcctKind::Read | AcctKind::Write) {
            self.device.events().emit(Event::BlockIoError {
                device: self.device.id().to_string(),
                node_name: self.device.id().to_string(),
                operation: if kind == AcctKind::Read {
                    IoOperation::Read
                } else {
                    IoOperation::Write
                },
                nospace: false,
                reason: if self.disk.is_empty() {
                    "No medium found".to_string()
                } else {
                    format!("I/O error on queue {}", self.shared.index)
                },
            });
        }
    }

    /// Maps a range with the disk's layer; tables the layer lacks become `NeedTables`.
    fn map(&mut self, kind: MapKind, offset: u64, len: u64) -> Result<(), Planned> {
        self.pieces.clear();
        let Some(layer) = self.disk.layer() else {
            return Err(Planned::Failed);
        };
        match layer.map(kind, offset, len, &mut self.pieces) {
            Ok(()) => Ok(()),
            Err(MapError::NeedTables(loads)) => Err(Planned::NeedTables(loads)),
            Err(MapError::NeedUpdate) => Err(Planned::NeedUpdate),
            Err(e) => {
                log::warn!("queue {}: {e}", self.shared.index);
                if let MapError::Corrupt(detail) = &e {
                    // The request fails; the manager hears why (QEMU's non-fatal report of
                    // an inconsistency found while reading).
                    self.device.events().emit(Event::BlockImageCorrupted {
                        device: self.device.id().to_string(),
                        node_name: self.device.id().to_string(),
                        msg: detail.clone(),
                        fatal: false,
                    });
                }
                Err(Planned::Failed)
            }
        }
    }

    /// Plans a read or write: maps the range, zero-fills holes (reads), and makes one op per
    /// data piece whose buffers are the matching part of the guest's.
    fn plan_rw(
        &mut self,
        inflight: &mut InFlight,
        kind: MapKind,
        range: DiskRange,
        data: &[Segment],
    ) -> Result<(), Planned> {
        self.map(kind, range.offset, range.len)?;
        let mut pos = 0u64;
        for piece in &self.pieces {
            let guest = segments::carve(data, pos, piece.len());
            pos += piece.len();
            match *piece {
                Piece::Zero { len: _ } => {
                    if kind == MapKind::Read {
                        zero_guest(&inflight.mem, &guest).map_err(|_| Planned::Failed)?;
                    }
                }
                Piece::Compressed {
                    file,
                    offset,
                    read_len,
                    algorithm,
                    cluster_size,
                    skip,
                    len: _,
                } => {
                    if kind != MapKind::Read {
                        return Err(Planned::Failed);
                    }
                    // Compressed bytes start anywhere: read whole 512-byte sectors around
                    // them, so O_DIRECT fds work too.
                    let start = offset / 512 * 512;
                    let input_skip = offset - start;
                    let total = (input_skip + read_len).div_ceil(512) * 512;
                    let purpose = ReadPurpose::Compressed {
                        algorithm,
                        cluster_size,
                        input_skip,
                        input_len: read_len,
                        cluster_skip: skip,
                    };
                    let mut op =
                        read_into_op(file.0, start, total, purpose).ok_or(Planned::Failed)?;
                    op.guest = guest;
                    inflight.ops.push(op);
                }
                Piece::Data { file, offset, len } => {
                    let op_kind = if kind == MapKind::Read {
                        OpKind::Read
                    } else {
                        OpKind::Write
                    };
                    let mut op = IoOp::new(op_kind, file.0, offset, len);
                    let iov =
                        segments::iovecs(inflight.mem.as_ref(), &guest).ok_or(Planned::Failed)?;
                    let direct = self
                        .file_options
                        .get(file.0 as usize)
                        .is_some_and(|f| f.direct);
                    if direct && !segments::aligned(&iov, DIRECT_ALIGN) {
                        let len_usize = usize::try_from(len).map_err(|_| Planned::Failed)?;
                        let mut bounce = AlignedBuf::new(len_usize).ok_or(Planned::Failed)?;
                        if op_kind == OpKind::Write {
                            read_guest(&inflight.mem, &guest, bounce.as_mut_slice())
                                .map_err(|_| Planned::Failed)?;
                        }
                        op.iov = vec![libc::iovec {
                            iov_base: bounce.as_mut_ptr().cast(),
                            iov_len: len_usize,
                        }];
                        op.bounce = Some(bounce);
                    } else {
                        op.iov = iov;
                    }
                    op.guest = guest;
                    inflight.ops.push(op);
                }
            }
        }
        Ok(())
    }

    /// Plans DISCARD or WRITE_ZEROES: one fallocate per data piece of each range.
    fn plan_fallocate(
        &mut self,
        inflight: &mut InFlight,
        kind: MapKind,
        ranges: &[DiskRange],
    ) -> Result<(), Planned> {
        for range in ranges {
            self.map(kind, range.offset, range.len)?;
            for piece in &self.pieces {
                if let Piece::Data { file, offset, len } = *piece {
                    let op_kind = match kind {
                        MapKind::Discard => OpKind::Discard,
                        MapKind::WriteZeroes { unmap } => OpKind::ZeroRange { punch: unmap },
                        MapKind::Read | MapKind::Write => return Err(Planned::Failed),
                    };
                    inflight.ops.push(IoOp::new(op_kind, file.0, offset, len));
                }
            }
        }
        Ok(())
    }

    /// Builds the SQE for op `idx` of `slot` in its current state and queues it.
    fn push_op(&mut self, slot: usize, idx: usize) {
        let writethrough = !self.device.writeback();
        let zero_ptr = self.zero_buffer_ptr();
        let Some(inflight) = self.slots.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let op = &inflight.ops[idx];
        let fd = types::Fixed(op.file);
        let user_data = ((idx as u64) << SLOT_BITS) | (slot as u64 & SLOT_MASK);
        let iov_len = u32::try_from(op.iov.len()).unwrap_or(u32::MAX);
        let entry = match op.kind {
            OpKind::Read | OpKind::ReadInto => opcode::Readv::new(fd, op.iov.as_ptr(), iov_len)
                .offset(op.offset)
                .build(),
            OpKind::Write => opcode::Writev::new(fd, op.iov.as_ptr(), iov_len)
                .offset(op.offset)
                .rw_flags(if writethrough { libc::RWF_DSYNC } else { 0 })
                .build(),
            OpKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::Discard => opcode::Fallocate::new(fd, op.remaining)
                .offset(op.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            OpKind::ZeroRange { punch } => opcode::Fallocate::new(fd, op.remaining)
                .offset(op.offset)
                .mode(if punch {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                })
                .build(),
            OpKind::WriteZeroBuffer => {
                let chunk = op.remaining.min(ZERO_BUFFER_LEN as u64);
                opcode::Write::new(fd, zero_ptr, u32::try_from(chunk).unwrap_or(0))
                    .offset(op.offset)
                    .rw_flags(if writethrough { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
        };
        let entry = entry.user_data(user_data).flags(squeue::Flags::FIXED_FILE);
        // SAFETY: the iovec array and every buffer it points to belong to the in-flight
        // request in `self.slots[slot]` (guest memory kept mapped by its `mem` Arc, or its
        // bounce buffer), or to the worker's zero buffer; none is freed or moved before this
        // op's completion is reaped in `on_completion`.
        unsafe { self.ring.push(entry) };
    }

    fn zero_buffer_ptr(&mut self) -> *const u8 {
        if self.zero_buffer.is_none() {
            self.zero_buffer = AlignedBuf::new(ZERO_BUFFER_LEN);
        }
        self.zero_buffer
            .as_ref()
            .map_or(std::ptr::null(), |b| b.as_mut_ptr().cast_const())
    }

    fn on_completion(&mut self, user_data: u64, res: i32) {
        let slot = usize::try_from(user_data & SLOT_MASK).unwrap_or(usize::MAX);
        let idx = usize::try_from(user_data >> SLOT_BITS).unwrap_or(usize::MAX);
        let q = self.shared.index;
        let writethrough = !self.device.writeback();
        let Some(inflight) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            log::error!("queue {q}: completion for unknown slot {slot}");
            return;
        };
        let Some(op) = inflight.ops.get_mut(idx) else {
            log::error!("queue {q}: completion for unknown op {slot}/{idx}");
            return;
        };
        let file = self.file_options.get(op.file as usize);
        let nonblock = file.is_some_and(|f| f.nonblock);
        let mut next = classify(op, res, nonblock);
        if next == Next::Synchronous {
            next = match self.raw_fds.get(op.file as usize) {
                Some(&fd) => run_synchronously(op, fd, writethrough),
                None => Next::Failed(libc::EBADF),
            };
        }
        match next {
            Next::Resubmit => {
                self.push_op(slot, idx);
                return;
            }
            Next::FallBackToWrite => {
                op.kind = OpKind::WriteZeroBuffer;
                self.push_op(slot, idx);
                return;
            }
            Next::ZeroFillRest => {
                let consumed = op.total - op.remaining;
                if let Some(bounce) = op.bounce.as_mut() {
                    let from = usize::try_from(consumed).unwrap_or(usize::MAX);
                    if let Some(rest) = bounce.as_mut_slice().get_mut(from..) {
                        rest.fill(0);
                    }
                } else {
                    let rest = segments::carve(&op.guest, consumed, op.remaining);
                    if zero_guest(&inflight.mem, &rest).is_err() {
                        inflight.status = VIRTIO_BLK_S_IOERR;
                    }
                }
                op.remaining = 0;
            }
            Next::Failed(errno) => {
                log::warn!(
                    "queue {q}: {:?} on file {} at offset {} failed: {}",
                    op.kind,
                    op.file,
                    op.offset,
                    std::io::Error::from_raw_os_error(errno)
                );
                inflight.status = VIRTIO_BLK_S_IOERR;
            }
            Next::Done | Next::Synchronous => {}
        }
        op.done = true;
        if inflight.status == VIRTIO_BLK_S_OK {
            let delivered = match (op.kind, op.purpose) {
                (OpKind::Read, _) => match op.bounce.as_ref() {
                    Some(bounce) => write_guest(&inflight.mem, &op.guest, bounce.as_slice())
                        .map_err(|e| e.to_string()),
                    None => Ok(()),
                },
                (OpKind::ReadInto, Some(ReadPurpose::Compressed { .. })) => {
                    deliver_compressed(&inflight.mem, op)
                }
                _ => Ok(()),
            };
            if let Err(e) = delivered {
                log::warn!("queue {q}: request {}: {e}", inflight.head);
                inflight.status = VIRTIO_BLK_S_IOERR;
            }
        }
        inflight.pending -= 1;
        if inflight.pending > 0 {
            return;
        }
        let Some(mut done) = self.slots[slot].take() else {
            return;
        };
        self.free.push(slot);
        self.in_flight -= 1;
        self.buffer_bytes -= done.buffer_bytes;
        done.buffer_bytes = 0;
        // Table loads: hand the bytes to the layer and plan the request again.
        let is_table_load = done
            .ops
            .iter()
            .any(|op| matches!(op.purpose, Some(ReadPurpose::Table(_))));
        if is_table_load {
            if done.status == VIRTIO_BLK_S_OK {
                let mut loaded = Ok(());
                for op in &done.ops {
                    let Some(ReadPurpose::Table(load)) = op.purpose else {
                        continue;
                    };
                    let len = usize::try_from(load.len).unwrap_or(usize::MAX);
                    let result = match op.bounce.as_ref().and_then(|b| b.as_slice().get(..len)) {
                        Some(bytes) => match self.disk.layer() {
                            Some(layer) => layer.load_table(load, bytes),
                            None => Err(MapError::Corrupt("no medium".into())),
                        },
                        None => Err(MapError::Corrupt("short table buffer".into())),
                    };
                    if result.is_err() {
                        loaded = result;
                        break;
                    }
                }
                match loaded {
                    Ok(()) => return self.launch(done),
                    Err(e) => log::warn!("queue {q}: {e}"),
                }
            }
            return self.finish_now(done, VIRTIO_BLK_S_IOERR);
        }
        let status = done.status;
        self.finish_now(done, status);
    }
}

/// A read of `len` bytes at `offset` of `file` into a fresh aligned buffer, for the worker.
fn read_into_op(file: u32, offset: u64, len: u64, purpose: ReadPurpose) -> Option<IoOp> {
    let size = usize::try_from(len).ok()?;
    let mut bounce = AlignedBuf::new(size)?;
    let mut op = IoOp::new(OpKind::ReadInto, file, offset, len);
    op.iov = vec![libc::iovec {
        iov_base: bounce.as_mut_slice().as_mut_ptr().cast(),
        iov_len: size,
    }];
    op.bounce = Some(bounce);
    op.purpose = Some(purpose);
    Some(op)
}

/// Decompresses the cluster a compressed read brought in and copies the guest's part out.
fn deliver_compressed(mem: &GuestMemoryMmap, op: &IoOp) -> Result<(), String> {
    let Some(ReadPurpose::Compressed {
        algorithm,
        cluster_size,
        input_skip,
        input_len,
        cluster_skip,
    }) = op.purpose
    else {
        return Err("not a compressed read".into());
    };
    let bounce = op
        .bounce
        .as_ref()
        .ok_or("compressed read without a buffer")?;
    let from = usize::try_from(input_skip).map_err(|e| e.to_string())?;
    let to = usize::try_from(input_skip + input_len).map_err(|e| e.to_string())?;
    let input = bounce
        .as_slice()
        .get(from..to)
        .ok_or("compressed bytes outside the read buffer")?;
    let skip = usize::try_from(cluster_skip).map_err(|e| e.to_string())?;
    let want = usize::try_from(request::total_len(&op.guest)).map_err(|e| e.to_string())?;
    let cluster_size = usize::try_from(cluster_size).map_err(|e| e.to_string())?;
    if skip + want > cluster_size {
        return Err("guest range outside the compressed cluster".into());
    }
    // Streams decompress front to back: stop at the end of the guest's part.
    let mut prefix = vec![0u8; skip + want];
    decompress_cluster(algorithm, input, &mut prefix).map_err(|e| e.to_string())?;
    let part = &prefix[skip..];
    write_guest(mem, &op.guest, part).map_err(|e| e.to_string())
}

/// Runs `op` with blocking syscalls (for O_NONBLOCK fds, where io_uring answers EAGAIN).
/// Regular files and block devices ignore O_NONBLOCK for plain preadv/pwritev.
fn run_synchronously(op: &mut IoOp, fd: RawFd, writethrough: bool) -> Next {
    loop {
        let res: isize = match op.kind {
            OpKind::Read | OpKind::ReadInto | OpKind::Write => {
                let count = libc::c_int::try_from(op.iov.len()).unwrap_or(libc::c_int::MAX);
                let offset = libc::off_t::try_from(op.offset).unwrap_or(libc::off_t::MAX);
                if op.kind != OpKind::Write {
                    // SAFETY: the iovecs point into live guest memory or the op's bounce
                    // buffer (see push_op), valid for writing their full lengths.
                    unsafe { libc::preadv(fd, op.iov.as_ptr(), count, offset) }
                } else {
                    let flags = if writethrough { libc::RWF_DSYNC } else { 0 };
                    // SAFETY: as above, valid for reading.
                    unsafe { libc::pwritev2(fd, op.iov.as_ptr(), count, offset, flags) }
                }
            }
            OpKind::Flush => {
                // SAFETY: fdatasync on an fd the disk owns; no memory is passed.
                unsafe { libc::fdatasync(fd) as isize }
            }
            OpKind::Discard | OpKind::ZeroRange { .. } | OpKind::WriteZeroBuffer => {
                return Next::Failed(libc::EAGAIN);
            }
        };
        let res = if res < 0 {
            -nix::errno::Errno::last_raw()
        } else {
            i32::try_from(res).unwrap_or(i32::MAX)
        };
        match classify(op, res, false) {
            Next::Resubmit => continue,
            other => return other,
        }
    }
}

/// Writes the serial into GET_ID's buffers; returns the bytes written.
fn write_serial(mem: &GuestMemoryMmap, data: &[Segment], serial: &[u8]) -> u32 {
    let mut done = 0usize;
    for seg in data {
        let n = (seg.len as usize).min(serial.len() - done);
        if n == 0 {
            break;
        }
        if mem.write_slice(&serial[done..done + n], seg.addr).is_err() {
            break;
        }
        done += n;
    }
    u32::try_from(done).unwrap_or(0)
}

fn zero_guest(mem: &GuestMemoryMmap, segs: &[Segment]) -> Result<(), vm_memory::GuestMemoryError> {
    static ZEROS: [u8; 4096] = [0; 4096];
    for seg in segs {
        let mut done = 0u32;
        while done < seg.len {
            let n = (seg.len - done).min(4096);
            mem.write_slice(
                &ZEROS[..n as usize],
                GuestAddress(seg.addr.0 + u64::from(done)),
            )?;
            done += n;
        }
    }
    Ok(())
}

fn read_guest(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pos = 0usize;
    for seg in segs {
        let n = seg.len as usize;
        mem.read_slice(&mut buf[pos..pos + n], seg.addr)?;
        pos += n;
    }
    Ok(())
}

fn write_guest(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    buf: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pos = 0usize;
    for seg in segs {
        let n = seg.len as usize;
        mem.write_slice(&buf[pos..pos + n], seg.addr)?;
        pos += n;
    }
    Ok(())
}
