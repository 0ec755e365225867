//! Test images built with QEMU's own tools, and QEMU's reading of them as the oracle.
//!
//! Owns: creating raw and qcow2 images with the `qemu-img create` options the read tests vary
//! (cluster size, compat level, refcount width, compression type, a backing file), changing them
//! the way a guest or an operator would (`qemu-io` pattern writes, zero writes and discards;
//! `qemu-img` snapshots, resize and compressing convert), backing chains built layer by layer,
//! describing an image's allocation (`qemu-img map`), and the oracle: `qemu-img convert -O raw`
//! of the top image, i.e. the whole virtual disk as QEMU reads it, compared chunk by chunk with
//! what a daemon served, reporting where they first differ and what QEMU says lives there.
//!
//! QEMU's tools open backing files by the names written in the images (relative names resolve
//! against the image's directory). That is fine for building images and for the oracle; it is
//! exactly what the daemons under test must not do, and nothing here talks to a daemon.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::daemon::Backing;

/// `qemu-img`, which creates, converts, snapshots, resizes and maps images.
pub const QEMU_IMG: &str = "/usr/bin/qemu-img";
/// `qemu-io`, which writes into images as a guest would.
pub const QEMU_IO: &str = "/usr/bin/qemu-io";
/// How many bytes of each side a [`Difference`] quotes.
const QUOTE_BYTES: usize = 16;

/// An image format both QEMU and the daemons understand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The name QEMU and vublk's `--format` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// qcow2 `compat`: the header version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compat {
    /// `compat=0.10`, qcow2 version 2: no zero flag, refcount_bits is always 16.
    V2,
    /// `compat=1.1`, qcow2 version 3.
    V3,
}

impl Compat {
    fn as_str(self) -> &'static str {
        match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        }
    }
}

/// qcow2 `compression_type`, used by compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Deflate without zlib header; the only one version 2 images can use.
    Zlib,
    /// zstd (a version 3 incompatible feature bit).
    Zstd,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// The `qemu-img create -o` options of a qcow2 image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qcow2Options {
    /// A power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    pub compat: Compat,
    /// 1, 2, 4, 8, 16, 32 or 64; version 2 images only support 16.
    pub refcount_bits: u32,
    pub compression: Compression,
}

impl Default for Qcow2Options {
    /// What `qemu-img create -f qcow2` picks: 64 KiB clusters, v3, 16-bit refcounts, zlib.
    fn default() -> Self {
        Qcow2Options {
            cluster_size: 64 << 10,
            compat: Compat::V3,
            refcount_bits: 16,
            compression: Compression::Zlib,
        }
    }
}

impl Qcow2Options {
    /// `cluster_size` bytes per cluster, the rest as in [`Default`].
    pub fn cluster(cluster_size: u64) -> Self {
        Qcow2Options {
            cluster_size,
            ..Default::default()
        }
    }

    /// The `-o` argument of `qemu-img create` and `convert`.
    fn create_options(&self) -> String {
        format!(
            "cluster_size={},compat={},refcount_bits={},compression_type={}",
            self.cluster_size,
            self.compat.as_str(),
            self.refcount_bits,
            self.compression.as_str()
        )
    }
}

/// One `qemu-io` command: what a guest does to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// `write -P pattern offset len`: `len` bytes of `pattern`.
    Write { pattern: u8, offset: u64, len: u64 },
    /// `write -z offset len`: zeroes that keep their allocation (a v3 zero flag over an
    /// allocated cluster, "preallocated zero"), or explicit zeroes where the format cannot.
    Zero { offset: u64, len: u64 },
    /// `write -z -u offset len`: zeroes that may drop the allocation.
    ZeroUnmap { offset: u64, len: u64 },
    /// `discard offset len`: whole clusters in range are deallocated (or zero-flagged over a
    /// backing file); partial clusters are left alone.
    Discard { offset: u64, len: u64 },
}

impl Io {
    fn command(&self) -> String {
        match *self {
            Io::Write {
                pattern,
                offset,
                len,
            } => format!("write -P {pattern:#04x} {offset} {len}"),
            Io::Zero { offset, len } => format!("write -z {offset} {len}"),
            Io::ZeroUnmap { offset, len } => format!("write -z -u {offset} {len}"),
            Io::Discard { offset, len } => format!("discard {offset} {len}"),
        }
    }
}

/// An image file and its format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub path: PathBuf,
    pub format: Format,
}

impl Image {
    /// This image as a layer of some other image's backing chain.
    pub fn as_backing(&self) -> Backing {
        Backing::new(&self.path, self.format.as_str())
    }

