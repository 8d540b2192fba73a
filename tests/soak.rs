//! The fault campaign (issue #21): a seeded loop of random operations over one agent, two
//! Image Storages and three VMs, with processes killed and the network broken in the middle
//! of them, checking after every fault that nothing committed was lost and nothing
//! half-done is visible.
//!
//! **World.** One `vmbackup-agent`, two `vmbackup-store`s (64 KiB chunks, both added to the
//! agent, in their own network namespace: needs root and iproute2), and three VMs: `db`
//! (raw root, qcow2 data) and `web` (qcow2 root), stopped, and `live` (qcow2 root, raw data)
//! running under a `qemu-storage-daemon` with a QMP monitor and NBD exports through which
//! the test writes as its guest. Everything is a real process.
//!
//! **Operations** (weighted random choice, one at a time): guest writes (qemu-io, random
//! bytes, patterns and zeroes), backups (full when the VM has no group on that store yet,
//! else incremental; live for `live`), restores to new raw or qcow2 files, reverts of a
//! stopped VM, recovers of a group to the other store, deletes, SyncVmBackup, store GC,
//! store Verify, and volume snapshot groups of a stopped VM (taken, then deleted).
//!
//! **Faults.** With the fault probability, an operation runs as a background task; after a
//! random delay (the operation is throttled to last a second or two) one fault is injected:
//! SIGKILL of the agent (started again on the same data directory and address), SIGKILL of
//! a store (started again after a random pause), a graceful restart of a store (SIGTERM),
//! SIGKILL of the `qemu-storage-daemon` (started again on the same images once the
//! operation ended), or a network fault between the agent and the stores: the stores run
//! in a network namespace of their own, joined to the agent's by one veth link, which is
//! throttled by a `tc tbf` queue until the operation ends (4 Mbit/s with a 300 ms queue:
//! slow; 2 Mbit/s with a 2 ms queue: lossy), or goes down for 0.2 to 3 s. A backup or
//! recover that failed is then retried with the same request.
//!
//! **Invariants**, checked after every fault, every few operations and at the end:
//! - every group whose backup (or recover) returned success is visible on its stores, and
//!   restores bit-identical to the BLAKE3 digests of its volumes taken when it started;
//!   a restore killed midway leaves no target, or a complete and correct one; a revert
//!   leaves each volume as it was or as the group holds it;
//! - every group a store shows is one the test started (a failed call may still have
//!   committed; such a group is then held to the same rules);
//! - no file in a store's `tmp/`, every store's Verify finds nothing bad;
//! - the agent's catalog (QueryVolumeBackup: group uuids per storage) equals what the stores
//!   hold, and SyncVmBackup leaves it unchanged;
//! - no `*.vmbackup-*` file (restore partial or live overlay) and no `*-snap-*` overlay
//!   anywhere under the test's directory, no vmbackup overlay node in the running VM's block
//!   graph; after a snapshot group is deleted, the VM is registered on its own files again
//!   and its data is unchanged;
//! - no store session open once jobs ended (one per store is tolerated for the store's
//!   300 s session TTL after the agent was SIGKILLed mid-job: nothing can close it);
//! - a retried backup or recover succeeds and re-sends no chunk the store already has
//!   (`chunks_already_present` of the store's counters does not move);
//! - every operation without a fault succeeds, and none hangs.
//!
//! A violation is recorded (with the operation log), the world is repaired if it must be
//! (SyncVmBackup, merging a leftover overlay offline) and the campaign goes on; the test
//! fails at the end if any was found, printing the seed and the log.
//!
//! **Scale** (environment): `VMBACKUP_SOAK_SEED` (default 21), `VMBACKUP_SOAK_OPS`
//! (default 80), `VMBACKUP_SOAK_FAULT_PCT` (percent of operations that get a fault, default
//! 35), `VMBACKUP_SOAK_MINUTES` (stop early after that long; 0: no limit). The last line is
//! a JSON summary. A long run: `VMBACKUP_SOAK_OPS=600 cargo test --release --test soak --
//! --nocapture` (after `cargo build --release --workspace --bins`). The seed fixes the
//! sequence of operations, faults and delays; where a fault lands inside an operation
//! still depends on timing.
//!
//! **Layout**: this file runs the loop; `soak/world.rs` builds and tracks the world,
//! `soak/ops.rs` has the operations and their faults, `soak/invariants.rs` the checks.

mod common;
#[path = "soak/invariants.rs"]
mod invariants;
#[path = "soak/ops.rs"]
mod ops;
#[path = "soak/world.rs"]
mod world;

use std::time::{Duration, Instant};

use invariants::check;
use ops::one_op;
use world::{Settings, setup};

#[tokio::test(flavor = "multi_thread")]
async fn fault_campaign_loses_nothing_committed() {
    let settings = Settings::from_env();
    let (seed, ops, minutes) = (settings.seed, settings.ops, settings.minutes);
    let started = Instant::now();
    let mut w = setup(settings).await;
    w.log(format!("campaign: seed {seed}, {ops} operations, fault probability {}%", w.settings.fault_pct));
    let mut since_check = 0;
    for n in 1..=ops {
        if minutes > 0 && started.elapsed() > Duration::from_secs(minutes * 60) {
            w.log(format!("time is up after {} operations", n - 1));
            break;
        }
        w.seq = n;
        let faults_before: u64 = w.stats.faults.values().sum();
        one_op(&mut w).await;
        since_check += 1;
        let faulted = w.stats.faults.values().sum::<u64>() > faults_before;
        if faulted || since_check >= 8 {
            check(&mut w, false).await;
            since_check = 0;
        }
    }
    w.seq += 1;
    check(&mut w, true).await;

    let s = &w.stats;
    let summary = serde_json::json!({
        "seed": seed,
        "operations": s.ops.values().sum::<u64>(),
        "operations_by_kind": s.ops,
        "faults": s.faults.values().sum::<u64>(),
        "faults_by_kind": s.faults,
        "faults_mid_operation": s.faults_mid_op,
        "operation_errors": s.op_errors,
        "retries": s.retries,
        "committed_despite_error": s.committed_despite_error,
        "groups_live_at_end": w.groups.len(),
        "invariant_checks": s.checks,
        "restores_checked": s.restores_checked,
        "violations": s.violations.len(),
        "seconds": started.elapsed().as_secs(),
    });
    if !s.violations.is_empty() {
        eprintln!("operation log (seed {seed}):\n{}", s.log.join("\n"));
        eprintln!("violations:\n{}", s.violations.join("\n"));
    }
    println!("SOAK_SUMMARY {summary}");
    assert!(s.violations.is_empty(), "seed {seed}: {} invariant violations: {:#?}", s.violations.len(), s.violations);
}
