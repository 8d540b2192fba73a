//! Finding the running VM that holds a volume, for a CreateVmBackup whose VM was never
//! registered (ZStack's clients send only `rootVolumeUuid`).
//!
//! The agent looks at the QMP sockets in configured directories (`volumes.qmp_dirs`, each
//! searched two levels deep, as libvirt keeps one directory per domain), asks each QEMU for
//! its disks (`query-block`) and its identity (`query-uuid`, `query-name`), and names each
//! disk's volume by the configured patterns (`volumes.volume_path_patterns`, e.g.
//! `/vols/*/disk-{uuid}.img`: `*` is any run of characters within one path component,
//! `{uuid}` the volume uuid), else by ZStack's install-path convention:
//! `.../vol-<uuid>/<uuid>.<ext>`, or a file named `<uuid>.<ext>` (the uuid as 32 hex
//! digits or dashed). Disks without a volume uuid in their path (an ISO, a config drive)
//! are not volumes of the VM.
//!
//! A QMP monitor serves one client at a time: a socket that another client holds (libvirt
//! keeps its own monitor) does not answer within [`PROBE_TIMEOUT`] and is passed over. Give
//! such VMs a second monitor (`-qmp unix:<dir>/<vm>.sock,server=on,wait=off`) in a
//! configured directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::qmp::Qmp;
use crate::volume::VolumeFormat;

/// How long one socket may take to greet and answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many sockets are probed per search.
pub const MAX_SOCKETS: usize = 512;

/// A running VM as QEMU describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundVm {
    /// The VM's uuid (QEMU's `-uuid`, 32 hex digits), when it has one.
    pub uuid: Option<String>,
    /// QEMU's `-name`, when set.
    pub name: Option<String>,
    /// The QMP socket that answered.
    pub socket: PathBuf,
    /// Its disks that are volumes, in QEMU's device order.
    pub disks: Vec<FoundDisk>,
}

/// One disk of a [`FoundVm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundDisk {
    /// Volume uuid from the install path.
    pub volume_uuid: String,
    /// The image file QEMU has open.
    pub path: String,
    /// Its format.
    pub format: VolumeFormat,
}

fn as_uuid(s: &str) -> Option<String> {
    let u = uuid::Uuid::try_parse(s).ok()?;
    (!u.is_nil()).then(|| u.simple().to_string())
}

/// The volume uuid in `path` by the first of `patterns` that matches it, else by ZStack's
/// convention ([`volume_uuid_of`]).
pub fn volume_uuid_by(patterns: &[String], path: &str) -> Option<String> {
    patterns.iter().find_map(|p| match_pattern(p, path)).or_else(|| volume_uuid_of(path))
}

/// The uuid `{uuid}` stands for when `path` matches `pattern`, component by component.
pub fn match_pattern(pattern: &str, path: &str) -> Option<String> {
    let (pat, got): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), path.split('/').collect());
    if pat.len() != got.len() {
        return None;
    }
    let mut found = None;
    for (p, g) in pat.iter().zip(&got) {
        if !match_component(p.as_bytes(), g.as_bytes(), &mut found) {
            return None;
        }
    }
    found.and_then(|u: String| as_uuid(&u))
}

fn match_component(p: &[u8], g: &[u8], found: &mut Option<String>) -> bool {
    if let Some(rest) = p.strip_prefix(b"{uuid}") {
        // 32 hex digits, or 36 with dashes.
        for len in [32, 36] {
            if g.len() >= len
                && g[..len].iter().all(|b| b.is_ascii_hexdigit() || (len == 36 && *b == b'-'))
                && match_component(rest, &g[len..], found)
            {
                *found = Some(String::from_utf8_lossy(&g[..len]).into_owned());
                return true;
            }
        }
        return false;
    }
    match p.first() {
        None => g.is_empty(),
        Some(b'*') => (0..=g.len()).any(|i| match_component(&p[1..], &g[i..], found)),
        Some(c) => g.first() == Some(c) && match_component(&p[1..], &g[1..], found),
    }
}

/// The volume uuid of an install path by ZStack's convention, or None.
pub fn volume_uuid_of(path: &str) -> Option<String> {
    let p = Path::new(path);
    let stem = p.file_stem().and_then(|s| s.to_str()).and_then(as_uuid);
    let dir = p
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|d| d.to_str())
        .and_then(|d| d.strip_prefix("vol-"))
        .and_then(as_uuid);
    match (dir, stem) {
        (Some(d), _) => Some(d),
        (None, s) => s,
    }
}

/// The unix sockets in `dirs` and their subdirectories (one level), sorted.
pub fn sockets(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in dirs {
        collect(d, 1, &mut out);
    }
    out.sort();
    out.truncate(MAX_SOCKETS);
    out
}

