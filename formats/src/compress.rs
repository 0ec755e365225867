//! Decompressing one qcow2 compressed cluster, with the decoder's memory capped.
//!
//! qcow2.rst: compressed clusters hold a raw deflate stream (compression type 0, zlib) or a
//! zstd frame (type 1); "decompression stops when it has produced a cluster of data", and the
//! stored bytes may run past the end of the stream. Pure: bytes in, one cluster out.

use crate::qcow2::CompressionType;

/// The largest zstd window the decoder accepts (log2 bytes): 2^22 = 4 MiB, twice the largest
/// cluster, so a crafted frame cannot make the decoder allocate more.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 22;

/// Why a compressed cluster could not be decompressed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecompressError {
    #[error("{algorithm} stream is corrupt: {detail}")]
    Corrupt {
        algorithm: &'static str,
        detail: String,
    },
    #[error("{algorithm} stream ended after {produced} of {wanted} bytes")]
    Short {
        algorithm: &'static str,
        produced: usize,
        wanted: usize,
    },
    #[error("compression type {0} is not supported")]
    Unsupported(u8),
}

/// Fills `out` from the start of the cluster the compressed bytes in `input` hold: a whole
/// cluster, or only its first `out.len()` bytes when that is all a read needs.
pub fn decompress_cluster(
    algorithm: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    match algorithm {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
        CompressionType::Other(byte) => Err(DecompressError::Unsupported(byte)),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    // QEMU writes raw deflate (no zlib header, window bits -12).
    let mut decoder = flate2::Decompress::new(false);
    let result = decoder.decompress(input, out, flate2::FlushDecompress::Finish);
    let produced = usize::try_from(decoder.total_out()).unwrap_or(usize::MAX);
    match result {
        Ok(_) if produced == out.len() => Ok(()),
        Ok(_) => Err(DecompressError::Short {
            algorithm: "deflate",
            produced,
            wanted: out.len(),
        }),
        Err(e) => Err(DecompressError::Corrupt {
            algorithm: "deflate",
            detail: e.to_string(),
        }),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let corrupt = |e: std::io::Error| DecompressError::Corrupt {
        algorithm: "zstd",
        detail: e.to_string(),
    };
    let mut decoder = Decoder::new().map_err(corrupt)?;
    decoder
        .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
            ZSTD_WINDOW_LOG_MAX,
        ))
        .map_err(corrupt)?;
    let mut src = InBuffer::around(input);
    let wanted = out.len();
    let mut dst = OutBuffer::around(out);
    // Each call either consumes input or produces output; bound the loop by the input size.
    for _ in 0..=input.len() {
        if dst.pos() == wanted {
            return Ok(());
        }
        let before = (src.pos, dst.pos());
        let hint = decoder.run(&mut src, &mut dst).map_err(corrupt)?;
        if dst.pos() == wanted {
            return Ok(());
        }
        if hint == 0 || (src.pos, dst.pos()) == before {
            break;
        }
    }
    Err(DecompressError::Short {
        algorithm: "zstd",
        produced: dst.pos(),
        wanted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from((i % 13 * 7 + i / 4096) % 256).unwrap())
            .collect()
    }

    #[test]
    fn raw_deflate_cluster_round_trips_and_trailing_bytes_are_ignored() {
        let data = pattern(65536);
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut stored = enc.finish().unwrap();
        stored.extend_from_slice(&[0xAA; 300]);
        let mut out = vec![0u8; 65536];
        decompress_cluster(CompressionType::Zlib, &stored, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_cluster_round_trips() {
        let data = pattern(4096);
        let mut stored = zstd::bulk::compress(&data, 3).unwrap();
        stored.extend_from_slice(&[0; 100]);
        let mut out = vec![0u8; 4096];
        decompress_cluster(CompressionType::Zstd, &stored, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn garbage_and_short_streams_are_errors() {
        let mut out = vec![0u8; 4096];
        assert!(decompress_cluster(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(decompress_cluster(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
        let short = zstd::bulk::compress(&pattern(1000), 3).unwrap();
        assert!(matches!(
            decompress_cluster(CompressionType::Zstd, &short, &mut out),
            Err(DecompressError::Short { .. })
        ));
        assert_eq!(
            decompress_cluster(CompressionType::Other(7), &short, &mut out),
            Err(DecompressError::Unsupported(7))
        );
    }
}
