//! What the comparison benches share: one measured operation ([`Sample`]), vmbackup's
//! full/incremental/restore sequence ([`vmbackup`]), timing of other tools' commands
//! ([`timed`], [`sync_file`]) and the report (medians, min and max, speed-ups).

#![allow(dead_code)]

use std::path::Path;
use std::time::Instant;

use vmbackup_proto::agent::v1 as pb;

use crate::common;
use crate::measure::{self, Cost};

pub fn du(p: &Path) -> f64 {
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
pub struct Sample {
    tool: &'static str,
    corpus: &'static str,
    op: &'static str,
    secs: f64,
    cpu: f64,
    /// Peak RSS: one figure, or vmbackup's agent and store.
    peak: String,
    stored_mib: f64,
    /// Requests the object store served during the operation, and the CPU seconds its
    /// servers (radosgw, OSD) spent, when measured.
    server: Option<(u64, f64)>,
}

#[derive(Default)]
pub struct Samples(Vec<Sample>);

impl Samples {
    pub fn push(
        &mut self,
        tool: &'static str,
        corpus: &'static str,
        op: &'static str,
        secs: f64,
        cost: Cost,
        repo: &Path,
    ) {
        let peak = cost.peak_mib.to_string();
        self.0.push(Sample { tool, corpus, op, secs, cpu: cost.cpu, peak, stored_mib: du(repo), server: None });
    }

    /// Sets the object store's requests and CPU of the last sample.
    pub fn set_server(&mut self, n: Option<(u64, f64)>) {
        if let Some(s) = self.0.last_mut() {
            s.server = n;
        }
    }
}

/// Times a command run through the rusage wrapper.
pub fn timed(program: &str, args: &[&str], env: &[(&str, &str)], dir: Option<&Path>) -> (f64, Cost) {
    let t = Instant::now();
    let cost = measure::run(program, args, env, dir);
    (t.elapsed().as_secs_f64(), cost)
}

/// `sync <file>`: fsync of the restored file, so every restore ends with its data on disk.
pub fn sync_file(p: &Path) -> (f64, Cost) {
    timed("sync", &[&p.display().to_string()], &[], None)
}

/// A restore and the sync after it, as one operation.
pub fn with_sync((secs, cost): (f64, Cost), (s2, c2): (f64, Cost)) -> (f64, Cost) {
    (secs + s2, Cost { cpu: cost.cpu + c2.cpu, peak_mib: cost.peak_mib.max(c2.peak_mib) })
}

/// vmbackup's full backup of `v1`, incremental of `v2` and restore, as `tool`, with a
/// fresh agent and store (4 MiB chunks; `store_config` picks its backend). `server`
/// reads the object store's request counter and CPU seconds, when there is one.
pub async fn vmbackup(
    out: &mut Samples,
    tool: &'static str,
    corpus: &'static str,
    imgs: (&Path, &Path, &str),
    store_config: Option<&Path>,
    server: &dyn Fn() -> Option<(u64, f64)>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::start_store_with(dir.path(), "store", store_config, 4 << 20);
    let agent = bench_agent(dir.path(), imgs.0, "");
    let bs = common::add_storage(&agent, &store, "bench").await;
    let daemons = [agent.pid(), store.pid()];
    operations(out, (tool, corpus), imgs, &agent, &daemons, &store.data_dir.join("chunks"), &bs, server).await;
}

/// The same sequence into the agent's embedded store: chunks go from the pipeline into the
/// local chunk store in-process (no gRPC hop, no second check of what the agent hashed).
pub async fn vmbackup_embedded(
    out: &mut Samples,
    tool: &'static str,
    corpus: &'static str,
    imgs: (&Path, &Path, &str),
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = bench_agent_with(dir.path(), imgs.0, "", true);
    let bs = common::embedded_storage(&agent).await;
    let chunks = agent.data_dir.join("store/chunks");
    operations(out, (tool, corpus), imgs, &agent, &[agent.pid()], &chunks, &bs, &|| None).await;
}

/// The same sequence into a Ceph backup storage: a fresh agent writing `pool` directly
/// (monitor `mon`, `keyring`), no store server in the data path.
pub async fn vmbackup_ceph(
    out: &mut Samples,
    tool: &'static str,
    corpus: &'static str,
    imgs: (&Path, &Path, &str),
    (mon, pool, keyring): (&str, &str, &Path),
    server: &dyn Fn() -> Option<(u64, f64)>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ceph = format!("[ceph]\nconf = \"{}\"\n", dir.path().join("no-ceph.conf").display());
    let agent = bench_agent(dir.path(), imgs.0, &ceph);
    let mut s = common::storage_client(&agent, Some(common::session(&agent))).await;
    let bs = s
        .add_ceph_backup_storage(pb::AddCephBackupStorageRequest {
            name: "bench".into(),
            mon_urls: vec![mon.into()],
            pool_name: pool.into(),
            keyring_path: keyring.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("add ceph storage")
        .into_inner()
        .inventory
        .expect("inventory")
        .uuid;
    let nowhere = dir.path().join("none");
    operations(out, (tool, corpus), imgs, &agent, &[agent.pid()], &nowhere, &bs, server).await;
}

/// An agent under `dir` whose volume roots include the corpus folder of `v1`, with `extra`
/// configuration.
fn bench_agent(dir: &Path, v1: &Path, extra: &str) -> common::Daemon {
    bench_agent_with(dir, v1, extra, false)
}

/// [`bench_agent`], with its embedded store or without.
fn bench_agent_with(dir: &Path, v1: &Path, extra: &str, embedded_store: bool) -> common::Daemon {
    let corpus_dir = v1.parent().unwrap_or(Path::new("/"));
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, format!("[volumes]\nroots = [\"{}\"]\n{extra}", corpus_dir.display())).expect("agent config");
    common::start_agent(dir, common::AgentOptions { config: Some(cfg), embedded_store })
}

/// Reads every file under `p` once, so that the timed step after it finds its input in the
/// page cache whatever ran before (another tool's run may have pushed it out), then writes
/// every dirty page of the machine to disk (`sync`), so that the step does not pay for the
/// writeback of what ran before it (every tool here syncs what it stores, and would otherwise
/// queue behind the previous tool's repository on the disk).
pub fn warm(p: &Path) {
    read_all(p);
    let synced = std::process::Command::new("sync").status().expect("sync");
    assert!(synced.success(), "sync failed: {synced}");
}

fn read_all(p: &Path) {
    fn walk(p: &Path, buf: &mut [u8]) {
        use std::io::Read;
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => {
                for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                    walk(&e.path(), buf);
                }
            }
            Ok(m) if m.is_file() => {
                if let Ok(mut f) = std::fs::File::open(p) {
                    while matches!(f.read(buf), Ok(n) if n > 0) {}
                }
            }
            _ => {}
        }
    }
    walk(p, &mut vec![0u8; 1 << 20]);
}

