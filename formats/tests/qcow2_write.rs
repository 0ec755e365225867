//! qcow2 writes against QEMU as the oracle: random workloads of writes, write-zeroes and
//! discards go through the layer exactly as the server drives it (in-place pieces from `map`,
//! tables loaded on request, everything else through `update`), the same bytes go to a raw
//! model, and then `qemu-img check` must find the image clean and `qemu-img compare` must find
//! it equal to the model. A fault-injecting storage stops the workload after write N for every
//! N: `qemu-img check` must then report no corruption (leaks allowed) and every acknowledged
//! write must read back (a process crash loses nothing completed to the guest).

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a failure is the test failing; patterns truncate on purpose"
)]

mod common;

use common::StopAfter;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vublk_formats::qcow2::Qcow2Layer;
use vublk_formats::{
    decompress_cluster, FileStorage, ImageFile, ImageFileOptions, Layer, MapError, MapKind,
    OpenError, Piece, RawLayer, Storage, Update, UpdateError,
};

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

fn image_file(path: &Path, role: &str, writable: bool) -> ImageFile {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .unwrap();
    ImageFile::new(
        file.into(),
        ImageFileOptions {
            role: role.into(),
            writable,
            direct: false,
            nonblock: false,
        },
    )
    .unwrap()
}

/// A chain to open: the top qcow2 and, optionally, one backing layer.
struct Chain {
    top: PathBuf,
    backing: Option<(PathBuf, &'static str)>,
}

impl Chain {
    fn open(&self) -> Result<Qcow2Layer, OpenError> {
        self.open_with_cache(vublk_formats::qcow2::DEFAULT_L2_CACHE_BYTES)
    }

    fn open_with_cache(&self, l2_cache_bytes: u64) -> Result<Qcow2Layer, OpenError> {
        let backing: Option<Box<dyn Layer>> = self.backing.as_ref().map(|(path, fmt)| {
            let file = image_file(path, "backing 1", false);
            let layer: Box<dyn Layer> = match *fmt {
                "raw" => Box::new(RawLayer::open(file).unwrap()),
                _ => Box::new(Qcow2Layer::open(file, None).unwrap()),
            };
            layer
        });
        Qcow2Layer::open_with_l2_cache(
            image_file(&self.top, "image", true),
            backing,
            l2_cache_bytes,
        )
    }
}

/// Drives a layer the way the server's queue workers and metadata thread do.
struct Driver<'a> {
    layer: &'a dyn Layer,
    io: &'a dyn Storage,
}

