//! The image every backend serves: a raw file created fully written (not sparse), or checked if
//! given; for the qcow2 image kinds a fully allocated qcow2 converted from it (and copies of
//! that), or an empty qcow2 overlay over it.
//!
//! Reads of a hole or of an unwritten extent never reach the disk, so a benchmark on a sparse
//! file would measure the filesystem, not the I/O path; likewise every cluster of a converted
//! qcow2 image is allocated, so no read is answered from metadata alone. This module only
//! writes and inspects those files (through `qemu-img` for qcow2); it does not know who reads
//! them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// qemu-img, from the same QEMU as the qemu-storage-daemon the fixture runs.
pub const QEMU_IMG: &str = "/usr/bin/qemu-img";
/// Cluster size of the converted qcow2 images: QEMU's default, and the common one in practice.
pub const QCOW2_CLUSTER_SIZE: u64 = 64 * 1024;
/// Bytes of one qcow2 L2 entry (no extended L2).
const L2_ENTRY_BYTES: u64 = 8;

/// Chunk written at a time while filling a new image.
const FILL_CHUNK: usize = 1 << 20;
/// Alignment the image size must have: the largest block size any workload uses, and a
/// multiple of every O_DIRECT alignment.
pub const SIZE_ALIGNMENT: u64 = 128 * 1024;
/// `st_blocks` counts 512-byte units (stat(2)).
const STAT_BLOCK: u64 = 512;

/// What a created raw image is filled with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Pseudo-random 64-bit words: no zero cluster, and incompressible.
    Random,
    /// Pseudo-random but compressible data (see [`fill_compressible`]): no zero cluster, and
    /// zlib stores a 64 KiB cluster in under a third of its size.
    Compressible,
}

/// Returns the size of the image at `path`, creating it fully written with `size` bytes of
/// `fill` if it does not exist. An existing image must be a regular, non-sparse file of a size
/// aligned to [`SIZE_ALIGNMENT`]; its contents are used as they are.
pub fn prepare(path: &Path, size: u64, fill: Fill) -> Result<u64> {
    if !path.exists() {
        create(path, size, fill)?;
    }
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    ensure!(
        meta.is_file(),
        "image {} is not a regular file",
        path.display()
    );
    let len = meta.len();
    ensure!(
        len >= SIZE_ALIGNMENT && len % SIZE_ALIGNMENT == 0,
        "image {} is {len} bytes; it must be a non-zero multiple of {SIZE_ALIGNMENT}",
        path.display()
    );
    let allocated = meta.blocks().saturating_mul(STAT_BLOCK);
    if allocated < len {
        bail!(
            "image {} is sparse ({allocated} of {len} bytes allocated): reads of holes never \
             reach the disk. Delete it and let vublk-bench create it, or fill it with data",
            path.display()
        );
    }
    Ok(len)
}

