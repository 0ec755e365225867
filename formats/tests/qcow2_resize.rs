//! Offline qcow2 resize against QEMU as the oracle: images made and filled by qemu-img and
//! qemu-io, resized by `vublk_formats::qcow2::resize`, then `qemu-img check` must find them
//! clean (no leaks), `qemu-img info` must report the new size, and the guest view
//! (`qemu-img convert` to a sparse raw file, read extent by extent) must be the old data
//! followed by zeroes. Refusals must leave the file byte for byte unchanged.
//! A storage that stops after write N, for every N: `qemu-img check` finds no corruption
//! (leaks allowed), the size is the old or the new one, the data is intact, and running the
//! resize again finishes it.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a failure is the test failing"
)]

mod common;

use common::StopAfter;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use std::process::Command;

use vublk_formats::qcow2::{
    resize, resize_with, GuestCluster, HostOffset, Qcow2Layer, ResizeError, ResizeOutcome,
    Unsupported,
};
use vublk_formats::{FileStorage, ImageFile, ImageFileOptions, Layer};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn image_file(path: &Path, writable: bool) -> ImageFile {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .unwrap();
    ImageFile::new(
        file.into(),
        ImageFileOptions {
            role: "image".into(),
            writable,
            direct: false,
            nonblock: false,
        },
    )
    .unwrap()
}

/// `qemu-img create -f qcow2 -o <opts>`.
fn create(path: &Path, opts: &str, size: u64) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", opts])
        .arg(path)
        .arg(size.to_string()));
}

fn qemu_io(path: &Path, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run(cmd.arg(path));
}

