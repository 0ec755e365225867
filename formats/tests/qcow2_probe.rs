//! Differential tests: vublk's probe against `qemu-img info --output=json` (QEMU 10) on images
//! that qemu-img and qemu-io make, and the header serializer against the bytes qemu-img wrote.
//!
//! qemu-img is the oracle: a machine without it fails these tests (tests/install-deps.sh
//! installs it), it never skips them.

#![allow(
    clippy::unwrap_used,
    reason = "a test binary: the helpers panic like the #[test] fns that clippy already exempts"
)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tempfile::TempDir;
use vublk_formats::qcow2::limits::HEADER_READ_LIMIT;
use vublk_formats::qcow2::{probe_fd, ProbeInfo, Qcow2Header};
use vublk_formats::Format;

/// The keys both sides must agree on (top level).
const TOP_KEYS: &[&str] = &[
    "format",
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
    "dirty-flag",
    "encrypted",
];

/// The keys both sides must agree on in "format-specific"."data".
const QCOW2_KEYS: &[&str] = &[
    "compat",
    "compression-type",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "data-file",
    "data-file-raw",
];

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (qemu-utils is needed): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_img(dir: &Path, args: &[&str]) {
    run(Command::new("qemu-img").current_dir(dir).args(args));
}

fn qemu_info(path: &Path) -> Value {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn probe_path(path: &Path, hint: Option<Format>) -> ProbeInfo {
    let file = File::open(path).unwrap();
    probe_fd(file.as_fd(), hint).unwrap()
}

/// Asserts that vublk's probe of `path` agrees with qemu-img on every key vublk reports, and
/// returns vublk's JSON.
fn assert_matches_qemu(path: &Path) -> Value {
    let theirs = qemu_info(path);
    let ours = serde_json::to_value(probe_path(path, None)).unwrap();
    let name = path.display();
    for key in TOP_KEYS {
        assert_eq!(ours.get(key), theirs.get(key), "{name}: key {key}");
    }
    assert_eq!(
        ours.get("actual-size"),
        theirs.get("actual-size"),
        "{name}: actual-size"
    );
    let spec = |v: &Value, k: &str| v.pointer(&format!("/format-specific/{k}")).cloned();
    assert_eq!(spec(&ours, "type"), spec(&theirs, "type"), "{name}: type");
    for key in QCOW2_KEYS {
        assert_eq!(
            spec(&ours, &format!("data/{key}")),
            spec(&theirs, &format!("data/{key}")),
            "{name}: format-specific key {key}"
        );
    }
    assert_eq!(
        spec(&ours, "data/encrypt/format"),
        spec(&theirs, "data/encrypt/format"),
        "{name}: encrypt format"
    );
    ours
}

fn first_bytes(path: &Path) -> Vec<u8> {
    let mut buf = Vec::new();
    File::open(path)
        .unwrap()
        .take(HEADER_READ_LIMIT as u64)
        .read_to_end(&mut buf)
        .unwrap();
    buf
}

/// Asserts that re-serializing the parsed header gives back exactly what qemu-img wrote, up
/// to the end of the backing file name, and that only zeroes follow in the read window.
fn assert_to_bytes_reproduces(path: &Path) {
    let bytes = first_bytes(path);
    let header = Qcow2Header::parse(&bytes).unwrap();
    let out = header.to_bytes().unwrap();
    assert_eq!(out, bytes[..out.len()], "{}: header bytes", path.display());
    let cluster = usize::try_from(header.cluster_size()).unwrap();
    let tail = &bytes[out.len()..cluster.min(bytes.len())];
    assert!(
        tail.iter().all(|&b| b == 0),
        "{}: non-zero bytes after the header",
        path.display()
    );
    assert_eq!(Qcow2Header::parse(&out).unwrap(), header);
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

struct Case {
    name: String,
    options: String,
}

fn matrix() -> Vec<Case> {
    let mut cases = Vec::new();
    for cluster in [512u32, 4096, 65536, 2 << 20] {
        let c = format!("cluster_size={cluster}");
        let mut add = |name: &str, opts: &str| {
            cases.push(Case {
                name: format!("c{cluster}-{name}.qcow2"),
                options: format!("{c},{opts}"),
            })
        };
        add("v2", "compat=0.10");
        add("v3", "compat=1.1");
        for bits in [1, 16, 64] {
            add(
                &format!("rc{bits}"),
                &format!("compat=1.1,refcount_bits={bits}"),
            );
        }
        add("zstd", "compat=1.1,compression_type=zstd");
        add("zlib", "compat=1.1,compression_type=zlib");
        add("lazy", "compat=1.1,lazy_refcounts=on");
        add(
            "all",
            "compat=1.1,lazy_refcounts=on,refcount_bits=64,compression_type=zstd",
        );
    }
    cases
}

#[test]
fn created_images_match_qemu_img_info_over_the_matrix() {
    let dir = TempDir::new().unwrap();
    for case in matrix() {
        qemu_img(
            dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &case.options,
                &case.name,
                "3G",
            ],
        );
        let path = dir.path().join(&case.name);
        assert_matches_qemu(&path);
        assert_to_bytes_reproduces(&path);
    }
}

#[test]
fn backing_files_and_their_formats_match() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "raw", "base.raw", "1M"]);
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    for (compat, fmt, base) in [
        ("0.10", "raw", "base.raw"),
        ("1.1", "raw", "base.raw"),
        ("0.10", "qcow2", "base.qcow2"),
        ("1.1", "qcow2", "base.qcow2"),
    ] {
        let name = format!("top-{compat}-{fmt}.qcow2");
        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat}"),
                "-b",
                base,
                "-F",
                fmt,
                &name,
                "2M",
            ],
        );
        let path = d.join(&name);
        let ours = assert_matches_qemu(&path);
        assert_eq!(ours["backing-filename"], base);
        assert_eq!(ours["backing-filename-format"], fmt);
        assert_to_bytes_reproduces(&path);
    }
    // A long backing name, and one in a 512-byte cluster.
    let long = format!("{}.raw", "b".repeat(200));
    std::fs::copy(d.join("base.raw"), d.join(&long)).unwrap();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            &long,
            "-F",
            "raw",
            "long.qcow2",
            "1M",
        ],
    );
    assert_matches_qemu(&d.join("long.qcow2"));
    assert_to_bytes_reproduces(&d.join("long.qcow2"));
}

