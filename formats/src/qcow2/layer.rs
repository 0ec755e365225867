//! The qcow2 layer: maps guest ranges through the L1 and (cached) L2 tables to data in the
//! image file, zeroes, compressed clusters, or the backing layer below.
//!
//! Opening reads the header and the active L1 table with blocking reads (setup, before
//! serving). Mapping never does I/O: an L2 table that is not cached is asked for with
//! `MapError::NeedTable`, which the engine loads through its ring. Writes are not served yet:
//! a qcow2 disk is read-only for now.

use crate::layer::check_range;
use crate::qcow2::cache::{L2Cache, DEFAULT_L2_CACHE_BYTES};
use crate::qcow2::limits::HEADER_READ_LIMIT;
use crate::qcow2::{
    decode_l1_entry, decode_l2_entry, ClusterGeometry, GuestLocation, GuestOffset, HostOffset,
    L1Entry, L2Entry, Qcow2Header,
};
use crate::{FileId, Format, ImageFile, Layer, MapError, MapKind, OpenError, Piece, TableLoad};

/// One qcow2 image over its file, with the layer below it (if any).
#[derive(Debug)]
pub struct Qcow2Layer {
    file: ImageFile,
    header: Qcow2Header,
    geometry: ClusterGeometry,
    /// Raw L1 entries, decoded on use.
    l1: Vec<u64>,
    l2: L2Cache,
    backing: Option<Box<dyn Layer>>,
}

