//! Raw-image data path through a real VMM-side driver: libblkio's `virtio-blk-vhost-user`
//! client ([`vublk_tests::blk`]) against the daemon binary, with the image file itself, read
//! with `std::fs`, as the independent oracle.
//!
//! Every scenario is a plain function of the backend; `both_backends!` turns it into one test
//! per backend (`<scenario>::vublk`, `<scenario>::qsd`). The qemu-storage-daemon runs are the
//! self-check of the test: a scenario that fails there is a bug in the test, not in vublk.

#![allow(
    clippy::unwrap_used,
    reason = "a test binary: the helpers panic like the #[test] fns that clippy already exempts"
)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::errno::Errno;
use tempfile::TempDir;
use vublk_tests::blk::{BlkClient, BlkError};
use vublk_tests::daemon::{BackendKind, Daemon, DiskOptions};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Not a power of two, so a capacity rounded to one shows up.
const IMAGE_SIZE: u64 = 64 * MIB + 7 * 512;

/// A daemon serving a fresh sparse raw image in a private directory.
struct Fixture {
    daemon: Daemon,
    image: PathBuf,
    _dir: TempDir,
}

impl Fixture {
    /// Starts `kind` on a new image of [`IMAGE_SIZE`] bytes; `configure` adjusts the options.
    fn start(kind: BackendKind, configure: impl FnOnce(&mut DiskOptions)) -> Fixture {
        Self::start_with(kind, configure, |_| {})
    }

    /// Like [`Fixture::start`], with `prepare` writing the image before the daemon opens it.
    fn start_with(
        kind: BackendKind,
        configure: impl FnOnce(&mut DiskOptions),
        prepare: impl FnOnce(&File),
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        let file = File::create(&image).unwrap();
        file.set_len(IMAGE_SIZE).unwrap();
        prepare(&file);
        file.sync_all().unwrap();
        drop(file);
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

    /// Starts `kind` with discard passed down to the file as hole punching: vublk's
    /// `--discard unmap`, QSD's `discard=unmap` on both block nodes (its fixture has no knob).
    fn start_with_discard(kind: BackendKind) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
        let socket = dir.path().join("vhost.sock");
        let daemon = match kind {
            BackendKind::Vublk => {
                let mut opts = DiskOptions::raw(&image);
                opts.extra_args = vec!["--discard".into(), "unmap".into()];
                Daemon::start(kind, &opts, &socket)
            }
            BackendKind::Qsd => {
                let mut cmd = Command::new("/usr/bin/qemu-storage-daemon");
                cmd.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=file0,filename={},discard=unmap",
                        image.display()
                    ))
                    .arg("--blockdev")
                    .arg("driver=raw,node-name=disk0,file=file0,discard=unmap")
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\
                         addr.path={},writable=on,num-queues=1",
                        socket.display()
                    ));
                Daemon::spawn(kind, &mut cmd, &socket)
            }
        }
        .unwrap_or_else(|e| panic!("starting {kind:?} with discard: {e:#}"));
        Fixture {
            daemon,
            image,
            _dir: dir,
        }
    }

    fn connect(&self, num_queues: usize) -> BlkClient {
        BlkClient::connect(&self.daemon.socket, num_queues)
            .unwrap_or_else(|e| panic!("connecting to {:?}: {e} ({e:?})", self.daemon.kind))
    }

    /// `len` bytes of the image at `offset`, read straight from the file.
    fn file_bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        read_file(&self.image, offset, len)
    }

    fn file_len(&self) -> u64 {
        std::fs::metadata(&self.image).unwrap().len()
    }

    /// 512-byte blocks allocated to the image.
    fn file_blocks(&self) -> u64 {
        std::fs::metadata(&self.image).unwrap().blocks()
    }

    fn assert_alive(&mut self) {
        let status = self.daemon.child.try_wait().unwrap();
        assert!(
            status.is_none(),
            "{:?} exited: {status:?}",
            self.daemon.kind
        );
    }
}

/// A byte count as a buffer length.
fn us(n: u64) -> usize {
    usize::try_from(n).unwrap()
}

fn read_file(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(len).unwrap()];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Deterministic bytes that differ per `seed` and per position, so a misplaced or stale
/// sector never matches by accident.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

fn assert_zero(bytes: &[u8], what: &str) {
    if let Some(i) = bytes.iter().position(|&b| b != 0) {
        panic!("{what}: byte {i} is {:#04x}, want zero", bytes[i]);
    }
}

/// Fails with the first differing offset rather than two megabyte-long dumps.
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            actual[i], expected[i]
        );
    }
}