impl Driver<'_> {
    fn load(&self, loads: Vec<vublk_formats::TableLoad>) -> Result<(), UpdateError> {
        for load in loads {
            let mut bytes = vec![0u8; usize::try_from(load.len).unwrap()];
            self.io
                .read_at(load.file, load.offset, &mut bytes)
                .map_err(|source| UpdateError::Io {
                    fd: -1,
                    what: "table".into(),
                    source,
                })?;
            self.layer.load_table(load, &bytes)?;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), UpdateError> {
        loop {
            let mut pieces = Vec::new();
            match self
                .layer
                .map(MapKind::Write, offset, data.len() as u64, &mut pieces)
            {
                Ok(()) => {
                    let mut at = 0usize;
                    for piece in pieces {
                        let Piece::Data { file, offset, len } = piece else {
                            panic!("a write mapped to {piece:?}");
                        };
                        let n = usize::try_from(len).unwrap();
                        self.io
                            .write_at(file, offset, &data[at..at + n])
                            .map_err(|source| UpdateError::Io {
                                fd: -1,
                                what: "in-place write".into(),
                                source,
                            })?;
                        at += n;
                    }
                    return Ok(());
                }
                Err(MapError::NeedTables(loads)) => self.load(loads)?,
                Err(MapError::NeedUpdate) => {
                    return self.layer.update(self.io, Update::Write { offset, data })
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let pieces = loop {
            let mut pieces = Vec::new();
            match self.layer.map(MapKind::Read, offset, len, &mut pieces) {
                Ok(()) => break pieces,
                Err(MapError::NeedTables(loads)) => self.load(loads).unwrap(),
                Err(e) => panic!("read map: {e}"),
            }
        };
        let mut out = Vec::new();
        for piece in pieces {
            let n = usize::try_from(piece.len()).unwrap();
            match piece {
                Piece::Zero { .. } => out.extend(std::iter::repeat_n(0u8, n)),
                Piece::Data { file, offset, .. } => {
                    let mut b = vec![0u8; n];
                    self.io.read_at(file, offset, &mut b).unwrap();
                    out.extend(b);
                }
                Piece::Compressed {
                    file,
                    offset,
                    read_len,
                    algorithm,
                    cluster_size,
                    skip,
                    ..
                } => {
                    let mut input = vec![0u8; usize::try_from(read_len).unwrap()];
                    self.io.read_at(file, offset, &mut input).unwrap();
                    let mut cluster = vec![0u8; usize::try_from(cluster_size).unwrap()];
                    decompress_cluster(algorithm, &input, &mut cluster).unwrap();
                    let s = usize::try_from(skip).unwrap();
                    out.extend_from_slice(&cluster[s..s + n]);
                }
            }
        }
        out
    }
}

/// A deterministic pseudo-random sequence (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    Discard { offset: u64, len: u64 },
}

/// A workload of `count` ops over a disk of `size` bytes, biased to cluster edges.
fn workload(seed: u64, count: usize, size: u64, cluster: u64) -> Vec<Op> {
    let mut rng = Rng(seed | 1);
    let sectors = size / 512;
    (0..count)
        .map(|i| {
            let start = if rng.below(3) == 0 {
                (rng.below(size / cluster) * cluster).min(size - 512)
            } else {
                rng.below(sectors) * 512
            };
            let max_len = (size - start).min(3 * cluster + 4096).max(512);
            let len = (1 + rng.below(max_len / 512)) * 512;
            match rng.below(10) {
                0 | 1 => Op::WriteZeroes {
                    offset: start,
                    len,
                    unmap: rng.below(2) == 0,
                },
                2 => Op::Discard { offset: start, len },
                _ => {
                    let fill = (i as u8).wrapping_mul(37).wrapping_add(1);
                    let data = (0..len)
                        .map(|j| fill ^ (j / 512) as u8)
                        .collect::<Vec<u8>>();
                    Op::Write {
                        offset: start,
                        data,
                    }
                }
            }
        })
        .collect()
}

/// What the guest reads afterwards, as QEMU defines it: a raw model of the disk.
struct Model {
    bytes: Vec<u8>,
    /// What discarded clusters read as when they fall back to the backing layer.
    backing: Vec<u8>,
    cluster: u64,
    /// Discard leaves the backing data visible (v2 with a backing file).
    discard_shows_backing: bool,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write { offset, data } => {
                let o = usize::try_from(*offset).unwrap();
                self.bytes[o..o + data.len()].copy_from_slice(data);
            }
            Op::WriteZeroes { offset, len, .. } => {
                let o = usize::try_from(*offset).unwrap();
                let l = usize::try_from(*len).unwrap();
                self.bytes[o..o + l].fill(0);
            }
            Op::Discard { offset, len } => {
                let first = offset.div_ceil(self.cluster) * self.cluster;
                let end = (offset + len) / self.cluster * self.cluster;
                let mut pos = first;
                while pos < end {
                    let p = usize::try_from(pos).unwrap();
                    let c = usize::try_from(self.cluster).unwrap();
                    for i in p..p + c {
                        self.bytes[i] = if self.discard_shows_backing {
                            self.backing.get(i).copied().unwrap_or(0)
                        } else {
                            0
                        };
                    }
                    pos += self.cluster;
                }
            }
        }
    }
}

