//! How a stretch of QEMU's migration stream travels: a batch of records, each literal stream
//! bytes, a new RAM page, a reference to a page the destination holds, or a zero page. The
//! destination turns a batch back into exactly the stream bytes it stood for. Records of what
//! the guest wrote to a local disk ride in the same batches, so they reach the destination's
//! disk before any stream byte that follows them (the switchover's device state included).
//! A RAM page equal to a disk block the destination was sent (the guest's page cache holds what
//! it wrote) travels as the place on that disk.
use crate::pages::{PageId, PageStore, PAGE};
use anyhow::{bail, Context, Result};
use std::sync::Mutex;

const LITERAL: u8 = 0;
const PAGE_DATA: u8 = 1;
const PAGE_REF: u8 = 2;
const ZERO_PAGE: u8 = 3;
/// Disk index u8, offset u64, length u32, then the bytes.
const DISK_DATA: u8 = 4;
/// Disk index u8, offset u64, length u32: the range reads as zeros.
const DISK_ZERO: u8 = 5;
/// Disk index u8, then the BLAKE3 digest of the whole disk as the source has it at switchover.
const DISK_DIGEST: u8 = 6;
/// Disk index u8, offset u64, page ID: a RAM page that reads as the destination's disk at that
/// offset should (the ID decides: the block may have changed since).
const DISK_PAGE_REF: u8 = 7;

