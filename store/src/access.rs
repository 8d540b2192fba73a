//! Who may call the store and what each caller may do: principals, roles, namespaces.
//!
//! Every call but gRPC health names a principal, by one of:
//! - an API token in metadata `authorization: Bearer <token>`. The config keeps only the
//!   token's BLAKE3 hash (`token_blake3`); a presented token is hashed and compared with
//!   every configured hash in constant time. Tokens are 256 random bits (`vmbt_` + 64 hex),
//!   so a fast hash is enough: there is nothing to brute-force.
//! - a mutual-TLS client certificate (chained to `tls.client_ca` by the TLS layer) whose
//!   subject CN is some principal's `cert_cn`.
//!
//! A token that is present wins over a certificate; a wrong token is refused even when a
//! good certificate came with it. Failures answer UNAUTHENTICATED without saying which
//! principals exist; after [`FREE_FAILURES`] failures from one address each further
//! failure waits longer (up to [`MAX_FAILURE_DELAY`]) and every failure is logged.
//!
//! | role | may |
//! |---|---|
//! | `writer` | open sessions, ask MissingChunks, upload chunks, put indexes, commit new groups into its namespace, read the indexes of its namespace (for incrementals), list and read its groups |
//! | `reader` | list and read its namespace's groups and indexes, download their chunks (restore) |
//! | `admin` | everything, in every namespace: delete groups, GC, verify, extend retention |
//!
//! Nothing a writer can call overwrites or removes anything that exists: chunks are
//! content-addressed, an index name is written once, a committed manifest is never replaced.
//! The store's own admin token (`<data_dir>/admin.token`, mode 0600, made at first start)
//! lets an operator with root on the store host use `vmbackupctl store`; turn it off with
//! `[auth] local_admin_token = false`.
//!
//! The principals are re-read on SIGHUP: a removed principal or token stops working for
//! the next call, without a restart.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

pub use crate::group_meta::{DEFAULT_NAMESPACE, check_namespace};
/// Name of the store's own admin token file under its data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Failures from one address answered at once before they are slowed down.
pub const FREE_FAILURES: u32 = 3;
/// Default longest wait before a failed authentication is answered.
pub const MAX_FAILURE_DELAY: Duration = Duration::from_secs(5);
/// Failures older than this are forgotten.
const FAILURE_WINDOW: Duration = Duration::from_secs(600);
/// Prefix of API tokens made by [`new_token`].
pub const TOKEN_PREFIX: &str = "vmbt_";

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Append-only backup: sessions, uploads, commits into its namespace.
    Writer,
    /// Restore from its namespace.
    Reader,
    /// Delete, GC, verify, retention; every namespace.
    Admin,
}

impl Role {
    /// Its name in configs and replies.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }
}

/// One configured principal.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    /// Name shown in logs and the audit trail.
    pub name: String,
    /// Its roles.
    pub roles: Vec<Role>,
    /// Its namespace; required unless it is an admin (who sees every namespace).
    #[serde(default)]
    pub namespace: Option<String>,
    /// BLAKE3 hash (64 hex) of its API token (`vmbackup-store token` makes one).
    #[serde(default)]
    pub token_blake3: Option<String>,
    /// Subject CN of its mutual-TLS client certificate.
    #[serde(default)]
    pub cert_cn: Option<String>,
}

/// The `[auth]` section of the store config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept `<data_dir>/admin.token` as an admin (made at first start, mode 0600).
    pub local_admin_token: bool,
    /// The principals.
    #[serde(rename = "principal")]
    pub principals: Vec<PrincipalConfig>,
    /// Longest wait, in milliseconds, before a repeated authentication failure from one
    /// address is answered.
    pub max_failure_delay_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            local_admin_token: true,
            principals: Vec::new(),
            max_failure_delay_ms: u64::try_from(MAX_FAILURE_DELAY.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its configured name.
    pub name: String,
    /// Its roles.
    pub roles: Vec<Role>,
    /// Its namespace; None for an admin, who sees every namespace.
    pub namespace: Option<String>,
}

