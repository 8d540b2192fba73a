//! Encryption keys of backup storages: `[keys.<name>]` in the configuration names a key
//! file and the file holding its passphrase; a storage added with the system tag
//! `backup::encryption::key::<name>` seals everything it writes with that key (formats in
//! [`vmbackup_proto::seal`] and [`vmbackup_proto::keyfile`]).
//!
//! Keys are unlocked on first use and kept in memory (Argon2id takes a quarter of a second;
//! a backup opens its storage many times). Both files must be owned by the agent's user and
//! unreadable to group and others, as ssh does for private keys: a passphrase others can
//! read protects nothing. Neither the passphrase nor the key is ever logged or returned;
//! only the key id is. The passphrase and master key are zeroed as soon as the chunk key is
//! derived, and the chunk key's name key when it is dropped (on reload).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use vmbackup_proto::keyfile::{KeyFile, ROLE_PASSPHRASE, Zeroizing};
use vmbackup_proto::seal::ChunkKey;

use crate::error::{AgentError, ErrorKind, Result};

/// One configured key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key file (`vmbackupctl key create`), mode 0600.
    pub file: PathBuf,
    /// A file whose first line is the passphrase, mode 0600.
    pub passphrase_file: PathBuf,
}

/// The configured keys, unlocked on demand.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    configured: Arc<Mutex<BTreeMap<String, KeyConfig>>>,
    unlocked: Arc<Mutex<HashMap<String, Unlocked>>>,
}

/// A key unlocked from these files.
type Unlocked = (KeyConfig, Arc<ChunkKey>);

/// Whether `name` can name a key: 1 to 64 of letters, digits, `.`, `_`, `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Reads a secret file after checking that only its owner may read it.
fn read_private(path: &Path, what: &str) -> Result<Vec<u8>> {
    let fail = |m: String| AgentError::new(ErrorKind::FailedPrecondition, m);
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("{what} {}: {e}", path.display())))?;
    if meta.mode() & 0o077 != 0 {
        return Err(fail(format!(
            "{what} {} has mode {:o}: group and others must have no access (chmod 600)",
            path.display(),
            meta.mode() & 0o777
        )));
    }
    if meta.len() > 1 << 20 {
        return Err(fail(format!("{what} {} is larger than 1 MiB", path.display())));
    }
    std::fs::read(path).map_err(|e| fail(format!("{what} {}: {e}", path.display())))
}

/// The passphrase in a passphrase file: its first line, without the line end.
pub fn passphrase_of(bytes: &[u8]) -> &[u8] {
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    line.strip_suffix(b"\r").unwrap_or(line)
}

impl Keys {
    /// The keys of a configuration.
    pub fn new(configured: BTreeMap<String, KeyConfig>) -> Keys {
        Keys { configured: Arc::new(Mutex::new(configured)), unlocked: Arc::default() }
    }

    /// Takes a reloaded configuration. Every key is unlocked again on its next use, so a
    /// key or passphrase file replaced in place takes effect too.
    pub fn reload(&self, configured: BTreeMap<String, KeyConfig>) {
        *self.configured.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = configured;
        self.unlocked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    /// Key `name`, unlocked.
    pub fn get(&self, name: &str) -> Result<Arc<ChunkKey>> {
        let config =
            self.configured.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned().ok_or_else(
                || {
                    AgentError::new(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "encryption key {name:?} is not configured: add [keys.{name}] to the agent's configuration"
                        ),
                    )
                },
            )?;
        if let Some((c, key)) = self.unlocked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(name)
            && *c == config
        {
            return Ok(key.clone());
        }
        let key = Arc::new(unlock(name, &config)?);
        tracing::info!(key = %name, key_id = %key.id(), "encryption key unlocked");
        self.unlocked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_string(), (config, key.clone()));
        Ok(key)
    }
}

fn unlock(name: &str, config: &KeyConfig) -> Result<ChunkKey> {
    let file = read_private(&config.file, &format!("key file of key {name:?}"))?;
    let file = KeyFile::decode(&file)
        .map_err(|e| AgentError::new(ErrorKind::FailedPrecondition, format!("{}: {e}", config.file.display())))?;
    let pass = Zeroizing::new(read_private(&config.passphrase_file, &format!("passphrase file of key {name:?}"))?);
    let master = file.unlock(ROLE_PASSPHRASE, passphrase_of(&pass)).map_err(|e| {
        AgentError::new(ErrorKind::FailedPrecondition, format!("key {name:?} ({}): {e}", config.file.display()))
    })?;
    Ok(ChunkKey::new(&master))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_passphrase_lines() {
        assert!(valid_name("site-a_1.key"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(65)));
        assert_eq!(passphrase_of(b"secret\n"), b"secret");
        assert_eq!(passphrase_of(b"secret\r\nmore"), b"secret");
        assert_eq!(passphrase_of(b"secret"), b"secret");
    }

    #[test]
    fn files_others_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let master = [5u8; 32];
        let cost = vmbackup_proto::keyfile::KdfCost { memory_kib: 64, iterations: 1, parallelism: 1 };
        let kf = KeyFile::new(&master, 1, b"pw", cost).expect("key file");
        let file = dir.path().join("k.json");
        let pass = dir.path().join("k.pass");
        std::fs::write(&file, kf.encode().expect("encode")).expect("write");
        std::fs::write(&pass, "pw\n").expect("write");
        for p in [&file, &pass] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let keys = Keys::new(BTreeMap::from([(
            "k".to_string(),
            KeyConfig { file: file.clone(), passphrase_file: pass.clone() },
        )]));
        assert_eq!(keys.get("k").expect("unlocks").id(), ChunkKey::new(&master).id());
        let e = keys.get("other").expect_err("unknown");
        assert!(e.to_string().contains("[keys.other]"), "{e}");
        // A key file replaced in place is read again after a reload, not served from memory.
        let other = KeyFile::new(&[6u8; 32], 1, b"pw", cost).expect("key file");
        std::fs::write(&file, other.encode().expect("encode")).expect("write");
        assert_eq!(keys.get("k").expect("cached").id(), ChunkKey::new(&master).id());
        keys.reload(BTreeMap::from([(
            "k".to_string(),
            KeyConfig { file: file.clone(), passphrase_file: pass.clone() },
        )]));
        assert_eq!(keys.get("k").expect("reloaded").id(), ChunkKey::new(&[6u8; 32]).id());
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let fresh = Keys::new(BTreeMap::from([("k".to_string(), KeyConfig { file, passphrase_file: pass })]));
        let e = fresh.get("k").expect_err("readable passphrase");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
