//! The raw image every backend serves: created fully written (not sparse), or checked if given.
//!
//! Reads of a hole or of an unwritten extent never reach the disk, so a benchmark on a sparse
//! file would measure the filesystem, not the I/O path. This module only writes and inspects
//! that file; it does not know who reads it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

/// Chunk written at a time while filling a new image.
const FILL_CHUNK: usize = 1 << 20;
/// Alignment the image size must have: the largest block size any workload uses, and a
/// multiple of every O_DIRECT alignment.
pub const SIZE_ALIGNMENT: u64 = 128 * 1024;
/// `st_blocks` counts 512-byte units (stat(2)).
const STAT_BLOCK: u64 = 512;

/// Returns the size of the image at `path`, creating it fully written with `size` bytes if it
/// does not exist. An existing image must be a regular, non-sparse file of a size aligned to
/// [`SIZE_ALIGNMENT`].
pub fn prepare(path: &Path, size: u64) -> Result<u64> {
    if !path.exists() {
        create(path, size)?;
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
fn create(path: &Path, size: u64) -> Result<()> {
    ensure!(
        size % SIZE_ALIGNMENT == 0,
        "image size {size} is not a multiple of {SIZE_ALIGNMENT}"
    );
    eprintln!(
        "creating {} ({} MiB, fully written)...",
        path.display(),
        size >> 20
    );
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let result = fill(file, size).with_context(|| format!("filling {}", path.display()));
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn fill(mut file: File, size: u64) -> Result<()> {
    let mut chunk = vec![0u8; FILL_CHUNK];
    let mut state = 0x243f_6a88_85a3_08d3_u64;
    let mut written = 0u64;
    while written < size {
        // A cheap xorshift fill: non-zero, not trivially compressible, different per chunk.
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = usize::try_from((size - written).min(FILL_CHUNK as u64))?;
        file.write_all(&chunk[..n])?;
        written += n as u64;
    }
    file.sync_all()?;
    Ok(())
}
