//! Hand-built streams, laid out as QEMU 10 writes them, split with every feed size.
use crate::format::{command, ram, section, FILE_MAGIC, FILE_VERSION};
use crate::{Piece, SplitStats, Splitter, StreamEvent, PAGE_SIZE};

/// Writes a migration stream record by record.
struct Stream {
    bytes: Vec<u8>,
}

impl Stream {
    fn new() -> Self {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&FILE_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&FILE_VERSION.to_be_bytes());
        Stream { bytes }
    }

    fn u8(mut self, v: u8) -> Self {
        self.bytes.push(v);
        self
    }
    fn be16(mut self, v: u16) -> Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be32(mut self, v: u32) -> Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be64(mut self, v: u64) -> Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.bytes.extend_from_slice(v);
        self
    }
    /// u8 length + text, as QEMU writes idstrs and block names.
    fn counted(self, s: &str) -> Self {
        self.u8(s.len() as u8).raw(s.as_bytes())
    }

    fn configuration(self, machine: &str) -> Self {
        self.u8(section::CONFIGURATION)
            .be32(machine.len() as u32)
            .raw(machine.as_bytes())
    }
    fn capabilities(self, caps: &[&str]) -> Self {
        let mut s = self
            .u8(section::SUBSECTION)
            .counted("configuration/capabilities")
            .be32(1)
            .be32(caps.len() as u32);
        for cap in caps {
            s = s.counted(cap);
        }
        s
    }
    fn command(self, cmd: u16, payload: &[u8]) -> Self {
        self.u8(section::COMMAND)
            .be16(cmd)
            .be16(payload.len() as u16)
            .raw(payload)
    }
    fn start(self, id: u32, idstr: &str, version: u32) -> Self {
        self.u8(section::START)
            .be32(id)
            .counted(idstr)
            .be32(0)
            .be32(version)
    }
    fn part(self, id: u32) -> Self {
        self.u8(section::PART).be32(id)
    }
    fn end(self, id: u32) -> Self {
        self.u8(section::END).be32(id)
    }
    fn footer(self, id: u32) -> Self {
        self.u8(section::FOOTER).be32(id)
    }
    fn mem_size(self, blocks: &[(&str, u64)]) -> Self {
        let total: u64 = blocks.iter().map(|b| b.1).sum();
        let mut s = self.be64(total | ram::MEM_SIZE);
        for (name, len) in blocks {
            s = s.counted(name).be64(*len);
        }
        s
    }
    /// A PAGE record; `block` None means CONTINUE (same block as the previous record).
    fn page(self, block: Option<&str>, offset: u64, fill: u8) -> Self {
        self.record(block, offset, ram::PAGE)
            .raw(&page_of(offset, fill))
    }
    fn zero(self, block: Option<&str>, offset: u64) -> Self {
        self.record(block, offset, ram::ZERO).u8(0)
    }
    fn record(self, block: Option<&str>, offset: u64, flags: u64) -> Self {
        match block {
            None => self.be64(offset | flags | ram::CONTINUE),
            Some(name) => self.be64(offset | flags).counted(name),
        }
    }
    fn eos(self) -> Self {
        self.be64(ram::EOS)
    }
    /// A FULL section with an arbitrary body and its footer.
    fn full(self, id: u32, idstr: &str, body: &[u8]) -> Self {
        self.u8(section::FULL)
            .be32(id)
            .counted(idstr)
            .be32(0)
            .be32(1)
            .raw(body)
            .footer(id)
    }
    fn eof_and_description(self, json: &str) -> Self {
        self.u8(section::EOF)
            .u8(section::VMDESCRIPTION)
            .be32(json.len() as u32)
            .raw(json.as_bytes())
    }
}

