//! Test harness: starts vmbackup's daemons as real processes on loopback, each with its own
//! data directory and log file, and gives typed gRPC clients to them.
//!
//! Binaries are taken from the cargo target directory this test was built in
//! (`cargo build --workspace --bins` first: the README's test command does). A missing
//! binary fails the test loudly; nothing is skipped.

#![allow(dead_code)] // each test file uses a different part of the harness

pub mod ceph;
pub mod host;
pub mod qemu_vm;
pub mod qmp;
pub mod qsd;
pub mod store_calls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vmbackup_proto::agent::v1::backup_storage_service_client::BackupStorageServiceClient;

/// Path of a workspace binary next to this test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A daemon process; killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// Address its gRPC server listens on.
    pub addr: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    program: PathBuf,
    args: Vec<String>,
}

impl Daemon {
    /// Starts `program` with `args` (which must include `--data-dir`), logging to `log`, and
    /// waits for its log line `<ready>` carrying `listen=<addr>`.
    fn start(program: PathBuf, args: Vec<String>, data_dir: PathBuf, log: PathBuf, ready: &str) -> Daemon {
        let child = spawn(&program, &args, &log);
        let addr = wait_ready(&log, ready);
        Daemon { child: Some(child), addr, log, data_dir, program, args }
    }

    /// Starts our daemon `program` (its binary's name) with `vars` added to its environment.
    pub fn start_with_env(
        program: &str,
        args: Vec<String>,
        data_dir: PathBuf,
        log: PathBuf,
        vars: &[(&str, &str)],
    ) -> Daemon {
        let mut full: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
        full.push(bin(program).display().to_string());
        full.extend(args);
        Daemon::start(PathBuf::from("env"), full, data_dir, log, &format!("{program} ready"))
    }

    /// Starts `program` inside the network namespace `netns` (`ip netns exec`).
    pub fn start_in_netns(netns: &str, program: &str, args: Vec<String>, data_dir: PathBuf, log: PathBuf) -> Daemon {
        let mut full = vec!["netns".to_string(), "exec".to_string(), netns.to_string()];
        full.push(bin(program).display().to_string());
        full.extend(args);
        let ready = format!("{program} ready");
        Daemon::start(PathBuf::from("ip"), full, data_dir, log, &ready)
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it with SIGKILL (no clean-up runs: a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("daemon did not exit within 20 s of SIGTERM; log:\n{}", read(&self.log));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts it again on the same address and data directory.
    pub fn restart(&mut self) {
        self.stop();
        let addr = self.addr.to_string();
        let mut args = self.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = addr;
        }
        let ready =
            if self.program.ends_with("vmbackup-agent") { "vmbackup-agent ready" } else { "vmbackup-store ready" };
        let child = spawn(&self.program, &args, &self.log);
        self.addr = wait_ready(&self.log, ready);
        self.child = Some(child);
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("daemon is running")
    }

    /// The `/metrics` page of the running process (from its latest `metrics_listen=` line).
    pub fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let text = read(&self.log);
        let line = text.lines().rfind(|l| l.contains("metrics_listen=")).expect("no metrics_listen in the log");
        let addr = log_field(line, "metrics_listen").expect("address");
        let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
    }

    /// `http://<addr>` of the agent's REST listener (from its latest `rest_listen=` line).
    pub fn rest_url(&self) -> String {
        let text = read(&self.log);
        let line = text.lines().rfind(|l| l.contains("rest_listen=")).expect("no rest_listen in the log");
        format!("http://{}", log_field(line, "rest_listen").expect("address"))
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        read(&self.log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A field of a log line, plain text (`key=value`) or JSON (`fields.key`).
pub fn log_field(line: &str, key: &str) -> Option<String> {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        return v["fields"][key].as_str().map(str::to_string);
    }
    let prefix = format!("{key}=");
    line.split_whitespace().find_map(|w| w.strip_prefix(prefix.as_str())).map(str::to_string)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn spawn(program: &Path, args: &[String], log: &Path) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    Command::new(program)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()))
}

