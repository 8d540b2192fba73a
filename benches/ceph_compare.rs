//! A Ceph backup storage (the agent writing a RADOS pool directly through librados) side
//! by side with the directory store and with `vmbackup-store` serving the same kind of pool
//! (`backend = "rados"`), in one run, on a real single-node Ceph on loopback (bluestore on a
//! file). Each backs up the corpus volume (full), then its second version (incremental),
//! then restores the second version. Every round uses fresh pools and stores.
//!
//! Per operation: seconds, MiB/s, MiB per CPU-second of vmbackup's own processes (agent, and
//! store where there is one), peak RSS, and the CPU seconds the OSD and monitor spent (on
//! this machine they share its two cores with the tool measured). Medians of
//! `VMBACKUP_BENCH_ROUNDS` rounds (default 3) with min and max ratios. Reported, never
//! asserted.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench --bench ceph_compare`
//! (the Ceph packages of `scripts/test.sh` installed; `VMBACKUP_BENCH_MIB`, default 1024).

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/corpus.rs"]
mod corpus;
#[path = "support/measure.rs"]
mod measure;
#[path = "support/samples.rs"]
mod samples;

use std::time::Duration;

use common::ceph::{CephCluster, CephOptions, ObjectStore};
use samples::Samples;

/// No request counter for RADOS; the CPU seconds of the OSD and monitor so far.
fn cluster_cpu(cluster: &CephCluster) -> (u64, f64) {
    (0, [cluster.osd_pid(), cluster.mon_pid()].into_iter().flatten().map(measure::cpu_seconds).sum())
}

/// A fresh replicated pool (size 1, like the cluster's default pool).
fn make_pool(cluster: &mut CephCluster, pool: &str) {
    cluster.ceph(&["osd", "pool", "create", pool, "16"]);
    cluster.ceph(&["osd", "pool", "application", "enable", pool, "rados"]);
}

#[tokio::main]
async fn main() {
    measure::wrapper_main();
    let mib: u64 = std::env::var("VMBACKUP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let rounds: usize = std::env::var("VMBACKUP_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let (v1, v2) = corpus::two_versions(w, mib);
    let mut cluster = CephCluster::start(
        &w.join("ceph"),
        CephOptions {
            objectstore: ObjectStore::Bluestore,
            client_timeout: Duration::from_secs(30),
            ..Default::default()
        },
    );
    println!("synthetic: {mib} MiB raw volume; its second version rewrites 5% of its 4 MiB regions");
    println!("Ceph: single-node cluster on loopback, bluestore on a file, pool size 1");
    let mon = format!("127.0.0.1:{}", cluster.mon_v1.port());
    let mut samples = Samples::default();
    for round in 1..=rounds {
        eprintln!("round {round} of {rounds}");
        let (direct, served) = (format!("direct-r{round}"), format!("served-r{round}"));
        make_pool(&mut cluster, &direct);
        make_pool(&mut cluster, &served);
        let meter = || Some(cluster_cpu(&cluster));
        let imgs = (v1.as_path(), v2.as_path(), "raw");
        samples::vmbackup_ceph(
            &mut samples,
            "vmbackup ceph",
            "synthetic",
            imgs,
            (&mon, &direct, &cluster.keyring),
            &meter,
        )
        .await;
        samples::vmbackup(&mut samples, "vmbackup fs", "synthetic", imgs, None, &|| None).await;
        let config = w.join(format!("served-r{round}.toml"));
        std::fs::write(
            &config,
            format!(
                "backend = \"rados\"\n[rados]\nconf = \"{}\"\nkeyring = \"{}\"\npool = \"{served}\"\n",
                cluster.conf.display(),
                cluster.keyring.display()
            ),
        )
        .expect("store config");
        samples::vmbackup(&mut samples, "vmbackup rados-srv", "synthetic", imgs, Some(&config), &meter).await;
    }
    samples::report(&samples, &[("synthetic", mib)]);
}
