//! A real single-node Ceph cluster for the tests of the RADOS and S3 backends: one monitor,
//! one manager, one OSD and optionally one radosgw (S3), started from Debian's packages as
//! background processes of the test, all on loopback.
//!
//! Nothing is mocked: the backends under test talk to the same daemons a site runs. Every
//! file the cluster writes (monitor store, OSD data, run dir, admin sockets, logs, keyrings,
//! the generated `ceph.conf`) lives inside the directory given to [`CephCluster::start`], and
//! every port is picked free at start, so two clusters can run at once. Dropping the
//! [`CephCluster`] kills exactly the processes it started (by their pids) and removes nothing.
//!
//! The generated `ceph.conf` sets the client timeouts (`rados_osd_op_timeout`,
//! `rados_mon_op_timeout`, `client_mount_timeout`, see [`CephOptions::client_timeout`]):
//! without them a librados call blocks for as long as an OSD or the monitor is down; with
//! them it fails, which is what the fault tests need to observe.
//!
//! The disk-space health checks of the monitor are disabled (`mon data avail warn/crit =
//! -1`): on a shared test machine the host disk can be nearly full, and with the default
//! thresholds the monitor turns health to WARN/ERR and even refuses to start (it exits with
//! status 28 and no message). Facts behind the bootstrap: `../shared/ceph-notes.md`.
//!
//! Needs the packages `ceph-mon ceph-mgr ceph-osd radosgw ceph-common` and `curl`
//! (`scripts/test.sh` installs them); a missing tool fails the test loudly.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How the OSD stores objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectStore {
    /// In RAM: fastest, but everything is lost when the OSD process dies, and a killed OSD
    /// cannot be started again ([`CephCluster::start_osd`] refuses).
    Memstore,
    /// On a sparse 10 GiB file in the cluster directory: survives `kill -9` of the OSD.
    Bluestore,
}

/// What to start.
#[derive(Clone, Debug)]
pub struct CephOptions {
    /// Start a radosgw (S3) and create an S3 user with fixed keys.
    pub rgw: bool,
    /// The OSD's object store.
    pub objectstore: ObjectStore,
    /// Client op and mount timeouts written into the conf (`rados_osd_op_timeout`,
    /// `rados_mon_op_timeout`, `client_mount_timeout`); also apply to radosgw.
    pub client_timeout: Duration,
    /// Size of the memstore device (RAM, allocated as used).
    pub memstore_bytes: u64,
}

impl Default for CephOptions {
    fn default() -> Self {
        CephOptions {
            rgw: false,
            objectstore: ObjectStore::Memstore,
            client_timeout: Duration::from_secs(10),
            memstore_bytes: 4 << 30,
        }
    }
}

/// Name of the monitor, the manager and the radosgw instance.
const MON_ID: &str = "a";
const MGR_ID: &str = "x";
const RGW_NAME: &str = "client.rgw.x";
/// Region the S3 signature uses (RGW accepts any with its default zonegroup).
pub const S3_REGION: &str = "us-east-1";
/// Deadline for one daemon to become ready.
const READY: Duration = Duration::from_secs(90);

/// One daemon of the cluster: started in the foreground (`-f`) as a child of the test.
struct Proc {
    name: &'static str,
    program: &'static str,
    args: Vec<String>,
    /// Its stdout and stderr.
    out: PathBuf,
    /// The log file Ceph writes (`log file` in the conf).
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.out).expect("daemon output file");
        let child = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup output file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {}: {e} (install the Ceph packages: run scripts/test.sh)", self.program)
            });
        self.child = Some(child);
    }

    /// SIGKILL to exactly this pid, then reaps it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn tails(&self, lines: usize) -> String {
        format!("{}{}", tail(&self.out, lines), tail(&self.log, lines))
    }
}

/// The last `n` lines of a file, headed by its path.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    format!("--- {} (last {} lines) ---\n{}\n", path.display(), lines.len() - from, lines[from..].join("\n"))
}

