//! Differential qcow2 read tests: QEMU is the oracle. Each scenario builds images with
//! `qemu-img` and `qemu-io` ([`vublk_tests::images`]), serves the top image read-only with its
//! whole backing chain handed over explicitly (paths, or inherited fds), reads the entire
//! virtual disk through libblkio's vhost-user-blk driver twice (in 1 MiB requests, then in odd
//! requests that straddle cluster boundaries) and compares every byte with
//! `qemu-img convert -O raw` of the same top image.
//!
//! Every scenario is a plain function of the backend; `both_backends!` turns it into one test
//! per backend (`<scenario>::vublk`, `<scenario>::qsd`). The qemu-storage-daemon runs are the
//! self-check of the test: a scenario that fails there is a bug in the test, not in vublk.
//! A few tests are vublk's own contract and run against vublk only: a chain passed as inherited
//! fds (QSD takes no fds on its command line), and startup refusing a `--backing` list that
//! does not match the image's chain.
//!
//! Scenarios also check that the images hold what they are meant to exercise (compressed
//! clusters, zero clusters, data from the expected layer), through `qemu-img map` and the
//! oracle, so that a change in QEMU's tools cannot quietly make a test vacuous.

#![allow(
    clippy::unwrap_used,
    reason = "a test binary: the helpers panic like the #[test] fns that clippy already exempts"
)]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vublk_tests::blk::BlkClient;
use vublk_tests::daemon::{pass_fds, BackendKind, Backing, Daemon, DiskOptions};
use vublk_tests::images::{
    self, Chain, Compat, Compression, Differences, Extent, Format, Image, Io, Oracle, Qcow2Options,
    Snapshot,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SECTOR: u64 = 512;
/// How long `vublk serve` may take to refuse a bad chain.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a refused startup is checked for an exit or a socket.
const STARTUP_POLL: Duration = Duration::from_millis(10);
/// The first fd number the fd-passing test hands layers over as (top, then its backing chain).
const FIRST_LAYER_FD: RawFd = 10;
/// Inherited fds are first duplicated to at least this number, so that no source fd can be a
/// target number that an earlier `dup2` in the child already replaced.
const FD_DUP_FLOOR: RawFd = 512;

/// How the whole disk is read: one request of `first` bytes, then requests of `chunk` bytes.
#[derive(Clone, Copy, Debug)]
struct ReadPlan {
    first: u64,
    chunk: u64,
}

const READ_PLANS: [ReadPlan; 2] = [
    // Aligned 1 MiB requests, as a guest's sequential read.
    ReadPlan {
        first: MIB,
        chunk: MIB,
    },
    // Three sectors, then 320 KiB + 1 sector: every request boundary moves against the
    // clusters, so requests start and end mid-cluster and span allocated and unallocated ones.
    ReadPlan {
        first: 3 * SECTOR,
        chunk: 320 * KIB + SECTOR,
    },
];

// ---------------------------------------------------------------------------------------------
// The fixture: build a chain, take QEMU's reading, serve it, compare.

/// A chain of images in a private directory.
struct Case {
    dir: TempDir,
    chain: Chain,
}

impl Case {
    /// A case whose chain is built by `build` in a fresh directory.
    fn build(build: impl FnOnce(&Path) -> anyhow::Result<Chain>) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let chain = build(dir.path()).unwrap_or_else(|e| panic!("building the images: {e:#}"));
        Case { dir, chain }
    }

    /// One qcow2 image of `size` bytes with `opts`, written by `cmds`.
    fn single(size: u64, opts: Qcow2Options, cmds: &[Io]) -> Case {
        Self::build(|dir| {
            let mut chain = Chain::qcow2_base(dir, "disk.qcow2", size, &opts)?;
            chain.io(cmds)?;
            Ok(chain)
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// QEMU's reading of the top image (which must be taken before any layer is moved).
    fn oracle(&self) -> Oracle {
        Oracle::of(self.chain.top(), self.dir.path())
            .unwrap_or_else(|e| panic!("qemu-img reading {}: {e:#}", self.chain.describe()))
    }

    /// `qemu-img map` of the top image and its chain.
    fn map(&self) -> Vec<Extent> {
        images::map(self.chain.top()).unwrap()
    }

    /// The daemon options serving this chain read-only, every layer by path.
    fn disk_options(&self) -> DiskOptions {
        let top = self.chain.top();
        DiskOptions {
            format: top.format.as_str().to_string(),
            read_only: true,
            backing: self.chain.backing(),
            ..DiskOptions::raw(&top.path)
        }
    }

    /// Serves the chain with `kind` and asserts it reads exactly as QEMU does.
    fn assert_reads_like_qemu(&self, kind: BackendKind) {
        let oracle = self.oracle();
        self.assert_serves(kind, &oracle);
    }

    /// Serves the chain with `kind` and compares with an oracle taken earlier.
    fn assert_serves(&self, kind: BackendKind, oracle: &Oracle) {
        self.assert_serves_with(kind, oracle, |cmd| cmd);
    }

    /// Like [`Case::assert_serves`], with the daemon's command line passed through `adjust`.
    fn assert_serves_with(
        &self,
        kind: BackendKind,
        oracle: &Oracle,
        adjust: impl FnOnce(Command) -> Command,
    ) {
        let socket = self.path("vhost.sock");
        let mut cmd = adjust(Daemon::command(kind, &self.disk_options(), &socket));
        let daemon = Daemon::spawn(kind, &mut cmd, &socket).unwrap_or_else(|e| {
            panic!("{kind:?} could not serve {}: {e:#}", self.chain.describe())
        });
        assert_disk_matches(kind, &daemon.socket, oracle, &self.chain);
    }
}

/// Reads the whole disk served on `socket` with every [`READ_PLANS`] entry and fails with the
/// first difference from `oracle`, what QEMU says lives there and in which layer.
fn assert_disk_matches(kind: BackendKind, socket: &Path, oracle: &Oracle, chain: &Chain) {
    let what = chain.describe();
    let mut client = BlkClient::connect_read_only(socket, 1)
        .unwrap_or_else(|e| panic!("{kind:?} serving {what}: connecting: {e} ({e:?})"));
    assert_eq!(
        client.capacity(),
        oracle.len(),
        "{kind:?} serves {what} as a disk of {} bytes; qemu-img reads {} bytes",
        client.capacity(),
        oracle.len()
    );
    for plan in READ_PLANS {
        let mut diff = Differences::default();
        let mut offset = 0;
        let mut len = plan.first;
        while offset < oracle.len() {
            let n = len.min(oracle.len() - offset);
            let got = client
                .read(offset, usize::try_from(n).unwrap())
                .unwrap_or_else(|e| panic!("{kind:?} serving {what} ({plan:?}): {e}"));
            oracle.compare(offset, &got, &mut diff).unwrap();
            offset += n;
            len = plan.chunk;
        }
        if let Some((at, _, _)) = &diff.first {
            panic!(
                "{kind:?} reads {what} differently from qemu-img with {plan:?}: {diff}; \
                 qemu-img map there: {}",
                describe_extent(oracle, chain, *at)
            );
        }
    }
}

/// The `qemu-img map` extent holding `offset`, with its depth named as a layer of `chain`.
fn describe_extent(oracle: &Oracle, chain: &Chain, offset: u64) -> String {
    let Some(extent) = oracle.extent_at(offset) else {
        return "unknown (no map)".to_string();
    };
    let layers = chain.layers();
    let layer = usize::try_from(extent.depth)
        .ok()
        .and_then(|d| layers.len().checked_sub(d + 1))
        .map_or_else(|| "past the chain".to_string(), |i| layers[i].name());
    format!("{extent} ({layer})")
}

/// Asserts that QEMU reads `len` bytes of `pattern` at `offset`: the workload did what the
/// scenario says it exercises.
fn assert_oracle_has(oracle: &Oracle, offset: u64, len: u64, pattern: u8, why: &str) {
    let bytes = oracle.read(offset, usize::try_from(len).unwrap()).unwrap();
    let wrong = bytes.iter().position(|&b| b != pattern);
    assert!(
        wrong.is_none(),
        "test setup: qemu-img should read {pattern:#04x} in [{offset}, {}) of {} ({why}), \
         but byte {} is {:#04x}",
        offset + len,
        oracle.source().name(),
        offset + wrong.unwrap_or(0) as u64,
        bytes[wrong.unwrap_or(0)]
    );
}

/// Asserts that `qemu-img map` shows some extent matching `pred`: the image really holds what
/// the scenario is about.
fn assert_map_has(map: &[Extent], what: &str, pred: impl Fn(&Extent) -> bool) {
    assert!(
        map.iter().any(pred),
        "test setup: qemu-img map shows no {what}: {map:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Workloads.

/// Scattered writes scaled to `cluster`, on a disk of `size` bytes (at least 16 clusters):
/// multi-cluster and sub-cluster writes, a write across a cluster boundary, an unaligned one,
/// one ending at the disk's last byte, zeroes over data (kept and unmapped) and over nothing,
/// and a discard inside written data.
fn scattered_workload(size: u64, cluster: u64) -> Vec<Io> {
    assert!(size >= 16 * cluster, "disk too small for the workload");
    let mid = (size / 2) & !(SECTOR - 1);
    vec![
        Io::Write {
            pattern: 0x11,
            offset: 0,
            len: 3 * cluster + SECTOR,
        },
        Io::Write {
            pattern: 0x22,
            offset: cluster + 2 * SECTOR,
            len: 3 * SECTOR,
        },
        Io::Write {
            pattern: 0x33,
            offset: 5 * cluster - SECTOR,
            len: 2 * SECTOR,
        },
        Io::Write {
            pattern: 0x44,
            offset: mid + 777,
            len: 3000,
        },
        Io::Write {
            pattern: 0x55,
            offset: size - 3 * SECTOR,
            len: 3 * SECTOR,
        },
        // Over data: v3 keeps the allocation with the zero flag.
        Io::Zero {
            offset: 2 * cluster,
            len: cluster,
        },
        // Over a partly written cluster, allowed to unmap.
        Io::ZeroUnmap {
            offset: 3 * cluster,
            len: cluster,
        },
        // Over nothing.
        Io::Zero {
            offset: 12 * cluster,
            len: 2 * cluster,
        },
        Io::Write {
            pattern: 0x66,
            offset: 7 * cluster,
            len: 4 * cluster,
        },
        // Whole clusters in the middle of the data just written, plus a partial one.
        Io::Discard {
            offset: 8 * cluster,
            len: 2 * cluster + SECTOR,
        },
    ]
}

/// A single image with `opts`, the scattered workload, compared with QEMU.
fn scattered_single(kind: BackendKind, size: u64, opts: Qcow2Options) {
    let case = Case::single(size, opts, &scattered_workload(size, opts.cluster_size));
    let oracle = case.oracle();
    assert_oracle_has(&oracle, 0, opts.cluster_size, 0x11, "first write");
    assert_oracle_has(
        &oracle,
        size - 3 * SECTOR,
        3 * SECTOR,
        0x55,
        "write at the end",
    );
    assert_oracle_has(
        &oracle,
        2 * opts.cluster_size,
        opts.cluster_size,
        0,
        "zeroed",
    );
    case.assert_serves(kind, &oracle);
}

fn opts(cluster_size: u64, compat: Compat, refcount_bits: u32) -> Qcow2Options {
    Qcow2Options {
        cluster_size,
        compat,
        refcount_bits,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster sizes, versions and refcount widths. Sizes are not multiples of the cluster size
// (except for 512-byte clusters, where qcow2's sector granularity makes that impossible).

fn v3_512_byte_clusters(kind: BackendKind) {
    scattered_single(kind, 3 * MIB + 5 * SECTOR, opts(512, Compat::V3, 16));
}

fn v2_512_byte_clusters(kind: BackendKind) {
    scattered_single(kind, 2 * MIB + 3 * SECTOR, opts(512, Compat::V2, 16));
}

fn v3_4k_clusters_with_1_bit_refcounts(kind: BackendKind) {
    scattered_single(kind, 6 * MIB + 3 * SECTOR, opts(4 * KIB, Compat::V3, 1));
}

fn v2_4k_clusters(kind: BackendKind) {
    scattered_single(kind, 5 * MIB + 7 * SECTOR, opts(4 * KIB, Compat::V2, 16));
}

fn v3_64k_clusters_with_16_bit_refcounts(kind: BackendKind) {
    scattered_single(kind, 9 * MIB + 9 * SECTOR, opts(64 * KIB, Compat::V3, 16));
}

fn v3_64k_clusters_with_64_bit_refcounts(kind: BackendKind) {
    scattered_single(kind, 7 * MIB + 20 * KIB, opts(64 * KIB, Compat::V3, 64));
}

fn v2_64k_clusters(kind: BackendKind) {
    scattered_single(kind, 8 * MIB + 3 * SECTOR, opts(64 * KIB, Compat::V2, 16));
}

fn v3_2m_clusters_with_64_bit_refcounts(kind: BackendKind) {
    scattered_single(kind, 37 * MIB + 5 * SECTOR, opts(2 * MIB, Compat::V3, 64));
}

fn v2_2m_clusters(kind: BackendKind) {
    scattered_single(kind, 33 * MIB + 64 * KIB, opts(2 * MIB, Compat::V2, 16));
}

// ---------------------------------------------------------------------------------------------
// Compressed clusters.

/// Converts a mixed raw image (per-cluster: pattern, zero, random, counter, half random) of
/// `size` bytes into a compressed qcow2 with `opts`, and checks that it holds compressed
/// clusters, uncompressed ones (the random data) and unallocated ones (the zeroes).
fn compressed_case(size: u64, opts: Qcow2Options) -> Case {
    let case = Case::build(|dir| {
        let src = images::write_mixed_raw(&dir.join("mixed.raw"), size, opts.cluster_size, 7)?;
        let image = images::convert_compressed(&src, &dir.join("compressed.qcow2"), &opts)?;
        Ok(Chain::on(dir, image))
    });
    let map = case.map();
    assert_map_has(&map, "compressed cluster", |e| e.compressed);
    assert_map_has(&map, "uncompressed data", |e| e.data && !e.compressed);
    assert_map_has(&map, "unallocated cluster", |e| !e.data);
    case
}

fn compressed(kind: BackendKind, size: u64, opts: Qcow2Options) {
    compressed_case(size, opts).assert_reads_like_qemu(kind);
}

fn zlib_compressed_64k_clusters(kind: BackendKind) {
    compressed(kind, 6 * MIB + 5 * SECTOR, Qcow2Options::default());
}

fn zlib_compressed_4k_clusters_v2(kind: BackendKind) {
    compressed(kind, 3 * MIB + 3 * SECTOR, opts(4 * KIB, Compat::V2, 16));
}

fn zlib_compressed_512_byte_clusters(kind: BackendKind) {
    compressed(kind, MIB + 7 * SECTOR, opts(512, Compat::V3, 16));
}

fn zstd_compressed_64k_clusters(kind: BackendKind) {
    compressed(
        kind,
        6 * MIB + 40 * KIB,
        Qcow2Options {
            compression: Compression::Zstd,
            ..Default::default()
        },
    );
}

fn zstd_compressed_2m_clusters(kind: BackendKind) {
    compressed(
        kind,
        21 * MIB + 3 * SECTOR,
        Qcow2Options {
            compression: Compression::Zstd,
            ..Qcow2Options::cluster(2 * MIB)
        },
    );
}

fn zstd_compressed_4k_clusters_with_64_bit_refcounts(kind: BackendKind) {
    compressed(
        kind,
        2 * MIB + 5 * SECTOR,
        Qcow2Options {
            compression: Compression::Zstd,
            ..opts(4 * KIB, Compat::V3, 64)
        },
    );
}

/// Compressed clusters partly overwritten (QEMU decompresses, merges and stores the result
/// uncompressed), zeroed and discarded, beside compressed clusters left alone.
fn compressed_clusters_partly_overwritten(kind: BackendKind) {
    let c = 64 * KIB;
    let size = 4 * MIB + 3 * SECTOR;
    let case = compressed_case(
        size,
        Qcow2Options {
            compression: Compression::Zstd,
            ..Default::default()
        },
    );
    // Clusters 0, 3 and 5 of the mixed source compress (pattern, counter, pattern).
    images::io(
        case.chain.top(),
        &[
            Io::Write {
                pattern: 0xc1,
                offset: 3 * c + SECTOR,
                len: 2 * SECTOR,
            },
            Io::Write {
                pattern: 0xc2,
                offset: 5 * c - SECTOR,
                len: 3 * SECTOR,
            },
            Io::Zero {
                offset: 10 * c,
                len: c,
            },
            Io::Discard {
                offset: 13 * c,
                len: c,
            },
        ],
    )
    .unwrap();
    let map = case.map();
    assert_map_has(&map, "compressed cluster left alone", |e| e.compressed);
    let oracle = case.oracle();
    assert_oracle_has(&oracle, 3 * c + SECTOR, 2 * SECTOR, 0xc1, "overwrite");
    case.assert_serves(kind, &oracle);
}

// ---------------------------------------------------------------------------------------------
// Zero clusters and discards.

/// v3 zero clusters of every kind in one image: zero flag over allocated data (kept
/// allocation), unmapped zeroes, zeroes over unallocated clusters, a partial-cluster zero
/// write (explicit zero bytes inside a data cluster) and data written over a zero cluster.
fn zero_clusters_read_as_zeroes(kind: BackendKind) {
    let c = 4 * KIB;
    let size = 3 * MIB + 3 * SECTOR;
    let case = Case::single(
        size,
        Qcow2Options::cluster(c),
        &[
            Io::Write {
                pattern: 0xa1,
                offset: 0,
                len: 64 * c,
            },
            Io::Zero {
                offset: 4 * c,
                len: 4 * c,
            },
            Io::ZeroUnmap {
                offset: 10 * c,
                len: 4 * c,
            },
            Io::Zero {
                offset: 100 * c,
                len: 50 * c,
            },
            Io::Zero {
                offset: 20 * c + SECTOR,
                len: 2 * SECTOR,
            },
            Io::Write {
                pattern: 0xa2,
                offset: 5 * c + SECTOR,
                len: SECTOR,
            },
            Io::Zero {
                offset: size - 2 * c - SECTOR,
                len: 2 * c + SECTOR,
            },
        ],
    );
    assert_map_has(&case.map(), "zero cluster", |e| {
        e.present && e.zero && !e.data && e.depth == 0
    });
    let oracle = case.oracle();
    assert_oracle_has(&oracle, 4 * c, c, 0, "zero flag over data");
    assert_oracle_has(
        &oracle,
        5 * c + SECTOR,
        SECTOR,
        0xa2,
        "data over a zero cluster",
    );
    case.assert_serves(kind, &oracle);
}

/// Discards of whole clusters, partial clusters and a range across both, in a v3 image.
fn discarded_ranges_read_as_qemu_reads_them(kind: BackendKind) {
    let c = 64 * KIB;
    let size = 5 * MIB + 3 * SECTOR;
    let case = Case::single(
        size,
        Qcow2Options::cluster(c),
        &[
            Io::Write {
                pattern: 0xd1,
                offset: 0,
                len: size,
            },
            Io::Discard {
                offset: 2 * c,
                len: 3 * c,
            },
            Io::Discard {
                offset: 10 * c + SECTOR,
                len: 4 * SECTOR,
            },
            Io::Discard {
                offset: 20 * c - 4 * KIB,
                len: 2 * c + 8 * KIB,
            },
            Io::Discard {
                offset: size - c,
                len: c,
            },
        ],
    );
    let oracle = case.oracle();
    assert_oracle_has(&oracle, 2 * c, 3 * c, 0, "discarded clusters");
    case.assert_serves(kind, &oracle);
}

/// A v3 overlay's zero clusters and discards over backing data hide it (they read as zero,
/// not as the backing file's bytes); a partial-cluster zero write merges with backing data.
fn zero_clusters_in_an_overlay_hide_backing_data(kind: BackendKind) {
    let c = 64 * KIB;
    let size = 4 * MIB + 5 * SECTOR;
    let case = Case::build(|dir| {
        let mut chain = Chain::raw_base(dir, "base.raw", size)?;
        chain
            .io(&[Io::Write {
                pattern: 0xb0,
                offset: 0,
                len: size,
            }])?
            .overlay("top.qcow2", size, &Qcow2Options::cluster(c))?
            .io(&[
                Io::Zero {
                    offset: c,
                    len: 2 * c,
                },
                Io::ZeroUnmap {
                    offset: 5 * c,
                    len: c,
                },
                Io::Discard {
                    offset: 8 * c,
                    len: 2 * c,
                },
                Io::Zero {
                    offset: 12 * c + SECTOR,
                    len: SECTOR,
                },
                Io::Write {
                    pattern: 0xb1,
                    offset: 20 * c,
                    len: c,
                },
                Io::Zero {
                    offset: 20 * c + 2 * SECTOR,
                    len: SECTOR,
                },
            ])?;
        Ok(chain)
    });
    let oracle = case.oracle();
    assert_oracle_has(&oracle, c, 2 * c, 0, "zeroed over backing data");
    assert_oracle_has(&oracle, 8 * c, 2 * c, 0, "discarded over backing data");
    assert_oracle_has(
        &oracle,
        12 * c,
        SECTOR,
        0xb0,
        "backing data beside a zeroed sector",
    );
    case.assert_serves(kind, &oracle);
}

/// A v2 overlay cannot record zero clusters: QEMU writes explicit zeroes, and a discard may
/// expose the backing data again. Whatever QEMU reads, the daemon must read.
fn v2_overlay_zeroes_and_discards_over_backing_data(kind: BackendKind) {
    let c = 4 * KIB;
    let size = 2 * MIB + 3 * SECTOR;
    let case = Case::build(|dir| {
        let mut chain = Chain::qcow2_base(dir, "base.qcow2", size, &opts(c, Compat::V2, 16))?;
        chain
            .io(&[Io::Write {
                pattern: 0xe0,
                offset: 0,
                len: MIB,
            }])?
            .overlay("top.qcow2", size, &opts(c, Compat::V2, 16))?
            .io(&[
                Io::Write {
                    pattern: 0xe1,
                    offset: 8 * c,
                    len: 8 * c,
                },
                Io::Zero {
                    offset: 2 * c,
                    len: 2 * c,
                },
                Io::Discard {
                    offset: 8 * c,
                    len: 4 * c,
                },
                Io::Zero {
                    offset: 40 * c + SECTOR,
                    len: SECTOR,
                },
            ])?;
        Ok(chain)
    });
    case.assert_reads_like_qemu(kind);
}

// ---------------------------------------------------------------------------------------------
// Internal snapshots.

/// Data, snapshot s1, partial overwrites (copy-on-write of refcount-2 clusters), a second
/// snapshot, more writes: the active layer reads the newest data, and clusters still shared
/// with the snapshots (refcount 2 or 3, no COPIED flag) read as before.
fn snapshots_share_clusters_with_the_active_layer(kind: BackendKind) {
    let c = 64 * KIB;
    let size = 6 * MIB + 3 * SECTOR;
    let case = Case::single(
        size,
        Qcow2Options::cluster(c),
        &[Io::Write {
            pattern: 0x51,
            offset: 0,
            len: 40 * c,
        }],
    );
    let top = case.chain.top().clone();
    images::snapshot(&top, Snapshot::Create("s1")).unwrap();
    images::io(
        &top,
        &[
            Io::Write {
                pattern: 0x52,
                offset: 2 * c + SECTOR,
                len: SECTOR,
            },
            Io::Write {
                pattern: 0x53,
                offset: 50 * c,
                len: 3 * c,
            },
            Io::Zero {
                offset: 10 * c,
                len: c,
            },
        ],
    )
    .unwrap();
    images::snapshot(&top, Snapshot::Create("s2")).unwrap();
    images::io(
        &top,
        &[
            Io::Write {
                pattern: 0x54,
                offset: 20 * c,
                len: c + SECTOR,
            },
            Io::Discard {
                offset: 30 * c,
                len: 2 * c,
            },
        ],
    )
    .unwrap();
    let oracle = case.oracle();
    assert_oracle_has(&oracle, 2 * c + SECTOR, SECTOR, 0x52, "overwrite after s1");
    assert_oracle_has(&oracle, 2 * c, SECTOR, 0x51, "rest of a copied cluster");
    assert_oracle_has(&oracle, 5 * c, c, 0x51, "cluster shared with s1 and s2");
    case.assert_serves(kind, &oracle);
}

/// `qemu-img snapshot -a`: the active layer becomes the snapshot's (its tables copied, every
/// cluster shared), so it reads the data from before the later writes.
fn applied_snapshot_reads_the_snapshot_data(kind: BackendKind) {
    let c = 4 * KIB;
    let size = 3 * MIB + 5 * SECTOR;
    let case = Case::single(
        size,
        Qcow2Options::cluster(c),
        &[Io::Write {
            pattern: 0x61,
            offset: 0,
            len: MIB,
        }],
    );
    let top = case.chain.top().clone();
    images::snapshot(&top, Snapshot::Create("s1")).unwrap();
    images::io(
        &top,
        &[
            Io::Write {
                pattern: 0x62,
                offset: 0,
                len: 2 * MIB,
            },
            Io::Zero {
                offset: 2 * MIB,
                len: MIB,
            },
        ],
    )
    .unwrap();
    images::snapshot(&top, Snapshot::Apply("s1")).unwrap();
    let oracle = case.oracle();
    assert_oracle_has(&oracle, 0, MIB, 0x61, "snapshot data");
    assert_oracle_has(&oracle, MIB, MIB, 0, "unallocated in the snapshot");
    case.assert_serves(kind, &oracle);
}

/// A deleted snapshot leaves the active layer's clusters (refcounts back to 1) and the
/// copies made while it existed, in a v2 image with 512-byte clusters.
fn deleted_snapshot_leaves_the_active_layer_intact_v2(kind: BackendKind) {
    let c = 512;
    let size = MIB + 3 * SECTOR;
    let case = Case::single(
        size,
        opts(c, Compat::V2, 16),
        &[Io::Write {
            pattern: 0x71,
            offset: 0,
            len: 512 * KIB,
        }],
    );
    let top = case.chain.top().clone();
    images::snapshot(&top, Snapshot::Create("s1")).unwrap();
    images::io(
        &top,
        &[Io::Write {
            pattern: 0x72,
            offset: 100 * c + 100,
            len: 50 * c,
        }],
    )
    .unwrap();
    images::snapshot(&top, Snapshot::Delete("s1")).unwrap();
    case.assert_reads_like_qemu(kind);
}

// ---------------------------------------------------------------------------------------------
// Backing chains.

/// A raw base under one qcow2 overlay with partial-cluster writes: reads merge the overlay's
/// clusters with the base's bytes.
fn raw_base_under_a_qcow2_overlay(kind: BackendKind) {
    let c = 64 * KIB;
    let size = 5 * MIB + 3 * SECTOR;
    let case = Case::build(|dir| {
        let mut chain = Chain::raw_base(dir, "base.raw", size)?;
        chain
            .io(&[
                Io::Write {
                    pattern: 0x01,
                    offset: 0,
                    len: 2 * MIB,
                },
                Io::Write {
                    pattern: 0x02,
                    offset: 3 * MIB,
                    len: size - 3 * MIB,
                },
            ])?
            .overlay("top.qcow2", size, &Qcow2Options::cluster(c))?
            .io(&[
                Io::Write {
                    pattern: 0x10,
                    offset: c + SECTOR,
                    len: 2 * SECTOR,
                },
                Io::Write {
                    pattern: 0x11,
                    offset: 2 * MIB - SECTOR,
                    len: 2 * SECTOR,
                },
                Io::Write {
                    pattern: 0x12,
                    offset: size - SECTOR,
                    len: SECTOR,
                },
            ])?;
        Ok(chain)
    });
    let oracle = case.oracle();
    assert_oracle_has(&oracle, c, SECTOR, 0x01, "base bytes in an overlay cluster");
    assert_oracle_has(&oracle, c + SECTOR, 2 * SECTOR, 0x10, "overlay write");
    case.assert_serves(kind, &oracle);
}

/// A 4 KiB-cluster qcow2 base under a 64 KiB-cluster overlay: an overlay cluster spans
/// sixteen base clusters, some allocated, some zero, some not.
fn qcow2_base_with_smaller_clusters_under_a_qcow2_overlay(kind: BackendKind) {
    let size = 4 * MIB + 7 * SECTOR;
    let case = Case::build(|dir| {
        let mut chain =
            Chain::qcow2_base(dir, "base.qcow2", size, &Qcow2Options::cluster(4 * KIB))?;
        chain
            .io(&[
                Io::Write {
                    pattern: 0x21,
                    offset: 4 * KIB,
                    len: 8 * KIB,
                },
                Io::Write {
                    pattern: 0x22,
                    offset: 40 * KIB,
                    len: 100 * KIB,
                },
                Io::Zero {
                    offset: 48 * KIB,
                    len: 4 * KIB,
                },
                Io::Write {
                    pattern: 0x23,
                    offset: MIB + 3 * SECTOR,
                    len: 600 * KIB,
                },
            ])?
            .overlay("top.qcow2", size, &Qcow2Options::default())?
            .io(&[
                Io::Write {
                    pattern: 0x24,
                    offset: 6 * KIB,
                    len: SECTOR,
                },
                Io::Write {
                    pattern: 0x25,
                    offset: MIB + 64 * KIB,
                    len: 64 * KIB,
                },
            ])?;
        Ok(chain)
    });
    case.assert_reads_like_qemu(kind);
}

/// raw <- qcow2 (64 KiB) <- qcow2 v2 (4 KiB) <- qcow2 (2 MiB): each layer writes its own and
/// overlapping ranges, partial clusters included, and the middle layers zero and discard over
/// deeper data. Every byte is answered by a different depth somewhere.
fn four_layer_chain_of_raw_and_qcow2(kind: BackendKind) {
    let size = 12 * MIB + 5 * SECTOR;
    let case = Case::build(|dir| {
        let mut chain = Chain::raw_base(dir, "l0.raw", size)?;
        chain
            .io(&[Io::Write {
                pattern: 0xa0,
                offset: 0,
                len: 8 * MIB,
            }])?
            .overlay("l1.qcow2", size, &Qcow2Options::cluster(64 * KIB))?
            .io(&[
                Io::Write {
                    pattern: 0xa1,
                    offset: MIB + SECTOR,
                    len: 3 * MIB,
                },
                Io::Zero {
                    offset: 2 * MIB,
                    len: 128 * KIB,
                },
                Io::Discard {
                    offset: 6 * MIB,
                    len: 256 * KIB,
                },
                Io::Write {
                    pattern: 0xa2,
                    offset: 10 * MIB,
                    len: 64 * KIB + SECTOR,
                },
            ])?
            .overlay("l2.qcow2", size, &opts(4 * KIB, Compat::V2, 16))?
            .io(&[
                Io::Write {
                    pattern: 0xb1,
                    offset: 2 * MIB + 60 * KIB,
                    len: 8 * KIB,
                },
                Io::Write {
                    pattern: 0xb2,
                    offset: 3 * MIB + 1000,
                    len: 1000,
                },
                Io::Write {
                    pattern: 0xb3,
                    offset: 7 * MIB,
                    len: 2 * MIB,
                },
                Io::Zero {
                    offset: 7 * MIB + 512 * KIB,
                    len: 16 * KIB,
                },
            ])?
            .overlay("l3.qcow2", size, &Qcow2Options::cluster(2 * MIB))?
            .io(&[
                Io::Write {
                    pattern: 0xc1,
                    offset: 4 * MIB + 4 * KIB,
                    len: 4 * KIB,
                },
                Io::Write {
                    pattern: 0xc2,
                    offset: 8 * MIB - SECTOR,
                    len: 2 * SECTOR,
                },
                Io::Zero {
                    offset: 10 * MIB,
                    len: 2 * MIB,
                },
            ])?;
        Ok(chain)
    });
    let map = case.map();
    for depth in 0..4 {
        assert_map_has(&map, &format!("data at depth {depth}"), |e| {
            e.data && e.depth == depth
        });
    }
    case.assert_reads_like_qemu(kind);
}

/// A compressed qcow2 base under a v3 and a v2 overlay that partly overwrite it.
fn compressed_base_under_two_overlays(kind: BackendKind) {
    let size = 3 * MIB + 3 * SECTOR;
    let case = Case::build(|dir| {
        let src = images::write_mixed_raw(&dir.join("mixed.raw"), size, 16 * KIB, 11)?;
        let base = images::convert_compressed(
            &src,
            &dir.join("base.qcow2"),
            &Qcow2Options::cluster(16 * KIB),
        )?;
        let mut chain = Chain::on(dir, base);
        chain
            .overlay("mid.qcow2", size, &Qcow2Options::cluster(4 * KIB))?
            .io(&[Io::Write {
                pattern: 0x31,
                offset: 20 * KIB,
                len: 40 * KIB,
            }])?
            .overlay("top.qcow2", size, &opts(64 * KIB, Compat::V2, 16))?
            .io(&[Io::Write {
                pattern: 0x32,
                offset: MIB - SECTOR,
                len: 2 * SECTOR,
            }])?;
        Ok(chain)
    });
    assert_map_has(&case.map(), "compressed data at depth 2", |e| {
        e.compressed && e.depth == 2
    });
    case.assert_reads_like_qemu(kind);
}

/// A backing file shorter than its overlay: the overlay's reads past the backing file's end
/// are zeroes, including inside a cluster that straddles it, and a write there merges.
fn backing_shorter_than_the_overlay_reads_zeroes_past_its_end(kind: BackendKind) {
    let base_size = 2 * MIB + 96 * KIB;
    let size = 6 * MIB + 3 * SECTOR;
    let case = Case::build(|dir| {
        let mut chain = Chain::qcow2_base(
            dir,
            "base.qcow2",
            base_size,
            &Qcow2Options::cluster(4 * KIB),
        )?;
        chain
            .io(&[Io::Write {
                pattern: 0x41,
                offset: 0,
                len: base_size,
            }])?
            .overlay("top.qcow2", size, &Qcow2Options::cluster(64 * KIB))?
            .io(&[Io::Write {
                pattern: 0x42,
                offset: 2 * MIB + 100 * KIB,
                len: SECTOR,
            }])?;
        Ok(chain)
    });
    let oracle = case.oracle();
    assert_oracle_has(
        &oracle,
        2 * MIB,
        96 * KIB,
        0x41,
        "backing data up to its end",
    );
    assert_oracle_has(
        &oracle,
        base_size,
        4 * KIB,
        0,
        "past the backing file's end",
    );
    case.assert_serves(kind, &oracle);
}

/// A raw backing file whose length is not a multiple of 512: QEMU reads its last partial
/// sector with zeroes after the file's end, and zeroes beyond.
fn raw_backing_with_an_unaligned_length(kind: BackendKind) {
    let base_len = MIB + 100;
    let size = 3 * MIB + 3 * SECTOR;
    let case = Case::build(|dir| {
        let mut chain = Chain::raw_base(dir, "base.raw", base_len)?;
        let path = chain.top().path.clone();
        std::fs::write(&path, vec![0x4a; usize::try_from(base_len)?])?;
        chain
            .overlay("top.qcow2", size, &Qcow2Options::cluster(4 * KIB))?
            .io(&[Io::Write {
                pattern: 0x4b,
                offset: 4 * KIB,
                len: SECTOR,
            }])?;
        Ok(chain)
    });
    let oracle = case.oracle();
    assert_oracle_has(&oracle, MIB, 100, 0x4a, "the backing file's last bytes");
    assert_oracle_has(&oracle, MIB + 100, SECTOR, 0, "past the backing file's end");
    case.assert_serves_with(kind, &oracle, |cmd| match kind {
        BackendKind::Vublk => cmd,
        BackendKind::Qsd => with_thread_aio(&cmd),
    });
}

/// `cmd`, a qemu-storage-daemon command line, with `aio=threads` instead of `io_uring`.
///
/// QEMU 10.0's io_uring AIO never completes a read of a file's last, partial sector: the
/// short read is resubmitted for the missing bytes, which lie past the end of the file, and
/// the resubmission returns 0 bytes forever (`qemu-io --image-opts driver=raw,
/// file.driver=file,file.aio=io_uring,... -c 'read 1048576 512'` on a 1 MiB + 100 byte file
/// hangs too). The thread pool's pread zero-fills the tail as intended, so the QSD
/// self-check of that scenario uses it.
fn with_thread_aio(cmd: &Command) -> Command {
    let args: Vec<String> = cmd
        .get_args()
        .map(|arg| {
            let arg = arg.to_str().unwrap();
            arg.replace(r#""aio":"io_uring""#, r#""aio":"threads""#)
        })
        .collect();
    assert!(
        args.iter().any(|a| a.contains(r#""aio":"threads""#)),
        "test setup: no io_uring AIO to replace in {cmd:?}"
    );
    let mut fixed = Command::new(cmd.get_program());
    fixed.args(args);
    fixed
}

/// A backing file longer than its overlay: the disk ends at the overlay's size even where the
/// overlay's last cluster (2 MiB) and the backing file continue with data.
fn backing_longer_than_the_overlay_is_cut_at_the_overlay_size(kind: BackendKind) {
    let base_size = 16 * MIB;
    let size = 5 * MIB + 3 * SECTOR;
    let case = Case::build(|dir| {
        let mut chain = Chain::raw_base(dir, "base.raw", base_size)?;
        chain
            .io(&[Io::Write {
                pattern: 0x5a,
                offset: 0,
                len: base_size,
            }])?
            .overlay("top.qcow2", size, &Qcow2Options::cluster(2 * MIB))?
            .io(&[Io::Write {
                pattern: 0x5b,
                offset: MIB,
                len: SECTOR,
            }])?;
        Ok(chain)
    });
    let oracle = case.oracle();
    assert_eq!(oracle.len(), size, "test setup: the overlay's size");
    assert_oracle_has(
        &oracle,
        size - SECTOR,
        SECTOR,
        0x5a,
        "backing data to the end",
    );
    case.assert_serves(kind, &oracle);
}

/// An overlay grown with `qemu-img resize` past its backing file (and to a size that is not
/// a multiple of its clusters), with a middle layer shorter than both its neighbours.
fn grown_overlay_over_a_shorter_middle_layer(kind: BackendKind) {
    let case = Case::build(|dir| {
        let mut chain = Chain::raw_base(dir, "base.raw", 4 * MIB)?;
        chain
            .io(&[Io::Write {
                pattern: 0x61,
                offset: 0,
                len: 4 * MIB,
            }])?
            .overlay(
                "mid.qcow2",
                2 * MIB + 3 * SECTOR,
                &Qcow2Options::cluster(64 * KIB),
            )?
            .io(&[Io::Write {
                pattern: 0x62,
                offset: 2 * MIB - SECTOR,
                len: 4 * SECTOR,
            }])?
            .overlay("top.qcow2", 3 * MIB, &Qcow2Options::cluster(4 * KIB))?
            .io(&[Io::Write {
                pattern: 0x63,
                offset: 3 * MIB - SECTOR,
                len: SECTOR,
            }])?;
        images::grow(chain.top(), 7 * MIB + 5 * SECTOR)?;
        images::io(
            chain.top(),
            &[Io::Write {
                pattern: 0x64,
                offset: 6 * MIB,
                len: 3 * SECTOR,
            }],
        )?;
        Ok(chain)
    });
    let oracle = case.oracle();
    assert_eq!(oracle.len(), 7 * MIB + 5 * SECTOR, "test setup: grown size");
    assert_oracle_has(
        &oracle,
        2 * MIB + 3 * SECTOR,
        4 * KIB,
        0,
        "past the middle layer",
    );
    case.assert_serves(kind, &oracle);
}

/// The layers are moved after QEMU read them, and decoys with other data are put at the
/// names the images record: the daemon must read the layers it was given, not the names.
fn backing_names_in_the_images_are_not_opened(kind: BackendKind) {
    let size = 2 * MIB + 3 * SECTOR;
    let mut case = Case::build(|dir| {
        let mut chain = Chain::raw_base(dir, "base.raw", size)?;
        chain
            .io(&[Io::Write {
                pattern: 0x81,
                offset: 0,
                len: size,
            }])?
            .overlay("mid.qcow2", size, &Qcow2Options::cluster(4 * KIB))?
            .io(&[Io::Write {
                pattern: 0x82,
                offset: 0,
                len: MIB,
            }])?
            .overlay("top.qcow2", size, &Qcow2Options::default())?
            .io(&[Io::Write {
                pattern: 0x83,
                offset: 0,
                len: 64 * KIB,
            }])?;
        Ok(chain)
    });
    let oracle = case.oracle();
    move_layers_and_plant_decoys(&mut case);
    case.assert_serves(kind, &oracle);
}

/// Moves every backing layer of `case` to `given-<name>` and writes a decoy of the same
/// format and size, full of 0xdd, at each old name.
fn move_layers_and_plant_decoys(case: &mut Case) {
    let layers = case.chain.layers().to_vec();
    for (i, layer) in layers.iter().enumerate().take(layers.len() - 1) {
        let size = layer.virtual_size().unwrap();
        case.chain
            .rename_layer(i, &format!("given-{}", layer.name()))
            .unwrap();
        let decoy = match layer.format {
            Format::Raw => images::create_raw(&layer.path, size).unwrap(),
            Format::Qcow2 => {
                images::create_qcow2(&layer.path, size, &Qcow2Options::default(), None).unwrap()
            }
        };
        images::io(
            &decoy,
            &[Io::Write {
                pattern: 0xdd,
                offset: 0,
                len: size,
            }],
        )
        .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// vublk only: layers as inherited fds.

/// `fd` duplicated to a number of at least [`FD_DUP_FLOOR`].
fn dup_high(fd: &File) -> OwnedFd {
    let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(FD_DUP_FLOOR)).unwrap();
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
}

/// A three-layer chain (raw <- qcow2 <- qcow2) whose every layer reaches vublk as an
/// inherited read-only fd (`--image fd:10 --backing fd:11,format=qcow2 --backing
/// fd:12,format=raw`), with the files moved away from the names the images record.
/// QSD has no equivalent on its command line, so it has no run of this test.
#[test]
fn vublk_reads_a_chain_passed_as_inherited_fds() {
    let size = 3 * MIB + 3 * SECTOR;
    let mut case = Case::build(|dir| {
        let mut chain = Chain::raw_base(dir, "base.raw", size)?;
        chain
            .io(&[Io::Write {
                pattern: 0x91,
                offset: 0,
                len: size,
            }])?
            .overlay("mid.qcow2", size, &Qcow2Options::cluster(4 * KIB))?
            .io(&[Io::Write {
                pattern: 0x92,
                offset: 4 * KIB + SECTOR,
                len: MIB,
            }])?
            .overlay("top.qcow2", size, &Qcow2Options::cluster(64 * KIB))?
            .io(&[
                Io::Write {
                    pattern: 0x93,
                    offset: 64 * KIB - SECTOR,
                    len: 2 * SECTOR,
                },
                Io::Zero {
                    offset: 2 * MIB,
                    len: 128 * KIB,
                },
            ])?;
        Ok(chain)
    });
    let oracle = case.oracle();
    move_layers_and_plant_decoys(&mut case);

    // Top first, then its backing chain, nearest first.
    let layers: Vec<Image> = case.chain.layers().iter().rev().cloned().collect();
    let files: Vec<File> = layers
        .iter()
        .map(|l| File::open(&l.path).unwrap())
        .collect();
    let high: Vec<OwnedFd> = files.iter().map(dup_high).collect();
    let fds: Vec<(RawFd, RawFd)> = high
        .iter()
        .zip(FIRST_LAYER_FD..)
        .map(|(fd, target)| (fd.as_raw_fd(), target))
        .collect();
    let mut opts = DiskOptions {
        format: "qcow2".to_string(),
        read_only: true,
        ..DiskOptions::raw(format!("fd:{FIRST_LAYER_FD}"))
    };
    opts.backing = layers[1..]
        .iter()
        .zip(FIRST_LAYER_FD + 1..)
        .map(|(layer, fd)| Backing::new(format!("fd:{fd}"), layer.format.as_str()))
        .collect();
    let socket = case.path("vhost.sock");
    let mut cmd = Daemon::command(BackendKind::Vublk, &opts, &socket);
    pass_fds(&mut cmd, &fds);
    let daemon = Daemon::spawn(BackendKind::Vublk, &mut cmd, &socket)
        .unwrap_or_else(|e| panic!("vublk could not serve {cmd:?}: {e:#}"));
    drop(high);
    drop(files);
    assert_disk_matches(BackendKind::Vublk, &daemon.socket, &oracle, &case.chain);
}

// ---------------------------------------------------------------------------------------------
// vublk only: a --backing list that does not fit the image's chain is refused at startup.

/// raw base <- mid.qcow2 <- top.qcow2, nothing written.
fn two_backing_layers() -> Case {
    Case::build(|dir| {
        let mut chain = Chain::raw_base(dir, "base.raw", 2 * MIB)?;
        chain
            .overlay("mid.qcow2", 2 * MIB, &Qcow2Options::default())?
            .overlay("top.qcow2", 2 * MIB, &Qcow2Options::default())?;
        Ok(chain)
    })
}

/// Asserts that vublk serves `case` as built (so `--backing` and qcow2 are understood and a
/// refusal below is about the chain, not the command line), then that it refuses to start
/// with `backing` instead, with an error that mentions the backing chain.
fn assert_backing_refused(case: &Case, backing: Vec<Backing>, problem: &str) {
    let socket = case.path("control.sock");
    let control =
        Daemon::start(BackendKind::Vublk, &case.disk_options(), &socket).unwrap_or_else(|e| {
            panic!(
                "control: vublk should serve {} with its full chain: {e:#}",
                case.chain.describe()
            )
        });
    drop(control);

    let opts = DiskOptions {
        backing,
        ..case.disk_options()
    };
    let socket = case.path("refused.sock");
    let cmd = Daemon::command(BackendKind::Vublk, &opts, &socket);
    let cmdline = format!("{cmd:?}");
    match startup(cmd, &socket) {
        Startup::Listening { stderr } => {
            panic!("vublk should refuse {problem} but started serving: {cmdline}; stderr: {stderr}")
        }
        Startup::Exited { status, stderr } => {
            assert!(
                !status.success(),
                "vublk should refuse {problem} but exited {status}: {cmdline}; stderr: {stderr}"
            );
            assert!(
                stderr.contains("backing"),
                "vublk's error for {problem} should mention the backing chain; stderr: {stderr}"
            );
        }
    }
}

/// How a `vublk serve` expected to refuse its arguments ended up.
enum Startup {
    /// It exited before listening.
    Exited { status: ExitStatus, stderr: String },
    /// It created its socket (and was then killed).
    Listening { stderr: String },
}

/// Runs `cmd` until it exits or its `socket` appears, whichever comes first.
fn startup(mut cmd: Command, socket: &Path) -> Startup {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let read_stderr = |child: &mut Child| {
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        stderr
    };
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = read_stderr(&mut child);
            return Startup::Exited { status, stderr };
        }
        if socket.exists() {
            child.kill().unwrap();
            child.wait().unwrap();
            let stderr = read_stderr(&mut child);
            return Startup::Listening { stderr };
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{cmd:?} neither exited nor listened within {EXIT_TIMEOUT:?}");
        }
        std::thread::sleep(STARTUP_POLL);
    }
}

#[test]
fn vublk_refuses_an_image_with_a_backing_file_and_no_backing_given() {
    let case = two_backing_layers();
    assert_backing_refused(
        &case,
        Vec::new(),
        "a qcow2 image whose backing file is not given",
    );
}

#[test]
fn vublk_refuses_a_chain_deeper_than_the_backing_given() {
    let case = two_backing_layers();
    let mut backing = case.chain.backing();
    backing.truncate(1);
    assert_backing_refused(
        &case,
        backing,
        "a backing layer that has a backing file not given",
    );
}

#[test]
fn vublk_refuses_more_backing_layers_than_the_chain_has() {
    let case = two_backing_layers();
    let mut backing = case.chain.backing();
    let extra = images::create_raw(&case.path("extra.raw"), 2 * MIB).unwrap();
    backing.push(extra.as_backing());
    assert_backing_refused(&case, backing, "a backing layer below a raw base");
}

#[test]
fn vublk_refuses_a_backing_layer_for_an_image_without_a_backing_file() {
    let case = Case::single(2 * MIB, Qcow2Options::default(), &[]);
    let extra = images::create_raw(&case.path("extra.raw"), 2 * MIB).unwrap();
    assert_backing_refused(
        &case,
        vec![extra.as_backing()],
        "a backing layer for a qcow2 image that has no backing file",
    );
}

#[test]
fn vublk_refuses_a_backing_format_other_than_the_images_backing_format() {
    let case = two_backing_layers();
    let mut backing = case.chain.backing();
    // top.qcow2 records its backing file, mid.qcow2, with backing format qcow2.
    backing[0].format = "raw".to_string();
    assert_backing_refused(
        &case,
        backing,
        "a qcow2 backing file given as raw (its overlay records backing format qcow2)",
    );
}

// ---------------------------------------------------------------------------------------------
// Both backends.

vublk_tests::both_backends!(
    v3_512_byte_clusters,
    v2_512_byte_clusters,
    v3_4k_clusters_with_1_bit_refcounts,
    v2_4k_clusters,
    v3_64k_clusters_with_16_bit_refcounts,
    v3_64k_clusters_with_64_bit_refcounts,
    v2_64k_clusters,
    v3_2m_clusters_with_64_bit_refcounts,
    v2_2m_clusters,
    zlib_compressed_64k_clusters,
    zlib_compressed_4k_clusters_v2,
    zlib_compressed_512_byte_clusters,
    zstd_compressed_64k_clusters,
    zstd_compressed_2m_clusters,
    zstd_compressed_4k_clusters_with_64_bit_refcounts,
    compressed_clusters_partly_overwritten,
    zero_clusters_read_as_zeroes,
    discarded_ranges_read_as_qemu_reads_them,
    zero_clusters_in_an_overlay_hide_backing_data,
    v2_overlay_zeroes_and_discards_over_backing_data,
    snapshots_share_clusters_with_the_active_layer,
    applied_snapshot_reads_the_snapshot_data,
    deleted_snapshot_leaves_the_active_layer_intact_v2,
    raw_base_under_a_qcow2_overlay,
    qcow2_base_with_smaller_clusters_under_a_qcow2_overlay,
    four_layer_chain_of_raw_and_qcow2,
    compressed_base_under_two_overlays,
    backing_shorter_than_the_overlay_reads_zeroes_past_its_end,
    raw_backing_with_an_unaligned_length,
    backing_longer_than_the_overlay_is_cut_at_the_overlay_size,
    grown_overlay_over_a_shorter_middle_layer,
    backing_names_in_the_images_are_not_opened,
);
