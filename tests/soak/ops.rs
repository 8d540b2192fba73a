//! The campaign's operations: one weighted random choice per step, each run with or without
//! a fault aimed at it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::common::{self, run_tool};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

use super::world::*;

/// Chooses and runs one operation.
pub async fn one_op(w: &mut World) {
    let live_groups = w.groups.values().filter(|g| !g.deleting).count();
    let delete_weight = if live_groups > 8 { 30 } else { 6 };
    let table: [(&str, u64); 10] = [
        ("write", 20),
        ("backup", 30),
        ("restore", 10),
        ("revert", 5),
        ("recover", 8),
        ("delete", delete_weight),
        ("sync", 4),
        ("gc", 6),
        ("verify", 4),
        ("snapshot_group", 4),
    ];
    let total: u64 = table.iter().map(|(_, wt)| wt).sum();
    let mut roll = w.rng.below(total);
    let mut kind = "write";
    for (k, wt) in table {
        if roll < wt {
            kind = k;
            break;
        }
        roll -= wt;
    }
    let done = match kind {
        "write" => op_write(w),
        "backup" => op_backup(w).await,
        "restore" => op_restore(w).await,
        "revert" => op_revert(w).await,
        "recover" => op_recover(w).await,
        "delete" => op_delete(w).await,
        "sync" => op_sync(w).await,
        "gc" => op_gc(w).await,
        "verify" => op_verify(w).await,
        _ => op_snapshot_group(w).await,
    };
    if let Some(k) = done {
        *w.stats.ops.entry(k).or_default() += 1;
    }
}

/// Guest writes on a random VM: random bytes, a pattern, or zeroes, 4 KiB to 1 MiB each.
pub fn op_write(w: &mut World) -> Option<&'static str> {
    let vm = w.rng.index(w.vms.len());
    let writes = 1 + w.rng.below(3);
    for _ in 0..writes {
        let vol = w.vms[vm].volumes[w.rng.index(w.vms[vm].volumes.len())].clone();
        let len = 4096 * (1 + w.rng.below(256));
        let off = 4096 * w.rng.below((vol.size - len) / 4096);
        let cmd = match w.rng.below(4) {
            0 => format!("write -z {off} {len}"),
            1 => format!("write -P 0x{:02x} {off} {len}", w.rng.below(256)),
            _ => {
                let src = w.scratch("pattern.bin");
                let data = common::pseudo_random(w.rng.next(), usize::try_from(len).expect("small"));
                std::fs::write(&src, data).expect("writing the pattern file");
                format!("write -s {} {off} {len}", p(&src))
            }
        };
        let (fmt, target) = if w.vms[vm].live {
            ("raw", w.qsd.as_ref().expect("the live VM runs").uri(vol.export))
        } else {
            (vol.format, p(&vol.path))
        };
        run_tool("qemu-io", &["-f", fmt, "-c", &cmd, &target]);
        w.log(format!("write {} {}: {cmd}", w.vms[vm].name, vol.kind));
    }
    Some("guest_write")
}

pub fn backup_request(
    w: &World,
    vm: usize,
    store: usize,
    group: &str,
    name: &str,
    slow: bool,
) -> pb::CreateVmBackupRequest {
    let v = &w.vms[vm];
    pb::CreateVmBackupRequest {
        root_volume_uuid: v.volumes[0].uuid.clone(),
        backup_storage_uuid: w.bs[store].clone(),
        name: name.into(),
        resource_uuid: group.into(),
        volume_read_bandwidth: slow.then_some(SLOW),
        vm: Some(w.register(vm)),
        ..Default::default()
    }
}

