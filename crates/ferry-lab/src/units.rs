//! Parsing of the quantities an operator types: durations, bit rates, loss ratios, queue limits.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `120ms`, `0`, `1.5s`, `250us`. Negative values are rejected with a message that says so.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    if t.starts_with('-') {
        bail!("duration {t:?} is negative: give a value ≥ 0 such as 0ms or 120ms");
    }
    let (num, scale) = split_unit(t, &[("us", 1e-6), ("ms", 1e-3), ("s", 1.0)], 1e-3)
        .with_context(|| format!("duration {t:?}: expected a number with us, ms or s (e.g. 120ms)"))?;
    Ok(Duration::from_secs_f64(num * scale))
}

/// `1gbit`, `100mbit`, `500kbit`, `2.5gbit`, `1000000` (bit/s). Zero is rejected: a link that
/// carries nothing is a cut link (`ferry lab link A-B down`), not a rate.
pub fn parse_rate_bps(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_lowercase();
    if t.starts_with('-') {
        bail!("rate {t:?} is negative: give a positive rate such as 1gbit");
    }
    let units = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0), ("gbps", 1e9), ("mbps", 1e6)];
    let (num, scale) = split_unit(&t, &units, 1.0)
        .with_context(|| format!("rate {t:?}: expected e.g. 1gbit, 100mbit, 500kbit"))?;
    let bps = (num * scale).round();
    if bps < 1.0 {
        bail!("rate {t:?} is zero: a link needs a positive rate (to cut a link use `ferry lab link A-B down`)");
    }
    Ok(bps as u64)
}

/// `0.1%` or `0.001` → probability in [0, 1).
pub fn parse_loss(text: &str) -> Result<f64> {
    let t = text.trim();
    let p = if let Some(pct) = t.strip_suffix('%') {
        pct.trim().parse::<f64>().map(|v| v / 100.0)
    } else {
        t.parse::<f64>()
    }
    .with_context(|| format!("loss {t:?}: expected a percentage such as 0.1%"))?;
    if !(0.0..1.0).contains(&p) {
        bail!("loss {t:?} is out of range: give 0% to below 100%");
    }
    Ok(p)
}

/// How much a link's drop-tail queue holds before it drops.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueLimit {
    /// One bandwidth-delay product of the link (with a floor, so a 0 ms link still queues).
    Bdp,
    Packets(u32),
    /// Time to drain at the link's rate.
    Delay(Duration),
}

/// `bdp`, `1000p` / `1000pkts`, or a drain time such as `50ms`.
pub fn parse_queue(text: &str) -> Result<QueueLimit> {
    let t = text.trim().to_ascii_lowercase();
    if t == "bdp" {
        return Ok(QueueLimit::Bdp);
    }
    for suffix in ["pkts", "pkt", "p"] {
        if let Some(n) = t.strip_suffix(suffix) {
            let n: u32 = n.trim().parse().with_context(|| format!("queue {t:?}: expected e.g. 1000p"))?;
            if n == 0 {
                bail!("queue {t:?} holds nothing: give at least 1 packet");
            }
            return Ok(QueueLimit::Packets(n));
        }
    }
    parse_duration(&t)
        .map(QueueLimit::Delay)
        .with_context(|| format!("queue {t:?}: expected bdp, a packet count (1000p) or a drain time (50ms)"))
}

fn split_unit(t: &str, units: &[(&str, f64)], bare_scale: f64) -> Result<(f64, f64)> {
    for (suffix, scale) in units {
        if let Some(num) = t.strip_suffix(suffix) {
            return Ok((parse_finite(num)?, *scale));
        }
    }
    Ok((parse_finite(t)?, bare_scale))
}

fn parse_finite(num: &str) -> Result<f64> {
    let v: f64 = num.trim().parse()?;
    if !v.is_finite() || v < 0.0 {
        bail!("not a finite non-negative number");
    }
    Ok(v)
}

pub fn format_rate(bps: u64) -> String {
    match bps {
        b if b >= 1_000_000_000 && b % 1_000_000 == 0 => format!("{}gbit", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{}mbit", b as f64 / 1e6),
        b if b >= 1_000 => format!("{}kbit", b as f64 / 1e3),
        b => format!("{b}bit"),
    }
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms == ms.trunc() { format!("{}ms", ms as u64) } else { format!("{ms:.3}ms") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("120ms").unwrap(), Duration::from_millis(120));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert!(parse_duration("-5ms").unwrap_err().to_string().contains("negative"));
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate_bps("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate_bps("100Mbit").unwrap(), 100_000_000);
        assert_eq!(parse_rate_bps("2.5gbit").unwrap(), 2_500_000_000);
        assert!(parse_rate_bps("0").unwrap_err().to_string().contains("zero"));
        assert!(parse_rate_bps("0gbit").unwrap_err().to_string().contains("zero"));
        assert!(parse_rate_bps("-1gbit").unwrap_err().to_string().contains("negative"));
        assert_eq!(format_rate(1_000_000_000), "1gbit");
    }

    #[test]
    fn losses_and_queues() {
        assert!((parse_loss("0.1%").unwrap() - 0.001).abs() < 1e-12);
        assert!(parse_loss("100%").is_err());
        assert!(parse_loss("-1%").is_err());
        assert_eq!(parse_queue("bdp").unwrap(), QueueLimit::Bdp);
        assert_eq!(parse_queue("1000p").unwrap(), QueueLimit::Packets(1000));
        assert_eq!(parse_queue("50ms").unwrap(), QueueLimit::Delay(Duration::from_millis(50)));
        assert!(parse_queue("0p").is_err());
    }
}
