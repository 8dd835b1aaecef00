//! The streaming splitter: a byte-at-a-time-resumable parser of QEMU's outgoing migration
//! stream that hands out RAM page contents separately from everything else.
//!
//! Rebuilding is exact by construction: every byte consumed is handed out exactly once, in
//! order, either inside a literal run or as a page. Small fields (headers, record words, block
//! names) are parsed in place when they lie whole inside the input and are copied to a scratch
//! buffer only when they straddle two feeds; their bytes are handed out as literal as they are
//! consumed, so the scratch copy is only for reading. Page bytes that straddle feeds are held
//! back in a page buffer until the page is complete.
use crate::format::{self, command, configuration as config, ram, section, PAGE_SIZE};
use crate::piece::{Piece, StreamEvent};
use crate::stats::SplitStats;

/// The largest field parsed at once: a MEM_SIZE entry with a 255-byte block name, its length
/// and a guest-physical address.
const SCRATCH_LEN: usize = 1 + 255 + 8 + 8;

/// How much of the device-state tail is kept to recognise the device description that
/// closes the stream. Descriptions are tens of KiB; a larger one just goes unrecognised.
const DEVICE_TAIL_LIMIT: usize = 4 << 20;

/// Splits one migration stream; feed it the stream's bytes in order, then call `finish`.
pub struct Splitter {
    scratch: Scratch,
    parser: Parser,
}

impl Default for Splitter {
    fn default() -> Self {
        Self::new()
    }
}

impl Splitter {
    pub fn new() -> Self {
        Splitter {
            scratch: Scratch {
                buf: [0; SCRATCH_LEN],
                len: 0,
            },
            parser: Parser {
                state: State::FileHeader,
                page: Box::new([0; PAGE_SIZE]),
                page_fill: 0,
                consumed: 0,
                ram: RamContext::default(),
                device_tail: Vec::new(),
                stats: SplitStats::default(),
            },
        }
    }

    /// Consumes all of `input` and hands out pieces in stream order. A field or page cut off at
    /// the end of `input` is completed by later calls. Never fails: anything unexpected switches
    /// to opaque mode (an [`StreamEvent::Opaque`] event, then literal bytes to the end).
    pub fn feed(&mut self, input: &[u8], out: &mut impl FnMut(Piece<'_>)) {
        let parser = &mut self.parser;
        let mut cur = Cursor {
            input,
            pos: 0,
            literal_from: 0,
            base: parser.consumed,
        };
        while cur.pos < input.len() {
            match parser.state {
                State::Opaque => cur.pos = input.len(),
                State::DeviceSections => {
                    parser.keep_device_tail(&input[cur.pos..]);
                    cur.pos = input.len();
                }
                State::PageData { offset } => parser.page_data(offset, &mut cur, out),
                State::Skip { remaining, then } => {
                    let available = (input.len() - cur.pos) as u64;
                    let step = remaining.min(available);
                    cur.pos += step as usize;
                    parser.state = if step == remaining {
                        then.into()
                    } else {
                        State::Skip {
                            remaining: remaining - step,
                            then,
                        }
                    };
                }
                State::Finished => {
                    let reason = format!(
                        "bytes after the end of the stream (EOF and device description) at stream offset {}",
                        cur.offset()
                    );
                    parser.fall_back(reason, &mut cur, out);
                }
                state => {
                    let need = state.field_len();
                    let Some(field) = self.scratch.gather(input, &mut cur.pos, need) else {
                        break; // the field continues in the next feed
                    };
                    parser.field(state, field, &mut cur, out);
                }
            }
        }
        cur.flush(&mut parser.stats, out);
        parser.consumed += input.len() as u64;
    }

    /// Post-copy recovery: QEMU goes on in a new stream, with no file header, at a section
    /// boundary, after a cut that lost whatever it had not written yet. The RAM section and its
    /// blocks stay as they were; what was half read here is dropped (the destination's QEMU
    /// tells the source which pages it lacks, and those come again). A stream that went opaque
    /// stays opaque.
    pub fn resume(&mut self) {
        let parser = &mut self.parser;
        self.scratch.len = 0;
        parser.page_fill = 0;
        if parser.state != State::Opaque {
            parser.state = State::SectionType(After::Other);
        }
    }

    /// End of stream: hands out whatever is still held (the start of a page) as literal, so a
    /// truncated stream stays byte-exact. When the stream went on into device state, this is
    /// where its end is recognised (see [`StreamEvent::Eof`]).
    pub fn finish(&mut self, out: &mut impl FnMut(Piece<'_>)) {
        let parser = &mut self.parser;
        if parser.page_fill > 0 {
            let held = &parser.page[..parser.page_fill];
            parser.stats.literal_bytes += held.len() as u64;
            out(Piece::Literal(held));
            parser.page_fill = 0;
        }
        self.scratch.len = 0;
        // Only now: device state holds guest-controlled bytes that can look like the closing
        // description, so a look-alike at a feed boundary mid-stream must not count; a stream
        // that really stops right after one is the complete stream's shape.
        if parser.state == State::DeviceSections
            && !parser.stats.eof
            && parser.device_tail_ends_stream()
        {
            parser.stats.eof = true;
            out(Piece::Event(StreamEvent::Eof));
        }
        parser.device_tail = Vec::new();
        // The stream is over: anything fed after this is carried as is.
        parser.state = State::Opaque;
    }

    pub fn stats(&self) -> &SplitStats {
        &self.parser.stats
    }
}

/// Where the current feed is, and which of its bytes still wait to be handed out as literal.
struct Cursor<'i> {
    input: &'i [u8],
    pos: usize,
    literal_from: usize,
    /// Stream offset of `input[0]`.
    base: u64,
}

impl Cursor<'_> {
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Stream offset of the first byte of a field of `len` bytes that ends at `pos`.
    fn field_offset(&self, len: usize) -> u64 {
        self.offset() - len as u64
    }

