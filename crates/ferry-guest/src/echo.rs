//! UDP and TCP echo on one port. The UDP side is what the downtime prober
//! pings every 10 ms, so each service has its own thread and nothing here
//! ever waits on the memory workload.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;
use std::time::Duration;

const BIND_RETRY: Duration = Duration::from_millis(500);
/// Pause after a failing receive/accept, so a persistent error cannot spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// After this many consecutive failures the socket is dropped and re-bound.
const ERRORS_BEFORE_REBIND: u32 = 100;
/// Largest possible UDP payload, so no datagram is ever truncated.
const MAX_DATAGRAM: usize = 65_535;

/// Starts the UDP and TCP echo threads on `0.0.0.0:port`. They keep retrying
/// to bind (the guest's network may not be up yet) and never give up.
pub fn spawn_echo_services(port: u16) {
    spawn_named("ferry-echo-udp", move || loop {
        let socket = bind_with_retry("udp", port, || bind_udp(Ipv4Addr::UNSPECIFIED, port));
        let error = serve_udp_echo(&socket);
        eprintln!("ferry-guest-workload: udp echo on port {port} failing ({error}); re-binding");
    });
    spawn_named("ferry-echo-tcp", move || loop {
        let listener = bind_with_retry("tcp", port, || bind_tcp(Ipv4Addr::UNSPECIFIED, port));
        let error = serve_tcp_echo(&listener);
        eprintln!("ferry-guest-workload: tcp echo on port {port} failing ({error}); re-binding");
    });
}

pub(crate) fn bind_udp(ip: Ipv4Addr, port: u16) -> io::Result<UdpSocket> {
    UdpSocket::bind(SocketAddr::from((ip, port)))
}

pub(crate) fn bind_tcp(ip: Ipv4Addr, port: u16) -> io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((ip, port)))
}

/// Sends every datagram straight back to its sender. Returns only after
/// persistent errors, with the last one.
pub(crate) fn serve_udp_echo(socket: &UdpSocket) -> io::Error {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut consecutive_errors = 0;
    loop {
        let result = socket
            .recv_from(&mut buffer)
            .and_then(|(len, sender)| socket.send_to(&buffer[..len], sender));
        match result {
            Ok(_) => consecutive_errors = 0,
            // A sender that vanished (ICMP unreachable) or a full send queue
            // affects one datagram, not the service.
            Err(error) => {
                consecutive_errors += 1;
                if consecutive_errors >= ERRORS_BEFORE_REBIND {
                    return error;
                }
                if error.kind() != io::ErrorKind::Interrupted {
                    thread::sleep(ERROR_BACKOFF);
                }
            }
        }
    }
}

/// Accepts connections forever, echoing each on its own thread. Returns only
/// after persistent accept errors, with the last one.
pub(crate) fn serve_tcp_echo(listener: &TcpListener) -> io::Error {
    let mut consecutive_errors = 0;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                consecutive_errors = 0;
                spawn_named("ferry-echo-conn", move || {
                    let _ = echo_stream(stream);
                });
            }
            // Typically a connection reset before accept, or out of fds.
            Err(error) => {
                consecutive_errors += 1;
                if consecutive_errors >= ERRORS_BEFORE_REBIND {
                    return error;
                }
                thread::sleep(ERROR_BACKOFF);
            }
        }
    }
}

/// Echoes bytes until the peer closes its side, then closes ours.
fn echo_stream(mut stream: TcpStream) -> io::Result<()> {
    // Echo is request/response: small writes must go out immediately.
    stream.set_nodelay(true)?;
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(len) => stream.write_all(&buffer[..len])?,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    stream.shutdown(std::net::Shutdown::Write)
}

fn bind_with_retry<T>(protocol: &str, port: u16, mut bind: impl FnMut() -> io::Result<T>) -> T {
    let mut reported_failure = false;
    loop {
        match bind() {
            Ok(bound) => {
                if reported_failure {
                    eprintln!("ferry-guest-workload: {protocol} echo bound to 0.0.0.0:{port}");
                }
                return bound;
            }
            Err(error) => {
                if !reported_failure {
                    eprintln!(
                        "ferry-guest-workload: {protocol} echo cannot bind 0.0.0.0:{port} ({error}); \
                         retrying every {} ms",
                        BIND_RETRY.as_millis()
                    );
                    reported_failure = true;
                }
                thread::sleep(BIND_RETRY);
            }
        }
    }
}

fn spawn_named(name: &str, body: impl FnOnce() + Send + 'static) {
    if let Err(error) = thread::Builder::new().name(name.to_string()).spawn(body) {
        eprintln!("ferry-guest-workload: cannot start thread {name}: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Option<Duration> = Some(Duration::from_secs(5));

    #[test]
    fn udp_echo_round_trip_on_loopback() {
        let server = bind_udp(Ipv4Addr::LOCALHOST, 0).expect("bind server");
        let server_addr = server.local_addr().unwrap();
        assert_eq!(server_addr.ip(), Ipv4Addr::LOCALHOST);
        thread::spawn(move || serve_udp_echo(&server));

        let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind client");
        client.set_read_timeout(TIMEOUT).unwrap();
        let mut reply = [0u8; 2048];
        for payload in [&b"ping 1"[..], &[0u8, 255, 7, 0][..], &[0xA5; 1400][..]] {
            client.send_to(payload, server_addr).unwrap();
            let (len, from) = client.recv_from(&mut reply).expect("echo reply");
            assert_eq!(from, server_addr);
            assert_eq!(&reply[..len], payload);
        }
    }

    #[test]
    fn tcp_echo_round_trip_on_loopback() {
        let listener = bind_tcp(Ipv4Addr::LOCALHOST, 0).expect("bind server");
        let server_addr = listener.local_addr().unwrap();
        thread::spawn(move || serve_tcp_echo(&listener));

        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let mut client = TcpStream::connect(server_addr).expect("connect");
        client.set_read_timeout(TIMEOUT).unwrap();
        // Write from another thread: the payload exceeds socket buffers, so
        // writing it all before reading could deadlock.
        let mut writer = client.try_clone().unwrap();
        let sent = payload.clone();
        let writer_thread = thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut echoed = Vec::new();
        client
            .read_to_end(&mut echoed)
            .expect("read echo until server closes");
        writer_thread.join().unwrap();
        assert_eq!(echoed, payload);
    }
}
