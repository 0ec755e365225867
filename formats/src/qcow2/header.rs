//! The qcow2 header: cluster 0's fixed fields, extensions and backing file name, parsed once
//! from bytes into a validated [`Qcow2Header`], and written back.
//!
//! Owns: every check on a header field (ranges, alignment, table sizes and placement against
//! `limits.rs`, feature-bit consistency), the split between a *malformed* header (a
//! [`HeaderError`]: nothing can be reported) and a well-formed one using a feature vublk does
//! not serve ([`Unsupported`]: a probe reports it, opening refuses it), and the exact
//! serialization used to rewrite the header. It does no I/O: it reads a `&[u8]` holding the
//! file's first bytes (at most [`HEADER_READ_LIMIT`]). It does not read the tables the header
//! points to, nor open the backing file it names (only the manager's fds are ever opened).

use std::fmt;

use super::extensions::{
    ExtensionContext, ExtensionMagic, FeatureName, FeatureType, HeaderExtension, EXT_END,
};
use super::limits::{
    HEADER_READ_LIMIT, MAX_BACKING_FILE_NAME_LEN, MAX_HEADER_EXTENSIONS, MAX_HOST_OFFSET,
    MAX_L1_TABLE_BYTES, MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS, MAX_VIRTUAL_SIZE,
    SNAPSHOT_ENTRY_MIN_BYTES, V2_REFCOUNT_ORDER,
};
use super::types::{ClusterGeometry, GeometryError, HostOffset, RefcountGeometry};

/// qcow2.rst: "QCOW magic string ("QFI\xfb")".
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// "For version 2, the header is exactly 72 bytes in length".
pub const V2_HEADER_LEN: u32 = 72;
/// "For version 3 or higher, the header length is at least 104 bytes".
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Byte offset of the `compression_type` additional field.
pub const COMPRESSION_TYPE_OFFSET: u32 = 104;
/// Byte offset of `incompatible_features`, for rewriting just that field.
pub const INCOMPATIBLE_FEATURES_OFFSET: u64 = 72;

/// incompatible_features bits (qcow2.rst, bytes 72-79).
pub mod incompatible {
    /// "Bit 0: Dirty bit. If this bit is set then refcounts may be inconsistent".
    pub const DIRTY: u64 = 1 << 0;
    /// "Bit 1: Corrupt bit. ... the image must not be written to".
    pub const CORRUPT: u64 = 1 << 1;
    /// "Bit 2: External data file bit".
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// "Bit 3: Compression type bit".
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// "Bit 4: Extended L2 Entries".
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit the spec defines; "An implementation must fail to open an image if an unknown
    /// bit is set."
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// compatible_features bits (qcow2.rst, bytes 80-87).
pub mod compatible {
    /// "Bit 0: Lazy refcounts bit".
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// autoclear_features bits (qcow2.rst, bytes 88-95).
pub mod autoclear {
    /// "Bit 0: Bitmaps extension bit".
    pub const BITMAPS: u64 = 1 << 0;
    /// "Bit 1: Raw external data bit".
    pub const RAW_EXTERNAL_DATA: u64 = 1 << 1;
}

/// The header version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Version 2, QEMU's "compat=0.10".
    V2,
    /// Version 3, QEMU's "compat=1.1".
    V3,
}

impl Version {
    pub fn number(self) -> u32 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }

    /// QEMU's name for it (`qemu-img info`'s "compat").
    pub fn compat(self) -> &'static str {
        match self {
            Version::V2 => "0.10",
            Version::V3 => "1.1",
        }
    }
}

/// crypt_method: "0 for no encryption, 1 for AES encryption, 2 for LUKS encryption".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptMethod {
    None,
    Aes,
    Luks,
}

impl CryptMethod {
    pub fn number(self) -> u32 {
        match self {
            CryptMethod::None => 0,
            CryptMethod::Aes => 1,
            CryptMethod::Luks => 2,
        }
    }

    /// QEMU's name for it (`qemu-img info`'s "encrypt"."format").
    pub fn name(self) -> &'static str {
        match self {
            CryptMethod::None => "none",
            CryptMethod::Aes => "aes",
            CryptMethod::Luks => "luks",
        }
    }
}

impl fmt::Display for CryptMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (crypt_method {})", self.name(), self.number())
    }
}

/// compression_type: "0: deflate ... 1: zstd"; other values are an unsupported feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate, which QEMU calls "zlib".
    Zlib,
    Zstd,
    Other(u8),
}

impl CompressionType {
    pub fn from_byte(b: u8) -> CompressionType {
        match b {
            0 => CompressionType::Zlib,
            1 => CompressionType::Zstd,
            n => CompressionType::Other(n),
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
            CompressionType::Other(n) => n,
        }
    }
}

