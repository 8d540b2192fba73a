//! vmbackup side by side with the tools users would otherwise pick, on the same corpus and
//! machine in one run: restic (repository v2, compression auto), borg (fixed 4 MiB chunks,
//! sparse, zstd level 1: the settings closest to vmbackup's) and `qemu-img convert`
//! (a compressed qcow2 copy, no dedup, no history). Each backs up the corpus volume (full),
//! then its second version (incremental; only vmbackup and the dedup tools benefit), then
//! restores the second version. Every restore is timed until the restored file is on disk
//! (vmbackup fsyncs before it answers; the others are followed by `sync <file>`), so all
//! tools stop at the same finish line.
//!
//! The whole sequence runs `VMBACKUP_BENCH_ROUNDS` times (default 3), the tools taking
//! turns within each round, and the median of each operation is reported with vmbackup's
//! ratio to every other tool. Reported, never asserted.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench compare`
//! (restic, borgbackup and qemu-utils installed; `VMBACKUP_BENCH_MIB`, default 4096;
//! `VMBACKUP_BENCH_REAL_MIB`, the ext4 image of /usr, default 2048).

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/corpus.rs"]
mod corpus;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use vmbackup_proto::agent::v1 as pb;

fn tool(program: &str, args: &[&str], env: &[(&str, &str)]) {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{program} not found ({e}): install it to compare"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

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
    stored_mib: f64,
}

type Samples = Vec<Sample>;

