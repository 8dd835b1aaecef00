//! The guest workload's console lines (`ferry-hb seq=… corrupt=…`) and the verdict on a guest
//! after a migration: it must go on beating, past where it was, with no corrupt page.
use anyhow::Result;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub seq: u64,
    pub corrupt: u64,
}

/// `ferry-hb seq=12 up_ms=… corrupt=0` → the heartbeat; other lines → None.
pub fn parse(line: &str) -> Option<Heartbeat> {
    let rest = line.trim().strip_prefix("ferry-hb ")?;
    let field = |key: &str| rest.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok());
    Some(Heartbeat { seq: field("seq")?, corrupt: field("corrupt")? })
}

pub fn last(lines: &[String]) -> Option<Heartbeat> {
    lines.iter().rev().find_map(|l| parse(l))
}

#[derive(Clone, Debug, Serialize)]
pub struct GuestCheck {
    pub ok: bool,
    /// The last heartbeat before the migration, and the last one seen after it.
    pub seq_before: Option<u64>,
    pub seq_after: Option<u64>,
    pub why: String,
}

/// Judges the heartbeats a destination printed: some beat after `seq_before`, the newest one at
/// least `advanced_by` past the first of those, and none of them reporting a corrupt page.
pub fn judge(lines: &[String], seq_before: Option<u64>, advanced_by: u64) -> GuestCheck {
    let after: Vec<Heartbeat> = lines.iter().filter_map(|l| parse(l)).filter(|h| seq_before.is_none_or(|s| h.seq > s)).collect();
    let seq_after = after.last().map(|h| h.seq);
    let check = |ok, why: String| GuestCheck { ok, seq_before, seq_after, why };
    let (Some(first), Some(newest)) = (after.first(), after.last()) else {
        return check(false, format!("no heartbeat after seq {}", seq_before.map_or("-".into(), |s| s.to_string())));
    };
    if let Some(bad) = after.iter().find(|h| h.corrupt != 0) {
        return check(false, format!("heartbeat seq={} reports corrupt={}", bad.seq, bad.corrupt));
    }
    if newest.seq < first.seq + advanced_by {
        return check(false, format!("stalled: seq {} → {} only", first.seq, newest.seq));
    }
    check(true, format!("seq {} → {}, corrupt=0", seq_before.map_or("-".into(), |s| s.to_string()), newest.seq))
}

/// Watches a destination's console after a migration: waits up to `first_within` for a beat past
/// `seq_before`, then `hold` longer, and judges (a beat a second: `hold` 3 s asks for 2 more).
pub fn watch(mut console: impl FnMut() -> Result<Vec<String>>, mut alive: impl FnMut() -> bool, seq_before: Option<u64>, first_within: Duration, hold: Duration) -> GuestCheck {
    let deadline = Instant::now() + first_within;
    loop {
        let lines = console().unwrap_or_default();
        let beat = lines.iter().filter_map(|l| parse(l)).any(|h| seq_before.is_none_or(|s| h.seq > s));
        if beat || Instant::now() > deadline || !alive() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(hold);
    let lines = console().unwrap_or_default();
    let mut verdict = judge(&lines, seq_before, hold.as_secs().saturating_sub(1).max(1));
    if !alive() {
        verdict.ok = false;
        verdict.why = format!("QEMU at the destination is not running ({})", verdict.why);
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_heartbeat_lines_and_nothing_else() {
        let hb = parse("ferry-hb seq=12 up_ms=12004 filled=4096 dirtied_total=512 verified_total=9000 corrupt=0");
        assert_eq!(hb, Some(Heartbeat { seq: 12, corrupt: 0 }));
        assert_eq!(parse("ferry-ready mem=1 pages=1"), None);
        assert_eq!(parse("ferry-hb seq=x corrupt=0"), None);
        assert_eq!(parse("ferry-hb seq=3 corrupt=2"), Some(Heartbeat { seq: 3, corrupt: 2 }));
        assert_eq!(last(&lines(&["ferry-hb seq=1 corrupt=0", "noise", "ferry-hb seq=2 corrupt=0", "x"])).unwrap().seq, 2);
    }

    #[test]
    fn a_guest_must_beat_on_past_its_old_seq_without_corruption() {
        let ok = judge(&lines(&["ferry-hb seq=9 corrupt=0", "ferry-hb seq=10 corrupt=0", "ferry-hb seq=11 corrupt=0", "ferry-hb seq=12 corrupt=0"]), Some(9), 2);
        assert!(ok.ok, "{ok:?}");
        assert_eq!((ok.seq_before, ok.seq_after), (Some(9), Some(12)));
        let stalled = judge(&lines(&["ferry-hb seq=10 corrupt=0"]), Some(9), 2);
        assert!(!stalled.ok && stalled.why.contains("stalled"), "{stalled:?}");
        let none = judge(&lines(&["ferry-hb seq=8 corrupt=0", "ferry-hb seq=9 corrupt=0"]), Some(9), 2);
        assert!(!none.ok && none.why.contains("no heartbeat"), "{none:?}");
        let corrupt = judge(&lines(&["ferry-hb seq=10 corrupt=0", "ferry-hb seq=11 corrupt=1", "ferry-hb seq=12 corrupt=1"]), Some(9), 2);
        assert!(!corrupt.ok && corrupt.why.contains("corrupt=1"), "{corrupt:?}");
    }
}
