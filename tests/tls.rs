//! TLS on both gRPC hops: the agent API (server TLS, then mutual TLS) and agent -> store,
//! with a CA and certificates the test makes itself; a store maps client certificates to
//! principals by their subject CN.

mod common;

use std::path::{Path, PathBuf};

use common::{AgentOptions, Auth, start_agent, start_store_with_config};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::backup_storage_service_client::BackupStorageServiceClient;

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: String,
    client_key: String,
    /// A client certificate whose subject CN is `kvm-host-1`, and its key.
    host_cert: String,
    host_key: String,
}

fn pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca");
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &ca).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], "store");
    let (client_cert, client_key) = leaf(vec!["control-plane".into()], "control-plane");
    let (host_cert, host_key) = leaf(vec!["kvm-host-1".into()], "kvm-host-1");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write pem");
        p
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert,
        client_key,
        host_cert,
        host_key,
    }
}

async fn tls_channel(
    url: &str,
    ca: Option<&Path>,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().domain_name("127.0.0.1");
    if let Some(ca) = ca {
        tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")));
    }
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Channel::from_shared(url.to_string()).expect("url").tls_config(tls)?.connect().await
}

async fn list(channel: Channel, token: &str) -> Result<usize, tonic::Status> {
    let mut c = BackupStorageServiceClient::with_interceptor(channel, Auth(Some(format!("OAuth {token}"))));
    Ok(c.query_backup_storage(pb::QueryBackupStorageRequest::default()).await?.into_inner().inventories.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_api_over_tls_and_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());

    // Server TLS: a client that does not trust the CA fails; one that does succeeds.
    let config = dir.path().join("agent-tls.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            p.server_cert.display().to_string(),
            p.server_key.display().to_string()
        ),
    )
    .expect("config");
    let agent = start_agent(dir.path(), AgentOptions { embedded_store: false, config: Some(config) });
    let url = format!("https://{}", agent.addr);
    let token = common::session(&agent);
    let untrusted = match tls_channel(&url, None, None).await {
        Err(_) => true,
        Ok(ch) => list(ch, &token).await.is_err(),
    };
    assert!(untrusted, "a client without the CA must not get through");
    let ch = tls_channel(&url, Some(&p.ca), None).await.expect("trusted connect");
    assert_eq!(list(ch, &token).await.expect("query over TLS"), 0);
    // Plaintext to a TLS port fails too.
    let plain = Channel::from_shared(format!("http://{}", agent.addr)).expect("url").connect().await;
    if let Ok(ch) = plain {
        assert!(list(ch, &token).await.is_err(), "plaintext must not reach a TLS server");
    }
    // The REST listener serves the same TLS.
    assert_eq!(rest_status(&agent, Some(&p.ca), None).await, Ok(200));
    assert!(rest_status(&agent, None, None).await.is_err(), "a REST client without the CA must not get through");
    drop(agent);

    // Mutual TLS: no client certificate, refused; with one signed by the CA, accepted.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let config = dir2.path().join("agent-mtls.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            p.server_cert.display().to_string(),
            p.server_key.display().to_string(),
            p.ca.display().to_string()
        ),
    )
    .expect("config");
    let agent = start_agent(dir2.path(), AgentOptions { embedded_store: false, config: Some(config) });
    let url = format!("https://{}", agent.addr);
    let token = common::session(&agent);
    let anonymous = match tls_channel(&url, Some(&p.ca), None).await {
        Err(_) => true,
        Ok(ch) => list(ch, &token).await.is_err(),
    };
    assert!(anonymous, "mutual TLS must refuse a client without a certificate");
    let ch = tls_channel(&url, Some(&p.ca), Some((&p.client_cert, &p.client_key))).await.expect("mtls connect");
    assert_eq!(list(ch, &token).await.expect("query over mutual TLS"), 0);
    let identity = format!("{}{}", p.client_cert, p.client_key);
    assert_eq!(rest_status(&agent, Some(&p.ca), Some(&identity)).await, Ok(200));
    assert!(rest_status(&agent, Some(&p.ca), None).await.is_err(), "REST over mutual TLS needs a client certificate");
}