pub async fn op_backup(w: &mut World) -> Option<&'static str> {
    let vm = w.rng.index(w.vms.len());
    let store = w.rng.index(2);
    let full = !w.groups.values().any(|g| g.vm == vm && !g.deleting && g.on.contains(&store));
    let live = w.vms[vm].live;
    let kind = match (live, full) {
        (true, true) => "backup_live_full",
        (true, false) => "backup_live_incremental",
        (false, true) => "backup_full",
        (false, false) => "backup_incremental",
    };
    let group = w.rng.uuid();
    let name = format!("soak-{}", w.seq);
    let digests = w.vm_digests(vm);
    w.attempted.insert(
        group.clone(),
        Group {
            vm,
            name: name.clone(),
            digests,
            on: BTreeSet::from([store]),
            deleting: false,
            restored: BTreeSet::new(),
        },
    );
    let fault = w.plan_fault(Some(store), live, 1500);
    w.log(format!("{kind} of {} to store {store} as {group}", w.vms[vm].name));
    let req = backup_request(w, vm, store, &group, &name, fault.is_some());
    let mut c = w.client().await;
    let r = w.drive(async move { c.create_vm_backup(req).await.map(tonic::Response::into_inner) }, fault).await;
    match r {
        Some(Ok(reply)) => {
            backup_reply_names(w, &reply, &group);
            w.commit(&group, store);
        }
        Some(Err(e)) => {
            w.stats.op_errors += 1;
            w.log(format!("backup {group} failed: {}", short(&e)));
            if fault.is_some() {
                retry_backup(w, vm, store, &group, &name).await;
            } else {
                w.violation(format!("backup {group} of {} failed with no fault: {e:?}", w.vms[vm].name));
            }
        }
        None => {}
    }
    Some(kind)
}

pub fn backup_reply_names(w: &mut World, reply: &pb::VolumeBackupsReply, group: &str) {
    if reply.inventories.is_empty() || reply.inventories.iter().any(|i| i.group_uuid != group) {
        w.violation(format!("backup {group} answered inventories of another group: {reply:?}"));
    }
}

pub fn short(e: &tonic::Status) -> String {
    let m: String = e.message().chars().take(200).collect();
    format!("{:?}: {m}", e.code())
}

/// Retries a backup a fault interrupted: it must succeed and upload no chunk the store has.
pub async fn retry_backup(w: &mut World, vm: usize, store: usize, group: &str, name: &str) {
    w.stats.retries += 1;
    let before = common::store_counters(&w.stores[store]).await;
    let req = backup_request(w, vm, store, group, name, false);
    let r = w.client().await.create_vm_backup(req).await;
    let after = common::store_counters(&w.stores[store]).await;
    let resent = after.chunks_already_present - before.chunks_already_present;
    w.log(format!(
        "retry of backup {group}: {}; {} chunks uploaded, {} of them already present",
        if r.is_ok() { "ok" } else { "failed" },
        after.chunks_uploaded - before.chunks_uploaded,
        resent
    ));
    if resent > 0 {
        w.violation(format!("the retry of backup {group} re-sent {resent} chunks the store already had"));
    }
    match r {
        Ok(reply) => {
            backup_reply_names(w, &reply.into_inner(), group);
            w.commit(group, store);
        }
        Err(e) => w.violation(format!("the retry of backup {group} after a fault failed: {e:?}")),
    }
}

/// A committed copy (group, store) picked at random, optionally of a stopped VM only.
pub fn pick_copy(w: &mut World, stopped_only: bool) -> Option<(String, usize)> {
    let copies: Vec<(String, usize)> = w
        .groups
        .iter()
        .filter(|(_, g)| !g.deleting && (!stopped_only || !w.vms[g.vm].live))
        .flat_map(|(u, g)| g.on.iter().map(move |s| (u.clone(), *s)))
        .collect();
    if copies.is_empty() {
        return None;
    }
    Some(copies[w.rng.index(copies.len())].clone())
}

pub fn restore_targets(w: &World, group: &Group, tag: &str, format: &str) -> Vec<(PathBuf, pb::RestoreTarget)> {
    w.vms[group.vm]
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let path = w.dir.path().join("restores").join(format!("{tag}-{i}.{format}"));
            (
                path.clone(),
                pb::RestoreTarget { volume_uuid: v.uuid.clone(), install_path: p(&path), format: format.into() },
            )
        })
        .collect()
}

