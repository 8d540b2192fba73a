//! The fault campaign (issue #21): a seeded loop of random operations over one agent, two
//! Image Storages and three VMs, with processes killed and the network broken in the middle
//! of them, checking after every fault that nothing committed was lost and nothing
//! half-done is visible.
//!
//! **World.** One `vmbackup-agent`, two `vmbackup-store`s (64 KiB chunks, both added to the
//! agent, in their own network namespace: needs root and iproute2), and three VMs: `db`
//! (raw root, qcow2 data) and `web` (qcow2 root), stopped, and `live` (qcow2 root, raw data)
//! running under a `qemu-storage-daemon` with a QMP monitor and NBD exports through which
//! the test writes as its guest. Everything is a real process.
//!
//! **Operations** (weighted random choice, one at a time): guest writes (qemu-io, random
//! bytes, patterns and zeroes), backups (full when the VM has no group on that store yet,
//! else incremental; live for `live`), restores to new raw or qcow2 files, reverts of a
//! stopped VM, recovers of a group to the other store, deletes, SyncVmBackup, store GC,
//! store Verify, and volume snapshot groups of a stopped VM (taken, then deleted).
//!
//! **Faults.** With the fault probability, an operation runs as a background task; after a
//! random delay (the operation is throttled to last a second or two) one fault is injected:
//! SIGKILL of the agent (started again on the same data directory and address), SIGKILL of
//! a store (started again after a random pause), a graceful restart of a store (SIGTERM),
//! SIGKILL of the `qemu-storage-daemon` (started again on the same images once the
//! operation ended), or a network fault between the agent and the stores: the stores run
//! in a network namespace of their own, joined to the agent's by one veth link, which is
//! throttled by a `tc tbf` queue until the operation ends (4 Mbit/s with a 300 ms queue:
//! slow; 2 Mbit/s with a 2 ms queue: lossy), or goes down for 0.2 to 3 s. A backup or
//! recover that failed is then retried with the same request.
//!
//! **Invariants**, checked after every fault, every few operations and at the end:
//! - every group whose backup (or recover) returned success is visible on its stores, and
//!   restores bit-identical to the BLAKE3 digests of its volumes taken when it started;
//!   a restore killed midway leaves no target, or a complete and correct one; a revert
//!   leaves each volume as it was or as the group holds it;
//! - every group a store shows is one the test started (a failed call may still have
//!   committed; such a group is then held to the same rules);
//! - no file in a store's `tmp/`, every store's Verify finds nothing bad;
//! - the agent's catalog (QueryVolumeBackup: group uuids per storage) equals what the stores
//!   hold, and SyncVmBackup leaves it unchanged;
//! - no `*.vmbackup-*` file (restore partial or live overlay) and no `*-snap-*` overlay
//!   anywhere under the test's directory, no vmbackup overlay node in the running VM's block
//!   graph; after a snapshot group is deleted, the VM is registered on its own files again
//!   and its data is unchanged;
//! - no store session open once jobs ended (one per store is tolerated for the store's
//!   300 s session TTL after the agent was SIGKILLed mid-job: nothing can close it);
//! - a retried backup or recover succeeds and re-sends no chunk the store already has
//!   (`chunks_already_present` of the store's counters does not move);
//! - every operation without a fault succeeds, and none hangs.
//!
//! A violation is recorded (with the operation log), the world is repaired if it must be
//! (SyncVmBackup, merging a leftover overlay offline) and the campaign goes on; the test
//! fails at the end if any was found, printing the seed and the log.
//!
//! **Scale** (environment): `VMBACKUP_SOAK_SEED` (default 21), `VMBACKUP_SOAK_OPS`
//! (default 80), `VMBACKUP_SOAK_FAULT_PCT` (percent of operations that get a fault, default
//! 35), `VMBACKUP_SOAK_MINUTES` (stop early after that long; 0: no limit). The last line is
//! a JSON summary. A long run: `VMBACKUP_SOAK_OPS=600 cargo test --release --test soak --
//! --nocapture` (after `cargo build --release --workspace --bins`). The seed fixes the
//! sequence of operations, faults and delays; where a fault lands inside an operation
//! still depends on timing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::qsd::Qsd;
use common::{Daemon, run_tool};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

const CHUNK_SIZE: u32 = 64 << 10;
/// The store's session TTL (its DEFAULT_TTL): how long a session of a killed agent lives.
const SESSION_TTL: Duration = Duration::from_secs(300);
/// An operation that has not ended after this long is a violation (a hang).
const OP_TIMEOUT: Duration = Duration::from_secs(180);
/// Throttle of an operation a fault is aimed at, so it lasts long enough to be hit.
const SLOW: i64 = 6 << 20;

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// splitmix64: tiny, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(u64::try_from(n).expect("usize fits u64"))).expect("below n fits usize")
    }

    fn percent(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    fn uuid(&mut self) -> String {
        format!("{:016x}{:016x}", self.next(), self.next())
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
        Err(_) => default,
    }
}

struct Settings {
    seed: u64,
    ops: u64,
    fault_pct: u64,
    minutes: u64,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            seed: env_u64("VMBACKUP_SOAK_SEED", 21),
            ops: env_u64("VMBACKUP_SOAK_OPS", 80),
            fault_pct: env_u64("VMBACKUP_SOAK_FAULT_PCT", 35),
            minutes: env_u64("VMBACKUP_SOAK_MINUTES", 0),
        }
    }
}

/// A volume of a test VM.
#[derive(Clone, Debug)]
struct Volume {
    uuid: String,
    kind: &'static str,
    path: PathBuf,
    format: &'static str,
    size: u64,
    /// The live VM's NBD export name of this disk.
    export: &'static str,
}

struct Vm {
    name: &'static str,
    uuid: String,
    volumes: Vec<Volume>,
    live: bool,
}

/// A group the test started: what its volumes held, and where it is.
#[derive(Clone, Debug)]
struct Group {
    vm: usize,
    name: String,
    /// BLAKE3 of each volume's raw content (in `Vm::volumes` order) when the backup started.
    digests: Vec<String>,
    /// Stores (0, 1) it is committed on.
    on: BTreeSet<usize>,
    /// A delete was asked for: it may vanish.
    deleting: bool,
    /// Restores of a copy already checked (store indexes).
    restored: BTreeSet<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    KillAgent,
    KillStore(usize),
    RestartStore(usize),
    KillQemu,
    /// The link to the stores throttled with a deep queue (packets wait up to 300 ms), until
    /// the operation ends.
    NetSlow,
    /// The link to the stores throttled with almost no queue (packets beyond it are dropped),
    /// until the operation ends.
    NetDrop,
    /// The link to the stores down for a while.
    NetCut,
}

