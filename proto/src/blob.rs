//! Chunk blob: how one chunk is stored and sent. Pure `&[u8] -> Vec<u8>`.
//!
//! Version 1, a plain chunk:
//!
//! ```text
//! offset size  field
//!      0    8  magic           b"VMBKCHNK" (vmbackup chunk; do not change)
//!      8    1  format version  1
//!      9    1  compression     0 = none, 1 = zstd
//!     10    2  reserved        0
//!     12    4  plain length    u32 LE: bytes of the chunk's plaintext
//!     16    4  payload length  u32 LE: bytes that follow the header
//!     20    4  payload CRC     u32 LE: CRC-32C (Castagnoli) of the payload
//!     24    …  payload         plaintext, or its zstd frame
//! ```
//!
//! Version 3, a sealed chunk of an encrypted backup storage ([`crate::seal`]):
//!
//! ```text
//! offset size  field
//!      0    8  magic           b"VMBKCHNK"
//!      8    1  format version  3
//!      9    1  compression     0 = none, 1 = zstd (applied before sealing)
//!     10    1  cipher          1 = AES-256-GCM
//!     11    1  reserved        0
//!     12    4  plain length    u32 LE
//!     16    4  payload length  u32 LE: ciphertext plus the 16-byte tag
//!     20    4  payload CRC     u32 LE: CRC-32C of the payload (ciphertext and tag)
//!     24   16  key id          which master key sealed it
//!     40   12  nonce           fresh random per blob
//!     52   32  keyed hash      BLAKE3-keyed(chunk name key, plaintext)
//!     84    …  payload         AES-256-GCM(compressed or plain bytes) ‖ tag
//! ```
//!
//! A sealed chunk's name is [`sealed_name`]`(key id, keyed hash)`, so a store checks, without
//! the key, that a sealed blob is stored under the name its header derives: sealed chunks
//! have their own name space, apart from plain chunks' and from other keys'. The AEAD's
//! associated data is bytes 0..16 and 24..84 of the header (everything but the payload
//! length and CRC, which the store checks itself), so the tag binds the key id, nonce,
//! lengths and keyed hash; the agent then checks the plaintext's keyed hash.
//!
//! Version 2 (the first sealed blobs, still read, no longer written) is version 3 without
//! the keyed hash: a 52-byte header, the chunk named by the keyed hash itself, and associated
//! data bytes 0..16 and 24..52 of the header followed by the name. A store cannot tell a
//! version-2 name from a plain one, so it accepts version-2 uploads only when told to
//! ([`Checked::SealedUnbound`]).
//!
//! The encoder keeps zstd only when it is strictly smaller than the plaintext, and does not
//! try it on a long chunk whose probe samples do not shrink (`probe_compresses`). A plain
//! chunk's name (its [`Digest`]) is BLAKE3 of the plaintext. A decoded blob is always checked
//! against the name it is stored under ([`Decoder::decode_and_verify_into`]). A store holds
//! no key: for a sealed blob it checks framing, lengths, CRC and the name's derivation
//! ([`Decoder::verify`] says which it could check), and the agent checks the tag and the
//! keyed hash.

use std::sync::Arc;

use crate::digest::Digest;
use crate::format_error::FormatError;
use crate::seal::{ChunkKey, KEY_ID_LEN, KeyId, SEAL_NONCE_LEN, TAG_LEN, sealed_name};

/// Magic bytes at offset 0. Do not change: every stored chunk carries them.
pub const MAGIC: [u8; 8] = *b"VMBKCHNK";
/// Format version of a plain blob.
pub const VERSION: u8 = 1;
/// Format version of a sealed blob.
pub const SEALED_VERSION: u8 = 3;
/// Format version of the first sealed blobs (read, never written).
pub const SEALED_V2: u8 = 2;
/// Header length of a plain blob.
pub const HEADER_LEN: usize = 24;
/// Header length of a version-2 sealed blob.
pub const SEALED_V2_HEADER_LEN: usize = HEADER_LEN + KEY_ID_LEN + SEAL_NONCE_LEN;
/// Header length of a sealed blob.
pub const SEALED_HEADER_LEN: usize = SEALED_V2_HEADER_LEN + 32;
/// The tag's length as a header field's type.
const TAG_LEN_U32: u32 = 16;
const _: () = assert!(TAG_LEN_U32 as usize == TAG_LEN);
/// Cipher byte of AES-256-GCM.
pub const CIPHER_AES_256_GCM: u8 = 1;

const _: () = assert!(HEADER_LEN == 8 + 1 + 1 + 2 + 4 + 4 + 4);
const _: () = assert!(SEALED_V2_HEADER_LEN == 52 && SEALED_HEADER_LEN == 84);

/// Payload compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is.
    None = 0,
    /// A zstd frame.
    Zstd = 1,
}

/// The fixed header of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload compression.
    pub compression: Compression,
    /// Plaintext length.
    pub plain_len: u32,
    /// Payload length.
    pub payload_len: u32,
    /// CRC-32C of the payload.
    pub crc: u32,
    /// What a sealed blob's header adds.
    pub sealed: Option<Sealing>,
}

/// The sealing fields of a sealed blob's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealing {
    /// The master key's id.
    pub key: KeyId,
    /// The AES-GCM nonce.
    pub nonce: [u8; SEAL_NONCE_LEN],
    /// The plaintext's keyed hash (version 3); None in version 2, named by it instead.
    pub keyed: Option<Digest>,
}

impl Sealing {
    /// The name this header derives (version 3), or None (version 2, unbound).
    pub fn name(&self) -> Option<Digest> {
        self.keyed.map(|k| sealed_name(self.key, &k))
    }
}

impl Header {
    /// Bytes before the payload.
    pub fn len(&self) -> usize {
        match self.sealed {
            None => HEADER_LEN,
            Some(Sealing { keyed: None, .. }) => SEALED_V2_HEADER_LEN,
            Some(Sealing { keyed: Some(_), .. }) => SEALED_HEADER_LEN,
        }
    }