/// Restores `group` from `store` to new files (faulted when `fault` is set) and checks each
/// target: after a success, equal to the group; after a failure, absent or equal.
pub async fn restore_copy(w: &mut World, uuid: &str, store: usize, fault: Option<(Fault, Duration)>) -> Option<bool> {
    let g = w.groups.get(uuid).expect("a committed group").clone();
    let format = if w.rng.percent(50) { "raw" } else { "qcow2" };
    let tag = format!("r{}-{}", w.seq, w.rng.below(1 << 20));
    let targets = restore_targets(w, &g, &tag, format);
    let req = pb::RestoreVmBackupRequest {
        group_uuid: uuid.into(),
        backup_storage_uuid: w.bs[store].clone(),
        targets: targets.iter().map(|(_, t)| t.clone()).collect(),
        volume_write_bandwidth: fault.is_some().then_some(SLOW),
        ..Default::default()
    };
    let mut c = w.client().await;
    let r = w.drive(async move { c.restore_vm_backup(req).await.map(tonic::Response::into_inner) }, fault).await?;
    let ok = r.is_ok();
    if let Err(e) = &r {
        w.stats.op_errors += 1;
        w.log(format!("restore of {uuid} from store {store} failed: {}", short(e)));
        if fault.is_none() {
            w.violation(format!("restore of {uuid} from store {store} failed with no fault: {e:?}"));
        }
    }
    for ((path, _), want) in targets.iter().zip(&g.digests) {
        if path.exists() {
            let got = digest_file(path, format);
            if &got != want {
                w.violation(format!(
                    "{} restored from {uuid} on store {store} differs from the backup ({got} != {want}){}",
                    path.display(),
                    if ok { "" } else { " after a failed restore" }
                ));
            }
            std::fs::remove_file(path).expect("removing a restored file");
        } else if ok {
            w.violation(format!("restore of {uuid} succeeded but {} is missing", path.display()));
        }
    }
    if ok {
        w.stats.restores_checked += 1;
        if let Some(g) = w.groups.get_mut(uuid) {
            g.restored.insert(store);
        }
    }
    Some(ok)
}

pub async fn op_restore(w: &mut World) -> Option<&'static str> {
    let (uuid, store) = pick_copy(w, false)?;
    let fault = w.plan_fault(Some(store), false, 1500);
    w.log(format!("restore of {uuid} from store {store} to new files"));
    restore_copy(w, &uuid, store, fault).await;
    Some("restore_new")
}

/// Reverts a stopped VM to one of its groups: every volume ends as it was or as the group.
pub async fn op_revert(w: &mut World) -> Option<&'static str> {
    let (uuid, store) = pick_copy(w, true)?;
    let g = w.groups[&uuid].clone();
    let before = w.vm_digests(g.vm);
    let fault = w.plan_fault(Some(store), false, 1500);
    w.log(format!("revert of {} to {uuid} from store {store}", w.vms[g.vm].name));
    let req = pb::RestoreVmBackupRequest {
        group_uuid: uuid.clone(),
        backup_storage_uuid: w.bs[store].clone(),
        revert: true,
        volume_write_bandwidth: fault.is_some().then_some(SLOW),
        ..Default::default()
    };
    let mut c = w.client().await;
    let r = w.drive(async move { c.restore_vm_backup(req).await.map(tonic::Response::into_inner) }, fault).await?;
    let after = w.vm_digests(g.vm);
    match &r {
        Ok(_) => {
            if after != g.digests {
                w.violation(format!("revert to {uuid} succeeded but the volumes differ from the group"));
            }
        }
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("revert to {uuid} failed: {}", short(e)));
            if fault.is_none() {
                w.violation(format!("revert to {uuid} failed with no fault: {e:?}"));
            }
            for (i, d) in after.iter().enumerate() {
                if d != &before[i] && d != &g.digests[i] {
                    w.violation(format!("an interrupted revert left volume {i} of {} torn", w.vms[g.vm].name));
                }
            }
        }
    }
    Some("revert")
}

pub async fn op_recover(w: &mut World) -> Option<&'static str> {
    let single: Vec<(String, usize)> = w
        .groups
        .iter()
        .filter(|(_, g)| !g.deleting && g.on.len() == 1)
        .map(|(u, g)| (u.clone(), *g.on.iter().next().expect("one store")))
        .collect();
    if single.is_empty() {
        return None;
    }
    let (uuid, src) = single[w.rng.index(single.len())].clone();
    let dst = 1 - src;
    let fault = w.plan_fault(Some(dst), false, 400);
    w.log(format!("recover of {uuid} from store {src} to store {dst}"));
    let req = pb::RecoverVmBackupFromImageStoreBackupStorageRequest {
        group_uuid: uuid.clone(),
        src_backup_storage_uuid: w.bs[src].clone(),
        dst_backup_storage_uuid: w.bs[dst].clone(),
        ..Default::default()
    };
    let mut c = w.client().await;
    let r2 = req.clone();
    let r = w
        .drive(
            async move { c.recover_vm_backup_from_image_store_backup_storage(r2).await.map(tonic::Response::into_inner) },
            fault,
        )
        .await?;
    match r {
        Ok(_) => w.commit(&uuid, dst),
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("recover of {uuid} failed: {}", short(&e)));
            if fault.is_none() {
                w.violation(format!("recover of {uuid} failed with no fault: {e:?}"));
                return Some("recover");
            }
            w.stats.retries += 1;
            let before = common::store_counters(&w.stores[dst]).await;
            let r = w.client().await.recover_vm_backup_from_image_store_backup_storage(req).await;
            let after = common::store_counters(&w.stores[dst]).await;
            let resent = after.chunks_already_present - before.chunks_already_present;
            w.log(format!(
                "retry of recover {uuid}: {}; {} chunks uploaded, {resent} already present",
                if r.is_ok() { "ok" } else { "failed" },
                after.chunks_uploaded - before.chunks_uploaded
            ));
            if resent > 0 {
                w.violation(format!("the retried recover of {uuid} re-sent {resent} chunks the store had"));
            }
            match r {
                Ok(_) => w.commit(&uuid, dst),
                Err(e) => w.violation(format!("the retried recover of {uuid} failed: {e:?}")),
            }
        }
    }
    Some("recover")
}

