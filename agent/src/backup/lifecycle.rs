//! DeleteVmBackup and SyncVmBackup: removing groups from their storages, and rebuilding the
//! catalog of one storage from its manifests alone.

use std::collections::HashSet;

use vmbackup_proto::manifest::GroupManifest;

use crate::error::{AgentError, ErrorKind, Result};
use crate::storage::registry::Registry;

/// Removes a group from `storages` (every storage holding it when empty). The stores
/// reclaim its chunks with their GC. A store that stops answering (its reply lost, a
/// restart) is waited for up to `outage` and asked again: a delete is idempotent, so the
/// catalog forgets the group only once the store says it is gone.
pub async fn delete_group(
    registry: &Registry,
    group_uuid: &str,
    storages: &[String],
    outage: std::time::Duration,
) -> Result<()> {
    let g = group_uuid.to_string();
    let records = registry.catalog().run(move |c| c.group_volume_backups(&g)).await?;
    if records.is_empty() {
        return Err(AgentError::not_found("backup group", group_uuid).with_field("groupUuid"));
    }
    let holding: HashSet<String> =
        records.iter().flat_map(|r| r.refs.iter().map(|s| s.backup_storage_uuid.clone())).collect();
    let targets: Vec<String> = if storages.is_empty() { holding.iter().cloned().collect() } else { storages.to_vec() };
    for s in &targets {
        if !holding.contains(s) {
            return Err(AgentError::invalid(
                "backupStorageUuids",
                format!("backup group {group_uuid} is not on backup storage {s}"),
            ));
        }
    }
    for s in &targets {
        let storage = registry.require(s).await?;
        let (g, st) = (group_uuid.to_string(), s.clone());
        registry.catalog().run(move |c| c.begin_delete(&g, &st)).await?;
        let started = std::time::Instant::now();
        let mut attempt = 0u32;
        loop {
            let deleted = match registry.open_store(&storage, None).await {
                Ok((store, _)) => store.delete_group(group_uuid).await,
                Err(e) => Err(e),
            };
            match deleted {
                Ok(()) => break,
                // Already gone from the store (deleted there, or a retry): just forget it.
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e) if e.is_store_outage() && started.elapsed() < outage => {
                    attempt += 1;
                    let pause = super::outage::backoff(attempt).min(outage.saturating_sub(started.elapsed()));
                    tracing::warn!(group = %group_uuid, storage = %s, error = %e, attempt, "deleting: the Image Storage did not answer; asking again");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => {
                    // A refusal is an outcome (the group stays); a store still away is not.
                    if !e.is_store_outage() {
                        let (g, st) = (group_uuid.to_string(), s.clone());
                        registry.catalog().run(move |c| c.cancel_delete(&g, &st)).await?;
                    }
                    return Err(e);
                }
            }
        }
        let (g, st) = (group_uuid.to_string(), s.clone());
        registry.catalog().run(move |c| c.finish_delete(&g, &st)).await?;
        tracing::info!(group = %group_uuid, storage = %s, "backup group deleted");
    }
    Ok(())
}

