//! Chunk blob: how one chunk is stored and sent. Pure `&[u8] -> Vec<u8>`.
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
//! The encoder keeps zstd only when it is strictly smaller than the plaintext. The chunk's
//! name (its [`Digest`]) is BLAKE3 of the plaintext, so a decoded blob can always be checked
//! against the name it is stored under ([`decode_and_verify`]).

use crate::digest::Digest;
use crate::format_error::FormatError;

/// Magic bytes at offset 0. Do not change: every stored chunk carries them.
pub const MAGIC: [u8; 8] = *b"VMBKCHNK";
/// Format version written by this build.
pub const VERSION: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 24;

const _: () = assert!(HEADER_LEN == 8 + 1 + 1 + 2 + 4 + 4 + 4);

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
}

fn err(field: &'static str, offset: usize, message: impl Into<String>) -> FormatError {
    FormatError::new("chunk blob", field, Some(offset), message)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Encodes a chunk; `zstd_level` 0 stores it uncompressed. Chunks are at most 16 MiB, so
/// lengths fit in u32; a larger input is refused. One-off use; a stream of chunks is
/// cheaper through one [`Encoder`].
pub fn encode(plain: &[u8], zstd_level: i32) -> Result<Vec<u8>, FormatError> {
    Encoder::new(zstd_level)?.encode(plain)
}

/// The blob bytes of a payload.
fn frame(plain_len: u32, compression: Compression, payload: &[u8]) -> Vec<u8> {
    let payload_len = u32::try_from(payload.len()).unwrap_or(plain_len);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(compression as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Encodes chunk after chunk with one zstd context and one scratch buffer: a context per
/// chunk would allocate and set up its tables every time. The bytes are the same as
/// [`encode`]'s.
pub struct Encoder {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("compresses", &self.zstd.is_some()).finish_non_exhaustive()
    }
}

impl Encoder {
    /// An encoder at `zstd_level` (0: store chunks uncompressed).
    pub fn new(zstd_level: i32) -> Result<Self, FormatError> {
        let zstd = if zstd_level == 0 {
            None
        } else {
            Some(
                zstd::bulk::Compressor::new(zstd_level)
                    .map_err(|e| err("compression", 9, format!("zstd level {zstd_level}: {e}")))?,
            )
        };
        Ok(Self { zstd, scratch: Vec::new() })
    }

    /// Encodes one chunk: compressed when that makes it smaller, stored as is otherwise.
    pub fn encode(&mut self, plain: &[u8]) -> Result<Vec<u8>, FormatError> {
        let plain_len = u32::try_from(plain.len())
            .map_err(|_| err("plain length", 12, format!("{} bytes does not fit a chunk", plain.len())))?;
        let mut compressed = None;
        if let Some(z) = &mut self.zstd {
            self.scratch.clear();
            self.scratch.reserve(zstd::zstd_safe::compress_bound(plain.len()));
            compressed = z.compress_to_buffer(plain, &mut self.scratch).ok().filter(|&n| n < plain.len());
        }
        Ok(match compressed {
            Some(n) => frame(plain_len, Compression::Zstd, &self.scratch[..n]),
            None => frame(plain_len, Compression::None, plain),
        })
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
    if blob[8] != VERSION {
        return Err(err("version", 8, format!("version {} is not supported (this build reads {VERSION})", blob[8])));
    }
    let compression = match blob[9] {
        0 => Compression::None,
        1 => Compression::Zstd,
        c => return Err(err("compression", 9, format!("unknown compression {c}"))),
    };
    if blob[10..12] != [0, 0] {
        return Err(err("reserved", 10, "reserved bytes are not zero"));
    }
    let plain_len = u32_at(blob, 12);
    let payload_len = u32_at(blob, 16);
    let crc = u32_at(blob, 20);
    let actual = blob.len() - HEADER_LEN;
    if usize::try_from(payload_len).ok() != Some(actual) {
        return Err(err("payload length", 16, format!("header says {payload_len} bytes, {actual} follow")));
    }
    if compression == Compression::None && payload_len != plain_len {
        return Err(err(
            "plain length",
            12,
            format!("uncompressed payload of {payload_len} bytes but plain length {plain_len}"),
        ));
    }
    Ok(Header { compression, plain_len, payload_len, crc })
}

/// The header and the CRC-checked payload of a blob whose plaintext is at most `max_plain`.
fn checked_payload(blob: &[u8], max_plain: usize) -> Result<(Header, usize, &[u8]), FormatError> {
    let h = peek_header(blob)?;
    let plain_len = usize::try_from(h.plain_len).unwrap_or(usize::MAX);
    if plain_len > max_plain {
        return Err(err("plain length", 12, format!("{plain_len} bytes exceeds the limit of {max_plain}")));
    }
    let payload = &blob[HEADER_LEN..];
    let crc = crc32c::crc32c(payload);
    if crc != h.crc {
        return Err(err("payload", HEADER_LEN, format!("CRC-32C {crc:08x} does not match the header's {:08x}", h.crc)));
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

/// Decodes a blob into its plaintext, refusing a declared plaintext longer than `max_plain`
/// before allocating anything.
pub fn decode(blob: &[u8], max_plain: usize) -> Result<Vec<u8>, FormatError> {
    let (h, plain_len, payload) = checked_payload(blob, max_plain)?;
    let plain = match h.compression {
        Compression::None => payload.to_vec(),
        Compression::Zstd => zstd::bulk::decompress(payload, plain_len)
            .map_err(|e| err("payload", HEADER_LEN, format!("zstd frame does not decode to {plain_len} bytes: {e}")))?,
    };
    check_decoded_len(plain.len(), plain_len)?;
    Ok(plain)
}

/// Decodes a blob and checks its plaintext hashes to `expected` (the name it is stored or
/// sent under).
pub fn decode_and_verify(blob: &[u8], expected: &Digest, max_plain: usize) -> Result<Vec<u8>, FormatError> {
    let plain = decode(blob, max_plain)?;
    check_digest(&plain, expected)?;
    Ok(plain)
}

/// Decodes and checks chunk after chunk with one zstd context (and, for [`Decoder::verify`],
/// one scratch buffer), so a stream of chunks allocates nothing per chunk.
pub struct Decoder {
    zstd: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").field("scratch", &self.scratch.capacity()).finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder.
    pub fn new() -> Result<Self, FormatError> {
        let zstd = zstd::bulk::Decompressor::new().map_err(|e| err("compression", 9, format!("zstd: {e}")))?;
        Ok(Self { zstd, scratch: Vec::new() })
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
        let got = match h.compression {
            Compression::None => {
                out[..plain_len].copy_from_slice(payload);
                plain_len
            }
            Compression::Zstd => self.zstd.decompress_to_buffer(payload, &mut out[..plain_len]).map_err(|e| {
                err("payload", HEADER_LEN, format!("zstd frame does not decode to {plain_len} bytes: {e}"))
            })?,
        };
        check_decoded_len(got, plain_len)?;
        check_digest(&out[..plain_len], expected)?;
        Ok(plain_len)
    }

    /// Checks that a blob decodes to at most `max_plain` bytes that hash to `expected`,
    /// keeping nothing: how a store checks what it is sent or holds.
    pub fn verify(&mut self, blob: &[u8], expected: &Digest, max_plain: usize) -> Result<(), FormatError> {
        let (h, plain_len, payload) = checked_payload(blob, max_plain)?;
        match h.compression {
            Compression::None => check_digest(payload, expected),
            Compression::Zstd => {
                self.scratch.clear();
                self.scratch.reserve(plain_len);
                let got = self.zstd.decompress_to_buffer(payload, &mut self.scratch).map_err(|e| {
                    err("payload", HEADER_LEN, format!("zstd frame does not decode to {plain_len} bytes: {e}"))
                })?;
                check_decoded_len(got, plain_len)?;
                check_digest(&self.scratch[..got], expected)
            }
        }
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
                    b[8] = 2;
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

    #[test]
    fn verify_names_both_digests() {
        let blob = encode(b"real", 0).expect("encode");
        let claimed = Digest::of(b"claimed");
        let e = decode_and_verify(&blob, &claimed, MAX).expect_err("poisoned");
        assert!(e.message.contains(&claimed.to_hex()) && e.message.contains(&Digest::of(b"real").to_hex()), "{e}");
        assert_eq!(decode_and_verify(&blob, &Digest::of(b"real"), MAX).expect("ok"), b"real");
    }
}