/// Distinct, recognisable content for each page.
fn page_of(offset: u64, fill: u8) -> Vec<u8> {
    let mut page = vec![fill; PAGE_SIZE];
    page[..8].copy_from_slice(&offset.to_be_bytes());
    page
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Split {
    rebuilt: Vec<u8>,
    pages: Vec<(String, u64, Vec<u8>)>,
    events: Vec<StreamEvent>,
    stats: SplitStats,
}

/// Splits `stream` fed in chunks of `sizes` (cycled), then finishes.
fn split(stream: &[u8], sizes: &[usize]) -> Split {
    let mut splitter = Splitter::new();
    let mut result = Split::default();
    let mut collect = |piece: Piece<'_>| {
        result.rebuilt.extend_from_slice(piece.bytes());
        match piece {
            Piece::Page {
                block,
                offset,
                data,
            } => {
                assert_eq!(data.len(), PAGE_SIZE);
                result
                    .pages
                    .push((block.to_string(), offset, data.to_vec()));
            }
            Piece::Event(event) => result.events.push(event),
            Piece::Literal(bytes) => assert!(!bytes.is_empty(), "empty literal"),
        }
    };
    let mut at = 0;
    for &size in sizes.iter().cycle() {
        if at == stream.len() {
            break;
        }
        let end = (at + size).min(stream.len());
        splitter.feed(&stream[at..end], &mut collect);
        at = end;
    }
    splitter.finish(&mut collect);
    result.stats = splitter.stats().clone();
    assert_eq!(
        result.stats.stream_bytes(),
        result.rebuilt.len() as u64,
        "the counters add up to what was handed out"
    );
    result
}

/// Feed patterns: single bytes, odd sizes, sizes around a page, mixed, and all at once.
const FEEDS: &[&[usize]] = &[
    &[1],
    &[7],
    &[4095],
    &[4096],
    &[4097],
    &[3, 8200, 1, 4104, 13, 9],
    &[usize::MAX],
];

/// Splits with every feed pattern, checks each rebuilds `stream` exactly and that all agree.
fn split_all_ways(stream: &[u8]) -> Split {
    let whole = split(stream, &[usize::MAX]);
    assert!(whole.rebuilt == stream, "whole feed rebuilds the stream");
    for sizes in FEEDS {
        let other = split(stream, sizes);
        assert!(
            other.rebuilt == stream,
            "feeds of {sizes:?} rebuild the stream"
        );
        assert_eq!(other.pages, whole.pages, "feeds of {sizes:?}: same pages");
        assert_eq!(
            other.events, whole.events,
            "feeds of {sizes:?}: same events"
        );
        assert_eq!(
            other.stats, whole.stats,
            "feeds of {sizes:?}: same counters"
        );
    }
    whole
}

const DESCRIPTION: &str =
    r#"{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0}]}"#;

/// A pre-copy save with the return path, as QEMU 10 lays it out.
fn precopy_stream() -> Vec<u8> {
    Stream::new()
        .configuration("pc-i440fx-10.0")
        .command(command::OPEN_RETURN_PATH, &[])
        .command(command::PING, &1u32.to_be_bytes())
        .start(2, "ram", 4)
        .mem_size(&[("pc.ram", 16 * 4096), ("/rom@etc/acpi/tables", 2 * 4096)])
        .eos()
        .footer(2)
        .part(2)
        .page(Some("pc.ram"), 0, 0xa1)
        .page(None, 0x1000, 0xa2)
        .zero(None, 0x2000)
        .page(Some("/rom@etc/acpi/tables"), 0x1000, 0xb1)
        .zero(None, 0)
        .page(Some("pc.ram"), 0x3000, 0xa3)
        .eos()
        .footer(2)
        .part(2)
        .page(None, 0x4000, 0xa4)
        .eos()
        .footer(2)
        .command(command::SWITCHOVER_START, &[])
        .end(2)
        .page(None, 0x0000, 0xa5)
        .zero(None, 0xf000)
        .eos()
        .footer(2)
        .full(3, "timer", &[0, 0, 0, 0, 0, 0, 0, 1, 0x7e, 0, 0])
        .full(4, "cpu", &[5, 0, 0x10, 0, 6])
        .eof_and_description(DESCRIPTION)
        .bytes
}

