//! The raw format: guest offset N is file offset N.

use crate::layer::check_range;
use crate::{FileId, Format, ImageFile, Layer, MapError, MapKind, OpenError, Piece, TableLoad};

/// The largest disk vublk serves, in bytes: 2^63 - 1 would overflow sector arithmetic in
/// guests; 2^56 is QEMU's own limit for qcow2 host offsets and far beyond any real disk.
pub const MAX_DISK_SIZE: u64 = 1 << 56;

/// A raw image: one file, offsets passed through.
#[derive(Debug)]
pub struct RawLayer {
    files: [ImageFile; 1],
    size: u64,
}

impl RawLayer {
    /// Opens `file` as raw. The guest sees its size rounded up to 512 bytes: the tail past the
    /// end of the file reads as zeroes (as in QEMU).
    pub fn open(file: ImageFile) -> Result<RawLayer, OpenError> {
        let size = file.size()?;
        if size > MAX_DISK_SIZE {
            return Err(OpenError::TooLarge {
                fd: file.raw_fd(),
                role: file.options().role.clone(),
                size,
                max: MAX_DISK_SIZE,
            });
        }
        let size = size.div_ceil(512) * 512;
        Ok(RawLayer {
            files: [file],
            size,
        })
    }
}

impl Layer for RawLayer {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn files(&self) -> Vec<&ImageFile> {
        self.files.iter().collect()
    }

    fn read_only(&self) -> bool {
        !self.files[0].options().writable
    }

    fn map(
        &self,
        kind: MapKind,
        offset: u64,
        len: u64,
        out: &mut Vec<Piece>,
    ) -> Result<(), MapError> {
        check_range(offset, len, self.size)?;
        match kind {
            MapKind::Read => {}
            MapKind::Write | MapKind::WriteZeroes { .. } | MapKind::Discard => {
                if self.read_only() {
                    return Err(MapError::ReadOnly);
                }
            }
        }
        if len > 0 {
            out.push(Piece::Data {
                file: FileId(0),
                offset,
                len,
            });
        }
        Ok(())
    }

    fn load_table(&self, load: TableLoad, _bytes: &[u8]) -> Result<(), MapError> {
        Err(MapError::Corrupt(format!(
            "raw layer asked to load a table it never requested ({load:?})"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageFileOptions;
    use std::io::Write;

    fn raw_of(bytes: usize, writable: bool) -> RawLayer {
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&vec![7u8; bytes]).unwrap();
        let file = ImageFile::new(
            tmp.into(),
            ImageFileOptions {
                role: "image".into(),
                writable,
                direct: false,
                nonblock: false,
            },
        )
        .unwrap();
        RawLayer::open(file).unwrap()
    }

    #[test]
    fn raw_maps_guest_offset_to_same_file_offset() {
        let layer = raw_of(8192, true);
        let mut out = Vec::new();
        layer.map(MapKind::Read, 4096, 1024, &mut out).unwrap();
        assert_eq!(
            out,
            vec![Piece::Data {
                file: FileId(0),
                offset: 4096,
                len: 1024
            }]
        );
    }

    #[test]
    fn raw_size_rounds_up_to_a_sector() {
        assert_eq!(raw_of(1000, true).virtual_size(), 1024);
    }

    #[test]
    fn raw_refuses_ranges_past_the_end_and_overflowing() {
        let layer = raw_of(4096, true);
        let mut out = Vec::new();
        assert!(matches!(
            layer.map(MapKind::Read, 4096, 512, &mut out),
            Err(MapError::OutOfRange { .. })
        ));
        assert!(matches!(
            layer.map(MapKind::Read, u64::MAX - 10, 512, &mut out),
            Err(MapError::OutOfRange { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn raw_read_only_refuses_writes_but_reads() {
        let layer = raw_of(4096, false);
        let mut out = Vec::new();
        assert_eq!(
            layer.map(MapKind::Write, 0, 512, &mut out),
            Err(MapError::ReadOnly)
        );
        assert_eq!(
            layer.map(MapKind::Discard, 0, 512, &mut out),
            Err(MapError::ReadOnly)
        );
        assert!(layer.map(MapKind::Read, 0, 512, &mut out).is_ok());
    }
}
