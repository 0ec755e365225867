//! vhost-user-blk protocol tests: the test process is the VMM. It negotiates with the daemon
//! through the `vhost` crate's `Frontend`, shares a memfd as guest memory, and writes
//! descriptor chains byte by byte with [`vublk_tests::vring`], so it can send what no real
//! driver would: the hostile requests whose answers are vublk's contract.
//!
//! Three groups of tests:
//! - the normal path (read, write, flush, GET_ID, config space, negotiation, reconnects), run
//!   against vublk and, as a self-check of this driver, against qemu-storage-daemon;
//! - what vublk offers (feature bits, config fields that follow its command line), vublk only;
//! - hostile requests and broken rings, each of which must fail that request (or that device)
//!   and leave the daemon serving. QSD is not held to this contract (libvhost-user marks the
//!   whole device broken on a bad chain), so its runs are `#[ignore]`d, there for comparison.

#![allow(
    clippy::unwrap_used,
    reason = "a test binary: the helpers panic like the #[test] fns that clippy already exempts"
)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::EventFd;
use vublk_tests::daemon::{connect_with_timeout, vublk_bin, BackendKind, Daemon, DiskOptions};
use vublk_tests::vring::{
    discard_segment, write_desc_at, BlkConfig, Desc, GuestMemory, Segment, SplitQueue, UsedElem,
    BLK_CONFIG_LEN, BLK_HEADER_LEN, BLK_ID_BYTES, DISCARD_SEGMENT_LEN, SECTOR_SIZE, STATUS_CANARY,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

const MIB: u64 = 1 << 20;
/// Not a power of two, so a capacity rounded to one shows up; small, because every test
/// writes all of it.
const IMAGE_SIZE: u64 = 8 * MIB + 7 * 512;
const IMAGE_SECTORS: u64 = IMAGE_SIZE / SECTOR_SIZE;
/// Guest memory: a non-zero base, so a daemon that confuses guest-physical addresses with
/// offsets into the region fails.
const GUEST_BASE: u64 = 0x4000_0000;
const GUEST_SIZE: u64 = 96 * MIB;
/// vublk's default `--queue-size`, also what the driver asks for.
const QUEUE_SIZE: u16 = 256;
/// How long a request may take before the test calls the daemon hung.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Filler for buffers the device must not write.
const DATA_CANARY: u8 = 0x5a;

/// The feature mask of feature bit number `b`.
const fn bit(b: u32) -> u64 {
    1 << b
}
const F_VERSION_1: u64 = bit(VIRTIO_F_VERSION_1);
const F_EVENT_IDX: u64 = bit(VIRTIO_RING_F_EVENT_IDX);
const F_INDIRECT_DESC: u64 = bit(VIRTIO_RING_F_INDIRECT_DESC);
const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// The virtio-blk features this driver understands and acks when offered.
const BLK_FEATURES: u64 = bit(VIRTIO_BLK_F_SIZE_MAX)
    | bit(VIRTIO_BLK_F_SEG_MAX)
    | bit(VIRTIO_BLK_F_RO)
    | bit(VIRTIO_BLK_F_BLK_SIZE)
    | bit(VIRTIO_BLK_F_FLUSH)
    | bit(VIRTIO_BLK_F_TOPOLOGY)
    | bit(VIRTIO_BLK_F_CONFIG_WCE)
    | bit(VIRTIO_BLK_F_MQ)
    | bit(VIRTIO_BLK_F_DISCARD)
    | bit(VIRTIO_BLK_F_WRITE_ZEROES);

/// An eventfd from vmm-sys-util (the type `Frontend` takes), made borrowable as an `AsFd`.
struct Notifier(EventFd);

impl Notifier {
    fn new() -> Self {
        Notifier(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }
}

impl AsFd for Notifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the `EventFd` owns its fd and closes it only when dropped, which cannot happen
        // while `self` is borrowed for the returned lifetime.
        unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }
}

/// What the driver asks for beyond the basics.
#[derive(Clone, Copy, Debug)]
struct Options {
    num_queues: u16,
    queue_size: u16,
    event_idx: bool,
    indirect: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            num_queues: 1,
            queue_size: QUEUE_SIZE,
            event_idx: false,
            indirect: true,
        }
    }
}

/// The first part of a connection: features and protocol features negotiated.
struct Handshake {
    frontend: Frontend,
    offered: u64,
    protocol_offered: VhostUserProtocolFeatures,
    protocol: VhostUserProtocolFeatures,
    queue_num: u64,
}

/// Connects and negotiates in QEMU's order: GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
/// GET_QUEUE_NUM, SET_OWNER.
fn handshake(socket: &Path) -> Handshake {
    // Our own stream, so a daemon that stops answering fails a read instead of hanging it.
    let stream = connect_with_timeout(socket, REQUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("connecting to {}: {e:#}", socket.display()));
    handshake_stream(stream)
}

/// The handshake over an already connected stream (vublk's `--connect` and `--fd` modes).
fn handshake_stream(stream: std::os::unix::net::UnixStream) -> Handshake {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    let mut frontend = Frontend::from_stream(stream, 1);
    let offered = frontend.get_features().expect("GET_FEATURES");
    assert_ne!(
        offered & F_PROTOCOL_FEATURES,
        0,
        "VHOST_USER_F_PROTOCOL_FEATURES not offered (features {offered:#x})"
    );
    let protocol_offered = frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    let protocol = protocol_offered
        & (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
    frontend
        .set_protocol_features(protocol)
        .expect("SET_PROTOCOL_FEATURES");
    if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // Every later message asks for an ack, so a refused one fails where it was sent.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
        frontend.get_queue_num().expect("GET_QUEUE_NUM")
    } else {
        1
    };
    frontend.set_owner().expect("SET_OWNER");
    Handshake {
        frontend,
        offered,
        protocol_offered,
        protocol,
        queue_num,
    }
}

impl Handshake {
    /// The features this driver acks: what it needs and understands, of what is offered.
    fn features_to_ack(&self, opts: Options) -> u64 {
        let mut wanted = F_VERSION_1 | F_PROTOCOL_FEATURES | BLK_FEATURES;
        if opts.event_idx {
            wanted |= F_EVENT_IDX;
        }
        if opts.indirect {
            wanted |= F_INDIRECT_DESC;
        }
        self.offered & wanted
    }

    fn config(&mut self) -> BlkConfig {
        let len = u32::try_from(BLK_CONFIG_LEN).unwrap();
        let (_, payload) = self
            .frontend
            .get_config(
                0,
                len,
                VhostUserConfigFlags::empty(),
                &[0u8; BLK_CONFIG_LEN],
            )
            .expect("GET_CONFIG");
        BlkConfig::parse(&payload).unwrap()
    }
}

/// Registers `mem` as the one guest memory region.
fn set_mem_table(frontend: &Frontend, mem: &GuestMemory) {
    let region = mem.region();
    let info = VhostUserMemoryRegionInfo {
        guest_phys_addr: region.guest_phys_addr,
        memory_size: region.memory_size,
        userspace_addr: region.userspace_addr,
        mmap_offset: region.mmap_offset,
        mmap_handle: region.fd.as_raw_fd(),
    };
    frontend.set_mem_table(&[info]).expect("SET_MEM_TABLE");
}

/// One virtqueue: its ring in guest memory and its two eventfds.
struct Vq {
    ring: SplitQueue,
    kick: Notifier,
    call: Notifier,
}

/// Sets the size, base and addresses of vring `index` (everything before the eventfds).
fn set_vring_layout(
    frontend: &Frontend,
    mem: &GuestMemory,
    index: u16,
    opts: Options,
) -> SplitQueue {
    let ring = SplitQueue::new(mem, index, opts.queue_size, opts.event_idx).unwrap();
    let i = usize::from(index);
    frontend
        .set_vring_num(i, opts.queue_size)
        .expect("SET_VRING_NUM");
    frontend
        .set_vring_base(i, ring.next_avail())
        .expect("SET_VRING_BASE");
    let addrs = ring.user_addrs(mem).unwrap();
    let config = VringConfigData {
        queue_max_size: opts.queue_size,
        queue_size: opts.queue_size,
        flags: 0,
        desc_table_addr: addrs.desc,
        used_ring_addr: addrs.used,
        avail_ring_addr: addrs.avail,
        log_addr: None,
    };
    frontend.set_vring_addr(i, &config).expect("SET_VRING_ADDR");
    ring
}

/// What the device did with one chain.
#[derive(Clone, Copy, Debug)]
struct Outcome {
    used: UsedElem,
    /// The status byte after completion; `None` when the test put it outside guest memory.
    status: Option<u8>,
}

/// A fully set-up connection: negotiated, memory shared, vrings started.
struct Session {
    hs: Handshake,
    acked: u64,
    mem: GuestMemory,
    queues: Vec<Vq>,
}

impl Session {
    fn open(socket: &Path) -> Session {
        Self::open_with(socket, Options::default())
    }

    fn open_with(socket: &Path, opts: Options) -> Session {
        Self::open_handshake(handshake(socket), opts)
    }

    fn open_stream(stream: std::os::unix::net::UnixStream) -> Session {
        Self::open_handshake(handshake_stream(stream), Options::default())
    }