    fn flush(&mut self, stats: &mut SplitStats, out: &mut impl FnMut(Piece<'_>)) {
        if self.pos > self.literal_from {
            let bytes = &self.input[self.literal_from..self.pos];
            stats.literal_bytes += bytes.len() as u64;
            out(Piece::Literal(bytes));
            self.literal_from = self.pos;
        }
    }
}

struct Scratch {
    buf: [u8; SCRATCH_LEN],
    len: usize,
}

impl Scratch {
    /// The next `need` bytes of the stream: borrowed from `input` when they lie whole inside
    /// it, else assembled here across feeds. `None` means `input` ran out first.
    fn gather<'a>(&'a mut self, input: &'a [u8], pos: &mut usize, need: usize) -> Option<&'a [u8]> {
        let available = input.len() - *pos;
        if self.len == 0 && available >= need {
            let field = &input[*pos..*pos + need];
            *pos += need;
            return Some(field);
        }
        let take = (need - self.len).min(available);
        self.buf[self.len..self.len + take].copy_from_slice(&input[*pos..*pos + take]);
        self.len += take;
        *pos += take;
        if self.len < need {
            return None;
        }
        self.len = 0;
        Some(&self.buf[..need])
    }
}

/// What the parser expects next. Every state before `PageData` reads one fixed-length field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    FileHeader,
    /// The byte that opens a top-level record; what came before decides which are allowed.
    SectionType(After),
    ConfigurationNameLen,
    SubsectionNameLen,
    SubsectionName {
        len: u8,
    },
    TargetPageBits,
    CapabilityCount,
    CapabilityNameLen {
        left: u32,
    },
    CapabilityName {
        len: u8,
        left: u32,
    },
    Command,
    PostcopyAdvise,
    /// PACKAGED's be32 length of the nested stream that follows (post-copy's device state).
    PackagedLen,
    StartHeader,
    StartIdstr {
        section_id: u32,
        len: u8,
    },
    PartEndHeader {
        end: bool,
    },
    RamFooter,
    RamRecord,
    MemSizeNameLen {
        remaining: u64,
    },
    /// Block name, be64 used length and, with x-ignore-shared, a be64 guest-physical address.
    MemSizeEntry {
        remaining: u64,
        len: u8,
        with_address: bool,
    },
    BlockNameLen {
        record: PageRecord,
    },
    BlockName {
        record: PageRecord,
        len: u8,
    },
    ZeroFill,
    AfterEof,
    VmdescLen,
    PageData {
        offset: u64,
    },
    /// Bytes of known length that are carried without being looked at.
    Skip {
        remaining: u64,
        then: Resume,
    },
    /// After the device description: nothing more is expected.
    Finished,
    /// From the first FULL section on: carried as is.
    DeviceSections,
    Opaque,
}

