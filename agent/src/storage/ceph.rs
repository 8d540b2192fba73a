//! Ceph backup storages: a RADOS pool the agent writes directly through librados, with no
//! store server in the data path. The pool holds the same store layout a `vmbackup-store`
//! with `backend = "rados"` serves (namespace prefix [`RADOS_PREFIX`]), and every host that
//! writes it coordinates through the shared-store protocol of `vmbackup_store::shared`
//! (session records, reuse journals, one GC lease), so many hosts may back up into one pool.
//!
//! Here: ZStack's `monUrls` ([`parse_mon_url`]), connecting and opening the store
//! ([`CephTarget::open`]), and the checks behind an inventory's status ([`CephTarget::probe`]).
//! The agent keeps no Ceph secret of its own: the cephx key stays in the host's keyring file,
//! and an SSH password in a `monUrl` is dropped at the edge (the agent never uses SSH).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vmbackup_store::backend::rados::report::ClusterReport;
use vmbackup_store::backend::rados::{RadosBackend, RadosSettings};
use vmbackup_store::chunk_store::ChunkStore;
use vmbackup_store::shared::Shared;

use crate::config::CephConfig;
use crate::error::{AgentError, ErrorKind, Result};
use crate::validate;

/// Type name of a Ceph backup storage record.
pub const CEPH_TYPE: &str = "Ceph";
/// The inventory's `url` of a Ceph backup storage, as ZStack shows it.
pub const CEPH_URL: &str = "not used";
/// Monitor port when a monUrl gives none.
pub const DEFAULT_MON_PORT: u16 = 6789;
/// The msgr2 monitor port: a monitor given with it is reached over protocol v2.
const MSGR2_PORT: u16 = 3300;
/// Client identity when the request names none.
pub const DEFAULT_CLIENT: &str = "client.admin";
/// Prefix of the store's RADOS namespaces in the pool (the store server's default, so a
/// `vmbackup-store` over the same pool serves the same backups).
pub const RADOS_PREFIX: &str = "vmbackup.";
/// How long a monitor's TCP check waits.
const MON_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// One monitor of a `monUrls` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonUrl {
    /// Host or IP literal.
    pub hostname: String,
    /// Monitor port.
    pub mon_port: u16,
    /// SSH user of ZStack's form (kept for the inventory only).
    pub ssh_username: String,
    /// SSH port of ZStack's form (kept for the inventory only; 0 in the plain form).
    pub ssh_port: u16,
}

/// Parses a monitor as ZStack takes it, `user[:password]@host[:sshPort][/?monPort=N]`, or
/// plainly `host[:monPort]`. The password is dropped here.
pub fn parse_mon_url(field: &'static str, raw: &str) -> Result<MonUrl> {
    let shown = redact(raw);
    let bad = |why: String| AgentError::invalid(field, format!("{}: {why}", validate::shorten(&shown)));
    let v = raw.trim();
    if v.is_empty() {
        return Err(bad("is empty".into()));
    }
    let (user, rest) = match v.rsplit_once('@') {
        Some((userinfo, rest)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c == '/') {
                return Err(bad("the SSH user before '@' is empty or malformed".into()));
            }
            (Some(user.to_string()), rest)
        }
        None => (None, v),
    };
    let (hostport, query) = match rest.split_once('/') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let mut mon_port = None;
    if let Some(q) = query {
        let q = q.strip_prefix('?').unwrap_or(q);
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("monPort", n)) => mon_port = Some(port(n).map_err(|e| bad(format!("monPort {e}")))?),
                _ => return Err(bad(format!("unknown parameter {pair:?} (only monPort)"))),
            }
        }
    }
    let (host, port_part) = split_host_port(hostport).map_err(bad)?;
    let hostname =
        validate::hostname(field, host).map_err(|_| bad(format!("{host:?} is not a host name or IP address")))?;
    let parsed_port = port_part.map(port).transpose().map_err(|e| bad(format!("port {e}")))?;
    Ok(match user {
        // ZStack's form: the port after the host is SSH's; the monitor's is monPort.
        Some(u) => MonUrl {
            hostname,
            mon_port: mon_port.unwrap_or(DEFAULT_MON_PORT),
            ssh_username: u,
            ssh_port: parsed_port.unwrap_or(22),
        },
        None => {
            if mon_port.is_some() && parsed_port.is_some() {
                return Err(bad("gives the monitor port twice".into()));
            }
            MonUrl {
                hostname,
                mon_port: mon_port.or(parsed_port).unwrap_or(DEFAULT_MON_PORT),
                ssh_username: String::new(),
                ssh_port: 0,
            }
        }
    })
}