/// What a disk record asks of the destination's copy of a disk.
pub enum DiskOp<'a> {
    Data { disk: u8, offset: u64, data: &'a [u8] },
    Zero { disk: u8, offset: u64, len: u32 },
    /// Check the whole disk against the source's digest before anything that follows.
    Digest { disk: u8, digest: [u8; 32] },
    /// Read one page of the copy, as it is now, into `out`.
    ReadPage { disk: u8, offset: u64, out: &'a mut [u8] },
}

/// A batch being built; consecutive literals merge into one record.
#[derive(Default)]
pub struct BatchEncoder {
    buf: Vec<u8>,
    /// Where the open literal record's length field is.
    literal_len_at: Option<usize>,
    /// Stream bytes this batch stands for.
    pub stream_len: usize,
}

impl BatchEncoder {
    pub fn literal(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self.literal_len_at {
            Some(at) => {
                let len = u32::from_be_bytes(self.buf[at..at + 4].try_into().unwrap()) as usize + bytes.len();
                self.buf[at..at + 4].copy_from_slice(&(len as u32).to_be_bytes());
            }
            None => {
                self.buf.push(LITERAL);
                self.literal_len_at = Some(self.buf.len());
                self.buf.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            }
        }
        self.buf.extend_from_slice(bytes);
        self.stream_len += bytes.len();
    }

    pub fn page(&mut self, data: &[u8]) {
        self.record(PAGE_DATA, data);
    }

    pub fn page_ref(&mut self, id: &PageId) {
        self.record(PAGE_REF, id);
    }

    /// A page that the destination's copy of `disk` holds at `offset`.
    pub fn disk_page_ref(&mut self, disk: u8, offset: u64, id: &PageId) {
        let mut body = [0u8; 41];
        body[0] = disk;
        body[1..9].copy_from_slice(&offset.to_be_bytes());
        body[9..].copy_from_slice(id);
        self.record(DISK_PAGE_REF, &body);
    }

    pub fn zero_page(&mut self) {
        self.record(ZERO_PAGE, &[]);
    }

    /// A disk range as the guest left it (all zeros travels as a length alone).
    pub fn disk(&mut self, disk: u8, offset: u64, data: &[u8]) {
        self.literal_len_at = None;
        let zero = data.iter().all(|b| *b == 0);
        self.buf.push(if zero { DISK_ZERO } else { DISK_DATA });
        self.buf.push(disk);
        self.buf.extend_from_slice(&offset.to_be_bytes());
        self.buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        if !zero {
            self.buf.extend_from_slice(data);
        }
    }

    /// The whole disk's digest, for the destination to check its copy against.
    pub fn disk_digest(&mut self, disk: u8, digest: &[u8; 32]) {
        self.literal_len_at = None;
        self.buf.push(DISK_DIGEST);
        self.buf.push(disk);
        self.buf.extend_from_slice(digest);
    }

    /// Encoded bytes so far (disk records stand for no stream bytes but still take room).
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    fn record(&mut self, tag: u8, body: &[u8]) {
        self.literal_len_at = None;
        self.buf.push(tag);
        self.buf.extend_from_slice(body);
        self.stream_len += if tag == LITERAL { body.len() } else { PAGE };
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The encoded batch so far; the encoder starts afresh.
    pub fn take(&mut self) -> (Vec<u8>, usize) {
        self.literal_len_at = None;
        let len = std::mem::take(&mut self.stream_len);
        (std::mem::take(&mut self.buf), len)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeStats {
    pub pages_new: u64,
    pub pages_ref: u64,
    pub pages_zero: u64,
    pub literal_bytes: u64,
    /// References this site could not resolve and asked the source for.
    pub pages_fetched: u64,
    /// Pages read from this site's copy of a disk.
    pub pages_disk: u64,
    /// Disk bytes written as data, and as zero ranges.
    pub disk_data: u64,
    pub disk_zero: u64,
}

/// Appends the stream bytes `batch` stands for to `out`, taking referenced pages from `store`
/// and adding the new ones to it (named by `page_id`). A referenced page the store lacks comes
/// from `fetch` (the source, asked over the session), checked against its ID. The store is
/// locked per page, never across `fetch`'s wait for the network.
#[allow(clippy::too_many_arguments)] // each argument is one of the decoder's distinct sinks or sources
pub fn decode(
    batch: &[u8],
    store: &Mutex<PageStore>,
    from_peer: &str,
    page_id: impl Fn(&[u8]) -> PageId,
    fetch: &mut dyn FnMut(&PageId) -> Result<Vec<u8>>,
    disk: &mut dyn FnMut(DiskOp<'_>) -> Result<()>,
    out: &mut Vec<u8>,
    stats: &mut DecodeStats,
) -> Result<()> {
    let mut at = 0;
    let take = |at: &mut usize, n: usize| -> Result<std::ops::Range<usize>> {
        if batch.len() - *at < n {
            bail!("a batch record is cut short at byte {at} of {}", batch.len());
        }
        *at += n;
        Ok(*at - n..*at)
    };
    while at < batch.len() {
        let tag = batch[at];
        at += 1;
        match tag {
            LITERAL => {
                let len = u32::from_be_bytes(batch[take(&mut at, 4)?].try_into().unwrap()) as usize;
                out.extend_from_slice(&batch[take(&mut at, len)?]);
                stats.literal_bytes += len as u64;
            }
            PAGE_DATA => {
                let page = &batch[take(&mut at, PAGE)?];
                let id = page_id(page);
                let mut store = store.lock().unwrap();
                store.insert(&id, page)?;
                store.note_peer_holds(from_peer, &id)?;
                out.extend_from_slice(page);
                stats.pages_new += 1;
            }
            PAGE_REF => {
                let id: PageId = batch[take(&mut at, 32)?].try_into().unwrap();
                let start = out.len();
                out.resize(start + PAGE, 0);
                resolve(&id, store, &page_id, fetch, &mut out[start..], stats)?;
            }
            DISK_PAGE_REF => {
                let r = take(&mut at, 41)?;
                let (index, offset) = (batch[r.start], u64::from_be_bytes(batch[r.start + 1..r.start + 9].try_into().unwrap()));
                let id: PageId = batch[r.start + 9..r.end].try_into().unwrap();
                let start = out.len();
                out.resize(start + PAGE, 0);
                let read = disk(DiskOp::ReadPage { disk: index, offset, out: &mut out[start..] });
                if read.is_ok() && page_id(&out[start..]) == id {
                    let mut store = store.lock().unwrap();
                    store.insert(&id, &out[start..])?;
                    store.note_peer_holds(from_peer, &id)?;
                    stats.pages_disk += 1;
                } else {
                    // The guest wrote the block again since (or this site has no such disk):
                    // the page is found as any other reference is.
                    resolve(&id, store, &page_id, fetch, &mut out[start..], stats)?;
                }
            }
            ZERO_PAGE => {
                out.resize(out.len() + PAGE, 0);
                stats.pages_zero += 1;
            }
            DISK_DIGEST => {
                let r = take(&mut at, 33)?;
                disk(DiskOp::Digest { disk: batch[r.start], digest: batch[r.start + 1..r.end].try_into().unwrap() })?;
            }
            DISK_DATA | DISK_ZERO => {
                let head = &batch[take(&mut at, 13)?];
                let index = head[0];
                let offset = u64::from_be_bytes(head[1..9].try_into().unwrap());
                let len = u32::from_be_bytes(head[9..13].try_into().unwrap());
                if tag == DISK_DATA {
                    disk(DiskOp::Data { disk: index, offset, data: &batch[take(&mut at, len as usize)?] })?;
                    stats.disk_data += len as u64;
                } else {
                    disk(DiskOp::Zero { disk: index, offset, len })?;
                    stats.disk_zero += len as u64;
                }
            }
            t => bail!("unknown batch record type {t} at byte {}", at - 1),
        }
    }
    Ok(())
}

/// A referenced page into `out`: from the store, else from the source (checked against its ID).
fn resolve(id: &PageId, store: &Mutex<PageStore>, page_id: &impl Fn(&[u8]) -> PageId, fetch: &mut dyn FnMut(&PageId) -> Result<Vec<u8>>, out: &mut [u8], stats: &mut DecodeStats) -> Result<()> {
    let held = store.lock().unwrap().read(id, out).context("reading the page store")?;
    if !held {
        let page = fetch(id)?;
        if page.len() != PAGE || page_id(&page) != *id {
            bail!("the source referred to page {} which neither side holds", ferry_transfer::sender::hex(&id[..8]));
        }
        store.lock().unwrap().insert(id, &page)?;
        out.copy_from_slice(&page);
        stats.pages_fetched += 1;
    }
    stats.pages_ref += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_decodes_to_the_stream_it_stood_for() {
        let dir = std::env::temp_dir().join(format!("ferry-batch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Mutex::new(PageStore::open(&dir).unwrap());
        let id = |p: &[u8]| *blake3::hash(p).as_bytes();
        let a = vec![7u8; PAGE];
        let mut e = BatchEncoder::default();
        e.literal(b"QEVM");
        e.literal(b"\0\0\0\x03");
        e.page(&a);
        e.zero_page();
        e.literal(b"tail");
        let (first, len) = e.take();
        let mut out = Vec::new();
        let mut stats = DecodeStats::default();
        let mut no_fetch = |_: &PageId| -> Result<Vec<u8>> { anyhow::bail!("not at the source") };
        let mut no_disk = |_: DiskOp<'_>| -> Result<()> { anyhow::bail!("no disk here") };
        decode(&first, &store, "a", id, &mut no_fetch, &mut no_disk, &mut out, &mut stats).unwrap();
        let mut want = b"QEVM\0\0\0\x03".to_vec();
        want.extend_from_slice(&a);
        want.extend_from_slice(&[0; PAGE]);
        want.extend_from_slice(b"tail");
        assert_eq!(out, want);
        assert_eq!(len, want.len());
        // A later batch refers to the page the first one carried.
        e.page_ref(&id(&a));
        let (second, _) = e.take();
        assert_eq!(second.len(), 33);
        out.clear();
        decode(&second, &store, "a", id, &mut no_fetch, &mut no_disk, &mut out, &mut stats).unwrap();
        assert_eq!(out, a);
        assert_eq!((stats.pages_new, stats.pages_ref, stats.pages_zero, stats.literal_bytes), (1, 1, 1, 12));
        // What the store does not hold, or a cut record, is an error, never wrong bytes.
        e.page_ref(&[9; 32]);
        let (unknown, _) = e.take();
        assert!(decode(&unknown, &store, "a", id, &mut no_fetch, &mut no_disk, &mut out, &mut stats).unwrap_err().to_string().contains("not at the source"));
        // Fetched from the source: checked against its ID, then kept.
        let b = vec![5u8; PAGE];
        e.page_ref(&id(&b));
        let (wanted, _) = e.take();
        let mut lying = |_: &PageId| Ok(vec![6u8; PAGE]);
        assert!(decode(&wanted, &store, "a", id, &mut lying, &mut no_disk, &mut Vec::new(), &mut stats).unwrap_err().to_string().contains("neither side holds"));
        let mut honest = |_: &PageId| Ok(vec![5u8; PAGE]);
        out.clear();
        decode(&wanted, &store, "a", id, &mut honest, &mut no_disk, &mut out, &mut stats).unwrap();
        assert_eq!((out.as_slice(), stats.pages_fetched), (b.as_slice(), 1));
        assert!(store.lock().unwrap().contains(&id(&b)));
        assert!(decode(&first[..first.len() - 1], &store, "a", id, &mut no_fetch, &mut no_disk, &mut Vec::new(), &mut stats).unwrap_err().to_string().contains("cut short"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn disk_records_reach_the_disk_in_place_and_stand_for_no_stream_bytes() {
        let dir = std::env::temp_dir().join(format!("ferry-batch-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Mutex::new(PageStore::open(&dir).unwrap());
        let mut e = BatchEncoder::default();
        e.literal(b"ab");
        e.disk(1, 1 << 30, &[3u8; 100]);
        e.disk(0, 4096, &[0u8; 65536]);
        e.literal(b"cd");
        e.disk_digest(2, &[9; 32]);
        let (b, len) = e.take();
        assert_eq!(len, 4);
        assert_eq!(b.len(), 5 + 2 + (1 + 13 + 100) + (1 + 13) + 5 + 2 + 34, "a zero range travels as its length");
        let mut writes = Vec::new();
        let mut disk = |w: DiskOp<'_>| -> Result<()> {
            writes.push(match w {
                DiskOp::Data { disk, offset, data } => (disk, offset, data.len() as u32, data[0]),
                DiskOp::Zero { disk, offset, len } => (disk, offset, len, 0),
                DiskOp::Digest { disk, digest } => (disk, 0, 32, digest[0]),
                DiskOp::ReadPage { .. } => unreachable!("no page refers to a disk here"),
            });
            Ok(())
        };
        let (mut out, mut stats) = (Vec::new(), DecodeStats::default());
        let mut no_fetch = |_: &PageId| -> Result<Vec<u8>> { anyhow::bail!("not at the source") };
        decode(&b, &store, "a", |p| *blake3::hash(p).as_bytes(), &mut no_fetch, &mut disk, &mut out, &mut stats).unwrap();
        assert_eq!(out, b"abcd");
        assert_eq!(writes, vec![(1, 1 << 30, 100, 3), (0, 4096, 65536, 0), (2, 0, 32, 9)]);
        assert_eq!((stats.disk_data, stats.disk_zero), (100, 65536));
        let mut disk = |_: DiskOp<'_>| -> Result<()> { Ok(()) };
        assert!(decode(&b[..b.len() - 20], &store, "a", |p| *blake3::hash(p).as_bytes(), &mut no_fetch, &mut disk, &mut Vec::new(), &mut stats).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_page_found_on_the_destinations_disk_is_read_from_there_and_checked() {
        let dir = std::env::temp_dir().join(format!("ferry-batch-diskref-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Mutex::new(PageStore::open(&dir).unwrap());
        let id = |p: &[u8]| *blake3::hash(p).as_bytes();
        // The destination's copy of disk 0: page 1 holds what the guest wrote.
        let mut copy = vec![0u8; 4 * PAGE];
        copy[PAGE..2 * PAGE].fill(4);
        let written = vec![4u8; PAGE];
        let rewritten = vec![8u8; PAGE];
        let mut e = BatchEncoder::default();
        e.disk_page_ref(0, PAGE as u64, &id(&written));
        // Refers to a page the guest has since written again: the disk no longer holds it.
        e.disk_page_ref(0, 2 * PAGE as u64, &id(&rewritten));
        let (b, len) = e.take();
        assert_eq!((b.len(), len), (2 * 42, 2 * PAGE));
        let mut disk = |op: DiskOp<'_>| -> Result<()> {
            match op {
                DiskOp::ReadPage { disk: 0, offset, out } => {
                    out.copy_from_slice(&copy[offset as usize..offset as usize + PAGE]);
                    Ok(())
                }
                _ => anyhow::bail!("unexpected disk op"),
            }
        };
        let mut asked = Vec::new();
        let mut fetch = |want: &PageId| -> Result<Vec<u8>> {
            asked.push(*want);
            Ok(rewritten.clone())
        };
        let (mut out, mut stats) = (Vec::new(), DecodeStats::default());
        decode(&b, &store, "a", id, &mut fetch, &mut disk, &mut out, &mut stats).unwrap();
        assert_eq!(&out[..PAGE], written.as_slice());
        assert_eq!(&out[PAGE..], rewritten.as_slice());
        assert_eq!(asked, vec![id(&rewritten)], "only the page the disk no longer holds is asked for");
        assert_eq!((stats.pages_disk, stats.pages_fetched), (1, 1));
        assert!(store.lock().unwrap().contains(&id(&written)), "a page read from the disk is kept like any other");
        // A site without that disk asks the source; a lying source is refused.
        let mut no_disk = |_: DiskOp<'_>| -> Result<()> { anyhow::bail!("no disk here") };
        let mut lying = |_: &PageId| Ok(vec![6u8; PAGE]);
        let mut e = BatchEncoder::default();
        e.disk_page_ref(3, 0, &id(&[9u8; PAGE]));
        let (b, _) = e.take();
        assert!(decode(&b, &store, "a", id, &mut lying, &mut no_disk, &mut Vec::new(), &mut stats).unwrap_err().to_string().contains("neither side holds"));
        assert!(decode(&b[..30], &store, "a", id, &mut lying, &mut no_disk, &mut Vec::new(), &mut stats).unwrap_err().to_string().contains("cut short"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