#[test]
fn a_precopy_stream_rebuilds_byte_exact_for_every_feed_size() {
    let stream = precopy_stream();
    let split = split_all_ways(&stream);
    let pages: Vec<(&str, u64, u8)> = split
        .pages
        .iter()
        .map(|(block, offset, data)| (block.as_str(), *offset, data[100]))
        .collect();
    assert_eq!(
        pages,
        [
            ("pc.ram", 0, 0xa1),
            ("pc.ram", 0x1000, 0xa2),
            ("/rom@etc/acpi/tables", 0x1000, 0xb1),
            ("pc.ram", 0x3000, 0xa3),
            ("pc.ram", 0x4000, 0xa4),
            ("pc.ram", 0, 0xa5),
        ]
    );
    for (_, offset, data) in &split.pages {
        assert_eq!(
            data[..8],
            offset.to_be_bytes(),
            "page content is the page's own"
        );
    }
    assert_eq!(split.stats.pages, 6);
    assert_eq!(split.stats.zero_pages, 3);
    assert_eq!(split.stats.page_bytes, 6 * PAGE_SIZE as u64);
    assert_eq!(
        split.stats.literal_bytes,
        stream.len() as u64 - 6 * PAGE_SIZE as u64
    );
    assert_eq!(
        split.events,
        [
            StreamEvent::RamStart,
            StreamEvent::RamEnd,
            StreamEvent::DeviceState,
            StreamEvent::Eof
        ]
    );
    assert!(split.stats.eof);
    assert_eq!(split.stats.opaque_reason, None);
    let blocks: Vec<(&str, u64)> = split
        .stats
        .ram_blocks
        .iter()
        .map(|(name, len)| (name.as_str(), *len))
        .collect();
    assert_eq!(
        blocks,
        [("/rom@etc/acpi/tables", 2 * 4096), ("pc.ram", 16 * 4096)]
    );
}

#[test]
fn events_sit_between_the_bytes_that_reveal_them_and_what_follows() {
    let stream = precopy_stream();
    let mut splitter = Splitter::new();
    let mut marks = Vec::new(); // (stream offset when the event came, event)
    let mut at = 0usize;
    let mut record = |piece: Piece<'_>| match piece {
        Piece::Event(event) => marks.push((at, event)),
        other => at += other.bytes().len(),
    };
    splitter.feed(&stream, &mut record);
    splitter.finish(&mut record);
    let end_header = find(&stream, &[section::END, 0, 0, 0, 2]) + 5;
    let device_state = find(&stream, &[section::FULL, 0, 0, 0, 3]) + 1;
    assert!(
        marks.contains(&(end_header, StreamEvent::RamEnd)),
        "{marks:?}"
    );
    assert!(
        marks.contains(&(device_state, StreamEvent::DeviceState)),
        "{marks:?}"
    );
    assert_eq!(marks.last(), Some(&(stream.len(), StreamEvent::Eof)));
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in stream")
}

#[test]
fn pages_whole_inside_the_input_are_borrowed_not_copied() {
    let stream = precopy_stream();
    let range = stream.as_ptr_range();
    let mut splitter = Splitter::new();
    let mut pages = 0;
    splitter.feed(&stream, &mut |piece| {
        if let Piece::Page { data, .. } = piece {
            assert!(
                range.contains(&data.as_ptr()),
                "page data points into the input"
            );
            pages += 1;
        }
    });
    assert_eq!(pages, 6);
}

#[test]
fn a_page_split_across_feeds_is_assembled_and_handed_out_once() {
    let stream = Stream::new()
        .start(0, "ram", 4)
        .page(Some("pc.ram"), 0x5000, 0x42)
        .eos()
        .bytes;
    let cut = stream.len() - 8 - 100; // inside the page, 100 bytes before its end
    let mut splitter = Splitter::new();
    let mut pieces = Vec::new();
    splitter.feed(&stream[..cut], &mut |p| pieces.push(format!("{p:?}")));
    assert!(
        !pieces.iter().any(|p| p.starts_with("Page")),
        "no page before it is complete: {pieces:?}"
    );
    splitter.feed(&stream[cut..], &mut |p| pieces.push(format!("{p:?}")));
    assert_eq!(
        pieces.iter().filter(|p| p.starts_with("Page")).count(),
        1,
        "{pieces:?}"
    );
    assert!(pieces.contains(&"Page(pc.ram@0x5000, 4096 bytes)".to_string()));
}

