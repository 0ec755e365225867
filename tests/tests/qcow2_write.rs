//! qcow2 writes through the daemon, with QEMU as the oracle: a qcow2 overlay over a raw base
//! (or a compressed image with an internal snapshot) is served writable, an independent
//! vhost-user-blk client (libblkio) writes, zeroes and flushes on two queues, the daemon is
//! stopped with SIGTERM, and then `qemu-img check` must exit 0 (no corruption, no leaks) and
//! `qemu-img compare` must find the image equal to a raw model that received the same writes.
//! Each scenario also runs against qemu-storage-daemon, as the test's self-check.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test binary: the helpers panic like the #[test] fns that clippy already exempts; patterns truncate on purpose"
)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use vublk_tests::blk::BlkClient;
use vublk_tests::both_backends;
use vublk_tests::daemon::{BackendKind, Backing, Daemon, DiskOptions};

const MIB: u64 = 1024 * 1024;

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok(cmd: &mut Command) -> String {
    let (code, out) = run(cmd);
    assert_eq!(code, 0, "{cmd:?}: {out}");
    out
}

/// A deterministic pseudo-random sequence (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Writes, write-zeroes and flushes from two queues; returns the raw model of the result.
fn workload(client: &mut BlkClient, mut model: Vec<u8>, seed: u64, cluster: u64) -> Vec<u8> {
    let size = model.len() as u64;
    let mut rng = Rng(seed);
    for i in 0..300u64 {
        let q = usize::try_from(i % 2).unwrap();
        let offset = if rng.below(2) == 0 {
            rng.below(size / cluster) * cluster
        } else {
            rng.below(size / 512) * 512
        };
        let len = ((1 + rng.below(64)) * 512).min(size - offset);
        let o = usize::try_from(offset).unwrap();
        let l = usize::try_from(len).unwrap();
        match rng.below(10) {
            0 => {
                let unmap = rng.below(2) == 0;
                client
                    .queue(q)
                    .write_zeroes(offset, len, unmap)
                    .unwrap_or_else(|e| panic!("write-zeroes {offset}+{len}: {e}"));
                model[o..o + l].fill(0);
            }
            1 => client.queue(q).flush().unwrap(),
            _ => {
                let data: Vec<u8> = (0..len)
                    .map(|j| (i as u8).wrapping_mul(31) ^ (j / 512) as u8 ^ 0x80)
                    .collect();
                client
                    .queue(q)
                    .write(offset, &data)
                    .unwrap_or_else(|e| panic!("write {offset}+{len}: {e}"));
                model[o..o + l].copy_from_slice(&data);
            }
        }
    }
    client.flush().unwrap();
    // Everything written reads back through the daemon too.
    for (i, want) in model.chunks(usize::try_from(MIB).unwrap()).enumerate() {
        let got = client.read(i as u64 * MIB, want.len()).unwrap();
        assert!(
            got == want,
            "reads through the daemon differ from the model in MiB {i}"
        );
    }
    model
}

/// Stops the daemon, then checks the image with `qemu-img check` and `qemu-img compare`.
fn assert_clean_and_equal(kind: BackendKind, daemon: Daemon, top: &Path, model: &[u8], dir: &Path) {
    let status = daemon.terminate().unwrap();
    assert!(status.success(), "{kind:?} exited with {status}");
    let (code, report) = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(top));
    assert_eq!(code, 0, "{kind:?}: qemu-img check:\n{report}");
    let model_path = dir.join("model.raw");
    std::fs::write(&model_path, model).unwrap();
    let (code, out) = run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(top)
        .arg(&model_path));
    assert_eq!(code, 0, "{kind:?}: qemu-img compare: {out}");
}

fn overlay_over_raw_base(kind: BackendKind) {
    overlay_over_raw_base_with(kind, false);
}

/// The same with O_DIRECT (`--cache none`): metadata goes through aligned buffers too.
fn overlay_over_raw_base_o_direct(kind: BackendKind) {
    overlay_over_raw_base_with(kind, true);
}

fn overlay_over_raw_base_with(kind: BackendKind, direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let size = 16 * MIB;
    // The base is shorter than the overlay: past it the overlay reads zeroes.
    let base_len = 12 * MIB + 4096;
    let base_bytes: Vec<u8> = (0..base_len).map(|i| ((i / 4096) as u8) ^ 0x3c).collect();
    std::fs::write(&base, &base_bytes).unwrap();
    let top = dir.path().join("top.qcow2");
    ok(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "-F",
            "raw",
            "-b",
        ])
        .arg(&base)
        .arg(&top)
        .arg(size.to_string()));
    let mut model = base_bytes.clone();
    model.resize(usize::try_from(size).unwrap(), 0);
    let socket = dir.path().join("vhost.sock");
    let opts = DiskOptions {
        format: "qcow2".into(),
        num_queues: 2,
        backing: vec![Backing::new(&base, "raw")],
        direct,
        ..DiskOptions::raw(&top)
    };
    let daemon = Daemon::start(kind, &opts, &socket).unwrap();
    let mut client = BlkClient::connect(&socket, 2).unwrap();
    let model = workload(&mut client, model, 7, 65536);
    drop(client);
    assert_clean_and_equal(kind, daemon, &top, &model, dir.path());
    // The base was never written.
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base changed"
    );
}

fn compressed_image_with_a_snapshot(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 8 * MIB;
    let src_bytes: Vec<u8> = (0..size)
        .map(|i| ((i / 1024) as u8).wrapping_add(1))
        .collect();
    std::fs::File::create(&src)
        .unwrap()
        .write_all_at(&src_bytes, 0)
        .unwrap();
    let top = dir.path().join("top.qcow2");
    ok(Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
        ])
        .arg(&src)
        .arg(&top));
    ok(Command::new("qemu-img")
        .args(["snapshot", "-c", "s1"])
        .arg(&top));
    let socket = dir.path().join("vhost.sock");
    let opts = DiskOptions {
        format: "qcow2".into(),
        num_queues: 2,
        ..DiskOptions::raw(&top)
    };
    let daemon = Daemon::start(kind, &opts, &socket).unwrap();
    let mut client = BlkClient::connect(&socket, 2).unwrap();
    let model = workload(&mut client, src_bytes.clone(), 11, 4096);
    drop(client);
    assert_clean_and_equal(kind, daemon, &top, &model, dir.path());
    // The snapshot still reads as the image did when it was taken.
    let snap = dir.path().join("snap.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-q", "-l", "s1", "-O", "raw"])
        .arg(&top)
        .arg(&snap));
    assert!(
        std::fs::read(&snap).unwrap() == src_bytes,
        "the snapshot changed"
    );
}

both_backends!(
    overlay_over_raw_base,
    overlay_over_raw_base_o_direct,
    compressed_image_with_a_snapshot
);
