//! `tandem-proxy await`: start the app only once its proxy is ready, and with
//! `--shutdown` stop the proxy when the app ends, so meshed Jobs complete.
//!
//! Kept free of the async runtime: it is a small supervisor that polls the admin
//! server with blocking I/O, runs one child, forwards SIGTERM/SIGINT/SIGHUP to it,
//! and exits with the child's status (128 + signal number if it was killed).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// Exit status when the proxy did not become ready in time (EX_UNAVAILABLE).
pub const NOT_READY: u8 = 69;
/// Exit status when the command cannot be started (as a shell's).
pub const CANNOT_RUN: u8 = 127;

#[derive(Debug, Clone)]
pub struct AwaitOptions {
    /// The proxy's admin address; Linkerd's `--port` is its port on loopback.
    pub admin: SocketAddr,
    pub timeout: Duration,
    pub shutdown: bool,
    /// Skip waiting (`TANDEM_AWAIT_DISABLED`), for running the same image unmeshed.
    pub disabled: bool,
    pub command: Vec<String>,
}

pub fn run(options: &AwaitOptions) -> ExitCode {
    // Blocked from the start, before any thread exists: as PID 1 of a container,
    // an unhandled SIGTERM would otherwise be ignored while we wait, and a signal
    // that arrives while the command starts must not be lost. The command gets
    // the mask we were started with back.
    let signals = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    let mut original_mask = empty_set();
    // SAFETY: both sets are initialised; only this thread's mask changes.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, &mut original_mask) };
    let stop_proxy = || {
        if options.shutdown && !options.disabled {
            if let Err(error) = request(options.admin, "POST", "/shutdown") {
                eprintln!("tandem-proxy await: cannot ask the proxy to shut down: {error}");
            }
        }
    };
    if !options.disabled {
        match wait_ready(options.admin, options.timeout, &signals) {
            Ok(()) => {}
            Err(Waited::Signal(signal)) => return ExitCode::from(128 + signal as u8),
            Err(Waited::TimedOut(last)) => {
                eprintln!(
                    "tandem-proxy await: the proxy was not ready at http://{}/ready after {:?} ({last})",
                    options.admin, options.timeout
                );
                // A Job whose command never ran must still end.
                stop_proxy();
                return ExitCode::from(NOT_READY);
            }
        }
    }
    let Some((program, args)) = options.command.split_first() else {
        return ExitCode::SUCCESS;
    };
    let code = run_child(program, args, signals, original_mask);
    stop_proxy();
    ExitCode::from(code)
}

enum Waited {
    TimedOut(String),
    Signal(libc::c_int),
}

/// Polls `/ready` until it answers 200, pausing in `sigtimedwait` so that a stop
/// signal ends the wait at once.
fn wait_ready(
    admin: SocketAddr,
    timeout: Duration,
    signals: &libc::sigset_t,
) -> Result<(), Waited> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        let last = match request(admin, "GET", "/ready") {
            Ok(200) => return Ok(()),
            Ok(status) => format!("last answer: {status}"),
            Err(error) => format!("last error: {error}"),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(Waited::TimedOut(last));
        }
        let wait = pause.min(deadline - now);
        let limit = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `signals` is initialised; a null info pointer is allowed.
        let signal = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &limit) };
        if signal > 0 {
            return Err(Waited::Signal(signal));
        }
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// One HTTP/1.1 request to the admin server; returns the status code.
fn request(admin: SocketAddr, method: &str, path: &str) -> Result<u16, String> {
    let limit = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&admin, limit).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(limit))
        .and_then(|()| stream.set_write_timeout(Some(limit)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection closed before a response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(_) if response.code.is_some() => return Ok(response.code.unwrap_or_default()),
            Ok(_) if buf.len() < 8192 => continue,
            Ok(_) => return Err("response head too long".into()),
            Err(error) => return Err(format!("bad response: {error}")),
        }
    }
}

/// Runs the command with SIGTERM, SIGINT and SIGHUP (blocked in this process)
/// forwarded to it, and returns the exit status to pass on.
fn run_child(
    program: &str,
    args: &[String],
    forwarded: libc::sigset_t,
    original_mask: libc::sigset_t,
) -> u8 {
    let mut command = Command::new(program);
    command.args(args);
    // SAFETY: sigprocmask is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(move || {
            libc::sigprocmask(libc::SIG_SETMASK, &original_mask, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!("tandem-proxy await: cannot run {program}: {error}");
            return CANNOT_RUN;
        }
    };
    let pid = child.id() as libc::pid_t;
    // The thread inherits the blocked mask, so sigwait sees every forwarded signal.
    // It is never joined: it ends with the process, right after the child does.
    std::thread::spawn(move || loop {
        let mut signal = 0;
        // SAFETY: `forwarded` is initialised and blocked in this thread.
        if unsafe { libc::sigwait(&forwarded, &mut signal) } == 0 {
            // SAFETY: plain kill(2) on the child we spawned.
            unsafe { libc::kill(pid, signal) };
        }
    });
    match child.wait() {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => code as u8,
            (None, Some(signal)) => 128u8.saturating_add(signal as u8),
            (None, None) => 1,
        },
        Err(error) => {
            eprintln!("tandem-proxy await: cannot wait for {program}: {error}");
            1
        }
    }
}

fn empty_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given.
    unsafe {
        let mut set = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    }
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    let mut set = empty_set();
    for &signal in signals {
        // SAFETY: `set` is initialised.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}
