//! librados, loaded at run time (`librados.so.2`, Debian's `librados2`), behind a small safe
//! API: a cluster handle and I/O contexts with whole-object reads, writes, exclusive
//! creates, stats, removes and listing. This module and the one call of
//! glibc's `malloc_trim` (`daemon::malloc`) are the only unsafe code in the store.
//!
//! Why loaded at run time rather than linked: a host without Ceph (most of them) runs the
//! store and the agent without librados installed, and a Ceph backend there is one clear
//! error ("librados.so.2 is not installed"), not a binary that cannot start.
//!
//! librados handles are thread-safe: a cluster handle and an I/O context may be used from
//! many threads at once, as long as no thread changes the context's namespace or locator
//! (each context here gets its namespace once, before it is shared).

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

type Handle = *mut c_void;

/// `struct rados_cluster_stat_t`; every field is part of the C layout.
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)]
struct ClusterStat {
    kb: u64,
    kb_used: u64,
    kb_avail: u64,
    num_objects: u64,
}

/// `LIBRADOS_CREATE_EXCLUSIVE`: the write op fails with EEXIST when the object exists.
const CREATE_EXCLUSIVE: c_int = 1;
/// Longest object read in one call.
const READ_STEP: usize = 16 << 20;

struct Api {
    create2: unsafe extern "C" fn(*mut Handle, *const c_char, *const c_char, u64) -> c_int,
    conf_read_file: unsafe extern "C" fn(Handle, *const c_char) -> c_int,
    conf_set: unsafe extern "C" fn(Handle, *const c_char, *const c_char) -> c_int,
    connect: unsafe extern "C" fn(Handle) -> c_int,
    shutdown: unsafe extern "C" fn(Handle),
    cluster_fsid: unsafe extern "C" fn(Handle, *mut c_char, usize) -> c_int,
    wait_for_latest_osdmap: unsafe extern "C" fn(Handle) -> c_int,
    cluster_stat: unsafe extern "C" fn(Handle, *mut ClusterStat) -> c_int,
    pool_lookup: unsafe extern "C" fn(Handle, *const c_char) -> i64,
    ioctx_create: unsafe extern "C" fn(Handle, *const c_char, *mut Handle) -> c_int,
    ioctx_destroy: unsafe extern "C" fn(Handle),
    ioctx_set_namespace: unsafe extern "C" fn(Handle, *const c_char),
    write_full: unsafe extern "C" fn(Handle, *const c_char, *const c_char, usize) -> c_int,
    read: unsafe extern "C" fn(Handle, *const c_char, *mut c_char, usize, u64) -> c_int,
    stat: unsafe extern "C" fn(Handle, *const c_char, *mut u64, *mut libc_time_t) -> c_int,
    remove: unsafe extern "C" fn(Handle, *const c_char) -> c_int,
    create_write_op: unsafe extern "C" fn() -> Handle,
    release_write_op: unsafe extern "C" fn(Handle),
    write_op_create: unsafe extern "C" fn(Handle, c_int, *const c_char),
    write_op_write_full: unsafe extern "C" fn(Handle, *const c_char, usize),
    write_op_operate: unsafe extern "C" fn(Handle, Handle, *const c_char, *mut libc_time_t, c_int) -> c_int,
    list_open: unsafe extern "C" fn(Handle, *mut Handle) -> c_int,
    list_next: unsafe extern "C" fn(Handle, *mut *const c_char, *mut *const c_char, *mut *const c_char) -> c_int,
    list_close: unsafe extern "C" fn(Handle),
    mon_command: unsafe extern "C" fn(
        Handle,
        *mut *const c_char,
        usize,
        *const c_char,
        usize,
        *mut *mut c_char,
        *mut usize,
        *mut *mut c_char,
        *mut usize,
    ) -> c_int,
    buffer_free: unsafe extern "C" fn(*mut c_char),
    _lib: libloading::Library,
}

#[allow(non_camel_case_types)]
type libc_time_t = i64;

