//! Page content generators (text, random, zero), the deterministic PRNG that
//! drives them, and the page checksum used to detect corruption.
//!
//! Everything here writes into caller-provided buffers so the fill, dirty and
//! verify paths never allocate.

/// The four kinds of page the workload keeps in memory. They differ in how a
/// migration engine sees them: zero pages are free to send, random pages do
/// not compress, text compresses well, cache pages are whatever the guest's
/// files are (binaries, docs, already-compressed data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageClass {
    Cache = 0,
    Text = 1,
    Random = 2,
    Zero = 3,
}

impl PageClass {
    pub const COUNT: usize = 4;
    /// Fixed order: used for mix parsing, remainder distribution and output.
    pub const ALL: [PageClass; PageClass::COUNT] = [
        PageClass::Cache,
        PageClass::Text,
        PageClass::Random,
        PageClass::Zero,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PageClass::Cache => "cache",
            PageClass::Text => "text",
            PageClass::Random => "random",
            PageClass::Zero => "zero",
        }
    }

    pub fn from_name(name: &str) -> Option<PageClass> {
        PageClass::ALL
            .into_iter()
            .find(|class| class.name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// SplitMix64: one add and two multiply-xorshifts per output, passes BigCrush,
/// and any seed (including 0) is fine — which matters because the seed comes
/// straight from the kernel command line.
#[derive(Debug, Clone)]
pub struct Prng {
    state: u64,
}

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng { state: seed }
    }

    /// An independent stream for one purpose (class plan, content, page
    /// choice), so that e.g. changing the dirty rate does not change which
    /// classes the fill lays out.
    pub fn stream(seed: u64, purpose: u64) -> Prng {
        let mut mixer = Prng::new(seed ^ purpose.wrapping_mul(0xA076_1D64_78BD_642F));
        Prng::new(mixer.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough integer in `0..bound` (multiply-high; the bias is below
    /// 2^-32 for the bounds used here, irrelevant for a workload).
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        ((self.next_u64() as u128 * bound as u128) >> 64) as u64
    }
}

/// Fills `page` with incompressible bytes.
pub fn fill_random(page: &mut [u8], rng: &mut Prng) {
    let mut words = page.chunks_exact_mut(8);
    for word in &mut words {
        word.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let tail = words.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    tail.copy_from_slice(&last[..tail.len()]);
}

/// 64-bit checksum of a page: one xor, multiply and rotate per 8-byte word.
///
/// Each step is a bijection of the running state for a fixed input word, so
/// changing any single word (in particular any single byte) is guaranteed to
/// change the result — not just with high probability.
pub fn page_checksum(page: &[u8]) -> u64 {
    const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15; // odd, so multiplication is invertible
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    let mut words = page.chunks_exact(8);
    for word in &mut words {
        let value = u64::from_le_bytes(word.try_into().expect("chunks_exact yields 8 bytes"));
        hash = (hash ^ value).wrapping_mul(MULTIPLIER).rotate_left(29);
    }
    for &byte in words.remainder() {
        hash = (hash ^ byte as u64)
            .wrapping_mul(MULTIPLIER)
            .rotate_left(29);
    }
    hash ^ page.len() as u64
}

/// Fills `page` with English-like prose: capitalised sentences of common
/// words, commas, the odd question or exclamation, line breaks between
/// paragraphs. Word frequency is skewed towards the head of [`WORDS`] (which
/// is roughly in frequency order) and a quarter of the tokens are stock
/// [`PHRASES`], so the result compresses like real prose (zstd -1: ~3.1x on a
/// stream, ~2.5x per 4 KiB page; the GPL-3 text gives ~2.7x and ~2.4x)
/// rather than like a uniform draw from a dictionary.
pub fn fill_text(page: &mut [u8], rng: &mut Prng) {
    let mut out = PageWriter { page, len: 0 };
    let mut sentences_in_paragraph = 0u32;
    'page: loop {
        let words_in_sentence = 4 + rng.below(14);
        for position in 0..words_in_sentence {
            // One PRNG call covers all per-word decisions: this loop is the
            // slowest part of the fill on an emulated CPU.
            let bits = rng.next_u64();
            let word = if (bits >> 44) & 3 == 0 {
                PHRASES[((bits >> 16) as u16 as usize * PHRASES.len()) >> 16]
            } else {
                WORDS[skewed_index(
                    bits as u16,
                    (bits >> 16) as u16,
                    (bits >> 48) as u16,
                    WORDS.len(),
                )]
            };
            if position == 0 {
                let (first, rest) = word.split_at(1);
                if !out.put(&[first[0].to_ascii_uppercase()]) || !out.put(rest) {
                    break 'page;
                }
            } else if !out.put(word) {
                break 'page;
            }
            let is_last = position + 1 == words_in_sentence;
            let punctuation: &[u8] = if is_last {
                match (bits >> 32) & 31 {
                    0 => b"?",
                    1 => b"!",
                    _ => b".",
                }
            } else if (bits >> 40) & 7 == 0 {
                b","
            } else {
                b""
            };
            if !out.put(punctuation) {
                break 'page;
            }
            if !is_last && !out.put(b" ") {
                break 'page;
            }
        }
        sentences_in_paragraph += 1;
        let separator: &[u8] = if sentences_in_paragraph >= 3 && rng.below(3) == 0 {
            sentences_in_paragraph = 0;
            b"\n\n"
        } else {
            b" "
        };
        if !out.put(separator) {
            break;
        }
    }
}

/// Index into a list of `len` items, biased towards small indices (the
/// product of three uniforms, density ~ ln(x)^2 / 2) to imitate Zipf-like
/// word use.
fn skewed_index(a: u16, b: u16, c: u16, len: usize) -> usize {
    let product = (a as u64 * b as u64 * c as u64) >> 32; // 0..65535
    (product as usize * len) >> 16
}

/// Bounded writer over a page: copies as much as fits; `put` returns false
/// once the page is full, which ends generation.
struct PageWriter<'a> {
    page: &'a mut [u8],
    len: usize,
}

impl PageWriter<'_> {
    fn put(&mut self, bytes: &[u8]) -> bool {
        let room = self.page.len() - self.len;
        let take = bytes.len().min(room);
        self.page[self.len..self.len + take].copy_from_slice(&bytes[..take]);
        self.len += take;
        take == bytes.len() && self.len < self.page.len()
    }
}