/// A monUrl as it may appear in messages: any password replaced by `***`.
pub fn redact(raw: &str) -> String {
    match raw.rsplit_once('@') {
        Some((userinfo, rest)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{rest}"),
            None => raw.to_string(),
        },
        None => raw.to_string(),
    }
}

fn port(s: &str) -> std::result::Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{s:?} is not a TCP port (1-65535)")),
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> std::result::Result<(&str, Option<&str>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("an IPv6 address lacks its ']'")?;
        return match after {
            "" => Ok((h, None)),
            a => a.strip_prefix(':').map(|p| (h, Some(p))).ok_or_else(|| format!("{a:?} follows the address")),
        };
    }
    if s.matches(':').count() > 1 {
        return Ok((s, None)); // a bare IPv6 literal
    }
    Ok(match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    })
}

/// Where a Ceph backup storage is and who the agent connects as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephTarget {
    /// Monitors, in the order given.
    pub mons: Vec<MonUrl>,
    /// Pool name; it must exist.
    pub pool: String,
    /// cephx client name.
    pub client: String,
    /// Keyring file; None: the conf's, else librados's default paths under /etc/ceph.
    pub keyring: Option<PathBuf>,
}

/// A monitor's address resolved, or why it could not be.
fn resolve(m: &MonUrl) -> Result<SocketAddr> {
    (m.hostname.as_str(), m.mon_port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| AgentError::new(ErrorKind::Unavailable, format!("Ceph monitor {} does not resolve", m.hostname)))
}

/// What [`CephTarget::probe`] found.
#[derive(Debug)]
pub struct Probe {
    /// The cluster's report, or why it could not be had.
    pub report: Result<ClusterReport>,
    /// Per monitor (in [`CephTarget::mons`] order), whether it is reachable and in quorum.
    pub mons: Vec<bool>,
}

impl CephTarget {
    /// librados's `mon_host` for the monitors: `v2:` for port 3300, `v1:` otherwise (what
    /// ZStack's monPort 6789 means).
    fn mon_host(&self) -> Result<String> {
        let mut out = Vec::new();
        for m in &self.mons {
            let addr = resolve(m)?;
            let proto = if m.mon_port == MSGR2_PORT { "v2" } else { "v1" };
            out.push(format!("{proto}:{addr}"));
        }
        Ok(out.join(","))
    }

    fn describe(&self) -> String {
        let mons: Vec<String> = self.mons.iter().map(|m| format!("{}:{}", m.hostname, m.mon_port)).collect();
        format!("Ceph pool {:?} via {}", self.pool, mons.join(","))
    }

    /// Connects (blocking: call it on a blocking thread). Each way it can fail is one error
    /// naming what: an unreadable keyring, unreachable monitors or refused credentials, a
    /// missing pool.
    pub fn connect(&self, config: &CephConfig) -> Result<Arc<RadosBackend>> {
        if let Some(k) = &self.keyring {
            check_keyring(k)?;
        }
        let settings = RadosSettings {
            conf: config.conf.exists().then(|| config.conf.clone()),
            mon_host: Some(self.mon_host()?),
            client: self.client.clone(),
            keyring: self.keyring.clone(),
            pool: self.pool.clone(),
            prefix: RADOS_PREFIX.to_string(),
            timeout: Duration::from_secs(config.timeout_seconds.max(1)),
        };
        RadosBackend::connect(&settings).map(Arc::new).map_err(|e| {
            use vmbackup_store::error::ErrorKind as K;
            let kind = match e.kind() {
                K::NotFound => ErrorKind::FailedPrecondition,
                K::InvalidArgument => ErrorKind::InvalidArgument,
                _ => ErrorKind::Unavailable,
            };
            AgentError::new(kind, format!("{}: {}", self.describe(), e.full_message().replace('\n', " ")))
        })
    }

    /// The chunk store in the pool (created on first use) over a connected cluster, sharing
    /// the pool with every other writer through the shared-store protocol.
    pub fn open_store(&self, backend: Arc<RadosBackend>, chunk_size: u32, config: &CephConfig) -> Result<ChunkStore> {
        let identity = backend.open_or_create_identity(chunk_size).map_err(|e| self.failed("opening the store", e))?;
        let shared = Shared::new(backend.clone()).with_lease_ttl(Duration::from_secs(config.gc_lease_seconds.max(10)));
        Ok(ChunkStore::with_backend(backend, identity).with_shared(Arc::new(shared)))
    }

