//! Sealed chunk blobs (versions 3 and 2) and sealed manifests: arbitrary bytes under a fixed
//! key give Ok or a FormatError, never a panic or an allocation beyond the limit. Whatever
//! opens must be exactly what the key sealed (it re-seals and opens to the same plaintext),
//! and a store's key-less check accepts a sealed blob whenever the key opens it, and a
//! version-3 one only under the name its header derives.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmbackup_proto::Digest;
use vmbackup_proto::blob::{self, Checked};
use vmbackup_proto::manifest::GroupManifest;
use vmbackup_proto::seal::ChunkKey;

const MAX: usize = 1 << 20;

fn key() -> Arc<ChunkKey> {
    static KEY: OnceLock<Arc<ChunkKey>> = OnceLock::new();
    KEY.get_or_init(|| Arc::new(ChunkKey::new(&[0x5a; 32]))).clone()
}

fuzz_target!(|data: &[u8]| {
    let key = key();
    // The name: the last 32 bytes when there are enough, else a fixed one.
    let name = if data.len() >= 32 {
        Digest::from_slice(&data[data.len() - 32..]).expect("32 bytes")
    } else {
        key.digest(b"")
    };
    let mut dec = blob::Decoder::with_key(Some(key.clone())).expect("decoder");
    let store_view = blob::Decoder::new().expect("decoder").verify(data, &name, MAX);
    if let Ok(Checked::Sealed(_)) = store_view {
        let derived = blob::peek_header(data).ok().and_then(|h| h.sealed).and_then(|s| s.name());
        assert_eq!(derived, Some(name), "the store accepted a version-3 blob under another name");
    }
    if let Ok(plain) = dec.decode_and_verify(data, &name, MAX) {
        let version = data[8];
        if version == blob::SEALED_VERSION {
            assert_eq!(key.digest(&plain), name, "an opened chunk has its sealed name");
            assert_eq!(store_view, Ok(Checked::Sealed(key.id())), "the store saw it as sealed");
        } else {
            assert_eq!(key.keyed_hash(&plain), name, "an opened version-2 chunk has its keyed name");
            assert_eq!(store_view, Ok(Checked::SealedUnbound(key.id())), "the store saw it as version 2");
        }
        let mut enc = blob::Encoder::with_key(1, Some(key.clone())).expect("encoder");
        let again_name = enc.name(&plain);
        let again = enc.encode_named(&plain, &again_name).expect("re-seal");
        assert_eq!(dec.decode_and_verify(&again, &again_name.digest, MAX).expect("round trip"), plain);
    }
    if let Ok(m) = GroupManifest::decode(data) {
        if m.is_sealed() {
            if let Ok(open) = m.unseal(&key) {
                let resealed = open.seal(&key).expect("an opened manifest seals again");
                assert_eq!(resealed.unseal(&key).expect("round trip"), open);
            }
        }
    }
});