    /// The file name, for messages.
    pub fn name(&self) -> String {
        self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// The image's virtual size, per `qemu-img info`.
    pub fn virtual_size(&self) -> Result<u64> {
        let out = run(Command::new(QEMU_IMG)
            .args(["info", "--output=json", "-f", self.format.as_str()])
            .arg(&self.path))?;
        let info: serde_json::Value =
            serde_json::from_str(&out).context("parsing qemu-img info --output=json")?;
        info["virtual-size"]
            .as_u64()
            .with_context(|| format!("no virtual-size in qemu-img info of {}", self.name()))
    }
}

/// Runs a QEMU tool to completion and returns its stdout; a failure carries its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates a sparse raw image of `size` bytes (any size: raw need not be sector-aligned).
pub fn create_raw(path: &Path, size: u64) -> Result<Image> {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(Image {
        path: path.to_path_buf(),
        format: Format::Raw,
    })
}

/// `qemu-img create -f qcow2 -o opts [-b backing -F fmt] path size`.
///
/// The backing file is recorded by its file name alone when it sits in the same directory
/// (QEMU resolves it against the image's directory), else by its full path.
pub fn create_qcow2(
    path: &Path,
    size: u64,
    opts: &Qcow2Options,
    backing: Option<&Image>,
) -> Result<Image> {
    let mut cmd = Command::new(QEMU_IMG);
    cmd.args(["create", "-q", "-f", "qcow2", "-o", &opts.create_options()]);
    if let Some(backing) = backing {
        let name = if backing.path.parent() == path.parent() {
            backing.path.file_name().map(PathBuf::from)
        } else {
            None
        };
        cmd.arg("-b")
            .arg(name.unwrap_or_else(|| backing.path.clone()))
            .args(["-F", backing.format.as_str()]);
    }
    cmd.arg(path).arg(size.to_string());
    run(&mut cmd)?;
    Ok(Image {
        path: path.to_path_buf(),
        format: Format::Qcow2,
    })
}

/// Runs `cmds` against `image` in one `qemu-io` session (backing files opened by name).
pub fn io(image: &Image, cmds: &[Io]) -> Result<()> {
    let mut cmd = Command::new(QEMU_IO);
    cmd.args(["-f", image.format.as_str()]);
    for c in cmds {
        cmd.arg("-c").arg(c.command());
    }
    cmd.arg(&image.path);
    run(&mut cmd).map(drop)
}

/// `qemu-img convert -c -O qcow2 -o opts src dst`: every cluster that compresses to less than
/// a cluster is stored compressed; the others (random data) are stored as they are, and
/// all-zero clusters are left unallocated.
pub fn convert_compressed(src: &Image, dst: &Path, opts: &Qcow2Options) -> Result<Image> {
    run(Command::new(QEMU_IMG)
        .args(["convert", "-q", "-c", "-f", src.format.as_str()])
        .args(["-O", "qcow2", "-o", &opts.create_options()])
        .arg(&src.path)
        .arg(dst))?;
    Ok(Image {
        path: dst.to_path_buf(),
        format: Format::Qcow2,
    })
}

/// An internal snapshot operation of `qemu-img snapshot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Snapshot<'a> {
    /// `-c`: the active L1 table's clusters become shared with the snapshot (refcount 2).
    Create(&'a str),
    /// `-a`: the active layer becomes a copy of the snapshot's tables.
    Apply(&'a str),
    /// `-d`: the snapshot's references are dropped.
    Delete(&'a str),
}

/// Runs one `qemu-img snapshot` operation on a qcow2 image.
pub fn snapshot(image: &Image, op: Snapshot<'_>) -> Result<()> {
    let (flag, name) = match op {
        Snapshot::Create(n) => ("-c", n),
        Snapshot::Apply(n) => ("-a", n),
        Snapshot::Delete(n) => ("-d", n),
    };
    run(Command::new(QEMU_IMG)
        .args(["snapshot", "-q", "-f", image.format.as_str(), flag, name])
        .arg(&image.path))
    .map(drop)
}

/// `qemu-img resize`: grows `image` to `size` bytes (the new tail reads as zeroes).
pub fn grow(image: &Image, size: u64) -> Result<()> {
    run(Command::new(QEMU_IMG)
        .args(["resize", "-q", "-f", image.format.as_str()])
        .arg(&image.path)
        .arg(size.to_string()))
    .map(drop)
}

/// A small deterministic generator (xorshift64*), so "random" clusters are reproducible.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// What a chunk of [`write_mixed_raw`] holds, cycling per chunk.
const MIXED_KINDS: u64 = 5;

/// Writes a raw image of `size` bytes whose `chunk`-sized pieces cycle through: one repeated
/// byte (compresses to almost nothing), all zeroes (left unallocated by a convert), random
/// bytes (incompressible: stored uncompressed), a counter of little-endian u64 offsets
/// (compresses moderately), and half random, half zero (compresses to about half a chunk).
/// `seed` varies the random bytes and the repeated byte.
pub fn write_mixed_raw(path: &Path, size: u64, chunk: u64, seed: u64) -> Result<Image> {
    ensure!(chunk >= 16 && chunk % 8 == 0, "chunk {chunk} too small");
    let mut rng = XorShift(seed | 1);
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let chunk_len = usize::try_from(chunk)?;
    let mut buf = vec![0u8; chunk_len];
    let mut offset = 0u64;
    let mut index = 0u64;
    while offset < size {
        match index % MIXED_KINDS {
            0 => buf.fill(0x40 | ((seed ^ index).to_le_bytes()[0] & 0x3f)),
            1 => buf.fill(0),
            2 => rng.fill(&mut buf),
            3 => {
                for (i, word) in buf.chunks_mut(8).enumerate() {
                    word.copy_from_slice(&(offset + 8 * i as u64).to_le_bytes());
                }
            }
            _ => {
                let (random, zero) = buf.split_at_mut(chunk_len / 2);
                rng.fill(random);
                zero.fill(0);
            }
        }
        let len = usize::try_from(chunk.min(size - offset))?;
        file.write_all(&buf[..len])?;
        offset += len as u64;
        index += 1;
    }
    file.sync_all()?;
    Ok(Image {
        path: path.to_path_buf(),
        format: Format::Raw,
    })
}

/// One extent of `qemu-img map --output=json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// Which layer answers: 0 is the image itself, 1 its backing file, and so on.
    pub depth: u64,
    /// Whether some layer of the chain allocates it (false: reads zero past the chain).
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (self.present, self.data, self.zero, self.compressed) {
            (false, ..) => "unallocated in every layer",
            (true, true, _, true) => "compressed data",
            (true, true, _, false) => "data",
            (true, false, true, _) => "zero",
            (true, false, false, _) => "allocated, neither data nor zero",
        };
        write!(
            f,
            "[{}, {}) {what} at depth {}",
            self.start,
            self.start + self.length,
            self.depth
        )
    }
}

/// `qemu-img map --output=json` of `image` and its backing chain.
pub fn map(image: &Image) -> Result<Vec<Extent>> {
    let out = run(Command::new(QEMU_IMG)
        .args(["map", "--output=json", "-f", image.format.as_str()])
        .arg(&image.path))?;
    let extents: Vec<serde_json::Value> =
        serde_json::from_str(&out).context("parsing qemu-img map --output=json")?;
    extents
        .iter()
        .map(|e| {
            let num = |k: &str| e[k].as_u64().with_context(|| format!("map entry {e}: {k}"));
            let flag = |k: &str| e[k].as_bool().unwrap_or(false);
            Ok(Extent {
                start: num("start")?,
                length: num("length")?,
                depth: num("depth")?,
                present: flag("present"),
                zero: flag("zero"),
                data: flag("data"),
                compressed: flag("compressed"),
            })
        })
        .collect()
}

/// The whole virtual disk of an image as QEMU reads it, kept in a raw file, with QEMU's map
/// of where each byte came from (taken at the same time, while the names in the images still
/// lead to the right files).
pub struct Oracle {
    file: File,
    len: u64,
    source: Image,
    extents: Vec<Extent>,
}

impl Oracle {
    /// `qemu-img convert -O raw image <dir>/<image name>.oracle.raw` and `qemu-img map`: QEMU
    /// reads the whole chain, opening backing files by the names in the images.
    pub fn of(image: &Image, dir: &Path) -> Result<Oracle> {
        let extents = map(image)?;
        let out = dir.join(format!("{}.oracle.raw", image.name()));
        run(Command::new(QEMU_IMG)
            .args(["convert", "-q", "-f", image.format.as_str(), "-O", "raw"])
            .arg(&image.path)
            .arg(&out))?;
        let file = File::open(&out).with_context(|| format!("opening {}", out.display()))?;
        let len = file.metadata()?.len();
        Ok(Oracle {
            file,
            len,
            source: image.clone(),
            extents,
        })
    }

