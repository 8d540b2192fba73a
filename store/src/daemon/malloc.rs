//! Sets glibc's malloc up for chunk-sized buffers, before anything else runs in a daemon.
//!
//! - **Two arenas** (`MALLOC_ARENA_MAX=2`). Chunk-sized buffers are allocated on some
//!   threads and freed on others, and glibc keeps up to eight arenas per core, each holding
//!   on to freed chunks. Measured with the compare bench on a 4 GiB volume at parallelism
//!   4: the agent's peak RSS was 124-161 MiB with glibc's defaults and 66-109 MiB with two
//!   arenas, at the same rates (docs/PERFORMANCE.md).
//! - **The store: chunk buffers from the heap, kept between chunks**
//!   (`MALLOC_MMAP_THRESHOLD_` 32 MiB, `MALLOC_TRIM_THRESHOLD_` 64 MiB). By default a 4 MiB
//!   buffer may be mapped fresh and unmapped when freed, or handed back to the kernel when
//!   the heap top is trimmed, so the next chunk faults in and zeroes every page again (with
//!   free-page reporting under a hypervisor, a fault costs several times more). Measured
//!   with `cargo bench --bench backup` (4 GiB, parallelism 4, separate store): 42-135k page
//!   faults in the agent and 32-218k in the store per full backup before, about 20k each
//!   after; the backup took 3.0-3.6 s and 4.2-5.5 CPU-s before, 2.2-2.3 s and 3.2 CPU-s
//!   after. At most 64 MiB of freed heap stays mapped per arena; 32 MiB is glibc's largest
//!   threshold, above the largest blob (a 16 MiB chunk and framing).
//! - **The agent: chunk-sized buffers mapped** (`MALLOC_MMAP_THRESHOLD_` 1 MiB). The
//!   agent's own chunk buffers are pooled (the backup workers' read and blob buffers, the
//!   restore's decode buffers), so what it allocates per chunk is gRPC's message buffers.
//!   Taken from the heap, a restore's messages of every size left it fragmented: a restore
//!   from a separate store at parallelism 4 peaked at 109-135 MiB for about 80 MiB in use.
//!   Mapped, they go back to the kernel when freed: 94-98 MiB, for 0.1-0.3 more agent
//!   CPU-s per 4 GiB full backup to a separate store (its upload buffers fault in afresh;
//!   the embedded store's backup allocates none). Measured with the backup bench, two runs
//!   each, alternating.
//! - **Free pages handed back when work ends** ([`release_free_memory`], glibc's
//!   `malloc_trim`). With the settings above a daemon keeps the heap of its busiest moment:
//!   an agent idled at 100-130 MiB after a backup or restore, and the next job's chunk
//!   buffers, of other sizes, grew the heap further instead of fitting in what was free
//!   (a restore at parallelism 4 peaked at 126-132 MiB after a backup, against about 80
//!   MiB of its own). A daemon calls this when a job or stream ends; buffers are still kept
//!   between the chunks of one job.
//!
//! glibc reads these only as a process starts, so a daemon started without them executes
//! itself again, once, with them set: same PID (systemd's notify and watchdog keep
//! working), same arguments, every descriptor it inherited. A value the operator set is
//! kept as is.

use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The variables and the values the store runs with unless the operator set them.
pub const STORE_SETTINGS: [(&str, &str); 3] =
    [("MALLOC_ARENA_MAX", "2"), ("MALLOC_MMAP_THRESHOLD_", "33554432"), ("MALLOC_TRIM_THRESHOLD_", "67108864")];

/// The variables and the values the agent runs with unless the operator set them.
pub const AGENT_SETTINGS: [(&str, &str); 3] =
    [("MALLOC_ARENA_MAX", "2"), ("MALLOC_MMAP_THRESHOLD_", "1048576"), ("MALLOC_TRIM_THRESHOLD_", "67108864")];

/// Re-executes this process with `settings` for those of them not set. Call first thing
/// in `main`, before any thread starts. Returns only if no re-execution happened (all were
/// set, or the executable could not be run again).
pub fn tune_malloc(settings: &[(&'static str, &'static str)]) {
    let missing: Vec<(&str, &str)> =
        settings.iter().copied().filter(|(var, _)| std::env::var_os(var).is_none()).collect();
    if missing.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).envs(missing).exec();
    // exec returns only when it failed: run on with glibc's defaults.
    eprintln!("could not execute again with the malloc settings ({err}); running with glibc's defaults");
}

/// Returns the heap's free pages to the kernel, in every arena (glibc's `malloc_trim(0)`).
/// Takes the arenas' locks while it walks them: call it off the async runtime, when a unit
/// of work has ended, not per chunk.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own arenas, under their
    // locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Units of work in progress (a store server's chunk streams); when the last one ends, the
/// heap's free pages go back to the kernel ([`release_free_memory`], on a blocking thread).
#[derive(Debug, Clone, Default)]
pub struct Activity(Arc<AtomicUsize>);

impl Activity {
    /// Marks a unit of work as started until the returned guard is dropped.
    pub fn begin(&self) -> Busy {
        self.0.fetch_add(1, Ordering::SeqCst);
        Busy(self.0.clone())
    }
}

/// One unit of work of an [`Activity`], in progress while it lives.
#[derive(Debug)]
pub struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(release_free_memory)),
                Err(_) => release_free_memory(),
            }
        }
    }
}
