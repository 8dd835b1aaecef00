//! CPU time of processes (`/proc/PID/stat`) and the CPU's clock (`/proc/cpuinfo`): what a byte
//! through the channel costs.
use anyhow::{Context, Result};

/// User plus system time a process (all its threads) has used, in nanoseconds.
pub fn process_cpu_ns(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid}"))?;
    let ticks = cpu_ticks(&stat).with_context(|| format!("/proc/{pid}/stat: {stat:?}"))?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(ticks * 1_000_000_000 / hz)
}

/// utime + stime from a `/proc/PID/stat` line (fields 14 and 15; the name in parentheses may
/// hold spaces, so count from its closing parenthesis).
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so field n is f[n - 3].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The first `cpu MHz` in /proc/cpuinfo.
pub fn cpu_mhz() -> Option<f64> {
    parse_mhz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

pub fn parse_mhz(cpuinfo: &str) -> Option<f64> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "cpu MHz").then(|| v.trim().parse().ok())?
    })
}

/// A cost per byte: nanoseconds and, with the clock, cycles.
pub fn per_byte(cpu_ns: u64, bytes: u64, mhz: Option<f64>) -> (Option<f64>, Option<f64>) {
    if bytes == 0 {
        return (None, None);
    }
    let ns = cpu_ns as f64 / bytes as f64;
    (Some(ns), mhz.map(|m| ns * m / 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_even_with_spaces_in_the_name() {
        let stat = "4242 (ferry agent) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 100 1000000 500 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("garbage"), None);
        assert!(process_cpu_ns(std::process::id()).is_ok());
    }

    #[test]
    fn reads_the_clock_and_converts_to_cycles() {
        let info = "processor\t: 0\nmodel name\t: Some CPU\ncpu MHz\t\t: 2999.998\ncache size\t: 1 KB\n";
        assert_eq!(parse_mhz(info), Some(2999.998));
        assert_eq!(parse_mhz("processor : 0\n"), None);
        let (ns, cycles) = per_byte(2_000_000_000, 1_000_000_000, Some(3000.0));
        assert_eq!(ns, Some(2.0));
        assert_eq!(cycles, Some(6.0));
        assert_eq!(per_byte(1, 0, None), (None, None));
    }
}