    fn open_handshake(mut hs: Handshake, opts: Options) -> Session {
        let acked = hs.features_to_ack(opts);
        hs.frontend.set_features(acked).expect("SET_FEATURES");
        let mem = GuestMemory::new(GUEST_SIZE, GUEST_BASE).unwrap();
        set_mem_table(&hs.frontend, &mem);
        let mut queues = Vec::new();
        for index in 0..opts.num_queues {
            let ring = set_vring_layout(&hs.frontend, &mem, index, opts);
            let (kick, call) = (Notifier::new(), Notifier::new());
            let i = usize::from(index);
            hs.frontend
                .set_vring_call(i, &call.0)
                .expect("SET_VRING_CALL");
            hs.frontend
                .set_vring_kick(i, &kick.0)
                .expect("SET_VRING_KICK");
            hs.frontend
                .set_vring_enable(i, true)
                .expect("SET_VRING_ENABLE");
            queues.push(Vq { ring, kick, call });
        }
        Session {
            hs,
            acked,
            mem,
            queues,
        }
    }

    fn config(&mut self) -> BlkConfig {
        self.hs.config()
    }

    /// Publishes the chain at `head` on queue `q` and kicks.
    fn publish(&mut self, q: usize, head: u16) {
        let vq = &mut self.queues[q];
        vq.ring.publish(&self.mem, head).unwrap();
        vq.kick.0.write(1).unwrap();
    }

    /// Waits for the next used element on queue `q`; a timeout fails the test.
    fn wait(&mut self, q: usize) -> UsedElem {
        let vq = &mut self.queues[q];
        vq.ring
            .wait_used(&self.mem, vq.call.as_fd(), REQUEST_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}: the daemon dropped or hung on the chain"))
    }

    /// Submits `segs` as one direct chain on queue `q`, waits, and reads the status at `status`.
    fn request(&mut self, q: usize, segs: &[Segment], status: u64) -> Outcome {
        let head = self.queues[q].ring.add_chain(&self.mem, segs).unwrap();
        self.finish(q, head, status)
    }

    /// Publishes `head`, waits for it, and reads the status byte at `status`.
    fn finish(&mut self, q: usize, head: u16, status: u64) -> Outcome {
        self.publish(q, head);
        let used = self.wait(q);
        assert_eq!(
            used.id,
            u32::from(head),
            "used element names chain {} but {head} was the only one in flight",
            used.id
        );
        Outcome {
            used,
            status: self.mem.read_u8(status).ok(),
        }
    }

    fn header(&self, req_type: u32, sector: u64) -> u64 {
        self.mem.alloc_header(req_type, sector).unwrap()
    }

    fn status(&self) -> u64 {
        self.mem.alloc_status().unwrap()
    }

    /// A well-formed read of `len` bytes at `sector`.
    fn read(&mut self, q: usize, sector: u64, len: u32) -> (Outcome, Vec<u8>) {
        let hdr = self.header(VIRTIO_BLK_T_IN, sector);
        let data = self.mem.alloc_filled(u64::from(len), DATA_CANARY).unwrap();
        let status = self.status();
        let segs = [
            Segment::readable(hdr, BLK_HEADER_LEN),
            Segment::writable(data, len),
            Segment::writable(status, 1),
        ];
        let outcome = self.request(q, &segs, status);
        (outcome, self.mem.read(data, u64::from(len)).unwrap())
    }

    /// A well-formed write of `data` at `sector`.
    fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> Outcome {
        let hdr = self.header(VIRTIO_BLK_T_OUT, sector);
        let buf = self.mem.alloc_data(data).unwrap();
        let status = self.status();
        let len = u32::try_from(data.len()).unwrap();
        let segs = [
            Segment::readable(hdr, BLK_HEADER_LEN),
            Segment::readable(buf, len),
            Segment::writable(status, 1),
        ];
        self.request(q, &segs, status)
    }

    /// A request of `req_type` with no data: header and status only.
    fn bare(&mut self, q: usize, req_type: u32) -> Outcome {
        let hdr = self.header(req_type, 0);
        let status = self.status();
        let segs = [
            Segment::readable(hdr, BLK_HEADER_LEN),
            Segment::writable(status, 1),
        ];
        self.request(q, &segs, status)
    }

    /// GET_ID into a 20-byte buffer pre-filled with [`DATA_CANARY`].
    fn get_id(&mut self, q: usize) -> (Outcome, Vec<u8>) {
        let hdr = self.header(VIRTIO_BLK_T_GET_ID, 0);
        let id = self
            .mem
            .alloc_filled(u64::from(BLK_ID_BYTES), DATA_CANARY)
            .unwrap();
        let status = self.status();
        let segs = [
            Segment::readable(hdr, BLK_HEADER_LEN),
            Segment::writable(id, BLK_ID_BYTES),
            Segment::writable(status, 1),
        ];
        let outcome = self.request(q, &segs, status);
        (outcome, self.mem.read(id, u64::from(BLK_ID_BYTES)).unwrap())
    }

    /// A discard or write-zeroes request carrying `payload` (segments, or deliberately not).
    fn discard_like(&mut self, q: usize, req_type: u32, payload: &[u8]) -> Outcome {
        let hdr = self.header(req_type, 0);
        let buf = self.mem.alloc_data(payload).unwrap();
        let status = self.status();
        let segs = [
            Segment::readable(hdr, BLK_HEADER_LEN),
            Segment::readable(buf, u32::try_from(payload.len()).unwrap()),
            Segment::writable(status, 1),
        ];
        self.request(q, &segs, status)
    }

    /// The contract's check after every hostile request: a normal read on the same queue works.
    fn assert_still_serving(&mut self, q: usize, after: &str) {
        let (outcome, _) = self.read(q, 0, 512);
        assert_eq!(
            outcome.status,
            Some(VIRTIO_BLK_S_OK),
            "a normal read on queue {q} after {after} did not succeed: {outcome:?}"
        );
    }
}

/// A daemon serving a fresh raw image in a private directory.
struct Fixture {
    daemon: Daemon,
    image: PathBuf,
    _dir: TempDir,
}

impl Fixture {
    /// Starts `kind` on a new image; `configure` adjusts the options. The image holds
    /// [`image_byte`] everywhere, so every sector is distinguishable and non-zero.
    fn start(kind: BackendKind, configure: impl FnOnce(&mut DiskOptions)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, image_bytes(0, IMAGE_SIZE)).unwrap();
        let socket = dir.path().join("vhost.sock");
        let mut opts = DiskOptions::raw(&image);
        configure(&mut opts);
        let daemon = Daemon::start(kind, &opts, &socket)
            .unwrap_or_else(|e| panic!("starting {kind:?}: {e:#}"));
        Fixture {
            daemon,
            image,
            _dir: dir,
        }
    }

    /// Starts vublk with extra command-line arguments.
    fn vublk(args: &[&str], configure: impl FnOnce(&mut DiskOptions)) -> Fixture {
        Self::start(BackendKind::Vublk, |o| {
            o.extra_args = args.iter().map(|a| a.to_string()).collect();
            configure(o);
        })
    }

    fn socket(&self) -> &Path {
        &self.daemon.socket
    }

    fn open(&self) -> Session {
        Session::open(self.socket())
    }

    fn file_bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; usize::try_from(len).unwrap()];
        File::open(&self.image)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    /// Asserts that the image still holds its initial content at `sector..sector+count`.
    fn assert_sectors_unchanged(&self, sector: u64, count: u64, what: &str) {
        let offset = sector * SECTOR_SIZE;
        let actual = self.file_bytes(offset, count * SECTOR_SIZE);
        let expected: Vec<u8> = (offset..offset + count * SECTOR_SIZE)
            .map(image_byte)
            .collect();
        assert!(
            actual == expected,
            "{what}: the image changed at sector {sector}"
        );
        let len = std::fs::metadata(&self.image).unwrap().len();
        assert_eq!(len, IMAGE_SIZE, "{what}: the image size changed");
    }

    fn assert_alive(&mut self, after: &str) {
        let status = self.daemon.child.try_wait().unwrap();
        assert!(
            status.is_none(),
            "the daemon exited after {after}: {status:?}"
        );
    }
}

/// The initial content of the image at byte `offset`: varies within and across sectors.
fn image_byte(offset: u64) -> u8 {
    let sector = offset / SECTOR_SIZE;
    (offset % 251).to_le_bytes()[0] ^ sector.to_le_bytes()[0] ^ 0x80
}

fn image_bytes(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(image_byte).collect()
}

fn assert_status(outcome: Outcome, want: u8, what: &str) {
    assert_eq!(
        outcome.status,
        Some(want),
        "{what}: want status {want}, device returned {outcome:?}"
    );
    assert!(
        outcome.used.len >= 1,
        "{what}: status written but used len is 0 ({outcome:?})"
    );
}

/// A chain with no usable status descriptor: returned with len 0 and no status written.
fn assert_returned_unwritten(outcome: Outcome, what: &str) {
    assert_eq!(
        outcome.used.len, 0,
        "{what}: want used len 0, device returned {outcome:?}"
    );
    if let Some(status) = outcome.status {
        assert_eq!(status, STATUS_CANARY, "{what}: status byte was written");
    }
}

