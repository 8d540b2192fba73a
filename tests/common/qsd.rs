//! A `qemu-storage-daemon` standing in for a running VM: its disks (a qcow2 root and a raw
//! data volume) behind a QMP monitor, with writable NBD exports through which the test
//! writes as the guest would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::run_tool;

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A qemu-storage-daemon serving `disks` (qcow2 root, raw data) over NBD and QMP.
pub struct Qsd {
    /// The process.
    pub child: Child,
    /// Its QMP socket.
    pub qmp: PathBuf,
    nbd: PathBuf,
}

impl Qsd {
    /// Starts it on `root` (qcow2) and `data` (raw) in `dir`.
    pub fn start(dir: &Path, root: &Path, data: &Path) -> Qsd {
        let (qmp, nbd) = (dir.join("qmp.sock"), dir.join("nbd.sock"));
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&nbd);
        let child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &format!("driver=file,node-name=f0,filename={}", p(root))])
            .args(["--blockdev", "driver=qcow2,node-name=root0,file=f0"])
            .args(["--blockdev", &format!("driver=file,node-name=f1,filename={}", p(data))])
            .args(["--blockdev", "driver=raw,node-name=data0,file=f1"])
            .args(["--nbd-server", &format!("addr.type=unix,addr.path={}", p(&nbd))])
            .args(["--export", "type=nbd,id=e0,node-name=root0,name=root,writable=on"])
            .args(["--export", "type=nbd,id=e1,node-name=data0,name=data,writable=on"])
            .args(["--chardev", &format!("socket,id=m0,path={},server=on,wait=off", p(&qmp))])
            .args(["--monitor", "chardev=m0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-storage-daemon not found: install qemu-utils");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(qmp.exists() && nbd.exists()) {
            assert!(Instant::now() < deadline, "qemu-storage-daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd { child, qmp, nbd }
    }

    /// The NBD URI of `export` (`root` or `data`).
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", p(&self.nbd))
    }

    /// Writes `pattern` over the first MiB of `export`, as the guest.
    pub fn guest_write(&self, export: &str, pattern: &str) {
        run_tool("qemu-io", &["-f", "raw", "-c", &format!("write -P {pattern} 0 1M"), &self.uri(export)]);
    }

    /// Copies what the guest sees on `export` to a raw file.
    pub fn snapshot_to(&self, export: &str, out: &Path) {
        run_tool("qemu-img", &["convert", "-f", "raw", "-O", "raw", &self.uri(export), &p(out)]);
    }
}

/// A `qemu-storage-daemon` whose disks are attached to vhost-user-blk exports (standing in
/// for the VM's virtio devices; no client needs to connect) and a QMP monitor. Its NBD
/// server stays free for the agent, which reads dirty bitmaps through it.
pub struct BareQsd {
    /// The process.
    pub child: Child,
    /// Its QMP socket.
    pub qmp: PathBuf,
}

fn vhost(id: &str, node: &str, socket: &Path) -> String {
    let _ = std::fs::remove_file(socket);
    format!("type=vhost-user-blk,id={id},node-name={node},addr.type=unix,addr.path={},writable=on", p(socket))
}

impl BareQsd {
    /// Starts it on `root` (qcow2) and `data` (raw) in `dir`.
    pub fn start(dir: &Path, root: &Path, data: &Path) -> BareQsd {
        Self::start_with(dir, root, data, true)
    }

    /// Like [`BareQsd::start`], but the disks are opened and served to nobody (no export,
    /// no parent node): a live snapshot cannot take an overlay on them.
    pub fn start_unexported(dir: &Path, root: &Path, data: &Path) -> BareQsd {
        Self::start_with(dir, root, data, false)
    }

    fn start_with(dir: &Path, root: &Path, data: &Path, exports: bool) -> BareQsd {
        let qmp = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp);
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.args(["--blockdev", &format!("driver=file,node-name=f0,filename={}", p(root))])
            .args(["--blockdev", "driver=qcow2,node-name=root0,file=f0"])
            .args(["--blockdev", &format!("driver=file,node-name=f1,filename={}", p(data))])
            .args(["--blockdev", "driver=raw,node-name=data0,file=f1"]);
        if exports {
            cmd.args(["--export", &vhost("v0", "root0", &dir.join("vhu0.sock"))])
                .args(["--export", &vhost("v1", "data0", &dir.join("vhu1.sock"))]);
        }
        let child = cmd
            .args(["--chardev", &format!("socket,id=m0,path={},server=on,wait=off", p(&qmp))])
            .args(["--monitor", "chardev=m0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-storage-daemon not found: install qemu-utils");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !qmp.exists() {
            assert!(Instant::now() < deadline, "qemu-storage-daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        BareQsd { child, qmp }
    }

    /// Stops it cleanly (SIGTERM): persistent bitmaps are written to the images.
    pub fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        assert!(self.child.wait().expect("wait").success(), "qemu-storage-daemon exited badly");
    }
}

impl Drop for BareQsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