/// Where a skip resumes (a separate enum keeps `State` flat and `Copy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resume {
    SectionType(After),
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    FileHeader,
    /// The configuration section or one of its subsections: another subsection may follow.
    Configuration,
    /// A RAM section body (its EOS): a section footer may follow.
    RamBody,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageRecord {
    Zero { offset: u64 },
    Page { offset: u64 },
}

impl State {
    fn field_len(self) -> usize {
        match self {
            State::FileHeader => 8,
            State::SectionType(_) => 1,
            State::ConfigurationNameLen => 4,
            State::SubsectionNameLen => 1,
            State::SubsectionName { len } => len as usize + 4,
            State::TargetPageBits => 4,
            State::CapabilityCount => 4,
            State::CapabilityNameLen { .. } => 1,
            State::CapabilityName { len, .. } => len as usize,
            State::Command => 4,
            State::PostcopyAdvise => 16,
            State::PackagedLen => 4,
            State::StartHeader => 5,
            State::StartIdstr { len, .. } => len as usize + 8,
            State::PartEndHeader { .. } => 4,
            State::RamFooter => 4,
            State::RamRecord => 8,
            State::MemSizeNameLen { .. } => 1,
            State::MemSizeEntry {
                len, with_address, ..
            } => len as usize + 8 + if with_address { 8 } else { 0 },
            State::BlockNameLen { .. } => 1,
            State::BlockName { len, .. } => len as usize,
            State::ZeroFill => 1,
            State::AfterEof => 1,
            State::VmdescLen => 4,
            State::PageData { .. }
            | State::Skip { .. }
            | State::Finished
            | State::DeviceSections
            | State::Opaque => unreachable!("{self:?} reads no fixed-length field"),
        }
    }
}

impl From<Resume> for State {
    fn from(then: Resume) -> State {
        match then {
            Resume::SectionType(after) => State::SectionType(after),
            Resume::Finished => State::Finished,
        }
    }
}

#[derive(Default)]
struct RamContext {
    section_id: Option<u32>,
    /// The block named by the last page record without CONTINUE.
    block: Option<String>,
    /// Its used length, when the MEM_SIZE list announced it.
    block_len: Option<u64>,
    /// x-ignore-shared: each MEM_SIZE entry also carries the block's guest-physical address.
    ignore_shared: bool,
    /// Post-copy was advised with huge-page blocks: their MEM_SIZE entries carry an extra page
    /// size, and which entries do cannot be told from the stream.
    mem_size_has_page_sizes: bool,
}

struct Parser {
    state: State,
    page: Box<[u8; PAGE_SIZE]>,
    /// Bytes of a page that straddles feeds, held in `page` until it is complete.
    page_fill: usize,
    /// Stream bytes consumed by earlier feeds.
    consumed: u64,
    ram: RamContext,
    /// The last bytes of device state, to recognise the description that ends the stream.
    device_tail: Vec<u8>,
    stats: SplitStats,
}

impl Parser {
    /// Acts on one complete field read in `state` (which started at stream offset `at`).
    fn field<F: FnMut(Piece<'_>)>(
        &mut self,
        state: State,
        field: &[u8],
        cur: &mut Cursor<'_>,
        out: &mut F,
    ) {
        let at = cur.field_offset(field.len());
        match self.next_state(state, field, at, cur, out) {
            Ok(next) => self.state = next,
            Err(reason) => self.fall_back(reason, cur, out),
        }
    }

