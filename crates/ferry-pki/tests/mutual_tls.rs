//! Real TLS handshakes between sites over loopback TCP.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use ferry_pki::{accept, connect, describe_tls_error, load_identity};
use rustls::{ClientConfig, ProtocolVersion, ServerConfig};
use support::{client_config_with, TempPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{client, server};

type ServerSide = Result<(server::TlsStream<TcpStream>, String)>;
type ClientSide = Result<(client::TlsStream<TcpStream>, String)>;

/// Runs one accept and one connect against each other on 127.0.0.1.
async fn handshake(
    server_cfg: Arc<ServerConfig>,
    client_cfg: Arc<ClientConfig>,
    expected_site: &str,
) -> (ServerSide, ClientSide) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = async {
        let (tcp, _) = listener.accept().await.unwrap();
        accept(server_cfg, tcp).await
    };
    let client = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connect(client_cfg, expected_site, tcp).await
    };
    tokio::join!(server, client)
}

/// Keeps a broken handshake from hanging the test run.
async fn within_10s<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), test)
        .await
        .expect("test took longer than 10 s")
}

/// What the client sees on its first read when the server refused it after
/// the client's side of the TLS 1.3 handshake had already finished.
async fn first_read_error(client: ClientSide) -> String {
    let (mut stream, _) = client.expect("client handshake finishes before the server judges it");
    let peer = stream.get_ref().0.peer_addr().unwrap();
    let mut buf = [0u8; 16];
    match stream.read(&mut buf).await {
        Ok(n) => panic!("expected the server's refusal, read {n} bytes"),
        Err(e) => {
            let described = describe_tls_error(peer, &e);
            eprintln!("client's first read: {described}");
            described
        }
    }
}

fn message(result: Result<impl Sized>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            eprintln!("error: {e:#}");
            format!("{e:#}")
        }
    }
}

#[tokio::test]
async fn sites_of_one_ca_connect_learn_each_others_names_and_talk() {
    within_10s(async {
        let pki = TempPki::with_sites("ok", "ferry test CA", &["a", "b"]);
        let a = load_identity(&pki.dir, "a").unwrap();
        let b = load_identity(&pki.dir, "b").unwrap();

        let (server, client) =
            handshake(b.server_config().unwrap(), a.client_config().unwrap(), "b").await;
        let (mut at_b, site_seen_by_b) = server.unwrap();
        let (mut at_a, site_seen_by_a) = client.unwrap();
        assert_eq!(site_seen_by_b, "a");
        assert_eq!(site_seen_by_a, "b");
        assert_eq!(
            at_a.get_ref().1.protocol_version(),
            Some(ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            at_b.get_ref().1.protocol_version(),
            Some(ProtocolVersion::TLSv1_3)
        );
        assert_eq!(ferry_pki::peer_site(at_b.get_ref().1).unwrap(), "a");

        let echo = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            at_b.read_exact(&mut buf).await.unwrap();
            at_b.write_all(&buf).await.unwrap();
            at_b.shutdown().await.unwrap();
        });
        let sent: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        at_a.write_all(&sent).await.unwrap();
        let mut received = Vec::new();
        at_a.read_to_end(&mut received).await.unwrap();
        assert!(received == sent, "echoed bytes differ");
        echo.await.unwrap();
    })
    .await
}

#[tokio::test]
async fn server_refuses_client_certificate_from_another_ca() {
    within_10s(async {
        let home = TempPki::with_sites("home", "ferry test CA", &["b"]);
        let foreign = TempPki::with_sites("foreign", "some other CA", &["a"]);
        let b = load_identity(&home.dir, "b").unwrap();
        // Trusts b's CA, so it gets as far as presenting its foreign certificate.
        let foreign_client = client_config_with(&home.dir, Some((&foreign.dir, "a")));

        let (server, client) = handshake(b.server_config().unwrap(), foreign_client, "b").await;
        let at_server = message(server);
        assert!(
            at_server.contains("certificate of peer 127.0.0.1:"),
            "{at_server}"
        );
        assert!(
            at_server.ends_with("is not signed by this site's CA"),
            "{at_server}"
        );
        let at_client = first_read_error(client).await;
        assert!(at_client.contains("refused the connection"), "{at_client}");
        assert!(at_client.contains("UnknownCA"), "{at_client}");
    })
    .await
}

#[tokio::test]
async fn client_refuses_server_certificate_from_another_ca() {
    within_10s(async {
        let home = TempPki::with_sites("home", "ferry test CA", &["a"]);
        let foreign = TempPki::with_sites("foreign", "some other CA", &["b"]);
        let a = load_identity(&home.dir, "a").unwrap();
        let foreign_b = load_identity(&foreign.dir, "b").unwrap();

        let (server, client) = handshake(
            foreign_b.server_config().unwrap(),
            a.client_config().unwrap(),
            "b",
        )
        .await;
        let at_client = message(client);
        assert!(
            at_client.starts_with("certificate of peer 127.0.0.1:"),
            "{at_client}"
        );
        assert!(
            at_client.ends_with("is not signed by this site's CA"),
            "{at_client}"
        );
        let at_server = message(server);
        assert!(at_server.contains("refused the connection"), "{at_server}");
    })
    .await
}

