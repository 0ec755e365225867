//! qcow2 header extensions: the typed records that follow the fixed header in cluster 0.
//!
//! Owns: the extension magics, the typed form of each known extension (backing file format,
//! feature name table, bitmaps, full disk encryption pointer, external data file name), unknown
//! ones kept verbatim, and their exact encoding (decode then encode gives back the same bytes,
//! so rewriting a header preserves what vublk does not understand). It does not know where the
//! extension area starts or ends, nor the fixed header's fields beyond the few that constrain an
//! extension ([`ExtensionContext`]): `header.rs` walks the area and calls in here.

use std::fmt;

use super::header::{CryptMethod, HeaderError};
use super::limits::MAX_HOST_OFFSET;
use super::limits::{MAX_BACKING_FORMAT_LEN, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES};
use super::types::{ClusterGeometry, HostOffset};

/// qcow2.rst: "0x00000000 - End of the header extension area".
pub const EXT_END: u32 = 0;
/// qcow2.rst: "0xe2792aca - Backing file format name string".
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// qcow2.rst: "0x6803f857 - Feature name table".
pub const EXT_FEATURE_NAME_TABLE: u32 = 0x6803_f857;
/// qcow2.rst: "0x23852875 - Bitmaps extension".
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// qcow2.rst: "0x0537be77 - Full disk encryption header pointer".
pub const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
/// qcow2.rst: "0x44415441 - External data file name string".
pub const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

/// Bytes of one feature name table entry (type, bit, 46-byte name).
pub const FEATURE_NAME_ENTRY_LEN: usize = 48;
/// Bytes of a feature name, "padded with zeros, but not necessarily null terminated".
pub const FEATURE_NAME_LEN: usize = 46;
/// Bytes of the bitmaps extension's data.
pub const BITMAPS_EXTENSION_LEN: u32 = 24;
/// Bytes of the full disk encryption pointer's data.
pub const ENCRYPTION_EXTENSION_LEN: u32 = 16;

/// The feature bitmap a feature name table entry refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureType {
    Incompatible,
    Compatible,
    Autoclear,
}

/// One entry of the feature name table, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// qcow2.rst: "0: Incompatible feature, 1: Compatible feature, 2: Autoclear feature";
    /// other values are kept but name nothing.
    pub feature_type: u8,
    /// "Bit number within the selected feature bitmap (valid values: 0-63)"; others are kept
    /// but name nothing.
    pub bit: u8,
    pub name: [u8; FEATURE_NAME_LEN],
}

impl FeatureName {
    pub fn kind(&self) -> Option<FeatureType> {
        match self.feature_type {
            0 => Some(FeatureType::Incompatible),
            1 => Some(FeatureType::Compatible),
            2 => Some(FeatureType::Autoclear),
            _ => None,
        }
    }

    /// The name up to its first NUL, for messages: invalid UTF-8 and control characters (the
    /// image is hostile and this goes to logs) are replaced.
    pub fn display_name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(FEATURE_NAME_LEN);
        printable(&self.name[..end])
    }
}

/// Bytes from an image as text fit for a log line or JSON: lossy UTF-8 without control
/// characters.
pub fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// The bitmaps extension: where the bitmap directory is (never loaded by vublk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    /// "Reserved, must be zero" (checked only when the extension is consistent, as QEMU does).
    pub reserved: u32,
    pub directory_size: u64,
    pub directory_offset: HostOffset,
}

/// The full disk encryption header pointer (LUKS): where the LUKS header lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptionHeaderPointer {
    pub offset: HostOffset,
    pub length: u64,
}

/// One header extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderExtension {
    /// The backing file's format name ("raw", "qcow2"), not NUL-terminated.
    BackingFormat(Vec<u8>),
    FeatureNameTable(Vec<FeatureName>),
    Bitmaps(BitmapsExtension),
    FullDiskEncryption(EncryptionHeaderPointer),
    /// The external data file's name, not NUL-terminated.
    ExternalDataFile(Vec<u8>),
    /// "other - Unknown header extension, can be safely ignored": kept byte for byte.
    Unknown {
        magic: u32,
        data: Vec<u8>,
    },
}

/// The fixed-header fields that constrain an extension's contents.
#[derive(Clone, Copy, Debug)]
pub struct ExtensionContext {
    pub geometry: ClusterGeometry,
    pub crypt_method: CryptMethod,
    /// Autoclear bit 0 is set: the bitmaps extension is consistent and validated.
    pub bitmaps_consistent: bool,
}

