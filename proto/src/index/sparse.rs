//! A volume index held sparsely: the digest of every chunk that is not zero, and nothing for
//! the zero ones. A backup of a 4 TiB volume holding a few GiB needs memory for its few
//! thousand data chunks, not for its million chunk slots. The encoding is the same v1 bytes
//! as [`VolumeIndex::encode`] (zero digests for the gaps), produced in pieces of a chosen
//! size so the whole encoded index never has to be in memory either.

use std::sync::Arc;

use super::{
    Checked, DIGEST_LEN, FormatError, HEADER_LEN, VolumeFormat, VolumeIndex, check, chunk_count, digest_slots, err,
    parse_header,
};
use crate::Digest;

/// A volume index of which only the non-zero chunks are held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseIndex {
    /// Uuid of the volume.
    pub volume_uuid: [u8; 16],
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Format of the source volume.
    pub format: VolumeFormat,
    /// `(chunk, digest)` of every non-zero chunk, by ascending chunk; every other chunk is
    /// zero. [`SparseIndex::pieces`] relies on the order.
    pub entries: Vec<(u64, Digest)>,
}

impl SparseIndex {
    /// The non-zero chunks of a dense index.
    pub fn from_dense(ix: &VolumeIndex) -> Self {
        let entries = (0u64..).zip(&ix.digests).filter(|(_, d)| !d.is_zero_chunk()).map(|(i, d)| (i, *d)).collect();
        Self {
            volume_uuid: ix.volume_uuid,
            virtual_size: ix.virtual_size,
            chunk_size: ix.chunk_size,
            format: ix.format,
            entries,
        }
    }

    /// Decodes and checks an encoded index as [`VolumeIndex::decode`] does, keeping only
    /// the non-zero chunks.
    pub fn decode(bytes: &[u8], max_chunks: u64) -> Result<Self, FormatError> {
        let c = check(bytes, max_chunks)?;
        let entries = (0u64..).zip(digest_slots(bytes, c.body_len)).filter(|(_, d)| !d.is_zero_chunk()).collect();
        Ok(Self {
            volume_uuid: c.volume_uuid,
            virtual_size: c.virtual_size,
            chunk_size: c.chunk_size,
            format: c.format,
            entries,
        })
    }

    /// Digests of stored (non-zero) chunks, with repeats.
    pub fn referenced(&self) -> impl Iterator<Item = &Digest> {
        self.entries.iter().map(|(_, d)| d)
    }

    /// Guest byte range `(offset, len)` of chunk `i`; the last chunk may be short.
    pub fn chunk_range(&self, i: u64) -> (u64, u64) {
        let cs = u64::from(self.chunk_size);
        let offset = i.saturating_mul(cs);
        (offset, cs.min(self.virtual_size.saturating_sub(offset)))
    }

    /// Chunks the index covers, zero ones included.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.virtual_size, self.chunk_size)
    }

    /// Bytes of the encoded index.
    pub fn encoded_len(&self) -> u64 {
        HEADER_LEN as u64 + (self.chunk_count() + 1) * DIGEST_LEN as u64
    }

    /// The encoded index (the bytes [`VolumeIndex::encode`] gives) in pieces of
    /// `piece_len` bytes (the last may be shorter), each made when it is asked for.
    pub fn pieces(self: Arc<Self>, piece_len: usize) -> Pieces {
        let header =
            super::header_bytes(&self.volume_uuid, self.virtual_size, self.chunk_size, self.format, self.chunk_count());
        Pieces {
            total: self.encoded_len(),
            body: self.encoded_len() - DIGEST_LEN as u64,
            index: self,
            header,
            piece_len: len64(piece_len.max(1)),
            pos: 0,
            next_entry: 0,
            hasher: blake3::Hasher::new(),
            trailer: None,
        }
    }
}

/// The encoded bytes of a [`SparseIndex`], piece by piece; see [`SparseIndex::pieces`].
#[derive(Debug)]
pub struct Pieces {
    index: Arc<SparseIndex>,
    header: [u8; HEADER_LEN],
    piece_len: u64,
    /// Bytes of the whole encoding, and of header and digests (where the trailer starts).
    total: u64,
    body: u64,
    /// Where the next piece starts.
    pos: u64,
    /// First entry whose digest has not been written in full.
    next_entry: usize,
    /// BLAKE3 of the body so far; the trailer once the body is done.
    hasher: blake3::Hasher,
    trailer: Option<[u8; DIGEST_LEN]>,
}

