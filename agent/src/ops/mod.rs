//! The agent's operations, one core under every API edge: backup, restore (new targets and
//! revert), recover, delete, sync, prune, snapshot groups and backup storages. An edge (gRPC today)
//! parses its request into the domain values here, calls one operation and renders the
//! result; nothing here knows a wire type.
//!
//! What the core owns beyond the engines in [`crate::backup`]: idempotency (resourceUuid),
//! caps on concurrent backups, jobs around long operations, and the one [`VolumeLocks`] set
//! that keeps overlapping operations off the same volume:
//!
//! | holds volume locks | on |
//! |---|---|
//! | CreateVmBackup | every volume of the VM, for the job |
//! | RestoreVmBackup with revert | every volume it writes over, for the job |
//! | CreateVolumeSnapshotGroup, DeleteVolumeSnapshotGroup | every volume of the VM, for the call |
//!
//! A second operation on a held volume is refused at once with an error naming the holder.
//!
//! Every path an operation reads, writes or records must lie under the volume roots; the
//! check ([`paths`]) comes before anything is opened.

pub mod backup;
pub mod export;
pub mod files;
mod live_restore;
mod locks;
mod paths;
pub mod prune;
pub mod restore;
pub mod snapshot_group;
mod vm;

use std::path::PathBuf;
use std::sync::Arc;

pub use locks::{VolumeLease, VolumeLocks};

use crate::catalog::CatalogHandle;
use crate::jobs::Jobs;
use crate::live::Live;
use crate::storage::registry::Registry;

/// The core: what every operation shares.
#[derive(Debug, Clone)]
pub struct Ops {
    registry: Registry,
    jobs: Jobs,
    live: Arc<Live>,
    runtime_dir: PathBuf,
    locks: VolumeLocks,
    exports: crate::export::Exports,
}

impl Ops {
    /// The core over the agent's storages, jobs and reloadable settings; `runtime_dir` is
    /// where the agent may create sockets and mount points (its data directory's `run/`).
    pub fn new(registry: Registry, jobs: Jobs, live: Arc<Live>, runtime_dir: PathBuf) -> Self {
        Self { registry, jobs, live, runtime_dir, locks: VolumeLocks::default(), exports: Default::default() }
    }

    /// Backup storages.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Running and past jobs.
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// The catalog.
    pub fn catalog(&self) -> &CatalogHandle {
        self.registry.catalog()
    }

    /// Running NBD exports of backups.
    pub fn exports(&self) -> &crate::export::Exports {
        &self.exports
    }

    /// Settings a reload changes.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }
}
