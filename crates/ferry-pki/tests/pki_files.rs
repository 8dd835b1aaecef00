//! The CA and site files on disk: what gets refused, what the errors say,
//! what the certificates contain, and who may read the keys.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ferry_pki::{init_ca, issue_site, load_identity};
use support::TempPki;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{parse_x509_certificate, ExtendedKeyUsage};

fn error_of<T: std::fmt::Debug>(result: anyhow::Result<T>) -> String {
    let message = format!("{:#}", result.expect_err("expected an error"));
    eprintln!("error: {message}");
    message
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_ca_refuses_to_overwrite_an_existing_ca() {
    let pki = TempPki::with_sites("reinit", "ferry test CA", &[]);
    let ca_before = fs::read(pki.dir.join("ca.pem")).unwrap();
    let key_before = fs::read(pki.dir.join("ca.key")).unwrap();

    let err = error_of(init_ca(&pki.dir, "ferry test CA"));
    assert!(err.contains("a CA already exists"), "{err}");
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(fs::read(pki.dir.join("ca.pem")).unwrap(), ca_before);
    assert_eq!(fs::read(pki.dir.join("ca.key")).unwrap(), key_before);

    // Half a CA (a key left by an interrupted init) is refused just the same.
    let half = TempPki::new("halfca");
    fs::create_dir_all(&half.dir).unwrap();
    fs::write(half.dir.join("ca.key"), "left over").unwrap();
    let err = error_of(init_ca(&half.dir, "ferry test CA"));
    assert!(err.contains("ca.key is present"), "{err}");
}

#[test]
fn issue_site_rejects_bad_names() {
    let pki = TempPki::with_sites("badnames", "ferry test CA", &[]);
    for bad in [
        "",
        "A",
        "1a",
        "-a",
        "a-",
        "a_b",
        "a.b",
        "../x",
        "sites/x",
        &"x".repeat(33),
    ] {
        let err = error_of(issue_site(&pki.dir, bad));
        assert!(err.contains("invalid site name"), "{bad:?}: {err}");
    }
    assert!(
        !pki.dir.join("sites").exists()
            || fs::read_dir(pki.dir.join("sites"))
                .unwrap()
                .next()
                .is_none()
    );
    issue_site(&pki.dir, &"x".repeat(32)).unwrap();
}

#[test]
fn issue_site_without_a_ca_says_how_to_create_one() {
    let empty = TempPki::new("noca");
    let err = error_of(issue_site(&empty.dir, "a"));
    assert!(err.contains("ca.pem does not exist"), "{err}");
    assert!(err.contains("`ferry pki init`"), "{err}");
}

#[test]
fn issued_certificate_names_the_site_and_allows_both_tls_roles() {
    let pki = TempPki::with_sites("contents", "ferry test CA", &[]);
    let cert_path = issue_site(&pki.dir, "par-1").unwrap();
    assert_eq!(cert_path, pki.dir.join("sites/par-1.pem"));

    let pem = fs::read(&cert_path).unwrap();
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
        .map(|der: rustls::pki_types::CertificateDer| der.to_vec())
        .unwrap();
    let (_, cert) = parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names, vec![GeneralName::DNSName("par-1")]);
    let eku: &ExtendedKeyUsage = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth, "{eku:?}");
    assert!(!cert.is_ca());
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(
        (365 * 86400..=366 * 86400).contains(&lifetime),
        "lifetime {lifetime} s"
    );
    assert_eq!(cert.issuer().to_string(), "CN=ferry test CA");
}

#[test]
fn load_identity_names_the_missing_file_and_the_command_that_creates_it() {
    let pki = TempPki::with_sites("missing", "ferry test CA", &["a"]);
    let err = error_of(load_identity(&pki.dir, "zed"));
    assert!(
        err.contains(&pki.dir.join("sites/zed.pem").display().to_string()),
        "{err}"
    );
    assert!(err.contains("does not exist"), "{err}");
    assert!(err.contains("`ferry pki issue zed`"), "{err}");

    fs::remove_file(pki.dir.join("sites/a.key")).unwrap();
    let err = error_of(load_identity(&pki.dir, "a"));
    assert!(err.contains("sites/a.key does not exist"), "{err}");
    assert!(err.contains("`ferry pki issue a`"), "{err}");

    let no_ca = TempPki::new("missingca");
    let err = error_of(load_identity(&no_ca.dir, "a"));
    assert!(err.contains("ca.pem does not exist"), "{err}");
    assert!(err.contains("`ferry pki init`"), "{err}");
}

#[test]
fn load_identity_reports_unparsable_pem() {
    let pki = TempPki::with_sites("garbage", "ferry test CA", &["a"]);
    fs::write(pki.dir.join("sites/a.pem"), "not a certificate\n").unwrap();
    let err = error_of(load_identity(&pki.dir, "a"));
    assert!(
        err.contains("sites/a.pem contains no PEM certificate"),
        "{err}"
    );

    issue_site(&pki.dir, "a").unwrap();
    fs::write(
        pki.dir.join("sites/a.key"),
        "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = error_of(load_identity(&pki.dir, "a"));
    assert!(
        err.contains("sites/a.key does not hold a PEM private key"),
        "{err}"
    );
}

#[test]
fn load_identity_detects_a_key_that_belongs_to_another_certificate() {
    let pki = TempPki::with_sites("mismatch", "ferry test CA", &["a", "b"]);
    fs::copy(pki.dir.join("sites/b.key"), pki.dir.join("sites/a.key")).unwrap();
    let err = error_of(load_identity(&pki.dir, "a"));
    assert!(err.contains("key/certificate mismatch"), "{err}");
    assert!(
        err.contains("sites/a.key does not belong to the certificate"),
        "{err}"
    );
}

#[test]
fn load_identity_refuses_a_certificate_from_another_ca_or_for_another_site() {
    let pki = TempPki::with_sites("wrongca", "ferry test CA", &["a", "b"]);
    let other = TempPki::with_sites("otherca", "some other CA", &["a"]);
    for file in ["a.pem", "a.key"] {
        fs::copy(
            other.dir.join("sites").join(file),
            pki.dir.join("sites").join(file),
        )
        .unwrap();
    }
    let err = error_of(load_identity(&pki.dir, "a"));
    assert!(
        err.contains("sites/a.pem is not signed by the CA in"),
        "{err}"
    );

    // b's files copied under a's name: a valid certificate, but not for a.
    for ext in ["pem", "key"] {
        fs::copy(
            pki.dir.join(format!("sites/b.{ext}")),
            pki.dir.join(format!("sites/a.{ext}")),
        )
        .unwrap();
    }
    let err = error_of(load_identity(&pki.dir, "a"));
    assert!(
        err.contains(r#"sites/a.pem names site "b", not "a""#),
        "{err}"
    );
}

#[test]
fn key_files_are_readable_by_the_owner_only() {
    let pki = TempPki::with_sites("modes", "ferry test CA", &["a"]);
    assert_eq!(mode_of(&pki.dir.join("ca.key")), 0o600);
    assert_eq!(mode_of(&pki.dir.join("sites/a.key")), 0o600);

    // Re-issuing replaces the files and keeps the key private.
    let old_key = fs::read(pki.dir.join("sites/a.key")).unwrap();
    issue_site(&pki.dir, "a").unwrap();
    assert_ne!(fs::read(pki.dir.join("sites/a.key")).unwrap(), old_key);
    assert_eq!(mode_of(&pki.dir.join("sites/a.key")), 0o600);
    load_identity(&pki.dir, "a").unwrap();
}
