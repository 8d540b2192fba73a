//! Sets glibc's malloc up for chunk-sized buffers, before anything else runs in a daemon.
//!
//! - **Two arenas** (`MALLOC_ARENA_MAX=2`). Chunk-sized buffers are allocated on some
//!   threads and freed on others, and glibc keeps up to eight arenas per core, each holding
//!   on to freed chunks. Measured with the compare bench on a 4 GiB volume at parallelism
//!   4: the agent's peak RSS was 124-161 MiB with glibc's defaults and 66-109 MiB with two
//!   arenas, at the same rates (docs/PERFORMANCE.md).
//! - **Chunk buffers from the heap, kept between chunks** (`MALLOC_MMAP_THRESHOLD_` 32 MiB,
//!   `MALLOC_TRIM_THRESHOLD_` 64 MiB). By default a 4 MiB buffer may be mapped fresh and
//!   unmapped when freed, or handed back to the kernel when the heap top is trimmed, so the
//!   next chunk faults in and zeroes every page again (with free-page reporting under a
//!   hypervisor, a fault costs several times more). Measured with `cargo bench --bench
//!   backup` (4 GiB, parallelism 4, separate store): 42-135k page faults in the agent and
//!   32-218k in the store per full backup before, about 20k each after; the backup took
//!   3.0-3.6 s and 4.2-5.5 CPU-s before, 2.2-2.3 s and 3.2 CPU-s after. At most 64 MiB of
//!   freed heap stays mapped per arena; 32 MiB is glibc's largest threshold, above the
//!   largest blob (a 16 MiB chunk and framing).
//!
//! glibc reads these only as a process starts, so a daemon started without them executes
//! itself again, once, with them set: same PID (systemd's notify and watchdog keep
//! working), same arguments, every descriptor it inherited. A value the operator set is
//! kept as is.

use std::os::unix::process::CommandExt;

/// The variables and the values a daemon runs with unless the operator set them.
pub const SETTINGS: [(&str, &str); 3] =
    [("MALLOC_ARENA_MAX", "2"), ("MALLOC_MMAP_THRESHOLD_", "33554432"), ("MALLOC_TRIM_THRESHOLD_", "67108864")];

/// Re-executes this process with [`SETTINGS`] for those of them not set. Call first thing
/// in `main`, before any thread starts. Returns only if no re-execution happened (all were
/// set, or the executable could not be run again).
pub fn tune_malloc() {
    let missing: Vec<(&str, &str)> = SETTINGS.into_iter().filter(|(var, _)| std::env::var_os(var).is_none()).collect();
    if missing.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).envs(missing).exec();
    // exec returns only when it failed: run on with glibc's defaults.
    eprintln!("could not execute again with the malloc settings ({err}); running with glibc's defaults");
}