/// Writes `size` bytes of non-zero data to a new file and syncs it; removes the partial file if
/// filling it fails.
fn create(path: &Path, size: u64, fill: Fill) -> Result<()> {
    ensure!(
        size % SIZE_ALIGNMENT == 0,
        "image size {size} is not a multiple of {SIZE_ALIGNMENT}"
    );
    eprintln!(
        "creating {} ({} MiB, fully written, {})...",
        path.display(),
        size >> 20,
        match fill {
            Fill::Random => "random data",
            Fill::Compressible => "compressible data",
        }
    );
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let result =
        write_fill(file, size, fill).with_context(|| format!("filling {}", path.display()));
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn write_fill(mut file: File, size: u64, fill: Fill) -> Result<()> {
    let mut chunk = vec![0u8; FILL_CHUNK];
    let mut state = 0x243f_6a88_85a3_08d3_u64;
    let mut written = 0u64;
    while written < size {
        match fill {
            // A cheap xorshift fill: non-zero, not trivially compressible, different per chunk.
            Fill::Random => {
                for word in chunk.chunks_exact_mut(8) {
                    word.copy_from_slice(&xorshift(&mut state).to_le_bytes());
                }
            }
            Fill::Compressible => fill_compressible(&mut chunk, &mut state),
        }
        let n = usize::try_from((size - written).min(FILL_CHUNK as u64))?;
        file.write_all(&chunk[..n])?;
        written += n as u64;
    }
    file.sync_all()?;
    Ok(())
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Bytes of each half of a [`Fill::Compressible`] block.
const COMPRESSIBLE_HALF: usize = 2048;

/// Fills `chunk` (a multiple of 4 KiB) with compressible data: in each 4 KiB block, the first
/// half is random characters from a 16-letter alphabet (`'@'..='O'`, 4 bits of entropy per
/// byte: Huffman coding's share of the work) and the second half repeats the first (a match
/// 2 KiB back: LZ77's share). Never zero, different in every block.
fn fill_compressible(chunk: &mut [u8], state: &mut u64) {
    for block in chunk.chunks_exact_mut(2 * COMPRESSIBLE_HALF) {
        let (first, second) = block.split_at_mut(COMPRESSIBLE_HALF);
        for bytes in first.chunks_exact_mut(16) {
            let word = xorshift(state).to_le_bytes();
            for (pair, r) in bytes.chunks_exact_mut(2).zip(word) {
                pair[0] = 0x40 | (r & 0xf);
                pair[1] = 0x40 | (r >> 4);
            }
        }
        second.copy_from_slice(first);
    }
}

/// A qcow2 image converted from the raw image, as `qemu-img check` and `info` describe it.
#[derive(Clone, Debug)]
pub struct Qcow2Image {
    /// The `qemu-img convert` command line that made it.
    pub command: String,
    pub virtual_size: u64,
    pub cluster_size: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub compressed_clusters: u64,
    /// Size of the qcow2 file.
    pub file_bytes: u64,
}

impl Qcow2Image {
    /// Bytes of L2 tables needed to map the whole image (whole tables, one cluster each).
    pub fn l2_metadata_bytes(&self) -> u64 {
        (self.total_clusters * L2_ENTRY_BYTES).next_multiple_of(self.cluster_size)
    }
}

/// Converts `raw` into a new qcow2 file `dst` with [`QCOW2_CLUSTER_SIZE`] clusters, every one
/// allocated (`-S 0`: no zero detection) and, if `compress`, zlib-compressed (`-c`); syncs it
/// and checks with `qemu-img check` that every cluster is allocated.
pub fn convert_qcow2(raw: &Path, dst: &Path, compress: bool) -> Result<Qcow2Image> {
    let mut cmd = Command::new(QEMU_IMG);
    cmd.args(["convert", "-f", "raw", "-O", "qcow2", "-S", "0"]);
    let mut opts = format!("cluster_size={QCOW2_CLUSTER_SIZE}");
    if compress {
        cmd.arg("-c");
        opts.push_str(",compression_type=zlib");
    }
    cmd.arg("-o").arg(opts).arg(raw).arg(dst);
    let command = format!("{cmd:?}").replace('"', "");
    eprintln!("converting: {command}...");
    let out = cmd
        .output()
        .with_context(|| format!("running {QEMU_IMG} (Debian: qemu-utils)"))?;
    ensure!(
        out.status.success(),
        "qemu-img convert failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    File::open(dst)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dst.display()))?;

    let check = qemu_img_json(&["check", "--output=json"], dst)?;
    let info = qemu_img_json(&["info", "--output=json"], dst)?;
    let num = |v: &Value, key: &str| -> Result<u64> {
        v.get(key)
            .and_then(Value::as_u64)
            .with_context(|| format!("qemu-img output has no number {key:?}"))
    };
    let image = Qcow2Image {
        command,
        virtual_size: num(&info, "virtual-size")?,
        cluster_size: num(&info, "cluster-size")?,
        total_clusters: num(&check, "total-clusters")?,
        allocated_clusters: num(&check, "allocated-clusters")?,
        compressed_clusters: num(&check, "compressed-clusters").unwrap_or(0),
        file_bytes: std::fs::metadata(dst)?.len(),
    };
    ensure!(
        image.cluster_size == QCOW2_CLUSTER_SIZE,
        "{} has {}-byte clusters, asked for {QCOW2_CLUSTER_SIZE}",
        dst.display(),
        image.cluster_size
    );
    ensure!(
        image.total_clusters > 0 && image.allocated_clusters == image.total_clusters,
        "{}: only {} of {} clusters are allocated",
        dst.display(),
        image.allocated_clusters,
        image.total_clusters
    );
    if compress {
        ensure!(
            image.compressed_clusters > 0,
            "{}: no cluster was stored compressed (is {} compressible?)",
            dst.display(),
            raw.display()
        );
    }
    Ok(image)
}

/// Copies `src` to a new `dst` (replacing it) without sharing extents (`--reflink=never`: a
/// write to a shared extent would be a filesystem copy-on-write, not the in-place write being
/// measured) and keeping holes, then syncs `dst` and drops it from the page cache, so the
/// copy's writeback does not run under the next measurement.
pub fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let _ = std::fs::remove_file(dst);
    let out = Command::new("cp")
        .args(["--sparse=always", "--reflink=never", "--"])
        .arg(src)
        .arg(dst)
        .output()
        .context("running cp")?;
    ensure!(
        out.status.success(),
        "cp {} {} failed ({}): {}",
        src.display(),
        dst.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    sync_and_drop_cache(dst)
}

/// fsyncs `path` and asks the kernel to drop its pages from the page cache.
fn sync_and_drop_cache(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is open for the call.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    ensure!(
        rc == 0,
        "posix_fadvise({}): {}",
        path.display(),
        std::io::Error::from_raw_os_error(rc)
    );
    Ok(())
}

/// An empty qcow2 overlay made by [`create_overlay`].
#[derive(Clone, Debug)]
pub struct Overlay {
    /// The `qemu-img create` command line that made it.
    pub command: String,
    pub virtual_size: u64,
    pub cluster_size: u64,
    /// Size of the new, empty overlay file.
    pub file_bytes: u64,
}

impl Overlay {
    /// Bytes of L2 tables that map the whole virtual disk once every L2 table exists.
    pub fn l2_metadata_bytes(&self) -> u64 {
        (self.virtual_size.div_ceil(self.cluster_size) * L2_ENTRY_BYTES)
            .next_multiple_of(self.cluster_size)
    }
}

/// Creates an empty qcow2 `dst` of `virtual_size` bytes with [`QCOW2_CLUSTER_SIZE`] clusters
/// whose backing file is the raw image `backing` (recorded in the header; the daemons are
/// handed it explicitly), replacing any `dst`.
pub fn create_overlay(backing: &Path, dst: &Path, virtual_size: u64) -> Result<Overlay> {
    let _ = std::fs::remove_file(dst);
    let mut cmd = Command::new(QEMU_IMG);
    cmd.args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("cluster_size={QCOW2_CLUSTER_SIZE}"))
        .args(["-F", "raw", "-b"])
        .arg(backing)
        .arg(dst)
        .arg(virtual_size.to_string());
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .with_context(|| format!("running {QEMU_IMG} (Debian: qemu-utils)"))?;
    ensure!(
        out.status.success(),
        "qemu-img create failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    sync_and_drop_cache(dst)?;
    let info = qemu_img_json(&["info", "--output=json"], dst)?;
    let overlay = Overlay {
        command,
        virtual_size: json_u64(&info, "virtual-size")?,
        cluster_size: json_u64(&info, "cluster-size")?,
        file_bytes: std::fs::metadata(dst)?.len(),
    };
    ensure!(
        overlay.virtual_size == virtual_size && overlay.cluster_size == QCOW2_CLUSTER_SIZE,
        "{}: virtual size {} and {}-byte clusters, asked for {virtual_size} and \
         {QCOW2_CLUSTER_SIZE}",
        dst.display(),
        overlay.virtual_size,
        overlay.cluster_size
    );
    Ok(overlay)
}

/// What `qemu-img check` found in an image a daemon wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Check {
    pub corruptions: u64,
    pub leaks: u64,
    /// Clusters the image itself maps (not its backing file).
    pub allocated_clusters: u64,
}

/// Runs `qemu-img check` on `image` (without repairing anything). Corruptions and leaks are
/// returned, not errors; a check that cannot run is one.
pub fn check(image: &Path) -> Result<Check> {
    // Exit status 2: corruptions, 3: leaks; both with the JSON report on stdout.
    let out = qemu_img(&["check", "--output=json"], image)?;
    let code = out.status.code();
    ensure!(
        matches!(code, Some(0 | 2 | 3)),
        "qemu-img check {} failed ({}): {}",
        image.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let v: Value =
        serde_json::from_slice(&out.stdout).context("qemu-img check: output is not JSON")?;
    // Absent when zero.
    let opt = |key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
    Ok(Check {
        corruptions: opt("corruptions"),
        leaks: opt("leaks"),
        allocated_clusters: json_u64(&v, "allocated-clusters")?,
    })
}

/// Where an overlay's own clusters are, after a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Clusters the overlay maps itself (`qemu-img map` extents of depth 0 that are present).
    pub clusters: u64,
    /// Of those, clusters below the end of the backing file: the ones whose first write had
    /// backing data to copy (beyond the backing file's end the backing reads as zeroes).
    pub clusters_over_backing: u64,
    /// Size of the overlay file.
    pub file_bytes: u64,
    /// Bytes the overlay file occupies on the filesystem.
    pub disk_bytes: u64,
}

/// Counts the clusters `overlay` maps itself with `qemu-img map`, and those of them below
/// `backing_size`.
pub fn allocation(overlay: &Path, cluster_size: u64, backing_size: u64) -> Result<Allocation> {
    let map = qemu_img_json(&["map", "--output=json"], overlay)?;
    let extents = map
        .as_array()
        .context("qemu-img map: output is not a JSON array")?;
    let (mut bytes, mut over_backing) = (0u64, 0u64);
    for e in extents {
        let own = e.get("depth").and_then(Value::as_u64) == Some(0)
            && e.get("present").and_then(Value::as_bool) == Some(true);
        if !own {
            continue;
        }
        let start = json_u64(e, "start")?;
        let len = json_u64(e, "length")?;
        bytes += len;
        over_backing += (start + len).min(backing_size).saturating_sub(start);
    }
    let meta = std::fs::metadata(overlay).with_context(|| format!("stat {}", overlay.display()))?;
    Ok(Allocation {
        clusters: bytes.div_ceil(cluster_size),
        clusters_over_backing: over_backing.div_ceil(cluster_size),
        file_bytes: meta.len(),
        disk_bytes: meta.blocks().saturating_mul(STAT_BLOCK),
    })
}

fn json_u64(v: &Value, key: &str) -> Result<u64> {
    v.get(key)
        .and_then(Value::as_u64)
        .with_context(|| format!("qemu-img output has no number {key:?}"))
}

fn qemu_img(args: &[&str], file: &Path) -> Result<Output> {
    Command::new(QEMU_IMG)
        .args(args)
        .arg(file)
        .output()
        .with_context(|| format!("running {QEMU_IMG}"))
}

/// Runs `qemu-img ARGS FILE` and parses its JSON output.
fn qemu_img_json(args: &[&str], file: &Path) -> Result<Value> {
    let out = qemu_img(args, file)?;
    ensure!(
        out.status.success(),
        "qemu-img {} {} failed ({}): {}",
        args.join(" "),
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("qemu-img {}: output is not JSON", args.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_fill_is_nonzero_and_repeats_each_half_block() {
        let mut chunk = vec![0u8; 8192];
        let mut state = 1;

        fill_compressible(&mut chunk, &mut state);

        assert!(chunk.iter().all(|&b| (0x40..=0x4f).contains(&b)));
        assert_eq!(chunk[..2048], chunk[2048..4096]);
        assert_eq!(chunk[4096..6144], chunk[6144..]);
        assert_ne!(chunk[..2048], chunk[4096..6144]);
    }
}
