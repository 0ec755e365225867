//! The qcow2 layer's mapping, on images made by qemu-img and qemu-io: what `map` answers for
//! allocated, unallocated, zero and compressed clusters, the backing layer below, and the
//! NeedTable/load_table handshake the engine drives. The oracle for the bytes themselves is
//! `qemu-img convert` in the server's integration tests; here the pieces are checked.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failure is the test failing"
)]

use std::fs::File;
use std::path::Path;
use std::process::Command;

use vublk_formats::qcow2::Qcow2Layer;
use vublk_formats::{
    FileId, ImageFile, ImageFileOptions, Layer, MapError, MapKind, OpenError, Piece, RawLayer,
};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn image_file(path: &Path, role: &str) -> ImageFile {
    let file = File::open(path).unwrap();
    ImageFile::new(
        file.into(),
        ImageFileOptions {
            role: role.into(),
            writable: false,
            direct: false,
            nonblock: false,
        },
    )
    .unwrap()
}

/// Maps a read, loading tables from the image files as the engine would.
fn map_read(layer: &dyn Layer, paths: &[&Path], offset: u64, len: u64) -> Vec<Piece> {
    for _ in 0..8 {
        let mut out = Vec::new();
        match layer.map(MapKind::Read, offset, len, &mut out) {
            Ok(()) => return out,
            Err(MapError::NeedTables(loads)) => {
                for load in loads {
                    let bytes = std::fs::read(paths[load.file.0 as usize]).unwrap();
                    let start = usize::try_from(load.offset).unwrap();
                    let end = start + usize::try_from(load.len).unwrap();
                    layer.load_table(load, &bytes[start..end]).unwrap();
                }
            }
            Err(e) => panic!("map failed: {e}"),
        }
    }
    panic!("map kept asking for tables");
}

#[test]
fn one_map_names_every_missing_table_of_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("small.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"])
        .arg(&top)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 1 0 1M"])
        .arg(&top));
    let layer = Qcow2Layer::open(image_file(&top, "image"), None).unwrap();
    let mut out = Vec::new();

    let first = layer.map(MapKind::Read, 0, 1 << 20, &mut out);

    // 512-byte clusters: one L2 table maps 64 clusters (32 KiB), so 1 MiB needs 32 tables.
    match first {
        Err(MapError::NeedTables(loads)) => assert_eq!(loads.len(), 32),
        other => panic!("expected NeedTables, got {other:?}"),
    }
    assert!(out.is_empty());
    assert_eq!(
        map_read(&layer, &[top.as_path()], 0, 1 << 20)
            .iter()
            .map(Piece::len)
            .sum::<u64>(),
        1 << 20
    );
}

#[test]
fn allocated_zero_and_unallocated_clusters_map_to_data_zero_and_backing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&base)
        .arg("1M"));
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-F",
            "raw",
            "-b",
        ])
        .arg(&base)
        .arg(&top)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 8192 4096",
            "-c",
            "write -z 16384 4096",
        ])
        .arg(&top));
    let backing = RawLayer::open(image_file(&base, "backing 1")).unwrap();
    let layer = Qcow2Layer::open(image_file(&top, "image"), Some(Box::new(backing))).unwrap();
    let paths = [top.as_path(), base.as_path()];

    let pieces = map_read(&layer, &paths, 4096, 4 * 4096);

    assert_eq!(pieces.len(), 4, "{pieces:?}");
    assert_eq!(
        pieces[0],
        Piece::Data {
            file: FileId(1),
            offset: 4096,
            len: 4096
        },
        "unallocated: from the raw backing file, at the same offset"
    );
    assert!(matches!(
        pieces[1],
        Piece::Data {
            file: FileId(0),
            len: 4096,
            ..
        }
    ));
    assert_eq!(
        pieces[2],
        Piece::Data {
            file: FileId(1),
            offset: 12288,
            len: 4096
        }
    );
    assert_eq!(pieces[3], Piece::Zero { len: 4096 }, "zero cluster");
}

#[test]
fn compressed_cluster_maps_to_a_compressed_piece() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("c.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&top)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -c -P 7 65536 65536"])
        .arg(&top));
    let layer = Qcow2Layer::open(image_file(&top, "image"), None).unwrap();

    let pieces = map_read(&layer, &[top.as_path()], 65536 + 512, 1024);

    assert!(
        matches!(
            pieces[..],
            [Piece::Compressed {
                file: FileId(0),
                skip: 512,
                len: 1024,
                cluster_size: 65536,
                ..
            }]
        ),
        "{pieces:?}"
    );
}

#[test]
fn image_without_backing_reads_zeroes_past_its_data_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("t.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&top)
        .arg("1M"));
    let layer = Qcow2Layer::open(image_file(&top, "image"), None).unwrap();
    let mut out = Vec::new();

    layer.map(MapKind::Read, 0, 1 << 20, &mut out).unwrap();

    assert_eq!(out, vec![Piece::Zero { len: 1 << 20 }]);
    assert_eq!(
        layer.map(MapKind::Write, 0, 512, &mut out),
        Err(MapError::ReadOnly)
    );
    assert!(matches!(
        layer.map(MapKind::Read, 1 << 20, 512, &mut out),
        Err(MapError::OutOfRange { .. })
    ));
}

#[test]
fn backing_count_and_format_mismatches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("1M"));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top)
        .arg("1M"));

    let missing = Qcow2Layer::open(image_file(&top, "image"), None);
    let raw_given = Qcow2Layer::open(
        image_file(&top, "image"),
        Some(Box::new(
            RawLayer::open(image_file(&base, "backing 1")).unwrap(),
        )),
    );
    let extra = Qcow2Layer::open(
        image_file(&base, "image"),
        Some(Box::new(
            RawLayer::open(image_file(&top, "backing 1")).unwrap(),
        )),
    );

    assert!(matches!(missing, Err(OpenError::MissingBacking { .. })));
    assert!(matches!(raw_given, Err(OpenError::BackingFormat { .. })));
    assert!(matches!(extra, Err(OpenError::UnexpectedBacking { .. })));
}

/// qemu-img places the first data cluster of both images at the same host offset, so the
/// overlay's piece and the backing's piece both say "file 0, offset 0x50000": they must stay
/// two pieces on two files.
#[test]
fn overlay_and_qcow2_backing_pieces_with_equal_ids_are_not_merged() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xbb 0 128k"])
        .arg(&base));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xaa 0 64k"])
        .arg(&top));
    let backing = Qcow2Layer::open(image_file(&base, "backing 1"), None).unwrap();
    let layer = Qcow2Layer::open(image_file(&top, "image"), Some(Box::new(backing))).unwrap();

    let pieces = map_read(&layer, &[top.as_path(), base.as_path()], 0, 128 * 1024);

    assert_eq!(pieces.len(), 2, "{pieces:?}");
    assert!(matches!(
        pieces[0],
        Piece::Data {
            file: FileId(0),
            len: 65536,
            ..
        }
    ));
    assert!(matches!(
        pieces[1],
        Piece::Data {
            file: FileId(1),
            len: 65536,
            ..
        }
    ));
}
