//! The records the guest's disk writer puts on its block device, shared with
//! the host-side checker (`ferry_lab::disk_records`) so both sides agree on
//! one definition.
//!
//! # Layout
//!
//! The writer owns a ring of [`RECORD_SIZE`] (64 KiB) slots in
//! `[offset, offset + span)` of the device. Record `seq` (1, 2, 3, … for as
//! long as the guest runs; it never restarts on a wrap) always lands in slot
//! `(seq - 1) % (span / RECORD_SIZE)`, so once the ring has filled, every
//! slot holds the newest record of its residue class. Each record is written
//! whole and followed by `fdatasync`, one at a time: at any moment at most one
//! slot (the one after the newest record) can be partly written.
//!
//! A record is a 64-byte header followed by 65 472 bytes of payload. All
//! integers are little-endian.
//!
//! | bytes   | field                                                        |
//! |---------|--------------------------------------------------------------|
//! | 0..8    | magic `FERRYREC`                                             |
//! | 8..16   | `seq`: u64, ≥ 1                                              |
//! | 16..24  | `offset`: u64, the record's own byte offset on the device    |
//! | 24..32  | `seed`: u64, the workload seed (`ferry.seed`)                |
//! | 32..64  | checksum: 4 × u64 lanes, see [`checksum`]                    |
//! | 64..    | payload: [`payload_word`]`(seed, seq, i)` for word `i` = 0…  |
//!
//! The payload depends only on `(seed, seq)`, so every byte of a record can be
//! re-derived from its header and checked; the checksum additionally covers
//! the header. A slot without the magic is *empty* (never written, or
//! something else's data); a slot with the magic that fails any check is
//! *torn*.

use std::fmt;

/// Bytes per record and per slot.
pub const RECORD_SIZE: usize = 64 * 1024;
/// Bytes of header at the start of a record.
pub const HEADER_SIZE: usize = 64;
/// Bytes of payload after the header.
pub const PAYLOAD_SIZE: usize = RECORD_SIZE - HEADER_SIZE;
pub const MAGIC: [u8; 8] = *b"FERRYREC";

const CHECKSUM_LANES: usize = 4;
const CHECKSUM_START: usize = 32;
const PAYLOAD_WORDS: usize = PAYLOAD_SIZE / 8;

/// The fields of a record's header other than magic and checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub seq: u64,
    /// Byte offset of the record on the device (and in a raw image of it).
    pub offset: u64,
    pub seed: u64,
}

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// No magic: never written by the disk writer (zeros or foreign data).
    Empty,
    /// A complete, valid record.
    Record(RecordHeader),
    /// The magic is there but the record is not whole or not right.
    Torn(Torn),
}

/// Why a slot with the magic is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Torn {
    /// The buffer handed to [`parse`] is not [`RECORD_SIZE`] bytes.
    WrongLength(usize),
    /// The stored checksum does not match the header and payload.
    Checksum,
    /// Sequence number 0, which the writer never uses.
    ZeroSeq,
    /// A valid record, but written for another place (the header's offset).
    WrongOffset { found: u64, expected: u64 },
    /// The checksum matched but the payload is not what `(seed, seq)` gives.
    Payload { first_bad_byte: usize },
}

impl fmt::Display for Torn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Torn::WrongLength(len) => {
                write!(f, "record buffer is {len} bytes, not {RECORD_SIZE}")
            }
            Torn::Checksum => write!(f, "checksum mismatch (torn or damaged record)"),
            Torn::ZeroSeq => write!(f, "sequence number 0"),
            Torn::WrongOffset { found, expected } => write!(
                f,
                "record written for offset {found} found at offset {expected}"
            ),
            Torn::Payload { first_bad_byte } => write!(
                f,
                "payload differs from its derivation at record byte {first_bad_byte}"
            ),
        }
    }
}

