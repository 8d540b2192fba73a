//! Volume index: the chunk list of one volume backup. Fixed-size chunks, so the chunk at
//! guest offset `o` is entry `o / chunk_size`.
//!
//! ```text
//! offset size  field
//!      0    8  magic           b"VMBKVIDX" (vmbackup volume index; do not change)
//!      8    1  format version  1
//!      9    1  volume format   0 = raw, 1 = qcow2 (format of the source volume)
//!     10    2  reserved        0
//!     12    4  chunk size      u32 LE, power of two, 64 KiB ..= 16 MiB
//!     16    8  virtual size    u64 LE, bytes
//!     24    8  chunk count     u64 LE, = ceil(virtual size / chunk size)
//!     32   16  volume uuid     raw 16 bytes
//!     48 32*n  digests         one per chunk; all-zero = zero/unallocated chunk, not stored
//!   48+32n 32  trailer         BLAKE3-256 of every byte before it
//! ```

use crate::digest::{DIGEST_LEN, Digest};
use crate::format_error::FormatError;

/// Magic bytes. Do not change: every stored index carries them.
pub const MAGIC: [u8; 8] = *b"VMBKVIDX";
/// Format version written by this build.
pub const VERSION: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 48;
/// Smallest chunk size.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Most chunks an index may have: the `max_chunks` every reader passes to
/// [`VolumeIndex::decode`]. The chunk count is read from the header before the digests are
/// allocated, so this bounds the memory a decoded index can take (32 bytes a chunk, 512 MiB
/// at most) whatever a peer or a damaged file claims. 16 Mi chunks are 64 TiB of 4 MiB
/// chunks. Lowering it makes stored indexes of larger volumes unreadable.
pub const MAX_CHUNKS: u64 = 16 << 20;
/// Most bytes an encoded index may have: header, [`MAX_CHUNKS`] digests and the trailer.
/// Whoever receives an index refuses a longer one before reading it.
pub const MAX_ENCODED_LEN: u64 = HEADER_LEN as u64 + (MAX_CHUNKS + 1) * DIGEST_LEN as u64;

mod sparse;
pub use sparse::{Decoder, Pieces, SparseIndex};

const _: () = assert!(HEADER_LEN == 8 + 1 + 1 + 2 + 4 + 8 + 8 + 16);

/// Format of the backed-up volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeFormat {
    /// Raw file or block device.
    Raw = 0,
    /// qcow2 image.
    Qcow2 = 1,
}

impl VolumeFormat {
    /// `raw` or `qcow2`.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeFormat::Raw => "raw",
            VolumeFormat::Qcow2 => "qcow2",
        }
    }
}

/// A decoded volume index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeIndex {
    /// Uuid of the volume.
    pub volume_uuid: [u8; 16],
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Format of the source volume.
    pub format: VolumeFormat,
    /// One digest per chunk ([`Digest::ZERO_CHUNK`] for zero chunks).
    pub digests: Vec<Digest>,
}

fn err(field: &'static str, offset: usize, message: impl Into<String>) -> FormatError {
    FormatError::new("volume index", field, Some(offset), message)
}

/// Checks a chunk size.
pub fn check_chunk_size(size: u32) -> Result<(), FormatError> {
    if !size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        return Err(err(
            "chunk size",
            12,
            format!("{size} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"),
        ));
    }
    Ok(())
}

/// Chunks needed to cover `virtual_size` bytes.
pub fn chunk_count(virtual_size: u64, chunk_size: u32) -> u64 {
    virtual_size.div_ceil(u64::from(chunk_size.max(1)))
}

impl VolumeIndex {
    /// An index of `virtual_size` bytes with every chunk zero.
    pub fn new(
        volume_uuid: [u8; 16],
        virtual_size: u64,
        chunk_size: u32,
        format: VolumeFormat,
    ) -> Result<Self, FormatError> {
        check_chunk_size(chunk_size)?;
        let n = usize::try_from(chunk_count(virtual_size, chunk_size))
            .map_err(|_| err("chunk count", 24, "does not fit in memory"))?;
        Ok(Self { volume_uuid, virtual_size, chunk_size, format, digests: vec![Digest::ZERO_CHUNK; n] })
    }

    /// Guest byte range `(offset, len)` of chunk `i`; the last chunk may be short.
    pub fn chunk_range(&self, i: usize) -> (u64, u64) {
        let cs = u64::from(self.chunk_size);
        let offset = u64::try_from(i).unwrap_or(u64::MAX).saturating_mul(cs);
        (offset, cs.min(self.virtual_size.saturating_sub(offset)))
    }