fn assert_errno(result: Result<impl std::fmt::Debug, BlkError>, want: Errno, what: &str) {
    match result {
        Ok(v) => panic!("{what}: succeeded ({v:?}), want {want}"),
        Err(e) => assert_eq!(e.errno(), Some(want), "{what}: {e}"),
    }
}

vublk_tests::both_backends!(
    capacity_equals_image_file_size,
    writes_read_back_and_land_in_the_image_file,
    one_mib_requests_round_trip_in_one_and_in_many_segments,
    flush_succeeds_after_writes,
    direct_io_writes_read_back_and_land_in_the_image_file,
    discard_punches_a_hole_that_reads_as_zeroes,
    write_zeroes_with_unmap_zeroes_exactly_the_range,
    write_zeroes_without_unmap_zeroes_exactly_the_range,
    read_only_daemon_refuses_a_read_write_connection,
    read_only_daemon_serves_reads_and_the_file_stays_unchanged,
    requests_past_the_end_fail_and_change_nothing,
    both_of_two_queues_serve_io,
    reconnected_client_sees_the_previous_clients_writes,
    daemon_keeps_serving_after_a_client_vanishes_mid_io,
);

fn capacity_equals_image_file_size(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});

    let client = fx.connect(1);

    assert_eq!(client.capacity(), IMAGE_SIZE, "capacity in bytes");
}

fn writes_read_back_and_land_in_the_image_file(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut client = fx.connect(1);
    let cases: [(u64, usize); 6] = [
        (0, 512),
        (4 * KIB, 4096),
        (MIB - 512, 1536),
        (3 * MIB + 512, 64 * 1024),
        (10 * MIB + 4 * KIB, 128 * 1024),
        (IMAGE_SIZE - 4096, 4096),
    ];

    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);

        client
            .write(offset, &data)
            .unwrap_or_else(|e| panic!("write {len} at {offset}: {e}"));
        let back = client
            .read(offset, len)
            .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));

        assert_same(&back, &data, &format!("read back {len} at {offset}"));
        assert_same(
            &fx.file_bytes(offset, len as u64),
            &data,
            &format!("image file, {len} at {offset}"),
        );
    }
}

fn one_mib_requests_round_trip_in_one_and_in_many_segments(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut client = fx.connect(1);
    let len = us(MIB);
    let whole = pattern(11, len);
    let gathered = pattern(12, len);
    // 96 segments of mixed sizes (4, 12 and 16 KiB), within any seg_max >= 96.
    let write_lens: Vec<usize> = [4096, 12288, 16384].repeat(32);
    // Different boundaries on the way back, so no segment maps 1:1 to one written.
    let read_lens: Vec<usize> = [16384, 4096, 12288].repeat(32);
    assert_eq!(write_lens.iter().sum::<usize>(), len);

    client
        .write(4 * MIB, &whole)
        .unwrap_or_else(|e| panic!("1 MiB write: {e}"));
    let whole_back = client
        .read(4 * MIB, len)
        .unwrap_or_else(|e| panic!("1 MiB read: {e}"));
    client
        .queue(0)
        .writev(6 * MIB, &gathered, &write_lens)
        .unwrap_or_else(|e| panic!("1 MiB write in {} segments: {e}", write_lens.len()));
    let gathered_back = client
        .queue(0)
        .readv(6 * MIB, &read_lens)
        .unwrap_or_else(|e| panic!("1 MiB read in {} segments: {e}", read_lens.len()));

    assert_same(&whole_back, &whole, "1 MiB read back");
    assert_same(
        &fx.file_bytes(4 * MIB, MIB),
        &whole,
        "image file after 1 MiB write",
    );
    assert_same(&gathered_back, &gathered, "scattered read back");
    assert_same(
        &fx.file_bytes(6 * MIB, MIB),
        &gathered,
        "image file after gathered write",
    );
}

fn flush_succeeds_after_writes(kind: BackendKind) {
    let fx = Fixture::start(kind, |_| {});
    let mut client = fx.connect(1);
    let data = pattern(21, 8192);
    client.write(MIB, &data).unwrap();

    let flushed = client.flush();

    assert!(flushed.is_ok(), "flush: {flushed:?}");
    assert_same(&fx.file_bytes(MIB, 8192), &data, "image file after flush");
}

fn direct_io_writes_read_back_and_land_in_the_image_file(kind: BackendKind) {
    // A size QSD accepts with O_DIRECT (it wants a multiple of its probed request alignment).
    let fx = Fixture::start_with(kind, |o| o.direct = true, |f| f.set_len(64 * MIB).unwrap());
    let mut client = fx.connect(1);
    // 512-aligned but not 4 KiB-aligned, as O_DIRECT on a 512-byte-sector disk allows.
    let (offset, len) = (2 * MIB + 1536, 3 * 512);
    let data = pattern(31, len);

    client.write(offset, &data).unwrap();
    let back = client.read(offset, len).unwrap();

    assert_same(&back, &data, "read back with O_DIRECT");
    assert_same(
        &fx.file_bytes(offset, len as u64),
        &data,
        "image file with O_DIRECT",
    );
}