fn apply(driver: &Driver<'_>, op: &Op) -> Result<(), UpdateError> {
    match op {
        Op::Write { offset, data } => driver.write(*offset, data),
        Op::WriteZeroes { offset, len, unmap } => driver.layer.update(
            driver.io,
            Update::WriteZeroes {
                offset: *offset,
                len: *len,
                unmap: *unmap,
            },
        ),
        Op::Discard { offset, len } => driver.layer.update(
            driver.io,
            Update::Discard {
                offset: *offset,
                len: *len,
            },
        ),
    }
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

fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// One image of the matrix.
struct Case {
    name: String,
    cluster: u64,
    compat: &'static str,
    refcount_bits: u32,
    size: u64,
    /// Size of a raw backing file, if any.
    backing_size: Option<u64>,
    compressed: bool,
    snapshot: bool,
}

fn build(dir: &Path, case: &Case) -> (Chain, Vec<u8>) {
    let top = dir.join(format!("{}.qcow2", case.name));
    let mut opts = format!(
        "cluster_size={},compat={},refcount_bits={}",
        case.cluster, case.compat, case.refcount_bits
    );
    let mut backing_bytes = Vec::new();
    let mut backing = None;
    if let Some(bsize) = case.backing_size {
        let base = dir.join(format!("{}.base.raw", case.name));
        let f = File::create(&base).unwrap();
        f.set_len(bsize).unwrap();
        backing_bytes = (0..bsize)
            .map(|i| ((i / 512) as u8).wrapping_mul(13) ^ 0x5a)
            .collect();
        f.write_all_at(&backing_bytes, 0).unwrap();
        opts.push_str(&format!(",backing_file={},backing_fmt=raw", base.display()));
        backing = Some((base, "raw"));
    }
    if case.compressed {
        // Compressed clusters: convert a patterned raw file with -c.
        let src = dir.join(format!("{}.src.raw", case.name));
        let f = File::create(&src).unwrap();
        f.set_len(case.size).unwrap();
        let pattern: Vec<u8> = (0..case.size / 2)
            .map(|i| ((i / 4096) as u8).wrapping_add(3))
            .collect();
        f.write_all_at(&pattern, 0).unwrap();
        run(Command::new("qemu-img")
            .args([
                "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts,
            ])
            .arg(&src)
            .arg(&top));
    } else {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", &opts])
            .arg(&top)
            .arg(case.size.to_string()));
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P 0x11 0 {}", case.size / 4))
            .arg(&top));
    }
    if case.snapshot {
        run(Command::new("qemu-img")
            .args(["snapshot", "-c", "snap1"])
            .arg(&top));
    }
    (Chain { top, backing }, backing_bytes)
}

/// The guest view QEMU gives of the image now.
fn qemu_view(dir: &Path, top: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(format!("{name}.view.raw"));
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "raw"])
        .arg(top)
        .arg(&out));
    read_all(&out)
}

fn matrix() -> Vec<Case> {
    let mut cases = Vec::new();
    for (cluster, size) in [
        (512u64, 512 * 1024u64),
        (4096, 2 << 20),
        (65536, 8 << 20),
        (2 << 20, 16 << 20),
    ] {
        for compat in ["1.1", "0.10"] {
            cases.push(Case {
                name: format!("c{cluster}-{compat}"),
                cluster,
                compat,
                refcount_bits: 16,
                size,
                backing_size: None,
                compressed: false,
                snapshot: false,
            });
            cases.push(Case {
                name: format!("c{cluster}-{compat}-short-backing"),
                cluster,
                compat,
                refcount_bits: 16,
                size,
                backing_size: Some(size / 2 + 512),
                compressed: false,
                snapshot: false,
            });
        }
    }
    for refcount_bits in [1u32, 2, 8, 64] {
        cases.push(Case {
            name: format!("refcount{refcount_bits}"),
            cluster: 4096,
            compat: "1.1",
            refcount_bits,
            size: 2 << 20,
            backing_size: None,
            compressed: false,
            snapshot: false,
        });
    }
    for cluster in [4096u64, 65536] {
        cases.push(Case {
            name: format!("compressed-{cluster}"),
            cluster,
            compat: "1.1",
            refcount_bits: 16,
            size: 4 << 20,
            backing_size: None,
            compressed: true,
            snapshot: false,
        });
        cases.push(Case {
            name: format!("snapshot-{cluster}"),
            cluster,
            compat: "1.1",
            refcount_bits: 16,
            size: 4 << 20,
            backing_size: None,
            compressed: false,
            snapshot: true,
        });
    }
    cases.push(Case {
        name: "long-backing".into(),
        cluster: 65536,
        compat: "1.1",
        refcount_bits: 16,
        size: 4 << 20,
        backing_size: Some(8 << 20),
        compressed: false,
        snapshot: false,
    });
    cases
}

#[test]
fn random_workloads_leave_images_qemu_finds_clean_and_equal_to_the_model() {
    run_matrix(None);
}

/// The same with an L2 cache of four tables (a request here spans at most two): tables are
/// evicted all the time, while the metadata path updates them, and nothing fails or is lost.
#[test]
fn a_full_l2_cache_evicts_and_never_fails_a_request() {
    run_matrix(Some(4));
}

