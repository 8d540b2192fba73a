//! System tags of ZStack requests, parsed in one place with precise errors.
//!
//! | tag | meaning |
//! |---|---|
//! | `backup::network::cidr::CIDR` | send backup traffic from this host's address inside CIDR |
//! | `fsInfo::type::TYPE::url::URL::options::OPTIONS` | write through a mounted filesystem |
//! | `volumeLiveBackup::parallelismDegree::N` | reader workers of this job (1..=64) |
//! | `backup::retentionLock::seconds::N` | the store refuses to delete the backup for N seconds after its commit (1..=100 years) |
//! | `backup::encryption::key::NAME` | on a storage being added: seal everything written there with configured key NAME |
//!
//! Tags of other namespaces are ignored (the control plane attaches many); a tag of a known
//! namespace that is malformed, or given twice, is an INVALID_ARGUMENT naming it.

use ipnet::IpNet;

use crate::error::{AgentError, Result};
use crate::validate::shorten;

/// Most reader workers one job may ask for.
pub const MAX_PARALLELISM: u32 = 64;

const CIDR_PREFIX: &str = "backup::network::cidr::";
const FS_INFO_PREFIX: &str = "fsInfo::type::";
const PARALLELISM_PREFIX: &str = "volumeLiveBackup::parallelismDegree::";
const RETENTION_PREFIX: &str = "backup::retentionLock::seconds::";
const ENCRYPTION_PREFIX: &str = "backup::encryption::key::";
/// Longest retention lock a backup may ask for: 100 years.
pub const MAX_RETENTION_LOCK_SECONDS: u64 = 100 * 366 * 24 * 3600;

/// Where backup data goes through a mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsInfo {
    /// Filesystem type, e.g. `nfs`.
    pub fs_type: String,
    /// What to mount, e.g. `172.32.1.119:/nas/nfs2`.
    pub url: String,
    /// Mount options, e.g. `nolock,vers=3`.
    pub options: String,
}

/// The system tags vmbackup understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemTags {
    /// `backup::network::cidr::`
    pub backup_network: Option<IpNet>,
    /// `fsInfo::`
    pub fs_info: Option<FsInfo>,
    /// `volumeLiveBackup::parallelismDegree::`
    pub parallelism: Option<u32>,
    /// `backup::retentionLock::seconds::`
    pub retention_lock: Option<u64>,
    /// `backup::encryption::key::`
    pub encryption_key: Option<String>,
}

fn invalid(tag: &str, what: impl std::fmt::Display) -> AgentError {
    AgentError::invalid("systemTags", format!("{what} in system tag {}", shorten(tag)))
}

fn set_once<T>(slot: &mut Option<T>, value: T, tag: &str) -> Result<()> {
    if slot.is_some() {
        return Err(invalid(tag, "a second value"));
    }
    *slot = Some(value);
    Ok(())
}