impl Principal {
    /// The principal of calls made inside the store's own process (the agent's embedded
    /// store): an admin in the default namespace.
    pub fn local() -> Self {
        Self { name: "local".into(), roles: vec![Role::Admin], namespace: None }
    }

    /// Whether it has `role` (admins have every role).
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role) || self.roles.contains(&Role::Admin)
    }

    /// Whether it may see groups of `namespace`.
    pub fn sees(&self, namespace: &str) -> bool {
        self.roles.contains(&Role::Admin) || self.namespace.as_deref() == Some(namespace)
    }

    /// The namespace its new groups go to.
    pub fn home(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }

    /// Its roles, comma-separated.
    pub fn role_names(&self) -> String {
        self.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
    }

    /// PERMISSION_DENIED unless it has `role`; `action` says what was refused.
    #[allow(clippy::result_large_err)] // tonic's Status is the error type of every handler
    pub fn require(&self, role: Role, action: &str) -> Result<(), Status> {
        if self.has(role) {
            return Ok(());
        }
        tracing::warn!(target: "audit", principal = %self.name, roles = %self.role_names(), action, "denied: needs role {}", role.as_str());
        Err(Status::permission_denied(format!(
            "principal {} ({}) may not {action}: that needs the {} role",
            self.name,
            self.role_names(),
            role.as_str()
        )))
    }

    /// PERMISSION_DENIED unless it sees `namespace`.
    #[allow(clippy::result_large_err)]
    pub fn require_namespace(&self, namespace: &str, what: &str) -> Result<(), Status> {
        if self.sees(namespace) {
            return Ok(());
        }
        tracing::warn!(target: "audit", principal = %self.name, namespace, what, "denied: other namespace");
        Err(Status::permission_denied(format!(
            "principal {} may not read {what}: it belongs to another namespace",
            self.name
        )))
    }
}

/// A new API token: [`TOKEN_PREFIX`] and 256 random bits in hex.
pub fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(format!("no randomness for a token: {e}")))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{TOKEN_PREFIX}{hex}"))
}

/// The hash the config keeps of `token` (BLAKE3, 64 hex digits).
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

#[derive(Debug, Default)]
struct Table {
    tokens: Vec<([u8; 32], Arc<Principal>)>,
    certs: HashMap<String, Arc<Principal>>,
    max_delay: Duration,
}

impl Table {
    fn build(config: &AuthConfig, data_dir: &Path) -> Result<Self, String> {
        let mut t = Table { max_delay: Duration::from_millis(config.max_failure_delay_ms), ..Table::default() };
        let mut names = std::collections::HashSet::new();
        for (i, p) in config.principals.iter().enumerate() {
            let at = format!("auth.principal[{i}] ({})", p.name);
            if p.name.trim().is_empty() || !names.insert(p.name.clone()) {
                return Err(format!("{at}: name must be set and unique"));
            }
            if p.roles.is_empty() {
                return Err(format!("{at}: roles must name at least one of writer, reader, admin"));
            }
            let admin = p.roles.contains(&Role::Admin);
            match (&p.namespace, admin) {
                (Some(ns), _) => check_namespace(ns).map_err(|e| format!("{at}: {e}"))?,
                (None, false) => return Err(format!("{at}: namespace is required for a writer or reader")),
                (None, true) => {}
            }
            let principal = Arc::new(Principal {
                name: p.name.clone(),
                roles: p.roles.clone(),
                namespace: if admin { None } else { p.namespace.clone() },
            });
            if p.token_blake3.is_none() && p.cert_cn.is_none() {
                return Err(format!("{at}: set token_blake3, cert_cn or both"));
            }
            if let Some(h) = &p.token_blake3 {
                let hash = blake3::Hash::from_hex(h.trim()).map_err(|_| {
                    format!("{at}: token_blake3 must be 64 hex digits (vmbackup-store token prints one)")
                })?;
                t.tokens.push((*hash.as_bytes(), principal.clone()));
            }
            if let Some(cn) = &p.cert_cn
                && t.certs.insert(cn.clone(), principal.clone()).is_some()
            {
                return Err(format!("{at}: cert_cn {cn:?} is mapped twice"));
            }
        }
        if config.local_admin_token {
            let token = local_admin_token(data_dir).map_err(|e| format!("store admin token: {e}"))?;
            let hash = blake3::hash(token.as_bytes());
            let admin = Principal { name: "local-admin".into(), roles: vec![Role::Admin], namespace: None };
            t.tokens.push((*hash.as_bytes(), Arc::new(admin)));
        }
        Ok(t)
    }