/// Waits for the last `ready` line of the log (a restart appends) and returns its address.
fn wait_ready(log: &Path, ready: &str) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen_before = read(log).matches(ready).count();
    loop {
        let text = read(log);
        if text.matches(ready).count() > seen_before {
            let line = text.lines().rfind(|l| l.contains(ready)).expect("ready line");
            let addr = log_field(line, "listen").unwrap_or_else(|| panic!("no listen= in {line:?}"));
            return addr.parse().unwrap_or_else(|e| panic!("bad address {addr:?}: {e}"));
        }
        if Instant::now() > deadline {
            panic!("daemon not ready after 60 s; log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a vmbackup-store on an ephemeral loopback port with its data under `dir`.
pub fn start_store(dir: &Path, name: &str) -> Daemon {
    start_store_with_config(dir, name, None)
}

/// Like [`start_store`], with a config file.
pub fn start_store_with_config(dir: &Path, name: &str, config: Option<&Path>) -> Daemon {
    start_store_with(dir, name, config, 64 << 10)
}

/// A store with a config file and a chunk size.
pub fn start_store_with(dir: &Path, name: &str, config: Option<&Path>, chunk_size: u32) -> Daemon {
    let data = dir.join(name);
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".to_string(),
        "--data-dir".to_string(),
        data.display().to_string(),
        "--chunk-size".to_string(),
        chunk_size.to_string(),
        "--metrics-listen".to_string(),
        "127.0.0.1:0".to_string(),
    ];
    if let Some(c) = config {
        args.extend(["--config".to_string(), c.display().to_string()]);
    }
    Daemon::start(bin("vmbackup-store"), args, data, dir.join(format!("{name}.log")), "vmbackup-store ready")
}

/// Options of a test agent.
#[derive(Default)]
pub struct AgentOptions {
    /// Run the embedded store (on an ephemeral port).
    pub embedded_store: bool,
    /// A config file to pass.
    pub config: Option<PathBuf>,
}

/// Starts a vmbackup-agent on an ephemeral loopback port with its data under `dir/agent`;
/// `dir` is a volume root (`--volume-root`, added to any the config file names), so the
/// test's images and restore targets under it are allowed.
pub fn start_agent(dir: &Path, opts: AgentOptions) -> Daemon {
    let data = dir.join("agent");
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".to_string(),
        "--data-dir".to_string(),
        data.display().to_string(),
        "--metrics-listen".to_string(),
        "127.0.0.1:0".to_string(),
        "--rest-listen".to_string(),
        "127.0.0.1:0".to_string(),
        "--volume-root".to_string(),
        dir.display().to_string(),
    ];
    if opts.embedded_store {
        args.extend(["--embedded-store-listen".to_string(), "127.0.0.1:0".to_string()]);
    } else {
        args.push("--no-embedded-store".to_string());
    }
    if let Some(c) = opts.config {
        args.extend(["--config".to_string(), c.display().to_string()]);
    }
    Daemon::start(bin("vmbackup-agent"), args, data, dir.join("agent.log"), "vmbackup-agent ready")
}

/// The session the agent created in its data directory.
pub fn session(agent: &Daemon) -> String {
    std::fs::read_to_string(agent.data_dir.join("session")).expect("session file").trim().to_string()
}

/// Adds `authorization: OAuth <token>` to every call.
#[derive(Clone)]
pub struct Auth(pub Option<String>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut().insert("authorization", t.parse().expect("ascii header"));
        }
        Ok(r)
    }
}

/// A channel to `url`.
pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string()).expect("url").connect().await.expect("connect")
}

/// Authenticated BackupStorageService client.
pub type StorageClient = BackupStorageServiceClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

/// A BackupStorageService client sending `token` (None: no authorization metadata).
pub async fn storage_client(agent: &Daemon, token: Option<String>) -> StorageClient {
    BackupStorageServiceClient::with_interceptor(channel(&agent.url()).await, Auth(token.map(|t| format!("OAuth {t}"))))
}

/// The ZStack error code in an agent error status.
pub fn zstack_code(s: &tonic::Status) -> String {
    vmbackup_agent::api::error_code_of(s).map(|e| e.code).unwrap_or_else(|| panic!("no ErrorCode in status {s:?}"))
}

/// A client of a vmbackup-store, sending an API token.
pub type StoreClient = vmbackup_proto::store::v1::image_store_client::ImageStoreClient<
    tonic::service::interceptor::InterceptedService<Channel, Auth>,
>;

/// The store's own admin token (`<data_dir>/admin.token`).
pub fn store_token(store: &Daemon) -> String {
    std::fs::read_to_string(store.data_dir.join("admin.token")).expect("store admin token").trim().to_string()
}

/// A client of `store` presenting `token` (None: no credential), message limits raised.
pub async fn store_client_with(store: &Daemon, token: Option<&str>) -> StoreClient {
    vmbackup_proto::store::v1::image_store_client::ImageStoreClient::with_interceptor(
        channel(&store.url()).await,
        Auth(token.map(|t| format!("Bearer {t}"))),
    )
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20)
}

