//! The site's store of RAM pages by content ID: every page this site has sent or received in a
//! migration, whichever VM it belonged to. A page the other side already holds travels as a
//! 32-byte reference — on a return trip that is most of the VM's memory.
//!
//! Pages are appended to one file; the index (ID → offset) is a second append-only file read
//! back at start. A torn tail (a crash mid-append) is ignored: the index only names pages whose
//! bytes were written first.
use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const PAGE: usize = 4096;
pub type PageId = [u8; 32];

pub struct PageStore {
    data: BufWriter<File>,
    reader: File,
    index: BufWriter<File>,
    offsets: HashMap<PageId, u64>,
    end: u64,
    /// Fault injection for the lab tests (`FERRY_FAULT=store-forgets-pages`): every so many
    /// reads miss, as a store that lost pages would.
    forget_every: Option<u64>,
    reads: u64,
    dir: std::path::PathBuf,
    peers: HashMap<String, PeerPages>,
}

impl PageStore {
    pub fn open(dir: &Path) -> Result<PageStore> {
        std::fs::create_dir_all(dir)?;
        let data_path = dir.join("pages.dat");
        let data = OpenOptions::new().create(true).append(true).open(&data_path).with_context(|| format!("opening {}", data_path.display()))?;
        let end = data.metadata()?.len() / PAGE as u64 * PAGE as u64;
        let reader = File::open(&data_path)?;
        let index_path = dir.join("pages.idx");
        let mut offsets = HashMap::new();
        if let Ok(mut f) = File::open(&index_path) {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            for rec in buf.chunks_exact(40) {
                let off = u64::from_be_bytes(rec[32..].try_into().unwrap());
                if off + PAGE as u64 <= end {
                    offsets.insert(rec[..32].try_into().unwrap(), off);
                }
            }
        }
        let index = OpenOptions::new().create(true).append(true).open(&index_path)?;
        let forget_every = std::env::var("FERRY_FAULT").is_ok_and(|f| f == "store-forgets-pages").then_some(1000);
        Ok(PageStore { data: BufWriter::with_capacity(1 << 20, data), reader, index: BufWriter::with_capacity(1 << 16, index), offsets, end, forget_every, reads: 0, dir: dir.to_path_buf(), peers: HashMap::new() })
    }

    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    pub fn contains(&self, id: &PageId) -> bool {
        self.offsets.contains_key(id)
    }

    /// Adds a page unless it is already held.
    pub fn insert(&mut self, id: &PageId, page: &[u8]) -> Result<()> {
        debug_assert_eq!(page.len(), PAGE);
        if self.offsets.contains_key(id) {
            return Ok(());
        }
        self.data.write_all(page)?;
        let mut rec = [0u8; 40];
        rec[..32].copy_from_slice(id);
        rec[32..].copy_from_slice(&self.end.to_be_bytes());
        self.index.write_all(&rec)?;
        self.offsets.insert(*id, self.end);
        self.end += PAGE as u64;
        Ok(())
    }

    /// Copies the page into `out`; false if it is not held.
    pub fn read(&mut self, id: &PageId, out: &mut [u8]) -> Result<bool> {
        let Some(&off) = self.offsets.get(id) else { return Ok(false) };
        if self.forget_every.is_some_and(|n| {
            self.reads += 1;
            self.reads.is_multiple_of(n)
        }) {
            return Ok(false);
        }
        if off + PAGE as u64 > self.end - self.data.buffer().len() as u64 {
            self.data.flush()?;
        }
        self.reader.read_exact_at(&mut out[..PAGE], off)?;
        Ok(true)
    }

    /// Writes buffered pages and index records out (index after data, so the index never names
    /// bytes that are not there).
    pub fn flush(&mut self) -> Result<()> {
        self.data.flush()?;
        self.index.flush()?;
        for p in self.peers.values_mut() {
            p.file.flush()?;
        }
        Ok(())
    }