/// Two deployments that both call their CA the same thing: the names match,
/// so only the signature tells them apart.
#[tokio::test]
async fn certificates_from_a_same_named_ca_are_refused_both_ways() {
    within_10s(async {
        let home = TempPki::with_sites("home", "ferry", &["a", "b"]);
        let twin = TempPki::with_sites("twin", "ferry", &["a", "b"]);
        let home_b = load_identity(&home.dir, "b").unwrap();
        let twin_a = client_config_with(&home.dir, Some((&twin.dir, "a")));
        let (server, _client) = handshake(home_b.server_config().unwrap(), twin_a, "b").await;
        let at_server = message(server);
        assert!(
            at_server.contains("is not signed by this site's CA"),
            "{at_server}"
        );

        let home_a = load_identity(&home.dir, "a").unwrap();
        let twin_b = load_identity(&twin.dir, "b").unwrap();
        let (_server, client) = handshake(
            twin_b.server_config().unwrap(),
            home_a.client_config().unwrap(),
            "b",
        )
        .await;
        let at_client = message(client);
        assert!(
            at_client.contains("is not signed by this site's CA"),
            "{at_client}"
        );
    })
    .await
}

#[tokio::test]
async fn server_refuses_client_without_certificate() {
    within_10s(async {
        let pki = TempPki::with_sites("nocert", "ferry test CA", &["b"]);
        let b = load_identity(&pki.dir, "b").unwrap();
        let anonymous = client_config_with(&pki.dir, None);

        let (server, client) = handshake(b.server_config().unwrap(), anonymous, "b").await;
        let at_server = message(server);
        assert!(at_server.starts_with("peer 127.0.0.1:"), "{at_server}");
        assert!(
            at_server.ends_with("presented no certificate"),
            "{at_server}"
        );
        let at_client = first_read_error(client).await;
        assert!(
            at_client.contains("requires a client certificate"),
            "{at_client}"
        );
    })
    .await
}

#[tokio::test]
async fn client_refuses_server_that_is_not_the_expected_site() {
    within_10s(async {
        let pki = TempPki::with_sites("wrongsite", "ferry test CA", &["a", "b", "c"]);
        let a = load_identity(&pki.dir, "a").unwrap();
        let b = load_identity(&pki.dir, "b").unwrap();

        let (server, client) =
            handshake(b.server_config().unwrap(), a.client_config().unwrap(), "c").await;
        let at_client = message(client);
        assert!(at_client.starts_with("peer 127.0.0.1:"), "{at_client}");
        assert!(
            at_client.ends_with(r#"proved site "b" but "c" was expected"#),
            "{at_client}"
        );
        let at_server = message(server);
        assert!(at_server.contains("refused the connection"), "{at_server}");
    })
    .await
}

/// A stream wrapper, like the agent's wire-byte counter: `connect` and
/// `accept` take any stream that can name its peer.
struct CountingStream {
    inner: TcpStream,
    bytes_read: u64,
}

impl ferry_pki::PeerAddress for CountingStream {
    fn peer_address(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.peer_addr()
    }
}

impl tokio::io::AsyncRead for CountingStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.bytes_read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl tokio::io::AsyncWrite for CountingStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn handshake_runs_over_a_wrapped_stream_and_errors_still_name_the_peer() {
    within_10s(async {
        let pki = TempPki::with_sites("wrapped", "ferry test CA", &["a", "b"]);
        let a = load_identity(&pki.dir, "a").unwrap();
        let b = load_identity(&pki.dir, "b").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(
                b.server_config().unwrap(),
                CountingStream {
                    inner: tcp,
                    bytes_read: 0,
                },
            )
            .await
        };
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connect(
                a.client_config().unwrap(),
                "b",
                CountingStream {
                    inner: tcp,
                    bytes_read: 0,
                },
            )
            .await
        };
        let (server, client) = tokio::join!(server, client);
        let (at_b, site_seen_by_b) = server.unwrap();
        let (at_a, site_seen_by_a) = client.unwrap();
        assert_eq!(
            (site_seen_by_b.as_str(), site_seen_by_a.as_str()),
            ("a", "b")
        );
        assert!(at_b.get_ref().0.bytes_read > 0 && at_a.get_ref().0.bytes_read > 0);

        let anonymous = client_config_with(&pki.dir, None);
        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(
                b.server_config().unwrap(),
                CountingStream {
                    inner: tcp,
                    bytes_read: 0,
                },
            )
            .await
        };
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connect(
                anonymous,
                "b",
                CountingStream {
                    inner: tcp,
                    bytes_read: 0,
                },
            )
            .await
        };
        let (server, _client) = tokio::join!(server, client);
        let at_server = message(server);
        assert!(at_server.starts_with("peer 127.0.0.1:"), "{at_server}");
        assert!(
            at_server.ends_with("presented no certificate"),
            "{at_server}"
        );
    })
    .await
}