    fn by_token(&self, token: &str) -> Option<Arc<Principal>> {
        let presented = blake3::hash(token.as_bytes());
        let mut found = None;
        // Every entry is compared, so the time taken does not depend on which one matched.
        for (hash, p) in &self.tokens {
            if bool::from(hash.ct_eq(presented.as_bytes())) {
                found = Some(p.clone());
            }
        }
        found
    }
}

/// Reads `<data_dir>/admin.token`, creating it (mode 0600) on first start.
pub fn local_admin_token(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(std::io::Error::new(e.kind(), format!("reading {}: {e}", path.display()))),
    }
    std::fs::create_dir_all(data_dir)?;
    let token = new_token()?;
    let tmp = data_dir.join(format!(".{ADMIN_TOKEN_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    crate::durable::sync_dir(data_dir)?;
    tracing::info!(path = %path.display(), "made the store's admin token (mode 0600)");
    Ok(token)
}

#[derive(Debug)]
struct Failures {
    count: u32,
    last: Instant,
}

/// The principals of a running store and the failure record of its peers.
#[derive(Debug)]
pub struct Access {
    data_dir: PathBuf,
    table: RwLock<Table>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

impl Access {
    /// Principals from `config`; the local admin token is kept under `data_dir`.
    pub fn new(config: &AuthConfig, data_dir: &Path) -> Result<Self, String> {
        let table = Table::build(config, data_dir)?;
        tracing::info!(
            principals = config.principals.len(),
            local_admin_token = config.local_admin_token,
            "authentication configured"
        );
        Ok(Self { data_dir: data_dir.to_path_buf(), table: RwLock::new(table), failures: Mutex::default() })
    }

    /// Replaces the principals (SIGHUP); on an error the old ones stay.
    pub fn reload(&self, config: &AuthConfig) -> Result<(), String> {
        let table = Table::build(config, &self.data_dir)?;
        *self.table.write().unwrap_or_else(std::sync::PoisonError::into_inner) = table;
        tracing::info!(target: "audit", principals = config.principals.len(), "principals reloaded");
        Ok(())
    }

    /// The caller of `request`, or UNAUTHENTICATED (after a delay for repeated failures).
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        match self.identify(request) {
            Ok(p) => Ok(p),
            Err(reason) => {
                let delay = self.failed(peer);
                tracing::warn!(target: "audit", peer = %peer.map_or("unknown".into(), |p| p.to_string()), reason, delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "authentication failed");
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Err(Status::unauthenticated(reason))
            }
        }
    }

    fn identify<T>(&self, request: &Request<T>) -> Result<Principal, &'static str> {
        let table = self.table.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(value) = request.metadata().get("authorization") {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or("authorization metadata must be \"Bearer <token>\"")?;
            return table.by_token(token.trim()).map(|p| (*p).clone()).ok_or("unknown or revoked API token");
        }
        let certs = request
            .peer_certs()
            .ok_or("no credential: send \"authorization: Bearer <token>\" or connect with a client certificate")?;
        let leaf = certs.first().ok_or("the client certificate chain is empty")?;
        let cn = common_name(leaf.as_ref()).ok_or("the client certificate has no readable subject CN")?;
        table.certs.get(&cn).map(|p| (**p).clone()).ok_or("the client certificate is not mapped to a principal")
    }

    /// Records a failure from `peer`; returns how long to wait before answering.
    fn failed(&self, peer: Option<IpAddr>) -> Duration {
        let Some(ip) = peer else { return Duration::ZERO };
        let mut map = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        map.retain(|_, f| now.duration_since(f.last) < FAILURE_WINDOW);
        let f = map.entry(ip).or_insert(Failures { count: 0, last: now });
        f.count = f.count.saturating_add(1);
        f.last = now;
        let max = self.table.read().unwrap_or_else(std::sync::PoisonError::into_inner).max_delay;
        failure_delay(f.count).min(max)
    }
}