/// `qemu-img check`'s exit status and output.
fn qemu_img_check(path: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn assert_clean(path: &Path, what: &str) {
    let (code, report) = qemu_img_check(path);
    assert_eq!(code, 0, "{what}: qemu-img check exit {code}:\n{report}");
    assert!(!report.contains("eaked"), "{what}: leaks:\n{report}");
}

fn virtual_size(path: &Path) -> u64 {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(path));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Converts the guest view of the image (or of one of its snapshots) to a sparse raw file.
fn convert(path: &Path, snapshot: Option<&str>) -> PathBuf {
    let out = path.with_extension("view.raw");
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-O", "raw"]);
    if let Some(name) = snapshot {
        cmd.arg("-l").arg(format!("snapshot.name={name}"));
    }
    run(cmd.arg(path).arg(&out));
    out
}

/// The guest view QEMU gives of a small image, in memory.
fn qemu_view(path: &Path) -> Vec<u8> {
    let raw = convert(path, None);
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// The raw file holds `old` (cut to `size`) followed by zeroes up to `size` bytes: the
/// prefix is compared, the rest is read extent by extent (holes read as zeroes), so a
/// terabyte disk costs what its data costs.
fn assert_raw(raw: &Path, old: &[u8], size: u64, what: &str) {
    let f = File::open(raw).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size, "{what}: view length");
    let keep = (old.len() as u64).min(size);
    let mut prefix = vec![0u8; keep as usize];
    f.read_exact_at(&mut prefix, 0).unwrap();
    assert!(
        prefix == old[..keep as usize],
        "{what}: the old data changed"
    );
    let mut pos = keep;
    // One data extent per round; each round moves past one.
    while pos < size {
        let start = match lseek(&f, pos as i64, Whence::SeekData) {
            Ok(start) => start as u64,
            Err(Errno::ENXIO) => break,
            Err(e) => panic!("{what}: SEEK_DATA: {e}"),
        };
        let end = (lseek(&f, start as i64, Whence::SeekHole).unwrap() as u64).min(size);
        let mut at = start;
        while at < end {
            let mut buf = vec![0u8; (end - at).min(MIB) as usize];
            f.read_exact_at(&mut buf, at).unwrap();
            if let Some(i) = buf.iter().position(|&b| b != 0) {
                panic!(
                    "{what}: guest byte {} past the old data is not zero",
                    at + i as u64
                );
            }
            at += buf.len() as u64;
        }
        pos = end.max(start + 1);
    }
}

/// The guest view of `path` (or of its snapshot) is `old` followed by zeroes up to `size`.
fn assert_view_of(path: &Path, snapshot: Option<&str>, old: &[u8], size: u64, what: &str) {
    let raw = convert(path, snapshot);
    assert_raw(&raw, old, size, what);
    std::fs::remove_file(&raw).unwrap();
}

/// The image has `size` bytes and reads as `old` followed by zeroes.
fn assert_view(path: &Path, old: &[u8], size: u64, what: &str) {
    assert_eq!(virtual_size(path), size, "{what}: virtual size");
    assert_view_of(path, None, old, size, what);
}

/// Only the header bytes in `changed` differ between `before` and the file now.
fn assert_only_header_changed(path: &Path, before: &[u8], changed: std::ops::Range<usize>) {
    let after = std::fs::read(path).unwrap();
    assert_eq!(after.len(), before.len(), "the file length changed");
    for (i, (a, b)) in after.iter().zip(before).enumerate() {
        if !changed.contains(&i) {
            assert_eq!(a, b, "byte {i} changed");
        }
    }
}

fn resize_file(path: &Path, size: u64, backing: Option<u64>) -> Result<ResizeOutcome, ResizeError> {
    resize(&image_file(path, true), size, backing)
}

/// Opens the image as the daemon would (writable: the overlap check runs) and as QEMU does.
fn assert_opens(path: &Path, size: u64) {
    let layer = Qcow2Layer::open(image_file(path, true), None).unwrap();
    assert_eq!(layer.virtual_size(), size);
}

/// An image made by qemu-img with a pattern at its start and another before its end.
struct Img {
    path: PathBuf,
    /// QEMU's guest view of it before the resize.
    view: Vec<u8>,
}

fn filled(dir: &Path, name: &str, opts: &str, size: u64) -> Img {
    let path = dir.join(format!("{name}.qcow2"));
    create(&path, opts, size);
    let tail = size - 64 * KIB;
    qemu_io(
        &path,
        &[
            format!("write -P 0x5a 0 {}", MIB.min(size / 2)),
            format!("write -P 0xa5 {tail} 64k"),
        ],
    );
    let view = qemu_view(&path);
    Img { path, view }
}

fn opts(cluster: u64, compat: &str) -> String {
    format!("cluster_size={cluster},compat={compat}")
}

/// Per cluster size: (old size, a growth that fits in the L1 table's clusters, a growth
/// past them where possible). 2 MiB clusters hold 262144 L1 entries (128 PiB) in one cluster:
/// their table never needs to move (the zero-size test moves one).
fn growth_matrix() -> Vec<(u64, u64, u64, u64)> {
    vec![
        (512, MIB, 2 * MIB, GIB),
        (4096, 4 * MIB, 64 * MIB, 4 * GIB),
        (65536, 8 * MIB, GIB, 8 * TIB),
        (2 * MIB, 16 * MIB, GIB, 8 * TIB),
    ]
}

#[test]
fn growing_within_the_l1_tables_clusters_rewrites_only_the_header() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, old, small, _) in growth_matrix() {
        for compat in ["1.1", "0.10"] {
            let what = format!("c{cluster}-{compat} {old} -> {small}");
            let img = filled(
                dir.path(),
                &format!("small-{cluster}-{compat}"),
                &opts(cluster, compat),
                old,
            );
            let before = std::fs::read(&img.path).unwrap();
            let outcome = resize_file(&img.path, small, None).unwrap();
            assert_eq!((outcome.old_size, outcome.new_size), (old, small), "{what}");
            assert!(!outcome.l1_moved(), "{what}: {outcome}");
            assert_eq!(outcome.refcount_table_moved_to, None, "{what}");
            // size, l1_size (and l1_table_offset, rewritten unchanged).
            assert_only_header_changed(&img.path, &before, 24..48);
            assert_clean(&img.path, &what);
            assert_view(&img.path, &img.view, small, &what);
            assert_opens(&img.path, small);
        }
    }
}

