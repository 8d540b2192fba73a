//! `vmbackupctl backup restore | recover | delete | sync | prune`: the rest of a backup's life.
//! Restores show a progress bar fed by WatchJob; every command prints a table or `--json`.

use anyhow::{Context, bail};
use clap::Args;
use tonic::transport::Channel;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::vm_backup_service_client::VmBackupServiceClient;

use crate::Auth;
use crate::backup::{print_backups, watch};

/// `backup restore`.
#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// Backup group uuid.
    #[arg(long)]
    group: String,
    /// Backup storage to restore from.
    #[arg(long)]
    storage: String,
    /// Where a volume goes: `volume=U,path=/abs/path,format=raw|qcow2`; repeat per volume.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Write over the VM's own registered volumes (the VM must be stopped); with no
    /// `--target`, every volume of the group.
    #[arg(long)]
    revert: bool,
    /// Download streams in flight.
    #[arg(long)]
    parallelism: Option<u32>,
    /// Volume write limit, bytes per second.
    #[arg(long)]
    volume_write_bandwidth: Option<i64>,
    /// Network read limit, bytes per second.
    #[arg(long)]
    network_read_bandwidth: Option<i64>,
}

/// `backup recover`.
#[derive(Debug, Args)]
pub(crate) struct RecoverArgs {
    /// Backup group uuid.
    #[arg(long)]
    group: String,
    /// Backup storage holding the group.
    #[arg(long)]
    from: String,
    /// Backup storage to copy it to.
    #[arg(long)]
    to: String,
}

/// `backup delete`.
#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// Backup group uuid.
    #[arg(long)]
    group: String,
    /// Storages to delete it from (default: every storage holding it).
    #[arg(long = "storage")]
    storages: Vec<String>,
    /// Permissive refuses while a job uses the group; Enforcing does not.
    #[arg(long, default_value = "Permissive")]
    mode: String,
}

/// `backup sync`.
#[derive(Debug, Args)]
pub(crate) struct SyncArgs {
    /// Backup storage whose groups rebuild the catalog.
    #[arg(long)]
    storage: String,
}

fn parse_target(spec: &str) -> anyhow::Result<pb::RestoreTarget> {
    let mut t = pb::RestoreTarget::default();
    for kv in spec.split(',') {
        let (k, v) = kv.split_once('=').with_context(|| format!("{kv:?} in --target is not key=value"))?;
        match k {
            "volume" => t.volume_uuid = v.into(),
            "path" => t.install_path = v.into(),
            "format" => t.format = v.into(),
            other => bail!("unknown --target key {other:?} (volume, path, format)"),
        }
    }
    Ok(t)
}

pub(crate) async fn restore(a: RestoreArgs, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    let resource = uuid::Uuid::new_v4().simple().to_string();
    let req = pb::RestoreVmBackupRequest {
        group_uuid: a.group,
        backup_storage_uuid: a.storage,
        targets: a.targets.iter().map(|t| parse_target(t)).collect::<anyhow::Result<_>>()?,
        revert: a.revert,
        volume_write_bandwidth: a.volume_write_bandwidth,
        network_read_bandwidth: a.network_read_bandwidth,
        resource_uuid: resource.clone(),
        system_tags: a.parallelism.map(|p| format!("volumeLiveBackup::parallelismDegree::{p}")).into_iter().collect(),
        ..Default::default()
    };
    let mut restorer = c.clone();
    let call = tokio::spawn(async move { restorer.restore_vm_backup(req).await });
    if !json {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let _ = watch(&mut c, &resource).await;
    }
    let reply = call.await?.map_err(crate::rpc_error)?.into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    print_backups(false, reply.inventories)
}

