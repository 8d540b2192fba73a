//! Write sessions. A client opens one for a backup or recover and keeps it alive; while it
//! is open, every chunk it was told is present or uploaded is protected from GC, because GC
//! sweeps only chunks last touched before the start of the oldest open session (minus a
//! margin), and those chunks were touched after the session started.
//!
//! Sessions live in memory: a store restart ends them all, and clients open new ones (their
//! next MissingChunks touches what they reuse again).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::error::{ErrorKind, Result, StoreError};

/// Default lifetime of a session without KeepAlive.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Longest lifetime a client may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// Who opened a session: the principal that alone may use it, and the namespace its
/// commits go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOwner {
    /// Principal name.
    pub principal: String,
    /// Namespace of its groups.
    pub namespace: String,
}

impl SessionOwner {
    /// The owner of sessions opened inside the store's own process.
    pub fn local() -> Self {
        Self { principal: "local".into(), namespace: crate::group_meta::DEFAULT_NAMESPACE.into() }
    }
}

#[derive(Debug, Clone)]
struct Session {
    client: String,
    owner: SessionOwner,
    started: SystemTime,
    last_seen: Instant,
    ttl: Duration,
}

/// The open sessions of a store.
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        let mut map = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        map.retain(|id, s| {
            let alive = now.duration_since(s.last_seen) <= s.ttl;
            if !alive {
                tracing::info!(session = %id, client = %s.client, "session expired");
            }
            alive
        });
        map
    }

    /// Opens a session; `ttl` zero means [`DEFAULT_TTL`]. Returns its id and TTL.
    pub fn open(&self, client: &str, owner: SessionOwner, ttl: Duration) -> (String, Duration) {
        let ttl = if ttl.is_zero() { DEFAULT_TTL } else { ttl.min(MAX_TTL) };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let s = Session {
            client: client.chars().take(256).collect(),
            owner,
            started: SystemTime::now(),
            last_seen: Instant::now(),
            ttl,
        };
        self.lock().insert(id.clone(), s);
        (id, ttl)
    }

    /// Checks a session is open and renews it; returns its owner.
    pub fn touch(&self, id: &str) -> Result<SessionOwner> {
        match self.lock().get_mut(id) {
            Some(s) => {
                s.last_seen = Instant::now();
                Ok(s.owner.clone())
            }
            None => Err(StoreError::new(
                ErrorKind::NotFound,
                format!("session {id:?} is not open (closed, expired or the store restarted)"),
            )),
        }
    }

    /// The owner of an open session (None if it is not open), without renewing it.
    pub fn owner(&self, id: &str) -> Option<SessionOwner> {
        self.lock().get(id).map(|s| s.owner.clone())
    }

    /// Closes a session (unknown is fine: closing is idempotent).
    pub fn close(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Start of the oldest open session.
    pub fn oldest_start(&self) -> Option<SystemTime> {
        self.lock().values().map(|s| s.started).min()
    }

    /// Number of open sessions.
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_open_renew_expire_and_close() {
        let s = Sessions::default();
        let (a, ttl) = s.open("host-a", SessionOwner::local(), Duration::ZERO);
        assert_eq!(ttl, DEFAULT_TTL);
        let (b, _) = s.open("host-b", SessionOwner::local(), Duration::from_millis(30));
        assert!(s.oldest_start().is_some());
        s.touch(&a).expect("open");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(s.touch(&b).expect_err("expired").kind(), ErrorKind::NotFound);
        assert_eq!(s.count(), 1);
        s.close(&a);
        s.close(&a);
        assert!(s.oldest_start().is_none());
    }
}
