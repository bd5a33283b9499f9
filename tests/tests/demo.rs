//! The local mesh demo, run as the README tells a newcomer to run it, but with a
//! smaller burst and without a terminal.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use tandem_tests::mesh::identity_of;
use tandem_tests::{bin_path, require_root};

/// Fails if anything the demo with process id `pid` created is still there: its
/// namespaces (named after its pid by the harness) or a process whose command line or
/// environment names its files.
fn assert_cleaned_up(pid: u32) {
    let namespaces = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned();
    let prefix = format!("tdm{pid}x");
    assert!(
        !namespaces.lines().any(|line| line.starts_with(&prefix)),
        "namespaces of the demo are left:\n{namespaces}"
    );
    let marker = format!("tandem-test-{pid}-");
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        for file in ["cmdline", "environ"] {
            let bytes = std::fs::read(entry.path().join(file)).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(&marker),
                "process {} of the demo is left",
                entry.file_name().to_string_lossy()
            );
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .chain(std::fs::read_dir("/dev/shm").expect("/dev/shm"))
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&marker))
        .map(|e| e.path())
        .collect();
    assert!(
        leftovers.is_empty(),
        "files of the demo are left: {leftovers:?}"
    );
}

#[test]
fn demo_shows_mtls_identities_and_traffic_then_removes_everything() {
    require_root();
    let child = Command::new(bin_path("tandem-demo"))
        .args(["--requests", "20", "--exchanges", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tandem-demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for tandem-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tandem-demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (alpha, beta) = (identity_of("alpha"), identity_of("beta"));
    for expected in [
        format!("alpha proxy identity {alpha}"),
        format!("beta  proxy identity {beta}"),
        format!("beta's inbound proxy verified client {alpha}"),
        format!("alpha's outbound proxy verified server {beta}"),
        "HTTP    20 requests, all 200 OK".to_string(),
        "beta counted 20 inbound responses over mTLS".to_string(),
        "alpha counted 20 outbound".to_string(),
        "1 of them opaque".to_string(),
        "5 exchanges on opaque port 6379, 5120 bytes echoed intact".to_string(),
        "curl -s http://127.0.0.1:4191/metrics".to_string(),
        "The mesh is removed.".to_string(),
    ] {
        assert!(
            stdout.contains(&expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert_cleaned_up(pid);
}

/// Interrupts a demo kept running if the test fails before it does, so the demo
/// removes its mesh instead of running on after the test.
struct InterruptOnDrop(Option<u32>);

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
        }
    }
}

#[test]
fn demo_with_keep_serves_until_interrupted_then_removes_everything() {
    require_root();
    let mut child = Command::new(bin_path("tandem-demo"))
        .args(["--keep", "--requests", "5", "--exchanges", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tandem-demo");
    let pid = child.id();
    let mut interrupt_on_failure = InterruptOnDrop(Some(pid));
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut try_command = None;
    for line in lines.by_ref() {
        let line = line.expect("demo output");
        if line.contains("curl -s http://192.0.2.2:8080/") {
            try_command = Some(line.trim().to_string());
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    // The suggested command works while the mesh is kept: a request from alpha's
    // namespace through both proxies.
    let command = try_command.expect("the demo suggests a curl command");
    let args: Vec<&str> = command.split_whitespace().skip(2).collect();
    let curl = Command::new("ip")
        .args(&args[..])
        .output()
        .expect("curl via ip netns exec");
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "hello from beta\n",
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );

    interrupt_on_failure.0 = None;
    // SAFETY: signalling our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait for tandem-demo");
    assert!(status.success(), "tandem-demo exited with {status}");
    assert!(
        rest.iter().any(|l| l.contains("The mesh is removed.")),
        "{rest:?}"
    );
    assert_cleaned_up(pid);
}

#[test]
fn demo_explains_in_one_line_that_it_needs_root() {
    require_root();
    let out = Command::new(bin_path("tandem-demo"))
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run tandem-demo as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("tandem-demo: needs root"), "{stderr}");
}