impl Qcow2Layer {
    /// Opens `file` as qcow2 over `backing`. `backing` must be given exactly when the image
    /// names a backing file (the name is reported, never opened), in the format it names.
    pub fn open(file: ImageFile, backing: Option<Box<dyn Layer>>) -> Result<Qcow2Layer, OpenError> {
        let fd = file.raw_fd();
        let role = file.options().role.clone();
        let size = file.size()?;
        let head_len = size.min(HEADER_READ_LIMIT as u64);
        let head = file.read_at(0, head_len)?;
        let header = Qcow2Header::parse_supported(&head).map_err(|source| OpenError::Header {
            fd,
            role: role.clone(),
            source,
        })?;
        if file.options().writable {
            if header.is_corrupt() {
                return Err(OpenError::CorruptWritable { fd, role });
            }
            return Err(OpenError::Qcow2Writes { fd, role });
        }
        match (header.backing_file(), &backing) {
            (Some(name), None) => {
                return Err(OpenError::MissingBacking {
                    fd,
                    role,
                    name: String::from_utf8_lossy(name).into_owned(),
                })
            }
            (None, Some(_)) => return Err(OpenError::UnexpectedBacking { fd, role }),
            (Some(name), Some(layer)) => {
                if let Some(fmt) = header.backing_format() {
                    let image_says = String::from_utf8_lossy(fmt).into_owned();
                    let given = layer.format().to_string();
                    if image_says != given {
                        return Err(OpenError::BackingFormat {
                            fd,
                            role,
                            image_says,
                            given,
                        });
                    }
                }
                log::info!(
                    "fd {fd} ({role}): names its backing file \"{}\"; served from the {} layer the manager passed",
                    String::from_utf8_lossy(name),
                    layer.format()
                );
            }
            (None, None) => {}
        }
        let l1_bytes = file.read_at(header.l1_table_offset().0, header.l1_table_bytes())?;
        let l1 = l1_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let geometry = header.geometry();
        let tables = usize::try_from(DEFAULT_L2_CACHE_BYTES / geometry.cluster_size()).unwrap_or(1);
        Ok(Qcow2Layer {
            file,
            header,
            geometry,
            l1,
            l2: L2Cache::new(tables),
            backing,
        })
    }

    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }

    /// How many files the backing layers hold (their ids start at 1).
    fn backing_files(&self) -> usize {
        self.backing.as_ref().map_or(0, |b| b.files().len())
    }

    /// The L2 entry for `loc`, or `NeedTables` when its table is not cached.
    fn l2_entry(&self, loc: &GuestLocation) -> Result<L2Entry, MapError> {
        let Some(&raw) = usize::try_from(loc.l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
        else {
            // The header check sized L1 for the whole disk; past it nothing is allocated.
            return Ok(L2Entry::Unallocated);
        };
        let corrupt = |e: &dyn std::fmt::Display| {
            MapError::Corrupt(format!("fd {}: {e}", self.file.raw_fd()))
        };
        let l2_offset =
            match decode_l1_entry(raw, loc.l1_index, &self.geometry).map_err(|e| corrupt(&e))? {
                L1Entry::Unallocated => return Ok(L2Entry::Unallocated),
                L1Entry::L2Table { offset, .. } => offset,
            };
        let Some(table) = self.l2.get(l2_offset.0) else {
            return Err(MapError::NeedTables(vec![TableLoad {
                file: FileId(0),
                offset: l2_offset.0,
                len: self.geometry.cluster_size(),
            }]));
        };
        let raw = usize::try_from(loc.l2_index)
            .ok()
            .and_then(|i| table.get(i).copied())
            .ok_or_else(|| corrupt(&"L2 index outside its table"))?;
        decode_l2_entry(
            raw,
            l2_offset,
            loc.l2_index,
            &self.geometry,
            self.header.version(),
        )
        .map_err(|e| corrupt(&e))
    }

    /// Maps `len` unallocated bytes at `offset` to the backing layer, or zeroes past its end.
    fn map_backing(&self, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<(), MapError> {
        let Some(backing) = &self.backing else {
            push(out, Piece::Zero { len });
            return Ok(());
        };
        let covered = backing.virtual_size().saturating_sub(offset).min(len);
        if covered > 0 {
            // The backing layer maps into its own list, in its own FileId space: merging its
            // first piece into `out`'s last (another file with the same id) would be wrong.
            let mut below = Vec::new();
            backing
                .map(MapKind::Read, offset, covered, &mut below)
                .map_err(|e| match e {
                    MapError::NeedTables(loads) => {
                        MapError::NeedTables(loads.into_iter().map(|l| l.shifted(1)).collect())
                    }
                    other => other,
                })?;
            for piece in below {
                push(out, piece.shifted(1));
            }
        }
        if covered < len {
            push(out, Piece::Zero { len: len - covered });
        }
        Ok(())
    }
}

/// Appends `piece`, merging it into the previous one when they continue each other.
fn push(out: &mut Vec<Piece>, piece: Piece) {
    if let Some(last) = out.last_mut() {
        match (last, piece) {
            (Piece::Zero { len }, Piece::Zero { len: more }) => {
                *len += more;
                return;
            }
            (
                Piece::Data { file, offset, len },
                Piece::Data {
                    file: f2,
                    offset: o2,
                    len: more,
                },
            ) if *file == f2 && offset.checked_add(*len) == Some(o2) => {
                *len += more;
                return;
            }
            _ => {}
        }
    }
    out.push(piece);
}

impl Layer for Qcow2Layer {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.header.size()
    }

    fn files(&self) -> Vec<&ImageFile> {
        let mut files = vec![&self.file];
        if let Some(backing) = &self.backing {
            files.extend(backing.files());
        }
        files
    }

    fn read_only(&self) -> bool {
        true
    }

    fn map(
        &self,
        kind: MapKind,
        offset: u64,
        len: u64,
        out: &mut Vec<Piece>,
    ) -> Result<(), MapError> {
        check_range(offset, len, self.virtual_size())?;
        match kind {
            MapKind::Read => {}
            MapKind::Write | MapKind::WriteZeroes { .. } | MapKind::Discard => {
                return Err(MapError::ReadOnly)
            }
        }
        let cluster_size = self.geometry.cluster_size();
        let table_span = self.geometry.bytes_per_l2_table();
        let start = out.len();
        let mut pos = offset;
        let end = offset + len;
        // Tables the range needs that are not cached: mapping goes on past them to name them
        // all, and only fails (asking for them) at the end.
        let mut missing: Vec<TableLoad> = Vec::new();
        let need = |loads: Vec<TableLoad>, missing: &mut Vec<TableLoad>| {
            for load in loads {
                if !missing.contains(&load) {
                    missing.push(load);
                }
            }
        };
        while pos < end {
            let loc = self.geometry.locate(GuestOffset(pos));
            let n = (end - pos).min(cluster_size - loc.offset_in_cluster);
            let entry = match self.l2_entry(&loc) {
                Ok(entry) => entry,
                Err(MapError::NeedTables(loads)) => {
                    need(loads, &mut missing);
                    // The rest of this L2 table's span is unknown too.
                    pos = (pos / table_span + 1)
                        .checked_mul(table_span)
                        .map_or(end, |next| next.min(end));
                    continue;
                }
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            };
            let mapped = match entry {
                L2Entry::Unallocated => self.map_backing(pos, n, out),
                L2Entry::Zero { .. } => {
                    push(out, Piece::Zero { len: n });
                    Ok(())
                }
                L2Entry::Normal { host_offset, .. } => {
                    let HostOffset(host) = host_offset;
                    push(
                        out,
                        Piece::Data {
                            file: FileId(0),
                            offset: host + loc.offset_in_cluster,
                            len: n,
                        },
                    );
                    Ok(())
                }
                L2Entry::Compressed(c) => {
                    push(
                        out,
                        Piece::Compressed {
                            file: FileId(0),
                            offset: c.host_offset().0,
                            read_len: c.read_len(),
                            algorithm: self.header.compression_type(),
                            cluster_size,
                            skip: loc.offset_in_cluster,
                            len: n,
                        },
                    );
                    Ok(())
                }
            };
            match mapped {
                Ok(()) => {}
                Err(MapError::NeedTables(loads)) => need(loads, &mut missing),
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            }
            pos += n;
        }
        if !missing.is_empty() {
            out.truncate(start);
            return Err(MapError::NeedTables(missing));
        }
        Ok(())
    }

    fn load_table(&self, load: TableLoad, bytes: &[u8]) -> Result<(), MapError> {
        if load.file == FileId(0) {
            if bytes.len() as u64 != self.geometry.cluster_size() {
                return Err(MapError::Corrupt(format!(
                    "fd {}: L2 table at {} read as {} bytes",
                    self.file.raw_fd(),
                    load.offset,
                    bytes.len()
                )));
            }
            self.l2.insert(load.offset, bytes);
            return Ok(());
        }
        match (&self.backing, load.file.0.checked_sub(1)) {
            (Some(backing), Some(id)) if (id as usize) < self.backing_files() => backing
                .load_table(
                    TableLoad {
                        file: FileId(id),
                        ..load
                    },
                    bytes,
                ),
            _ => Err(MapError::Corrupt(format!(
                "table load for unknown file {:?}",
                load.file
            ))),
        }
    }
}