/// A table the header locates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    ActiveL1,
    Refcount,
    Snapshot,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::ActiveL1 => "active L1 table",
            Table::Refcount => "refcount table",
            Table::Snapshot => "snapshot table",
        })
    }
}

/// A well-formed header using a feature vublk does not serve: reported by a probe, refused by
/// [`Qcow2Header::check_supported`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// "An implementation must fail to open an image if an unknown bit is set." `names` uses
    /// the image's feature name table where it names a bit, else the bit number.
    #[error("unknown incompatible feature(s): {names}")]
    UnknownIncompatible { bits: u64, names: String },
    #[error(
        "external data file (incompatible bit 2{}): guest data would live in another file",
        .name.as_deref().map(|n| format!(", named \"{n}\"")).unwrap_or_default()
    )]
    ExternalDataFile { name: Option<String> },
    #[error("extended L2 entries / subclusters (incompatible bit 4)")]
    ExtendedL2,
    #[error("compression type {compression_type} (defined: 0 = zlib, 1 = zstd)")]
    CompressionType { compression_type: u8 },
    #[error("encryption: {method}")]
    Encryption { method: CryptMethod },
}

/// Why bytes are not a well-formed qcow2 header (or, from
/// [`Qcow2Header::parse_supported`], one that vublk serves).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a qcow2 image: magic {found:02x?} is not \"QFI\\xfb\"")]
    BadMagic { found: [u8; 4] },
    #[error("{what} ends at byte {end} but the image has only {available} bytes")]
    Truncated {
        what: &'static str,
        end: u64,
        available: u64,
    },
    #[error("{what} ends at byte {end}, past the first {limit} bytes that vublk reads")]
    BeyondReadLimit {
        what: &'static str,
        end: u64,
        limit: u64,
    },
    #[error("qcow2 version {version} is unsupported (2 and 3 are)")]
    UnsupportedVersion { version: u32 },
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error("header_length {header_length} is shorter than {min} bytes")]
    HeaderLengthTooShort { header_length: u32, min: u32 },
    #[error("header_length {header_length} is not a multiple of 8")]
    HeaderLengthUnaligned { header_length: u32 },
    #[error("header_length {header_length} exceeds the cluster size {cluster_size}")]
    HeaderLengthPastCluster {
        header_length: u32,
        cluster_size: u64,
    },
    #[error("compression_type is zlib (0) but incompatible bit 3 (compression type) is set")]
    CompressionBitWithZlib,
    #[error("compression_type {compression_type} is set without incompatible bit 3")]
    CompressionTypeWithoutBit { compression_type: u8 },
    #[error("crypt_method {crypt_method} is not a known encryption method (0, 1, 2)")]
    UnknownCryptMethod { crypt_method: u32 },
    #[error("virtual size {size} exceeds the largest supported disk ({max} bytes)")]
    VirtualSizeTooLarge { size: u64, max: u64 },
    #[error("refcount_table_clusters is 0: the image has no refcount table")]
    NoRefcountTable,
    #[error("{table}: {bytes} bytes exceeds the limit of {max}")]
    TableTooLarge { table: Table, bytes: u64, max: u64 },
    #[error("{table}: offset {offset:#x} is not aligned to the cluster size {cluster_size}")]
    TableMisaligned {
        table: Table,
        offset: u64,
        cluster_size: u64,
    },
    #[error("{table}: offset 0 overlaps the header")]
    TableOverlapsHeader { table: Table },
    #[error("{table}: {bytes} bytes at {offset:#x} reach past host offset {limit:#x}")]
    TableBeyondLimit {
        table: Table,
        offset: u64,
        bytes: u64,
        limit: u64,
    },
    #[error("nb_snapshots {nb_snapshots} exceeds the limit of {max}")]
    TooManySnapshots { nb_snapshots: u32, max: u32 },
    #[error("l1_size {l1_size} is too small for virtual size {size} (needs {needed} entries)")]
    L1TooSmall {
        l1_size: u32,
        needed: u64,
        size: u64,
    },
    #[error("backing_file_offset {offset:#x} is past the end of cluster 0 ({cluster_size})")]
    BackingFileOffsetPastCluster { offset: u64, cluster_size: u64 },
    #[error("backing_file_offset {offset:#x} is inside the header ({header_length} bytes)")]
    BackingFileOffsetInHeader { offset: u64, header_length: u32 },
    #[error("backing_file_size {len} exceeds {max} bytes")]
    BackingFileNameTooLong { len: u32, max: u64 },
    #[error("backing file name ({len} bytes at {offset:#x}) runs past cluster 0 ({cluster_size})")]
    BackingFileNamePastCluster {
        offset: u64,
        len: u32,
        cluster_size: u64,
    },
    #[error("more than {max} header extensions")]
    TooManyExtensions { max: usize },
    #[error("{magic} at byte {offset}: {len} bytes run past the extension area end {end}")]
    ExtensionTooLarge {
        magic: ExtensionMagic,
        offset: u64,
        len: u32,
        end: u64,
    },
    #[error("the extension area ends at byte {end}, inside an extension header at {offset}")]
    ExtensionHeaderTruncated { offset: u64, end: u64 },
    #[error("{magic} appears more than once")]
    DuplicateExtension { magic: ExtensionMagic },
    #[error("{magic}: length {len}, expected {expected}")]
    ExtensionLength {
        magic: ExtensionMagic,
        len: u32,
        expected: u32,
    },
    #[error("backing file format name of {len} bytes exceeds {max}")]
    BackingFormatTooLong { len: u32, max: u32 },
    #[error("feature name table length {len} is not a multiple of {entry_len}")]
    FeatureNameTableLength { len: u32, entry_len: usize },
    #[error("bitmaps extension: reserved field is {value:#x}, not 0")]
    BitmapsReserved { value: u32 },
    #[error("bitmaps extension: nb_bitmaps {nb_bitmaps} is not in 1..={max}")]
    BitmapCount { nb_bitmaps: u32, max: u32 },
    #[error("bitmaps extension: directory offset {offset} is not aligned to {cluster_size}")]
    BitmapDirectoryMisaligned {
        offset: HostOffset,
        cluster_size: u64,
    },
    #[error("bitmaps extension: directory size {size} exceeds {max} bytes")]
    BitmapDirectoryTooLarge { size: u64, max: u64 },
    #[error("bitmaps extension: directory of {size} bytes at {offset} reaches past {limit:#x}")]
    BitmapDirectoryBeyondLimit {
        offset: HostOffset,
        size: u64,
        limit: u64,
    },
    #[error("full disk encryption extension with crypt_method {crypt_method}: only LUKS has one")]
    EncryptionExtensionWithoutLuks { crypt_method: CryptMethod },
    #[error("LUKS encryption without its full disk encryption header extension")]
    MissingEncryptionHeader,
    #[error("encryption header offset {offset} is not aligned to {cluster_size}")]
    EncryptionHeaderMisaligned {
        offset: HostOffset,
        cluster_size: u64,
    },
    #[error("encryption header of {length} bytes at {offset} reaches past {limit:#x}")]
    EncryptionHeaderBeyondLimit {
        offset: HostOffset,
        length: u64,
        limit: u64,
    },
    #[error("autoclear bit 1 (raw external data) is set without incompatible bit 2 (data file)")]
    RawExternalDataWithoutDataFile,
    #[error("version 2 images have no feature bits")]
    NoFeatureBitsInV2,
    #[error("the header would take {len} bytes, more than {max}")]
    SerializedTooLarge { len: u64, max: u64 },
    #[error("unsupported qcow2 feature")]
    Unsupported(#[from] Unsupported),
}

