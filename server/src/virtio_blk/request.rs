//! Parsing one virtio-blk request from a descriptor chain into a validated [`Request`].
//!
//! The chain is taken as the spec lays it out (VIRTIO 1.2 5.2.6): device-readable bytes first
//! (a 16-byte header, then OUT data or DISCARD/WRITE_ZEROES segments), then device-writable
//! bytes (IN or GET_ID data) whose last byte is the status. Header and payload may be split
//! across descriptors in any way ("any layout", 2.6.4). Every guest-controlled number is
//! checked here, once; the engine trusts a [`Request`].

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::features::{MAX_DISCARD_SEG, MAX_REQUEST_BYTES};
use super::*;

/// Length of `struct virtio_blk_req`'s header: type, reserved (ioprio), sector.
pub const HEADER_LEN: u32 = 16;
/// Length of one `struct virtio_blk_discard_write_zeroes` segment.
pub const DWZ_SEGMENT_LEN: u32 = 16;
/// The only flag defined for DISCARD/WRITE_ZEROES segments.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// One descriptor of a chain, as the queue gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: GuestAddress,
    pub len: u32,
    /// VIRTQ_DESC_F_WRITE: the device writes into it.
    pub writable: bool,
}

/// A range of guest memory that holds request data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A byte range of the disk, already checked against its size and alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskRange {
    pub offset: u64,
    pub len: u64,
}

/// What a valid request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        range: DiskRange,
        data: Vec<Segment>,
    },
    Write {
        range: DiskRange,
        data: Vec<Segment>,
    },
    Flush,
    GetId {
        data: Vec<Segment>,
    },
    Discard {
        ranges: Vec<DiskRange>,
    },
    WriteZeroes {
        ranges: Vec<DiskRange>,
        unmap: bool,
    },
}

/// A request that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// Why a request is refused. Each reason maps to one outcome in [`Rejection::outcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("descriptor chain is malformed (loops, is longer than the queue, or is cut short)")]
    MalformedChain,
    #[error("the last descriptor is not a device-writable byte in guest memory, so no status can be written")]
    NoStatus,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the request header is shorter than 16 bytes")]
    ShortHeader,
    #[error("a descriptor lies outside guest memory")]
    OutsideGuestMemory,
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("data buffers point the wrong way for this request type")]
    WrongDirection,
    #[error("data length {0} is not a multiple of the logical block size")]
    Misaligned(u64),
    #[error("sector range is past the end of the disk")]
    OutOfRange,
    #[error("request data of {0} bytes is larger than the device allows")]
    TooLarge(u64),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("discard/write-zeroes payload is not a whole number of 16-byte segments")]
    BadSegmentPayload,
    #[error("discard/write-zeroes request has {0} segments, more than the device allows")]
    TooManySegments(usize),
    #[error("discard/write-zeroes segment has unsupported flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("discard/write-zeroes segment covers more sectors than the device allows")]
    SegmentTooLarge,
}

/// A refused request: how to complete it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    /// Where to write the status, if a status byte exists.
    pub status: Option<GuestAddress>,
    /// The request type, once the header was read (for accounting).
    pub req_type: Option<u32>,
}

/// How a refused request is completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Write this status byte, used length 1.
    Status(u8),
    /// Nothing can be written: return the chain with used length 0.
    NoStatus,
}

impl Rejection {
    pub fn outcome(&self) -> Outcome {
        if self.status.is_none() {
            return Outcome::NoStatus;
        }
        Outcome::Status(match self.reason {
            // Spec 5.2.6.1: unknown types and unsupported flags get VIRTIO_BLK_S_UNSUPP.
            RejectReason::UnsupportedType(_)
            | RejectReason::UnsupportedFlags(_)
            | RejectReason::TooManySegments(_) => VIRTIO_BLK_S_UNSUPP,
            RejectReason::MalformedChain
            | RejectReason::NoStatus
            | RejectReason::ReadableAfterWritable
            | RejectReason::ShortHeader
            | RejectReason::OutsideGuestMemory
            | RejectReason::WrongDirection
            | RejectReason::Misaligned(_)
            | RejectReason::OutOfRange
            | RejectReason::TooLarge(_)
            | RejectReason::ReadOnly
            | RejectReason::BadSegmentPayload
            | RejectReason::SegmentTooLarge => VIRTIO_BLK_S_IOERR,
        })
    }
}

