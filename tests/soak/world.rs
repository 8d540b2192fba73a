//! The campaign's world: settings, the seeded random source, the VMs, groups and stores
//! the test keeps track of, the network namespace between agent and stores, and setup.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::qsd::Qsd;
use crate::common::{self, Daemon, run_tool};
use vmbackup_proto::agent::v1 as pb;

pub const CHUNK_SIZE: u32 = 64 << 10;
/// The store's session TTL (its DEFAULT_TTL): how long a session of a killed agent lives.
pub const SESSION_TTL: Duration = Duration::from_secs(300);
/// An operation that has not ended after this long is a violation (a hang).
pub const OP_TIMEOUT: Duration = Duration::from_secs(180);
/// Throttle of an operation a fault is aimed at, so it lasts long enough to be hit.
pub const SLOW: i64 = 6 << 20;

pub fn p(path: &Path) -> String {
    path.display().to_string()
}

/// splitmix64: tiny, seedable, good enough to pick operations.
pub struct Rng(u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(u64::try_from(n).expect("usize fits u64"))).expect("below n fits usize")
    }

    pub fn percent(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    pub fn uuid(&mut self) -> String {
        format!("{:016x}{:016x}", self.next(), self.next())
    }
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
        Err(_) => default,
    }
}

pub struct Settings {
    pub seed: u64,
    pub ops: u64,
    pub fault_pct: u64,
    pub minutes: u64,
}

impl Settings {
    pub fn from_env() -> Settings {
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
pub struct Volume {
    pub uuid: String,
    pub kind: &'static str,
    pub path: PathBuf,
    pub format: &'static str,
    pub size: u64,
    /// The live VM's NBD export name of this disk.
    pub export: &'static str,
}

pub struct Vm {
    pub name: &'static str,
    pub uuid: String,
    pub volumes: Vec<Volume>,
    pub live: bool,
}

/// A group the test started: what its volumes held, and where it is.
#[derive(Clone, Debug)]
pub struct Group {
    pub vm: usize,
    pub name: String,
    /// BLAKE3 of each volume's raw content (in `Vm::volumes` order) when the backup started.
    pub digests: Vec<String>,
    /// Stores (0, 1) it is committed on.
    pub on: BTreeSet<usize>,
    /// A delete was asked for: it may vanish.
    pub deleting: bool,
    /// Restores of a copy already checked (store indexes).
    pub restored: BTreeSet<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
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
    pub fn kind(self) -> &'static str {
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
pub struct Stats {
    pub ops: BTreeMap<&'static str, u64>,
    pub faults: BTreeMap<&'static str, u64>,
    pub faults_mid_op: u64,
    pub checks: u64,
    pub restores_checked: u64,
    pub retries: u64,
    pub op_errors: u64,
    pub committed_despite_error: u64,
    pub violations: Vec<String>,
    pub log: Vec<String>,
}

pub struct World {
    pub dir: tempfile::TempDir,
    pub agent: Daemon,
    pub stores: Vec<Daemon>,
    pub bs: Vec<String>,
    pub vms: Vec<Vm>,
    pub qsd: Option<Qsd>,
    /// Committed groups (and those being deleted).
    pub groups: BTreeMap<String, Group>,
    /// Backups started whose call failed: they may have committed anyway.
    pub attempted: BTreeMap<String, Group>,
    /// Groups whose delete succeeded.
    pub deleted: BTreeSet<String>,
    /// When the agent was SIGKILLed mid-job, per store: a session may stay open until its TTL.
    pub orphans: Vec<Vec<Instant>>,
    pub rng: Rng,
    pub settings: Settings,
    pub stats: Stats,
    pub seq: u64,
    /// The stores' network namespace; dropped last.
    pub net: Net,
}

/// The stores live in their own network namespace, joined to the test's (where the agent
/// runs) by one veth link: shaping and link-down on it are the network faults.
pub struct Net {
    pub ns: String,
    /// The link's two ends: in the test's namespace, in the stores'.
    pub here: String,
    pub there: String,
}

/// The stores' address inside their namespace.
pub const STORE_IP: &str = "10.203.0.2";

pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("ip not found: install iproute2");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn tc(netns: Option<&str>, args: &[&str]) -> Result<(), String> {
    let mut cmd = std::process::Command::new(if netns.is_some() { "ip" } else { "tc" });
    if let Some(ns) = netns {
        cmd.args(["netns", "exec", ns, "tc"]);
    }
    let out = cmd.args(args).output().expect("tc not found: install iproute2");
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).to_string()) }
}

impl Net {
    pub fn new() -> Net {
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
    pub fn shape(&self, args: &[&str]) {
        for (ns, dev) in [(None, self.here.as_str()), (Some(self.ns.as_str()), self.there.as_str())] {
            let mut a = vec!["qdisc", "replace", "dev", dev, "root", "tbf"];
            a.extend_from_slice(args);
            tc(ns, &a).unwrap_or_else(|e| panic!("tc {a:?}: {e}"));
        }
    }

    /// Removes the shaping.
    pub fn clear(&self) {
        for (ns, dev) in [(None, self.here.as_str()), (Some(self.ns.as_str()), self.there.as_str())] {
            let _ = tc(ns, &["qdisc", "del", "dev", dev, "root"]);
        }
    }

    pub fn link(&self, up: bool) {
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
pub fn start_store_in(net: &Net, dir: &Path, name: &str) -> Daemon {
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
    pub fn log(&mut self, line: String) {
        eprintln!("[soak {:>4}] {line}", self.seq);
        self.stats.log.push(format!("{:>4} {line}", self.seq));
    }

    pub fn violation(&mut self, what: String) {
        let v = format!("op {}: {what}", self.seq);
        eprintln!("[soak {:>4}] VIOLATION {what}", self.seq);
        self.stats.log.push(format!("{:>4} VIOLATION {what}", self.seq));
        self.stats.violations.push(v);
    }

    pub async fn client(&self) -> common::BackupClient {
        common::backup_client(&self.agent).await
    }

    pub fn register(&self, vm: usize) -> pb::RegisterVmRequest {
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

    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join("scratch").join(name)
    }

    /// BLAKE3 of what the guest of `vm` sees on each volume now.
    pub fn vm_digests(&self, vm: usize) -> Vec<String> {
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
    pub fn plan_fault(&mut self, store: Option<usize>, live: bool, max_delay_ms: u64) -> Option<(Fault, Duration)> {
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
    pub async fn inject(&mut self, f: Fault, mid: bool) {
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
    pub async fn drive<T: Send + 'static>(
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

    pub fn live_vm(&self) -> Option<&Vm> {
        self.vms.iter().find(|v| v.live)
    }

    /// Starts the live VM's QEMU again on its images.
    pub fn restart_qemu(&mut self) {
        let Some(vm) = self.live_vm() else { return };
        let (root, data) = (vm.volumes[0].path.clone(), vm.volumes[1].path.clone());
        self.qsd = None;
        self.qsd = Some(Qsd::start(&self.dir.path().join("live"), &root, &data));
    }

    pub fn commit(&mut self, group: &str, store: usize) {
        if let Some(mut g) = self.attempted.remove(group) {
            g.on.clear();
            self.groups.insert(group.to_string(), g);
        }
        let g = self.groups.get_mut(group).expect("a group the test started");
        g.on.insert(store);
    }
}

/// BLAKE3 (hex) of the raw content of an image.
pub fn digest_file(path: &Path, format: &str) -> String {
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
pub fn make_image(path: &Path, format: &str, size: u64, mib: usize, seed: u64) {
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

pub async fn setup(settings: Settings) -> World {
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
