//! Self-test of the Ceph test harness (`tests/common/ceph.rs`), with real clients only: the
//! `ceph` and `rados` CLIs through the generated conf, and curl speaking S3 (SigV4) to
//! radosgw. The RADOS and S3 backends are built on this harness, so it must hold what they
//! rely on: HEALTH_OK, a size-1 pool that round-trips objects, an S3 user whose keys sign,
//! `If-None-Match: *` refusing a second PUT, bluestore data surviving `kill -9` of the OSD,
//! and clients that fail within the conf's timeouts instead of hanging. The two tests run
//! at once, which also proves that two clusters can run side by side.

mod common;

use std::time::Duration;

use common::ceph::{CephCluster, CephOptions, ObjectStore};

/// Longest a client call may take against a dead daemon: the conf's timeout (5 s) plus
/// process start-up slack; far below "hangs".
const BOUNDED: Duration = Duration::from_secs(20);

fn report(name: &str, c: &CephCluster) {
    let phases: Vec<String> = c.timings.iter().map(|(p, d)| format!("{p} {:.1}s", d.as_secs_f64())).collect();
    eprintln!("{name}: cluster started: {}", phases.join(", "));
}

#[test]
fn cluster_with_rgw_serves_rados_and_s3() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut c = CephCluster::start(
        tmp.path(),
        CephOptions { rgw: true, client_timeout: Duration::from_secs(5), ..Default::default() },
    );
    report("memstore+rgw", &c);
    assert!(c.rgw_url().starts_with("http://127.0.0.1:"), "{}", c.rgw_url());

    // Health through the generated conf and admin keyring.
    let waited = c.wait_health_ok(Duration::from_secs(60));
    eprintln!("memstore+rgw: HEALTH_OK {:.1}s after start returned", waited.as_secs_f64());
    let status = c.ceph(&["-s", "--format", "json"]);
    let s: serde_json::Value = serde_json::from_str(&status).expect("ceph -s json");
    assert_eq!(s["fsid"], c.fsid.as_str(), "{status}");
    assert_eq!(s["osdmap"]["num_up_osds"], 1, "{status}");
    let size = c.ceph(&["osd", "pool", "get", &c.pool.clone(), "size", "--format", "json"]);
    let size: serde_json::Value = serde_json::from_str(&size).expect("pool size json");
    assert_eq!(size["size"], 1, "{size}");
    let apps = c.ceph(&["osd", "pool", "application", "get", &c.pool.clone()]);
    assert!(apps.contains("vmbackup"), "application not enabled on the pool: {apps}");

    // RADOS round trip.
    let data = common::pseudo_random(1, 3 << 20);
    let src = tmp.path().join("src.bin");
    let dst = tmp.path().join("dst.bin");
    std::fs::write(&src, &data).expect("write src");
    rados_ok(&c, &["-p", &c.pool, "put", "obj-1", &src.display().to_string()]);
    rados_ok(&c, &["-p", &c.pool, "get", "obj-1", &dst.display().to_string()]);
    assert!(std::fs::read(&dst).expect("read dst") == data, "object read back differs");
    let stat = rados_ok(&c, &["-p", &c.pool, "stat", "obj-1"]);
    assert!(stat.contains(&format!("size {}", data.len())), "{stat}");
    let missing = c.rados(&["-p", &c.pool, "stat", "no-such-object"]);
    assert!(!missing.ok() && missing.stderr.contains("No such file"), "{missing:?}");

    // S3: the user's keys sign, wrong keys do not.
    let (code, body) = c.s3("PUT", "/bucket-1", None, &[]);
    assert_eq!(code, 200, "create bucket: {}", String::from_utf8_lossy(&body));
    let (code, _) = c.s3_as(&c.s3_access_key, "wrong-secret", "GET", "/bucket-1", None, &[]);
    assert_eq!(code, 403, "a wrong secret must be refused");
    let obj = tmp.path().join("s3.bin");
    std::fs::write(&obj, common::pseudo_random(2, 1 << 20)).expect("write s3 object");
    let (code, body) = c.s3("PUT", "/bucket-1/chunks/ab/k1", Some(&obj), &["If-None-Match: *"]);
    assert_eq!(code, 200, "first conditional PUT: {}", String::from_utf8_lossy(&body));
    let other = tmp.path().join("s3-other.bin");
    std::fs::write(&other, b"must not replace the first").expect("write");
    let (code, body) = c.s3("PUT", "/bucket-1/chunks/ab/k1", Some(&other), &["If-None-Match: *"]);
    assert_eq!(code, 412, "second conditional PUT must fail: {}", String::from_utf8_lossy(&body));
    let (code, body) = c.s3("GET", "/bucket-1/chunks/ab/k1", None, &[]);
    assert_eq!(code, 200);
    assert!(body == std::fs::read(&obj).expect("read"), "GET returned other bytes than the first PUT");
    let (code, list) = c.s3("GET", "/bucket-1?list-type=2&prefix=chunks%2F", None, &[]);
    let list = String::from_utf8_lossy(&list);
    assert!(code == 200 && list.contains("<Key>chunks/ab/k1</Key>"), "{code} {list}");

    // radosgw killed: requests fail at once; restarted: the object is still there.
    let rgw_pid = c.rgw_pid().expect("rgw pid");
    c.stop_rgw();
    assert!(!process_exists(rgw_pid), "radosgw {rgw_pid} still running");
    let (code, _) = c.s3("GET", "/bucket-1/chunks/ab/k1", None, &[]);
    assert_eq!(code, 0, "no HTTP answer expected from a killed radosgw");
    c.start_rgw();
    let (code, body) = c.s3("GET", "/bucket-1/chunks/ab/k1", None, &[]);
    assert!(code == 200 && body == std::fs::read(&obj).expect("read"), "after rgw restart: {code}");

    let pids = [c.mon_pid(), c.osd_pid(), c.rgw_pid()].map(|p| p.expect("running"));
    drop(c);
    for p in pids {
        assert!(!process_exists(p), "pid {p} survived the cluster's drop");
    }
}

