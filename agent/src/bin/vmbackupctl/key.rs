//! `vmbackupctl key ...`: encryption key files, on this host, without the agent. A key file
//! holds one random master key wrapped by passphrases (Argon2id, format in
//! `vmbackup_proto::keyfile`); the agent unlocks it with the passphrase file named beside
//! it in `[keys.<name>]`. Changing a passphrase rewraps the same master key, so every
//! backup stays restorable and nothing is re-encrypted.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use vmbackup_agent::keys::passphrase_of;
use vmbackup_proto::keyfile::{KdfCost, KeyFile, ROLE_PASSPHRASE, ROLE_RECOVERY, Zeroizing, generate_master};

#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Create a key file with a new random master key.
    Create {
        /// The key file to write (mode 0600; refused if it exists).
        #[arg(long)]
        file: PathBuf,
        /// File whose first line is the passphrase the agent unlocks the key with.
        #[arg(long)]
        passphrase_file: PathBuf,
        /// File whose first line is a second, recovery passphrase (keep it offline).
        #[arg(long)]
        recovery_passphrase_file: Option<PathBuf>,
    },
    /// Set (add or replace) a passphrase; the master key, and every backup, stay as they are.
    ChangePassphrase {
        /// The key file.
        #[arg(long)]
        file: PathBuf,
        /// File holding a passphrase that unlocks the key now.
        #[arg(long)]
        passphrase_file: PathBuf,
        /// Which passphrase that is: `passphrase` or `recovery`.
        #[arg(long, default_value = ROLE_PASSPHRASE)]
        unlock_role: String,
        /// File holding the new passphrase.
        #[arg(long)]
        new_passphrase_file: PathBuf,
        /// Which passphrase to set: `passphrase` or `recovery`.
        #[arg(long, default_value = ROLE_PASSPHRASE)]
        role: String,
    },
    /// Show a key file's id and passphrase wraps (never the key).
    Show {
        /// The key file.
        #[arg(long)]
        file: PathBuf,
    },
}

/// A passphrase from its file; both copies are zeroed when dropped.
fn read_passphrase(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let bytes =
        Zeroizing::new(std::fs::read(path).with_context(|| format!("reading passphrase file {}", path.display()))?);
    let p = Zeroizing::new(passphrase_of(&bytes).to_vec());
    anyhow::ensure!(!p.is_empty(), "passphrase file {} is empty", path.display());
    Ok(p)
}

fn read_key_file(path: &Path) -> anyhow::Result<KeyFile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading key file {}", path.display()))?;
    KeyFile::decode(&bytes).with_context(|| format!("key file {}", path.display()))
}

/// Writes `bytes` to `path` durably with mode 0600: a new file with `create_new`, or a
/// temporary file renamed over the old one, then the directory synced.
fn write_private(path: &Path, bytes: &[u8], replace: bool) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let target = if replace { path.with_extension("tmp") } else { path.to_path_buf() };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)
        .with_context(|| format!("creating {}", target.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", target.display()))?;
    if replace {
        std::fs::rename(&target, path).with_context(|| format!("replacing {}", path.display()))?;
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn print(json: bool, f: &KeyFile, path: &Path) -> anyhow::Result<()> {
    if json {
        let wraps: Vec<_> = f
            .wraps
            .iter()
            .map(|w| {
                serde_json::json!({"role": w.role, "kdf": w.kdf, "memoryKib": w.memory_kib,
                                   "iterations": w.iterations, "parallelism": w.parallelism})
            })
            .collect();
        let v = serde_json::json!({"file": path.display().to_string(), "keyId": f.key_id,
                                   "created": f.created, "wraps": wraps});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("key file  {}", path.display());
        println!("key id    {}", f.key_id);
        for w in &f.wraps {
            println!(
                "wrap      {} ({}, {} KiB, {} passes, {} lanes)",
                w.role, w.kdf, w.memory_kib, w.iterations, w.parallelism
            );
        }
    }
    Ok(())
}

/// Runs a `key` command.
pub(crate) fn run(cmd: &KeyCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Create { file, passphrase_file, recovery_passphrase_file } => {
            anyhow::ensure!(!file.exists(), "{} exists; a key file is never overwritten", file.display());
            let master = generate_master()?;
            let mut kf = KeyFile::new(&master, now_millis(), &read_passphrase(passphrase_file)?, KdfCost::default())?;
            if let Some(r) = recovery_passphrase_file {
                kf.set_wrap(&master, ROLE_RECOVERY, &read_passphrase(r)?, KdfCost::default())?;
            }
            write_private(file, &kf.encode()?, false)?;
            print(json, &kf, file)
        }
        KeyCommand::ChangePassphrase { file, passphrase_file, unlock_role, new_passphrase_file, role } => {
            let mut kf = read_key_file(file)?;
            let master = kf.unlock(unlock_role, &read_passphrase(passphrase_file)?)?;
            kf.set_wrap(&master, role, &read_passphrase(new_passphrase_file)?, KdfCost::default())?;
            write_private(file, &kf.encode()?, true)?;
            print(json, &kf, file)
        }
        KeyCommand::Show { file } => print(json, &read_key_file(file)?, file),
    }
}