#[test]
fn growing_past_the_l1_tables_clusters_moves_the_table() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, old, _, large) in growth_matrix() {
        for compat in ["1.1", "0.10"] {
            let what = format!("c{cluster}-{compat} {old} -> {large}");
            let img = filled(
                dir.path(),
                &format!("large-{cluster}-{compat}"),
                &opts(cluster, compat),
                old,
            );
            let outcome = resize_file(&img.path, large, None).unwrap();
            let entries_per_cluster = cluster / 8;
            let bytes_per_l2 = cluster * entries_per_cluster;
            let needed = large.div_ceil(bytes_per_l2);
            let held = u64::from(outcome.old_l1_entries).div_ceil(entries_per_cluster)
                * entries_per_cluster;
            assert_eq!(outcome.l1_moved(), needed > held, "{what}: {outcome}");
            assert_eq!(u64::from(outcome.new_l1_entries), needed, "{what}");
            assert_clean(&img.path, &what);
            assert_view(&img.path, &img.view, large, &what);
            assert_opens(&img.path, large);
            // QEMU writes through the new table, at the old end and the new end.
            qemu_io(
                &img.path,
                &[
                    format!("write -P 0x33 {old} 64k"),
                    format!("write -P 0x44 {} 64k", large - 64 * KIB),
                    format!("read -P 0x33 {old} 64k"),
                    format!("read -P 0x44 {} 64k", large - 64 * KIB),
                    format!("read -P 0x5a 0 {}", MIB.min(old / 2)),
                ],
            );
            assert_clean(&img.path, &what);
        }
    }
}

#[test]
fn stale_entries_after_the_l1_table_move_it_instead_of_going_live() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters, 1 MiB: 32 L1 entries in a cluster that holds 64.
    let img = filled(dir.path(), "stale-l1", "cluster_size=512", MIB);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img.path)
        .unwrap();
    let mut field = [0u8; 8];
    f.read_exact_at(&mut field, 40).unwrap();
    let l1 = u64::from_be_bytes(field);
    // Entry 40 (past l1_size) repeats entry 0: live, it would share entry 0's L2 table.
    let mut entry = [0u8; 8];
    f.read_exact_at(&mut entry, l1).unwrap();
    assert_ne!(entry, [0u8; 8]);
    f.write_all_at(&entry, l1 + 40 * 8).unwrap();
    drop(f);
    assert_clean(&img.path, "stale entry outside the table");
    let outcome = resize_file(&img.path, 2 * MIB, None).unwrap();
    assert!(outcome.l1_moved(), "{outcome}");
    assert_eq!(outcome.new_l1_entries, 64);
    assert_clean(&img.path, "grown");
    assert_view(&img.path, &img.view, 2 * MIB, "grown");
}

#[test]
fn an_o_direct_fd_is_resized_with_aligned_writes() {
    use std::os::unix::fs::OpenOptionsExt;
    let direct = |path: &Path| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap();
        ImageFile::new(
            file.into(),
            ImageFileOptions {
                role: "image".into(),
                writable: true,
                direct: true,
                nonblock: false,
            },
        )
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    for (cluster, old, new) in [(4096u64, 4 * MIB, 4 * GIB), (65536, 8 * MIB, 8 * TIB)] {
        let what = format!("O_DIRECT c{cluster}");
        let img = filled(
            dir.path(),
            &format!("direct-{cluster}"),
            &format!("cluster_size={cluster},refcount_bits=1"),
            old,
        );
        let image = direct(&img.path);
        let outcome = resize(&image, new, None).unwrap();
        assert!(outcome.l1_moved(), "{what}: {outcome}");
        drop(image);
        assert_clean(&img.path, &what);
        assert_view(&img.path, &img.view, new, &what);
        // And back down (no data past the old end).
        resize(&direct(&img.path), old, None).unwrap();
        assert_clean(&img.path, &what);
        assert_view(&img.path, &img.view, old, &what);
    }
}

