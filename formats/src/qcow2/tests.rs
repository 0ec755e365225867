//! Header tests: a valid image is built byte by byte (independently of `Qcow2Header::to_bytes`),
//! one field is corrupted, and the exact error is predicted; the same as property tests over
//! random valid geometries.

use proptest::prelude::*;

use super::extensions::{
    EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_EXTERNAL_DATA_FILE, EXT_FEATURE_NAME_TABLE,
    EXT_FULL_DISK_ENCRYPTION,
};
use super::header::{autoclear, compatible, incompatible};
use super::limits::*;
use super::*;
use crate::qcow2::extensions::ExtensionMagic;

/// The fields of a qcow2 image's cluster 0, written out by [`Img::bytes`].
#[derive(Clone, Debug)]
struct Img {
    version: u32,
    cluster_bits: u32,
    size: u64,
    crypt_method: u32,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: u64,
    incompatible: u64,
    compatible: u64,
    autoclear: u64,
    refcount_order: u32,
    header_length: u32,
    compression_type: u8,
    /// Bytes 105..header_length.
    additional: Vec<u8>,
    extensions: Vec<(u32, Vec<u8>)>,
    end_marker: bool,
    backing: Option<Vec<u8>>,
    /// Overrides the backing file offset (default: right after the end marker).
    backing_offset: Option<u64>,
    /// Overrides backing_file_size (default: the name's length).
    backing_size: Option<u32>,
    /// Bytes returned (default: the lesser of 3 clusters and the read limit).
    file_len: Option<usize>,
}

impl Img {
    /// A v3 image laid out as `qemu-img create -f qcow2` does: refcount table in cluster 1,
    /// L1 table in cluster 3.
    fn v3(cluster_bits: u32) -> Img {
        let cluster = 1u64 << cluster_bits;
        let size = 1 << 20;
        let g = ClusterGeometry::new(cluster_bits, false).unwrap();
        Img {
            version: 3,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: u32::try_from(g.l1_entries_for(size)).unwrap(),
            l1_table_offset: 3 * cluster,
            refcount_table_offset: cluster,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            additional: vec![0; 7],
            extensions: vec![(
                EXT_FEATURE_NAME_TABLE,
                feature_table(&[(0, 0, "dirty bit")]),
            )],
            end_marker: true,
            backing: None,
            backing_offset: None,
            backing_size: None,
            file_len: None,
        }
    }

    fn v2(cluster_bits: u32) -> Img {
        Img {
            version: 2,
            header_length: 72,
            additional: Vec::new(),
            ..Img::v3(cluster_bits)
        }
    }

    fn with_backing(mut self, name: &str, format: &str) -> Img {
        self.extensions
            .insert(0, (EXT_BACKING_FORMAT, format.as_bytes().to_vec()));
        self.backing = Some(name.as_bytes().to_vec());
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"QFI\xfb");
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                b.push(self.compression_type);
                b.extend_from_slice(&self.additional);
            }
            b.resize(self.header_length.max(104) as usize, 0);
        }
        for (magic, data) in &self.extensions {
            b.extend_from_slice(&magic.to_be_bytes());
            b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        if self.end_marker {
            b.extend_from_slice(&[0; 8]);
        }
        if let Some(name) = &self.backing {
            let offset = self.backing_offset.unwrap_or(b.len() as u64);
            let size = self
                .backing_size
                .unwrap_or(u32::try_from(name.len()).unwrap());
            b[8..16].copy_from_slice(&offset.to_be_bytes());
            b[16..20].copy_from_slice(&size.to_be_bytes());
            let at = usize::try_from(offset).unwrap();
            if b.len() < at + name.len() {
                b.resize(at + name.len(), 0);
            }
            b[at..at + name.len()].copy_from_slice(name);
        }
        let len = self
            .file_len
            .unwrap_or(((3usize) << self.cluster_bits).min(HEADER_READ_LIMIT));
        b.resize(len.max(b.len()), 0);
        b.truncate(len);
        b
    }

    fn parse(&self) -> Result<Qcow2Header, HeaderError> {
        Qcow2Header::parse(&self.bytes())
    }

    fn unsupported(&self) -> Unsupported {
        match Qcow2Header::parse_supported(&self.bytes()) {
            Err(HeaderError::Unsupported(u)) => u,
            other => panic!("expected an unsupported feature, got {other:?}"),
        }
    }
}

fn feature_table(entries: &[(u8, u8, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (t, bit, name) in entries {
        out.push(*t);
        out.push(*bit);
        let mut n = [0u8; 46];
        n[..name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&n);
    }
    out
}

fn bitmaps_ext(nb: u32, reserved: u32, dir_size: u64, dir_offset: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&nb.to_be_bytes());
    out.extend_from_slice(&reserved.to_be_bytes());
    out.extend_from_slice(&dir_size.to_be_bytes());
    out.extend_from_slice(&dir_offset.to_be_bytes());
    out
}

fn crypto_ext(offset: u64, len: u64) -> Vec<u8> {
    let mut out = offset.to_be_bytes().to_vec();
    out.extend_from_slice(&len.to_be_bytes());
    out
}

fn roundtrips(img: &Img) {
    let bytes = img.bytes();
    let h = Qcow2Header::parse(&bytes).unwrap();
    let out = h.to_bytes().unwrap();
    assert_eq!(Qcow2Header::parse(&out).unwrap(), h);
}

// ---- valid images ----

#[test]
fn parses_a_v3_header_like_qemu_img_writes() {
    let h = Img::v3(16).with_backing("base.raw", "raw").parse().unwrap();
    assert_eq!(h.version(), Version::V3);
    assert_eq!(h.size(), 1 << 20);
    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.l1_size(), 1);
    assert_eq!(h.l1_table_offset(), HostOffset(3 << 16));
    assert_eq!(h.refcount_table_offset(), HostOffset(1 << 16));
    assert_eq!(h.refcount_bits(), 16);
    assert_eq!(h.compression_type(), CompressionType::Zlib);
    assert_eq!(h.backing_file(), Some(&b"base.raw"[..]));
    assert_eq!(h.backing_format(), Some(&b"raw"[..]));
    assert_eq!(h.feature_names()[0].display_name(), "dirty bit");
    assert!(h.check_supported().is_ok());
}