/// The result of a command run with a deadline.
#[derive(Debug)]
pub struct Run {
    /// None: killed at the deadline.
    pub status: Option<ExitStatus>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl Run {
    /// Exited with status 0.
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Runs `program` with `args`, killing it if it runs longer than `deadline`.
pub fn run_with_deadline(program: &str, args: &[&str], deadline: Duration) -> Run {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} not found ({e}): run scripts/test.sh to install the Ceph packages"));
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// A free TCP port on 127.0.0.1 (free when picked; the daemon binds it right after), never
/// one handed out before in this test process, so clusters started at once cannot collide.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A random secret usable as an S3 key (hex).
fn random_hex(len: usize) -> String {
    let mut s = String::new();
    while s.len() < len {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(len);
    s
}

/// A running single-node Ceph cluster; see the module doc.
pub struct CephCluster {
    /// The directory holding everything of this cluster.
    pub dir: PathBuf,
    /// A `ceph.conf` any client can use (`ceph -c`, `rados -c`, `rados_conf_read_file`); its
    /// `[client]` section names the admin keyring and sets the client timeouts.
    pub conf: PathBuf,
    /// Keyring of `client.admin` (all caps).
    pub keyring: PathBuf,
    /// The cluster's fsid.
    pub fsid: String,
    /// The monitor's msgr2 address.
    pub mon_v2: SocketAddr,
    /// The monitor's legacy (msgr1) address, the `host:6789` form.
    pub mon_v1: SocketAddr,
    /// A replicated pool of size 1 with an application enabled, empty after start.
    pub pool: String,
    /// `http://127.0.0.1:PORT` of radosgw (path-style addressing), if started.
    pub rgw_url: Option<String>,
    /// Access key of the S3 user (owner of nothing yet).
    pub s3_access_key: String,
    /// Secret key of the S3 user.
    pub s3_secret_key: String,
    /// How long [`CephCluster::start`] took, and its phases.
    pub timings: Vec<(&'static str, Duration)>,
    opts: CephOptions,
    osd_id: u32,
    mon: Proc,
    mgr: Proc,
    osd: Proc,
    rgw: Option<Proc>,
}

impl CephCluster {
    /// A cluster whose OSD can be killed and come back with its objects (bluestore on a
    /// file), with 5 s client timeouts, in `dir/ceph`; prints how long the start took.
    pub fn start_crashable(dir: &Path) -> CephCluster {
        let t0 = Instant::now();
        let cluster = CephCluster::start(
            &dir.join("ceph"),
            CephOptions {
                objectstore: ObjectStore::Bluestore,
                client_timeout: Duration::from_secs(5),
                ..Default::default()
            },
        );
        eprintln!("cluster up in {:.1}s", t0.elapsed().as_secs_f64());
        cluster
    }

    /// Objects in RADOS namespace `ns` of the pool (`rados ls`).
    pub fn namespace_objects(&self, ns: &str) -> usize {
        let r = self.rados(&["-p", &self.pool, "--namespace", ns, "ls"]);
        assert!(r.ok(), "rados ls: {}", r.stderr);
        r.stdout.lines().filter(|l| !l.trim().is_empty()).count()
    }

    /// A keyring (mode 0600) in `dir` with a well-formed but wrong key for client.admin.
    pub fn wrong_keyring(dir: &Path) -> PathBuf {
        let path = dir.join("wrong.keyring");
        std::fs::write(&path, "[client.admin]\n\tkey = AQBKx0JmAAAAABAAy5bFjUvBbfJ2nC0RzCbNdA==\n").expect("keyring");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        path
    }

    /// Bootstraps and starts a cluster in `dir` (which should be empty) and waits until the
    /// pool accepts a write, the manager is active and (with `rgw`) radosgw answers an
    /// authenticated request. Panics with the daemons' log tails if any step fails.
    pub fn start(dir: &Path, opts: CephOptions) -> CephCluster {
        let t0 = Instant::now();
        let mut timings = Vec::new();
        let dir = dir.to_path_buf();
        for sub in ["mon", "mgr", "osd", "rgw", "run", "log", "crash"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create cluster dir");
        }
        let fsid = uuid::Uuid::new_v4().to_string();
        let (p2, p1) = (free_port(), free_port());
        let mon_v2: SocketAddr = format!("127.0.0.1:{p2}").parse().expect("addr");
        let mon_v1: SocketAddr = format!("127.0.0.1:{p1}").parse().expect("addr");
        let rgw_port = free_port();
        let conf = dir.join("ceph.conf");
        let keyring = dir.join("admin.keyring");
        std::fs::write(&conf, conf_text(&dir, &fsid, mon_v2, mon_v1, rgw_port, &opts)).expect("write ceph.conf");

        let c = conf.display().to_string();
        let log = dir.join("log");
        let mk_proc = |name: &'static str, program: &'static str, args: &[&str], ceph_log: &str| Proc {
            name,
            program,
            args: ["-c", c.as_str(), "-f"].iter().chain(args).map(|s| s.to_string()).collect(),
            out: log.join(format!("{name}.out")),
            log: log.join(format!("{ceph_log}.log")),
            child: None,
        };
        let mon = mk_proc("ceph-mon", "ceph-mon", &["-i", MON_ID], &format!("mon.{MON_ID}"));
        let mgr = mk_proc("ceph-mgr", "ceph-mgr", &["-i", MGR_ID], &format!("mgr.{MGR_ID}"));
        let rgw = opts.rgw.then(|| mk_proc("radosgw", "radosgw", &["-n", RGW_NAME], RGW_NAME));
        // The OSD's id is known after `ceph osd new`; its args are filled in below.
        let osd = mk_proc("ceph-osd", "ceph-osd", &[], "osd.0");
        let mut cluster = CephCluster {
            dir: dir.clone(),
            conf,
            keyring,
            fsid,
            mon_v2,
            mon_v1,
            pool: "vmbackup-test".to_string(),
            rgw_url: opts.rgw.then(|| format!("http://127.0.0.1:{rgw_port}")),
            s3_access_key: format!("VMBT{}", random_hex(16).to_uppercase()),
            s3_secret_key: random_hex(40),
            timings: Vec::new(),
            opts,
            osd_id: 0,
            mon,
            mgr,
            osd,
            rgw,
        };

        // Monitor: keyrings, monmap, mkfs, start.
        let mon_keyring = dir.join("mon.keyring");
        let k = cluster.keyring.display().to_string();
        let mk = mon_keyring.display().to_string();
        cluster.tool("ceph-authtool", &["--create-keyring", &mk, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"]);
        cluster.tool(
            "ceph-authtool",
            &[
                "--create-keyring",
                &k,
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
                "--cap",
                "mds",
                "allow *",
            ],
        );
        cluster.tool("ceph-authtool", &[&mk, "--import-keyring", &k]);
        let monmap = dir.join("monmap").display().to_string();
        let addrs = format!("[v2:{mon_v2},v1:{mon_v1}]");
        let fsid = cluster.fsid.clone();
        cluster.tool("monmaptool", &["--create", "--fsid", &fsid, "--addv", MON_ID, &addrs, &monmap]);
        cluster.tool("ceph-mon", &["-c", &c, "--mkfs", "-i", MON_ID, "--monmap", &monmap, "--keyring", &mk]);
        cluster.mon.spawn();
        cluster.wait_mon();
        timings.push(("mon answers", t0.elapsed()));

        // Manager: its key, start (it becomes active while the OSD boots).
        let mgr_dir = dir.join("mgr").join(format!("ceph-{MGR_ID}"));
        std::fs::create_dir_all(&mgr_dir).expect("mgr dir");
        let mgr_key = mgr_dir.join("keyring").display().to_string();
        let mgr_entity = format!("mgr.{MGR_ID}");
        cluster.ceph(&[
            "auth",
            "get-or-create",
            &mgr_entity,
            "mon",
            "allow profile mgr",
            "osd",
            "allow *",
            "mds",
            "allow *",
            "-o",
            &mgr_key,
        ]);
        cluster.mgr.spawn();

        // OSD: id and cephx key from the monitor, mkfs, start.
        let osd_uuid = uuid::Uuid::new_v4().to_string();
        let secret = cluster.tool("ceph-authtool", &["--gen-print-key"]).trim().to_string();
        let secret_file = dir.join("osd-secret.json");
        std::fs::write(&secret_file, format!("{{\"cephx_secret\": \"{secret}\"}}")).expect("osd secret");
        let id = cluster.ceph(&["osd", "new", &osd_uuid, "-i", &secret_file.display().to_string()]);
        std::fs::remove_file(&secret_file).expect("remove osd secret");
        cluster.osd_id = id.trim().parse().unwrap_or_else(|e| panic!("osd new answered {id:?}: {e}"));
        let osd_id = cluster.osd_id.to_string();
        let osd_dir = dir.join("osd").join(format!("ceph-{osd_id}"));
        std::fs::create_dir_all(&osd_dir).expect("osd dir");
        std::fs::write(osd_dir.join("keyring"), format!("[osd.{osd_id}]\n\tkey = {secret}\n")).expect("osd keyring");
        cluster.tool("ceph-osd", &["-c", &c, "-i", &osd_id, "--mkfs", "--osd-uuid", &osd_uuid]);
        cluster.osd.args.extend(["-i".to_string(), osd_id.clone()]);
        cluster.osd.log = log.join(format!("osd.{osd_id}.log"));
        cluster.osd.spawn();

        // The pool, while the OSD boots.
        let pool = cluster.pool.clone();
        cluster.ceph(&["osd", "pool", "create", &pool, "8", "8", "replicated"]);
        cluster.ceph(&["osd", "pool", "application", "enable", &pool, "vmbackup"]);
        cluster.wait_pool_writable();
        timings.push(("pool accepts writes", t0.elapsed()));
        cluster.wait_mgr();
        timings.push(("mgr active", t0.elapsed()));

        if cluster.rgw.is_some() {
            let rgw_key = dir.join("rgw").join("keyring").display().to_string();
            cluster.ceph(&[
                "auth",
                "get-or-create",
                RGW_NAME,
                "mon",
                "allow rw",
                "osd",
                "allow rwx",
                "mgr",
                "allow rw",
                "-o",
                &rgw_key,
            ]);
            cluster.rgw.as_mut().expect("rgw").spawn();
            let (ak, sk) = (cluster.s3_access_key.clone(), cluster.s3_secret_key.clone());
            cluster.tool(
                "radosgw-admin",
                &[
                    "-c",
                    &c,
                    "user",
                    "create",
                    "--uid",
                    "vmbackup-test",
                    "--display-name",
                    "vmbackup test",
                    "--access-key",
                    &ak,
                    "--secret",
                    &sk,
                ],
            );
            cluster.wait_rgw();
            timings.push(("rgw answers S3", t0.elapsed()));
        }
        cluster.timings = timings;
        cluster
    }

    /// `mon host` as a client writes it: `[v2:127.0.0.1:P2,v1:127.0.0.1:P1]`.
    pub fn mon_host(&self) -> String {
        format!("[v2:{},v1:{}]", self.mon_v2, self.mon_v1)
    }

    /// The radosgw URL; panics if the cluster was started without it.
    pub fn rgw_url(&self) -> &str {
        self.rgw_url.as_deref().expect("cluster started without rgw (CephOptions::rgw)")
    }

    /// The cephx key of `client.admin` (base64), for clients configured without a keyring.
    pub fn admin_key(&self) -> String {
        let text = std::fs::read_to_string(&self.keyring).expect("admin keyring");
        text.lines().find_map(|l| l.trim().strip_prefix("key = ").map(str::to_string)).expect("key in admin keyring")
    }

    /// The options the cluster was started with.
    pub fn options(&self) -> &CephOptions {
        &self.opts
    }

    /// Pid of the OSD process, if running.
    pub fn osd_pid(&self) -> Option<u32> {
        self.osd.pid()
    }

    /// Pid of the monitor process, if running.
    pub fn mon_pid(&self) -> Option<u32> {
        self.mon.pid()
    }

    /// Pid of radosgw, if running.
    pub fn rgw_pid(&self) -> Option<u32> {
        self.rgw.as_ref().and_then(Proc::pid)
    }

    /// Kills the OSD with SIGKILL (a crash: nothing is flushed). The monitor keeps showing it
    /// `up` (no other OSD reports it, and beacons are only checked after 15 minutes); clients
    /// see it as ops that time out.
    pub fn stop_osd(&mut self) {
        self.osd.kill();
    }

    /// Starts the OSD again on its data and waits until the pool accepts a write; its
    /// objects are back. Bluestore only: a memstore OSD killed with SIGKILL loses its whole
    /// store (pools included), boots empty and its placement groups never become active.
    pub fn start_osd(&mut self) {
        assert_eq!(
            self.opts.objectstore,
            ObjectStore::Bluestore,
            "a memstore OSD cannot come back after kill -9: start the cluster with ObjectStore::Bluestore"
        );
        self.osd.spawn();
        self.wait_pool_writable();
    }

    /// Kills the monitor with SIGKILL.
    pub fn stop_mon(&mut self) {
        self.mon.kill();
    }

    /// Starts the monitor again on its store and waits until it answers and (if the OSD is
    /// running) the pool accepts a write again.
    pub fn start_mon(&mut self) {
        self.mon.spawn();
        self.wait_mon();
        if self.osd.child.is_some() {
            self.wait_pool_writable();
        }
    }

    /// Kills radosgw with SIGKILL.
    pub fn stop_rgw(&mut self) {
        self.rgw.as_mut().expect("cluster started without rgw").kill();
    }

    /// Starts radosgw again on the same port and waits until it answers an authenticated
    /// S3 request.
    pub fn start_rgw(&mut self) {
        self.rgw.as_mut().expect("cluster started without rgw").spawn();
        self.wait_rgw();
    }

    /// Runs `ceph -c <conf> <args>` and returns its stdout; panics (with log tails) on failure.
    pub fn ceph(&mut self, args: &[&str]) -> String {
        let c = self.conf.display().to_string();
        let full: Vec<&str> = ["-c", c.as_str()].iter().copied().chain(args.iter().copied()).collect();
        self.tool("ceph", &full)
    }

    /// Runs `rados -c <conf> <args>` with a deadline of twice the client timeout.
    pub fn rados(&self, args: &[&str]) -> Run {
        let c = self.conf.display().to_string();
        let full: Vec<&str> = ["-c", c.as_str()].iter().copied().chain(args.iter().copied()).collect();
        run_with_deadline("rados", &full, self.opts.client_timeout * 2 + Duration::from_secs(10))
    }

    /// `ceph health` (one word first: HEALTH_OK, HEALTH_WARN, HEALTH_ERR), with details.
    pub fn health(&mut self) -> String {
        self.ceph(&["health", "detail"]).trim().to_string()
    }

    /// Waits up to `within` for HEALTH_OK; panics with the last health and the logs.
    pub fn wait_health_ok(&mut self, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let h = self.health();
            if h.starts_with("HEALTH_OK") {
                return start.elapsed();
            }
            if start.elapsed() > within {
                panic!("no HEALTH_OK within {within:?}: {h}\n{}", self.tails());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// An S3 request to radosgw through curl, signed with the S3 user's keys (AWS SigV4,
    /// path-style): `path` is `/bucket` or `/bucket/key`, and may carry a query whose
    /// parameters are already sorted and percent-encoded (`?list-type=2&prefix=a%2F`: curl
    /// 7.88 signs the query as written); `body` is uploaded from a file. Returns the HTTP
    /// status (0: no answer, e.g. radosgw stopped) and the response body.
    pub fn s3(&self, method: &str, path: &str, body: Option<&Path>, headers: &[&str]) -> (u16, Vec<u8>) {
        self.s3_as(&self.s3_access_key, &self.s3_secret_key, method, path, body, headers)
    }

    /// Requests radosgw has served since it started (its `rgw.req` performance counter,
    /// read through its admin socket).
    pub fn rgw_requests(&self) -> u64 {
        let asok = self.dir.join(format!("run/ceph-{RGW_NAME}.asok")).display().to_string();
        let r = run_with_deadline("ceph", &["--admin-daemon", &asok, "perf", "dump"], Duration::from_secs(20));
        assert!(r.ok(), "perf dump of radosgw: {}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("perf dump is JSON");
        v["rgw"]["req"].as_u64().unwrap_or_else(|| panic!("no rgw.req counter in {}", r.stdout))
    }

    /// Keys under `prefix` in `bucket` (one ListObjectsV2 page; more than 1000 fails).
    pub fn bucket_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let q = prefix.replace('/', "%2F");
        let (code, body) = self.s3("GET", &format!("/{bucket}?list-type=2&max-keys=1000&prefix={q}"), None, &[]);
        let body = String::from_utf8_lossy(&body).to_string();
        assert_eq!(code, 200, "{body}");
        assert!(!body.contains("<IsTruncated>true"), "more keys than one page: {body}");
        body.split("<Key>").skip(1).filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_string())).collect()
    }

    /// An object's bytes (None when absent).
    pub fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let (code, body) = self.s3("GET", &format!("/{bucket}/{key}"), None, &[]);
        (code == 200).then_some(body)
    }

    /// Like [`CephCluster::s3`], signed with other keys.
    pub fn s3_as(
        &self,
        access_key: &str,
        secret_key: &str,
        method: &str,
        path: &str,
        body: Option<&Path>,
        headers: &[&str],
    ) -> (u16, Vec<u8>) {
        let out = self.dir.join(format!("s3-response-{}", uuid::Uuid::new_v4().simple()));
        let url = format!("{}{path}", self.rgw_url());
        let sigv4 = format!("aws:amz:{S3_REGION}:s3");
        let user = format!("{access_key}:{secret_key}");
        let out_s = out.display().to_string();
        let body_s = body.map(|b| b.display().to_string());
        // curl 7.88 (Debian 12) does not send x-amz-content-sha256 by itself, and RGW rejects
        // a SigV4 request without it (SignatureDoesNotMatch).
        let mut args = vec![
            "-s",
            "-S",
            "--max-time",
            "30",
            "-o",
            &out_s,
            "-w",
            "%{http_code}",
            "--aws-sigv4",
            &sigv4,
            "--user",
            &user,
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            "-X",
            method,
        ];
        if let Some(b) = &body_s {
            args.extend(["-T", b.as_str()]);
        }
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(&url);
        let r = run_with_deadline("curl", &args, Duration::from_secs(40));
        let body = std::fs::read(&out).unwrap_or_default();
        let _ = std::fs::remove_file(&out);
        let code = r.stdout.trim().parse().unwrap_or(0);
        (code, body)
    }

    /// The tails of every daemon's output and log.
    pub fn tails(&self) -> String {
        self.tails_first(None)
    }

    /// The tails of every daemon's output and log, the daemon named `first` (e.g.
    /// `radosgw`) first and longest.
    fn tails_first(&self, first: Option<&str>) -> String {
        let all: Vec<&Proc> = [&self.mon, &self.mgr, &self.osd].into_iter().chain(self.rgw.as_ref()).collect();
        let mut s = String::new();
        for p in all.iter().filter(|p| Some(p.name) == first) {
            s.push_str(&p.tails(80));
        }
        for p in all.iter().filter(|p| Some(p.name) != first) {
            s.push_str(&p.tails(20));
        }
        s
    }

    /// Runs a Ceph tool with a deadline; panics with its output and the daemons' logs.
    fn tool(&mut self, program: &str, args: &[&str]) -> String {
        // Only a guard against a hang: the client timeouts make tools fail sooner.
        let r = run_with_deadline(program, args, (self.opts.client_timeout * 3).max(Duration::from_secs(60)));
        if !r.ok() {
            self.kill_all();
            panic!(
                "{program} {args:?} failed ({}) after {:?}\nstdout: {}\nstderr: {}\n{}",
                r.status.map_or("killed at its deadline".to_string(), |s| s.to_string()),
                r.elapsed,
                r.stdout,
                r.stderr,
                self.tails()
            );
        }
        r.stdout
    }

    /// Polls `check` every 200 ms until it holds; panics with `what` and the logs after
    /// [`READY`] or if a daemon exits.
    fn wait_for(&mut self, what: &str, mut check: impl FnMut(&Self) -> Result<(), String>) {
        let start = Instant::now();
        loop {
            let mut dead = None;
            for p in [&mut self.mon, &mut self.mgr, &mut self.osd].into_iter().chain(self.rgw.as_mut()) {
                if let Some(c) = p.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    p.child = None;
                    dead = Some((p.name, format!("{} exited ({status})", p.name)));
                }
            }
            if let Some((name, dead)) = dead {
                let tails = self.tails_first(Some(name));
                self.kill_all();
                panic!("Ceph test cluster: {dead} while waiting for {what}\n{tails}");
            }
            let last = match check(self) {
                Ok(()) => return,
                Err(e) => e,
            };
            if start.elapsed() > READY {
                let tails = self.tails();
                self.kill_all();
                panic!("Ceph test cluster: {what} not within {READY:?}; last attempt: {last}\n{tails}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_mon(&mut self) {
        let c = self.conf.display().to_string();
        self.wait_for("the monitor answering", |_| {
            let r = run_with_deadline(
                "ceph",
                &["-c", &c, "--connect-timeout", "3", "mon", "stat"],
                Duration::from_secs(10),
            );
            if r.ok() { Ok(()) } else { Err(r.stderr) }
        });
    }

    fn wait_mgr(&mut self) {
        let c = self.conf.display().to_string();
        self.wait_for("the manager active", |_| {
            let r = run_with_deadline("ceph", &["-c", &c, "mgr", "stat"], Duration::from_secs(20));
            let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
            if v["available"] == true { Ok(()) } else { Err(format!("{} {}", r.stdout, r.stderr)) }
        });
    }

    /// A write (and removal) of a probe object in the pool, with short op timeouts.
    fn wait_pool_writable(&mut self) {
        let c = self.conf.display().to_string();
        let probe = self.dir.join("probe");
        std::fs::write(&probe, b"probe").expect("probe file");
        let probe_s = probe.display().to_string();
        let pool = self.pool.clone();
        self.wait_for("the pool accepting a write", |_| {
            let short = ["--rados-osd-op-timeout", "3", "--rados-mon-op-timeout", "3", "--client-mount-timeout", "3"];
            let mut put = vec!["-c", c.as_str(), "-p", pool.as_str()];
            put.extend(short);
            let mut rm = put.clone();
            put.extend(["put", "vmbackup-test-harness-probe", probe_s.as_str()]);
            rm.extend(["rm", "vmbackup-test-harness-probe"]);
            let r = run_with_deadline("rados", &put, Duration::from_secs(15));
            if !r.ok() {
                return Err(r.stderr);
            }
            let r = run_with_deadline("rados", &rm, Duration::from_secs(15));
            if r.ok() { Ok(()) } else { Err(r.stderr) }
        });
    }

    /// An authenticated ListBuckets answering 200.
    fn wait_rgw(&mut self) {
        self.wait_for("radosgw answering an authenticated request", |c| {
            let (code, body) = c.s3("GET", "/", None, &[]);
            if code == 200 { Ok(()) } else { Err(format!("HTTP {code}: {}", String::from_utf8_lossy(&body))) }
        });
    }

    fn kill_all(&mut self) {
        if let Some(r) = self.rgw.as_mut() {
            r.kill();
        }
        self.osd.kill();
        self.mgr.kill();
        self.mon.kill();
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The cluster's `ceph.conf`: every path inside `dir`, everything on 127.0.0.1.
fn conf_text(dir: &Path, fsid: &str, mon_v2: SocketAddr, mon_v1: SocketAddr, rgw_port: u16, o: &CephOptions) -> String {
    let d = dir.display();
    let t = o.client_timeout.as_secs().max(1);
    let store = match o.objectstore {
        ObjectStore::Memstore => format!("osd objectstore = memstore\nmemstore device bytes = {}\n", o.memstore_bytes),
        ObjectStore::Bluestore => "osd objectstore = bluestore\n\
             bluestore block create = true\n\
             bluestore block size = 10737418240\n\
             bluestore block db create = false\n\
             bluestore block wal create = false\n\
             osd memory target = 1073741824\n"
            .to_string(),
    };
    format!(
        "# Generated by the vmbackup test harness (tests/common/ceph.rs).
[global]
fsid = {fsid}
mon host = [v2:{mon_v2},v1:{mon_v1}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = {d}/run
admin socket = {d}/run/$cluster-$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
crash dir = {d}/crash
# One OSD: pools of size 1, placement on one host, no redundancy warning.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
# The host disk is shared and may be nearly full: never warn about it, never refuse to start.
mon data avail warn = -1
mon data avail crit = -1
mon warn on insecure global id reclaim allowed = false

[client]
keyring = {d}/admin.keyring
# One socket per client handle: many clients (CLI runs, librados handles) run at once.
admin socket = {d}/run/$cluster-$name.$pid.$cctid.asok
# A dead OSD or monitor is an error after {t} s, not a call that blocks.
rados osd op timeout = {t}
rados mon op timeout = {t}
client mount timeout = {t}

[mon]
keyring = {d}/mon/$cluster-$id/keyring
mon data = {d}/mon/$cluster-$id

[mgr]
keyring = {d}/mgr/$cluster-$id/keyring
mgr data = {d}/mgr/$cluster-$id

[osd]
keyring = {d}/osd/$cluster-$id/keyring
osd data = {d}/osd/$cluster-$id
{store}
[{RGW_NAME}]
keyring = {d}/rgw/keyring
admin socket = {d}/run/$cluster-$name.asok
rgw data = {d}/rgw
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
"
    )
}

/// A vmbackup-store config over `bucket`/`prefix` at `endpoint`, with the secret in a file
/// beside it, plus `extra` top-level lines (written before the `[s3]` section) and
/// `s3_extra` lines inside it.
#[allow(clippy::too_many_arguments)]
pub fn store_config(
    dir: &Path,
    name: &str,
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    (key, secret): (&str, &str),
    extra: &str,
    s3_extra: &str,
) -> PathBuf {
    let secret_file = dir.join(format!("{name}.secret"));
    std::fs::write(&secret_file, format!("{secret}\n")).expect("secret file");
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "backend = \"s3\"\n{extra}\n[s3]\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\n\
             access_key_id = \"{key}\"\nsecret_access_key_file = \"{}\"\nallow_http = true\n{s3_extra}\n",
            secret_file.display()
        ),
    )
    .expect("config");
    config
}

/// Runs the store binary with `config` and expects it to fail within 12 s with one line
/// containing `marker` and every `needle`, and no `secret` anywhere in its output.
pub fn expect_refused(dir: &Path, marker: &str, name: &str, config: &Path, needles: &[&str], secrets: &[&str]) {
    let started = std::time::Instant::now();
    let out = std::process::Command::new(super::bin("vmbackup-store"))
        .args([
            "--config",
            &config.display().to_string(),
            "--data-dir",
            &dir.join(name).display().to_string(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .output()
        .expect("run vmbackup-store");
    let took = started.elapsed();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{name}: the store started: {text}");
    assert!(took < std::time::Duration::from_secs(12), "{name}: took {took:?}: {text}");
    let line = text.lines().find(|l| l.contains(marker)).unwrap_or_else(|| panic!("{name}: {text}"));
    for n in needles {
        assert!(line.contains(n), "{name}: {n:?} not in {line:?}");
    }
    for s in secrets {
        assert!(!text.contains(s), "{name}: a secret was printed: {text}");
    }
    eprintln!("{name}: refused in {:.1}s: {line}", took.as_secs_f64());
}
