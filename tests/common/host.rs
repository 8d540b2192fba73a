//! One host of a multi-host test: its agent's clients and one backup storage, with the
//! calls the storage tests make (backup, restore-and-compare, delete, reconnect), and the
//! store-side checks they share (GC, verify, groups).

#![allow(dead_code)]

use std::path::Path;

use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

use super::{Daemon, store_client};

/// The VM and root volume every host backs up.
pub const VM: &str = "5d0c3b2a19f84e7d8c6b5a4f3e2d1c0b";
/// Its root volume.
pub const ROOT: &str = "6e1d4c3b2a0f4e8d9c7b6a5f4e3d2c1b";

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// One host: its agent's client and the bucket as its backup storage.
#[derive(Clone)]
pub struct Host {
    /// VmBackupService client.
    pub c: super::BackupClient,
    /// BackupStorageService client.
    pub s: super::StorageClient,
    /// The backup storage's uuid.
    pub bs: String,
}

impl Host {
    pub async fn backup(
        &self,
        img: &Path,
        name: &str,
        limits: (Option<i64>, Option<i64>),
    ) -> Result<String, tonic::Status> {
        let r = self
            .c
            .clone()
            .create_vm_backup(pb::CreateVmBackupRequest {
                root_volume_uuid: ROOT.into(),
                backup_storage_uuid: self.bs.clone(),
                name: name.into(),
                vm: Some(super::one_volume_vm(VM, ROOT, img, "raw")),
                volume_read_bandwidth: limits.0,
                network_write_bandwidth: limits.1,
                ..Default::default()
            })
            .await?;
        Ok(r.into_inner().inventories[0].group_uuid.clone())
    }

    /// Imports the store's groups, then restores `group` to `out` and checks it equals `img`.
    pub async fn restore_equals(&self, group: &str, out: &Path, img: &Path) {
        let mut c = self.c.clone();
        c.sync_vm_backup(pb::SyncVmBackupRequest { image_store_uuid: self.bs.clone(), ..Default::default() })
            .await
            .expect("sync");
        c.restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: group.into(),
            backup_storage_uuid: self.bs.clone(),
            targets: vec![pb::RestoreTarget { volume_uuid: ROOT.into(), install_path: p(out), format: "raw".into() }],
            ..Default::default()
        })
        .await
        .expect("restore");
        let cmp = std::process::Command::new("qemu-img").args(["compare", &p(img), &p(out)]).output().expect("compare");
        assert!(cmp.status.success(), "{group} restored differs: {}", String::from_utf8_lossy(&cmp.stdout));
    }

    pub async fn reconnect(&self) -> Result<String, tonic::Status> {
        let mut s = self.s.clone();
        let r = s.reconnect_backup_storage(pb::ReconnectBackupStorageRequest {
            uuid: self.bs.clone(),
            ..Default::default()
        });
        Ok(r.await?.into_inner().inventory.expect("inventory").status)
    }

    pub async fn delete(&self, group: &str) {
        self.c
            .clone()
            .delete_vm_backup(pb::DeleteVmBackupRequest { group_uuid: group.into(), ..Default::default() })
            .await
            .expect("delete");
    }
}

/// Starts the agent of host `name` (its data under `dir/name`), allowed to read images
/// and write restores anywhere under `dir`.
pub fn start_host_agent(dir: &Path, name: &str) -> Daemon {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).expect("home");
    let cfg = home.join("agent.toml");
    std::fs::write(&cfg, format!("[volumes]\nroots = [\"{}\"]\n", dir.display())).expect("agent config");
    super::start_agent(&home, super::AgentOptions { config: Some(cfg), ..Default::default() })
}

impl Host {
    /// A host of `agent` with `store` added as its backup storage `name`.
    pub async fn new(agent: &Daemon, store: &Daemon, name: &str) -> Host {
        Host {
            bs: super::add_storage(agent, store, name).await,
            c: super::backup_client(agent).await,
            s: super::storage_client(agent, Some(super::session(agent))).await,
        }
    }
}

pub async fn gc(store: &Daemon) -> Result<spb::GarbageCollectReply, tonic::Status> {
    store_client(store)
        .await
        .garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: Some(0) })
        .await
        .map(tonic::Response::into_inner)
}

/// Verifies every chunk of the store and every group; nothing may be bad.
pub async fn verify_clean(store: &Daemon, when: &str) {
    let v = store_client(store)
        .await
        .verify(spb::VerifyRequest { group_uuids: vec![] })
        .await
        .expect("verify")
        .into_inner();
    assert!(v.bad_chunks.is_empty() && v.damaged_groups.is_empty(), "{when}: {v:?}");
    eprintln!("{when}: verify clean, {} chunks", v.chunks_checked);
}

pub async fn status(store: &Daemon) -> spb::StatusReply {
    store_client(store).await.status(spb::StatusRequest {}).await.expect("status").into_inner()
}

pub async fn groups(store: &Daemon) -> Vec<String> {
    let r = store_client(store).await.list_groups(spb::ListGroupsRequest::default()).await.expect("list");
    r.into_inner().groups.into_iter().map(|g| g.group_uuid).collect()
}
