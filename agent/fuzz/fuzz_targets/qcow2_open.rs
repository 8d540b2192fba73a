//! A whole qcow2 image from arbitrary bytes: open it (header, L1, snapshot table, bitmap
//! directory), map its allocation and read its first MiB. Every outcome is Ok or an error;
//! never a panic, never more memory than the limits allow.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use vmbackup_agent::volume::qcow2::Qcow2Volume;
use vmbackup_agent::volume::{Limits, VolumeSource};

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile_in_shm();
    f.1.write_all(data).expect("write");
    let limits = Limits { max_l1_bytes: 1 << 20, max_chain_depth: 2, l2_cache_tables: 4 };
    if let Ok(v) = Qcow2Volume::open(&f.0, &limits) {
        let _ = v.snapshots();
        let _ = v.bitmaps();
        let span = v.virtual_size().min(64 << 20);
        let _ = v.extents(0, span);
        let mut buf = vec![0u8; usize::try_from(span.min(1 << 20)).unwrap_or(0)];
        let _ = v.read_at(0, &mut buf);
    }
    let _ = std::fs::remove_file(&f.0);
    f.0.clear();
});

fn tempfile_in_shm() -> (std::path::PathBuf, std::fs::File) {
    let path = std::path::PathBuf::from(format!("/dev/shm/vmbackup-fuzz-{}.qcow2", std::process::id()));
    let file = std::fs::File::create(&path).expect("create");
    (path, file)
}
