//! Realistic Debian disk images for delta-transfer benchmarks: an *older* raw image of a small
//! server, and a *newer* one that is the same disk after `apt-get install` of a batch of packages,
//! so that the two differ the way a VM's disk differs after a round of updates.
//!
//! * **older** (`debian-<suite>-older.raw`): `debootstrap --variant=minbase` with a few server
//!   packages into a staging directory, turned into a sparse ext4 image by `mke2fs -d`.
//! * **newer** (`debian-<suite>-newer.raw`): a sparse copy of *older*, loop-mounted, with the extra
//!   packages installed through `chroot … apt-get` (services are not started: a `policy-rc.d`
//!   forbids it), the package cache cleaned and the freed blocks trimmed, so that what differs
//!   is what a VM that kept its disk trimmed would carry.
//!
//! Both land in a cache directory (default `/var/cache/ferry/images`) together with a JSON
//! manifest (`debian-<suite>.json`) holding a hash of the spec and the [`DiskImageReport`]. A later
//! call with the same spec returns from the cache at once. Work happens under `*.partial` names
//! and is renamed into place only when complete; mounts and loop devices are held by guards that
//! undo them on every exit path. Every external command's output goes to
//! `debian-<suite>-build.log` in the cache directory.
//!
//! The mirror is whatever the host's apt already uses for the suite
//! (`/etc/apt/sources.list.d/debian.sources`, else `/etc/apt/sources.list`); it is never named in
//! code.
//!
//! # Reproducibility
//! What is fixed: the filesystem UUID and directory-hash seed, the label, the superblock
//! timestamps (`E2FSPROGS_FAKE_TIME`), `/etc/hostname`, `/etc/resolv.conf`, `/etc/fstab`, and
//! `SOURCE_DATE_EPOCH` for every tool that honours it (e.g. Python writes hash-checked `.pyc`
//! files). Given the same staging tree, `mke2fs -d` produces a byte-identical image.
//!
//! What is not: the staging tree itself. Package versions follow the mirror on the day of the
//! build; file ctimes (which `mke2fs -d` copies into every inode, so every inode-table block
//! differs between two builds), SSH host keys and whatever else maintainer scripts generate,
//! dpkg/apt logs and the apt lists are all new on each build. Rebuilds are therefore
//! *equivalent* (same packages, same layout policy, near-identical changed-block figures), not
//! bit-identical: benchmarks should compare an older/newer pair from the same build.
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Fixed so that two builds of the same tree give the same filesystem (and so that a guest's
/// fstab could name it). Used for the hash seed too: directory order then depends only on names.
const FILESYSTEM_UUID: &str = "6f1e0b5c-2d4a-4c1e-9a57-0c3d1f2e4b6a";
const FILESYSTEM_LABEL: &str = "ferry-root";
/// Bookworm's release day: timestamps that tools let us choose are pinned to it.
const SOURCE_DATE_EPOCH: u64 = 1_686_355_200;
/// Bumped whenever the recipe changes in a way that changes the images, so cached pairs built by
/// an older recipe are not reused.
const RECIPE_VERSION: u32 = 1;
const GUEST_HOSTNAME: &str = "ferry-guest";
const FAILURE_TAIL_LINES: usize = 20;
const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to build. The cache directory is where, not what: it does not enter the spec hash.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskImageSpec {
    /// Size of each raw image (sparse: far less is allocated).
    pub size_bytes: u64,
    /// Debian suite, as it appears in the host's apt sources (e.g. `bookworm`).
    pub suite: String,
    /// Installed by debootstrap on top of minbase: present in both images.
    pub base_packages: Vec<String>,
    /// Installed into the newer image only. The default was tuned against bookworm so that about
    /// 490 MiB of 64 KiB blocks differ (measured: 7911–7913 blocks, 494 MiB, on repeated builds).
    pub extra_packages: Vec<String>,
    pub cache_dir: PathBuf,
}

impl Default for DiskImageSpec {
    fn default() -> Self {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        DiskImageSpec {
            size_bytes: 4 << 30,
            suite: "bookworm".into(),
            base_packages: names(&[
                "openssh-server",
                "ca-certificates",
                "iproute2",
                "procps",
                "less",
                "nano",
                "cron",
                "rsyslog",
            ]),
            extra_packages: names(&["build-essential", "python3", "python3-pip", "nginx"]),
            cache_dir: PathBuf::from("/var/cache/ferry/images"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct DiskImages {
    pub older: PathBuf,
    pub newer: PathBuf,
    pub report: DiskImageReport,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskImageReport {
    /// Apparent size of each image.
    pub size_bytes: u64,
    /// Bytes actually allocated on the host for each image.
    pub allocated_older: u64,
    pub allocated_newer: u64,
    /// 64 KiB blocks whose contents differ between older and newer.
    pub changed_64k_blocks: u64,
    /// Bytes covered by those blocks: what a block-level delta transfer has to send.
    pub changed_bytes: u64,
    /// Wall time of the build that made the pair (not of a cache hit).
    pub build_secs: f64,
}

/// The JSON file beside the images that makes a cache hit checkable.
#[derive(Serialize, Deserialize)]
struct Manifest {
    spec_hash: String,
    spec: DiskImageSpec,
    report: DiskImageReport,
}

/// Builds (or finds in the cache) the older/newer image pair described by `spec`.
pub fn build_disk_images(spec: &DiskImageSpec) -> Result<DiskImages> {
    validate_spec(spec)?;
    let paths = CachePaths::new(&spec.cache_dir, &spec.suite);
    if let Some(hit) = cached_images(spec, &paths) {
        info!(older = %hit.older.display(), "disk images: cache hit");
        return Ok(hit);
    }
    require_root()?;
    fs::create_dir_all(&spec.cache_dir).with_context(|| format!("creating cache dir {}", spec.cache_dir.display()))?;
    // The kernel reports mount points and loop backing files by canonical path, and the guards
    // and leftover checks compare against those.
    let cache_dir = spec.cache_dir.canonicalize()?;
    let paths = CachePaths::new(&cache_dir, &spec.suite);
    let _lock = BuildLock::acquire(&paths.lock)?;
    // Another process may have finished the same build while we waited for the lock.
    if let Some(hit) = cached_images(spec, &paths) {
        info!(older = %hit.older.display(), "disk images: built by another process meanwhile");
        return Ok(hit);
    }
    build_uncached(spec, &paths)
}

fn build_uncached(spec: &DiskImageSpec, paths: &CachePaths) -> Result<DiskImages> {
    let started = Instant::now();
    let mirror = host_mirror(&spec.suite)?;
    let log = CommandLog::create(&paths.log)?;
    info!(mirror = %mirror, log = %paths.log.display(), "disk images: building");
    clear_leftovers_of_killed_build(paths)?;

    // Removed on any early return; disarmed once the files have been renamed into place.
    let partials = RemoveOnDrop::new(vec![paths.older_partial.clone(), paths.newer_partial.clone()]);

    build_older(spec, &mirror, paths, &log)?;
    build_newer(spec, paths, &log)?;

    let step = Instant::now();
    let (changed_64k_blocks, changed_bytes) = changed_blocks(&paths.older_partial, &paths.newer_partial, 65536)?;
    info!(
        changed_64k_blocks,
        changed_mib = changed_bytes as f64 / (1 << 20) as f64,
        secs = step.elapsed().as_secs_f64(),
        "disk images: changed blocks measured"
    );
    let report = DiskImageReport {
        size_bytes: spec.size_bytes,
        allocated_older: allocated_bytes(&paths.older_partial)?,
        allocated_newer: allocated_bytes(&paths.newer_partial)?,
        changed_64k_blocks,
        changed_bytes,
        build_secs: started.elapsed().as_secs_f64(),
    };
    publish(spec, paths, &report)?;
    partials.disarm();
    info!(secs = report.build_secs, "disk images: done");
    Ok(DiskImages { older: paths.older.clone(), newer: paths.newer.clone(), report })
}

/// Renames the finished images into place, then writes the manifest that vouches for them.
fn publish(spec: &DiskImageSpec, paths: &CachePaths, report: &DiskImageReport) -> Result<()> {
    // Until here a failed build leaves the previous pair and its manifest usable. From here the
    // manifest must go first, so that a crash between the renames cannot leave one vouching
    // for a mismatched pair.
    remove_if_exists(&paths.manifest)?;
    fs::rename(&paths.older_partial, &paths.older).context("renaming older image into place")?;
    fs::rename(&paths.newer_partial, &paths.newer).context("renaming newer image into place")?;
    let manifest = Manifest { spec_hash: spec_hash(spec), spec: spec.clone(), report: report.clone() };
    let partial = paths.manifest.with_extension("json.partial");
    fs::write(&partial, serde_json::to_vec_pretty(&manifest)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, &paths.manifest).context("renaming manifest into place")?;
    Ok(())
}

/// Where everything for one suite lives in the cache directory.
struct CachePaths {
    older: PathBuf,
    newer: PathBuf,
    older_partial: PathBuf,
    newer_partial: PathBuf,
    manifest: PathBuf,
    log: PathBuf,
    lock: PathBuf,
    staging: PathBuf,
    mount_point: PathBuf,
    debootstrap_debs: PathBuf,
}

impl CachePaths {
    fn new(dir: &Path, suite: &str) -> Self {
        let name = |suffix: &str| dir.join(format!("debian-{suite}{suffix}"));
        CachePaths {
            older: name("-older.raw"),
            newer: name("-newer.raw"),
            older_partial: name("-older.raw.partial"),
            newer_partial: name("-newer.raw.partial"),
            manifest: name(".json"),
            log: name("-build.log"),
            lock: name(".lock"),
            staging: name("-staging"),
            mount_point: name("-mnt"),
            // Kept across builds: a rebuild then downloads only what changed on the mirror.
            debootstrap_debs: name("-debs"),
        }
    }
}

fn cached_images(spec: &DiskImageSpec, paths: &CachePaths) -> Option<DiskImages> {
    let manifest: Manifest = serde_json::from_slice(&fs::read(&paths.manifest).ok()?).ok()?;
    let has_right_size = |p: &Path| fs::metadata(p).map(|m| m.is_file() && m.len() == spec.size_bytes);
    let complete = manifest.spec_hash == spec_hash(spec)
        && has_right_size(&paths.older).unwrap_or(false)
        && has_right_size(&paths.newer).unwrap_or(false);
    complete.then(|| DiskImages { older: paths.older.clone(), newer: paths.newer.clone(), report: manifest.report })
}

/// A stable hash (FNV-1a over canonical JSON) of everything that decides the images' contents.
/// `DefaultHasher` is not promised to stay the same across Rust releases, and the manifest
/// outlives the binary that wrote it.
fn spec_hash(spec: &DiskImageSpec) -> String {
    let identity =
        serde_json::json!([RECIPE_VERSION, spec.size_bytes, spec.suite, spec.base_packages, spec.extra_packages]);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in identity.to_string().bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

// `is_multiple_of` is newer than the workspace's rust-version (1.85).
#[allow(clippy::manual_is_multiple_of)]
fn validate_spec(spec: &DiskImageSpec) -> Result<()> {
    ensure!(
        spec.size_bytes >= 512 << 20 && spec.size_bytes % 4096 == 0,
        "disk image size {} must be at least 512 MiB and a multiple of 4096",
        spec.size_bytes
    );
    let is_word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    ensure!(is_word(&spec.suite), "suite {:?} is not a plain suite name such as bookworm", spec.suite);
    // debootstrap takes the list comma-separated and apt takes names as arguments: anything
    // beyond Debian's package-name alphabet would be misread by one of them.
    let is_package =
        |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    for name in spec.base_packages.iter().chain(&spec.extra_packages) {
        ensure!(is_package(name), "{name:?} is not a Debian package name");
    }
    ensure!(spec.cache_dir.is_absolute(), "cache dir {} must be an absolute path", spec.cache_dir.display());
    Ok(())
}

fn require_root() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("disk images need root (debootstrap, loop mounts): run as root");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The older image: debootstrap, then mke2fs -d.

fn build_older(spec: &DiskImageSpec, mirror: &str, paths: &CachePaths, log: &CommandLog) -> Result<()> {
    let staging = StagingDir::fresh(&paths.staging)?;
    fs::create_dir_all(&paths.debootstrap_debs)?;

    let step = Instant::now();
    info!(suite = %spec.suite, packages = spec.base_packages.len(), "debootstrap: start");
    log.run(
        tool("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", spec.base_packages.join(",")))
            .arg(format!("--cache-dir={}", paths.debootstrap_debs.display()))
            .arg(&spec.suite)
            .arg(staging.path())
            .arg(mirror),
    )?;
    info!(secs = step.elapsed().as_secs_f64(), "debootstrap: done");

    pin_host_specific_files(staging.path())?;
    drop_downloaded_packages(staging.path())?;

    let step = Instant::now();
    info!(size_bytes = spec.size_bytes, image = %paths.older_partial.display(), "mke2fs: start");
    make_ext4_image(staging.path(), &paths.older_partial, spec.size_bytes, log)?;
    info!(
        secs = step.elapsed().as_secs_f64(),
        allocated_mib = allocated_bytes(&paths.older_partial)? >> 20,
        "mke2fs: done"
    );
    staging.remove()
}

/// debootstrap copies the build host's hostname and resolver into the tree; neither belongs in
/// a guest image, and both would make the image depend on where it was built.
fn pin_host_specific_files(root: &Path) -> Result<()> {
    let write = |rel: &str, text: &str| {
        let path = root.join(rel);
        // resolv.conf may be a symlink on the host: replace it, never write through it.
        let _ = fs::remove_file(&path);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("etc/hostname", &format!("{GUEST_HOSTNAME}\n"))?;
    write("etc/resolv.conf", "# filled in by the guest's network configuration\n")?;
    write("etc/fstab", &format!("LABEL={FILESYSTEM_LABEL} / ext4 errors=remount-ro 0 1\n"))?;
    Ok(())
}

/// debootstrap leaves the .debs it installed in apt's cache; an installed server has usually
/// been `apt-get clean`ed, and keeping them would let the newer image's clean count as change.
fn drop_downloaded_packages(root: &Path) -> Result<()> {
    let archives = root.join("var/cache/apt/archives");
    for entry in fs::read_dir(&archives).with_context(|| format!("listing {}", archives.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "deb") {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

fn make_ext4_image(tree: &Path, image: &Path, size_bytes: u64, log: &CommandLog) -> Result<()> {
    // A fresh sparse file: mke2fs then writes only what the filesystem uses.
    remove_if_exists(image)?;
    File::create(image)
        .and_then(|f| f.set_len(size_bytes))
        .with_context(|| format!("creating sparse file {}", image.display()))?;
    log.run(
        tool("mke2fs")
            .env("E2FSPROGS_FAKE_TIME", SOURCE_DATE_EPOCH.to_string())
            .args(["-t", "ext4", "-F", "-d"])
            .arg(tree)
            .args(["-U", FILESYSTEM_UUID])
            .arg("-E")
            .arg(format!("hash_seed={FILESYSTEM_UUID},root_owner=0:0"))
            .args(["-L", FILESYSTEM_LABEL])
            .arg(image)
            .arg(format!("{}k", size_bytes / 1024)),
    )
}

// ---------------------------------------------------------------------------------------------
// The newer image: a copy of older with packages installed in a chroot.

fn build_newer(spec: &DiskImageSpec, paths: &CachePaths, log: &CommandLog) -> Result<()> {
    let step = Instant::now();
    remove_if_exists(&paths.newer_partial)?;
    log.run(Command::new("cp").arg("--sparse=always").arg(&paths.older_partial).arg(&paths.newer_partial))?;
    info!(secs = step.elapsed().as_secs_f64(), "newer image: copied from older");

    let step = Instant::now();
    info!(packages = ?spec.extra_packages, "upgrade: start");
    let loop_device = LoopDevice::attach(&paths.newer_partial, log)?;
    let root = &paths.mount_point;
    fs::create_dir_all(root)?;
    let mut mounts = ChrootMounts::new(root);
    mounts.mount(log, &["-t", "ext4"], loop_device.path(), root)?;
    for dir in ["proc", "sys", "dev"] {
        mounts.mount(log, &["--bind"], &Path::new("/").join(dir), &root.join(dir))?;
    }
    // The placeholder resolv.conf from the older image is shadowed, not replaced, so the image
    // keeps it while apt inside the chroot resolves names the way the host does.
    let host_resolver = Path::new("/etc/resolv.conf");
    if host_resolver.exists() {
        mounts.mount(log, &["--bind"], host_resolver, &root.join("etc/resolv.conf"))?;
    }

    install_extra_packages(root, &spec.extra_packages, log)?;
    info!(secs = step.elapsed().as_secs_f64(), "upgrade: packages installed");

    trim_free_space(root, log)?;
    mounts.unmount_all()?;
    loop_device.detach()?;
    info!(secs = step.elapsed().as_secs_f64(), "upgrade: done");
    Ok(())
}

fn install_extra_packages(root: &Path, packages: &[String], log: &CommandLog) -> Result<()> {
    let policy = root.join("usr/sbin/policy-rc.d");
    // Exit code 101 is invoke-rc.d's "action forbidden": packages install without starting
    // daemons on the build host.
    fs::write(&policy, "#!/bin/sh\nexit 101\n").context("writing policy-rc.d")?;
    fs::set_permissions(&policy, fs::Permissions::from_mode(0o755))?;

    // The host's apt configuration does not apply inside the chroot; a mirror snapshot with an
    // expired Release file is still the mirror we were told to use.
    let apt = |args: &[&str]| {
        let mut cmd = chroot(root, "apt-get");
        cmd.args(["-q", "-o", "Acquire::Check-Valid-Until=false"]).args(args);
        cmd
    };
    log.run(&mut apt(&["update"]))?;
    log.run(apt(&["install", "-y", "--no-install-recommends"]).args(packages))?;
    log.run(&mut apt(&["clean"]))?;

    fs::remove_file(&policy).context("removing policy-rc.d")?;
    Ok(())
}

/// Returns the blocks of deleted files (the downloaded .debs, apt's regenerated caches) to the
/// sparse image, so that they do not count as changed blocks. ext4 only hands blocks freed in a
/// transaction to fstrim once that transaction is committed, hence the syncfs first.
fn trim_free_space(root: &Path, log: &CommandLog) -> Result<()> {
    let dir = File::open(root).with_context(|| format!("opening {}", root.display()))?;
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("syncfs {}", root.display()));
    }
    log.run(Command::new("fstrim").arg("--verbose").arg(root))
}

fn chroot(root: &Path, program: &str) -> Command {
    let mut cmd = tool("chroot");
    cmd.arg(root).arg(program).env("PATH", CHROOT_PATH).env("HOME", "/root");
    cmd
}

// ---------------------------------------------------------------------------------------------
// The mirror, as the host's apt already knows it.

const DEB822_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
const ONE_LINE_SOURCES: &str = "/etc/apt/sources.list";

fn host_mirror(suite: &str) -> Result<String> {
    let from_deb822 = fs::read_to_string(DEB822_SOURCES).ok().and_then(|t| mirror_from_deb822(&t, suite));
    let found = from_deb822
        .or_else(|| fs::read_to_string(ONE_LINE_SOURCES).ok().and_then(|t| mirror_from_one_line_sources(&t, suite)));
    found.with_context(|| {
        format!(
            "no apt source for suite {suite:?} with component main in {DEB822_SOURCES} (URIs:/Suites:) \
             or {ONE_LINE_SOURCES} (`deb URL {suite} main`): the disk images are built from the \
             host's Debian mirror, so add one there"
        )
    })
}

/// First `URIs:` of an enabled `deb` stanza whose `Suites:` lists `suite` and which has `main`.
fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    deb822_stanzas(text).into_iter().find_map(|stanza| {
        let field = |name: &str| {
            stanza.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).unwrap_or("")
        };
        let lists = |name: &str, want: &str| field(name).split_whitespace().any(|w| w == want);
        let enabled = !field("Enabled").trim().eq_ignore_ascii_case("no");
        let has_main = field("Components").trim().is_empty() || lists("Components", "main");
        (enabled && lists("Types", "deb") && lists("Suites", suite) && has_main)
            .then(|| field("URIs").split_whitespace().next().map(str::to_string))
            .flatten()
    })
}

/// Splits deb822 text into stanzas of (field, value); continuation lines join their field.
fn deb822_stanzas(text: &str) -> Vec<Vec<(String, String)>> {
    let mut stanzas = vec![];
    let mut current: Vec<(String, String)> = vec![];
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                stanzas.push(std::mem::take(&mut current));
            }
        } else if line.starts_with('#') {
            continue;
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = current.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            current.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    if !current.is_empty() {
        stanzas.push(current);
    }
    stanzas
}

/// URL of the first `deb [options] URL suite main…` line.
fn mirror_from_one_line_sources(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        let rest = line.strip_prefix("deb")?.strip_prefix([' ', '\t'])?.trim_start();
        // Options are `[key=value …]` and may contain spaces.
        let rest = match rest.strip_prefix('[') {
            Some(options) => options.split_once(']')?.1,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let (url, line_suite) = (words.next()?, words.next()?);
        let has_main = words.any(|component| component == "main");
        (line_suite == suite && has_main).then(|| url.to_string())
    })
}

// ---------------------------------------------------------------------------------------------
// Comparing images.

/// Compares two same-size images `block` bytes at a time and returns how many blocks differ and
/// how many bytes those blocks cover (the last block may be short). A hole reads as zeros, so a
/// hole and a written block of zeros are equal. Ranges that are holes in both files are skipped
/// without reading them (`SEEK_DATA`/`SEEK_HOLE`), which makes sparse images cheap to compare.
pub fn changed_blocks(a: &Path, b: &Path, block: usize) -> Result<(u64, u64)> {
    ensure!(block > 0, "block size must be positive");
    let file_a = File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let file_b = File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let size = file_a.metadata()?.len();
    let size_b = file_b.metadata()?.len();
    ensure!(
        size == size_b,
        "cannot compare {} ({size} bytes) with {} ({size_b} bytes): sizes differ",
        a.display(),
        b.display()
    );
    let block = block as u64;
    let mut counter = BlockCounter::new(block);
    let mut pos = 0;
    while pos < size {
        let data_start = next_data(&file_a, pos, size)?.min(next_data(&file_b, pos, size)?);
        if data_start >= size {
            break;
        }
        // From the first byte either file has data, to where both are back in a hole. Blocks are
        // compared whole, so the run is widened to block boundaries.
        let run_end = next_hole(&file_a, data_start, size)?.max(next_hole(&file_b, data_start, size)?);
        let start = data_start / block * block;
        let end = run_end.div_ceil(block).saturating_mul(block).min(size);
        counter.compare_range(&file_a, &file_b, start, end)?;
        pos = end;
    }
    Ok((counter.blocks, counter.bytes))
}

struct BlockCounter {
    block: u64,
    blocks: u64,
    bytes: u64,
    buf_a: Vec<u8>,
    buf_b: Vec<u8>,
}

impl BlockCounter {
    fn new(block: u64) -> Self {
        // Read several blocks per syscall when blocks are small.
        let chunk = (block * (1_u64 << 20).div_ceil(block)) as usize;
        BlockCounter { block, blocks: 0, bytes: 0, buf_a: vec![0; chunk], buf_b: vec![0; chunk] }
    }

    /// `start` is block-aligned; `end` is block-aligned or the end of the files.
    fn compare_range(&mut self, a: &File, b: &File, start: u64, end: u64) -> Result<()> {
        let mut pos = start;
        while pos < end {
            let len = (self.buf_a.len() as u64).min(end - pos) as usize;
            a.read_exact_at(&mut self.buf_a[..len], pos)?;
            b.read_exact_at(&mut self.buf_b[..len], pos)?;
            for (chunk_a, chunk_b) in
                self.buf_a[..len].chunks(self.block as usize).zip(self.buf_b[..len].chunks(self.block as usize))
            {
                if chunk_a != chunk_b {
                    self.blocks += 1;
                    self.bytes += chunk_a.len() as u64;
                }
            }
            pos += len as u64;
        }
        Ok(())
    }
}

/// Offset of the first data at or after `pos`, or `size` if there is none.
fn next_data(file: &File, pos: u64, size: u64) -> Result<u64> {
    match seek(file, pos, libc::SEEK_DATA) {
        Ok(offset) => Ok(offset.min(size)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(size),
        // Filesystems without hole reporting: everything is data.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(pos),
        Err(e) => Err(e).context("lseek(SEEK_DATA)"),
    }
}

/// Offset of the first hole at or after `pos` (the end of the file counts as one).
fn next_hole(file: &File, pos: u64, size: u64) -> Result<u64> {
    match seek(file, pos, libc::SEEK_HOLE) {
        Ok(offset) => Ok(offset.min(size)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO) | Some(libc::EINVAL)) => Ok(size),
        Err(e) => Err(e).context("lseek(SEEK_HOLE)"),
    }
}

fn seek(file: &File, pos: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let offset = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
    if offset < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(offset as u64)
    }
}

fn allocated_bytes(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.blocks() * 512)
}

// ---------------------------------------------------------------------------------------------
// Running commands.

fn tool(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("LC_ALL", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string());
    cmd
}

/// Runs external commands with their output appended to one log file, so that a failure can
/// quote the end of it and the rest stays available for a closer look.
struct CommandLog {
    path: PathBuf,
}

impl CommandLog {
    fn create(path: &Path) -> Result<Self> {
        File::create(path).with_context(|| format!("creating log {}", path.display()))?;
        Ok(CommandLog { path: path.to_path_buf() })
    }

    fn run(&self, cmd: &mut Command) -> Result<()> {
        self.run_logged(cmd, false).map(|_| ())
    }

    /// Like `run`, but returns what the command printed on stdout instead of logging it.
    fn run_capturing_stdout(&self, cmd: &mut Command) -> Result<String> {
        self.run_logged(cmd, true)
    }

    fn run_logged(&self, cmd: &mut Command, capture_stdout: bool) -> Result<String> {
        let described = describe(cmd);
        let mut log = OpenOptions::new().append(true).open(&self.path)?;
        writeln!(log, "\n=== {described}")?;
        let output_starts_at = log.metadata()?.len();
        let stdout = if capture_stdout { Stdio::piped() } else { Stdio::from(log.try_clone()?) };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log.try_clone()?)
            .spawn()
            .with_context(|| format!("could not start `{described}` (is it installed?)"))?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "`{described}` failed ({}); last lines of its output (full log: {}):\n{}",
                output.status,
                self.path.display(),
                tail_lines(&self.path, output_starts_at, FAILURE_TAIL_LINES)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `count` lines of `path` from byte `from` on.
fn tail_lines(path: &Path, from: u64, count: usize) -> String {
    let mut text = String::new();
    let read = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        let mut bytes = vec![];
        f.read_to_end(&mut bytes)?;
        text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    if read.is_err() {
        return "(log unreadable)".into();
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Guards: whatever a build sets up is undone on every way out of it.

/// Files that are deleted unless the build gets far enough to `disarm` the guard.
struct RemoveOnDrop {
    paths: Vec<PathBuf>,
}

impl RemoveOnDrop {
    fn new(paths: Vec<PathBuf>) -> Self {
        RemoveOnDrop { paths }
    }

    fn disarm(mut self) {
        self.paths.clear();
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = fs::remove_file(path);
        }
    }
}

/// Serialises builds of the same suite in the same cache directory (flock, released on close,
/// so a crashed build never leaves it held).
struct BuildLock {
    _file: File,
}

impl BuildLock {
    fn acquire(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating lock {}", path.display()))?;
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            info!(lock = %path.display(), "disk images: waiting for another build of the same images");
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(std::io::Error::last_os_error()).context("flock");
            }
        }
        Ok(BuildLock { _file: file })
    }
}

/// debootstrap's target directory. Removed when dropped, unless something is still mounted
/// beneath it: deleting through a live /proc or /dev bind mount would reach the host's.
struct StagingDir {
    path: PathBuf,
}

impl StagingDir {
    /// An empty directory at `path`, clearing whatever a crashed earlier build left there.
    fn fresh(path: &Path) -> Result<Self> {
        let staging = StagingDir { path: path.to_path_buf() };
        staging.remove_contents()?;
        fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(staging)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn remove(self) -> Result<()> {
        self.remove_contents()
    }

    fn remove_contents(&self) -> Result<()> {
        let mounted = mount_points_under(&self.path);
        ensure!(mounted.is_empty(), "not removing {}: still mounted beneath it: {mounted:?}", self.path.display());
        match fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", self.path.display()))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(e) = self.remove_contents() {
            warn!("{e:#}");
        }
    }
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
fn mount_points_under(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mount_point| mount_point.starts_with(dir))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as three-digit octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A loop device backed by an image file; detached when dropped.
struct LoopDevice {
    device: PathBuf,
    detached: bool,
}

impl LoopDevice {
    fn attach(image: &Path, log: &CommandLog) -> Result<Self> {
        let device = log.run_capturing_stdout(Command::new("losetup").args(["--find", "--show"]).arg(image))?;
        let device = PathBuf::from(device.trim());
        ensure!(device.starts_with("/dev"), "losetup printed {device:?} instead of a device");
        Ok(LoopDevice { device, detached: false })
    }

    fn path(&self) -> &Path {
        &self.device
    }

    fn detach(mut self) -> Result<()> {
        self.detached = true;
        detach_loop(&self.device)
    }
}

/// Detaches `device` and waits (briefly) until the kernel has let go of the backing file: a
/// device still opened by a udev probe is only marked for autoclear and freed a moment later.
fn detach_loop(device: &Path) -> Result<()> {
    let out = Command::new("losetup").arg("-d").arg(device).output().context("running losetup -d")?;
    ensure!(
        out.status.success(),
        "losetup -d {} failed: {}",
        device.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    for _ in 0..50 {
        if loop_backing_file(device).is_none() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    warn!(device = %device.display(), "loop device still attached 5 s after losetup -d");
    Ok(())
}

/// The file behind a loop device, from sysfs; `None` once it is detached.
fn loop_backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let text = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    // The kernel appends " (deleted)" when the file has been unlinked.
    let text = text.trim_end();
    Some(PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(text)))
}

fn loop_devices_backed_by(image: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/block") else { return vec![] };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .map(|e| Path::new("/dev").join(e.file_name()))
        .filter(|device| loop_backing_file(device).as_deref() == Some(image))
        .collect()
}

/// A build that was killed ran no guards, so its mounts, loop device and chroot processes may
/// still be there. They sit under this suite's own names and we hold the build lock: they can
/// only be that build's.
fn clear_leftovers_of_killed_build(paths: &CachePaths) -> Result<()> {
    // Its apt or dpkg may even still be running in the chroot, orphaned.
    kill_processes_rooted_at(&paths.mount_point);
    kill_processes_rooted_at(&paths.staging);
    let mut mounts: Vec<PathBuf> =
        [&paths.mount_point, &paths.staging].into_iter().flat_map(|dir| mount_points_under(dir)).collect();
    // Deepest first: /mnt/proc before /mnt.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for mount in mounts {
        warn!(mount = %mount.display(), "unmounting what an interrupted build left mounted");
        unmount(&mount)?;
    }
    for device in loop_devices_backed_by(&paths.newer_partial) {
        warn!(device = %device.display(), "detaching what an interrupted build left attached");
        detach_loop(&device)?;
    }
    Ok(())
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if !self.detached {
            if let Err(e) = detach_loop(&self.device) {
                warn!("{e:#}");
            }
        }
    }
}

/// The image mounted at `root` plus the host filesystems bound into it for the chroot. Dropping
/// it ends whatever the chroot left running and unmounts in reverse order.
struct ChrootMounts {
    root: PathBuf,
    mounted: Vec<PathBuf>,
}

impl ChrootMounts {
    fn new(root: &Path) -> Self {
        ChrootMounts { root: root.to_path_buf(), mounted: vec![] }
    }

    fn mount(&mut self, log: &CommandLog, options: &[&str], source: &Path, target: &Path) -> Result<()> {
        log.run(Command::new("mount").args(options).arg(source).arg(target))?;
        self.mounted.push(target.to_path_buf());
        Ok(())
    }

    fn unmount_all(&mut self) -> Result<()> {
        kill_processes_rooted_at(&self.root);
        while let Some(target) = self.mounted.pop() {
            unmount(&target)?;
        }
        // Only an empty directory goes: if the image is somehow still mounted, this fails.
        let _ = fs::remove_dir(&self.root);
        Ok(())
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            warn!("{e:#}");
        }
    }
}

