//! A backup served as a disk at once (ExportVmBackup): QEMU's own tools read the NBD export
//! and find it identical to the source, holes report as holes, and a chunk damaged on the
//! store makes the read fail instead of returning wrong data.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::{AgentOptions, run_tool, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;

const VM: &str = "6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d";
const ROOT: &str = "7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e";
const MIB: u64 = 1 << 20;

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// An 8 MiB raw image with data in [0, 1 MiB) and [3 MiB, 4 MiB), holes elsewhere.
fn sparse_image(path: &Path) {
    let mut f = std::fs::File::create(path).expect("image");
    f.set_len(8 * MIB).expect("size");
    f.write_all(&common::pseudo_random(1, 1 << 20)).expect("first MiB");
    f.seek(SeekFrom::Start(3 * MIB)).expect("seek");
    f.write_all(&common::pseudo_random(2, 1 << 20)).expect("fourth MiB");
    f.sync_all().expect("sync");
}

async fn export(c: &mut common::BackupClient, group: &str, bs: &str) -> pb::VmBackupExportInventory {
    c.export_vm_backup(pb::ExportVmBackupRequest {
        group_uuid: group.into(),
        volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.into(),
        ..Default::default()
    })
    .await
    .expect("export")
    .into_inner()
}

/// A store, an agent, and a backup of the sparse image on it.
struct Backed {
    dir: tempfile::TempDir,
    img: std::path::PathBuf,
    store: common::Daemon,
    agent: common::Daemon,
    bs: String,
    group: String,
}

async fn backed_up() -> Backed {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("root.raw");
    sparse_image(&img);
    let store = start_store(dir.path(), "s");
    let agent = start_agent(dir.path(), AgentOptions::default());
    let bs = common::add_storage(&agent, &store, "s").await;
    let group = common::backup_client(&agent)
        .await
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs.clone(),
            name: "x".into(),
            vm: Some(common::one_volume_vm(VM, ROOT, &img, "raw")),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories[0]
        .group_uuid
        .clone();
    Backed { dir, img, store, agent, bs, group }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exported_backup_reads_identical_keeps_its_holes_and_never_returns_damaged_data() {
    let Backed { dir: _dir, img, store, agent, bs, group } = backed_up().await;
    let mut c = common::backup_client(&agent).await;

    let e = export(&mut c, &group, &bs).await;
    assert_eq!(e.size, 8 << 20);
    assert_eq!(e.uri, format!("nbd+unix:///{ROOT}?socket={}", e.socket_path));
    let mode = std::fs::metadata(&e.socket_path).expect("socket").permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600, "root only");

    // Identical to the source, read through QEMU's NBD client.
    let same = run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &p(&img), &e.uri]);
    assert!(same.contains("identical"), "{same}");
    // Holes are holes: only the two MiB with data are data.
    let map: serde_json::Value =
        serde_json::from_str(&run_tool("qemu-img", &["map", "--output=json", "-f", "raw", &e.uri])).expect("map");
    let data: Vec<(u64, u64)> = map
        .as_array()
        .expect("extents")
        .iter()
        .filter(|x| x["data"] == true)
        .map(|x| (x["start"].as_u64().expect("start"), x["length"].as_u64().expect("length")))
        .collect();
    assert_eq!(data, [(0, MIB), (3 * MIB, MIB)], "{map}");
    // Read-only.
    let w = Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 64k", &e.uri]).output().expect("qemu-io");
    let out = format!("{}{}", String::from_utf8_lossy(&w.stdout), String::from_utf8_lossy(&w.stderr));
    assert!(
        !w.status.success() || out.contains("failed") || out.contains("read-only") || out.contains("Read-only"),
        "{out}"
    );

    // Listed, then stopped: the socket goes.
    let listed =
        c.query_vm_backup_export(pb::QueryVmBackupExportRequest {}).await.expect("list").into_inner().inventories;
    assert_eq!(listed, std::slice::from_ref(&e));
    c.stop_vm_backup_export(pb::StopVmBackupExportRequest { uuid: e.uuid.clone() }).await.expect("stop");
    for _ in 0..100 {
        if !Path::new(&e.socket_path).exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!Path::new(&e.socket_path).exists(), "the socket goes with the export");
    let e2 = c.stop_vm_backup_export(pb::StopVmBackupExportRequest { uuid: e.uuid.clone() }).await.expect_err("gone");
    assert_eq!(e2.code(), tonic::Code::NotFound);

    // Damage the first chunk on the store: a read of it fails and says so; nothing else
    // is served in its place.
    let first = std::fs::read(&img).expect("image")[..64 << 10].to_vec();
    let hex = vmbackup_proto::Digest::of(&first).to_hex();
    let chunk = store.data_dir.join("chunks").join(&hex[..4]).join(&hex);
    let mut blob = std::fs::read(&chunk).expect("stored chunk");
    let last = blob.len() - 1;
    blob[last] ^= 0x5a;
    std::fs::write(&chunk, &blob).expect("damage");
    let e = export(&mut c, &group, &bs).await;
    let r =
        Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0 0 64k", &e.uri]).output().expect("qemu-io");
    let out = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    assert!(out.contains("Input/output error"), "{out}");
    let undamaged =
        Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0 2M 64k", &e.uri]).output().expect("qemu-io");
    let out = String::from_utf8_lossy(&undamaged.stdout);
    assert!(out.contains("read 65536/65536 bytes"), "a hole still reads: {out}");
    assert!(agent.log_text().contains(&format!("chunk {hex}")), "the agent names the damaged chunk");
}