impl Fault {
    fn kind(self) -> &'static str {
        match self {
            Fault::KillAgent => "sigkill_agent",
            Fault::KillStore(_) => "sigkill_store",
            Fault::RestartStore(_) => "restart_store",
            Fault::KillQemu => "sigkill_qemu",
            Fault::NetSlow => "net_slow",
            Fault::NetDrop => "net_drop",
            Fault::NetCut => "net_cut",
        }
    }
}

#[derive(Default)]
struct Stats {
    ops: BTreeMap<&'static str, u64>,
    faults: BTreeMap<&'static str, u64>,
    faults_mid_op: u64,
    checks: u64,
    restores_checked: u64,
    retries: u64,
    op_errors: u64,
    committed_despite_error: u64,
    violations: Vec<String>,
    log: Vec<String>,
}

struct World {
    dir: tempfile::TempDir,
    agent: Daemon,
    stores: Vec<Daemon>,
    bs: Vec<String>,
    vms: Vec<Vm>,
    qsd: Option<Qsd>,
    /// Committed groups (and those being deleted).
    groups: BTreeMap<String, Group>,
    /// Backups started whose call failed: they may have committed anyway.
    attempted: BTreeMap<String, Group>,
    /// Groups whose delete succeeded.
    deleted: BTreeSet<String>,
    /// When the agent was SIGKILLed mid-job, per store: a session may stay open until its TTL.
    orphans: Vec<Vec<Instant>>,
    rng: Rng,
    settings: Settings,
    stats: Stats,
    seq: u64,
    /// The stores' network namespace; dropped last.
    net: Net,
}

/// The stores live in their own network namespace, joined to the test's (where the agent
/// runs) by one veth link: shaping and link-down on it are the network faults.
struct Net {
    ns: String,
    /// The link's two ends: in the test's namespace, in the stores'.
    here: String,
    there: String,
}

/// The stores' address inside their namespace.
const STORE_IP: &str = "10.203.0.2";

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("ip not found: install iproute2");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn tc(netns: Option<&str>, args: &[&str]) -> Result<(), String> {
    let mut cmd = std::process::Command::new(if netns.is_some() { "ip" } else { "tc" });
    if let Some(ns) = netns {
        cmd.args(["netns", "exec", ns, "tc"]);
    }
    let out = cmd.args(args).output().expect("tc not found: install iproute2");
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).to_string()) }
}

impl Net {
    fn new() -> Net {
        let id = std::process::id() % 100_000;
        let net = Net { ns: format!("vmbk-soak{id}"), here: format!("vsk{id}h"), there: format!("vsk{id}t") };
        ip(&["netns", "add", &net.ns]);
        ip(&["-n", &net.ns, "link", "set", "lo", "up"]);
        ip(&["link", "add", &net.here, "type", "veth", "peer", "name", &net.there, "netns", &net.ns]);
        ip(&["addr", "add", "10.203.0.1/24", "dev", &net.here]);
        ip(&["-n", &net.ns, "addr", "add", &format!("{STORE_IP}/24"), "dev", &net.there]);
        ip(&["link", "set", &net.here, "up"]);
        ip(&["-n", &net.ns, "link", "set", &net.there, "up"]);
        net
    }

    /// The same token-bucket discipline on both ends of the link. (`tbf`, not `netem`: the
    /// kernels this runs on may lack `sch_netem`; a tbf queue delays and drops all the same.)
    fn shape(&self, args: &[&str]) {
        for (ns, dev) in [(None, self.here.as_str()), (Some(self.ns.as_str()), self.there.as_str())] {
            let mut a = vec!["qdisc", "replace", "dev", dev, "root", "tbf"];
            a.extend_from_slice(args);
            tc(ns, &a).unwrap_or_else(|e| panic!("tc {a:?}: {e}"));
        }
    }

    /// Removes the shaping.
    fn clear(&self) {
        for (ns, dev) in [(None, self.here.as_str()), (Some(self.ns.as_str()), self.there.as_str())] {
            let _ = tc(ns, &["qdisc", "del", "dev", dev, "root"]);
        }
    }

    fn link(&self, up: bool) {
        ip(&["link", "set", &self.here, if up { "up" } else { "down" }]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::process::Command::new("ip").args(["link", "del", &self.here]).status();
    }
}

/// A store inside the namespace, listening on [`STORE_IP`].
fn start_store_in(net: &Net, dir: &Path, name: &str) -> Daemon {
    let data = dir.join(name);
    // Plain gRPC off loopback is refused unless the network is declared isolated: it is.
    let config = dir.join("store.toml");
    std::fs::write(&config, "[tls]\ninsecure_plaintext = true\n").expect("writing the store config");
    let args = vec![
        "--config".to_string(),
        p(&config),
        "--listen".to_string(),
        format!("{STORE_IP}:0"),
        "--data-dir".to_string(),
        p(&data),
        "--chunk-size".to_string(),
        CHUNK_SIZE.to_string(),
        "--metrics-listen".to_string(),
        "127.0.0.1:0".to_string(),
    ];
    Daemon::start_in_netns(&net.ns, "vmbackup-store", args, data, dir.join(format!("{name}.log")))
}

impl World {
    fn log(&mut self, line: String) {
        eprintln!("[soak {:>4}] {line}", self.seq);
        self.stats.log.push(format!("{:>4} {line}", self.seq));
    }

    fn violation(&mut self, what: String) {
        let v = format!("op {}: {what}", self.seq);
        eprintln!("[soak {:>4}] VIOLATION {what}", self.seq);
        self.stats.log.push(format!("{:>4} VIOLATION {what}", self.seq));
        self.stats.violations.push(v);
    }

    async fn client(&self) -> common::BackupClient {
        common::backup_client(&self.agent).await
    }

    fn register(&self, vm: usize) -> pb::RegisterVmRequest {
        let v = &self.vms[vm];
        let qmp = if v.live { self.qsd.as_ref().map(|q| p(&q.qmp)).unwrap_or_default() } else { String::new() };
        pb::RegisterVmRequest {
            uuid: v.uuid.clone(),
            name: v.name.into(),
            qmp_socket: qmp,
            volumes: v
                .volumes
                .iter()
                .enumerate()
                .map(|(i, vol)| {
                    common::volume_spec(&vol.uuid, vol.kind, &vol.path, vol.format, i32::try_from(i).expect("few"))
                })
                .collect(),
            ..Default::default()
        }
    }

    fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join("scratch").join(name)
    }

    /// BLAKE3 of what the guest of `vm` sees on each volume now.
    fn vm_digests(&self, vm: usize) -> Vec<String> {
        let v = &self.vms[vm];
        v.volumes
            .iter()
            .map(|vol| {
                if v.live {
                    let out = self.scratch("live.raw");
                    let _ = std::fs::remove_file(&out);
                    self.qsd.as_ref().expect("the live VM runs").snapshot_to(vol.export, &out);
                    let d = digest_file(&out, "raw");
                    std::fs::remove_file(&out).expect("removing the scratch copy");
                    d
                } else {
                    digest_file(&vol.path, vol.format)
                }
            })
            .collect()
    }

