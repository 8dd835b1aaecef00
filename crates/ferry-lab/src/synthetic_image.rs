//! A quick stand-in for a disk image, for the demo and tests that cannot wait for debootstrap:
//! a sparse raw file whose 64 KiB blocks are text-like (compressible), random (not), or holes,
//! and a "newer version" of it with a share of its blocks rewritten in place.
use anyhow::{Context, Result};
use std::os::unix::fs::FileExt;
use std::path::Path;

const BLOCK: usize = 65536;
const TEXT: &[u8] = b"ferry moves running virtual machines between clouds; only what the destination lacks crosses the wire. ";

/// Writes a sparse image of `size` bytes: of every 8 blocks, 3 are holes, 4 text-like, 1 random.
pub fn write_image(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let mut rng = seed | 1;
    let mut block = vec![0u8; BLOCK];
    for i in 0..size as usize / BLOCK {
        match i % 8 {
            0..=2 => continue,
            3..=6 => block.iter_mut().enumerate().for_each(|(j, b)| *b = TEXT[(j + i * 7) % TEXT.len()]),
            _ => fill_random(&mut block, &mut rng),
        }
        // A block number makes every block distinct, as on a real disk.
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        f.write_all_at(&block, (i * BLOCK) as u64)?;
    }
    Ok(())
}

/// Rewrites every `every`-th data block of the image in place; returns the bytes rewritten.
pub fn change_blocks(path: &Path, every: usize, seed: u64) -> Result<u64> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    let blocks = f.metadata()?.len() as usize / BLOCK;
    let mut rng = seed | 1;
    let mut block = vec![0u8; BLOCK];
    let mut changed = 0u64;
    for i in (3..blocks).step_by(every.max(1)) {
        f.read_exact_at(&mut block, (i * BLOCK) as u64)?;
        let mut patch = [0u8; 64];
        fill_random(&mut patch, &mut rng);
        block[512..576].copy_from_slice(&patch);
        f.write_all_at(&block, (i * BLOCK) as u64)?;
        changed += BLOCK as u64;
    }
    Ok(changed)
}

fn fill_random(buf: &mut [u8], state: &mut u64) {
    for b in buf {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *b = (*state >> 24) as u8;
    }
}
