//! File-level restore: files written into ext4 filesystems inside qcow2 volumes (a GPT
//! partition, and an MBR disk with two), backed up, then listed with their size, mode and
//! time and extracted byte-identical with `vmbackupctl backup files`, without restoring the
//! volume. The images are built without mounting (sfdisk, `mke2fs -d`).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::{AgentOptions, add_storage, backup_client, pseudo_random, run_tool, start_agent, start_store};
use vmbackup_proto::agent::v1 as pb;

const VM: &str = "2d9e4f6a1b0c4d5e8f7a6b5c4d3e2f10";
const ROOT: &str = "3e0f5a7b2c1d4e6f9a8b7c6d5e4f3a21";
/// A fixed modification time for the files the test writes.
const MTIME: i64 = 1_700_000_000;

fn sh(program: &str, args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} not found ({e}): install fdisk and e2fsprogs"));
    if let Some(text) = stdin {
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn touch(path: &Path) {
    sh("touch", &["-h", "-d", &format!("@{MTIME}"), &path.display().to_string()], None);
}

/// A tree with a small text file (mode 0640), a 5 MiB file spanning chunks, a symlink and a
/// nested directory; every mtime is [`MTIME`].
fn source_tree(dir: &Path) -> Vec<u8> {
    let etc = dir.join("etc");
    std::fs::create_dir_all(etc.join("deep/er")).expect("dirs");
    std::fs::write(etc.join("hosts"), b"127.0.0.1 localhost\n10.0.0.2 backup\n").expect("hosts");
    std::fs::set_permissions(etc.join("hosts"), std::fs::Permissions::from_mode(0o640)).expect("mode");
    let big: Vec<u8> = (0..5u64).flat_map(|i| pseudo_random(900 + i, 1 << 20)).collect();
    std::fs::write(etc.join("deep/er/big.bin"), &big).expect("big");
    std::os::unix::fs::symlink("hosts", etc.join("hosts.link")).expect("symlink");
    for p in ["etc/hosts", "etc/deep/er/big.bin", "etc/hosts.link", "etc/deep/er", "etc/deep", "etc"] {
        touch(&dir.join(p));
    }
    big
}

/// A raw disk of `size` MiB whose partitions (sfdisk script) each get an ext4 of `trees`.
fn disk(path: &Path, size_mib: u64, table: &str, parts: &[(u64, u64, &Path)]) {
    let f = std::fs::File::create(path).expect("disk");
    f.set_len(size_mib << 20).expect("size");
    drop(f);
    sh("sfdisk", &["-q", &path.display().to_string()], Some(table));
    for (start_mib, len_mib, tree) in parts {
        sh(
            "mke2fs",
            &[
                "-q",
                "-t",
                "ext4",
                "-E",
                &format!("offset={}", start_mib << 20),
                "-d",
                &tree.display().to_string(),
                &path.display().to_string(),
                &format!("{len_mib}M"),
            ],
            None,
        );
    }
}

/// Every entry beneath `path` of `source`, listed recursively over gRPC.
async fn list_all(
    c: &mut common::BackupClient,
    source: &pb::VmBackupFileSource,
    path: &str,
) -> Vec<pb::VmBackupFileInventory> {
    let req =
        pb::ListVmBackupFilesRequest { source: Some(source.clone()), path: path.into(), recursive: true, limit: 0 };
    let mut s = c.list_vm_backup_files(req).await.expect("list").into_inner();
    let mut entries = Vec::new();
    while let Some(e) = s.message().await.expect("entry") {
        entries.push(e);
    }
    entries
}

fn ctl(agent: &common::Daemon, args: &[&str]) -> std::process::Output {
    Command::new(common::bin("vmbackupctl"))
        .args(["--agent", &agent.url(), "--session", &common::session(agent)])
        .args(args)
        .output()
        .expect("run vmbackupctl")
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "vmbackupctl failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn files_in_an_ext4_partition_are_listed_and_extracted_without_a_restore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    let big = source_tree(&tree);
    let raw = dir.path().join("gpt.raw");
    disk(&raw, 64, "label: gpt\nstart=2048, size=65536, type=L\n", &[(1, 32, &tree)]);
    let vol = dir.path().join("vol.qcow2");
    run_tool("qemu-img", &["convert", "-O", "qcow2", &raw.display().to_string(), &vol.display().to_string()]);
    std::fs::remove_file(&raw).expect("rm raw");

    let (store, agent, group) = backed_up(dir.path(), &vol, "qcow2").await;
    let mut c = backup_client(&agent).await;
    let before: Vec<_> = walk(dir.path());

    // Listing over gRPC: sizes, modes, times and the link's target, found in partition 1.
    let source = pb::VmBackupFileSource { group_uuid: group.clone(), volume_uuid: ROOT.into(), ..Default::default() };
    let entries = list_all(&mut c, &source, "/etc").await;
    let find = |p: &str| entries.iter().find(|e| e.path == p).unwrap_or_else(|| panic!("{p} listed: {entries:?}"));
    let hosts = find("/etc/hosts");
    assert_eq!((hosts.r#type.as_str(), hosts.size, hosts.mode & 0o7777), ("file", 36, 0o640), "{hosts:?}");
    assert_eq!(hosts.modified.as_ref().map(|t| t.seconds), Some(MTIME), "{hosts:?}");
    assert_eq!(hosts.partition, 1);
    assert_eq!(find("/etc/deep/er/big.bin").size, 5 << 20);
    let link = find("/etc/hosts.link");
    assert_eq!((link.r#type.as_str(), link.link_target.as_str()), ("symlink", "hosts"));
    assert_eq!(find("/etc/deep").r#type, "directory");
    assert_eq!(entries.len(), 5, "{entries:?}");

    // The CLI lists and extracts one file and a whole tree, with modes and times.
    let text = ok(ctl(&agent, &["backup", "files", "list", &group, "--volume", ROOT, "--path", "/etc"]));
    assert!(text.contains("/etc/hosts.link -> hosts") && text.contains("640"), "{text}");
    let one = dir.path().join("hosts.out");
    ok(ctl(&agent, &["backup", "files", "get", &group, "--volume", ROOT, "--path", "/etc/hosts", "--out", &p(&one)]));
    assert_eq!(std::fs::read(&one).expect("hosts"), std::fs::read(tree.join("etc/hosts")).expect("source"));
    let m = std::fs::metadata(&one).expect("meta");
    assert_eq!((m.mode() & 0o7777, m.mtime()), (0o640, MTIME));
    let out = dir.path().join("etc.out");
    let text =
        ok(ctl(&agent, &["backup", "files", "get", &group, "--volume", ROOT, "--path", "/etc", "--out", &p(&out)]));
    assert!(text.contains("5 entries"), "{text}");
    assert!(std::fs::read(out.join("deep/er/big.bin")).expect("big") == big, "the 5 MiB file is identical");
    assert_eq!(std::fs::read_link(out.join("hosts.link")).expect("link"), Path::new("hosts"));
    assert_eq!(std::fs::metadata(out.join("deep")).expect("dir").mtime(), MTIME);

    // Nothing but the extracted files was written: no restore of the 64 MiB volume anywhere
    // (the daemons' own directories gain a few small files at most).
    let after = walk(dir.path());
    let new: Vec<_> = after.iter().filter(|(p, _)| !before.iter().any(|(q, _)| q == p)).collect();
    let daemons = [agent.data_dir.clone(), store.data_dir.clone()];
    assert!(
        new.iter().all(|(p, _)| p.starts_with(&one) || p.starts_with(&out) || daemons.iter().any(|d| p.starts_with(d))),
        "only the extracted files are new: {new:?}"
    );
    let written: u64 = new.iter().map(|(_, len)| len).sum();
    assert!(written < 6 << 20, "{written} bytes of new files: {new:?}");

    // A missing path and a file asked as a directory's child are clear errors.
    let e = c
        .list_vm_backup_files(pb::ListVmBackupFilesRequest {
            source: Some(source.clone()),
            path: "/nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("missing");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("/nope"), "{e:?}");
    let e = c
        .read_vm_backup_file(pb::ReadVmBackupFileRequest { source: Some(source), path: "/etc".into() })
        .await
        .expect_err("a directory");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_with_two_filesystems_needs_its_partition_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).expect("a");
    std::fs::create_dir_all(&b).expect("b");
    std::fs::write(a.join("which"), b"first\n").expect("a file");
    std::fs::write(b.join("which"), b"second partition\n").expect("b file");
    let raw = dir.path().join("mbr.raw");
    disk(
        &raw,
        40,
        "label: dos\nstart=2048, size=32768, type=83\nstart=36864, size=32768, type=83\n\
         start=71680, size=8192, type=8e\n",
        &[(1, 16, &a), (18, 16, &b)],
    );
    // Partition 3 is a damaged LVM physical volume: a label sector whose type is not LVM2's.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&raw).expect("open the disk");
        f.write_all_at(b"LABELONE", (35 << 20) + 512).expect("write the label");
    }
    let (_store, agent, group) = backed_up(dir.path(), &raw, "raw").await;
    let out = ctl(&agent, &["backup", "files", "list", &group, "--volume", ROOT]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1 (ext), 2 (ext), 3 (lvm, unreadable: LVM on partition 3: the label is not an LVM2 one")
            && err.contains("partition"),
        "{err}"
    );
    // The damaged volume is an error only where it is asked for ...
    let out = ctl(&agent, &["backup", "files", "list", &group, "--volume", ROOT, "--partition", "3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LVM on partition 3: the label is not an LVM2 one (type)") && !err.contains("(ext)"), "{err}");
    // ... and never hides the other partitions.
    let file = dir.path().join("which.out");
    let args = ["backup", "files", "get", &group, "--volume", ROOT, "--partition", "2", "--path", "/which", "--out"];
    ok(ctl(&agent, &[&args[..], &[&p(&file)]].concat()));
    assert_eq!(std::fs::read(&file).expect("which"), b"second partition\n");
}

/// A store and an agent under `dir`, and the group of one backup of the volume `img`.
async fn backed_up(dir: &Path, img: &Path, format: &str) -> (common::Daemon, common::Daemon, String) {
    let store = start_store(dir, "store");
    let agent = start_agent(dir, AgentOptions::default());
    let bs = add_storage(&agent, &store, "s").await;
    let group = backup_client(&agent)
        .await
        .create_vm_backup(pb::CreateVmBackupRequest {
            root_volume_uuid: ROOT.into(),
            backup_storage_uuid: bs,
            name: "files".into(),
            vm: Some(common::one_volume_vm(VM, ROOT, img, format)),
            ..Default::default()
        })
        .await
        .expect("backup")
        .into_inner()
        .inventories[0]
        .group_uuid
        .clone();
    (store, agent, group)
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Every file beneath `dir` with its length.
fn walk(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let path = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => out.extend(walk(&path)),
                Ok(_) => out.push((path.clone(), e.metadata().map_or(0, |m| m.len()))),
                Err(_) => {}
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn files_in_an_xfs_volume_are_listed_and_extracted_with_their_owner_and_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    let big = source_tree(&tree);
    // mkfs.xfs fills the filesystem from a protofile (no mount): owners 1000:100 on the text
    // file, modification times of the moment it ran.
    let proto = dir.path().join("proto");
    let abs = |p: &str| tree.join(p).display().to_string();
    std::fs::write(
        &proto,
        format!(
            "/dev/null\n0 0\nd--755 0 0\netc d--750 0 0\nhosts ---640 1000 100 {}\nhosts.link l--777 0 0 hosts\n\
             deep d--755 0 0\ner d--755 0 0\nbig.bin ---644 0 0 {}\n$\n$\n$\n$\n",
            abs("etc/hosts"),
            abs("etc/deep/er/big.bin")
        ),
    )
    .expect("protofile");
    let raw = dir.path().join("xfs.raw");
    std::fs::File::create(&raw).expect("image").set_len(320 << 20).expect("size");
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let out = Command::new("mkfs.xfs")
        .args(["-q", "-p", &p(&proto), &p(&raw)])
        .output()
        .expect("mkfs.xfs not found: install xfsprogs");
    assert!(out.status.success(), "mkfs.xfs: {}", String::from_utf8_lossy(&out.stderr));
    // xfs_db, the filesystem's own debugger, is the oracle for the inode's time.
    let db = Command::new("xfs_db")
        .args(["-r", "-c", "path /etc/hosts", "-c", "print core.mtime.nsec", &p(&raw)])
        .output()
        .expect("xfs_db");
    let db = String::from_utf8_lossy(&db.stdout).to_string();
    let nsec: u32 = db.trim().rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{db}"));

    let (_store, agent, group) = backed_up(dir.path(), &raw, "raw").await;
    let mut c = backup_client(&agent).await;
    let source = pb::VmBackupFileSource { group_uuid: group.clone(), volume_uuid: ROOT.into(), ..Default::default() };
    let entries = list_all(&mut c, &source, "/").await;
    let find = |p: &str| entries.iter().find(|e| e.path == p).unwrap_or_else(|| panic!("{p} listed: {entries:?}"));
    let hosts = find("/etc/hosts");
    assert_eq!((hosts.r#type.as_str(), hosts.size, hosts.mode & 0o7777), ("file", 36, 0o640), "{hosts:?}");
    assert_eq!((hosts.uid, hosts.gid, hosts.partition), (1000, 100, 0), "{hosts:?}");
    let t = hosts.modified.expect("time");
    assert_eq!(u32::try_from(t.nanos).expect("nanos"), nsec, "the time xfs_db reads: {hosts:?}");
    let secs = u64::try_from(t.seconds).expect("after 1970");
    assert!(secs >= started.saturating_sub(5) && secs <= started + 600, "{secs} vs {started}");
    assert_eq!(find("/etc/hosts.link").link_target, "hosts");
    assert_eq!(find("/etc").mode & 0o7777, 0o750);
    assert_eq!(find("/etc/deep/er/big.bin").size, 5 << 20);

    let out = dir.path().join("etc.out");
    let text =
        ok(ctl(&agent, &["backup", "files", "get", &group, "--volume", ROOT, "--path", "/etc", "--out", &p(&out)]));
    assert!(text.contains("5 entries"), "{text}");
    assert_eq!(std::fs::read(out.join("hosts")).expect("hosts"), std::fs::read(tree.join("etc/hosts")).expect("src"));
    assert!(std::fs::read(out.join("deep/er/big.bin")).expect("big") == big, "the 5 MiB file is identical");
    assert_eq!(std::fs::metadata(out.join("hosts")).expect("meta").mtime(), t.seconds);
}

/// Runs `program` and returns its stdout, failing loudly (these tests need root and lvm2).
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} not found ({e}): install lvm2, fdisk and e2fsprogs"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn files_in_an_lvm_logical_volume_are_found_through_its_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    let big = source_tree(&tree);
    // The filesystem first, as a 16 MiB image of its own.
    let fs = dir.path().join("fs.ext4");
    run("mke2fs", &["-q", "-t", "ext4", "-d", &p(&tree), &p(&fs), "16M"]);
    let fs_bytes = std::fs::read(&fs).expect("fs image");

    // A GPT disk whose partition 1 is an LVM physical volume (made by pvcreate/vgcreate on a
    // loop device over the partition), and a linear logical volume of two segments in
    // reverse order (extents 5-6, then 1-2), written with vgcfgrestore: no device-mapper.
    let raw = dir.path().join("lvm.raw");
    std::fs::File::create(&raw).expect("disk").set_len(64 << 20).expect("size");
    sh(
        "sfdisk",
        &["-q", &p(&raw)],
        Some("label: gpt\nstart=2048, size=126976, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n"),
    );
    let vg = format!("vmbk{}", std::process::id());
    let dev = run("losetup", &["-f", "--show", "-o", "1048576", "--sizelimit", "65011712", &p(&raw)]);
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let detach = Detach(dev.clone());
    run("pvcreate", &["-ff", "-y", &dev]);
    run("vgcreate", &[&vg, &dev]);
    let backup = dir.path().join("vg.txt");
    run("vgcfgbackup", &["-f", &p(&backup), &vg]);
    let text = std::fs::read_to_string(&backup).expect("vg text");
    let segment = |n: u32, start: u32, pe: u32| {
        format!(
            "segment{n} {{\nstart_extent = {start}\nextent_count = 2\ntype = \"striped\"\nstripe_count = 1\nstripes = [\n\"pv0\", {pe}\n]\n}}\n"
        )
    };
    let lv = format!(
        "logical_volumes {{\nhome {{\nid = \"Ab12Cd-Ef34-Gh56-Ij78-Kl90-Mn12-Op34Qr\"\nstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\nflags = []\nsegment_count = 2\n{}{}}}\n}}\n",
        segment(1, 0, 5),
        segment(2, 2, 1)
    );
    let end = text.rfind('}').expect("vg section");
    std::fs::write(&backup, format!("{}{lv}{}", &text[..end], &text[end..])).expect("vg text with the LV");
    run("vgcfgrestore", &["-f", &p(&backup), &vg]);
    drop(detach);
    // The LV's bytes where its segments say: pe_start (1 MiB into the PV) + extent * 4 MiB.
    {
        use std::os::unix::fs::FileExt;
        let disk = std::fs::OpenOptions::new().write(true).open(&raw).expect("disk");
        let pv = 1u64 << 20;
        let pe_start = pv + (1 << 20);
        disk.write_all_at(&fs_bytes[..8 << 20], pe_start + 5 * (4 << 20)).expect("segment 1");
        disk.write_all_at(&fs_bytes[8 << 20..], pe_start + (4 << 20)).expect("segment 2");
    }

    let (_store, agent, group) = backed_up(dir.path(), &raw, "raw").await;
    let text = ok(ctl(&agent, &["backup", "files", "list", &group, "--volume", ROOT, "--path", "/etc", "-r"]));
    assert!(text.contains("/etc/deep/er/big.bin") && text.contains("/etc/hosts.link -> hosts"), "{text}");
    let named = ok(ctl(&agent, &["backup", "files", "list", &group, "--volume", ROOT, "--lv", &format!("{vg}/home")]));
    assert!(named.contains("/etc"), "{named}");
    let out = dir.path().join("big.out");
    ok(ctl(
        &agent,
        &["backup", "files", "get", &group, "--volume", ROOT, "--path", "/etc/deep/er/big.bin", "--out", &p(&out)],
    ));
    assert!(std::fs::read(&out).expect("big") == big, "read through both segments, identical");
    let wrong = ctl(&agent, &["backup", "files", "list", &group, "--volume", ROOT, "--lv", &format!("{vg}/nope")]);
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains(&format!("{vg}/home on 1 (ext)")), "the error lists what there is: {err}");
}