#[test]
fn parses_a_v2_header_with_v3_fields_assumed() {
    let h = Img::v2(16).with_backing("b", "qcow2").parse().unwrap();
    assert_eq!(h.version(), Version::V2);
    assert_eq!(h.header_length(), 72);
    assert_eq!(h.refcount_order(), 4);
    assert_eq!(h.incompatible_features(), 0);
    assert_eq!(h.backing_file(), Some(&b"b"[..]));
}

#[test]
fn a_zero_sized_image_may_have_no_l1_table() {
    let img = Img {
        size: 0,
        l1_size: 0,
        l1_table_offset: 0,
        ..Img::v3(16)
    };
    assert_eq!(img.parse().unwrap().l1_size(), 0);
}

#[test]
fn dirty_corrupt_and_lazy_refcounts_are_reported_not_refused() {
    let img = Img {
        incompatible: incompatible::DIRTY | incompatible::CORRUPT,
        compatible: compatible::LAZY_REFCOUNTS | (1 << 40),
        autoclear: 1 << 33,
        ..Img::v3(16)
    };
    let h = Qcow2Header::parse_supported(&img.bytes()).unwrap();
    assert!(h.is_dirty());
    assert!(h.is_corrupt());
    assert!(h.lazy_refcounts());
    assert_eq!(h.compatible_features(), 1 | (1 << 40));
    assert_eq!(h.autoclear_features(), 1 << 33);
}

#[test]
fn zstd_with_its_incompatible_bit_is_supported() {
    let img = Img {
        incompatible: incompatible::COMPRESSION_TYPE,
        compression_type: 1,
        ..Img::v3(16)
    };
    let h = Qcow2Header::parse_supported(&img.bytes()).unwrap();
    assert_eq!(h.compression_type(), CompressionType::Zstd);
}

#[test]
fn header_length_104_has_no_compression_type_field() {
    let img = Img {
        header_length: 104,
        ..Img::v3(16)
    };
    let h = img.parse().unwrap();
    assert_eq!(h.compression_type(), CompressionType::Zlib);
    assert!(h.additional_fields().is_empty());
    roundtrips(&img);
}

#[test]
fn extensions_may_fill_the_area_up_to_the_backing_name_without_an_end_marker() {
    let mut img = Img::v3(16).with_backing("base", "raw");
    img.end_marker = false;
    let h = img.parse().unwrap();
    assert_eq!(h.backing_file(), Some(&b"base"[..]));
    assert_eq!(h.extensions().len(), 2);
}

#[test]
fn an_empty_backing_name_means_no_backing_file() {
    let mut img = Img::v3(16).with_backing("x", "raw");
    img.backing_size = Some(0);
    assert_eq!(img.parse().unwrap().backing_file(), None);
}

#[test]
fn bitmaps_extension_is_validated_only_when_consistent() {
    let mut img = Img::v3(16);
    img.extensions.push((EXT_BITMAPS, bitmaps_ext(0, 7, 0, 5)));
    // Autoclear bit 0 clear: "must be considered inconsistent", kept verbatim.
    assert!(img.parse().is_ok());
    roundtrips(&img);
    img.autoclear = autoclear::BITMAPS;
    assert_eq!(img.parse(), Err(HeaderError::BitmapsReserved { value: 7 }));
}

#[test]
fn bitmaps_extension_checks_when_consistent() {
    let with = |data: Vec<u8>| {
        let mut img = Img::v3(16);
        img.autoclear = autoclear::BITMAPS;
        img.extensions.push((EXT_BITMAPS, data));
        img.parse()
    };
    assert!(with(bitmaps_ext(1, 0, 64, 4 << 16)).is_ok());
    assert_eq!(
        with(bitmaps_ext(0, 0, 64, 4 << 16)),
        Err(HeaderError::BitmapCount {
            nb_bitmaps: 0,
            max: MAX_BITMAPS
        })
    );
    assert_eq!(
        with(bitmaps_ext(65536, 0, 64, 4 << 16)),
        Err(HeaderError::BitmapCount {
            nb_bitmaps: 65536,
            max: MAX_BITMAPS
        })
    );
    assert_eq!(
        with(bitmaps_ext(1, 0, 64, 4096)),
        Err(HeaderError::BitmapDirectoryMisaligned {
            offset: HostOffset(4096),
            cluster_size: 65536
        })
    );
    assert_eq!(
        with(bitmaps_ext(1, 0, MAX_BITMAP_DIRECTORY_BYTES + 1, 4 << 16)),
        Err(HeaderError::BitmapDirectoryTooLarge {
            size: MAX_BITMAP_DIRECTORY_BYTES + 1,
            max: MAX_BITMAP_DIRECTORY_BYTES
        })
    );
    assert_eq!(
        with(bitmaps_ext(1, 0, 64, MAX_HOST_OFFSET)),
        Err(HeaderError::BitmapDirectoryBeyondLimit {
            offset: HostOffset(MAX_HOST_OFFSET),
            size: 64,
            limit: MAX_HOST_OFFSET
        })
    );
    assert_eq!(
        with(vec![0; 16]),
        Err(HeaderError::ExtensionLength {
            magic: ExtensionMagic(EXT_BITMAPS),
            len: 16,
            expected: 24
        })
    );
}