#[test]
fn continue_records_keep_the_last_named_block_across_sections() {
    let stream = Stream::new()
        .start(7, "ram", 4)
        .mem_size(&[
            ("pc.ram", 8 * 4096),
            ("vga.vram", 4 * 4096),
            ("pc.bios", 4096),
        ])
        .eos()
        .part(7)
        .page(Some("vga.vram"), 0x2000, 1)
        .page(None, 0x3000, 2)
        .eos()
        // The last block carries over into the next section.
        .part(7)
        .page(None, 0x1000, 3)
        .page(Some("pc.bios"), 0, 4)
        .zero(Some("pc.ram"), 0x7000)
        .page(None, 0x6000, 5)
        .eos()
        .bytes;
    let split = split_all_ways(&stream);
    let pages: Vec<(&str, u64)> = split
        .pages
        .iter()
        .map(|(b, o, _)| (b.as_str(), *o))
        .collect();
    assert_eq!(
        pages,
        [
            ("vga.vram", 0x2000),
            ("vga.vram", 0x3000),
            ("vga.vram", 0x1000),
            ("pc.bios", 0),
            ("pc.ram", 0x6000)
        ]
    );
    assert_eq!(split.stats.zero_pages, 1);
    assert_eq!(split.stats.opaque_reason, None);
    assert!(!split.stats.eof, "the stream has no EOF");
}

/// Splits a stream that goes opaque, and checks what came before the fault is still split.
fn assert_opaque(stream: &[u8], pages_before: usize, reason_has: &[&str]) -> Split {
    let split = split_all_ways(stream);
    let reason = split.stats.opaque_reason.clone().expect("opaque");
    for part in reason_has {
        assert!(reason.contains(part), "reason {reason:?} names {part:?}");
    }
    assert_eq!(split.pages.len(), pages_before, "{reason}");
    assert_eq!(
        split.events.last(),
        Some(&StreamEvent::Opaque(reason.clone())),
        "nothing after the fall-back"
    );
    split
}

#[test]
fn an_unknown_ram_flag_falls_back_to_literal_naming_offset_and_value() {
    let prefix = Stream::new()
        .start(0, "ram", 4)
        .page(Some("pc.ram"), 0, 9)
        .bytes;
    let at = prefix.len();
    let stream = Stream { bytes: prefix }
        .be64(0x3000 | 0x400) // no such flag
        .page(Some("pc.ram"), 0x4000, 9) // never handed out as a page now
        .eos()
        .bytes;
    let split = assert_opaque(&stream, 1, &[&format!("stream offset {at}"), "0x400"]);
    assert!(
        split.stats.literal_bytes >= PAGE_SIZE as u64,
        "the later page went literal"
    );
}

#[test]
fn xbzrle_and_compressed_pages_fall_back() {
    for (flag, name) in [
        (ram::XBZRLE, "XBZRLE"),
        (ram::COMPRESS_PAGE, "COMPRESS_PAGE"),
    ] {
        let prefix = Stream::new()
            .start(0, "ram", 4)
            .page(Some("pc.ram"), 0, 9)
            .bytes;
        let at = prefix.len();
        let stream = Stream { bytes: prefix }
            .be64(0x1000 | flag | ram::CONTINUE)
            .raw(&[1, 0, 3, 0xaa, 0xbb, 0xcc])
            .bytes;
        assert_opaque(&stream, 1, &[name, &format!("stream offset {at}")]);
    }
}