fn load() -> Result<Api, String> {
    let missing = |e: libloading::Error| {
        format!("librados.so.2 could not be loaded ({e}); install librados2 (Debian: apt install librados2)")
    };
    // SAFETY: loading librados runs its static initialisers, which have no preconditions.
    let lib = unsafe { libloading::Library::new("librados.so.2") }.map_err(missing)?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol is librados's C function of that name; the field's type is
            // its signature from librados.h (Ceph 16), and the library stays loaded as long
            // as the pointer (`_lib` lives in the same struct).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("librados lacks {}: {e}", $name))?
        };
    }
    Ok(Api {
        create2: sym!("rados_create2"),
        conf_read_file: sym!("rados_conf_read_file"),
        conf_set: sym!("rados_conf_set"),
        connect: sym!("rados_connect"),
        shutdown: sym!("rados_shutdown"),
        cluster_fsid: sym!("rados_cluster_fsid"),
        wait_for_latest_osdmap: sym!("rados_wait_for_latest_osdmap"),
        cluster_stat: sym!("rados_cluster_stat"),
        pool_lookup: sym!("rados_pool_lookup"),
        ioctx_create: sym!("rados_ioctx_create"),
        ioctx_destroy: sym!("rados_ioctx_destroy"),
        ioctx_set_namespace: sym!("rados_ioctx_set_namespace"),
        write_full: sym!("rados_write_full"),
        read: sym!("rados_read"),
        stat: sym!("rados_stat"),
        remove: sym!("rados_remove"),
        create_write_op: sym!("rados_create_write_op"),
        release_write_op: sym!("rados_release_write_op"),
        write_op_create: sym!("rados_write_op_create"),
        write_op_write_full: sym!("rados_write_op_write_full"),
        write_op_operate: sym!("rados_write_op_operate"),
        list_open: sym!("rados_nobjects_list_open"),
        list_next: sym!("rados_nobjects_list_next"),
        list_close: sym!("rados_nobjects_list_close"),
        mon_command: sym!("rados_mon_command"),
        buffer_free: sym!("rados_buffer_free"),
        _lib: lib,
    })
}

fn api() -> Result<&'static Api, RadosError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(|m| RadosError { op: "load", what: m.clone(), errno: 0 })
}

/// A librados failure: the call, what it was about, and the errno it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RadosError {
    /// The call (`connect`, `read`, …).
    pub op: &'static str,
    /// Its object, pool or setting.
    pub what: String,
    /// The positive errno (0: not from librados, e.g. loading it).
    pub errno: i32,
}

impl std::fmt::Display for RadosError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.errno == 0 {
            return write!(f, "{}", self.what);
        }
        let text = std::io::Error::from_raw_os_error(self.errno);
        write!(f, "rados {} {}: {text}", self.op, self.what)
    }
}

impl std::error::Error for RadosError {}

impl RadosError {
    /// `ENOENT`.
    pub fn is_not_found(&self) -> bool {
        self.errno == 2
    }
}

fn check(ret: c_int, op: &'static str, what: &str) -> Result<c_int, RadosError> {
    if ret < 0 { Err(RadosError { op, what: what.to_string(), errno: -ret }) } else { Ok(ret) }
}

fn cstr(s: &str, what: &'static str) -> Result<CString, RadosError> {
    CString::new(s).map_err(|_| RadosError { op: what, what: format!("{s:?} contains a NUL byte"), errno: 22 })
}

/// A connected cluster handle.
#[derive(Debug)]
pub struct Cluster {
    h: Handle,
}

// SAFETY: a connected rados_t may be used from any thread (librados.h: "the cluster handle
// is thread-safe"); it is only shut down in Drop, when no other reference exists.
unsafe impl Send for Cluster {}
// SAFETY: as above: concurrent calls on one rados_t are supported by librados.
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: `h` came from rados_create2 and is shut down exactly once, here.
            unsafe { (api.shutdown)(self.h) };
        }
    }
}