/// Parses the system tags of a request.
pub fn parse(tags: &[String]) -> Result<SystemTags> {
    let mut out = SystemTags::default();
    for tag in tags {
        if let Some(cidr) = tag.strip_prefix(CIDR_PREFIX) {
            let net: IpNet = cidr.parse().map_err(|_| invalid(tag, "invalid CIDR"))?;
            set_once(&mut out.backup_network, net, tag)?;
        } else if let Some(rest) = tag.strip_prefix(FS_INFO_PREFIX) {
            let (fs_type, rest) = rest.split_once("::url::").ok_or_else(|| invalid(tag, "missing ::url::"))?;
            let (url, options) = rest.split_once("::options::").unwrap_or((rest, ""));
            if fs_type.is_empty() || !fs_type.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_') {
                return Err(invalid(tag, format!("invalid filesystem type {}", shorten(fs_type))));
            }
            if url.is_empty() || url.contains(char::is_whitespace) || url.contains('\0') {
                return Err(invalid(tag, "invalid url"));
            }
            if options.contains(char::is_whitespace) || options.contains('\0') {
                return Err(invalid(tag, "invalid mount options"));
            }
            let info = FsInfo { fs_type: fs_type.to_string(), url: url.to_string(), options: options.to_string() };
            set_once(&mut out.fs_info, info, tag)?;
        } else if let Some(n) = tag.strip_prefix(PARALLELISM_PREFIX) {
            let n: u32 = n.parse().map_err(|_| invalid(tag, "a parallelism degree that is not a number"))?;
            if !(1..=MAX_PARALLELISM).contains(&n) {
                return Err(invalid(tag, format!("parallelism degree {n} outside 1..={MAX_PARALLELISM}")));
            }
            set_once(&mut out.parallelism, n, tag)?;
        } else if let Some(n) = tag.strip_prefix(RETENTION_PREFIX) {
            let n: u64 = n.parse().map_err(|_| invalid(tag, "a retention lock that is not a number of seconds"))?;
            if !(1..=MAX_RETENTION_LOCK_SECONDS).contains(&n) {
                return Err(invalid(tag, format!("retention lock {n} s outside 1..={MAX_RETENTION_LOCK_SECONDS}")));
            }
            set_once(&mut out.retention_lock, n, tag)?;
        } else if let Some(name) = tag.strip_prefix(ENCRYPTION_PREFIX) {
            if !crate::keys::valid_name(name) {
                return Err(invalid(tag, "a key name that is not 1 to 64 of letters, digits, '.', '_' and '-'"));
            }
            set_once(&mut out.encryption_key, name.to_string(), tag)?;
        } else if tag.starts_with("backup::") || tag.starts_with("fsInfo::") || tag.starts_with("volumeLiveBackup::") {
            return Err(invalid(tag, "an unknown option"));
        } else {
            tracing::debug!(tag = %tag, "system tag ignored");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn seed_examples_parse() {
        let t = parse(&tags(&[
            "backup::network::cidr::10.0.0.0/8",
            "fsInfo::type::nfs::url::172.32.1.119:/nas/nfs2::options::nolock,vers=3,rsize=32768,wsize=32768",
            "volumeLiveBackup::parallelismDegree::1",
            "someOtherNamespace::x",
        ]))
        .expect("valid");
        assert_eq!(t.backup_network, Some("10.0.0.0/8".parse().expect("net")));
        assert_eq!(
            t.fs_info,
            Some(FsInfo {
                fs_type: "nfs".into(),
                url: "172.32.1.119:/nas/nfs2".into(),
                options: "nolock,vers=3,rsize=32768,wsize=32768".into()
            })
        );
        assert_eq!(t.parallelism, Some(1));
    }

    #[test]
    fn malformed_tags_are_named() {
        let cases = [
            ("backup::network::cidr::10.0.0.0/33", "invalid CIDR in system tag \"backup::network::cidr::10.0.0.0/33\""),
            ("backup::network::cidr::", "invalid CIDR"),
            ("volumeLiveBackup::parallelismDegree::0", "parallelism degree 0 outside"),
            ("volumeLiveBackup::parallelismDegree::1000", "outside 1..=64"),
            ("volumeLiveBackup::parallelismDegree::two", "not a number"),
            ("fsInfo::type::nfs::options::x", "missing ::url::"),
            ("fsInfo::type::n fs::url::h:/x", "invalid filesystem type"),
            ("backup::speed::9", "unknown option"),
            ("backup::retentionLock::seconds::0", "outside 1..="),
            ("backup::retentionLock::seconds::soon", "not a number of seconds"),
        ];
        for (tag, needle) in cases {
            let e = parse(&tags(&[tag])).expect_err(tag);
            assert_eq!(e.field(), Some("systemTags"));
            assert!(e.to_string().contains(needle), "{e} does not contain {needle:?}");
        }
        let e = parse(&tags(&["volumeLiveBackup::parallelismDegree::1", "volumeLiveBackup::parallelismDegree::2"]))
            .expect_err("twice");
        assert!(e.to_string().contains("second value"), "{e}");
    }
}
