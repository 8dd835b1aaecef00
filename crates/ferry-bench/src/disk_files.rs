//! The disk files of `ferry bench live --disk`: placing the image versions where each method
//! wants them, and checking a move. The guest writes only inside its record ring, so outside the
//! ring the destination must hold exactly what the source held (a digest that ignores how sparse
//! either file is), and inside it every record the source held at switchover
//! (`ferry_lab::disk_records::check_moved`).
use anyhow::{bail, ensure, Context, Result};
use ferry_lab::disk_records::{self, MoveCheck};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const BLOCK: u64 = 64 << 10;

/// The guest's record ring on its disk: `ferry.disk_offset`, `ferry.disk_span`.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub offset: u64,
    pub span: u64,
}

impl Ring {
    /// A `span`-byte ring starting 128 MiB before the end of a `disk_size`-byte disk (in its
    /// last 256 MiB, which the lab's images leave unused), 64 KiB aligned.
    pub fn near_end(disk_size: u64, span: u64) -> Result<Ring> {
        ensure!(span.is_multiple_of(BLOCK) && span > 0 && span <= 128 << 20, "the ring's span must be a multiple of 64 KiB up to 128 MiB");
        let offset = disk_size.checked_sub(128 << 20).context("the disk is smaller than 128 MiB")? / BLOCK * BLOCK;
        Ok(Ring { offset, span })
    }

    fn end(&self) -> u64 {
        self.offset + self.span
    }

    /// The workload words that make the guest write records to `/dev/vda` at `rate` (e.g. `2M`).
    pub fn workload(&self, rate: &str) -> String {
        format!("ferry.disk=/dev/vda ferry.disk_rate={rate} ferry.disk_offset={} ferry.disk_span={}", self.offset, self.span)
    }
}

/// Copies `from` to `to` keeping holes (making `to`'s directory), then clears the ring: a
/// guest's records from an earlier run would read as out of place.
pub fn place(from: &Path, to: &Path, ring: Ring) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(to);
    let st = Command::new("cp").arg("--sparse=always").arg(from).arg(to).status()?;
    ensure!(st.success(), "copying {} to {}", from.display(), to.display());
    punch(to, ring.offset, ring.span)
}

/// An empty (all-hole) file of `size` bytes at `path`: the target libvirt pre-creates.
pub fn empty(path: &Path, size: u64) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    Ok(())
}

