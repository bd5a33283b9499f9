//! Entering the target network namespace with `setns(2)`, so no `nsenter` binary is
//! needed and every command we start afterwards inherits the namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{bail, Context};

/// Moves the calling thread into the network namespace at `path`.
///
/// Must run before any other thread exists: threads started later and child
/// processes inherit the namespace, threads started earlier would not.
pub fn enter(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path)
        .with_context(|| format!("cannot open network namespace {}", path.display()))?;
    // SAFETY: `file` is an open descriptor for the whole call; setns only changes the
    // calling thread's namespace and reports failure through its return value.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "cannot enter network namespace {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