/// Fills `record` (exactly [`RECORD_SIZE`] bytes) with record `header`.
///
/// # Panics
/// If `record` has the wrong length or `header.seq` is 0.
pub fn encode(record: &mut [u8], header: RecordHeader) {
    assert_eq!(record.len(), RECORD_SIZE, "record buffer size");
    assert_ne!(header.seq, 0, "record sequence numbers start at 1");
    record[0..8].copy_from_slice(&MAGIC);
    record[8..16].copy_from_slice(&header.seq.to_le_bytes());
    record[16..24].copy_from_slice(&header.offset.to_le_bytes());
    record[24..32].copy_from_slice(&header.seed.to_le_bytes());
    let mut words = PayloadWords::new(header.seed, header.seq);
    for chunk in record[HEADER_SIZE..].chunks_exact_mut(8) {
        chunk.copy_from_slice(&words.next_word().to_le_bytes());
    }
    let sum = checksum(record);
    for (lane, value) in sum.iter().enumerate() {
        let at = CHECKSUM_START + lane * 8;
        record[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
}

/// Classifies the slot content `record` read from byte `expected_offset` of
/// the device.
pub fn parse(record: &[u8], expected_offset: u64) -> Parsed {
    if record.len() < MAGIC.len() || record[..8] != MAGIC {
        return Parsed::Empty;
    }
    if record.len() != RECORD_SIZE {
        return Parsed::Torn(Torn::WrongLength(record.len()));
    }
    let field = |at: usize| u64::from_le_bytes(record[at..at + 8].try_into().expect("8 bytes"));
    let stored: [u64; CHECKSUM_LANES] =
        std::array::from_fn(|lane| field(CHECKSUM_START + lane * 8));
    if stored != checksum(record) {
        return Parsed::Torn(Torn::Checksum);
    }
    let header = RecordHeader {
        seq: field(8),
        offset: field(16),
        seed: field(24),
    };
    if header.seq == 0 {
        return Parsed::Torn(Torn::ZeroSeq);
    }
    if header.offset != expected_offset {
        return Parsed::Torn(Torn::WrongOffset {
            found: header.offset,
            expected: expected_offset,
        });
    }
    let mut words = PayloadWords::new(header.seed, header.seq);
    for (index, chunk) in record[HEADER_SIZE..].chunks_exact(8).enumerate() {
        let expected = words.next_word().to_le_bytes();
        if chunk != expected {
            let within = chunk.iter().zip(expected).position(|(a, b)| *a != b);
            return Parsed::Torn(Torn::Payload {
                first_bad_byte: HEADER_SIZE + index * 8 + within.unwrap_or(0),
            });
        }
    }
    Parsed::Record(header)
}

/// The record checksum: four 64-bit lanes of an FNV-1a-style hash over 64-bit
/// little-endian words (`h = rotl((h ^ word) * 0x9E3779B97F4A7C15, 29)`),
/// starting from the FNV-1a offset basis xor'd with the lane number. Every
/// lane first absorbs the four header words (magic, seq, offset, seed); lane
/// `k` then absorbs payload words `k, k + 4, k + 8, …`. Each step is a
/// bijection of the state for a fixed word, so any single changed word is
/// always detected.
///
/// `record` must be [`RECORD_SIZE`] bytes; the stored checksum (bytes 32..64)
/// is not part of the input.
pub fn checksum(record: &[u8]) -> [u64; CHECKSUM_LANES] {
    const BASIS: u64 = 0xCBF2_9CE4_8422_2325;
    const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;
    let step = |hash: u64, word: u64| (hash ^ word).wrapping_mul(MULTIPLIER).rotate_left(29);
    let word = |at: usize| u64::from_le_bytes(record[at..at + 8].try_into().expect("8 bytes"));
    let mut lanes: [u64; CHECKSUM_LANES] = std::array::from_fn(|lane| BASIS ^ lane as u64);
    for lane in &mut lanes {
        for at in (0..CHECKSUM_START).step_by(8) {
            *lane = step(*lane, word(at));
        }
    }
    for (index, chunk) in record[HEADER_SIZE..].chunks_exact(8).enumerate() {
        let lane = &mut lanes[index % CHECKSUM_LANES];
        *lane = step(
            *lane,
            u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
        );
    }
    lanes
}

/// Payload word `index` (0-based, [`PAYLOAD_SIZE`]` / 8` of them) of record
/// `(seed, seq)`: an xorshift64* stream whose state starts at
/// `splitmix64(seed ^ splitmix64(seq))` (any zero state replaced by a fixed
/// constant).
pub fn payload_word(seed: u64, seq: u64, index: usize) -> u64 {
    assert!(index < PAYLOAD_WORDS, "payload word index out of range");
    let mut words = PayloadWords::new(seed, seq);
    for _ in 0..index {
        words.next_word();
    }
    words.next_word()
}

struct PayloadWords {
    state: u64,
}

impl PayloadWords {
    fn new(seed: u64, seq: u64) -> PayloadWords {
        let state = splitmix64(seed ^ splitmix64(seq));
        PayloadWords {
            state: if state == 0 {
                0x9E37_79B9_7F4A_7C15
            } else {
                state
            },
        }
    }

    fn next_word(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn splitmix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The ring of slots a writer with `offset` and `span` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    pub offset: u64,
    pub slots: u64,
}

impl Ring {
    /// `span` must be a positive multiple of [`RECORD_SIZE`] and the ring must
    /// end within `u64`.
    pub fn new(offset: u64, span: u64) -> Result<Ring, String> {
        let size = RECORD_SIZE as u64;
        if span == 0 || !span.is_multiple_of(size) {
            return Err(format!(
                "span {span} is not a positive multiple of the {size}-byte record size"
            ));
        }
        if offset.checked_add(span).is_none() {
            return Err(format!("offset {offset} + span {span} overflows"));
        }
        Ok(Ring {
            offset,
            slots: span / size,
        })
    }

    /// Slot index record `seq` (≥ 1) goes to.
    pub fn slot_of(&self, seq: u64) -> u64 {
        (seq - 1) % self.slots
    }

    /// Byte offset on the device of slot `slot`.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.offset + slot * RECORD_SIZE as u64
    }

    /// The newest sequence number at most `max_seq` that goes to `slot`, or
    /// 0 if there is none (the ring has not reached the slot yet): what the
    /// slot must hold when `max_seq` is the newest record written.
    pub fn expected_seq(&self, slot: u64, max_seq: u64) -> u64 {
        if max_seq <= slot {
            return 0;
        }
        max_seq - (max_seq - 1 - slot) % self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, offset: u64, seed: u64) -> Vec<u8> {
        let mut buffer = vec![0u8; RECORD_SIZE];
        encode(&mut buffer, RecordHeader { seq, offset, seed });
        buffer
    }

    #[test]
    fn encode_then_parse_round_trips() {
        for (seq, offset, seed) in [(1, 0, 1), (77, 5 << 20, 0), (u64::MAX, 1 << 40, 0xDEAD)] {
            let buffer = record(seq, offset, seed);
            assert_eq!(&buffer[..8], b"FERRYREC");
            assert_eq!(
                parse(&buffer, offset),
                Parsed::Record(RecordHeader { seq, offset, seed })
            );
        }
    }

    #[test]
    fn payload_is_deterministic_and_differs_between_records() {
        let a = record(5, 0, 1);
        assert_eq!(a, record(5, 0, 1));
        assert_ne!(a[HEADER_SIZE..], record(6, 0, 1)[HEADER_SIZE..]);
        assert_ne!(a[HEADER_SIZE..], record(5, 0, 2)[HEADER_SIZE..]);
        let word = |index: usize| {
            let at = HEADER_SIZE + index * 8;
            u64::from_le_bytes(a[at..at + 8].try_into().unwrap())
        };
        assert_eq!(word(0), payload_word(1, 5, 0));
        assert_eq!(word(1000), payload_word(1, 5, 1000));
        assert_eq!(
            word(PAYLOAD_WORDS - 1),
            payload_word(1, 5, PAYLOAD_WORDS - 1)
        );
    }

    #[test]
    fn empty_slots_are_not_records() {
        assert_eq!(parse(&vec![0u8; RECORD_SIZE], 0), Parsed::Empty);
        let mut foreign = record(3, 0, 1);
        foreign[0] = b'X';
        assert_eq!(parse(&foreign, 0), Parsed::Empty);
    }

    #[test]
    fn torn_records_are_detected() {
        let new = record(1025, 0, 7);
        let old = record(1, 0, 7);
        // Any 512-byte sector of the old record left in the new one, and the
        // reverse (header not yet rewritten), is caught.
        for sector in 0..RECORD_SIZE / 512 {
            let range = sector * 512..(sector + 1) * 512;
            let mut torn = new.clone();
            torn[range.clone()].copy_from_slice(&old[range.clone()]);
            assert!(
                matches!(parse(&torn, 0), Parsed::Torn(_)),
                "sector {sector}"
            );
            let mut torn = old.clone();
            torn[range.clone()].copy_from_slice(&new[range]);
            assert!(
                matches!(parse(&torn, 0), Parsed::Torn(_)),
                "sector {sector}"
            );
        }
        // A tail of zeroes (write cut short on a fresh disk).
        let mut cut = new.clone();
        cut[4096..].fill(0);
        assert_eq!(parse(&cut, 0), Parsed::Torn(Torn::Checksum));
        // A single flipped bit anywhere.
        for at in [9, 20, 30, 40, 63, 64, 1000, RECORD_SIZE - 1] {
            let mut flipped = new.clone();
            flipped[at] ^= 0x10;
            assert!(matches!(parse(&flipped, 0), Parsed::Torn(_)), "byte {at}");
        }
        assert_eq!(
            parse(&new[..1000], 0),
            Parsed::Torn(Torn::WrongLength(1000))
        );
    }

    #[test]
    fn records_in_the_wrong_place_are_rejected() {
        let moved = record(3, 128 << 10, 1);
        assert_eq!(
            parse(&moved, 64 << 10),
            Parsed::Torn(Torn::WrongOffset {
                found: 128 << 10,
                expected: 64 << 10
            })
        );
    }

    #[test]
    fn ring_positions() {
        assert!(Ring::new(0, 0).is_err());
        assert!(Ring::new(0, 1000).is_err());
        assert!(Ring::new(u64::MAX - 100, 64 << 10).is_err());
        let ring = Ring::new(1 << 20, 4 * RECORD_SIZE as u64).unwrap();
        assert_eq!(ring.slots, 4);
        assert_eq!(ring.slot_of(1), 0);
        assert_eq!(ring.slot_of(4), 3);
        assert_eq!(ring.slot_of(5), 0);
        assert_eq!(ring.slot_offset(2), (1 << 20) + 2 * RECORD_SIZE as u64);
        // Nothing written yet, then a partial first lap, then wrapped.
        assert_eq!(ring.expected_seq(0, 0), 0);
        assert_eq!(ring.expected_seq(1, 1), 0);
        assert_eq!(ring.expected_seq(0, 1), 1);
        assert_eq!(ring.expected_seq(2, 3), 3);
        assert_eq!(ring.expected_seq(3, 3), 0);
        assert_eq!(
            (0..4)
                .map(|slot| ring.expected_seq(slot, 10))
                .collect::<Vec<_>>(),
            vec![9, 10, 7, 8]
        );
    }
}