/// The disk facts a request is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub capacity_bytes: u64,
    pub logical_block_size: u32,
    pub read_only: bool,
    /// VIRTIO_BLK_F_DISCARD was offered.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES was offered.
    pub write_zeroes: bool,
    /// Largest DISCARD/WRITE_ZEROES segment, in sectors.
    pub max_dwz_sectors: u32,
}

/// Parses a descriptor chain. `truncated` says the chain iterator stopped before a descriptor
/// without VIRTQ_DESC_F_NEXT (a loop, a chain longer than the queue, a bad index).
pub fn parse<M: GuestMemoryBackend>(
    descs: &[Descriptor],
    truncated: bool,
    mem: &M,
    geo: &Geometry,
) -> Result<Request, Rejection> {
    let no_status = |reason| Rejection {
        reason,
        status: None,
        req_type: None,
    };
    if truncated {
        return Err(no_status(RejectReason::MalformedChain));
    }
    // The status is the last byte of the last descriptor, which must be device-writable.
    let last = descs.last().ok_or(no_status(RejectReason::NoStatus))?;
    if !last.writable || last.len == 0 {
        return Err(no_status(RejectReason::NoStatus));
    }
    let status = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .filter(|addr| mem.address_in_range(*addr))
        .ok_or(no_status(RejectReason::NoStatus))?;
    let fail = |reason| Rejection {
        reason,
        status: Some(status),
        req_type: None,
    };

    // Split into readable and writable parts; readable must all come first (2.7.4.2).
    let split = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[split..].iter().any(|d| !d.writable) {
        return Err(fail(RejectReason::ReadableAfterWritable));
    }
    let readable = to_segments(&descs[..split]);
    let mut writable = to_segments(&descs[split..]);
    // Drop the status byte from the writable part.
    if let Some(tail) = writable.last_mut() {
        tail.len -= 1;
        if tail.len == 0 {
            writable.pop();
        }
    }
    for seg in readable.iter().chain(writable.iter()) {
        if !mem.check_range(seg.addr, seg.len as usize) {
            return Err(fail(RejectReason::OutsideGuestMemory));
        }
    }

    let (header, payload) = split_segments(&readable, u64::from(HEADER_LEN));
    let mut hdr = [0u8; HEADER_LEN as usize];
    if total_len(&header) < u64::from(HEADER_LEN) {
        return Err(fail(RejectReason::ShortHeader));
    }
    read_segments(mem, &header, &mut hdr).map_err(|_| fail(RejectReason::OutsideGuestMemory))?;
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let fail = |reason| Rejection {
        reason,
        status: Some(status),
        req_type: Some(req_type),
    };

    let op = match req_type {
        VIRTIO_BLK_T_IN => {
            if !payload.is_empty() {
                return Err(fail(RejectReason::WrongDirection));
            }
            let range = data_range(sector, total_len(&writable), geo).map_err(fail)?;
            Op::Read {
                range,
                data: writable,
            }
        }
        VIRTIO_BLK_T_OUT => {
            if !writable.is_empty() {
                return Err(fail(RejectReason::WrongDirection));
            }
            if geo.read_only {
                return Err(fail(RejectReason::ReadOnly));
            }
            let range = data_range(sector, total_len(&payload), geo).map_err(fail)?;
            Op::Write {
                range,
                data: payload,
            }
        }
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_GET_ID => Op::GetId { data: writable },
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let is_discard = req_type == VIRTIO_BLK_T_DISCARD;
            let offered = if is_discard {
                geo.discard
            } else {
                geo.write_zeroes
            };
            if !offered {
                return Err(fail(RejectReason::UnsupportedType(req_type)));
            }
            if geo.read_only {
                return Err(fail(RejectReason::ReadOnly));
            }
            if !writable.is_empty() {
                return Err(fail(RejectReason::WrongDirection));
            }
            let (ranges, unmap) =
                parse_dwz_segments(mem, &payload, is_discard, geo).map_err(fail)?;
            if is_discard {
                Op::Discard { ranges }
            } else {
                Op::WriteZeroes { ranges, unmap }
            }
        }
        other => return Err(fail(RejectReason::UnsupportedType(other))),
    };
    Ok(Request { op, status })
}

