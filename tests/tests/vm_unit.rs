//! The VM's systemd unit (`deploy/vm/tandem-proxy.service`) is one systemd accepts
//! without a warning, and keeps the hardening and rule handling docs/vm.md promises.

use std::path::Path;
use std::process::Command;

use tandem_tests::bin_path;

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vm/tandem-proxy.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_unit_hardens_the_proxy_and_applies_and_removes_the_rules() {
    let unit = unit_text();
    for line in [
        "User=tandem-proxy",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
        "RuntimeDirectory=tandem\n",
        "RuntimeDirectoryMode=0700",
        "ExecStartPre=+/usr/local/bin/tandem-init --host --proxy-uid ",
        "ExecStart=/usr/local/bin/tandem-proxy\n",
        "ExecStopPost=+/usr/local/bin/tandem-init cleanup\n",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}");
    }
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let found = Command::new("systemd-analyze").arg("--version").output();
    if !found.is_ok_and(|out| out.status.success()) {
        eprintln!(
            "skipped: systemd-analyze is not installed on this machine, so deploy/vm/tandem-proxy.service was not verified"
        );
        return;
    }
    // Verify checks that every command exists: point them at the binaries just built.
    let bin_dir = bin_path("tandem-proxy")
        .parent()
        .expect("binary directory")
        .display()
        .to_string();
    let unit = unit_text().replace("/usr/local/bin/", &format!("{bin_dir}/"));
    let dir = std::env::temp_dir().join(format!("tandem-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("directory");
    let path = dir.join("tandem-proxy.service");
    std::fs::write(&path, unit).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings about the host's own units (which verify also loads) are not ours.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("tandem-proxy"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
}
