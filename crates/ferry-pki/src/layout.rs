//! Where the PKI lives on disk, what a site may be called, and how files are written.
//!
//! ```text
//! DIR/ca.pem              CA certificate (public; copied to every site)
//! DIR/ca.key              CA private key (0600; stays where certificates are issued)
//! DIR/sites/<name>.pem    site certificate
//! DIR/sites/<name>.key    site private key (0600)
//! ```

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub(crate) const PRIVATE_KEY_MODE: u32 = 0o600;
pub(crate) const CERTIFICATE_MODE: u32 = 0o644;

/// Longest site name: short enough to read in logs and to stay one DNS label.
const MAX_SITE_NAME_LEN: usize = 32;

pub(crate) fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

pub(crate) fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

pub(crate) fn sites_dir(dir: &Path) -> PathBuf {
    dir.join("sites")
}

pub(crate) fn site_cert_path(dir: &Path, site: &str) -> PathBuf {
    sites_dir(dir).join(format!("{site}.pem"))
}

pub(crate) fn site_key_path(dir: &Path, site: &str) -> PathBuf {
    sites_dir(dir).join(format!("{site}.key"))
}

/// Checks that `site` is a usable site name: 1–32 characters of `[a-z0-9-]`,
/// starting with a letter and not ending with `-`.
///
/// The name becomes a DNS name in the certificate and the TLS server name, and
/// a file name under `sites/`; these rules keep it valid as all three (a DNS
/// label may not end with a hyphen) and rule out path tricks like `../x`.
pub fn validate_site_name(site: &str) -> Result<()> {
    let rules = "a site name is 1-32 characters of a-z, 0-9 and '-', \
                 starting with a letter and not ending with '-'";
    let first_is_letter = site.starts_with(|c: char| c.is_ascii_lowercase());
    let all_allowed = site
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if site.is_empty()
        || site.len() > MAX_SITE_NAME_LEN
        || !first_is_letter
        || !all_allowed
        || site.ends_with('-')
    {
        bail!("invalid site name {site:?}: {rules}");
    }
    Ok(())
}

/// Writes a new file with `mode`, refusing if anything is already at `path`.
///
/// `create_new` makes the existence check and the creation one step, so two
/// concurrent `init` runs cannot both believe they created the CA.
pub(crate) fn create_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `path` with `mode`, replacing any existing file.
///
/// Goes through a temporary file and a rename so readers see the old file or
/// the new one, never half of one; and the mode is set at creation so a key is
/// never readable by others, not even briefly.
pub(crate) fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale {}", tmp.display())),
    }
    create_new_file(&tmp, contents, mode)?;
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// Reads a file that `ferry pki` should have created, saying how to create it if it is missing.
pub(crate) fn read_pki_file(path: &Path, what: &str, how_to_create: &str) -> Result<Vec<u8>> {
    match fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!(
                "missing {what}: {} does not exist; {how_to_create}",
                path.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {what} {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::validate_site_name;

    #[test]
    fn site_names() {
        for good in ["a", "b2", "par-1", "x234567890123456789012345678901z"] {
            validate_site_name(good).unwrap();
        }
        for bad in [
            "",
            "1a",
            "-a",
            "a-",
            "A",
            "a.b",
            "a_b",
            "../a",
            "a/b",
            "é",
            "x2345678901234567890123456789012z",
        ] {
            assert!(
                validate_site_name(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
