//! The end-to-end test harness: pods made of network namespaces.
//!
//! A test asks for a [`Mesh`] of pods; each pod is a fresh network namespace with its
//! own loopback and one veth leg towards every other pod, so tests run in parallel
//! without sharing any network state. Everything the harness creates (namespaces,
//! processes) is torn down in `Drop`, so a failing test cannot poison the next one.
//!
//! Code that must run "inside" a pod runs on a thread that entered the namespace with
//! `setns`: sockets created there belong to the pod for their whole life, and child
//! processes forked from there start inside it.

pub mod apps;
pub mod capture;
pub mod cluster;
pub mod control;
pub mod kube;
pub mod mesh;
pub mod netns;
pub mod probe;
pub mod proc;
pub mod spiffe;
pub mod world;

pub mod proxy;

pub use netns::{Mesh, Pod};
pub use proc::Proc;
pub use proxy::Proxy;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The user id the proxy runs as in every test pod, as in Linkerd's injected pods.
pub const PROXY_UID: u32 = 2102;

/// Fails the calling test with a clear message unless it runs as root: the harness
/// creates namespaces and firewall rules, and a test that silently skipped without
/// them would prove nothing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this end-to-end test needs root (network namespaces and firewall rules); run the suite as root, as CI does"
    );
}

/// Path of a workspace binary built by `cargo build --workspace --bins`.
///
/// Test executables live in `target/<profile>/deps`, the binaries one level up; the
/// demo and the benchmark are binaries themselves and find their siblings beside them.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running executable");
    let beside = exe.parent().map(|dir| dir.join(name));
    let above = exe
        .parent()
        .and_then(|dir| dir.parent())
        .map(|dir| dir.join(name));
    let found = [beside, above].into_iter().flatten().find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!(
            "{name} is missing beside {}: build the binaries first with `cargo build --workspace --bins` (add --release for a release build)",
            exe.display()
        )
    })
}

/// Polls `check` until it returns `Some`, failing the test with `what` after `limit`.
///
/// This is how tests wait on readiness (a port accepting, a metric reaching a value)
/// instead of sleeping for a guessed duration. `limit` only bounds a hang; no test
/// asserts on how long the wait took.
pub fn wait_for<T>(what: &str, limit: Duration, check: impl FnMut() -> Option<T>) -> T {
    wait_for_or(limit, check)
        .unwrap_or_else(|| panic!("gave up waiting for {what} after {limit:?}"))
}

/// Like [`wait_for`], but returns `None` at the limit so the caller can explain.
pub fn wait_for_or<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A generous bound for waits that should finish in milliseconds on a quiet machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Runs `f` for a program built on this harness (the demo, the benchmark), turning a
/// harness failure, which is a panic, into the first line of its message. By the time
/// this returns the panic's unwinding has dropped every guard, so namespaces,
/// processes and files are removed; processes do not print their logs on the way.
pub fn catch_harness_failure<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static MESSAGE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    proc::quiet_on_panic();
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unexpected failure".into());
        let first_line = message.lines().next().unwrap_or_default().to_string();
        *MESSAGE.lock().unwrap_or_else(|p| p.into_inner()) = Some(first_line);
    }));
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| {
        MESSAGE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| "unexpected failure".into())
    })
}

/// Ctrl-C, SIGTERM and SIGHUP, blocked so that they wait for the demo to clean up
/// instead of killing a program built on this harness
/// (the demo, the benchmark) with its namespaces still in place.
pub struct Signals(libc::sigset_t);

impl Signals {
    /// Blocks the signals in the calling thread and every thread it starts later; call
    /// it first thing in `main`.
    pub fn block() -> Signals {
        // SAFETY: plain signal-set manipulation on a local set; blocking happens before
        // any thread starts, so every thread inherits the mask (children get an empty
        // mask from std's spawn).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, signal);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Signals(set)
        }
    }

    /// A blocked signal that arrived, without waiting.
    pub fn pending(&self) -> Option<i32> {
        // SAFETY: a valid set and timeout; sigtimedwait consumes at most one signal,
        // which is fine: any of them means "stop".
        let signal = unsafe {
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            libc::sigtimedwait(&self.0, std::ptr::null_mut(), &zero)
        };
        if signal > 0 {
            // Put it back so later checks still see it.
            // SAFETY: raising a signal that this thread blocks only makes it pending.
            unsafe { libc::raise(signal) };
            Some(signal)
        } else {
            None
        }
    }

    /// Waits for one of the signals; it is consumed, so ending here is a normal exit.
    pub fn wait(&self) {
        let mut signal = 0;
        // SAFETY: a valid set and output location.
        unsafe { libc::sigwait(&self.0, &mut signal) };
    }
}