/// A malformed chain (a loop, an overlong chain): returned with len 0, or failed with IOERR.
fn assert_refused_chain(outcome: Outcome, what: &str) {
    let unwritten = outcome.used.len == 0 && outcome.status.is_none_or(|s| s == STATUS_CANARY);
    let ioerr = outcome.status == Some(VIRTIO_BLK_S_IOERR);
    assert!(
        unwritten || ioerr,
        "{what}: want used len 0 or IOERR, device returned {outcome:?}"
    );
}

fn assert_untouched(bytes: &[u8], what: &str) {
    assert!(
        bytes.iter().all(|&b| b == DATA_CANARY),
        "{what}: the device wrote into a buffer it had to leave alone"
    );
}

/// Like `both_backends!`, but the QSD run is ignored: the scenario is vublk's contract for
/// hostile input, which QSD does not follow. `cargo test -- --ignored` runs it to compare.
macro_rules! vublk_contract {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use vublk_tests::daemon::BackendKind;

            #[test]
            fn vublk() {
                super::$scenario(BackendKind::Vublk)
            }

            #[test]
            #[ignore = "qemu-storage-daemon is not held to vublk's hostile-request contract"]
            fn qsd() {
                super::$scenario(BackendKind::Qsd)
            }
        }
    )*};
}

// ---------------------------------------------------------------------------------------------
// The normal path, on both backends.

vublk_tests::both_backends!(
    read_returns_the_image_files_bytes,
    write_lands_in_the_image_file,
    flush_completes_with_ok,
    get_id_completes_with_ok,
    header_split_across_two_descriptors_is_accepted,
    data_split_across_many_descriptors_is_accepted,
    event_idx_and_indirect_descriptors_serve_requests,
    second_queue_serves_requests,
    config_reports_capacity_in_sectors_and_num_queues,
    protocol_features_include_config_mq_reply_ack_and_mem_slots,
    reconnected_frontend_reads_the_previous_frontends_write,
    disconnect_after_set_mem_table_leaves_the_daemon_serving,
    disconnect_after_vring_setup_before_kick_leaves_the_daemon_serving,
);

fn read_returns_the_image_files_bytes(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();

    let (outcome, data) = s.read(0, 100, 4096);

    assert_status(outcome, VIRTIO_BLK_S_OK, "read");
    assert!(
        data == image_bytes(100 * 512, 4096),
        "read data differs from the image file"
    );
    // virtio 1.2, 2.7.8: len is the number of bytes written into the chain (data + status).
    assert_eq!(outcome.used.len, 4096 + 1, "used len of a 4 KiB read");
}

fn write_lands_in_the_image_file(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7).to_le_bytes()[0]).collect();

    let outcome = s.write(0, 64, &data);

    assert_status(outcome, VIRTIO_BLK_S_OK, "write");
    assert!(
        fx.file_bytes(64 * 512, 8192) == data,
        "image file differs from the write"
    );
    fx.assert_sectors_unchanged(63, 1, "sector before the write");
    fx.assert_sectors_unchanged(80, 1, "sector after the write");
}

fn flush_completes_with_ok(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    assert_status(s.write(0, 8, &[1u8; 512]), VIRTIO_BLK_S_OK, "write");

    let outcome = s.bare(0, VIRTIO_BLK_T_FLUSH);

    assert_status(outcome, VIRTIO_BLK_S_OK, "flush");
}

fn get_id_completes_with_ok(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();

    let (outcome, _) = s.get_id(0);

    assert_status(outcome, VIRTIO_BLK_S_OK, "GET_ID");
}

/// virtio 1.x drivers may frame requests freely (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1):
/// a header in two descriptors of 8 bytes is a valid request.
fn header_split_across_two_descriptors_is_accepted(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let hdr = s.header(VIRTIO_BLK_T_IN, 200);
    let data = s.mem.alloc_filled(512, DATA_CANARY).unwrap();
    let status = s.status();
    let segs = [
        Segment::readable(hdr, 8),
        Segment::readable(hdr + 8, 8),
        Segment::writable(data, 512),
        Segment::writable(status, 1),
    ];

    let outcome = s.request(0, &segs, status);

    assert_status(outcome, VIRTIO_BLK_S_OK, "read with a split header");
    assert!(s.mem.read(data, 512).unwrap() == image_bytes(200 * 512, 512));
}

/// A read scattered over many small descriptors (within seg_max) lands in order.
fn data_split_across_many_descriptors_is_accepted(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let pieces = 32u64;
    let hdr = s.header(VIRTIO_BLK_T_IN, 300);
    let data = s.mem.alloc_filled(pieces * 512, DATA_CANARY).unwrap();
    let status = s.status();
    let mut segs = vec![Segment::readable(hdr, BLK_HEADER_LEN)];
    // Fill the buffer back to front, so a device that ignores the order shows up.
    segs.extend(
        (0..pieces)
            .rev()
            .map(|i| Segment::writable(data + i * 512, 512)),
    );
    segs.push(Segment::writable(status, 1));

    let outcome = s.request(0, &segs, status);

    assert_status(outcome, VIRTIO_BLK_S_OK, "scattered read");
    let got = s.mem.read(data, pieces * 512).unwrap();
    for (i, chunk) in got.chunks(512).enumerate() {
        let device_offset = (300 + pieces - 1 - i as u64) * 512;
        assert!(
            chunk == image_bytes(device_offset, 512),
            "segment {i} holds the wrong sector"
        );
    }
}

fn event_idx_and_indirect_descriptors_serve_requests(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let opts = Options {
        event_idx: true,
        indirect: true,
        ..Options::default()
    };
    let mut s = Session::open_with(fx.socket(), opts);
    assert_ne!(s.acked & F_EVENT_IDX, 0, "RING_EVENT_IDX not offered");
    assert_ne!(
        s.acked & F_INDIRECT_DESC,
        0,
        "RING_INDIRECT_DESC not offered"
    );

    // Several round trips, so the used_event handshake is exercised more than once.
    for i in 0..5u64 {
        let (outcome, data) = s.read(0, 10 + i, 512);
        assert_status(outcome, VIRTIO_BLK_S_OK, "direct read with EVENT_IDX");
        assert!(data == image_bytes((10 + i) * 512, 512));
    }
    let hdr = s.header(VIRTIO_BLK_T_IN, 40);
    let data = s.mem.alloc_filled(1024, DATA_CANARY).unwrap();
    let status = s.status();
    let segs = [
        Segment::readable(hdr, BLK_HEADER_LEN),
        Segment::writable(data, 1024),
        Segment::writable(status, 1),
    ];
    let (head, _) = s.queues[0].ring.add_indirect(&s.mem, &segs).unwrap();
    let outcome = s.finish(0, head, status);

    assert_status(outcome, VIRTIO_BLK_S_OK, "indirect read");
    assert!(s.mem.read(data, 1024).unwrap() == image_bytes(40 * 512, 1024));
}

fn second_queue_serves_requests(kind: BackendKind) {
    let fx = Fixture::start(kind, |o| o.num_queues = 2);
    let opts = Options {
        num_queues: 2,
        ..Options::default()
    };
    let mut s = Session::open_with(fx.socket(), opts);
    let data = [0x33u8; 1024];

    let written = s.write(1, 500, &data);
    let (read, back) = s.read(0, 500, 1024);

    assert_status(written, VIRTIO_BLK_S_OK, "write on queue 1");
    assert_status(read, VIRTIO_BLK_S_OK, "read on queue 0");
    assert!(back == data, "queue 0 does not see queue 1's write");
}

fn config_reports_capacity_in_sectors_and_num_queues(kind: BackendKind) {
    let fx = Fixture::start(kind, |o| o.num_queues = 3);
    let mut hs = handshake(fx.socket());

    let cfg = hs.config();

    assert_eq!(cfg.capacity, IMAGE_SECTORS, "capacity (512-byte sectors)");
    assert_eq!(hs.queue_num, 3, "GET_QUEUE_NUM");
    assert_ne!(hs.offered & bit(VIRTIO_BLK_F_MQ), 0, "MQ not offered");
    assert_eq!(cfg.num_queues, 3, "config num_queues");
    if hs.offered & bit(VIRTIO_BLK_F_BLK_SIZE) != 0 {
        assert_eq!(cfg.blk_size, 512, "blk_size");
    }
}

fn protocol_features_include_config_mq_reply_ack_and_mem_slots(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});

    let hs = handshake(fx.socket());

    // CONFIG and MQ carry the config space and queue count; REPLY_ACK and
    // CONFIGURE_MEM_SLOTS are required by libblkio's vhost-user driver.
    let needed = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(
        hs.protocol_offered.contains(needed),
        "protocol features {:?} lack some of {needed:?}",
        hs.protocol_offered
    );
    assert_eq!(hs.protocol, needed);
}

fn reconnected_frontend_reads_the_previous_frontends_write(kind: BackendKind) {
    let mut fx = Fixture::start(kind, |_| {});
    let data = [0x77u8; 2048];
    let mut first = fx.open();
    assert_status(first.write(0, 1000, &data), VIRTIO_BLK_S_OK, "first write");
    drop(first);

    let mut second = fx.open();
    let (outcome, back) = second.read(0, 1000, 2048);

    assert_status(outcome, VIRTIO_BLK_S_OK, "read after reconnect");
    assert!(
        back == data,
        "the second frontend does not see the first one's write"
    );
    fx.assert_alive("a reconnect");
}

