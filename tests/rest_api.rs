//! The seeds' REST API, driven as ZStack's clients drive it: a plain HTTP client, the
//! seeds' URLs and bodies, `Authorization: OAuth <session>`, 202 and a `location` to poll.
//!
//! One agent (with its embedded store) and one VM under QEMU (TCG) with two disks laid
//! out as ZStack lays them out, never registered: CreateVmBackup with only
//! `rootVolumeUuid`, `backupStorageUuid` and `name` finds it through its QMP socket.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::qemu_vm::QemuVm;
use common::{AgentOptions, run_tool, start_agent};
use serde_json::{Value, json};

const VM: &str = "5d3a9a0e-6b1c-4f59-9a4e-0c1d2e3f4a5b";
const ROOT: &str = "aa6fad9b71af3785a9fdec200bab3ee8";
const DATA: &str = "f6c7d5276c873eba8accddd4a09a1ee6";

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A plain HTTP client (reqwest is built without a default TLS provider).
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

struct Rest {
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Rest {
    async fn send(&self, method: &str, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> (u16, Value) {
        let url = format!("{}/zstack/v1/{path}", self.base);
        let mut r = self
            .http
            .request(method.parse().expect("method"), &url)
            .header("Content-Type", "application/json;charset=UTF-8")
            .header("Authorization", format!("OAuth {}", self.session));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.body(b.to_string());
        }
        let resp = r.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {url}: not JSON ({e}): {text}")))
    }

    /// Polls an API job's location until it is no longer 202.
    async fn poll(&self, location: &str) -> (u16, Value) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let resp = self
                .http
                .get(location)
                .header("Authorization", format!("OAuth {}", self.session))
                .send()
                .await
                .expect("poll");
            let status = resp.status().as_u16();
            let body: Value = serde_json::from_str(&resp.text().await.expect("text")).expect("json");
            if status != 202 {
                return (status, body);
            }
            assert_eq!(body["location"], location, "a running job answers with its location");
            assert!(Instant::now() < deadline, "API job {location} still running");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A call through the async protocol: 202 with a location, then 200 with the result.
    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, accepted) = self.send(method, path, body, &[]).await;
        assert_eq!(status, 202, "{method} {path}: {accepted}");
        let location = accepted["location"].as_str().expect("location").to_string();
        assert!(location.starts_with(&format!("{}/zstack/v1/api-jobs/", self.base)), "{location}");
        let (status, result) = self.poll(&location).await;
        assert_eq!(status, 200, "{method} {path}: {result}");
        result
    }
}

/// `Nov 14, 2017 10:20:57 PM`.
fn is_zstack_date(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let parts: Vec<&str> = s.split(' ').collect();
    let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    parts.len() == 5
        && months.contains(&parts[0])
        && parts[1].strip_suffix(',').is_some_and(|d| d.parse::<u32>().is_ok_and(|d| (1..=31).contains(&d)))
        && parts[2].len() == 4
        && parts[2].parse::<u32>().is_ok()
        && parts[3].split(':').count() == 3
        && matches!(parts[4], "AM" | "PM")
}

fn zstack_layout(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let root_dir = dir.join(format!("zstack_ps/rootVolumes/acct-36c27e8f/vol-{ROOT}"));
    let data_dir = dir.join(format!("zstack_ps/dataVolumes/acct-36c27e8f/vol-{DATA}"));
    std::fs::create_dir_all(&root_dir).expect("root dir");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let (root, data) = (root_dir.join(format!("{ROOT}.qcow2")), data_dir.join(format!("{DATA}.raw")));
    let seed = dir.join("seed.raw");
    std::fs::write(&seed, common::pseudo_random(31, 3 << 20)).expect("seed");
    run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(&root), "4M"]);
    run_tool("qemu-img", &["convert", "-n", "-f", "raw", "-O", "qcow2", &p(&seed), &p(&root)]);
    std::fs::write(&data, common::pseudo_random(32, 2 << 20)).expect("data");
    (root, data)
}

