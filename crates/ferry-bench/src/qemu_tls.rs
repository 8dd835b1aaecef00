//! The x509 credentials QEMU's own migration TLS wants (`-object tls-creds-x509,dir=DIR`), as
//! libvirt's `migrate_tls_x509_cert_dir` holds them: a CA, a server certificate for the
//! destination host and a client certificate for the source, in one directory.
use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::path::Path;

/// Writes ca-cert.pem, server-cert.pem/server-key.pem (names: `server_names`, DNS names or IP
/// addresses) and client-cert.pem/client-key.pem into `dir`.
pub fn write_creds(dir: &Path, server_names: &[&str]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = cn("ferry bench QEMU migration CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).context("the QEMU CA")?;
    let issuer = Issuer::new(ca, ca_key);
    std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem())?;
    let names: Vec<String> = server_names.iter().map(|s| s.to_string()).collect();
    for (role, names, purpose) in [("server", names, ExtendedKeyUsagePurpose::ServerAuth), ("client", vec!["source".to_string()], ExtendedKeyUsagePurpose::ClientAuth)] {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(names.clone())?;
        p.distinguished_name = cn(&names[0]);
        p.is_ca = IsCa::ExplicitNoCa;
        // QEMU's certificate checks want both usages on a TLS peer's certificate.
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![purpose];
        let cert = p.signed_by(&key, &issuer).with_context(|| format!("the QEMU {role} certificate"))?;
        std::fs::write(dir.join(format!("{role}-cert.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{role}-key.pem")), key.serialize_pem())?;
    }
    Ok(())
}

fn cn(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}