    /// A fault for the next operation, with the delay before it, or none.
    fn plan_fault(&mut self, store: Option<usize>, live: bool, max_delay_ms: u64) -> Option<(Fault, Duration)> {
        if !self.rng.percent(self.settings.fault_pct) {
            return None;
        }
        let target = match store {
            Some(s) if self.rng.percent(80) => s,
            _ => self.rng.index(2),
        };
        let roll = self.rng.below(100);
        let qemu_weight = if live { 40 } else { 10 };
        let f = if self.rng.percent(25) {
            match self.rng.below(3) {
                0 => Fault::NetSlow,
                1 => Fault::NetDrop,
                _ => Fault::NetCut,
            }
        } else if roll < qemu_weight {
            Fault::KillQemu
        } else if roll < qemu_weight + (100 - qemu_weight) * 2 / 5 {
            Fault::KillAgent
        } else if roll < qemu_weight + (100 - qemu_weight) * 4 / 5 {
            Fault::KillStore(target)
        } else {
            Fault::RestartStore(target)
        };
        // A network fault lasts until the operation ends: start it early so it hits.
        let max =
            if matches!(f, Fault::NetSlow | Fault::NetDrop | Fault::NetCut) { max_delay_ms / 5 } else { max_delay_ms };
        Some((f, Duration::from_millis(self.rng.below(max.max(1)))))
    }

    /// Injects `f`; the op it hits is still running when `mid` is true.
    async fn inject(&mut self, f: Fault, mid: bool) {
        *self.stats.faults.entry(f.kind()).or_default() += 1;
        if mid {
            self.stats.faults_mid_op += 1;
        }
        self.log(format!("FAULT {f:?} ({})", if mid { "mid-operation" } else { "after the operation ended" }));
        match f {
            Fault::KillAgent => {
                self.agent.kill();
                if mid {
                    for o in &mut self.orphans {
                        o.push(Instant::now());
                    }
                }
                tokio::task::block_in_place(|| self.agent.restart());
            }
            Fault::KillStore(i) => {
                self.stores[i].kill();
                tokio::time::sleep(Duration::from_millis(self.rng.below(500))).await;
                tokio::task::block_in_place(|| self.stores[i].restart());
                self.orphans[i].clear();
            }
            Fault::RestartStore(i) => {
                tokio::task::block_in_place(|| self.stores[i].restart());
                self.orphans[i].clear();
            }
            Fault::KillQemu => {
                if let Some(q) = self.qsd.as_mut() {
                    let _ = q.child.kill();
                    let _ = q.child.wait();
                }
            }
            Fault::NetSlow => self.net.shape(&["rate", "4mbit", "burst", "32kb", "latency", "300ms"]),
            Fault::NetDrop => self.net.shape(&["rate", "2mbit", "burst", "4kb", "latency", "2ms"]),
            Fault::NetCut => {
                self.net.link(false);
                tokio::time::sleep(Duration::from_millis(200 + self.rng.below(2800))).await;
                self.net.link(true);
            }
        }
    }

    /// Runs one operation, injecting `fault` into it; None when it hung (a violation).
    async fn drive<T: Send + 'static>(
        &mut self,
        op: impl std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
        fault: Option<(Fault, Duration)>,
    ) -> Option<Result<T, tonic::Status>> {
        let mut task = tokio::spawn(op);
        if let Some((f, delay)) = fault {
            tokio::time::sleep(delay).await;
            let mid = !task.is_finished();
            self.inject(f, mid).await;
        }
        let r = match tokio::time::timeout(OP_TIMEOUT, &mut task).await {
            Ok(joined) => Some(joined.expect("the operation's task panicked")),
            Err(_) => {
                task.abort();
                self.violation(format!("the operation did not end within {OP_TIMEOUT:?}"));
                None
            }
        };
        match fault {
            Some((Fault::KillQemu, _)) => self.restart_qemu(),
            Some((Fault::NetSlow | Fault::NetDrop, _)) => self.net.clear(),
            _ => {}
        }
        r
    }

    fn live_vm(&self) -> Option<&Vm> {
        self.vms.iter().find(|v| v.live)
    }

    /// Starts the live VM's QEMU again on its images.
    fn restart_qemu(&mut self) {
        let Some(vm) = self.live_vm() else { return };
        let (root, data) = (vm.volumes[0].path.clone(), vm.volumes[1].path.clone());
        self.qsd = None;
        self.qsd = Some(Qsd::start(&self.dir.path().join("live"), &root, &data));
    }

    fn commit(&mut self, group: &str, store: usize) {
        if let Some(mut g) = self.attempted.remove(group) {
            g.on.clear();
            self.groups.insert(group.to_string(), g);
        }
        let g = self.groups.get_mut(group).expect("a group the test started");
        g.on.insert(store);
    }
}

/// BLAKE3 (hex) of the raw content of an image.
fn digest_file(path: &Path, format: &str) -> String {
    let bytes = if format == "raw" {
        std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    } else {
        let out = path.with_extension("digest.raw");
        run_tool("qemu-img", &["convert", "-U", "-f", format, "-O", "raw", &p(path), &p(&out)]);
        let b = std::fs::read(&out).expect("reading the converted image");
        std::fs::remove_file(&out).expect("removing the converted image");
        b
    };
    vmbackup_proto::Digest::of(&bytes).to_hex()
}

/// Writes `mib` MiB of random data at the start of a new `size`-byte image.
fn make_image(path: &Path, format: &str, size: u64, mib: usize, seed: u64) {
    let raw = if format == "raw" { path.to_path_buf() } else { path.with_extension("seed.raw") };
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&raw).expect("creating an image");
        f.set_len(size).expect("sizing the image");
        f.write_all(&common::pseudo_random(seed, mib << 20)).expect("writing the image's data");
        f.sync_all().expect("syncing the image");
    }
    if format != "raw" {
        run_tool("qemu-img", &["convert", "-f", "raw", "-O", format, &p(&raw), &p(path)]);
        std::fs::remove_file(&raw).expect("removing the seed");
    }
}

