//! `vmbackupctl store …`: talks to an Image Storage server directly.

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tonic::transport::Channel;

use crate::{StoreCommand, bytes};

pub(crate) async fn run_store(
    url: &str,
    token_file: &std::path::Path,
    command: &StoreCommand,
    json: bool,
) -> anyhow::Result<()> {
    use vmbackup_proto::store::v1 as spb;
    let token = std::fs::read_to_string(token_file).with_context(|| {
        format!("reading the store token {} (pass --token-file or VMBACKUP_STORE_TOKEN_FILE)", token_file.display())
    })?;
    let header: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token.trim()).parse().context("the store token is not printable ASCII")?;
    let channel = Channel::from_shared(url.to_string())
        .with_context(|| format!("{url:?} is not an endpoint URL"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the store at {url}"))?;
    let bearer = move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", header.clone());
        Ok(r)
    };
    let mut c = spb::image_store_client::ImageStoreClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(64 << 20);
    let e = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
    match command {
        StoreCommand::Status => {
            let r = c.status(spb::StatusRequest {}).await.map_err(e)?.into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            let counters = r.counters.unwrap_or_default();
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header([
                "YOU ARE",
                "STORE UUID",
                "BACKEND",
                "GROUPS",
                "SESSIONS",
                "CHUNK SIZE",
                "TOTAL",
                "AVAILABLE",
                "STORED",
                "CHUNKS UPLOADED",
                "VERSION",
            ]);
            t.add_row([
                format!("{} ({}; namespace {})", r.principal, r.roles.join(","), r.namespace),
                r.store_uuid,
                r.backend,
                r.group_count.to_string(),
                r.open_sessions.to_string(),
                bytes(i64::from(r.chunk_size)),
                capacity(r.total_capacity),
                capacity(r.available_capacity),
                r.objects.map_or_else(
                    || "-".to_string(),
                    |o| format!("{} chunks, {}; {} indexes", o.chunks, bytes(to_i64(o.chunk_bytes)), o.indexes),
                ),
                counters.chunks_uploaded.to_string(),
                r.server_version,
            ]);
            println!("{t}");
        }
        StoreCommand::Groups => {
            let r = c.list_groups(spb::ListGroupsRequest {}).await.map_err(e)?.into_inner();
            let manifests: Vec<serde_json::Value> = r
                .groups
                .iter()
                .map(|g| {
                    serde_json::from_slice::<serde_json::Value>(&g.manifest).map(|m| {
                        serde_json::json!({
                            "damaged": g.damaged,
                            "namespace": g.namespace,
                            "retainUntil": g.retain_until,
                            "manifest": m,
                        })
                    })
                })
                .collect::<Result<_, _>>()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&manifests)?);
                return Ok(());
            }
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(["GROUP UUID", "NAME", "VM", "VOLUMES", "NAMESPACE", "LOCKED UNTIL", "DAMAGED"]);
            for (g, info) in manifests.iter().zip(&r.groups) {
                let m = &g["manifest"];
                t.add_row([
                    m["groupUuid"].as_str().unwrap_or_default().to_string(),
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["vmUuid"].as_str().unwrap_or_default().to_string(),
                    m["volumes"].as_array().map_or(0, Vec::len).to_string(),
                    info.namespace.clone(),
                    if info.retain_until == 0 { "-".to_string() } else { info.retain_until.to_string() },
                    g["damaged"].to_string(),
                ]);
            }
            println!("{t}");
        }
        StoreCommand::Gc { safety_margin_seconds } => {
            let bar = spinner(json, "garbage collection");
            let r = c
                .garbage_collect(spb::GarbageCollectRequest { safety_margin_seconds: *safety_margin_seconds })
                .await
                .map_err(e)?
                .into_inner();
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "removed {} chunks ({}), kept {} ({}), removed {} orphan indexes in {:.1}s",
                    r.chunks_removed,
                    bytes(i64::try_from(r.bytes_removed).unwrap_or(i64::MAX)),
                    r.chunks_kept,
                    bytes(i64::try_from(r.bytes_kept).unwrap_or(i64::MAX)),
                    r.indexes_removed,
                    r.seconds
                );
            }
        }
        StoreCommand::Delete { group } => {
            c.delete_group(spb::DeleteGroupRequest { group_uuid: group.clone() }).await.map_err(e)?;
            println!("deleted group {group} (its chunks go at the next gc)");
        }
        StoreCommand::Retain { group, until } => {
            let g = c
                .set_retention(spb::SetRetentionRequest { group_uuid: group.clone(), retain_until: *until })
                .await
                .map_err(e)?
                .into_inner();
            println!("group {group} is locked until {} (unix seconds)", g.retain_until);
        }
        StoreCommand::Verify { groups } => {
            let bar = spinner(json, "verifying chunks");
            let r = c.verify(spb::VerifyRequest { group_uuids: groups.clone() }).await.map_err(e)?.into_inner();
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "checked {} chunks in {:.1}s: {} bad, {} damaged groups",
                    r.chunks_checked,
                    r.seconds,
                    r.bad_chunks.len(),
                    r.damaged_groups.len()
                );
                for g in &r.damaged_groups {
                    println!("damaged group {g}");
                }
            }
            if !r.bad_chunks.is_empty() || !r.damaged_groups.is_empty() {
                std::process::exit(2);
            }
        }
    }
    Ok(())
}

/// A spinner with the elapsed time while the store works (hidden with --json or when
/// stderr is not a terminal): GC and verify run on the store and report only at the end.
fn spinner(json: bool, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A capacity; an object store reports none ("unbounded").
fn capacity(n: u64) -> String {
    if n == u64::MAX { "unbounded".into() } else { bytes(to_i64(n)) }
}
