//! The memory workload: fill the region with the configured mix, then keep
//! rewriting pages at the configured rate while verifying every page against
//! the checksum recorded when it was last written.
//!
//! One thread does all three, interleaved, so the dirtier and the verifier
//! can never race on a page: any checksum mismatch is corruption from outside
//! the process (in practice: from the migration under test).

use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::config::{Config, Mix};
use crate::content::{fill_random, fill_text, page_checksum, PageClass, Prng};
use crate::corpus::CorpusReader;
use crate::memory::{PageRegion, PAGE_SIZE};
use crate::report;

/// How many pages to process between clock reads: often enough to honour
/// deadlines on a slow emulated CPU, rarely enough that reading the clock is
/// not a cost of its own.
const PAGES_PER_CLOCK_CHECK: u64 = 8;

/// PRNG stream purposes (see [`Prng::stream`]).
const STREAM_PLAN: u64 = 1;
const STREAM_CONTENT: u64 = 2;
const STREAM_DIRTY_CHOICE: u64 = 3;

/// Counters reported in the heartbeat.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub filled_pages: u64,
    pub dirtied_pages: u64,
    pub verified_pages: u64,
    pub corrupt_pages: u64,
}

pub struct Workload {
    region: PageRegion,
    /// Class each page holds (planned before the fill, actual after it).
    classes: Vec<PageClass>,
    /// Checksum of what each page must contain.
    expected_checksums: Vec<u64>,
    /// Pages per class actually written, indexed by [`PageClass::index`].
    class_pages: [u64; PageClass::COUNT],
    corpus: CorpusReader,
    content_rng: Prng,
    dirty_choice_rng: Prng,
    dirty_budget: DirtyBudget,
    /// When dirtying began (the end of the fill); the budget counts from here.
    dirty_started: Option<Instant>,
    verify_cursor: usize,
    stats: Stats,
}