#[test]
fn a_non_ram_iterative_section_falls_back() {
    let stream = Stream::new()
        .configuration("pc-q35-10.0")
        .start(2, "ram", 4)
        .eos()
        .footer(2)
        .start(5, "dirty-bitmap", 1)
        .raw(&[0, 1, 2, 3])
        .part(2)
        .page(Some("pc.ram"), 0, 1)
        .eos()
        .bytes;
    assert_opaque(&stream, 0, &["\"dirty-bitmap\"", "id 5", "no length"]);
}

/// Post-copy as QEMU 10 writes it: pre-copy pages, then at the switch the discards, PACKAGED
/// (LISTEN, the devices' FULL sections, RUN), the pages the destination faults on or that were
/// left, the RAM END and EOF with no description.
fn postcopy_stream(package: &[u8]) -> Vec<u8> {
    let advise = [0u8, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0];
    let mut discard = vec![0u8, 6];
    discard.extend_from_slice(b"pc.ram");
    discard.extend_from_slice(&4096u64.to_be_bytes());
    discard.extend_from_slice(&4096u64.to_be_bytes());
    Stream::new()
        .configuration("pc-q35-10.0")
        .command(command::POSTCOPY_ADVISE, &advise)
        .start(2, "ram", 4)
        .mem_size(&[("pc.ram", 4 * 4096)])
        .page(Some("pc.ram"), 0, 1)
        .eos()
        .part(2)
        .page(Some("pc.ram"), 4096, 2)
        .eos()
        .command(command::POSTCOPY_RAM_DISCARD, &discard)
        .command(command::PING, &1u32.to_be_bytes())
        .command(command::PACKAGED, &(package.len() as u32).to_be_bytes())
        .raw(package)
        .command(command::PING, &2u32.to_be_bytes())
        .part(2)
        .page(Some("pc.ram"), 3 * 4096, 3)
        .page(None, 4096, 4)
        .eos()
        .end(2)
        .zero(Some("pc.ram"), 2 * 4096)
        .eos()
        .u8(section::EOF)
        .bytes
}

#[test]
fn a_postcopy_stream_is_followed_through_its_package_to_the_pages_after_it() {
    // The nested stream's device state has no lengths and may hold anything, RAM-record
    // look-alikes included: only PACKAGED's length says where it ends.
    let mut package = Stream::new()
        .command(command::POSTCOPY_LISTEN, &[])
        .full(3, "cpu", &[0xff; 300])
        .command(command::POSTCOPY_RUN, &[])
        .bytes;
    package.drain(..8); // a nested stream has no file header
    package.extend_from_slice(&page_of(0, 9));
    let stream = postcopy_stream(&package);
    let split = split_all_ways(&stream);
    assert_eq!(split.stats.opaque_reason, None);
    let offsets: Vec<(u64, u8)> = split.pages.iter().map(|(_, o, d)| (*o, d[8])).collect();
    assert_eq!(offsets, [(0, 1), (4096, 2), (3 * 4096, 3), (4096, 4)], "pages before and after the switch, none from the package");
    assert!(split.events.contains(&StreamEvent::RamEnd));
    assert!(split.events.contains(&StreamEvent::Eof), "EOF without a description still ends the stream");
    assert!(!split.events.contains(&StreamEvent::DeviceState), "the package's device state is carried, not entered");
}

