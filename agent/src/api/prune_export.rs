//! PruneVmBackup and the NBD export calls at the gRPC edge: their requests parsed into
//! domain values, their results rendered (the service methods are in `vm_backup.rs`).

use vmbackup_proto::agent::v1 as pb;

use super::timestamp;
use crate::error::{AgentError, Result};
use crate::export::{Endpoint, ExportInfo};
use crate::ops::export::{DEFAULT_LIFETIME, ExportSpec, MAX_LIFETIME};
use crate::ops::prune::{Prune, PruneOutcome};
use crate::retention::Policy;
use crate::validate;

/// Most a keep rule may ask for.
const MAX_KEEP: u32 = 1_000_000;

pub(super) fn parse_prune(r: pb::PruneVmBackupRequest) -> Result<Prune> {
    let storage = validate::uuid("backupStorageUuid", &r.backup_storage_uuid)?;
    let roots = r.root_volume_uuids.iter().map(|u| validate::uuid("rootVolumeUuids", u)).collect::<Result<Vec<_>>>()?;
    let policy = r
        .policy
        .map(|p| {
            let rules = [p.keep_last, p.keep_hourly, p.keep_daily, p.keep_weekly, p.keep_monthly, p.keep_yearly];
            if let Some(n) = rules.iter().find(|n| **n > MAX_KEEP) {
                return Err(AgentError::invalid("policy", format!("keep {n} is above {MAX_KEEP}")));
            }
            Ok(Policy {
                last: p.keep_last,
                hourly: p.keep_hourly,
                daily: p.keep_daily,
                weekly: p.keep_weekly,
                monthly: p.keep_monthly,
                yearly: p.keep_yearly,
            })
        })
        .transpose()?;
    Ok(Prune { storage, roots, policy, dry_run: r.dry_run })
}

pub(super) fn parse_export(r: pb::ExportVmBackupRequest) -> Result<ExportSpec> {
    let group = validate::uuid("groupUuid", &r.group_uuid)?;
    let volume = validate::uuid("volumeUuid", &r.volume_uuid)?;
    let storage = validate::uuid("backupStorageUuid", &r.backup_storage_uuid)?;
    let name = match r.export_name.as_str() {
        "" => None,
        n if n.len() > 255 || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) => {
            return Err(AgentError::invalid(
                "exportName",
                format!("{} is not 1 to 255 of [A-Za-z0-9._-]", validate::shorten(n)),
            ));
        }
        n => Some(n.to_string()),
    };
    let lifetime = match r.lifetime_seconds {
        0 => DEFAULT_LIFETIME,
        s if u64::from(s) > MAX_LIFETIME.as_secs() => {
            return Err(AgentError::invalid(
                "lifetimeSeconds",
                format!("{s} s is longer than {} s", MAX_LIFETIME.as_secs()),
            ));
        }
        s => std::time::Duration::from_secs(u64::from(s)),
    };
    let listen =
        match r.listen_address.as_str() {
            "" => None,
            a => Some(a.parse::<std::net::SocketAddr>().map_err(|_| {
                AgentError::invalid("listenAddress", format!("{} is not ip:port", validate::shorten(a)))
            })?),
        };
    Ok(ExportSpec { group, volume, storage, name, lifetime, listen })
}

/// The inventory of a running export.
pub fn export_inventory(e: ExportInfo) -> pb::VmBackupExportInventory {
    pb::VmBackupExportInventory {
        uri: e.uri(),
        uuid: e.uuid,
        group_uuid: e.group_uuid,
        volume_uuid: e.volume_uuid,
        backup_storage_uuid: e.storage_uuid,
        export_name: e.name,
        socket_path: match &e.endpoint {
            Endpoint::Unix(s) => s.display().to_string(),
            Endpoint::Tcp(_) => String::new(),
        },
        tcp_address: match &e.endpoint {
            Endpoint::Tcp(a) => a.to_string(),
            Endpoint::Unix(_) => String::new(),
        },
        size: i64::try_from(e.size).unwrap_or(i64::MAX),
        create_date: timestamp(e.created),
        expire_date: timestamp(e.expires),
    }
}

pub(super) fn prune_decision(o: PruneOutcome) -> pb::PruneDecision {
    pb::PruneDecision {
        group_uuid: o.decision.id,
        root_volume_uuid: o.decision.series,
        create_date: timestamp(o.decision.time),
        keep: o.decision.keep,
        reasons: o.decision.reasons,
        deleted: o.deleted,
        error: o.error.as_ref().map(super::error_code),
    }
}