fn disconnect_after_set_mem_table_leaves_the_daemon_serving(kind: BackendKind) {
    let mut fx = Fixture::start(kind, |_| {});
    let hs = handshake(fx.socket());
    let acked = hs.features_to_ack(Options::default());
    hs.frontend.set_features(acked).unwrap();
    let mem = GuestMemory::new(GUEST_SIZE, GUEST_BASE).unwrap();
    set_mem_table(&hs.frontend, &mem);
    drop(hs);

    let mut s = fx.open();
    let (outcome, data) = s.read(0, 7, 512);

    assert_status(outcome, VIRTIO_BLK_S_OK, "read on the next connection");
    assert!(data == image_bytes(7 * 512, 512));
    fx.assert_alive("a disconnect after SET_MEM_TABLE");
}

fn disconnect_after_vring_setup_before_kick_leaves_the_daemon_serving(kind: BackendKind) {
    let mut fx = Fixture::start(kind, |_| {});
    let hs = handshake(fx.socket());
    let opts = Options::default();
    let acked = hs.features_to_ack(opts);
    hs.frontend.set_features(acked).unwrap();
    let mem = GuestMemory::new(GUEST_SIZE, GUEST_BASE).unwrap();
    set_mem_table(&hs.frontend, &mem);
    let _ring = set_vring_layout(&hs.frontend, &mem, 0, opts);
    let call = Notifier::new();
    hs.frontend.set_vring_call(0, &call.0).unwrap();
    drop(hs);

    let mut s = fx.open();
    let (outcome, _) = s.read(0, 7, 512);

    assert_status(outcome, VIRTIO_BLK_S_OK, "read on the next connection");
    fx.assert_alive("a disconnect before SET_VRING_KICK");
}

// ---------------------------------------------------------------------------------------------
// What vublk offers: features and config space following its command line.

#[test]
fn get_id_returns_the_serial_zero_padded() {
    let fx = Fixture::vublk(&["--serial", "vublk-serial-7"], |_| {});
    let mut s = fx.open();

    let (outcome, id) = s.get_id(0);

    assert_status(outcome, VIRTIO_BLK_S_OK, "GET_ID");
    let mut want = b"vublk-serial-7".to_vec();
    want.resize(20, 0);
    assert_eq!(
        id,
        want,
        "GET_ID buffer: {:?}",
        String::from_utf8_lossy(&id)
    );
}

#[test]
fn get_id_returns_a_20_byte_serial_without_terminator() {
    let serial = "ABCDEFGHIJKLMNOPQRST";
    let fx = Fixture::vublk(&["--serial", serial], |_| {});
    let mut s = fx.open();

    let (outcome, id) = s.get_id(0);

    assert_status(outcome, VIRTIO_BLK_S_OK, "GET_ID");
    assert_eq!(id, serial.as_bytes(), "GET_ID buffer");
}

#[test]
fn features_offered_for_a_writable_disk_with_discard() {
    let fx = Fixture::vublk(&["--discard", "unmap"], |o| o.num_queues = 2);

    let hs = handshake(fx.socket());

    let want = [
        ("VERSION_1", F_VERSION_1),
        ("VHOST_USER_F_PROTOCOL_FEATURES", F_PROTOCOL_FEATURES),
        ("RING_EVENT_IDX", F_EVENT_IDX),
        ("RING_INDIRECT_DESC", F_INDIRECT_DESC),
        ("SEG_MAX", bit(VIRTIO_BLK_F_SEG_MAX)),
        ("SIZE_MAX", bit(VIRTIO_BLK_F_SIZE_MAX)),
        ("BLK_SIZE", bit(VIRTIO_BLK_F_BLK_SIZE)),
        ("TOPOLOGY", bit(VIRTIO_BLK_F_TOPOLOGY)),
        ("FLUSH", bit(VIRTIO_BLK_F_FLUSH)),
        ("CONFIG_WCE", bit(VIRTIO_BLK_F_CONFIG_WCE)),
        ("MQ", bit(VIRTIO_BLK_F_MQ)),
        ("WRITE_ZEROES", bit(VIRTIO_BLK_F_WRITE_ZEROES)),
        ("DISCARD", bit(VIRTIO_BLK_F_DISCARD)),
    ];
    let missing: Vec<&str> = want
        .iter()
        .filter(|(_, b)| hs.offered & b == 0)
        .map(|(name, _)| *name)
        .collect();
    assert!(
        missing.is_empty(),
        "not offered: {missing:?} (features {:#x})",
        hs.offered
    );
    assert_eq!(
        hs.offered & bit(VIRTIO_BLK_F_RO),
        0,
        "RO offered for a writable disk"
    );
}

/// `--discard ignore` is the default, and its help says it does not offer discard.
#[test]
fn discard_is_not_offered_without_discard_unmap() {
    let fx = Fixture::vublk(&[], |_| {});

    let hs = handshake(fx.socket());

    assert_eq!(
        hs.offered & bit(VIRTIO_BLK_F_DISCARD),
        0,
        "DISCARD offered without --discard unmap"
    );
    assert_ne!(
        hs.offered & bit(VIRTIO_BLK_F_WRITE_ZEROES),
        0,
        "WRITE_ZEROES not offered on a writable disk"
    );
}

#[test]
fn features_offered_for_a_read_only_disk() {
    let fx = Fixture::vublk(&["--discard", "unmap"], |o| o.read_only = true);

    let hs = handshake(fx.socket());

    assert_ne!(
        hs.offered & bit(VIRTIO_BLK_F_RO),
        0,
        "RO not offered with --read-only"
    );
    assert_eq!(
        hs.offered & bit(VIRTIO_BLK_F_WRITE_ZEROES),
        0,
        "WRITE_ZEROES offered on a read-only disk"
    );
    assert_eq!(
        hs.offered & bit(VIRTIO_BLK_F_DISCARD),
        0,
        "DISCARD offered on a read-only disk"
    );
    assert_ne!(hs.offered & bit(VIRTIO_BLK_F_FLUSH), 0, "FLUSH not offered");
}

#[test]
fn config_seg_max_is_the_default_queue_size_minus_two() {
    let fx = Fixture::vublk(&[], |_| {});
    let mut hs = handshake(fx.socket());

    let cfg = hs.config();

    assert_eq!(
        cfg.seg_max,
        u32::from(QUEUE_SIZE) - 2,
        "seg_max with --queue-size 256"
    );
    assert_ne!(cfg.size_max, 0, "size_max");
}

#[test]
fn config_seg_max_follows_queue_size() {
    let fx = Fixture::vublk(&["--queue-size", "128"], |_| {});
    let mut hs = handshake(fx.socket());

    let cfg = hs.config();

    assert_eq!(cfg.seg_max, 126, "seg_max with --queue-size 128");
}

#[test]
fn config_writeback_is_set_with_cache_writeback() {
    let fx = Fixture::vublk(&[], |o| o.direct = false);
    let mut hs = handshake(fx.socket());

    let cfg = hs.config();

    assert_ne!(hs.offered & bit(VIRTIO_BLK_F_CONFIG_WCE), 0, "CONFIG_WCE");
    assert_eq!(
        cfg.writeback, 1,
        "config byte 32 (writeback) with --cache writeback"
    );
}

/// O_DIRECT bypasses the page cache but not the disk's volatile cache: like QEMU's
/// `cache=none` (direct, write cache on), the guest must still be told to flush.
#[test]
fn config_writeback_is_set_with_cache_none() {
    let fx = Fixture::vublk(&[], |o| o.direct = true);
    let mut hs = handshake(fx.socket());

    let cfg = hs.config();

    assert_eq!(
        cfg.writeback, 1,
        "config byte 32 (writeback) with --cache none"
    );
}

#[test]
fn config_blk_size_follows_logical_block_size_and_capacity_stays_in_sectors() {
    let fx = Fixture::vublk(&["--logical-block-size", "4096"], |_| {});
    let mut hs = handshake(fx.socket());

    let cfg = hs.config();

    assert_eq!(cfg.blk_size, 4096, "blk_size");
    // The image is not a multiple of 4 KiB: the device may round down to whole blocks.
    let whole_blocks = IMAGE_SIZE / 4096 * 8;
    assert!(
        cfg.capacity == IMAGE_SECTORS || cfg.capacity == whole_blocks,
        "capacity {} is not in 512-byte sectors ({IMAGE_SECTORS} or {whole_blocks})",
        cfg.capacity
    );
}

#[test]
fn config_discard_and_write_zeroes_limits_are_nonzero_when_offered() {
    let fx = Fixture::vublk(&["--discard", "unmap"], |_| {});
    let mut hs = handshake(fx.socket());

    let cfg = hs.config();

    assert_ne!(cfg.max_discard_sectors, 0, "max_discard_sectors");
    assert_ne!(cfg.max_discard_seg, 0, "max_discard_seg");
    assert_ne!(cfg.max_write_zeroes_sectors, 0, "max_write_zeroes_sectors");
    assert_ne!(cfg.max_write_zeroes_seg, 0, "max_write_zeroes_seg");
}

