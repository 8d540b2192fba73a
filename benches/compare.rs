//! vmbackup side by side with the tools users would otherwise pick, on the same corpus and
//! machine in one run: restic (repository v2, compression auto), borg (fixed 4 MiB chunks,
//! sparse, zstd level 1: the settings closest to vmbackup's) and `qemu-img convert`
//! (a compressed qcow2 copy, no dedup, no history). Each backs up the corpus volume (full),
//! then its second version (incremental; only vmbackup and the dedup tools benefit), then
//! restores the second version. Every restore is timed until the restored file is on disk
//! (vmbackup fsyncs before it answers; the others are followed by `sync <file>`), so all
//! tools stop at the same finish line.
//!
//! Per operation: seconds, MiB/s of logical size, MiB per CPU-second, peak RSS and stored
//! size. vmbackup's CPU is its agent's and store's together and its peak is given for each;
//! the other tools' figures are their rusage. The whole sequence runs
//! `VMBACKUP_BENCH_ROUNDS` times (default 3), the tools taking turns within each round and
//! the first tool moving to the back after each round; medians with min and max are reported
//! with vmbackup's ratio to every other tool. Reported, never asserted.
//!
//! vmbackup runs twice: "vmbackup" (agent and a separate store process on loopback; the store
//! checks every chunk it receives) and "vmbackup embedded" (the agent's embedded store,
//! in-process). Before every timed step its input is read once (the volume for a backup, the
//! repository for a restore), so every tool starts warm whatever ran before it.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench compare`
//! (restic, borgbackup and qemu-utils installed; `VMBACKUP_BENCH_MIB`, default 4096;
//! `VMBACKUP_BENCH_REAL_MIB`, the ext4 image of /usr, default 2048; `VMBACKUP_BENCH_TOOLS`,
//! a comma-separated subset of vmbackup, embedded, restic, borg, qemu-img).

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/corpus.rs"]
mod corpus;
#[path = "support/measure.rs"]
mod measure;
#[path = "support/samples.rs"]
mod samples;

use std::path::Path;

use samples::{Samples, sync_file, timed, warm, with_sync};

fn restic(out: &mut Samples, corpus: &'static str, v1: &Path, v2: &Path, work: &Path) {
    let s = |p: &Path| p.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_dir = dir.path().join("repo");
    let repo = s(&repo_dir);
    let env = [("RESTIC_PASSWORD", "bench"), ("RESTIC_REPOSITORY", repo.as_str())];
    measure::run("restic", &["init", "--repository-version", "2"], &env, None);
    // restic keys files by path: back both versions up under one name.
    let named = work.join("volume.raw");
    for (op, img) in [("full", v1), ("incremental", v2)] {
        let _ = std::fs::remove_file(&named);
        std::fs::hard_link(img, &named).expect("link");
        warm(img);
        let (secs, cost) = timed("restic", &["backup", &s(&named)], &env, None);
        out.push("restic", corpus, op, secs, cost, &repo_dir);
    }
    let target = dir.path().join("out");
    warm(&repo_dir);
    let (secs, cost) = with_sync(
        timed("restic", &["restore", "latest", "--target", &s(&target)], &env, None),
        sync_file(&target.join(named.strip_prefix("/").unwrap_or(&named))),
    );
    out.push("restic", corpus, "restore", secs, cost, &repo_dir);
}

fn borg(out: &mut Samples, corpus: &'static str, v1: &Path, v2: &Path, work: &Path) {
    let s = |p: &Path| p.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_dir = dir.path().join("repo");
    let repo = s(&repo_dir);
    let env = [("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes"), ("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")];
    measure::run("borg", &["init", "-e", "none", &repo], &env, None);
    let named = work.join("volume.raw");
    for (i, (op, img)) in [("full", v1), ("incremental", v2)].into_iter().enumerate() {
        let _ = std::fs::remove_file(&named);
        std::fs::hard_link(img, &named).expect("link");
        let archive = format!("{repo}::a{i}");
        let args = ["create", "--chunker-params", "fixed,4194304", "--sparse", "--compression", "zstd,1"];
        let mut a: Vec<&str> = args.to_vec();
        a.extend([archive.as_str(), named.to_str().unwrap_or_default()]);
        warm(img);
        let (secs, cost) = timed("borg", &a, &env, None);
        out.push("borg", corpus, op, secs, cost, &repo_dir);
    }
    let target = dir.path().join("out");
    std::fs::create_dir(&target).expect("mkdir");
    warm(&repo_dir);
    let (secs, cost) = with_sync(
        timed("borg", &["extract", "--sparse", &format!("{repo}::a1")], &env, Some(&target)),
        sync_file(&target.join(named.strip_prefix("/").unwrap_or(&named))),
    );
    out.push("borg", corpus, "restore", secs, cost, &repo_dir);
}