/// 8 bytes to write at a header offset, for a field update that must not rewrite the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderPatch {
    pub offset: HostOffset,
    pub bytes: [u8; 8],
}

/// A validated qcow2 header. Built only by [`Qcow2Header::parse`]; every field is within the
/// limits of `limits.rs`, every table offset is cluster-aligned and below 2^56.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Header {
    version: Version,
    size: u64,
    geometry: ClusterGeometry,
    refcount: RefcountGeometry,
    crypt_method: CryptMethod,
    l1_size: u32,
    l1_table_offset: HostOffset,
    refcount_table_offset: HostOffset,
    refcount_table_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: HostOffset,
    incompatible_features: u64,
    compatible_features: u64,
    autoclear_features: u64,
    header_length: u32,
    compression_type: CompressionType,
    /// Bytes 105..header_length (v3 with header_length > 104): padding and additional fields
    /// vublk does not know, preserved ("other than preserving its value when rewriting").
    additional_fields: Vec<u8>,
    extensions: Vec<HeaderExtension>,
    /// `None` when backing_file_offset is 0 (or the name is empty, which QEMU treats alike).
    backing_file: Option<Vec<u8>>,
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// `bytes[start..start + len]`, or why it is not there: past the read limit (a property of
/// the image) or past the bytes given (a short file).
fn window<'a>(
    bytes: &'a [u8],
    start: u64,
    len: u64,
    what: &'static str,
) -> Result<&'a [u8], HeaderError> {
    let end = start.saturating_add(len);
    if end > HEADER_READ_LIMIT as u64 {
        return Err(HeaderError::BeyondReadLimit {
            what,
            end,
            limit: HEADER_READ_LIMIT as u64,
        });
    }
    let available = bytes.len() as u64;
    let range = usize::try_from(start).ok().zip(usize::try_from(end).ok());
    range
        .and_then(|(s, e)| bytes.get(s..e))
        .ok_or(HeaderError::Truncated {
            what,
            end,
            available,
        })
}

