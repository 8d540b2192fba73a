//! Two vmbackup-store servers over one bucket of a real Ceph radosgw, each serving its own
//! agent: a backup through one restores through the other; an incremental through the
//! second uploads only the changed chunk; GC on one while the other's backup reuses the
//! chunks GC is collecting leaves every committed group verifying clean; a server killed
//! mid-upload loses nothing committed and the retry through the other server sends only
//! what the bucket lacks; radosgw stopped mid-backup is a clean error with nothing
//! visible, and the retry works once it is back; a GC holder killed mid-run keeps others
//! out until its lease expires, then the next GC runs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::ceph::{CephCluster, CephOptions};
use common::host::{Host, gc, groups, start_host_agent, status, verify_clean};
use common::store_calls::{CS, commit, session, upload};
use common::{pseudo_random, run_tool, store_client};
use vmbackup_proto::store::v1 as spb;

const BUCKET: &str = "vmbackup-shared";
const PREFIX: &str = "pool-1";
/// Chunks of the 16 MiB images at the stores' 64 KiB chunk size.
const CHUNKS: u64 = 256;

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A 16 MiB image of random bytes (every chunk distinct).
fn random_image(path: &Path, seed: u64) {
    std::fs::write(path, common::pseudo_random(seed, 16 << 20)).expect("image");
}

