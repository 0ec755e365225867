//! Probing: what an image is, from one bounded read of its first bytes, in the spelling of
//! `qemu-img info --output=json`.
//!
//! Owns: format detection (the qcow2 magic, else raw), the [`ProbeInfo`] report and its JSON
//! key names, and [`probe_fd`], the only I/O in the qcow2 module (one fstat, one pread of at
//! most [`HEADER_READ_LIMIT`] bytes; a block device's size comes from BLKGETSIZE64). The split
//! with opening: a probe reports every well-formed image, including ones vublk refuses to serve
//! (encrypted, external data file, extended L2, unknown incompatible bits), and lists why in
//! `x-unsupported`; a malformed header is an error. It does not read tables, snapshots or
//! bitmaps, and never opens the backing file it names.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::stat::{fstat, SFlag};
use serde::Serialize;

use super::extensions::printable;
use super::header::{CompressionType, HeaderError, Qcow2Header, Version, QCOW2_MAGIC};
use super::limits::HEADER_READ_LIMIT;
use crate::Format;

/// The version 1 "QFI\xfb" images are QEMU's older "qcow" format.
const QCOW1_VERSION: u32 = 1;
/// Raw images are sized in 512-byte sectors, rounded up (as QEMU reports them).
const SECTOR_SIZE: u64 = 512;
/// `BLKGETSIZE64` (linux/fs.h): `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// Alignment of the probe buffer, so that an O_DIRECT fd can be read (the largest logical
/// block size in use).
const DIRECT_IO_ALIGN: usize = 4096;

/// What a probe found, serialized with `qemu-img info --output=json`'s key names. Fields that
/// need more than the header (`filename`, `children`, `bitmaps`, the LUKS details) are absent;
/// vublk's additions are prefixed `x-`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ProbeInfo {
    #[serde(serialize_with = "serialize_format")]
    pub format: Format,
    /// Bytes the guest sees: a qcow2 size rounded down to 512 bytes, a raw file's size rounded
    /// up to 512 bytes (both as QEMU does).
    pub virtual_size: u64,
    /// Bytes allocated on the host (st_blocks * 512), when the probe had an fd to ask.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// As written in the image (printable form): reported, never opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Present (true) only for encrypted images, as in qemu-img.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    pub dirty_flag: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
}

/// qemu-img's "format-specific": {"type": ..., "data": {...}}.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum FormatSpecific {
    Qcow2(Qcow2Specific),
}

/// qemu-img's qcow2 "format-specific" data; the v3-only keys are absent for compat 0.10, as in
/// qemu-img.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    pub compat: &'static str,
    pub compression_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<EncryptInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    /// The raw feature bitmaps (0 for version 2).
    #[serde(rename = "x-incompatible-features")]
    pub incompatible_features: u64,
    #[serde(rename = "x-compatible-features")]
    pub compatible_features: u64,
    #[serde(rename = "x-autoclear-features")]
    pub autoclear_features: u64,
    /// The bitmaps extension's count (the directory is not read), when it is consistent.
    #[serde(rename = "x-nb-bitmaps", skip_serializing_if = "Option::is_none")]
    pub nb_bitmaps: Option<u32>,
    #[serde(rename = "x-nb-snapshots")]
    pub nb_snapshots: u32,
    /// Why vublk would refuse to serve this image; empty when it would serve it.
    #[serde(rename = "x-unsupported")]
    pub unsupported: Vec<String>,
}

/// qemu-img's "encrypt": only the format, which the header gives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EncryptInfo {
    pub format: &'static str,
}

fn serialize_format<S: serde::Serializer>(format: &Format, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(format)
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("format qcow2 was asked for but the image does not start with the qcow2 magic")]
    NotQcow2,
    #[error("the image is in the old qcow (version 1) format, which vublk does not read")]
    Qcow1,
    #[error("malformed qcow2 header")]
    Header(#[source] HeaderError),
    #[error("fd {fd}: cannot read its size")]
    Stat {
        fd: i32,
        #[source]
        source: nix::Error,
    },
    #[error("fd {fd}: cannot read its first {len} bytes")]
    Read {
        fd: i32,
        len: usize,
        #[source]
        source: nix::Error,
    },
}

/// Probes an image from `bytes`, its first min([`HEADER_READ_LIMIT`], `file_size`) bytes.
/// Pure: the caller did the read. With `format_hint` the format is not guessed: `Raw` reports
/// a raw disk even over a qcow2 header, `Qcow2` refuses bytes without the magic.
pub fn probe(
    bytes: &[u8],
    file_size: u64,
    format_hint: Option<Format>,
) -> Result<ProbeInfo, ProbeError> {
    let has_magic = bytes.get(..4) == Some(&QCOW2_MAGIC[..]);
    let format = match format_hint {
        Some(f) => f,
        None if has_magic => Format::Qcow2,
        None => Format::Raw,
    };
    match format {
        Format::Raw => Ok(ProbeInfo {
            format: Format::Raw,
            virtual_size: file_size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE,
            actual_size: None,
            cluster_size: None,
            backing_filename: None,
            backing_filename_format: None,
            encrypted: None,
            dirty_flag: false,
            format_specific: None,
        }),
        Format::Qcow2 => {
            if !has_magic {
                return Err(ProbeError::NotQcow2);
            }
            let version = bytes.get(4..8).map(|v| {
                let mut b = [0u8; 4];
                b.copy_from_slice(v);
                u32::from_be_bytes(b)
            });
            if version == Some(QCOW1_VERSION) {
                return Err(ProbeError::Qcow1);
            }
            let header = Qcow2Header::parse(bytes).map_err(ProbeError::Header)?;
            Ok(qcow2_info(&header))
        }
    }
}

