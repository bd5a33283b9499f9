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
    if !options.disabled {
        if let Err(last) = wait_ready(options.admin, options.timeout) {
            eprintln!(
                "tandem-proxy await: the proxy was not ready at http://{}/ready after {:?} ({last})",
                options.admin, options.timeout
            );
            return ExitCode::from(NOT_READY);
        }
    }
    let Some((program, args)) = options.command.split_first() else {
        return ExitCode::SUCCESS;
    };
    let code = run_child(program, args);
    if options.shutdown && !options.disabled {
        if let Err(error) = request(options.admin, "POST", "/shutdown") {
            eprintln!("tandem-proxy await: cannot ask the proxy to shut down: {error}");
        }
    }
    ExitCode::from(code)
}

/// Polls `/ready` until it answers 200; the error is the last thing that went wrong.
fn wait_ready(admin: SocketAddr, timeout: Duration) -> Result<(), String> {
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
            return Err(last);
        }
        std::thread::sleep(pause.min(deadline - now));
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

/// Runs the command with SIGTERM, SIGINT and SIGHUP forwarded, and returns the
/// exit status to pass on.
fn run_child(program: &str, args: &[String]) -> u8 {
    // Block the signals here so that none is lost between spawn and forwarding;
    // the child gets the normal mask back before exec.
    let forwarded = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    let mut previous = empty_set();
    // SAFETY: both sets are initialised; only this thread's mask changes.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &forwarded, &mut previous) };
    let mut command = Command::new(program);
    command.args(args);
    // SAFETY: sigprocmask is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(move || {
            libc::sigprocmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
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
    std::thread::spawn(move || loop {
        let mut signal = 0;
        // SAFETY: `forwarded` is initialised and blocked in every thread spawned
        // after the mask was set, this one included.
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
