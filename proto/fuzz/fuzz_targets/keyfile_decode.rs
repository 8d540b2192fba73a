//! Key files: arbitrary bytes give Ok or a FormatError, never a panic and never an Argon2id
//! run above the file format's memory bound; a decoded file encodes and decodes to itself,
//! and unlocking with a fixed passphrase either fails or yields a key whose id is the file's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbackup_proto::keyfile::{KeyFile, MAX_MEMORY_KIB};
use vmbackup_proto::seal::ChunkKey;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = KeyFile::decode(data) {
        let again = f.encode().expect("a valid key file encodes");
        assert_eq!(KeyFile::decode(&again).expect("round trip"), f);
        // Unlocking runs Argon2id at the file's costs: keep the fuzzer fast by trying only
        // small ones (the bound itself is checked by decode).
        if let Some(w) = f.wraps.first() {
            assert!(w.memory_kib <= MAX_MEMORY_KIB);
            if w.memory_kib <= 1024 && w.iterations <= 2 {
                if let Ok(master) = f.unlock(&w.role, b"fuzz") {
                    assert_eq!(ChunkKey::new(&master).id().to_string(), f.key_id);
                }
            }
        }
    }
});
