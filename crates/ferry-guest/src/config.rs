//! Configuration: defaults, then `ferry.<key>=<value>` from the kernel command
//! line (how the lab configures a guest it boots), then `--<key> <value>`
//! flags (how a human runs it by hand).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::content::PageClass;
use crate::memory::PAGE_SIZE;
use ferry_guest::disk_record::RECORD_SIZE;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Bytes of memory to fill; a multiple of the page size.
    pub mem_bytes: u64,
    /// Bytes per second to rewrite after the fill; 0 disables dirtying.
    pub dirty_bytes_per_sec: u64,
    pub mix: Mix,
    /// UDP and TCP echo port; 0 disables the echo service.
    pub echo_port: u16,
    pub heartbeat: Duration,
    pub seed: u64,
    /// Directory tree whose regular files supply "page cache" content.
    pub corpus: PathBuf,
    /// Block device (or file) the disk writer writes records to; `None`
    /// disables the disk writer.
    pub disk: Option<PathBuf>,
    /// Bytes per second of records to write; 0 disables the disk writer.
    pub disk_bytes_per_sec: u64,
    /// Start of the record ring on the disk; a multiple of 4 KiB.
    pub disk_offset: u64,
    /// Size of the record ring; a positive multiple of the record size.
    pub disk_span: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            mem_bytes: 64 << 20,
            dirty_bytes_per_sec: 1 << 20,
            mix: Mix {
                percent: [40, 20, 20, 20],
            },
            echo_port: 7,
            heartbeat: Duration::from_secs(1),
            seed: 1,
            corpus: PathBuf::from("/"),
            disk: None,
            disk_bytes_per_sec: 2 << 20,
            disk_offset: 0,
            disk_span: 64 << 20,
        }
    }
}

/// Share of memory pages per class, in percent, indexed by [`PageClass::index`];
/// sums to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    pub percent: [u32; PageClass::COUNT],
}

impl Mix {
    pub fn percent_of(&self, class: PageClass) -> u32 {
        self.percent[class.index()]
    }
}

pub const USAGE: &str = "\
usage: ferry-guest-workload [--mem SIZE] [--dirty SIZE] [--mix SPEC] [--echo PORT]
                            [--hb DURATION] [--seed N] [--corpus DIR]
                            [--disk PATH] [--disk_rate SIZE] [--disk_offset SIZE]
                            [--disk_span SIZE]

Each option can also be set on the kernel command line as ferry.<name>=<value>;
flags override the kernel command line.

  --mem SIZE      memory to fill (default 64M); K/M/G/T suffixes are binary
  --dirty SIZE    bytes per second to rewrite after the fill, 0 = off (default 1M)
  --mix SPEC      page mix in percent, e.g. cache:40,text:20,random:20,zero:20 (default);
                  classes: cache, text, random, zero; must sum to 100
  --echo PORT     UDP+TCP echo port on 0.0.0.0, 0 = off (default 7)
  --hb DURATION   heartbeat period: 500ms, 1s, 2 (seconds) (default 1s)
  --seed N        PRNG seed, decimal or 0x-hex (default 1)
  --corpus DIR    files to copy into cache pages (default /; /proc, /sys, /dev skipped)
  --disk PATH     block device to write 64 KiB checkable records to, each followed by
                  fdatasync (default: none, no disk writes); e.g. /dev/vda
  --disk_rate SIZE    bytes of records per second, 0 = off (default 2M)
  --disk_offset SIZE  start of the ring of records on the device, a multiple of 4K (default 0)
  --disk_span SIZE    size of the ring, a multiple of 64K; it wraps (default 64M)
";

const KEYS: [&str; 11] = [
    "mem",
    "dirty",
    "mix",
    "echo",
    "hb",
    "seed",
    "corpus",
    "disk",
    "disk_rate",
    "disk_offset",
    "disk_span",
];