async fn setup(settings: Settings) -> World {
    let dir = tempfile::tempdir().expect("creating the campaign's directory");
    for d in ["scratch", "restores", "db", "web", "live"] {
        std::fs::create_dir_all(dir.path().join(d)).expect("creating a directory");
    }
    let mut rng = Rng(settings.seed);
    let vol = |uuid: String, kind: &'static str, path: PathBuf, format: &'static str, size: u64, export| Volume {
        uuid,
        kind,
        path,
        format,
        size,
        export,
    };
    let d = |sub: &str, name: &str| dir.path().join(sub).join(name);
    let vms = vec![
        Vm {
            name: "db",
            uuid: rng.uuid(),
            volumes: vec![
                vol(rng.uuid(), "Root", d("db", "root.raw"), "raw", 8 << 20, ""),
                vol(rng.uuid(), "Data", d("db", "data.qcow2"), "qcow2", 24 << 20, ""),
            ],
            live: false,
        },
        Vm {
            name: "web",
            uuid: rng.uuid(),
            volumes: vec![vol(rng.uuid(), "Root", d("web", "root.qcow2"), "qcow2", 16 << 20, "")],
            live: false,
        },
        Vm {
            name: "live",
            uuid: rng.uuid(),
            volumes: vec![
                vol(rng.uuid(), "Root", d("live", "root.qcow2"), "qcow2", 8 << 20, "root"),
                vol(rng.uuid(), "Data", d("live", "data.raw"), "raw", 4 << 20, "data"),
            ],
            live: true,
        },
    ];
    for (i, vm) in vms.iter().enumerate() {
        for (j, v) in vm.volumes.iter().enumerate() {
            let mib = usize::try_from(v.size >> 21).expect("small");
            make_image(&v.path, v.format, v.size, mib, settings.seed ^ (u64::try_from(i * 10 + j).expect("few") << 32));
        }
    }
    let net = Net::new();
    let stores = vec![start_store_in(&net, dir.path(), "store-a"), start_store_in(&net, dir.path(), "store-b")];
    let agent = common::start_agent(dir.path(), common::AgentOptions::default());
    let bs =
        vec![common::add_storage(&agent, &stores[0], "a").await, common::add_storage(&agent, &stores[1], "b").await];
    let live = vms.iter().find(|v| v.live).expect("a live VM");
    let qsd = Some(Qsd::start(&dir.path().join("live"), &live.volumes[0].path, &live.volumes[1].path));
    World {
        dir,
        agent,
        stores,
        bs,
        vms,
        qsd,
        groups: BTreeMap::new(),
        attempted: BTreeMap::new(),
        deleted: BTreeSet::new(),
        orphans: vec![Vec::new(), Vec::new()],
        rng,
        settings,
        stats: Stats::default(),
        seq: 0,
        net,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_campaign_loses_nothing_committed() {
    let settings = Settings::from_env();
    let (seed, ops, minutes) = (settings.seed, settings.ops, settings.minutes);
    let started = Instant::now();
    let mut w = setup(settings).await;
    w.log(format!("campaign: seed {seed}, {ops} operations, fault probability {}%", w.settings.fault_pct));
    let mut since_check = 0;
    for n in 1..=ops {
        if minutes > 0 && started.elapsed() > Duration::from_secs(minutes * 60) {
            w.log(format!("time is up after {} operations", n - 1));
            break;
        }
        w.seq = n;
        let faults_before: u64 = w.stats.faults.values().sum();
        one_op(&mut w).await;
        since_check += 1;
        let faulted = w.stats.faults.values().sum::<u64>() > faults_before;
        if faulted || since_check >= 8 {
            check(&mut w, false).await;
            since_check = 0;
        }
    }
    w.seq += 1;
    check(&mut w, true).await;

    let s = &w.stats;
    let summary = serde_json::json!({
        "seed": seed,
        "operations": s.ops.values().sum::<u64>(),
        "operations_by_kind": s.ops,
        "faults": s.faults.values().sum::<u64>(),
        "faults_by_kind": s.faults,
        "faults_mid_operation": s.faults_mid_op,
        "operation_errors": s.op_errors,
        "retries": s.retries,
        "committed_despite_error": s.committed_despite_error,
        "groups_live_at_end": w.groups.len(),
        "invariant_checks": s.checks,
        "restores_checked": s.restores_checked,
        "violations": s.violations.len(),
        "seconds": started.elapsed().as_secs(),
    });
    if !s.violations.is_empty() {
        eprintln!("operation log (seed {seed}):\n{}", s.log.join("\n"));
        eprintln!("violations:\n{}", s.violations.join("\n"));
    }
    println!("SOAK_SUMMARY {summary}");
    assert!(s.violations.is_empty(), "seed {seed}: {} invariant violations: {:#?}", s.violations.len(), s.violations);
}

/// Chooses and runs one operation.
async fn one_op(w: &mut World) {
    let live_groups = w.groups.values().filter(|g| !g.deleting).count();
    let delete_weight = if live_groups > 8 { 30 } else { 6 };
    let table: [(&str, u64); 10] = [
        ("write", 20),
        ("backup", 30),
        ("restore", 10),
        ("revert", 5),
        ("recover", 8),
        ("delete", delete_weight),
        ("sync", 4),
        ("gc", 6),
        ("verify", 4),
        ("snapshot_group", 4),
    ];
    let total: u64 = table.iter().map(|(_, wt)| wt).sum();
    let mut roll = w.rng.below(total);
    let mut kind = "write";
    for (k, wt) in table {
        if roll < wt {
            kind = k;
            break;
        }
        roll -= wt;
    }
    let done = match kind {
        "write" => op_write(w),
        "backup" => op_backup(w).await,
        "restore" => op_restore(w).await,
        "revert" => op_revert(w).await,
        "recover" => op_recover(w).await,
        "delete" => op_delete(w).await,
        "sync" => op_sync(w).await,
        "gc" => op_gc(w).await,
        "verify" => op_verify(w).await,
        _ => op_snapshot_group(w).await,
    };
    if let Some(k) = done {
        *w.stats.ops.entry(k).or_default() += 1;
    }
}

/// Guest writes on a random VM: random bytes, a pattern, or zeroes, 4 KiB to 1 MiB each.
fn op_write(w: &mut World) -> Option<&'static str> {
    let vm = w.rng.index(w.vms.len());
    let writes = 1 + w.rng.below(3);
    for _ in 0..writes {
        let vol = w.vms[vm].volumes[w.rng.index(w.vms[vm].volumes.len())].clone();
        let len = 4096 * (1 + w.rng.below(256));
        let off = 4096 * w.rng.below((vol.size - len) / 4096);
        let cmd = match w.rng.below(4) {
            0 => format!("write -z {off} {len}"),
            1 => format!("write -P 0x{:02x} {off} {len}", w.rng.below(256)),
            _ => {
                let src = w.scratch("pattern.bin");
                let data = common::pseudo_random(w.rng.next(), usize::try_from(len).expect("small"));
                std::fs::write(&src, data).expect("writing the pattern file");
                format!("write -s {} {off} {len}", p(&src))
            }
        };
        let (fmt, target) = if w.vms[vm].live {
            ("raw", w.qsd.as_ref().expect("the live VM runs").uri(vol.export))
        } else {
            (vol.format, p(&vol.path))
        };
        run_tool("qemu-io", &["-f", fmt, "-c", &cmd, &target]);
        w.log(format!("write {} {}: {cmd}", w.vms[vm].name, vol.kind));
    }
    Some("guest_write")
}

fn backup_request(
    w: &World,
    vm: usize,
    store: usize,
    group: &str,
    name: &str,
    slow: bool,
) -> pb::CreateVmBackupRequest {
    let v = &w.vms[vm];
    pb::CreateVmBackupRequest {
        root_volume_uuid: v.volumes[0].uuid.clone(),
        backup_storage_uuid: w.bs[store].clone(),
        name: name.into(),
        resource_uuid: group.into(),
        volume_read_bandwidth: slow.then_some(SLOW),
        vm: Some(w.register(vm)),
        ..Default::default()
    }
}

async fn op_backup(w: &mut World) -> Option<&'static str> {
    let vm = w.rng.index(w.vms.len());
    let store = w.rng.index(2);
    let full = !w.groups.values().any(|g| g.vm == vm && !g.deleting && g.on.contains(&store));
    let live = w.vms[vm].live;
    let kind = match (live, full) {
        (true, true) => "backup_live_full",
        (true, false) => "backup_live_incremental",
        (false, true) => "backup_full",
        (false, false) => "backup_incremental",
    };
    let group = w.rng.uuid();
    let name = format!("soak-{}", w.seq);
    let digests = w.vm_digests(vm);
    w.attempted.insert(
        group.clone(),
        Group {
            vm,
            name: name.clone(),
            digests,
            on: BTreeSet::from([store]),
            deleting: false,
            restored: BTreeSet::new(),
        },
    );
    let fault = w.plan_fault(Some(store), live, 1500);
    w.log(format!("{kind} of {} to store {store} as {group}", w.vms[vm].name));
    let req = backup_request(w, vm, store, &group, &name, fault.is_some());
    let mut c = w.client().await;
    let r = w.drive(async move { c.create_vm_backup(req).await.map(tonic::Response::into_inner) }, fault).await;
    match r {
        Some(Ok(reply)) => {
            backup_reply_names(w, &reply, &group);
            w.commit(&group, store);
        }
        Some(Err(e)) => {
            w.stats.op_errors += 1;
            w.log(format!("backup {group} failed: {}", short(&e)));
            if fault.is_some() {
                retry_backup(w, vm, store, &group, &name).await;
            } else {
                w.violation(format!("backup {group} of {} failed with no fault: {e:?}", w.vms[vm].name));
            }
        }
        None => {}
    }
    Some(kind)
}

