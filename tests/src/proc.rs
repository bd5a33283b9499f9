//! Child processes that cannot outlive their test.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// A running process, killed when dropped. Its output goes to a log file that is
/// printed if the test is failing, so a broken proxy explains itself.
pub struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Proc {
    pub(crate) fn spawn(label: &str, mut cmd: Command) -> Proc {
        let log = std::env::temp_dir().join(format!(
            "tandem-test-{}-{}-{label}.log",
            std::process::id(),
            unique()
        ));
        let out = File::create(&log).expect("create process log");
        let err = out.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        Proc {
            label: label.to_string(),
            child,
            log,
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill with a pid we own and a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(
            rc,
            0,
            "kill {}: {}",
            self.label,
            std::io::Error::last_os_error()
        );
    }

    /// Waits for the process to exit, failing the test after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = &mut self.child;
        let status = crate::wait_for(&format!("{} to exit", self.label), limit, || {
            child.try_wait().expect("try_wait")
        });
        self.exit = Some(status);
        status
    }

    /// Returns the exit status if the process has already ended.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().expect("try_wait");
        if status.is_some() {
            self.exit = status;
        }
        status
    }

    /// Where the process's output goes (removed when the guard drops).
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() && !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!("----- output of {} -----\n{}", self.label, self.output());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Stops processes from printing their output when dropped during a panic: tests want
/// it, the demo reports one line instead (and keeps the logs while it runs).
pub fn quiet_on_panic() {
    QUIET.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