    fn failed(&self, what: &str, e: vmbackup_store::error::StoreError) -> AgentError {
        AgentError::new(ErrorKind::Unavailable, format!("{} {what}: {}", self.describe(), e.full_message()))
    }

    /// Checks the cluster (through `backend` when connected) and each monitor: a monitor
    /// is up when it accepts a TCP connection and, if the cluster answered, is in quorum.
    pub fn probe(&self, backend: Option<&RadosBackend>) -> Probe {
        let report = match backend {
            Some(b) => b.report().map_err(|e| self.failed("report", e)),
            None => Err(AgentError::new(ErrorKind::Unavailable, format!("{}: not connected", self.describe()))),
        };
        let mons = self
            .mons
            .iter()
            .map(|m| {
                let Ok(addr) = resolve(m) else { return false };
                let reachable = TcpStream::connect_timeout(&addr, MON_CHECK_TIMEOUT).is_ok();
                let in_quorum = match &report {
                    Ok(r) => {
                        let a = addr.to_string();
                        r.monitors.iter().find(|f| f.addrs.contains(&a)).is_none_or(|f| f.in_quorum)
                    }
                    Err(_) => true,
                };
                reachable && in_quorum
            })
            .collect();
        Probe { report, mons }
    }
}

/// A keyring the agent is told to use must be a regular file other users cannot read: it
/// holds the cephx secret.
fn check_keyring(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        AgentError::new(ErrorKind::FailedPrecondition, format!("Ceph keyring {}: {e}", path.display()))
            .with_field("keyringPath")
    })?;
    if !meta.is_file() {
        return Err(AgentError::invalid("keyringPath", format!("{} is not a file", path.display())));
    }
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(AgentError::invalid(
            "keyringPath",
            format!("{} is readable by every user; it holds a cephx secret (chmod 600 or 640)", path.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mon(h: &str, p: u16, u: &str, s: u16) -> MonUrl {
        MonUrl { hostname: h.into(), mon_port: p, ssh_username: u.into(), ssh_port: s }
    }

    #[test]
    fn zstack_and_plain_mon_urls() {
        assert_eq!(
            parse_mon_url("monUrls", "root:pw@10.0.0.1").expect("root:pw@10.0.0.1"),
            mon("10.0.0.1", 6789, "root", 22)
        );
        assert_eq!(
            parse_mon_url("monUrls", "root:p@ss:w@rd@ceph-1:2222/?monPort=6790")
                .expect("root:p@ss:w@rd@ceph-1:2222/?monPort=6790"),
            mon("ceph-1", 6790, "root", 2222)
        );
        assert_eq!(parse_mon_url("monUrls", "10.0.0.2:3300").expect("10.0.0.2:3300"), mon("10.0.0.2", 3300, "", 0));
        assert_eq!(
            parse_mon_url("monUrls", "mon.example.com").expect("mon.example.com"),
            mon("mon.example.com", 6789, "", 0)
        );
        assert_eq!(parse_mon_url("monUrls", "[fd00::1]:6789").expect("[fd00::1]:6789"), mon("fd00::1", 6789, "", 0));
        assert_eq!(parse_mon_url("monUrls", "fd00::1").expect("fd00::1"), mon("fd00::1", 6789, "", 0));
    }

    #[test]
    fn bad_mon_urls_name_the_problem_and_never_echo_the_password() {
        for (raw, needle) in [
            ("", "is empty"),
            ("root:secret@", "not a host name"),
            ("root:secret@h/?monPort=0", "monPort"),
            ("root:secret@h/?port=1", "unknown parameter"),
            ("h:99999", "not a TCP port"),
            ("h:1/?monPort=2", "twice"),
            ("bad host!", "not a host name"),
            ("[fd00::1", "']'"),
        ] {
            let e = parse_mon_url("monUrls", raw).expect_err(raw);
            assert_eq!(e.field(), Some("monUrls"), "{raw}");
            assert!(e.message().contains(needle), "{raw}: {}", e.message());
            assert!(!e.message().contains("secret"), "{raw}: {}", e.message());
        }
    }

    #[test]
    fn mon_host_speaks_v2_only_on_3300() {
        let t = CephTarget {
            mons: vec![mon("127.0.0.1", 6789, "", 0), mon("127.0.0.2", 3300, "", 0)],
            pool: "p".into(),
            client: DEFAULT_CLIENT.into(),
            keyring: None,
        };
        assert_eq!(t.mon_host().expect("mon_host"), "v1:127.0.0.1:6789,v2:127.0.0.2:3300");
    }
}