/// Whether the filesystem holding `dir` can punch holes (the st_blocks check needs it).
fn punch_hole_supported(dir: &Path) -> bool {
    let probe = dir.join("punch-probe");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&probe)
        .unwrap();
    file.write_all_at(&[1u8; 65536], 0).unwrap();
    let mode = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let supported = nix::fcntl::fallocate(&file, mode, 0, 65536).is_ok();
    let _ = std::fs::remove_file(&probe);
    supported
}

fn discard_punches_a_hole_that_reads_as_zeroes(kind: BackendKind) {
    let fx = Fixture::start_with_discard(kind);
    let mut client = fx.connect(1);
    let (offset, len) = (8 * MIB, 2 * MIB);
    client.write(offset, &pattern(41, us(len))).unwrap();
    client.flush().unwrap();
    let blocks_before = fx.file_blocks();

    let discarded = client.discard(offset, len);

    assert!(discarded.is_ok(), "discard: {discarded:?}");
    assert_zero(&fx.file_bytes(offset, len), "image file after discard");
    assert_zero(
        &client.read(offset, us(len)).unwrap(),
        "device read after discard",
    );
    let dir = fx.image.parent().unwrap();
    if punch_hole_supported(dir) {
        let blocks_after = fx.file_blocks();
        assert!(
            blocks_after + MIB / 512 <= blocks_before,
            "st_blocks went from {blocks_before} to {blocks_after}: the discard did not punch \
             a hole of at least 1 MiB"
        );
    } else {
        eprintln!(
            "SKIPPED the st_blocks part of this test: {} cannot punch holes",
            dir.display()
        );
    }
}

/// Writes a pattern over `[offset - 4 KiB, offset + len + 4 KiB)`, zeroes the middle with
/// write-zeroes, and checks that exactly `[offset, offset + len)` became zero.
fn write_zeroes_zeroes_exactly_the_range(kind: BackendKind, unmap: bool) {
    let fx = Fixture::start(kind, |_| {});
    let mut client = fx.connect(1);
    let (offset, len) = (12 * MIB, MIB + 4 * KIB);
    let guard = 4 * KIB;
    let before = pattern(51, us(len + 2 * guard));
    client.write(offset - guard, &before).unwrap();

    let zeroed = client.write_zeroes(offset, len, unmap);

    assert!(zeroed.is_ok(), "write-zeroes (unmap={unmap}): {zeroed:?}");
    assert_zero(
        &fx.file_bytes(offset, len),
        "image file in the write-zeroes range",
    );
    assert_zero(
        &client.read(offset, us(len)).unwrap(),
        "device read of the write-zeroes range",
    );
    let g = us(guard);
    assert_same(
        &fx.file_bytes(offset - guard, guard),
        &before[..g],
        "image file just before the range",
    );
    assert_same(
        &fx.file_bytes(offset + len, guard),
        &before[before.len() - g..],
        "image file just after the range",
    );
}

fn write_zeroes_with_unmap_zeroes_exactly_the_range(kind: BackendKind) {
    write_zeroes_zeroes_exactly_the_range(kind, true);
}

fn write_zeroes_without_unmap_zeroes_exactly_the_range(kind: BackendKind) {
    write_zeroes_zeroes_exactly_the_range(kind, false);
}

fn read_only_daemon_refuses_a_read_write_connection(kind: BackendKind) {
    let fx = Fixture::start(kind, |o| o.read_only = true);

    // blkio refuses to start read-write on a device offering VIRTIO_BLK_F_RO: this proves
    // the daemon offers it.
    let result = BlkClient::connect(&fx.daemon.socket, 1);

    match result {
        Ok(_) => panic!("read-write connection to a read-only daemon succeeded: RO not offered"),
        Err(e) => assert_eq!(e.errno(), Some(Errno::EROFS), "{e} ({e:?})"),
    }
}