/// The checks QEMU's qcow2_validate_table makes, plus vublk's 2^56 bound: a table of
/// `entries` entries of `entry_bytes` bytes at `offset`.
fn validate_table(
    table: Table,
    offset: u64,
    entries: u64,
    entry_bytes: u64,
    max_bytes: u64,
    geometry: &ClusterGeometry,
) -> Result<(), HeaderError> {
    let bytes = entries.saturating_mul(entry_bytes);
    if bytes > max_bytes {
        return Err(HeaderError::TableTooLarge {
            table,
            bytes,
            max: max_bytes,
        });
    }
    // "Offset into the image file at which the ... table starts. Must be aligned to a cluster
    // boundary."
    if !geometry.is_cluster_aligned(offset) {
        return Err(HeaderError::TableMisaligned {
            table,
            offset,
            cluster_size: geometry.cluster_size(),
        });
    }
    // "The first cluster of a qcow2 image contains the file header": no table may be there.
    if entries > 0 && offset == 0 {
        return Err(HeaderError::TableOverlapsHeader { table });
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= MAX_HOST_OFFSET => Ok(()),
        _ => Err(HeaderError::TableBeyondLimit {
            table,
            offset,
            bytes,
            limit: MAX_HOST_OFFSET,
        }),
    }
}

impl Qcow2Header {
    /// Parses and validates the header from `bytes`, the file's first
    /// min([`HEADER_READ_LIMIT`], file size) bytes (anything past the limit is ignored).
    ///
    /// Accepts images using features vublk does not serve (see [`Unsupported`]), so that a
    /// probe can report them; [`Qcow2Header::parse_supported`] is what opening calls. The
    /// checks run in a fixed order and the first failure is returned.
    pub fn parse(bytes: &[u8]) -> Result<Qcow2Header, HeaderError> {
        let bytes = &bytes[..bytes.len().min(HEADER_READ_LIMIT)];
        let magic_bytes = window(bytes, 0, 4, "magic")?;
        let mut found = [0u8; 4];
        found.copy_from_slice(magic_bytes);
        if found != QCOW2_MAGIC {
            return Err(HeaderError::BadMagic { found });
        }
        let fixed = window(bytes, 0, u64::from(V2_HEADER_LEN), "version 2 header")?;
        // "version: Version number (valid values are 2 and 3)".
        let version = match be_u32(fixed, 4) {
            2 => Version::V2,
            3 => Version::V3,
            version => return Err(HeaderError::UnsupportedVersion { version }),
        };
        let backing_file_offset = be_u64(fixed, 8);
        let backing_file_size = be_u32(fixed, 16);
        let cluster_bits = be_u32(fixed, 20);
        let size = be_u64(fixed, 24);
        let crypt_method = be_u32(fixed, 32);
        let l1_size = be_u32(fixed, 36);
        let l1_table_offset = be_u64(fixed, 40);
        let refcount_table_offset = be_u64(fixed, 48);
        let refcount_table_clusters = be_u32(fixed, 56);
        let nb_snapshots = be_u32(fixed, 60);
        let snapshots_offset = be_u64(fixed, 64);

        // cluster_bits: "Must not be less than 9"; QEMU's limit: at most 21.
        let geometry = ClusterGeometry::new(cluster_bits, false)?;
        let cluster_size = geometry.cluster_size();

        let (incompatible_features, compatible_features, autoclear_features);
        let (refcount_order, header_length);
        match version {
            Version::V2 => {
                // "For version 2 images, the order is always assumed to be 4"; "the length is
                // always assumed to be 72 bytes"; v2 has no feature bitmaps.
                incompatible_features = 0;
                compatible_features = 0;
                autoclear_features = 0;
                refcount_order = V2_REFCOUNT_ORDER;
                header_length = V2_HEADER_LEN;
            }
            Version::V3 => {
                let v3 = window(bytes, 0, u64::from(V3_MIN_HEADER_LEN), "version 3 header")?;
                incompatible_features = be_u64(v3, 72);
                compatible_features = be_u64(v3, 80);
                autoclear_features = be_u64(v3, 88);
                refcount_order = be_u32(v3, 96);
                header_length = be_u32(v3, 100);
                // "For version 3 it's at least 104 bytes and must be a multiple of 8."
                if header_length < V3_MIN_HEADER_LEN {
                    return Err(HeaderError::HeaderLengthTooShort {
                        header_length,
                        min: V3_MIN_HEADER_LEN,
                    });
                }
                if header_length % 8 != 0 {
                    return Err(HeaderError::HeaderLengthUnaligned { header_length });
                }
                // "The first cluster of a qcow2 image contains the file header".
                if u64::from(header_length) > cluster_size {
                    return Err(HeaderError::HeaderLengthPastCluster {
                        header_length,
                        cluster_size,
                    });
                }
            }
        }
        let header = window(bytes, 0, u64::from(header_length), "header")?;

        // Extended L2 changes the L2 entry size, so the geometry is redone with it.
        let geometry = ClusterGeometry::new(
            cluster_bits,
            incompatible_features & incompatible::EXTENDED_L2 != 0,
        )?;
        // refcount_order: "This value may not exceed 6".
        let refcount = RefcountGeometry::new(cluster_bits, refcount_order)?;

        // compression_type is present when "header_length is [greater than] the field's
        // offset"; "If the incompatible bit "Compression type" is set: the field must be
        // present and non-zero ... Otherwise, this field must not be present or must be zero".
        let (compression_type, additional_fields) = if header_length > COMPRESSION_TYPE_OFFSET {
            let at = COMPRESSION_TYPE_OFFSET as usize;
            let byte = header.get(at).copied().unwrap_or(0);
            let rest = header.get(at + 1..).unwrap_or_default().to_vec();
            (CompressionType::from_byte(byte), rest)
        } else {
            (CompressionType::Zlib, Vec::new())
        };
        let compression_bit = incompatible_features & incompatible::COMPRESSION_TYPE != 0;
        match (compression_type, compression_bit) {
            (CompressionType::Zlib, true) => return Err(HeaderError::CompressionBitWithZlib),
            (CompressionType::Zstd | CompressionType::Other(_), false) => {
                return Err(HeaderError::CompressionTypeWithoutBit {
                    compression_type: compression_type.byte(),
                })
            }
            _ => {}
        }

        // crypt_method: "0 for no encryption, 1 for AES encryption, 2 for LUKS encryption".
        let crypt_method = match crypt_method {
            0 => CryptMethod::None,
            1 => CryptMethod::Aes,
            2 => CryptMethod::Luks,
            crypt_method => return Err(HeaderError::UnknownCryptMethod { crypt_method }),
        };

        if size > MAX_VIRTUAL_SIZE {
            return Err(HeaderError::VirtualSizeTooLarge {
                size,
                max: MAX_VIRTUAL_SIZE,
            });
        }

        // refcount_table_clusters: "Number of clusters that the refcount table occupies"; QEMU:
        // "Image does not contain a reference count table" when 0.
        if refcount_table_clusters == 0 {
            return Err(HeaderError::NoRefcountTable);
        }
        validate_table(
            Table::Refcount,
            refcount_table_offset,
            u64::from(refcount_table_clusters),
            cluster_size,
            MAX_REFCOUNT_TABLE_BYTES,
            &geometry,
        )?;

        // The snapshot table is never loaded; only its count and placement are checked.
        if nb_snapshots > MAX_SNAPSHOTS {
            return Err(HeaderError::TooManySnapshots {
                nb_snapshots,
                max: MAX_SNAPSHOTS,
            });
        }
        validate_table(
            Table::Snapshot,
            snapshots_offset,
            u64::from(nb_snapshots),
            SNAPSHOT_ENTRY_MIN_BYTES,
            u64::from(MAX_SNAPSHOTS) * SNAPSHOT_ENTRY_MIN_BYTES,
            &geometry,
        )?;

        validate_table(
            Table::ActiveL1,
            l1_table_offset,
            u64::from(l1_size),
            8,
            MAX_L1_TABLE_BYTES,
            &geometry,
        )?;
        // QEMU: "the L1 table must contain at least enough entries to put header.size bytes".
        let needed = geometry.l1_entries_for(size);
        if u64::from(l1_size) < needed {
            return Err(HeaderError::L1TooSmall {
                l1_size,
                needed,
                size,
            });
        }

        // backing_file_offset: QEMU refuses an offset past cluster 0; the name is "stored in the
        // remaining space between the end of the header extension area and the end of the
        // first cluster", so it cannot start inside the header either.
        if backing_file_offset > cluster_size {
            return Err(HeaderError::BackingFileOffsetPastCluster {
                offset: backing_file_offset,
                cluster_size,
            });
        }
        if backing_file_offset != 0 && backing_file_offset < u64::from(header_length) {
            return Err(HeaderError::BackingFileOffsetInHeader {
                offset: backing_file_offset,
                header_length,
            });
        }
        let extension_end = if backing_file_offset != 0 {
            backing_file_offset
        } else {
            cluster_size
        };
        let ctx = ExtensionContext {
            geometry,
            crypt_method,
            bitmaps_consistent: autoclear_features & autoclear::BITMAPS != 0,
        };
        let extensions = parse_extensions(bytes, u64::from(header_length), extension_end, &ctx)?;

        // "The full disk encryption header must be present if, and only if, the crypt_method
        // header requires metadata. Currently this is only true of the LUKS crypt method."
        if crypt_method == CryptMethod::Luks
            && !extensions
                .iter()
                .any(|e| matches!(e, HeaderExtension::FullDiskEncryption(_)))
        {
            return Err(HeaderError::MissingEncryptionHeader);
        }
        // Raw external data bit: "This bit may only be set if the External Data File bit ... is
        // also set." (QEMU: "data-file-raw requires a data file".)
        if autoclear_features & autoclear::RAW_EXTERNAL_DATA != 0
            && incompatible_features & incompatible::EXTERNAL_DATA_FILE == 0
        {
            return Err(HeaderError::RawExternalDataWithoutDataFile);
        }

        // backing_file_size: "Must not be longer than 1023 bytes"; QEMU also keeps it inside
        // cluster 0.
        let backing_file = if backing_file_offset != 0 && backing_file_size != 0 {
            if u64::from(backing_file_size) > MAX_BACKING_FILE_NAME_LEN {
                return Err(HeaderError::BackingFileNameTooLong {
                    len: backing_file_size,
                    max: MAX_BACKING_FILE_NAME_LEN,
                });
            }
            if backing_file_offset + u64::from(backing_file_size) > cluster_size {
                return Err(HeaderError::BackingFileNamePastCluster {
                    offset: backing_file_offset,
                    len: backing_file_size,
                    cluster_size,
                });
            }
            let name = window(
                bytes,
                backing_file_offset,
                u64::from(backing_file_size),
                "backing file name",
            )?;
            Some(name.to_vec())
        } else {
            None
        };

        Ok(Qcow2Header {
            version,
            size,
            geometry,
            refcount,
            crypt_method,
            l1_size,
            l1_table_offset: HostOffset(l1_table_offset),
            refcount_table_offset: HostOffset(refcount_table_offset),
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset: HostOffset(snapshots_offset),
            incompatible_features,
            compatible_features,
            autoclear_features,
            header_length,
            compression_type,
            additional_fields,
            extensions,
            backing_file,
        })
    }