fn to_segments(descs: &[Descriptor]) -> Vec<Segment> {
    descs
        .iter()
        .filter(|d| d.len > 0)
        .map(|d| Segment {
            addr: d.addr,
            len: d.len,
        })
        .collect()
}

/// Total bytes of `segs`; cannot overflow: a chain is bounded by 2^32 bytes (2.7.5.2) and the
/// queue iterator enforces it, but u64 leaves room either way.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segs` after `at` bytes.
fn split_segments(segs: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut left = at;
    for seg in segs {
        let len = u64::from(seg.len);
        if left >= len {
            head.push(*seg);
            left -= len;
        } else if left > 0 {
            // `left` < `seg.len` here, so it fits u32.
            let cut = u32::try_from(left).unwrap_or(seg.len);
            head.push(Segment {
                addr: seg.addr,
                len: cut,
            });
            tail.push(Segment {
                addr: seg.addr.unchecked_add(u64::from(cut)),
                len: seg.len - cut,
            });
            left = 0;
        } else {
            tail.push(*seg);
        }
    }
    (head, tail)
}

/// Reads exactly `buf.len()` bytes from the start of `segs`.
fn read_segments<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for seg in segs {
        if done == buf.len() {
            break;
        }
        let n = (seg.len as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], seg.addr)?;
        done += n;
    }
    Ok(())
}

/// Checks an IN/OUT transfer of `len` bytes at `sector`.
fn data_range(sector: u64, len: u64, geo: &Geometry) -> Result<DiskRange, RejectReason> {
    if len > MAX_REQUEST_BYTES {
        return Err(RejectReason::TooLarge(len));
    }
    let offset = disk_range(sector, len, geo)?;
    Ok(DiskRange { offset, len })
}

/// Checks alignment and bounds of a byte range starting at `sector`; returns its byte offset.
fn disk_range(sector: u64, len: u64, geo: &Geometry) -> Result<u64, RejectReason> {
    let lbs = u64::from(geo.logical_block_size);
    // Spec 5.2.6.1: the driver sends multiples of 512 bytes; with BLK_SIZE also of blk_size.
    if len % lbs != 0 {
        return Err(RejectReason::Misaligned(len));
    }
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RejectReason::OutOfRange)?;
    if offset % lbs != 0 {
        return Err(RejectReason::Misaligned(offset));
    }
    match offset.checked_add(len) {
        Some(end) if end <= geo.capacity_bytes => Ok(offset),
        _ => Err(RejectReason::OutOfRange),
    }
}

