//! Volume index decoder: arbitrary bytes give Ok or a FormatError; a decoded index encodes
//! back to exactly the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbackup_proto::index::VolumeIndex;

fuzz_target!(|data: &[u8]| {
    if let Ok(ix) = VolumeIndex::decode(data, 1 << 16) {
        assert_eq!(ix.encode(), data);
    }
});
