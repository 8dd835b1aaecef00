//! The private CA: creating it, and issuing site certificates with it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use time::{Duration, OffsetDateTime};

use crate::layout::{
    ca_cert_path, ca_key_path, create_new_file, read_pki_file, replace_file, site_cert_path,
    site_key_path, sites_dir, validate_site_name, CERTIFICATE_MODE, PRIVATE_KEY_MODE,
};

/// The CA outlives many site certificates, so that renewing sites never means
/// redistributing `ca.pem`.
const CA_VALIDITY: Duration = Duration::days(10 * 365);

/// Site certificates are renewed yearly: long enough not to be a chore, short
/// enough that a leaked key stops working on its own.
const SITE_VALIDITY: Duration = Duration::days(365);

/// Certificates start this long before they are made: sites sit in different
/// data centres and a peer whose clock runs a little behind must not see a
/// fresh certificate as "not yet valid".
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::hours(1);

/// X.520's upper bound for a common name.
const MAX_CA_NAME_LEN: usize = 64;

pub(crate) const HOW_TO_CREATE_CA: &str = "create the CA with `ferry pki init`";

/// Creates a new CA in `dir`: `ca.pem` and `ca.key` (mode 0600).
///
/// Refuses if either file already exists: replacing a CA silently would cut
/// every site issued by the old one off from the others.
pub fn init_ca(dir: &Path, ca_name: &str) -> Result<()> {
    if ca_name.trim().is_empty()
        || ca_name.len() > MAX_CA_NAME_LEN
        || ca_name.chars().any(char::is_control)
    {
        bail!("invalid CA name {ca_name:?}: use 1-{MAX_CA_NAME_LEN} printable characters");
    }
    let cert_path = ca_cert_path(dir);
    let key_path = ca_key_path(dir);
    for existing in [&cert_path, &key_path] {
        if existing.exists() {
            bail!(
                "a CA already exists in {}: {} is present; refusing to overwrite it \
                 (every site certificate issued by it would stop working)",
                dir.display(),
                existing.display()
            );
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(ca_name);
    // Path length 0: this CA signs site certificates directly and nothing else
    // may act as an intermediate below it.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.not_before, params.not_after) = validity_from_now(CA_VALIDITY);
    let cert = params
        .self_signed(&key)
        .context("cannot create the CA certificate")?;

    // Key first: a crash in between leaves a key without a certificate, which
    // the next `init` reports, rather than a certificate nobody can sign with.
    create_new_file(&key_path, key.serialize_pem().as_bytes(), PRIVATE_KEY_MODE)?;
    create_new_file(&cert_path, cert.pem().as_bytes(), CERTIFICATE_MODE)?;
    Ok(())
}

/// Issues (or re-issues) the certificate and key of `site`, signed by the CA in
/// `dir`, and returns the certificate's path.
///
/// The certificate names the site as its only DNS subject-alt-name and allows
/// both TLS server and client use, since every agent both accepts and makes
/// connections. Re-issuing replaces the site's files; the old certificate
/// stays valid until it expires.
pub fn issue_site(dir: &Path, site: &str) -> Result<PathBuf> {
    validate_site_name(site)?;
    let issuer = load_ca_issuer(dir)?;

    let key = KeyPair::generate().context("cannot generate the site key")?;
    let mut params = CertificateParams::new(vec![site.to_owned()])
        .with_context(|| format!("cannot use {site:?} as a certificate name"))?;
    params.distinguished_name = common_name(site);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = validity_from_now(SITE_VALIDITY);
    let cert = params
        .signed_by(&key, &issuer)
        .with_context(|| format!("cannot sign the certificate of site {site:?}"))?;

    let sites = sites_dir(dir);
    fs::create_dir_all(&sites).with_context(|| format!("cannot create {}", sites.display()))?;
    let cert_path = site_cert_path(dir, site);
    replace_file(
        &site_key_path(dir, site),
        key.serialize_pem().as_bytes(),
        PRIVATE_KEY_MODE,
    )?;
    replace_file(&cert_path, cert.pem().as_bytes(), CERTIFICATE_MODE)?;
    Ok(cert_path)
}

/// Loads the CA certificate and key as something that can sign, checking they
/// belong together: a mismatched pair would sign certificates no site accepts.
fn load_ca_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let cert_path = ca_cert_path(dir);
    let key_path = ca_key_path(dir);
    let cert_pem = read_pki_file(&cert_path, "CA certificate", HOW_TO_CREATE_CA)?;
    let key_pem = read_pki_file(
        &key_path,
        "CA key",
        "certificates can only be issued where the CA was created (`ferry pki init`)",
    )?;
    let key_pem = String::from_utf8(key_pem)
        .map_err(|_| anyhow!("{} is not a PEM file", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| anyhow!("{} is not a usable private key: {e}", key_path.display()))?;
    let cert_der = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| {
        anyhow!(
            "{} does not hold a PEM certificate: {e}",
            cert_path.display()
        )
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| anyhow!("{} is not a valid certificate: {e}", cert_path.display()))?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        bail!(
            "{} does not belong to the CA certificate {}",
            key_path.display(),
            cert_path.display()
        );
    }
    Issuer::from_ca_cert_der(&cert_der, key)
        .map_err(|e| anyhow!("cannot use {} as a CA: {e}", cert_path.display()))
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn validity_from_now(lifetime: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - CLOCK_SKEW_ALLOWANCE, now + lifetime)
}