impl Cluster {
    /// Connects as `client` (e.g. `client.admin`) with the settings of `conf` (none: only
    /// librados's defaults), the monitors of `mon_host` (else the conf's), the keyring given
    /// (else the conf's or librados's default paths), and `timeout` for the mount and for
    /// every monitor and OSD operation (a dead cluster is an error then, never a hang).
    pub fn connect(
        conf: Option<&Path>,
        mon_host: Option<&str>,
        client: &str,
        keyring: Option<&Path>,
        timeout: Duration,
    ) -> Result<Arc<Self>, RadosError> {
        let api = api()?;
        let name = cstr(client, "client name")?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: `h` is a valid out-pointer; a null cluster name means "ceph".
        check(unsafe { (api.create2)(&mut h, std::ptr::null(), name.as_ptr(), 0) }, "create", client)?;
        let cluster = Self { h };
        if let Some(conf) = conf {
            let path = cstr(&conf.display().to_string(), "conf path")?;
            // SAFETY: `cluster.h` is a created, unconnected handle; `path` is NUL-terminated.
            check(unsafe { (api.conf_read_file)(cluster.h, path.as_ptr()) }, "reading", &conf.display().to_string())?;
        }
        let secs = timeout.as_secs().max(1).to_string();
        let mut settings = vec![
            ("rados_osd_op_timeout", secs.clone()),
            ("rados_mon_op_timeout", secs.clone()),
            ("client_mount_timeout", secs),
        ];
        if let Some(m) = mon_host {
            settings.push(("mon_host", m.to_string()));
        }
        if let Some(k) = keyring {
            settings.push(("keyring", k.display().to_string()));
        }
        for (option, value) in settings {
            let (o, v) = (cstr(option, "option")?, cstr(&value, "option value")?);
            // SAFETY: both strings are NUL-terminated and outlive the call.
            check(unsafe { (api.conf_set)(cluster.h, o.as_ptr(), v.as_ptr()) }, "setting", option)?;
        }
        // SAFETY: the handle is configured and not yet connected.
        check(unsafe { (api.connect)(cluster.h) }, "connect", client)?;
        Ok(Arc::new(cluster))
    }

