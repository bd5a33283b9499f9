//! `tandem-identity check` and `ca` through the built binary: findings and exit codes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};
use tandem_identity::ca;

const DAY: Duration = Duration::from_secs(86_400);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem-identity"))
}

fn check(file: &Path, anchors: Option<&Path>) -> (i32, String) {
    let mut cmd = bin();
    cmd.arg("check").arg(file);
    if let Some(a) = anchors {
        cmd.arg("--anchors").arg(a);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    (out.status.code().unwrap(), stdout)
}

#[test]
fn ca_commands_create_a_chained_anchor_and_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let status = bin()
        .args(["ca", "anchor", "--cert"])
        .arg(p("ca.crt"))
        .arg("--key")
        .arg(p("ca.key"))
        .status()
        .unwrap();
    assert!(status.success());
    let status = bin()
        .args(["ca", "issuer", "--anchor-cert"])
        .arg(p("ca.crt"))
        .arg("--anchor-key")
        .arg(p("ca.key"))
        .arg("--cert")
        .arg(p("issuer.crt"))
        .arg("--key")
        .arg(p("issuer.key"))
        .status()
        .unwrap();
    assert!(status.success());
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca.key", "issuer.key"] {
        assert_eq!(
            std::fs::metadata(p(key)).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let (code, out) = check(&p("issuer.crt"), Some(&p("ca.crt")));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("identity.linkerd.cluster.local"), "{out}");
    assert!(
        out.contains("chains to trust anchor CN=root.linkerd.cluster.local"),
        "{out}"
    );
    let (code, out) = check(&p("ca.crt"), None);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("trust anchor CN=root.linkerd.cluster.local"),
        "{out}"
    );

    // An existing key is not overwritten; the error is one line.
    let out = bin()
        .args(["ca", "anchor", "--cert"])
        .arg(p("ca.crt"))
        .arg("--key")
        .arg(p("ca.key"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("tandem-identity: ") && stderr.contains("already exists"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn check_reports_valid_near_expiry_expired_and_unchained_material() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let now = SystemTime::now();
    let anchor = ca::anchor("root.linkerd.cluster.local", now, 3650 * DAY).unwrap();
    std::fs::write(p("anchor.crt"), &anchor.cert_pem).unwrap();
    let issuer = |nb, validity| {
        ca::issuer(
            &anchor.cert_pem,
            &anchor.key_pem,
            "identity.linkerd.cluster.local",
            nb,
            validity,
        )
        .unwrap()
    };

    std::fs::write(p("valid.crt"), issuer(now, 365 * DAY).cert_pem).unwrap();
    std::fs::write(p("soon.crt"), issuer(now - 300 * DAY, 330 * DAY).cert_pem).unwrap();
    std::fs::write(
        p("expired.crt"),
        issuer(now - 400 * DAY, 365 * DAY).cert_pem,
    )
    .unwrap();
    let stranger = ca::anchor("stranger", now, 3650 * DAY).unwrap();
    std::fs::write(p("stranger.crt"), &stranger.cert_pem).unwrap();

    let (code, out) = check(&p("valid.crt"), Some(&p("anchor.crt")));
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().all(|l| l.starts_with("ok: ")), "{out}");

    let (code, out) = check(&p("soon.crt"), Some(&p("anchor.crt")));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("warning: ") && l.contains("rotate it soon")),
        "{out}"
    );

    let (code, out) = check(&p("expired.crt"), Some(&p("anchor.crt")));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("error: ") && l.contains("expired at")),
        "{out}"
    );

    let (code, out) = check(&p("valid.crt"), Some(&p("stranger.crt")));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("error: ") && l.contains("does not chain")),
        "{out}"
    );

    // A bundle of two anchors (anchor rotation): one finding per anchor.
    std::fs::write(
        p("bundle.crt"),
        format!("{}{}", anchor.cert_pem, stranger.cert_pem),
    )
    .unwrap();
    let (code, out) = check(&p("bundle.crt"), None);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("trust anchor CN="))
            .count(),
        2,
        "{out}"
    );
    // The valid issuer verifies against the bundle.
    let (code, out) = check(&p("valid.crt"), Some(&p("bundle.crt")));
    assert_eq!(code, 0, "{out}");

    // Not a certificate at all.
    std::fs::write(p("junk.crt"), "junk").unwrap();
    let (code, out) = check(&p("junk.crt"), None);
    assert_eq!(code, 2, "{out}");
}

#[test]
fn sec1_keys_from_other_tools_are_accepted() {
    // An anchor made by openssl, key in SEC1 (`EC PRIVATE KEY`) form as step
    // and cert-manager write it.
    let anchor_crt = include_str!("data/sec1-anchor.crt");
    let anchor_key = include_str!("data/sec1-anchor.key");
    assert!(anchor_key.starts_with("-----BEGIN EC PRIVATE KEY-----"));
    let issuer = ca::issuer(
        anchor_crt,
        anchor_key,
        "identity.linkerd.cluster.local",
        SystemTime::now(),
        30 * DAY,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.crt"), anchor_crt).unwrap();
    std::fs::write(dir.path().join("i.crt"), &issuer.cert_pem).unwrap();
    let (code, out) = check(&dir.path().join("i.crt"), Some(&dir.path().join("a.crt")));
    assert_eq!(code, 1, "30 days left is a warning: {out}");
    assert!(out.contains("chains to trust anchor"), "{out}");
    // The issuer loads from a SEC1 key too.
    let sec1 = include_str!("data/sec1-anchor.key");
    tandem_identity::issuer::Issuer::from_pem(anchor_crt.as_bytes(), sec1.as_bytes(), None)
        .unwrap();
}