/// A CA, the agent's certificate for 127.0.0.1, and QEMU client credential directories
/// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`): one signed by the CA, one by a
/// stranger's CA. Returns the agent's `[exports]` settings and the two directories.
fn export_pki(dir: &Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let ca = |cn: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("ca")
    };
    let leaf = |names: Vec<String>, cn: &str, issuer: &CertifiedIssuer<'_, KeyPair>| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        (params.signed_by(&key, issuer).expect("sign").pem(), key.serialize_pem())
    };
    let (good_ca, stranger_ca) = (ca("site CA"), ca("stranger CA"));
    let write = |path: std::path::PathBuf, text: &str| {
        std::fs::write(&path, text).expect("write pem");
        path
    };
    let (cert, key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], "kvm-host", &good_ca);
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).expect("mkdir");
    let settings = format!(
        "[exports]\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n",
        p(&write(pki.join("agent.pem"), &cert)),
        p(&write(pki.join("agent.key"), &key)),
        p(&write(pki.join("ca.pem"), &good_ca.pem())),
    );
    // QEMU checks its own certificate against its CA file before connecting, so the
    // stranger's file holds both CAs: the agent's certificate verifies, and the refusal is
    // the agent's.
    let client = |name: &str, issuer: &CertifiedIssuer<'_, KeyPair>, cas: String| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        let (c, k) = leaf(vec![name.into()], name, issuer);
        write(d.join("ca-cert.pem"), &cas);
        write(d.join("client-cert.pem"), &c);
        write(d.join("client-key.pem"), &k);
        d
    };
    (
        settings,
        client("operator", &good_ca, good_ca.pem()),
        client("stranger", &stranger_ca, format!("{}{}", stranger_ca.pem(), good_ca.pem())),
    )
}