/// The report for a parsed qcow2 header.
pub fn qcow2_info(h: &Qcow2Header) -> ProbeInfo {
    let v3 = h.version() == Version::V3;
    let compression_type = match h.compression_type() {
        CompressionType::Zlib => "zlib".to_string(),
        CompressionType::Zstd => "zstd".to_string(),
        CompressionType::Other(n) => format!("x-unknown-{n}"),
    };
    let encrypted = h.crypt_method() != super::header::CryptMethod::None;
    let specific = Qcow2Specific {
        compat: h.version().compat(),
        compression_type,
        lazy_refcounts: v3.then(|| h.lazy_refcounts()),
        refcount_bits: h.refcount_bits(),
        encrypt: encrypted.then(|| EncryptInfo {
            format: h.crypt_method().name(),
        }),
        data_file: h
            .has_external_data_file()
            .then(|| h.external_data_file_name())
            .flatten(),
        data_file_raw: h.has_external_data_file().then(|| h.raw_external_data()),
        corrupt: v3.then(|| h.is_corrupt()),
        extended_l2: v3.then(|| h.has_extended_l2()),
        incompatible_features: h.incompatible_features(),
        compatible_features: h.compatible_features(),
        autoclear_features: h.autoclear_features(),
        nb_bitmaps: h
            .bitmaps()
            .filter(|_| h.bitmaps_consistent())
            .map(|b| b.nb_bitmaps),
        nb_snapshots: h.nb_snapshots(),
        unsupported: h
            .unsupported_features()
            .iter()
            .map(ToString::to_string)
            .collect(),
    };
    ProbeInfo {
        format: Format::Qcow2,
        virtual_size: h.size() / SECTOR_SIZE * SECTOR_SIZE,
        actual_size: None,
        cluster_size: Some(h.cluster_size()),
        backing_filename: h.backing_file().map(printable),
        backing_filename_format: h.backing_file().and(h.backing_format()).map(printable),
        encrypted: encrypted.then_some(true),
        dirty_flag: h.is_dirty(),
        format_specific: Some(FormatSpecific::Qcow2(specific)),
    }
}

/// Probes the image behind `fd`: one fstat (plus BLKGETSIZE64 for a block device) and one
/// pread of min([`HEADER_READ_LIMIT`], size) bytes at offset 0, into a buffer aligned for
/// O_DIRECT. The fd's offset and flags are left alone.
pub fn probe_fd(fd: BorrowedFd<'_>, format_hint: Option<Format>) -> Result<ProbeInfo, ProbeError> {
    let raw_fd = fd.as_raw_fd();
    let stat = fstat(fd).map_err(|source| ProbeError::Stat { fd: raw_fd, source })?;
    let is_block = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFBLK;
    let (size, actual_size) = if is_block {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer, which points to a
        // live, aligned u64 on this stack frame; `fd` is borrowed, so it stays open.
        let ret = unsafe { libc::ioctl(raw_fd, BLKGETSIZE64, &mut size as *mut u64) };
        if ret < 0 {
            return Err(ProbeError::Stat {
                fd: raw_fd,
                source: nix::Error::last(),
            });
        }
        (size, None)
    } else {
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        let blocks = u64::try_from(stat.st_blocks).unwrap_or(0);
        (size, Some(blocks.saturating_mul(512)))
    };
    let want = usize::try_from(size)
        .unwrap_or(usize::MAX)
        .min(HEADER_READ_LIMIT);
    // Read a whole number of aligned blocks into an aligned window of an oversized buffer; the
    // kernel stops at the end of the file.
    let read_len = want.next_multiple_of(DIRECT_IO_ALIGN);
    let mut buf = vec![0u8; read_len + DIRECT_IO_ALIGN];
    let skew = buf
        .as_ptr()
        .align_offset(DIRECT_IO_ALIGN)
        .min(DIRECT_IO_ALIGN);
    let window = &mut buf[skew..skew + read_len];
    let got = if read_len == 0 {
        0
    } else {
        loop {
            match nix::sys::uio::pread(fd, window, 0) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(source) => {
                    return Err(ProbeError::Read {
                        fd: raw_fd,
                        len: read_len,
                        source,
                    })
                }
            }
        }
    };
    let bytes = &window[..got.min(want)];
    let mut info = probe(bytes, size, format_hint)?;
    info.actual_size = actual_size;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_is_the_fallback_and_rounds_up_to_a_sector() {
        let info = probe(&[0u8; 100], 1000, None).unwrap();
        assert_eq!(info.format, Format::Raw);
        assert_eq!(info.virtual_size, 1024);
        assert!(info.format_specific.is_none());
    }

    #[test]
    fn qcow2_hint_without_magic_is_refused() {
        assert!(matches!(
            probe(&[0u8; 100], 100, Some(Format::Qcow2)),
            Err(ProbeError::NotQcow2)
        ));
    }

    #[test]
    fn raw_hint_wins_over_the_magic() {
        let mut bytes = vec![0u8; 512];
        bytes[..4].copy_from_slice(&QCOW2_MAGIC);
        let info = probe(&bytes, 512, Some(Format::Raw)).unwrap();
        assert_eq!(info.format, Format::Raw);
    }

    #[test]
    fn qcow_version_1_is_named() {
        let mut bytes = vec![0u8; 512];
        bytes[..4].copy_from_slice(&QCOW2_MAGIC);
        bytes[7] = 1;
        assert!(matches!(probe(&bytes, 512, None), Err(ProbeError::Qcow1)));
    }

    #[test]
    fn magic_with_a_truncated_header_is_an_error_not_raw() {
        assert!(matches!(
            probe(&QCOW2_MAGIC, 4, None),
            Err(ProbeError::Header(HeaderError::Truncated { .. }))
        ));
    }
}
