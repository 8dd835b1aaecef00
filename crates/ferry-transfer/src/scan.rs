//! Scanning an object into chunks: disk images into fixed, aligned blocks, where holes and
//! all-zero blocks become zero ranges (never read again, never sent); other files into
//! content-defined chunks, so an insertion shifts nothing after it. Every data chunk is named
//! by its BLAKE3 hash.
use anyhow::{Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

pub type ChunkId = [u8; 32];

/// One aligned block of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub offset: u64,
    pub len: u32,
    /// `None`: the range reads as zeros (a hole or zero bytes).
    pub id: Option<ChunkId>,
}

/// The chunk identity: BLAKE3, keyed per tenant so chunk IDs say nothing across tenants and a
/// guest cannot aim collisions at another tenant's data.
#[derive(Clone)]
pub struct ChunkHasher {
    key: [u8; 32],
}

impl ChunkHasher {
    pub fn new(tenant_key: [u8; 32]) -> Self {
        ChunkHasher { key: tenant_key }
    }
    pub fn id(&self, data: &[u8]) -> ChunkId {
        *blake3::keyed_hash(&self.key, data).as_bytes()
    }
}

/// How an object is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunker {
    Fixed { block: u32 },
    Cdc { min: u32, avg: u32, max: u32 },
}

impl Chunker {
    /// Content-defined chunks averaging 64 KiB, the size disk images use, so the two kinds of
    /// chunk cost the same per byte.
    pub const DEFAULT_CDC: Chunker = Chunker::Cdc { min: 16 << 10, avg: 64 << 10, max: 256 << 10 };

    pub fn max_len(&self) -> u32 {
        match *self {
            Chunker::Fixed { block } => block,
            Chunker::Cdc { max, .. } => max,
        }
    }

    /// Checks what a peer asked for: bounded sizes, and sizes the CDC implementation accepts.
    pub fn from_wire(c: &ferry_proto::Chunking) -> Result<Chunker> {
        match *c {
            ferry_proto::Chunking::Fixed { block } if (4096..=16 << 20).contains(&block) => Ok(Chunker::Fixed { block }),
            ferry_proto::Chunking::Cdc { min, avg, max }
                if min >= fastcdc::v2020::MINIMUM_MIN as u32
                    && max <= fastcdc::v2020::MAXIMUM_MAX as u32
                    && min < avg
                    && avg < max
                    && (fastcdc::v2020::AVERAGE_MIN as u32..=fastcdc::v2020::AVERAGE_MAX as u32).contains(&avg) =>
            {
                Ok(Chunker::Cdc { min, avg, max })
            }
            other => anyhow::bail!("unsupported chunking {other:?}"),
        }
    }

    pub fn to_wire(&self) -> ferry_proto::Chunking {
        match *self {
            Chunker::Fixed { block } => ferry_proto::Chunking::Fixed { block },
            Chunker::Cdc { min, avg, max } => ferry_proto::Chunking::Cdc { min, avg, max },
        }
    }

    /// Bytes that pin the chunking in the object digest.
    pub fn digest_params(&self) -> [u32; 4] {
        match *self {
            Chunker::Fixed { block } => [0, block, 0, 0],
            Chunker::Cdc { min, avg, max } => [1, min, avg, max],
        }
    }
}

/// Walks a file chunk by chunk in order, calling `visit` for each.
pub fn scan(file: &File, size: u64, chunker: Chunker, hasher: &ChunkHasher, visit: impl FnMut(Block) -> Result<()>) -> Result<()> {
    scan_first(file, size, chunker, &[], hasher, visit)
}

/// Like `scan`, but with fixed blocks, those overlapping `first` (byte ranges) come before the
/// others (content-defined chunks cannot be cut out of order: they come in order).
pub fn scan_first(file: &File, size: u64, chunker: Chunker, first: &[(u64, u64)], hasher: &ChunkHasher, visit: impl FnMut(Block) -> Result<()>) -> Result<()> {
    match chunker {
        Chunker::Fixed { block } => scan_blocks_first(file, size, block, first, hasher, visit),
        Chunker::Cdc { min, avg, max } => scan_cdc(file, size, (min as usize, avg as usize, max as usize), hasher, visit),
    }
}