// ---- refusals: unsupported features (probe reports, open refuses) ----

#[test]
fn encryption_is_refused_naming_the_method() {
    let aes = Img {
        crypt_method: 1,
        ..Img::v3(16)
    };
    assert!(aes.parse().is_ok());
    assert_eq!(
        aes.unsupported(),
        Unsupported::Encryption {
            method: CryptMethod::Aes
        }
    );
    let mut luks = Img {
        crypt_method: 2,
        ..Img::v3(16)
    };
    luks.extensions
        .push((EXT_FULL_DISK_ENCRYPTION, crypto_ext(5 << 16, 4096)));
    assert_eq!(
        luks.unsupported(),
        Unsupported::Encryption {
            method: CryptMethod::Luks
        }
    );
    assert!(luks
        .unsupported()
        .to_string()
        .contains("luks (crypt_method 2)"));
}

#[test]
fn external_data_file_is_refused_naming_the_file() {
    let mut img = Img {
        incompatible: incompatible::EXTERNAL_DATA_FILE,
        autoclear: autoclear::RAW_EXTERNAL_DATA,
        ..Img::v3(16)
    };
    img.extensions
        .push((EXT_EXTERNAL_DATA_FILE, b"data.raw".to_vec()));
    let h = img.parse().unwrap();
    assert!(h.raw_external_data());
    assert_eq!(
        img.unsupported(),
        Unsupported::ExternalDataFile {
            name: Some("data.raw".into())
        }
    );
}

#[test]
fn extended_l2_is_refused() {
    let img = Img {
        incompatible: incompatible::EXTENDED_L2,
        ..Img::v3(16)
    };
    assert_eq!(img.parse().unwrap().geometry().l2_entries(), 4096);
    assert_eq!(img.unsupported(), Unsupported::ExtendedL2);
}

#[test]
fn unknown_compression_type_is_refused() {
    let img = Img {
        incompatible: incompatible::COMPRESSION_TYPE,
        compression_type: 9,
        ..Img::v3(16)
    };
    assert_eq!(
        img.unsupported(),
        Unsupported::CompressionType {
            compression_type: 9
        }
    );
}

#[test]
fn unknown_incompatible_bits_are_named_from_the_feature_table() {
    let mut img = Img {
        incompatible: (1 << 5) | (1 << 63),
        ..Img::v3(16)
    };
    img.extensions[0] = (
        EXT_FEATURE_NAME_TABLE,
        feature_table(&[
            (0, 0, "dirty bit"),
            (1, 5, "not this"),
            (0, 5, "time travel"),
        ]),
    );
    assert_eq!(
        img.unsupported(),
        Unsupported::UnknownIncompatible {
            bits: (1 << 5) | (1 << 63),
            names: "\"time travel\" (bit 5), bit 63".into()
        }
    );
}

#[test]
fn feature_names_are_made_printable() {
    let mut img = Img {
        incompatible: 1 << 7,
        ..Img::v3(16)
    };
    img.extensions[0] = (
        EXT_FEATURE_NAME_TABLE,
        feature_table(&[(0, 7, "a\x1b[2Jb")]),
    );
    assert_eq!(
        img.unsupported(),
        Unsupported::UnknownIncompatible {
            bits: 1 << 7,
            names: "\"a\u{fffd}[2Jb\" (bit 7)".into()
        }
    );
}

#[test]
fn all_unsupported_features_are_listed_in_order() {
    let img = Img {
        incompatible: incompatible::EXTENDED_L2 | (1 << 9),
        crypt_method: 1,
        ..Img::v3(16)
    };
    let h = img.parse().unwrap();
    assert_eq!(
        h.unsupported_features(),
        vec![
            Unsupported::UnknownIncompatible {
                bits: 1 << 9,
                names: "bit 9".into()
            },
            Unsupported::ExtendedL2,
            Unsupported::Encryption {
                method: CryptMethod::Aes
            },
        ]
    );
}

// ---- refusals: malformed headers ----

#[test]
fn bad_magic() {
    let mut b = Img::v3(16).bytes();
    b[3] = 0xfc;
    assert_eq!(
        Qcow2Header::parse(&b),
        Err(HeaderError::BadMagic { found: *b"QFI\xfc" })
    );
}

#[test]
fn unsupported_versions() {
    for version in [0, 1, 4, u32::MAX] {
        let img = Img {
            version,
            ..Img::v3(16)
        };
        assert_eq!(
            img.parse(),
            Err(HeaderError::UnsupportedVersion { version })
        );
    }
}