    /// Sends a monitor command (JSON, e.g. `{"prefix":"df","format":"json"}`) and returns
    /// its output; a refused command is an error carrying the monitor's status text.
    pub fn mon_command(&self, command: &str) -> Result<Vec<u8>, RadosError> {
        let api = api()?;
        let cmd = cstr(command, "monitor command")?;
        let mut cmds = [cmd.as_ptr()];
        let (mut out, mut out_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        let (mut st, mut st_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        // SAFETY: `cmds` holds one NUL-terminated command that outlives the call; no input
        // buffer; the four out-pointers are valid and receive buffers librados allocated.
        let ret = unsafe {
            (api.mon_command)(
                self.h,
                cmds.as_mut_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut st,
                &mut st_len,
            )
        };
        let take = |p: *mut c_char, len: usize| -> Vec<u8> {
            if p.is_null() {
                return Vec::new();
            }
            // SAFETY: librados allocated `len` bytes at `p`; they are copied, then freed once
            // with rados_buffer_free as librados.h requires.
            let v = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }.to_vec();
            // SAFETY: as above; `p` is not used after this.
            unsafe { (api.buffer_free)(p) };
            v
        };
        let (output, status) = (take(out, out_len), take(st, st_len));
        if ret < 0 {
            let status = String::from_utf8_lossy(&status).trim().to_string();
            return Err(RadosError { op: "mon command", what: format!("{command} ({status})"), errno: -ret });
        }
        Ok(output)
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> Result<String, RadosError> {
        let api = api()?;
        let mut buf = [0 as c_char; 64];
        // SAFETY: `buf` has the length passed; librados writes a NUL-terminated string.
        check(unsafe { (api.cluster_fsid)(self.h, buf.as_mut_ptr(), buf.len()) }, "fsid", "cluster")?;
        // SAFETY: librados NUL-terminated what it wrote into `buf`.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
    }

    /// Fetches the newest OSD map from the monitors. After an operation timed out (an OSD
    /// died and came back elsewhere, which the monitor may not have announced yet to this
    /// client), the next operations are sent where the OSDs are now.
    pub fn refresh_osdmap(&self) -> Result<(), RadosError> {
        let api = api()?;
        // SAFETY: connected handle.
        check(unsafe { (api.wait_for_latest_osdmap)(self.h) }, "osdmap", "cluster").map(|_| ())
    }

    /// Raw (total, available) bytes of the cluster.
    pub fn capacity(&self) -> Result<(u64, u64), RadosError> {
        let api = api()?;
        let mut st = ClusterStat::default();
        // SAFETY: `st` is a valid, writable rados_cluster_stat_t.
        check(unsafe { (api.cluster_stat)(self.h, &mut st) }, "cluster stat", "cluster")?;
        Ok((st.kb.saturating_mul(1024), st.kb_avail.saturating_mul(1024)))
    }

    /// Whether `pool` exists.
    pub fn has_pool(&self, pool: &str) -> Result<bool, RadosError> {
        let api = api()?;
        let p = cstr(pool, "pool name")?;
        // SAFETY: `p` is NUL-terminated.
        let id = unsafe { (api.pool_lookup)(self.h, p.as_ptr()) };
        match id {
            i if i >= 0 => Ok(true),
            -2 => Ok(false),
            e => Err(RadosError { op: "pool lookup", what: pool.into(), errno: i32::try_from(-e).unwrap_or(5) }),
        }
    }

    /// An I/O context on `pool`, in `namespace`.
    pub fn ioctx(self: &Arc<Self>, pool: &str, namespace: &str) -> Result<IoCtx, RadosError> {
        let api = api()?;
        let p = cstr(pool, "pool name")?;
        let ns = cstr(namespace, "namespace")?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: connected handle, NUL-terminated pool name, valid out-pointer.
        check(unsafe { (api.ioctx_create)(self.h, p.as_ptr(), &mut h) }, "opening pool", pool)?;
        // SAFETY: `h` is a fresh context no other thread has seen yet.
        unsafe { (api.ioctx_set_namespace)(h, ns.as_ptr()) };
        Ok(IoCtx { h, _cluster: Arc::clone(self), place: format!("{pool}/{namespace}") })
    }
}

/// An I/O context: one pool, one namespace.
#[derive(Debug)]
pub struct IoCtx {
    h: Handle,
    _cluster: Arc<Cluster>,
    place: String,
}

// SAFETY: operations on one rados_ioctx_t from many threads are supported as long as its
// namespace and locator do not change, and they are set once, before it is shared.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: `h` came from rados_ioctx_create and is destroyed once, before the
            // cluster handle (held by `_cluster`) can be shut down.
            unsafe { (api.ioctx_destroy)(self.h) };
        }
    }
}

impl IoCtx {
    fn what(&self, oid: &str) -> String {
        format!("{}/{oid}", self.place)
    }

    /// Writes a whole object, replacing one of that name.
    pub fn write_full(&self, oid: &str, bytes: &[u8]) -> Result<(), RadosError> {
        let api = api()?;
        let o = cstr(oid, "object name")?;
        // SAFETY: `bytes` is valid for its length during the call.
        let ret = unsafe { (api.write_full)(self.h, o.as_ptr(), bytes.as_ptr().cast(), bytes.len()) };
        check(ret, "write", &self.what(oid)).map(|_| ())
    }