fn backup_reply_names(w: &mut World, reply: &pb::VolumeBackupsReply, group: &str) {
    if reply.inventories.is_empty() || reply.inventories.iter().any(|i| i.group_uuid != group) {
        w.violation(format!("backup {group} answered inventories of another group: {reply:?}"));
    }
}

fn short(e: &tonic::Status) -> String {
    let m: String = e.message().chars().take(200).collect();
    format!("{:?}: {m}", e.code())
}

/// Retries a backup a fault interrupted: it must succeed and upload no chunk the store has.
async fn retry_backup(w: &mut World, vm: usize, store: usize, group: &str, name: &str) {
    w.stats.retries += 1;
    let before = common::store_counters(&w.stores[store]).await;
    let req = backup_request(w, vm, store, group, name, false);
    let r = w.client().await.create_vm_backup(req).await;
    let after = common::store_counters(&w.stores[store]).await;
    let resent = after.chunks_already_present - before.chunks_already_present;
    w.log(format!(
        "retry of backup {group}: {}; {} chunks uploaded, {} of them already present",
        if r.is_ok() { "ok" } else { "failed" },
        after.chunks_uploaded - before.chunks_uploaded,
        resent
    ));
    if resent > 0 {
        w.violation(format!("the retry of backup {group} re-sent {resent} chunks the store already had"));
    }
    match r {
        Ok(reply) => {
            backup_reply_names(w, &reply.into_inner(), group);
            w.commit(group, store);
        }
        Err(e) => w.violation(format!("the retry of backup {group} after a fault failed: {e:?}")),
    }
}

/// A committed copy (group, store) picked at random, optionally of a stopped VM only.
fn pick_copy(w: &mut World, stopped_only: bool) -> Option<(String, usize)> {
    let copies: Vec<(String, usize)> = w
        .groups
        .iter()
        .filter(|(_, g)| !g.deleting && (!stopped_only || !w.vms[g.vm].live))
        .flat_map(|(u, g)| g.on.iter().map(move |s| (u.clone(), *s)))
        .collect();
    if copies.is_empty() {
        return None;
    }
    Some(copies[w.rng.index(copies.len())].clone())
}

fn restore_targets(w: &World, group: &Group, tag: &str, format: &str) -> Vec<(PathBuf, pb::RestoreTarget)> {
    w.vms[group.vm]
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let path = w.dir.path().join("restores").join(format!("{tag}-{i}.{format}"));
            (
                path.clone(),
                pb::RestoreTarget { volume_uuid: v.uuid.clone(), install_path: p(&path), format: format.into() },
            )
        })
        .collect()
}

/// Restores `group` from `store` to new files (faulted when `fault` is set) and checks each
/// target: after a success, equal to the group; after a failure, absent or equal.
async fn restore_copy(w: &mut World, uuid: &str, store: usize, fault: Option<(Fault, Duration)>) -> Option<bool> {
    let g = w.groups.get(uuid).expect("a committed group").clone();
    let format = if w.rng.percent(50) { "raw" } else { "qcow2" };
    let tag = format!("r{}-{}", w.seq, w.rng.below(1 << 20));
    let targets = restore_targets(w, &g, &tag, format);
    let req = pb::RestoreVmBackupRequest {
        group_uuid: uuid.into(),
        backup_storage_uuid: w.bs[store].clone(),
        targets: targets.iter().map(|(_, t)| t.clone()).collect(),
        volume_write_bandwidth: fault.is_some().then_some(SLOW),
        ..Default::default()
    };
    let mut c = w.client().await;
    let r = w.drive(async move { c.restore_vm_backup(req).await.map(tonic::Response::into_inner) }, fault).await?;
    let ok = r.is_ok();
    if let Err(e) = &r {
        w.stats.op_errors += 1;
        w.log(format!("restore of {uuid} from store {store} failed: {}", short(e)));
        if fault.is_none() {
            w.violation(format!("restore of {uuid} from store {store} failed with no fault: {e:?}"));
        }
    }
    for ((path, _), want) in targets.iter().zip(&g.digests) {
        if path.exists() {
            let got = digest_file(path, format);
            if &got != want {
                w.violation(format!(
                    "{} restored from {uuid} on store {store} differs from the backup ({got} != {want}){}",
                    path.display(),
                    if ok { "" } else { " after a failed restore" }
                ));
            }
            std::fs::remove_file(path).expect("removing a restored file");
        } else if ok {
            w.violation(format!("restore of {uuid} succeeded but {} is missing", path.display()));
        }
    }
    if ok {
        w.stats.restores_checked += 1;
        if let Some(g) = w.groups.get_mut(uuid) {
            g.restored.insert(store);
        }
    }
    Some(ok)
}