pub async fn op_delete(w: &mut World) -> Option<&'static str> {
    if w.groups.is_empty() {
        return None;
    }
    // The oldest groups go first more often (they are first in no particular order, so
    // pick among all, as a retention policy would not).
    let uuids: Vec<String> = w.groups.keys().cloned().collect();
    let uuid = uuids[w.rng.index(uuids.len())].clone();
    w.groups.get_mut(&uuid).expect("picked").deleting = true;
    let fault = w.plan_fault(None, false, 300);
    w.log(format!("delete of {uuid}"));
    let req = pb::DeleteVmBackupRequest { group_uuid: uuid.clone(), ..Default::default() };
    let mut c = w.client().await;
    let r = w.drive(async move { c.delete_vm_backup(req).await.map(tonic::Response::into_inner) }, fault).await?;
    match r {
        Ok(_) => {
            w.groups.remove(&uuid);
            w.deleted.insert(uuid);
        }
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("delete of {uuid} failed: {}", short(&e)));
            if fault.is_none() {
                w.violation(format!("delete of {uuid} failed with no fault: {e:?}"));
            }
        }
    }
    Some("delete")
}

pub async fn op_sync(w: &mut World) -> Option<&'static str> {
    let store = w.rng.index(2);
    let fault = w.plan_fault(Some(store), false, 200);
    w.log(format!("sync of store {store}"));
    let req = pb::SyncVmBackupRequest { image_store_uuid: w.bs[store].clone(), ..Default::default() };
    let mut c = w.client().await;
    let r = w.drive(async move { c.sync_vm_backup(req).await.map(tonic::Response::into_inner) }, fault).await?;
    if let Err(e) = r {
        w.stats.op_errors += 1;
        w.log(format!("sync failed: {}", short(&e)));
        if fault.is_none() {
            w.violation(format!("sync of store {store} failed with no fault: {e:?}"));
        }
    }
    Some("sync")
}

pub async fn op_gc(w: &mut World) -> Option<&'static str> {
    let store = w.rng.index(2);
    let fault = w.plan_fault(Some(store), false, 300);
    w.log(format!("gc of store {store}"));
    let mut c = common::store_client(&w.stores[store]).await;
    let r = w
        .drive(
            async move {
                c.garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: Some(0) })
                    .await
                    .map(tonic::Response::into_inner)
            },
            fault,
        )
        .await?;
    match r {
        Ok(gc) => w.log(format!("gc removed {} chunks, kept {}", gc.chunks_removed, gc.chunks_kept)),
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("gc failed: {}", short(&e)));
            if fault.is_none() {
                w.violation(format!("gc of store {store} failed with no fault: {e:?}"));
            }
        }
    }
    Some("store_gc")
}

pub async fn op_verify(w: &mut World) -> Option<&'static str> {
    let store = w.rng.index(2);
    let fault = w.plan_fault(Some(store), false, 300);
    w.log(format!("verify of store {store}"));
    let mut c = common::store_client(&w.stores[store]).await;
    let r = w
        .drive(
            async move { c.verify(spb::VerifyRequest { group_uuids: vec![] }).await.map(tonic::Response::into_inner) },
            fault,
        )
        .await?;
    match r {
        Ok(v) if !v.bad_chunks.is_empty() || !v.damaged_groups.is_empty() => {
            w.violation(format!(
                "verify of store {store}: {} bad chunks, damaged {:?}",
                v.bad_chunks.len(),
                v.damaged_groups
            ));
        }
        Ok(_) => {}
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("verify failed: {}", short(&e)));
            if fault.is_none() {
                w.violation(format!("verify of store {store} failed with no fault: {e:?}"));
            }
        }
    }
    Some("store_verify")
}

