//! Numbers of QEMU's migration stream (QEMU 10.0), as the splitter needs them.
//!
//! All multi-byte integers on the wire are big-endian.

/// Stream header: be32 magic ("QEVM") then be32 version.
pub const FILE_MAGIC: u32 = 0x5145_564D;
pub const FILE_VERSION: u32 = 3;

/// Bytes of a RAM page; the splitter handles only 4 KiB target pages (x86).
pub const PAGE_SIZE: usize = 4096;
pub const TARGET_PAGE_BITS: u32 = 12;

/// Top-level record types (the byte that opens each record of the stream).
pub mod section {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    /// Only inside a vmstate body (here: inside the configuration section).
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7E;
}

/// COMMAND records: be16 command, be16 payload length, payload.
pub mod command {
    pub const OPEN_RETURN_PATH: u16 = 1;
    pub const PING: u16 = 2;
    pub const POSTCOPY_ADVISE: u16 = 3;
    pub const POSTCOPY_LISTEN: u16 = 4;
    pub const POSTCOPY_RUN: u16 = 5;
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    /// Payload is a be32 length of a nested stream that follows the record (not covered by
    /// the record's own length).
    pub const PACKAGED: u16 = 7;
    pub const ENABLE_COLO: u16 = 8;
    pub const POSTCOPY_RESUME: u16 = 9;
    pub const RECV_BITMAP: u16 = 10;
    /// New in 10.0: sent once the source VM has stopped, before the END sections.
    pub const SWITCHOVER_START: u16 = 11;
    pub const LAST: u16 = SWITCHOVER_START;

    pub fn name(cmd: u16) -> &'static str {
        match cmd {
            OPEN_RETURN_PATH => "OPEN_RETURN_PATH",
            PING => "PING",
            POSTCOPY_ADVISE => "POSTCOPY_ADVISE",
            POSTCOPY_LISTEN => "POSTCOPY_LISTEN",
            POSTCOPY_RUN => "POSTCOPY_RUN",
            POSTCOPY_RAM_DISCARD => "POSTCOPY_RAM_DISCARD",
            PACKAGED => "PACKAGED",
            ENABLE_COLO => "ENABLE_COLO",
            POSTCOPY_RESUME => "POSTCOPY_RESUME",
            RECV_BITMAP => "RECV_BITMAP",
            SWITCHOVER_START => "SWITCHOVER_START",
            _ => "unknown",
        }
    }
}

/// The configuration section: be32 length + machine type name, then optional subsections
/// (`0x05`, u8 name length, name, be32 version, fields).
pub mod configuration {
    /// Present only for targets with a variable page size; holds a be32 page-bits value.
    pub const TARGET_PAGE_BITS: &str = "configuration/target-page-bits";
    /// be32 count, then per capability u8 length + name; only capabilities that change the
    /// stream's layout are listed (x-ignore-shared, mapped-ram).
    pub const CAPABILITIES: &str = "configuration/capabilities";
    /// 16 bytes, with the validate-uuid capability.
    pub const UUID: &str = "configuration/uuid";
    pub const UUID_LEN: u64 = 16;

    pub const CAP_IGNORE_SHARED: &[u8] = b"x-ignore-shared";
    pub const CAP_MAPPED_RAM: &[u8] = b"mapped-ram";
}

/// The RAM section's body is a list of records, each opened by a be64 word: the offset within a
/// RAM block, with flags in the bits below the target page size.
pub mod ram {
    pub const IDSTR: &[u8] = b"ram";
    pub const SECTION_VERSION: u32 = 4;

    pub const FLAGS_MASK: u64 = (1 << super::TARGET_PAGE_BITS) - 1;

    /// Obsolete since 2009.
    pub const FULL: u64 = 0x01;
    /// One byte (always 0) follows: the page is all zeroes.
    pub const ZERO: u64 = 0x02;
    /// Only in the START body: the offset field is the total RAM size, and a list of
    /// (u8 length, block name, be64 used length [, extras]) follows until the lengths add up.
    pub const MEM_SIZE: u64 = 0x04;
    /// A whole page follows.
    pub const PAGE: u64 = 0x08;
    /// Ends each START/PART/END body.
    pub const EOS: u64 = 0x10;
    /// The page is in the same block as the previous one; otherwise u8 length + block name
    /// follow the word.
    pub const CONTINUE: u64 = 0x20;
    /// A delta against the page's previous content follows.
    pub const XBZRLE: u64 = 0x40;
    /// RDMA only.
    pub const HOOK: u64 = 0x80;
    /// Removed in QEMU 9.1.
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Multifd only; no payload.
    pub const MULTIFD_FLUSH: u64 = 0x200;

    /// A readable name for the flags of a record word, for opaque-mode reasons.
    pub fn describe(flags: u64) -> String {
        const NAMES: [(u64, &str); 10] = [
            (FULL, "FULL"),
            (ZERO, "ZERO"),
            (MEM_SIZE, "MEM_SIZE"),
            (PAGE, "PAGE"),
            (EOS, "EOS"),
            (CONTINUE, "CONTINUE"),
            (XBZRLE, "XBZRLE"),
            (HOOK, "HOOK"),
            (COMPRESS_PAGE, "COMPRESS_PAGE"),
            (MULTIFD_FLUSH, "MULTIFD_FLUSH"),
        ];
        let mut parts: Vec<String> = NAMES
            .iter()
            .filter(|(bit, _)| flags & bit != 0)
            .map(|(_, name)| name.to_string())
            .collect();
        let unknown = flags & !NAMES.iter().fold(0, |all, (bit, _)| all | bit);
        if unknown != 0 {
            parts.push(format!("unknown {unknown:#x}"));
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        format!("{flags:#x} ({})", parts.join("|"))
    }
}
