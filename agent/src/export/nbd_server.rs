//! A read-only NBD server for one export: fixed newstyle handshake, `NBD_OPT_GO`/`INFO`/
//! `EXPORT_NAME`/`LIST`, structured replies, and the `base:allocation` meta context, so a
//! client sees holes as holes (`qemu-img map`, `qemu-img convert` skip them).
//!
//! Commands: READ (data, or an error chunk naming what failed: never wrong data), BLOCK_STATUS,
//! FLUSH and CACHE (nothing to do), DISC; WRITE, TRIM and WRITE_ZEROES answer `EPERM`. Every
//! length a client sends is bounded before anything is allocated: option data 64 KiB,
//! requests 32 MiB. Requests of one connection are answered in order; a client opens several
//! connections for parallel reads (the export allows multi-conn: it never changes).
//!
//! Over TCP the server is TLS-only (the NBD protocol's "TLS-only mode"): before
//! `NBD_OPT_STARTTLS` every option but ABORT is answered `NBD_REP_ERR_TLS_REQD` (and
//! EXPORT_NAME, which has no error reply, ends the connection); after it, the handshake goes
//! on inside TLS as on a Unix socket. Unix-socket exports answer STARTTLS `NBD_REP_ERR_UNSUP`.
//!
//! Wire format (big-endian), as in the NBD protocol document and `crate::qemu::nbd` (the
//! client side).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::disk::BackupDisk;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TX_HAS_FLAGS: u16 = 1;
const TX_READ_ONLY: u16 = 1 << 1;
const TX_SEND_FLUSH: u16 = 1 << 2;
const TX_SEND_DF: u16 = 1 << 7;
const TX_CAN_MULTI_CONN: u16 = 1 << 8;
const TX_SEND_CACHE: u16 = 1 << 10;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_NONE: u16 = 0;
const REPLY_OFFSET_DATA: u16 = 1;
const REPLY_BLOCK_STATUS: u16 = 5;
const REPLY_ERROR: u16 = (1 << 15) + 1;

const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;

/// How long a TCP client may take from connecting to a finished TLS handshake.
const TLS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
/// Largest option payload read.
const MAX_OPTION: u32 = 64 << 10;
/// Largest READ (and WRITE payload drained) served.
pub const MAX_REQUEST: u32 = 32 << 20;
/// The one meta context served, and its id.
const BASE_ALLOCATION: &str = "base:allocation";
const BASE_ALLOCATION_ID: u32 = 1;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket failed.
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error("NBD client: {0}")]
    Protocol(String),
}

/// What the handshake settled.
#[derive(Debug, Default)]
struct Session {
    structured: bool,
    allocation: bool,
}

struct Conn<S> {
    s: S,
    name: String,
    disk: Arc<BackupDisk>,
    /// Whether the connection runs inside TLS.
    tls: bool,
}

fn protocol(m: impl Into<String>) -> ServeError {
    ServeError::Protocol(m.into())
}

