//! Mutual TLS 1.3 between sites: the rustls configurations, the handshakes,
//! and which site a verified peer is.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};
use x509_parser::extensions::GeneralName;

use crate::explain::describe_io_error;
use crate::identity::SiteIdentity;
use crate::layout::validate_site_name;

/// How long a handshake may take before the peer is given up on. Generous
/// for any WAN round trip, but bounded: a peer on an untrusted network that
/// opens connections and never finishes them must not hold tasks forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The one crypto provider ferry uses, named explicitly: relying on the
/// process default panics if another crate in the build enables a second
/// provider.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl SiteIdentity {
    /// TLS 1.3 server configuration that requires a client certificate signed
    /// by this site's CA and presents this site's certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let provider = crypto_provider();
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(self.ca_roots.clone(), provider.clone())
                .build()
                .context("cannot build the client certificate verifier")?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 is not available from the crypto provider")?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .with_context(|| format!("cannot use the certificate of site {:?}", self.site))?;
        // No resumption: every connection re-verifies both certificates.
        // Agents make few, long-lived connections, so it would save nothing.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// TLS 1.3 client configuration that accepts only servers with a
    /// certificate signed by this site's CA, and presents this site's
    /// certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 is not available from the crypto provider")?
            .with_root_certificates(self.ca_roots.clone())
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())
            .with_context(|| format!("cannot use the certificate of site {:?}", self.site))?;
        config.resumption = Resumption::disabled();
        // SNI would send the site name we are calling in clear text across
        // the WAN; the server has one certificate and does not need it. The
        // name is still checked against the server's certificate.
        config.enable_sni = false;
        Ok(Arc::new(config))
    }
}

/// The site a peer proved, from a connection whose handshake has finished:
/// the DNS subject-alt-name of the certificate it presented.
///
/// Only meaningful on connections made with [`SiteIdentity::server_config`] or
/// [`SiteIdentity::client_config`], whose verifiers have already checked the
/// certificate against the CA and the peer's possession of its key.
pub fn peer_site(conn: &CommonState) -> Result<String> {
    if conn.is_handshaking() {
        bail!("the TLS handshake has not finished, so the peer has proved nothing yet");
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| anyhow!("peer presented no certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| anyhow!("peer's certificate cannot be parsed: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| anyhow!("peer's certificate has a malformed subject-alt-name: {e}"))?
        .ok_or_else(|| anyhow!("peer's certificate names no site (it has no subject-alt-name)"))?;
    let dns_names: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        })
        .collect();
    // Site certificates name exactly one site; anything else did not come
    // from `issue_site` and is not trusted to mean one particular site.
    let [site] = dns_names.as_slice() else {
        bail!("peer's certificate must name exactly one site, but it names {dns_names:?}");
    };
    validate_site_name(site).context("peer's certificate names no valid site")?;
    Ok((*site).to_owned())
}

/// A connection that knows the address of its other end, so that handshake
/// errors can say which peer was refused.
///
/// Implemented for [`TcpStream`]; a wrapper around one (to count bytes on the
/// wire, say) implements it by asking the stream inside.
pub trait PeerAddress {
    /// The address of the other end of the connection.
    fn peer_address(&self) -> io::Result<SocketAddr>;
}

impl PeerAddress for TcpStream {
    fn peer_address(&self) -> io::Result<SocketAddr> {
        self.peer_addr()
    }
}

/// Makes a TLS connection over `stream` (usually a [`TcpStream`]) to the site
/// `expected_site`, and returns the TLS stream and the site the server proved
/// (always `expected_site`).
///
/// In TLS 1.3 the client finishes its handshake before the server has judged
/// the client's certificate, so a server that refuses this site is reported
/// by the first read on the stream, not here;
/// [`describe_tls_error`](crate::describe_tls_error) puts that error into words.
pub async fn connect<S>(
    cfg: Arc<ClientConfig>,
    expected_site: &str,
    stream: S,
) -> Result<(client::TlsStream<S>, String)>
where
    S: AsyncRead + AsyncWrite + Unpin + PeerAddress,
{
    validate_site_name(expected_site).context("cannot connect")?;
    let server_name = ServerName::try_from(expected_site.to_owned())?;
    let peer = describe_peer(&stream);
    let tls = finish_handshake(&peer, TlsConnector::from(cfg).connect(server_name, stream)).await?;
    let site = peer_site(tls.get_ref().1).with_context(|| format!("{peer} is not a ferry site"))?;
    // rustls has already checked the name; this guards against a custom
    // ClientConfig with a verifier that does not.
    if site != expected_site {
        bail!("{peer} proved site {site:?} but {expected_site:?} was expected");
    }
    Ok((tls, site))
}

/// Accepts a TLS connection over `stream` (usually a [`TcpStream`]), and
/// returns the TLS stream and the site the client proved.
pub async fn accept<S>(cfg: Arc<ServerConfig>, stream: S) -> Result<(server::TlsStream<S>, String)>
where
    S: AsyncRead + AsyncWrite + Unpin + PeerAddress,
{
    let peer = describe_peer(&stream);
    let tls = finish_handshake(&peer, TlsAcceptor::from(cfg).accept(stream)).await?;
    let site = peer_site(tls.get_ref().1).with_context(|| format!("{peer} is not a ferry site"))?;
    Ok((tls, site))
}

async fn finish_handshake<S>(
    peer: &str,
    handshake: impl Future<Output = io::Result<S>>,
) -> Result<S> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(anyhow!(describe_io_error(peer, &e))),
        Err(_) => bail!(
            "TLS handshake with {peer} did not finish within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
    }
}

fn describe_peer(stream: &impl PeerAddress) -> String {
    match stream.peer_address() {
        Ok(addr) => format!("peer {addr}"),
        Err(_) => "peer (address unknown)".to_owned(),
    }
}