/// Finishes the deletes an earlier agent process asked of a store but did not record (it
/// stopped in between): each store is asked once more (a group already gone counts as
/// deleted) and the catalog follows it. A store that does not answer within `limit` keeps
/// its entry for the next start, or for the operator's retry of the delete.
pub async fn finish_pending_deletes(registry: &Registry, limit: std::time::Duration) -> Result<usize> {
    let pending = registry.catalog().run(|c| c.pending_deletes()).await?;
    let mut done = 0;
    for (group, storage_uuid) in pending {
        let Ok(storage) = registry.require(&storage_uuid).await else {
            let (g, s) = (group.clone(), storage_uuid.clone());
            registry.catalog().run(move |c| c.finish_delete(&g, &s)).await?;
            continue;
        };
        let asked = tokio::time::timeout(limit, async {
            let (store, _) = registry.open_store(&storage, None).await?;
            match store.delete_group(&group).await {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .await;
        match asked {
            Ok(Ok(())) => {
                let (g, s) = (group.clone(), storage_uuid.clone());
                registry.catalog().run(move |c| c.finish_delete(&g, &s)).await?;
                tracing::info!(group = %group, storage = %storage_uuid, "finished a delete an earlier run left");
                done += 1;
            }
            Ok(Err(e)) if !e.is_store_outage() => {
                tracing::warn!(group = %group, storage = %storage_uuid, error = %e, "the store refused a delete an earlier run left; the group stays");
                let (g, s) = (group.clone(), storage_uuid.clone());
                registry.catalog().run(move |c| c.cancel_delete(&g, &s)).await?;
            }
            Ok(Err(e)) => {
                tracing::warn!(group = %group, storage = %storage_uuid, error = %e, "a delete an earlier run left is still pending")
            }
            Err(_) => {
                tracing::warn!(group = %group, storage = %storage_uuid, "a delete an earlier run left is still pending: the store did not answer")
            }
        }
    }
    Ok(done)
}

/// Settles the commits an earlier agent process asked of a store but did not record (it
/// stopped in between): a group the store has is recorded from its manifest, one it does
/// not have is forgotten. A store that does not answer within `limit` keeps its entry for
/// the next start (SyncVmBackup also finds such a group).
pub async fn finish_pending_commits(registry: &Registry, limit: std::time::Duration) -> Result<usize> {
    let pending = registry.catalog().run(|c| c.pending_commits()).await?;
    let mut recorded = 0;
    for (group, storage_uuid) in pending {
        let found = tokio::time::timeout(limit, async {
            let storage = registry.require(&storage_uuid).await?;
            let key = registry.chunk_key(&storage).await?;
            let (store, _) = registry.open_store(&storage, None).await?;
            super::outage::committed_before(&*store, &storage_uuid, &group, key.as_deref()).await
        })
        .await;
        match found {
            Ok(Ok(records)) => {
                let records = records.unwrap_or_default();
                recorded += usize::from(!records.is_empty());
                tracing::info!(group = %group, storage = %storage_uuid, committed = !records.is_empty(), "settled a commit an earlier run left");
                let (g, s) = (group.clone(), storage_uuid.clone());
                registry.catalog().run(move |c| c.finish_commit(&g, &s, &records)).await?;
            }
            Ok(Err(e)) => {
                tracing::warn!(group = %group, storage = %storage_uuid, error = %e, "a commit an earlier run left is still unsettled")
            }
            Err(_) => {
                tracing::warn!(group = %group, storage = %storage_uuid, "a commit an earlier run left is still unsettled: the store did not answer")
            }
        }
    }
    Ok(recorded)
}

/// Rebuilds the catalog of one Image Storage from its manifests: groups it holds that the
/// catalog lacks are added (with their recorded names, sizes and dates), groups the catalog
/// lists but the store no longer has are forgotten, and the others are left untouched.
/// Returns (added, removed).
pub async fn sync_storage(registry: &Registry, storage_uuid: &str) -> Result<(usize, usize)> {
    let storage = registry.require(storage_uuid).await?;
    let key = registry.chunk_key(&storage).await?;
    let (store, _) = registry.open_store(&storage, None).await?;
    let groups = store.list_groups().await?;
    let catalog = registry.catalog().clone();
    let s = storage_uuid.to_string();
    let known: HashSet<String> = catalog.run(move |c| c.groups_on_storage(&s)).await?.into_iter().collect();
    let mut on_store = HashSet::new();
    let mut added = 0;
    for g in groups {
        let manifest = GroupManifest::decode(&g.manifest)
            .and_then(|m| match &key {
                Some(k) => m.unseal(k),
                None => Ok(m),
            })
            .map_err(|e| {
                AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!("manifest of group {} on {}: {e}", g.group_uuid, storage.url),
                )
            })?;
        on_store.insert(manifest.group_uuid.clone());
        if known.contains(&manifest.group_uuid) {
            continue;
        }
        if manifest.is_sealed() {
            tracing::warn!(
                group = %manifest.group_uuid,
                storage = %storage_uuid,
                key_id = manifest.key_id.as_deref().unwrap_or_default(),
                "group is sealed and this backup storage has no key; add the storage with its key to list it"
            );
            continue;
        }
        let records = super::records_of(&manifest, storage_uuid, g.damaged)?;
        catalog.run(move |c| c.insert_volume_backups(&records)).await?;
        added += 1;
    }
    let mut removed = 0;
    for g in known.difference(&on_store) {
        let (g, s) = (g.clone(), vec![storage_uuid.to_string()]);
        catalog.run(move |c| c.remove_group_refs(&g, &s)).await?;
        removed += 1;
    }
    tracing::info!(storage = %storage_uuid, added, removed, "catalog synced from the store's manifests");
    Ok((added, removed))
}
