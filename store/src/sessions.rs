//! Write sessions. A client opens one for a backup or recover and keeps it alive; while it
//! is open, every chunk it was told is present or uploaded is protected from GC, because GC
//! sweeps only chunks last touched before the start of the oldest open session (minus a
//! margin), and those chunks were touched after the session started.
//!
//! On a local store, sessions live in memory: a store restart ends them all, and clients
//! open new ones (their next MissingChunks touches what they reuse again). Over a shared
//! bucket ([`crate::shared`]) each is also a record in the bucket: renewed while in use,
//! adopted by any server that is asked about it, and never used past the expiry last
//! written there.
//!
//! Over a shared bucket a session also remembers, in this server's memory, the chunks it
//! *confirmed*: created by its uploads, or found present and journaled for it (at most
//! [`MAX_CONFIRMED`] per session). Until the session ends GC keeps every one of them (see
//! [`crate::shared`]), so its commit on this server need not look them up again; chunks it
//! confirmed on another server, or past the bound, are looked up as before.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use vmbackup_proto::Digest;

use crate::error::{ErrorKind, Result, StoreError};
use crate::shared::{SessionRecord, Shared};

/// Default lifetime of a session without KeepAlive.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Longest lifetime a client may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Shortest lifetime of a session recorded in a shared bucket (renewals cost a request).
pub const MIN_SHARED_TTL: Duration = Duration::from_secs(30);
/// Most confirmed chunks one session remembers (32 bytes each, about 3 MiB with the set's
/// own overhead; 256 GiB of new data at 4 MiB chunks).
pub const MAX_CONFIRMED: usize = 65_536;

/// Chunks a session confirmed on this server; shared by the clones of its entry.
type Confirmed = Arc<Mutex<HashSet<Digest>>>;

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
    /// Over a shared bucket: the expiry last written to its record; never used past it.
    recorded_until: Option<SystemTime>,
    /// Over a shared bucket: the chunks it confirmed on this server (see the module doc).
    confirmed: Confirmed,
}

impl Session {
    fn alive(&self, now: Instant, wall: SystemTime) -> bool {
        now.duration_since(self.last_seen) <= self.ttl && self.recorded_until.is_none_or(|t| wall < t)
    }

    fn record(&self, server: &str) -> SessionRecord {
        let mut r = SessionRecord::new(&self.client, &self.owner, server, self.started, self.ttl);
        r.expires_ms = crate::shared::unix_ms(SystemTime::now() + self.ttl);
        r
    }
}

/// The error for a session that is not open.
fn not_open(id: &str) -> StoreError {
    StoreError::new(
        ErrorKind::NotFound,
        format!("session {} is not open (closed, expired or the store restarted)", crate::error::shorten(id)),
    )
}

/// The open sessions of a store.
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
    shared: Option<Arc<Shared>>,
}

impl Sessions {
    /// Sessions recorded in a shared bucket.
    pub fn shared(shared: Arc<Shared>) -> Self {
        Self { open: Mutex::default(), shared: Some(shared) }
    }

    /// The shared-bucket protocol, when the store has one.
    pub fn shared_protocol(&self) -> Option<&Shared> {
        self.shared.as_deref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        let mut map = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (now, wall) = (Instant::now(), SystemTime::now());
        map.retain(|id, s| {
            let alive = s.alive(now, wall);
            if !alive {
                tracing::info!(session = %id, client = %s.client, "session expired");
            }
            alive
        });
        map
    }