    /// Never: a header has a fixed, non-zero length.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What a store could check of a blob without a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// A plain blob: framing, CRC, and that the plaintext hashes to its name.
    Plain,
    /// A sealed blob: framing, lengths, CRC, and that its name is derived from its key id
    /// and keyed hash; content needs the key.
    Sealed(KeyId),
    /// A version-2 sealed blob: framing, lengths and CRC; its name is not derived from its
    /// header, so a store cannot tell it from a plain chunk's.
    SealedUnbound(KeyId),
}

/// A chunk's name, and for a sealed chunk the keyed hash it is derived from (the encoder
/// writes it into the blob; computing it once saves hashing the chunk again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkName {
    /// The name: in indexes, on the wire and on the store.
    pub digest: Digest,
    /// The keyed hash of a sealed chunk's plaintext.
    pub keyed: Option<Digest>,
}

fn err(field: &'static str, offset: usize, message: impl Into<String>) -> FormatError {
    FormatError::new("chunk blob", field, Some(offset), message)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Encodes a plain chunk; `zstd_level` 0 stores it uncompressed. Chunks are at most 16 MiB,
/// so lengths fit in u32; a larger input is refused. One-off use; a stream of chunks is
/// cheaper through one [`Encoder`].
pub fn encode(plain: &[u8], zstd_level: i32) -> Result<Vec<u8>, FormatError> {
    Encoder::new(zstd_level)?.encode(plain)
}

/// The plain blob bytes of a payload.
#[cfg(test)]
fn frame(plain_len: u32, compression: Compression, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame_into(&mut out, plain_len, compression, payload);
    out
}

/// [`frame`] into `out`, replacing what it held (its allocation is reused).
fn frame_into(out: &mut Vec<u8>, plain_len: u32, compression: Compression, payload: &[u8]) {
    let payload_len = u32::try_from(payload.len()).unwrap_or(plain_len);
    out.clear();
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(compression as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The associated data of a version-3 sealed blob: header bytes 0..16 and 24..84.
fn sealed_aad(header: &[u8]) -> [u8; 16 + SEALED_HEADER_LEN - HEADER_LEN] {
    let mut aad = [0u8; 16 + SEALED_HEADER_LEN - HEADER_LEN];
    aad[..16].copy_from_slice(&header[..16]);
    aad[16..].copy_from_slice(&header[HEADER_LEN..SEALED_HEADER_LEN]);
    aad
}

/// The associated data of a version-2 sealed blob: header bytes 0..16 and 24..52, then the
/// name.
fn sealed_v2_aad(header: &[u8], name: &Digest) -> [u8; 16 + KEY_ID_LEN + SEAL_NONCE_LEN + 32] {
    let mut aad = [0u8; 16 + KEY_ID_LEN + SEAL_NONCE_LEN + 32];
    aad[..16].copy_from_slice(&header[..16]);
    aad[16..44].copy_from_slice(&header[HEADER_LEN..SEALED_V2_HEADER_LEN]);
    aad[44..].copy_from_slice(&name.0);
    aad
}

/// The version-3 sealed blob of a payload whose plaintext has keyed hash `keyed`, under
/// `nonce`.
#[cfg(test)]
fn seal_frame(
    key: &ChunkKey,
    nonce: [u8; SEAL_NONCE_LEN],
    keyed: &Digest,
    plain_len: u32,
    compression: Compression,
    payload: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    seal_frame_into(&mut out, key, nonce, keyed, (plain_len, compression, payload))?;
    Ok(out)
}

/// [`seal_frame`] into `out`, replacing what it held (its allocation is reused): the
/// payload is sealed in place after the header.
fn seal_frame_into(
    out: &mut Vec<u8>,
    key: &ChunkKey,
    nonce: [u8; SEAL_NONCE_LEN],
    keyed: &Digest,
    (plain_len, compression, payload): (u32, Compression, &[u8]),
) -> Result<(), FormatError> {
    let payload_len = payload
        .len()
        .checked_add(TAG_LEN)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| err("payload length", 16, format!("{} bytes does not fit a chunk", payload.len())))?;
    out.clear();
    out.reserve(SEALED_HEADER_LEN + payload.len() + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(SEALED_VERSION);
    out.push(compression as u8);
    out.push(CIPHER_AES_256_GCM);
    out.push(0);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // CRC, once the payload is sealed
    out.extend_from_slice(&key.id().0);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&keyed.0);
    let aad = sealed_aad(out);
    out.extend_from_slice(payload);
    key.seal_in_place(nonce, &aad, out, SEALED_HEADER_LEN);
    let crc = crc32c::crc32c(&out[SEALED_HEADER_LEN..]);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Encodes chunk after chunk with one zstd context and one scratch buffer: a context per
/// chunk would allocate and set up its tables every time. Plain encoders give the bytes of
/// [`encode`]; sealing encoders (an encrypted storage's) give version-3 blobs.
pub struct Encoder {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
    key: Option<Arc<ChunkKey>>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("compresses", &self.zstd.is_some())
            .field("key", &self.key.as_ref().map(|k| k.id()))
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// A plain encoder at `zstd_level` (0: store chunks uncompressed).
    pub fn new(zstd_level: i32) -> Result<Self, FormatError> {
        Self::with_key(zstd_level, None)
    }

    /// An encoder at `zstd_level` that seals with `key` when given.
    pub fn with_key(zstd_level: i32, key: Option<Arc<ChunkKey>>) -> Result<Self, FormatError> {
        let zstd = if zstd_level == 0 {
            None
        } else {
            Some(
                zstd::bulk::Compressor::new(zstd_level)
                    .map_err(|e| err("compression", 9, format!("zstd level {zstd_level}: {e}")))?,
            )
        };
        Ok(Self { zstd, scratch: Vec::new(), key })
    }

    /// The name of `plain` for this encoder: a sealed name when it seals, BLAKE3 otherwise.
    pub fn name(&self, plain: &[u8]) -> ChunkName {
        name_of(self.key.as_deref(), plain)
    }

    /// Encodes one plain chunk: compressed when that makes it smaller, stored as is
    /// otherwise. A sealing encoder refuses: its blobs need their keyed hash
    /// ([`Self::encode_named`]).
    pub fn encode(&mut self, plain: &[u8]) -> Result<Vec<u8>, FormatError> {
        if self.key.is_some() {
            return Err(err("version", 8, "a sealing encoder needs the chunk's name"));
        }
        self.encode_named(plain, &ChunkName { digest: Digest::ZERO_CHUNK, keyed: None })
    }

    /// Encodes one chunk named `name` (from [`Self::name`]); a sealed blob carries its keyed
    /// hash, a plain one nothing of the name.
    pub fn encode_named(&mut self, plain: &[u8], name: &ChunkName) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::new();
        self.encode_named_into(plain, name, &mut out)?;
        Ok(out)
    }

    /// [`Self::encode_named`] into `out`, replacing what it held: a caller that keeps one
    /// buffer from chunk to chunk reuses its pages instead of faulting in a fresh chunk-sized
    /// allocation every time.
    pub fn encode_named_into(&mut self, plain: &[u8], name: &ChunkName, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let plain_len = u32::try_from(plain.len())
            .map_err(|_| err("plain length", 12, format!("{} bytes does not fit a chunk", plain.len())))?;
        let mut compressed = None;
        if let Some(z) = &mut self.zstd
            && probe_compresses(z, plain, &mut self.scratch)
        {
            self.scratch.clear();
            self.scratch.reserve(zstd::zstd_safe::compress_bound(plain.len()));
            compressed = z.compress_to_buffer(plain, &mut self.scratch).ok().filter(|&n| n < plain.len());
        }
        let (compression, payload) = match compressed {
            Some(n) => (Compression::Zstd, &self.scratch[..n]),
            None => (Compression::None, plain),
        };
        match &self.key {
            None => {
                frame_into(out, plain_len, compression, payload);
                Ok(())
            }
            Some(key) => {
                let keyed = name.keyed.ok_or_else(|| err("keyed hash", 52, "a sealed chunk needs its keyed hash"))?;
                seal_frame_into(out, key, ChunkKey::nonce()?, &keyed, (plain_len, compression, payload))
            }
        }
    }
}

/// Chunks at least this long are probed before they are compressed whole.
const PROBE_MIN_LEN: usize = 256 * 1024;
/// Bytes of one probe sample.
const PROBE_SAMPLE_LEN: usize = 8 * 1024;
/// Samples taken at most, spread evenly over the chunk.
const PROBE_SAMPLES: usize = 8;

/// Whether `plain` is worth compressing whole. Compressing incompressible data (media,
/// archives, encrypted guest disks) at zstd -1 costs about as much as hashing it and then
/// gives nothing back, so a long chunk is probed first: samples spread over it are compressed
/// one by one, and the first that shrinks by at least 1/32 settles it. Only a chunk none of
/// whose samples shrink is stored as is; compressible chunks pay one small sample. A chunk
/// that compresses only between the samples loses that gain (it stays correct either way:
/// the blob says whether its payload is compressed).
fn probe_compresses(z: &mut zstd::bulk::Compressor<'static>, plain: &[u8], scratch: &mut Vec<u8>) -> bool {
    if plain.len() < PROBE_MIN_LEN {
        return true;
    }
    let stride = plain.len() / PROBE_SAMPLES;
    scratch.clear();
    scratch.reserve(zstd::zstd_safe::compress_bound(PROBE_SAMPLE_LEN));
    (0..PROBE_SAMPLES).any(|i| {
        let sample = &plain[i * stride..i * stride + PROBE_SAMPLE_LEN];
        z.compress_to_buffer(sample, scratch).is_ok_and(|n| n < PROBE_SAMPLE_LEN - PROBE_SAMPLE_LEN / 32)
    })
}

/// The name of a chunk of plaintext `plain`: a sealed name (with its keyed hash) under `key`
/// (an encrypted storage's), BLAKE3 without.
pub fn name_of(key: Option<&ChunkKey>, plain: &[u8]) -> ChunkName {
    match key {
        Some(k) => {
            let keyed = k.keyed_hash(plain);
            ChunkName { digest: sealed_name(k.id(), &keyed), keyed: Some(keyed) }
        }
        None => ChunkName { digest: Digest::of(plain), keyed: None },
    }
}

/// Reads and checks the header (not the payload's CRC).
pub fn peek_header(blob: &[u8]) -> Result<Header, FormatError> {
    if blob.len() < HEADER_LEN {
        return Err(err("header", 0, format!("{} bytes, shorter than the {HEADER_LEN}-byte header", blob.len())));
    }
    if blob[..8] != MAGIC {
        return Err(err("magic", 0, format!("{:02x?} is not a vmbackup chunk blob", &blob[..8])));
    }
    let (sealed, header_len) = match blob[8] {
        VERSION => (false, HEADER_LEN),
        SEALED_V2 => (true, SEALED_V2_HEADER_LEN),
        SEALED_VERSION => (true, SEALED_HEADER_LEN),
        v => {
            return Err(err(
                "version",
                8,
                format!("version {v} is not supported (this build reads {VERSION}, {SEALED_V2} and {SEALED_VERSION})"),
            ));
        }
    };
    let compression = match blob[9] {
        0 => Compression::None,
        1 => Compression::Zstd,
        c => return Err(err("compression", 9, format!("unknown compression {c}"))),
    };
    let sealing = if sealed {
        if blob.len() < header_len {
            return Err(err(
                "header",
                0,
                format!("{} bytes, shorter than the {header_len}-byte sealed header", blob.len()),
            ));
        }
        if blob[10] != CIPHER_AES_256_GCM {
            return Err(err("cipher", 10, format!("unknown cipher {}", blob[10])));
        }
        if blob[11] != 0 {
            return Err(err("reserved", 11, "reserved byte is not zero"));
        }
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&blob[24..24 + KEY_ID_LEN]);
        let mut nonce = [0u8; SEAL_NONCE_LEN];
        nonce.copy_from_slice(&blob[24 + KEY_ID_LEN..SEALED_V2_HEADER_LEN]);
        let keyed = (header_len == SEALED_HEADER_LEN)
            .then(|| Digest::from_slice(&blob[SEALED_V2_HEADER_LEN..SEALED_HEADER_LEN]))
            .transpose()
            .map_err(|e| err("keyed hash", SEALED_V2_HEADER_LEN, e.to_string()))?;
        Some(Sealing { key: KeyId(id), nonce, keyed })
    } else {
        if blob[10..12] != [0, 0] {
            return Err(err("reserved", 10, "reserved bytes are not zero"));
        }
        None
    };
    let plain_len = u32_at(blob, 12);
    let payload_len = u32_at(blob, 16);
    let crc = u32_at(blob, 20);
    let h = Header { compression, plain_len, payload_len, crc, sealed: sealing };
    let actual = blob.len() - h.len();
    if usize::try_from(payload_len).ok() != Some(actual) {
        return Err(err("payload length", 16, format!("header says {payload_len} bytes, {actual} follow")));
    }
    // What the payload holds before sealing.
    let inner = if sealed {
        payload_len.checked_sub(TAG_LEN_U32).ok_or_else(|| {
            err("payload length", 16, format!("{payload_len} bytes cannot hold the {TAG_LEN}-byte tag"))
        })?
    } else {
        payload_len
    };
    if compression == Compression::None && inner != plain_len {
        return Err(err(
            "plain length",
            12,
            format!("uncompressed payload of {inner} bytes but plain length {plain_len}"),
        ));
    }
    Ok(h)
}

/// The header and the CRC-checked payload of a blob whose plaintext is at most `max_plain`.
fn checked_payload(blob: &[u8], max_plain: usize) -> Result<(Header, usize, &[u8]), FormatError> {
    let h = peek_header(blob)?;
    let plain_len = usize::try_from(h.plain_len).unwrap_or(usize::MAX);
    if plain_len > max_plain {
        return Err(err("plain length", 12, format!("{plain_len} bytes exceeds the limit of {max_plain}")));
    }
    let payload = &blob[h.len()..];
    let crc = crc32c::crc32c(payload);
    if crc != h.crc {
        return Err(err("payload", h.len(), format!("CRC-32C {crc:08x} does not match the header's {:08x}", h.crc)));
    }
    Ok((h, plain_len, payload))
}

fn check_decoded_len(got: usize, plain_len: usize) -> Result<(), FormatError> {
    if got != plain_len {
        return Err(err("plain length", 12, format!("payload decodes to {got} bytes, header says {plain_len}")));
    }
    Ok(())
}

fn check_digest(plain: &[u8], expected: &Digest) -> Result<(), FormatError> {
    let actual = Digest::of(plain);
    if actual != *expected {
        return Err(FormatError::new(
            "chunk blob",
            "digest",
            None,
            format!("content hashes to {actual}, not {expected}"),
        ));
    }
    Ok(())
}

fn check_keyed(key: &ChunkKey, plain: &[u8], expected: &Digest) -> Result<(), FormatError> {
    let actual = key.keyed_hash(plain);
    if actual != *expected {
        return Err(FormatError::new(
            "chunk blob",
            "digest",
            None,
            format!("content keyed-hashes to {actual}, not {expected}"),
        ));
    }
    Ok(())
}

/// Checks that a version-3 header derives `expected`, the name the blob is stored under.
fn check_sealed_name(sealing: &Sealing, expected: &Digest) -> Result<(), FormatError> {
    match sealing.name() {
        Some(derived) if derived != *expected => Err(err(
            "keyed hash",
            SEALED_V2_HEADER_LEN,
            format!("the sealed header names chunk {derived}, not {expected}: the blob is not stored under its name"),
        )),
        _ => Ok(()),
    }
}

/// Checks a sealed blob's key and name and opens its payload into `scratch`; returns the opened length.
fn open_sealed(
    scratch: &mut Vec<u8>,
    blob: &[u8],
    sealing: &Sealing,
    key: &ChunkKey,
    expected: &Digest,
    payload: &[u8],
) -> Result<usize, FormatError> {
    if sealing.key != key.id() {
        return Err(err(
            "key id",
            HEADER_LEN,
            format!("the chunk is sealed with key {}, not with this storage's key {}", sealing.key, key.id()),
        ));
    }
    check_sealed_name(sealing, expected)?;
    scratch.clear();
    scratch.extend_from_slice(payload);
    let opened = match sealing.keyed {
        Some(_) => key.open_in_place(sealing.nonce, &sealed_aad(blob), scratch),
        None => key.open_in_place(sealing.nonce, &sealed_v2_aad(blob, expected), scratch),
    };
    let n = opened.ok_or_else(|| {
        err(
            "payload",
            SEALED_V2_HEADER_LEN,
            format!("the authentication tag does not match: the chunk is not {expected} as sealed"),
        )
    })?;
    Ok(n)
}

/// Decodes a plain blob into its plaintext, refusing a declared plaintext longer than
/// `max_plain` before allocating anything. A sealed blob needs a [`Decoder`] with its key.
pub fn decode(blob: &[u8], max_plain: usize) -> Result<Vec<u8>, FormatError> {
    let (h, plain_len, payload) = checked_payload(blob, max_plain)?;
    if let Some(sealing) = h.sealed {
        return Err(err(
            "key id",
            HEADER_LEN,
            format!("the chunk is sealed with key {}; no key was given", sealing.key),
        ));
    }
    let plain = match h.compression {
        Compression::None => payload.to_vec(),
        Compression::Zstd => zstd::bulk::decompress(payload, plain_len)
            .map_err(|e| err("payload", HEADER_LEN, format!("zstd frame does not decode to {plain_len} bytes: {e}")))?,
    };
    check_decoded_len(plain.len(), plain_len)?;
    Ok(plain)
}

/// Decodes a plain blob and checks its plaintext hashes to `expected` (the name it is
/// stored or sent under).
pub fn decode_and_verify(blob: &[u8], expected: &Digest, max_plain: usize) -> Result<Vec<u8>, FormatError> {
    let plain = decode(blob, max_plain)?;
    check_digest(&plain, expected)?;
    Ok(plain)
}

/// Decodes and checks chunk after chunk with one zstd context and one scratch buffer, so a
/// stream of chunks allocates nothing per chunk. A decoder with a key reads the sealed
/// blobs of that key only, and refuses plain ones (they would be data the key does not
/// vouch for); one without reads plain blobs only.
pub struct Decoder {
    zstd: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
    key: Option<Arc<ChunkKey>>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("scratch", &self.scratch.capacity())
            .field("key", &self.key.as_ref().map(|k| k.id()))
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder of plain blobs.
    pub fn new() -> Result<Self, FormatError> {
        Self::with_key(None)
    }

    /// A decoder of `key`'s sealed blobs, or of plain blobs without a key.
    pub fn with_key(key: Option<Arc<ChunkKey>>) -> Result<Self, FormatError> {
        let zstd = zstd::bulk::Decompressor::new().map_err(|e| err("compression", 9, format!("zstd: {e}")))?;
        Ok(Self { zstd, scratch: Vec::new(), key })
    }

    /// [`decode_and_verify`] into a caller's buffer (reused across chunks, or aligned for
    /// direct I/O): the plaintext must fit in `out`. Returns its length.
    pub fn decode_and_verify_into(
        &mut self,
        blob: &[u8],
        expected: &Digest,
        out: &mut [u8],
    ) -> Result<usize, FormatError> {
        let (h, plain_len, payload) = checked_payload(blob, out.len())?;
        let key = self.key.clone();
        let payload = match (h.sealed, key.as_deref()) {
            (None, None) => payload,
            (Some(sealing), Some(key)) => {
                let n = open_sealed(&mut self.scratch, blob, &sealing, key, expected, payload)?;
                &self.scratch[..n]
            }
            (Some(sealing), None) => {
                return Err(err(
                    "key id",
                    HEADER_LEN,
                    format!("the chunk is sealed with key {}; no key was given", sealing.key),
                ));
            }
            (None, Some(key)) => {
                return Err(err(
                    "version",
                    8,
                    format!("a plain chunk where every chunk is sealed with key {}: refused", key.id()),
                ));
            }
        };
        let got = match h.compression {
            Compression::None => {
                out[..plain_len].copy_from_slice(payload);
                plain_len
            }
            Compression::Zstd => self.zstd.decompress_to_buffer(payload, &mut out[..plain_len]).map_err(|e| {
                err("payload", h.len(), format!("zstd frame does not decode to {plain_len} bytes: {e}"))
            })?,
        };
        check_decoded_len(got, plain_len)?;
        match (h.sealed, key.as_deref()) {
            (Some(Sealing { keyed: Some(keyed), .. }), Some(key)) => check_keyed(key, &out[..plain_len], &keyed)?,
            (_, Some(key)) => check_keyed(key, &out[..plain_len], expected)?,
            (_, None) => check_digest(&out[..plain_len], expected)?,
        }
        Ok(plain_len)
    }

    /// [`Self::decode_and_verify_into`] into a new buffer.
    pub fn decode_and_verify(
        &mut self,
        blob: &[u8],
        expected: &Digest,
        max_plain: usize,
    ) -> Result<Vec<u8>, FormatError> {
        let plain_len = usize::try_from(peek_header(blob)?.plain_len).unwrap_or(usize::MAX);
        if plain_len > max_plain {
            return Err(err("plain length", 12, format!("{plain_len} bytes exceeds the limit of {max_plain}")));
        }
        let mut out = vec![0u8; plain_len];
        let n = self.decode_and_verify_into(blob, expected, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// How a store checks what it is sent or holds, keeping nothing: a plain blob must
    /// decode to at most `max_plain` bytes that hash to `expected`; a sealed one must be
    /// well framed with a matching CRC, a plain length within `max_plain` and (version 3) a
    /// header that derives `expected` (the rest needs the key, which the store never has).
    /// Says which it was.
    pub fn verify(&mut self, blob: &[u8], expected: &Digest, max_plain: usize) -> Result<Checked, FormatError> {
        let (h, plain_len, payload) = checked_payload(blob, max_plain)?;
        if let Some(sealing) = h.sealed {
            check_sealed_name(&sealing, expected)?;
            return Ok(if sealing.keyed.is_some() {
                Checked::Sealed(sealing.key)
            } else {
                Checked::SealedUnbound(sealing.key)
            });
        }
        match h.compression {
            Compression::None => check_digest(payload, expected)?,
            Compression::Zstd => {
                self.scratch.clear();
                self.scratch.reserve(plain_len);
                let got = self.zstd.decompress_to_buffer(payload, &mut self.scratch).map_err(|e| {
                    err("payload", HEADER_LEN, format!("zstd frame does not decode to {plain_len} bytes: {e}"))
                })?;
                check_decoded_len(got, plain_len)?;
                check_digest(&self.scratch[..got], expected)?;
            }
        }
        Ok(Checked::Plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 16 << 20;

    #[test]
    fn golden_uncompressed_blob() {
        let blob = encode(b"abc", 0).expect("encode");
        let mut want = Vec::new();
        want.extend_from_slice(b"VMBKCHNK"); // magic
        want.push(1); // version
        want.push(0); // compression: none
        want.extend_from_slice(&[0, 0]); // reserved
        want.extend_from_slice(&3u32.to_le_bytes()); // plain length
        want.extend_from_slice(&3u32.to_le_bytes()); // payload length
        want.extend_from_slice(&0x364b_3fb7u32.to_le_bytes()); // CRC-32C("abc")
        want.extend_from_slice(b"abc");
        assert_eq!(blob, want);
        assert_eq!(decode(&want, MAX).expect("decode frozen bytes"), b"abc");
    }

    #[test]
    fn decode_into_a_buffer_matches_decode_and_checks_everything() {
        let text = b"backup ".repeat(10_000);
        let random: Vec<u8> = (0..70_000u32).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2]).collect();
        for plain in [&text[..], &random[..]] {
            let blob = encode(plain, 1).expect("encode");
            let digest = Digest::of(plain);
            let mut out = vec![0u8; plain.len() + 10];
            // One encoder and one decoder serve many chunks, with the bytes of `encode`.
            let mut enc = Encoder::new(1).expect("encoder");
            assert_eq!(enc.encode(plain).expect("encode"), blob);
            assert_eq!(enc.encode(plain).expect("encode again"), blob);
            // The payload is the plain zstd frame of a one-off compression.
            if peek_header(&blob).expect("header").compression == Compression::Zstd {
                assert_eq!(&blob[HEADER_LEN..], zstd::bulk::compress(plain, 1).expect("zstd"));
            }
            let mut dec = Decoder::new().expect("decoder");
            let n = dec.decode_and_verify_into(&blob, &digest, &mut out).expect("decode into");
            assert_eq!(&out[..n], plain);
            dec.verify(&blob, &digest, plain.len()).expect("verify");
            // Too small a buffer (or limit) is refused before decoding.
            let mut small = vec![0u8; plain.len() - 1];
            let e = dec.decode_and_verify_into(&blob, &digest, &mut small).expect_err("too small");
            assert!(e.to_string().contains("exceeds the limit"), "{e}");
            let e = dec.verify(&blob, &digest, plain.len() - 1).expect_err("too large");
            assert!(e.to_string().contains("exceeds the limit"), "{e}");
            // Another digest is refused.
            let e = dec.decode_and_verify_into(&blob, &Digest::of(b"other"), &mut out).expect_err("digest");
            assert!(e.to_string().contains("hashes to"), "{e}");
            let e = dec.verify(&blob, &Digest::of(b"other"), plain.len()).expect_err("digest");
            assert!(e.to_string().contains("hashes to"), "{e}");
            // A flipped payload byte fails the CRC.
            let mut bad = blob.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            let e = dec.decode_and_verify_into(&bad, &digest, &mut out).expect_err("crc");
            assert!(e.to_string().contains("CRC-32C"), "{e}");
            let e = dec.verify(&bad, &digest, plain.len()).expect_err("crc");
            assert!(e.to_string().contains("CRC-32C"), "{e}");
        }
    }

    #[test]
    fn compressible_data_uses_zstd_and_random_data_does_not() {
        let text = b"backup ".repeat(10_000);
        let blob = encode(&text, 1).expect("encode");
        assert_eq!(peek_header(&blob).expect("header").compression, Compression::Zstd);
        assert!(blob.len() < text.len() / 10);
        assert_eq!(decode(&blob, MAX).expect("decode"), text);
        let random: Vec<u8> = (0u32..65536).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1]).collect();
        let blob = encode(&random, 1).expect("encode");
        let h = peek_header(&blob).expect("header");
        assert_eq!(blob.len(), HEADER_LEN + usize::try_from(h.payload_len).expect("fits"));
        assert_eq!(decode(&blob, MAX).expect("decode"), random);
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[3]
            })
            .collect()
    }

    #[test]
    fn a_long_chunk_is_compressed_when_any_probe_sample_shrinks_and_stored_as_is_otherwise() {
        const LEN: usize = 4 << 20;
        let mut enc = Encoder::new(1).expect("encoder");
        let random = noise(LEN, 7);
        let blob = enc.encode(&random).expect("encode");
        assert_eq!(blob, frame(u32::try_from(LEN).expect("fits"), Compression::None, &random));
        // Compressible only in its last eighth: the last sample finds it.
        let mut mixed = noise(LEN, 9);
        let tail = b"a text-like tail ".repeat(LEN / 8 / 17 + 1);
        mixed[LEN - LEN / 8..].copy_from_slice(&tail[..LEN / 8]);
        let blob = enc.encode(&mixed).expect("encode");
        assert_eq!(peek_header(&blob).expect("header").compression, Compression::Zstd);
        assert!(blob.len() < LEN - LEN / 10, "{} bytes", blob.len());
        assert_eq!(decode(&blob, LEN).expect("decode"), mixed);
        // The probe decides: text everywhere but under the samples is stored as is.
        let mut between = b"text between the samples ".repeat(LEN / 25 + 1);
        between.truncate(LEN);
        let stride = LEN / PROBE_SAMPLES;
        for i in 0..PROBE_SAMPLES {
            between[i * stride..i * stride + PROBE_SAMPLE_LEN].copy_from_slice(&noise(PROBE_SAMPLE_LEN, 11 + i as u64));
        }
        let blob = enc.encode(&between).expect("encode");
        assert_eq!(peek_header(&blob).expect("header").compression, Compression::None);
        // Short chunks are not probed: their samples would be most of them.
        let short = [noise(4096, 3), b"z".repeat(PROBE_MIN_LEN / 2)].concat();
        let blob = enc.encode(&short).expect("encode");
        assert_eq!(peek_header(&blob).expect("header").compression, Compression::Zstd);
    }

    #[test]
    fn every_malformation_is_refused_with_its_field() {
        let good = encode(&b"x".repeat(1000), 3).expect("encode");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..10].to_vec(), "header"),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "magic",
            ),
            (
                {
                    let mut b = good.clone();
                    b[8] = 4;
                    b
                },
                "version",
            ),
            (
                {
                    let mut b = good.clone();
                    b[9] = 7;
                    b
                },
                "compression",
            ),
            (
                {
                    let mut b = good.clone();
                    b[10] = 1;
                    b
                },
                "reserved",
            ),
            (good[..good.len() - 1].to_vec(), "payload length"),
            (
                {
                    let mut b = good.clone();
                    let n = b.len();
                    b[n - 1] ^= 0xff;
                    b
                },
                "payload",
            ),
            (
                {
                    let mut b = good.clone();
                    b[12..16].copy_from_slice(&999u32.to_le_bytes());
                    b
                },
                "payload",
            ),
        ];
        for (blob, field) in cases {
            let e = decode(&blob, MAX).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
        let e = decode(&good, 10).expect_err("over the limit");
        assert_eq!(e.field, "plain length");
    }

    fn hex(s: &str) -> Vec<u8> {
        crate::seal::hex_decode(s, "test").expect("hex")
    }

    #[test]
    fn golden_sealed_blob() {
        // Frozen, and computed by an independent implementation
        // (proto/golden/encryption_vectors.py): "abc" sealed under master key [7; 32] with
        // nonce 0..12.
        let key = Arc::new(ChunkKey::new(&[7u8; 32]));
        let name = name_of(Some(&key), b"abc");
        assert_eq!(name.digest, key.digest(b"abc"));
        let want = hex(
            "564d424b43484e4b0300010003000000130000000cdc36f225b5623c53f732fb0ef5278f2de3145a000102030405060708090a0b727a982cfe41669592b070715391dd4dbe0200b83a28bb9d89d1a8e55b7182458c5b973377af22cc5d68cf3d27871613758069",
        );
        let nonce: [u8; 12] = std::array::from_fn(|i| u8::try_from(i).expect("small"));
        let keyed = name.keyed.expect("a sealed name has its keyed hash");
        let ours = seal_frame(&key, nonce, &keyed, 3, Compression::None, b"abc").expect("seal");
        assert_eq!(ours, want);
        let h = peek_header(&want).expect("header");
        assert_eq!(h.sealed, Some(Sealing { key: key.id(), nonce, keyed: Some(keyed) }));
        assert_eq!(h.len(), SEALED_HEADER_LEN);
        let mut dec = Decoder::with_key(Some(key.clone())).expect("decoder");
        assert_eq!(dec.decode_and_verify(&want, &name.digest, MAX).expect("opens"), b"abc");
        // A store, without the key, checks the framing and the name's derivation, and says
        // it could not check more.
        assert_eq!(Decoder::new().expect("decoder").verify(&want, &name.digest, MAX), Ok(Checked::Sealed(key.id())));
    }

    #[test]
    fn golden_version_2_sealed_blob_is_still_read() {
        // Written by the first encrypting release: named by the keyed hash itself.
        let key = Arc::new(ChunkKey::new(&[7u8; 32]));
        let v2 = hex(
            "564d424b43484e4b0200010003000000130000004098020725b5623c53f732fb0ef5278f2de3145a000102030405060708090a0b8c5b97f0422b69a776be17ea952573ecfc01e2",
        );
        let keyed = key.keyed_hash(b"abc");
        let h = peek_header(&v2).expect("header");
        assert_eq!(h.len(), SEALED_V2_HEADER_LEN);
        let mut dec = Decoder::with_key(Some(key.clone())).expect("decoder");
        assert_eq!(dec.decode_and_verify(&v2, &keyed, MAX).expect("opens"), b"abc");
        let e = dec.decode_and_verify(&v2, &key.digest(b"abc"), MAX).expect_err("bound to its own name");
        assert!(e.message.contains("authentication tag"), "{e}");
        // A store cannot check a version-2 name, and says so.
        assert_eq!(Decoder::new().expect("decoder").verify(&v2, &keyed, MAX), Ok(Checked::SealedUnbound(key.id())));
    }

    #[test]
    fn a_store_refuses_a_sealed_blob_under_any_name_but_its_own() {
        let key = Arc::new(ChunkKey::new(&[5u8; 32]));
        let plain = b"a chunk another writer stores in clear".repeat(100);
        let mut enc = Encoder::with_key(1, Some(key.clone())).expect("encoder");
        let name = enc.name(&plain);
        let blob = enc.encode_named(&plain, &name).expect("seal");
        let mut store = Decoder::new().expect("decoder");
        assert_eq!(store.verify(&blob, &name.digest, MAX), Ok(Checked::Sealed(key.id())));
        // Under the plain chunk's BLAKE3 name (the planting a store must refuse), under the
        // bare keyed hash, or under another chunk's sealed name: refused, naming the field.
        for wrong in [Digest::of(&plain), key.keyed_hash(&plain), key.digest(b"other")] {
            let e = store.verify(&blob, &wrong, MAX).expect_err("not its name");
            assert_eq!(e.field, "keyed hash", "{e}");
            assert!(e.message.contains(&wrong.to_hex()), "{e}");
        }
        // A forged header (another keyed hash, CRC fixed) derives another name: refused by
        // the store under the old name, and by the tag under the new one.
        let mut forged = blob.clone();
        forged[SEALED_V2_HEADER_LEN] ^= 1;
        assert_eq!(store.verify(&forged, &name.digest, MAX).expect_err("forged").field, "keyed hash");
        let renamed = peek_header(&forged).expect("header").sealed.and_then(|s| s.name()).expect("derived name");
        let mut out = vec![0u8; plain.len()];
        let e = Decoder::with_key(Some(key)).expect("d").decode_and_verify_into(&forged, &renamed, &mut out);
        assert!(e.expect_err("tag").message.contains("authentication tag"));
    }

    #[test]
    fn encoding_into_a_reused_buffer_gives_the_same_blobs() {
        let text = b"reused buffer ".repeat(30_000);
        let random: Vec<u8> = (0..400_000u32).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2]).collect();
        let key = Arc::new(ChunkKey::new(&[7u8; 32]));
        let mut plain_enc = Encoder::new(1).expect("encoder");
        let mut sealing = Encoder::with_key(1, Some(key.clone())).expect("encoder");
        // One buffer for all, holding the last blob's bytes (larger or smaller) each time.
        let mut out = vec![0xAA; 3 << 20];
        for plain in [&random[..], &text[..], &random[..], b"x"] {
            let name = plain_enc.name(plain);
            plain_enc.encode_named_into(plain, &name, &mut out).expect("encode into");
            assert_eq!(out, encode(plain, 1).expect("encode"), "{} bytes", plain.len());
            let name = sealing.name(plain);
            sealing.encode_named_into(plain, &name, &mut out).expect("seal into");
            let mut back = vec![0u8; plain.len()];
            let mut dec = Decoder::with_key(Some(key.clone())).expect("decoder");
            let n = dec.decode_and_verify_into(&out, &name.digest, &mut back).expect("opens");
            assert_eq!(&back[..n], plain);
        }
    }

    #[test]
    fn sealed_blobs_open_only_with_their_key_and_name() {
        let key = Arc::new(ChunkKey::new(&[1u8; 32]));
        let text = b"secret pattern ".repeat(5000);
        let random: Vec<u8> = (0..70_000u32).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2]).collect();
        for plain in [&text[..], &random[..]] {
            let mut enc = Encoder::with_key(1, Some(key.clone())).expect("encoder");
            let chunk = enc.name(plain);
            let name = chunk.digest;
            assert_eq!(name, key.digest(plain));
            assert!(enc.encode(plain).is_err(), "a sealed blob needs its name");
            let unkeyed = ChunkName { digest: name, keyed: None };
            assert_eq!(enc.encode_named(plain, &unkeyed).expect_err("no keyed hash").field, "keyed hash");
            let blob = enc.encode_named(plain, &chunk).expect("seal");
            assert_ne!(enc.encode_named(plain, &chunk).expect("again"), blob, "a fresh nonce each time");
            assert!(!blob.windows(15).any(|w| w == b"secret pattern "), "no plaintext in a sealed blob");
            let mut out = vec![0u8; plain.len()];
            let mut dec = Decoder::with_key(Some(key.clone())).expect("decoder");
            let n = dec.decode_and_verify_into(&blob, &name, &mut out).expect("opens");
            assert_eq!(&out[..n], plain);
            // Another key: named as such, not taken for damage.
            let other = Arc::new(ChunkKey::new(&[2u8; 32]));
            let e = Decoder::with_key(Some(other)).expect("d").decode_and_verify_into(&blob, &name, &mut out);
            assert_eq!(e.expect_err("other key").field, "key id");
            // No key at all.
            let e = Decoder::new().expect("d").decode_and_verify_into(&blob, &name, &mut out);
            assert_eq!(e.expect_err("no key").field, "key id");
            assert_eq!(decode(&blob, MAX).expect_err("no key").field, "key id");
            // Stored under another name: the header names its own.
            let e = dec.decode_and_verify_into(&blob, &key.digest(b"x"), &mut out).expect_err("moved");
            assert_eq!(e.field, "keyed hash", "{e}");
            // A flipped ciphertext byte with a recomputed CRC passes the store and fails the tag.
            let mut bad = blob.clone();
            bad[SEALED_HEADER_LEN + 3] ^= 1;
            let crc = crc32c::crc32c(&bad[SEALED_HEADER_LEN..]);
            bad[20..24].copy_from_slice(&crc.to_le_bytes());
            assert!(matches!(Decoder::new().expect("d").verify(&bad, &name, MAX), Ok(Checked::Sealed(_))));
            let e = dec.decode_and_verify_into(&bad, &name, &mut out).expect_err("flipped");
            assert!(e.message.contains("authentication tag"), "{e}");
            // Without the CRC fixed, the store catches it itself.
            bad[20] ^= 1;
            assert_eq!(Decoder::new().expect("d").verify(&bad, &name, MAX).expect_err("crc").field, "payload");
            // A changed header field (the plain length) fails the tag even when it parses.
            if peek_header(&blob).expect("header").compression == Compression::Zstd {
                let mut b = blob.clone();
                b[12] ^= 1;
                let mut roomy = vec![0u8; plain.len() + 2];
                let e = dec.decode_and_verify_into(&b, &name, &mut roomy).expect_err("header");
                assert!(e.message.contains("authentication tag"), "{e}");
            }
            // A plain chunk is refused by a keyed decoder.
            let plain_blob = encode(plain, 1).expect("plain");
            let e = dec.decode_and_verify_into(&plain_blob, &Digest::of(plain), &mut out).expect_err("plain");
            assert_eq!(e.field, "version");
        }
    }

    #[test]
    fn sealed_header_malformations() {
        let key = Arc::new(ChunkKey::new(&[3u8; 32]));
        let mut enc = Encoder::with_key(0, Some(key.clone())).expect("encoder");
        let name = enc.name(b"0123456789");
        let good = enc.encode_named(b"0123456789", &name).expect("seal");
        let with = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            b
        };
        for (blob, field) in [
            (good[..40].to_vec(), "header"),
            (good[..SEALED_HEADER_LEN - 1].to_vec(), "header"),
            (with(10, 9), "cipher"),
            (with(11, 1), "reserved"),
            (with(12, 11), "plain length"),
            (with(16, 5), "payload length"),
        ] {
            assert_eq!(peek_header(&blob).expect_err(field).field, field);
        }
        // A payload too short for the tag.
        let mut short = good[..SEALED_HEADER_LEN + 4].to_vec();
        short[16..20].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(peek_header(&short).expect_err("tag").field, "payload length");
    }

    #[test]
    fn verify_names_both_digests() {
        let blob = encode(b"real", 0).expect("encode");
        let claimed = Digest::of(b"claimed");
        let e = decode_and_verify(&blob, &claimed, MAX).expect_err("poisoned");
        assert!(e.message.contains(&claimed.to_hex()) && e.message.contains(&Digest::of(b"real").to_hex()), "{e}");
        assert_eq!(decode_and_verify(&blob, &Digest::of(b"real"), MAX).expect("ok"), b"real");
    }
}