/// What the process was asked to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    Run(Config),
    Help,
}

/// Where a rejected setting came from, so the message points at the right place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    KernelCmdline,
    Flag,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: Origin,
    pub key: String,
    pub value: Option<String>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = match self.origin {
            Origin::KernelCmdline => format!("ferry.{} on the kernel command line", self.key),
            Origin::Flag => format!("--{}", self.key),
        };
        match &self.value {
            Some(value) => write!(f, "invalid value {value:?} for {place}: {}", self.reason),
            None => write!(f, "{place}: {}", self.reason),
        }
    }
}

/// Builds the configuration from the kernel command line text and the
/// process arguments (without the program name).
///
/// Unknown `ferry.*` keys on the kernel command line are ignored: the same
/// command line carries settings for the init script and other tools. Unknown
/// flags are errors, since only a person types those.
pub fn load(kernel_cmdline: &str, args: &[String]) -> Result<Invocation, ConfigError> {
    let mut config = Config::default();

    for token in kernel_cmdline.split_ascii_whitespace() {
        let Some(setting) = token.strip_prefix("ferry.") else {
            continue;
        };
        let Some((key, value)) = setting.split_once('=') else {
            continue;
        };
        if KEYS.contains(&key) {
            config.set(key, value).map_err(|reason| ConfigError {
                origin: Origin::KernelCmdline,
                key: key.to_string(),
                value: Some(value.to_string()),
                reason,
            })?;
        }
    }

    let mut remaining = args.iter();
    while let Some(arg) = remaining.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Invocation::Help);
        }
        let flag_error = |key: &str, value: Option<&str>, reason: String| ConfigError {
            origin: Origin::Flag,
            key: key.to_string(),
            value: value.map(str::to_string),
            reason,
        };
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(flag_error(
                arg,
                None,
                "unexpected argument (see --help)".to_string(),
            ));
        };
        let (key, value) = match flag.split_once('=') {
            Some((key, value)) => (key, value.to_string()),
            None => match remaining.next() {
                Some(value) => (flag, value.clone()),
                None if KEYS.contains(&flag) => {
                    return Err(flag_error(flag, None, "missing value".to_string()))
                }
                None => {
                    return Err(flag_error(
                        flag,
                        None,
                        "unknown option (see --help)".to_string(),
                    ))
                }
            },
        };
        if !KEYS.contains(&key) {
            return Err(flag_error(
                key,
                None,
                "unknown option (see --help)".to_string(),
            ));
        }
        config
            .set(key, &value)
            .map_err(|reason| flag_error(key, Some(&value), reason))?;
    }
    Ok(Invocation::Run(config))
}

impl Config {
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "mem" => {
                let bytes = parse_size(value)?;
                if bytes == 0 || bytes % PAGE_SIZE as u64 != 0 {
                    return Err(format!(
                        "must be a positive multiple of the {PAGE_SIZE}-byte page size"
                    ));
                }
                if usize::try_from(bytes).is_err() {
                    return Err("too large for this machine's address space".to_string());
                }
                self.mem_bytes = bytes;
            }
            "dirty" => self.dirty_bytes_per_sec = parse_size(value)?,
            "mix" => self.mix = parse_mix(value)?,
            "echo" => {
                self.echo_port = value.parse::<u16>().map_err(|_| {
                    "expected a port number 0-65535 (0 disables the echo service)".to_string()
                })?
            }
            "hb" => self.heartbeat = parse_duration(value)?,
            "seed" => self.seed = parse_u64(value)?,
            "corpus" => {
                if value.is_empty() {
                    return Err("expected a directory path".to_string());
                }
                self.corpus = PathBuf::from(value);
            }
            "disk" => {
                if value.is_empty() {
                    return Err("expected a block device path such as /dev/vda".to_string());
                }
                self.disk = Some(PathBuf::from(value));
            }
            "disk_rate" => self.disk_bytes_per_sec = parse_size(value)?,
            "disk_offset" => {
                let offset = parse_size(value)?;
                if offset % 4096 != 0 {
                    return Err("must be a multiple of 4K".to_string());
                }
                self.disk_offset = offset;
            }
            "disk_span" => {
                let span = parse_size(value)?;
                if span == 0 || span % RECORD_SIZE as u64 != 0 {
                    return Err(format!(
                        "must be a positive multiple of the {RECORD_SIZE}-byte record size (64K)"
                    ));
                }
                self.disk_span = span;
            }
            _ => unreachable!("caller checks keys against KEYS"),
        }
        Ok(())
    }
}