#[test]
fn cluster_bits_outside_9_to_21() {
    for cluster_bits in [0u32, 8, 22, 63] {
        let mut bytes = Img::v3(16).bytes();
        bytes[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        assert_eq!(
            Qcow2Header::parse(&bytes),
            Err(HeaderError::Geometry(GeometryError::ClusterBits {
                cluster_bits,
                min: 9,
                max: 21
            }))
        );
    }
}

#[test]
fn truncated_headers() {
    let b = Img::v3(16).bytes();
    assert_eq!(
        Qcow2Header::parse(&b[..50]),
        Err(HeaderError::Truncated {
            what: "version 2 header",
            end: 72,
            available: 50
        })
    );
    assert_eq!(
        Qcow2Header::parse(&b[..80]),
        Err(HeaderError::Truncated {
            what: "version 3 header",
            end: 104,
            available: 80
        })
    );
    assert_eq!(
        Qcow2Header::parse(&b[..108]),
        Err(HeaderError::Truncated {
            what: "header",
            end: 112,
            available: 108
        })
    );
    assert_eq!(
        Qcow2Header::parse(&b[..120]),
        Err(HeaderError::Truncated {
            what: "header extension data",
            end: 120 + 48,
            available: 120
        })
    );
}

#[test]
fn header_length_checks() {
    let short = Img {
        header_length: 96,
        ..Img::v3(16)
    };
    assert_eq!(
        short.parse(),
        Err(HeaderError::HeaderLengthTooShort {
            header_length: 96,
            min: 104
        })
    );
    let unaligned = Img {
        header_length: 108,
        ..Img::v3(16)
    };
    assert_eq!(
        unaligned.parse(),
        Err(HeaderError::HeaderLengthUnaligned { header_length: 108 })
    );
    let mut long = Img::v3(9);
    long.header_length = 520;
    long.additional = vec![0; 520 - 105];
    assert_eq!(
        long.parse(),
        Err(HeaderError::HeaderLengthPastCluster {
            header_length: 520,
            cluster_size: 512
        })
    );
}

#[test]
fn unknown_additional_header_fields_are_preserved() {
    let mut img = Img {
        header_length: 128,
        ..Img::v3(16)
    };
    img.additional = (0..23).collect();
    let h = img.parse().unwrap();
    assert_eq!(h.additional_fields(), &img.additional[..]);
    assert_eq!(
        h.to_bytes().unwrap(),
        img.bytes()[..h.to_bytes().unwrap().len()]
    );
}

#[test]
fn compression_type_and_its_bit_must_agree() {
    let bit_with_zlib = Img {
        incompatible: incompatible::COMPRESSION_TYPE,
        ..Img::v3(16)
    };
    assert_eq!(
        bit_with_zlib.parse(),
        Err(HeaderError::CompressionBitWithZlib)
    );
    let zstd_without_bit = Img {
        compression_type: 1,
        ..Img::v3(16)
    };
    assert_eq!(
        zstd_without_bit.parse(),
        Err(HeaderError::CompressionTypeWithoutBit {
            compression_type: 1
        })
    );
    // With header_length 104 the field is absent: the bit alone is inconsistent.
    let bit_without_field = Img {
        incompatible: incompatible::COMPRESSION_TYPE,
        header_length: 104,
        ..Img::v3(16)
    };
    assert_eq!(
        bit_without_field.parse(),
        Err(HeaderError::CompressionBitWithZlib)
    );
}

#[test]
fn unknown_crypt_method() {
    let img = Img {
        crypt_method: 3,
        ..Img::v3(16)
    };
    assert_eq!(
        img.parse(),
        Err(HeaderError::UnknownCryptMethod { crypt_method: 3 })
    );
}

#[test]
fn luks_needs_its_extension_and_only_luks_has_one() {
    let luks = Img {
        crypt_method: 2,
        ..Img::v3(16)
    };
    assert_eq!(luks.parse(), Err(HeaderError::MissingEncryptionHeader));
    let mut plain = Img::v3(16);
    plain
        .extensions
        .push((EXT_FULL_DISK_ENCRYPTION, crypto_ext(5 << 16, 4096)));
    assert_eq!(
        plain.parse(),
        Err(HeaderError::EncryptionExtensionWithoutLuks {
            crypt_method: CryptMethod::None
        })
    );
    let mut misaligned = Img {
        crypt_method: 2,
        ..Img::v3(16)
    };
    misaligned
        .extensions
        .push((EXT_FULL_DISK_ENCRYPTION, crypto_ext(4096, 4096)));
    assert_eq!(
        misaligned.parse(),
        Err(HeaderError::EncryptionHeaderMisaligned {
            offset: HostOffset(4096),
            cluster_size: 65536
        })
    );
    let mut short = Img {
        crypt_method: 2,
        ..Img::v3(16)
    };
    short
        .extensions
        .push((EXT_FULL_DISK_ENCRYPTION, vec![0; 8]));
    assert_eq!(
        short.parse(),
        Err(HeaderError::ExtensionLength {
            magic: ExtensionMagic(EXT_FULL_DISK_ENCRYPTION),
            len: 8,
            expected: 16
        })
    );
}

#[test]
fn raw_external_data_bit_needs_a_data_file() {
    let img = Img {
        autoclear: autoclear::RAW_EXTERNAL_DATA,
        ..Img::v3(16)
    };
    assert_eq!(
        img.parse(),
        Err(HeaderError::RawExternalDataWithoutDataFile)
    );
}

#[test]
fn virtual_size_cap() {
    let img = Img {
        size: MAX_VIRTUAL_SIZE + 1,
        ..Img::v3(16)
    };
    assert_eq!(
        img.parse(),
        Err(HeaderError::VirtualSizeTooLarge {
            size: MAX_VIRTUAL_SIZE + 1,
            max: MAX_VIRTUAL_SIZE
        })
    );
}

#[test]
fn refcount_order_above_6() {
    let img = Img {
        refcount_order: 7,
        ..Img::v3(16)
    };
    assert_eq!(
        img.parse(),
        Err(HeaderError::Geometry(GeometryError::RefcountOrder {
            refcount_order: 7,
            max: 6
        }))
    );
}

#[test]
fn extended_l2_needs_16k_clusters() {
    let img = Img {
        incompatible: incompatible::EXTENDED_L2,
        ..Img::v3(13)
    };
    assert_eq!(
        img.parse(),
        Err(HeaderError::Geometry(
            GeometryError::ExtendedL2ClusterBits {
                cluster_bits: 13,
                min: 14
            }
        ))
    );
}

#[test]
fn refcount_table_checks() {
    let none = Img {
        refcount_table_clusters: 0,
        ..Img::v3(16)
    };
    assert_eq!(none.parse(), Err(HeaderError::NoRefcountTable));
    let big = Img {
        refcount_table_clusters: 129,
        ..Img::v3(16)
    };
    assert_eq!(
        big.parse(),
        Err(HeaderError::TableTooLarge {
            table: Table::Refcount,
            bytes: 129 << 16,
            max: MAX_REFCOUNT_TABLE_BYTES
        })
    );
    let misaligned = Img {
        refcount_table_offset: 0x10200,
        ..Img::v3(16)
    };
    assert_eq!(
        misaligned.parse(),
        Err(HeaderError::TableMisaligned {
            table: Table::Refcount,
            offset: 0x10200,
            cluster_size: 65536
        })
    );
    let at_zero = Img {
        refcount_table_offset: 0,
        ..Img::v3(16)
    };
    assert_eq!(
        at_zero.parse(),
        Err(HeaderError::TableOverlapsHeader {
            table: Table::Refcount
        })
    );
    let far = Img {
        refcount_table_offset: MAX_HOST_OFFSET,
        ..Img::v3(16)
    };
    assert_eq!(
        far.parse(),
        Err(HeaderError::TableBeyondLimit {
            table: Table::Refcount,
            offset: MAX_HOST_OFFSET,
            bytes: 65536,
            limit: MAX_HOST_OFFSET
        })
    );
}

#[test]
fn snapshot_table_checks_count_and_offset_only() {
    let many = Img {
        nb_snapshots: MAX_SNAPSHOTS + 1,
        snapshots_offset: 5 << 16,
        ..Img::v3(16)
    };
    assert_eq!(
        many.parse(),
        Err(HeaderError::TooManySnapshots {
            nb_snapshots: MAX_SNAPSHOTS + 1,
            max: MAX_SNAPSHOTS
        })
    );
    let at_zero = Img {
        nb_snapshots: 1,
        ..Img::v3(16)
    };
    assert_eq!(
        at_zero.parse(),
        Err(HeaderError::TableOverlapsHeader {
            table: Table::Snapshot
        })
    );
    let misaligned = Img {
        snapshots_offset: 12,
        ..Img::v3(16)
    };
    assert_eq!(
        misaligned.parse(),
        Err(HeaderError::TableMisaligned {
            table: Table::Snapshot,
            offset: 12,
            cluster_size: 65536
        })
    );
    let ok = Img {
        nb_snapshots: MAX_SNAPSHOTS,
        snapshots_offset: 5 << 16,
        ..Img::v3(16)
    };
    assert_eq!(ok.parse().unwrap().nb_snapshots(), MAX_SNAPSHOTS);
}

#[test]
fn l1_table_checks() {
    let big = Img {
        l1_size: u32::try_from(MAX_L1_TABLE_BYTES / 8 + 1).unwrap(),
        ..Img::v3(16)
    };
    assert_eq!(
        big.parse(),
        Err(HeaderError::TableTooLarge {
            table: Table::ActiveL1,
            bytes: MAX_L1_TABLE_BYTES + 8,
            max: MAX_L1_TABLE_BYTES
        })
    );
    let small = Img {
        size: (512 << 20) + 1,
        l1_size: 1,
        ..Img::v3(16)
    };
    assert_eq!(
        small.parse(),
        Err(HeaderError::L1TooSmall {
            l1_size: 1,
            needed: 2,
            size: (512 << 20) + 1
        })
    );
    let at_zero = Img {
        l1_table_offset: 0,
        ..Img::v3(16)
    };
    assert_eq!(
        at_zero.parse(),
        Err(HeaderError::TableOverlapsHeader {
            table: Table::ActiveL1
        })
    );
}

#[test]
fn l1_limit_caps_virtual_size_of_512_byte_clusters_at_128_gib() {
    let max_entries = u32::try_from(MAX_L1_TABLE_BYTES / 8).unwrap();
    let ok = Img {
        size: 128 << 30,
        l1_size: max_entries,
        ..Img::v3(9)
    };
    assert!(ok.parse().is_ok());
    let too_big = Img {
        size: (128 << 30) + 512,
        l1_size: max_entries,
        ..Img::v3(9)
    };
    assert_eq!(
        too_big.parse(),
        Err(HeaderError::L1TooSmall {
            l1_size: max_entries,
            needed: u64::from(max_entries) + 1,
            size: (128 << 30) + 512
        })
    );
}

#[test]
fn backing_file_checks() {
    let mut past = Img::v3(16).with_backing("b", "raw");
    past.backing_offset = Some(65537);
    assert_eq!(
        past.parse(),
        Err(HeaderError::BackingFileOffsetPastCluster {
            offset: 65537,
            cluster_size: 65536
        })
    );
    let mut inside = Img::v3(16).with_backing("b", "raw");
    inside.backing_offset = Some(50);
    assert_eq!(
        inside.parse(),
        Err(HeaderError::BackingFileOffsetInHeader {
            offset: 50,
            header_length: 112
        })
    );
    let long = Img::v3(16).with_backing(&"x".repeat(1024), "raw");
    assert_eq!(
        long.parse(),
        Err(HeaderError::BackingFileNameTooLong {
            len: 1024,
            max: 1023
        })
    );
    let mut over_edge = Img::v3(9).with_backing("abcdef", "raw");
    over_edge.backing_offset = Some(508);
    assert_eq!(
        over_edge.parse(),
        Err(HeaderError::BackingFileNamePastCluster {
            offset: 508,
            len: 6,
            cluster_size: 512
        })
    );
    let ok = Img::v3(16).with_backing(&"x".repeat(1023), "raw");
    assert_eq!(
        ok.parse().unwrap().backing_file().map(<[u8]>::len),
        Some(1023)
    );
}

#[test]
fn backing_name_past_the_read_limit_is_refused() {
    let mut img = Img::v3(21).with_backing("far", "raw");
    img.backing_offset = Some(HEADER_READ_LIMIT as u64 - 1);
    img.file_len = Some(HEADER_READ_LIMIT + 64);
    assert_eq!(
        img.parse(),
        Err(HeaderError::BeyondReadLimit {
            what: "backing file name",
            end: HEADER_READ_LIMIT as u64 + 2,
            limit: HEADER_READ_LIMIT as u64
        })
    );
}

#[test]
fn extension_area_without_end_marker_past_the_read_limit_is_refused() {
    // 2 MiB clusters: the area may run to the end of cluster 0, but vublk reads 64 KiB.
    let mut img = Img::v3(21);
    img.end_marker = false;
    img.file_len = Some(HEADER_READ_LIMIT);
    // Fill the area with unknown extensions of 8 bytes of data (16 bytes each).
    let per = 16;
    let room = HEADER_READ_LIMIT - 112 - 56;
    img.extensions
        .extend((0..room / per).map(|_| (0x1234_5678, vec![1; 8])));
    let err = img.parse().unwrap_err();
    assert_eq!(
        err,
        HeaderError::TooManyExtensions {
            max: MAX_HEADER_EXTENSIONS
        }
    );
    img.extensions.truncate(1);
    img.extensions
        .push((0x1234_5678, vec![1; HEADER_READ_LIMIT - 112 - 56 - 8]));
    assert_eq!(
        img.parse(),
        Err(HeaderError::BeyondReadLimit {
            what: "header extension",
            end: HEADER_READ_LIMIT as u64 + 8,
            limit: HEADER_READ_LIMIT as u64
        })
    );
}

#[test]
fn extension_too_large_for_the_area() {
    let mut img = Img::v3(9);
    img.extensions.push((0x1234_5678, vec![0; 400]));
    assert_eq!(
        img.parse(),
        Err(HeaderError::ExtensionTooLarge {
            magic: ExtensionMagic(0x1234_5678),
            offset: 112 + 56,
            len: 400,
            end: 512
        })
    );
}

#[test]
fn extension_header_cut_by_the_backing_name() {
    let mut img = Img::v3(16).with_backing("b", "raw");
    // The area ends 4 bytes into where the next extension header would be.
    img.backing_offset = Some(112 + 16 + 56 + 4);
    img.end_marker = false;
    img.extensions.push((0x1234_5678, vec![]));
    assert_eq!(
        img.parse(),
        Err(HeaderError::ExtensionHeaderTruncated {
            offset: 112 + 16 + 56,
            end: 112 + 16 + 56 + 4
        })
    );
}

#[test]
fn known_extensions_appear_once_unknown_ones_may_repeat() {
    let mut dup = Img::v3(16).with_backing("b", "raw");
    dup.extensions.push((EXT_BACKING_FORMAT, b"qcow2".to_vec()));
    assert_eq!(
        dup.parse(),
        Err(HeaderError::DuplicateExtension {
            magic: ExtensionMagic(EXT_BACKING_FORMAT)
        })
    );
    let mut unknown = Img::v3(16);
    unknown.extensions.push((0xabcd_0001, b"one".to_vec()));
    unknown.extensions.push((0xabcd_0001, b"two".to_vec()));
    assert_eq!(unknown.parse().unwrap().extensions().len(), 3);
}

#[test]
fn backing_format_and_feature_table_lengths() {
    let long = Img::v3(16).with_backing("b", "0123456789abcdef");
    assert_eq!(
        long.parse(),
        Err(HeaderError::BackingFormatTooLong { len: 16, max: 15 })
    );
    let mut odd = Img::v3(16);
    odd.extensions[0].1.pop();
    assert_eq!(
        odd.parse(),
        Err(HeaderError::FeatureNameTableLength {
            len: 47,
            entry_len: 48
        })
    );
}

// ---- serialization ----

#[test]
fn to_bytes_reproduces_the_builder_layout_with_unknown_things_preserved() {
    let mut img = Img {
        compatible: compatible::LAZY_REFCOUNTS | (1 << 17),
        autoclear: 1 << 50,
        ..Img::v3(16).with_backing("base.qcow2", "qcow2")
    };
    img.extensions.push((0xdead_beef, b"future stuff".to_vec()));
    img.extensions.push((EXT_BITMAPS, bitmaps_ext(3, 1, 2, 3)));
    let bytes = img.bytes();
    let h = Qcow2Header::parse(&bytes).unwrap();
    let out = h.to_bytes().unwrap();
    assert_eq!(out, bytes[..out.len()]);
    assert!(bytes[out.len()..].iter().all(|&b| b == 0));
    assert_eq!(Qcow2Header::parse(&out).unwrap(), h);
}

#[test]
fn dirty_bit_round_trips_and_patches_byte_72() {
    let mut h = Img::v3(16).parse().unwrap();
    h.set_dirty(true).unwrap();
    let patch = h.incompatible_features_patch().unwrap();
    assert_eq!(patch.offset, HostOffset(72));
    assert_eq!(patch.bytes, 1u64.to_be_bytes());
    let again = Qcow2Header::parse(&h.to_bytes().unwrap()).unwrap();
    assert!(again.is_dirty());
    h.set_dirty(false).unwrap();
    h.set_corrupt(true).unwrap();
    assert_eq!(h.incompatible_features(), incompatible::CORRUPT);
}

#[test]
fn v2_has_no_feature_bits_to_set() {
    let mut h = Img::v2(16).parse().unwrap();
    assert_eq!(h.set_dirty(true), Err(HeaderError::NoFeatureBitsInV2));
    assert_eq!(h.incompatible_features_patch(), None);
}

#[test]
fn clear_autoclear_features_before_writing() {
    let mut h = Img {
        autoclear: autoclear::BITMAPS | (1 << 20),
        ..Img::v3(16)
    }
    .bytes();
    h.truncate(1 << 16);
    let mut h = Qcow2Header::parse(&h).unwrap();
    h.clear_autoclear_features();
    assert_eq!(
        Qcow2Header::parse(&h.to_bytes().unwrap())
            .unwrap()
            .autoclear_features(),
        0
    );
}

#[test]
fn to_bytes_refuses_what_no_longer_fits_cluster_0() {
    // 512-byte cluster whose extensions end exactly at the backing name: the end marker that
    // to_bytes adds no longer leaves room.
    let mut img = Img::v3(9);
    img.extensions = vec![(0x1234_5678, vec![0; 512 - 112 - 8 - 8])];
    img.end_marker = false;
    img.backing = Some(b"x".to_vec());
    img.backing_offset = Some(504);
    let h = img.parse().unwrap();
    assert_eq!(
        h.to_bytes(),
        Err(HeaderError::SerializedTooLarge { len: 513, max: 512 })
    );
}

// ---- properties over random valid geometries ----

fn arb_img() -> impl Strategy<Value = Img> {
    (
        9u32..=21,
        prop::bool::ANY,
        0u32..=6,
        any::<u64>(),
        0u32..4,
        prop::option::of("[a-z./]{1,64}"),
        prop::bool::ANY,
        prop::bool::ANY,
        any::<u64>(),
    )
        .prop_map(
            |(cluster_bits, v3, refcount_order, size_seed, l1_extra, backing, zstd, lazy, bits)| {
                let g = ClusterGeometry::new(cluster_bits, false).unwrap();
                let max_entries = MAX_L1_TABLE_BYTES / 8 - 3;
                let max_size = (max_entries * g.bytes_per_l2_table()).min(MAX_VIRTUAL_SIZE);
                let size = size_seed % (max_size + 1);
                let needed = g.l1_entries_for(size);
                let mut img = if v3 {
                    Img::v3(cluster_bits)
                } else {
                    Img::v2(cluster_bits)
                };
                img.size = size;
                img.l1_size = u32::try_from(needed).unwrap() + l1_extra;
                if v3 {
                    img.refcount_order = refcount_order;
                    img.compatible =
                        if lazy { compatible::LAZY_REFCOUNTS } else { 0 } | (bits << 1);
                    img.autoclear = (bits >> 2) & !3;
                    img.incompatible = bits & incompatible::DIRTY;
                    if zstd {
                        img.compression_type = 1;
                        img.incompatible |= incompatible::COMPRESSION_TYPE;
                    }
                }
                if let Some(name) = backing {
                    img = img.with_backing(&name, "qcow2");
                }
                img
            },
        )
}

/// One field corrupted, with the error it must produce.
#[derive(Clone, Debug)]
enum Corruption {
    Magic(u8),
    Version(u32),
    ClusterBits(u32),
    HeaderLength(u32),
    RefcountOrder(u32),
    CryptMethod(u32),
    Size(u64),
    RefcountTableOffset(u64),
    L1TableOffset(u64),
    L1Shrunk,
    NbSnapshots(u32),
    BackingSize(u32),
}

fn arb_corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        (0u8..=255)
            .prop_filter("not f", |b| *b != 0xfb)
            .prop_map(Corruption::Magic),
        prop_oneof![0u32..2, 4u32..=u32::MAX].prop_map(Corruption::Version),
        prop_oneof![0u32..9, 22u32..=u32::MAX].prop_map(Corruption::ClusterBits),
        (0u32..13).prop_map(|x| Corruption::HeaderLength(x * 8)),
        (7u32..=u32::MAX).prop_map(Corruption::RefcountOrder),
        (3u32..=u32::MAX).prop_map(Corruption::CryptMethod),
        (MAX_VIRTUAL_SIZE + 1..=u64::MAX).prop_map(Corruption::Size),
        (1u64..512).prop_map(Corruption::RefcountTableOffset),
        (1u64..512).prop_map(Corruption::L1TableOffset),
        Just(Corruption::L1Shrunk),
        (MAX_SNAPSHOTS + 1..=u32::MAX).prop_map(Corruption::NbSnapshots),
        (1024u32..=u32::MAX).prop_map(Corruption::BackingSize),
    ]
}