    /// [`Qcow2Header::parse`], then [`Qcow2Header::check_supported`]: what opening an image
    /// calls.
    pub fn parse_supported(bytes: &[u8]) -> Result<Qcow2Header, HeaderError> {
        let header = Qcow2Header::parse(bytes)?;
        header.check_supported()?;
        Ok(header)
    }

    /// Every feature of this image that vublk does not serve, in a fixed order: unknown
    /// incompatible bits, external data file, extended L2, compression type, encryption.
    pub fn unsupported_features(&self) -> Vec<Unsupported> {
        let mut out = Vec::new();
        let unknown = self.incompatible_features & !incompatible::KNOWN;
        if unknown != 0 {
            out.push(Unsupported::UnknownIncompatible {
                bits: unknown,
                names: self.name_incompatible_bits(unknown),
            });
        }
        if self.has_external_data_file() {
            out.push(Unsupported::ExternalDataFile {
                name: self.external_data_file_name(),
            });
        }
        if self.has_extended_l2() {
            out.push(Unsupported::ExtendedL2);
        }
        if let CompressionType::Other(compression_type) = self.compression_type {
            out.push(Unsupported::CompressionType { compression_type });
        }
        if self.crypt_method != CryptMethod::None {
            out.push(Unsupported::Encryption {
                method: self.crypt_method,
            });
        }
        out
    }

