//! TLS for vmbackup's gRPC hops (rustls through tonic), shared by both daemons.
//!
//! A server serves TLS when `[tls] cert` and `key` are set, and asks every client for a
//! certificate signed by `client_ca` when that is set (mutual TLS). Plaintext is accepted on
//! loopback addresses; on any other address only when `insecure_plaintext = true`, so a
//! forgotten setting never exposes the API unencrypted on a network.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Server-side TLS settings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain of the server.
    pub cert: Option<PathBuf>,
    /// PEM private key of the server.
    pub key: Option<PathBuf>,
    /// PEM CA that client certificates must chain to; set for mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address (trusted, isolated networks only).
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// Client-side TLS settings (the agent towards its stores).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM CA that servers' certificates must chain to (default: none, so https endpoints
    /// need it).
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for stores that require mutual TLS.
    pub cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    pub key: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> std::io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| std::io::Error::new(e.kind(), format!("reading {what} {}: {e}", path.display())))
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

impl ServerTls {
    /// The tonic server TLS config, or None for plaintext (refused off loopback unless
    /// `insecure_plaintext`).
    pub fn load(&self, listen: SocketAddr) -> std::io::Result<Option<ServerTlsConfig>> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(read(cert, "TLS certificate")?, read(key, "TLS key")?);
                let mut config = ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &self.client_ca {
                    config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
                }
                Ok(Some(config))
            }
            (None, None) => {
                if self.client_ca.is_some() {
                    return Err(invalid("tls.client_ca needs tls.cert and tls.key".into()));
                }
                if !listen.ip().is_loopback() && !self.insecure_plaintext {
                    return Err(invalid(format!(
                        "refusing to serve plaintext gRPC on {listen}: set tls.cert and tls.key, or tls.insecure_plaintext = true for an isolated network"
                    )));
                }
                Ok(None)
            }
            _ => Err(invalid("tls.cert and tls.key must be set together".into())),
        }
    }
}

impl ClientTls {
    /// The tonic client TLS config for connecting to `host`.
    pub fn load(&self, host: &str) -> std::io::Result<ClientTlsConfig> {
        let mut config = ClientTlsConfig::new().domain_name(host);
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(Certificate::from_pem(read(ca, "store CA")?));
        }
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                config = config.identity(Identity::from_pem(read(c, "client certificate")?, read(k, "client key")?))
            }
            (None, None) => {}
            _ => return Err(invalid("store_tls.cert and store_tls.key must be set together".into())),
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_refused_off_loopback_unless_asked_for() {
        let none = ServerTls::default();
        assert!(none.load("127.0.0.1:1".parse().expect("addr")).expect("loopback ok").is_none());
        assert!(none.load("[::1]:1".parse().expect("addr")).expect("loopback ok").is_none());
        let e = none.load("0.0.0.0:1".parse().expect("addr")).expect_err("refused");
        assert!(e.to_string().contains("insecure_plaintext"), "{e}");
        let insecure = ServerTls { insecure_plaintext: true, ..Default::default() };
        assert!(insecure.load("0.0.0.0:1".parse().expect("addr")).expect("allowed").is_none());
    }

    #[test]
    fn half_configured_tls_is_an_error() {
        let half = ServerTls { cert: Some("/x.pem".into()), ..Default::default() };
        assert!(half.load("127.0.0.1:1".parse().expect("addr")).is_err());
        let ca_only = ServerTls { client_ca: Some("/ca.pem".into()), ..Default::default() };
        assert!(ca_only.load("127.0.0.1:1".parse().expect("addr")).is_err());
        let missing = ServerTls {
            cert: Some("/nonexistent/c.pem".into()),
            key: Some("/nonexistent/k.pem".into()),
            ..Default::default()
        };
        let e = missing.load("127.0.0.1:1".parse().expect("addr")).expect_err("missing files");
        assert!(e.to_string().contains("/nonexistent/c.pem"), "{e}");
    }
}