    /// The state after `field`, or why the stream cannot be followed.
    fn next_state<F: FnMut(Piece<'_>)>(
        &mut self,
        state: State,
        field: &[u8],
        at: u64,
        cur: &mut Cursor<'_>,
        out: &mut F,
    ) -> Result<State, String> {
        Ok(match state {
            State::FileHeader => {
                let (magic, version) = (be32(&field[..4]), be32(&field[4..]));
                if magic != format::FILE_MAGIC {
                    return Err(format!(
                        "not a QEMU migration stream: magic {magic:#010x} at stream offset {at}"
                    ));
                }
                if version != format::FILE_VERSION {
                    return Err(format!(
                        "stream version {version} at stream offset {}: only version 3 is handled",
                        at + 4
                    ));
                }
                State::SectionType(After::FileHeader)
            }
            State::SectionType(after) => return self.section_type(after, field[0], at, cur, out),
            State::ConfigurationNameLen => skip(
                u64::from(be32(field)),
                Resume::SectionType(After::Configuration),
            ),
            State::SubsectionNameLen => State::SubsectionName { len: field[0] },
            State::SubsectionName { len } => match &field[..len as usize] {
                name if name == config::TARGET_PAGE_BITS.as_bytes() => State::TargetPageBits,
                name if name == config::CAPABILITIES.as_bytes() => State::CapabilityCount,
                name if name == config::UUID.as_bytes() => {
                    skip(config::UUID_LEN, Resume::SectionType(After::Configuration))
                }
                name => {
                    return Err(format!(
                        "unknown configuration subsection {:?} at stream offset {}",
                        String::from_utf8_lossy(name),
                        at - 2
                    ))
                }
            },
            State::TargetPageBits => {
                let bits = be32(field);
                if bits != format::TARGET_PAGE_BITS {
                    return Err(format!(
                        "target page bits {bits} at stream offset {at}: only 4 KiB pages are handled"
                    ));
                }
                State::SectionType(After::Configuration)
            }
            State::CapabilityCount => match be32(field) {
                0 => State::SectionType(After::Configuration),
                left => State::CapabilityNameLen { left },
            },
            State::CapabilityNameLen { left } => State::CapabilityName {
                len: field[0],
                left,
            },
            State::CapabilityName { left, .. } => {
                if field == config::CAP_MAPPED_RAM {
                    return Err(format!(
                        "capability \"mapped-ram\" in the configuration at stream offset {at}: pages are stored at file offsets, not in the stream"
                    ));
                }
                if field != config::CAP_IGNORE_SHARED {
                    // Only capabilities that change the stream's layout are listed here, and
                    // this one's change is not known.
                    return Err(format!(
                        "capability {:?} in the configuration at stream offset {at} changes the stream's layout",
                        String::from_utf8_lossy(field)
                    ));
                }
                self.ram.ignore_shared = true;
                match left - 1 {
                    0 => State::SectionType(After::Configuration),
                    left => State::CapabilityNameLen { left },
                }
            }
            State::Command => {
                let (cmd, len) = (be16(&field[..2]), be16(&field[2..]));
                if cmd == 0 || cmd > command::LAST {
                    return Err(format!(
                        "unknown COMMAND {cmd} (payload {len} bytes) at stream offset {}",
                        at - 1
                    ));
                }
                match cmd {
                    command::PACKAGED if len == 4 => State::PackagedLen,
                    command::PACKAGED => {
                        return Err(format!(
                            "COMMAND PACKAGED with a {len}-byte payload at stream offset {} (QEMU sends a be32 length)",
                            at - 1
                        ))
                    }
                    command::POSTCOPY_ADVISE if len == 16 => State::PostcopyAdvise,
                    _ => skip(u64::from(len), Resume::SectionType(After::Other)),
                }
            }
            State::PostcopyAdvise => {
                // QEMU sends the OR of all blocks' page sizes, then the target page size: when
                // both are 4 KiB no block has huge pages and MEM_SIZE entries stay plain.
                let (page_sizes, target) = (be64(&field[..8]), be64(&field[8..]));
                if page_sizes != PAGE_SIZE as u64 || target != PAGE_SIZE as u64 {
                    self.ram.mem_size_has_page_sizes = true;
                }
                State::SectionType(After::Other)
            }
            // Post-copy's switch: LISTEN, the devices' state and RUN, nested as a stream of
            // their own. Carried as is; RAM pages keep coming after it, while the VM runs at
            // the destination.
            State::PackagedLen => skip(u64::from(be32(field)), Resume::SectionType(After::Other)),
            State::StartHeader => State::StartIdstr {
                section_id: be32(&field[..4]),
                len: field[4],
            },
            State::StartIdstr { section_id, len } => {
                let idstr = &field[..len as usize];
                let version = be32(&field[len as usize + 4..]);
                if idstr != ram::IDSTR {
                    // Other iterative sections (block-dirty-bitmap, vfio, …) have bodies
                    // without lengths: the stream cannot be followed past them.
                    return Err(format!(
                        "START of section {:?} (id {section_id}) at stream offset {}: its body has no length",
                        String::from_utf8_lossy(idstr),
                        at - 5
                    ));
                }
                if version != ram::SECTION_VERSION {
                    return Err(format!(
                        "RAM section version {version} at stream offset {}: only version 4 is handled",
                        at + u64::from(len) + 4
                    ));
                }
                if let Some(first) = self.ram.section_id {
                    return Err(format!(
                        "a second RAM START (id {section_id}, the first was {first}) at stream offset {}",
                        at - 5
                    ));
                }
                self.ram.section_id = Some(section_id);
                event(StreamEvent::RamStart, &mut self.stats, cur, out);
                State::RamRecord
            }
            State::PartEndHeader { end } => {
                let section_id = be32(field);
                if self.ram.section_id != Some(section_id) {
                    return Err(format!(
                        "{} of section id {section_id} at stream offset {}: not a RAM section that was started",
                        if end { "END" } else { "PART" },
                        at - 1
                    ));
                }
                if end {
                    event(StreamEvent::RamEnd, &mut self.stats, cur, out);
                }
                State::RamRecord
            }
            State::RamFooter => {
                let section_id = be32(field);
                if self.ram.section_id != Some(section_id) {
                    return Err(format!(
                        "section footer for id {section_id} after the RAM section (id {:?}) at stream offset {}",
                        self.ram.section_id,
                        at - 1
                    ));
                }
                State::SectionType(After::Other)
            }
            State::RamRecord => return self.ram_record(be64(field), at),
            State::MemSizeNameLen { remaining } => State::MemSizeEntry {
                remaining,
                len: field[0],
                with_address: self.ram.ignore_shared,
            },
            State::MemSizeEntry { remaining, len, .. } => {
                let length = be64(&field[len as usize..]);
                let name = std::str::from_utf8(&field[..len as usize])
                    .map_err(|_| format!("RAM block name at stream offset {at} is not UTF-8"))?;
                if length > remaining {
                    return Err(format!(
                        "RAM block {name:?} of {length} bytes at stream offset {} exceeds the {remaining} bytes left of MEM_SIZE",
                        at - 1
                    ));
                }
                self.stats.ram_blocks.insert(name.to_string(), length);
                match remaining - length {
                    0 => State::RamRecord,
                    remaining => State::MemSizeNameLen { remaining },
                }
            }
            State::BlockNameLen { record } => State::BlockName {
                record,
                len: field[0],
            },
            State::BlockName { record, .. } => {
                let name = std::str::from_utf8(field)
                    .map_err(|_| format!("RAM block name at stream offset {at} is not UTF-8"))?;
                // Without a MEM_SIZE list (a stream picked up mid-way) any name goes.
                self.ram.block_len = match self.stats.ram_blocks.get(name) {
                    Some(&len) => Some(len),
                    None if self.stats.ram_blocks.is_empty() => None,
                    None => {
                        return Err(format!(
                            "RAM block {name:?} at stream offset {at} was not in the MEM_SIZE list"
                        ))
                    }
                };
                // Reuses the allocation: switching blocks costs no allocation once warm.
                let block = self.ram.block.get_or_insert_with(String::new);
                block.clear();
                block.push_str(name);
                return self.page_record(record, at);
            }
            State::ZeroFill => {
                if field[0] != 0 {
                    return Err(format!(
                        "ZERO page fill byte {:#04x} at stream offset {at} (QEMU always sends 0)",
                        field[0]
                    ));
                }
                self.stats.zero_pages += 1;
                State::RamRecord
            }
            State::AfterEof => {
                if field[0] != section::VMDESCRIPTION {
                    return Err(format!(
                        "byte {:#04x} after EOF at stream offset {at} (expected the device description, 0x06)",
                        field[0]
                    ));
                }
                State::VmdescLen
            }
            State::VmdescLen => skip(u64::from(be32(field)), Resume::Finished),
            State::PageData { .. }
            | State::Skip { .. }
            | State::Finished
            | State::DeviceSections
            | State::Opaque => unreachable!("{state:?} reads no fixed-length field"),
        })
    }

