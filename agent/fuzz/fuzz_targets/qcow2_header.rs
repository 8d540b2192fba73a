//! qcow2 header, snapshot table and bitmap directory parsers on arbitrary bytes: Ok or an
//! error naming an offset inside the input, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmbackup_agent::volume::Limits;
use vmbackup_agent::volume::qcow2::header::Header;
use vmbackup_agent::volume::qcow2::tables::{parse_bitmaps, parse_snapshots};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.qcow2");
    let len = data.len() as u64;
    let _ = Header::parse(path, data, len, &Limits::default());
    let count = data.first().copied().unwrap_or(0).into();
    let rest = data.get(1..).unwrap_or_default();
    if let Err(e) = parse_snapshots(path, rest, 0, count) {
        assert!(e.offset.is_some_and(|o| o <= len), "{e}");
    }
    if let Err(e) = parse_bitmaps(path, rest, 0, count) {
        assert!(e.offset.is_some_and(|o| o <= len), "{e}");
    }
});