async fn op_restore(w: &mut World) -> Option<&'static str> {
    let (uuid, store) = pick_copy(w, false)?;
    let fault = w.plan_fault(Some(store), false, 1500);
    w.log(format!("restore of {uuid} from store {store} to new files"));
    restore_copy(w, &uuid, store, fault).await;
    Some("restore_new")
}

/// Reverts a stopped VM to one of its groups: every volume ends as it was or as the group.
async fn op_revert(w: &mut World) -> Option<&'static str> {
    let (uuid, store) = pick_copy(w, true)?;
    let g = w.groups[&uuid].clone();
    let before = w.vm_digests(g.vm);
    let fault = w.plan_fault(Some(store), false, 1500);
    w.log(format!("revert of {} to {uuid} from store {store}", w.vms[g.vm].name));
    let req = pb::RestoreVmBackupRequest {
        group_uuid: uuid.clone(),
        backup_storage_uuid: w.bs[store].clone(),
        revert: true,
        volume_write_bandwidth: fault.is_some().then_some(SLOW),
        ..Default::default()
    };
    let mut c = w.client().await;
    let r = w.drive(async move { c.restore_vm_backup(req).await.map(tonic::Response::into_inner) }, fault).await?;
    let after = w.vm_digests(g.vm);
    match &r {
        Ok(_) => {
            if after != g.digests {
                w.violation(format!("revert to {uuid} succeeded but the volumes differ from the group"));
            }
        }
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("revert to {uuid} failed: {}", short(e)));
            if fault.is_none() {
                w.violation(format!("revert to {uuid} failed with no fault: {e:?}"));
            }
            for (i, d) in after.iter().enumerate() {
                if d != &before[i] && d != &g.digests[i] {
                    w.violation(format!("an interrupted revert left volume {i} of {} torn", w.vms[g.vm].name));
                }
            }
        }
    }
    Some("revert")
}

async fn op_recover(w: &mut World) -> Option<&'static str> {
    let single: Vec<(String, usize)> = w
        .groups
        .iter()
        .filter(|(_, g)| !g.deleting && g.on.len() == 1)
        .map(|(u, g)| (u.clone(), *g.on.iter().next().expect("one store")))
        .collect();
    if single.is_empty() {
        return None;
    }
    let (uuid, src) = single[w.rng.index(single.len())].clone();
    let dst = 1 - src;
    let fault = w.plan_fault(Some(dst), false, 400);
    w.log(format!("recover of {uuid} from store {src} to store {dst}"));
    let req = pb::RecoverVmBackupFromImageStoreBackupStorageRequest {
        group_uuid: uuid.clone(),
        src_backup_storage_uuid: w.bs[src].clone(),
        dst_backup_storage_uuid: w.bs[dst].clone(),
        ..Default::default()
    };
    let mut c = w.client().await;
    let r2 = req.clone();
    let r = w
        .drive(
            async move { c.recover_vm_backup_from_image_store_backup_storage(r2).await.map(tonic::Response::into_inner) },
            fault,
        )
        .await?;
    match r {
        Ok(_) => w.commit(&uuid, dst),
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("recover of {uuid} failed: {}", short(&e)));
            if fault.is_none() {
                w.violation(format!("recover of {uuid} failed with no fault: {e:?}"));
                return Some("recover");
            }
            w.stats.retries += 1;
            let before = common::store_counters(&w.stores[dst]).await;
            let r = w.client().await.recover_vm_backup_from_image_store_backup_storage(req).await;
            let after = common::store_counters(&w.stores[dst]).await;
            let resent = after.chunks_already_present - before.chunks_already_present;
            w.log(format!(
                "retry of recover {uuid}: {}; {} chunks uploaded, {resent} already present",
                if r.is_ok() { "ok" } else { "failed" },
                after.chunks_uploaded - before.chunks_uploaded
            ));
            if resent > 0 {
                w.violation(format!("the retried recover of {uuid} re-sent {resent} chunks the store had"));
            }
            match r {
                Ok(_) => w.commit(&uuid, dst),
                Err(e) => w.violation(format!("the retried recover of {uuid} failed: {e:?}")),
            }
        }
    }
    Some("recover")
}

async fn op_delete(w: &mut World) -> Option<&'static str> {
    if w.groups.is_empty() {
        return None;
    }
    // The oldest groups go first more often (they are first in no particular order, so
    // pick among all, as a retention policy would not).
    let uuids: Vec<String> = w.groups.keys().cloned().collect();
    let uuid = uuids[w.rng.index(uuids.len())].clone();
    w.groups.get_mut(&uuid).expect("picked").deleting = true;
    let fault = w.plan_fault(None, false, 300);
    w.log(format!("delete of {uuid}"));
    let req = pb::DeleteVmBackupRequest { group_uuid: uuid.clone(), ..Default::default() };
    let mut c = w.client().await;
    let r = w.drive(async move { c.delete_vm_backup(req).await.map(tonic::Response::into_inner) }, fault).await?;
    match r {
        Ok(_) => {
            w.groups.remove(&uuid);
            w.deleted.insert(uuid);
        }
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("delete of {uuid} failed: {}", short(&e)));
            if fault.is_none() {
                w.violation(format!("delete of {uuid} failed with no fault: {e:?}"));
            }
        }
    }
    Some("delete")
}

async fn op_sync(w: &mut World) -> Option<&'static str> {
    let store = w.rng.index(2);
    let fault = w.plan_fault(Some(store), false, 200);
    w.log(format!("sync of store {store}"));
    let req = pb::SyncVmBackupRequest { image_store_uuid: w.bs[store].clone(), ..Default::default() };
    let mut c = w.client().await;
    let r = w.drive(async move { c.sync_vm_backup(req).await.map(tonic::Response::into_inner) }, fault).await?;
    if let Err(e) = r {
        w.stats.op_errors += 1;
        w.log(format!("sync failed: {}", short(&e)));
        if fault.is_none() {
            w.violation(format!("sync of store {store} failed with no fault: {e:?}"));
        }
    }
    Some("sync")
}

async fn op_gc(w: &mut World) -> Option<&'static str> {
    let store = w.rng.index(2);
    let fault = w.plan_fault(Some(store), false, 300);
    w.log(format!("gc of store {store}"));
    let mut c = common::store_client(&w.stores[store]).await;
    let r = w
        .drive(
            async move {
                c.garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: Some(0) })
                    .await
                    .map(tonic::Response::into_inner)
            },
            fault,
        )
        .await?;
    match r {
        Ok(gc) => w.log(format!("gc removed {} chunks, kept {}", gc.chunks_removed, gc.chunks_kept)),
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("gc failed: {}", short(&e)));
            if fault.is_none() {
                w.violation(format!("gc of store {store} failed with no fault: {e:?}"));
            }
        }
    }
    Some("store_gc")
}