    /// Digests of stored (non-zero) chunks, with repeats.
    pub fn referenced(&self) -> impl Iterator<Item = &Digest> {
        self.digests.iter().filter(|d| !d.is_zero_chunk())
    }

    /// Encodes the index (with its trailer).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + (self.digests.len() + 1) * DIGEST_LEN);
        let count = u64::try_from(self.digests.len()).unwrap_or(u64::MAX);
        out.extend_from_slice(&header_bytes(&self.volume_uuid, self.virtual_size, self.chunk_size, self.format, count));
        for d in &self.digests {
            out.extend_from_slice(&d.0);
        }
        let trailer = blake3::hash(&out);
        out.extend_from_slice(trailer.as_bytes());
        out
    }

    /// Decodes an index, refusing one of more than `max_chunks` chunks before allocating.
    pub fn decode(bytes: &[u8], max_chunks: u64) -> Result<Self, FormatError> {
        let c = check(bytes, max_chunks)?;
        let digests = digest_slots(bytes, c.body_len).collect();
        Ok(Self {
            volume_uuid: c.volume_uuid,
            virtual_size: c.virtual_size,
            chunk_size: c.chunk_size,
            format: c.format,
            digests,
        })
    }
}

/// The 48 header bytes of an index.
fn header_bytes(
    volume_uuid: &[u8; 16],
    virtual_size: u64,
    chunk_size: u32,
    format: VolumeFormat,
    count: u64,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8] = VERSION;
    h[9] = format as u8;
    // 10..12 reserved, zero.
    h[12..16].copy_from_slice(&chunk_size.to_le_bytes());
    h[16..24].copy_from_slice(&virtual_size.to_le_bytes());
    h[24..32].copy_from_slice(&count.to_le_bytes());
    h[32..48].copy_from_slice(volume_uuid);
    h
}

/// What a checked index says besides its digests.
#[derive(Debug)]
struct Checked {
    volume_uuid: [u8; 16],
    virtual_size: u64,
    chunk_size: u32,
    format: VolumeFormat,
    /// Header and digests: where the trailer starts.
    body_len: usize,
}

/// Checks the 48 header bytes (`header` is at least that long), refusing an index of more
/// than `max_chunks` chunks. Returns what it says and the index's whole encoded length.
fn parse_header(header: &[u8], max_chunks: u64) -> Result<(Checked, usize), FormatError> {
    if header[..8] != MAGIC {
        return Err(err("magic", 0, format!("{:02x?} is not a vmbackup volume index", &header[..8])));
    }
    if header[8] != VERSION {
        return Err(err("version", 8, format!("version {} is not supported (this build reads {VERSION})", header[8])));
    }
    let format = match header[9] {
        0 => VolumeFormat::Raw,
        1 => VolumeFormat::Qcow2,
        f => return Err(err("volume format", 9, format!("unknown volume format {f}"))),
    };
    if header[10..12] != [0, 0] {
        return Err(err("reserved", 10, "reserved bytes are not zero"));
    }
    let le64 = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(a)
    };
    let mut cs = [0u8; 4];
    cs.copy_from_slice(&header[12..16]);
    let chunk_size = u32::from_le_bytes(cs);
    check_chunk_size(chunk_size)?;
    let virtual_size = le64(16);
    let count = le64(24);
    if count != chunk_count(virtual_size, chunk_size) {
        return Err(err(
            "chunk count",
            24,
            format!(
                "{count} chunks, but {virtual_size} bytes in {chunk_size}-byte chunks need {}",
                chunk_count(virtual_size, chunk_size)
            ),
        ));
    }
    if count > max_chunks {
        return Err(err("chunk count", 24, format!("{count} chunks exceeds the limit of {max_chunks}")));
    }
    let n = usize::try_from(count).map_err(|_| err("chunk count", 24, "does not fit in memory"))?;
    let body_len = n
        .checked_mul(DIGEST_LEN)
        .and_then(|b| b.checked_add(HEADER_LEN))
        .ok_or_else(|| err("chunk count", 24, "does not fit in memory"))?;
    let total = body_len.checked_add(DIGEST_LEN).ok_or_else(|| err("chunk count", 24, "does not fit in memory"))?;
    let mut volume_uuid = [0u8; 16];
    volume_uuid.copy_from_slice(&header[32..48]);
    Ok((Checked { volume_uuid, virtual_size, chunk_size, format, body_len }, total))
}

