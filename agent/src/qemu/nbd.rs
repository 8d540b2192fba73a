//! A minimal NBD client (fixed newstyle, structured replies) for what a backup needs from
//! QEMU's NBD server: the `qemu:dirty-bitmap:NAME` (and `base:allocation`) meta contexts
//! and BLOCK_STATUS. Everything the server sends is bounded and checked; a protocol error
//! names what was wrong. Reads of guest data go through the frozen image files instead.
//!
//! Wire format (big-endian), from the NBD protocol document: the server greets with
//! `NBDMAGIC`, `IHAVEOPT` and 16-bit flags; options are `IHAVEOPT, u32 option, u32 length,
//! data` and answered by `0x3e889045565a9, u32 option, u32 reply type, u32 length, data`;
//! requests are `0x25609513, u16 flags, u16 type, u64 cookie, u64 offset, u32 length`;
//! structured reply chunks are `0x668e33ef, u16 flags, u16 type, u64 cookie, u32 length,
//! payload`.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const INFO_EXPORT: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_BLOCK_STATUS: u16 = 5;
/// Largest option reply or reply chunk accepted.
const MAX_PAYLOAD: u32 = 16 << 20;
/// Bytes asked per BLOCK_STATUS request.
const STATUS_SPAN: u64 = 1 << 30;

/// An NBD failure.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("NBD: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol or refused.
    #[error("NBD: {0}")]
    Protocol(String),
}

