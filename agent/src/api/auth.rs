//! Sessions: every call except health and reflection must carry metadata
//! `authorization: OAuth <session-uuid>` naming a configured session.
//!
//! With no session configured, the agent makes one on first start and keeps it in
//! `<data-dir>/session` (mode 0600), where vmbackupctl on the same host finds it.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use tonic::{Request, Status};

/// Name of the session file under the data directory.
pub const SESSION_FILE: &str = "session";

/// The set of accepted session uuids; cheap to clone, shared by every call.
#[derive(Debug, Clone, Default)]
pub struct Sessions(Arc<RwLock<HashSet<String>>>);

impl Sessions {
    /// Sessions from the configuration.
    pub fn new(sessions: impl IntoIterator<Item = String>) -> Self {
        Self(Arc::new(RwLock::new(sessions.into_iter().collect())))
    }

    /// Whether `token` is a valid session.
    pub fn accepts(&self, token: &str) -> bool {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains(token)
    }

    /// Whether no session is configured.
    pub fn is_empty(&self) -> bool {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).is_empty()
    }

    /// Replaces the accepted sessions (a reload).
    /// Adds a session.
    pub fn replace(&self, tokens: impl IntoIterator<Item = String>) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = tokens.into_iter().collect();
    }

    /// Accepts one more session.
    pub fn insert(&self, token: String) {
        self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(token);
    }

    /// Interceptor checking the `authorization` metadata of each call.
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = request.metadata().get("authorization") else {
            return Err(unauthenticated(
                "missing authorization metadata; send \"authorization: OAuth <session-uuid>\"",
            ));
        };
        let value = value.to_str().map_err(|_| unauthenticated("authorization metadata is not ASCII"))?;
        let token = value
            .strip_prefix("OAuth ")
            .ok_or_else(|| unauthenticated("authorization metadata must be \"OAuth <session-uuid>\""))?;
        if self.accepts(token.trim()) { Ok(request) } else { Err(unauthenticated("unknown session")) }
    }
}

fn unauthenticated(message: &str) -> Status {
    super::status(&crate::error::AgentError::new(crate::error::ErrorKind::Unauthenticated, message))
}

/// Reads the session file under `data_dir`, creating it with a new session (mode 0600) when
/// it does not exist. Returns the session uuid.
pub fn load_or_create_session_file(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(SESSION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    let tmp = data_dir.join(format!(".{SESSION_FILE}.tmp"));
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(token.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn session_file_is_private_and_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create_session_file(dir.path()).expect("create");
        let b = load_or_create_session_file(dir.path()).expect("reread");
        assert_eq!(a, b);
        let mode = std::fs::metadata(dir.path().join(SESSION_FILE)).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn interceptor_accepts_only_known_oauth_sessions() {
        let s = Sessions::new(["abc".to_string()]);
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", v.parse().expect("ascii"));
            r
        };
        assert!(s.check(with("OAuth abc")).is_ok());
        assert_eq!(s.check(with("OAuth abd")).expect_err("wrong").code(), tonic::Code::Unauthenticated);
        assert_eq!(s.check(with("Bearer abc")).expect_err("scheme").code(), tonic::Code::Unauthenticated);
        assert_eq!(s.check(Request::new(())).expect_err("missing").code(), tonic::Code::Unauthenticated);
    }
}