fn run_matrix(cache_tables: Option<u64>) {
    let dir = tempfile::tempdir().unwrap();
    for (seed, case) in matrix().iter().enumerate() {
        let (chain, backing) = build(dir.path(), case);
        let before = qemu_view(dir.path(), &chain.top, &case.name);
        let mut model = Model {
            bytes: before,
            backing,
            cluster: case.cluster,
            discard_shows_backing: case.compat == "0.10" && case.backing_size.is_some(),
        };
        let ops = workload(seed as u64 * 7919 + 1, 60, case.size, case.cluster);
        {
            let layer = match cache_tables {
                Some(n) => chain.open_with_cache(n * case.cluster).unwrap(),
                None => chain.open().unwrap(),
            };
            let io = FileStorage::new(layer.files());
            let driver = Driver {
                layer: &layer,
                io: &io,
            };
            // Writes go in batches (as the metadata thread takes them from several queues),
            // in place where they can: consecutive writes form one batch of up to 6.
            let mut i = 0;
            while i < ops.len() {
                let run: Vec<&Op> = ops[i..]
                    .iter()
                    .take(6)
                    .take_while(|op| matches!(op, Op::Write { .. }))
                    .collect();
                if run.len() > 1 {
                    let updates: Vec<Update<'_>> = run
                        .iter()
                        .filter_map(|op| match op {
                            Op::Write { offset, data } => Some(Update::Write {
                                offset: *offset,
                                data,
                            }),
                            _ => None,
                        })
                        .collect();
                    for (k, r) in layer.update_batch(&io, &updates).into_iter().enumerate() {
                        r.unwrap_or_else(|e| panic!("{}: batched op {}: {e}", case.name, i + k));
                    }
                    for op in &run {
                        model.apply(op);
                    }
                    i += run.len();
                    continue;
                }
                let op = &ops[i];
                apply(&driver, op).unwrap_or_else(|e| panic!("{}: op {i} {op:?}: {e}", case.name));
                model.apply(op);
                i += 1;
            }
            // Cluster by cluster: one request never spans more tables than a tiny cache holds.
            let mut through_vublk = Vec::new();
            for at in (0..case.size).step_by(usize::try_from(case.cluster).unwrap()) {
                through_vublk.extend(driver.read(at, case.cluster.min(case.size - at)));
            }
            if let Some(at) = through_vublk
                .iter()
                .zip(&model.bytes)
                .position(|(a, b)| a != b)
            {
                panic!(
                    "{}: reads through vublk differ from the model at byte {at} (got {:#x}, want {:#x})",
                    case.name, through_vublk[at], model.bytes[at]
                );
            }
            layer.close(&io).unwrap();
        }
        let (code, report) = qemu_img_check(&chain.top);
        assert_eq!(code, 0, "{}: qemu-img check:\n{report}", case.name);
        let after = qemu_view(dir.path(), &chain.top, &case.name);
        assert!(
            after == model.bytes,
            "{}: qemu-img convert of the image differs from the model",
            case.name
        );
        if case.snapshot {
            // The snapshot still holds what the image held when it was taken.
            let snap = dir.path().join(format!("{}.snap.raw", case.name));
            run(Command::new("qemu-img")
                .args(["convert", "-q", "-l", "snap1", "-O", "raw"])
                .arg(&chain.top)
                .arg(&snap));
            let s = read_all(&snap);
            let quarter = usize::try_from(case.size / 4).unwrap();
            assert!(s[..quarter].iter().all(|&b| b == 0x11), "{}", case.name);
            assert!(s[quarter..].iter().all(|&b| b == 0), "{}", case.name);
        }
    }
}