/// Content-defined chunking over a sliding window of the file: a cut the chunker finds before
/// the window's end depends only on the bytes before it, so it is kept; a chunk that runs into
/// the window's end is cut again once more of the file is read.
fn scan_cdc(file: &File, size: u64, (min, avg, max): (usize, usize, usize), hasher: &ChunkHasher, mut visit: impl FnMut(Block) -> Result<()>) -> Result<()> {
    const WINDOW: usize = 8 << 20;
    let mut buf = vec![0u8; WINDOW.max(2 * max)];
    let (mut filled, mut start) = (0usize, 0usize);
    let mut file_pos = 0u64; // file offset of buf[0]
    loop {
        let eof = file_pos + filled as u64 >= size;
        {
            let cdc = fastcdc::v2020::FastCDC::new(&buf[..filled], min, avg, max);
            while start < filled && (eof || filled - start >= max) {
                let (_, end) = cdc.cut(start, filled - start);
                let data = &buf[start..end];
                let id = (!is_zero(data)).then(|| hasher.id(data));
                visit(Block { offset: file_pos + start as u64, len: (end - start) as u32, id })?;
                start = end;
            }
        }
        if eof {
            return Ok(());
        }
        // Slide what is left to the front and read more.
        buf.copy_within(start..filled, 0);
        file_pos += start as u64;
        filled -= start;
        start = 0;
        let want = (size - file_pos - filled as u64).min((buf.len() - filled) as u64) as usize;
        file.read_exact_at(&mut buf[filled..filled + want], file_pos + filled as u64).context("reading for chunking")?;
        filled += want;
    }
}

/// The data ranges of a file (SEEK_DATA/SEEK_HOLE), so holes are skipped without reading.
pub fn data_ranges(file: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if start < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e).context("SEEK_DATA");
        }
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error()).context("SEEK_HOLE");
        }
        ranges.push((start as u64, (end as u64).min(size)));
        pos = end as u64;
    }
    Ok(ranges)
}

/// Walks a file block by block, calling `visit` for each block in order. Reads only the blocks
/// that overlap data ranges; `buf` is reused (no allocation per block).
pub fn scan_blocks(file: &File, size: u64, block: u32, hasher: &ChunkHasher, visit: impl FnMut(Block) -> Result<()>) -> Result<()> {
    scan_blocks_first(file, size, block, &[], hasher, visit)
}

/// Walks a file block by block like `scan_blocks`, except that the blocks overlapping `first`
/// (byte ranges: start, length) come before all the others, in order; every block comes once.
pub fn scan_blocks_first(file: &File, size: u64, block: u32, first: &[(u64, u64)], hasher: &ChunkHasher, mut visit: impl FnMut(Block) -> Result<()>) -> Result<()> {
    let data = data_ranges(file, size)?;
    let blocks = size.div_ceil(block as u64);
    let mut early: Vec<(u64, u64)> = first.iter().filter(|r| r.1 > 0).map(|&(start, len)| (start / block as u64, (start + len).div_ceil(block as u64).min(blocks))).filter(|(a, b)| a < b).collect();
    early.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(early.len());
    for (a, b) in early {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let mut rest = Vec::with_capacity(merged.len() + 1);
    let mut at = 0;
    for &(a, b) in &merged {
        if a > at {
            rest.push((at, a));
        }
        at = b;
    }
    if at < blocks {
        rest.push((at, blocks));
    }
    let mut buf = vec![0u8; block as usize];
    for (a, b) in merged.into_iter().chain(rest) {
        visit_blocks(file, size, block, a..b, &data, &mut buf, hasher, &mut visit)?;
    }
    Ok(())
}

/// Visits blocks `indices` (in order) of a file whose data lies in `data`.
#[allow(clippy::too_many_arguments)] // the file, which blocks, where its data is, and the visit
fn visit_blocks(file: &File, size: u64, block: u32, indices: std::ops::Range<u64>, data: &[(u64, u64)], buf: &mut [u8], hasher: &ChunkHasher, visit: &mut impl FnMut(Block) -> Result<()>) -> Result<()> {
    let mut next_range = data.partition_point(|r| r.1 <= indices.start * block as u64);
    for i in indices {
        let offset = i * block as u64;
        let len = (size - offset).min(block as u64) as u32;
        let end = offset + len as u64;
        while next_range < data.len() && data[next_range].1 <= offset {
            next_range += 1;
        }
        let has_data = next_range < data.len() && data[next_range].0 < end;
        let id = if has_data {
            let bytes = &mut buf[..len as usize];
            file.read_exact_at(bytes, offset).with_context(|| format!("reading block at {offset}"))?;
            (!is_zero(bytes)).then(|| hasher.id(bytes))
        } else {
            None
        };
        visit(Block { offset, len, id })?;
    }
    Ok(())
}

pub fn is_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = unsafe { data.align_to::<u64>() };
    prefix.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && suffix.iter().all(|&b| b == 0)
}

