//! `tandem-proxy await`: the wrapper an app's container uses so that it starts only
//! once its proxy is ready, and (with `--shutdown`) stops the proxy when it ends.
//! Each test runs in a pod of its own, with the proxy's admin server on 4191 there.

use std::process::Command;

use tandem_tests::mesh::{env_refs, MeshedPair};
use tandem_tests::{bin_path, Mesh, Proxy, PATIENCE};

fn await_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin_path("tandem-proxy"));
    cmd.arg("await").args(args);
    cmd
}

#[test]
fn waits_for_ready_then_runs_the_command_and_passes_its_status() {
    let pair = MeshedPair::new();
    // No issuer yet: the proxy is up but not ready (no certificate).
    let env = pair.env(0, false, &[]);
    let proxy = Proxy::launch(pair.a(), &env_refs(&env));
    let mut waiting = pair.a().spawn(
        "await",
        await_command(&[
            "--timeout",
            "2m",
            "--",
            "sh",
            "-c",
            "curl -s -o /dev/null -w 'ready answered %{http_code}\\n' http://127.0.0.1:4191/ready; exit 7",
        ]),
    );
    tandem_tests::wait_for("the proxy's admin server to answer", PATIENCE, || {
        matches!(proxy.admin_request("GET", "/ready", ""), Ok((503, _))).then_some(())
    });
    assert!(
        waiting.try_exit().is_none(),
        "await must not finish while the proxy is not ready: {}",
        waiting.output()
    );
    let _issuer = pair.start_issuer(&[]);
    let status = waiting.wait_exit(PATIENCE);
    let output = waiting.output();
    assert_eq!(status.code(), Some(7), "{output}");
    assert!(output.contains("ready answered 200"), "{output}");
}

#[test]
fn with_shutdown_the_proxy_exits_when_the_command_ends() {
    let mesh = Mesh::new(1);
    let pod = mesh.pod(0);
    let mut proxy = Proxy::start(pod, &[("LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED", "true")]);
    let mut job = pod.spawn(
        "await",
        await_command(&["--shutdown", "--", "sh", "-c", "echo job done; exit 3"]),
    );
    let status = job.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(3), "{}", job.output());
    assert!(job.output().contains("job done"));
    let proxy_status = proxy.process.wait_exit(PATIENCE);
    assert!(
        proxy_status.success(),
        "the proxy drains and exits 0: {proxy_status}\n{}",
        proxy.process.output()
    );
}

#[test]
fn a_signal_reaches_the_command() {
    let mesh = Mesh::new(1);
    let pod = mesh.pod(0);
    let _proxy = Proxy::start(pod, &[]);
    let mut app = pod.spawn(
        "await",
        await_command(&[
            "--",
            "sh",
            "-c",
            "trap 'echo got TERM; kill $!; exit 143' TERM; sleep 1000 & echo started; wait",
        ]),
    );
    tandem_tests::wait_for("the command to start", PATIENCE, || {
        app.output().contains("started").then_some(())
    });
    app.signal(libc::SIGTERM);
    let status = app.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(143), "{}", app.output());
    assert!(app.output().contains("got TERM"), "{}", app.output());
}

#[test]
fn gives_up_with_one_line_when_the_proxy_never_becomes_ready() {
    let mesh = Mesh::new(1);
    let pod = mesh.pod(0);
    let marker = std::env::temp_dir().join(format!("tandem-await-ran-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let mut waiting = pod.spawn(
        "await",
        await_command(&["--timeout", "1s", "--", "touch", marker.to_str().unwrap()]),
    );
    let status = waiting.wait_exit(PATIENCE);
    let output = waiting.output();
    assert_eq!(status.code(), Some(69), "{output}");
    assert_eq!(output.lines().count(), 1, "{output}");
    assert!(
        output.starts_with(
            "tandem-proxy await: the proxy was not ready at http://127.0.0.1:4191/ready after 1s"
        ),
        "{output}"
    );
    assert!(!marker.exists(), "the command must not run");
}

/// Whether `pid` is in its wait loop, where SIGTERM is blocked and collected with
/// `sigtimedwait` (inside that call the kernel shows the signals as unblocked).
fn is_waiting(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let blocked = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0);
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    blocked || wchan.contains("sigtimedwait")
}

#[test]
fn sigterm_while_waiting_ends_the_wait_without_running_the_command() {
    let mesh = Mesh::new(1);
    let pod = mesh.pod(0);
    let marker = std::env::temp_dir().join(format!("tandem-await-term-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let mut waiting = pod.spawn(
        "await",
        await_command(&["--timeout", "10m", "--", "touch", marker.to_str().unwrap()]),
    );
    tandem_tests::wait_for("await to start waiting", PATIENCE, || {
        is_waiting(waiting.pid()).then_some(())
    });
    waiting.signal(libc::SIGTERM);
    let status = waiting.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(143), "{}", waiting.output());
    assert!(!marker.exists(), "the command must not run");
}

#[test]
fn with_shutdown_a_proxy_that_never_became_ready_is_stopped_too() {
    let pair = MeshedPair::new();
    // No issuer: the proxy never gets a certificate, so it never becomes ready.
    let env = pair.env(
        0,
        false,
        &[("LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED", "true")],
    );
    let mut proxy = Proxy::launch(pair.a(), &env_refs(&env));
    tandem_tests::wait_for("the proxy's admin server to answer", PATIENCE, || {
        matches!(proxy.admin_request("GET", "/ready", ""), Ok((503, _))).then_some(())
    });
    let mut job = pair.a().spawn(
        "await",
        await_command(&["--timeout", "1s", "--shutdown", "--", "true"]),
    );
    assert_eq!(job.wait_exit(PATIENCE).code(), Some(69), "{}", job.output());
    let status = proxy.process.wait_exit(PATIENCE);
    assert!(
        status.success(),
        "a Job whose proxy never became ready still ends: {status}\n{}",
        proxy.process.output()
    );
}