#[test]
fn empty_images_grow_into_a_new_l1_table() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [512, 4096, 65536, 2 * MIB] {
        for compat in ["1.1", "0.10"] {
            let what = format!("c{cluster}-{compat} 0 -> 8M");
            let path = dir.path().join(format!("empty-{cluster}-{compat}.qcow2"));
            create(&path, &opts(cluster, compat), 0);
            let outcome = resize_file(&path, 8 * MIB, None).unwrap();
            assert_eq!(outcome.old_l1_entries, 0, "{what}");
            assert!(outcome.l1_moved(), "{what}: {outcome}");
            assert_clean(&path, &what);
            assert_view(&path, &[], 8 * MIB, &what);
            qemu_io(
                &path,
                &["write -P 0x11 4M 1M".into(), "read -P 0x11 4M 1M".into()],
            );
            assert_clean(&path, &what);
        }
    }
}

#[test]
fn growth_that_outgrows_the_refcount_table_moves_it() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters with 64-bit refcounts: a block counts 64 clusters, a table cluster
    // indexes 64 blocks (2 MiB of file). A 16 MiB L1 table (for 64 GiB) needs a bigger one;
    // with 1-bit refcounts a table cluster indexes 128 MiB: 32 GiB L1 is the most there is.
    for (refcount_bits, new_size, moves) in [(64u32, 64 * GIB, true), (1, 128 * GIB, false)] {
        let what = format!("refcount_bits={refcount_bits} -> {new_size}");
        let img = filled(
            dir.path(),
            &format!("reftable-{refcount_bits}"),
            &format!("cluster_size=512,refcount_bits={refcount_bits}"),
            MIB,
        );
        let outcome = resize_file(&img.path, new_size, None).unwrap();
        assert!(outcome.l1_moved(), "{what}: {outcome}");
        assert_eq!(
            outcome.refcount_table_moved_to.is_some(),
            moves,
            "{what}: {outcome}"
        );
        assert_clean(&img.path, &what);
        assert_view(&img.path, &img.view, new_size, &what);
        assert_opens(&img.path, new_size);
        qemu_io(
            &img.path,
            &[format!("write -P 0x44 {} 64k", new_size - 64 * KIB)],
        );
        assert_clean(&img.path, &what);
    }
}

#[test]
fn sizes_that_qemu_refuses_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = filled(dir.path(), "sizes", "cluster_size=512", MIB);
    let before = std::fs::read(&img.path).unwrap();
    let err = resize_file(&img.path, MIB + 1, None).unwrap_err();
    assert!(
        matches!(err, ResizeError::Unaligned { size } if size == MIB + 1),
        "{err}"
    );
    assert!(err.to_string().contains("1048577"), "{err}");
    let err = resize_file(&img.path, (1 << 56) + 512, None).unwrap_err();
    assert!(matches!(err, ResizeError::TooLarge { .. }), "{err}");
    // 512-byte clusters: a 32 MiB L1 table maps 128 GiB; one sector more needs more.
    let err = resize_file(&img.path, 128 * GIB + 512, None).unwrap_err();
    assert!(
        matches!(err, ResizeError::L1TooLarge { entries, .. } if entries == (1 << 22) + 1),
        "{err}"
    );
    assert_eq!(std::fs::read(&img.path).unwrap(), before);
    // Exactly the limit is fine (a 32 MiB L1 table at the end of the file).
    let outcome = resize_file(&img.path, 128 * GIB, None).unwrap();
    assert_eq!(outcome.new_l1_entries, 1 << 22);
    assert_clean(&img.path, "128 GiB");
    assert_view(&img.path, &img.view, 128 * GIB, "128 GiB");
}

#[test]
fn the_same_size_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let img = filled(dir.path(), "same", "cluster_size=4096", 4 * MIB);
    let before = std::fs::read(&img.path).unwrap();
    let outcome = resize_file(&img.path, 4 * MIB, None).unwrap();
    assert_eq!((outcome.old_size, outcome.new_size), (4 * MIB, 4 * MIB));
    assert!(!outcome.l1_moved());
    assert_eq!(std::fs::read(&img.path).unwrap(), before);
}