/// GET zstack/v1/backup-storage over https, trusting `ca`, with the client `identity`
/// (certificate and key PEM): the HTTP status, or why no answer came.
async fn rest_status(agent: &common::Daemon, ca: Option<&Path>, identity: Option<&str>) -> Result<u16, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = agent.rest_url().replacen("http://", "https://", 1);
    let mut b = reqwest::Client::builder();
    if let Some(ca) = ca {
        let cert = reqwest::Certificate::from_pem(&std::fs::read(ca).expect("ca")).expect("ca pem");
        b = b.tls_certs_only([cert]);
    }
    if let Some(id) = identity {
        b = b.identity(reqwest::Identity::from_pem(id.as_bytes()).expect("identity"));
    }
    let client = b.build().map_err(|e| e.to_string())?;
    let r = client
        .get(format!("{url}/zstack/v1/backup-storage"))
        .header("Authorization", format!("OAuth {}", common::session(agent)))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_reaches_a_tls_store_only_with_the_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    let store_config = dir.path().join("store.toml");
    std::fs::write(
        &store_config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            p.server_cert.display().to_string(),
            p.server_key.display().to_string()
        ),
    )
    .expect("store config");
    let store = start_store_with_config(dir.path(), "store", Some(&store_config));
    let store_url = format!("https://{}", store.addr);

    // An agent that trusts the CA adds the store over TLS.
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&a_dir).expect("dir");
    let agent_config = a_dir.join("agent.toml");
    std::fs::write(&agent_config, format!("[store_tls]\nca = {:?}\n", p.ca.display().to_string()))
        .expect("agent config");
    let agent = start_agent(&a_dir, AgentOptions { embedded_store: false, config: Some(agent_config) });
    let mut c = common::storage_client(&agent, Some(common::session(&agent))).await;
    let inv = c
        .add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "tls-store".into(),
            url: store_url.clone(),
            token: common::store_token(&store),
            ..Default::default()
        })
        .await
        .expect("add over TLS")
        .into_inner()
        .inventory
        .expect("inventory");
    assert_eq!((inv.status.as_str(), inv.url.as_str()), ("Connected", store_url.as_str()));

    // One that does not cannot reach it, and records nothing.
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).expect("dir");
    let other = start_agent(&b_dir, AgentOptions::default());
    let mut c = common::storage_client(&other, Some(common::session(&other))).await;
    let e = c
        .add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: "tls-store".into(),
            url: store_url,
            ..Default::default()
        })
        .await
        .expect_err("untrusted store");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let n = c.query_backup_storage(pb::QueryBackupStorageRequest::default()).await.expect("query").into_inner();
    assert!(n.inventories.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_maps_client_certificates_to_principals() {
    use vmbackup_proto::store::v1 as spb;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    let store_config = dir.path().join("store.toml");
    std::fs::write(
        &store_config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n[auth]\n[[auth.principal]]\nname = \"host-1\"\nroles = [\"writer\", \"reader\"]\nnamespace = \"host-1\"\ncert_cn = \"kvm-host-1\"\n",
            p.server_cert.display().to_string(),
            p.server_key.display().to_string(),
            p.ca.display().to_string()
        ),
    )
    .expect("store config");
    let store = start_store_with_config(dir.path(), "store", Some(&store_config));
    let url = format!("https://{}", store.addr);
    let status = |ch: Channel, bearer: Option<String>| async move {
        let mut c = spb::image_store_client::ImageStoreClient::with_interceptor(ch, Auth(bearer));
        c.status(spb::StatusRequest {}).await.map(tonic::Response::into_inner)
    };
    // The mapped certificate is the principal host-1.
    let ch = tls_channel(&url, Some(&p.ca), Some((&p.host_cert, &p.host_key))).await.expect("connect");
    let st = status(ch.clone(), None).await.expect("mapped certificate");
    assert_eq!((st.principal.as_str(), st.namespace.as_str()), ("host-1", "host-1"));
    // A token that is present wins: a wrong one is refused even with a good certificate.
    let e = status(ch, Some("Bearer vmbt_wrong".into())).await.expect_err("wrong token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // A certificate the CA signed but no principal names is refused.
    let ch = tls_channel(&url, Some(&p.ca), Some((&p.client_cert, &p.client_key))).await.expect("connect");
    let e = status(ch, None).await.expect_err("unmapped certificate");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("not mapped"), "{e:?}");

    // An agent whose client certificate is host-1 adds and uses the store with no token.
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&a_dir).expect("dir");
    let write = |name: &str, text: &str| {
        let path = a_dir.join(name);
        std::fs::write(&path, text).expect("pem");
        path.display().to_string()
    };
    let (cert, key) = (write("host.pem", &p.host_cert), write("host.key", &p.host_key));
    let agent_config = a_dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!("[store_tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n", p.ca.display().to_string()),
    )
    .expect("agent config");
    let agent = start_agent(&a_dir, AgentOptions { embedded_store: false, config: Some(agent_config) });
    let mut c = common::storage_client(&agent, Some(common::session(&agent))).await;
    c.add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
        name: "mtls-store".into(),
        url,
        ..Default::default()
    })
    .await
    .expect("add with a client certificate only");
}