/// `sync <file>`: fsync of the restored file, so every restore ends with its data on disk.
fn sync_file(p: &Path) {
    tool("sync", &[&p.display().to_string()], &[]);
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

async fn vmbackup(out: &mut Samples, corpus: &'static str, v1: &Path, v2: &Path, format: &str) {
    let s = |p: &Path| p.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::start_store_with(dir.path(), "store", None, 4 << 20);
    let agent = common::start_agent(dir.path(), common::AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "bench").await;
    let mut c = common::backup_client(&agent).await;
    let root = "edc07fe8d8a335ec8aa00f23b88fc1c6";
    let mut group = String::new();
    for (op, img) in [("full", v1), ("incremental", v2)] {
        let req = pb::CreateVmBackupRequest {
            root_volume_uuid: root.into(),
            backup_storage_uuid: bs.clone(),
            name: op.into(),
            system_tags: vec!["volumeLiveBackup::parallelismDegree::4".into()],
            vm: Some(pb::RegisterVmRequest {
                uuid: "9ff17180fded31c2b9e4e5751ebcb2ba".into(),
                volumes: vec![pb::VolumeSpec {
                    uuid: root.into(),
                    name: "ROOT".into(),
                    install_path: s(img),
                    format: format.into(),
                    r#type: "Root".into(),
                    device_id: 0,
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = Instant::now();
        let inv = c.create_vm_backup(req).await.expect("backup").into_inner().inventories;
        let secs = t.elapsed().as_secs_f64();
        out.push(Sample { tool: "vmbackup", corpus, op, secs, stored_mib: du(&store.data_dir.join("chunks")) });
        group = inv[0].group_uuid.clone();
    }
    let restored = dir.path().join("restored.raw");
    let t = Instant::now();
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: group,
        backup_storage_uuid: bs,
        targets: vec![pb::RestoreTarget { volume_uuid: root.into(), install_path: s(&restored), format: "raw".into() }],
        system_tags: vec!["volumeLiveBackup::parallelismDegree::4".into()],
        ..Default::default()
    })
    .await
    .expect("restore");
    let secs = t.elapsed().as_secs_f64();
    out.push(Sample { tool: "vmbackup", corpus, op: "restore", secs, stored_mib: du(&store.data_dir.join("chunks")) });
}

fn restic(out: &mut Samples, corpus: &'static str, v1: &Path, v2: &Path, work: &Path) {
    let s = |p: &Path| p.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = s(&dir.path().join("repo"));
    let env = [("RESTIC_PASSWORD", "bench"), ("RESTIC_REPOSITORY", repo.as_str())];
    tool("restic", &["init", "--repository-version", "2"], &env);
    for (op, img) in [("full", v1), ("incremental", v2)] {
        // restic keys files by path: back both versions up under one name.
        let named = work.join("volume.raw");
        let _ = std::fs::remove_file(&named);
        std::fs::hard_link(img, &named).expect("link");
        let secs = timed(|| tool("restic", &["backup", &s(&named)], &env));
        out.push(Sample { tool: "restic", corpus, op, secs, stored_mib: du(&dir.path().join("repo")) });
    }
    let target = dir.path().join("out");
    let secs = timed(|| {
        tool("restic", &["restore", "latest", "--target", &s(&target)], &env);
        sync_file(&target.join(work.strip_prefix("/").unwrap_or(work)).join("volume.raw"));
    });
    out.push(Sample { tool: "restic", corpus, op: "restore", secs, stored_mib: du(&dir.path().join("repo")) });
}

fn borg(out: &mut Samples, corpus: &'static str, v1: &Path, v2: &Path, work: &Path) {
    let s = |p: &Path| p.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = s(&dir.path().join("repo"));
    let env = [("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes"), ("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")];
    tool("borg", &["init", "-e", "none", &repo], &env);
    for (i, (op, img)) in [("full", v1), ("incremental", v2)].into_iter().enumerate() {
        let named = work.join("volume.raw");
        let _ = std::fs::remove_file(&named);
        std::fs::hard_link(img, &named).expect("link");
        let archive = format!("{repo}::a{i}");
        let args = ["create", "--chunker-params", "fixed,4194304", "--sparse", "--compression", "zstd,1"];
        let secs = timed(|| {
            let mut a: Vec<&str> = args.to_vec();
            a.extend([archive.as_str(), named.to_str().unwrap_or_default()]);
            tool("borg", &a, &env)
        });
        out.push(Sample { tool: "borg", corpus, op, secs, stored_mib: du(&dir.path().join("repo")) });
    }
    let target = dir.path().join("out");
    std::fs::create_dir(&target).expect("mkdir");
    let secs = timed(|| {
        let run = Command::new("borg")
            .current_dir(&target)
            .args(["extract", "--sparse", &format!("{repo}::a1")])
            .envs(env)
            .output()
            .expect("borg");
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        sync_file(&target.join(work.strip_prefix("/").unwrap_or(work)).join("volume.raw"));
    });
    out.push(Sample { tool: "borg", corpus, op: "restore", secs, stored_mib: du(&dir.path().join("repo")) });
}

fn qemu_img(out: &mut Samples, corpus: &'static str, v1: &Path, v2: &Path) {
    let s = |p: &Path| p.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    for (op, img) in [("full", v1), ("incremental", v2)] {
        let copy = dir.path().join(format!("{op}.qcow2"));
        let secs = timed(|| {
            tool(
                "qemu-img",
                &["convert", "-c", "-m", "4", "-O", "qcow2", "-o", "compression_type=zstd", &s(img), &s(&copy)],
                &[],
            )
        });
        out.push(Sample { tool: "qemu-img convert", corpus, op, secs, stored_mib: du(dir.path()) });
    }
    let stored = du(dir.path());
    let restored = dir.path().join("restored.raw");
    let secs = timed(|| {
        let src = s(&dir.path().join("incremental.qcow2"));
        tool("qemu-img", &["convert", "-m", "4", "-O", "raw", &src, &s(&restored)], &[]);
        sync_file(&restored);
    });
    out.push(Sample { tool: "qemu-img convert", corpus, op: "restore", secs, stored_mib: stored });
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians per (tool, corpus, operation), in the order first measured, then vmbackup's
/// speed-up over every other tool.
fn report(samples: &Samples, sizes: &[(&str, u64)]) {
    let mut keys: Vec<(&str, &str, &str)> = Vec::new();
    for s in samples {
        if !keys.contains(&(s.tool, s.corpus, s.op)) {
            keys.push((s.tool, s.corpus, s.op));
        }
    }
    let mib_of = |corpus: &str| sizes.iter().find(|(c, _)| *c == corpus).map_or(0, |(_, m)| *m) as f64;
    let med = |k: &(&str, &str, &str)| {
        median(samples.iter().filter(|s| (s.tool, s.corpus, s.op) == *k).map(|s| s.secs).collect())
    };
    let rounds = samples.iter().filter(|s| (s.tool, s.corpus, s.op) == keys[0]).count();
    println!("\nmedian of {rounds} rounds; restores are timed until the file is on disk");
    println!(
        "{:<18} {:<10} {:<12} {:>8} {:>10} {:>11}",
        "tool", "corpus", "operation", "seconds", "MiB/s", "stored MiB"
    );
    for k in &keys {
        let stored = samples.iter().rfind(|s| (s.tool, s.corpus, s.op) == *k).map_or(0.0, |s| s.stored_mib);
        let secs = med(k);
        println!("{:<18} {:<10} {:<12} {secs:>8.2} {:>10.0} {stored:>11.0}", k.0, k.1, k.2, mib_of(k.1) / secs);
    }
    println!("\nvmbackup's speed-up (their median seconds / ours)");
    for k in keys.iter().filter(|k| k.0 != "vmbackup") {
        let ours = ("vmbackup", k.1, k.2);
        if keys.contains(&ours) {
            println!("vs {:<16} {:<10} {:<12} {:>6.2}x", k.0, k.1, k.2, med(k) / med(&ours));
        }
    }
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("VMBACKUP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let real_mib: u64 = std::env::var("VMBACKUP_BENCH_REAL_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    let rounds: usize = std::env::var("VMBACKUP_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
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
    // VMBACKUP_BENCH_TOOLS=vmbackup,borg runs only those (for profiling one of them).
    let only = std::env::var("VMBACKUP_BENCH_TOOLS").unwrap_or_default();
    let wanted = |t: &str| only.is_empty() || only.split(',').any(|o| o == t);
    let w = work.path();
    let mut samples = Samples::new();
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