pub(crate) async fn recover(a: RecoverArgs, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    let job = vmbackup_agent::jobs::recover_job_uuid(&a.group, &a.to);
    let req = pb::RecoverVmBackupFromImageStoreBackupStorageRequest {
        group_uuid: a.group,
        src_backup_storage_uuid: a.from,
        dst_backup_storage_uuid: a.to,
        ..Default::default()
    };
    let mut recoverer = c.clone();
    let call = tokio::spawn(async move { recoverer.recover_vm_backup_from_image_store_backup_storage(req).await });
    if !json {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let _ = watch(&mut c, &job).await;
    }
    let r = call.await?.map_err(crate::rpc_error)?;
    print_backups(json, r.into_inner().inventories)
}

pub(crate) async fn delete(a: DeleteArgs, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    let group = a.group.clone();
    c.delete_vm_backup(pb::DeleteVmBackupRequest {
        group_uuid: a.group,
        backup_storage_uuids: a.storages,
        delete_mode: a.mode,
        ..Default::default()
    })
    .await
    .map_err(crate::rpc_error)?;
    if json {
        println!("{{}}");
    } else {
        println!("deleted backup group {group}; its chunks are reclaimed by the store's next GC");
    }
    Ok(())
}

pub(crate) async fn sync(a: SyncArgs, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    let storage = a.storage.clone();
    c.sync_vm_backup(pb::SyncVmBackupRequest { image_store_uuid: a.storage, ..Default::default() })
        .await
        .map_err(crate::rpc_error)?;
    if json {
        println!("{{}}");
    } else {
        println!("catalog of backup storage {storage} rebuilt from its groups");
    }
    Ok(())
}

/// `backup prune`.
#[derive(Debug, Args)]
pub(crate) struct PruneArgs {
    /// Backup storage whose groups the policy applies to.
    #[arg(long)]
    storage: String,
    /// Only this VM's groups (by root volume); repeatable.
    #[arg(long = "root-volume")]
    root_volumes: Vec<String>,
    /// Keep the newest N backups of each VM.
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Keep one per hour for the newest N hours that have backups.
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    /// Keep one per day for N days.
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// Keep one per ISO week for N weeks.
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    /// Keep one per month for N months.
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    /// Keep one per year for N years.
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
    /// List what would be deleted and why the rest is kept; delete nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `backup prune`: applies the policy (the storage's configured one when no --keep-* is
/// given) and prints each group's fate.
pub(crate) async fn prune(a: PruneArgs, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let rules = [a.keep_last, a.keep_hourly, a.keep_daily, a.keep_weekly, a.keep_monthly, a.keep_yearly];
    let policy = rules.iter().any(|n| *n > 0).then_some(pb::RetentionPolicy {
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        keep_yearly: a.keep_yearly,
    });
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    let req = pb::PruneVmBackupRequest {
        backup_storage_uuid: a.storage,
        root_volume_uuids: a.root_volumes,
        policy,
        dry_run: a.dry_run,
        ..Default::default()
    };
    let decisions = c.prune_vm_backup(req).await.map_err(crate::rpc_error)?.into_inner().decisions;
    if json {
        println!("{}", serde_json::to_string_pretty(&decisions)?);
        return Ok(());
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header(["GROUP", "ROOT VOLUME", "CREATED (UTC)", "FATE", "WHY"]);
    for d in &decisions {
        let created = d
            .create_date
            .as_ref()
            .and_then(|ts| chrono::DateTime::from_timestamp(ts.seconds, 0))
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let fate = match (d.keep, d.deleted, &d.error) {
            (true, _, _) => "keep",
            (false, true, _) => "deleted",
            (false, false, Some(_)) => "delete failed",
            (false, false, None) => "would delete",
        };
        let why = match &d.error {
            Some(e) => e.details.clone(),
            None => d.reasons.join(", "),
        };
        t.add_row([d.group_uuid.clone(), d.root_volume_uuid.clone(), created, fate.to_string(), why]);
    }
    println!("{t}");
    if let Some(failed) = decisions.iter().find(|d| d.error.is_some()) {
        bail!("some groups the policy does not keep could not be deleted (first: {})", failed.group_uuid);
    }
    Ok(())
}
