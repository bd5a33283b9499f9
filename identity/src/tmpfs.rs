//! Keeps key material off persistent disks: the identity directory may only be
//! written when it is memory-backed (tmpfs or ramfs), and files are created 0600.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Returns whether `dir` lives on tmpfs or ramfs.
pub fn is_memory_backed(dir: &Path) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("{}: path contains a NUL byte", dir.display()))?;
    // SAFETY: `c` is a valid NUL-terminated string and `buf` is a properly sized,
    // writable statfs struct that outlives the call.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", dir.display()));
    }
    #[allow(clippy::unnecessary_cast)]
    let magic = buf.f_type as i64;
    Ok(magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
}

/// Refuses a directory that is not memory-backed unless `allow_disk` is set.
pub fn check_dir(dir: &Path, allow_disk: bool) -> Result<()> {
    let meta =
        std::fs::metadata(dir).with_context(|| format!("identity directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("identity directory {} is not a directory", dir.display());
    }
    if !allow_disk && !is_memory_backed(dir)? {
        bail!(
            "identity directory {} is not memory-backed (tmpfs/ramfs); refusing to keep key material there \
             (mount an emptyDir with medium: Memory, or set TANDEM_IDENTITY_ALLOW_DISK=true)",
            dir.display()
        );
    }
    Ok(())
}

/// Atomically replaces `path` with `contents`, created with mode 0600.
///
/// The caller must have checked the directory with [`check_dir`].
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(contents)
        .with_context(|| format!("write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}