    /// Opens a session; `ttl` zero means [`DEFAULT_TTL`]. Returns its id and TTL. Over a
    /// shared bucket its record is written before it is usable.
    pub fn open(&self, client: &str, owner: SessionOwner, ttl: Duration) -> Result<(String, Duration)> {
        let mut ttl = if ttl.is_zero() { DEFAULT_TTL } else { ttl.min(MAX_TTL) };
        if self.shared.is_some() {
            ttl = ttl.max(MIN_SHARED_TTL);
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut s = Session {
            client: client.chars().take(256).collect(),
            owner,
            started: SystemTime::now(),
            last_seen: Instant::now(),
            ttl,
            recorded_until: None,
            confirmed: Confirmed::default(),
        };
        if let Some(shared) = &self.shared {
            let rec = s.record(shared.server_id());
            shared.write_session(&id, &rec)?;
            s.recorded_until = Some(rec.expires());
        }
        self.lock().insert(id.clone(), s);
        Ok((id, ttl))
    }

    /// Checks a session is open and renews it; returns its owner. Over a shared bucket a
    /// session opened on another server is adopted from its record, and the record is
    /// renewed when less than two thirds of the TTL is left.
    pub fn touch(&self, id: &str) -> Result<SessionOwner> {
        let not_open = || not_open(id);
        let renew = {
            let mut map = self.lock();
            match map.get_mut(id) {
                Some(s) => {
                    s.last_seen = Instant::now();
                    let due = s
                        .recorded_until
                        .is_some_and(|t| t.duration_since(SystemTime::now()).unwrap_or_default() < s.ttl * 2 / 3);
                    if !due {
                        return Ok(s.owner.clone());
                    }
                    Some(s.clone())
                }
                None => None,
            }
        };
        let Some(shared) = &self.shared else { return Err(not_open()) };
        let (mut s, opened_on) = match renew {
            // A record deleted meanwhile means the session was closed on another server.
            Some(s) => match shared.load_session(id)? {
                Some(old) => (s, old.server),
                None => {
                    self.lock().remove(id);
                    return Err(not_open());
                }
            },
            None => {
                let rec = shared.load_session(id)?.ok_or_else(not_open)?;
                if rec.expires() <= SystemTime::now() {
                    return Err(not_open());
                }
                tracing::info!(session = %id, opened_on = %rec.server, "session adopted from the bucket");
                let s = Session {
                    client: rec.client.clone(),
                    owner: rec.owner(),
                    started: rec.started(),
                    last_seen: Instant::now(),
                    ttl: rec.ttl(),
                    recorded_until: Some(rec.expires()),
                    confirmed: Confirmed::default(),
                };
                (s, rec.server)
            }
        };
        let rec = s.record(&opened_on);
        shared.write_session(id, &rec)?;
        s.recorded_until = Some(rec.expires());
        let owner = s.owner.clone();
        self.lock().insert(id.to_string(), s);
        Ok(owner)
    }

    /// The owner of an open session (None if it is not open), without renewing it. Over a
    /// shared bucket a session unknown here is looked up in the bucket.
    pub fn owner(&self, id: &str) -> Result<Option<SessionOwner>> {
        if let Some(o) = self.lock().get(id).map(|s| s.owner.clone()) {
            return Ok(Some(o));
        }
        let Some(shared) = &self.shared else { return Ok(None) };
        if crate::shared::sessions::check_session_id(id).is_err() {
            return Ok(None);
        }
        Ok(shared.load_session(id)?.filter(|r| r.expires() > SystemTime::now()).map(|r| r.owner()))
    }

    /// Closes a session (unknown is fine: closing is idempotent); over a shared bucket its
    /// record and journal go too.
    pub fn close(&self, id: &str) -> Result<()> {
        self.lock().remove(id);
        match &self.shared {
            Some(shared) if crate::shared::sessions::check_session_id(id).is_ok() => shared.delete_session(id),
            _ => Ok(()),
        }
    }

    /// Over a shared bucket, remembers that open session `id` confirmed `digests` (see the
    /// module doc): the caller created them for it, or found them present and journaled
    /// them for it. Does nothing on a local store, for a session not open here, or past
    /// [`MAX_CONFIRMED`].
    pub fn confirm(&self, id: &str, digests: &[Digest]) {
        if self.shared.is_none() {
            return;
        }
        let Some(set) = self.lock().get(id).map(|s| s.confirmed.clone()) else { return };
        let mut set = set.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for d in digests {
            if set.len() >= MAX_CONFIRMED {
                break;
            }
            set.insert(*d);
        }
    }

    /// The chunks open session `id` confirmed on this server, for its commit (None on a
    /// local store or for a session not open here). Over a shared bucket it first reads the
    /// session's record (one request), whatever [`Self::touch`] last saw: a session closed
    /// through another server, or expired, is no longer live to GC, so it is refused as
    /// not open rather than trusted.
    pub fn confirmed(&self, id: &str) -> Result<Option<HashSet<Digest>>> {
        let Some(shared) = &self.shared else { return Ok(None) };
        let Some(set) = self.lock().get(id).map(|s| s.confirmed.clone()) else { return Ok(None) };
        match shared.load_session(id)? {
            Some(rec) if rec.expires() > SystemTime::now() => {
                Ok(Some(set.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()))
            }
            _ => {
                self.lock().remove(id);
                Err(not_open(id))
            }
        }
    }

    /// Start of the oldest open session (over a shared bucket: of any server).
    pub fn oldest_start(&self) -> Result<Option<SystemTime>> {
        let local = self.lock().values().map(|s| s.started).min();
        match &self.shared {
            Some(shared) => Ok(shared.oldest_live_start()?.into_iter().chain(local).min()),
            None => Ok(local),
        }
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
        let (a, ttl) = s.open("host-a", SessionOwner::local(), Duration::ZERO).expect("open");
        assert_eq!(ttl, DEFAULT_TTL);
        let (b, _) = s.open("host-b", SessionOwner::local(), Duration::from_millis(30)).expect("open");
        assert!(s.oldest_start().expect("local").is_some());
        s.touch(&a).expect("open");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(s.touch(&b).expect_err("expired").kind(), ErrorKind::NotFound);
        assert_eq!(s.count(), 1);
        s.close(&a).expect("close");
        s.close(&a).expect("closing twice is fine");
        assert!(s.oldest_start().expect("local").is_none());
    }
}
