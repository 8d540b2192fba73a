//! The credentials the agent presents to its backup storages: an API token per storage,
//! kept in `<data_dir>/credentials/<backup-storage-uuid>.token` (directory 0700, file
//! 0600, written atomically), never in the catalog, never returned by Query, never logged
//! ([`Secret`]'s `Debug` and `Display` print `<redacted>`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{AgentError, ErrorKind, Result};

/// A secret string that does not print itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A store API token as given in a request: printable ASCII without spaces, at most 512
/// bytes (it travels as gRPC metadata).
pub fn check_token(field: &'static str, token: &str) -> Result<Option<Secret>> {
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() > 512 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AgentError::invalid(field, "must be printable ASCII without spaces, at most 512 bytes"));
    }
    Ok(Some(Secret::new(token.to_string())))
}

/// The credential files of one agent.
#[derive(Debug, Clone)]
pub struct Credentials {
    dir: PathBuf,
}

impl Credentials {
    /// Credentials kept under `data_dir/credentials`.
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join("credentials") }
    }

    fn path(&self, storage_uuid: &str) -> Result<PathBuf> {
        if storage_uuid.is_empty() || !storage_uuid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AgentError::new(ErrorKind::Internal, "a backup storage uuid is not hex"));
        }
        Ok(self.dir.join(format!("{storage_uuid}.token")))
    }

    /// The token of a backup storage, if one was given.
    pub fn token(&self, storage_uuid: &str) -> Result<Option<Secret>> {
        let p = self.path(storage_uuid)?;
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some(Secret::new(t.trim().to_string()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AgentError::new(ErrorKind::Internal, format!("reading {}", p.display())).with_source(e)),
        }
    }

    /// Keeps `token` for a backup storage (mode 0600, atomically, durably).
    pub fn save(&self, storage_uuid: &str, token: &Secret) -> Result<()> {
        let p = self.path(storage_uuid)?;
        let io = |what: &str, e: std::io::Error| AgentError::new(ErrorKind::Internal, what.to_string()).with_source(e);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| io(&format!("creating {}", self.dir.display()), e))?;
        let tmp = self.dir.join(format!(".{storage_uuid}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io(&format!("creating {}", tmp.display()), e))?;
        f.write_all(token.expose().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io(&format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &p).map_err(|e| io(&format!("renaming {}", p.display()), e))?;
        vmbackup_store::durable::sync_dir(&self.dir).map_err(|e| io(&format!("syncing {}", self.dir.display()), e))
    }

    /// Forgets the token of a backup storage (none is fine).
    pub fn remove(&self, storage_uuid: &str) -> Result<()> {
        let p = self.path(storage_uuid)?;
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::new(ErrorKind::Internal, format!("removing {}", p.display())).with_source(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_private_and_never_printed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Credentials::new(dir.path());
        let s = Secret::new("vmbt_secret".into());
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        c.save("ab12", &s).expect("save");
        assert_eq!(c.token("ab12").expect("read"), Some(s));
        let mode = |p: PathBuf| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(dir.path().join("credentials/ab12.token")), 0o600);
        assert_eq!(mode(dir.path().join("credentials")), 0o700);
        c.remove("ab12").expect("remove");
        assert_eq!(c.token("ab12").expect("read"), None);
        assert!(c.token("../x").is_err());
        assert!(check_token("token", "has space").is_err());
    }
}