/// Full backup, incremental, restore through `agent` to backup storage `bs`, each timed
/// with the CPU and peak RSS of `daemons`.
#[allow(clippy::too_many_arguments)]
async fn operations(
    out: &mut Samples,
    (tool, corpus): (&'static str, &'static str),
    (v1, v2, format): (&Path, &Path, &str),
    agent: &common::Daemon,
    daemons: &[u32],
    chunks: &Path,
    bs: &str,
    server: &dyn Fn() -> Option<(u64, f64)>,
) {
    let s = |p: &Path| p.display().to_string();
    let mut c = common::backup_client(agent).await;
    let root = "edc07fe8d8a335ec8aa00f23b88fc1c6";
    let tags = vec!["volumeLiveBackup::parallelismDegree::4".to_string()];
    let cpu = || daemons.iter().map(|p| measure::cpu_seconds(*p)).sum::<f64>();
    // Each operation: CPU of the daemons, and the peak of each since the operation began.
    // The server's meter (a `ceph` command, a Python start of a few hundred ms) is read
    // before the clock starts and after it stops, never inside the timed step.
    let begin = || {
        daemons.iter().for_each(|p| measure::reset_peak(*p));
        let (server0, cpu0) = (server(), cpu());
        (Instant::now(), cpu0, server0)
    };
    let end = |out: &mut Samples, op: &'static str, (t, cpu0, server0): (Instant, f64, Option<(u64, f64)>)| {
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu() - cpu0;
        let peak = daemons.iter().map(|p| measure::peak_rss_mib(*p).to_string()).collect::<Vec<_>>().join(" / ");
        let server = server0.zip(server()).map(|(a, b)| (b.0.saturating_sub(a.0), b.1 - a.1));
        out.0.push(Sample { tool, corpus, op, secs, cpu, peak, stored_mib: du(chunks), server });
    };
    let mut group = String::new();
    for (op, img) in [("full", v1), ("incremental", v2)] {
        let req = pb::CreateVmBackupRequest {
            root_volume_uuid: root.into(),
            backup_storage_uuid: bs.to_string(),
            name: op.into(),
            system_tags: tags.clone(),
            vm: Some(common::one_volume_vm("9ff17180fded31c2b9e4e5751ebcb2ba", root, img, format)),
            ..Default::default()
        };
        warm(img);
        let started = begin();
        let inv = c.create_vm_backup(req).await.expect("backup").into_inner().inventories;
        end(out, op, started);
        group = inv[0].group_uuid.clone();
    }
    let restored = agent.data_dir.parent().unwrap_or(Path::new("/tmp")).join("restored.raw");
    warm(chunks);
    let started = begin();
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: group,
        backup_storage_uuid: bs.to_string(),
        targets: vec![pb::RestoreTarget { volume_uuid: root.into(), install_path: s(&restored), format: "raw".into() }],
        system_tags: tags,
        ..Default::default()
    })
    .await
    .expect("restore");
    end(out, "restore", started);
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians per (tool, corpus, operation), in the order first measured, then vmbackup's
/// speed-up over every other tool.
pub fn report(samples: &Samples, sizes: &[(&str, u64)]) {
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
        "{:<17} {:<10} {:<12} {:>7} {:>13} {:>7} {:>9} {:>14} {:>7} {:>9} {:>12}",
        "tool",
        "corpus",
        "operation",
        "seconds",
        "min-max s",
        "MiB/s",
        "MiB/CPU-s",
        "peak RSS MiB",
        "stored",
        "requests",
        "server CPU-s"
    );
    for k in &keys {
        let secs = med_secs(k);
        let cpu = median(of(k).iter().map(|s| s.cpu).collect());
        let all = of(k);
        let last = all.last().expect("a sample");
        let requests = last.server.map_or_else(|| "-".to_string(), |n| n.0.to_string());
        let server_cpu = of(k).iter().filter_map(|s| s.server.map(|n| n.1)).collect::<Vec<_>>();
        let server_cpu = if server_cpu.is_empty() { "-".to_string() } else { format!("{:.2}", median(server_cpu)) };
        let lo = all.iter().map(|s| s.secs).fold(f64::INFINITY, f64::min);
        let hi = all.iter().map(|s| s.secs).fold(0.0, f64::max);
        println!(
            "{:<17} {:<10} {:<12} {secs:>7.2} {:>13} {:>7.0} {:>9.0} {:>14} {:>7.0} {requests:>9} {server_cpu:>12}",
            k.0,
            k.1,
            k.2,
            format!("{lo:.2}-{hi:.2}"),
            mib_of(k.1) / secs,
            mib_of(k.1) / cpu.max(0.001),
            last.peak,
            last.stored_mib
        );
    }
    println!("\nvmbackup's speed-up (their median seconds / ours)");
    for ours in keys.iter().filter(|k| k.0.starts_with("vmbackup")) {
        for k in keys.iter().filter(|k| k.0 != ours.0 && (k.1, k.2) == (ours.1, ours.2)) {
            println!(
                "{:<17} vs {:<16} {:<10} {:<12} {:>6.2}x (min {:.2}x, max {:.2}x)",
                ours.0,
                k.0,
                k.1,
                k.2,
                med_secs(k) / med_secs(ours),
                ratio(&of(k), &of(ours), f64::min),
                ratio(&of(k), &of(ours), f64::max),
            );
        }
    }
}

/// The extreme (by `pick`) of their seconds over ours, round by round.
fn ratio(theirs: &[&Sample], ours: &[&Sample], pick: fn(f64, f64) -> f64) -> f64 {
    let r = theirs.iter().zip(ours).map(|(t, o)| t.secs / o.secs.max(1e-9));
    r.reduce(pick).unwrap_or(0.0)
}
