//! A meshed test world: a trust domain (anchor and issuer made with `tandem-identity
//! ca`), the issuer service running in a pod, and the settings a proxy needs to get
//! its certificate and find its peers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::netns::{Mesh, Pod};
use crate::proc::Proc;
use crate::proxy::{redirect_except, Proxy};
use crate::{bin_path, probe, wait_for, PATIENCE, PROXY_UID};

/// The identity the issuer serves gRPC TLS under (the proxies' `SVC_NAME`).
pub const ISSUER_NAME: &str = "identity.tandem-test.local";

/// The identity of a workload called `name`, in Linkerd's format.
pub fn identity_of(name: &str) -> String {
    format!("{name}.default.serviceaccount.identity.linkerd.cluster.local")
}

/// A trust anchor and an issuer in files of their own, removed on drop.
pub struct TrustDomain {
    pub dir: PathBuf,
    pub anchor_pem: String,
    pub issuer_cert: PathBuf,
    pub issuer_key: PathBuf,
    tokens: PathBuf,
    /// Proxies' identity directories on tmpfs, removed with the domain.
    identity_dirs: std::sync::Mutex<Vec<PathBuf>>,
}

impl TrustDomain {
    pub fn new() -> TrustDomain {
        let dir = unique_dir(&std::env::temp_dir(), "domain");
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let run = |args: &[&str]| {
            let out = Command::new(bin_path("tandem-identity"))
                .args(args)
                .output()
                .expect("run tandem-identity");
            assert!(
                out.status.success(),
                "tandem-identity {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "ca",
            "anchor",
            "--cert",
            &path("anchor.crt"),
            "--key",
            &path("anchor.key"),
        ]);
        run(&[
            "ca",
            "issuer",
            "--anchor-cert",
            &path("anchor.crt"),
            "--anchor-key",
            &path("anchor.key"),
            "--cert",
            &path("issuer.crt"),
            "--key",
            &path("issuer.key"),
        ]);
        let anchor_pem = std::fs::read_to_string(dir.join("anchor.crt")).expect("anchor");
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, "").expect("tokens file");
        TrustDomain {
            issuer_cert: dir.join("issuer.crt"),
            issuer_key: dir.join("issuer.key"),
            anchor_pem,
            tokens,
            dir,
            identity_dirs: Default::default(),
        }
    }

    /// Runs the issuer service in `pod` on port 8080 (admin 9990) and waits until ready.
    pub fn start_issuer(&self, pod: &Pod, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(bin_path("tandem-identity"));
        cmd.arg("serve")
            .args([
                "--addr",
                "0.0.0.0:8080",
                "--admin-addr",
                "0.0.0.0:9990",
                "--tls-name",
                ISSUER_NAME,
            ])
            .arg("--issuer-cert")
            .arg(&self.issuer_cert)
            .arg("--issuer-key")
            .arg(&self.issuer_key)
            .arg("--trust-anchors")
            .arg(self.dir.join("anchor.crt"))
            .arg("--tokens")
            .arg(&self.tokens)
            .args(extra);
        let mut issuer = pod.spawn("tandem-identity", cmd);
        let admin = SocketAddr::from(([127, 0, 0, 1], 9990));
        wait_for("the issuer to become ready", PATIENCE, || {
            if let Some(status) = issuer.try_exit() {
                panic!("the issuer exited with {status}:\n{}", issuer.output());
            }
            matches!(
                pod.run(|| probe::http(admin, "GET", "/ready", "")),
                Ok((200, _))
            )
            .then_some(())
        });
        issuer
    }

    /// Everything a proxy called `name` needs to be certified by the issuer at
    /// `issuer`, plus a discovery file listing `peers` (address → workload name).
    pub fn proxy_env(
        &self,
        name: &str,
        issuer: SocketAddr,
        peers: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        self.proxy_env_with(name, issuer, peers, false)
    }

    /// [`Self::proxy_env`], with `http2: true` on every peer's discovery entry when
    /// `http2` is set (the peers accept HTTP/1 upgraded to HTTP/2 between proxies).
    pub fn proxy_env_with(
        &self,
        name: &str,
        issuer: SocketAddr,
        peers: &[(&str, &str)],
        http2: bool,
    ) -> Vec<(String, String)> {
        let mut discovery = String::from("destinations:\n");
        for (addr, peer) in peers {
            discovery.push_str(&format!(
                "  - addr: \"{addr}\"\n    identity: {}\n    http2: {http2}\n",
                identity_of(peer)
            ));
        }
        let mut env = self.identity_env(name, issuer);
        env.push(self.discovery_file(name, &discovery));
        env
    }

    /// A discovery file for the proxy called `name` holding `text`, as the setting
    /// that points at it.
    pub fn discovery_file(&self, name: &str, text: &str) -> (String, String) {
        let discovery_file = self.dir.join(format!("{name}.discovery.yaml"));
        std::fs::write(&discovery_file, text).expect("discovery file");
        make_readable(&discovery_file);
        make_readable(&self.dir);
        (
            "TANDEM_DISCOVERY_FILE".to_string(),
            discovery_file.to_string_lossy().into_owned(),
        )
    }

    /// Everything a proxy called `name` needs to be certified by the issuer at
    /// `issuer` (its identity is [`identity_of`]`(name)`), and nothing more.
    pub fn identity_env(&self, name: &str, issuer: SocketAddr) -> Vec<(String, String)> {
        let token = format!("token-of-{name}");
        let mut tokens = std::fs::read_to_string(&self.tokens).unwrap_or_default();
        tokens.push_str(&format!("{token} {}\n", identity_of(name)));
        std::fs::write(&self.tokens, tokens).expect("tokens");
        let token_file = self.dir.join(format!("{name}.token"));
        std::fs::write(&token_file, &token).expect("token file");
        // Identity files only ever go to memory-backed storage.
        let identity_dir = unique_dir(Path::new("/dev/shm"), name);
        chown_to_proxy(&identity_dir);
        self.identity_dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(identity_dir.clone());
        make_readable(&token_file);
        make_readable(&self.dir);
        [
            ("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", identity_of(name)),
            ("LINKERD2_PROXY_IDENTITY_SVC_ADDR", issuer.to_string()),
            ("LINKERD2_PROXY_IDENTITY_SVC_NAME", ISSUER_NAME.to_string()),
            (
                "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
                self.anchor_pem.clone(),
            ),
            (
                "LINKERD2_PROXY_IDENTITY_TOKEN_FILE",
                token_file.to_string_lossy().into_owned(),
            ),
            (
                "LINKERD2_PROXY_IDENTITY_DIR",
                identity_dir.to_string_lossy().into_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A certificate chain and key for `name`, signed by the issuer, for a server
    /// of the mesh that is not a proxy (the test control plane).
    pub fn leaf(
        &self,
        name: &str,
    ) -> (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let issuer_key_pem = std::fs::read_to_string(&self.issuer_key).expect("issuer key");
        let issuer_pem = std::fs::read_to_string(&self.issuer_cert).expect("issuer cert");
        let issuer_key = rcgen::KeyPair::from_pem(&issuer_key_pem).expect("issuer key parses");
        let issuer = rcgen::CertificateParams::from_ca_cert_pem(&issuer_pem)
            .expect("issuer cert parses")
            .self_signed(&issuer_key)
            .expect("issuer");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = params.signed_by(&key, &issuer, &issuer_key).expect("sign");
        let issuer_der = pem::parse(issuer_pem.as_bytes())
            .expect("issuer pem")
            .into_contents();
        (
            vec![
                leaf.der().clone(),
                rustls::pki_types::CertificateDer::from(issuer_der),
            ],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }
}

impl Default for TrustDomain {
    fn default() -> TrustDomain {
        TrustDomain::new()
    }
}

impl Drop for TrustDomain {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        for dir in self
            .identity_dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Borrowed view of owned settings, as [`crate::Proxy::start`] takes them.
pub fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn unique_dir(parent: &Path, label: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = parent.join(format!(
        "tandem-test-{}-{}-{label}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create test directory");
    dir
}

fn chown_to_proxy(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid C string and ids.
    let rc = unsafe { libc::chown(c_path.as_ptr(), PROXY_UID, PROXY_UID) };
    assert_eq!(
        rc,
        0,
        "chown {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn make_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The meshed world most tests need: pods alpha (0) and beta (1) with redirect rules,
/// each knowing the other through discovery, and the issuer in pod 2 (which has no
/// rules, so it can also play an unmeshed client).
pub struct MeshedPair {
    pub mesh: Mesh,
    pub domain: TrustDomain,
}

impl Default for MeshedPair {
    fn default() -> MeshedPair {
        MeshedPair::new()
    }
}

impl MeshedPair {
    pub fn new() -> MeshedPair {
        MeshedPair::with_direct_ports(&[])
    }

    /// A pair whose rules leave `direct_ports` unproxied in both pods.
    pub fn with_direct_ports(direct_ports: &[u16]) -> MeshedPair {
        let mesh = Mesh::new(3);
        redirect_except(mesh.pod(0), direct_ports);
        redirect_except(mesh.pod(1), direct_ports);
        MeshedPair {
            mesh,
            domain: TrustDomain::new(),
        }
    }

    pub fn a(&self) -> &Pod {
        self.mesh.pod(0)
    }

    pub fn b(&self) -> &Pod {
        self.mesh.pod(1)
    }

    /// Beta's address at `port`, as an app in alpha dials it.
    pub fn b_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.b().ipv4, port))
    }

    pub fn issuer_addr(&self) -> SocketAddr {
        SocketAddr::from((self.mesh.pod(2).ipv4, 8080))
    }

    /// Settings for the proxy of pod `index` (0 or 1), which knows the other one;
    /// `http2` marks that peer as accepting HTTP/2 between proxies.
    pub fn env(&self, index: usize, http2: bool, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let names = ["alpha", "beta"];
        let peer = 1 - index;
        let peer_addr = self.mesh.pod(peer).ipv4.to_string();
        let mut env = self.domain.proxy_env_with(
            names[index],
            self.issuer_addr(),
            &[(&peer_addr, names[peer])],
            http2,
        );
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    pub fn start_issuer(&self, extra: &[&str]) -> Proc {
        self.domain.start_issuer(self.mesh.pod(2), extra)
    }

    /// Starts the issuer and both proxies with default settings.
    pub fn start(&self, http2: bool) -> (Proc, Proxy<'_>, Proxy<'_>) {
        let (env_a, env_b) = (self.env(0, http2, &[]), self.env(1, http2, &[]));
        let issuer = self.start_issuer(&[]);
        let a = Proxy::start(self.a(), &env_refs(&env_a));
        let b = Proxy::start(self.b(), &env_refs(&env_b));
        (issuer, a, b)
    }
}
