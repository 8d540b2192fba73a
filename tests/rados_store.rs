//! vmbackup-store on the `rados` backend, over a real single-node Ceph (bluestore, so the
//! OSD can be killed and come back): two store servers over one pool, each serving its own
//! agent; a backup through one restores through the other; an incremental writes only the
//! changed chunk (counted as objects in the pool); the OSD killed mid-backup is a clean
//! error with nothing visible, and once it is back the retry writes only what the pool
//! lacks; GC and verify across the two servers; a missing pool, a wrong key and unreachable
//! monitors are one clear line each.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::ceph::CephCluster;
use common::host::{Host, gc, groups, start_host_agent, verify_clean};
use common::run_tool;

const PREFIX: &str = "site-a.";
/// Chunks of the 16 MiB images at the stores' 64 KiB chunk size.
const CHUNKS: usize = 256;

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A store config over `pool`, with `conf`, `keyring` and `timeout_seconds`.
fn rados_config(dir: &Path, name: &str, conf: &Path, keyring: &Path, pool: &str) -> std::path::PathBuf {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "backend = \"rados\"\ngc_safety_margin_seconds = 1\n[rados]\nconf = \"{}\"\nkeyring = \"{}\"\npool = \"{pool}\"\n\
             prefix = \"{PREFIX}\"\ntimeout_seconds = 5\ngc_lease_seconds = 4\n",
            conf.display(),
            keyring.display()
        ),
    )
    .expect("config");
    config
}