    /// The IDs held, as 8-byte prefixes (what a destination tells a source it holds), at most
    /// `max` of them, leaving out those `peer` is known to hold already (it sent them here or
    /// was sent them from here).
    pub fn prefixes(&mut self, max: usize, peer: &str) -> Vec<u8> {
        let _ = self.peer(peer);
        let known = self.peers.get(peer).map(|k| &k.ids);
        let mut out = Vec::new();
        for id in self.offsets.keys().filter(|id| !known.is_some_and(|k| k.contains(*id))).take(max) {
            out.extend_from_slice(&id[..8]);
        }
        out
    }

    /// Notes that `peer` holds page `id` (it sent it here, or was sent it from here).
    pub fn note_peer_holds(&mut self, peer: &str, id: &PageId) -> Result<()> {
        let known = self.peer(peer)?;
        if known.ids.insert(*id) {
            known.file.write_all(id)?;
        }
        Ok(())
    }

    /// The pages `peer` is known to hold. A site's store can lose pages (wiped, pruned): a
    /// source that refers to one such is asked for it, so this may be optimistic.
    pub fn peer_holds(&mut self, peer: &str) -> Result<HashSet<PageId>> {
        Ok(self.peer(peer)?.ids.clone())
    }

    fn peer(&mut self, peer: &str) -> Result<&mut PeerPages> {
        if !self.peers.contains_key(peer) {
            let safe: String = peer.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
            let path = self.dir.join(format!("peer-{safe}.ids"));
            let mut ids = HashSet::new();
            if let Ok(mut f) = File::open(&path) {
                let mut buf = Vec::new();
                f.read_to_end(&mut buf)?;
                ids.extend(buf.chunks_exact(32).map(|c| <PageId>::try_from(c).unwrap()));
            }
            let file = BufWriter::with_capacity(1 << 16, OpenOptions::new().create(true).append(true).open(&path)?);
            self.peers.insert(peer.to_string(), PeerPages { ids, file });
        }
        Ok(self.peers.get_mut(peer).unwrap())
    }
}

struct PeerPages {
    ids: HashSet<PageId>,
    file: BufWriter<File>,
}

impl Drop for PageStore {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

pub fn prefix(id: &PageId) -> u64 {
    u64::from_be_bytes(id[..8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_survive_a_reopen_and_a_torn_tail_is_ignored() {
        let dir = std::env::temp_dir().join(format!("ferry-pages-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let page = |b: u8| vec![b; PAGE];
        let id = |b: u8| *blake3::hash(&page(b)).as_bytes();
        {
            let mut s = PageStore::open(&dir).unwrap();
            s.insert(&id(1), &page(1)).unwrap();
            s.insert(&id(2), &page(2)).unwrap();
            s.insert(&id(1), &page(1)).unwrap();
            let mut out = vec![0; PAGE];
            assert!(s.read(&id(2), &mut out).unwrap(), "readable before a flush");
            assert_eq!(out, page(2));
            assert_eq!(s.len(), 2);
        }
        // A crash after the index record but before the page's bytes.
        let mut idx = OpenOptions::new().append(true).open(dir.join("pages.idx")).unwrap();
        let mut rec = id(3).to_vec();
        rec.extend_from_slice(&(2 * PAGE as u64).to_be_bytes());
        idx.write_all(&rec).unwrap();
        let mut s = PageStore::open(&dir).unwrap();
        assert_eq!(s.len(), 2);
        assert!(!s.contains(&id(3)));
        let mut out = vec![0; PAGE];
        assert!(s.read(&id(1), &mut out).unwrap());
        assert_eq!(out, page(1));
        assert_eq!(s.prefixes(10, "b").len(), 16);
        s.note_peer_holds("b", &id(1)).unwrap();
        assert_eq!(s.prefixes(10, "b").len(), 8, "what b holds is not listed to b");
        drop(s);
        let mut s = PageStore::open(&dir).unwrap();
        assert!(s.peer_holds("b").unwrap().contains(&id(1)), "remembered across a reopen");
        assert!(s.peer_holds("c").unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