/// Connects to a store as its admin, with message limits raised for chunks.
pub async fn store_client(store: &Daemon) -> StoreClient {
    store_client_with(store, Some(&store_token(store))).await
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs a tool, failing loudly if it is missing or fails.
pub fn run_tool(tool: &str, args: &[&str]) -> String {
    let out =
        Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool} not found ({e}): install qemu-utils"));
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Authenticated VmBackupService client.
pub type BackupClient = vmbackup_proto::agent::v1::vm_backup_service_client::VmBackupServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, Auth>,
>;

/// A VmBackupService client of `agent` with its session.
pub async fn backup_client(agent: &Daemon) -> BackupClient {
    vmbackup_proto::agent::v1::vm_backup_service_client::VmBackupServiceClient::with_interceptor(
        channel(&agent.url()).await,
        Auth(Some(format!("OAuth {}", session(agent)))),
    )
}

/// The uuid of the backup storage `local`: the agent's embedded store.
pub async fn embedded_storage(agent: &Daemon) -> String {
    let q = vmbackup_proto::agent::v1::QueryBackupStorageRequest {
        conditions: vec!["name=local".into()],
        ..Default::default()
    };
    let mut c = storage_client(agent, Some(session(agent))).await;
    c.query_backup_storage(q).await.expect("query backup storage local").into_inner().inventories[0].uuid.clone()
}

/// Registers `store` as a backup storage of `agent`; returns its uuid.
pub async fn add_storage(agent: &Daemon, store: &Daemon, name: &str) -> String {
    storage_client(agent, Some(session(agent)))
        .await
        .add_image_store_backup_storage(vmbackup_proto::agent::v1::AddImageStoreBackupStorageRequest {
            name: name.into(),
            url: store.url(),
            token: store_token(store),
            ..Default::default()
        })
        .await
        .expect("add storage")
        .into_inner()
        .inventory
        .expect("inventory")
        .uuid
}

/// A store's counters so far.
pub async fn store_counters(store: &Daemon) -> vmbackup_proto::store::v1::StoreCounters {
    let mut c = store_client(store).await;
    c.status(vmbackup_proto::store::v1::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .counters
        .expect("counters")
}

/// Chunks uploaded to a store so far.
pub async fn chunks_uploaded(store: &Daemon) -> u64 {
    store_counters(store).await.chunks_uploaded
}

/// A volume of a VM layout, named after its type (`Root`, `Data`).
pub fn volume_spec(
    uuid: &str,
    kind: &str,
    path: &Path,
    format: &str,
    device_id: i32,
) -> vmbackup_proto::agent::v1::VolumeSpec {
    vmbackup_proto::agent::v1::VolumeSpec {
        uuid: uuid.into(),
        name: kind.into(),
        install_path: path.display().to_string(),
        format: format.into(),
        r#type: kind.into(),
        device_id,
    }
}

/// A VM layout with one root volume.
pub fn one_volume_vm(vm: &str, root: &str, path: &Path, format: &str) -> vmbackup_proto::agent::v1::RegisterVmRequest {
    use vmbackup_proto::agent::v1 as pb;
    pb::RegisterVmRequest {
        uuid: vm.into(),
        volumes: vec![pb::VolumeSpec {
            uuid: root.into(),
            name: "ROOT".into(),
            install_path: path.display().to_string(),
            format: format.into(),
            r#type: "Root".into(),
            device_id: 0,
        }],
        ..Default::default()
    }
}

/// Follows a job to its end (WatchJob) and returns its last progress.
pub async fn last_progress(c: &mut BackupClient, job: &str) -> vmbackup_proto::agent::v1::JobProgress {
    use vmbackup_proto::agent::v1 as pb;
    let mut w = c.watch_job(pb::WatchJobRequest { job_uuid: job.into() }).await.expect("watch").into_inner();
    let mut last = pb::JobProgress::default();
    while let Some(p) = w.message().await.expect("progress") {
        last = p;
    }
    last
}

/// Waits until the job exists and has read at least `bytes`; panics if it ends first.
pub async fn wait_until_read(c: &mut BackupClient, job: &str, bytes: i64) {
    use vmbackup_proto::agent::v1 as pb;
    let mut w = loop {
        match c.watch_job(pb::WatchJobRequest { job_uuid: job.into() }).await {
            Ok(w) => break w.into_inner(),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    loop {
        let p = w
            .message()
            .await
            .expect("progress")
            .unwrap_or_else(|| panic!("job {job} ended before reading {bytes} bytes"));
        if p.bytes_read >= bytes {
            return;
        }
    }
}

/// The services a daemon's gRPC reflection lists, sorted (what `grpcurl list` shows).
pub async fn reflected_services(url: &str) -> Vec<String> {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel(url).await);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter([req])).await.expect("reflection").into_inner();
    let resp = stream.next().await.expect("one response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected {resp:?}")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

/// Peak resident memory (VmHWM) of a running process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}