/// Parses a byte count with an optional binary suffix: `4096`, `64K`, `512M`, `2G`, `1T`
/// (case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    if digits.is_empty() {
        return Err(
            "expected a number of bytes, optionally with a K, M, G or T suffix".to_string(),
        );
    }
    let shift = match suffix {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => {
            return Err(format!(
                "unknown size suffix {suffix:?} (expected K, M, G or T)"
            ))
        }
    };
    let number: u64 = digits.parse().map_err(|_| "number too large".to_string())?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// Parses `class:percent,...`; classes may be omitted (0%) but not repeated,
/// and the percentages must add up to exactly 100.
pub fn parse_mix(text: &str) -> Result<Mix, String> {
    let mut percent = [0u32; PageClass::COUNT];
    let mut seen = [false; PageClass::COUNT];
    for entry in text.split(',') {
        let Some((name, share)) = entry.split_once(':') else {
            return Err(format!("entry {entry:?} is not of the form class:percent"));
        };
        let class = PageClass::from_name(name.trim()).ok_or_else(|| {
            format!("unknown page class {name:?} (expected cache, text, random or zero)")
        })?;
        if seen[class.index()] {
            return Err(format!("page class {name:?} given twice"));
        }
        seen[class.index()] = true;
        let share: u32 = share
            .trim()
            .parse()
            .ok()
            .filter(|share| *share <= 100)
            .ok_or_else(|| format!("percentage {share:?} for {name:?} is not an integer 0-100"))?;
        percent[class.index()] = share;
    }
    let total: u32 = percent.iter().sum();
    if total != 100 {
        return Err(format!("percentages add up to {total}, not 100"));
    }
    Ok(Mix { percent })
}

/// Parses a positive duration: `250ms`, `2s`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, millis_per_unit) = if let Some(digits) = text.strip_suffix("ms") {
        (digits, 1)
    } else if let Some(digits) = text.strip_suffix('s') {
        (digits, 1000)
    } else {
        (text, 1000)
    };
    let count: u64 = digits
        .parse()
        .map_err(|_| "expected a duration such as 500ms, 1s or 2".to_string())?;
    let millis = count
        .checked_mul(millis_per_unit)
        .ok_or_else(|| "duration too large".to_string())?;
    if millis == 0 {
        return Err("duration must be positive".to_string());
    }
    Ok(Duration::from_millis(millis))
}

