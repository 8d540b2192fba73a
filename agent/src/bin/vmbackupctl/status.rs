//! `vmbackupctl status`: one screen on the agent and every store it uses: storages with
//! their state and capacity, each reachable store's own status (groups, chunks, version),
//! and how many VMs and volume backups the agent knows.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tonic::transport::Channel;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

use crate::{Auth, bytes, rpc_error};

/// The token to ask a store with: the one the agent keeps for that storage
/// (`<data_dir>/credentials/<uuid>.token`), else the embedded store's admin token
/// (`<data_dir>/store/admin.token`). Reading either needs the agent's privileges.
fn store_token(data_dir: &std::path::Path, storage_uuid: &str) -> Option<String> {
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok().map(|t| t.trim().to_string());
    read(data_dir.join("credentials").join(format!("{storage_uuid}.token")))
        .or_else(|| read(data_dir.join("store").join("admin.token")))
}

async fn store_status(url: &str, token: Option<String>) -> Result<spb::StatusReply, String> {
    let channel = Channel::from_shared(url.to_string())
        .map_err(|e| format!("bad url: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
    let header: Option<tonic::metadata::MetadataValue<_>> = token.and_then(|t| format!("Bearer {t}").parse().ok());
    let bearer = move |mut r: tonic::Request<()>| {
        if let Some(h) = &header {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    };
    let mut c = spb::image_store_client::ImageStoreClient::with_interceptor(channel, bearer);
    c.status(spb::StatusRequest {}).await.map(tonic::Response::into_inner).map_err(|s| s.message().to_string())
}

pub(crate) async fn run(
    agent: &str,
    data_dir: &std::path::Path,
    channel: Channel,
    auth: Auth,
    json: bool,
) -> anyhow::Result<()> {
    let mut storages =
        pb::backup_storage_service_client::BackupStorageServiceClient::with_interceptor(channel.clone(), auth.clone());
    let mut vms = pb::vm_service_client::VmServiceClient::with_interceptor(channel.clone(), auth.clone());
    let mut backups = pb::vm_backup_service_client::VmBackupServiceClient::with_interceptor(channel, auth);
    let inventories = storages
        .query_backup_storage(pb::QueryBackupStorageRequest::default())
        .await
        .map_err(rpc_error)?
        .into_inner()
        .inventories;
    let count = |r: Option<i64>| r.unwrap_or(0);
    let vm_count = count(
        vms.query_vm(pb::QueryVmRequest { count: true, ..Default::default() })
            .await
            .map_err(rpc_error)?
            .into_inner()
            .total,
    );
    let backup_count = count(
        backups
            .query_volume_backup(pb::QueryVolumeBackupRequest { count: true, ..Default::default() })
            .await
            .map_err(rpc_error)?
            .into_inner()
            .total,
    );
    let mut stores = Vec::new();
    for s in &inventories {
        stores.push(store_status(&s.url, store_token(data_dir, &s.uuid)).await);
    }
    if json {
        let storages: Vec<serde_json::Value> = inventories
            .iter()
            .zip(&stores)
            .map(|(inv, st)| match st {
                Ok(st) => serde_json::json!({ "inventory": inv, "store": st }),
                Err(e) => serde_json::json!({ "inventory": inv, "storeError": e }),
            })
            .collect();
        let v = serde_json::json!({
            "agent": agent,
            "vms": vm_count,
            "volumeBackups": backup_count,
            "backupStorages": storages,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("agent {agent}: {vm_count} VMs registered, {backup_count} volume backups");
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["STORAGE", "NAME", "STATUS", "URL", "AVAILABLE", "TOTAL", "GROUPS", "CHUNKS IN", "STORE"]);
    for (inv, st) in inventories.into_iter().zip(stores) {
        let (groups, chunks, store) = match st {
            Ok(st) => (
                st.group_count.to_string(),
                st.counters.map(|c| c.chunks_uploaded.to_string()).unwrap_or_default(),
                format!("v{} ({})", st.server_version, st.store_uuid),
            ),
            Err(e) => ("-".into(), "-".into(), e),
        };
        t.add_row([
            inv.uuid,
            inv.name,
            inv.status,
            inv.url,
            bytes(inv.available_capacity),
            bytes(inv.total_capacity),
            groups,
            chunks,
            store,
        ]);
    }
    println!("{t}");
    Ok(())
}