    /// QEMU's map of the image and its chain.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The map extent holding byte `offset`.
    pub fn extent_at(&self, offset: u64) -> Option<&Extent> {
        self.extents
            .iter()
            .find(|e| (e.start..e.start.saturating_add(e.length)).contains(&offset))
    }

    /// The virtual disk size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The image this oracle read.
    pub fn source(&self) -> &Image {
        &self.source
    }

    /// `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .with_context(|| format!("reading {len} oracle bytes at {offset}"))?;
        Ok(buf)
    }

    /// Compares `got`, which the daemon served at `offset`, with QEMU's bytes there, and adds
    /// any difference to `diff`.
    pub fn compare(&self, offset: u64, got: &[u8], diff: &mut Differences) -> Result<()> {
        let want = self.read(offset, got.len())?;
        diff.add(offset, &want, got);
        Ok(())
    }
}

/// Where a daemon's reading differed from QEMU's, accumulated over a whole disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Differences {
    /// The first differing byte's offset, QEMU's bytes from there, the daemon's bytes.
    pub first: Option<(u64, Vec<u8>, Vec<u8>)>,
    /// The last differing byte's offset.
    pub last: u64,
    /// How many bytes differ.
    pub bytes: u64,
}

impl Differences {
    /// Adds the differences between `want` (QEMU) and `got` (daemon), both at `offset`.
    pub fn add(&mut self, offset: u64, want: &[u8], got: &[u8]) {
        if want == got {
            return;
        }
        for (i, (w, g)) in want.iter().zip(got).enumerate() {
            if w == g {
                continue;
            }
            let at = offset + i as u64;
            if self.first.is_none() {
                let end = (i + QUOTE_BYTES).min(want.len());
                self.first = Some((at, want[i..end].to_vec(), got[i..end].to_vec()));
            }
            self.last = at;
            self.bytes += 1;
        }
    }

