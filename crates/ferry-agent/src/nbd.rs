//! A small synchronous NBD client, written from the protocol spec
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>). It exists so a plain
//! thread can ask a running QEMU's NBD server which extents of a dirty bitmap are dirty
//! (NBD_CMD_BLOCK_STATUS on a "qemu:dirty-bitmap:NAME" meta context) and then read them.
//!
//! Deliberately simple: unix socket only, no TLS, no extended headers, one request in flight.
//! Every read from the socket has a timeout so a wedged server yields an error, not a hang.
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long any single socket read or write may wait before the server counts as wedged.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest READ we send; the spec's default maximum payload, and QEMU's limit.
const MAX_READ: u32 = 32 << 20;
/// Largest BLOCK_STATUS length we ask for: fits u32 and is a multiple of any minimum block size.
const MAX_STATUS: u32 = 1 << 31;
/// Bound on non-data reply payloads (option replies, status chunks), so a corrupt length cannot
/// make us allocate gigabytes.
const MAX_META_PAYLOAD: u32 = 64 << 20;

// Handshake.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

// Transmission.
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;
const REPLY_FLAG_DONE: u16 = 1 << 0;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERR_BIT: u16 = 1 << 15;
const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERR_BIT | 2;

/// A connection to one export, in the transmission phase.
pub struct NbdClient {
    sock: UnixStream,
    size: u64,
    /// Every request length and offset must be a multiple of this (1 when the server sets none).
    min_block: u32,
    /// Largest READ to send: min(server's maximum payload, 32 MiB).
    max_read: u32,
    /// Meta contexts the server agreed to, with the ids its status chunks carry.
    contexts: Vec<(String, u32)>,
    next_handle: u64,
}

/// A run of bytes with one status. What `flags` means depends on the context: for
/// "base:allocation" bit 0 is a hole and bit 1 reads as zeroes; for "qemu:dirty-bitmap:NAME"
/// bit 0 is dirty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

impl NbdClient {
    /// Fixed-newstyle handshake with NO_ZEROES, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT for the given
    /// contexts (e.g. "base:allocation", "qemu:dirty-bitmap:NAME"), then NBD_OPT_GO on `export`.
    /// Fails if the server refuses any of the contexts, so a missing bitmap is noticed here.
    pub fn connect(socket: &Path, export: &str, contexts: &[&str]) -> Result<NbdClient> {
        Self::connect_with_timeout(socket, export, contexts, IO_TIMEOUT)
    }

    fn connect_with_timeout(socket: &Path, export: &str, contexts: &[&str], timeout: Duration) -> Result<NbdClient> {
        let sock = UnixStream::connect(socket).with_context(|| format!("connecting to NBD socket {}", socket.display()))?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        let mut c = NbdClient { sock, size: 0, min_block: 1, max_read: MAX_READ, contexts: Vec::new(), next_handle: 1 };
        if let Err(e) = c.handshake(export, contexts) {
            // Tell the server we are leaving so it does not log a failed negotiation; best
            // effort, the connection may be gone or out of step already.
            let _ = c.send_option(OPT_ABORT, &[]);
            return Err(e.context(format!("NBD handshake with {} for export {export:?}", socket.display())));
        }
        Ok(c)
    }

    fn handshake(&mut self, export: &str, contexts: &[&str]) -> Result<()> {
        let magic = self.read_u64("server greeting")?;
        if magic != NBDMAGIC {
            bail!("not an NBD server: greeting magic {magic:#018x}, expected {NBDMAGIC:#018x}");
        }
        let magic = self.read_u64("server greeting")?;
        if magic != IHAVEOPT {
            bail!("server does not speak newstyle negotiation (magic {magic:#018x})");
        }
        let server_flags = self.read_u16("handshake flags")?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("server does not support fixed newstyle negotiation (flags {server_flags:#x})");
        }
        // Only ask for NO_ZEROES if offered: a client must not set flags the server did not.
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
        self.write_all(&client_flags.to_be_bytes())?;

        // Structured replies are required for BLOCK_STATUS and let READ report holes.
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (ty, payload) = self.read_option_reply(OPT_STRUCTURED_REPLY)?;
        if ty != REP_ACK {
            bail!("unexpected reply {ty} to NBD_OPT_STRUCTURED_REPLY ({} bytes)", payload.len());
        }

