//! Chunk blob decoder: arbitrary bytes must give Ok or a FormatError, never a panic or an
//! allocation beyond the limit; whatever decodes re-encodes to a blob that decodes the same,
//! and the reusing Decoder (into a caller's buffer, or verify only) agrees with the one-off
//! decode on every input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbackup_proto::{Digest, blob};

const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut dec = blob::Decoder::new().expect("decoder");
    let mut out = vec![0u8; MAX];
    match blob::decode(data, MAX) {
        Ok(plain) => {
            let d = Digest::of(&plain);
            let again = blob::encode(&plain, 1).expect("a decoded chunk re-encodes");
            assert_eq!(blob::decode(&again, MAX).expect("round trip"), plain);
            let n = dec.decode_and_verify_into(data, &d, &mut out).expect("decodes into a buffer too");
            assert_eq!(&out[..n], &plain[..]);
            dec.verify(data, &d, MAX).expect("verifies too");
            assert!(dec.verify(data, &Digest::of(b"another chunk"), MAX).is_err() || plain == b"another chunk");
        }
        Err(_) => {
            let d = Digest::of(data);
            assert!(dec.decode_and_verify_into(data, &d, &mut out).is_err());
            // A well-framed sealed blob fails to decode without its key, yet passes a
            // store's key-less check (sealed_blob_decode covers it with the key).
            let sealed = blob::peek_header(data).is_ok_and(|h| h.sealed.is_some());
            assert!(sealed || dec.verify(data, &d, MAX).is_err());
        }
    }
});