/// Names an extension type in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtensionMagic(pub u32);

impl fmt::Display for ExtensionMagic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            EXT_END => "end of extensions",
            EXT_BACKING_FORMAT => "backing file format",
            EXT_FEATURE_NAME_TABLE => "feature name table",
            EXT_BITMAPS => "bitmaps",
            EXT_FULL_DISK_ENCRYPTION => "full disk encryption header pointer",
            EXT_EXTERNAL_DATA_FILE => "external data file name",
            _ => "unknown",
        };
        write!(f, "{name} extension {:#010x}", self.0)
    }
}

fn be_u32(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = data.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_be_bytes(b)
}

fn be_u64(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = data.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_be_bytes(b)
}

impl HeaderExtension {
    pub fn magic(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => EXT_BACKING_FORMAT,
            HeaderExtension::FeatureNameTable(_) => EXT_FEATURE_NAME_TABLE,
            HeaderExtension::Bitmaps(_) => EXT_BITMAPS,
            HeaderExtension::FullDiskEncryption(_) => EXT_FULL_DISK_ENCRYPTION,
            HeaderExtension::ExternalDataFile(_) => EXT_EXTERNAL_DATA_FILE,
            HeaderExtension::Unknown { magic, .. } => *magic,
        }
    }

    /// Whether this is one of the types the spec defines ("each header extension type shall
    /// appear at most once"); unknown types are not counted.
    pub fn is_known(&self) -> bool {
        !matches!(self, HeaderExtension::Unknown { .. })
    }

    /// Decodes the data of one extension (`data` is exactly its declared length).
    pub fn decode(
        magic: u32,
        data: &[u8],
        ctx: &ExtensionContext,
    ) -> Result<HeaderExtension, HeaderError> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        match magic {
            EXT_BACKING_FORMAT => {
                // QEMU keeps the name in a 16-byte buffer and refuses longer ones.
                if len > MAX_BACKING_FORMAT_LEN {
                    return Err(HeaderError::BackingFormatTooLong {
                        len,
                        max: MAX_BACKING_FORMAT_LEN,
                    });
                }
                Ok(HeaderExtension::BackingFormat(data.to_vec()))
            }
            EXT_FEATURE_NAME_TABLE => {
                // "The number of entries in the feature name table is determined by the length
                // of the header extension data. Each entry looks like this: [48 bytes]".
                if data.len() % FEATURE_NAME_ENTRY_LEN != 0 {
                    return Err(HeaderError::FeatureNameTableLength {
                        len,
                        entry_len: FEATURE_NAME_ENTRY_LEN,
                    });
                }
                let entries = data
                    .chunks_exact(FEATURE_NAME_ENTRY_LEN)
                    .map(|e| {
                        let mut name = [0u8; FEATURE_NAME_LEN];
                        name.copy_from_slice(&e[2..]);
                        FeatureName {
                            feature_type: e[0],
                            bit: e[1],
                            name,
                        }
                    })
                    .collect();
                Ok(HeaderExtension::FeatureNameTable(entries))
            }
            EXT_BITMAPS => {
                if len != BITMAPS_EXTENSION_LEN {
                    return Err(HeaderError::ExtensionLength {
                        magic: ExtensionMagic(magic),
                        len,
                        expected: BITMAPS_EXTENSION_LEN,
                    });
                }
                let ext = BitmapsExtension {
                    nb_bitmaps: be_u32(data, 0),
                    reserved: be_u32(data, 4),
                    directory_size: be_u64(data, 8),
                    directory_offset: HostOffset(be_u64(data, 16)),
                };
                // autoclear bit 0: "If the bitmaps extension is present but this bit is unset,
                // the bitmaps extension data must be considered inconsistent": QEMU then
                // ignores it, and so does vublk (it is kept verbatim).
                if ctx.bitmaps_consistent {
                    validate_bitmaps(&ext, &ctx.geometry)?;
                }
                Ok(HeaderExtension::Bitmaps(ext))
            }
            EXT_FULL_DISK_ENCRYPTION => {
                // "The full disk encryption header must be present if, and only if, the
                // crypt_method header requires metadata. Currently this is only true of the
                // LUKS crypt method."
                if ctx.crypt_method != CryptMethod::Luks {
                    return Err(HeaderError::EncryptionExtensionWithoutLuks {
                        crypt_method: ctx.crypt_method,
                    });
                }
                if len != ENCRYPTION_EXTENSION_LEN {
                    return Err(HeaderError::ExtensionLength {
                        magic: ExtensionMagic(magic),
                        len,
                        expected: ENCRYPTION_EXTENSION_LEN,
                    });
                }
                let ptr = EncryptionHeaderPointer {
                    offset: HostOffset(be_u64(data, 0)),
                    length: be_u64(data, 8),
                };
                // "Offset into the image file at which the encryption header starts in bytes.
                // Must be aligned to a cluster boundary."
                if !ctx.geometry.is_cluster_aligned(ptr.offset.0) {
                    return Err(HeaderError::EncryptionHeaderMisaligned {
                        offset: ptr.offset,
                        cluster_size: ctx.geometry.cluster_size(),
                    });
                }
                match ptr.offset.checked_add(ptr.length) {
                    Some(end) if end.0 <= MAX_HOST_OFFSET => {}
                    _ => {
                        return Err(HeaderError::EncryptionHeaderBeyondLimit {
                            offset: ptr.offset,
                            length: ptr.length,
                            limit: MAX_HOST_OFFSET,
                        })
                    }
                }
                Ok(HeaderExtension::FullDiskEncryption(ptr))
            }
            EXT_EXTERNAL_DATA_FILE => Ok(HeaderExtension::ExternalDataFile(data.to_vec())),
            _ => Ok(HeaderExtension::Unknown {
                magic,
                data: data.to_vec(),
            }),
        }
    }

    /// The extension's data, exactly as [`HeaderExtension::decode`] read it.
    pub fn encode_data(&self) -> Vec<u8> {
        match self {
            HeaderExtension::BackingFormat(s) | HeaderExtension::ExternalDataFile(s) => s.clone(),
            HeaderExtension::FeatureNameTable(entries) => {
                let mut out = Vec::with_capacity(entries.len() * FEATURE_NAME_ENTRY_LEN);
                for e in entries {
                    out.push(e.feature_type);
                    out.push(e.bit);
                    out.extend_from_slice(&e.name);
                }
                out
            }
            HeaderExtension::Bitmaps(b) => {
                let mut out = Vec::with_capacity(BITMAPS_EXTENSION_LEN as usize);
                out.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
                out.extend_from_slice(&b.reserved.to_be_bytes());
                out.extend_from_slice(&b.directory_size.to_be_bytes());
                out.extend_from_slice(&b.directory_offset.0.to_be_bytes());
                out
            }
            HeaderExtension::FullDiskEncryption(p) => {
                let mut out = Vec::with_capacity(ENCRYPTION_EXTENSION_LEN as usize);
                out.extend_from_slice(&p.offset.0.to_be_bytes());
                out.extend_from_slice(&p.length.to_be_bytes());
                out
            }
            HeaderExtension::Unknown { data, .. } => data.clone(),
        }
    }
}

