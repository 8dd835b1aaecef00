//! Shared by the integration tests: throw-away PKI directories and rustls
//! configs that `SiteIdentity` would never build (mixed or missing certificates).

#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// A PKI directory under the system temp dir, removed when dropped.
pub struct TempPki {
    pub dir: PathBuf,
}

impl TempPki {
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ferry-pki-test-{}-{label}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempPki { dir }
    }

    /// A fresh CA named `ca_name` with the given sites issued.
    pub fn with_sites(label: &str, ca_name: &str, sites: &[&str]) -> Self {
        let pki = Self::new(label);
        ferry_pki::init_ca(&pki.dir, ca_name).unwrap();
        for site in sites {
            ferry_pki::issue_site(&pki.dir, site).unwrap();
        }
        pki
    }
}

impl Drop for TempPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots_of(ca_dir: &Path) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_dir.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

/// A client that trusts the CA in `trust_dir` but presents the certificate of
/// `site` from `cert_dir` — or no certificate at all when `cert_dir` is None.
pub fn client_config_with(
    trust_dir: &Path,
    client_cert: Option<(&Path, &str)>,
) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots_of(trust_dir));
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert_dir, site)) => {
            let sites = cert_dir.join("sites");
            let chain = CertificateDer::pem_file_iter(sites.join(format!("{site}.pem")))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(sites.join(format!("{site}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    Arc::new(config)
}