#[test]
fn dirty_image_left_by_an_aborted_lazy_refcounts_writer() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "d.qcow2",
            "1M",
        ],
    );
    // qemu-io's "abort" kills the writer with the image marked dirty (QEMU's iotest 039 does
    // the same); no core file.
    let status = Command::new("sh")
        .current_dir(d)
        .args([
            "-c",
            "ulimit -c 0; exec qemu-io -c 'write -P 0x5a 0 64k' -c abort d.qcow2",
        ])
        .output()
        .unwrap()
        .status;
    assert!(!status.success(), "qemu-io abort should not exit cleanly");
    let ours = assert_matches_qemu(&d.join("d.qcow2"));
    assert_eq!(ours["dirty-flag"], true);
    assert_to_bytes_reproduces(&d.join("d.qcow2"));
}

#[test]
fn dirty_and_corrupt_bits_patched_in_match() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    for (name, byte) in [
        ("dirty.qcow2", 1u8),
        ("corrupt.qcow2", 2),
        ("both.qcow2", 3),
    ] {
        qemu_img(d, &["create", "-q", "-f", "qcow2", name, "1M"]);
        patch(&d.join(name), 79, &[byte]);
        let ours = assert_matches_qemu(&d.join(name));
        assert_eq!(ours["dirty-flag"], byte & 1 != 0);
        assert_eq!(ours["format-specific"]["data"]["corrupt"], byte & 2 != 0);
    }
}

#[test]
fn the_dirty_patch_is_what_qemu_reads() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "p.qcow2", "1M"]);
    let path = d.join("p.qcow2");
    let mut header = Qcow2Header::parse(&first_bytes(&path)).unwrap();
    header.set_dirty(true).unwrap();
    let p = header.incompatible_features_patch().unwrap();
    patch(&path, p.offset.0, &p.bytes);
    assert_eq!(qemu_info(&path)["dirty-flag"], true);
    header.set_dirty(false).unwrap();
    patch(&path, 0, &header.to_bytes().unwrap());
    assert_eq!(qemu_info(&path)["dirty-flag"], false);
    run(Command::new("qemu-img").arg("check").arg(&path));
}