/// The checks QEMU makes on a consistent bitmaps extension.
fn validate_bitmaps(ext: &BitmapsExtension, geometry: &ClusterGeometry) -> Result<(), HeaderError> {
    // "Byte 4 - 7: Reserved, must be zero."
    if ext.reserved != 0 {
        return Err(HeaderError::BitmapsReserved {
            value: ext.reserved,
        });
    }
    // "nb_bitmaps ... Must be greater than or equal to 1. Note: QEMU currently only supports up
    // to 65535 bitmaps per image."
    if ext.nb_bitmaps == 0 || ext.nb_bitmaps > MAX_BITMAPS {
        return Err(HeaderError::BitmapCount {
            nb_bitmaps: ext.nb_bitmaps,
            max: MAX_BITMAPS,
        });
    }
    // "bitmap_directory_offset ... Must be aligned to a cluster boundary."
    if !geometry.is_cluster_aligned(ext.directory_offset.0) {
        return Err(HeaderError::BitmapDirectoryMisaligned {
            offset: ext.directory_offset,
            cluster_size: geometry.cluster_size(),
        });
    }
    if ext.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(HeaderError::BitmapDirectoryTooLarge {
            size: ext.directory_size,
            max: MAX_BITMAP_DIRECTORY_BYTES,
        });
    }
    match ext.directory_offset.checked_add(ext.directory_size) {
        Some(end) if end.0 <= MAX_HOST_OFFSET => Ok(()),
        _ => Err(HeaderError::BitmapDirectoryBeyondLimit {
            offset: ext.directory_offset,
            size: ext.directory_size,
            limit: MAX_HOST_OFFSET,
        }),
    }
}