#[test]
fn discard_through_the_ring_zeroes_the_file_range() {
    let fx = Fixture::vublk(&["--discard", "unmap"], |_| {});
    let mut s = fx.open();

    let outcome = s.discard_like(0, VIRTIO_BLK_T_DISCARD, &discard_segment(2048, 256, 0));

    assert_status(outcome, VIRTIO_BLK_S_OK, "discard");
    assert!(
        fx.file_bytes(2048 * 512, 256 * 512).iter().all(|&b| b == 0),
        "discarded range is not zero in the image file"
    );
    fx.assert_sectors_unchanged(2047, 1, "sector before the discard");
    fx.assert_sectors_unchanged(2048 + 256, 1, "sector after the discard");
}

// ---------------------------------------------------------------------------------------------
// Hostile requests: each fails alone, and the same queue keeps serving.

vublk_contract!(
    unknown_request_type_gets_unsupp,
    read_past_capacity_gets_ioerr,
    write_past_capacity_gets_ioerr_and_changes_nothing,
    data_length_not_a_multiple_of_512_gets_ioerr,
    write_on_a_read_only_device_gets_ioerr_and_changes_nothing,
    header_shorter_than_16_bytes_gets_ioerr,
    read_into_a_device_readable_buffer_gets_ioerr,
    write_from_a_device_writable_buffer_gets_ioerr,
    data_buffer_outside_guest_memory_gets_ioerr,
    status_outside_guest_memory_is_returned_with_len_0,
    read_only_status_is_returned_with_len_0,
    zero_length_status_is_returned_with_len_0,
    looping_chain_is_returned_not_hung,
    next_index_past_the_queue_is_returned_not_hung,
    indirect_chain_longer_than_the_queue_is_refused,
    looping_indirect_table_is_returned_not_hung,
    nested_indirect_table_is_refused,
    discard_and_write_zeroes_with_unknown_flags_get_unsupp,
    discard_with_the_unmap_flag_gets_unsupp,
    discard_payload_not_a_multiple_of_16_gets_ioerr,
    discard_with_more_segments_than_max_discard_seg_gets_unsupp,
    discard_and_write_zeroes_past_the_end_get_ioerr,
    discard_and_write_zeroes_on_a_read_only_device_fail,
    avail_index_far_ahead_does_not_kill_the_daemon,
);

/// Starts `kind` with discard enabled where the backend has a switch for it.
fn start_with_discard(kind: BackendKind) -> Fixture {
    match kind {
        BackendKind::Vublk => Fixture::vublk(&["--discard", "unmap"], |_| {}),
        BackendKind::Qsd => Fixture::start(kind, |_| {}),
    }
}

fn unknown_request_type_gets_unsupp(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();

    for req_type in [0x7f, 0xffff_ffff] {
        let what = format!("request type {req_type:#x}");

        let outcome = s.bare(0, req_type);

        assert_status(outcome, VIRTIO_BLK_S_UNSUPP, &what);
        s.assert_still_serving(0, &what);
    }
}

fn read_past_capacity_gets_ioerr(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let cases = [
        ("a read at the capacity", IMAGE_SECTORS, 512),
        ("a read straddling the end", IMAGE_SECTORS - 1, 1024),
        ("a read far past the end", IMAGE_SECTORS + 1_000_000, 512),
        ("a read whose byte offset overflows", u64::MAX, 512),
        ("a read whose end overflows", u64::MAX / 512, 4096),
    ];

    for (what, sector, len) in cases {
        let (outcome, data) = s.read(0, sector, len);

        assert_status(outcome, VIRTIO_BLK_S_IOERR, what);
        assert_untouched(&data, what);
        s.assert_still_serving(0, what);
    }
}

fn write_past_capacity_gets_ioerr_and_changes_nothing(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let cases = [
        ("a write at the capacity", IMAGE_SECTORS, 512usize),
        ("a write straddling the end", IMAGE_SECTORS - 1, 1024),
        ("a write whose byte offset overflows", u64::MAX, 512),
    ];

    for (what, sector, len) in cases {
        let outcome = s.write(0, sector, &vec![0xeeu8; len]);

        assert_status(outcome, VIRTIO_BLK_S_IOERR, what);
        fx.assert_sectors_unchanged(IMAGE_SECTORS - 1, 1, what);
        s.assert_still_serving(0, what);
    }
}

fn data_length_not_a_multiple_of_512_gets_ioerr(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();

    for len in [100u32, 513, 4095] {
        let what = format!("a read of {len} bytes");
        let (outcome, _) = s.read(0, 16, len);
        assert_status(outcome, VIRTIO_BLK_S_IOERR, &what);
        s.assert_still_serving(0, &what);

        let what = format!("a write of {len} bytes");
        let outcome = s.write(0, 16, &vec![0xeeu8; len as usize]);
        assert_status(outcome, VIRTIO_BLK_S_IOERR, &what);
        fx.assert_sectors_unchanged(16, 9, &what);
        s.assert_still_serving(0, &what);
    }
}

fn write_on_a_read_only_device_gets_ioerr_and_changes_nothing(kind: BackendKind) {
    let fx = Fixture::start(kind, |o| o.read_only = true);
    let mut s = fx.open();

    let outcome = s.write(0, 0, &[0xeeu8; 4096]);

    assert_status(outcome, VIRTIO_BLK_S_IOERR, "a write on a read-only device");
    fx.assert_sectors_unchanged(0, 8, "a write on a read-only device");
    s.assert_still_serving(0, "a write on a read-only device");
}

fn header_shorter_than_16_bytes_gets_ioerr(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();

    for hdr_len in [0u32, 8, 15] {
        let what = format!("a {hdr_len}-byte header");
        let hdr = s.header(VIRTIO_BLK_T_IN, 0);
        let data = s.mem.alloc_filled(512, DATA_CANARY).unwrap();
        let status = s.status();
        let mut segs = Vec::new();
        if hdr_len > 0 {
            segs.push(Segment::readable(hdr, hdr_len));
        }
        segs.push(Segment::writable(data, 512));
        segs.push(Segment::writable(status, 1));

        let outcome = s.request(0, &segs, status);

        assert_status(outcome, VIRTIO_BLK_S_IOERR, &what);
        s.assert_still_serving(0, &what);
    }
}

fn read_into_a_device_readable_buffer_gets_ioerr(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let what = "a read whose data buffer is device-readable";
    let hdr = s.header(VIRTIO_BLK_T_IN, 0);
    let data = s.mem.alloc_filled(512, DATA_CANARY).unwrap();
    let status = s.status();
    let segs = [
        Segment::readable(hdr, BLK_HEADER_LEN),
        Segment::readable(data, 512),
        Segment::writable(status, 1),
    ];

    let outcome = s.request(0, &segs, status);

    assert_status(outcome, VIRTIO_BLK_S_IOERR, what);
    assert_untouched(&s.mem.read(data, 512).unwrap(), what);
    s.assert_still_serving(0, what);
}

fn write_from_a_device_writable_buffer_gets_ioerr(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let what = "a write whose data buffer is device-writable";
    let hdr = s.header(VIRTIO_BLK_T_OUT, 0);
    let data = s.mem.alloc_filled(512, DATA_CANARY).unwrap();
    let status = s.status();
    let segs = [
        Segment::readable(hdr, BLK_HEADER_LEN),
        Segment::writable(data, 512),
        Segment::writable(status, 1),
    ];

    let outcome = s.request(0, &segs, status);

    assert_status(outcome, VIRTIO_BLK_S_IOERR, what);
    assert_untouched(&s.mem.read(data, 512).unwrap(), what);
    fx.assert_sectors_unchanged(0, 1, what);
    s.assert_still_serving(0, what);
}

fn data_buffer_outside_guest_memory_gets_ioerr(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let (base, end) = (s.mem.base(), s.mem.end());
    let cases = [
        ("just past the end of guest memory", end),
        ("straddling the end of guest memory", end - 256),
        ("below the start of guest memory", base - 4096),
        ("at guest-physical 0", 0),
        ("wrapping around the address space", u64::MAX - 255),
    ];

    for (where_, addr) in cases {
        let what = format!("a read into a buffer {where_}");
        let hdr = s.header(VIRTIO_BLK_T_IN, 0);
        let status = s.status();
        let segs = [
            Segment::readable(hdr, BLK_HEADER_LEN),
            Segment::writable(addr, 512),
            Segment::writable(status, 1),
        ];
        let outcome = s.request(0, &segs, status);
        assert_status(outcome, VIRTIO_BLK_S_IOERR, &what);
        s.assert_still_serving(0, &what);

        let what = format!("a write from a buffer {where_}");
        let hdr = s.header(VIRTIO_BLK_T_OUT, 0);
        let status = s.status();
        let segs = [
            Segment::readable(hdr, BLK_HEADER_LEN),
            Segment::readable(addr, 512),
            Segment::writable(status, 1),
        ];
        let outcome = s.request(0, &segs, status);
        assert_status(outcome, VIRTIO_BLK_S_IOERR, &what);
        fx.assert_sectors_unchanged(0, 1, &what);
        s.assert_still_serving(0, &what);
    }
}

/// Sends a read whose status descriptor is replaced by `status_seg`; checks the contract.
fn bad_status_case(s: &mut Session, status_seg: Segment, what: &str) {
    let hdr = s.header(VIRTIO_BLK_T_IN, 0);
    let data = s.mem.alloc_filled(512, DATA_CANARY).unwrap();
    let segs = [
        Segment::readable(hdr, BLK_HEADER_LEN),
        Segment::writable(data, 512),
        status_seg,
    ];

    let outcome = s.request(0, &segs, status_seg.addr);

    assert_returned_unwritten(outcome, what);
    assert_untouched(&s.mem.read(data, 512).unwrap(), what);
    s.assert_still_serving(0, what);
}

