//! Chunk blob decoder: arbitrary bytes must give Ok or a FormatError, never a panic or an
//! allocation beyond the limit; whatever decodes re-encodes to a blob that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbackup_proto::blob;

fuzz_target!(|data: &[u8]| {
    if let Ok(plain) = blob::decode(data, 1 << 20) {
        let again = blob::encode(&plain, 1).expect("a decoded chunk re-encodes");
        assert_eq!(blob::decode(&again, 1 << 20).expect("round trip"), plain);
    }
});
