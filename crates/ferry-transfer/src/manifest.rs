//! The object digest DONE carries: BLAKE3 over the ordered list of blocks (offset, length, and
//! chunk ID or "zero"). Every chunk is verified against its ID as it is placed, so this digest
//! pins every byte of the object, and both sides compute it without re-reading the file.
use crate::scan::Block;

pub struct ObjectDigest {
    hasher: blake3::Hasher,
    size: u64,
}

impl ObjectDigest {
    pub fn new(chunker: &crate::scan::Chunker, object_size: u64) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("ferry object digest v1");
        for p in chunker.digest_params() {
            hasher.update(&p.to_be_bytes());
        }
        hasher.update(&object_size.to_be_bytes());
        ObjectDigest { hasher, size: 0 }
    }

    pub fn add(&mut self, b: &Block) {
        self.hasher.update(&b.offset.to_be_bytes()).update(&b.len.to_be_bytes());
        match &b.id {
            Some(id) => self.hasher.update(&[1]).update(id),
            None => self.hasher.update(&[0]),
        };
        self.size = self.size.max(b.offset + b.len as u64);
    }

    /// Bytes covered so far (the end of the last block).
    pub fn covered(&self) -> u64 {
        self.size
    }

    pub fn finish(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }
}