fn read_only_daemon_serves_reads_and_the_file_stays_unchanged(kind: BackendKind) {
    let data = pattern(61, 64 * 1024);
    let fx = Fixture::start_with(
        kind,
        |o| o.read_only = true,
        |f| f.write_all_at(&data, 2 * MIB).unwrap(),
    );
    let mut client = BlkClient::connect_read_only(&fx.daemon.socket, 1).unwrap();
    let mtime_before = std::fs::metadata(&fx.image).unwrap().mtime_nsec();

    let read = client.read(2 * MIB, data.len());
    // blkio stops these on a read-only connection (EBADF / ENOTSUP) before they reach the
    // daemon; the daemon's own refusal is covered by the protocol tests.
    let write = client.write(2 * MIB, &pattern(62, 4096));
    let discard = client.discard(2 * MIB, 4096);
    let zeroes = client.write_zeroes(2 * MIB, 4096, false);

    assert_same(&read.unwrap(), &data, "read on a read-only daemon");
    assert!(write.is_err(), "write on a read-only device succeeded");
    assert!(discard.is_err(), "discard on a read-only device succeeded");
    assert!(
        zeroes.is_err(),
        "write-zeroes on a read-only device succeeded"
    );
    assert_same(
        &fx.file_bytes(2 * MIB, data.len() as u64),
        &data,
        "image file",
    );
    assert_eq!(
        std::fs::metadata(&fx.image).unwrap().mtime_nsec(),
        mtime_before,
        "image mtime changed"
    );
}

fn requests_past_the_end_fail_and_change_nothing(kind: BackendKind) {
    let tail = pattern(71, 4096);
    let fx = Fixture::start_with(
        kind,
        |_| {},
        |f| f.write_all_at(&tail, IMAGE_SIZE - 4096).unwrap(),
    );
    let mut client = fx.connect(1);
    let cap = client.capacity();

    let straddling_read = client.read(cap - 512, 1024);
    let straddling_write = client.write(cap - 512, &[0xee; 1024]);
    let write_at_end = client.write(cap, &[0xee; 512]);
    let far_write = client.write(cap + 64 * MIB, &[0xee; 512]);
    let zeroes = client.write_zeroes(cap - 512, 1024, false);

    assert_errno(straddling_read, Errno::EIO, "read straddling the end");
    assert_errno(straddling_write, Errno::EIO, "write straddling the end");
    assert_errno(write_at_end, Errno::EIO, "write at the end");
    assert_errno(far_write, Errno::EIO, "write far past the end");
    assert_errno(zeroes, Errno::EIO, "write-zeroes straddling the end");
    assert_eq!(fx.file_len(), IMAGE_SIZE, "image size changed");
    assert_same(&fx.file_bytes(IMAGE_SIZE - 4096, 4096), &tail, "last 4 KiB");
    assert_same(
        &client.read(cap - 512, 512).unwrap(),
        &tail[4096 - 512..],
        "last sector still readable",
    );
}

fn both_of_two_queues_serve_io(kind: BackendKind) {
    let fx = Fixture::start(kind, |o| o.num_queues = 2);
    let mut client = fx.connect(2);
    let a = pattern(81, 16384);
    let b = pattern(82, 16384);

    client.queue(0).write(MIB, &a).unwrap();
    client.queue(1).write(2 * MIB, &b).unwrap();
    let a_back = client.queue(1).read(MIB, a.len()).unwrap();
    let b_back = client.queue(0).read(2 * MIB, b.len()).unwrap();

    assert_eq!(client.num_queues(), 2);
    assert_same(&a_back, &a, "queue 1 reads what queue 0 wrote");
    assert_same(&b_back, &b, "queue 0 reads what queue 1 wrote");
    assert_same(&fx.file_bytes(MIB, 16384), &a, "image file (queue 0)");
    assert_same(&fx.file_bytes(2 * MIB, 16384), &b, "image file (queue 1)");
}

fn reconnected_client_sees_the_previous_clients_writes(kind: BackendKind) {
    let mut fx = Fixture::start(kind, |_| {});
    let data = pattern(91, 32768);
    let mut first = fx.connect(1);
    first.write(5 * MIB, &data).unwrap();
    drop(first);

    let mut second = fx.connect(1);
    let back = second.read(5 * MIB, data.len()).unwrap();

    assert_same(&back, &data, "second client's read");
    fx.assert_alive();
}

fn daemon_keeps_serving_after_a_client_vanishes_mid_io(kind: BackendKind) {
    // O_DIRECT writes are slow enough that most of the 4 MiB is still in flight at the
    // disconnect (the size is one QSD accepts with O_DIRECT).
    let mut fx = Fixture::start_with(kind, |o| o.direct = true, |f| f.set_len(64 * MIB).unwrap());
    let len = 64 * 1024;
    let offsets: Vec<u64> = (0..64).map(|i| 16 * MIB + i * len as u64).collect();
    let vanishing = fx.connect(1);
    vanishing
        .abandon_with_writes_in_flight(&offsets, len, 0xee)
        .unwrap();

    let mut next = fx.connect(1);
    let data = pattern(101, 8192);
    next.write(0, &data).unwrap();
    let back = next.read(0, data.len()).unwrap();

    assert_same(&back, &data, "new client after the vanished one");
    assert_same(&fx.file_bytes(0, 8192), &data, "image file");
    fx.assert_alive();
}
