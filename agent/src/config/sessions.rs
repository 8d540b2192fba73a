//! Session entries of the agent's configuration: a plain uuid (never expires, as before),
//! or `{ id = "<uuid>", expires = 2027-01-01T00:00:00Z }` with an RFC 3339 instant (a TOML
//! date-time, or the same text quoted). Parsed here so a bad date fails the config load
//! (and a reload) with the session named, never a call later.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

/// One configured session.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SessionEntry {
    /// A session uuid that never expires.
    Plain(String),
    /// A session uuid with an expiry.
    Expiring(ExpiringSession),
}

/// `{ id = "<uuid>", expires = <RFC 3339 date-time> }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpiringSession {
    /// The session uuid callers send.
    pub id: String,
    /// When it stops being accepted.
    pub expires: Instant,
}

/// An RFC 3339 instant, written as a TOML date-time or as a string.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Instant {
    /// `expires = 2027-01-01T00:00:00Z`
    Toml(toml::value::Datetime),
    /// `expires = "2027-01-01T00:00:00Z"`
    Text(String),
}

/// A session the agent accepts: its uuid and, if it has one, its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The uuid callers send.
    pub id: String,
    /// None: never expires.
    pub expires: Option<SystemTime>,
}

impl SessionEntry {
    /// The session, its expiry parsed; an error names the session and the bad value.
    pub fn parse(&self) -> Result<Session, String> {
        match self {
            SessionEntry::Plain(id) => Ok(Session { id: id.trim().to_string(), expires: None }),
            SessionEntry::Expiring(s) => {
                let text = match &s.expires {
                    Instant::Toml(d) => d.to_string(),
                    Instant::Text(t) => t.clone(),
                };
                let at = parse_rfc3339(&text).ok_or_else(|| {
                    format!(
                        "session {:?}: expires = {text:?} is not an RFC 3339 date-time with an offset \
                         (like 2027-01-01T00:00:00Z)",
                        s.id
                    )
                })?;
                Ok(Session { id: s.id.trim().to_string(), expires: Some(at) })
            }
        }
    }
}

/// An RFC 3339 date-time with an offset (`2027-01-01T00:00:00Z`, `...T08:00:00+08:00`) as
/// an instant; None when malformed or before 1970.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let ts: vmbackup_proto::Timestamp = serde_json::from_value(serde_json::Value::String(text.to_string())).ok()?;
    let secs = u64::try_from(ts.seconds).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, u32::try_from(ts.nanos).ok()?))
}

/// `YYYY-MM-DDTHH:MM:SSZ` of an instant (whole seconds, UTC).
pub fn format_rfc3339(t: SystemTime) -> String {
    let seconds = i64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())).unwrap_or(0);
    let ts = vmbackup_proto::Timestamp { seconds, nanos: 0 };
    let text = serde_json::to_value(ts).ok().and_then(|v| v.as_str().map(str::to_string));
    let text = text.unwrap_or_else(|| format!("{seconds} s after 1970"));
    text.strip_suffix("+00:00").map_or(text.clone(), |t| format!("{t}Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(t: SystemTime) -> u64 {
        t.duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_secs()
    }

    #[test]
    fn rfc3339_instants() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z").map(secs), Some(0));
        for t in ["1970-01-01T00:00:00Z", "2024-02-29T23:59:59Z", "2027-01-01T00:00:00Z", "2100-03-01T12:00:00Z"] {
            assert_eq!(format_rfc3339(parse_rfc3339(t).expect("valid")), t);
        }
        assert_eq!(parse_rfc3339("2027-01-01T00:00:00Z").map(secs), Some(1_798_761_600));
        assert_eq!(parse_rfc3339("2027-01-01T08:00:00+08:00").map(secs), Some(1_798_761_600));
        assert_eq!(parse_rfc3339("2024-02-29T12:30:15.5-01:30").map(secs), Some(1_709_215_215));
        for bad in ["2027-01-01", "2027-13-01T00:00:00Z", "2023-02-29T00:00:00Z", "2027-01-01T00:00:00", "x"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn plain_and_expiring_entries() {
        #[derive(Deserialize)]
        struct C {
            sessions: Vec<SessionEntry>,
        }
        let c: C = toml::from_str(
            "sessions = [\"a\", { id = \"b\", expires = 2027-01-01T00:00:00Z }, \
             { id = \"c\", expires = \"2027-01-01T00:00:00Z\" }]",
        )
        .expect("parses");
        let s: Vec<Session> = c.sessions.iter().map(|e| e.parse().expect("valid")).collect();
        assert_eq!(s[0], Session { id: "a".into(), expires: None });
        assert_eq!(s[1].expires.map(secs), Some(1_798_761_600));
        assert_eq!(s[1].expires, s[2].expires);
        let bad: C = toml::from_str("sessions = [{ id = \"d\", expires = \"soon\" }]").expect("parses");
        let e = bad.sessions[0].parse().expect_err("bad date");
        assert!(e.contains("\"d\"") && e.contains("soon"), "{e}");
        assert!(toml::from_str::<C>("sessions = [{ id = \"d\", expire = \"x\" }]").is_err());
    }
}