fn collect(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_socket() {
            out.push(e.path());
        } else if t.is_dir() && depth > 0 {
            collect(&e.path(), depth - 1, out);
        }
    }
}

/// The disks of a `query-block` reply that are volumes (named by `patterns`, else by
/// ZStack's convention).
pub fn disks_of(query_block: &Value, patterns: &[String]) -> Vec<FoundDisk> {
    let Some(devices) = query_block.as_array() else { return Vec::new() };
    devices
        .iter()
        .filter_map(|d| {
            let inserted = d.get("inserted")?;
            let path = inserted.get("file")?.as_str()?.to_string();
            let format = match inserted.get("drv")?.as_str()? {
                "qcow2" => VolumeFormat::Qcow2,
                "raw" => VolumeFormat::Raw,
                _ => return None,
            };
            Some(FoundDisk { volume_uuid: volume_uuid_by(patterns, &path)?, path, format })
        })
        .collect()
}

async fn probe(socket: &Path, patterns: &[String]) -> Option<FoundVm> {
    let run = async {
        let qmp = Qmp::connect(socket, PROBE_TIMEOUT).await.ok()?;
        let blocks = qmp.execute("query-block", Value::Null).await.ok()?;
        let uuid = qmp.execute("query-uuid", Value::Null).await.ok().and_then(|v| v["UUID"].as_str().and_then(as_uuid));
        let name =
            qmp.execute("query-name", Value::Null).await.ok().and_then(|v| v["name"].as_str().map(str::to_string));
        Some(FoundVm { uuid, name, socket: socket.to_path_buf(), disks: disks_of(&blocks, patterns) })
    };
    tokio::time::timeout(PROBE_TIMEOUT * 3, run).await.ok().flatten()
}

/// The running VM, under `dirs`, that has `volume` as one of its disks.
pub async fn find(dirs: &[PathBuf], patterns: &[String], volume: &str) -> Option<FoundVm> {
    let dirs = dirs.to_vec();
    let candidates = tokio::task::spawn_blocking(move || sockets(&dirs)).await.unwrap_or_default();
    for socket in candidates {
        match probe(&socket, patterns).await {
            Some(vm) if vm.disks.iter().any(|d| d.volume_uuid == volume) => return Some(vm),
            Some(_) => {}
            None => tracing::debug!(socket = %socket.display(), "QMP socket did not answer; passed over"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_uuids_come_from_zstack_install_paths() {
        let u = "2ae6b881bb1239cd907d48993e86a2e8";
        assert_eq!(
            volume_uuid_of(&format!("/zstack_ps/rootVolumes/acct-36c27e8f/vol-{u}/{u}.qcow2")).as_deref(),
            Some(u)
        );
        assert_eq!(volume_uuid_of(&format!("/images/{u}.raw")).as_deref(), Some(u));
        assert_eq!(
            volume_uuid_of("/images/2ae6b881-bb12-39cd-907d-48993e86a2e8.qcow2").as_deref(),
            Some(u),
            "dashed uuids count too"
        );
        assert_eq!(volume_uuid_of("/iso/debian.iso"), None);
        assert_eq!(volume_uuid_of("/images/00000000000000000000000000000000.qcow2"), None);
    }

    #[test]
    fn configured_patterns_name_volumes_first() {
        let u = "2ae6b881bb1239cd907d48993e86a2e8";
        let pats = vec!["/vols/*/disk-{uuid}.img".to_string()];
        assert_eq!(volume_uuid_by(&pats, &format!("/vols/pool1/disk-{u}.img")).as_deref(), Some(u));
        assert_eq!(match_pattern(&pats[0], &format!("/vols/a/b/disk-{u}.img")), None, "* stays in one component");
        assert_eq!(match_pattern(&pats[0], "/vols/pool1/disk-xyz.img"), None);
        assert_eq!(match_pattern("/v/{uuid}", "/v/2ae6b881-bb12-39cd-907d-48993e86a2e8").as_deref(), Some(u), "dashed");
        assert_eq!(volume_uuid_by(&pats, &format!("/ps/vol-{u}/{u}.qcow2")).as_deref(), Some(u), "convention");
    }

    #[test]
    fn query_block_disks_are_the_ones_with_volume_paths() {
        let u = "2ae6b881bb1239cd907d48993e86a2e8";
        let reply = serde_json::json!([
            {"device": "", "qdev": "disk0", "inserted": {"file": format!("/ps/vol-{u}/{u}.qcow2"), "drv": "qcow2"}},
            {"device": "cd0", "removable": true},
            {"device": "", "inserted": {"file": "/iso/x.iso", "drv": "raw"}},
        ]);
        let disks = disks_of(&reply, &[]);
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].volume_uuid, u);
        assert_eq!(disks[0].format, VolumeFormat::Qcow2);
    }
}