/// Checks every byte of an encoded index (header, length, trailer), refusing one of more
/// than `max_chunks` chunks before anything is allocated.
fn check(bytes: &[u8], max_chunks: u64) -> Result<Checked, FormatError> {
    if bytes.len() < HEADER_LEN + DIGEST_LEN {
        return Err(err("header", 0, format!("{} bytes, shorter than header and trailer", bytes.len())));
    }
    let (c, total) = parse_header(bytes, max_chunks)?;
    if bytes.len() != total {
        return Err(err("length", 0, format!("{} bytes, expected {total} for its chunk count", bytes.len())));
    }
    if blake3::hash(&bytes[..c.body_len]).as_bytes()[..] != bytes[c.body_len..] {
        return Err(err("trailer", c.body_len, "BLAKE3 of the index does not match its trailer"));
    }
    Ok(c)
}

/// The digests of a checked index, one per chunk.
fn digest_slots(bytes: &[u8], body_len: usize) -> impl Iterator<Item = Digest> + '_ {
    bytes[HEADER_LEN..body_len].chunks_exact(DIGEST_LEN).map(|c| Digest::from_slice(c).unwrap_or(Digest::ZERO_CHUNK))
}

/// BLAKE3 of an encoded index, hex: the name a manifest gives it.
pub fn index_digest(encoded: &[u8]) -> Digest {
    Digest::of(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VolumeIndex {
        let mut ix = VolumeIndex::new([7; 16], (3 << 16) + 5, 64 << 10, VolumeFormat::Qcow2).expect("index");
        ix.digests[1] = Digest::of(b"one");
        ix.digests[3] = Digest::of(b"tail");
        ix
    }

    #[test]
    fn round_trip_and_ranges() {
        let ix = sample();
        assert_eq!(ix.digests.len(), 4);
        assert_eq!(ix.chunk_range(3), (3 << 16, 5));
        assert_eq!(ix.referenced().count(), 2);
        let bytes = ix.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 5 * 32);
        assert_eq!(VolumeIndex::decode(&bytes, 1000).expect("decode"), ix);
    }

    #[test]
    fn golden_header() {
        let bytes = VolumeIndex::new([0xab; 16], 65536, 65536, VolumeFormat::Raw).expect("index").encode();
        let mut want = Vec::new();
        want.extend_from_slice(b"VMBKVIDX"); // magic
        want.push(1); // version
        want.push(0); // raw
        want.extend_from_slice(&[0, 0]); // reserved
        want.extend_from_slice(&65536u32.to_le_bytes()); // chunk size
        want.extend_from_slice(&65536u64.to_le_bytes()); // virtual size
        want.extend_from_slice(&1u64.to_le_bytes()); // chunk count
        want.extend_from_slice(&[0xab; 16]); // volume uuid
        want.extend_from_slice(&[0; 32]); // the one chunk: zero
        assert_eq!(&bytes[..want.len()], &want[..]);
        assert_eq!(&bytes[want.len()..], blake3::hash(&want).as_bytes());
    }

    #[test]
    fn malformed_indexes_are_refused() {
        let good = sample().encode();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..40].to_vec(), "header"),
            (
                {
                    let mut b = good.clone();
                    b[1] = 0;
                    b
                },
                "magic",
            ),
            (
                {
                    let mut b = good.clone();
                    b[8] = 9;
                    b
                },
                "version",
            ),
            (
                {
                    let mut b = good.clone();
                    b[9] = 9;
                    b
                },
                "volume format",
            ),
            (
                {
                    let mut b = good.clone();
                    b[12..16].copy_from_slice(&1000u32.to_le_bytes());
                    b
                },
                "chunk size",
            ),
            (
                {
                    let mut b = good.clone();
                    b[24..32].copy_from_slice(&9u64.to_le_bytes());
                    b
                },
                "chunk count",
            ),
            (good[..good.len() - 32].to_vec(), "length"),
            (
                {
                    let mut b = good.clone();
                    b[60] ^= 1;
                    b
                },
                "trailer",
            ),
        ];
        for (bytes, field) in cases {
            assert_eq!(VolumeIndex::decode(&bytes, 1000).expect_err(field).field, field);
        }
        assert_eq!(VolumeIndex::decode(&good, 3).expect_err("limit").field, "chunk count");
    }
}
