//! Chunks the receiver already holds: its older copy of the object, or a base image, indexed by
//! chunk ID. A chunk taken from here is re-hashed as it is read, so a file changed since it was
//! indexed can never put wrong bytes into an object.
use crate::scan::{scan, ChunkHasher, ChunkId, Chunker};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Default)]
pub struct LocalChunks {
    files: Vec<(PathBuf, File)>,
    by_id: HashMap<ChunkId, (u32, u64, u32)>,
}

impl LocalChunks {
    /// Indexes `path` in blocks of `block` bytes (holes and zero blocks cost nothing).
    pub fn add_file(&mut self, path: &Path, chunker: Chunker, hasher: &ChunkHasher) -> Result<usize> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        let file_index = self.files.len() as u32;
        let before = self.by_id.len();
        scan(&file, size, chunker, hasher, |b| {
            if let Some(id) = b.id {
                self.by_id.entry(id).or_insert((file_index, b.offset, b.len));
            }
            Ok(())
        })?;
        self.files.push((path.to_path_buf(), file));
        Ok(self.by_id.len() - before)
    }

    /// Adds a file whose blocks are already known (a committed object's index): no re-hashing
    /// now; `read` verifies each chunk it serves.
    pub fn add_indexed(&mut self, path: &Path, blocks: &[crate::scan::Block]) -> Result<usize> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let file_index = self.files.len() as u32;
        let before = self.by_id.len();
        for b in blocks {
            if let Some(id) = b.id {
                self.by_id.entry(id).or_insert((file_index, b.offset, b.len));
            }
        }
        self.files.push((path.to_path_buf(), file));
        Ok(self.by_id.len() - before)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.by_id.contains_key(id)
    }

    /// Reads the chunk into `buf` (its exact length) if held and still intact.
    pub fn read(&self, id: &ChunkId, buf: &mut [u8], hasher: &ChunkHasher) -> Result<bool> {
        let Some(&(file, offset, len)) = self.by_id.get(id) else { return Ok(false) };
        if len as usize != buf.len() {
            return Ok(false);
        }
        self.files[file as usize].1.read_exact_at(buf, offset)?;
        Ok(&hasher.id(buf) == id)
    }
}