pub type Groups = pb::volume_snapshot_group_service_client::VolumeSnapshotGroupServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, common::Auth>,
>;

pub async fn snapshot_groups(w: &World) -> Groups {
    pb::volume_snapshot_group_service_client::VolumeSnapshotGroupServiceClient::with_interceptor(
        common::channel(&w.agent.url()).await,
        common::Auth(Some(format!("OAuth {}", common::session(&w.agent)))),
    )
}

/// A volume snapshot group of a stopped VM taken and deleted again (its overlays merged
/// back): afterwards no group, no overlay, the VM's registered paths and data as before.
pub async fn op_snapshot_group(w: &mut World) -> Option<&'static str> {
    let stopped: Vec<usize> = (0..w.vms.len()).filter(|i| !w.vms[*i].live).collect();
    let vm = stopped[w.rng.index(stopped.len())];
    let mut vms = pb::vm_service_client::VmServiceClient::with_interceptor(
        common::channel(&w.agent.url()).await,
        common::Auth(Some(format!("OAuth {}", common::session(&w.agent)))),
    );
    vms.register_vm(w.register(vm)).await.expect("registering the VM");
    let before = w.vm_digests(vm);
    let fault = w.plan_fault(None, false, 300);
    w.log(format!("snapshot group of {}: create, then delete", w.vms[vm].name));
    let (mut g, root) = (snapshot_groups(w).await, w.vms[vm].volumes[0].uuid.clone());
    let r = w
        .drive(
            async move {
                let create = pb::CreateVolumeSnapshotGroupRequest {
                    root_volume_uuid: root,
                    name: "soak".into(),
                    ..Default::default()
                };
                let inv = g.create_volume_snapshot_group(create).await?.into_inner().inventory.unwrap_or_default();
                let delete = pb::DeleteVolumeSnapshotGroupRequest { uuid: inv.uuid, ..Default::default() };
                Ok(g.delete_volume_snapshot_group(delete).await?.into_inner().results)
            },
            fault,
        )
        .await?;
    match r {
        Ok(results) if results.iter().all(|r| r.success) => {}
        Ok(results) => w.violation(format!("deleting a snapshot group of {} failed: {results:?}", w.vms[vm].name)),
        Err(e) => {
            w.stats.op_errors += 1;
            w.log(format!("snapshot group failed: {}", short(&e)));
            if fault.is_none() {
                w.violation(format!("snapshot group of {} failed with no fault: {e:?}", w.vms[vm].name));
            }
        }
    }
    // A group a fault left behind is deleted now, as an operator would.
    let mut g = snapshot_groups(w).await;
    let left = g
        .query_volume_snapshot_group(pb::QueryVolumeSnapshotGroupRequest::default())
        .await
        .expect("querying snapshot groups")
        .into_inner()
        .inventories;
    for inv in left {
        w.log(format!("deleting snapshot group {} left by the fault", inv.uuid));
        let req = pb::DeleteVolumeSnapshotGroupRequest { uuid: inv.uuid.clone(), ..Default::default() };
        match g.delete_volume_snapshot_group(req).await {
            Ok(r) if r.get_ref().results.iter().all(|r| r.success) => {}
            other => w.violation(format!("deleting the leftover snapshot group {} failed: {other:?}", inv.uuid)),
        }
    }
    let paths: Vec<String> = vms
        .query_vm(pb::QueryVmRequest::default())
        .await
        .expect("querying VMs")
        .into_inner()
        .inventories
        .into_iter()
        .filter(|v| v.uuid == w.vms[vm].uuid)
        .flat_map(|v| v.volumes.into_iter().map(|x| x.install_path))
        .collect();
    let want: Vec<String> = w.vms[vm].volumes.iter().map(|v| p(&v.path)).collect();
    if paths != want {
        w.violation(format!("after its snapshot group, {} is registered on {paths:?}", w.vms[vm].name));
    }
    if w.vm_digests(vm) != before {
        w.violation(format!("a snapshot group taken and deleted changed the data of {}", w.vms[vm].name));
    }
    Some("snapshot_group")
}