fn status_outside_guest_memory_is_returned_with_len_0(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let end = s.mem.end();

    bad_status_case(
        &mut s,
        Segment::writable(end, 1),
        "a status byte past guest memory",
    );
    bad_status_case(
        &mut s,
        Segment::writable(u64::MAX, 1),
        "a status byte at the top of the address space",
    );
}

fn read_only_status_is_returned_with_len_0(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let status = s.status();

    bad_status_case(
        &mut s,
        Segment::readable(status, 1),
        "a device-readable status byte",
    );
}

fn zero_length_status_is_returned_with_len_0(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let status = s.status();

    bad_status_case(
        &mut s,
        Segment::writable(status, 0),
        "a zero-length status descriptor",
    );
}

/// A normal read chain of header, 512-byte buffer and status, not yet published.
fn read_chain(s: &mut Session) -> (u16, u64) {
    let hdr = s.header(VIRTIO_BLK_T_IN, 0);
    let data = s.mem.alloc_filled(512, DATA_CANARY).unwrap();
    let status = s.status();
    let segs = [
        Segment::readable(hdr, BLK_HEADER_LEN),
        Segment::writable(data, 512),
        Segment::writable(status, 1),
    ];
    let head = s.queues[0].ring.add_chain(&s.mem, &segs).unwrap();
    (head, status)
}

fn looping_chain_is_returned_not_hung(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let what = "a chain whose last descriptor points back at its head";
    let (head, status) = read_chain(&mut s);
    let ring = &s.queues[0].ring;
    let mut last = ring.read_desc(&s.mem, head + 2).unwrap();
    last.flags |= VRING_DESC_F_NEXT;
    last.next = head;
    ring.write_desc(&s.mem, head + 2, last).unwrap();

    let outcome = s.finish(0, head, status);

    assert_refused_chain(outcome, what);
    s.assert_still_serving(0, what);
}

fn next_index_past_the_queue_is_returned_not_hung(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let what = "a chain whose next index is past the queue size";
    let (head, status) = read_chain(&mut s);
    let ring = &s.queues[0].ring;
    let mut first = ring.read_desc(&s.mem, head).unwrap();
    first.next = ring.size() + 5;
    ring.write_desc(&s.mem, head, first).unwrap();

    let outcome = s.finish(0, head, status);

    assert_refused_chain(outcome, what);
    s.assert_still_serving(0, what);
}

fn indirect_chain_longer_than_the_queue_is_refused(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    assert_ne!(
        s.acked & F_INDIRECT_DESC,
        0,
        "RING_INDIRECT_DESC not offered"
    );
    let what = "an indirect chain longer than the queue size";
    let n_data = u64::from(s.queues[0].ring.size());
    let hdr = s.header(VIRTIO_BLK_T_IN, 0);
    let data = s.mem.alloc_filled(n_data * 512, DATA_CANARY).unwrap();
    let status = s.status();
    let mut segs = vec![Segment::readable(hdr, BLK_HEADER_LEN)];
    segs.extend((0..n_data).map(|i| Segment::writable(data + i * 512, 512)));
    segs.push(Segment::writable(status, 1));
    let (head, _) = s.queues[0].ring.add_indirect(&s.mem, &segs).unwrap();

    let outcome = s.finish(0, head, status);

    assert_refused_chain(outcome, what);
    s.assert_still_serving(0, what);
}

fn looping_indirect_table_is_returned_not_hung(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let what = "an indirect table whose last entry points back at its first";
    let hdr = s.header(VIRTIO_BLK_T_IN, 0);
    let data = s.mem.alloc_filled(512, DATA_CANARY).unwrap();
    let status = s.status();
    let segs = [
        Segment::readable(hdr, BLK_HEADER_LEN),
        Segment::writable(data, 512),
        Segment::writable(status, 1),
    ];
    let (head, table) = s.queues[0].ring.add_indirect(&s.mem, &segs).unwrap();
    let looped = Desc {
        addr: status,
        len: 1,
        flags: VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        next: 0,
    };
    write_desc_at(&s.mem, table, 2, looped).unwrap();

    let outcome = s.finish(0, head, status);

    assert_refused_chain(outcome, what);
    s.assert_still_serving(0, what);
}

fn nested_indirect_table_is_refused(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let what = "an indirect descriptor inside an indirect table";
    let hdr = s.header(VIRTIO_BLK_T_IN, 0);
    let data = s.mem.alloc_filled(512, DATA_CANARY).unwrap();
    let status = s.status();
    let inner_segs = [Segment::writable(data, 512), Segment::writable(status, 1)];
    // The inner table is built like any chain, then referenced from the outer one.
    let inner = s.mem.alloc(2 * 16, 16).unwrap();
    for (i, seg) in inner_segs.iter().enumerate() {
        let desc = Desc {
            addr: seg.addr,
            len: seg.len,
            flags: VRING_DESC_F_WRITE | if i == 0 { VRING_DESC_F_NEXT } else { 0 },
            next: if i == 0 { 1 } else { 0 },
        };
        write_desc_at(&s.mem, inner, i as u64, desc).unwrap();
    }
    let outer_segs = [
        Segment::readable(hdr, BLK_HEADER_LEN),
        Segment::readable(inner, 32),
    ];
    let (head, outer) = s.queues[0].ring.add_indirect(&s.mem, &outer_segs).unwrap();
    let nested = Desc {
        addr: inner,
        len: 32,
        flags: VRING_DESC_F_INDIRECT,
        next: 0,
    };
    write_desc_at(&s.mem, outer, 1, nested).unwrap();

    let outcome = s.finish(0, head, status);

    assert_refused_chain(outcome, what);
    s.assert_still_serving(0, what);
}

fn discard_and_write_zeroes_with_unknown_flags_get_unsupp(kind: BackendKind) {
    let fx = start_with_discard(kind);
    let mut s = fx.open();

    for (name, req_type) in [
        ("discard", VIRTIO_BLK_T_DISCARD),
        ("write-zeroes", VIRTIO_BLK_T_WRITE_ZEROES),
    ] {
        let what = format!("a {name} with unknown flag bit 1");

        let outcome = s.discard_like(0, req_type, &discard_segment(64, 8, 0x2));

        assert_status(outcome, VIRTIO_BLK_S_UNSUPP, &what);
        fx.assert_sectors_unchanged(64, 8, &what);
        s.assert_still_serving(0, &what);
    }
}

fn discard_with_the_unmap_flag_gets_unsupp(kind: BackendKind) {
    let fx = start_with_discard(kind);
    let mut s = fx.open();
    let what = "a discard with the UNMAP flag";
    let segment = discard_segment(64, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);

    let outcome = s.discard_like(0, VIRTIO_BLK_T_DISCARD, &segment);

    assert_status(outcome, VIRTIO_BLK_S_UNSUPP, what);
    fx.assert_sectors_unchanged(64, 8, what);
    s.assert_still_serving(0, what);
}

fn discard_payload_not_a_multiple_of_16_gets_ioerr(kind: BackendKind) {
    let fx = start_with_discard(kind);
    let mut s = fx.open();

    for (name, req_type) in [
        ("discard", VIRTIO_BLK_T_DISCARD),
        ("write-zeroes", VIRTIO_BLK_T_WRITE_ZEROES),
    ] {
        let what = format!("a {name} with a 24-byte payload");
        let mut payload = discard_segment(64, 8, 0).to_vec();
        payload.extend_from_slice(&[0u8; 8]);

        let outcome = s.discard_like(0, req_type, &payload);

        assert_status(outcome, VIRTIO_BLK_S_IOERR, &what);
        fx.assert_sectors_unchanged(64, 8, &what);
        s.assert_still_serving(0, &what);
    }
}

/// More segments than the limit are refused; a limit too large to exceed here is reported.
fn discard_with_more_segments_than_max_discard_seg_gets_unsupp(kind: BackendKind) {
    /// Largest segment count this test builds (64 KiB of payload).
    const MAX_TESTABLE_SEGMENTS: u32 = 4096;
    let fx = start_with_discard(kind);
    let mut s = fx.open();
    let cfg = s.config();

    for (name, req_type, max) in [
        ("discard", VIRTIO_BLK_T_DISCARD, cfg.max_discard_seg),
        (
            "write-zeroes",
            VIRTIO_BLK_T_WRITE_ZEROES,
            cfg.max_write_zeroes_seg,
        ),
    ] {
        assert!(
            (1..MAX_TESTABLE_SEGMENTS).contains(&max),
            "{name}: max segments {max} is 0 or too large for this test"
        );
        let what = format!("a {name} with {} segments (max {max})", max + 1);
        // One sector each, spread out so no two segments touch.
        let payload: Vec<u8> = (0..u64::from(max) + 1)
            .flat_map(|i| discard_segment(64 + 2 * i, 1, 0))
            .collect();
        assert_eq!(payload.len() % DISCARD_SEGMENT_LEN as usize, 0);

        let outcome = s.discard_like(0, req_type, &payload);

        assert_status(outcome, VIRTIO_BLK_S_UNSUPP, &what);
        fx.assert_sectors_unchanged(64, 2 * u64::from(max) + 2, &what);
        s.assert_still_serving(0, &what);
    }
}