/// Per cluster size: an old size with room to shrink below it.
fn shrink_matrix() -> Vec<(u64, u64)> {
    vec![
        (512, 4 * MIB),
        (4096, 8 * MIB),
        (65536, 16 * MIB),
        (2 * MIB, 32 * MIB),
    ]
}

#[test]
fn shrinking_over_an_unallocated_tail_rewrites_only_the_size() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, old) in shrink_matrix() {
        for compat in ["1.1", "0.10"] {
            // Not cluster aligned: the cluster holding the new end stays (unallocated here).
            let new = 2 * MIB + 512;
            let what = format!("c{cluster}-{compat} {old} -> {new}");
            let path = dir.path().join(format!("shrink-{cluster}-{compat}.qcow2"));
            create(&path, &opts(cluster, compat), old);
            qemu_io(&path, &["write -P 0x5a 0 1M".into()]);
            let view = qemu_view(&path);
            let before = std::fs::read(&path).unwrap();
            let outcome = resize_file(&path, new, None).unwrap();
            assert_eq!((outcome.old_size, outcome.new_size), (old, new), "{what}");
            assert!(!outcome.l1_moved(), "{what}");
            assert_eq!(outcome.new_l1_entries, outcome.old_l1_entries, "{what}");
            assert_only_header_changed(&path, &before, 24..32);
            assert_clean(&path, &what);
            assert_view(&path, &view, new, &what);
            // And back: the tail reads as zeroes again.
            resize_file(&path, old, None).unwrap();
            assert_clean(&path, &what);
            assert_view(&path, &view[..new as usize], old, &what);
        }
    }
}

#[test]
fn shrinking_over_allocated_clusters_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, old) in shrink_matrix() {
        for compat in ["1.1", "0.10"] {
            let what = format!("c{cluster}-{compat}");
            let img = filled(
                dir.path(),
                &format!("refuse-{cluster}-{compat}"),
                &opts(cluster, compat),
                old,
            );
            let before = std::fs::read(&img.path).unwrap();
            let err = resize_file(&img.path, 2 * MIB, None).unwrap_err();
            let tail = GuestCluster((old - 64 * KIB) / cluster);
            match &err {
                ResizeError::AllocatedPastEnd {
                    new_size, cluster, ..
                } => {
                    assert_eq!((*new_size, *cluster), (2 * MIB, tail), "{what}: {err}");
                }
                other => panic!("{what}: {other}"),
            }
            assert!(err.to_string().contains(&tail.to_string()), "{err}");
            assert_eq!(std::fs::read(&img.path).unwrap(), before, "{what}");
        }
    }
}

#[test]
fn emptied_l2_tables_and_zero_clusters_past_the_end_do_not_block_a_shrink() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters: an L2 table maps 32 KiB; the one for [2 MiB, 2 MiB + 32 KiB) keeps
    // a discarded cluster (unallocated again) and a zero cluster (v3 zero flag).
    let path = dir.path().join("emptied.qcow2");
    create(&path, "cluster_size=512", 4 * MIB);
    qemu_io(
        &path,
        &[
            "write -P 0x5a 0 1M".into(),
            format!("write -P 0x11 {} 4k", 2 * MIB + 4 * KIB),
            format!("discard {} 4k", 2 * MIB + 4 * KIB),
            format!("write -z {} 4k", 2 * MIB + 8 * KIB),
        ],
    );
    let view = qemu_view(&path);
    let before = std::fs::read(&path).unwrap();
    resize_file(&path, 2 * MIB, None).unwrap();
    assert_only_header_changed(&path, &before, 24..32);
    assert_clean(&path, "shrunk");
    assert_view(&path, &view, 2 * MIB, "shrunk");
    // Growing back: the emptied table maps zeroes.
    resize_file(&path, 4 * MIB, None).unwrap();
    assert_clean(&path, "grown back");
    assert_view(&path, &view[..2 * MIB as usize], 4 * MIB, "grown back");
}