    /// Whether nothing differed.
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }
}

impl fmt::Display for Differences {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.first {
            None => write!(f, "no difference"),
            Some((at, want, got)) => write!(
                f,
                "first difference at byte {at} (qemu-img: {want:02x?}, daemon: {got:02x?}); \
                 {} bytes differ, the last at byte {}",
                self.bytes, self.last
            ),
        }
    }
}

/// A backing chain built bottom-up in one directory, each new layer on top of the last.
#[derive(Clone, Debug)]
pub struct Chain {
    dir: PathBuf,
    /// Base first, top last.
    layers: Vec<Image>,
}

impl Chain {
    /// A chain whose base is a new sparse raw image `name` of `size` bytes.
    pub fn raw_base(dir: &Path, name: &str, size: u64) -> Result<Chain> {
        let base = create_raw(&dir.join(name), size)?;
        Ok(Self::on(dir, base))
    }

    /// A chain whose base is a new qcow2 image `name`.
    pub fn qcow2_base(dir: &Path, name: &str, size: u64, opts: &Qcow2Options) -> Result<Chain> {
        let base = create_qcow2(&dir.join(name), size, opts, None)?;
        Ok(Self::on(dir, base))
    }

    /// A chain whose base is an existing image.
    pub fn on(dir: &Path, base: Image) -> Chain {
        Chain {
            dir: dir.to_path_buf(),
            layers: vec![base],
        }
    }

    /// Adds a qcow2 overlay `name` of `size` bytes backed by the current top.
    pub fn overlay(&mut self, name: &str, size: u64, opts: &Qcow2Options) -> Result<&mut Self> {
        let top = create_qcow2(&self.dir.join(name), size, opts, Some(self.top()))?;
        self.layers.push(top);
        Ok(self)
    }

    /// Runs `cmds` on the current top.
    pub fn io(&mut self, cmds: &[Io]) -> Result<&mut Self> {
        io(self.top(), cmds)?;
        Ok(self)
    }

    /// The image a daemon serves.
    pub fn top(&self) -> &Image {
        self.layers
            .last()
            .unwrap_or_else(|| unreachable!("a chain has a base"))
    }

    /// The top's backing chain, nearest first, as the daemons take it.
    pub fn backing(&self) -> Vec<Backing> {
        self.layers
            .iter()
            .rev()
            .skip(1)
            .map(Image::as_backing)
            .collect()
    }

    /// Every layer, base first.
    pub fn layers(&self) -> &[Image] {
        &self.layers
    }

    /// Moves layer `index` (0 = base) to `new_name` in the same directory, so the name the
    /// image above records no longer leads to it.
    pub fn rename_layer(&mut self, index: usize, new_name: &str) -> Result<()> {
        let layer = self
            .layers
            .get_mut(index)
            .with_context(|| format!("no layer {index}"))?;
        let to = self.dir.join(new_name);
        std::fs::rename(&layer.path, &to)
            .with_context(|| format!("renaming {} to {}", layer.path.display(), to.display()))?;
        layer.path = to;
        Ok(())
    }

    /// A one-line description, top first: `top.qcow2 <- mid.qcow2 <- base.raw`.
    pub fn describe(&self) -> String {
        self.layers
            .iter()
            .rev()
            .map(Image::name)
            .collect::<Vec<_>>()
            .join(" <- ")
    }
}
