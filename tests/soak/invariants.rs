//! The campaign's invariants, checked after every fault, every few operations and at the
//! end (listed in the test's module doc).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{self, Daemon, run_tool};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as spb;

use super::ops::*;
use super::world::*;

pub async fn store_groups(store: &Daemon) -> BTreeSet<String> {
    let mut c = common::store_client(store).await;
    let r = c.list_groups(spb::ListGroupsRequest {}).await.expect("listing a store's groups");
    r.into_inner().groups.into_iter().map(|g| g.group_uuid).collect()
}

/// The agent's catalog: group uuids per backup storage uuid.
pub async fn catalog(w: &World) -> BTreeMap<String, BTreeSet<String>> {
    let mut c = w.client().await;
    let r = c
        .query_volume_backup(pb::QueryVolumeBackupRequest::default())
        .await
        .expect("querying the agent's catalog")
        .into_inner();
    let mut out: BTreeMap<String, BTreeSet<String>> = w.bs.iter().map(|b| (b.clone(), BTreeSet::new())).collect();
    for inv in r.inventories {
        for r in inv.backup_storage_refs {
            out.entry(r.backup_storage_uuid).or_default().insert(inv.group_uuid.clone());
        }
    }
    out
}

/// Files named `*.vmbackup-*` (restore partials, live overlays) or `*-snap-*` (snapshot
/// group overlays) under `dir`, stores excluded.
pub fn leftovers(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("listing a directory").flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("store-") {
            continue;
        }
        if name.contains(".vmbackup-") || name.contains("-snap-") {
            out.push(path.clone());
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            leftovers(&path, out);
        }
    }
}

