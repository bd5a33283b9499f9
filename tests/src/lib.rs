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
pub mod mesh;
pub mod netns;
pub mod probe;
pub mod proc;

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
/// Test executables live in `target/<profile>/deps`; the binaries sit one level up.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins`",
        path.display()
    );
    path
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
