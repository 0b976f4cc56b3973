//! Compressed clusters: raw deflate (QEMU's `zlib`, 4 KiB window) and zstd.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::options::CompressionType;

/// Compress one cluster. Returns `None` when the result would not be smaller than the cluster
/// (the caller then writes it uncompressed, as QEMU does).
pub(crate) fn compress(data: &[u8], kind: CompressionType) -> Option<Vec<u8>> {
    let limit = data.len();
    match kind {
        CompressionType::Zlib => {
            // Raw deflate with a 4 KiB window, like QEMU (window bits 12, no zlib header).
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(data, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) if out.len() < limit => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(data, 0).ok()?;
            (out.len() < limit).then_some(out)
        }
    }
}

/// Decompress `input` (which may carry trailing garbage up to the sector end) into `out`, which
/// must be filled completely.
pub(crate) fn decompress(
    input: &[u8],
    out: &mut [u8],
    kind: CompressionType,
) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => {
            let mut d = Decompress::new_with_window_bits(false, 15);
            loop {
                let in_pos = d.total_in() as usize;
                let out_pos = d.total_out() as usize;
                if out_pos == out.len() {
                    return Ok(());
                }
                let st = d
                    .decompress(
                        &input[in_pos..],
                        &mut out[out_pos..],
                        FlushDecompress::Finish,
                    )
                    .map_err(|e| format!("deflate data is invalid: {e}"))?;
                let progressed =
                    d.total_in() as usize != in_pos || d.total_out() as usize != out_pos;
                match st {
                    Status::StreamEnd => {
                        if (d.total_out() as usize) < out.len() {
                            return Err("deflate stream ended before a whole cluster".into());
                        }
                        return Ok(());
                    }
                    _ if !progressed => {
                        if d.total_out() as usize == out.len() {
                            return Ok(());
                        }
                        return Err("deflate stream is truncated".into());
                    }
                    _ => {}
                }
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            loop {
                let before_in = inb.pos;
                let before_out = outb.pos();
                let hint = dec
                    .run(&mut inb, &mut outb)
                    .map_err(|e| format!("zstd data is invalid: {e}"))?;
                if outb.pos() == outb.capacity() {
                    return Ok(());
                }
                if hint == 0 {
                    return Err("zstd frame ended before a whole cluster".into());
                }
                if inb.pos == before_in && outb.pos() == before_out {
                    return Err("zstd data is truncated".into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 7 + i / 4096) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(&data, kind).expect("compressible");
            c.extend_from_slice(&[0xaa; 300]); // trailing garbage up to the sector end
            let mut out = vec![0u8; 65536];
            decompress(&c, &mut out, kind).unwrap();
            assert_eq!(out, data);
        }
    }
    #[test]
    fn incompressible_is_none() {
        let mut x = 0x1234_5678u64;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(&data, CompressionType::Zlib).is_none());
    }
}
