//! Client-side encryption end to end: key files made by `vmbackupctl key`, a storage added
//! with `backup::encryption::key::<name>`, real agents and stores. What leaves the host is
//! sealed (no plaintext of a known pattern anywhere in the store's files, while a plain
//! storage shows it), restores are bit-identical, a sealed chunk cannot be planted under a
//! plain chunk's name, a flipped chunk is caught by the tag, a wrong key fails before
//! anything is written, and a changed passphrase keeps every backup restorable.

mod common;

use std::path::{Path, PathBuf};

use common::{AgentOptions, Daemon, bin, start_agent, start_store_with_config};
use vmbackup_proto::Digest;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::store::v1 as store_pb;

const VM: &str = "7a1f0e8a7b2d4e6f8a9b0c1d2e3f4a5b";
const ROOT: &str = "8b2a1f9b8c3e4d7a9b0c1e2f3a4b5c6d";
const PATTERN: &[u8] = b"VMBACKUP-KNOWN-PLAINTEXT-PATTERN";
const MIB: usize = 1 << 20;

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn ctl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("vmbackupctl")).args(args).output().expect("run vmbackupctl")
}

fn ctl_ok(args: &[&str]) -> String {
    let out = ctl(args);
    assert!(out.status.success(), "vmbackupctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Every regular file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Files under `dir` that contain `needle`.
fn holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files(dir).into_iter().filter(|f| contains(&std::fs::read(f).unwrap_or_default(), needle)).collect()
}

/// CRC-32C (Castagnoli), bitwise: to re-frame a tampered chunk so only the tag can catch it.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

struct Site {
    dir: tempfile::TempDir,
    volume: PathBuf,
    sealed_store: Daemon,
    plain_store: Daemon,
    spare_store: Daemon,
    agent: Daemon,
}

impl Site {
    fn key_dir(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    fn agent_config(&self, key_file: &Path, passphrase_file: &Path) -> PathBuf {
        let config = self.dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!("[keys.site]\nfile = \"{}\"\npassphrase_file = \"{}\"\n", p(key_file), p(passphrase_file)),
        )
        .expect("agent config");
        config
    }

    fn restart_agent(&mut self, key_file: &Path, passphrase_file: &Path) {
        let config = self.agent_config(key_file, passphrase_file);
        self.agent.stop();
        self.agent = start_agent(self.dir.path(), AgentOptions { config: Some(config), ..Default::default() });
    }
}

async fn site() -> Site {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).expect("mkdir");
    write_private(&keys.join("pass"), "first passphrase\n");
    write_private(&keys.join("recovery"), "offline recovery passphrase\n");
    let shown = ctl_ok(&[
        "key",
        "create",
        "--file",
        &p(&keys.join("site.key")),
        "--passphrase-file",
        &p(&keys.join("pass")),
        "--recovery-passphrase-file",
        &p(&keys.join("recovery")),
    ]);
    assert!(shown.contains("recovery"), "{shown}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(keys.join("site.key")).expect("key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key files are private");
    }

    // 2 MiB of a repeated known pattern (compressible: zstd keeps it once, in clear, in a
    // plain blob) and 2 MiB of pseudo-random data, with a hole between.
    let volume = dir.path().join("root.raw");
    let mut data = vec![0u8; 8 * MIB];
    for (i, b) in data[..2 * MIB].iter_mut().enumerate() {
        *b = PATTERN[i % PATTERN.len()];
    }
    data[5 * MIB..7 * MIB].copy_from_slice(&common::pseudo_random(7, 2 * MIB));
    std::fs::write(&volume, &data).expect("volume");

    // Stores as shipped: sealed chunks need no setting.
    let sealed_store = start_store_with_config(dir.path(), "sealed", None);
    let plain_store = start_store_with_config(dir.path(), "plain", None);
    let spare_store = start_store_with_config(dir.path(), "strict", None);
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[keys.site]\nfile = \"{}\"\npassphrase_file = \"{}\"\n",
            p(&keys.join("site.key")),
            p(&keys.join("pass"))
        ),
    )
    .expect("agent config");
    let agent = start_agent(dir.path(), AgentOptions { config: Some(config), ..Default::default() });
    Site { dir, volume, sealed_store, plain_store, spare_store, agent }
}