fn qemu_img(out: &mut Samples, corpus: &'static str, v1: &Path, v2: &Path) {
    let s = |p: &Path| p.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    for (op, img) in [("full", v1), ("incremental", v2)] {
        let copy = dir.path().join(format!("{op}.qcow2"));
        let args = ["convert", "-c", "-m", "4", "-O", "qcow2", "-o", "compression_type=zstd", &s(img), &s(&copy)];
        warm(img);
        let (secs, cost) = timed("qemu-img", &args, &[], None);
        out.push("qemu-img convert", corpus, op, secs, cost, dir.path());
    }
    let restored = dir.path().join("restored.raw");
    let src = s(&dir.path().join("incremental.qcow2"));
    warm(&dir.path().join("incremental.qcow2"));
    let run = timed("qemu-img", &["convert", "-m", "4", "-O", "raw", &src, &s(&restored)], &[], None);
    let (secs, cost) = with_sync(run, sync_file(&restored));
    let _ = std::fs::remove_file(&restored);
    out.push("qemu-img convert", corpus, "restore", secs, cost, dir.path());
}

#[tokio::main]
async fn main() {
    measure::wrapper_main();
    let mib: u64 = std::env::var("VMBACKUP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let real_mib: u64 = std::env::var("VMBACKUP_BENCH_REAL_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    let rounds: usize = std::env::var("VMBACKUP_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let only = std::env::var("VMBACKUP_BENCH_TOOLS").unwrap_or_default();
    let wanted = |t: &str| only.is_empty() || only.split(',').any(|o| o == t);
    let work = tempfile::tempdir().expect("tempdir");
    let (v1, v2) = corpus::two_versions(work.path(), mib);
    let (q1, q2) = (work.path().join("v1.qcow2"), work.path().join("v2.qcow2"));
    corpus::to_qcow2(&v1, &q1);
    corpus::to_qcow2(&v2, &q2);
    let (e1, e2) = corpus::real_versions(work.path(), real_mib);
    println!(
        "synthetic: {mib} MiB raw volume (and the same as qcow2); its second version rewrites 5% of its 4 MiB regions"
    );
    println!("real: a {real_mib} MiB ext4 image of /usr; its second version rewrites 5% of its regions");
    let w = work.path();
    let mut samples = Samples::default();
    let mut tools: Vec<&str> =
        ["vmbackup", "embedded", "restic", "borg", "qemu-img"].into_iter().filter(|t| wanted(t)).collect();
    for round in 1..=rounds {
        eprintln!("round {round} of {rounds}: {}", tools.join(", "));
        for (corpus, a, b) in [("synthetic", &v1, &v2), ("real", &e1, &e2)] {
            for tool in &tools {
                match *tool {
                    "vmbackup" => {
                        samples::vmbackup(&mut samples, "vmbackup", corpus, (a, b, "raw"), None, &|| None).await;
                        if corpus == "synthetic" {
                            let q = (q1.as_path(), q2.as_path(), "qcow2");
                            samples::vmbackup(&mut samples, "vmbackup", "qcow2", q, None, &|| None).await;
                        }
                    }
                    "embedded" => {
                        samples::vmbackup_embedded(&mut samples, "vmbackup embedded", corpus, (a, b, "raw")).await
                    }
                    "restic" => restic(&mut samples, corpus, a, b, w),
                    "borg" => borg(&mut samples, corpus, a, b, w),
                    _ => qemu_img(&mut samples, corpus, a, b),
                }
            }
        }
        // The next round starts with the next tool: none always runs first, or after the same one.
        tools.rotate_left(1);
    }
    samples::report(&samples, &[("synthetic", mib), ("qcow2", mib), ("real", real_mib)]);
}