/// One HTTP request received by the test's webhook server: its headers and body.
async fn receive_webhook(listener: tokio::net::TcpListener) -> (Vec<(String, String)>, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut s, _) = listener.accept().await.expect("webhook connection");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, body_start) = loop {
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "webhook request ended early");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&buf[..at]).to_string(), at + 4);
        }
    };
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    let len: usize = headers.iter().find(|(k, _)| k == "content-length").map_or(0, |(_, v)| v.parse().expect("len"));
    while buf.len() < body_start + len {
        let n = s.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "webhook body ended early");
        buf.extend_from_slice(&chunk[..n]);
    }
    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await.expect("answer");
    assert!(head.starts_with("POST /hook "), "{head}");
    (headers, serde_json::from_slice(&buf[body_start..body_start + len]).expect("webhook body is JSON"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seeds_rest_calls_back_up_an_unregistered_vm_and_answer_as_zstack_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, data) = zstack_layout(dir.path());
    let (then_root, then_data) = (dir.path().join("then-root.raw"), dir.path().join("then-data.raw"));
    run_tool("qemu-img", &["convert", "-O", "raw", &p(&root), &p(&then_root)]);
    std::fs::copy(&data, &then_data).expect("copy");
    let qmp_dir = dir.path().join("qmp");
    std::fs::create_dir_all(&qmp_dir).expect("qmp dir");
    let vm = QemuVm::start_with(dir.path(), &root, &data, qmp_dir.join("vm.sock"), &["-uuid", VM, "-name", "web-1"]);
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("[volumes]\nqmp_dirs = [\"{}\"]\n", p(&qmp_dir))).expect("config");
    let agent = start_agent(dir.path(), AgentOptions { embedded_store: true, config: Some(config) });
    let rest = Rest { base: agent.rest_url(), session: common::session(&agent), http: http() };

    // QueryBackupStorage: the embedded store, as the seed's ImageStore sample.
    let (status, q) = rest.send("GET", "backup-storage", None, &[]).await;
    assert_eq!(status, 200, "{q}");
    assert_eq!(q["success"], true);
    let inv = &q["inventories"][0];
    let bs = inv["uuid"].as_str().expect("uuid").to_string();
    assert_eq!(inv["type"], "ImageStoreBackupStorage");
    assert_eq!(inv["status"], "Connected");
    assert!(inv["totalCapacity"].is_u64() && inv["availableCapacity"].is_u64(), "Longs are numbers: {inv}");
    assert!(inv["sshPort"].is_u64(), "{inv}");
    assert!(is_zstack_date(&inv["createDate"]) && is_zstack_date(&inv["lastOpDate"]), "{inv}");
    assert!(inv["attachedZoneUuids"].is_array(), "{inv}");
    let (status, one) = rest.send("GET", &format!("backup-storage/{bs}"), None, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(one["inventories"].as_array().map(Vec::len), Some(1));
    let (_, none) = rest.send("GET", "backup-storage?q=name=nothing-here", None, &[]).await;
    assert_eq!(none["inventories"], json!([]));
    let (_, some) =
        rest.send("GET", &format!("backup-storage?q=uuid={bs}&replyWithCount=true&fields=uuid,name"), None, &[]).await;
    assert_eq!(some["total"], 1);
    assert_eq!(some["inventories"][0].as_object().map(|o| o.len()), Some(2), "{some}");
    let (status, bad) = rest.send("GET", "backup-storage?q=colour=red", None, &[]).await;
    assert_eq!(status, 503, "{bad}");
    assert_eq!(bad["error"]["code"], "SYS.1007");

    // CreateVmBackup with the seed's body: the VM is found by its root volume.
    let create = json!({
        "params": {"backupStorageUuid": bs, "name": "backup-1", "description": "a critical volume backup"},
        "systemTags": [],
        "userTags": ["nightly"],
    });
    let job = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let path = format!("volumes/{ROOT}/vm-backups");
    let (status, accepted) = rest.send("POST", &path, Some(&create), &[("X-Job-UUID", job)]).await;
    assert_eq!(status, 202, "{accepted}");
    let location = accepted["location"].as_str().expect("location").to_string();
    assert!(location.ends_with(&format!("/zstack/v1/api-jobs/{job}")), "{location}");
    let (status, created) = rest.poll(&location).await;
    assert_eq!(status, 200, "{created}");
    let invs = created["inventories"].as_array().expect("inventories");
    assert_eq!(invs.len(), 2, "both disks of the VM: {created}");
    let group = invs[0]["groupUuid"].as_str().expect("group").to_string();
    assert_eq!(group, job, "a create without resourceUuid is known by its API job's uuid at once");
    for inv in invs {
        assert!(is_zstack_date(&inv["createDate"]), "{inv}");
        assert!(inv["size"].is_u64(), "{inv}");
        assert_eq!(inv["description"], "a critical volume backup");
        assert_eq!(inv["backupStorageRefs"][0]["backupStorageUuid"], bs.as_str());
    }
    let by_volume = |v: &str| invs.iter().find(|i| i["volumeUuid"] == v).unwrap_or_else(|| panic!("{v} in {created}"));
    assert_eq!(by_volume(ROOT)["type"], "Root");
    assert_eq!(by_volume(ROOT)["size"], 4 << 20);
    assert_eq!(by_volume(DATA)["type"], "Data");

    // X-Job-UUID: the same request is the same job; another request under it is refused.
    let (status, again) = rest.send("POST", &path, Some(&create), &[("X-Job-UUID", job)]).await;
    assert_eq!((status, again["location"].as_str()), (202, Some(location.as_str())));
    assert_eq!(rest.poll(&location).await, (200, created.clone()));
    let other = json!({"params": {"backupStorageUuid": bs, "name": "backup-2"}});
    let (status, refused) = rest.send("POST", &path, Some(&other), &[("X-Job-UUID", job)]).await;
    assert_eq!(status, 400, "{refused}");
    // A retried create under the group's resourceUuid with other parameters is refused.
    let retry = json!({"params": {"backupStorageUuid": bs, "name": "backup-2", "resourceUuid": group}});
    let (_, accepted) = rest.send("POST", &path, Some(&retry), &[]).await;
    let (status, failed) = rest.poll(accepted["location"].as_str().expect("location")).await;
    assert_eq!(status, 503, "{failed}");
    assert!(failed["error"]["details"].as_str().is_some_and(|d| d.contains("another request")), "{failed}");
    let (_, backups) = rest.send("GET", "volume-backups?replyWithCount=true", None, &[]).await;
    assert_eq!(backups["total"], 2, "no second group was made: {backups}");
    // DeleteVmBackup while a backup of the group runs: Permissive refuses, Enforcing cancels
    // it and waits; nothing of that group is left, and the VM's chain is flat again.
    let slow = "2c3d4e5f60718293a4b5c6d7e8f90a1b";
    // The guest writes, so this incremental has chunks to read (slowly).
    assert_eq!(vm.guest_io("disk0", "write -P 0x5a 0 64k"), "");
    assert_eq!(vm.guest_io("disk1", "write -P 0x5b 0 64k"), "");
    let slow_create = json!({"params": {"backupStorageUuid": bs, "name": "slow", "resourceUuid": slow,
        "volumeReadBandwidth": 1_048_576}});
    let (_, slow_job) = rest.send("POST", &path, Some(&slow_create), &[]).await;
    let mut grpc = common::backup_client(&agent).await;
    if tokio::time::timeout(Duration::from_secs(30), common::wait_until_read(&mut grpc, slow, 1)).await.is_err() {
        panic!("slow backup: {:?}", rest.poll(slow_job["location"].as_str().expect("location")).await);
    }
    let (_, accepted) = rest.send("DELETE", &format!("vm-backups/{slow}?deleteMode=Permissive"), None, &[]).await;
    let (status, refused) = rest.poll(accepted["location"].as_str().expect("location")).await;
    assert_eq!(status, 503, "{refused}");
    assert!(refused["error"]["details"].as_str().is_some_and(|d| d.contains("is using backup group")), "{refused}");
    let enforced = rest.call("DELETE", &format!("vm-backups/{slow}?deleteMode=Enforcing"), None).await;
    assert_eq!(enforced, json!({}));
    let (status, cancelled) = rest.poll(slow_job["location"].as_str().expect("location")).await;
    assert_eq!(status, 503, "{cancelled}");
    assert_eq!(cancelled["error"]["code"], "SYS.1017", "{cancelled}");
    let (_, none) = rest.send("GET", &format!("volume-backups?q=groupUuid={slow}"), None, &[]).await;
    assert_eq!(none["inventories"], json!([]));
    assert_eq!(vm.image_files(), [p(&data), p(&root)], "no overlay left in the VM's chain");

    // userTags are kept, returned and queryable (also by ZStack's __userTag__).
    assert_eq!(by_volume(ROOT)["userTags"], json!(["nightly"]), "{created}");
    let (_, tagged) = rest.send("GET", "volume-backups?q=__userTag__=nightly&count=true", None, &[]).await;
    assert_eq!(tagged["total"], 2, "{tagged}");
    let (_, untagged) = rest.send("GET", "volume-backups?q=userTags=weekly", None, &[]).await;
    assert_eq!(untagged["inventories"], json!([]));
    let (_, sorted) = rest.send("GET", "volume-backups?sort=-size&limit=1", None, &[]).await;
    assert_eq!(sorted["inventories"][0]["volumeUuid"], ROOT, "{sorted}");

    // SyncVmBackup, its result delivered to a webhook.
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("hook");
    let hook_url = format!("http://{}/hook", hook.local_addr().expect("addr"));
    let received = tokio::spawn(receive_webhook(hook));
    let sync_job = "1b2c3d4e5f60718293a4b5c6d7e8f90a";
    let (status, _) = rest
        .send(
            "PUT",
            &format!("vm-backups/imageStore/{bs}/actions"),
            Some(&json!({"syncVmBackup": {}})),
            &[("X-Job-UUID", sync_job), ("X-Web-Hook", &hook_url)],
        )
        .await;
    assert_eq!(status, 202);
    let (headers, body) =
        tokio::time::timeout(Duration::from_secs(60), received).await.expect("webhook").expect("join");
    let header = |k: &str| headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.as_str());
    assert_eq!(header("x-job-uuid"), Some(sync_job));
    assert_eq!(header("x-job-success"), Some("true"));
    assert_eq!(body, json!({}));

    // RestoreVmBackup in the same style: identical to the disks as they were.
    let (r_root, r_data) = (dir.path().join("restored-root.raw"), dir.path().join("restored-data.raw"));
    let restore = json!({"restoreVmBackup": {"backupStorageUuid": bs, "targets": [
        {"volumeUuid": ROOT, "installPath": p(&r_root), "format": "raw"},
        {"volumeUuid": DATA, "installPath": p(&r_data), "format": "raw"},
    ]}});
    rest.call("PUT", &format!("vm-backups/{group}/actions"), Some(&restore)).await;
    assert!(std::fs::read(&r_root).expect("root") == std::fs::read(&then_root).expect("then root"));
    assert!(std::fs::read(&r_data).expect("data") == std::fs::read(&then_data).expect("then data"));
    assert_eq!(vm.image_files(), [p(&data), p(&root)], "no overlay left in the VM's chain");

    // AddImageStoreBackupStorage, then the seed's Recover (its action name in lower case).
    let store = common::start_store_with(dir.path(), "second", None, 4 << 20);
    let add = json!({"params": {"name": "second", "url": store.url(), "token": common::store_token(&store)}});
    let added = rest.call("POST", "backup-storage/image-store", Some(&add)).await;
    let bs2 = added["inventory"]["uuid"].as_str().expect("uuid").to_string();
    assert!(!added.to_string().contains(&common::store_token(&store)), "the token is never returned: {added}");
    let recover = json!({"recovervmbackupfromimagestorebackupstorage": {
        "srcBackupStorageUuid": bs, "dstBackupStorageUuid": bs2}, "systemTags": [], "userTags": []});
    let recovered = rest.call("PUT", &format!("vm-backups/{group}/actions"), Some(&recover)).await;
    let refs = |v: &Value| -> Vec<String> {
        let mut r: Vec<String> = v["backupStorageRefs"]
            .as_array()
            .expect("refs")
            .iter()
            .map(|r| r["backupStorageUuid"].as_str().expect("bs").to_string())
            .collect();
        r.sort();
        r
    };
    let mut both = vec![bs.clone(), bs2.clone()];
    both.sort();
    for inv in recovered["inventories"].as_array().expect("inventories") {
        assert_eq!(refs(inv), both, "{recovered}");
    }

    // The snapshot-group calls, on the VM the backup registered.
    let sg = rest
        .call("POST", "volume-snapshots/group", Some(&json!({"params": {"rootVolumeUuid": ROOT, "name": "test"}})))
        .await;
    let sg_uuid = sg["inventory"]["uuid"].as_str().expect("group uuid").to_string();
    assert_eq!(sg["inventory"]["snapshotCount"], 2, "{sg}");
    assert_eq!(sg["inventory"]["vmInstanceUuid"], VM.replace('-', ""));
    let snaps = sg["inventory"]["volumeSnapshotRefs"].as_array().expect("refs");
    assert_eq!(snaps[0]["deviceId"], 0);
    assert_eq!(snaps[0]["snapshotDeleted"], false, "false fields are present: {sg}");
    let updated = rest
        .call(
            "PUT",
            &format!("volume-snapshots/group/{sg_uuid}/actions"),
            Some(&json!({"updateVolumeSnapshotGroup": {"name": "new name"}})),
        )
        .await;
    assert_eq!(updated["inventory"]["name"], "new name");
    let (status, listed) = rest.send("GET", &format!("volume-snapshots/group/{sg_uuid}"), None, &[]).await;
    assert_eq!((status, &listed["inventories"][0]["name"]), (200, &json!("new name")));
    let deleted = rest.call("DELETE", &format!("volume-snapshots/group/{sg_uuid}?deleteMode=Permissive"), None).await;
    let results = deleted["results"].as_array().expect("results");
    assert!(results.len() == 2 && results.iter().all(|r| r["success"] == true), "{deleted}");
    let again = rest.call("DELETE", &format!("volume-snapshots/group/{sg_uuid}?deleteMode=Permissive"), None).await;
    assert_eq!(again, json!({"results": []}), "deleting a group that is gone succeeds");

    // ReconnectBackupStorage; DeleteVmBackup from one storage, then DeleteBackupStorage of
    // it, then DeleteVmBackup from the last one: each with the seed's query string.
    let reconnected =
        rest.call("PUT", &format!("backup-storage/{bs}/actions"), Some(&json!({"reconnectBackupStorage": {}}))).await;
    assert_eq!(reconnected["inventory"]["status"], "Connected");
    assert!(is_zstack_date(&reconnected["inventory"]["lastOpDate"]), "{reconnected}");
    let gone =
        rest.call("DELETE", &format!("vm-backups/{group}?backupStorageUuids={bs2}&deleteMode=Permissive"), None).await;
    assert_eq!(gone, json!({}));
    let (_, left) = rest.send("GET", &format!("volume-backups?q=groupUuid={group}"), None, &[]).await;
    assert!(left["inventories"].as_array().is_some_and(|l| l.len() == 2 && l.iter().all(|i| refs(i) == [bs.clone()])));
    let dropped = rest.call("DELETE", &format!("backup-storage/{bs2}?deleteMode=Permissive"), None).await;
    assert_eq!(dropped, json!({}));
    let (_, none) = rest.send("GET", &format!("backup-storage/{bs2}"), None, &[]).await;
    assert_eq!(none["inventories"], json!([]));
    let gone =
        rest.call("DELETE", &format!("vm-backups/{group}?backupStorageUuids={bs}&deleteMode=Permissive"), None).await;
    assert_eq!(gone, json!({}));
    let (_, left) = rest.send("GET", "volume-backups", None, &[]).await;
    assert_eq!(left["inventories"], json!([]));
}
#[tokio::test(flavor = "multi_thread")]
async fn bad_sessions_envelopes_and_urls_get_zstack_error_bodies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(dir.path(), AgentOptions { embedded_store: true, config: None });
    let rest = Rest { base: agent.rest_url(), session: common::session(&agent), http: http() };
    let intruder = Rest { session: "0123456789abcdef0123456789abcdef".into(), ..rest_clone(&rest) };

    let (status, e) = intruder.send("GET", "backup-storage", None, &[]).await;
    assert_eq!(status, 401, "{e}");
    assert_eq!(e["error"]["code"], "ID.1001");
    assert_eq!(e["error"]["details"], "unknown session");
    for key in ["code", "description", "details", "elaboration", "opaque", "cause"] {
        assert!(e["error"].get(key).is_some(), "error.{key} is present: {e}");
    }
    let resp = http().get(format!("{}/zstack/v1/backup-storage", rest.base)).send().await.expect("no session");
    assert_eq!(resp.status().as_u16(), 401);
    // A write with a bad session is refused before anything runs.
    let (status, _) = intruder.send("DELETE", "vm-backups/92046c016d7c3af7bdd4a5077fb91450", None, &[]).await;
    assert_eq!(status, 401);

    let path = "volumes/aa6fad9b71af3785a9fdec200bab3ee8/vm-backups";
    let cases: [(&str, &str); 5] = [
        (r#"{"params": {"name": "x", "colour": "red"}}"#, "colour"),
        (r#"{"params": {"name": 5}}"#, "name"),
        (r#"{"params": {}, "extra": 1}"#, "extra"),
        (r#"{"params": "#, "not JSON"),
        (r#"[1, 2]"#, "JSON object"),
    ];
    for (body, says) in cases {
        let resp = http()
            .post(format!("{}/zstack/v1/{path}", rest.base))
            .header("Authorization", format!("OAuth {}", rest.session))
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), 400, "{body}");
        let e: Value = serde_json::from_str(&resp.text().await.expect("text")).expect("json");
        assert_eq!(e["error"]["code"], "SYS.1007", "{body}: {e}");
        assert!(e["error"]["details"].as_str().is_some_and(|d| d.contains(says)), "{body}: {e}");
    }
    let (status, e) = rest.send("POST", path, Some(&json!({"params": {}})), &[("X-Job-UUID", "not-a-uuid")]).await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["opaque"]["field"], "X-Job-UUID");
    let (status, e) = rest.send("POST", path, Some(&json!({"params": {}})), &[("X-Web-Hook", "ftp://x/y")]).await;
    assert_eq!(status, 400, "{e}");
    let (status, e) = rest.send("GET", "no-such-thing", None, &[]).await;
    assert_eq!(status, 404, "{e}");
    assert_eq!(e["error"]["code"], "SYS.1003");
    let (status, _) = rest.send("GET", "api-jobs/0123456789abcdef0123456789abcdef", None, &[]).await;
    assert_eq!(status, 404, "an unknown API job");

    // A call that fails while it runs answers 503 with the error at its location.
    let (status, accepted) = rest
        .send(
            "POST",
            path,
            Some(&json!({"params": {"backupStorageUuid": "fc50c1ece4753c1981e3e3f65a151e0e", "name": "b"}})),
            &[],
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    let (status, failed) = rest.poll(accepted["location"].as_str().expect("location")).await;
    assert_eq!(status, 503, "{failed}");
    assert_eq!(failed["error"]["code"], "SYS.1003", "no VM has the volume: {failed}");
    assert!(
        failed["error"]["details"].as_str().is_some_and(|d| d.contains("aa6fad9b71af3785a9fdec200bab3ee8")),
        "{failed}"
    );
}

fn rest_clone(r: &Rest) -> Rest {
    Rest { base: r.base.clone(), session: r.session.clone(), http: r.http.clone() }
}
