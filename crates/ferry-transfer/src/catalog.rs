//! The receiver's content store: for every object it committed, the list of its blocks (offset,
//! length, chunk ID), kept under DATA/.ferry/index. Any chunk in any committed object can then
//! be reused by a later transfer without re-hashing the object (reads are still verified).
use crate::scan::{Block, ChunkId};
use anyhow::{bail, Context, Result};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FERRYIX1";

pub fn index_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(".ferry/index")
}

fn index_path(data_dir: &Path, object: &str) -> PathBuf {
    index_dir(data_dir).join(format!("{}.idx", &blake3::hash(object.as_bytes()).to_hex()[..32]))
}

pub struct ObjectIndex {
    pub object: String,
    pub size: u64,
    pub blocks: Vec<Block>,
}

/// Records a committed object's blocks (written beside the data, replaced atomically).
pub fn record(data_dir: &Path, object: &str, size: u64, blocks: &[Block]) -> Result<()> {
    let path = index_path(data_dir, object);
    std::fs::create_dir_all(path.parent().unwrap())?;
    let tmp = path.with_extension("tmp");
    let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
    w.write_all(MAGIC)?;
    w.write_all(&(object.len() as u32).to_be_bytes())?;
    w.write_all(object.as_bytes())?;
    w.write_all(&size.to_be_bytes())?;
    w.write_all(&(blocks.iter().filter(|b| b.id.is_some()).count() as u64).to_be_bytes())?;
    for b in blocks {
        if let Some(id) = &b.id {
            w.write_all(&b.offset.to_be_bytes())?;
            w.write_all(&b.len.to_be_bytes())?;
            w.write_all(id)?;
        }
    }
    w.into_inner()?.sync_all()?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

pub fn forget(data_dir: &Path, object: &str) {
    let _ = std::fs::remove_file(index_path(data_dir, object));
}

pub fn load(path: &Path) -> Result<ObjectIndex> {
    let mut r = BufReader::new(std::fs::File::open(path)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        bail!("{} is not a ferry index", path.display());
    }
    let name_len = read_u32(&mut r)? as usize;
    if name_len > 4096 {
        bail!("{}: corrupt name length", path.display());
    }
    let mut name = vec![0u8; name_len];
    r.read_exact(&mut name)?;
    let size = read_u64(&mut r)?;
    let count = read_u64(&mut r)?;
    if count > size / 512 + 1 {
        bail!("{}: corrupt block count", path.display());
    }
    let mut blocks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let offset = read_u64(&mut r)?;
        let len = read_u32(&mut r)?;
        let mut id: ChunkId = [0; 32];
        r.read_exact(&mut id)?;
        blocks.push(Block { offset, len, id: Some(id) });
    }
    Ok(ObjectIndex { object: String::from_utf8(name).context("object name")?, size, blocks })
}

/// Hashes an object in place (aligned blocks, the disk images' chunking) and records its index:
/// an object that arrived some other way (copied in by hand, left by a VM that moved out) joins
/// the content store. Returns the number of data blocks.
pub fn index_file(data_dir: &Path, object: &str, path: &Path, hasher: &crate::scan::ChunkHasher, block: u32) -> Result<usize> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut blocks = Vec::new();
    crate::scan::scan(&file, size, crate::scan::Chunker::Fixed { block }, hasher, |b| {
        blocks.push(b);
        Ok(())
    })?;
    record(data_dir, object, size, &blocks)?;
    Ok(blocks.iter().filter(|b| b.id.is_some()).count())
}

/// Whether the object's index describes it as it is now: written no earlier than the object
/// was last modified (a running VM's disk changes in place after it is indexed).
pub fn is_current(data_dir: &Path, object: &str, object_path: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (modified(&index_path(data_dir, object)), modified(object_path)) {
        (Some(index), Some(data)) => index >= data,
        _ => false,
    }
}

/// Every recorded object (unreadable index files are skipped: they only cost reuse).
pub fn all(data_dir: &Path) -> Vec<ObjectIndex> {
    let Ok(dir) = std::fs::read_dir(index_dir(data_dir)) else { return vec![] };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "idx"))
        .filter_map(|e| load(&e.path()).map_err(|err| tracing::warn!("skipping index: {err:#}")).ok())
        .collect()
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
