//! Volume roots with a real agent: a volume outside `[volumes] roots` is refused with
//! INVALID_ARGUMENT naming the field and the path, and is never opened (a FIFO there would
//! block the agent); a restore target outside them, through a symlinked parent or a `..`
//! out of them, is refused and nothing appears there; a qcow2 image inside the roots whose
//! backing file lies outside is refused before its data is read; a reload that narrows the
//! roots stops backups and reverts of paths registered earlier.

mod common;

use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{AgentOptions, BackupClient, Daemon, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;

const VM: &str = "7a1b2c3d4e5f60718293a4b5c6d7e8f9";
const ROOT: &str = "8b2c3d4e5f60718293a4b5c6d7e8f90a";

/// A test's directories: `images` is the only configured root; the agent's own directory
/// (which the harness makes a root) is beside it; `outside` is no root at all.
struct Dirs {
    _tmp: tempfile::TempDir,
    _other: tempfile::TempDir,
    images: PathBuf,
    outside: PathBuf,
    config: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().expect("tempdir");
    let other = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).expect("images");
    std::fs::create_dir(tmp.path().join("agent-home")).expect("agent home");
    let config = tmp.path().join("agent.toml");
    write_roots(&config, &[&images]);
    let outside = other.path().to_path_buf();
    Dirs { _tmp: tmp, _other: other, images, outside, config }
}

fn write_roots(config: &Path, roots: &[&Path]) {
    let list: Vec<String> = roots.iter().map(|r| format!("{:?}", r.display().to_string())).collect();
    std::fs::write(config, format!("[volumes]\nroots = [{}]\ndevice_roots = []\n", list.join(", "))).expect("config");
}

fn agent(d: &Dirs) -> Daemon {
    let home = d.config.parent().expect("parent").join("agent-home");
    start_agent(&home, AgentOptions { config: Some(d.config.clone()), ..Default::default() })
}

/// Asserts an INVALID_ARGUMENT on `field` whose message names `path` (and `also`).
fn assert_refused(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str, path: &Path, also: &str) {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let code = vmbackup_agent::api::error_code_of(&e).expect("ErrorCode");
    assert_eq!(code.opaque.get("field").map(String::as_str), Some(field), "{e:?}");
    assert!(e.message().contains(&path.display().to_string()), "{} does not name {}", e.message(), path.display());
    assert!(e.message().contains(also), "{} does not say {also:?}", e.message());
}

fn backup(storage: &str, vm: Option<pb::RegisterVmRequest>) -> pb::CreateVmBackupRequest {
    pb::CreateVmBackupRequest {
        root_volume_uuid: ROOT.into(),
        backup_storage_uuid: storage.into(),
        name: "b".into(),
        vm,
        ..Default::default()
    }
}