    fn section_type<F: FnMut(Piece<'_>)>(
        &mut self,
        after: After,
        kind: u8,
        at: u64,
        cur: &mut Cursor<'_>,
        out: &mut F,
    ) -> Result<State, String> {
        Ok(match (kind, after) {
            (section::CONFIGURATION, After::FileHeader) => State::ConfigurationNameLen,
            // 0x05 never opens a top-level record, so after the configuration it can only be
            // one of its subsections.
            (section::SUBSECTION, After::Configuration) => State::SubsectionNameLen,
            (section::FOOTER, After::RamBody) => State::RamFooter,
            (section::COMMAND, _) => State::Command,
            (section::START, _) => State::StartHeader,
            (section::PART, _) => State::PartEndHeader { end: false },
            (section::END, _) => State::PartEndHeader { end: true },
            (section::FULL, _) => {
                // Device state has no lengths: from here on the stream is carried as is.
                event(StreamEvent::DeviceState, &mut self.stats, cur, out);
                State::DeviceSections
            }
            (section::EOF, _) => {
                self.stats.eof = true;
                event(StreamEvent::Eof, &mut self.stats, cur, out);
                State::AfterEof
            }
            _ => {
                return Err(format!(
                    "unexpected section type {kind:#04x} at stream offset {at}{}",
                    match after {
                        After::FileHeader => " (after the file header)",
                        After::Configuration => " (after the configuration section)",
                        After::RamBody => " (after a RAM section body)",
                        After::Other => "",
                    }
                ))
            }
        })
    }

