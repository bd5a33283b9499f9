//! The identity directory must be memory-backed; files written there are 0600;
//! a key and CSR provided by Linkerd's wrapper are used and never rotated.

mod common;

use common::*;
use prometheus_client::registry::Registry;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tandem_identity::IdentityMetrics;

fn metrics() -> IdentityMetrics {
    IdentityMetrics::register(&mut Registry::default())
}

/// A tmpfs mounted on a fresh directory, unmounted on drop. `None` when
/// mounting is not permitted (not root, or no CAP_SYS_ADMIN).
struct TmpfsMount {
    dir: tempfile::TempDir,
}

impl TmpfsMount {
    fn new() -> Option<TmpfsMount> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(TmpfsMount { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn directory_on_disk_is_refused_unless_allowed() {
    let pki = Pki::new();
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    assert!(
        !is_tmpfs(disk.path()),
        "the target directory is expected on a disk filesystem"
    );
    let mut env = pki.env(&["127.0.0.1:1".parse().unwrap()], None);
    env.insert(
        "LINKERD2_PROXY_IDENTITY_DIR".into(),
        disk.path().display().to_string(),
    );

    let err = tandem_identity::spawn(pki.client_config(&env), metrics()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("not memory-backed"), "{msg}");
    assert!(msg.contains("TANDEM_IDENTITY_ALLOW_DISK"), "{msg}");

    env.insert("TANDEM_IDENTITY_ALLOW_DISK".into(), "true".into());
    tandem_identity::spawn(pki.client_config(&env), metrics()).unwrap();
}

async fn certify_into(pki: &Pki, dir: &Path) {
    let svc = pki.start(None).await;
    let mut env = pki.env(&[svc.addr], None);
    env.insert(
        "LINKERD2_PROXY_IDENTITY_DIR".into(),
        dir.display().to_string(),
    );
    let mut rx = tandem_identity::spawn(pki.client_config(&env), metrics()).unwrap();
    let creds = tokio::time::timeout(BOUND, rx.wait_for(Option::is_some))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    let written = dir.join(tandem_identity::client::CERT_FILE);
    eventually("crt.pem to be written", || {
        let written = written.clone();
        async move { written.exists() }
    })
    .await;
    let mode = std::fs::metadata(&written).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let certs = tandem_identity::pem::certs(&std::fs::read(&written).unwrap()).unwrap();
    assert_eq!(certs.len(), creds.cert_chain.len());
    // Nothing else (in particular no key) is written.
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [tandem_identity::client::CERT_FILE]);
}

#[tokio::test]
async fn files_on_dev_shm_are_private() {
    let pki = Pki::new();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    assert!(is_tmpfs(dir.path()));
    certify_into(&pki, dir.path()).await;
}

#[tokio::test]
async fn files_on_a_mounted_tmpfs_are_private() {
    let Some(mount) = TmpfsMount::new() else {
        eprintln!("skipped: cannot mount tmpfs here (not root?)");
        return;
    };
    assert!(is_tmpfs(mount.path()));
    let pki = Pki::new();
    certify_into(&pki, mount.path()).await;
}

#[tokio::test]
async fn provided_key_and_csr_are_used_and_not_rotated() {
    let pki = Pki::new();
    let svc = pki.start(None).await;
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (key, csr) = tandem_identity::issuer::generate_csr(NAME).unwrap();
    std::fs::write(dir.path().join("key.p8"), key.serialize_der()).unwrap();
    std::fs::write(dir.path().join("csr.der"), csr).unwrap();
    let mut env = pki.env(&[svc.addr], None);
    env.insert(
        "LINKERD2_PROXY_IDENTITY_DIR".into(),
        dir.path().display().to_string(),
    );
    let mut rx = tandem_identity::spawn(pki.client_config(&env), metrics()).unwrap();
    let first = tokio::time::timeout(BOUND, rx.wait_for(Option::is_some))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    let second = tokio::time::timeout(
        BOUND,
        rx.wait_for(|c| {
            c.as_ref()
                .is_some_and(|c| c.cert_chain[0] != first.cert_chain[0])
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .clone()
    .unwrap();
    assert_eq!(spki(&first.cert_chain[0]), key.public_key_raw());
    assert_eq!(spki(&second.cert_chain[0]), key.public_key_raw());
}

fn from(pairs: &[(&str, &str)]) -> Result<Option<tandem_identity::ClientConfig>, Vec<String>> {
    let map: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tandem_identity::ClientConfig::from_lookup(|k| map.get(k).cloned())
}

#[test]
fn config_errors_name_their_variables() {
    assert!(from(&[]).unwrap().is_none());
    let errs = from(&[
        ("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", NAME),
        (
            "LINKERD2_PROXY_IDENTITY_SVC_ADDR",
            "identity.linkerd.svc:8080",
        ),
        ("LINKERD2_PROXY_IDENTITY_MIN_REFRESH", "x"),
        ("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", "nope"),
    ])
    .unwrap_err();
    for expected in [
        "LINKERD2_PROXY_IDENTITY_MIN_REFRESH=\"x\": expected a duration such as 10s",
        "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS: ",
        "LINKERD2_PROXY_IDENTITY_TOKEN_FILE: required",
        "LINKERD2_PROXY_IDENTITY_SVC_NAME: required",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(expected)),
            "{expected:?} not in {errs:#?}"
        );
    }
    let errs = from(&[("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", "a.b")]).unwrap_err();
    assert!(
        errs.iter()
            .any(|e| e.starts_with("LINKERD2_PROXY_IDENTITY_SVC_ADDR")),
        "{errs:?}"
    );
    let errs = from(&[
        ("LINKERD2_PROXY_IDENTITY_SVC_ADDR", "localhost:8080"),
        ("LINKERD2_PROXY_IDENTITY_MIN_REFRESH", "1h"),
        ("LINKERD2_PROXY_IDENTITY_MAX_REFRESH", "1m"),
        ("TANDEM_IDENTITY_ALLOW_DISK", "maybe"),
    ])
    .unwrap_err();
    for expected in [
        "LINKERD2_PROXY_IDENTITY_LOCAL_NAME: required",
        "LINKERD2_PROXY_IDENTITY_MIN_REFRESH: 60m is longer than",
        "TANDEM_IDENTITY_ALLOW_DISK=\"maybe\"",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(expected)),
            "{expected:?} not in {errs:#?}"
        );
    }
}

#[test]
fn config_follows_linkerd_tls_rules() {
    let pki = Pki::new();
    let anchors = pki.anchor.cert_pem.clone();
    let base = |addr: &'static str| {
        vec![
            ("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", NAME),
            ("LINKERD2_PROXY_IDENTITY_SVC_ADDR", addr),
            (
                "LINKERD2_PROXY_IDENTITY_TOKEN_FILE",
                "/var/run/secrets/tokens/linkerd-identity-token",
            ),
            ("LINKERD2_PROXY_IDENTITY_SVC_NAME", SVC_NAME),
        ]
    };
    let with = |mut v: Vec<(&'static str, &'static str)>,
                extra: &[(&'static str, &'static str)]| {
        v.extend_from_slice(extra);
        v
    };
    let cfg = |pairs: Vec<(&str, &str)>| {
        let mut pairs: Vec<(&str, &str)> = pairs;
        pairs.push(("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", &anchors));
        from(&pairs).unwrap().unwrap()
    };
    // Remote replicas: TLS with the name; defaults for the refresh bounds.
    let c = cfg(base(
        "linkerd-identity-headless.linkerd.svc.cluster.local.:8080",
    ));
    assert_eq!(c.svc_name.as_deref(), Some(SVC_NAME));
    assert_eq!(c.min_refresh, std::time::Duration::from_secs(10));
    assert_eq!(c.max_refresh, std::time::Duration::from_secs(86_400));
    assert_eq!(c.trust_anchors.len(), 1);
    // Loopback: plaintext, as in Linkerd, unless TLS is forced.
    assert_eq!(cfg(base("localhost:8080")).svc_name, None);
    let forced = cfg(with(
        base("127.0.0.1:8080"),
        &[("TANDEM_IDENTITY_SVC_PLAINTEXT", "false")],
    ));
    assert_eq!(forced.svc_name.as_deref(), Some(SVC_NAME));
    let plain = cfg(with(
        base("10.0.0.1:8080"),
        &[("TANDEM_IDENTITY_SVC_PLAINTEXT", "true")],
    ));
    assert_eq!(plain.svc_name, None);
    // Several replicas, comma-separated.
    let many = cfg(base("10.0.0.1:8080,10.0.0.2:8080"));
    assert_eq!(many.svc_addrs, ["10.0.0.1:8080", "10.0.0.2:8080"]);
}