fn chunk_count(c: &CephCluster) -> usize {
    c.bucket_keys(BUCKET, &format!("{PREFIX}/chunks/")).len()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_share_one_bucket_through_gc_kills_and_outages() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut cluster = CephCluster::start(
        &dir.join("ceph"),
        CephOptions { rgw: true, client_timeout: Duration::from_secs(5), ..Default::default() },
    );
    let (code, body) = cluster.s3("PUT", &format!("/{BUCKET}"), None, &[]);
    assert_eq!(code, 200, "create bucket: {}", String::from_utf8_lossy(&body));
    let keys = (cluster.s3_access_key.clone(), cluster.s3_secret_key.clone());
    let config = |name: &str| {
        common::ceph::store_config(
            dir,
            name,
            cluster.rgw_url(),
            BUCKET,
            PREFIX,
            (&keys.0, &keys.1),
            "gc_safety_margin_seconds = 1",
            "gc_lease_seconds = 4",
        )
    };
    let (config_a, config_b) = (config("a"), config("b"));
    let mut store_a = common::start_store_with_config(dir, "store-a", Some(&config_a));
    let store_b = common::start_store_with_config(dir, "store-b", Some(&config_b));
    let (sa, sb) = (status(&store_a).await, status(&store_b).await);
    assert_eq!(sa.store_uuid, sb.store_uuid, "one bucket, one store");

    // Two hosts, each with its own agent and its own store server; both may read the
    // images under `dir`.
    let (agent1, agent2) = (start_host_agent(dir, "h1"), start_host_agent(dir, "h2"));
    let h1 = Host::new(&agent1, &store_a, "bucket via a").await;
    let h2 = Host::new(&agent2, &store_b, "bucket via b").await;
    eprintln!("cluster, two stores, two agents up in {:.1}s", t0.elapsed().as_secs_f64());

    // (1) A backup through A restores through B; an incremental through B uploads only the
    // changed chunk.
    let img1 = dir.join("img1.raw");
    run_tool("qemu-img", &["create", "-q", "-f", "raw", &p(&img1), "4M"]);
    for (i, byte) in [0x31, 0x32, 0x33].iter().enumerate() {
        run_tool("qemu-io", &["-f", "raw", "-c", &format!("write -P {byte:#x} {}M 64k", i), &p(&img1)]);
    }
    let g1 = h1.backup(&img1, "g1", (None, None)).await.expect("backup through a");
    h2.restore_equals(&g1, &dir.join("r1.raw"), &img1).await;
    run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x41 3M 64k", &p(&img1)]);
    let before = common::chunks_uploaded(&store_b).await;
    let g2 = h2.backup(&img1, "g2", (None, None)).await.expect("incremental through b");
    assert_eq!(common::chunks_uploaded(&store_b).await - before, 1, "only the changed chunk");
    h1.restore_equals(&g2, &dir.join("r2.raw"), &img1).await;

    // (2) GC through A while B's backup reuses exactly the chunks GC is collecting.
    let img0 = dir.join("img0.raw");
    random_image(&img0, 7);
    let g0 = h1.backup(&img0, "g0", (None, None)).await.expect("backup img0");
    h1.delete(&g0).await;
    let counters = common::store_counters(&store_b).await;
    let reuse = {
        let h2 = h2.clone();
        let img0 = img0.clone();
        tokio::spawn(async move { h2.backup(&img0, "g0-again", (Some(4 << 20), None)).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = gc(&store_a).await.expect("gc through a during the reuse");
    let g0b = reuse.await.expect("join").expect("the reusing backup commits");
    let after = common::store_counters(&store_b).await;
    eprintln!(
        "gc during reuse: removed {} kept {}; b reported {} present and uploaded {}",
        report.chunks_removed,
        report.chunks_kept,
        after.chunks_reported_present - counters.chunks_reported_present,
        after.chunks_uploaded - counters.chunks_uploaded
    );
    verify_clean(&store_b, "after gc during reuse").await;
    h1.restore_equals(&g0b, &dir.join("r0.raw"), &img0).await;

    // (3) A killed mid-upload: nothing of that backup visible, and the same backup through
    // B uploads only the chunks A had not stored.
    let img2 = dir.join("img2.raw");
    random_image(&img2, 8);
    let groups_before = groups(&store_b).await;
    let chunks_before = chunk_count(&cluster);
    let doomed = {
        let h1 = h1.clone();
        let img2 = img2.clone();
        tokio::spawn(async move { h1.backup(&img2, "killed", (None, Some(2 << 20))).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while chunk_count(&cluster) < chunks_before + 20 {
        assert!(Instant::now() < deadline, "no upload progress through a");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store_a.kill();
    let failed = doomed.await.expect("join");
    assert!(failed.is_err(), "the backup through a killed store failed: {failed:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored_by_a = u64::try_from(chunk_count(&cluster) - chunks_before).expect("count");
    assert!((20..CHUNKS).contains(&stored_by_a), "{stored_by_a}");
    assert_eq!(groups(&store_b).await, groups_before, "nothing of the killed backup is visible");
    let before = common::chunks_uploaded(&store_b).await;
    let g3 = h2.backup(&img2, "retry", (None, None)).await.expect("retry through b");
    let sent = common::chunks_uploaded(&store_b).await - before;
    assert_eq!(sent, CHUNKS - stored_by_a, "the retry sent only what a had not stored ({stored_by_a})");
    store_a.restart();

    // (4) radosgw stopped mid-backup: a clean error within the retry bound, nothing
    // visible; the retry works once it is back.
    let img3 = dir.join("img3.raw");
    random_image(&img3, 9);
    let groups_before = groups(&store_b).await;
    let chunks_before = chunk_count(&cluster);
    let cut = {
        let h2 = h2.clone();
        let img3 = img3.clone();
        tokio::spawn(async move { h2.backup(&img3, "outage", (None, Some(2 << 20))).await })
    };
    while chunk_count(&cluster) < chunks_before + 10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop_rgw();
    let stopped = Instant::now();
    let err = cut.await.expect("join").expect_err("a backup with radosgw down fails");
    eprintln!("backup with radosgw down failed after {:.1}s: {}", stopped.elapsed().as_secs_f64(), err.message());
    assert!(stopped.elapsed() < Duration::from_secs(120), "no hang");
    assert!(err.message().contains("S3 ") && err.message().len() < 400, "one clear line: {}", err.message());
    let asked = Instant::now();
    let down = h2.reconnect().await.expect_err("reconnect with radosgw down");
    eprintln!("reconnect with radosgw down: {:.1}s: {}", asked.elapsed().as_secs_f64(), down.message());
    assert_eq!(down.code(), tonic::Code::Unavailable, "{down:?}");
    assert!(down.message().contains("does not answer"), "{}", down.message());
    assert!(asked.elapsed() < Duration::from_secs(20), "a quick answer, not a hang");
    cluster.start_rgw();
    assert_eq!(h2.reconnect().await.expect("reconnect with radosgw back"), "Connected");
    assert_eq!(groups(&store_b).await, groups_before, "nothing of the failed backup is visible");
    let g4 = h2.backup(&img3, "after outage", (None, None)).await.expect("retry after radosgw is back");
    h1.restore_equals(&g4, &dir.join("r4.raw"), &img3).await;

    // (4b) A session closed through B is refused a commit through A, which still holds it
    // open in memory (GC no longer counts it as live, so A must not trust its uploads).
    let (mut ca, mut cb) = (store_client(&store_a).await, store_client(&store_b).await);
    let closed = session(&mut ca).await;
    let m = upload(&mut ca, &closed, &[pseudo_random(91, CS), pseudo_random(92, CS)]).await;
    cb.close_session(spb::CloseSessionRequest { session_id: closed.clone() }).await.expect("close through b");
    let refused = commit(&mut ca, &closed, &m).await.expect_err("commit of a session closed through b");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("not open"), "{}", refused.message());

    // (5) A GC holder killed mid-run: the other server is refused until the lease
    // expires, then its GC runs and everything committed still verifies.
    // img0's chunks (g0b) are older than the session the killed server left behind, which
    // keeps everything newer than its start until it expires.
    h2.delete(&g0b).await;
    h2.delete(&g3).await;
    let mut gc_a = store_client(&store_a).await;
    let running = tokio::spawn(async move {
        gc_a.garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: Some(0) }).await
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leases: Vec<_> = cluster
            .bucket_keys(BUCKET, &format!("{PREFIX}/gc/"))
            .into_iter()
            .filter(|k| k.contains("/gc/lease-"))
            .collect();
        let held = leases
            .iter()
            .max()
            .and_then(|k| cluster.object(BUCKET, k))
            .is_some_and(|b| String::from_utf8_lossy(&b).contains("\"phase\":\"running\""));
        if held {
            break;
        }
        assert!(!running.is_finished(), "GC finished before it could be killed");
        assert!(Instant::now() < deadline, "GC never took its lease");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store_a.kill();
    let killed_at = Instant::now();
    assert!(running.await.expect("join").is_err(), "the killed GC did not answer");
    let refused = gc(&store_b).await.expect_err("a second GC while the lease lives");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("already running"), "{}", refused.message());
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(killed_at.elapsed())).await;
    let report = gc(&store_b).await.expect("GC after the dead holder's lease expired");
    eprintln!("gc after a dead holder: removed {} kept {}", report.chunks_removed, report.chunks_kept);
    assert!(report.chunks_removed > 0, "{report:?}");
    verify_clean(&store_b, "after the takeover GC").await;
    for (g, img, out) in [(&g2, &img1, "r5.raw"), (&g4, &img3, "r6.raw")] {
        h2.restore_equals(g, &dir.join(out), img).await;
    }
    drop((agent1, agent2, store_b));
    eprintln!("s3_shared: whole test {:.1}s", t0.elapsed().as_secs_f64());
}
