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

/// A real-data volume: an ext4 filesystem of `size_mib` filled with real files from under
/// `from` (whole subdirectories, about 70% of the size; hard-linked into a staging folder,
/// or copied where links cannot be made).
pub fn make_ext4(path: &Path, size_mib: u64, from: &Path) {
    let staging = path.with_extension("files");
    std::fs::create_dir_all(&staging).expect("staging folder");
    let budget = size_mib * 7 / 10;
    let mut used = 0u64;
    let du = |d: &Path| -> u64 {
        let out = common::run_tool("du", &["-sm", &d.display().to_string()]);
        out.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX)
    };
    let mut tops: Vec<std::path::PathBuf> =
        std::fs::read_dir(from).expect("read the source folder").flatten().map(|e| e.path()).collect();
    tops.sort();
    for top in tops.into_iter().filter(|p| p.is_dir()) {
        let mib = du(&top);
        // A folder too large for what is left contributes its subfolders instead.
        let parts = if used + mib <= budget {
            vec![(top, mib)]
        } else {
            let mut sub: Vec<std::path::PathBuf> = std::fs::read_dir(&top)
                .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
                .unwrap_or_default();
            sub.sort();
            sub.into_iter().map(|p| (p.clone(), du(&p))).collect()
        };
        for (d, mib) in parts {
            if used + mib > budget {
                continue;
            }
            let dest = staging.join(d.strip_prefix(from).expect("under the source"));
            std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
            let (src, dst) = (d.display().to_string(), dest.display().to_string());
            let linked =
                std::process::Command::new("cp").args(["-al", &src, &dst]).output().is_ok_and(|o| o.status.success());
            if !linked {
                let _ = std::fs::remove_dir_all(&dest);
                common::run_tool("cp", &["-a", &src, &dst]);
            }
            used += mib;
        }
    }
    let size = format!("{size_mib}M");
    common::run_tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            &staging.display().to_string(),
            &path.display().to_string(),
            &size,
        ],
    );
    std::fs::remove_dir_all(&staging).expect("remove the staging folder");
    eprintln!("real-data image: {used} MiB of files from {} in a {size_mib} MiB ext4 image", from.display());
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

/// The synthetic corpus in `dir`: `v1.raw` of `mib` MiB and its second version `v2.raw`,
/// made after prefaulting free memory (so the page cache holds them warm).
pub fn two_versions(dir: &Path, mib: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let (v1, v2) = (dir.join("v1.raw"), dir.join("v2.raw"));
    prefault_free_memory();
    make_volume(&v1, mib, 0);
    make_volume(&v2, mib, 1);
    (v1, v2)
}

/// The real-data corpus in `dir`: `e1.raw`, an ext4 image of `mib` MiB filled from /usr,
/// and `e2.raw`, its copy with every 20th 4 MiB region rewritten.
pub fn real_versions(dir: &Path, mib: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let (e1, e2) = (dir.join("e1.raw"), dir.join("e2.raw"));
    make_ext4(&e1, mib, Path::new("/usr"));
    rewrite_regions(&e1, &e2, 20);
    (e1, e2)
}

/// Touches (then frees) the machine's free memory once, before anything is measured.
///
/// On a virtual machine whose memory the hypervisor backs lazily, the first write to a page
/// of guest memory costs about ten times a later one (seen here: 400 MiB/s into the page
/// cache on first touch, 4.8 GB/s afterwards). Without this, whichever tool runs first pays
/// for backing the guest's memory, and results depend on the order of the runs.
pub fn prefault_free_memory() {
    let free_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemFree:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0);
    // Leave 1 GiB free; touch at most 32 GiB.
    let want = (free_kib << 10).saturating_sub(1 << 30).min(32 << 30);
    let step = 256usize << 20;
    let mut held: Vec<Vec<u8>> = Vec::new();
    let start = std::time::Instant::now();
    let mut touched = 0u64;
    while touched + step as u64 <= want {
        held.push(vec![1u8; step]);
        touched += step as u64;
    }
    drop(held);
    eprintln!("prefaulted {} MiB of free memory in {:.1} s", touched >> 20, start.elapsed().as_secs_f64());
}
