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

thread_local! {
    /// Each thread's decompression context (a fresh one is a hundred KiB of tables) and output
    /// buffer for `with_decompressed`.
    static DECOMPRESSION: std::cell::RefCell<Option<(zstd::bulk::Decompressor<'static>, Vec<u8>)>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's decompression context and output buffer.
fn with_context<R>(f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>, &mut Vec<u8>) -> Result<R>) -> Result<R> {
    DECOMPRESSION.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some((zstd::bulk::Decompressor::new()?, Vec::new()));
        }
        let (ctx, out) = d.as_mut().expect("set above");
        f(ctx, out)
    })
}

/// Decompresses `data` and hands the result, which must come out exactly `raw_len` long, to
/// `use_plain`, in the thread's own buffer: a fresh chunk-sized buffer is memory the kernel
/// must map and fault in again, per chunk.
pub fn with_decompressed<R>(data: &[u8], raw_len: usize, use_plain: impl FnOnce(&[u8]) -> Result<R>) -> Result<R> {
    with_context(|ctx, out| {
        out.clear();
        out.reserve(raw_len);
        let n = ctx.decompress_to_buffer(data, out)?;
        if n != raw_len {
            bail!("decompressed to {n} bytes, {raw_len} announced");
        }
        use_plain(out)
    })
}

/// Decompresses `data`, which must come out exactly `raw_len` long, into a buffer of its own
/// (for a caller that keeps it).
pub fn decompress_owned(data: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    with_context(|ctx, _| {
        let out = ctx.decompress(data, raw_len)?;
        if out.len() != raw_len {
            bail!("decompressed to {} bytes, {raw_len} announced", out.len());
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_decompresses_to_its_announced_length_only() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut c = Compressor::new(1).unwrap();
        let z = c.compress(&data).unwrap().expect("compressible").to_vec();
        assert!(with_decompressed(&z, data.len(), |p| Ok(p == &data[..])).unwrap());
        // The same thread again, with a shorter chunk: the kept buffer holds only the new one.
        let short = &data[..1000];
        let z2 = c.compress(short).unwrap().expect("compressible").to_vec();
        assert_eq!(with_decompressed(&z2, short.len(), |p| Ok(p.to_vec())).unwrap(), short);
        let err = with_decompressed(&z, data.len() - 1, |_| Ok(())).unwrap_err();
        assert!(format!("{err:#}").contains("announced") || format!("{err:#}").contains("Destination buffer is too small"), "{err:#}");
        assert!(with_decompressed(&z[..z.len() / 2], data.len(), |_| Ok(())).is_err(), "a truncated chunk is refused");
        // The owned form, on the same thread's context.
        assert_eq!(decompress_owned(&z, data.len()).unwrap(), data);
        assert!(decompress_owned(&z2, short.len() + 1).is_err(), "one byte short of its announced length");
        assert!(decompress_owned(&z[..z.len() / 2], data.len()).is_err());
    }
}
