//! Checks of untrusted request fields, in one place. Each returns the value normalised or an
//! INVALID_ARGUMENT error naming the field and saying what was wrong.

use crate::error::{AgentError, Result};

/// Longest name accepted.
pub const MAX_NAME_LEN: usize = 255;
/// Longest description accepted.
pub const MAX_DESCRIPTION_LEN: usize = 2048;

/// A uuid in ZStack's form (32 lowercase hex digits). Hyphenated uuids are accepted and
/// normalised.
pub fn uuid(field: &'static str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(AgentError::invalid(field, "is required"));
    }
    let parsed = uuid::Uuid::try_parse(value)
        .map_err(|_| AgentError::invalid(field, format!("{} is not a uuid (32 hex digits)", shorten(value))))?;
    Ok(parsed.simple().to_string())
}

/// An optional uuid: empty means absent.
pub fn optional_uuid(field: &'static str, value: &str) -> Result<Option<String>> {
    if value.is_empty() { Ok(None) } else { uuid(field, value).map(Some) }
}

/// A required, printable name of at most [`MAX_NAME_LEN`] characters.
pub fn name(field: &'static str, value: &str) -> Result<String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(AgentError::invalid(field, "is required"));
    }
    if v.chars().count() > MAX_NAME_LEN {
        return Err(AgentError::invalid(field, format!("is longer than {MAX_NAME_LEN} characters")));
    }
    if v.chars().any(char::is_control) {
        return Err(AgentError::invalid(field, "contains control characters"));
    }
    Ok(v.to_string())
}

/// An optional description (empty means none).
pub fn description(field: &'static str, value: &str) -> Result<Option<String>> {
    if value.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(AgentError::invalid(field, format!("is longer than {MAX_DESCRIPTION_LEN} characters")));
    }
    Ok(if value.is_empty() { None } else { Some(value.to_string()) })
}

/// A host name or IP address literal (IPv6 without brackets).
pub fn hostname(field: &'static str, value: &str) -> Result<String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(AgentError::invalid(field, "is required"));
    }
    if v.parse::<std::net::IpAddr>().is_ok() {
        return Ok(v.to_string());
    }
    let ok = v.len() <= 253
        && v.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !ok {
        return Err(AgentError::invalid(field, format!("{} is not a host name or IP address", shorten(v))));
    }
    Ok(v.to_string())
}

/// `Permissive` (default) or `Enforcing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteMode {
    /// Refuse while the resource is in use.
    Permissive,
    /// Delete regardless.
    Enforcing,
}

/// Parses ZStack's deleteMode.
pub fn delete_mode(field: &'static str, value: &str) -> Result<DeleteMode> {
    match value {
        "" | "Permissive" => Ok(DeleteMode::Permissive),
        "Enforcing" => Ok(DeleteMode::Enforcing),
        other => Err(AgentError::invalid(field, format!("{} is not Permissive or Enforcing", shorten(other)))),
    }
}

/// Quotes a value for an error message, cut to a readable length (the store's rule, so
/// both daemons echo input alike).
pub use vmbackup_store::error::shorten;

/// The store endpoint `http[s]://host:port` for a host (bracketing IPv6 literals).
pub fn endpoint_url(hostname: &str, port: u16, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if hostname.contains(':') {
        format!("{scheme}://[{hostname}]:{port}")
    } else {
        format!("{scheme}://{hostname}:{port}")
    }
}

/// Splits an endpoint URL (`http://host:port` or `https://…`) into host, port and whether it
/// uses TLS.
pub fn parse_endpoint(field: &'static str, url: &str) -> Result<(String, u16, bool)> {
    let bad =
        || AgentError::invalid(field, format!("{} is not an endpoint URL like http://10.0.0.5:7871", shorten(url)));
    let (rest, tls) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(r), _) => (r, false),
        (_, Some(r)) => (r, true),
        _ => return Err(bad()),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('@') {
        return Err(bad());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once("]:").ok_or_else(bad)?;
        (h, p)
    } else {
        authority.rsplit_once(':').ok_or_else(bad)?
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    Ok((hostname(field, host)?, port, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_normalised_and_garbage_is_named() {
        assert_eq!(
            uuid("uuid", "6F9619FF-8B86-D011-B42D-00CF4FC964FF").expect("ok"),
            "6f9619ff8b86d011b42d00cf4fc964ff"
        );
        let e = uuid("uuid", "not-a-uuid").expect_err("bad");
        assert_eq!(e.field(), Some("uuid"));
        assert!(e.to_string().contains("not-a-uuid"), "{e}");
    }

    #[test]
    fn names_are_required_and_bounded() {
        assert!(name("name", "  ").is_err());
        assert!(name("name", &"x".repeat(256)).is_err());
        assert!(name("name", "a\u{7}b").is_err());
        assert_eq!(name("name", " ok ").expect("ok"), "ok");
    }

    #[test]
    fn hostnames() {
        for ok in ["127.0.0.1", "::1", "store-1.example", "localhost"] {
            hostname("hostname", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "a b", "-x", "x..y", "x/y"] {
            assert!(hostname("hostname", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_round_trip() {
        assert_eq!(parse_endpoint("url", "http://10.0.0.5:7871").expect("v4"), ("10.0.0.5".into(), 7871, false));
        assert_eq!(parse_endpoint("url", "https://[::1]:7871/").expect("v6"), ("::1".into(), 7871, true));
        assert_eq!(endpoint_url("::1", 1, false), "http://[::1]:1");
        assert_eq!(endpoint_url("h", 1, true), "https://h:1");
        for bad in ["10.0.0.5:7871", "http://x", "http://x:0", "http://x:99999", "http://u@x:1", "ftp://x:1"] {
            assert!(parse_endpoint("url", bad).is_err(), "{bad}");
        }
    }
}
