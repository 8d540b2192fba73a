//! Session records in the bucket (`sessions/<id>.json`) and their journals
//! (`journal/<id>/…`): what lets any server serve any session and lets GC, on any server,
//! see every live session. The in-memory side is [`crate::sessions::Sessions`].

use std::time::{Duration, SystemTime};

use super::{Shared, from_unix_ms, unix_ms};
use crate::error::{ErrorKind, Result, StoreError};
use crate::sessions::SessionOwner;

/// A session as recorded in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionRecord {
    /// The client's description of itself.
    pub client: String,
    /// Principal that opened it.
    pub principal: String,
    /// Namespace of its commits.
    pub namespace: String,
    /// The server that opened it.
    pub server: String,
    /// Start, unix milliseconds.
    pub started_ms: u64,
    /// TTL in milliseconds.
    pub ttl_ms: u64,
    /// Expiry, unix milliseconds: the session may not be used after it.
    pub expires_ms: u64,
}

impl SessionRecord {
    /// A new record for a session opened now.
    pub fn new(client: &str, owner: &SessionOwner, server: &str, started: SystemTime, ttl: Duration) -> Self {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        Self {
            client: client.to_string(),
            principal: owner.principal.clone(),
            namespace: owner.namespace.clone(),
            server: server.to_string(),
            started_ms: unix_ms(started),
            ttl_ms,
            expires_ms: unix_ms(started).saturating_add(ttl_ms),
        }
    }

    /// Start.
    pub fn started(&self) -> SystemTime {
        from_unix_ms(self.started_ms)
    }

    /// Expiry.
    pub fn expires(&self) -> SystemTime {
        from_unix_ms(self.expires_ms)
    }

    /// TTL.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    /// Owner.
    pub fn owner(&self) -> SessionOwner {
        SessionOwner { principal: self.principal.clone(), namespace: self.namespace.clone() }
    }
}

pub(crate) fn check_session_id(id: &str) -> Result<()> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(StoreError::new(
            ErrorKind::NotFound,
            format!("session {} is not open (not a session id)", crate::error::shorten(id)),
        ))
    }
}

impl Shared {
    /// This server's id.
    pub fn server_id(&self) -> &str {
        &self.server
    }

    /// Writes (or renews) a session's record.
    pub fn write_session(&self, id: &str, rec: &SessionRecord) -> Result<()> {
        check_session_id(id)?;
        let json = serde_json::to_vec(rec).map_err(|e| StoreError::new(ErrorKind::Io, e.to_string()))?;
        self.objects.put(&format!("sessions/{id}.json"), json)
    }

    /// A session's record, if it exists and parses.
    pub fn load_session(&self, id: &str) -> Result<Option<SessionRecord>> {
        check_session_id(id)?;
        let key = format!("sessions/{id}.json");
        match self.objects.get(&key) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::new(ErrorKind::Corrupt, format!("{key}: {e}"))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes a closed session's record, then its journal.
    pub fn delete_session(&self, id: &str) -> Result<()> {
        check_session_id(id)?;
        self.objects.delete(&format!("sessions/{id}.json"))?;
        let journal: Vec<String> = self.objects.list(&format!("journal/{id}/"))?.into_iter().map(|j| j.key).collect();
        self.objects.delete_many(&journal)
    }

    /// Every session record in the bucket, by id (unreadable ones are logged and skipped:
    /// they cannot be used either).
    pub fn all_sessions(&self) -> Result<Vec<(String, SessionRecord)>> {
        let mut out = Vec::new();
        for l in self.objects.list("sessions/")? {
            let Some(id) = l.key.strip_prefix("sessions/").and_then(|k| k.strip_suffix(".json")) else { continue };
            match self.load_session(id) {
                Ok(Some(r)) => out.push((id.to_string(), r)),
                Ok(None) => {}
                Err(e) => tracing::warn!(key = %l.key, error = %e, "unreadable session record"),
            }
        }
        Ok(out)
    }

    /// Whether a record counts as live for GC: its expiry plus the margin is ahead.
    pub fn is_live(&self, rec: &SessionRecord, now: SystemTime) -> bool {
        rec.expires() + self.margin() > now
    }

    /// Start of the oldest live session of any server.
    pub fn oldest_live_start(&self) -> Result<Option<SystemTime>> {
        let now = SystemTime::now();
        Ok(self.all_sessions()?.iter().filter(|(_, r)| self.is_live(r, now)).map(|(_, r)| r.started()).min())
    }

    /// Every digest in every journal in the bucket (live or not: keeping more is safe).
    pub fn journaled(&self) -> Result<std::collections::HashSet<vmbackup_proto::Digest>> {
        let mut out = std::collections::HashSet::new();
        for j in self.objects.list("journal/")? {
            match self.objects.get(&j.key) {
                Ok(bytes) => out.extend(super::decode_digests(&bytes, &j.key)?),
                // Its session closed meanwhile: closed after its commit, which the second
                // manifest listing sees.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Removes records and journals of sessions dead for longer than the margin (their
    /// servers died), and journals without a record older than the margin. Returns how
    /// many sessions went.
    pub fn remove_dead_sessions(&self) -> Result<u64> {
        let now = SystemTime::now();
        let mut removed = 0;
        let records = self.all_sessions()?;
        for (id, r) in &records {
            if !self.is_live(r, now) {
                tracing::info!(session = %id, server = %r.server, client = %r.client, "removing a dead session's record");
                self.delete_session(id)?;
                removed += 1;
            }
        }
        let margin = self.margin();
        for j in self.objects.list("journal/")? {
            let Some(id) = j.key.strip_prefix("journal/").and_then(|k| k.split('/').next()) else { continue };
            if !records.iter().any(|(r, _)| r == id) && j.modified + margin < now {
                self.objects.delete(&j.key)?;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_serialise_with_camel_case_and_refuse_unknown_fields() {
        let owner = SessionOwner::local();
        let r = SessionRecord::new("host", &owner, "srv", SystemTime::UNIX_EPOCH, Duration::from_secs(300));
        let json = serde_json::to_string(&r).expect("json");
        assert!(json.contains("\"expiresMs\":300000") && json.contains("\"startedMs\":0"), "{json}");
        assert_eq!(serde_json::from_str::<SessionRecord>(&json).expect("parses"), r);
        assert!(serde_json::from_str::<SessionRecord>(&json.replace("\"client\"", "\"x\":1,\"client\"")).is_err());
        assert!(check_session_id("../../x").is_err());
    }
}
