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
//! `VMBACKUP_BENCH_ROUNDS` times (default 3), the tools taking turns within each round, and
//! medians are reported with vmbackup's ratio to every other tool. Reported, never asserted.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench compare`
//! (restic, borgbackup and qemu-utils installed; `VMBACKUP_BENCH_MIB`, default 4096;
//! `VMBACKUP_BENCH_REAL_MIB`, the ext4 image of /usr, default 2048; `VMBACKUP_BENCH_TOOLS`,
//! a comma-separated subset, for profiling one tool).

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/corpus.rs"]
mod corpus;
#[path = "support/measure.rs"]
mod measure;

use std::path::Path;
use std::time::Instant;

use measure::Cost;
use vmbackup_proto::agent::v1 as pb;

fn du(p: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => {
                std::fs::read_dir(p).map(|rd| rd.flatten().map(|e| walk(&e.path())).sum()).unwrap_or(0)
            }
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512
            }
            Err(_) => 0,
        }
    }
    walk(p) as f64 / 1048576.0
}

/// One measured operation of one tool on one corpus.
struct Sample {
    tool: &'static str,
    corpus: &'static str,
    op: &'static str,
    secs: f64,
    cpu: f64,
    /// Peak RSS: one figure, or vmbackup's agent and store.
    peak: String,
    stored_mib: f64,
}

#[derive(Default)]
struct Samples(Vec<Sample>);

impl Samples {
    fn push(&mut self, tool: &'static str, corpus: &'static str, op: &'static str, secs: f64, cost: Cost, repo: &Path) {
        let peak = cost.peak_mib.to_string();
        self.0.push(Sample { tool, corpus, op, secs, cpu: cost.cpu, peak, stored_mib: du(repo) });
    }
}

/// Times a command run through the rusage wrapper.
fn timed(program: &str, args: &[&str], env: &[(&str, &str)], dir: Option<&Path>) -> (f64, Cost) {
    let t = Instant::now();
    let cost = measure::run(program, args, env, dir);
    (t.elapsed().as_secs_f64(), cost)
}

/// `sync <file>`: fsync of the restored file, so every restore ends with its data on disk.
fn sync_file(p: &Path) -> (f64, Cost) {
    timed("sync", &[&p.display().to_string()], &[], None)
}

/// A restore and the sync after it, as one operation.
fn with_sync((secs, cost): (f64, Cost), (s2, c2): (f64, Cost)) -> (f64, Cost) {
    (secs + s2, Cost { cpu: cost.cpu + c2.cpu, peak_mib: cost.peak_mib.max(c2.peak_mib) })
}

