//! PruneVmBackup: a retention policy ([`crate::retention`]) applied to the groups on one
//! backup storage, each VM (root volume) a series of its own. What the policy does not
//! keep is deleted through DeleteVmBackup's own path (Permissive: a group a job uses stays),
//! one group at a time, and the stores reclaim the chunks with their next GC. Retention
//! locks are honoured twice: the group's `backup::retentionLock` tag keeps it in the
//! decision, and a store that still refuses the delete leaves it in place with its error.

use super::Ops;
use crate::catalog::now_millis;
use crate::catalog::query::{MAX_LIMIT, QueryParams};
use crate::error::{AgentError, Result};
use crate::retention::{self, Candidate, Decision, Policy};
use crate::validate::DeleteMode;

/// A validated PruneVmBackup.
#[derive(Debug, Clone)]
pub struct Prune {
    /// The backup storage.
    pub storage: String,
    /// Only these root volumes' groups (all when empty).
    pub roots: Vec<String>,
    /// The policy; None: the storage's configured one.
    pub policy: Option<Policy>,
    /// Report only.
    pub dry_run: bool,
}

/// What became of one group.
#[derive(Debug)]
pub struct PruneOutcome {
    /// The policy's decision.
    pub decision: Decision,
    /// Deleted by this call.
    pub deleted: bool,
    /// Why a delete the policy asked for failed.
    pub error: Option<AgentError>,
}

/// The retention lock a group's system tags ask for, as Unix milliseconds.
fn locked_until(created: i64, system_tags: &[String]) -> Option<i64> {
    let tags = crate::tags::parse(system_tags).ok()?;
    let seconds = i64::try_from(tags.retention_lock?).ok()?;
    Some(created.saturating_add(seconds.saturating_mul(1000)))
}

impl Ops {
    /// PruneVmBackup: decides on every group of the storage (per VM) and, unless a dry run,
    /// deletes those the policy does not keep.
    pub async fn prune_backups(&self, r: Prune) -> Result<Vec<PruneOutcome>> {
        let storage = self.registry.require(&r.storage).await.map_err(|e| e.with_field("backupStorageUuid"))?;
        let policy = match r.policy {
            Some(p) => p,
            None => self.live.retention_of(&storage.uuid, &storage.name).ok_or_else(|| {
                AgentError::invalid(
                    "policy",
                    format!(
                        "no policy given, and backup storage {} has none configured ([retention.\"{}\"])",
                        storage.uuid, storage.name
                    ),
                )
            })?,
        };
        if policy.is_empty() {
            return Err(AgentError::invalid("policy", "it keeps nothing; give at least one keep rule"));
        }
        let mut candidates = Vec::new();
        let mut start = 0i32;
        loop {
            let q = QueryParams {
                conditions: vec![format!("backupStorageUuid={}", storage.uuid), "type=Root".into()],
                limit: Some(i32::try_from(MAX_LIMIT).unwrap_or(i32::MAX)),
                start: Some(start),
                sort_by: "createDate".into(),
                ..Default::default()
            };
            let page = self.catalog().run(move |c| c.query_volume_backups(&q)).await?.rows;
            let n = page.len();
            for b in page {
                if r.roots.is_empty() || r.roots.contains(&b.volume_uuid) {
                    candidates.push(Candidate {
                        locked_until: locked_until(b.create_date, &b.system_tags),
                        id: b.group_uuid,
                        series: b.volume_uuid,
                        time: b.create_date,
                    });
                }
            }
            if i64::try_from(n).unwrap_or(0) < MAX_LIMIT {
                break;
            }
            start = start.saturating_add(i32::try_from(n).unwrap_or(i32::MAX));
        }
        let decisions = retention::decide(&policy, &candidates, now_millis());
        let mut out = Vec::with_capacity(decisions.len());
        for decision in decisions {
            let (mut deleted, mut error) = (false, None);
            if !decision.keep && !r.dry_run {
                match self
                    .delete_backup(&decision.id, std::slice::from_ref(&storage.uuid), DeleteMode::Permissive)
                    .await
                {
                    Ok(()) => deleted = true,
                    Err(e) => {
                        tracing::warn!(group = %decision.id, error = %e, "prune: the group stays");
                        error = Some(e);
                    }
                }
            }
            out.push(PruneOutcome { decision, deleted, error });
        }
        let removed = out.iter().filter(|o| o.deleted).count();
        tracing::info!(storage = %storage.uuid, groups = out.len(), removed, dry_run = r.dry_run, "retention policy applied");
        Ok(out)
    }
}