fn punch(path: &Path, offset: u64, len: u64) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64) };
    if r != 0 {
        bail!("clearing [{offset}, {}) of {}: {}", offset + len, path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// The next byte at or after `at` that may hold data (SEEK_DATA), or `size` if none does.
fn next_data(f: &File, at: u64, size: u64) -> u64 {
    let r = unsafe { libc::lseek(f.as_raw_fd(), at as i64, libc::SEEK_DATA) };
    if r < 0 {
        size
    } else {
        r as u64
    }
}

/// A digest of the disk outside the ring that does not depend on how sparse the file is: the
/// offset and bytes of every 64 KiB block that is not all zeros.
pub fn digest_outside(path: &Path, ring: Ring) -> Result<String> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut at = 0;
    loop {
        let data = next_data(&f, at, size);
        if data >= size {
            break;
        }
        let block = data / BLOCK * BLOCK;
        at = block + BLOCK;
        if block >= ring.offset && block < ring.end() {
            at = ring.end();
            continue;
        }
        let n = BLOCK.min(size - block) as usize;
        f.read_exact_at(&mut buf[..n], block).with_context(|| format!("reading {} at {block}", path.display()))?;
        if buf[..n].iter().any(|&b| b != 0) {
            h.update(&block.to_le_bytes());
            h.update(&buf[..n]);
        }
    }
    h.update(&size.to_le_bytes());
    Ok(h.finalize().to_hex().to_string())
}

/// A file of `from`'s size holding only `from`'s ring: what `check_moved` needs of a source
/// whose disk a later move overwrites.
pub fn keep_ring(from: &Path, to: &Path, ring: Ring) -> Result<()> {
    let src = File::open(from)?;
    let size = src.metadata()?.len();
    empty(to, size)?;
    let dst = OpenOptions::new().write(true).open(to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = ring.offset;
    while at < ring.end() {
        let n = (ring.end() - at).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], at)?;
        dst.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The verdict on one move: the ring compared record by record and the rest by digest
/// (`source_outside`: the source's digest at switchover, if taken earlier).
pub fn verify(source: &Path, source_outside: Option<&str>, dest: &Path, ring: Ring) -> Result<MoveCheck> {
    let check = disk_records::check_moved(source, dest, ring.offset, ring.span)?;
    ensure!(check.source_max_seq > 0, "the source's disk holds no record: the guest did not write ({check})");
    ensure!(check.compared_any(), "the guest went once round its whole ring at the destination, so the ring cannot be judged ({check})");
    ensure!(check.dest_max_seq > check.source_max_seq, "the guest wrote no record at the destination ({check})");
    let at_source = match source_outside {
        Some(d) => d.to_string(),
        None => digest_outside(source, ring)?,
    };
    ensure!(digest_outside(dest, ring)? == at_source, "the destination's disk differs from the source's outside the guest's ring");
    Ok(check)
}

/// The least a move to a site holding `older` must send of `newer`: its 64 KiB blocks (within
/// `[start, end)`) that differ from `older` and are not zeros, each compressed as ferry
/// compresses (raw bytes, compressed bytes).
pub fn changed_compressed(older: &Path, newer: &Path, start: u64, end: u64) -> Result<(u64, u64)> {
    let (a, b) = (File::open(older)?, File::open(newer)?);
    let end = end.min(b.metadata()?.len());
    let mut compressor = ferry_transfer::compress::Compressor::new(1)?;
    let (mut ba, mut bb) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    let (mut raw, mut packed) = (0u64, 0u64);
    let mut off = start;
    while off < end {
        // Where neither file has data, both read as zeros: skip to the next data.
        let data = next_data(&a, off, end).min(next_data(&b, off, end)) / BLOCK * BLOCK;
        if data > off {
            off = data;
            continue;
        }
        let n = BLOCK.min(end - off) as usize;
        read_full(&b, &mut bb[..n], off)?;
        read_full(&a, &mut ba[..n], off)?;
        if ba[..n] != bb[..n] && bb[..n].iter().any(|&x| x != 0) {
            raw += n as u64;
            packed += compressor.compress(&bb[..n])?.map_or(n, |z| z.len()) as u64;
        }
        off += n as u64;
    }
    Ok((raw, packed))
}

/// Fills `buf` from `off`; past the end of a shorter file, zeros.
pub fn read_full(f: &File, buf: &mut [u8], off: u64) -> Result<()> {
    buf.fill(0);
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-disk-files-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    #[test]
    fn the_digest_ignores_holes_zeros_and_the_ring() {
        let ring = Ring { offset: 4 * BLOCK, span: 2 * BLOCK };
        let (a, b) = (tmp("a.raw"), tmp("b.raw"));
        empty(&a, 10 * BLOCK).unwrap();
        empty(&b, 10 * BLOCK).unwrap();
        let (fa, fb) = (OpenOptions::new().write(true).open(&a).unwrap(), OpenOptions::new().write(true).open(&b).unwrap());
        fa.write_all_at(b"data", 1000).unwrap();
        fb.write_all_at(b"data", 1000).unwrap();
        fb.write_all_at(&vec![0u8; BLOCK as usize], 7 * BLOCK).unwrap(); // allocated zeros
        fa.write_all_at(b"ring", 4 * BLOCK + 5).unwrap(); // inside the ring
        assert_eq!(digest_outside(&a, ring).unwrap(), digest_outside(&b, ring).unwrap());
        fb.write_all_at(b"x", 9 * BLOCK + 1).unwrap();
        assert_ne!(digest_outside(&a, ring).unwrap(), digest_outside(&b, ring).unwrap());

        let (raw, packed) = changed_compressed(&a, &b, 0, 10 * BLOCK).unwrap();
        assert_eq!(raw, BLOCK); // the block with "x"; the zero block and equal data do not count
        assert!(packed > 0 && packed < BLOCK);
        let kept = tmp("kept.raw");
        keep_ring(&a, &kept, ring).unwrap();
        let mut buf = [0u8; 4];
        File::open(&kept).unwrap().read_exact_at(&mut buf, 4 * BLOCK + 5).unwrap();
        assert_eq!(&buf, b"ring");
        let _ = std::fs::remove_dir_all(a.parent().unwrap());
    }

    #[test]
    fn the_ring_sits_near_the_end() {
        let r = Ring::near_end(4 << 30, 64 << 20).unwrap();
        assert_eq!(r.offset, (4 << 30) - (128 << 20));
        assert!(r.workload("2M").contains("ferry.disk_offset=4160749568 ferry.disk_span=67108864"));
        assert!(Ring::near_end(4 << 30, 1000).is_err());
    }
}
