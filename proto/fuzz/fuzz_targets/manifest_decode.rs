//! Group manifest decoder: arbitrary bytes give Ok or a FormatError; a decoded manifest
//! encodes and decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbackup_proto::manifest::GroupManifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = GroupManifest::decode(data) {
        let again = m.encode().expect("a valid manifest encodes");
        assert_eq!(GroupManifest::decode(&again).expect("round trip"), m);
    }
});