    /// Refuses the first of [`Qcow2Header::unsupported_features`].
    pub fn check_supported(&self) -> Result<(), Unsupported> {
        match self.unsupported_features().into_iter().next() {
            Some(u) => Err(u),
            None => Ok(()),
        }
    }

    /// "name (bit N)" from the feature name table, or "bit N", for each set bit of `bits`.
    fn name_incompatible_bits(&self, bits: u64) -> String {
        let mut names = Vec::new();
        for bit in 0..64u8 {
            if bits & (1 << bit) == 0 {
                continue;
            }
            let entry = self.feature_names().iter().find(|e| {
                e.kind() == Some(FeatureType::Incompatible) && e.bit == bit && e.name[0] != 0
            });
            names.push(match entry {
                Some(e) => format!("\"{}\" (bit {bit})", e.display_name()),
                None => format!("bit {bit}"),
            });
        }
        names.join(", ")
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The header's size field in bytes. The guest sees it rounded down to 512 bytes, as QEMU
    /// does (`bs->total_sectors = header.size / BDRV_SECTOR_SIZE`).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn geometry(&self) -> ClusterGeometry {
        self.geometry
    }

    pub fn refcount_geometry(&self) -> RefcountGeometry {
        self.refcount
    }

    pub fn cluster_size(&self) -> u64 {
        self.geometry.cluster_size()
    }

    pub fn crypt_method(&self) -> CryptMethod {
        self.crypt_method
    }

    pub fn l1_size(&self) -> u32 {
        self.l1_size
    }