        if !contexts.is_empty() {
            let mut data = Vec::new();
            put_string32(&mut data, export)?;
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                put_string32(&mut data, q)?;
            }
            self.send_option(OPT_SET_META_CONTEXT, &data)?;
            loop {
                let (ty, payload) = self.read_option_reply(OPT_SET_META_CONTEXT)?;
                match ty {
                    REP_META_CONTEXT => {
                        if payload.len() < 4 {
                            bail!("short NBD_REP_META_CONTEXT reply ({} bytes)", payload.len());
                        }
                        let id = be_u32(&payload[..4]);
                        let name = String::from_utf8_lossy(&payload[4..]).into_owned();
                        self.contexts.push((name, id));
                    }
                    REP_ACK => break,
                    _ => bail!("unexpected reply {ty} to NBD_OPT_SET_META_CONTEXT"),
                }
            }
            // The server silently leaves out contexts it does not have (e.g. a bitmap that was
            // not exported); say which, since nothing later would.
            let refused: Vec<&str> = contexts.iter().copied().filter(|q| !self.contexts.iter().any(|(n, _)| n == q)).collect();
            if !refused.is_empty() {
                bail!(
                    "server refused meta context(s) {refused:?} for export {export:?} (it agreed to {:?})",
                    self.contexts.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
                );
            }
        }

        // GO, asking for block size limits so we can honour them.
        let mut data = Vec::new();
        put_string32(&mut data, export)?;
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &data)?;
        let mut got_export = false;
        loop {
            let (ty, payload) = self.read_option_reply(OPT_GO)?;
            match ty {
                REP_INFO => {
                    if payload.len() < 2 {
                        bail!("short NBD_REP_INFO reply");
                    }
                    match be_u16(&payload[..2]) {
                        INFO_EXPORT if payload.len() == 12 => {
                            self.size = be_u64(&payload[2..10]);
                            got_export = true;
                        }
                        INFO_BLOCK_SIZE if payload.len() == 14 => {
                            let min = be_u32(&payload[2..6]);
                            let max = be_u32(&payload[10..14]);
                            if min == 0 || !min.is_power_of_two() || max < min {
                                bail!("server sent invalid block sizes: minimum {min}, maximum {max}");
                            }
                            self.min_block = min;
                            // Keep READs a multiple of the minimum block size.
                            self.max_read = (max.min(MAX_READ) / min) * min;
                        }
                        INFO_EXPORT | INFO_BLOCK_SIZE => bail!("NBD_REP_INFO of wrong length {}", payload.len()),
                        _ => {} // name, description, ...: not needed
                    }
                }
                REP_ACK => break,
                _ => bail!("unexpected reply {ty} to NBD_OPT_GO"),
            }
        }
        if !got_export {
            bail!("server finished NBD_OPT_GO without sending the export size");
        }
        Ok(())
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// NBD_CMD_BLOCK_STATUS over [offset, offset+len) for one negotiated context; loops (and splits requests to
    /// <= 2 GiB / the server's limits) until the whole range is described; returns extents in order, merged when
    /// adjacent with equal flags.
    pub fn block_status(&mut self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let Some(&(_, id)) = self.contexts.iter().find(|(n, _)| n == context) else {
            bail!(
                "meta context {context:?} was not negotiated on this connection (have {:?})",
                self.contexts.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
            );
        };
        let end = offset.checked_add(len).filter(|&e| e <= self.size).ok_or_else(|| {
            anyhow!("block status range {offset}+{len} is outside the export (size {})", self.size)
        })?;
        self.check_aligned(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let want = (end - pos).min(u64::from(MAX_STATUS)) as u32;
            let descs = self
                .block_status_once(id, pos, want)
                .with_context(|| format!("NBD block status of {context:?} at {pos}+{want}"))?;
            let req_end = pos + u64::from(want);
            // Descriptors describe consecutive bytes from `pos`; the server may describe less than
            // asked (we ask again from where it stopped) or, on the last one, more (we clip).
            for (dlen, flags) in descs {
                if pos >= req_end {
                    break;
                }
                let dlen = u64::from(dlen).min(req_end - pos);
                push_merged(&mut out, Extent { offset: pos, len: dlen, flags });
                pos += dlen;
            }
        }
        Ok(out)
    }

    /// One BLOCK_STATUS request: the (length, flags) descriptors for context `id`, never empty
    /// and with no zero lengths (so callers always make progress).
    fn block_status_once(&mut self, id: u32, offset: u64, len: u32) -> Result<Vec<(u32, u32)>> {
        let handle = self.send_request(CMD_BLOCK_STATUS, offset, len)?;
        let mut descs: Option<Vec<(u32, u32)>> = None;
        let mut err = None;
        loop {
            let (flags, ty, plen) = match self.read_reply_header(handle)? {
                Chunk::Structured { flags, ty, len } => (flags, ty, len),
                // A simple reply to BLOCK_STATUS can only carry an error.
                Chunk::Simple { error: 0 } => bail!("server sent a simple reply without extents to BLOCK_STATUS"),
                Chunk::Simple { error } => bail!("{}", nbd_error(error, "")),
            };
            match ty {
                REPLY_TYPE_BLOCK_STATUS => {
                    let p = self.read_payload(plen, "block status chunk")?;
                    if p.len() < 12 || (p.len() - 4) % 8 != 0 {
                        bail!("malformed block status chunk of {} bytes", p.len());
                    }
                    if be_u32(&p[..4]) == id {
                        if descs.is_some() {
                            bail!("server sent two block status chunks for one context");
                        }
                        let d: Vec<(u32, u32)> = p[4..].chunks_exact(8).map(|e| (be_u32(&e[..4]), be_u32(&e[4..]))).collect();
                        if d.iter().any(|&(l, _)| l == 0) {
                            bail!("server sent a zero-length extent");
                        }
                        descs = Some(d);
                    } // else: another negotiated context, which the server reports too
                }
                REPLY_TYPE_NONE if plen == 0 => {}
                t if t & REPLY_TYPE_ERR_BIT != 0 => {
                    let e = self.read_error_chunk(t, plen)?;
                    err.get_or_insert(e);
                }
                t => bail!("unexpected reply chunk type {t} ({plen} bytes) to BLOCK_STATUS"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        descs.ok_or_else(|| anyhow!("server's reply had no extents for the requested context"))
    }

    /// Convenience: the dirty ranges (flags & 1) of a "qemu:dirty-bitmap:NAME" context over the
    /// whole export, as (offset, len), in order, adjacent ones merged.
    pub fn dirty_ranges(&mut self, context: &str) -> Result<Vec<(u64, u64)>> {
        let extents = self.block_status(context, 0, self.size)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in extents.into_iter().filter(|e| e.flags & 1 != 0) {
            match out.last_mut() {
                Some((o, l)) if *o + *l == e.offset => *l += e.len,
                _ => out.push((e.offset, e.len)),
            }
        }
        Ok(out)
    }

    /// NBD_CMD_READ into buf (structured replies: OFFSET_DATA chunks, OFFSET_HOLE -> zeros), requests split to <= 32 MiB.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            bail!("read of {offset}+{len} is outside the export (size {})", self.size);
        }
        self.check_aligned(offset, len)?;
        for (i, part) in buf.chunks_mut(self.max_read as usize).enumerate() {
            let at = offset + i as u64 * u64::from(self.max_read);
            self.read_once(at, part).with_context(|| format!("NBD read at {at}+{}", part.len()))?;
        }
        Ok(())
    }

    fn read_once(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let handle = self.send_request(CMD_READ, offset, buf.len() as u32)?;
        let mut covered = 0u64; // chunks must not overlap, so their sum tells us all was sent
        let mut err = None;
        loop {
            let (flags, ty, plen) = match self.read_reply_header(handle)? {
                Chunk::Simple { error: 0 } => {
                    self.read_exact(buf, "read data")?;
                    return Ok(());
                }
                Chunk::Simple { error } => bail!("{}", nbd_error(error, "")),
                Chunk::Structured { flags, ty, len } => (flags, ty, len),
            };
            match ty {
                REPLY_TYPE_OFFSET_DATA => {
                    if plen < 8 {
                        bail!("short OFFSET_DATA chunk ({plen} bytes)");
                    }
                    let at = self.read_u64("data chunk offset")?;
                    let n = u64::from(plen - 8);
                    let start = self.chunk_start(offset, buf.len(), at, n)?;
                    self.read_exact(&mut buf[start..start + n as usize], "read data")?;
                    covered += n;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if plen != 12 {
                        bail!("OFFSET_HOLE chunk of wrong length {plen}");
                    }
                    let at = self.read_u64("hole chunk")?;
                    let n = u64::from(self.read_u32("hole chunk")?);
                    let start = self.chunk_start(offset, buf.len(), at, n)?;
                    buf[start..start + n as usize].fill(0);
                    covered += n;
                }
                REPLY_TYPE_NONE if plen == 0 => {}
                t if t & REPLY_TYPE_ERR_BIT != 0 => {
                    let e = self.read_error_chunk(t, plen)?;
                    err.get_or_insert(e);
                }
                t => bail!("unexpected reply chunk type {t} ({plen} bytes) to READ"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        if covered != buf.len() as u64 {
            bail!("server's reply covered {covered} of {} bytes", buf.len());
        }
        Ok(())
    }

    /// Index into the request's buffer of a data/hole chunk at `at` of `n` bytes, checking that
    /// it lies inside the request.
    fn chunk_start(&self, req_offset: u64, req_len: usize, at: u64, n: u64) -> Result<usize> {
        if at < req_offset || at + n > req_offset + req_len as u64 {
            bail!("server sent a chunk at {at}+{n} outside the request {req_offset}+{req_len}");
        }
        Ok((at - req_offset) as usize)
    }

    /// NBD_CMD_DISC, best effort: the server sends no reply, and there is nothing useful to do if
    /// it is already gone.
    pub fn disconnect(mut self) {
        let _ = self.send_request(CMD_DISC, 0, 0);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    fn check_aligned(&self, offset: u64, len: u64) -> Result<()> {
        let m = u64::from(self.min_block);
        if !offset.is_multiple_of(m) || !len.is_multiple_of(m) {
            bail!("{offset}+{len} is not aligned to the server's minimum block size {m}");
        }
        Ok(())
    }

    // --- wire helpers ---

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.write_all(&msg)
    }

    /// One option reply: (reply type, payload). Error replies become errors carrying the
    /// server's message.
    fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let magic = self.read_u64("option reply")?;
        if magic != OPT_REPLY_MAGIC {
            bail!("bad option reply magic {magic:#018x} (expected {OPT_REPLY_MAGIC:#018x})");
        }
        let opt = self.read_u32("option reply")?;
        let ty = self.read_u32("option reply")?;
        let len = self.read_u32("option reply")?;
        let payload = self.read_payload(len, "option reply payload")?;
        if opt != option {
            bail!("server replied to option {opt} while we asked option {option}");
        }
        if ty & REP_ERR_BIT != 0 {
            let msg = String::from_utf8_lossy(&payload);
            let what = match ty & !REP_ERR_BIT {
                1 => "unsupported",
                2 => "forbidden by policy",
                3 => "invalid",
                4 => "unsupported on this platform",
                5 => "TLS required",
                6 => "unknown export",
                7 => "server shutting down",
                8 => "block size negotiation required",
                9 => "too big",
                10 => "extended headers required",
                _ => "error",
            };
            bail!("server rejected option {}: {what} ({ty:#x}){}", option_name(option), if msg.is_empty() { String::new() } else { format!(": {msg}") });
        }
        Ok((ty, payload))
    }

    fn send_request(&mut self, cmd: u16, offset: u64, len: u32) -> Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut msg = [0u8; 28];
        msg[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg[4..6].copy_from_slice(&0u16.to_be_bytes()); // command flags
        msg[6..8].copy_from_slice(&cmd.to_be_bytes());
        msg[8..16].copy_from_slice(&handle.to_be_bytes());
        msg[16..24].copy_from_slice(&offset.to_be_bytes());
        msg[24..28].copy_from_slice(&len.to_be_bytes());
        self.write_all(&msg)?;
        Ok(handle)
    }

    /// Reads a reply header (simple or structured chunk) and checks it answers `handle`.
    fn read_reply_header(&mut self, handle: u64) -> Result<Chunk> {
        let magic = self.read_u32("reply header")?;
        let (chunk, h) = match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = self.read_u32("reply header")?;
                (Chunk::Simple { error }, self.read_u64("reply header")?)
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.read_u16("reply header")?;
                let ty = self.read_u16("reply header")?;
                let h = self.read_u64("reply header")?;
                let len = self.read_u32("reply header")?;
                (Chunk::Structured { flags, ty, len }, h)
            }
            m => bail!("bad reply magic {m:#010x} (stream out of sync or not NBD)"),
        };
        if h != handle {
            bail!("reply for handle {h} while waiting for {handle}");
        }
        Ok(chunk)
    }

    /// Reads the payload of an error chunk and turns it into an error with the server's message.
    fn read_error_chunk(&mut self, ty: u16, len: u32) -> Result<anyhow::Error> {
        let p = self.read_payload(len, "error chunk")?;
        if p.len() < 6 {
            bail!("malformed error chunk ({} bytes)", p.len());
        }
        let error = be_u32(&p[..4]);
        let mlen = usize::from(be_u16(&p[4..6]));
        let msg = p.get(6..6 + mlen).ok_or_else(|| anyhow!("malformed error chunk: message longer than chunk"))?;
        let mut msg = String::from_utf8_lossy(msg).into_owned();
        if ty == REPLY_TYPE_ERROR_OFFSET {
            if let Some(o) = p.get(6 + mlen..14 + mlen) {
                msg = format!("{msg} (at offset {})", be_u64(o));
            }
        }
        Ok(anyhow!("{}", nbd_error(error, &msg)))
    }

    fn read_payload(&mut self, len: u32, what: &str) -> Result<Vec<u8>> {
        if len > MAX_META_PAYLOAD {
            bail!("{what} of {len} bytes is implausibly large");
        }
        let mut v = vec![0; len as usize];
        self.read_exact(&mut v, what)?;
        Ok(v)
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.sock.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => anyhow!("NBD server closed the connection while we read the {what}"),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                anyhow!("NBD server sent no {what} within {:?}", self.sock.read_timeout().ok().flatten().unwrap_or(IO_TIMEOUT))
            }
            _ => anyhow!("reading the {what} from the NBD server: {e}"),
        })
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.sock.write_all(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => anyhow!("NBD server closed the connection while we wrote to it"),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow!("NBD server accepted no data within {:?}", self.sock.write_timeout().ok().flatten().unwrap_or(IO_TIMEOUT)),
            _ => anyhow!("writing to the NBD server: {e}"),
        })
    }

    fn read_u16(&mut self, what: &str) -> Result<u16> {
        let mut b = [0; 2];
        self.read_exact(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    fn read_u32(&mut self, what: &str) -> Result<u32> {
        let mut b = [0; 4];
        self.read_exact(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self, what: &str) -> Result<u64> {
        let mut b = [0; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }
}

enum Chunk {
    Simple { error: u32 },
    Structured { flags: u16, ty: u16, len: u32 },
}

fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    match out.last_mut() {
        Some(last) if last.flags == e.flags && last.offset + last.len == e.offset => last.len += e.len,
        _ => out.push(e),
    }
}

fn put_string32(v: &mut Vec<u8>, s: &str) -> Result<()> {
    if s.len() > 4096 {
        bail!("NBD string too long ({} bytes, limit 4096)", s.len());
    }
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    Ok(())
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().unwrap())
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}

fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "(other)",
    }
}