#[test]
fn data_past_the_current_end_is_refused_on_growth() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.qcow2");
    create(&path, "cluster_size=65536", 4 * MIB);
    qemu_io(&path, &["write -P 0x77 3M 64k".into()]);
    // A header that says 2 MiB over a table that maps data at 3 MiB.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&(2 * MIB).to_be_bytes(), 24).unwrap();
    drop(f);
    let before = std::fs::read(&path).unwrap();
    let err = resize_file(&path, 4 * MIB, None).unwrap_err();
    assert!(
        matches!(err, ResizeError::DataPastEnd { cluster, .. } if cluster == GuestCluster(48)),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // Growing short of it is fine.
    resize_file(&path, 3 * MIB, None).unwrap();
}

#[test]
fn dirty_corrupt_and_unsupported_images_are_refused_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    for (bit, name) in [(1u64, "dirty"), (2, "corrupt")] {
        let path = dir.path().join(format!("{name}.qcow2"));
        create(&path, "cluster_size=65536", 4 * MIB);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&bit.to_be_bytes(), 72).unwrap();
        drop(f);
        let before = std::fs::read(&path).unwrap();
        for size in [8 * MIB, 2 * MIB] {
            let err = resize_file(&path, size, None).unwrap_err();
            match (&err, bit) {
                (ResizeError::Dirty, 1) | (ResizeError::Corrupt, 2) => {}
                _ => panic!("{name}: {err}"),
            }
            assert!(err.to_string().contains("qemu-img check -r all"), "{err}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), before, "{name}");
    }
    let path = dir.path().join("extended-l2.qcow2");
    create(&path, "cluster_size=65536,extended_l2=on", 4 * MIB);
    let err = resize_file(&path, 8 * MIB, None).unwrap_err();
    assert!(
        matches!(err, ResizeError::Unsupported(Unsupported::ExtendedL2)),
        "{err}"
    );
    let err = resize(&image_file(&path, false), 8 * MIB, None).unwrap_err();
    assert!(matches!(err, ResizeError::ReadOnly { .. }), "{err}");
}

#[test]
fn autoclear_bits_are_cleared_with_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bitmap.qcow2");
    create(&path, "cluster_size=65536", 4 * MIB);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&path)
        .arg("b0"));
    let before = std::fs::read(&path).unwrap();
    assert_ne!(before[88..96], [0u8; 8], "qemu-img set the bitmaps bit");
    resize_file(&path, 8 * MIB, None).unwrap();
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after[88..96], [0u8; 8]);
    assert_eq!(virtual_size(&path), 8 * MIB);
    // The bitmap's clusters are now unreferenced (QEMU ignores the extension): leaks only.
    let (code, report) = qemu_img_check(&path);
    assert!(code == 0 || code == 3, "{report}");
}

#[test]
fn internal_snapshots_keep_their_data_when_the_image_grows() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, old, small, large) in growth_matrix() {
        for (label, new) in [("small", small), ("large", large)] {
            let what = format!("c{cluster} {label} {old} -> {new}");
            let img = filled(
                dir.path(),
                &format!("snap-{cluster}-{label}"),
                &opts(cluster, "1.1"),
                old,
            );
            run(Command::new("qemu-img")
                .args(["snapshot", "-c", "s1"])
                .arg(&img.path));
            // The active layer moves on after the snapshot.
            qemu_io(&img.path, &["write -P 0x66 0 64k".into()]);
            let active = qemu_view(&img.path);
            resize_file(&img.path, new, None).unwrap();
            assert_clean(&img.path, &what);
            assert_view(&img.path, &active, new, &what);
            // The snapshot reads as taken (QEMU shows it at the image's current size).
            assert_view_of(&img.path, Some("s1"), &img.view, new, &what);
            // Reverting restores the snapshot's own size and data. QEMU shrinks the disk
            // back for it, which costs it time per guest cluster: the small growths only.
            if label == "small" {
                let copy = img.path.with_extension("reverted.qcow2");
                std::fs::copy(&img.path, &copy).unwrap();
                run(Command::new("qemu-img")
                    .args(["snapshot", "-a", "s1"])
                    .arg(&copy));
                assert_clean(&copy, &what);
                assert_view(&copy, &img.view, old, &what);
            }
        }
    }
}

