//! vmbackup over S3 side by side with restic over S3, on the same radosgw (a real
//! single-node Ceph on loopback, bluestore on a file), and with vmbackup on a local
//! directory, in one run. Each backs up the corpus volume (full), then its second version
//! (incremental), then restores the second version, timed until the file is on disk.
//! Every round uses fresh buckets and stores.
//!
//! Per operation: seconds, MiB/s, MiB per CPU-second (vmbackup: agent and store; restic:
//! its rusage; radosgw's own CPU is the same server for both and not counted), peak RSS,
//! the requests radosgw served (its `rgw.req` counter) and the CPU seconds radosgw and the
//! OSD spent (on this machine they share its cores with the tool measured). Medians of
//! `VMBACKUP_BENCH_ROUNDS` rounds (default 3) with min and max ratios. Reported, never
//! asserted.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench s3_compare`
//! (restic and the Ceph packages of `scripts/test.sh` installed; `VMBACKUP_BENCH_MIB`,
//! default 1024).

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/corpus.rs"]
mod corpus;
#[path = "support/measure.rs"]
mod measure;
#[path = "support/samples.rs"]
mod samples;

use std::path::Path;
use std::time::Duration;

use common::ceph::{CephCluster, CephOptions, ObjectStore};
use samples::{Samples, sync_file, timed, with_sync};

/// radosgw's request counter and the CPU seconds of radosgw and the OSD so far.
fn server_meter(cluster: &CephCluster) -> (u64, f64) {
    let cpu = [cluster.rgw_pid(), cluster.osd_pid()].into_iter().flatten().map(measure::cpu_seconds).sum();
    (cluster.rgw_requests(), cpu)
}

fn make_bucket(cluster: &CephCluster, bucket: &str) {
    let (code, body) = cluster.s3("PUT", &format!("/{bucket}"), None, &[]);
    assert_eq!(code, 200, "create bucket {bucket}: {}", String::from_utf8_lossy(&body));
}

fn restic(out: &mut Samples, cluster: &CephCluster, round: usize, (v1, v2): (&Path, &Path), work: &Path) {
    let s = |p: &Path| p.display().to_string();
    let bucket = format!("restic-r{round}");
    make_bucket(cluster, &bucket);
    let repo = format!("s3:{}/{bucket}", cluster.rgw_url());
    let env = [
        ("RESTIC_PASSWORD", "bench"),
        ("RESTIC_REPOSITORY", repo.as_str()),
        ("AWS_ACCESS_KEY_ID", cluster.s3_access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", cluster.s3_secret_key.as_str()),
    ];
    measure::run("restic", &["init", "--repository-version", "2"], &env, None);
    let dir = tempfile::tempdir_in(work).expect("tempdir");
    // restic keys files by path: back both versions up under one name.
    let named = dir.path().join("volume.raw");
    for (op, img) in [("full", v1), ("incremental", v2)] {
        let _ = std::fs::remove_file(&named);
        std::fs::hard_link(img, &named).expect("link");
        let before = server_meter(cluster);
        let (secs, cost) = timed("restic", &["backup", &s(&named)], &env, None);
        out.push("restic s3", "synthetic", op, secs, cost, dir.path().join("none").as_path());
        let after = server_meter(cluster);
        out.set_server(Some((after.0 - before.0, after.1 - before.1)));
    }
    let target = dir.path().join("out");
    let before = server_meter(cluster);
    let (secs, cost) = with_sync(
        timed("restic", &["restore", "latest", "--target", &s(&target)], &env, None),
        sync_file(&target.join(named.strip_prefix("/").unwrap_or(&named))),
    );
    out.push("restic s3", "synthetic", "restore", secs, cost, dir.path().join("none").as_path());
    let after = server_meter(cluster);
    out.set_server(Some((after.0 - before.0, after.1 - before.1)));
}

#[tokio::main]
async fn main() {
    measure::wrapper_main();
    let mib: u64 = std::env::var("VMBACKUP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let rounds: usize = std::env::var("VMBACKUP_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let (v1, v2) = corpus::two_versions(w, mib);
    let cluster = CephCluster::start(
        &w.join("ceph"),
        CephOptions {
            rgw: true,
            objectstore: ObjectStore::Bluestore,
            client_timeout: Duration::from_secs(30),
            ..Default::default()
        },
    );
    println!("synthetic: {mib} MiB raw volume; its second version rewrites 5% of its 4 MiB regions");
    println!("S3: radosgw {} on a single-node Ceph (bluestore on a file), path-style, http", cluster.rgw_url());
    let keys = (cluster.s3_access_key.clone(), cluster.s3_secret_key.clone());
    let mut samples = Samples::default();
    for round in 1..=rounds {
        eprintln!("round {round} of {rounds}");
        let bucket = format!("vmbackup-r{round}");
        make_bucket(&cluster, &bucket);
        let config = common::ceph::store_config(
            w,
            &format!("store-r{round}"),
            cluster.rgw_url(),
            &bucket,
            "",
            (&keys.0, &keys.1),
            "",
            "",
        );
        let meter = || Some(server_meter(&cluster));
        samples::vmbackup(&mut samples, "vmbackup s3", "synthetic", (&v1, &v2, "raw"), Some(&config), &meter).await;
        samples::vmbackup(&mut samples, "vmbackup fs", "synthetic", (&v1, &v2, "raw"), None, &|| None).await;
        restic(&mut samples, &cluster, round, (&v1, &v2), w);
    }
    samples::report(&samples, &[("synthetic", mib)]);
}