/// Whether some process has the FIFO open for reading (a writer's non-blocking open
/// succeeds only then).
fn fifo_has_reader(fifo: &Path) -> bool {
    std::fs::OpenOptions::new().write(true).custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits()).open(fifo).is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_outside_the_roots_are_refused_before_they_are_opened() {
    let d = dirs();
    let fifo = d.outside.join("vol.raw");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let store = start_store(&d.outside, "store");
    let agent = agent(&d);
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;

    // Opening the FIFO would block the backup until a writer comes: the timeout catches it.
    let vm = common::one_volume_vm(VM, ROOT, &fifo, "raw");
    let r = tokio::time::timeout(Duration::from_secs(20), c.create_vm_backup(backup(&bs, Some(vm.clone()))))
        .await
        .expect("the agent hung: it opened the FIFO outside the roots");
    assert_refused(r, "volumes", &fifo, "not under a volume root");
    assert!(!fifo_has_reader(&fifo), "the agent has the FIFO open");

    // The same through a symlink under the root, and through a `..` out of it.
    let link = d.images.join("link.raw");
    symlink(&fifo, &link).expect("symlink");
    let mut vm_link = vm.clone();
    vm_link.volumes[0].install_path = link.display().to_string();
    let r = tokio::time::timeout(Duration::from_secs(20), c.create_vm_backup(backup(&bs, Some(vm_link))))
        .await
        .expect("the agent hung: it followed the symlink to the FIFO");
    assert_refused(r, "volumes", &link, "resolves to");
    let dotdot = d.images.join("../..").join(d.outside.file_name().expect("name")).join("vol.raw");
    let mut vm_dotdot = vm.clone();
    vm_dotdot.volumes[0].install_path = dotdot.display().to_string();
    let mut vms = pb::vm_service_client::VmServiceClient::with_interceptor(
        common::channel(&agent.url()).await,
        common::Auth(Some(format!("OAuth {}", common::session(&agent)))),
    );
    let r = tokio::time::timeout(Duration::from_secs(20), vms.register_vm(vm_dotdot)).await.expect("no hang");
    assert_refused(r, "volumes", &dotdot, "not under a volume root");
    assert!(!fifo_has_reader(&fifo), "the agent has the FIFO open");

    // Nothing was registered, nothing reached the store.
    let listed = vms.query_vm(pb::QueryVmRequest::default()).await.expect("query").into_inner();
    assert!(listed.inventories.is_empty(), "{listed:?}");
    assert_eq!(common::chunks_uploaded(&store).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_whose_backing_file_lies_outside_the_roots_is_not_read() {
    let d = dirs();
    let base = d.outside.join("base.raw");
    std::fs::write(&base, common::pseudo_random(9, 1 << 20)).expect("base");
    let top = d.images.join("top.qcow2");
    let (b, t) = (base.display().to_string(), top.display().to_string());
    common::run_tool("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", &t, "1M"]);
    let store = start_store(&d.outside, "store");
    let agent = agent(&d);
    let bs = common::add_storage(&agent, &store, "s").await;
    let mut c = common::backup_client(&agent).await;
    let vm = common::one_volume_vm(VM, ROOT, &top, "qcow2");
    assert_refused(c.create_vm_backup(backup(&bs, Some(vm))).await, "rootVolumeUuid", &base, "its image names");
    assert_eq!(common::chunks_uploaded(&store).await, 0, "the backing file's data was sent");
}

/// Backs up `images/root.raw` once; returns the storage and the group.
async fn backed_up(agent: &Daemon, store: &Daemon, c: &mut BackupClient, img: &Path) -> (String, String) {
    std::fs::write(img, common::pseudo_random(7, 1 << 20)).expect("image");
    let bs = common::add_storage(agent, store, "s").await;
    let vm = common::one_volume_vm(VM, ROOT, img, "raw");
    let done = c.create_vm_backup(backup(&bs, Some(vm))).await.expect("backup inside the roots").into_inner();
    (bs, done.inventories[0].group_uuid.clone())
}

fn restore_to(bs: &str, group: &str, path: &Path) -> pb::RestoreVmBackupRequest {
    pb::RestoreVmBackupRequest {
        group_uuid: group.into(),
        backup_storage_uuid: bs.into(),
        targets: vec![pb::RestoreTarget {
            volume_uuid: ROOT.into(),
            install_path: path.display().to_string(),
            format: "raw".into(),
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_targets_outside_the_roots_are_refused_and_nothing_is_created() {
    let d = dirs();
    let store = start_store(&d.outside, "store");
    let agent = agent(&d);
    let mut c = common::backup_client(&agent).await;
    let (bs, group) = backed_up(&agent, &store, &mut c, &d.images.join("root.raw")).await;

    let outside = d.outside.join("restored.raw");
    assert_refused(c.restore_vm_backup(restore_to(&bs, &group, &outside)).await, "targets", &outside, "targets[0]");
    // A parent that is a symlink out of the roots.
    symlink(&d.outside, d.images.join("out")).expect("symlink");
    let via_link = d.images.join("out").join("restored.raw");
    assert_refused(c.restore_vm_backup(restore_to(&bs, &group, &via_link)).await, "targets", &via_link, "resolves to");
    // A `..` out of the root, through a directory that does not exist yet.
    let escape = d.images.join("new/../..").join(d.outside.file_name().expect("name")).join("restored.raw");
    assert_refused(c.restore_vm_backup(restore_to(&bs, &group, &escape)).await, "targets", &escape, "");
    let names: Vec<_> = std::fs::read_dir(&d.outside).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert!(!names.iter().any(|n| n.to_string_lossy().contains("restored")), "created outside: {names:?}");

    // Inside the roots it works, through a symlink that stays inside too.
    std::fs::create_dir(d.images.join("real")).expect("mkdir");
    symlink(d.images.join("real"), d.images.join("alias")).expect("symlink");
    c.restore_vm_backup(restore_to(&bs, &group, &d.images.join("alias/restored.raw"))).await.expect("inside");
    assert_eq!(
        std::fs::read(d.images.join("real/restored.raw")).expect("restored"),
        std::fs::read(d.images.join("root.raw")).expect("image")
    );
}

/// Sends SIGHUP and waits for the agent to log one more "configuration reloaded".
async fn reload(agent: &Daemon) {
    let before = agent.log_text().matches("configuration reloaded").count();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.pid()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.log_text().matches("configuration reloaded").count() == before {
        assert!(Instant::now() < deadline, "no reload logged:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn narrowing_the_roots_on_reload_stops_backups_and_reverts_of_registered_paths() {
    let d = dirs();
    let store = start_store(&d.outside, "store");
    let agent = agent(&d);
    let mut c = common::backup_client(&agent).await;
    let img = d.images.join("root.raw");
    let (bs, group) = backed_up(&agent, &store, &mut c, &img).await;
    let before = std::fs::read(&img).expect("image");
    let chunks = common::chunks_uploaded(&store).await;

    write_roots(&d.config, &[]);
    reload(&agent).await;
    assert_refused(c.create_vm_backup(backup(&bs, None)).await, "rootVolumeUuid", &img, "not under a volume root");
    let revert = pb::RestoreVmBackupRequest {
        group_uuid: group.clone(),
        backup_storage_uuid: bs.clone(),
        revert: true,
        ..Default::default()
    };
    std::fs::write(&img, b"changed").expect("change the volume");
    assert_refused(c.restore_vm_backup(revert.clone()).await, "revert", &img, "not under a volume root");
    assert_eq!(std::fs::read(&img).expect("image"), b"changed", "the revert wrote the volume");
    assert_eq!(common::chunks_uploaded(&store).await, chunks, "the backup sent chunks");

    // Widened again, both work.
    write_roots(&d.config, &[&d.images]);
    reload(&agent).await;
    c.restore_vm_backup(revert).await.expect("revert inside the roots");
    assert_eq!(std::fs::read(&img).expect("image"), before);
    c.create_vm_backup(backup(&bs, None)).await.expect("backup inside the roots");
}