#[test]
fn stopping_after_every_write_n_leaves_no_corruption_and_keeps_acknowledged_writes() {
    let dir = tempfile::tempdir().unwrap();
    // Small clusters so the workload grows L2 tables, refcount blocks and the refcount table.
    for case in [
        Case {
            name: "crash512".into(),
            cluster: 512,
            compat: "1.1",
            refcount_bits: 16,
            size: 256 * 1024,
            backing_size: Some(100 * 1024),
            compressed: false,
            snapshot: false,
        },
        Case {
            name: "crash-snap".into(),
            cluster: 4096,
            compat: "1.1",
            refcount_bits: 16,
            size: 1 << 20,
            backing_size: None,
            compressed: false,
            snapshot: true,
        },
        // Partial writes copying backing data on write, in L2 tables that already exist.
        Case {
            name: "crash-cow".into(),
            cluster: 65536,
            compat: "1.1",
            refcount_bits: 16,
            size: 2 << 20,
            backing_size: Some(2 << 20),
            compressed: false,
            snapshot: false,
        },
    ] {
        let ops = workload(99, 24, case.size, case.cluster);
        let (pristine, backing) = build(dir.path(), &case);
        let pristine_bytes = read_all(&pristine.top);
        let before = qemu_view(dir.path(), &pristine.top, &case.name);
        let mut n = 0u64;
        loop {
            std::fs::write(&pristine.top, &pristine_bytes).unwrap();
            let mut model = Model {
                bytes: before.clone(),
                backing: backing.clone(),
                cluster: case.cluster,
                discard_shows_backing: false,
            };
            // Ranges the interrupted op touched: either old or new contents are fine there.
            let mut torn: Option<(u64, u64)> = None;
            let finished = {
                let layer = pristine.open().unwrap();
                let io = StopAfter::new(FileStorage::new(layer.files()), n);
                let driver = Driver {
                    layer: &layer,
                    io: &io,
                };
                let mut finished = true;
                // No FLUSH needed: a write completed to the guest must survive a process crash.
                for (k, op) in ops.iter().enumerate() {
                    let applied = apply(&driver, op).and_then(|()| {
                        // Now and then a FLUSH (its sync and releases in the sequence too).
                        if k % 5 == 4 {
                            layer.update(&io, Update::Flush)
                        } else {
                            Ok(())
                        }
                    });
                    if applied.is_err() {
                        let (o, l) = match op {
                            Op::Write { offset, data } => (*offset, data.len() as u64),
                            Op::WriteZeroes { offset, len, .. } | Op::Discard { offset, len } => {
                                (*offset, *len)
                            }
                        };
                        torn = Some((o, l));
                        finished = false;
                        break;
                    }
                    model.apply(op);
                }
                if finished && layer.close(&io).is_err() {
                    finished = false;
                }
                finished && !io.stopped()
            };
            let (code, report) = qemu_img_check(&pristine.top);
            assert!(
                code == 0 || code == 3,
                "{}: stopped after write {n}: qemu-img check exit {code}:\n{report}",
                case.name
            );
            let view = qemu_view(dir.path(), &pristine.top, &case.name);
            // Only the interrupted op's own bytes may hold old or new contents: the rest of a
            // cluster it copied on write must be intact.
            let (skip_from, skip_to) = match torn {
                Some((o, l)) => (o, o + l),
                None => (0, 0),
            };
            for (i, (a, b)) in view.iter().zip(&model.bytes).enumerate() {
                let i = i as u64;
                if i >= skip_from && i < skip_to {
                    continue;
                }
                assert_eq!(
                    a, b,
                    "{}: stopped after write {n}: byte {i} lost (acknowledged before the stop)",
                    case.name
                );
            }
            if finished {
                assert_eq!(code, 0, "{}: a clean close leaks:\n{report}", case.name);
                break;
            }
            n += 1;
        }
        assert!(n > 20, "{}: the workload wrote only {n} times", case.name);
    }
}

#[test]
fn dirty_images_are_refused_writable_with_the_repair_command() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("dirty.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&top)
        .arg("1M"));
    // incompatible_features bit 0 (dirty), as an aborted lazy-refcounts writer leaves it.
    let f = OpenOptions::new().write(true).open(&top).unwrap();
    f.write_all_at(&1u64.to_be_bytes(), 72).unwrap();
    let err = Qcow2Layer::open(image_file(&top, "image", true), None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, OpenError::DirtyWritable { .. }), "{msg}");
    assert!(msg.contains("qemu-img check -r all"), "{msg}");
    // Read-only is fine.
    Qcow2Layer::open(image_file(&top, "image", false), None).unwrap();
}

#[test]
fn autoclear_bits_are_cleared_before_the_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("bitmap.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&top)
        .arg("1M"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&top)
        .arg("b0"));
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&top));
    assert!(info.contains("\"b0\""), "{info}");
    let layer = Qcow2Layer::open(image_file(&top, "image", true), None).unwrap();
    let io = FileStorage::new(layer.files());
    Driver {
        layer: &layer,
        io: &io,
    }
    .write(0, &[9u8; 512])
    .unwrap();
    layer.close(&io).unwrap();
    drop(layer);
    let head = read_all(&top);
    assert_eq!(
        &head[88..96],
        &[0u8; 8],
        "autoclear_features is cleared (bitmaps no longer claimed consistent)"
    );
    // QEMU then ignores the bitmaps, as from any writer without bitmap support: their
    // clusters count as leaks (exit 3), never as corruption.
    let (code, report) = qemu_img_check(&top);
    assert_eq!(code, 3, "{report}");
    assert!(
        report.contains("bitmaps are now considered inconsistent"),
        "{report}"
    );
}