#[test]
fn a_postcopy_stream_cut_mid_page_goes_on_in_the_recovered_stream() {
    let before = postcopy_stream(&[]);
    // Cut inside the first page after the package: its record header and half its bytes went.
    let page = page_of(3 * 4096, 3);
    let cut = before.windows(PAGE_SIZE).position(|w| w == page.as_slice()).unwrap() + 2048;
    let mut recv_bitmap = vec![6u8];
    recv_bitmap.extend_from_slice(b"pc.ram");
    let mut after = Stream::new()
        .command(command::RECV_BITMAP, &recv_bitmap)
        .command(command::POSTCOPY_RESUME, &[])
        .part(2)
        .page(Some("pc.ram"), 3 * 4096, 5)
        .page(None, 2 * 4096, 6)
        .eos()
        .end(2)
        .eos()
        .u8(section::EOF)
        .bytes;
    after.drain(..8); // a recovered stream has no file header
    let mut splitter = Splitter::new();
    let mut pages = Vec::new();
    let mut rebuilt = Vec::new();
    let mut collect = |piece: Piece<'_>| {
        if let Piece::Page { offset, data, .. } = &piece {
            pages.push((*offset, data[8]));
        }
        rebuilt.extend_from_slice(piece.bytes());
    };
    splitter.feed(&before[..cut], &mut collect);
    splitter.resume();
    for chunk in after.chunks(7) {
        splitter.feed(chunk, &mut collect);
    }
    splitter.finish(&mut collect);
    assert_eq!(splitter.stats().opaque_reason, None);
    assert_eq!(pages, [(0, 1), (4096, 2), (3 * 4096, 5), (2 * 4096, 6)]);
    // What was read before the cut is handed out, the half page as literal bytes, all of it
    // before the recovered stream.
    let mut expected = before[..cut].to_vec();
    expected.extend_from_slice(&after);
    assert_eq!(rebuilt.len(), expected.len() - 2048, "the half page read before the cut is dropped");
}

#[test]
fn a_packaged_command_without_its_length_falls_back() {
    let stream = Stream::new()
        .start(2, "ram", 4)
        .mem_size(&[("pc.ram", 4096)])
        .page(Some("pc.ram"), 0, 1)
        .eos()
        .command(command::PACKAGED, &[0, 0, 0, 100, 0])
        .raw(&[0x55; 100])
        .bytes;
    assert_opaque(&stream, 1, &["PACKAGED", "5-byte payload"]);
}

#[test]
fn an_unknown_command_falls_back() {
    let stream = Stream::new()
        .command(command::SWITCHOVER_START, &[])
        .command(command::LAST + 1, &[1, 2, 3])
        .bytes;
    assert_opaque(&stream, 0, &["COMMAND 12", "stream offset 13"]);
}

#[test]
fn post_copy_with_huge_pages_makes_the_mem_size_list_opaque() {
    let advise = [0u8, 0, 0, 0, 0, 0x20, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0];
    let stream = Stream::new()
        .command(command::POSTCOPY_ADVISE, &advise)
        .start(2, "ram", 4)
        .mem_size(&[("pc.ram", 4096)])
        .eos()
        .bytes;
    assert_opaque(&stream, 0, &["MEM_SIZE", "huge pages"]);
}

#[test]
fn the_ignore_shared_capability_adds_addresses_to_mem_size_entries() {
    let stream = Stream::new()
        .configuration("pc-i440fx-10.0")
        .capabilities(&["x-ignore-shared"])
        .start(2, "ram", 4)
        .be64((3 * 4096) | ram::MEM_SIZE)
        .counted("pc.ram")
        .be64(2 * 4096)
        .be64(0) // guest-physical address
        .counted("pc.bios")
        .be64(4096)
        .be64(0xfffc_0000)
        .page(Some("pc.bios"), 0, 7)
        .eos()
        .footer(2)
        .bytes;
    let split = split_all_ways(&stream);
    assert_eq!(split.stats.opaque_reason, None);
    assert_eq!(split.stats.ram_blocks.len(), 2);
    assert_eq!(split.stats.ram_blocks["pc.bios"], 4096);
    assert_eq!(split.pages.len(), 1);
}

#[test]
fn the_mapped_ram_capability_falls_back() {
    let stream = Stream::new()
        .configuration("pc-i440fx-10.0")
        .capabilities(&["mapped-ram"])
        .start(2, "ram", 4)
        .bytes;
    assert_opaque(&stream, 0, &["mapped-ram"]);
}

#[test]
fn a_page_outside_its_announced_block_falls_back() {
    let stream = Stream::new()
        .start(2, "ram", 4)
        .mem_size(&[("pc.ram", 2 * 4096)])
        .page(Some("pc.ram"), 0x1000, 1)
        .page(None, 0x2000, 2)
        .bytes;
    assert_opaque(&stream, 1, &["0x2000", "\"pc.ram\""]);
    let unknown = Stream::new()
        .start(2, "ram", 4)
        .mem_size(&[("pc.ram", 2 * 4096)])
        .page(Some("pc.rom"), 0, 1)
        .bytes;
    assert_opaque(&unknown, 0, &["\"pc.rom\"", "MEM_SIZE"]);
}

