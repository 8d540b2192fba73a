//! Operating the agent: SIGTERM during a backup lets it run for the grace time, refuses new
//! jobs, then cancels it without leaving anything visible, and the retry succeeds; SIGHUP
//! swaps sessions and host-wide caps on a running agent without a restart, and a broken
//! file is refused while the running configuration stays.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{AgentOptions, Auth, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::vm_backup_service_client::VmBackupServiceClient;

const VM: &str = "1a2b3c4d5e6f708192a3b4c5d6e7f809";
const ROOT: &str = "2b3c4d5e6f708192a3b4c5d6e7f8091a";
const S1: &str = "3c4d5e6f708192a3b4c5d6e7f8091a2b";
const S2: &str = "4d5e6f708192a3b4c5d6e7f8091a2b3c";

fn signal(pid: u32, s: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")), s).expect("kill");
}

fn vm(root: &str, path: &Path) -> pb::RegisterVmRequest {
    common::one_volume_vm(VM, root, path, "raw")
}

async fn client(agent: &common::Daemon, session: &str) -> common::BackupClient {
    VmBackupServiceClient::with_interceptor(common::channel(&agent.url()).await, Auth(Some(format!("OAuth {session}"))))
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_backup_drains_then_cancels_and_the_retry_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    std::fs::write(&img, common::pseudo_random(3, 32 << 20)).expect("image");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "shutdown_grace_seconds = 2\n").expect("config");
    let store = start_store(dir.path(), "store");
    let mut agent = start_agent(dir.path(), AgentOptions { config: Some(config), ..Default::default() });
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let group = "5e6f708192a3b4c5d6e7f8091a2b3c4d";
    let req = pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.clone(),
        name: "slow".into(),
        resource_uuid: group.into(),
        volume_read_bandwidth: Some(2 << 20),
        vm: Some(vm(ROOT, &img)),
        ..Default::default()
    };
    let (mut bg, r) = (c.clone(), req.clone());
    let running = tokio::spawn(async move { bg.create_vm_backup(r).await });
    common::wait_until_read(&mut c, group, 1 << 20).await;

    let t0 = Instant::now();
    signal(agent.pid(), nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: no new job starts.
    let other = dir.path().join("other.raw");
    std::fs::write(&other, [1u8; 65536]).expect("other");
    let e = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: "6f708192a3b4c5d6e7f8091a2b3c4d5e".into(),
            backup_storage_uuid: bs.clone(),
            name: "late".into(),
            vm: Some(pb::RegisterVmRequest {
                uuid: "708192a3b4c5d6e7f8091a2b3c4d5e6f".into(),
                ..vm("6f708192a3b4c5d6e7f8091a2b3c4d5e", &other)
            }),
            ..Default::default()
        })
        .await
        .expect_err("a job started during shutdown");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{e:?}");
    agent.stop(); // waits for the exit
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2 + 10), "exit took {took:?}, grace is 2 s");
    let first = running.await.expect("join");
    assert!(first.is_err(), "the drained backup did not complete in the grace time");
    let log = agent.log_text();
    assert!(log.contains("grace time over: cancelling running jobs"), "{log}");
    let mut sc = common::store_client(&store).await;
    let groups = sc.list_groups(vmbackup_proto::store::v1::ListGroupsRequest {}).await.expect("groups");
    assert!(groups.into_inner().groups.is_empty(), "a cancelled backup must not be visible");

    agent.restart();
    let mut c = common::backup_client(&agent).await;
    let retry = pb::CreateVmBackupRequest { volume_read_bandwidth: None, ..req };
    let inv = c.create_vm_backup(retry).await.expect("retry").into_inner().inventories;
    assert_eq!(inv[0].group_uuid, group);
    let groups = sc.list_groups(vmbackup_proto::store::v1::ListGroupsRequest {}).await.expect("groups");
    assert_eq!(groups.into_inner().groups.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_swaps_sessions_and_host_caps_and_refuses_a_broken_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    std::fs::write(&img, common::pseudo_random(5, 3 << 20)).expect("image");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("sessions = [\"{S1}\"]\n")).expect("config");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions { config: Some(config.clone()), ..Default::default() });
    let mut storages = common::storage_client(&agent, Some(S1.into())).await;
    let bs = storages
        .add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "s".into(),
            url: store.url(),
            token: common::store_token(&store),
            ..Default::default()
        })
        .await
        .expect("add with S1")
        .into_inner()
        .inventory
        .expect("inventory")
        .uuid;

    // S2 replaces S1, and reading volumes is capped host-wide at 1 MiB/s.
    std::fs::write(&config, format!("sessions = [\"{S2}\"]\n[limits]\nvolume_read_bandwidth = 1048576\n"))
        .expect("config");
    let pid = agent.pid();
    signal(pid, nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = client(&agent, S1).await.query_volume_backup(pb::QueryVolumeBackupRequest::default()).await;
        match r {
            Err(e) if e.code() == tonic::Code::Unauthenticated => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("S1 still accepted after SIGHUP: {other:?}"),
        }
    }
    assert_eq!(agent.pid(), pid, "no restart");
    let mut c = client(&agent, S2).await;
    let t0 = Instant::now();
    c.create_vm_backup(pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs,
        name: "capped".into(),
        vm: Some(vm(ROOT, &img)),
        ..Default::default()
    })
    .await
    .expect("backup with S2");
    let took = t0.elapsed();
    // 3 MiB at 1 MiB/s, with bursts of at most 1/20 s: never under 2.5 s.
    assert!(took >= Duration::from_millis(2500), "the host cap was not applied: 3 MiB in {took:?}");

    // A broken file: refused, and the running configuration stays.
    std::fs::write(&config, "sessions = [\"unterminated\n").expect("config");
    signal(pid, nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log_text().contains("reload refused") {
        assert!(Instant::now() < deadline, "no reload error logged:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.query_volume_backup(pb::QueryVolumeBackupRequest::default()).await.expect("S2 still accepted");
    assert!(agent.log_text().contains("configuration reloaded"));
}

/// The value of `var` in the environment of the running process `pid`.
fn env_of(pid: u32, var: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let prefix = format!("{var}=");
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn both_daemons_run_with_their_malloc_settings_under_their_own_pid() {
    let store_settings = vmbackup_store::daemon::malloc::STORE_SETTINGS;
    let agent_settings = vmbackup_store::daemon::malloc::AGENT_SETTINGS;
    for (var, _) in store_settings.iter().chain(&agent_settings) {
        assert!(std::env::var_os(var).is_none(), "run the tests without {var} set");
    }
    // The agent maps chunk-sized buffers, the store keeps them in its heap.
    assert_eq!(agent_settings[1], ("MALLOC_MMAP_THRESHOLD_", "1048576"));
    assert_eq!(store_settings[1], ("MALLOC_MMAP_THRESHOLD_", "33554432"));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    // Each answers on the PID it was started with, now running with the settings.
    let bs = common::add_storage(&agent, &store, "s").await;
    assert!(!bs.is_empty());
    for (var, value) in store_settings {
        assert_eq!(env_of(store.pid(), var).as_deref(), Some(value), "store {var}");
    }
    for (var, value) in agent_settings {
        assert_eq!(env_of(agent.pid(), var).as_deref(), Some(value), "agent {var}");
    }
    // A value the operator set is kept.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("s");
    let kept = common::Daemon::start_with_env(
        "vmbackup-store",
        vec!["--listen".into(), "127.0.0.1:0".into(), "--data-dir".into(), data.display().to_string()],
        data,
        dir.path().join("s.log"),
        &[("MALLOC_ARENA_MAX", "4")],
    );
    assert_eq!(env_of(kept.pid(), "MALLOC_ARENA_MAX").as_deref(), Some("4"));
    assert_eq!(env_of(kept.pid(), "MALLOC_TRIM_THRESHOLD_").as_deref(), Some("67108864"));
}