fn proto(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

/// A connected export.
#[derive(Debug)]
pub struct NbdClient {
    s: UnixStream,
    size: u64,
    contexts: Vec<(u32, String)>,
    cookie: u64,
}

impl NbdClient {
    /// Connects to `export` on the server at `socket`, asking for the meta `contexts`.
    pub async fn connect(socket: &Path, export: &str, contexts: &[&str]) -> Result<NbdClient, NbdError> {
        let mut s = UnixStream::connect(socket).await?;
        if s.read_u64().await? != NBDMAGIC || s.read_u64().await? != IHAVEOPT {
            return Err(proto("not an NBD server (bad greeting)"));
        }
        let flags = s.read_u16().await?;
        if flags & 1 == 0 {
            return Err(proto("the server does not speak fixed newstyle"));
        }
        // FIXED_NEWSTYLE | NO_ZEROES (the latter only if offered).
        s.write_u32(1 | (u32::from(flags) & 2)).await?;

        send_option(&mut s, OPT_STRUCTURED_REPLY, &[]).await?;
        expect_ack(&mut s, OPT_STRUCTURED_REPLY).await?;

        let mut data = Vec::new();
        put_str32(&mut data, export);
        data.extend_from_slice(&u32::try_from(contexts.len()).unwrap_or(0).to_be_bytes());
        for c in contexts {
            put_str32(&mut data, c);
        }
        send_option(&mut s, OPT_SET_META_CONTEXT, &data).await?;
        let mut chosen = Vec::new();
        loop {
            let (ty, payload) = read_option_reply(&mut s, OPT_SET_META_CONTEXT).await?;
            match ty {
                REP_ACK => break,
                REP_META_CONTEXT if payload.len() >= 4 => {
                    let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    chosen.push((id, String::from_utf8_lossy(&payload[4..]).to_string()));
                }
                other => return Err(proto(format!("unexpected reply {other} to SET_META_CONTEXT"))),
            }
        }
        for c in contexts {
            if !chosen.iter().any(|(_, n)| n == c) {
                return Err(proto(format!("the server has no meta context {c:?} on export {export:?}")));
            }
        }

        let mut data = Vec::new();
        put_str32(&mut data, export);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        send_option(&mut s, OPT_GO, &data).await?;
        let mut size = None;
        loop {
            let (ty, payload) = read_option_reply(&mut s, OPT_GO).await?;
            match ty {
                REP_ACK => break,
                REP_INFO if payload.len() >= 12 && payload[..2] == INFO_EXPORT.to_be_bytes() => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&payload[2..10]);
                    size = Some(u64::from_be_bytes(b));
                }
                REP_INFO => {}
                other => return Err(proto(format!("unexpected reply {other} to GO"))),
            }
        }
        let size = size.ok_or_else(|| proto("the server did not tell the export size"))?;
        Ok(NbdClient { s, size, contexts: chosen, cookie: 0 })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Ranges `(offset, length)` where meta context `context` reports any of `flags`,
    /// over the whole export, merged.
    pub async fn ranges_with(&mut self, context: &str, flags: u32) -> Result<Vec<(u64, u64)>, NbdError> {
        let id = self
            .contexts
            .iter()
            .find(|(_, n)| n == context)
            .map(|(id, _)| *id)
            .ok_or_else(|| proto(format!("meta context {context:?} was not negotiated")))?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = 0u64;
        while at < self.size {
            let len = (self.size - at).min(STATUS_SPAN);
            self.cookie += 1;
            let cookie = self.cookie;
            let mut req = Vec::with_capacity(28);
            req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&CMD_BLOCK_STATUS.to_be_bytes());
            req.extend_from_slice(&cookie.to_be_bytes());
            req.extend_from_slice(&at.to_be_bytes());
            req.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            self.s.write_all(&req).await?;
            let mut covered = 0u64;
            loop {
                let magic = self.s.read_u32().await?;
                if magic == SIMPLE_MAGIC {
                    let err = self.s.read_u32().await?;
                    let _ = self.s.read_u64().await?;
                    return Err(proto(format!("BLOCK_STATUS at {at} failed with error {err}")));
                }
                if magic != STRUCTURED_MAGIC {
                    return Err(proto(format!("bad reply magic {magic:#x}")));
                }
                let rflags = self.s.read_u16().await?;
                let ty = self.s.read_u16().await?;
                if self.s.read_u64().await? != cookie {
                    return Err(proto("a reply for another request"));
                }
                let plen = self.s.read_u32().await?;
                if plen > MAX_PAYLOAD {
                    return Err(proto(format!("reply chunk of {plen} bytes")));
                }
                let mut payload = vec![0u8; usize::try_from(plen).unwrap_or(0)];
                self.s.read_exact(&mut payload).await?;
                if ty & 0x8000 != 0 {
                    let code = payload.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
                    let msg = payload.get(6..).map(String::from_utf8_lossy).unwrap_or_default();
                    return Err(proto(format!("BLOCK_STATUS at {at}: error {code}: {msg}")));
                }
                if ty == REPLY_BLOCK_STATUS {
                    if payload.len() < 4 || (payload.len() - 4) % 8 != 0 {
                        return Err(proto(format!("BLOCK_STATUS reply of {} bytes", payload.len())));
                    }
                    let ctx = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if ctx == id {
                        let mut pos = at;
                        for d in payload[4..].chunks_exact(8) {
                            let dlen = u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                            let dflags = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                            let dlen = dlen.min(at + len - pos);
                            if dflags & flags != 0 && dlen > 0 {
                                match out.last_mut() {
                                    Some(last) if last.0 + last.1 == pos => last.1 += dlen,
                                    _ => out.push((pos, dlen)),
                                }
                            }
                            pos += dlen;
                        }
                        covered = covered.max(pos - at);
                    }
                }
                if rflags & REPLY_FLAG_DONE != 0 {
                    break;
                }
            }
            if covered == 0 {
                return Err(proto(format!("BLOCK_STATUS at {at} described nothing")));
            }
            at += covered;
        }
        Ok(out)
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        self.cookie += 1;
        let mut req = Vec::with_capacity(28);
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&CMD_DISC.to_be_bytes());
        req.extend_from_slice(&self.cookie.to_be_bytes());
        req.extend_from_slice(&[0u8; 12]);
        let _ = self.s.write_all(&req).await;
    }
}

fn put_str32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

async fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await?;
    Ok(())
}

async fn read_option_reply(s: &mut UnixStream, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
    if s.read_u64().await? != REPLY_MAGIC {
        return Err(proto("bad option reply magic"));
    }
    if s.read_u32().await? != option {
        return Err(proto(format!("a reply for another option than {option}")));
    }
    let ty = s.read_u32().await?;
    let len = s.read_u32().await?;
    if len > MAX_PAYLOAD {
        return Err(proto(format!("option reply of {len} bytes")));
    }
    let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
    s.read_exact(&mut payload).await?;
    if ty & 0x8000_0000 != 0 {
        return Err(proto(format!("option {option} refused ({ty:#x}): {}", String::from_utf8_lossy(&payload))));
    }
    Ok((ty, payload))
}

async fn expect_ack(s: &mut UnixStream, option: u32) -> Result<(), NbdError> {
    match read_option_reply(s, option).await? {
        (REP_ACK, _) => Ok(()),
        (other, _) => Err(proto(format!("unexpected reply {other} to option {option}"))),
    }
}