#[test]
fn a_mismatched_section_footer_falls_back() {
    let stream = Stream::new().start(2, "ram", 4).eos().footer(3).bytes;
    assert_opaque(&stream, 0, &["footer", "id 3"]);
}

#[test]
fn a_stream_without_configuration_or_footers_still_splits() {
    let stream = Stream::new()
        .start(0, "ram", 4)
        .mem_size(&[("pc.ram", 4 * 4096)])
        .eos()
        .part(0)
        .page(Some("pc.ram"), 0, 1)
        .eos()
        .end(0)
        .page(None, 0x1000, 2)
        .eos()
        .u8(section::EOF)
        .bytes;
    let split = split_all_ways(&stream);
    assert_eq!(split.stats.opaque_reason, None);
    assert_eq!(split.pages.len(), 2);
    assert_eq!(
        split.events,
        [StreamEvent::RamStart, StreamEvent::RamEnd, StreamEvent::Eof]
    );
}

#[test]
fn not_a_migration_stream_is_carried_as_literal() {
    let stream = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n".to_vec();
    let split = assert_opaque(&stream, 0, &["magic 0x47455420", "stream offset 0"]);
    assert_eq!(split.stats.literal_bytes, stream.len() as u64);
}

#[test]
fn bytes_after_the_device_description_fall_back() {
    let stream = Stream::new()
        .start(0, "ram", 4)
        .eos()
        .u8(section::EOF)
        .u8(section::VMDESCRIPTION)
        .be32(2)
        .raw(b"{}")
        .raw(b"extra")
        .bytes;
    let at = stream.len() - 5;
    assert_opaque(
        &stream,
        0,
        &[&format!(
            "after the end of the stream (EOF and device description) at stream offset {at}"
        )],
    );
}

#[test]
fn a_truncated_stream_rebuilds_to_what_was_given() {
    let stream = precopy_stream();
    // Every cut near a field boundary is covered by cutting at each of the first 200 bytes
    // and then at odd steps through pages and device state.
    let cuts = (0..200).chain((200..stream.len()).step_by(509));
    for cut in cuts {
        let prefix = &stream[..cut];
        for sizes in [&[1usize][..], &[4097], &[usize::MAX]] {
            if sizes == [1] && cut > 9000 {
                continue; // byte-at-a-time over the whole stream is covered above
            }
            let split = split(prefix, sizes);
            assert!(split.rebuilt == prefix, "cut at {cut}, feeds {sizes:?}");
            assert_eq!(split.stats.opaque_reason, None, "cut at {cut}");
            assert!(!split.stats.eof, "cut at {cut}: no EOF claimed");
        }
    }
}

#[test]
fn eof_is_claimed_only_when_the_description_is_complete() {
    let stream = precopy_stream();
    let eof = stream.len() - DESCRIPTION.len() - 6;
    for cut in [eof, eof + 1, eof + 5, eof + 6, stream.len() - 1] {
        let split = split(&stream[..cut], &[usize::MAX]);
        assert!(!split.events.contains(&StreamEvent::Eof), "cut at {cut}");
    }
    // Device state that looks like the end (a guest can put such bytes in a device register)
    // followed by more device state: no early claim, whatever the feed boundaries.
    let tricky = Stream::new()
        .start(0, "ram", 4)
        .eos()
        .full(1, "dev", &[0, 6, 0, 0, 0, 2, b'{', b'}'])
        .full(2, "dev2", &[1, 2, 3])
        .eof_and_description(DESCRIPTION)
        .bytes;
    let split = split_all_ways(&tricky);
    assert_eq!(
        split.events,
        [
            StreamEvent::RamStart,
            StreamEvent::DeviceState,
            StreamEvent::Eof
        ]
    );
}