    /// Creates a whole object in one atomic operation, only if absent; false when it exists.
    pub fn create_exclusive(&self, oid: &str, bytes: &[u8]) -> Result<bool, RadosError> {
        let api = api()?;
        let o = cstr(oid, "object name")?;
        // SAFETY: a fresh write op, released below on every path.
        let op = unsafe { (api.create_write_op)() };
        // SAFETY: `op` is valid; `bytes` and `o` outlive the operate call, after which the
        // op no longer refers to them.
        let ret = unsafe {
            (api.write_op_create)(op, CREATE_EXCLUSIVE, std::ptr::null());
            (api.write_op_write_full)(op, bytes.as_ptr().cast(), bytes.len());
            let ret = (api.write_op_operate)(op, self.h, o.as_ptr(), std::ptr::null_mut(), 0);
            (api.release_write_op)(op);
            ret
        };
        match ret {
            -17 => Ok(false),
            r => check(r, "create", &self.what(oid)).map(|_| true),
        }
    }

    /// Size and modification time of an object (None when absent).
    pub fn stat(&self, oid: &str) -> Result<Option<(u64, SystemTime)>, RadosError> {
        let api = api()?;
        let o = cstr(oid, "object name")?;
        let (mut size, mut mtime) = (0u64, 0 as libc_time_t);
        // SAFETY: both out-pointers are valid.
        match unsafe { (api.stat)(self.h, o.as_ptr(), &mut size, &mut mtime) } {
            -2 => Ok(None),
            r => {
                check(r, "stat", &self.what(oid))?;
                let t = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(mtime).unwrap_or(0));
                Ok(Some((size, t)))
            }
        }
    }

    /// A whole object (None when absent).
    pub fn read(&self, oid: &str) -> Result<Option<Vec<u8>>, RadosError> {
        let api = api()?;
        let Some((size, _)) = self.stat(oid)? else { return Ok(None) };
        let o = cstr(oid, "object name")?;
        let len = usize::try_from(size).map_err(|_| RadosError { op: "read", what: self.what(oid), errno: 27 })?;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let step = (len - done).min(READ_STEP);
            // SAFETY: `buf[done..done + step]` is valid and writable.
            let ret = unsafe {
                (api.read)(
                    self.h,
                    o.as_ptr(),
                    buf.as_mut_ptr().add(done).cast(),
                    step,
                    u64::try_from(done).unwrap_or(u64::MAX),
                )
            };
            if ret == -2 {
                return Ok(None);
            }
            let n = usize::try_from(check(ret, "read", &self.what(oid))?).unwrap_or(0);
            if n == 0 {
                // Shrunk since the stat: what was read is the object.
                buf.truncate(done);
                break;
            }
            done += n;
        }
        Ok(Some(buf))
    }

    /// Removes an object (absent is fine).
    pub fn remove(&self, oid: &str) -> Result<(), RadosError> {
        let api = api()?;
        let o = cstr(oid, "object name")?;
        // SAFETY: `o` is NUL-terminated.
        match unsafe { (api.remove)(self.h, o.as_ptr()) } {
            -2 => Ok(()),
            r => check(r, "remove", &self.what(oid)).map(|_| ()),
        }
    }

    /// Every object name in this context's namespace.
    pub fn list(&self) -> Result<Vec<String>, RadosError> {
        let api = api()?;
        let mut ctx: Handle = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is closed below.
        check(unsafe { (api.list_open)(self.h, &mut ctx) }, "list", &self.place)?;
        let mut out = Vec::new();
        let result = loop {
            let mut entry: *const c_char = std::ptr::null();
            // SAFETY: `entry` is a valid out-pointer; key and namespace are not wanted.
            let ret = unsafe { (api.list_next)(ctx, &mut entry, std::ptr::null_mut(), std::ptr::null_mut()) };
            if ret == -2 {
                break Ok(out);
            }
            if let Err(e) = check(ret, "list", &self.place) {
                break Err(e);
            }
            // SAFETY: on success `entry` points to a NUL-terminated name valid until the
            // next call on `ctx`; it is copied at once.
            out.push(unsafe { CStr::from_ptr(entry) }.to_string_lossy().into_owned());
        };
        // SAFETY: `ctx` was opened above and is closed once.
        unsafe { (api.list_close)(ctx) };
        result
    }
}