fn discard_and_write_zeroes_past_the_end_get_ioerr(kind: BackendKind) {
    let fx = start_with_discard(kind);
    let mut s = fx.open();
    let ranges = [
        ("straddling the end", IMAGE_SECTORS - 1, 2),
        ("at the capacity", IMAGE_SECTORS, 1),
        ("whose end overflows", u64::MAX - 1, 8),
    ];

    for (name, req_type) in [
        ("discard", VIRTIO_BLK_T_DISCARD),
        ("write-zeroes", VIRTIO_BLK_T_WRITE_ZEROES),
    ] {
        for (where_, sector, count) in ranges {
            let what = format!("a {name} {where_}");

            let outcome = s.discard_like(0, req_type, &discard_segment(sector, count, 0));

            assert_status(outcome, VIRTIO_BLK_S_IOERR, &what);
            fx.assert_sectors_unchanged(IMAGE_SECTORS - 1, 1, &what);
            s.assert_still_serving(0, &what);
        }
    }
}

/// The contract names no status for these (the features are not offered read-only), so
/// either failure status is accepted; what matters is that nothing changes.
fn discard_and_write_zeroes_on_a_read_only_device_fail(kind: BackendKind) {
    let fx = match kind {
        BackendKind::Vublk => Fixture::vublk(&["--discard", "unmap"], |o| o.read_only = true),
        BackendKind::Qsd => Fixture::start(kind, |o| o.read_only = true),
    };
    let mut s = fx.open();

    for (name, req_type) in [
        ("discard", VIRTIO_BLK_T_DISCARD),
        ("write-zeroes", VIRTIO_BLK_T_WRITE_ZEROES),
    ] {
        let what = format!("a {name} on a read-only device");

        let outcome = s.discard_like(0, req_type, &discard_segment(64, 8, 0));

        assert!(
            matches!(
                outcome.status,
                Some(VIRTIO_BLK_S_IOERR) | Some(VIRTIO_BLK_S_UNSUPP)
            ),
            "{what}: want IOERR or UNSUPP, device returned {outcome:?}"
        );
        fx.assert_sectors_unchanged(64, 8, &what);
        s.assert_still_serving(0, &what);
    }
}

/// A broken ring may fail the device, never the daemon: a new connection is served.
fn avail_index_far_ahead_does_not_kill_the_daemon(kind: BackendKind) {
    let mut fx = Fixture::start(kind, |_| {});
    let mut s = fx.open();
    let ring = &mut s.queues[0].ring;
    let bogus = ring.next_avail().wrapping_add(ring.size()).wrapping_add(7);
    ring.set_avail_idx_raw(&s.mem, bogus).unwrap();
    s.queues[0].kick.0.write(1).unwrap();
    // GET_VRING_BASE stops the queue: once answered, the worker has seen the kick. A daemon
    // that dropped the connection (or died) answers with an error, which is checked below.
    let _ = s.hs.frontend.get_vring_base(0);
    drop(s);
    fx.assert_alive("a ring whose avail index ran ahead");

    let mut next = fx.open();
    let (outcome, data) = next.read(0, 3, 512);

    assert_status(outcome, VIRTIO_BLK_S_OK, "read on the next connection");
    assert!(data == image_bytes(3 * 512, 512));
    fx.assert_alive("a broken ring and a new connection");
}

// ---------------------------------------------------------------------------------------
// Where the connection comes from: --connect (the VMM listens), --fd (inherited socket).

/// Spawns vublk serving a fresh image with `args` (socket options included); no socket wait.
fn spawn_vublk(dir: &tempfile::TempDir, args: &[&str], fds: &[(i32, i32)]) -> (Daemon, PathBuf) {
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, image_bytes(0, IMAGE_SIZE)).unwrap();
    let mut cmd = std::process::Command::new(vublk_bin());
    cmd.args(["serve", "--format", "raw", "--num-queues", "1", "--image"])
        .arg(&image)
        .args(args)
        .stdin(std::process::Stdio::null());
    vublk_tests::daemon::pass_fds(&mut cmd, fds);
    let child = cmd.spawn().unwrap();
    (
        Daemon {
            child,
            socket: dir.path().join("unused"),
            kind: BackendKind::Vublk,
        },
        image,
    )
}

/// Accepts one connection on `listener`, failing after `REQUEST_TIMEOUT`.
fn accept_with_timeout(
    listener: &std::os::unix::net::UnixListener,
) -> std::os::unix::net::UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "vublk did not connect in time"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
fn connect_mode_reaches_a_listening_vmm_and_reconnects_after_it_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmm.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // --connect needs socket() and connect() after setup: only unconfined.
    let (_daemon, image) = spawn_vublk(
        &dir,
        &["--connect", path.to_str().unwrap(), "--sandbox", "off"],
        &[],
    );

    let mut first = Session::open_stream(accept_with_timeout(&listener));
    let data = vec![0x7eu8; 4096];
    assert_status(
        first.write(0, 8, &data),
        VIRTIO_BLK_S_OK,
        "write over --connect",
    );
    drop(first);
    // The "VMM" comes back: vublk connects again and serves the same disk.
    let mut second = Session::open_stream(accept_with_timeout(&listener));
    let (outcome, bytes) = second.read(0, 8, 4096);

    assert_status(outcome, VIRTIO_BLK_S_OK, "read after reconnect");
    assert_eq!(bytes, data);
    assert_eq!(std::fs::read(&image).unwrap()[4096..8192], data[..]);
}

#[test]
fn inherited_connected_socket_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let (_daemon, _image) = spawn_vublk(&dir, &["--fd", "9"], &[(theirs.as_raw_fd(), 9)]);
    drop(theirs);

    let mut s = Session::open_stream(ours);
    let (outcome, bytes) = s.read(0, 0, 4096);

    assert_status(
        outcome,
        VIRTIO_BLK_S_OK,
        "read over an inherited connected socket",
    );
    assert_eq!(bytes, image_bytes(0, 4096));
}

#[test]
fn inherited_listening_socket_accepts_frontends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (_daemon, _image) = spawn_vublk(&dir, &["--fd", "9"], &[(listener.as_raw_fd(), 9)]);
    drop(listener);

    let mut s = Session::open(&path);
    let (outcome, bytes) = s.read(0, 16, 4096);

    assert_status(
        outcome,
        VIRTIO_BLK_S_OK,
        "read over an inherited listening socket",
    );
    assert_eq!(bytes, image_bytes(16 * 512, 4096));
}

#[test]
fn sigterm_with_a_frontend_connected_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    let (daemon, image) = spawn_vublk(&dir, &["--socket-path", path.to_str().unwrap()], &[]);
    let mut daemon = daemon;
    daemon.socket = path.clone();
    daemon.wait_listening(REQUEST_TIMEOUT).unwrap();
    let mut s = Session::open(&path);
    let data = vec![0x42u8; 8192];
    assert_status(
        s.write(0, 64, &data),
        VIRTIO_BLK_S_OK,
        "write before SIGTERM",
    );

    let status = daemon.terminate().unwrap();

    assert!(
        status.success(),
        "vublk should exit 0 on SIGTERM, got {status}"
    );
    assert_eq!(
        std::fs::read(&image).unwrap()[64 * 512..64 * 512 + 8192],
        data[..]
    );
}

#[test]
fn misaligned_guest_buffers_with_cache_none_are_bounced_and_correct() {
    let fx = Fixture::start(BackendKind::Vublk, |o| o.direct = true);
    let mut s = fx.open();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 253) as u8).collect();
    // O_DIRECT needs 512-byte aligned memory: put the buffers one byte off.
    let wbuf = s.mem.alloc(4096 + 512, 4096).unwrap() + 1;
    s.mem.write(wbuf, &data).unwrap();
    let hdr = s.header(VIRTIO_BLK_T_OUT, 24);
    let status = s.status();
    let write = [
        Segment::readable(hdr, BLK_HEADER_LEN),
        Segment::readable(wbuf, 4096),
        Segment::writable(status, 1),
    ];
    assert_status(
        s.request(0, &write, status),
        VIRTIO_BLK_S_OK,
        "misaligned O_DIRECT write",
    );
    let rbuf = s.mem.alloc(4096 + 512, 4096).unwrap() + 3;
    let hdr = s.header(VIRTIO_BLK_T_IN, 24);
    let status = s.status();
    let read = [
        Segment::readable(hdr, BLK_HEADER_LEN),
        Segment::writable(rbuf, 4096),
        Segment::writable(status, 1),
    ];

    let outcome = s.request(0, &read, status);

    assert_status(outcome, VIRTIO_BLK_S_OK, "misaligned O_DIRECT read");
    assert_eq!(s.mem.read(rbuf, 4096).unwrap(), data);
    assert_eq!(fx.file_bytes(24 * 512, 4096), data);
}

