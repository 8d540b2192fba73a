//! Caps glibc's malloc arenas at two, before anything else runs in a daemon.
//!
//! Chunk-sized buffers are allocated on some threads and freed on others, and glibc keeps
//! up to eight arenas per core, each holding on to freed chunks. Measured with the compare
//! bench on a 4 GiB volume at parallelism 4: the agent's peak RSS was 124-161 MiB with
//! glibc's defaults and 66-109 MiB with two arenas, at the same rates (docs/PERFORMANCE.md).
//!
//! glibc reads `MALLOC_ARENA_MAX` only as a process starts, so a daemon started without it
//! executes itself again, once, with it set: same PID (systemd's notify and watchdog keep
//! working), same arguments, every descriptor it inherited. A value the operator set is
//! kept as is.

use std::os::unix::process::CommandExt;

const VAR: &str = "MALLOC_ARENA_MAX";

/// Re-executes this process with `MALLOC_ARENA_MAX=2` unless it is already set. Call
/// first thing in `main`, before any thread starts. Returns only if no re-execution
/// happened (the variable was set, or the executable could not be run again).
pub fn cap_malloc_arenas() {
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env(VAR, "2").exec();
    // exec returns only when it failed: run on with glibc's default arenas.
    eprintln!("could not execute again with {VAR}=2 ({err}); running with glibc's default arenas");
}
