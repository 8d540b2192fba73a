//! The daemons under systemd: unit files verify, and each daemon speaks the notify protocol
//! (READY=1 once serving, WATCHDOG=1 while alive, STOPPING=1 on SIGTERM) to a real
//! NOTIFY_SOCKET listener made by the test.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Reads notify datagrams until `want` appears (or panics after `limit`), returning all seen.
fn wait_for(sock: &UnixDatagram, want: &str, limit: Duration, seen: &mut Vec<String>) {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return;
            }
        }
    }
    panic!("no {want} within {limit:?}; saw {seen:?}");
}

fn run_under_notify_socket(program: &str, args: &[String]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let mut child = Command::new(common::bin(program))
        .args(args)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut seen = Vec::new();
    wait_for(&sock, "READY=1", Duration::from_secs(30), &mut seen);
    let ready_at = seen.len();
    wait_for(&sock, "WATCHDOG=1", Duration::from_secs(5), &mut seen);
    wait_for(&sock, "WATCHDOG=1", Duration::from_secs(5), &mut seen);
    assert!(
        !seen[..ready_at - 1].iter().any(|m| m.contains("WATCHDOG=1") || m.contains("STOPPING=1")),
        "{program}: nothing but status before READY: {seen:?}"
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    wait_for(&sock, "STOPPING=1", Duration::from_secs(10), &mut seen);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{program} exited with {status} after SIGTERM");
            break;
        }
        assert!(Instant::now() < deadline, "{program} did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn store_notifies_ready_watchdog_and_stopping() {
    run_under_notify_socket("vmbackup-store", &["--listen".into(), "127.0.0.1:0".into()]);
}

#[test]
fn agent_notifies_ready_watchdog_and_stopping() {
    run_under_notify_socket(
        "vmbackup-agent",
        &["--listen".into(), "127.0.0.1:0".into(), "--embedded-store-listen".into(), "127.0.0.1:0".into()],
    );
}

#[test]
fn unit_files_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let analyze = which("systemd-analyze").expect("systemd-analyze not found: install the systemd package");
    let kill = which("kill").expect("kill not found");
    for name in ["vmbackup-agent", "vmbackup-store"] {
        let unit = std::fs::read_to_string(root.join(format!("systemd/{name}.service"))).expect("unit file");
        // Point ExecStart at the built binaries so verify can check they are executable.
        let unit = unit
            .replace(&format!("/usr/bin/{name}"), &common::bin(name).display().to_string())
            .replace("/bin/kill", &kill);
        std::fs::write(dir.path().join(format!("{name}.service")), unit).expect("write unit");
    }
    let out = Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("vmbackup-agent.service"))
        .arg(dir.path().join("vmbackup-store.service"))
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("vmbackup"), "systemd-analyze verify failed:\n{stderr}");
}

fn which(tool: &str) -> Option<String> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|p| p.join(tool)).find(|p| p.is_file()).map(|p| p.display().to_string())
    })
}