/// Wait before answering the `count`th failure in a row from one address.
pub fn failure_delay(count: u32) -> Duration {
    if count <= FREE_FAILURES {
        return Duration::ZERO;
    }
    let steps = (count - FREE_FAILURES - 1).min(16);
    Duration::from_millis(100u64 << steps).min(MAX_FAILURE_DELAY)
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(name: &str, roles: Vec<Role>, ns: Option<&str>, token: &str) -> PrincipalConfig {
        PrincipalConfig {
            name: name.into(),
            roles,
            namespace: ns.map(str::to_string),
            token_blake3: Some(token_hash(token)),
            cert_cn: None,
        }
    }

    #[test]
    fn tokens_map_to_their_principals_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = AuthConfig {
            local_admin_token: false,
            max_failure_delay_ms: 1,
            principals: vec![
                principal("a", vec![Role::Writer], Some("host-a"), "tok-a"),
                principal("b", vec![Role::Reader], Some("host-b"), "tok-b"),
            ],
        };
        let t = Table::build(&cfg, dir.path()).expect("valid");
        assert_eq!(t.by_token("tok-a").expect("a").namespace.as_deref(), Some("host-a"));
        assert_eq!(t.by_token("tok-b").expect("b").name, "b");
        assert!(t.by_token("tok-c").is_none());
        assert!(!dir.path().join(ADMIN_TOKEN_FILE).exists(), "no admin token unless asked");
    }

    #[test]
    fn bad_principals_are_refused_with_their_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = AuthConfig {
            local_admin_token: false,
            max_failure_delay_ms: 1,
            principals: vec![principal("w", vec![Role::Writer], None, "t")],
        };
        let e = Table::build(&cfg, dir.path()).expect_err("writer without namespace");
        assert!(e.contains("auth.principal[0] (w)") && e.contains("namespace"), "{e}");
        cfg.principals[0].namespace = Some("Bad/NS".into());
        assert!(Table::build(&cfg, dir.path()).expect_err("bad ns").contains("namespace"));
        cfg.principals[0].namespace = Some("ok".into());
        cfg.principals[0].token_blake3 = Some("xyz".into());
        assert!(Table::build(&cfg, dir.path()).expect_err("bad hash").contains("token_blake3"));
    }

    #[test]
    fn local_admin_token_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let a = local_admin_token(dir.path()).expect("made");
        let b = local_admin_token(dir.path()).expect("read");
        assert_eq!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        let mode = std::fs::metadata(dir.path().join(ADMIN_TOKEN_FILE)).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn failures_slow_down_up_to_a_ceiling() {
        assert_eq!(failure_delay(1), Duration::ZERO);
        assert_eq!(failure_delay(FREE_FAILURES), Duration::ZERO);
        assert!(failure_delay(FREE_FAILURES + 1) > Duration::ZERO);
        assert!(failure_delay(FREE_FAILURES + 2) > failure_delay(FREE_FAILURES + 1));
        assert_eq!(failure_delay(1000), MAX_FAILURE_DELAY);
    }

    #[test]
    fn roles_and_namespaces() {
        let w = Principal { name: "w".into(), roles: vec![Role::Writer], namespace: Some("a".into()) };
        assert!(w.has(Role::Writer) && !w.has(Role::Reader) && !w.has(Role::Admin));
        assert!(w.sees("a") && !w.sees("b"));
        assert!(w.require(Role::Admin, "delete groups").is_err());
        let admin = Principal::local();
        assert!(admin.has(Role::Reader) && admin.sees("anything"));
    }
}