#[test]
fn ring_restarted_with_a_new_kick_fd_serves_the_next_request() {
    let fx = Fixture::start(BackendKind::Vublk, |_| {});
    let mut s = fx.open();
    for round in 0..30u64 {
        let base = s.hs.frontend.get_vring_base(0).expect("GET_VRING_BASE");
        // QEMU restarts a ring with a fresh eventfd; vublk receives it as a new fd, which
        // often reuses the number of the one it has just closed.
        let (kick, call) = (Notifier::new(), Notifier::new());
        s.hs.frontend
            .set_vring_base(0, u16::try_from(base).unwrap())
            .expect("SET_VRING_BASE");
        // QEMU's order: the kick fd first, so it takes the number the old kick fd had.
        s.hs.frontend
            .set_vring_kick(0, &kick.0)
            .expect("SET_VRING_KICK");
        s.hs.frontend
            .set_vring_call(0, &call.0)
            .expect("SET_VRING_CALL");
        s.hs.frontend
            .set_vring_enable(0, true)
            .expect("SET_VRING_ENABLE");
        s.queues[0].kick = kick;
        s.queues[0].call = call;

        let (outcome, bytes) = s.read(0, round, 512);

        assert_status(outcome, VIRTIO_BLK_S_OK, "read right after a ring restart");
        assert_eq!(bytes, image_bytes(round * 512, 512), "round {round}");
    }
}

#[test]
fn sigint_exits_cleanly_like_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    let (mut daemon, _image) = spawn_vublk(&dir, &["--socket-path", path.to_str().unwrap()], &[]);
    daemon.socket = path.clone();
    daemon.wait_listening(REQUEST_TIMEOUT).unwrap();
    let mut s = Session::open(&path);
    assert_status(s.read(0, 0, 512).0, VIRTIO_BLK_S_OK, "read before SIGINT");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.pid()).unwrap());

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = daemon.child.wait().unwrap();

    assert!(
        status.success(),
        "vublk should exit 0 on SIGINT, got {status}"
    );
}

/// Many reads of 2 MiB compressed clusters in flight at once (each brings its compressed bytes
/// into a buffer of the worker's, counted against the queue's buffer budget): every one
/// completes exactly once with the right data.
#[test]
fn concurrent_reads_of_2mib_compressed_clusters_all_complete_correctly() {
    const READS: u64 = 16;
    const LEN: u32 = 512 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let qcow2 = dir.path().join("c.qcow2");
    std::fs::write(&raw, image_bytes(0, 16 * MIB)).unwrap();
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2", "-o", "cluster_size=2M"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .unwrap();
    assert!(ok.success());
    let map = std::process::Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(&qcow2)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&map.stdout).contains("\"compressed\": true"),
        "the test image must hold compressed clusters"
    );
    let fx = Fixture::start(BackendKind::Vublk, |o| {
        o.image = qcow2.clone();
        o.format = "qcow2".into();
        o.read_only = true;
    });
    let mut s = fx.open();
    let mut reads = Vec::new();
    for i in 0..READS {
        let offset = i * MIB - (i % 3) * 4096;
        let hdr = s.header(VIRTIO_BLK_T_IN, offset / 512);
        let data = s.mem.alloc_filled(u64::from(LEN), DATA_CANARY).unwrap();
        let status = s.status();
        let segs = [
            Segment::readable(hdr, BLK_HEADER_LEN),
            Segment::writable(data, LEN),
            Segment::writable(status, 1),
        ];
        let head = s.queues[0].ring.add_chain(&s.mem, &segs).unwrap();
        reads.push((head, data, status, offset));
    }

    for &(head, ..) in &reads {
        s.publish(0, head);
    }
    let mut done = Vec::new();
    for _ in 0..READS {
        done.push(s.wait(0).id);
    }

    done.sort_unstable();
    let mut heads: Vec<u32> = reads.iter().map(|r| u32::from(r.0)).collect();
    heads.sort_unstable();
    assert_eq!(done, heads, "every read completes exactly once");
    for (_, data, status, offset) in reads {
        assert_eq!(
            s.mem.read_u8(status).unwrap(),
            VIRTIO_BLK_S_OK,
            "read at {offset}"
        );
        assert_eq!(
            s.mem.read(data, u64::from(LEN)).unwrap(),
            image_bytes(offset, u64::from(LEN)),
            "data at {offset}"
        );
    }
}

#[test]
fn clean_exit_removes_the_socket_vublk_bound_when_unconfined() {
    // Confined, vublk can name no path any more (empty root, Landlock): the socket file stays,
    // and the next vublk bound to the path replaces it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    let (mut daemon, _image) = spawn_vublk(
        &dir,
        &["--socket-path", path.to_str().unwrap(), "--sandbox", "off"],
        &[],
    );
    daemon.socket = path.clone();
    daemon.wait_listening(REQUEST_TIMEOUT).unwrap();

    let status = daemon.terminate().unwrap();

    assert!(status.success());
    assert!(
        !path.exists(),
        "the socket file should be gone after a clean exit"
    );
}

/// Serves `qcow2` (made from `image_bytes` by `qemu-img convert` with `convert_args`) and
/// reads `len` bytes at 0 in one request with 1 MiB data descriptors, on a cold cache.
fn read_converted_qcow2(convert_args: &[&str], len: u64) -> (Outcome, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let qcow2 = dir.path().join("img.qcow2");
    std::fs::write(&raw, image_bytes(0, len)).unwrap();
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .args(convert_args)
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .unwrap();
    assert!(ok.success());
    let fx = Fixture::start(BackendKind::Vublk, |o| {
        o.image = qcow2.clone();
        o.format = "qcow2".into();
        o.read_only = true;
    });
    let mut s = fx.open();
    let hdr = s.header(VIRTIO_BLK_T_IN, 0);
    let data = s.mem.alloc_filled(len, DATA_CANARY).unwrap();
    let status = s.status();
    let mut segs = vec![Segment::readable(hdr, BLK_HEADER_LEN)];
    segs.extend((0..len / MIB).map(|i| Segment::writable(data + i * MIB, 1 << 20)));
    segs.push(Segment::writable(status, 1));
    let head = s.queues[0].ring.add_chain(&s.mem, &segs).unwrap();
    s.publish(0, head);
    // Tens of thousands of compressed clusters take a while in a debug build.
    let vq = &mut s.queues[0];
    let used = vq
        .ring
        .wait_used(&s.mem, vq.call.as_fd(), Duration::from_secs(120))
        .expect("the large read completes");
    assert_eq!(used.id, u32::from(head));
    let outcome = Outcome {
        used,
        status: s.mem.read_u8(status).ok(),
    };
    let bytes = s.mem.read(data, len).unwrap();
    drop(fx);
    (outcome, bytes)
}

/// A 4 MiB read over 512-byte clusters spans 128 L2 tables, each loaded on demand.
#[test]
fn cold_large_read_over_512_byte_clusters_loads_every_table_it_needs() {
    let (outcome, bytes) = read_converted_qcow2(&["-o", "cluster_size=512"], 4 * MIB);

    assert_status(
        outcome,
        VIRTIO_BLK_S_OK,
        "cold 4 MiB read, 512-byte clusters",
    );
    assert!(bytes == image_bytes(0, 4 * MIB), "data differs");
}

/// 33 MiB of 512-byte compressed clusters is 67584 pieces in one request: more ops than
/// 16 bits can number.
#[test]
fn a_request_with_more_than_65536_ops_completes() {
    let (outcome, bytes) = read_converted_qcow2(&["-c", "-o", "cluster_size=512"], 33 * MIB);

    assert_status(
        outcome,
        VIRTIO_BLK_S_OK,
        "33 MiB of 512-byte compressed clusters",
    );
    assert!(bytes == image_bytes(0, 33 * MIB), "data differs");
}

/// 48 concurrent 1 MiB reads into misaligned buffers under `--cache none` each need a 1 MiB
/// bounce buffer: 48 MiB, past the 32 MiB one queue may hold, so some wait for others to
/// finish (the deferred path). All complete exactly once with the right data.
#[test]
fn bounce_buffers_past_the_queue_budget_wait_and_all_complete() {
    const READS: u64 = 48;
    let fx = Fixture::start(BackendKind::Vublk, |o| o.direct = true);
    let mut s = fx.open();
    let mut reads = Vec::new();
    for i in 0..READS {
        let offset = (i % 7) * MIB;
        let hdr = s.header(VIRTIO_BLK_T_IN, offset / 512);
        // One byte off: O_DIRECT cannot read into it, so the worker bounces.
        let data = s.mem.alloc(MIB + 4096, 4096).unwrap() + 1;
        let status = s.status();
        let segs = [
            Segment::readable(hdr, BLK_HEADER_LEN),
            Segment::writable(data, 1 << 20),
            Segment::writable(status, 1),
        ];
        let head = s.queues[0].ring.add_chain(&s.mem, &segs).unwrap();
        reads.push((head, data, status, offset));
    }

    for &(head, ..) in &reads {
        s.publish(0, head);
    }
    let mut done: Vec<u32> = (0..READS).map(|_| s.wait(0).id).collect();

    done.sort_unstable();
    let mut heads: Vec<u32> = reads.iter().map(|r| u32::from(r.0)).collect();
    heads.sort_unstable();
    assert_eq!(done, heads, "every read completes exactly once");
    for (_, data, status, offset) in reads {
        assert_eq!(
            s.mem.read_u8(status).unwrap(),
            VIRTIO_BLK_S_OK,
            "read at {offset}"
        );
        assert!(
            s.mem.read(data, MIB).unwrap() == image_bytes(offset, MIB),
            "data at {offset}"
        );
    }
}
