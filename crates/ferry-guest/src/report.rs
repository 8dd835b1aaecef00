//! The stdout lines other ferry code greps for. Their formats are a contract:
//! change them only together with the readers.
//!
//! Write errors are ignored on purpose: losing the console must not stop the
//! workload (and `println!` would panic).

use std::io::{self, Write};
use std::path::Path;

use crate::content::PageClass;
use crate::workload::Stats;

/// What the fill produced, for the one-off `ferry-ready` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillSummary {
    pub mem_bytes: u64,
    pub pages: u64,
    pub fill_ms: u128,
    /// Pages per class, indexed by [`PageClass::index`].
    pub class_pages: [u64; PageClass::COUNT],
}

pub fn heartbeat(out: &mut impl Write, seq: u64, up_ms: u128, stats: &Stats) {
    let _ = writeln!(
        out,
        "ferry-hb seq={seq} up_ms={up_ms} filled={} dirtied_total={} verified_total={} corrupt={}",
        stats.filled_pages, stats.dirtied_pages, stats.verified_pages, stats.corrupt_pages
    );
    let _ = out.flush();
}

pub fn ready(out: &mut impl Write, summary: &FillSummary) {
    let [cache, text, random, zero] = summary.class_pages;
    let _ = writeln!(
        out,
        "ferry-ready mem={} pages={} fill_ms={} cache={cache} text={text} random={random} zero={zero}",
        summary.mem_bytes, summary.pages, summary.fill_ms
    );
    let _ = out.flush();
}

/// Not flushed here: the verifier may report several in one slice; the main
/// loop flushes after each slice.
pub fn corrupt(out: &mut impl Write, page: usize, class: PageClass) {
    let _ = writeln!(out, "ferry-corrupt page={page} class={}", class.name());
}

/// The disk writer's one-off start line.
pub fn disk_started(
    out: &mut impl Write,
    path: &Path,
    offset: u64,
    span: u64,
    slots: u64,
    bytes_per_sec: u64,
    seed: u64,
) {
    let _ = writeln!(
        out,
        "ferry-guest: disk {} offset={offset} span={span} slots={slots} rate={bytes_per_sec} seed={seed}",
        path.display()
    );
    let _ = out.flush();
}

/// `seq` is the last record written and synced (0 before the first).
pub fn disk_progress(out: &mut impl Write, seq: u64, errors: u64) {
    let _ = writeln!(out, "ferry-guest: disk seq={seq} errors={errors}");
    let _ = out.flush();
}

/// `record` is the sequence number and offset of the record that failed, if
/// the error is about one.
pub fn disk_error(out: &mut impl Write, record: Option<(u64, u64)>, error: &io::Error) {
    let _ = match record {
        Some((seq, offset)) => {
            writeln!(
                out,
                "ferry-guest: disk error seq={seq} offset={offset}: {error}"
            )
        }
        None => writeln!(out, "ferry-guest: disk error: {error}"),
    };
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(write: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        write(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn line_formats_match_the_contract() {
        let stats = Stats {
            filled_pages: 4096,
            dirtied_pages: 512,
            verified_pages: 9000,
            corrupt_pages: 0,
        };
        assert_eq!(
            render(|out| heartbeat(out, 3, 2004, &stats)),
            "ferry-hb seq=3 up_ms=2004 filled=4096 dirtied_total=512 verified_total=9000 corrupt=0\n"
        );
        let summary = FillSummary {
            mem_bytes: 16 << 20,
            pages: 4096,
            fill_ms: 120,
            class_pages: [1639, 819, 819, 819],
        };
        assert_eq!(
            render(|out| ready(out, &summary)),
            "ferry-ready mem=16777216 pages=4096 fill_ms=120 cache=1639 text=819 random=819 zero=819\n"
        );
        assert_eq!(
            render(|out| corrupt(out, 17, PageClass::Random)),
            "ferry-corrupt page=17 class=random\n"
        );
        assert_eq!(
            render(|out| disk_started(out, Path::new("/dev/vda"), 0, 64 << 20, 1024, 2 << 20, 1)),
            "ferry-guest: disk /dev/vda offset=0 span=67108864 slots=1024 rate=2097152 seed=1\n"
        );
        assert_eq!(
            render(|out| disk_progress(out, 321, 0)),
            "ferry-guest: disk seq=321 errors=0\n"
        );
        assert_eq!(
            render(|out| disk_error(out, Some((5, 65536)), &io::Error::other("EIO"))),
            "ferry-guest: disk error seq=5 offset=65536: EIO\n"
        );
        assert_eq!(
            render(|out| disk_error(out, None, &io::Error::other("no such device"))),
            "ferry-guest: disk error: no such device\n"
        );
    }
}
