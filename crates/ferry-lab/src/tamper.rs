//! An active attacker on the link: alters one byte of a chosen TCP flow's payload and fixes the
//! TCP checksum, so the change survives the receiver's kernel and reaches the application —
//! what end-to-end authentication (TLS) must catch.
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TamperRule {
    /// Direction `from-to` whose packets are altered.
    pub link: String,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// Payload bytes of matching segments to let through untouched first.
    pub after_bytes: u64,
    /// The altered byte is XORed with this (non-zero).
    pub xor: u8,
}

/// One armed rule: fires once.
pub struct Tamperer {
    pub rule: TamperRule,
    payload_seen: u64,
    pub fired: bool,
}

impl Tamperer {
    pub fn new(rule: TamperRule) -> Self {
        Tamperer { rule, payload_seen: 0, fired: false }
    }

    /// Alters `pkt` in place if it is the chosen byte's segment; returns whether it did.
    pub fn apply(&mut self, pkt: &mut [u8]) -> bool {
        if self.fired {
            return false;
        }
        let Some(seg) = TcpSegment::parse(pkt) else { return false };
        if self.rule.src_port.is_some_and(|p| p != seg.src_port) || self.rule.dst_port.is_some_and(|p| p != seg.dst_port) {
            return false;
        }
        let payload_len = (seg.end - seg.payload) as u64;
        if payload_len == 0 {
            return false;
        }
        let seen = self.payload_seen;
        self.payload_seen += payload_len;
        if seen + payload_len <= self.rule.after_bytes {
            return false;
        }
        let at = seg.payload + self.rule.after_bytes.saturating_sub(seen) as usize;
        xor_byte_fixing_checksum(pkt, seg.tcp, at, self.rule.xor);
        self.fired = true;
        true
    }
}

struct TcpSegment {
    tcp: usize,
    payload: usize,
    end: usize,
    src_port: u16,
    dst_port: u16,
}

impl TcpSegment {
    fn parse(pkt: &[u8]) -> Option<Self> {
        if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != 6 {
            return None;
        }
        let ihl = (pkt[0] & 0x0f) as usize * 4;
        let total = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
        let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
        if frag & 0x3fff != 0 || total > pkt.len() || ihl < 20 || total < ihl + 20 {
            return None;
        }
        let tcp = ihl;
        let data_off = (pkt[tcp + 12] >> 4) as usize * 4;
        if data_off < 20 || tcp + data_off > total {
            return None;
        }
        Some(TcpSegment {
            tcp,
            payload: tcp + data_off,
            end: total,
            src_port: u16::from_be_bytes([pkt[tcp], pkt[tcp + 1]]),
            dst_port: u16::from_be_bytes([pkt[tcp + 2], pkt[tcp + 3]]),
        })
    }
}

/// RFC 1624 incremental update: HC' = ~(~HC + ~m + m'), on the 16-bit word holding the byte.
fn xor_byte_fixing_checksum(pkt: &mut [u8], tcp: usize, at: usize, xor: u8) {
    let word_start = tcp + ((at - tcp) & !1);
    let word = |p: &[u8]| u16::from_be_bytes([p[word_start], *p.get(word_start + 1).unwrap_or(&0)]);
    let old = word(pkt);
    pkt[at] ^= xor;
    let new = word(pkt);
    let hc = u16::from_be_bytes([pkt[tcp + 16], pkt[tcp + 17]]);
    let mut sum = (!hc) as u32 + (!old) as u32 + new as u32;
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    pkt[tcp + 16..tcp + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum over pseudo-header + segment, as a receiver verifies it.
    fn tcp_checksum_ok(pkt: &[u8]) -> bool {
        let ihl = (pkt[0] & 0x0f) as usize * 4;
        let total = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
        let mut sum: u32 = 0;
        let mut add = |b: &[u8]| {
            for c in b.chunks(2) {
                sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
            }
        };
        add(&pkt[12..20]);
        add(&[0, 6]);
        add(&((total - ihl) as u16).to_be_bytes());
        add(&pkt[ihl..total]);
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    fn segment(payload: &[u8], dport: u16) -> Vec<u8> {
        let total = 20 + 20 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 18, 0, 1]);
        p[16..20].copy_from_slice(&[198, 18, 0, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 5 << 4;
        p[40..].copy_from_slice(payload);
        // Compute a valid checksum by brute force over the field.
        for c in 0..=u16::MAX {
            p[36..38].copy_from_slice(&c.to_be_bytes());
            if tcp_checksum_ok(&p) {
                break;
            }
        }
        assert!(tcp_checksum_ok(&p));
        p
    }

    #[test]
    fn alters_the_chosen_byte_and_keeps_the_checksum_valid() {
        for (after, len) in [(0u64, 11usize), (5, 11), (10, 11), (14, 11)] {
            let mut t = Tamperer::new(TamperRule { link: "a-b".into(), src_port: None, dst_port: Some(7000), after_bytes: after, xor: 0x5a });
            let payload: Vec<u8> = (0..len as u8).collect();
            let mut first = segment(&payload, 7000);
            let mut second = segment(&payload, 7000);
            let hit_first = t.apply(&mut first);
            let hit_second = t.apply(&mut second);
            assert_eq!(hit_first, after < len as u64, "after={after}");
            assert_eq!(hit_second, after >= len as u64);
            let (pkt, idx) = if hit_first { (&first, after as usize) } else { (&second, after as usize - len) };
            assert_eq!(pkt[40 + idx], payload[idx] ^ 0x5a);
            assert!(tcp_checksum_ok(&first) && tcp_checksum_ok(&second), "checksum after altering byte {after}");
        }
    }

    #[test]
    fn leaves_other_flows_alone_and_fires_once() {
        let mut t = Tamperer::new(TamperRule { link: "a-b".into(), src_port: None, dst_port: Some(7000), after_bytes: 0, xor: 1 });
        let mut other = segment(b"hello", 22);
        assert!(!t.apply(&mut other));
        assert_eq!(&other[40..], b"hello");
        let mut hit = segment(b"hello", 7000);
        assert!(t.apply(&mut hit));
        let mut again = segment(b"hello", 7000);
        assert!(!t.apply(&mut again));
        assert_eq!(&again[40..], b"hello");
    }
}
