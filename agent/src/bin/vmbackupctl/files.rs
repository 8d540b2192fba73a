//! `vmbackupctl backup files list | get`: file-level restore. The agent reads the volume
//! backup's filesystem from the backup storage (nothing is restored or mounted); `get`
//! writes one file, or a directory tree, with its modes and modification times.
//!
//! Names come from a filesystem inside a backup, which is untrusted: every path is checked
//! to stay beneath the output directory (no `..`, no empty or `.` component), files are
//! created new (never through an existing link), and symlinks are made last, so no link
//! made here can redirect a later write.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tonic::transport::Channel;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::vm_backup_service_client::VmBackupServiceClient;

use crate::{Auth, rpc_error};

/// Which filesystem of which volume backup.
#[derive(Debug, Args)]
pub(crate) struct Source {
    /// Backup group uuid.
    group: String,
    /// Volume uuid.
    #[arg(long)]
    volume: String,
    /// Backup storage to read from (default: the first holding the group).
    #[arg(long, default_value = "")]
    storage: String,
    /// Partition number (0: a filesystem on the whole disk; default: the only filesystem).
    #[arg(long)]
    partition: Option<u32>,
    /// An LVM logical volume, `vg/lv`.
    #[arg(long = "lv", default_value = "")]
    logical_volume: String,
}

impl Source {
    fn message(&self) -> pb::VmBackupFileSource {
        pb::VmBackupFileSource {
            group_uuid: self.group.clone(),
            volume_uuid: self.volume.clone(),
            backup_storage_uuid: self.storage.clone(),
            partition: self.partition,
            logical_volume: self.logical_volume.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum FilesCommand {
    /// List a directory (or one file) inside a volume backup.
    List {
        #[command(flatten)]
        source: Source,
        /// Absolute path inside the filesystem.
        #[arg(long, default_value = "/")]
        path: String,
        /// Descend into subdirectories.
        #[arg(long, short)]
        recursive: bool,
    },
    /// Extract a file, or a directory with everything beneath it.
    Get {
        #[command(flatten)]
        source: Source,
        /// Absolute path inside the filesystem.
        #[arg(long)]
        path: String,
        /// Where to write: a new file for a file, a directory for a directory.
        #[arg(long)]
        out: PathBuf,
    },
}

type Client = VmBackupServiceClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

async fn list(
    c: &mut Client,
    source: &Source,
    path: &str,
    recursive: bool,
) -> anyhow::Result<Vec<pb::VmBackupFileInventory>> {
    let req = pb::ListVmBackupFilesRequest { source: Some(source.message()), path: path.into(), recursive, limit: 0 };
    let mut stream = c.list_vm_backup_files(req).await.map_err(rpc_error)?.into_inner();
    let mut out = Vec::new();
    while let Some(e) = stream.message().await.map_err(rpc_error)? {
        out.push(e);
    }
    Ok(out)
}

fn when(e: &pb::VmBackupFileInventory) -> String {
    let t = e.modified.unwrap_or_default();
    chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        .map_or_else(|| t.seconds.to_string(), |d| d.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// Runs one `backup files` command.
pub(crate) async fn run(cmd: FilesCommand, channel: Channel, auth: Auth, json: bool) -> anyhow::Result<()> {
    let mut c = VmBackupServiceClient::with_interceptor(channel, auth);
    match cmd {
        FilesCommand::List { source, path, recursive } => {
            let entries = list(&mut c, &source, &path, recursive).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(());
            }
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(["MODE", "UID", "GID", "SIZE", "MODIFIED (UTC)", "PATH"]);
            for e in &entries {
                let name = match e.link_target.as_str() {
                    "" => e.path.clone(),
                    target => format!("{} -> {target}", e.path),
                };
                t.add_row([
                    format!("{:o}", e.mode),
                    e.uid.to_string(),
                    e.gid.to_string(),
                    e.size.to_string(),
                    when(e),
                    name,
                ]);
            }
            println!("{t}");
        }
        FilesCommand::Get { source, path, out } => {
            let entries = list(&mut c, &source, &path, true).await?;
            let written = match entries.as_slice() {
                [one] if one.path == path && one.r#type != "directory" => {
                    fetch(&mut c, &source, one, &out).await?;
                    1
                }
                _ => tree(&mut c, &source, &path, &entries, &out).await?,
            };
            if json {
                println!("{}", serde_json::json!({ "written": written, "out": out.display().to_string() }));
            } else {
                println!("{written} entries written to {}", out.display());
            }
        }
    }
    Ok(())
}

/// `entry.path` relative to `base`, checked to stay beneath it.
fn relative(base: &str, entry: &str) -> anyhow::Result<PathBuf> {
    let base = base.trim_end_matches('/');
    let rest = entry
        .strip_prefix(base)
        .filter(|r| r.starts_with('/'))
        .with_context(|| format!("the agent sent {entry:?}, which is not beneath {base:?}"))?;
    let rel = Path::new(rest.trim_start_matches('/'));
    if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("refusing {entry:?}: its name would leave the output directory");
    }
    Ok(rel.to_path_buf())
}

/// Extracts every entry beneath `base` into `out` (directories first, symlinks last).
async fn tree(
    c: &mut Client,
    source: &Source,
    base: &str,
    entries: &[pb::VmBackupFileInventory],
    out: &Path,
) -> anyhow::Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = 0;
    for pass in ["directory", "file", "symlink"] {
        for e in entries.iter().filter(|e| e.r#type == pass) {
            let dst = out.join(relative(base, &e.path)?);
            match pass {
                "directory" => {
                    std::fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
                }
                "file" => fetch(c, source, e, &dst).await?,
                _ => std::os::unix::fs::symlink(&e.link_target, &dst)
                    .with_context(|| format!("creating the symlink {}", dst.display()))?,
            }
            written += 1;
        }
    }
    // Directory modes and times last: writing into a directory changes its mtime.
    for e in entries.iter().filter(|e| e.r#type == "directory").rev() {
        finish(&out.join(relative(base, &e.path)?), e)?;
    }
    Ok(written)
}

/// Writes one regular file to `dst` (created new), then its mode and mtime.
async fn fetch(c: &mut Client, source: &Source, e: &pb::VmBackupFileInventory, dst: &Path) -> anyhow::Result<()> {
    let req = pb::ReadVmBackupFileRequest { source: Some(source.message()), path: e.path.clone() };
    let mut stream = c.read_vm_backup_file(req).await.map_err(rpc_error)?.into_inner();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o600)
        .open(dst)
        .with_context(|| format!("creating {} (it must not exist)", dst.display()))?;
    let mut got = 0u64;
    while let Some(piece) = stream.message().await.map_err(rpc_error)? {
        got += piece.data.len() as u64;
        f.write_all(&piece.data).with_context(|| format!("writing {}", dst.display()))?;
    }
    if got != e.size {
        bail!("{}: received {got} bytes of {}", e.path, e.size);
    }
    f.sync_all().with_context(|| format!("syncing {}", dst.display()))?;
    drop(f);
    finish(dst, e)
}

/// Sets `dst`'s permission bits and modification time from `e`.
fn finish(dst: &Path, e: &pb::VmBackupFileInventory) -> anyhow::Result<()> {
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(e.mode & 0o7777))
        .with_context(|| format!("setting the mode of {}", dst.display()))?;
    let t = e.modified.unwrap_or_default();
    let mtime = nix::sys::time::TimeSpec::new(t.seconds, i64::from(t.nanos));
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &nix::sys::time::TimeSpec::UTIME_OMIT,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("setting the time of {}", dst.display()))?;
    Ok(())
}
