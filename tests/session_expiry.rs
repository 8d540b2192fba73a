//! Agent sessions that expire, with a real agent: past its `expires` a session gets
//! UNAUTHENTICATED saying it expired, while plain and unexpired sessions work; a reload that
//! renews the expiry lets it in again without a restart; a config whose expiry is not a
//! date-time keeps the agent from starting, naming the session.

mod common;

use std::time::{Duration, Instant};

use common::{AgentOptions, start_agent};
use vmbackup_proto::agent::v1 as pb;

const PLAIN: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
const EXPIRED: &str = "1b2c3d4e5f60718293a4b5c6d7e8f90a";
const LATER: &str = "2c3d4e5f60718293a4b5c6d7e8f90a1b";

fn config(expired_until: &str) -> String {
    format!(
        "sessions = [\"{PLAIN}\", {{ id = \"{EXPIRED}\", expires = {expired_until} }}, \
         {{ id = \"{LATER}\", expires = \"2999-01-01T00:00:00+08:00\" }}]\n"
    )
}

async fn list(agent: &common::Daemon, session: &str) -> Result<(), tonic::Status> {
    let mut c = common::storage_client(agent, Some(session.into())).await;
    c.query_backup_storage(pb::QueryBackupStorageRequest::default()).await.map(drop)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_session_is_refused_until_a_reload_renews_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config("2020-01-01T00:00:00Z")).expect("config");
    let agent = start_agent(dir.path(), AgentOptions { config: Some(path.clone()), ..Default::default() });

    list(&agent, PLAIN).await.expect("a plain session never expires");
    list(&agent, LATER).await.expect("a session before its expiry");
    let e = list(&agent, EXPIRED).await.expect_err("expired");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("session expired at 2020-01-01T00:00:00Z"), "{}", e.message());
    assert_eq!(common::zstack_code(&e), "ID.1001");
    let e = list(&agent, "3d4e5f60718293a4b5c6d7e8f90a1b2c").await.expect_err("unknown");
    assert!(e.message().contains("unknown session"), "{}", e.message());

    std::fs::write(&path, config("2999-01-01T00:00:00Z")).expect("config");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.pid()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = list(&agent, EXPIRED).await {
        assert!(Instant::now() < deadline, "still refused after the reload: {e:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_session_expiry_that_is_not_a_date_time_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config("\"next tuesday\"")).expect("config");
    let out = std::process::Command::new(common::bin("vmbackup-agent"))
        .args(["--listen", "127.0.0.1:0", "--no-embedded-store", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a bad expiry: {stderr}");
    assert!(stderr.contains(EXPIRED) && stderr.contains("next tuesday"), "{stderr}");
}
