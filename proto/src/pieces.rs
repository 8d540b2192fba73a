//! An encoded index in pieces (`IndexPiece` of the store API), both ways: split by the
//! sender, reassembled and checked by the receiver. gRPC caps one message at 64 MiB; an
//! index may have up to [`MAX_ENCODED_LEN`] bytes (16 Mi chunks), so `PutIndexStream` and
//! `GetIndexStream` carry it in pieces.
//!
//! The wire rules: the first piece gives `total_len` (and, on uploads, `session_id` and
//! `name`); later pieces carry only `data`; no piece carries more than
//! [`MAX_INDEX_PIECE_BYTES`]; the pieces add up to exactly `total_len`. The receiver grows
//! its buffer as bytes arrive and never reserves memory from a declared length alone.

use prost::bytes::Bytes;

use crate::index::MAX_ENCODED_LEN;
use crate::store::v1::{INDEX_PIECE_BYTES, IndexPiece, MAX_INDEX_PIECE_BYTES};

/// `data` in pieces of [`INDEX_PIECE_BYTES`], without copying. The first piece carries the
/// total length and the given `session_id` and `name` (empty on downloads); an empty index
/// is one empty piece, so the length always arrives.
pub fn split(data: Bytes, session_id: &str, name: &str) -> Vec<IndexPiece> {
    let n = data.len().div_ceil(INDEX_PIECE_BYTES).max(1);
    let mut out: Vec<IndexPiece> = (0..n)
        .map(|i| {
            let end = ((i + 1) * INDEX_PIECE_BYTES).min(data.len());
            IndexPiece { data: data.slice(i * INDEX_PIECE_BYTES..end), ..Default::default() }
        })
        .collect();
    if let Some(first) = out.first_mut() {
        first.total_len = data.len() as u64;
        first.session_id = session_id.to_string();
        first.name = name.to_string();
    }
    out
}

/// Reassembles an index from its pieces, checking every wire rule on the way.
#[derive(Debug, Default)]
pub struct Assembler {
    total: u64,
    data: Vec<u8>,
    pieces: usize,
}

impl Assembler {
    /// Takes the next piece; the error names the field and the piece that broke a rule.
    pub fn push(&mut self, piece: IndexPiece) -> Result<(), String> {
        let n = self.pieces;
        if n == 0 {
            if piece.total_len > MAX_ENCODED_LEN {
                return Err(format!(
                    "total_len: {} bytes, more than the {MAX_ENCODED_LEN} an index may have",
                    piece.total_len
                ));
            }
            self.total = piece.total_len;
        } else if !piece.session_id.is_empty() || !piece.name.is_empty() || piece.total_len != 0 {
            return Err(format!("session_id, name, total_len: set in piece {n}; only the first piece carries them"));
        }
        if piece.data.len() > MAX_INDEX_PIECE_BYTES {
            return Err(format!(
                "data: piece {n} carries {} bytes, more than {MAX_INDEX_PIECE_BYTES}",
                piece.data.len()
            ));
        }
        if self.data.len() as u64 + piece.data.len() as u64 > self.total {
            return Err(format!("data: piece {n} goes past total_len ({} bytes)", self.total));
        }
        self.data.extend_from_slice(&piece.data);
        self.pieces += 1;
        Ok(())
    }

    /// The whole index, or an error when the pieces fell short of `total_len`.
    pub fn finish(self) -> Result<Vec<u8>, String> {
        if self.pieces == 0 {
            return Err("total_len: no piece arrived".into());
        }
        if self.data.len() as u64 != self.total {
            return Err(format!("data: the pieces ended after {} of total_len {} bytes", self.data.len(), self.total));
        }
        Ok(self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Bytes {
        (0..n).map(|i| u8::try_from(i * 7 % 251).unwrap_or(0)).collect::<Vec<u8>>().into()
    }

    #[test]
    fn split_and_reassemble_round_trip_at_every_boundary() {
        for n in [0, 1, INDEX_PIECE_BYTES - 1, INDEX_PIECE_BYTES, INDEX_PIECE_BYTES + 1, 3 * INDEX_PIECE_BYTES + 5] {
            let data = bytes(n);
            let pieces = split(data.clone(), "s", "x.vidx");
            assert_eq!(pieces.len(), n.div_ceil(INDEX_PIECE_BYTES).max(1), "{n}");
            assert_eq!((pieces[0].total_len, pieces[0].name.as_str()), (n as u64, "x.vidx"));
            let mut a = Assembler::default();
            for p in pieces {
                a.push(p).expect("valid piece");
            }
            assert_eq!(a.finish().expect("complete"), data.to_vec(), "{n}");
        }
    }

    #[test]
    fn every_broken_rule_is_refused_naming_its_field() {
        let first = |total_len: u64, len: usize| IndexPiece { total_len, data: bytes(len), ..Default::default() };
        let mut a = Assembler::default();
        let e = a.push(first(MAX_ENCODED_LEN + 1, 0)).expect_err("too long");
        assert!(e.starts_with("total_len:"), "{e}");

        let mut a = Assembler::default();
        let e = a.push(first(10 << 20, MAX_INDEX_PIECE_BYTES + 1)).expect_err("piece too big");
        assert!(e.starts_with("data: piece 0"), "{e}");

        let mut a = Assembler::default();
        a.push(first(10, 4)).expect("first");
        let e = a.push(IndexPiece { name: "y".into(), data: bytes(1), ..Default::default() }).expect_err("name again");
        assert!(e.contains("piece 1"), "{e}");

        let mut a = Assembler::default();
        a.push(first(10, 4)).expect("first");
        let e = a.push(IndexPiece { data: bytes(7), ..Default::default() }).expect_err("past the end");
        assert!(e.starts_with("data: piece 1 goes past"), "{e}");

        let mut a = Assembler::default();
        a.push(first(10, 4)).expect("first");
        let e = a.finish().expect_err("short");
        assert!(e.contains("after 4 of total_len 10"), "{e}");

        let e = Assembler::default().finish().expect_err("nothing");
        assert!(e.starts_with("total_len:"), "{e}");
    }
}