/// Applies `c` to `img`; returns the predicted error, or `None` if `c` does not apply.
fn corrupt(img: &mut Img, c: &Corruption) -> Option<(Vec<u8>, HeaderError)> {
    let cluster = 1u64 << img.cluster_bits;
    let v3 = img.version == 3;
    let err = match *c {
        Corruption::Magic(b) => {
            let mut bytes = img.bytes();
            bytes[3] = b;
            return Some((
                bytes,
                HeaderError::BadMagic {
                    found: [b'Q', b'F', b'I', b],
                },
            ));
        }
        Corruption::Version(version) => {
            img.version = version;
            HeaderError::UnsupportedVersion { version }
        }
        Corruption::ClusterBits(cluster_bits) => {
            let bytes = {
                let mut b = img.bytes();
                b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
                b
            };
            return Some((
                bytes,
                HeaderError::Geometry(GeometryError::ClusterBits {
                    cluster_bits,
                    min: 9,
                    max: 21,
                }),
            ));
        }
        Corruption::HeaderLength(header_length) if v3 => {
            let mut b = img.bytes();
            b[100..104].copy_from_slice(&header_length.to_be_bytes());
            return Some((
                b,
                HeaderError::HeaderLengthTooShort {
                    header_length,
                    min: 104,
                },
            ));
        }
        Corruption::RefcountOrder(refcount_order) if v3 => {
            img.refcount_order = refcount_order;
            HeaderError::Geometry(GeometryError::RefcountOrder {
                refcount_order,
                max: 6,
            })
        }
        Corruption::CryptMethod(crypt_method) => {
            img.crypt_method = crypt_method;
            HeaderError::UnknownCryptMethod { crypt_method }
        }
        Corruption::Size(size) => {
            img.size = size;
            HeaderError::VirtualSizeTooLarge {
                size,
                max: MAX_VIRTUAL_SIZE,
            }
        }
        Corruption::RefcountTableOffset(delta) => {
            let offset = img.refcount_table_offset + delta % cluster;
            img.refcount_table_offset = offset;
            HeaderError::TableMisaligned {
                table: Table::Refcount,
                offset,
                cluster_size: cluster,
            }
        }
        Corruption::L1TableOffset(delta) => {
            let offset = img.l1_table_offset + delta % cluster;
            img.l1_table_offset = offset;
            HeaderError::TableMisaligned {
                table: Table::ActiveL1,
                offset,
                cluster_size: cluster,
            }
        }
        Corruption::L1Shrunk => {
            let g = ClusterGeometry::new(img.cluster_bits, false).unwrap();
            let needed = g.l1_entries_for(img.size);
            if needed == 0 {
                return None;
            }
            img.l1_size = u32::try_from(needed - 1).unwrap();
            HeaderError::L1TooSmall {
                l1_size: img.l1_size,
                needed,
                size: img.size,
            }
        }
        Corruption::NbSnapshots(nb_snapshots) => {
            img.nb_snapshots = nb_snapshots;
            img.snapshots_offset = 5 * cluster;
            HeaderError::TooManySnapshots {
                nb_snapshots,
                max: MAX_SNAPSHOTS,
            }
        }
        Corruption::BackingSize(len) if img.backing.is_some() => {
            img.backing_size = Some(len);
            HeaderError::BackingFileNameTooLong {
                len,
                max: MAX_BACKING_FILE_NAME_LEN,
            }
        }
        _ => return None,
    };
    Some((img.bytes(), err))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn valid_images_parse_and_round_trip_byte_for_byte(img in arb_img()) {
        let bytes = img.bytes();
        let h = Qcow2Header::parse(&bytes).unwrap();
        prop_assert_eq!(h.size(), img.size);
        prop_assert_eq!(h.geometry().cluster_bits(), img.cluster_bits);
        prop_assert_eq!(h.l1_size(), img.l1_size);
        prop_assert_eq!(h.backing_file(), img.backing.as_deref());
        let out = h.to_bytes().unwrap();
        prop_assert_eq!(&out[..], &bytes[..out.len()]);
        prop_assert_eq!(Qcow2Header::parse(&out).unwrap(), h);
    }

    #[test]
    fn one_corrupted_field_gives_the_predicted_error(
        mut img in arb_img(),
        c in arb_corruption(),
    ) {
        if let Some((bytes, expected)) = corrupt(&mut img, &c) {
            prop_assert_eq!(Qcow2Header::parse(&bytes), Err(expected));
        }
    }

    #[test]
    fn unknown_incompatible_bits_parse_but_are_refused(
        img in arb_img(),
        bit in 5u32..64,
    ) {
        // Feature bits need v3: a v2 image is upgraded (its v3 fields are the v2 defaults).
        let img = Img {
            version: 3,
            header_length: 112,
            additional: vec![0; 7],
            incompatible: img.incompatible | (1 << bit),
            ..img
        };
        let bits = 1u64 << bit;
        prop_assert!(img.parse().is_ok());
        prop_assert_eq!(
            img.unsupported(),
            Unsupported::UnknownIncompatible { bits, names: format!("bit {bit}") }
        );
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut with_magic = b"QFI\xfb\0\0\0\x03".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = Qcow2Header::parse(&bytes);
        let _ = Qcow2Header::parse(&with_magic);
    }

    #[test]
    fn parse_never_panics_on_one_random_byte_in_a_valid_header(
        img in arb_img(),
        at in 0usize..1200,
        value in any::<u8>(),
    ) {
        let mut bytes = img.bytes();
        let at = at % bytes.len();
        bytes[at] = value;
        if let Ok(h) = Qcow2Header::parse(&bytes) {
            // Whatever parses serializes and parses back to itself.
            if let Ok(out) = h.to_bytes() {
                prop_assert_eq!(Qcow2Header::parse(&out).unwrap(), h);
            }
        }
    }
}