/// Serves one client connection until it disconnects; with `tls`, only inside TLS.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    name: &str,
    disk: Arc<BackupDisk>,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<(), ServeError> {
    let mut c = Conn { s, name: name.to_string(), disk: disk.clone(), tls: false };
    let Some(acceptor) = tls else {
        let no_zeroes = c.greet().await?;
        let Some(session) = c.handshake(no_zeroes).await? else { return Ok(()) };
        return c.transmission(session).await;
    };
    // Until its certificate is checked a TCP peer is nobody: it gets a bounded time to
    // reach TLS, and cannot hold a connection open by never finishing.
    let unauthenticated = async {
        let no_zeroes = c.greet().await?;
        if !c.until_starttls().await? {
            return Ok(None);
        }
        let s = acceptor.accept(c.s).await.map_err(|e| protocol(format!("TLS handshake: {e}")))?;
        Ok::<_, ServeError>(Some((s, no_zeroes)))
    };
    let Some((s, no_zeroes)) = tokio::time::timeout(TLS_DEADLINE, unauthenticated)
        .await
        .map_err(|_| protocol(format!("no TLS within {} s", TLS_DEADLINE.as_secs())))??
    else {
        return Ok(());
    };
    let mut c = Conn { s, name: name.to_string(), disk, tls: true };
    let Some(session) = c.handshake(no_zeroes).await? else { return Ok(()) };
    c.transmission(session).await
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn tx_flags(&self) -> u16 {
        TX_HAS_FLAGS | TX_READ_ONLY | TX_SEND_FLUSH | TX_SEND_DF | TX_CAN_MULTI_CONN | TX_SEND_CACHE
    }

    async fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Result<(), ServeError> {
        let mut b = Vec::with_capacity(20 + data.len());
        b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await?;
        Ok(())
    }

    /// Sends the server's greeting and reads the client's flags; returns whether the client
    /// asked for no zero padding.
    async fn greet(&mut self) -> Result<bool, ServeError> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.s.write_all(&hello).await?;
        let client_flags = self.s.read_u32().await?;
        Ok(client_flags & CLIENT_NO_ZEROES != 0)
    }

    /// The next option and its data (bounded); None when the client left.
    async fn next_option(&mut self) -> Result<Option<(u32, Vec<u8>)>, ServeError> {
        let magic = match self.s.read_u64().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if magic != IHAVEOPT {
            return Err(protocol(format!("option magic {magic:#x}")));
        }
        let option = self.s.read_u32().await?;
        let len = self.s.read_u32().await?;
        if len > MAX_OPTION {
            return Err(protocol(format!("option {option} carries {len} bytes (at most {MAX_OPTION})")));
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await?;
        Ok(Some((option, data)))
    }

    /// Options before TLS: only STARTTLS (true: start TLS now) and ABORT are served.
    async fn until_starttls(&mut self) -> Result<bool, ServeError> {
        loop {
            let Some((option, _)) = self.next_option().await? else { return Ok(false) };
            match option {
                OPT_STARTTLS => {
                    self.reply(option, REP_ACK, &[]).await?;
                    return Ok(true);
                }
                OPT_ABORT => {
                    self.reply(option, REP_ACK, &[]).await?;
                    return Ok(false);
                }
                // No error reply exists for this option: the connection just ends.
                OPT_EXPORT_NAME => return Ok(false),
                _ => self.reply(option, REP_ERR_TLS_REQD, b"this export is served over TLS only").await?,
            }
        }
    }

    /// Option haggling; returns None when the client aborted or left.
    async fn handshake(&mut self, no_zeroes: bool) -> Result<Option<Session>, ServeError> {
        let mut session = Session::default();
        loop {
            let Some((option, data)) = self.next_option().await? else { return Ok(None) };
            match option {
                OPT_STARTTLS if self.tls => self.reply(option, REP_ERR_INVALID, b"TLS is already on").await?,
                OPT_STARTTLS => {
                    self.reply(option, REP_ERR_UNSUP, b"this export is served on a Unix socket, without TLS").await?
                }
                OPT_EXPORT_NAME => {
                    if String::from_utf8_lossy(&data) != self.name {
                        // This option has no error reply: the connection just ends.
                        return Ok(None);
                    }
                    let mut b = Vec::with_capacity(134);
                    b.extend_from_slice(&self.disk.size().to_be_bytes());
                    b.extend_from_slice(&self.tx_flags().to_be_bytes());
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    self.s.write_all(&b).await?;
                    return Ok(Some(session));
                }
                OPT_ABORT => {
                    self.reply(option, REP_ACK, &[]).await?;
                    return Ok(None);
                }
                OPT_LIST => {
                    let mut b = Vec::new();
                    b.extend_from_slice(&u32::try_from(self.name.len()).unwrap_or(0).to_be_bytes());
                    b.extend_from_slice(self.name.as_bytes());
                    self.reply(option, REP_SERVER, &b).await?;
                    self.reply(option, REP_ACK, &[]).await?;
                }
                OPT_STRUCTURED_REPLY => {
                    session.structured = true;
                    self.reply(option, REP_ACK, &[]).await?;
                }
                OPT_INFO | OPT_GO => {
                    let Some(name) = parse_name(&data) else {
                        self.reply(option, REP_ERR_INVALID, b"malformed NBD_OPT_GO").await?;
                        continue;
                    };
                    if name != self.name && !name.is_empty() {
                        let msg = format!("no export named {name:?}");
                        self.reply(option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                        continue;
                    }
                    let mut info = Vec::with_capacity(12);
                    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&self.disk.size().to_be_bytes());
                    info.extend_from_slice(&self.tx_flags().to_be_bytes());
                    self.reply(option, REP_INFO, &info).await?;
                    let mut sizes = Vec::with_capacity(14);
                    sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    sizes.extend_from_slice(&1u32.to_be_bytes());
                    sizes.extend_from_slice(&self.disk.chunk_size().min(MAX_REQUEST).to_be_bytes());
                    sizes.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    self.reply(option, REP_INFO, &sizes).await?;
                    self.reply(option, REP_ACK, &[]).await?;
                    if option == OPT_GO {
                        return Ok(Some(session));
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    if !session.structured {
                        self.reply(option, REP_ERR_INVALID, b"negotiate structured replies first").await?;
                        continue;
                    }
                    let Some(queries) = parse_meta_queries(&data) else {
                        self.reply(option, REP_ERR_INVALID, b"malformed meta context request").await?;
                        continue;
                    };
                    let wants = queries.is_empty() && option == OPT_LIST_META_CONTEXT
                        || queries
                            .iter()
                            .any(|q| q == BASE_ALLOCATION || (option == OPT_LIST_META_CONTEXT && q == "base:"));
                    if wants {
                        let mut b = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        b.extend_from_slice(BASE_ALLOCATION.as_bytes());
                        self.reply(option, REP_META_CONTEXT, &b).await?;
                        if option == OPT_SET_META_CONTEXT {
                            session.allocation = true;
                        }
                    }
                    self.reply(option, REP_ACK, &[]).await?;
                }
                _ => self.reply(option, REP_ERR_UNSUP, b"option not supported").await?,
            }
        }
    }

    async fn transmission(&mut self, session: Session) -> Result<(), ServeError> {
        loop {
            let magic = match self.s.read_u32().await {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            if magic != REQUEST_MAGIC {
                return Err(protocol(format!("request magic {magic:#x}")));
            }
            let flags = self.s.read_u16().await?;
            let kind = self.s.read_u16().await?;
            let cookie = self.s.read_u64().await?;
            let offset = self.s.read_u64().await?;
            let len = self.s.read_u32().await?;
            let in_range = offset.checked_add(u64::from(len)).is_some_and(|end| end <= self.disk.size());
            match kind {
                CMD_DISC => return Ok(()),
                CMD_READ if len > MAX_REQUEST => self.error(&session, cookie, EOVERFLOW, "read too large").await?,
                CMD_READ if !in_range => self.error(&session, cookie, EINVAL, "read beyond the end").await?,
                CMD_READ => match self.disk.read(offset, len as usize).await {
                    Ok(data) => self.data(&session, cookie, offset, &data).await?,
                    Err(e) => {
                        tracing::warn!(export = %self.name, offset, len, error = %e, "NBD read failed");
                        self.error(&session, cookie, EIO, &e.to_string()).await?;
                    }
                },
                CMD_WRITE => {
                    if len > MAX_REQUEST {
                        return Err(protocol(format!("a {len}-byte write")));
                    }
                    let mut sink = vec![0u8; len as usize];
                    self.s.read_exact(&mut sink).await?;
                    self.error(&session, cookie, EPERM, "the export is read-only").await?;
                }
                CMD_TRIM | CMD_WRITE_ZEROES => self.error(&session, cookie, EPERM, "the export is read-only").await?,
                CMD_FLUSH | CMD_CACHE => self.done(&session, cookie).await?,
                CMD_BLOCK_STATUS if !session.allocation => {
                    self.error(&session, cookie, EINVAL, "no meta context negotiated").await?
                }
                CMD_BLOCK_STATUS if !in_range || len == 0 => {
                    self.error(&session, cookie, EINVAL, "status beyond the end").await?
                }
                CMD_BLOCK_STATUS => {
                    let extents = self.disk.extents(offset, u64::from(len), flags & CMD_FLAG_REQ_ONE != 0);
                    let mut b = Vec::with_capacity(4 + 8 * extents.len());
                    b.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                    for e in extents {
                        b.extend_from_slice(&u32::try_from(e.len).unwrap_or(u32::MAX).to_be_bytes());
                        b.extend_from_slice(&(if e.zero { STATE_HOLE | STATE_ZERO } else { 0 }).to_be_bytes());
                    }
                    self.chunk(REPLY_FLAG_DONE, REPLY_BLOCK_STATUS, cookie, &b).await?;
                }
                _ => self.error(&session, cookie, EINVAL, "unknown command").await?,
            }
        }
    }

    async fn chunk(&mut self, flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Result<(), ServeError> {
        let mut b = Vec::with_capacity(20 + payload.len());
        b.extend_from_slice(&STRUCTURED_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).await?;
        Ok(())
    }

    async fn simple(&mut self, cookie: u64, error: u32, data: &[u8]) -> Result<(), ServeError> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&SIMPLE_MAGIC.to_be_bytes());
        b.extend_from_slice(&error.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await?;
        Ok(())
    }

    async fn data(&mut self, s: &Session, cookie: u64, offset: u64, data: &[u8]) -> Result<(), ServeError> {
        if !s.structured {
            return self.simple(cookie, 0, data).await;
        }
        let mut payload = Vec::with_capacity(8 + data.len());
        payload.extend_from_slice(&offset.to_be_bytes());
        payload.extend_from_slice(data);
        self.chunk(REPLY_FLAG_DONE, REPLY_OFFSET_DATA, cookie, &payload).await
    }

    async fn done(&mut self, s: &Session, cookie: u64) -> Result<(), ServeError> {
        if s.structured {
            self.chunk(REPLY_FLAG_DONE, REPLY_NONE, cookie, &[]).await
        } else {
            self.simple(cookie, 0, &[]).await
        }
    }

    async fn error(&mut self, s: &Session, cookie: u64, errno: u32, message: &str) -> Result<(), ServeError> {
        if !s.structured {
            return self.simple(cookie, errno, &[]).await;
        }
        let msg = &message.as_bytes()[..message.len().min(4096)];
        let mut payload = Vec::with_capacity(6 + msg.len());
        payload.extend_from_slice(&errno.to_be_bytes());
        payload.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
        payload.extend_from_slice(msg);
        self.chunk(REPLY_FLAG_DONE, REPLY_ERROR, cookie, &payload).await
    }
}

/// The export name of an NBD_OPT_GO/INFO payload: `u32 length, name, u16 n, n * u16`.
fn parse_name(data: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    let n = u16::from_be_bytes(data.get(4 + len..6 + len)?.try_into().ok()?) as usize;
    if data.len() != 6 + len + 2 * n {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

/// The queries of a meta context option: `u32 name length, name, u32 n, n * (u32, query)`.
fn parse_meta_queries(data: &[u8]) -> Option<Vec<String>> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let mut at = 4 + len;
    let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?);
    at += 4;
    let mut out = Vec::new();
    for _ in 0..n {
        let l = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        out.push(String::from_utf8(data.get(at..at + l)?.to_vec()).ok()?);
        at += l;
    }
    (at == data.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_payloads_are_parsed_strictly() {
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"abc");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_name(&go).as_deref(), Some("abc"));
        assert_eq!(parse_name(&go[..go.len() - 1]), None);
        assert_eq!(parse_name(&[0, 0, 0, 9]), None);
        let mut meta = 3u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"abc");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        assert_eq!(parse_meta_queries(&meta), Some(vec!["base:allocation".to_string()]));
        assert_eq!(parse_meta_queries(&meta[..meta.len() - 2]), None);
    }
}