async fn add(
    agent: &Daemon,
    store: &Daemon,
    name: &str,
    key: Option<&str>,
) -> Result<pb::BackupStorageInventory, tonic::Status> {
    common::storage_client(agent, Some(common::session(agent)))
        .await
        .add_image_store_backup_storage(pb::AddImageStoreBackupStorageRequest {
            name: name.into(),
            url: store.url(),
            token: common::store_token(store),
            system_tags: key.map(|k| format!("backup::encryption::key::{k}")).into_iter().collect(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().inventory.expect("inventory"))
}

async fn backup(agent: &Daemon, volume: &Path, storage: &str) -> Result<String, tonic::Status> {
    let vm = common::one_volume_vm(VM, ROOT, volume, "raw");
    common::backup_client(agent)
        .await
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: storage.into(),
            name: "payroll-nightly".into(),
            description: "quarterly payroll database".into(),
            vm: Some(vm),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().inventories[0].group_uuid.clone())
}

async fn restore(agent: &Daemon, group: &str, storage: &str, to: &Path) -> Result<(), tonic::Status> {
    common::backup_client(agent)
        .await
        .restore_vm_backup(pb::RestoreVmBackupRequest {
            group_uuid: group.into(),
            backup_storage_uuid: storage.into(),
            targets: vec![pb::RestoreTarget { volume_uuid: ROOT.into(), install_path: p(to), format: "raw".into() }],
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_backups_seal_what_leaves_the_host_and_restore_only_with_their_key() {
    let mut s = site().await;
    let original = std::fs::read(&s.volume).expect("volume");

    // A storage bound to the key reports its id; plain and sealed storages side by side.
    let sealed = add(&s.agent, &s.sealed_store, "sealed", Some("site")).await.expect("add encrypted storage");
    assert_eq!(sealed.encryption_key_id.len(), 32, "{sealed:?}");
    let plain = add(&s.agent, &s.plain_store, "plain", None).await.expect("add plain storage");
    assert_eq!(plain.encryption_key_id, "");
    // A key the agent does not have is refused when the storage is added.
    let e = add(&s.agent, &s.spare_store, "nokey", Some("absent")).await.expect_err("unknown key");
    assert!(e.message().contains("[keys.absent]"), "{e:?}");

    let g_sealed = backup(&s.agent, &s.volume, &sealed.uuid).await.expect("encrypted backup");
    let g_plain = backup(&s.agent, &s.volume, &plain.uuid).await.expect("plain backup");

    // The plain store holds the pattern and the names in clear (so the scan below can
    // fail); the sealed store holds none of it, nor the name and description.
    let plain_dir = s.plain_store.data_dir.clone();
    assert!(!holding(&plain_dir, PATTERN).is_empty(), "control: a plain store keeps compressible text readable");
    assert!(!holding(&plain_dir, b"payroll").is_empty(), "control: plain manifests name the backup");
    let sealed_dir = s.sealed_store.data_dir.clone();
    assert!(files(&sealed_dir.join("chunks")).len() >= 2, "chunks were written");
    for needle in [PATTERN, b"payroll".as_slice(), b"quarterly".as_slice()] {
        let found = holding(&sealed_dir, needle);
        assert!(found.is_empty(), "{} in {found:?}", String::from_utf8_lossy(needle));
    }
    // Keyed chunk names: the plain store's chunk names appear nowhere on the sealed store.
    let plain_names: Vec<String> = files(&plain_dir.join("chunks"))
        .iter()
        .map(|f| f.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    for f in files(&sealed_dir.join("chunks")) {
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        assert!(!plain_names.contains(&name), "chunk {name} has the same name sealed and plain");
    }

    // Restores are bit-identical, from both.
    let out = s.dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    restore(&s.agent, &g_sealed, &sealed.uuid, &out.join("a.raw")).await.expect("restore sealed");
    assert!(std::fs::read(out.join("a.raw")).expect("restored") == original, "sealed restore differs");
    restore(&s.agent, &g_plain, &plain.uuid, &out.join("b.raw")).await.expect("restore plain");
    assert!(std::fs::read(out.join("b.raw")).expect("restored") == original, "plain restore differs");

    // A writer cannot plant a sealed chunk (which no store can open) under the plain name of
    // content another writer will back up: the store sees the name is not the one the sealed
    // header derives, refuses it, and the plain name stays missing.
    let sealed_blob = std::fs::read(&files(&sealed_dir.join("chunks"))[0]).expect("a sealed chunk");
    let victim = Digest::of(&common::pseudo_random(99, 64 << 10));
    let mut c = common::store_client(&s.spare_store).await;
    let session = common::store_calls::session(&mut c).await;
    let upload =
        store_pb::UploadChunk { session_id: session.clone(), digest: victim.0.to_vec(), blob: sealed_blob.into() };
    let e = c.upload_chunks(tokio_stream::iter([upload])).await.expect_err("planting refused");
    assert!(e.message().contains("not stored under its name") && e.message().contains(&victim.to_hex()), "{e:?}");
    let missing = c
        .missing_chunks(store_pb::MissingChunksRequest { session_id: session, digests: vec![victim.0.to_vec()] })
        .await
        .expect("missing")
        .into_inner()
        .missing;
    assert_eq!(missing, vec![victim.0.to_vec()], "nothing was stored under the plain name");

    // Another host with the key (and only the key) syncs the sealed manifests into its
    // catalog, names included, and restores the backup.
    let host2 = s.dir.path().join("host2");
    std::fs::create_dir(&host2).expect("mkdir");
    let config2 = s.agent_config(&s.key_dir().join("site.key"), &s.key_dir().join("pass"));
    let mut agent2 = start_agent(&host2, AgentOptions { config: Some(config2), ..Default::default() });
    let sealed2 = add(&agent2, &s.sealed_store, "sealed", Some("site")).await.expect("add on host 2");
    let mut c2 = common::backup_client(&agent2).await;
    c2.sync_vm_backup(pb::SyncVmBackupRequest { image_store_uuid: sealed2.uuid.clone(), ..Default::default() })
        .await
        .expect("sync");
    let synced = c2
        .query_volume_backup(pb::QueryVolumeBackupRequest {
            conditions: vec![format!("groupUuid={g_sealed}")],
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner()
        .inventories;
    assert_eq!(synced.len(), 1, "{synced:?}");
    assert!(synced[0].name.contains("payroll-nightly"), "{:?}", synced[0].name);
    restore(&agent2, &g_sealed, &sealed2.uuid, &host2.join("restored.raw")).await.expect("restore on host 2");
    assert!(std::fs::read(host2.join("restored.raw")).expect("restored") == original, "host 2 restore differs");
    agent2.stop();

    // A password change keeps the key: the old backup restores with the new passphrase,
    // and the recovery passphrase can set one too.
    let keys = s.key_dir();
    write_private(&keys.join("pass2"), "second passphrase\n");
    ctl_ok(&[
        "key",
        "change-passphrase",
        "--file",
        &p(&keys.join("site.key")),
        "--passphrase-file",
        &p(&keys.join("recovery")),
        "--unlock-role",
        "recovery",
        "--new-passphrase-file",
        &p(&keys.join("pass2")),
    ]);
    let old = ctl(&[
        "key",
        "change-passphrase",
        "--file",
        &p(&keys.join("site.key")),
        "--passphrase-file",
        &p(&keys.join("pass")),
        "--new-passphrase-file",
        &p(&keys.join("pass2")),
    ]);
    assert!(!old.status.success(), "the old passphrase no longer unlocks the key");
    s.restart_agent(&keys.join("site.key"), &keys.join("pass2"));
    restore(&s.agent, &g_sealed, &sealed.uuid, &out.join("c.raw")).await.expect("restore after rotation");
    assert!(std::fs::read(out.join("c.raw")).expect("restored") == original, "restore after rotation differs");

    // A wrong passphrase, or another key under the same name, fails before anything is
    // written, naming what is wrong.
    s.restart_agent(&keys.join("site.key"), &keys.join("pass"));
    let e = restore(&s.agent, &g_sealed, &sealed.uuid, &out.join("d.raw")).await.expect_err("wrong passphrase");
    assert!(e.message().contains("wrong passphrase"), "{e:?}");
    assert!(!out.join("d.raw").exists());
    write_private(&keys.join("other-pass"), "other\n");
    ctl_ok(&[
        "key",
        "create",
        "--file",
        &p(&keys.join("other.key")),
        "--passphrase-file",
        &p(&keys.join("other-pass")),
    ]);
    s.restart_agent(&keys.join("other.key"), &keys.join("other-pass"));
    let e = restore(&s.agent, &g_sealed, &sealed.uuid, &out.join("d.raw")).await.expect_err("other key");
    assert!(e.message().contains(&sealed.encryption_key_id), "{e:?}");
    assert!(!out.join("d.raw").exists());

    // A chunk altered on the store, re-framed with a correct CRC so the store's own check
    // passes: the tag catches it, and the failed restore leaves no file.
    s.restart_agent(&keys.join("site.key"), &keys.join("pass2"));
    let chunk = files(&sealed_dir.join("chunks")).into_iter().next().expect("a chunk");
    let mut blob = std::fs::read(&chunk).expect("chunk");
    assert_eq!(&blob[..8], b"VMBKCHNK");
    assert_eq!(blob[8], 3, "sealed blobs are version 3");
    let last = blob.len() - 20;
    blob[last] ^= 0x01;
    let crc = crc32c(&blob[84..]);
    blob[20..24].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&chunk, &blob).expect("tamper");
    let e = restore(&s.agent, &g_sealed, &sealed.uuid, &out.join("e.raw")).await.expect_err("tampered chunk");
    assert!(e.message().contains("authentication tag"), "{e:?}");
    assert!(!out.join("e.raw").exists(), "a failed restore leaves no file");
}

async fn recover(agent: &Daemon, group: &str, from: &str, to: &str) -> Result<(), tonic::Status> {
    common::backup_client(agent)
        .await
        .recover_vm_backup_from_image_store_backup_storage(pb::RecoverVmBackupFromImageStoreBackupStorageRequest {
            group_uuid: group.into(),
            src_backup_storage_uuid: from.into(),
            dst_backup_storage_uuid: to.into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn recover_seals_again_with_the_destination_key_and_never_decrypts_onto_a_plain_storage() {
    let mut s = site().await;
    let original = std::fs::read(&s.volume).expect("volume");
    // A second key, beside the first, in the agent's configuration.
    let keys = s.key_dir();
    write_private(&keys.join("second-pass"), "second site passphrase\n");
    ctl_ok(&[
        "key",
        "create",
        "--file",
        &p(&keys.join("second.key")),
        "--passphrase-file",
        &p(&keys.join("second-pass")),
    ]);
    let config = s.agent_config(&keys.join("site.key"), &keys.join("pass"));
    let mut text = std::fs::read_to_string(&config).expect("config");
    text += &format!(
        "[keys.second]\nfile = \"{}\"\npassphrase_file = \"{}\"\n",
        p(&keys.join("second.key")),
        p(&keys.join("second-pass"))
    );
    std::fs::write(&config, text).expect("config");
    s.agent.stop();
    s.agent = start_agent(s.dir.path(), AgentOptions { config: Some(config), ..Default::default() });

    let plain = add(&s.agent, &s.plain_store, "plain", None).await.expect("add plain");
    let first = add(&s.agent, &s.sealed_store, "first", Some("site")).await.expect("add first");
    let second = add(&s.agent, &s.spare_store, "second", Some("second")).await.expect("add second");
    assert_ne!(first.encryption_key_id, second.encryption_key_id);
    let g = backup(&s.agent, &s.volume, &plain.uuid).await.expect("plain backup");

    // Plain to encrypted: sealed on the way, nothing readable on the destination.
    recover(&s.agent, &g, &plain.uuid, &first.uuid).await.expect("recover plain -> first");
    for needle in [PATTERN, b"payroll".as_slice(), b"quarterly".as_slice()] {
        let found = holding(&s.sealed_store.data_dir, needle);
        assert!(found.is_empty(), "{} in {found:?}", String::from_utf8_lossy(needle));
    }
    // One key to another: every chunk sealed again under the second key's names.
    recover(&s.agent, &g, &first.uuid, &second.uuid).await.expect("recover first -> second");
    let names = |d: &Path| -> Vec<std::ffi::OsString> {
        files(&d.join("chunks")).iter().map(|f| f.file_name().expect("name").to_owned()).collect()
    };
    let (first_names, second_names) = (names(&s.sealed_store.data_dir), names(&s.spare_store.data_dir));
    assert_eq!(first_names.len(), second_names.len(), "the same distinct chunks on both");
    assert!(first_names.iter().all(|n| !second_names.contains(n)), "no name is shared between the keys");
    for f in files(&s.spare_store.data_dir.join("chunks")) {
        let blob = std::fs::read(&f).expect("chunk");
        assert_eq!(blob[24..40], hex(&second.encryption_key_id), "sealed with the second key");
    }
    // Each copy restores alone, bit-identical.
    let out = s.dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    for (storage, file) in [(&first, "first.raw"), (&second, "second.raw")] {
        restore(&s.agent, &g, &storage.uuid, &out.join(file)).await.expect("restore");
        assert!(std::fs::read(out.join(file)).expect("restored") == original, "{file} differs");
    }
    // A second recover to the same storage adds nothing (same names: deduplicated).
    let before = names(&s.spare_store.data_dir).len();
    recover(&s.agent, &g, &first.uuid, &second.uuid).await.expect("recover again");
    assert_eq!(names(&s.spare_store.data_dir).len(), before);

    // Encrypted to plain would store the backup decrypted: refused, naming why.
    let e = recover(&s.agent, &g, &second.uuid, &plain.uuid).await.expect_err("decrypting recover");
    assert!(e.message().contains("decrypted") && e.message().contains(&second.encryption_key_id), "{e:?}");
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}