fn parse_dwz_segments<M: GuestMemoryBackend>(
    mem: &M,
    payload: &[Segment],
    is_discard: bool,
    geo: &Geometry,
) -> Result<(Vec<DiskRange>, bool), RejectReason> {
    let len = total_len(payload);
    if len == 0 || len % u64::from(DWZ_SEGMENT_LEN) != 0 {
        return Err(RejectReason::BadSegmentPayload);
    }
    let count = usize::try_from(len / u64::from(DWZ_SEGMENT_LEN)).unwrap_or(usize::MAX);
    if count > MAX_DISCARD_SEG as usize {
        return Err(RejectReason::TooManySegments(count));
    }
    let mut bytes = vec![0u8; count * DWZ_SEGMENT_LEN as usize];
    read_segments(mem, payload, &mut bytes).map_err(|_| RejectReason::OutsideGuestMemory)?;
    let mut ranges = Vec::with_capacity(count);
    let mut unmap = true;
    for seg in bytes.chunks_exact(DWZ_SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes([
            seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
        ]);
        let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        // Spec 5.2.6.2: unknown flags, and UNMAP on a discard, get VIRTIO_BLK_S_UNSUPP.
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
            || (is_discard && flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0)
        {
            return Err(RejectReason::UnsupportedFlags(flags));
        }
        unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if num_sectors > geo.max_dwz_sectors {
            return Err(RejectReason::SegmentTooLarge);
        }
        let seg_len = u64::from(num_sectors) * SECTOR_SIZE;
        let offset = disk_range(sector, seg_len, geo)?;
        ranges.push(DiskRange {
            offset,
            len: seg_len,
        });
    }
    Ok((ranges, unmap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MEM_SIZE: u64 = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())])
            .unwrap()
    }

    fn geo() -> Geometry {
        Geometry {
            capacity_bytes: 1 << 20,
            logical_block_size: 512,
            read_only: false,
            discard: true,
            write_zeroes: true,
            max_dwz_sectors: 1024,
        }
    }

    fn header(mem: &GuestMemoryMmap, at: u64, req_type: u32, sector: u64) -> Descriptor {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
        Descriptor {
            addr: GuestAddress(at),
            len: 16,
            writable: false,
        }
    }

    fn buf(at: u64, len: u32, writable: bool) -> Descriptor {
        Descriptor {
            addr: GuestAddress(at),
            len,
            writable,
        }
    }

    fn status(at: u64) -> Descriptor {
        buf(at, 1, true)
    }

    fn outcome(r: Result<Request, Rejection>) -> Outcome {
        r.expect_err("request should be rejected").outcome()
    }

    #[test]
    fn read_request_parses_sector_and_data() {
        let m = mem();
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_IN, 8),
            buf(4096, 4096, true),
            status(100),
        ];
        let req = parse(&chain, false, &m, &geo()).unwrap();
        assert_eq!(req.status, GuestAddress(100));
        assert_eq!(
            req.op,
            Op::Read {
                range: DiskRange {
                    offset: 4096,
                    len: 4096
                },
                data: vec![Segment {
                    addr: GuestAddress(4096),
                    len: 4096
                }]
            }
        );
    }

    #[test]
    fn status_may_share_a_descriptor_with_data_and_header_may_be_split() {
        let m = mem();
        let h = header(&m, 0, VIRTIO_BLK_T_IN, 0);
        let chain = [
            buf(0, 10, false),
            buf(h.addr.0 + 10, 6, false),
            buf(8192, 513, true),
        ];
        let req = parse(&chain, false, &m, &geo()).unwrap();
        assert_eq!(req.status, GuestAddress(8192 + 512));
        assert!(matches!(
            req.op,
            Op::Read {
                range: DiskRange {
                    offset: 0,
                    len: 512
                },
                ..
            }
        ));
    }

    #[test]
    fn write_payload_follows_the_header_in_the_same_descriptor() {
        let m = mem();
        header(&m, 0, VIRTIO_BLK_T_OUT, 1);
        let chain = [buf(0, 16 + 1024, false), status(9000)];
        let req = parse(&chain, false, &m, &geo()).unwrap();
        assert_eq!(
            req.op,
            Op::Write {
                range: DiskRange {
                    offset: 512,
                    len: 1024
                },
                data: vec![Segment {
                    addr: GuestAddress(16),
                    len: 1024
                }]
            }
        );
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let m = mem();
        let chain = [header(&m, 0, 99, 0), status(100)];
        assert_eq!(
            outcome(parse(&chain, false, &m, &geo())),
            Outcome::Status(VIRTIO_BLK_S_UNSUPP)
        );
    }

    #[test]
    fn read_past_end_is_ioerr() {
        let m = mem();
        let last_sector = (1 << 20) / 512;
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_IN, last_sector),
            buf(4096, 512, true),
            status(100),
        ];
        assert_eq!(
            outcome(parse(&chain, false, &m, &geo())),
            Outcome::Status(VIRTIO_BLK_S_IOERR)
        );
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_IN, u64::MAX / 2),
            buf(4096, 512, true),
            status(100),
        ];
        assert_eq!(
            outcome(parse(&chain, false, &m, &geo())),
            Outcome::Status(VIRTIO_BLK_S_IOERR)
        );
    }

    #[test]
    fn length_not_a_sector_multiple_is_ioerr() {
        let m = mem();
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            buf(4096, 100, true),
            status(100),
        ];
        let r = parse(&chain, false, &m, &geo());
        assert_eq!(r.clone().unwrap_err().reason, RejectReason::Misaligned(100));
        assert_eq!(outcome(r), Outcome::Status(VIRTIO_BLK_S_IOERR));
    }

    #[test]
    fn logical_block_size_4096_refuses_512_byte_io() {
        let m = mem();
        let g = Geometry {
            logical_block_size: 4096,
            ..geo()
        };
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_IN, 1),
            buf(4096, 4096, true),
            status(100),
        ];
        assert_eq!(
            outcome(parse(&chain, false, &m, &g)),
            Outcome::Status(VIRTIO_BLK_S_IOERR)
        );
    }

    #[test]
    fn write_to_read_only_disk_is_ioerr() {
        let m = mem();
        let g = Geometry {
            read_only: true,
            ..geo()
        };
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_OUT, 0),
            buf(4096, 512, false),
            status(100),
        ];
        assert_eq!(
            parse(&chain, false, &m, &g).unwrap_err().reason,
            RejectReason::ReadOnly
        );
    }

    #[test]
    fn wrong_direction_data_is_ioerr() {
        let m = mem();
        let read_with_readable_data = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            buf(4096, 512, false),
            status(100),
        ];
        let write_with_writable_data = [
            header(&m, 32, VIRTIO_BLK_T_OUT, 0),
            buf(4096, 512, true),
            status(100),
        ];
        for chain in [read_with_readable_data, write_with_writable_data] {
            assert_eq!(
                parse(&chain, false, &m, &geo()).unwrap_err().reason,
                RejectReason::WrongDirection
            );
        }
    }

    #[test]
    fn readable_after_writable_is_ioerr() {
        let m = mem();
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            buf(4096, 512, true),
            buf(0, 16, false),
            status(100),
        ];
        assert_eq!(
            parse(&chain, false, &m, &geo()).unwrap_err().reason,
            RejectReason::ReadableAfterWritable
        );
    }

    #[test]
    fn short_header_is_ioerr() {
        let m = mem();
        let chain = [buf(0, 8, false), status(100)];
        assert_eq!(
            parse(&chain, false, &m, &geo()).unwrap_err().reason,
            RejectReason::ShortHeader
        );
    }

    #[test]
    fn data_outside_guest_memory_is_ioerr() {
        let m = mem();
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            buf(MEM_SIZE - 256, 512, true),
            status(100),
        ];
        assert_eq!(
            parse(&chain, false, &m, &geo()).unwrap_err().reason,
            RejectReason::OutsideGuestMemory
        );
    }

    #[test]
    fn missing_or_unwritable_status_gives_no_status() {
        let m = mem();
        let readonly_status = [header(&m, 0, VIRTIO_BLK_T_IN, 0), buf(4096, 512, false)];
        let status_outside = [header(&m, 0, VIRTIO_BLK_T_IN, 0), status(MEM_SIZE + 5)];
        let empty: [Descriptor; 0] = [];
        let zero_len_status = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            buf(4096, 512, true),
            buf(100, 0, true),
        ];
        for chain in [
            &readonly_status[..],
            &status_outside[..],
            &empty[..],
            &zero_len_status[..],
        ] {
            assert_eq!(outcome(parse(chain, false, &m, &geo())), Outcome::NoStatus);
        }
    }

    #[test]
    fn truncated_chain_gives_no_status() {
        let m = mem();
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            buf(4096, 512, true),
            status(100),
        ];
        assert_eq!(outcome(parse(&chain, true, &m, &geo())), Outcome::NoStatus);
    }

    fn dwz(m: &GuestMemoryMmap, at: u64, segs: &[(u64, u32, u32)]) -> Descriptor {
        let mut bytes = Vec::new();
        for (sector, n, flags) in segs {
            bytes.extend_from_slice(&sector.to_le_bytes());
            bytes.extend_from_slice(&n.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
        }
        m.write_slice(&bytes, GuestAddress(at)).unwrap();
        buf(at, u32::try_from(bytes.len()).unwrap(), false)
    }

    #[test]
    fn write_zeroes_segments_parse_with_unmap() {
        let m = mem();
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0),
            dwz(&m, 1000, &[(0, 8, 1), (16, 8, 1)]),
            status(100),
        ];
        let req = parse(&chain, false, &m, &geo()).unwrap();
        assert_eq!(
            req.op,
            Op::WriteZeroes {
                ranges: vec![
                    DiskRange {
                        offset: 0,
                        len: 4096
                    },
                    DiskRange {
                        offset: 8192,
                        len: 4096
                    }
                ],
                unmap: true
            }
        );
    }

    #[test]
    fn discard_with_unmap_or_unknown_flags_is_unsupp() {
        let m = mem();
        let unmap = [
            header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
            dwz(&m, 1000, &[(0, 8, 1)]),
            status(100),
        ];
        assert_eq!(
            outcome(parse(&unmap, false, &m, &geo())),
            Outcome::Status(VIRTIO_BLK_S_UNSUPP)
        );
        let unknown = [
            header(&m, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0),
            dwz(&m, 1000, &[(0, 8, 4)]),
            status(100),
        ];
        assert_eq!(
            outcome(parse(&unknown, false, &m, &geo())),
            Outcome::Status(VIRTIO_BLK_S_UNSUPP)
        );
    }

    #[test]
    fn discard_limits_are_enforced() {
        let m = mem();
        let g = geo();
        let too_many: Vec<(u64, u32, u32)> = (0..=u64::from(MAX_DISCARD_SEG))
            .map(|i| (i, 1, 0))
            .collect();
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
            dwz(&m, 1000, &too_many),
            status(100),
        ];
        assert_eq!(
            outcome(parse(&chain, false, &m, &g)),
            Outcome::Status(VIRTIO_BLK_S_UNSUPP)
        );
        let too_big = [
            header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
            dwz(&m, 1000, &[(0, 1025, 0)]),
            status(100),
        ];
        assert_eq!(
            parse(&too_big, false, &m, &g).unwrap_err().reason,
            RejectReason::SegmentTooLarge
        );
        let past_end = [
            header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
            dwz(&m, 1000, &[(2047, 2, 0)]),
            status(100),
        ];
        assert_eq!(
            parse(&past_end, false, &m, &g).unwrap_err().reason,
            RejectReason::OutOfRange
        );
        let ragged = [
            header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
            buf(1000, 15, false),
            status(100),
        ];
        assert_eq!(
            parse(&ragged, false, &m, &g).unwrap_err().reason,
            RejectReason::BadSegmentPayload
        );
    }

    #[test]
    fn discard_not_offered_is_unsupp() {
        let m = mem();
        let g = Geometry {
            discard: false,
            ..geo()
        };
        let chain = [
            header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
            dwz(&m, 1000, &[(0, 8, 0)]),
            status(100),
        ];
        assert_eq!(
            outcome(parse(&chain, false, &m, &g)),
            Outcome::Status(VIRTIO_BLK_S_UNSUPP)
        );
    }

    #[test]
    fn flush_and_get_id_parse() {
        let m = mem();
        let flush = [header(&m, 0, VIRTIO_BLK_T_FLUSH, 0), status(100)];
        assert_eq!(parse(&flush, false, &m, &geo()).unwrap().op, Op::Flush);
        let get_id = [
            header(&m, 0, VIRTIO_BLK_T_GET_ID, 0),
            buf(200, 20, true),
            status(100),
        ];
        assert!(matches!(
            parse(&get_id, false, &m, &geo()).unwrap().op,
            Op::GetId { .. }
        ));
    }

    #[test]
    fn oversized_request_is_ioerr() {
        let m = GuestMemoryMmap::from_ranges(&[(
            GuestAddress(0),
            usize::try_from(MAX_REQUEST_BYTES + (2 << 20)).unwrap(),
        )])
        .unwrap();
        let g = Geometry {
            capacity_bytes: 1 << 40,
            ..geo()
        };
        let descs: Vec<Descriptor> = std::iter::once(header(&m, 0, VIRTIO_BLK_T_IN, 0))
            .chain((0..65).map(|i| buf(4096 + i * (1 << 20), 1 << 20, true)))
            .chain(std::iter::once(status(100)))
            .collect();
        assert_eq!(
            parse(&descs, false, &m, &g).unwrap_err().reason,
            RejectReason::TooLarge(65 << 20)
        );
    }
}