#[tokio::test]
async fn key_file_on_disk_is_refused_unless_allowed() {
    let pki = Pki::new();
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let key = disk.path().join("tls.key").display().to_string();
    let vars = [
        ("TANDEM_IDENTITY_CERT_FILE", "/dev/shm/tls.crt".to_string()),
        ("TANDEM_IDENTITY_KEY_FILE", key),
        (
            "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
            pki.anchor.cert_pem.clone(),
        ),
        (
            "LINKERD2_PROXY_IDENTITY_LOCAL_NAME",
            "vm.example.com".to_string(),
        ),
    ];
    let lookup = |allow: bool| {
        let vars = vars.clone();
        move |k: &str| {
            if allow && k == "TANDEM_IDENTITY_ALLOW_DISK" {
                return Some("true".to_string());
            }
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.clone())
        }
    };
    let config = tandem_identity::IdentityConfig::from_lookup(lookup(false))
        .unwrap()
        .unwrap();
    let msg = format!("{:#}", config.start(metrics()).unwrap_err());
    assert!(msg.contains("TANDEM_IDENTITY_KEY_FILE"), "{msg}");
    assert!(msg.contains("not memory-backed"), "{msg}");

    let allowed = tandem_identity::IdentityConfig::from_lookup(lookup(true))
        .unwrap()
        .unwrap();
    assert!(allowed.start(metrics()).is_ok());
}