/// Copies the part of `src` (which sits at byte `at` of the encoding) that falls in
/// `out` (which sits at byte `start`).
fn overlay(out: &mut [u8], start: u64, src: &[u8], at: u64) {
    let end = start + len64(out.len());
    let (from, to) = (at.max(start), at.saturating_add(len64(src.len())).min(end));
    if from < to {
        let (o, s, n) = (us(from - start), us(from - at), us(to - from));
        out[o..o + n].copy_from_slice(&src[s..s + n]);
    }
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn us(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl Iterator for Pieces {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.pos >= self.total {
            return None;
        }
        let start = self.pos;
        let end = (start + self.piece_len).min(self.total);
        let mut out = vec![0u8; us(end - start)];
        overlay(&mut out, start, &self.header, 0);
        let body_end = end.min(self.body);
        while let Some(&(chunk, d)) = self.index.entries.get(self.next_entry) {
            // An entry past the last chunk (entries are public) is never written.
            let at = chunk.saturating_mul(DIGEST_LEN as u64).saturating_add(HEADER_LEN as u64);
            if at >= body_end {
                break;
            }
            overlay(&mut out, start, &d.0, at);
            if at + DIGEST_LEN as u64 > end {
                break; // the rest of this digest belongs to the next piece
            }
            self.next_entry += 1;
        }
        if start < body_end {
            self.hasher.update(&out[..us(body_end - start)]);
        }
        if end > self.body {
            let trailer = *self.trailer.get_or_insert_with(|| *self.hasher.finalize().as_bytes());
            overlay(&mut out, start, &trailer, self.body);
        }
        self.pos = end;
        Some(out)
    }
}

/// Decodes an encoded index from its pieces as they arrive, keeping only the non-zero
/// chunks, with every check [`SparseIndex::decode`] makes: the header as soon as its 48
/// bytes are in (so a bad one is refused before the rest is read), the length, and the
/// trailer at [`Decoder::finish`]. Memory is the entries, whatever the index's size.
#[derive(Debug)]
pub struct Decoder {
    max_chunks: u64,
    /// Bytes taken so far.
    pos: usize,
    /// The header while it arrives, then the digest or trailer being assembled.
    buf: Vec<u8>,
    /// What the header said, and the whole length, once it is in.
    header: Option<(Checked, usize)>,
    hasher: blake3::Hasher,
    entries: Vec<(u64, Digest)>,
}

impl Decoder {
    /// A decoder refusing an index of more than `max_chunks` chunks.
    pub fn new(max_chunks: u64) -> Self {
        Self {
            max_chunks,
            pos: 0,
            buf: Vec::with_capacity(HEADER_LEN),
            header: None,
            hasher: blake3::Hasher::new(),
            entries: Vec::new(),
        }
    }

    /// Takes the next bytes of the index.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), FormatError> {
        while !bytes.is_empty() {
            let Some((c, total)) = &self.header else {
                let take = (HEADER_LEN - self.buf.len()).min(bytes.len());
                self.buf.extend_from_slice(&bytes[..take]);
                self.hasher.update(&bytes[..take]);
                (self.pos, bytes) = (self.pos + take, &bytes[take..]);
                if self.buf.len() == HEADER_LEN {
                    self.header = Some(parse_header(&self.buf, self.max_chunks)?);
                    self.buf.clear();
                }
                continue;
            };
            if self.pos >= *total {
                return Err(err("length", 0, format!("more than the {total} bytes its chunk count gives")));
            }
            // A digest (or the trailer) at a time, whatever the pieces' boundaries.
            let in_body = self.pos < c.body_len;
            let take = (DIGEST_LEN - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            if in_body {
                self.hasher.update(&bytes[..take]);
            }
            (self.pos, bytes) = (self.pos + take, &bytes[take..]);
            if in_body && self.buf.len() == DIGEST_LEN {
                let d = Digest::from_slice(&self.buf).unwrap_or(Digest::ZERO_CHUNK);
                if !d.is_zero_chunk() {
                    let chunk = (self.pos - HEADER_LEN) / DIGEST_LEN - 1;
                    self.entries.push((u64::try_from(chunk).unwrap_or(u64::MAX), d));
                }
                self.buf.clear();
            }
        }
        Ok(())
    }

    /// The index, once every byte is in and the trailer matches.
    pub fn finish(self) -> Result<SparseIndex, FormatError> {
        let Some((c, total)) = self.header else {
            return Err(err("header", 0, format!("{} bytes, shorter than header and trailer", self.pos)));
        };
        if self.pos != total {
            return Err(err("length", 0, format!("{} bytes, expected {total} for its chunk count", self.pos)));
        }
        if self.hasher.finalize().as_bytes()[..] != self.buf[..] {
            return Err(err("trailer", c.body_len, "BLAKE3 of the index does not match its trailer"));
        }
        Ok(SparseIndex {
            volume_uuid: c.volume_uuid,
            virtual_size: c.virtual_size,
            chunk_size: c.chunk_size,
            format: c.format,
            entries: self.entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(chunks: u64, data: &[u64]) -> VolumeIndex {
        let cs = 64 << 10;
        let mut ix = VolumeIndex::new([3; 16], chunks * u64::from(cs) - 100, cs, VolumeFormat::Raw).expect("index");
        for &c in data {
            ix.digests[us(c)] = Digest::of(&c.to_le_bytes());
        }
        ix
    }

    #[test]
    fn pieces_are_the_dense_encoding_at_every_piece_size() {
        for (chunks, data) in [(1u64, vec![]), (1, vec![0]), (5, vec![0, 4]), (300, vec![1, 2, 3, 150, 299])] {
            let ix = dense(chunks, &data);
            let want = ix.encode();
            let sparse = Arc::new(SparseIndex::from_dense(&ix));
            assert_eq!(sparse.encoded_len(), len64(want.len()));
            assert_eq!(sparse.entries.len(), data.len());
            for piece in [1, 7, 31, 32, 33, 48, 49, 1000, 1 << 20] {
                let pieces: Vec<Vec<u8>> = sparse.clone().pieces(piece).collect();
                assert!(pieces.iter().all(|p| p.len() <= piece && !p.is_empty()), "{chunks}/{piece}");
                assert_eq!(pieces.concat(), want, "{chunks} chunks, data {data:?}, pieces of {piece}");
            }
            assert_eq!(SparseIndex::decode(&want, 1000).expect("decode"), *sparse);
        }
    }

    #[test]
    fn the_streaming_decoder_matches_decode_at_every_piece_size() {
        let ix = dense(300, &[0, 1, 2, 3, 150, 299]);
        let bytes = ix.encode();
        for piece in [1, 5, 32, 47, 48, 49, 80, 1 << 20] {
            let mut d = Decoder::new(1000);
            for p in bytes.chunks(piece) {
                d.feed(p).expect("feed");
            }
            assert_eq!(d.finish().expect("finish"), SparseIndex::from_dense(&ix), "pieces of {piece}");
        }
    }

    #[test]
    fn the_streaming_decoder_refuses_what_decode_refuses() {
        let good = dense(5, &[2]).encode();
        let run = |bytes: &[u8], max: u64| -> Result<SparseIndex, FormatError> {
            let mut d = Decoder::new(max);
            for p in bytes.chunks(7) {
                d.feed(p)?;
            }
            d.finish()
        };
        let mut cases: Vec<(Vec<u8>, &str)> = vec![(good[..40].to_vec(), "header")];
        for (at, field) in [(1, "magic"), (8, "version"), (9, "volume format"), (10, "reserved"), (60, "trailer")] {
            let mut b = good.clone();
            b[at] ^= 0x55;
            cases.push((b, field));
        }
        cases.push((good[..good.len() - 1].to_vec(), "length"));
        cases.push(([good.as_slice(), &[0]].concat(), "length"));
        for (bytes, field) in cases {
            assert_eq!(run(&bytes, 1000).expect_err(field).field, field);
            assert_eq!(SparseIndex::decode(&bytes, 1000).expect_err(field).field, field);
        }
        assert_eq!(run(&good, 4).expect_err("limit").field, "chunk count");
    }

    #[test]
    fn decode_refuses_what_the_dense_decode_refuses() {
        let mut bad = dense(5, &[2]).encode();
        bad[60] ^= 1;
        assert_eq!(SparseIndex::decode(&bad, 1000).expect_err("trailer").field, "trailer");
        let good = dense(5, &[2]).encode();
        assert_eq!(SparseIndex::decode(&good, 4).expect_err("limit").field, "chunk count");
    }
}
