//! The catalog at scale: 100,000 volume backups (25,000 groups of 4 volumes, 500 VMs, 3
//! storages, a year of dates, tags on every record) in a real SQLite file, then the queries
//! a control plane makes, each run 200 times: p50, p99 and max in milliseconds. Reported,
//! never asserted: `cargo bench -p vmbackup-agent --bench catalog_scale`.

#![allow(missing_docs)]

use std::time::Instant;

use vmbackup_agent::catalog::Catalog;
use vmbackup_agent::catalog::query::QueryParams;
use vmbackup_agent::catalog::volume_backup::{StorageRef, VolumeBackupRecord};
use vmbackup_agent::model::{BackupStatus, VolumeKind};

const GROUPS: usize = 25_000;
const VOLUMES_PER_GROUP: usize = 4;
const VMS: usize = 500;
const RUNS: usize = 200;
const DAY_MS: i64 = 86_400_000;
const START_MS: i64 = 1_764_547_200_000;

fn uuid(kind: u8, n: usize) -> String {
    format!("{kind:02x}{n:030x}")
}

fn record(g: usize, v: usize) -> VolumeBackupRecord {
    let vm = g % VMS;
    let when = START_MS + i64::try_from(g).expect("fits") * (365 * DAY_MS / i64::try_from(GROUPS).expect("fits"));
    let storage = uuid(3, g % 3);
    let name = if g.is_multiple_of(7) { format!("weekly-{g}-{v}") } else { format!("nightly-{g}-{v}") };
    VolumeBackupRecord {
        uuid: uuid(1, g * VOLUMES_PER_GROUP + v),
        group_uuid: uuid(2, g),
        volume_uuid: uuid(4, vm * VOLUMES_PER_GROUP + v),
        name,
        description: None,
        kind: if v == 0 { VolumeKind::Root } else { VolumeKind::Data },
        state: "Enabled".into(),
        status: BackupStatus::Ready,
        size: i64::try_from((g % 97 + 1) << 30).expect("fits"),
        metadata: "{}".into(),
        create_date: when,
        last_op_date: when,
        refs: vec![StorageRef {
            backup_storage_uuid: storage,
            install_path: format!("{}.vidx", uuid(1, g * VOLUMES_PER_GROUP + v)),
            status: BackupStatus::Ready,
            create_date: when,
            last_op_date: when,
        }],
        system_tags: vec![format!("vm::{}", uuid(5, vm))],
        user_tags: if g.is_multiple_of(10) { vec!["tier::gold".into()] } else { vec![] },
    }
}

/// The `per_mille`/1000 quantile of `sorted` (nearest rank).
fn percentile(sorted: &[f64], per_mille: usize) -> f64 {
    let i = (sorted.len() - 1) * per_mille / 1000;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let catalog = Catalog::open(&dir.path().join("catalog.db")).expect("catalog");
    let t = Instant::now();
    for g in 0..GROUPS {
        let group: Vec<VolumeBackupRecord> = (0..VOLUMES_PER_GROUP).map(|v| record(g, v)).collect();
        catalog.insert_volume_backups(&group).expect("insert");
    }
    println!(
        "inserted {} volume backups in {} groups: {:.1} s (one transaction per group, as backups commit)",
        GROUPS * VOLUMES_PER_GROUP,
        GROUPS,
        t.elapsed().as_secs_f64()
    );
    let q = |conditions: &[&str], sort: &str, limit: i32, count: bool| QueryParams {
        conditions: conditions.iter().map(|c| (*c).to_string()).collect(),
        limit: Some(limit),
        start: None,
        count,
        sort_by: sort.trim_start_matches(['+', '-']).to_string(),
        sort_direction: if sort.starts_with('-') { "desc".into() } else { "asc".into() },
        reply_with_count: false,
    };
    let month_ago = (START_MS + 335 * DAY_MS).to_string();
    let cases: Vec<(&str, QueryParams)> = vec![
        (
            "one volume's backups, newest first, 20",
            q(&[&format!("volumeUuid={}", uuid(4, 17))], "-createDate", 20, false),
        ),
        ("one group", q(&[&format!("groupUuid={}", uuid(2, 12_345))], "", 10, false)),
        (
            "last month on one storage, by size, 100",
            q(&[&format!("createDate>{month_ago}"), &format!("backupStorageUuid={}", uuid(3, 1))], "-size", 100, false),
        ),
        ("name like %weekly%, 50", q(&["name~=%weekly-2%"], "-createDate", 50, false)),
        ("user tag tier::gold, count", q(&["userTags=tier::gold"], "", 1000, true)),
        ("everything, newest 1000", q(&[], "-createDate", 1000, false)),
    ];
    println!("| query | rows | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (name, params) in cases {
        let mut times = Vec::with_capacity(RUNS);
        let mut rows = 0;
        for _ in 0..RUNS {
            let t = Instant::now();
            let r = catalog.query_volume_backups(&params).expect("query");
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            rows = r.total.map_or(r.rows.len() as i64, |n| n);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {name} | {rows} | {:.2} | {:.2} | {:.2} |",
            percentile(&times, 500),
            percentile(&times, 990),
            times[times.len() - 1]
        );
    }
}