async fn op_verify(w: &mut World) -> Option<&'static str> {
    let store = w.rng.index(2);
    let fault = w.plan_fault(Some(store), false, 300);
    w.log(format!("verify of store {store}"));
    let mut c = common::store_client(&w.stores[store]).await;
    let r = w
        .drive(
            async move { c.verify(spb::VerifyRequest { group_uuids: vec![] }).await.map(tonic::Response::into_inner) },
            fault,
        )
        .await?;
    match r {
        Ok(v) if !v.bad_chunks.is_empty() || !v.damaged_groups.is_empty() => {
            w.violation(format!(
                "verify of store {store}: {} bad chunks, damaged {:?}",
                v.bad_chunks.len(),
                v.damaged_groups
            ));
        }
        Ok(_) => {}
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("verify failed: {}", short(&e)));
            if fault.is_none() {
                w.violation(format!("verify of store {store} failed with no fault: {e:?}"));
            }
        }
    }
    Some("store_verify")
}

type Groups = pb::volume_snapshot_group_service_client::VolumeSnapshotGroupServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, common::Auth>,
>;

async fn snapshot_groups(w: &World) -> Groups {
    pb::volume_snapshot_group_service_client::VolumeSnapshotGroupServiceClient::with_interceptor(
        common::channel(&w.agent.url()).await,
        common::Auth(Some(format!("OAuth {}", common::session(&w.agent)))),
    )
}

/// A volume snapshot group of a stopped VM taken and deleted again (its overlays merged
/// back): afterwards no group, no overlay, the VM's registered paths and data as before.
async fn op_snapshot_group(w: &mut World) -> Option<&'static str> {
    let stopped: Vec<usize> = (0..w.vms.len()).filter(|i| !w.vms[*i].live).collect();
    let vm = stopped[w.rng.index(stopped.len())];
    let mut vms = pb::vm_service_client::VmServiceClient::with_interceptor(
        common::channel(&w.agent.url()).await,
        common::Auth(Some(format!("OAuth {}", common::session(&w.agent)))),
    );
    vms.register_vm(w.register(vm)).await.expect("registering the VM");
    let before = w.vm_digests(vm);
    let fault = w.plan_fault(None, false, 300);
    w.log(format!("snapshot group of {}: create, then delete", w.vms[vm].name));
    let (mut g, root) = (snapshot_groups(w).await, w.vms[vm].volumes[0].uuid.clone());
    let r = w
        .drive(
            async move {
                let create = pb::CreateVolumeSnapshotGroupRequest {
                    root_volume_uuid: root,
                    name: "soak".into(),
                    ..Default::default()
                };
                let inv = g.create_volume_snapshot_group(create).await?.into_inner().inventory.unwrap_or_default();
                let delete = pb::DeleteVolumeSnapshotGroupRequest { uuid: inv.uuid, ..Default::default() };
                Ok(g.delete_volume_snapshot_group(delete).await?.into_inner().results)
            },
            fault,
        )
        .await?;
    match r {
        Ok(results) if results.iter().all(|r| r.success) => {}
        Ok(results) => w.violation(format!("deleting a snapshot group of {} failed: {results:?}", w.vms[vm].name)),
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("snapshot group failed: {}", short(&e)));
            if fault.is_none() {
                w.violation(format!("snapshot group of {} failed with no fault: {e:?}", w.vms[vm].name));
            }
        }
    }
    // A group a fault left behind is deleted now, as an operator would.
    let mut g = snapshot_groups(w).await;
    let left = g
        .query_volume_snapshot_group(pb::QueryVolumeSnapshotGroupRequest::default())
        .await
        .expect("querying snapshot groups")
        .into_inner()
        .inventories;
    for inv in left {
        w.log(format!("deleting snapshot group {} left by the fault", inv.uuid));
        let req = pb::DeleteVolumeSnapshotGroupRequest { uuid: inv.uuid.clone(), ..Default::default() };
        match g.delete_volume_snapshot_group(req).await {
            Ok(r) if r.get_ref().results.iter().all(|r| r.success) => {}
            other => w.violation(format!("deleting the leftover snapshot group {} failed: {other:?}", inv.uuid)),
        }
    }
    let paths: Vec<String> = vms
        .query_vm(pb::QueryVmRequest::default())
        .await
        .expect("querying VMs")
        .into_inner()
        .inventories
        .into_iter()
        .filter(|v| v.uuid == w.vms[vm].uuid)
        .flat_map(|v| v.volumes.into_iter().map(|x| x.install_path))
        .collect();
    let want: Vec<String> = w.vms[vm].volumes.iter().map(|v| p(&v.path)).collect();
    if paths != want {
        w.violation(format!("after its snapshot group, {} is registered on {paths:?}", w.vms[vm].name));
    }
    if w.vm_digests(vm) != before {
        w.violation(format!("a snapshot group taken and deleted changed the data of {}", w.vms[vm].name));
    }
    Some("snapshot_group")
}

async fn store_groups(store: &Daemon) -> BTreeSet<String> {
    let mut c = common::store_client(store).await;
    let r = c.list_groups(spb::ListGroupsRequest {}).await.expect("listing a store's groups");
    r.into_inner().groups.into_iter().map(|g| g.group_uuid).collect()
}

/// The agent's catalog: group uuids per backup storage uuid.
async fn catalog(w: &World) -> BTreeMap<String, BTreeSet<String>> {
    let mut c = w.client().await;
    let r = c
        .query_volume_backup(pb::QueryVolumeBackupRequest::default())
        .await
        .expect("querying the agent's catalog")
        .into_inner();
    let mut out: BTreeMap<String, BTreeSet<String>> = w.bs.iter().map(|b| (b.clone(), BTreeSet::new())).collect();
    for inv in r.inventories {
        for r in inv.backup_storage_refs {
            out.entry(r.backup_storage_uuid).or_default().insert(inv.group_uuid.clone());
        }
    }
    out
}

/// Files named `*.vmbackup-*` (restore partials, live overlays) or `*-snap-*` (snapshot
/// group overlays) under `dir`, stores excluded.
fn leftovers(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("listing a directory").flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("store-") {
            continue;
        }
        if name.contains(".vmbackup-") || name.contains("-snap-") {
            out.push(path.clone());
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            leftovers(&path, out);
        }
    }
}

