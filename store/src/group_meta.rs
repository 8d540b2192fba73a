//! What the store keeps about a group beside its manifest: the namespace it was committed
//! into and its retention lock. The manifest is the agent's record of the backup; this is
//! the store's, set from the committing principal and the store's policy, never from the
//! manifest, so a writer cannot file a group into another namespace.
//!
//! ```json
//! {"namespace": "host-a", "retainUntil": 1798761600}
//! ```
//!
//! `group-meta/<group-uuid>.json` is written durably *before* the manifest, so a visible
//! group always has it; a group without one (committed before namespaces existed) is in
//! [`DEFAULT_NAMESPACE`] with no lock. A meta file without a manifest is an interrupted
//! commit: the retry rewrites it and GC removes it once it is older than its cutoff.

use serde::{Deserialize, Serialize};

/// Namespace of groups committed without one: the embedded store's own and older groups.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A group's namespace and retention lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupMeta {
    /// Namespace of the principal that committed it.
    pub namespace: String,
    /// Unix seconds until which nobody may delete it; 0: no lock.
    #[serde(default)]
    pub retain_until: u64,
}

impl Default for GroupMeta {
    fn default() -> Self {
        Self { namespace: DEFAULT_NAMESPACE.to_string(), retain_until: 0 }
    }
}

impl GroupMeta {
    /// Whether the lock still holds at `now` (unix seconds).
    pub fn locked_at(&self, now: u64) -> bool {
        self.retain_until > now
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A namespace name: 1 to 64 of `[a-z0-9._-]`, not starting with a dot.
pub fn check_namespace(ns: &str) -> Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 64
        && !ns.starts_with('.')
        && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(format!("namespace {ns:?} must be 1 to 64 of a-z 0-9 . _ - (no leading dot)")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_json() {
        let m = GroupMeta { namespace: "host-a".into(), retain_until: 1_798_761_600 };
        let json = serde_json::to_string(&m).expect("encode");
        assert_eq!(json, r#"{"namespace":"host-a","retainUntil":1798761600}"#);
        assert_eq!(serde_json::from_str::<GroupMeta>(&json).expect("decode"), m);
        assert!(serde_json::from_str::<GroupMeta>(r#"{"namespace":"a","x":1}"#).is_err());
    }

    #[test]
    fn namespaces() {
        assert!(check_namespace("host-a.1_b").is_ok());
        for bad in ["", ".x", "A", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
    }
}