/// A 32-byte key derived from `material` for `context` (BLAKE3's key derivation).
pub fn derive_key(context: &str, material: &[u8]) -> [u8; 32] {
    blake3::derive_key(context, material)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("ferry-scan-{}-{name}", std::process::id()))
    }

    #[test]
    fn holes_and_zero_blocks_are_zero_ranges_and_data_is_hashed() {
        let path = temp("holes");
        let f = File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap(); // 1 MiB hole
        f.write_all_at(&[7u8; 4096], 128 * 1024).unwrap(); // block 2 of 64 KiB
        f.write_all_at(&[0u8; 65536], 256 * 1024).unwrap(); // explicit zeros: block 4
        f.write_all_at(b"tail", (1 << 20) - 4).unwrap();
        drop(f);
        let f = File::open(&path).unwrap();
        let h = ChunkHasher::new([1; 32]);
        let mut blocks = vec![];
        scan_blocks(&f, 1 << 20, 65536, &h, |b| {
            blocks.push(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(blocks.len(), 16);
        let with_data: Vec<u64> = blocks.iter().filter(|b| b.id.is_some()).map(|b| b.offset / 65536).collect();
        assert_eq!(with_data, vec![2, 15]);
        let mut expect = vec![0u8; 65536];
        expect[..4096].fill(7);
        assert_eq!(blocks[2].id, Some(h.id(&expect)));
        std::fs::remove_file(path).unwrap();
    }

    /// Ranges asked for first (unsorted, overlapping, unaligned, past the end) put their blocks
    /// ahead in order; every block still comes exactly once, with the ID an ordered scan gives.
    #[test]
    fn blocks_asked_for_first_lead_and_every_block_comes_once() {
        let path = temp("first");
        let f = File::create(&path).unwrap();
        f.set_len(10 * 65536 + 100).unwrap();
        for i in 0..11u64 {
            f.write_all_at(&[i as u8 + 1; 512], i * 65536).unwrap();
        }
        drop(f);
        let f = File::open(&path).unwrap();
        let (h, size) = (ChunkHasher::new([1; 32]), 10 * 65536 + 100);
        let collect = |first: &[(u64, u64)]| {
            let mut blocks = vec![];
            scan_blocks_first(&f, size, 65536, first, &h, |b| {
                blocks.push(b);
                Ok(())
            })
            .unwrap();
            blocks
        };
        let ordered = collect(&[]);
        let led = collect(&[(7 * 65536 + 5, 2 * 65536), (3 * 65536, 1), (8 * 65536, 10), (10 * 65536 + 50, 1 << 30), (5 * 65536, 0)]);
        let order: Vec<u64> = led.iter().map(|b| b.offset / 65536).collect();
        assert_eq!(order, vec![3, 7, 8, 9, 10, 0, 1, 2, 4, 5, 6]);
        let mut sorted = led.clone();
        sorted.sort_by_key(|b| b.offset);
        assert_eq!(sorted, ordered);
        assert_eq!(ordered.last().unwrap().len, 100);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_short_last_block_keeps_its_length() {
        let path = temp("short");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[3u8; 100_000]).unwrap();
        drop(f);
        let f = File::open(&path).unwrap();
        let mut blocks = vec![];
        scan_blocks(&f, 100_000, 65536, &ChunkHasher::new([0; 32]), |b| {
            blocks.push(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(blocks.iter().map(|b| b.len).collect::<Vec<_>>(), vec![65536, 100_000 - 65536]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn content_defined_chunks_survive_an_insertion() {
        let mut data = Vec::new();
        let mut x = 99u64;
        for _ in 0..3_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.push((x >> 32) as u8);
        }
        let mut shifted = data.clone();
        shifted.splice(1_000_000..1_000_000, b"an insertion in the middle".iter().copied());
        let ids = |bytes: &[u8], name: &str| {
            let p = temp(name);
            std::fs::write(&p, bytes).unwrap();
            let f = File::open(&p).unwrap();
            let mut v = Vec::new();
            let mut covered = 0u64;
            scan(&f, bytes.len() as u64, Chunker::DEFAULT_CDC, &ChunkHasher::new([1; 32]), |b| {
                assert_eq!(b.offset, covered, "chunks are contiguous");
                assert!(b.len <= 256 << 10);
                covered += b.len as u64;
                v.push(b.id.unwrap());
                Ok(())
            })
            .unwrap();
            assert_eq!(covered, bytes.len() as u64);
            std::fs::remove_file(p).unwrap();
            v
        };
        let (a, b) = (ids(&data, "cdc-a"), ids(&shifted, "cdc-b"));
        let common = b.iter().filter(|id| a.contains(id)).count();
        assert!(a.len() > 20, "about 64 KiB chunks: {}", a.len());
        assert!(common + 3 >= b.len(), "all but the chunks around the insertion are shared: {common} of {}", b.len());
    }

    #[test]
    fn keys_separate_tenants() {
        assert_ne!(ChunkHasher::new([1; 32]).id(b"x"), ChunkHasher::new([2; 32]).id(b"x"));
    }
}