/// Open sessions of a store once the agent's background closes have landed.
async fn settled_open_sessions(store: &Daemon, allowed: u32) -> u32 {
    let mut c = common::store_client(store).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open = c.status(spb::StatusRequest {}).await.expect("store status").into_inner().open_sessions;
        if open <= allowed || Instant::now() > deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks every invariant; `all` restores every committed copy, else new ones and a few.
async fn check(w: &mut World, all: bool) {
    w.stats.checks += 1;
    let mut visible = Vec::new();
    for s in 0..2 {
        visible.push(store_groups(&w.stores[s]).await);
    }
    // Groups: what the stores show against what the test committed.
    for (s, vis) in visible.iter().enumerate() {
        for g in vis {
            if w.groups.contains_key(g) {
                let grp = w.groups.get_mut(g).expect("known");
                if !grp.on.contains(&s) {
                    w.log(format!("group {g} is on store {s} although that recover failed"));
                    w.stats.committed_despite_error += 1;
                    w.groups.get_mut(g).expect("known").on.insert(s);
                }
            } else if w.attempted.contains_key(g) {
                w.log(format!("group {g} is on store {s} although its backup call failed"));
                w.stats.committed_despite_error += 1;
                w.commit(g, s);
            } else if w.deleted.contains(g) {
                w.violation(format!("group {g} was deleted but store {s} still shows it"));
            } else {
                w.violation(format!("store {s} shows group {g}, which the test never started"));
            }
        }
    }
    let mut gone = Vec::new();
    for (u, g) in &mut w.groups {
        for (s, vis) in visible.iter().enumerate() {
            if g.on.contains(&s) && !vis.contains(u) {
                if g.deleting {
                    g.on.remove(&s);
                } else {
                    gone.push(format!("committed group {u} ({}) is lost from store {s}", g.name));
                }
            }
        }
    }
    w.groups.retain(|_, g| !g.on.is_empty());
    for v in gone {
        w.violation(v);
    }
    // Stores: no temp file, Verify clean, no session left open.
    for s in 0..2 {
        let tmp = w.stores[s].data_dir.join("tmp");
        let left: Vec<String> = std::fs::read_dir(&tmp)
            .expect("listing the store's tmp/")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        if !left.is_empty() {
            w.violation(format!("store {s} has temp files: {left:?}"));
        }
        let v = common::store_client(&w.stores[s])
            .await
            .verify(spb::VerifyRequest { group_uuids: vec![] })
            .await
            .expect("verifying a store")
            .into_inner();
        if !v.bad_chunks.is_empty() || !v.damaged_groups.is_empty() {
            w.violation(format!("store {s} verify: {} bad chunks, damaged {:?}", v.bad_chunks.len(), v.damaged_groups));
        }
        w.orphans[s].retain(|t| t.elapsed() < SESSION_TTL + Duration::from_secs(10));
        let allowed = u32::try_from(w.orphans[s].len()).expect("few");
        let open = settled_open_sessions(&w.stores[s], allowed).await;
        if open > allowed {
            w.violation(format!("store {s} has {open} open sessions with no job running ({allowed} tolerated)"));
        }
    }
    // The catalog equals the stores, and Sync changes nothing.
    let cat = catalog(w).await;
    let mut mismatch = false;
    for (s, vis) in visible.iter().enumerate() {
        let had = cat.get(&w.bs[s]).cloned().unwrap_or_default();
        if &had != vis {
            mismatch = true;
            let extra: Vec<_> = had.difference(vis).collect();
            let missing: Vec<_> = vis.difference(&had).collect();
            w.violation(format!("catalog of store {s} differs from the store: extra {extra:?}, missing {missing:?}"));
        }
    }
    let mut c = w.client().await;
    for s in 0..2 {
        if let Err(e) =
            c.sync_vm_backup(pb::SyncVmBackupRequest { image_store_uuid: w.bs[s].clone(), ..Default::default() }).await
        {
            w.violation(format!("SyncVmBackup of store {s} failed: {e:?}"));
        }
    }
    let synced = catalog(w).await;
    for (s, vis) in visible.iter().enumerate() {
        let after = synced.get(&w.bs[s]).cloned().unwrap_or_default();
        if &after != vis {
            w.violation(format!("after SyncVmBackup the catalog of store {s} still differs from it"));
        } else if !mismatch && cat.get(&w.bs[s]) != Some(&after) {
            w.violation(format!("SyncVmBackup changed the catalog of store {s}, which matched"));
        }
    }
    // Nothing half-done visible: no partial target, no overlay file, no overlay node.
    let mut left = Vec::new();
    leftovers(w.dir.path(), &mut left);
    if !left.is_empty() {
        w.violation(format!("leftover files: {left:?}"));
    }
    check_live_chain(w, &left);
    // Restores: every copy not yet restored, a few random ones, or all at the end.
    let mut copies: Vec<(String, usize)> = Vec::new();
    for (u, g) in &w.groups {
        for s in &g.on {
            if !g.deleting && (all || !g.restored.contains(s)) {
                copies.push((u.clone(), *s));
            }
        }
    }
    if !all {
        for _ in 0..2 {
            if let Some(c) = pick_copy(w, false)
                && !copies.contains(&c)
            {
                copies.push(c);
            }
        }
    }
    for (u, s) in copies {
        restore_copy(w, &u, s, None).await;
    }
    w.log(format!(
        "check {}: {} groups committed, {} on store a, {} on store b, {} violations so far",
        w.stats.checks,
        w.groups.len(),
        visible[0].len(),
        visible[1].len(),
        w.stats.violations.len()
    ));
}

/// The running VM's block graph holds no vmbackup overlay; if it does (a violation), the
/// overlays are merged offline so the campaign can go on with the guest's data intact.
fn check_live_chain(w: &mut World, left: &[PathBuf]) {
    let Some(qsd) = w.qsd.as_ref() else { return };
    let nodes = match common::qmp::qmp(&qsd.qmp, "query-named-block-nodes", serde_json::json!({ "flat": true })) {
        Ok(n) => n,
        Err(e) => {
            w.violation(format!("the live VM's QMP monitor does not answer: {e}"));
            return;
        }
    };
    let overlays: Vec<String> = nodes
        .as_array()
        .expect("a list of nodes")
        .iter()
        .filter(|n| {
            n["node-name"].as_str().is_some_and(|s| s.starts_with("vmbk-"))
                || n["image"]["filename"].as_str().is_some_and(|f| f.contains(".vmbackup-"))
        })
        .map(|n| format!("{} ({})", n["node-name"], n["image"]["filename"]))
        .collect();
    // Partial restore targets were reported above; they go so they are reported once.
    for f in left.iter().filter(|f| p(f).contains("vmbackup-partial")) {
        let _ = std::fs::remove_file(f);
    }
    let live_dir = w.dir.path().join("live");
    if overlays.is_empty() && !left.iter().any(|f| f.starts_with(&live_dir)) {
        return;
    }
    if !overlays.is_empty() {
        w.violation(format!("the live VM runs on vmbackup overlays: {overlays:?}"));
    }
    // Repair: stop QEMU cleanly, commit every leftover overlay (newest first), start again.
    if let Some(mut q) = w.qsd.take() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(q.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = q.child.wait();
    }
    let mut files: Vec<PathBuf> = left.iter().filter(|f| !p(f).contains("vmbackup-partial")).cloned().collect();
    files.sort_by_key(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok());
    for f in files.iter().rev() {
        if f.starts_with(&live_dir) {
            run_tool("qemu-img", &["commit", "-q", &p(f)]);
            std::fs::remove_file(f).expect("removing a merged overlay");
            w.log(format!("repair: merged {} offline", f.display()));
        }
    }
    w.restart_qemu();
}
