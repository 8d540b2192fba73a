//! TLS of TCP exports: the agent's certificate, and client certificates required and checked
//! against the configured CA (rustls, ring). Read at each ExportVmBackup, so renewed files
//! take effect on the next export without a reload.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// A TLS acceptor presenting `cert` (PEM chain) with `key`, requiring client certificates
/// that chain to `client_ca`. The error names the file and what is wrong with it.
pub fn acceptor(cert: &Path, key: &Path, client_ca: &Path) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = pem_certs(cert, "exports.tls_cert")?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("exports.tls_key {}: no PEM private key: {e}", key.display()))?;
    let mut roots = RootCertStore::empty();
    for c in pem_certs(client_ca, "exports.tls_client_ca")? {
        roots.add(c).map_err(|e| format!("exports.tls_client_ca {}: {e}", client_ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("exports.tls_client_ca {}: {e}", client_ca.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("exports.tls_cert {} with exports.tls_key: {e}", cert.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn pem_certs(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("{setting} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{setting} {}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let e = acceptor(&dir.path().join("none.pem"), &empty, &empty).err().expect("missing");
        assert!(e.contains("exports.tls_cert") && e.contains("none.pem"), "{e}");
        let e = acceptor(&empty, &empty, &empty).err().expect("empty");
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
