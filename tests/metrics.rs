//! Prometheus `/metrics` on both daemons, scraped after real jobs: the agent's byte
//! counters equal each job's own report (WatchJob), and the store's equal its Status
//! counters and record GC and verify runs.

mod common;

use common::{AgentOptions, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

const VM: &str = "8192a3b4c5d6e7f8091a2b3c4d5e6f70";
const ROOT: &str = "92a3b4c5d6e7f8091a2b3c4d5e6f7081";

/// The value of the sample `series` (name with labels, exactly as exposed).
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{page}"))
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad value of {series}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_match_the_jobs_own_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    let mut data = common::pseudo_random(9, 3 << 20);
    data[1 << 20..2 << 20].fill(0); // a zero MiB
    let copy = data[..256 << 10].to_vec();
    data[2 << 20..(2 << 20) + (256 << 10)].copy_from_slice(&copy); // deduplicated within the volume
    std::fs::write(&img, &data).expect("image");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let group = "a3b4c5d6e7f8091a2b3c4d5e6f708192";
    c.create_vm_backup(pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.clone(),
        name: "m".into(),
        resource_uuid: group.into(),
        vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
        ..Default::default()
    })
    .await
    .expect("backup");
    let b = common::last_progress(&mut c, group).await;
    assert_eq!(b.state, "Succeeded");
    assert!(b.bytes_zero > 0 && b.bytes_deduplicated > 0 && b.bytes_sent > 0, "{b:?}");

    let restore_job = "b4c5d6e7f8091a2b3c4d5e6f708192a3";
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: group.into(),
        backup_storage_uuid: bs,
        targets: vec![pb::RestoreTarget {
            volume_uuid: ROOT.into(),
            install_path: dir.path().join("out.raw").display().to_string(),
            format: "raw".into(),
        }],
        resource_uuid: restore_job.into(),
        ..Default::default()
    })
    .await
    .expect("restore");
    let r = common::last_progress(&mut c, restore_job).await;

    let page = agent.scrape();
    let bytes = |method: &str, kind: &str| {
        sample(&page, &format!("vmbackup_agent_job_bytes_total{{method=\"{method}\",kind=\"{kind}\"}}"))
    };
    for (kind, want) in
        [("read", b.bytes_read), ("zero", b.bytes_zero), ("deduplicated", b.bytes_deduplicated), ("sent", b.bytes_sent)]
    {
        assert_eq!(bytes("CreateVmBackup", kind), want as f64, "CreateVmBackup {kind}");
    }
    assert_eq!(bytes("RestoreVmBackup", "written"), r.bytes_written as f64);
    assert_eq!(bytes("RestoreVmBackup", "received"), r.bytes_received as f64);
    assert_eq!(sample(&page, "vmbackup_agent_jobs_total{method=\"CreateVmBackup\",outcome=\"Succeeded\"}"), 1.0);
    assert_eq!(sample(&page, "vmbackup_agent_job_duration_seconds_count{method=\"RestoreVmBackup\"}"), 1.0);
    assert_eq!(sample(&page, "vmbackup_agent_jobs_running"), 0.0);

    let mut s = common::store_client(&store).await;
    let status = s.status(spb::StatusRequest {}).await.expect("status").into_inner();
    let counters = status.counters.expect("counters");
    s.garbage_collect(spb::GarbageCollectRequest::default()).await.expect("gc");
    s.verify(spb::VerifyRequest::default()).await.expect("verify");
    let page = store.scrape();
    assert_eq!(sample(&page, "vmbackup_store_chunks_uploaded_total"), counters.chunks_uploaded as f64);
    assert_eq!(sample(&page, "vmbackup_store_uploaded_bytes_total"), counters.bytes_uploaded as f64);
    assert_eq!(
        u64::try_from(b.bytes_sent).ok(),
        Some(counters.bytes_uploaded),
        "what the agent sent is what the store took"
    );
    assert_eq!(sample(&page, "vmbackup_store_groups"), 1.0);
    assert_eq!(sample(&page, "vmbackup_store_gc_runs_total"), 1.0);
    assert_eq!(sample(&page, "vmbackup_store_verify_runs_total"), 1.0);
    assert_eq!(sample(&page, "vmbackup_store_verify_bad_chunks_total"), 0.0);
    assert!(sample(&page, "vmbackup_store_gc_last_kept_bytes") > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_the_job_and_the_request_on_every_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    std::fs::write(&img, common::pseudo_random(12, 1 << 20)).expect("image");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "log_format = \"json\"\n").expect("config");
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions { config: Some(config), ..Default::default() });
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let group = "c4d5e6f7081a2b3c4d5e6f708192a3b4";
    c.create_vm_backup(pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs,
        name: "logged".into(),
        resource_uuid: group.into(),
        vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
        ..Default::default()
    })
    .await
    .expect("backup");
    let log = agent.log_text();
    let committed = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "backup committed")
        .unwrap_or_else(|| panic!("no JSON line for the commit in:\n{log}"));
    let spans = committed["spans"].as_array().expect("spans");
    assert!(spans.iter().any(|s| s["name"] == "job" && s["id"] == group), "{committed}");
    assert!(
        spans.iter().any(|s| s["name"] == "rpc" && s["method"] == "/vmbackup.agent.v1.VmBackupService/CreateVmBackup"),
        "{committed}"
    );
}
