//! Volume index decoders: arbitrary bytes give Ok or a FormatError; a decoded index encodes
//! back to exactly the input. The dense decoder, the sparse one and the streaming one (fed
//! in pieces of a size the input picks) agree on every input, and the sparse index's
//! pieces are the dense encoding.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmbackup_proto::index::{Decoder, SparseIndex, VolumeIndex};

fuzz_target!(|data: &[u8]| {
    let Some((&piece, data)) = data.split_first() else { return };
    let dense = VolumeIndex::decode(data, 1 << 16);
    let sparse = SparseIndex::decode(data, 1 << 16);
    let mut decoder = Decoder::new(1 << 16);
    let streamed = data.chunks(usize::from(piece) + 1).try_for_each(|p| decoder.feed(p)).and_then(|()| decoder.finish());
    match (&dense, &sparse, &streamed) {
        (Ok(ix), Ok(s), Ok(t)) => {
            assert_eq!(ix.encode(), data);
            assert_eq!(SparseIndex::from_dense(ix), *s);
            assert_eq!(s, t);
            let pieces: Vec<Vec<u8>> = Arc::new(s.clone()).pieces(usize::from(piece) + 1).collect();
            assert_eq!(pieces.concat(), data);
        }
        (Err(_), Err(_), Err(_)) => {}
        _ => panic!("the decoders disagree: {dense:?} / {sparse:?} / {streamed:?}"),
    }
});
