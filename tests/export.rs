//! A backup served as a disk at once (ExportVmBackup): QEMU's own tools read the NBD export
//! and find it identical to the source, holes report as holes, and a chunk damaged on the
//! store makes the read fail instead of returning wrong data.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::{AgentOptions, run_tool, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;

const VM: &str = "6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d";
const ROOT: &str = "7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e";
const MIB: u64 = 1 << 20;

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// An 8 MiB raw image with data in [0, 1 MiB) and [3 MiB, 4 MiB), holes elsewhere.
fn sparse_image(path: &Path) {
    let mut f = std::fs::File::create(path).expect("image");
    f.set_len(8 * MIB).expect("size");
    f.write_all(&common::pseudo_random(1, 1 << 20)).expect("first MiB");
    f.seek(SeekFrom::Start(3 * MIB)).expect("seek");
    f.write_all(&common::pseudo_random(2, 1 << 20)).expect("fourth MiB");
    f.sync_all().expect("sync");
}

async fn export(c: &mut common::BackupClient, group: &str, bs: &str) -> pb::VmBackupExportInventory {
    c.export_vm_backup(pb::ExportVmBackupRequest {
        group_uuid: group.into(),
        volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.into(),
        ..Default::default()
    })
    .await
    .expect("export")
    .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exported_backup_reads_identical_keeps_its_holes_and_never_returns_damaged_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    sparse_image(&img);
    let store = start_store(dir.path(), "s");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let group = c
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs.clone(),
            name: "x".into(),
            vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories[0]
        .group_uuid
        .clone();

    let e = export(&mut c, &group, &bs).await;
    assert_eq!(e.size, 8 << 20);
    assert_eq!(e.uri, format!("nbd+unix:///{ROOT}?socket={}", e.socket_path));
    let mode = std::fs::metadata(&e.socket_path).expect("socket").permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600, "root only");

    // Identical to the source, read through QEMU's NBD client.
    let same = run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &p(&img), &e.uri]);
    assert!(same.contains("identical"), "{same}");
    // Holes are holes: only the two MiB with data are data.
    let map: serde_json::Value =
        serde_json::from_str(&run_tool("qemu-img", &["map", "--output=json", "-f", "raw", &e.uri])).expect("map");
    let data: Vec<(u64, u64)> = map
        .as_array()
        .expect("extents")
        .iter()
        .filter(|x| x["data"] == true)
        .map(|x| (x["start"].as_u64().expect("start"), x["length"].as_u64().expect("length")))
        .collect();
    assert_eq!(data, [(0, MIB), (3 * MIB, MIB)], "{map}");
    // Read-only.
    let w = Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 64k", &e.uri]).output().expect("qemu-io");
    let out = format!("{}{}", String::from_utf8_lossy(&w.stdout), String::from_utf8_lossy(&w.stderr));
    assert!(
        !w.status.success() || out.contains("failed") || out.contains("read-only") || out.contains("Read-only"),
        "{out}"
    );

    // Listed, then stopped: the socket goes.
    let listed =
        c.query_vm_backup_export(pb::QueryVmBackupExportRequest {}).await.expect("list").into_inner().inventories;
    assert_eq!(listed, std::slice::from_ref(&e));
    c.stop_vm_backup_export(pb::StopVmBackupExportRequest { uuid: e.uuid.clone() }).await.expect("stop");
    for _ in 0..100 {
        if !Path::new(&e.socket_path).exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!Path::new(&e.socket_path).exists(), "the socket goes with the export");
    let e2 = c.stop_vm_backup_export(pb::StopVmBackupExportRequest { uuid: e.uuid.clone() }).await.expect_err("gone");
    assert_eq!(e2.code(), tonic::Code::NotFound);

    // Damage the first chunk on the store: a read of it fails and says so; nothing else
    // is served in its place.
    let first = std::fs::read(&img).expect("image")[..64 << 10].to_vec();
    let hex = vmbackup_proto::Digest::of(&first).to_hex();
    let chunk = store.data_dir.join("chunks").join(&hex[..4]).join(&hex);
    let mut blob = std::fs::read(&chunk).expect("stored chunk");
    let last = blob.len() - 1;
    blob[last] ^= 0x5a;
    std::fs::write(&chunk, &blob).expect("damage");
    let e = export(&mut c, &group, &bs).await;
    let r =
        Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0 0 64k", &e.uri]).output().expect("qemu-io");
    let out = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    assert!(out.contains("Input/output error"), "{out}");
    let undamaged =
        Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0 2M 64k", &e.uri]).output().expect("qemu-io");
    let out = String::from_utf8_lossy(&undamaged.stdout);
    assert!(out.contains("read 65536/65536 bytes"), "a hole still reads: {out}");
    assert!(agent.log_text().contains(&format!("chunk {hex}")), "the agent names the damaged chunk");
}
