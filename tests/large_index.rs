//! Indexes larger than one gRPC message: a volume whose fixed-chunk index is bigger than
//! the 64 MiB message limit is backed up through a separate store, restored, and backed up
//! incrementally (which reads the previous index back). The index travels in pieces
//! (`PutIndexStream`, `GetIndexStream`), never as one message.

#![allow(missing_docs)]

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::{AgentOptions, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;

const VM: &str = "6e7f8a9b0c1d2e3f4a5b6c7d8e9fa0b1";
const ROOT: &str = "7f8a9b0c1d2e3f4a5b6c7d8e9fa0b1c2";

/// 1 MiB of incompressible data per seed, at `seed * stride`, in a sparse raw volume of `size`.
fn write_pieces(path: &Path, size: u64, seeds: std::ops::Range<u64>, stride: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).expect("open");
    f.set_len(size).expect("size");
    for i in seeds {
        f.seek(SeekFrom::Start(i * stride)).expect("seek");
        f.write_all(&common::pseudo_random(i + 1, 1 << 20)).expect("write");
    }
    f.sync_all().expect("sync");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_above_the_message_limit_is_stored_restored_and_read_back_for_an_incremental() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 160 GiB at the test store's 64 KiB chunks: 2,621,440 chunks, an 80 MiB index.
    let size = 160u64 << 30;
    let stride = 16u64 << 30;
    let img = dir.path().join("big.raw");
    write_pieces(&img, size, 0..8, stride);
    let store = start_store(dir.path(), "store");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let backup = |name: &str| pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.clone(),
        name: name.into(),
        vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
        ..Default::default()
    };
    let full = c.create_vm_backup(backup("full")).await.expect("full backup").into_inner().inventories;
    let index_name = full[0].backup_storage_refs[0].install_path.clone();
    let stored = common::store_counters(&store).await;
    assert_eq!(stored.chunks_uploaded, 8 * 16, "8 MiB of distinct data at 64 KiB chunks");

    // The index is bigger than any one message either side accepts.
    let index_file = store.data_dir.join("indexes").join(&index_name);
    let index_len = std::fs::metadata(&index_file).expect("index object").len();
    assert!(index_len > 64 << 20, "the index ({index_len} bytes) must exceed the 64 MiB message limit");

    // Restore: byte-identical, the holes still holes.
    let out = dir.path().join("restored.raw");
    c.restore_vm_backup(pb::RestoreVmBackupRequest {
        group_uuid: full[0].group_uuid.clone(),
        backup_storage_uuid: bs.clone(),
        targets: vec![pb::RestoreTarget {
            volume_uuid: ROOT.into(),
            install_path: out.display().to_string(),
            format: "raw".into(),
        }],
        ..Default::default()
    })
    .await
    .expect("restore");
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &img.display().to_string(), &out.display().to_string()])
        .output()
        .expect("qemu-img compare");
    assert!(cmp.status.success(), "{}", String::from_utf8_lossy(&cmp.stdout));
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&out).expect("stat");
    assert!(meta.blocks() * 512 < 64 << 20, "holes stay holes: {} bytes allocated", meta.blocks() * 512);

    // One more MiB: the incremental reads the 80 MiB index back and sends only the new chunks.
    write_pieces(&img, size, 8..9, stride - (1 << 20));
    c.create_vm_backup(backup("inc")).await.expect("incremental");
    let log = agent.log_text();
    assert!(!log.contains("previous index unusable"), "the previous index must be read back:\n{log}");
    let after = common::store_counters(&store).await;
    assert_eq!(after.chunks_uploaded - stored.chunks_uploaded, 16, "only the new MiB is sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_takes_no_more_memory_for_a_4_tib_sparse_volume_than_for_a_64_gib_one() {
    // The same 64 MiB of data in both volumes, 4 MiB chunks: 16 Ki chunk slots against
    // 1 Mi. Memory that grew with the virtual size (a dense index of 32 bytes a chunk, its
    // encoding, a ledger entry a chunk, the previous index read back whole) would add
    // 70 MiB or more at 4 TiB.
    let mut peaks = Vec::new();
    for size in [64u64 << 30, 4 << 40] {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("sparse.raw");
        write_pieces(&img, size, 0..64, size / 64);
        let store = common::start_store_with(dir.path(), "store", None, 4 << 20);
        let agent = start_agent(dir.path(), AgentOptions::default());
        let bs = common::add_storage(&agent, &store, "s").await;
        let mut c = common::backup_client(&agent).await;
        // A full backup, then one that reads the first one's index back (and sends nothing).
        for name in ["full", "again"] {
            c.create_vm_backup(pb::CreateVmBackupRequest {
                root_volume_uuid: ROOT.into(),
                backup_storage_uuid: bs.clone(),
                name: name.into(),
                vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
                ..Default::default()
            })
            .await
            .expect("backup");
            assert_eq!(common::chunks_uploaded(&store).await, 64, "each MiB of data in a chunk of its own");
        }
        assert!(!agent.log_text().contains("previous index unusable"), "the second backup reads the first's index");
        let peak = common::peak_rss_kib(agent.pid()) >> 10;
        eprintln!("{} GiB sparse volume, 64 MiB of data: agent peak RSS {peak} MiB", size >> 30);
        peaks.push(peak);
    }
    assert!(
        peaks[1] < peaks[0] + 16,
        "agent peak RSS {} MiB at 4 TiB against {} MiB at 64 GiB: memory must not grow with the virtual size",
        peaks[1],
        peaks[0]
    );
}