/// Open sessions of a store once the agent's background closes have landed.
pub async fn settled_open_sessions(store: &Daemon, allowed: u32) -> u32 {
    let mut c = common::store_client(store).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open = c.status(spb::StatusRequest {}).await.expect("store status").into_inner().open_sessions;
        if open <= allowed || Instant::now() > deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks every invariant; `all` restores every committed copy, else new ones and a few.
pub async fn check(w: &mut World, all: bool) {
    w.stats.checks += 1;
    let mut visible = Vec::new();
    for s in 0..2 {
        visible.push(store_groups(&w.stores[s]).await);
    }
    // Groups: what the stores show against what the test committed.
    for (s, vis) in visible.iter().enumerate() {
        for g in vis {
            if w.groups.contains_key(g) {
                let grp = w.groups.get_mut(g).expect("known");
                if !grp.on.contains(&s) {
                    w.log(format!("group {g} is on store {s} although that recover failed"));
                    w.stats.committed_despite_error += 1;
                    w.groups.get_mut(g).expect("known").on.insert(s);
                }
            } else if w.attempted.contains_key(g) {
                w.log(format!("group {g} is on store {s} although its backup call failed"));
                w.stats.committed_despite_error += 1;
                w.commit(g, s);
            } else if w.deleted.contains(g) {
                w.violation(format!("group {g} was deleted but store {s} still shows it"));
            } else {
                w.violation(format!("store {s} shows group {g}, which the test never started"));
            }
        }
    }
    let mut gone = Vec::new();
    for (u, g) in &mut w.groups {
        for (s, vis) in visible.iter().enumerate() {
            if g.on.contains(&s) && !vis.contains(u) {
                if g.deleting {
                    g.on.remove(&s);
                } else {
                    gone.push(format!("committed group {u} ({}) is lost from store {s}", g.name));
                }
            }
        }
    }
    w.groups.retain(|_, g| !g.on.is_empty());
    for v in gone {
        w.violation(v);
    }
    // Stores: no temp file, Verify clean, no session left open.
    for s in 0..2 {
        let tmp = w.stores[s].data_dir.join("tmp");
        let left: Vec<String> = std::fs::read_dir(&tmp)
            .expect("listing the store's tmp/")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        if !left.is_empty() {
            w.violation(format!("store {s} has temp files: {left:?}"));
        }
        let v = common::store_client(&w.stores[s])
            .await
            .verify(spb::VerifyRequest { group_uuids: vec![] })
            .await
            .expect("verifying a store")
            .into_inner();
        if !v.bad_chunks.is_empty() || !v.damaged_groups.is_empty() {
            w.violation(format!("store {s} verify: {} bad chunks, damaged {:?}", v.bad_chunks.len(), v.damaged_groups));
        }
        w.orphans[s].retain(|t| t.elapsed() < SESSION_TTL + Duration::from_secs(10));
        let allowed = u32::try_from(w.orphans[s].len()).expect("few");
        let open = settled_open_sessions(&w.stores[s], allowed).await;
        if open > allowed {
            w.violation(format!("store {s} has {open} open sessions with no job running ({allowed} tolerated)"));
        }
    }
    // The catalog equals the stores, and Sync changes nothing.
    let cat = catalog(w).await;
    let mut mismatch = false;
    for (s, vis) in visible.iter().enumerate() {
        let had = cat.get(&w.bs[s]).cloned().unwrap_or_default();
        if &had != vis {
            mismatch = true;
            let extra: Vec<_> = had.difference(vis).collect();
            let missing: Vec<_> = vis.difference(&had).collect();
            w.violation(format!("catalog of store {s} differs from the store: extra {extra:?}, missing {missing:?}"));
        }
    }
    let mut c = w.client().await;
    for s in 0..2 {
        if let Err(e) =
            c.sync_vm_backup(pb::SyncVmBackupRequest { image_store_uuid: w.bs[s].clone(), ..Default::default() }).await
        {
            w.violation(format!("SyncVmBackup of store {s} failed: {e:?}"));
        }
    }
    let synced = catalog(w).await;
    for (s, vis) in visible.iter().enumerate() {
        let after = synced.get(&w.bs[s]).cloned().unwrap_or_default();
        if &after != vis {
            w.violation(format!("after SyncVmBackup the catalog of store {s} still differs from it"));
        } else if !mismatch && cat.get(&w.bs[s]) != Some(&after) {
            w.violation(format!("SyncVmBackup changed the catalog of store {s}, which matched"));
        }
    }
    // Nothing half-done visible: no partial target, no overlay file, no overlay node.
    let mut left = Vec::new();
    leftovers(w.dir.path(), &mut left);
    if !left.is_empty() {
        w.violation(format!("leftover files: {left:?}"));
    }
    check_live_chain(w, &left);
    // Restores: every copy not yet restored, a few random ones, or all at the end.
    let mut copies: Vec<(String, usize)> = Vec::new();
    for (u, g) in &w.groups {
        for s in &g.on {
            if !g.deleting && (all || !g.restored.contains(s)) {
                copies.push((u.clone(), *s));
            }
        }
    }
    if !all {
        for _ in 0..2 {
            if let Some(c) = pick_copy(w, false)
                && !copies.contains(&c)
            {
                copies.push(c);
            }
        }
    }
    for (u, s) in copies {
        restore_copy(w, &u, s, None).await;
    }
    w.log(format!(
        "check {}: {} groups committed, {} on store a, {} on store b, {} violations so far",
        w.stats.checks,
        w.groups.len(),
        visible[0].len(),
        visible[1].len(),
        w.stats.violations.len()
    ));
}

/// The running VM's block graph holds no vmbackup overlay; if it does (a violation), the
/// overlays are merged offline so the campaign can go on with the guest's data intact.
pub fn check_live_chain(w: &mut World, left: &[PathBuf]) {
    let Some(qsd) = w.qsd.as_ref() else { return };
    let nodes = match common::qmp::qmp(&qsd.qmp, "query-named-block-nodes", serde_json::json!({ "flat": true })) {
        Ok(n) => n,
        Err(e) => {
            w.violation(format!("the live VM's QMP monitor does not answer: {e}"));
            return;
        }
    };
    let overlays: Vec<String> = nodes
        .as_array()
        .expect("a list of nodes")
        .iter()
        .filter(|n| {
            n["node-name"].as_str().is_some_and(|s| s.starts_with("vmbk-"))
                || n["image"]["filename"].as_str().is_some_and(|f| f.contains(".vmbackup-"))
        })
        .map(|n| format!("{} ({})", n["node-name"], n["image"]["filename"]))
        .collect();
    // Partial restore targets were reported above; they go so they are reported once.
    for f in left.iter().filter(|f| p(f).contains("vmbackup-partial")) {
        let _ = std::fs::remove_file(f);
    }
    let live_dir = w.dir.path().join("live");
    if overlays.is_empty() && !left.iter().any(|f| f.starts_with(&live_dir)) {
        return;
    }
    if !overlays.is_empty() {
        w.violation(format!("the live VM runs on vmbackup overlays: {overlays:?}"));
    }
    // Repair: stop QEMU cleanly, commit every leftover overlay (newest first), start again.
    if let Some(mut q) = w.qsd.take() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(q.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = q.child.wait();
    }
    let mut files: Vec<PathBuf> = left.iter().filter(|f| !p(f).contains("vmbackup-partial")).cloned().collect();
    files.sort_by_key(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok());
    for f in files.iter().rev() {
        if f.starts_with(&live_dir) {
            run_tool("qemu-img", &["commit", "-q", &p(f)]);
            std::fs::remove_file(f).expect("removing a merged overlay");
            w.log(format!("repair: merged {} offline", f.display()));
        }
    }
    w.restart_qemu();
}