fn parse_u64(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| "expected an unsigned 64-bit integer (decimal or 0x-hex)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn run_config(cmdline: &str, flags: &[&str]) -> Config {
        match load(cmdline, &args(flags)).expect("valid configuration") {
            Invocation::Run(config) => config,
            Invocation::Help => panic!("unexpected help"),
        }
    }

    #[test]
    fn sizes_accept_binary_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 * 1024));
        assert_eq!(parse_size("64k"), Ok(64 * 1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn sizes_reject_malformed_values() {
        for bad in [
            "",
            "M",
            "12X",
            "1.5G",
            "-1",
            "1 M",
            "1MB",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mix_parses_and_allows_omitted_classes() {
        assert_eq!(
            parse_mix("cache:40,text:20,random:20,zero:20"),
            Ok(Config::default().mix)
        );
        assert_eq!(
            parse_mix("zero:100"),
            Ok(Mix {
                percent: [0, 0, 0, 100]
            })
        );
        assert_eq!(
            parse_mix("random:50,text:50"),
            Ok(Mix {
                percent: [0, 50, 50, 0]
            })
        );
    }

    #[test]
    fn mix_rejects_malformed_specs() {
        for bad in [
            "",
            "cache:40,text:20,random:20", // sums to 80
            "cache:60,text:60",           // sums to 120
            "cache:40,text:20,random:20,swap:20",
            "cache:50,cache:50",
            "cache=100",
            "cache:abc,text:0",
            "cache:-10,text:110",
            "cache:100,",
            "cache:101",
        ] {
            assert!(parse_mix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        for bad in ["0", "0ms", "", "s", "1m", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn defaults_apply_without_settings() {
        assert_eq!(run_config("console=ttyS0 quiet", &[]), Config::default());
    }

    #[test]
    fn kernel_cmdline_sets_and_flags_override() {
        let cmdline = "console=ttyS0 ferry.mem=128M ferry.dirty=0 ferry.seed=0x10 ferry.ip=10.0.0.2 ferry.hb=500ms";
        let config = run_config(
            cmdline,
            &["--mem", "32M", "--echo=7777", "--corpus", "/usr"],
        );
        assert_eq!(config.mem_bytes, 32 << 20);
        assert_eq!(config.dirty_bytes_per_sec, 0);
        assert_eq!(config.seed, 16);
        assert_eq!(config.heartbeat, Duration::from_millis(500));
        assert_eq!(config.echo_port, 7777);
        assert_eq!(config.corpus, PathBuf::from("/usr"));
    }

    #[test]
    fn malformed_values_are_reported_with_their_origin() {
        let error = load("ferry.mem=12X", &[]).unwrap_err();
        assert_eq!(error.origin, Origin::KernelCmdline);
        assert!(
            error
                .to_string()
                .contains("ferry.mem on the kernel command line"),
            "{error}"
        );

        let error = load("", &args(&["--mix", "cache:50"])).unwrap_err();
        assert_eq!(error.origin, Origin::Flag);
        assert!(error.to_string().contains("--mix"), "{error}");

        assert!(load("", &args(&["--mem", "1000"])).is_err()); // not page-aligned
        assert!(load("", &args(&["--mem", "0"])).is_err());
        assert!(load("", &args(&["--echo", "70000"])).is_err());
        assert!(load("", &args(&["--bogus", "1"])).is_err());
        assert!(load("", &args(&["--mem"])).is_err());
        assert!(load("", &args(&["stray"])).is_err());
    }

    #[test]
    fn disk_writer_settings() {
        assert_eq!(Config::default().disk, None);
        let config = run_config(
            "ferry.disk=/dev/vda ferry.disk_rate=4M ferry.disk_offset=1M ferry.disk_span=128M",
            &[],
        );
        assert_eq!(config.disk, Some(PathBuf::from("/dev/vda")));
        assert_eq!(config.disk_bytes_per_sec, 4 << 20);
        assert_eq!(config.disk_offset, 1 << 20);
        assert_eq!(config.disk_span, 128 << 20);
        let config = run_config("ferry.disk=/dev/vda", &["--disk_rate", "0"]);
        assert_eq!(config.disk_bytes_per_sec, 0);
        assert_eq!(config.disk_span, 64 << 20);

        assert!(load("ferry.disk=", &[]).is_err());
        assert!(load("ferry.disk_offset=1000", &[]).is_err());
        assert!(load("ferry.disk_span=0", &[]).is_err());
        assert!(load("ferry.disk_span=96K", &[]).is_err());
        assert!(load("", &args(&["--disk_span", "1M"])).is_ok());
    }

    #[test]
    fn help_is_recognised() {
        assert_eq!(load("", &args(&["--help"])), Ok(Invocation::Help));
    }
}
