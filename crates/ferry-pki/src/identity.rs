//! A site's identity: its certificate and key, and the CA it trusts, loaded and
//! checked once so that mistakes show up at start-up rather than at the first
//! transfer.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, Error as TlsError, InconsistentKeys, RootCertStore};

use crate::ca::HOW_TO_CREATE_CA;
use crate::explain::{describe_certificate_error, presented_names};
use crate::layout::{
    ca_cert_path, read_pki_file, site_cert_path, site_key_path, validate_site_name,
};
use crate::tls::crypto_provider;

/// Everything a site needs to take part in mutual TLS with other sites.
pub struct SiteIdentity {
    /// This site's name, as its certificate proves it.
    pub site: String,
    /// This site's certificate first, then any intermediates (none today).
    pub(crate) cert_chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    /// The CA whose signature makes a peer a ferry site.
    pub(crate) ca_roots: Arc<RootCertStore>,
}

// By hand so that the private key can never end up in a log line.
impl fmt::Debug for SiteIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteIdentity")
            .field("site", &self.site)
            .field("certificates", &self.cert_chain.len())
            .field("ca_roots", &self.ca_roots.len())
            .finish_non_exhaustive()
    }
}

/// Loads and checks the identity of `site` from the PKI directory `dir`.
///
/// Besides parsing, checks what would otherwise surface later as a puzzling
/// handshake failure: that the key belongs to the certificate, and that the
/// certificate is signed by the CA in `ca.pem`, names `site`, allows both TLS
/// uses and is within its validity period.
pub fn load_identity(dir: &Path, site: &str) -> Result<SiteIdentity> {
    validate_site_name(site)?;
    let ca_path = ca_cert_path(dir);
    let cert_path = site_cert_path(dir, site);
    let key_path = site_key_path(dir, site);
    let how_to_issue = format!("create it with `ferry pki issue {site}`");

    let ca_pem = read_pki_file(
        &ca_path,
        "CA certificate",
        &format!("{HOW_TO_CREATE_CA}, or copy ca.pem from where the CA was created"),
    )?;
    let cert_pem = read_pki_file(
        &cert_path,
        &format!("certificate of site {site:?}"),
        &how_to_issue,
    )?;
    let key_pem = read_pki_file(&key_path, &format!("key of site {site:?}"), &how_to_issue)?;

    let ca_certs = parse_certificates(&ca_pem, &ca_path)?;
    let cert_chain = parse_certificates(&cert_pem, &cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        anyhow!(
            "{} does not hold a PEM private key: {e}",
            key_path.display()
        )
    })?;

    let mut ca_roots = RootCertStore::empty();
    for ca_cert in ca_certs {
        ca_roots
            .add(ca_cert)
            .map_err(|e| anyhow!("{} is not a usable CA certificate: {e}", ca_path.display()))?;
    }
    let ca_roots = Arc::new(ca_roots);

    let provider = crypto_provider();
    match CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &provider) {
        Ok(_) => {}
        Err(TlsError::InconsistentKeys(InconsistentKeys::KeyMismatch)) => bail!(
            "{} does not belong to the certificate {} (key/certificate mismatch); \
             re-issue both with `ferry pki issue {site}`",
            key_path.display(),
            cert_path.display()
        ),
        Err(e) => bail!("{} is not a usable private key: {e}", key_path.display()),
    }

    let site_cert = format!("site certificate {}", cert_path.display());
    let describe = |e: TlsError| match e {
        TlsError::InvalidCertificate(CertificateError::NotValidForNameContext {
            presented,
            ..
        }) => anyhow!(
            "{site_cert} names site {}, not {site:?}; re-issue it with `ferry pki issue {site}`",
            presented_names(&presented)
        ),
        TlsError::InvalidCertificate(cert_err) => anyhow!(
            "{}; re-issue it with `ferry pki issue {site}`",
            describe_certificate_error(
                &site_cert,
                &format!("the CA in {}", ca_path.display()),
                &cert_err
            )
        ),
        other => anyhow!("cannot verify {}: {other}", cert_path.display()),
    };
    let (end_entity, intermediates) = cert_chain
        .split_first()
        .expect("parse_certificates returns at least one");
    let now = UnixTime::now();
    // Run the same verifiers peers will run, as server and as client.
    WebPkiServerVerifier::builder_with_provider(ca_roots.clone(), provider.clone())
        .build()?
        .verify_server_cert(
            end_entity,
            intermediates,
            &ServerName::try_from(site.to_owned())?,
            &[],
            now,
        )
        .map_err(describe)?;
    WebPkiClientVerifier::builder_with_provider(ca_roots.clone(), provider)
        .build()?
        .verify_client_cert(end_entity, intermediates, now)
        .map_err(describe)?;

    Ok(SiteIdentity {
        site: site.to_owned(),
        cert_chain,
        key,
        ca_roots,
    })
}

/// All CERTIFICATE blocks of a PEM file; at least one.
fn parse_certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow!(
                "{} is not a valid PEM certificate file: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        bail!("{} contains no PEM certificate", path.display());
    }
    Ok(certs)
}