/// "server error EIO (5): message" — NBD error numbers are fixed by the spec, not the platform.
fn nbd_error(error: u32, msg: &str) -> String {
    let name = match error {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    };
    if msg.is_empty() {
        format!("NBD server error {name} ({error})")
    } else {
        format!("NBD server error {name} ({error}): {msg}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;

    /// Kills QEMU and removes the temp dir however the test ends.
    struct Guard {
        child: Option<Child>,
        dir: PathBuf,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Minimal synchronous QMP: one JSON object per line, events skipped.
    struct Qmp {
        r: BufReader<UnixStream>,
        w: UnixStream,
    }
    impl Qmp {
        fn connect(path: &Path, child: &mut Child) -> Qmp {
            let deadline = Instant::now() + Duration::from_secs(20);
            let s = loop {
                match UnixStream::connect(path) {
                    Ok(s) => break s,
                    Err(e) => {
                        if let Some(st) = child.try_wait().unwrap() {
                            panic!("QEMU exited early ({st})");
                        }
                        assert!(Instant::now() < deadline, "QMP socket never appeared: {e}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut q = Qmp { r: BufReader::new(s.try_clone().unwrap()), w: s };
            let greeting = q.line();
            assert!(greeting.get("QMP").is_some(), "not a QMP greeting: {greeting}");
            q.exec("qmp_capabilities", json!({})).unwrap();
            q
        }
        fn line(&mut self) -> Value {
            let mut l = String::new();
            self.r.read_line(&mut l).unwrap();
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad QMP line {l:?}: {e}"))
        }
        fn exec(&mut self, cmd: &str, args: Value) -> std::result::Result<Value, Value> {
            let msg = json!({"execute": cmd, "arguments": args});
            writeln!(self.w, "{msg}").unwrap();
            loop {
                let v = self.line();
                if v.get("event").is_some() {
                    continue;
                }
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                return Err(v.get("error").cloned().unwrap_or(v));
            }
        }
        fn ok(&mut self, cmd: &str, args: Value) -> Value {
            self.exec(cmd, args.clone()).unwrap_or_else(|e| panic!("QMP {cmd} {args} failed: {e}"))
        }
        fn qemu_io(&mut self, node: &str, cmd: &str) {
            let out = self.ok("human-monitor-command", json!({"command-line": format!("qemu-io {node} \"{cmd}\"")}));
            let out = out.as_str().unwrap_or_default();
            assert!(!out.contains("rror") && !out.contains("failed"), "qemu-io {cmd}: {out}");
        }
    }

    fn pattern(i: u64) -> u8 {
        (i % 251) as u8 // prime period, so misplaced bytes show
    }

    #[test]
    fn dirty_bitmap_and_read_against_qemu() {
        if Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status().is_err() {
            println!("SKIP: qemu-system-x86_64 is not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("ferry-nbd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut guard = Guard { child: None, dir: dir.clone() };

        // A 5 GiB sparse image (costs no disk): the first 4 MiB a known pattern, the rest a hole.
        // Big enough that BLOCK_STATUS over it needs several 2 GiB requests and offsets pass 4 GiB.
        let size = 5 * 1024 * MIB;
        let img = dir.join("disk.raw");
        let original: Vec<u8> = (0..4 * MIB).map(pattern).collect();
        std::fs::write(&img, &original).unwrap();
        std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(size).unwrap();

        let qmp_sock = dir.join("qmp.sock");
        let nbd_sock = dir.join("nbd.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "none", "-accel", "tcg", "-nodefaults", "-display", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
            .arg("-blockdev")
            .arg(format!("driver=file,filename={},node-name=f0", img.display()))
            .args(["-blockdev", "driver=raw,file=f0,node-name=d0"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting qemu-system-x86_64");
        guard.child = Some(child);
        let mut qmp = Qmp::connect(&qmp_sock, guard.child.as_mut().unwrap());

        qmp.ok("block-dirty-bitmap-add", json!({"node": "d0", "name": "b0", "granularity": 65536}));
        qmp.qemu_io("d0", "write -P 0x5a 1M 128k"); // exactly two granules
        qmp.qemu_io("d0", "write -P 0x5a 3076k 4k"); // inside the granule at 3 MiB
        qmp.qemu_io("d0", "write -P 0x5a 4097M 64k"); // past 4 GiB
        // QEMU refuses to export an enabled bitmap read-only from a writable node, since it
        // could change under the reader; a frozen (disabled) bitmap is what a copier wants anyway.
        qmp.ok("block-dirty-bitmap-disable", json!({"node": "d0", "name": "b0"}));
        qmp.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": nbd_sock.to_str().unwrap()}}}));
        qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "d0", "name": "d0", "writable": false, "bitmaps": ["b0"]}),
        );

        let mut c = NbdClient::connect(&nbd_sock, "d0", &["base:allocation", "qemu:dirty-bitmap:b0"]).unwrap();
        assert_eq!(c.size(), size);
        println!("server block sizes: minimum {}, read chunk {}", c.min_block, c.max_read);

        let dirty = c.dirty_ranges("qemu:dirty-bitmap:b0").unwrap();
        println!("dirty ranges: {dirty:?}");
        assert_eq!(dirty, vec![(MIB, 128 * KIB), (3 * MIB, 64 * KIB), (4097 * MIB, 64 * KIB)]);

        // The raw extents tile the export exactly.
        let all = c.block_status("qemu:dirty-bitmap:b0", 0, size).unwrap();
        println!("bitmap extents: {all:?}");
        assert_eq!(all.first().unwrap().offset, 0);
        assert_eq!(all.iter().map(|e| e.len).sum::<u64>(), size);

        // The first 40 MiB through READ (two requests): 0x5a where written, the pattern
        // elsewhere, zeros in the hole.
        let mut buf = vec![0u8; 40 * MIB as usize];
        c.read(0, &mut buf).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            let i = i as u64;
            let want = if (MIB..MIB + 128 * KIB).contains(&i) || (3076 * KIB..3080 * KIB).contains(&i) {
                0x5a
            } else if i < 4 * MIB {
                pattern(i)
            } else {
                0
            };
            assert_eq!(b, want, "byte at {i}");
        }
        // An unaligned-length read straddling written and original data.
        let mut small = vec![0u8; 4097];
        c.read(MIB - 2048, &mut small).unwrap();
        assert_eq!(small[0], pattern(MIB - 2048));
        assert!(small[2048..].iter().all(|&b| b == 0x5a));
        let mut high = vec![0u8; 128 * KIB as usize];
        c.read(4097 * MIB - 32 * KIB, &mut high).unwrap();
        assert!(high[..32 * KIB as usize].iter().all(|&b| b == 0));
        assert!(high[32 * KIB as usize..96 * KIB as usize].iter().all(|&b| b == 0x5a));
        assert!(high[96 * KIB as usize..].iter().all(|&b| b == 0));

        // base:allocation over the sparse region says hole and/or zero.
        let holes = c.block_status("base:allocation", 5 * MIB, 2 * MIB).unwrap();
        println!("allocation of 5M..7M: {holes:?}");
        assert_eq!(holes, vec![Extent { offset: 5 * MIB, len: 2 * MIB, flags: holes[0].flags }]);
        assert_ne!(holes[0].flags & 3, 0, "sparse region not reported as hole/zero");
        let data = c.block_status("base:allocation", 0, MIB).unwrap();
        assert_eq!(data.iter().map(|e| e.len).sum::<u64>(), MIB);
        assert!(data.iter().all(|e| e.flags & 1 == 0), "data region reported as a hole: {data:?}");

        // Clear errors for a context never negotiated and a range past the end.
        let e = c.block_status("qemu:dirty-bitmap:nope", 0, MIB).unwrap_err().to_string();
        assert!(e.contains("not negotiated"), "{e}");
        let e = c.read(size - 512, &mut [0u8; 1024]).unwrap_err().to_string();
        assert!(e.contains("outside the export"), "{e}");
        c.disconnect();

        // Asking for a bitmap the export does not carry fails at connect, naming it.
        let e = format!("{:#}", NbdClient::connect(&nbd_sock, "d0", &["qemu:dirty-bitmap:missing"]).err().unwrap());
        println!("refused context: {e}");
        assert!(e.contains("refused meta context") && e.contains("missing"), "{e}");
        // An unknown export gives the server's message.
        let e = format!("{:#}", NbdClient::connect(&nbd_sock, "nope", &[]).err().unwrap());
        println!("unknown export: {e}");
        assert!(e.contains("NBD_OPT_GO"), "{e}");
    }

    #[test]
    fn server_closing_mid_handshake_is_an_error() {
        let dir = std::env::temp_dir().join(format!("ferry-nbd-close-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _guard = Guard { child: None, dir: dir.clone() };
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            // 1: accept and drop at once.
            drop(listener.accept().unwrap());
            // 2: send the greeting, read the client's flags, then drop.
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
            s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
            s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()).unwrap();
            let mut flags = [0u8; 4];
            s.read_exact(&mut flags).unwrap();
            assert_eq!(u32::from_be_bytes(flags), 3);
            drop(s);
            // 3: greet, then go silent (wedged) until the client gives up.
            let (mut s3, _) = listener.accept().unwrap();
            s3.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
            let mut sink = Vec::new();
            let _ = s3.read_to_end(&mut sink);
        });
        let t = Instant::now();
        let e1 = format!("{:#}", NbdClient::connect(&path, "x", &[]).err().unwrap());
        let e2 = format!("{:#}", NbdClient::connect(&path, "x", &["base:allocation"]).err().unwrap());
        let e3 = format!("{:#}", NbdClient::connect_with_timeout(&path, "x", &[], Duration::from_millis(300)).err().unwrap());
        println!("{e1}\n{e2}\n{e3}");
        assert!(e1.contains("closed the connection"), "{e1}");
        assert!(e2.contains("closed the connection"), "{e2}");
        assert!(e3.contains("within"), "{e3}");
        assert!(t.elapsed() < Duration::from_secs(10));
        server.join().unwrap();
    }
}
