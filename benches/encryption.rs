//! What client-side encryption costs: a full backup and a restore of the same corpus into
//! a plain and into an encrypted backup storage, side by side in one run (the two modes
//! alternate within each round; the corpus is read once first so both find it in the page
//! cache). Each round starts from empty stores. Prints MiB/s of logical size as median
//! (min..max) over the rounds, agent + store CPU-seconds, and encrypted / plain. Reported,
//! never asserted.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench encryption`
//! (`VMBACKUP_BENCH_MIB`, default 2048; `VMBACKUP_BENCH_ROUNDS`, default 3).

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/corpus.rs"]
mod corpus;
#[path = "support/measure.rs"]
mod measure;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use measure::cpu_seconds;
use vmbackup_proto::agent::v1 as pb;

const VM: &str = "9ff17180fded31c2b9e4e5751ebcb2ba";
const ROOT: &str = "edc07fe8d8a335ec8aa00f23b88fc1c6";

fn private(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Backup MiB/s, restore MiB/s, backup CPU-s, restore CPU-s.
type Row = (f64, f64, f64, f64);

/// One round in one mode.
async fn round(dir: &Path, img: &Path, mib: u64, key: Option<&Path>) -> Row {
    let store = common::start_store_with(dir, "store", None, 4 << 20);
    let agent_config = dir.join("agent.toml");
    // The corpus folder is a volume root; the key when encrypted.
    let mut text = format!("[volumes]\nroots = [\"{}\"]\n", img.parent().expect("corpus dir").display());
    if let Some(k) = key {
        let pass = k.with_extension("pass");
        text += &format!("[keys.bench]\nfile = \"{}\"\npassphrase_file = \"{}\"\n", k.display(), pass.display());
    }
    std::fs::write(&agent_config, text).expect("agent config");
    let agent = common::start_agent(dir, common::AgentOptions { config: Some(agent_config), ..Default::default() });
    let bs = common::storage_client(&agent, Some(common::session(&agent)))
        .await
        .add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "bench".into(),
            url: store.url(),
            token: common::store_token(&store),
            system_tags: key.map(|_| "backup::encryption::key::bench".to_string()).into_iter().collect(),
            ..Default::default()
        })
        .await
        .expect("add storage")
        .into_inner()
        .inventory
        .expect("inventory")
        .uuid;
    let pids = [agent.pid(), store.pid()];
    let cpu = || pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let mut c = common::backup_client(&agent).await;
    let (cpu0, start) = (cpu(), Instant::now());
    let inv = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs.clone(),
            name: "full".into(),
            vm: Some(common::one_volume_vm(VM, ROOT, img, "raw")),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories;
    let (backup_secs, backup_cpu) = (start.elapsed().as_secs_f64(), cpu() - cpu0);
    let out = dir.join("restored.raw");
    let (cpu0, start) = (cpu(), Instant::now());
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: inv[0].group_uuid.clone(),
        backup_storage_uuid: bs,
        targets: vec![pb::RestoreTarget {
            volume_uuid: ROOT.into(),
            install_path: out.display().to_string(),
            format: "raw".into(),
        }],
        ..Default::default()
    })
    .await
    .expect("restore");
    let (restore_secs, restore_cpu) = (start.elapsed().as_secs_f64(), cpu() - cpu0);
    let mib = mib as f64;
    (mib / backup_secs, mib / restore_secs, backup_cpu, restore_cpu)
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("VMBACKUP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    let rounds: usize = std::env::var("VMBACKUP_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    corpus::prefault_free_memory();
    let corpus_dir = tempfile::tempdir().expect("tempdir");
    let img = corpus_dir.path().join("v1.raw");
    corpus::make_volume(&img, mib, 1);
    let _ = std::fs::read(&img).expect("warm the corpus");
    let key_dir = tempfile::tempdir().expect("tempdir");
    let key = key_dir.path().join("bench.key");
    private(&key.with_extension("pass"), "bench passphrase\n");
    let made = std::process::Command::new(common::bin("vmbackupctl"))
        .args(["key", "create", "--file", &key.display().to_string(), "--passphrase-file"])
        .arg(key.with_extension("pass"))
        .output()
        .expect("vmbackupctl key create");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));

    let mut results: [Vec<Row>; 2] = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        for (mode, k) in [(0, None), (1, Some(key.as_path()))] {
            let dir = tempfile::tempdir().expect("tempdir");
            results[mode].push(round(dir.path(), &img, mib, k).await);
        }
        eprintln!("round {} of {rounds} done", r + 1);
    }
    println!(
        "corpus: {mib} MiB raw volume (40% holes, 20% random, 25% text, 15% repeats), 4 MiB chunks, store on loopback, {rounds} rounds"
    );
    println!("{:<10} {:<8} {:>24} {:>12}", "operation", "mode", "MiB/s median (min..max)", "CPU-s median");
    let mut medians = [[0.0; 2]; 2];
    type Pick = fn(&Row) -> f64;
    let ops: [(&str, Pick, Pick); 2] = [("backup", |t| t.0, |t| t.2), ("restore", |t| t.1, |t| t.3)];
    for (op, pick_rate, pick_cpu) in ops {
        for (mode, name) in [(0, "plain"), (1, "sealed")] {
            let rates: Vec<f64> = results[mode].iter().map(pick_rate).collect();
            let cpus: Vec<f64> = results[mode].iter().map(pick_cpu).collect();
            let (med, min, max) = stats(&rates);
            let i = usize::from(op == "restore");
            medians[i][mode] = med;
            println!("{op:<10} {name:<8} {:>10.0} ({min:.0}..{max:.0}) {:>12.2}", med, stats(&cpus).0);
        }
    }
    println!(
        "sealed / plain: backup {:.2}, restore {:.2}",
        medians[0][1] / medians[0][0],
        medians[1][1] / medians[1][0]
    );
}
