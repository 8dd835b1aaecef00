//! Chunk payload compression: zstd where it pays, raw where the data does not compress (random
//! or already-compressed blocks), so CPU is not spent for nothing.
use anyhow::{bail, Result};

/// Compressed output must save at least this fraction to be sent compressed.
const MIN_SAVING: f64 = 0.03;

pub struct Compressor {
    ctx: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

impl Compressor {
    pub fn new(level: i32) -> Result<Self> {
        Ok(Compressor { ctx: zstd::bulk::Compressor::new(level)?, out: Vec::with_capacity(1 << 20) })
    }

    /// `Some(compressed)` if worth it, else `None` (send raw).
    pub fn compress(&mut self, data: &[u8]) -> Result<Option<&[u8]>> {
        self.out.clear();
        self.out.reserve(zstd::zstd_safe::compress_bound(data.len()));
        self.ctx.compress_to_buffer(data, &mut self.out)?;
        Ok(((self.out.len() as f64) < data.len() as f64 * (1.0 - MIN_SAVING)).then_some(&self.out[..]))
    }
}

/// Decompresses into `out`, which must come out exactly `raw_len` long.
pub fn decompress_exact(data: &[u8], raw_len: usize, out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    out.reserve(raw_len);
    let n = zstd::bulk::Decompressor::new()?.decompress_to_buffer(data, out)?;
    if n != raw_len {
        bail!("chunk decompressed to {n} bytes, {raw_len} announced");
    }
    Ok(())
}
