//! Giving freed memory back to the operating system.
//!
//! Two allocators hold the proxy's memory: mimalloc, the global allocator, and the
//! C library's malloc, which AWS-LC (the post-quantum key exchange) allocates from
//! during handshakes. glibc returns only the top of its heap by itself, so after a
//! storm of handshakes the rest stays resident until `malloc_trim` gives it back.
//! mimalloc keeps the pages that frees leave empty and returns them only when it
//! next runs on the thread that owns them, after its purge delay. A proxy that goes
//! quiet after a burst (a flood of connections closed, a thousand idle discovery
//! watches dropped) would hold that memory until traffic came back. So each worker
//! thread, as it goes idle, asks the allocator to return what is free, at most once
//! per [`INTERVAL`]; a ticker wakes the runtime that often so that a worker that
//! stays idle still gets its turn.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often an idle worker gives memory back.
pub const INTERVAL: Duration = Duration::from_secs(1);

thread_local! {
    static LAST_RELEASE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The runtime's park hook: gives this thread's free pages back when the last
/// time was at least [`INTERVAL`] ago.
pub fn on_worker_idle() {
    let now = Instant::now();
    let due = LAST_RELEASE.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < INTERVAL => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        release();
    }
}

/// Returns the calling thread's empty pages to the operating system now. Harmless
/// when mimalloc is not the global allocator (unit tests): its heaps are empty.
pub fn release() {
    // SAFETY: mi_collect has no preconditions; it only walks the calling thread's
    // heap and the process's free segments.
    unsafe { libmimalloc_sys::mi_collect(true) }
    release_c_heap();
}

/// Free memory glibc's heap must hold before trimming it is worth the walk.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const C_HEAP_SLACK: usize = 1024 * 1024;

/// Returns the free pages of glibc's heap, when there are enough of them to matter.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_c_heap() {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let free = unsafe { libc::mallinfo2() }.fordblks;
    if free > C_HEAP_SLACK {
        // SAFETY: malloc_trim has no preconditions; it returns whole free pages.
        unsafe { libc::malloc_trim(0) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_c_heap() {}

/// Wakes the runtime every [`INTERVAL`], so that [`on_worker_idle`] runs after a
/// burst even when nothing else would wake a worker.
pub async fn tick() {
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
    }
}