#[test]
fn guest_data_aimed_at_metadata_marks_the_image_corrupt_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("overlap.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(&top)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 1 0 64k"])
        .arg(&top));
    // The L1 table is at 0x30000 and the L2 table at 0x40000 in a fresh image; point guest
    // cluster 0's entry (COPIED) at the refcount table (0x10000).
    let bytes = read_all(&top);
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap());
    let l2 = u64::from_be_bytes(bytes[l1 as usize..l1 as usize + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap());
    let f = OpenOptions::new().write(true).open(&top).unwrap();
    f.write_all_at(&(rt | (1 << 63)).to_be_bytes(), l2).unwrap();
    drop(f);
    let layer = Qcow2Layer::open(image_file(&top, "image", true), None).unwrap();
    let io = FileStorage::new(layer.files());
    let driver = Driver {
        layer: &layer,
        io: &io,
    };
    let err = driver.write(0, &[7u8; 4096]).unwrap_err();
    assert!(matches!(err, UpdateError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("overwrite metadata"), "{err}");
    assert!(layer.read_only(), "the disk turned read-only");
    assert!(matches!(
        driver.write(1 << 16, &[7u8; 512]),
        Err(UpdateError::Map(MapError::ReadOnly))
    ));
    drop(layer);
    let after = read_all(&top);
    assert_eq!(
        &after[rt as usize..rt as usize + 16],
        &bytes[rt as usize..rt as usize + 16]
    );
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&top));
    assert!(info.contains("\"corrupt\": true"), "{info}");
}

/// A cluster zeroed without unmap keeps its host cluster (preallocated zero); a later partial
/// write into it must not bring back the old bytes around the new ones.
#[test]
fn a_partial_write_into_a_preallocated_zero_cluster_reads_zero_around_it() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("prealloc.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(&top)
        .arg("1M"));
    let layer = Qcow2Layer::open(image_file(&top, "image", true), None).unwrap();
    let io = FileStorage::new(layer.files());
    let driver = Driver {
        layer: &layer,
        io: &io,
    };
    driver.write(65536, &[0xee; 65536]).unwrap();
    layer
        .update(
            &io,
            Update::WriteZeroes {
                offset: 65536,
                len: 65536,
                unmap: false,
            },
        )
        .unwrap();
    driver.write(65536 + 4096, &[0x11; 512]).unwrap();
    let got = driver.read(65536, 65536);
    assert!(
        got[..4096].iter().all(|&b| b == 0),
        "old bytes before the write"
    );
    assert!(got[4096..4608].iter().all(|&b| b == 0x11));
    assert!(
        got[4608..].iter().all(|&b| b == 0),
        "old bytes after the write"
    );
    layer.close(&io).unwrap();
    drop(layer);
    let (code, report) = qemu_img_check(&top);
    assert_eq!(code, 0, "{report}");
}

/// A refcount block placed on the L1 table: vublk's refcount writes would land in the L1
/// table, so the image is refused writable (naming both), and still served read-only.
#[test]
fn metadata_sharing_a_cluster_is_refused_writable() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("shared.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(&top)
        .arg("1M"));
    let bytes = read_all(&top);
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l1 = be(40);
    let refcount_table = usize::try_from(be(48)).unwrap();
    let f = OpenOptions::new().write(true).open(&top).unwrap();
    f.write_all_at(&l1.to_be_bytes(), refcount_table as u64)
        .unwrap();
    drop(f);
    let err = Qcow2Layer::open(image_file(&top, "image", true), None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, OpenError::Overlap { .. }), "{msg}");
    assert!(msg.contains("refcount block 0"), "{msg}");
    assert!(msg.contains(&format!("{l1:#x}")), "{msg}");
    assert!(msg.contains("--read-only"), "{msg}");
    Qcow2Layer::open(image_file(&top, "image", false), None).unwrap();
}