    /// Acts on a RAM record word. Like QEMU's loader, dispatches on the flags without CONTINUE,
    /// which only matters to page records.
    fn ram_record(&mut self, word: u64, at: u64) -> Result<State, String> {
        let flags = word & ram::FLAGS_MASK;
        let offset = word & !ram::FLAGS_MASK;
        let unhandled = |why: &str| {
            Err(format!(
                "RAM record flags {} at stream offset {at}: {why}",
                ram::describe(flags)
            ))
        };
        Ok(match flags & !ram::CONTINUE {
            kind @ (ram::ZERO | ram::PAGE) => {
                let record = if kind == ram::ZERO {
                    PageRecord::Zero { offset }
                } else {
                    PageRecord::Page { offset }
                };
                if flags & ram::CONTINUE == 0 {
                    State::BlockNameLen { record }
                } else if self.ram.block.is_none() {
                    return unhandled("CONTINUE before any block was named");
                } else {
                    return self.page_record(record, at);
                }
            }
            ram::MEM_SIZE => {
                if self.ram.mem_size_has_page_sizes {
                    return unhandled(
                        "post-copy was advised with huge pages, so entries may carry page sizes",
                    );
                }
                match offset {
                    0 => State::RamRecord,
                    total => State::MemSizeNameLen { remaining: total },
                }
            }
            ram::EOS => State::SectionType(After::RamBody),
            ram::MULTIFD_FLUSH => State::RamRecord,
            ram::XBZRLE => return unhandled("XBZRLE pages are deltas against earlier content"),
            ram::COMPRESS_PAGE => return unhandled("compressed pages are not handled"),
            ram::HOOK => return unhandled("RDMA hooks are not handled"),
            _ => return unhandled("unknown combination"),
        })
    }