/// Stock phrases: real prose repeats multi-word sequences, which is most of
/// what lets an LZ compressor shrink it.
#[rustfmt::skip]
pub static PHRASES: &[&[u8]] = &[
    b"of the", b"in the", b"to the", b"on the", b"for the", b"and the", b"at the", b"by the",
    b"it is", b"there is", b"there are", b"as well as", b"in order to", b"one of the", b"at the same time",
    b"on the other hand", b"in the case of", b"the end of the", b"as a result", b"for example",
    b"in addition", b"at least", b"more than", b"such as", b"part of the", b"the rest of the",
    b"in terms of", b"according to", b"as soon as", b"the number of", b"a number of", b"it was",
    b"would have been", b"has been", b"have been", b"will be", b"can be", b"should be",
    b"we do not know", b"it seems that", b"for a long time", b"the first time", b"in the morning",
    b"at the end of the day", b"on the way", b"the state of the", b"the use of", b"in the world",
];

/// Common English words, most frequent first (the text generator favours the
/// head of the list).
#[rustfmt::skip]
pub static WORDS: &[&[u8]] = &[
    b"the", b"of", b"and", b"to", b"a", b"in", b"is", b"that", b"for", b"it",
    b"as", b"was", b"with", b"be", b"by", b"on", b"not", b"he", b"this", b"are",
    b"or", b"his", b"from", b"at", b"which", b"but", b"have", b"an", b"had", b"they",
    b"you", b"were", b"their", b"one", b"all", b"we", b"can", b"her", b"has", b"there",
    b"been", b"if", b"more", b"when", b"will", b"would", b"who", b"so", b"no", b"she",
    b"other", b"its", b"may", b"these", b"what", b"them", b"than", b"some", b"him", b"time",
    b"into", b"only", b"do", b"out", b"then", b"also", b"any", b"now", b"could", b"about",
    b"two", b"over", b"such", b"new", b"first", b"my", b"our", b"very", b"most", b"made",
    b"after", b"should", b"many", b"like", b"well", b"where", b"me", b"must", b"through", b"because",
    b"before", b"people", b"work", b"those", b"how", b"each", b"even", b"years", b"being", b"much",
    b"state", b"good", b"under", b"between", b"both", b"system", b"same", b"make", b"year", b"used",
    b"life", b"might", b"while", b"without", b"three", b"day", b"world", b"part", b"own", b"just",
    b"case", b"great", b"since", b"against", b"use", b"place", b"during", b"still", b"number", b"back",
    b"way", b"see", b"general", b"long", b"here", b"every", b"however", b"last", b"found", b"small",
    b"little", b"another", b"get", b"few", b"high", b"take", b"old", b"water", b"order", b"point",
    b"given", b"public", b"second", b"end", b"man", b"large", b"often", b"know", b"form", b"less",
    b"think", b"house", b"right", b"power", b"several", b"government", b"school", b"again", b"course", b"group",
    b"never", b"development", b"children", b"above", b"always", b"data", b"thus", b"local", b"change", b"problem",
    b"process", b"family", b"home", b"went", b"why", b"until", b"left", b"early", b"things", b"country",
    b"set", b"social", b"fact", b"said", b"upon", b"within", b"city", b"need", b"came", b"going",
    b"service", b"information", b"per", b"level", b"business", b"possible", b"thought", b"important", b"far", b"days",
    b"night", b"program", b"light", b"room", b"result", b"human", b"company", b"interest", b"whole", b"body",
    b"across", b"market", b"study", b"value", b"question", b"rather", b"means", b"present", b"report", b"office",
    b"memory", b"network", b"page", b"machine", b"site", b"link", b"copy", b"storage", b"disk", b"file",
    b"history", b"evidence", b"support", b"design", b"policy", b"research", b"effect", b"area", b"million", b"money",
    b"voice", b"river", b"field", b"story", b"music", b"table", b"paper", b"morning", b"window", b"green",
    b"stone", b"winter", b"summer", b"garden", b"letter", b"teacher", b"doctor", b"harbour", b"island", b"mountain",
    b"simple", b"clear", b"strong", b"quiet", b"careful", b"bright", b"ready", b"different", b"certain", b"common",
    b"moved", b"opened", b"carried", b"measured", b"written", b"started", b"followed", b"remained", b"returned", b"explained",
    b"slowly", b"quickly", b"together", b"perhaps", b"already", b"almost", b"nearly", b"usually", b"suddenly", b"finally",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_printable_ascii_and_fills_the_page() {
        let mut rng = Prng::new(42);
        let mut page = [0u8; 4096];
        for _ in 0..200 {
            page.fill(0);
            fill_text(&mut page, &mut rng);
            for &byte in page.iter() {
                assert!(
                    byte == b'\n' || (0x20..=0x7e).contains(&byte),
                    "non-printable byte {byte:#04x} in generated text"
                );
            }
            assert!(page.contains(&b' ') && page.contains(&b'.'));
        }
    }

    #[test]
    fn text_differs_between_pages() {
        let mut rng = Prng::new(7);
        let mut first = [0u8; 4096];
        let mut second = [0u8; 4096];
        fill_text(&mut first, &mut rng);
        fill_text(&mut second, &mut rng);
        assert_ne!(first, second);
    }

    #[test]
    fn word_list_is_plain_lowercase_words() {
        assert!(WORDS.len() >= 200);
        for word in WORDS {
            assert!(!word.is_empty());
            assert!(
                word.iter().all(|b| b.is_ascii_lowercase()),
                "{:?}",
                std::str::from_utf8(word)
            );
        }
    }

    #[test]
    fn checksum_catches_any_single_flipped_byte() {
        let mut rng = Prng::new(1);
        let mut page = [0u8; 4096];
        fill_random(&mut page, &mut rng);
        let original = page_checksum(&page);
        for offset in [0usize, 1, 7, 8, 2047, 4088, 4095] {
            for bit in 0..8 {
                page[offset] ^= 1 << bit;
                assert_ne!(
                    page_checksum(&page),
                    original,
                    "flip at {offset} bit {bit} missed"
                );
                page[offset] ^= 1 << bit;
            }
        }
        assert_eq!(page_checksum(&page), original);
    }

    #[test]
    fn checksum_distinguishes_zero_page_from_single_nonzero_byte() {
        let zero = [0u8; 4096];
        let mut one = [0u8; 4096];
        one[4095] = 1;
        assert_ne!(page_checksum(&zero), page_checksum(&one));
    }

    #[test]
    fn prng_is_deterministic_and_streams_differ() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut rng = Prng::new(5);
                move |_| rng.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut rng = Prng::new(5);
                move |_| rng.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(Prng::stream(5, 1).next_u64(), Prng::stream(5, 2).next_u64());
    }

    #[test]
    fn below_stays_in_range() {
        let mut rng = Prng::new(3);
        for bound in [1u64, 2, 3, 10, 4096, u64::MAX] {
            for _ in 0..100 {
                assert!(rng.below(bound) < bound);
            }
        }
    }

    #[test]
    fn class_names_round_trip() {
        for class in PageClass::ALL {
            assert_eq!(PageClass::from_name(class.name()), Some(class));
            assert_eq!(PageClass::ALL[class.index()], class);
        }
        assert_eq!(PageClass::from_name("swap"), None);
    }
}
