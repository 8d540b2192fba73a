//! vmbackup side by side with the tools users would otherwise pick, on the same corpus and
//! machine in one run: restic (repository v2, compression auto), borg (fixed 4 MiB chunks,
//! sparse, zstd level 1: the settings closest to vmbackup's) and `qemu-img convert`
//! (a compressed qcow2 copy, no dedup, no history). Each backs up the corpus volume (full),
//! then its second version (incremental; only vmbackup and the dedup tools benefit), then
//! restores the second version. Prints seconds, MiB/s of logical size and repository size.
//! Reported, never asserted.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench compare`
//! (restic, borgbackup and qemu-utils installed; `VMBACKUP_BENCH_MIB`, default 1024).

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

fn row(tool: &str, op: &str, mib: u64, secs: f64, repo: f64) {
    println!("{tool:<30} {op:<12} {secs:>8.2} {:>10.0} {repo:>12.0}", mib as f64 / secs);
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

async fn vmbackup(label: &str, v1: &Path, v2: &Path, format: &str, mib: u64, work: &Path) {
    let s = |p: &Path| p.display().to_string();
    let _ = (format, work);
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
        row(&format!("vmbackup {label}"), op, mib, t.elapsed().as_secs_f64(), du(&store.data_dir.join("chunks")));
        group = inv[0].group_uuid.clone();
    }
    let out = dir.path().join("restored.raw");
    let t = Instant::now();
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: group,
        backup_storage_uuid: bs,
        targets: vec![pb::RestoreTarget { volume_uuid: root.into(), install_path: s(&out), format: "raw".into() }],
        system_tags: vec!["volumeLiveBackup::parallelismDegree::4".into()],
        ..Default::default()
    })
    .await
    .expect("restore");
    row(&format!("vmbackup {label}"), "restore", mib, t.elapsed().as_secs_f64(), du(&store.data_dir.join("chunks")));
}

fn restic(label: &str, v1: &Path, v2: &Path, format: &str, mib: u64, work: &Path) {
    let s = |p: &Path| p.display().to_string();
    let _ = (format, work);
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
        row(&format!("restic {label}"), op, mib, secs, du(&dir.path().join("repo")));
    }
    let target = dir.path().join("out");
    let secs = timed(|| tool("restic", &["restore", "latest", "--target", &s(&target)], &env));
    row(&format!("restic {label}"), "restore", mib, secs, du(&dir.path().join("repo")));
}

fn borg(label: &str, v1: &Path, v2: &Path, format: &str, mib: u64, work: &Path) {
    let s = |p: &Path| p.display().to_string();
    let _ = (format, work);
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
        row(&format!("borg {label}"), op, mib, secs, du(&dir.path().join("repo")));
    }
    let target = dir.path().join("out");
    std::fs::create_dir(&target).expect("mkdir");
    let secs = timed(|| {
        let out = Command::new("borg")
            .current_dir(&target)
            .args(["extract", "--sparse", &format!("{repo}::a1")])
            .envs(env)
            .output()
            .expect("borg");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    });
    row(&format!("borg {label}"), "restore", mib, secs, du(&dir.path().join("repo")));
}

fn qemu_img(label: &str, v1: &Path, v2: &Path, format: &str, mib: u64, work: &Path) {
    let s = |p: &Path| p.display().to_string();
    let _ = (format, work);
    let dir = tempfile::tempdir().expect("tempdir");
    for (op, img) in [("full", v1), ("incremental", v2)] {
        let out = dir.path().join(format!("{op}.qcow2"));
        let secs = timed(|| {
            tool(
                "qemu-img",
                &["convert", "-c", "-m", "4", "-O", "qcow2", "-o", "compression_type=zstd", &s(img), &s(&out)],
                &[],
            )
        });
        row(&format!("qemu-img {label}"), op, mib, secs, du(dir.path()));
    }
    let out = dir.path().join("restored.raw");
    let secs = timed(|| {
        let src = s(&dir.path().join("incremental.qcow2"));
        tool("qemu-img", &["convert", "-m", "4", "-O", "raw", &src, &s(&out)], &[]);
    });
    row(&format!("qemu-img {label}"), "restore", mib, secs, du(dir.path()));
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("VMBACKUP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let work = tempfile::tempdir().expect("tempdir");
    let (v1, v2) = (work.path().join("v1.raw"), work.path().join("v2.raw"));
    corpus::make_volume(&v1, mib, 0);
    corpus::make_volume(&v2, mib, 1);
    let (q1, q2) = (work.path().join("v1.qcow2"), work.path().join("v2.qcow2"));
    corpus::to_qcow2(&v1, &q1);
    corpus::to_qcow2(&v2, &q2);
    let real_mib = 1024;
    let (e1, e2) = (work.path().join("e1.raw"), work.path().join("e2.raw"));
    corpus::make_ext4(&e1, real_mib, Path::new("/usr/share"));
    corpus::rewrite_regions(&e1, &e2, 20);
    println!(
        "synthetic: {mib} MiB raw volume (and the same as qcow2); its second version rewrites 5% of its 4 MiB regions"
    );
    println!("real: a {real_mib} MiB ext4 image of /usr/share; its second version rewrites 5% of its regions");
    println!("{:<30} {:<12} {:>8} {:>10} {:>12}", "tool", "operation", "seconds", "MiB/s", "stored MiB");
    let w = work.path();
    vmbackup("synthetic", &v1, &v2, "raw", mib, w).await;
    vmbackup("synthetic qcow2", &q1, &q2, "qcow2", mib, w).await;
    vmbackup("real", &e1, &e2, "raw", real_mib, w).await;
    restic("synthetic", &v1, &v2, "raw", mib, w);
    restic("real", &e1, &e2, "raw", real_mib, w);
    borg("synthetic", &v1, &v2, "raw", mib, w);
    borg("real", &e1, &e2, "raw", real_mib, w);
    qemu_img("synthetic", &v1, &v2, "raw", mib, w);
    qemu_img("real", &e1, &e2, "raw", real_mib, w);
}