impl Workload {
    pub fn new(config: &Config, corpus: CorpusReader) -> Result<Workload, String> {
        let pages = usize::try_from(config.mem_bytes / PAGE_SIZE as u64)
            .map_err(|_| "memory size too large for this machine".to_string())?;
        let region = PageRegion::new(pages)
            .ok_or_else(|| format!("cannot allocate {} bytes of memory", config.mem_bytes))?;
        let mut plan_rng = Prng::stream(config.seed, STREAM_PLAN);
        Ok(Workload {
            region,
            classes: plan_classes(pages, &config.mix, &mut plan_rng),
            expected_checksums: vec![0; pages],
            class_pages: [0; PageClass::COUNT],
            corpus,
            content_rng: Prng::stream(config.seed, STREAM_CONTENT),
            dirty_choice_rng: Prng::stream(config.seed, STREAM_DIRTY_CHOICE),
            dirty_budget: DirtyBudget::new(config.dirty_bytes_per_sec),
            dirty_started: None,
            verify_cursor: 0,
            stats: Stats::default(),
        })
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn pages(&self) -> usize {
        self.region.pages()
    }

    pub fn class_pages(&self, class: PageClass) -> u64 {
        self.class_pages[class.index()]
    }

    pub fn is_filled(&self) -> bool {
        self.region.initialised_pages() == self.region.pages()
    }

    /// Fills pages in order until the region is full or `deadline` passes
    /// (always at least one page, so progress is guaranteed). Returns whether
    /// the region is now full.
    pub fn fill_until(&mut self, deadline: Instant) -> bool {
        let mut written = 0u64;
        while let Some((index, page)) = self.region.initialise_next() {
            let class = write_content(
                page,
                self.classes[index],
                &mut self.content_rng,
                &mut self.corpus,
            );
            self.expected_checksums[index] = page_checksum(page);
            self.classes[index] = class;
            self.class_pages[class.index()] += 1;
            self.stats.filled_pages += 1;
            written += 1;
            if written.is_multiple_of(PAGES_PER_CLOCK_CHECK) && Instant::now() >= deadline {
                break;
            }
        }
        self.is_filled()
    }

    /// Starts the dirty-rate clock; call once, when the fill is done.
    pub fn start_dirtying(&mut self, now: Instant) {
        self.dirty_started = Some(now);
    }

    /// Rewrites the pages the rate budget owes at `now`, stopping early at
    /// `deadline` (pages not done stay owed and are done on later ticks).
    pub fn dirty_due_pages(&mut self, now: Instant, deadline: Instant) {
        let Some(started) = self.dirty_started else {
            return;
        };
        let due = self
            .dirty_budget
            .pages_due(now.saturating_duration_since(started));
        let mut done = 0u64;
        while done < due {
            let index = self.dirty_choice_rng.below(self.region.pages() as u64) as usize;
            self.rewrite_page(index);
            done += 1;
            if done.is_multiple_of(PAGES_PER_CLOCK_CHECK) && Instant::now() >= deadline {
                break;
            }
        }
        self.dirty_budget.record_dirtied(done);
        self.stats.dirtied_pages += done;
    }

    /// Fresh content of the page's own class, so the mix stays as configured
    /// for the whole run. Cache pages get the next corpus page (a different
    /// file page). Zero pages are rewritten with zeroes: still a write, so
    /// the hypervisor's dirty log records the page, but it stays a zero page
    /// for the migration's zero-page detection — the mix does not drift
    /// towards text over a long run.
    fn rewrite_page(&mut self, index: usize) {
        let planned = self.classes[index];
        let page = self.region.page_mut(index);
        let class = write_content(page, planned, &mut self.content_rng, &mut self.corpus);
        self.expected_checksums[index] = page_checksum(page);
        if class != planned {
            self.class_pages[planned.index()] -= 1;
            self.class_pages[class.index()] += 1;
            self.classes[index] = class;
        }
    }

    /// Checks up to `max_pages` initialised pages (continuing a round-robin
    /// sweep) against their expected checksums, stopping early at `deadline`.
    /// Each mismatch is reported on `out` as a `ferry-corrupt` line and then
    /// adopted as the page's expected content, so one corruption is counted
    /// once rather than on every sweep.
    pub fn verify_some(&mut self, max_pages: u64, deadline: Instant, out: &mut impl Write) {
        let initialised = self.region.initialised_pages();
        if initialised == 0 {
            return;
        }
        for checked in 1..=max_pages {
            let index = self.verify_cursor;
            self.verify_cursor = (index + 1) % initialised;
            // The page may have been changed behind the program's back (that
            // is the point); black_box stops the optimiser from reasoning
            // about its contents from the last write.
            let actual = page_checksum(black_box(self.region.page(index)));
            if actual != self.expected_checksums[index] {
                self.stats.corrupt_pages += 1;
                report::corrupt(out, index, self.classes[index]);
                self.expected_checksums[index] = actual;
            }
            self.stats.verified_pages += 1;
            if checked % PAGES_PER_CLOCK_CHECK == 0 && Instant::now() >= deadline {
                break;
            }
        }
    }

    /// Test hook: damages a page the way a faulty migration would.
    #[cfg(test)]
    fn corrupt_page_for_test(&mut self, index: usize, offset: usize) {
        self.region.page_mut(index)[offset] ^= 0x40;
    }
}

/// Writes fresh content of `class` into `page` and returns the class actually
/// written: cache pages become text if no corpus file is readable.
fn write_content(
    page: &mut [u8],
    class: PageClass,
    rng: &mut Prng,
    corpus: &mut CorpusReader,
) -> PageClass {
    match class {
        PageClass::Cache => {
            if corpus.next_page(page) {
                return PageClass::Cache;
            }
            fill_text(page, rng);
            PageClass::Text
        }
        PageClass::Text => {
            fill_text(page, rng);
            PageClass::Text
        }
        PageClass::Random => {
            fill_random(page, rng);
            PageClass::Random
        }
        PageClass::Zero => {
            page.fill(0);
            PageClass::Zero
        }
    }
}

/// Assigns a class to every page: exact counts from the percentages (the
/// rounding remainder goes one page each to the classes in the mix, in class
/// order), then shuffled so classes interleave across the region.
pub fn plan_classes(pages: usize, mix: &Mix, rng: &mut Prng) -> Vec<PageClass> {
    let mut counts = PageClass::ALL.map(|class| pages * mix.percent_of(class) as usize / 100);
    let mut remainder = pages - counts.iter().sum::<usize>();
    for class in PageClass::ALL.into_iter().cycle() {
        if remainder == 0 {
            break;
        }
        if mix.percent_of(class) > 0 {
            counts[class.index()] += 1;
            remainder -= 1;
        }
    }
    let mut classes = Vec::with_capacity(pages);
    for class in PageClass::ALL {
        classes.extend(std::iter::repeat_n(class, counts[class.index()]));
    }
    for i in (1..classes.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        classes.swap(i, j);
    }
    classes
}

/// Pages owed after `elapsed` at `bytes_per_sec` (rounded down; the rest
/// carries into later ticks because the total is always recomputed from the
/// start, not accumulated per tick).
pub fn pages_owed(bytes_per_sec: u64, elapsed: Duration) -> u64 {
    let bytes = bytes_per_sec as u128 * elapsed.as_nanos() / 1_000_000_000;
    (bytes / PAGE_SIZE as u128) as u64
}

/// Turns a byte rate into "pages to dirty now", staying exact over time
/// however late individual ticks run.
///
/// Debt beyond one second's worth is forgiven: after the guest was paused
/// (a migration's stop-and-copy) or starved of CPU, catching up on all of it
/// at once would be a burst far above the configured rate.
#[derive(Debug, Clone)]
pub struct DirtyBudget {
    bytes_per_sec: u64,
    max_backlog_pages: u64,
    /// Pages owed so far that have been dirtied or forgiven.
    settled_pages: u64,
}

impl DirtyBudget {
    pub fn new(bytes_per_sec: u64) -> DirtyBudget {
        let max_backlog_pages = pages_owed(bytes_per_sec, Duration::from_secs(1)).max(1);
        DirtyBudget {
            bytes_per_sec,
            max_backlog_pages,
            settled_pages: 0,
        }
    }

