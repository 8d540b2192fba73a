//! Sessions: every call except health and reflection must carry metadata
//! `authorization: OAuth <session-uuid>` naming a configured session that has not expired.
//!
//! A configured session may carry an expiry (`{ id, expires }` in `sessions`); past it the
//! session is refused with UNAUTHENTICATED saying it expired, until a reload drops or
//! renews it. With no session configured, the agent makes one on first start and keeps it
//! in `<data-dir>/session` (mode 0600, never expires), where vmbackupctl on the same host
//! finds it.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tonic::{Request, Status};

use crate::config::{Session, format_rfc3339};

/// Name of the session file under the data directory.
pub const SESSION_FILE: &str = "session";

/// The accepted session uuids and their expiries; cheap to clone, shared by every call.
#[derive(Debug, Clone, Default)]
pub struct Sessions(Arc<RwLock<HashMap<String, Option<SystemTime>>>>);

/// Why a session is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not a configured session.
    Unknown,
    /// Configured, but its expiry has passed.
    Expired(SystemTime),
}

impl Sessions {
    /// Sessions from the configuration.
    pub fn new(sessions: impl IntoIterator<Item = Session>) -> Self {
        Self(Arc::new(RwLock::new(sessions.into_iter().map(|s| (s.id, s.expires)).collect())))
    }

    /// Whether `token` is a valid session at `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<(), Refused> {
        match self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(token) {
            None => Err(Refused::Unknown),
            Some(Some(expires)) if *expires <= now => Err(Refused::Expired(*expires)),
            Some(_) => Ok(()),
        }
    }

    /// Whether `token` is a valid session now.
    pub fn accepts(&self, token: &str) -> bool {
        self.verify(token, SystemTime::now()).is_ok()
    }

    /// Whether no session is configured.
    pub fn is_empty(&self) -> bool {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).is_empty()
    }

    /// Replaces the accepted sessions (a reload).
    pub fn replace(&self, sessions: impl IntoIterator<Item = Session>) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            sessions.into_iter().map(|s| (s.id, s.expires)).collect();
    }

    /// Accepts one more session, which never expires.
    pub fn insert(&self, token: String) {
        self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(token, None);
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
        match self.verify(token.trim(), SystemTime::now()) {
            Ok(()) => Ok(request),
            Err(Refused::Unknown) => Err(unauthenticated("unknown session")),
            Err(Refused::Expired(at)) => Err(unauthenticated(&format!("session expired at {}", format_rfc3339(at)))),
        }
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
        let s = Sessions::new([Session { id: "abc".into(), expires: None }]);
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

    #[test]
    fn an_expired_session_is_refused_and_says_so() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_798_761_600);
        let s = Sessions::new([Session { id: "abc".into(), expires: Some(at) }]);
        assert_eq!(s.verify("abc", at - std::time::Duration::from_secs(1)), Ok(()));
        assert_eq!(s.verify("abc", at), Err(Refused::Expired(at)));
        let past = Sessions::new([Session { id: "old".into(), expires: Some(SystemTime::UNIX_EPOCH) }]);
        let mut r = Request::new(());
        r.metadata_mut().insert("authorization", "OAuth old".parse().expect("ascii"));
        let e = past.check(r).expect_err("expired");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("session expired at 1970-01-01T00:00:00Z"), "{}", e.message());
    }
}
