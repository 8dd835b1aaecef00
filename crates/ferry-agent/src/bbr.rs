//! TCP BBR on ferry's connections: choosing it, reading what it measured, and restarting its
//! state on a connection that idled.
use std::os::fd::{AsRawFd, RawFd};

/// BBR where the kernel has it (accepted sockets inherit it from the listener). It paces at the
/// rate it measured rather than filling the bottleneck's queue, and, unlike loss-based
/// congestion control, keeps its congestion window across idle time instead of falling back to
/// slow start, so a warm connection that carried one transfer (or the path probe's filler)
/// starts the next at full rate.
pub fn prefer(socket: &tokio::net::TcpSocket) {
    if choose(socket.as_raw_fd(), b"bbr") != 0 {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| tracing::info!("TCP BBR is not available here ({}): connections use the system's congestion control", std::io::Error::last_os_error()));
    }
}

/// What BBR knows about a connection's path (Linux's `struct tcp_bbr_info`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BbrInfo {
    bw_lo: u32,
    bw_hi: u32,
    min_rtt_us: u32,
    pacing_gain: u32,
    cwnd_gain: u32,
}

impl BbrInfo {
    /// The estimated bottleneck rate, bytes/s.
    pub fn bw(&self) -> u64 {
        (u64::from(self.bw_hi) << 32) | u64::from(self.bw_lo)
    }

    /// Start-up paces at 2.89 × the estimate (739/256); every later phase at 1.25 × or less.
    pub fn starting_up(&self) -> bool {
        self.pacing_gain > 2 * 256
    }
}

/// `None` when the socket's congestion control is not BBR (it reports nothing then).
pub fn info(fd: RawFd) -> Option<BbrInfo> {
    let mut info = BbrInfo::default();
    let mut len = std::mem::size_of::<BbrInfo>() as libc::socklen_t;
    // SAFETY: `info` is a plain C struct of `len` bytes; the kernel writes at most `len`.
    let r = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_CC_INFO, (&mut info as *mut BbrInfo).cast(), &mut len) };
    (r == 0 && len as usize == std::mem::size_of::<BbrInfo>()).then_some(info)
}

/// Restarts BBR's state on a warm connection about to carry a session. BBR takes its minimum RTT
/// as stale after 10 s without a lower sample, and an idle connection gets none: its first
/// burst then sends BBR into PROBE_RTT, four packets in flight for 200 ms and a round trip.
/// Seen at 200 ms (`ss -ti`: cwnd 4, pacing and cwnd gain 1 on every warm connection at a
/// migration's start): the first 17 MB of QEMU's stream took 400 ms instead of 100 to cross,
/// and every connection waited for the slowest. Choosing the congestion control again
/// re-initialises it (the kernel ignores choosing the one in use, hence the detour through
/// reno): the minimum RTT is the kernel's own over five minutes, stamped now; the congestion
/// window stays as it grew and start-up paces from it.
pub fn restart(fd: RawFd) {
    if info(fd).is_none() {
        return;
    }
    for name in [&b"reno"[..], b"bbr"] {
        choose(fd, name);
    }
}

/// Sets the socket's congestion control by name; setsockopt's result.
fn choose(fd: RawFd, name: &[u8]) -> libc::c_int {
    // SAFETY: the fd is a live TCP socket's; the option value is a byte string of that length.
    unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, name.as_ptr().cast(), name.len() as libc::socklen_t) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_restarted_connection_stays_on_bbr_starts_over_and_keeps_its_window() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        prefer(&socket);
        let stream = socket.connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let fd = stream.as_raw_fd();
        if info(fd).is_none() {
            eprintln!("no BBR in this kernel: nothing to restart");
            return;
        }
        // Some traffic, so that the window has grown past its start.
        let reader = tokio::spawn(async move { tokio::io::copy(&mut peer, &mut tokio::io::sink()).await });
        let mut stream = stream;
        let block = vec![7u8; 1 << 20];
        for _ in 0..32 {
            tokio::io::AsyncWriteExt::write_all(&mut stream, &block).await.unwrap();
        }
        let cwnd = |fd: RawFd| {
            let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            // SAFETY: `ti` is a plain C struct of `len` bytes.
            assert_eq!(unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut ti as *mut libc::tcp_info).cast(), &mut len) }, 0);
            ti.tcpi_snd_cwnd
        };
        let (before, measured) = (cwnd(fd), info(fd).unwrap().bw());
        assert!(measured > 0, "BBR measured the loopback's rate");
        restart(fd);
        let after = info(fd).expect("still BBR after the restart");
        assert_eq!(after.bw(), 0, "BBR starts over (its minimum RTT stamped now, its rate unknown): {after:?}");
        assert!(cwnd(fd) >= before, "the congestion window is kept: {} of {before}", cwnd(fd));
        drop(stream);
        reader.await.unwrap().unwrap();
    }
}