    /// The state that reads a page record's payload, once its block is known.
    fn page_record(&self, record: PageRecord, at: u64) -> Result<State, String> {
        let offset = match record {
            PageRecord::Zero { offset } | PageRecord::Page { offset } => offset,
        };
        if let Some(len) = self.ram.block_len {
            if offset >= len {
                return Err(format!(
                    "page offset {offset:#x} beyond block {:?} of {len:#x} bytes, at stream offset {at}",
                    self.ram.block.as_deref().unwrap_or_default()
                ));
            }
        }
        Ok(match record {
            PageRecord::Zero { .. } => State::ZeroFill,
            PageRecord::Page { offset } => State::PageData { offset },
        })
    }

    /// A page's content: handed out straight from `input` when it lies whole inside it (the
    /// common case), else assembled in `page` across feeds.
    fn page_data<F: FnMut(Piece<'_>)>(&mut self, offset: u64, cur: &mut Cursor<'_>, out: &mut F) {
        cur.flush(&mut self.stats, out);
        let block = self.ram.block.as_deref().unwrap_or_default();
        let available = cur.input.len() - cur.pos;
        if self.page_fill == 0 && available >= PAGE_SIZE {
            let data = &cur.input[cur.pos..cur.pos + PAGE_SIZE];
            out(Piece::Page {
                block,
                offset,
                data,
            });
            cur.pos += PAGE_SIZE;
        } else {
            let take = (PAGE_SIZE - self.page_fill).min(available);
            self.page[self.page_fill..self.page_fill + take]
                .copy_from_slice(&cur.input[cur.pos..cur.pos + take]);
            self.page_fill += take;
            cur.pos += take;
            cur.literal_from = cur.pos;
            if self.page_fill < PAGE_SIZE {
                return;
            }
            self.page_fill = 0;
            out(Piece::Page {
                block,
                offset,
                data: &self.page[..],
            });
        }
        cur.literal_from = cur.pos;
        self.stats.pages += 1;
        self.stats.page_bytes += PAGE_SIZE as u64;
        self.state = State::RamRecord;
    }

    fn fall_back(&mut self, reason: String, cur: &mut Cursor<'_>, out: &mut impl FnMut(Piece<'_>)) {
        self.stats.opaque_reason = Some(reason.clone());
        event(StreamEvent::Opaque(reason), &mut self.stats, cur, out);
        self.state = State::Opaque;
    }

    fn keep_device_tail(&mut self, bytes: &[u8]) {
        if self.stats.eof {
            return;
        }
        if bytes.len() >= DEVICE_TAIL_LIMIT {
            self.device_tail.clear();
            self.device_tail
                .extend_from_slice(&bytes[bytes.len() - DEVICE_TAIL_LIMIT..]);
            return;
        }
        self.device_tail.extend_from_slice(bytes);
        // Trimming only past twice the limit keeps the copying amortised.
        if self.device_tail.len() > 2 * DEVICE_TAIL_LIMIT {
            let excess = self.device_tail.len() - DEVICE_TAIL_LIMIT;
            self.device_tail.drain(..excess);
        }
    }

    /// Whether the device state seen so far ends with EOF (0x00), VMDESCRIPTION (0x06), a be32
    /// length and exactly that many bytes of a JSON object: QEMU's last words in pre-copy.
    /// Device bodies have no lengths, so this is the only way to see the end from inside them;
    /// a JSON text has no NUL bytes, which pins the marker to the last NUL or just before it.
    fn device_tail_ends_stream(&self) -> bool {
        let tail = &self.device_tail;
        if tail.last() != Some(&b'}') {
            return false;
        }
        let Some(last_nul) = tail.iter().rposition(|&b| b == 0) else {
            return false;
        };
        (last_nul.saturating_sub(5)..=last_nul).any(|p| {
            tail.len() >= p + 8
                && tail[p] == section::EOF
                && tail[p + 1] == section::VMDESCRIPTION
                && be32(&tail[p + 2..p + 6]) as usize == tail.len() - p - 6
                && tail[p + 6] == b'{'
        })
    }
}

fn skip(remaining: u64, then: Resume) -> State {
    match remaining {
        0 => then.into(),
        remaining => State::Skip { remaining, then },
    }
}

fn event(
    event: StreamEvent,
    stats: &mut SplitStats,
    cur: &mut Cursor<'_>,
    out: &mut impl FnMut(Piece<'_>),
) {
    cur.flush(stats, out);
    out(Piece::Event(event));
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}