async fn vmbackup(out: &mut Samples, corpus: &'static str, v1: &Path, v2: &Path, format: &str) {
    let s = |p: &Path| p.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::start_store_with(dir.path(), "store", None, 4 << 20);
    let agent = common::start_agent(dir.path(), common::AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "bench").await;
    let mut c = common::backup_client(&agent).await;
    let root = "edc07fe8d8a335ec8aa00f23b88fc1c6";
    let tags = vec!["volumeLiveBackup::parallelismDegree::4".to_string()];
    let chunks = store.data_dir.join("chunks");
    // Each operation: CPU of both daemons, and the peak of each since the operation began.
    let begin = || {
        measure::reset_peak(agent.pid());
        measure::reset_peak(store.pid());
        (Instant::now(), measure::cpu_seconds(agent.pid()) + measure::cpu_seconds(store.pid()))
    };
    let end = |out: &mut Samples, op: &'static str, (t, cpu0): (Instant, f64)| {
        let secs = t.elapsed().as_secs_f64();
        let cpu = measure::cpu_seconds(agent.pid()) + measure::cpu_seconds(store.pid()) - cpu0;
        let peak = format!("{} / {}", measure::peak_rss_mib(agent.pid()), measure::peak_rss_mib(store.pid()));
        out.0.push(Sample { tool: "vmbackup", corpus, op, secs, cpu, peak, stored_mib: du(&chunks) });
    };
    let mut group = String::new();
    for (op, img) in [("full", v1), ("incremental", v2)] {
        let req = pb::CreateVmBackupRequest {
            root_volume_uuid: root.into(),
            backup_storage_uuid: bs.clone(),
            name: op.into(),
            system_tags: tags.clone(),
            vm: Some(common::one_volume_vm("9ff17180fded31c2b9e4e5751ebcb2ba", root, img, format)),
            ..Default::default()
        };
        let started = begin();
        let inv = c.create_vm_backup(req).await.expect("backup").into_inner().inventories;
        end(out, op, started);
        group = inv[0].group_uuid.clone();
    }
    let restored = dir.path().join("restored.raw");
    let started = begin();
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: group,
        backup_storage_uuid: bs,
        targets: vec![pb::RestoreTarget { volume_uuid: root.into(), install_path: s(&restored), format: "raw".into() }],
        system_tags: tags,
        ..Default::default()
    })
    .await
    .expect("restore");
    end(out, "restore", started);
}

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
        let (secs, cost) = timed("restic", &["backup", &s(&named)], &env, None);
        out.push("restic", corpus, op, secs, cost, &repo_dir);
    }
    let target = dir.path().join("out");
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
        let (secs, cost) = timed("borg", &a, &env, None);
        out.push("borg", corpus, op, secs, cost, &repo_dir);
    }
    let target = dir.path().join("out");
    std::fs::create_dir(&target).expect("mkdir");
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
        let (secs, cost) = timed("qemu-img", &args, &[], None);
        out.push("qemu-img convert", corpus, op, secs, cost, dir.path());
    }
    let restored = dir.path().join("restored.raw");
    let src = s(&dir.path().join("incremental.qcow2"));
    let run = timed("qemu-img", &["convert", "-m", "4", "-O", "raw", &src, &s(&restored)], &[], None);
    let (secs, cost) = with_sync(run, sync_file(&restored));
    let _ = std::fs::remove_file(&restored);
    out.push("qemu-img convert", corpus, "restore", secs, cost, dir.path());
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians per (tool, corpus, operation), in the order first measured, then vmbackup's
/// speed-up over every other tool.
fn report(samples: &Samples, sizes: &[(&str, u64)]) {
    let mut keys: Vec<(&str, &str, &str)> = Vec::new();
    for s in &samples.0 {
        if !keys.contains(&(s.tool, s.corpus, s.op)) {
            keys.push((s.tool, s.corpus, s.op));
        }
    }
    let of = |k: &(&str, &str, &str)| -> Vec<&Sample> {
        samples.0.iter().filter(|s| (s.tool, s.corpus, s.op) == *k).collect()
    };
    let mib_of = |corpus: &str| sizes.iter().find(|(c, _)| *c == corpus).map_or(0, |(_, m)| *m) as f64;
    let med_secs = |k: &(&str, &str, &str)| median(of(k).iter().map(|s| s.secs).collect());
    let rounds = of(&keys[0]).len();
    println!("\nmedian of {rounds} rounds; restores are timed until the file is on disk");
    println!(
        "{:<17} {:<10} {:<12} {:>7} {:>7} {:>9} {:>14} {:>7}",
        "tool", "corpus", "operation", "seconds", "MiB/s", "MiB/CPU-s", "peak RSS MiB", "stored"
    );
    for k in &keys {
        let secs = med_secs(k);
        let cpu = median(of(k).iter().map(|s| s.cpu).collect());
        let all = of(k);
        let last = all.last().expect("a sample");
        println!(
            "{:<17} {:<10} {:<12} {secs:>7.2} {:>7.0} {:>9.0} {:>14} {:>7.0}",
            k.0,
            k.1,
            k.2,
            mib_of(k.1) / secs,
            mib_of(k.1) / cpu.max(0.001),
            last.peak,
            last.stored_mib
        );
    }
    println!("\nvmbackup's speed-up (their median seconds / ours)");
    for k in keys.iter().filter(|k| k.0 != "vmbackup") {
        let ours = ("vmbackup", k.1, k.2);
        if keys.contains(&ours) {
            println!("vs {:<16} {:<10} {:<12} {:>6.2}x", k.0, k.1, k.2, med_secs(k) / med_secs(&ours));
        }
    }
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
    let (v1, v2) = (work.path().join("v1.raw"), work.path().join("v2.raw"));
    corpus::prefault_free_memory();
    corpus::make_volume(&v1, mib, 0);
    corpus::make_volume(&v2, mib, 1);
    let (q1, q2) = (work.path().join("v1.qcow2"), work.path().join("v2.qcow2"));
    corpus::to_qcow2(&v1, &q1);
    corpus::to_qcow2(&v2, &q2);
    let (e1, e2) = (work.path().join("e1.raw"), work.path().join("e2.raw"));
    corpus::make_ext4(&e1, real_mib, Path::new("/usr"));
    corpus::rewrite_regions(&e1, &e2, 20);
    println!(
        "synthetic: {mib} MiB raw volume (and the same as qcow2); its second version rewrites 5% of its 4 MiB regions"
    );
    println!("real: a {real_mib} MiB ext4 image of /usr; its second version rewrites 5% of its regions");
    let w = work.path();
    let mut samples = Samples::default();
    for round in 1..=rounds {
        eprintln!("round {round} of {rounds}");
        for (corpus, a, b) in [("synthetic", &v1, &v2), ("real", &e1, &e2)] {
            if wanted("vmbackup") {
                vmbackup(&mut samples, corpus, a, b, "raw").await;
                if corpus == "synthetic" {
                    vmbackup(&mut samples, "qcow2", &q1, &q2, "qcow2").await;
                }
            }
            if wanted("restic") {
                restic(&mut samples, corpus, a, b, w);
            }
            if wanted("borg") {
                borg(&mut samples, corpus, a, b, w);
            }
            if wanted("qemu-img") {
                qemu_img(&mut samples, corpus, a, b);
            }
        }
    }
    report(&samples, &[("synthetic", mib), ("qcow2", mib), ("real", real_mib)]);
}