/// Unmounts `target`, retrying briefly while it is busy (processes just killed may still hold
/// it) and detaching it lazily as a last resort so that it is at least gone from the namespace.
fn unmount(target: &Path) -> Result<()> {
    let c_target = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())?;
    for _ in 0..10 {
        if unsafe { libc::umount2(c_target.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err).with_context(|| format!("unmounting {}", target.display()));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    warn!(target = %target.display(), "still busy: detaching lazily");
    if unsafe { libc::umount2(c_target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("unmounting {}", target.display()));
    }
    Ok(())
}

/// Maintainer scripts can leave daemons behind despite policy-rc.d (gpg-agent, a postgres run
/// by its postinst); they live in our chroot and would keep the image busy.
fn kill_processes_rooted_at(root: &Path) {
    let Ok(root) = root.canonicalize() else { return };
    let Ok(entries) = fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<libc::pid_t>().ok()) else { continue };
        if fs::read_link(entry.path().join("root")).is_ok_and(|r| r == root) {
            warn!(pid, "killing a process left running in the chroot");
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A file in the temp dir, removed at the end of the test.
    struct TempFile(PathBuf);

    impl TempFile {
        fn sparse(size: u64) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!("ferry-disk-image-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            let path = std::env::temp_dir().join(name);
            File::create(&path).unwrap().set_len(size).unwrap();
            TempFile(path)
        }

        fn write_at(&self, offset: u64, bytes: &[u8]) -> &Self {
            OpenOptions::new().write(true).open(&self.0).unwrap().write_all_at(bytes, offset).unwrap();
            self
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }

    const K64: u64 = 65536;

    #[test]
    fn deb822_picks_the_stanza_listing_the_suite() {
        let text = "\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
";
        assert_eq!(mirror_from_deb822(text, "bookworm").as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(
            mirror_from_deb822(text, "bookworm-security").as_deref(),
            Some("http://mirror.example/debian-security")
        );
        assert_eq!(mirror_from_deb822(text, "trixie"), None);
    }

    #[test]
    fn deb822_skips_disabled_source_only_and_mainless_stanzas() {
        let text = "\
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://contrib.example/debian
Suites: bookworm
Components: contrib

types: deb deb-src
uris: http://a.example/debian
  http://b.example/debian
suites:
  bookworm
components: main contrib
";
        assert_eq!(mirror_from_deb822(text, "bookworm").as_deref(), Some("http://a.example/debian"));
    }

    #[test]
    fn one_line_sources_match_suite_and_main() {
        let text = "\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb http://security.example/debian-security bookworm-security main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian archive.gpg] http://mirror.example/debian bookworm main contrib # trailing
deb http://later.example/debian bookworm main
";
        assert_eq!(mirror_from_one_line_sources(text, "bookworm").as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(mirror_from_one_line_sources("deb http://x.example/debian bookworm contrib\n", "bookworm"), None);
        assert_eq!(mirror_from_one_line_sources("", "bookworm"), None);
    }

    #[test]
    fn identical_sparse_files_have_no_changed_blocks() {
        let size = 64 * K64;
        let a = TempFile::sparse(size);
        let b = TempFile::sparse(size);
        for f in [&a, &b] {
            f.write_at(3 * K64 + 17, b"same bytes").write_at(40 * K64, &vec![7; 3 * K64 as usize]);
        }
        assert_eq!(changed_blocks(&a.0, &b.0, K64 as usize).unwrap(), (0, 0));
        assert_eq!(changed_blocks(&a.0, &a.0, 4096).unwrap(), (0, 0));
    }

    #[test]
    fn one_differing_block_is_counted_once() {
        let size = 64 * K64;
        let a = TempFile::sparse(size);
        let b = TempFile::sparse(size);
        a.write_at(10 * K64, &vec![1; 2 * K64 as usize]);
        b.write_at(10 * K64, &vec![1; 2 * K64 as usize]).write_at(11 * K64 + 5, b"x");
        assert_eq!(changed_blocks(&a.0, &b.0, K64 as usize).unwrap(), (1, K64));
    }

    #[test]
    fn data_against_a_hole_differs_unless_it_is_zeros() {
        let size = 16 * K64;
        let a = TempFile::sparse(size);
        let b = TempFile::sparse(size);
        // Zeros written into a are equal to b's hole; b's data at the end is not.
        a.write_at(2 * K64, &vec![0; K64 as usize]);
        b.write_at(15 * K64 + 100, b"tail data");
        assert_eq!(changed_blocks(&a.0, &b.0, K64 as usize).unwrap(), (1, K64));
        // The same difference seen from the other side.
        assert_eq!(changed_blocks(&b.0, &a.0, K64 as usize).unwrap(), (1, K64));
    }

    #[test]
    fn a_short_last_block_counts_its_own_length() {
        let size = 4 * K64 + 1000;
        let a = TempFile::sparse(size);
        let b = TempFile::sparse(size);
        b.write_at(size - 1, b"z");
        assert_eq!(changed_blocks(&a.0, &b.0, K64 as usize).unwrap(), (1, 1000));
    }

    #[test]
    fn small_blocks_count_each_difference() {
        let a = TempFile::sparse(K64);
        let b = TempFile::sparse(K64);
        b.write_at(0, b"a").write_at(4096 * 3, b"b").write_at(4096 * 3 + 1, b"c");
        assert_eq!(changed_blocks(&a.0, &b.0, 4096).unwrap(), (2, 8192));
    }

    #[test]
    fn different_sizes_are_an_error() {
        let a = TempFile::sparse(K64);
        let b = TempFile::sparse(2 * K64);
        let err = changed_blocks(&a.0, &b.0, K64 as usize).unwrap_err();
        assert!(err.to_string().contains("sizes differ"), "{err}");
    }

    #[test]
    fn spec_hash_ignores_cache_dir_but_not_packages() {
        let spec = DiskImageSpec::default();
        let moved = DiskImageSpec { cache_dir: "/elsewhere".into(), ..spec.clone() };
        let more = DiskImageSpec { extra_packages: vec!["perl".into()], ..spec.clone() };
        assert_eq!(spec_hash(&spec), spec_hash(&moved));
        assert_ne!(spec_hash(&spec), spec_hash(&more));
    }

    #[test]
    fn spec_validation_rejects_what_the_tools_would_misread() {
        assert!(validate_spec(&DiskImageSpec::default()).is_ok());
        let bad_package = DiskImageSpec { extra_packages: vec!["a,b".into()], ..Default::default() };
        assert!(validate_spec(&bad_package).is_err());
        let tiny = DiskImageSpec { size_bytes: 1 << 20, ..Default::default() };
        assert!(validate_spec(&tiny).is_err());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
    }

    #[test]
    fn failure_tail_keeps_the_last_lines_after_the_offset() {
        let log = TempFile::sparse(0);
        fs::write(&log.0, "earlier command\n1\n2\n3\n").unwrap();
        assert_eq!(tail_lines(&log.0, "earlier command\n".len() as u64, 2), "2\n3");
    }

    #[test]
    fn a_failing_command_is_named_with_its_output() {
        let log_file = TempFile::sparse(0);
        let log = CommandLog::create(&log_file.0).unwrap();
        let err = log.run(Command::new("sh").args(["-c", "echo first; echo boom >&2; exit 3"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c") && text.contains("boom") && text.contains("first"), "{text}");
        assert_eq!(log.run_capturing_stdout(Command::new("echo").arg("hi")).unwrap(), "hi\n");
    }

    /// Full build into the default cache dir: needs root, the Debian mirror and several minutes.
    /// `cargo test -p ferry-lab disk_image -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn full_build_changes_about_490_mib_of_64k_blocks() {
        let images = build_disk_images(&DiskImageSpec::default()).unwrap();
        let report = &images.report;
        eprintln!("{}", serde_json::to_string_pretty(report).unwrap());
        assert!(images.older.exists() && images.newer.exists());
        let mib = report.changed_bytes >> 20;
        assert!((400..=550).contains(&mib), "{mib} MiB of 64 KiB blocks changed");
        // A second call is a cache hit and reports the same build.
        let again = build_disk_images(&DiskImageSpec::default()).unwrap();
        assert_eq!(&again.report, report);
    }
}
