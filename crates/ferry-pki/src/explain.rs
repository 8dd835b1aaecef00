//! Turns TLS and certificate failures into sentences an operator can act on.
//!
//! rustls reports enum variants ("invalid peer certificate: UnknownIssuer");
//! an operator looking at a refused transfer needs to know which peer, what
//! was wrong with whose certificate, and roughly what to do.

use std::io;
use std::net::SocketAddr;

use rustls::pki_types::UnixTime;
use rustls::{AlertDescription, CertificateError, Error as TlsError};
use time::OffsetDateTime;

/// Describes an I/O error from a TLS stream with `peer` (for example the first
/// read after [`connect`](crate::connect), which is where a TLS 1.3 client
/// learns that the server refused its certificate).
pub fn describe_tls_error(peer: SocketAddr, err: &io::Error) -> String {
    describe_io_error(&format!("peer {peer}"), err)
}

/// `peer` is how to name the other side, e.g. "peer 127.0.0.1:40000".
pub(crate) fn describe_io_error(peer: &str, err: &io::Error) -> String {
    if let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<TlsError>()) {
        return describe_tls_failure(peer, tls);
    }
    match err.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => {
            format!("{peer} closed the connection during the TLS exchange ({err})")
        }
        _ => format!("TLS with {peer} failed: {err}"),
    }
}

fn describe_tls_failure(peer: &str, err: &TlsError) -> String {
    match err {
        TlsError::NoCertificatesPresented => format!("{peer} presented no certificate"),
        TlsError::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected,
            presented,
        }) => format!(
            "{peer} proved site {} but {:?} was expected",
            presented_names(presented),
            expected.to_str()
        ),
        TlsError::InvalidCertificate(cert_err) => describe_certificate_error(
            &format!("certificate of {peer}"),
            "this site's CA",
            cert_err,
        ),
        TlsError::AlertReceived(alert) => describe_refusal(peer, *alert),
        TlsError::PeerIncompatible(_) => {
            format!("{peer} cannot talk to this site (it needs TLS 1.3 with mutual authentication): {err}")
        }
        TlsError::InvalidMessage(_)
        | TlsError::InappropriateMessage { .. }
        | TlsError::InappropriateHandshakeMessage { .. } => {
            format!("{peer} is not speaking TLS as a ferry agent would, or the connection is corrupted: {err}")
        }
        _ => format!("TLS with {peer} failed: {err}"),
    }
}

/// The peer sent a fatal alert: it refused us. Alerts carry no detail, so say
/// what each one most likely means between two ferry agents.
fn describe_refusal(peer: &str, alert: AlertDescription) -> String {
    let why = match alert {
        AlertDescription::UnknownCA => {
            "this site's certificate is not signed by the CA it trusts (different PKI directory?)"
        }
        AlertDescription::DecryptError => {
            "it could not verify this site's certificate or signature against its CA \
             (a different CA with the same name?)"
        }
        AlertDescription::BadCertificate => {
            "it rejected this site's certificate (did it expect a different site name?)"
        }
        AlertDescription::CertificateExpired => {
            "it considers this site's certificate expired or not yet valid (check the clocks)"
        }
        AlertDescription::CertificateRequired => {
            "it requires a client certificate and this side sent none"
        }
        AlertDescription::UnsupportedCertificate => {
            "this site's certificate is not allowed for this use (missing TLS client/server usage)"
        }
        AlertDescription::ProtocolVersion => "it does not accept TLS 1.3",
        AlertDescription::HandshakeFailure => {
            "no common TLS 1.3 parameters (cipher suite, key exchange or signature scheme)"
        }
        _ => "it gave no more detail",
    };
    format!("{peer} refused the connection: {why} (TLS alert {alert:?})")
}

/// `cert` names the certificate ("certificate of peer 1.2.3.4:5"), `ca` the
/// authority it was checked against ("this site's CA").
pub(crate) fn describe_certificate_error(cert: &str, ca: &str, err: &CertificateError) -> String {
    #[allow(deprecated)] // UnsupportedSignatureAlgorithm may still be produced by older verifiers.
    match err {
        CertificateError::UnknownIssuer => format!("{cert} is not signed by {ca}"),
        CertificateError::BadSignature => format!(
            "{cert} is not signed by {ca} (its signature does not verify with the CA's key; \
             a different CA with the same name?)"
        ),
        CertificateError::Expired => format!("{cert} has expired"),
        CertificateError::ExpiredContext { not_after, .. } => {
            format!("{cert} expired at {}", utc(not_after))
        }
        CertificateError::NotValidYet => {
            format!("{cert} is not valid yet (check the clocks of both sites)")
        }
        CertificateError::NotValidYetContext { not_before, .. } => format!(
            "{cert} is not valid until {} (check the clocks of both sites)",
            utc(not_before)
        ),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!("{cert} is not allowed for this use (it lacks the TLS client or server usage)")
        }
        CertificateError::UnsupportedSignatureAlgorithm
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            format!("{cert} uses a signature algorithm this site does not accept")
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("{cert} is for a different site than expected")
        }
        CertificateError::Revoked => format!("{cert} has been revoked"),
        CertificateError::BadEncoding => format!("{cert} is malformed"),
        other => format!("{cert} was rejected: {other}"),
    }
}

/// The names rustls reports as presented, as `"b"` or `["b", "c"]`.
pub(crate) fn presented_names(presented: &[String]) -> String {
    // webpki renders each presented name with its Debug form, `DnsName("b")`;
    // an operator only needs the name.
    let names: Vec<&str> = presented
        .iter()
        .map(|name| {
            name.strip_prefix("DnsName(\"")
                .and_then(|rest| rest.strip_suffix("\")"))
                .unwrap_or(name)
        })
        .collect();
    match names.as_slice() {
        [] => "no name".to_owned(),
        [one] => format!("{one:?}"),
        many => format!("{many:?}"),
    }
}

/// "2026-05-01 12:00:00 UTC" — `OffsetDateTime`'s own Display prints offsets
/// and fractions that only add noise here.
fn utc(at: &UnixTime) -> String {
    let secs = i64::try_from(at.as_secs()).unwrap_or(i64::MAX);
    match OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("unix time {secs}"),
    }
}
