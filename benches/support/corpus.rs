//! The benchmark corpus: a seeded raw volume of 4 MiB regions (holes, random, text-like,
//! repeats), and a second version with 5% of the regions rewritten; the same as qcow2; and
//! a real-data ext4 image. Shared by the benches (each uses a part).

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use super::common;

pub const REGION: usize = 4 << 20;

/// Region kinds of the corpus, by index (seeded, so every run makes the same volume):
/// 40% holes, 20% random, 25% text-like, 15% copies of an earlier region.
pub fn region(i: u64, version: u64) -> Option<Vec<u8>> {
    let kind = (i.wrapping_mul(2_654_435_761) >> 7) % 20;
    let changed = version > 0 && i % 20 == 3;
    let seed = i + if changed { 1 << 40 } else { 0 };
    match kind {
        0..=7 if !changed => None,
        8..=11 => Some(common::pseudo_random(seed, REGION)),
        12..=16 | 0..=7 => {
            let words = b"the volume of a virtual machine holds files, logs and packages; ";
            let mut v: Vec<u8> = words.iter().cycle().take(REGION).copied().collect();
            v[..8].copy_from_slice(&seed.to_le_bytes());
            Some(v)
        }
        _ => region(i / 2, version).or_else(|| Some(common::pseudo_random(seed, REGION))),
    }
}

pub fn make_volume(path: &Path, mib: u64, version: u64) {
    let mut f = std::fs::File::create(path).expect("create");
    f.set_len(mib << 20).expect("size");
    use std::io::Seek;
    for i in 0..mib / 4 {
        if let Some(data) = region(i, version) {
            f.seek(std::io::SeekFrom::Start(i * REGION as u64)).expect("seek");
            f.write_all(&data).expect("write");
        }
    }
    f.sync_all().expect("sync");
}

/// The same volume as a qcow2 image.
pub fn to_qcow2(raw: &Path, out: &Path) {
    common::run_tool(
        "qemu-img",
        &["convert", "-q", "-O", "qcow2", &raw.display().to_string(), &out.display().to_string()],
    );
}

/// A real-data volume: an ext4 filesystem of `size_mib` filled from the files under `from`.
pub fn make_ext4(path: &Path, size_mib: u64, from: &Path) {
    let size = format!("{size_mib}M");
    common::run_tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            &from.display().to_string(),
            &path.display().to_string(),
            &size,
        ],
    );
}

/// A copy of `src` in which every `one_in`-th 4 MiB region is rewritten with new bytes.
pub fn rewrite_regions(src: &Path, dst: &Path, one_in: u64) {
    use std::io::Seek;
    std::fs::copy(src, dst).expect("copy");
    let mut f = std::fs::OpenOptions::new().write(true).open(dst).expect("open");
    let regions = std::fs::metadata(src).expect("stat").len() / REGION as u64;
    for i in (3..regions).step_by(usize::try_from(one_in).unwrap_or(20)) {
        f.seek(std::io::SeekFrom::Start(i * REGION as u64)).expect("seek");
        f.write_all(&common::pseudo_random(i + (1 << 41), REGION)).expect("write");
    }
    f.sync_all().expect("sync");
}
