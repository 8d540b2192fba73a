//! `backup::network::cidr`: across network namespaces this test creates (two veth links
//! between an agent host and a store host; no address touches the machine's own network),
//! a backup with the tag reaches the store from the agent's address inside the CIDR even
//! though the store's default route is the other network, and a CIDR with no local address
//! fails before anything is sent. Needs root and iproute2; fails loudly without them.

mod common;

use std::path::Path;
use std::process::Command;

use common::Daemon;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip not found: install iproute2");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces joined by a management link (10.201.1.0/24) and a backup link
/// (10.201.2.0/24); the store's service address 10.201.9.9 is routed over management by
/// default and over the backup link at a worse metric.
struct Net {
    agent: String,
    store: String,
}

impl Net {
    fn new() -> Net {
        let id = std::process::id() % 100_000;
        let net = Net { agent: format!("vmbk-a{id}"), store: format!("vmbk-s{id}") };
        for ns in [&net.agent, &net.store] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (i, subnet) in [(1, "10.201.1"), (2, "10.201.2")] {
            let (a, s) = (format!("vba{i}-{id}"), format!("vbs{i}-{id}"));
            ip(&["link", "add", &a, "netns", &net.agent, "type", "veth", "peer", "name", &s, "netns", &net.store]);
            ip(&["-n", &net.agent, "addr", "add", &format!("{subnet}.1/24"), "dev", &a]);
            ip(&["-n", &net.store, "addr", "add", &format!("{subnet}.2/24"), "dev", &s]);
            ip(&["-n", &net.agent, "link", "set", &a, "up"]);
            ip(&["-n", &net.store, "link", "set", &s, "up"]);
        }
        ip(&["-n", &net.store, "addr", "add", "10.201.9.9/32", "dev", "lo"]);
        ip(&["-n", &net.agent, "route", "add", "10.201.9.9", "via", "10.201.1.2", "metric", "10"]);
        ip(&["-n", &net.agent, "route", "add", "10.201.9.9", "via", "10.201.2.2", "metric", "100"]);
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.agent, &self.store] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ctl(net: &Net, data: &Path, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &net.agent])
        .arg(common::bin("vmbackupctl"))
        .args(["--agent", "http://127.0.0.1:7870", "--session-file"])
        .arg(data.join("session"))
        .args(args)
        .output()
        .expect("vmbackupctl")
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The peers of the store's write sessions, in order.
fn session_peers(store: &Daemon) -> Vec<String> {
    store
        .log_text()
        .lines()
        .filter(|l| l.contains("session opened"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("peer=")).map(str::to_string))
        .collect()
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
        .unwrap_or(0)
}

#[test]
fn backups_leave_from_the_address_inside_the_backup_cidr() {
    let net = Net::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let store_config = dir.path().join("store.toml");
    std::fs::write(&store_config, "[tls]\ninsecure_plaintext = true\n").expect("config");
    let store_data = dir.path().join("store");
    let store = Daemon::start_in_netns(
        &net.store,
        "vmbackup-store",
        vec![
            "--listen".into(),
            "0.0.0.0:7871".into(),
            "--data-dir".into(),
            store_data.display().to_string(),
            "--config".into(),
            store_config.display().to_string(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ],
        store_data.clone(),
        dir.path().join("store.log"),
    );
    let agent_data = dir.path().join("agent");
    let _agent = Daemon::start_in_netns(
        &net.agent,
        "vmbackup-agent",
        vec![
            "--listen".into(),
            "127.0.0.1:7870".into(),
            "--data-dir".into(),
            agent_data.display().to_string(),
            "--no-embedded-store".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--volume-root".into(),
            dir.path().display().to_string(),
        ],
        agent_data.clone(),
        dir.path().join("agent.log"),
    );
    let img = dir.path().join("root.raw");
    std::fs::write(&img, common::pseudo_random(21, 1 << 20)).expect("image");
    let token = store_data.join("admin.token").display().to_string();
    let added = ok(ctl(
        &net,
        &agent_data,
        &["--json", "storage", "add", "--name", "s", "--url", "http://10.201.9.9:7871", "--token-file", &token],
    ));
    let bs = serde_json::from_str::<serde_json::Value>(&added).expect("json")["inventory"]["uuid"]
        .as_str()
        .expect("uuid")
        .to_string();
    let root = "c5d6e7f8091a2b3c4d5e6f708192a3b4";
    let volume = format!("uuid={root},path={},format=raw,type=Root,device=0", img.display());
    ok(ctl(&net, &agent_data, &["vm", "register", "--uuid", "d6e7f8091a2b3c4d5e6f708192a3b4c5", "--volume", &volume]));
    let backup = |tags: &[&str]| {
        let mut args = vec!["--json", "backup", "create", "--root-volume", root, "--storage", &bs, "--name", "n"];
        for t in tags {
            args.extend(["--system-tag", t]);
        }
        ctl(&net, &agent_data, &args)
    };

    // Without the tag the kernel's route (management) decides.
    ok(backup(&[]));
    assert_eq!(session_peers(&store), ["10.201.1.1"]);
    // With it, the connection leaves from the backup network's address.
    std::fs::write(&img, common::pseudo_random(22, 1 << 20)).expect("change");
    ok(backup(&["backup::network::cidr::10.201.2.0/24"]));
    assert_eq!(session_peers(&store), ["10.201.1.1", "10.201.2.1"]);
    // No local address in the CIDR: a clear error, and nothing reaches the store.
    let chunk_files = || walk(&store_data.join("chunks"));
    let before = chunk_files();
    let out = backup(&["backup::network::cidr::10.202.0.0/16"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no address of this host is inside the backup network 10.202.0.0/16"), "{err}");
    assert_eq!(session_peers(&store).len(), 2, "nothing was sent");
    assert_eq!(chunk_files(), before);
    // An invalid CIDR is an invalid argument.
    let out = backup(&["backup::network::cidr::10.0.0.0/33"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SYS.1007") && err.contains("invalid CIDR"), "{err}");
}
