//! Split throughput on page-heavy input: `cargo run --release -p ferry-migrate --example
//! split_throughput [MiB]`. Prints GB/s for a few feed sizes; asserts nothing about time.
use ferry_migrate::format::{ram, section, FILE_MAGIC, FILE_VERSION};
use ferry_migrate::{Piece, Splitter, PAGE_SIZE};
use std::time::{Duration, Instant};

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("size in MiB"))
        .unwrap_or(512);
    let stream = page_heavy_stream(mib << 20);
    println!(
        "stream: {:.1} MiB, {} pages and {} zero pages",
        stream.bytes.len() as f64 / (1 << 20) as f64,
        stream.pages,
        stream.zero_pages
    );
    for feed in [usize::MAX, 1 << 20, 64 << 10, 9000, 1500] {
        let best = (0..3)
            .map(|_| split_once(&stream.bytes, feed, stream.pages))
            .min()
            .unwrap();
        let label = if feed == usize::MAX {
            "whole stream".to_string()
        } else {
            format!("{feed}-byte feeds")
        };
        println!(
            "{label:>18}: {:6.2} GB/s ({:?})",
            stream.bytes.len() as f64 / best.as_secs_f64() / 1e9,
            best
        );
    }
}

fn split_once(stream: &[u8], feed: usize, pages: u64) -> Duration {
    let mut splitter = Splitter::new();
    let mut seen_pages = 0u64;
    let mut bytes = 0usize;
    // Reads one byte of each page so the pieces are really looked at, without hashing cost.
    let mut consume = |piece: Piece<'_>| match piece {
        Piece::Page { data, .. } => {
            seen_pages += 1;
            bytes += data.len() + usize::from(data[PAGE_SIZE - 1]);
        }
        other => bytes += other.bytes().len(),
    };
    let started = Instant::now();
    for chunk in stream.chunks(feed.min(stream.len())) {
        splitter.feed(chunk, &mut consume);
    }
    splitter.finish(&mut consume);
    let took = started.elapsed();
    assert_eq!(seen_pages, pages);
    assert!(bytes >= stream.len());
    took
}

struct Synthetic {
    bytes: Vec<u8>,
    pages: u64,
    zero_pages: u64,
}

/// Header, a RAM START with one block, then PAGE records (one in eight a ZERO record) in PART
/// sections of 64 MiB, as a first pre-copy round looks.
fn page_heavy_stream(size: usize) -> Synthetic {
    let block = b"pc.ram";
    let block_len = (size / PAGE_SIZE * PAGE_SIZE) as u64;
    let mut s = Vec::with_capacity(size + size / 256);
    s.extend_from_slice(&FILE_MAGIC.to_be_bytes());
    s.extend_from_slice(&FILE_VERSION.to_be_bytes());
    s.push(section::START);
    s.extend_from_slice(&2u32.to_be_bytes());
    s.push(3);
    s.extend_from_slice(b"ram");
    s.extend_from_slice(&0u32.to_be_bytes());
    s.extend_from_slice(&ram::SECTION_VERSION.to_be_bytes());
    s.extend_from_slice(&(block_len | ram::MEM_SIZE).to_be_bytes());
    s.push(block.len() as u8);
    s.extend_from_slice(block);
    s.extend_from_slice(&block_len.to_be_bytes());
    s.extend_from_slice(&ram::EOS.to_be_bytes());
    let (mut pages, mut zero_pages) = (0, 0);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for (i, offset) in (0..block_len).step_by(PAGE_SIZE).enumerate() {
        if i % 16384 == 0 {
            if i > 0 {
                s.extend_from_slice(&ram::EOS.to_be_bytes());
            }
            s.push(section::PART);
            s.extend_from_slice(&2u32.to_be_bytes());
        }
        let continued = if i % 16384 == 0 { 0 } else { ram::CONTINUE };
        let zero = i % 8 == 7;
        let flag = if zero { ram::ZERO } else { ram::PAGE };
        s.extend_from_slice(&(offset | flag | continued).to_be_bytes());
        if continued == 0 {
            s.push(block.len() as u8);
            s.extend_from_slice(block);
        }
        if zero {
            s.push(0);
            zero_pages += 1;
        } else {
            for _ in 0..PAGE_SIZE / 8 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s.extend_from_slice(&state.to_le_bytes());
            }
            pages += 1;
        }
    }
    s.extend_from_slice(&ram::EOS.to_be_bytes());
    Synthetic {
        bytes: s,
        pages,
        zero_pages,
    }
}