#[test]
fn a_v3_image_with_a_snapshot_shrinks_and_the_snapshot_keeps_its_tail() {
    let dir = tempfile::tempdir().unwrap();
    let img = filled(dir.path(), "snap-shrink", "cluster_size=65536", 8 * MIB);
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", "s1"])
        .arg(&img.path));
    let err = resize_file(&img.path, 4 * MIB, None).unwrap_err();
    assert!(matches!(err, ResizeError::AllocatedPastEnd { .. }), "{err}");
    // Once the active layer no longer maps the tail (its L2 table is still shared with the
    // snapshot, so QEMU copies it), the shrink goes through.
    qemu_io(&img.path, &[format!("discard {} 64k", 8 * MIB - 64 * KIB)]);
    resize_file(&img.path, 4 * MIB, None).unwrap();
    assert_clean(&img.path, "shrunk");
    assert_view(&img.path, &img.view, 4 * MIB, "shrunk");
    let copy = img.path.with_extension("reverted.qcow2");
    std::fs::copy(&img.path, &copy).unwrap();
    run(Command::new("qemu-img")
        .args(["snapshot", "-a", "s1"])
        .arg(&copy));
    assert_clean(&copy, "reverted");
    assert_view(&copy, &img.view, 8 * MIB, "reverted");
}

#[test]
fn a_v2_image_with_a_snapshot_is_refused_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2-snap.qcow2");
    create(&path, "compat=0.10", 4 * MIB);
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", "s1"])
        .arg(&path));
    let before = std::fs::read(&path).unwrap();
    for size in [8 * MIB, 2 * MIB, 4 * MIB] {
        let err = resize_file(&path, size, None).unwrap_err();
        assert!(
            matches!(err, ResizeError::SnapshotsInV2 { nb_snapshots: 1 }),
            "{err}"
        );
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // The oracle agrees.
    let out = Command::new("qemu-img")
        .args(["resize", "-f", "qcow2"])
        .arg(&path)
        .arg("8M")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn backing_data_that_would_show_is_refused_and_a_shorter_backing_file_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_bytes: Vec<u8> = (0..4 * MIB).map(|i| (i / 4096) as u8 ^ 0x3c).collect();
    std::fs::write(&base, &base_bytes).unwrap();
    for compat in ["1.1", "0.10"] {
        let with_backing = format!(
            "cluster_size=65536,compat={compat},backing_file={},backing_fmt=raw",
            base.display()
        );
        // The backing file is longer than the overlay: [2M, 4M) would show through.
        let short = dir.path().join(format!("short-{compat}.qcow2"));
        create(&short, &with_backing, 2 * MIB);
        let before = std::fs::read(&short).unwrap();
        let err = resize_file(&short, 8 * MIB, Some(4 * MIB)).unwrap_err();
        assert!(
            matches!(
                err,
                ResizeError::BackingWouldShow {
                    old_size,
                    shown_end,
                    ..
                } if old_size == 2 * MIB && shown_end == 4 * MIB
            ),
            "{err}"
        );
        let err = resize_file(&short, 8 * MIB, None).unwrap_err();
        assert!(matches!(err, ResizeError::BackingSizeMissing), "{err}");
        assert_eq!(std::fs::read(&short).unwrap(), before, "{compat}");
        // Shrinking it is fine.
        resize_file(&short, MIB, Some(4 * MIB)).unwrap();
        assert_clean(&short, compat);
        assert_view(&short, &base_bytes, MIB, compat);

        // The backing file is shorter: the overlay's new part reads as zeroes.
        let long = dir.path().join(format!("long-{compat}.qcow2"));
        create(&long, &with_backing, 6 * MIB);
        qemu_io(&long, &["write -P 0x5a 1M 64k".into()]);
        let view = qemu_view(&long);
        assert_eq!(view[..MIB as usize], base_bytes[..MIB as usize]);
        let outcome = resize_file(&long, 16 * MIB, Some(4 * MIB)).unwrap();
        assert_eq!(outcome.new_size, 16 * MIB);
        assert_clean(&long, compat);
        assert_view(&long, &view, 16 * MIB, compat);
    }
    let plain = dir.path().join("plain.qcow2");
    create(&plain, "cluster_size=65536", MIB);
    let err = resize_file(&plain, 2 * MIB, Some(MIB)).unwrap_err();
    assert!(
        matches!(err, ResizeError::UnexpectedBacking { .. }),
        "{err}"
    );
}