    pub fn l1_table_offset(&self) -> HostOffset {
        self.l1_table_offset
    }

    /// Bytes of the active L1 table (at most [`MAX_L1_TABLE_BYTES`]).
    pub fn l1_table_bytes(&self) -> u64 {
        u64::from(self.l1_size) * 8
    }

    pub fn refcount_table_offset(&self) -> HostOffset {
        self.refcount_table_offset
    }

    pub fn refcount_table_clusters(&self) -> u32 {
        self.refcount_table_clusters
    }

    /// Bytes of the refcount table (at most [`MAX_REFCOUNT_TABLE_BYTES`]).
    pub fn refcount_table_bytes(&self) -> u64 {
        u64::from(self.refcount_table_clusters) * self.geometry.cluster_size()
    }

    pub fn nb_snapshots(&self) -> u32 {
        self.nb_snapshots
    }

    pub fn snapshots_offset(&self) -> HostOffset {
        self.snapshots_offset
    }

    pub fn incompatible_features(&self) -> u64 {
        self.incompatible_features
    }

    pub fn compatible_features(&self) -> u64 {
        self.compatible_features
    }

    pub fn autoclear_features(&self) -> u64 {
        self.autoclear_features
    }

    pub fn refcount_order(&self) -> u32 {
        self.refcount.refcount_order()
    }

    pub fn refcount_bits(&self) -> u32 {
        self.refcount.refcount_bits()
    }

    pub fn header_length(&self) -> u32 {
        self.header_length
    }

    pub fn compression_type(&self) -> CompressionType {
        self.compression_type
    }

    /// Bytes 105..header_length, kept verbatim.
    pub fn additional_fields(&self) -> &[u8] {
        &self.additional_fields
    }

    /// The header extensions in file order (end marker excluded).
    pub fn extensions(&self) -> &[HeaderExtension] {
        &self.extensions
    }