/// Chunk objects in the pool (`rados ls` in the chunks namespace).
fn pool_chunks(c: &CephCluster) -> usize {
    c.namespace_objects(&format!("{PREFIX}chunks"))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_share_one_pool_through_an_osd_crash() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut cluster = CephCluster::start_crashable(dir);

    // Bad configuration: one line each, quickly.
    let missing = rados_config(dir, "missing", &cluster.conf, &cluster.keyring, "no-such-pool");
    common::ceph::expect_refused(
        dir,
        "opening the RADOS store",
        "missing",
        &missing,
        &["no-such-pool", "does not exist"],
        &[],
    );
    let bad_key = CephCluster::wrong_keyring(dir);
    let wrong = rados_config(dir, "wrong", &cluster.conf, &bad_key, &cluster.pool);
    common::ceph::expect_refused(dir, "opening the RADOS store", "wrong", &wrong, &["client.admin", "connect"], &[]);
    let dead_conf = dir.join("dead.conf");
    std::fs::write(&dead_conf, "[global]\nmon host = 127.0.0.1:1\n").expect("conf");
    let dead = rados_config(dir, "dead", &dead_conf, &cluster.keyring, &cluster.pool);
    common::ceph::expect_refused(dir, "opening the RADOS store", "dead", &dead, &["dead.conf"], &[]);
    assert_eq!(pool_chunks(&cluster), 0, "a refused start wrote nothing");

    let (config_a, config_b) = (
        rados_config(dir, "a", &cluster.conf, &cluster.keyring, &cluster.pool),
        rados_config(dir, "b", &cluster.conf, &cluster.keyring, &cluster.pool),
    );
    let mut store_a = common::start_store_with_config(dir, "store-a", Some(&config_a));
    let store_b = common::start_store_with_config(dir, "store-b", Some(&config_b));
    let (sa, sb) = (common::host::status(&store_a).await, common::host::status(&store_b).await);
    assert_eq!(sa.store_uuid, sb.store_uuid, "one pool, one store");
    assert_eq!(sa.backend, format!("rados://{}/{PREFIX}", cluster.pool));
    assert!(sa.total_capacity > 0 && sa.available_capacity > 0, "{sa:?}");
    let (agent1, agent2) = (start_host_agent(dir, "h1"), start_host_agent(dir, "h2"));
    let h1 = Host::new(&agent1, &store_a, "pool via a").await;
    let h2 = Host::new(&agent2, &store_b, "pool via b").await;

    // A backup through A restores through B; an incremental through B writes one chunk.
    let img1 = dir.join("img1.raw");
    run_tool("qemu-img", &["create", "-q", "-f", "raw", &p(&img1), "4M"]);
    for (i, byte) in [0x31, 0x32, 0x33].iter().enumerate() {
        run_tool("qemu-io", &["-f", "raw", "-c", &format!("write -P {byte:#x} {i}M 64k"), &p(&img1)]);
    }
    let g1 = h1.backup(&img1, "g1", (None, None)).await.expect("backup through a");
    assert_eq!(pool_chunks(&cluster), 3, "three distinct chunks in the pool");
    h2.restore_equals(&g1, &dir.join("r1.raw"), &img1).await;
    run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x41 3M 64k", &p(&img1)]);
    let g2 = h2.backup(&img1, "g2", (None, None)).await.expect("incremental through b");
    assert_eq!(pool_chunks(&cluster), 4, "the incremental wrote only the changed chunk");
    h1.restore_equals(&g2, &dir.join("r2.raw"), &img1).await;
    // Chunks only g0 uses, older than any session the crash below leaves behind (a dead
    // session keeps everything newer than its start until it expires): GC's work later.
    let img0 = dir.join("img0.raw");
    std::fs::write(&img0, common::pseudo_random(10, 4 << 20)).expect("image");
    let g0 = h1.backup(&img0, "g0", (None, None)).await.expect("backup img0");

    // The OSD killed mid-backup: a clean error, nothing visible; once it is back, the same
    // backup through B writes only the chunks the pool lacks.
    let img2 = dir.join("img2.raw");
    std::fs::write(&img2, common::pseudo_random(11, 16 << 20)).expect("image");
    let before = (groups(&store_b).await, pool_chunks(&cluster));
    let doomed = {
        let (h1, img2) = (h1.clone(), img2.clone());
        tokio::spawn(async move { h1.backup(&img2, "osd-crash", (None, Some(2 << 20))).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while pool_chunks(&cluster) < before.1 + 20 {
        assert!(Instant::now() < deadline, "no upload progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop_osd();
    let stopped = Instant::now();
    let err = doomed.await.expect("join").expect_err("a backup with the OSD down fails");
    eprintln!("backup with the OSD down failed after {:.1}s: {}", stopped.elapsed().as_secs_f64(), err.message());
    assert!(stopped.elapsed() < Duration::from_secs(90), "no hang");
    cluster.start_osd();
    // The stores' long-lived clients catch up with the restarted OSD's new address.
    let back = Instant::now();
    let listed = loop {
        let mut c = common::store_client(&store_b).await;
        match c.list_groups(vmbackup_proto::store::v1::ListGroupsRequest::default()).await {
            Ok(r) => break r.into_inner().groups.into_iter().map(|g| g.group_uuid).collect::<Vec<_>>(),
            Err(e) if back.elapsed() < Duration::from_secs(60) => {
                eprintln!("store b not yet back: {}", e.message());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("store b did not recover within 60 s of the OSD's return: {e:?}"),
        }
    };
    eprintln!("store b serves again {:.1}s after the OSD is back", back.elapsed().as_secs_f64());
    assert_eq!(listed, before.0, "nothing of the failed backup is visible");
    let stored = pool_chunks(&cluster) - before.1;
    let uploaded = common::chunks_uploaded(&store_b).await;
    let g3 = h2.backup(&img2, "retry", (None, None)).await.expect("retry once the OSD is back");
    let sent = usize::try_from(common::chunks_uploaded(&store_b).await - uploaded).expect("count");
    assert_eq!(sent, CHUNKS - stored, "the retry wrote only what the pool lacked ({stored} were there)");
    h1.restore_equals(&g3, &dir.join("r3.raw"), &img2).await;

    // GC through A after deletes; everything left verifies through B.
    h1.delete(&g0).await;
    h1.delete(&g1).await;
    h1.delete(&g3).await;
    let before = pool_chunks(&cluster);
    let report = gc(&store_a).await.expect("gc through a");
    eprintln!("gc: removed {} kept {}", report.chunks_removed, report.chunks_kept);
    assert_eq!(pool_chunks(&cluster), before - usize::try_from(report.chunks_removed).expect("count"));
    assert!(report.chunks_removed >= 64, "at least g0's own chunks: {report:?}");
    verify_clean(&store_b, "after gc").await;
    h2.restore_equals(&g2, &dir.join("r4.raw"), &img1).await;
    store_a.kill();
    drop((agent1, agent2, store_b));
    eprintln!("rados_store: whole test {:.1}s", t0.elapsed().as_secs_f64());
}