#[test]
fn stopping_after_every_write_n_leaves_the_old_or_new_size_and_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    struct Case {
        name: &'static str,
        opts: &'static str,
        old: u64,
        new: u64,
        snapshot: bool,
        min_writes: u64,
    }
    for case in [
        // New refcount blocks for a 256 KiB L1 table.
        Case {
            name: "c512-relocate",
            opts: "cluster_size=512",
            old: MIB,
            new: GIB,
            snapshot: false,
            min_writes: 6,
        },
        // A new refcount table too.
        Case {
            name: "c512-reftable",
            opts: "cluster_size=512,refcount_bits=64",
            old: MIB,
            new: 8 * GIB,
            snapshot: false,
            min_writes: 20,
        },
        Case {
            name: "c4096-v2-in-place",
            opts: "cluster_size=4096,compat=0.10",
            old: 4 * MIB,
            new: 64 * MIB,
            snapshot: false,
            min_writes: 1,
        },
        Case {
            name: "c65536-snapshot-relocate",
            opts: "cluster_size=65536",
            old: 8 * MIB,
            new: 8 * TIB,
            snapshot: true,
            min_writes: 3,
        },
        Case {
            name: "c65536-shrink",
            opts: "cluster_size=65536",
            old: 16 * MIB,
            new: 4 * MIB,
            snapshot: false,
            min_writes: 1,
        },
    ] {
        let path = dir.path().join(format!("{}.qcow2", case.name));
        create(&path, case.opts, case.old);
        qemu_io(&path, &["write -P 0x5a 0 1M".into()]);
        if case.snapshot {
            run(Command::new("qemu-img")
                .args(["snapshot", "-c", "s1"])
                .arg(&path));
        }
        let view = qemu_view(&path);
        let pristine = std::fs::read(&path).unwrap();
        let mut n = 0u64;
        loop {
            std::fs::write(&path, &pristine).unwrap();
            let result = {
                let file = image_file(&path, true);
                let io = StopAfter::new(FileStorage::new(vec![&file]), n);
                resize_with(&io, case.new, None)
            };
            let what = format!("{}: stopped after write {n}", case.name);
            let (code, report) = qemu_img_check(&path);
            assert!(
                code == 0 || code == 3,
                "{what}: qemu-img check exit {code}:\n{report}"
            );
            let size = virtual_size(&path);
            assert!(size == case.old || size == case.new, "{what}: size {size}");
            assert_view(&path, &view, size, &what);
            if result.is_ok() {
                assert_eq!(size, case.new, "{}: finished", case.name);
                assert_eq!(code, 0, "{}: a finished resize leaks:\n{report}", case.name);
                break;
            }
            // Running it again finishes the job (what the crash leaked stays leaked).
            resize_file(&path, case.new, None).unwrap();
            let (code, report) = qemu_img_check(&path);
            assert!(
                code == 0 || code == 3,
                "{what}, then again: {code}:\n{report}"
            );
            assert_view(&path, &view, case.new, &what);
            n += 1;
            assert!(n < 10_000, "{}: never finishes", case.name);
        }
        eprintln!("DEBUG {}: {n} writes", case.name);
        assert!(
            n >= case.min_writes,
            "{}: the resize wrote only {n} times",
            case.name
        );
    }
}

#[test]
fn outcome_reports_offsets_for_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let img = filled(dir.path(), "log", "cluster_size=512", MIB);
    let outcome = resize_file(&img.path, GIB, None).unwrap();
    assert!(outcome.l1_moved());
    assert_ne!(outcome.new_l1_offset, HostOffset(0));
    let text = outcome.to_string();
    assert!(text.starts_with("1048576 -> 1073741824 bytes; L1 table moved from host offset"));
}