#[test]
fn sizes_round_like_qemu() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "zero.qcow2", "0"]);
    assert_eq!(
        assert_matches_qemu(&d.join("zero.qcow2"))["virtual-size"],
        0
    );
    qemu_img(d, &["create", "-q", "-f", "qcow2", "odd.qcow2", "1M"]);
    // 1 MiB + 1000 bytes: QEMU sees whole sectors only.
    patch(
        &d.join("odd.qcow2"),
        24,
        &((1u64 << 20) + 1000).to_be_bytes(),
    );
    assert_eq!(
        assert_matches_qemu(&d.join("odd.qcow2"))["virtual-size"],
        (1 << 20) + 512
    );
    std::fs::write(d.join("small.raw"), vec![1u8; 1000]).unwrap();
    assert_eq!(
        assert_matches_qemu(&d.join("small.raw"))["virtual-size"],
        1024
    );
    qemu_img(d, &["create", "-q", "-f", "raw", "big.raw", "5G"]);
    assert_matches_qemu(&d.join("big.raw"));
}

#[test]
fn images_vublk_refuses_are_still_reported() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "luks.qcow2",
            "1M",
        ],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=data.raw,data_file_raw=on",
            "ext.qcow2",
            "1M",
        ],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "el2.qcow2",
            "1M",
        ],
    );
    for (name, why) in [
        ("luks.qcow2", "encryption: luks"),
        ("ext.qcow2", "external data file"),
        ("el2.qcow2", "extended L2"),
    ] {
        let path = d.join(name);
        let ours = assert_matches_qemu(&path);
        let unsupported = ours["format-specific"]["data"]["x-unsupported"].to_string();
        assert!(unsupported.contains(why), "{name}: {unsupported}");
        assert_to_bytes_reproduces(&path);
        let err = Qcow2Header::parse_supported(&first_bytes(&path)).unwrap_err();
        // The feature is named by the error's source (the chain an `{:#}` prints).
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        assert!(
            cause.as_deref().is_some_and(|c| c.contains(why)),
            "{name}: {err}: {cause:?}"
        );
    }

    // An unknown incompatible bit: qemu-img refuses even to describe it; vublk's probe
    // reports it (the manager needs the information), opening refuses it.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "future.qcow2", "1M"]);
    let path = d.join("future.qcow2");
    patch(&path, 72, &(1u64 << 5).to_be_bytes());
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unsupported qcow2 feature"));
    let ours = serde_json::to_value(probe_path(&path, None)).unwrap();
    assert_eq!(
        ours["format-specific"]["data"]["x-incompatible-features"],
        32
    );
    assert_eq!(
        ours["format-specific"]["data"]["x-unsupported"][0],
        "unknown incompatible feature(s): bit 5"
    );
}

#[test]
fn bitmaps_are_counted_not_loaded() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "bm.qcow2", "1M"]);
    for b in ["b0", "b1"] {
        qemu_img(d, &["bitmap", "--add", "bm.qcow2", b]);
    }
    let path = d.join("bm.qcow2");
    let ours = assert_matches_qemu(&path);
    let theirs = qemu_info(&path);
    let n = theirs["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(ours["format-specific"]["data"]["x-nb-bitmaps"], n);
    assert_to_bytes_reproduces(&path);
}

#[test]
fn format_hint_overrides_detection() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "q.qcow2", "1M"]);
    let path = d.join("q.qcow2");
    let as_raw = probe_path(&path, Some(Format::Raw));
    let theirs = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "raw"])
        .arg(&path));
    let theirs: Value = serde_json::from_slice(&theirs.stdout).unwrap();
    assert_eq!(as_raw.format, Format::Raw);
    assert_eq!(
        serde_json::json!(as_raw.virtual_size),
        theirs["virtual-size"]
    );
}

#[test]
fn probe_fd_reads_through_an_o_direct_fd() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "x", "-F", "raw", "q.qcow2", "1M",
        ],
    );
    let path: PathBuf = d.join("q.qcow2");
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => panic!("O_DIRECT open failed on {}: {e}", path.display()),
    };
    let info = probe_fd(file.as_fd(), None).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("x"));
    assert_eq!(info, probe_path(&path, None));
}