    /// Incompatible bit 0: refcounts may be inconsistent (a lazy-refcounts writer stopped).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompatible::DIRTY != 0
    }

    /// Incompatible bit 1: "the image must not be written to".
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompatible::CORRUPT != 0
    }

    pub fn has_external_data_file(&self) -> bool {
        self.incompatible_features & incompatible::EXTERNAL_DATA_FILE != 0
    }

    pub fn has_extended_l2(&self) -> bool {
        self.incompatible_features & incompatible::EXTENDED_L2 != 0
    }

    /// Compatible bit 0.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compatible::LAZY_REFCOUNTS != 0
    }

    /// Autoclear bit 0: the bitmaps extension is consistent.
    pub fn bitmaps_consistent(&self) -> bool {
        self.autoclear_features & autoclear::BITMAPS != 0
    }

    /// Autoclear bit 1: the external data file is a consistent raw image.
    pub fn raw_external_data(&self) -> bool {
        self.autoclear_features & autoclear::RAW_EXTERNAL_DATA != 0
    }

    /// The backing file name as written in the image: reported, never opened.
    pub fn backing_file(&self) -> Option<&[u8]> {
        self.backing_file.as_deref()
    }

    /// The backing format name from its extension ("raw", "qcow2"), as stored.
    pub fn backing_format(&self) -> Option<&[u8]> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(f) => Some(f.as_slice()),
            _ => None,
        })
    }

    pub fn feature_names(&self) -> &[FeatureName] {
        self.extensions
            .iter()
            .find_map(|e| match e {
                HeaderExtension::FeatureNameTable(t) => Some(t.as_slice()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// The external data file's name from its extension, printable.
    pub fn external_data_file_name(&self) -> Option<String> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::ExternalDataFile(n) => Some(super::extensions::printable(n)),
            _ => None,
        })
    }

    /// The bitmaps extension, if any (consistent or not: see [`Self::bitmaps_consistent`]).
    pub fn bitmaps(&self) -> Option<&super::extensions::BitmapsExtension> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::Bitmaps(b) => Some(b),
            _ => None,
        })
    }

    fn set_incompatible_bit(&mut self, bit: u64, on: bool) -> Result<(), HeaderError> {
        if self.version == Version::V2 {
            return Err(HeaderError::NoFeatureBitsInV2);
        }
        if on {
            self.incompatible_features |= bit;
        } else {
            self.incompatible_features &= !bit;
        }
        Ok(())
    }

    /// Sets or clears the dirty bit (v3 only: v2 has no feature bits, and lazy refcounts,
    /// the dirty bit's only user, needs v3).
    pub fn set_dirty(&mut self, dirty: bool) -> Result<(), HeaderError> {
        self.set_incompatible_bit(incompatible::DIRTY, dirty)
    }

    /// Sets or clears the corrupt bit (v3 only).
    pub fn set_corrupt(&mut self, corrupt: bool) -> Result<(), HeaderError> {
        self.set_incompatible_bit(incompatible::CORRUPT, corrupt)
    }

    /// Clears every autoclear bit. "An implementation may only write to an image with unknown
    /// auto-clear features if it clears the respective bits from this field first": a writer
    /// that keeps neither bitmaps nor a raw external data file in sync calls this before its
    /// first write. The bitmaps extension itself is kept (now marked inconsistent).
    pub fn clear_autoclear_features(&mut self) {
        self.autoclear_features = 0;
    }

    /// The 8 bytes of incompatible_features at byte 72, to flip the dirty or corrupt bit with a
    /// single small write, as QEMU does. `None` for v2.
    pub fn incompatible_features_patch(&self) -> Option<HeaderPatch> {
        match self.version {
            Version::V2 => None,
            Version::V3 => Some(HeaderPatch {
                offset: HostOffset(INCOMPATIBLE_FEATURES_OFFSET),
                bytes: self.incompatible_features.to_be_bytes(),
            }),
        }
    }

    /// Serializes the header, its extensions (each padded to 8 bytes with zeros, in the order
    /// read), an end marker and the backing file name right after it, as QEMU lays them out.
    /// Unknown feature bits, unknown additional fields and unknown extensions are written back
    /// unchanged. Fails if the result would not fit in cluster 0 and the read limit.
    pub fn to_bytes(&self) -> Result<Vec<u8>, HeaderError> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&QCOW2_MAGIC);
        out.extend_from_slice(&self.version.number().to_be_bytes());
        // backing_file_offset and backing_file_size: patched in below.
        out.extend_from_slice(&0u64.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&self.geometry.cluster_bits().to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.number().to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.0.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.0.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.0.to_be_bytes());
        if self.version == Version::V3 {
            out.extend_from_slice(&self.incompatible_features.to_be_bytes());
            out.extend_from_slice(&self.compatible_features.to_be_bytes());
            out.extend_from_slice(&self.autoclear_features.to_be_bytes());
            out.extend_from_slice(&self.refcount.refcount_order().to_be_bytes());
            out.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > COMPRESSION_TYPE_OFFSET {
                out.push(self.compression_type.byte());
                out.extend_from_slice(&self.additional_fields);
            }
        }
        for ext in &self.extensions {
            let data = ext.encode_data();
            let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&ext.magic().to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        // "0x00000000 - End of the header extension area".
        out.extend_from_slice(&EXT_END.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        if let Some(name) = &self.backing_file {
            let offset = out.len() as u64;
            let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
            out[8..16].copy_from_slice(&offset.to_be_bytes());
            out[16..20].copy_from_slice(&len.to_be_bytes());
            out.extend_from_slice(name);
        }
        let max = self.geometry.cluster_size().min(HEADER_READ_LIMIT as u64);
        let len = out.len() as u64;
        if len > max {
            return Err(HeaderError::SerializedTooLarge { len, max });
        }
        Ok(out)
    }
}

/// Walks the extension area `[start, end)`: "Directly after the image header, optional
/// sections called header extensions can be stored", until an end marker or `end`.
fn parse_extensions(
    bytes: &[u8],
    start: u64,
    end: u64,
    ctx: &ExtensionContext,
) -> Result<Vec<HeaderExtension>, HeaderError> {
    let mut out: Vec<HeaderExtension> = Vec::new();
    let mut offset = start;
    while offset < end {
        // QEMU: "Header extension too large" when even the 8-byte type and length do not fit.
        if end - offset < 8 {
            return Err(HeaderError::ExtensionHeaderTruncated { offset, end });
        }
        let head = window(bytes, offset, 8, "header extension")?;
        let magic = be_u32(head, 0);
        let len = be_u32(head, 4);
        if magic == EXT_END {
            return Ok(out);
        }
        if out.len() >= MAX_HEADER_EXTENSIONS {
            return Err(HeaderError::TooManyExtensions {
                max: MAX_HEADER_EXTENSIONS,
            });
        }
        let data_start = offset + 8;
        if u64::from(len) > end - data_start {
            return Err(HeaderError::ExtensionTooLarge {
                magic: ExtensionMagic(magic),
                offset,
                len,
                end,
            });
        }
        let data = window(bytes, data_start, u64::from(len), "header extension data")?;
        let ext = HeaderExtension::decode(magic, data, ctx)?;
        // "Unless stated otherwise, each header extension type shall appear at most once".
        if ext.is_known() && out.iter().any(|e| e.magic() == magic) {
            return Err(HeaderError::DuplicateExtension {
                magic: ExtensionMagic(magic),
            });
        }
        out.push(ext);
        // "Padding to round up the header extension size to the next multiple of 8."
        offset = data_start + u64::from(len).next_multiple_of(8);
    }
    Ok(out)
}