#[test]
fn bluestore_survives_osd_kill_and_clients_time_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut c = CephCluster::start(
        tmp.path(),
        CephOptions {
            objectstore: ObjectStore::Bluestore,
            client_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    );
    report("bluestore", &c);
    let block = tmp.path().join("osd/ceph-0/block");
    let meta = std::fs::metadata(&block).expect("bluestore block file");
    assert_eq!(meta.len(), 10 << 30, "bluestore block file size");

    let data = common::pseudo_random(3, 5 << 20);
    let src = tmp.path().join("src.bin");
    std::fs::write(&src, &data).expect("write src");
    rados_ok(&c, &["-p", &c.pool, "put", "survivor", &src.display().to_string()]);

    // OSD killed: a read fails within the op timeout instead of blocking.
    let osd_pid = c.osd_pid().expect("osd pid");
    c.stop_osd();
    assert!(!process_exists(osd_pid), "osd {osd_pid} still running");
    let r = c.rados(&["-p", &c.pool, "stat", "survivor"]);
    assert!(r.status.is_some() && !r.ok(), "stat with the OSD dead must fail, not succeed or hang: {r:?}");
    assert!(r.elapsed < BOUNDED, "stat took {:?}", r.elapsed);
    eprintln!("bluestore: stat with the OSD down failed after {:.1}s: {}", r.elapsed.as_secs_f64(), r.stderr.trim());

    // Restarted on the same data: the object is back, byte for byte.
    c.start_osd();
    assert_ne!(c.osd_pid(), Some(osd_pid));
    let dst = tmp.path().join("dst.bin");
    rados_ok(&c, &["-p", &c.pool, "get", "survivor", &dst.display().to_string()]);
    assert!(std::fs::read(&dst).expect("read dst") == data, "object after OSD restart differs");

    // Monitor killed: a client cannot connect and says so within the mount timeout.
    c.stop_mon();
    let r = c.rados(&["-p", &c.pool, "stat", "survivor"]);
    assert!(r.status.is_some() && !r.ok(), "rados with the monitor dead must fail, not succeed or hang: {r:?}");
    assert!(r.elapsed < BOUNDED, "rados took {:?}", r.elapsed);
    eprintln!("bluestore: rados with the mon down failed after {:.1}s: {}", r.elapsed.as_secs_f64(), r.stderr.trim());
    c.start_mon();
    let stat = rados_ok(&c, &["-p", &c.pool, "stat", "survivor"]);
    assert!(stat.contains(&format!("size {}", data.len())), "{stat}");
    c.wait_health_ok(Duration::from_secs(60));
}

/// Runs `rados` and asserts success; returns stdout.
fn rados_ok(c: &CephCluster, args: &[&str]) -> String {
    let r = c.rados(args);
    assert!(r.ok(), "rados {args:?}: {r:?}\n{}", c.tails());
    r.stdout
}

fn process_exists(pid: u32) -> bool {
    // A reaped pid has no /proc entry (a zombie would still have one).
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