    /// Pages to dirty now, `elapsed` after dirtying started. Call
    /// [`record_dirtied`](Self::record_dirtied) with how many were done.
    pub fn pages_due(&mut self, elapsed: Duration) -> u64 {
        let due = pages_owed(self.bytes_per_sec, elapsed).saturating_sub(self.settled_pages);
        if due > self.max_backlog_pages {
            self.settled_pages += due - self.max_backlog_pages;
            return self.max_backlog_pages;
        }
        due
    }

    pub fn record_dirtied(&mut self, pages: u64) {
        self.settled_pages += pages;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn far_future() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[test]
    fn pages_owed_converts_rate_and_time() {
        assert_eq!(pages_owed(0, Duration::from_secs(100)), 0);
        assert_eq!(pages_owed(1 << 20, Duration::from_secs(1)), 256);
        assert_eq!(pages_owed(1 << 20, Duration::from_millis(10)), 2); // 2.56 rounded down
        assert_eq!(pages_owed(1 << 20, Duration::from_secs(3600)), 256 * 3600);
        assert_eq!(pages_owed(4095, Duration::from_secs(1)), 0);
        assert_eq!(
            pages_owed(u64::MAX, Duration::from_secs(1)),
            u64::MAX / 4096
        );
    }

    #[test]
    fn budget_is_exact_over_time_despite_uneven_ticks() {
        let mut budget = DirtyBudget::new(1 << 20); // 256 pages/s
        let mut total = 0;
        let mut elapsed = Duration::ZERO;
        // Ticks of 10 ms with every seventh one running 40 ms late.
        for tick in 0..300u32 {
            elapsed += Duration::from_millis(if tick % 7 == 0 { 50 } else { 10 });
            let due = budget.pages_due(elapsed);
            budget.record_dirtied(due);
            total += due;
        }
        assert_eq!(total, pages_owed(1 << 20, elapsed));
    }

    #[test]
    fn budget_carries_undone_pages_to_later_ticks() {
        let mut budget = DirtyBudget::new(1 << 20);
        assert_eq!(budget.pages_due(Duration::from_millis(500)), 128);
        budget.record_dirtied(100); // ran out of time for 28
        assert_eq!(budget.pages_due(Duration::from_millis(500)), 28);
        assert_eq!(budget.pages_due(Duration::from_millis(750)), 92);
    }

    #[test]
    fn budget_forgives_debt_beyond_one_second() {
        let mut budget = DirtyBudget::new(1 << 20);
        // The guest was paused for 10 s: only one second's worth is due.
        assert_eq!(budget.pages_due(Duration::from_secs(10)), 256);
        budget.record_dirtied(256);
        assert_eq!(budget.pages_due(Duration::from_secs(10)), 0);
        assert_eq!(budget.pages_due(Duration::from_millis(10_500)), 128);
    }

    #[test]
    fn zero_rate_never_dirties() {
        let mut budget = DirtyBudget::new(0);
        assert_eq!(budget.pages_due(Duration::from_secs(1000)), 0);
    }

    #[test]
    fn plan_has_exact_counts_and_interleaves() {
        let mix = Mix {
            percent: [40, 20, 20, 20],
        };
        let plan = plan_classes(1003, &mix, &mut Prng::new(9));
        let count = |class| plan.iter().filter(|&&c| c == class).count();
        assert_eq!(count(PageClass::Cache), 402); // 401 + one remainder page
        assert_eq!(count(PageClass::Text), 201);
        assert_eq!(count(PageClass::Random), 200);
        assert_eq!(count(PageClass::Zero), 200);
        assert_ne!(
            plan[..402],
            vec![PageClass::Cache; 402][..],
            "classes are shuffled"
        );

        let only_zero = plan_classes(
            7,
            &Mix {
                percent: [0, 0, 0, 100],
            },
            &mut Prng::new(1),
        );
        assert_eq!(only_zero, vec![PageClass::Zero; 7]);
    }

    fn small_config(mix: Mix) -> Config {
        Config {
            mem_bytes: 64 * PAGE_SIZE as u64,
            mix,
            dirty_bytes_per_sec: 100 * PAGE_SIZE as u64,
            ..Config::default()
        }
    }

    #[test]
    fn fill_dirty_verify_cycle_finds_only_real_corruption() {
        let config = small_config(Mix {
            percent: [25, 25, 25, 25],
        });
        let unreadable =
            CorpusReader::from_files(vec![PathBuf::from("/nonexistent/ferry-guest-test")]);
        let mut workload = Workload::new(&config, unreadable).expect("workload");
        assert!(workload.fill_until(far_future()));
        assert_eq!(workload.stats().filled_pages, 64);
        // No readable corpus: the cache share became text.
        assert_eq!(workload.class_pages(PageClass::Cache), 0);
        assert_eq!(workload.class_pages(PageClass::Text), 32);

        let started = Instant::now();
        workload.start_dirtying(started);
        workload.dirty_due_pages(started + Duration::from_millis(500), far_future());
        assert_eq!(workload.stats().dirtied_pages, 50);

        let mut out = Vec::new();
        workload.verify_some(64, far_future(), &mut out);
        assert_eq!(
            workload.stats().corrupt_pages,
            0,
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert!(out.is_empty());

        workload.corrupt_page_for_test(13, 1000);
        let class = workload.classes[13];
        workload.verify_some(64, far_future(), &mut out);
        assert_eq!(workload.stats().corrupt_pages, 1);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            format!("ferry-corrupt page=13 class={}\n", class.name())
        );

        // Reported once, not on every sweep.
        workload.verify_some(128, far_future(), &mut out);
        assert_eq!(workload.stats().corrupt_pages, 1);
        assert_eq!(workload.stats().verified_pages, 256);
    }

    #[test]
    fn fill_is_deterministic_for_a_seed() {
        let config = small_config(Mix {
            percent: [0, 40, 40, 20],
        });
        let fill = || {
            let mut workload =
                Workload::new(&config, CorpusReader::from_files(Vec::new())).unwrap();
            workload.fill_until(far_future());
            workload.expected_checksums.clone()
        };
        assert_eq!(fill(), fill());
    }
}