/// `qemu-img <command> <args>` reading the TCP export through TLS credentials in `creds`.
fn qemu_img_tls(creds: &Path, command: &str, args: &[&str]) -> std::process::Output {
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,verify-peer=on,dir={}", p(creds));
    let mut all = vec![command, "--object", object.as_str()];
    all.extend_from_slice(args);
    Command::new("qemu-img").args(&all).output().expect("qemu-img")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_export_is_served_only_inside_tls_to_clients_the_site_ca_signed() {
    let Backed { dir, img, store: _store, mut agent, bs, group } = backed_up().await;
    let mut c = common::backup_client(&agent).await;
    let tcp = |listen: &str| pb::ExportVmBackupRequest {
        group_uuid: group.clone(),
        volume_uuid: ROOT.into(),
        backup_storage_uuid: bs.clone(),
        listen_address: listen.into(),
        ..Default::default()
    };

    // Without TLS settings a TCP export is refused, naming what to set; a bad address too.
    let e = c.export_vm_backup(tcp("127.0.0.1:0")).await.expect_err("no TLS configured");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("listenAddress") && e.message().contains("tls_client_ca"), "{e:?}");
    let e = c.export_vm_backup(tcp("localhost")).await.expect_err("not ip:port");
    assert!(e.message().contains("listenAddress"), "{e:?}");

    let (settings, operator, stranger) = export_pki(dir.path());
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, settings).expect("config");
    agent.stop();
    agent = start_agent(dir.path(), AgentOptions { config: Some(config), ..Default::default() });
    let mut c = common::backup_client(&agent).await;
    let e = c.export_vm_backup(tcp("127.0.0.1:0")).await.expect("tcp export").into_inner();
    assert!(e.socket_path.is_empty(), "{e:?}");
    let port = e.tcp_address.strip_prefix("127.0.0.1:").expect("bound on loopback");
    assert_eq!(e.uri, format!("nbds://{}/{ROOT}", e.tcp_address));
    // A peer that connects and never starts TLS is disconnected after the handshake
    // deadline instead of holding the connection (awaited at the end).
    let silent = {
        let addr = e.tcp_address.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut conn = tokio::net::TcpStream::connect(&addr).await.expect("connect");
            let mut greeting = [0u8; 18];
            conn.read_exact(&mut greeting).await.expect("the server's greeting");
            let mut rest = Vec::new();
            tokio::time::timeout(std::time::Duration::from_secs(120), conn.read_to_end(&mut rest)).await
        })
    };
    let image = format!("driver=nbd,host=127.0.0.1,port={port},export={ROOT},tls-creds=tls0");
    let source = format!("driver=raw,file.driver=file,file.filename={}", p(&img));

    // A client with a certificate from the site CA reads it identical, holes as holes.
    let same = qemu_img_tls(&operator, "compare", &["--image-opts", &image, &source]);
    let out = String::from_utf8_lossy(&same.stdout);
    assert!(same.status.success() && out.contains("identical"), "{out}{}", String::from_utf8_lossy(&same.stderr));
    let map = qemu_img_tls(&operator, "map", &["--output=json", "--image-opts", &image]);
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).expect("map");
    let data = map.as_array().expect("extents").iter().filter(|x| x["data"] == true).count();
    assert_eq!(data, 2, "{map}");

    // Plain NBD is answered "TLS required"; a stranger's certificate fails the handshake.
    let plain =
        Command::new("qemu-img").args(["info", &format!("nbd://127.0.0.1:{port}/{ROOT}")]).output().expect("qemu-img");
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success() && err.contains("TLS"), "{err}");
    let rogue = qemu_img_tls(&stranger, "info", &["--image-opts", &image]);
    assert!(!rogue.status.success(), "{}", String::from_utf8_lossy(&rogue.stdout));
    // And a client without a certificate.
    let anonymous = dir.path().join("anonymous");
    std::fs::create_dir_all(&anonymous).expect("mkdir");
    std::fs::copy(operator.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).expect("ca");
    let nobody = qemu_img_tls(&anonymous, "info", &["--image-opts", &image]);
    assert!(!nobody.status.success(), "{}", String::from_utf8_lossy(&nobody.stdout));
    let mut logged = false;
    for _ in 0..100 {
        logged = agent.log_text().contains("TLS handshake");
        if logged {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(logged, "the agent logs the refused handshake: {}", agent.log_text());
    let closed = silent.await.expect("silent peer");
    assert!(matches!(closed, Ok(Ok(0))), "a silent peer is disconnected: {closed:?}");
}
