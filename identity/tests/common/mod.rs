//! Shared fixtures: a PKI in a temp dir, an in-process issuer service, and a
//! client configuration pointing at it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tandem_identity::auth::TokenFile;
use tandem_identity::service::{self, Running, ServiceConfig};
use tandem_identity::{ca, ClientConfig};

pub const NAME: &str = "web.default.serviceaccount.identity.linkerd.cluster.local";
pub const TOKEN: &str = "web-token";
pub const SVC_NAME: &str = "identity.linkerd.serviceaccount.identity.linkerd.cluster.local";
/// Generous bound for conditions that should hold within milliseconds.
pub const BOUND: Duration = Duration::from_secs(30);

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub anchor: ca::CaMaterial,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let anchor = ca::anchor(
            ca::DEFAULT_ANCHOR_NAME,
            SystemTime::now(),
            ca::DEFAULT_ANCHOR_VALIDITY,
        )
        .unwrap();
        std::fs::write(dir.path().join("anchor.crt"), &anchor.cert_pem).unwrap();
        std::fs::write(dir.path().join("tokens"), format!("{TOKEN} {NAME}\n")).unwrap();
        std::fs::write(dir.path().join("token"), TOKEN).unwrap();
        let pki = Pki { dir, anchor };
        pki.write_issuer(&pki.issuer(
            ca::DEFAULT_ISSUER_NAME,
            SystemTime::now(),
            Duration::from_secs(86_400 * 30),
        ));
        pki
    }

    pub fn issuer(&self, name: &str, not_before: SystemTime, validity: Duration) -> ca::CaMaterial {
        ca::issuer(
            &self.anchor.cert_pem,
            &self.anchor.key_pem,
            name,
            not_before,
            validity,
        )
        .unwrap()
    }

    /// Replaces the issuer files the way a Secret update does: write aside, rename.
    pub fn write_issuer(&self, m: &ca::CaMaterial) {
        for (name, text) in [("issuer.key", &m.key_pem), ("issuer.crt", &m.cert_pem)] {
            let tmp = self.path(&format!("{name}.new"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.path(name)).unwrap();
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn service_config(&self, addr: SocketAddr, tls_name: Option<&str>) -> ServiceConfig {
        ServiceConfig {
            addr,
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            issuer_cert: self.path("issuer.crt"),
            issuer_key: self.path("issuer.key"),
            trust_anchors: Some(self.path("anchor.crt")),
            authenticator: Arc::new(TokenFile::open(&self.path("tokens")).unwrap()),
            cert_lifetime: Duration::from_secs(3600),
            clock_skew: Duration::from_secs(60),
            reload_interval: Duration::from_millis(50),
            tls_name: tls_name.map(str::to_string),
        }
    }

    pub async fn start(&self, tls_name: Option<&str>) -> Running {
        self.start_at("127.0.0.1:0".parse().unwrap(), tls_name)
            .await
    }

    pub async fn start_at(&self, addr: SocketAddr, tls_name: Option<&str>) -> Running {
        service::start(self.service_config(addr, tls_name))
            .await
            .unwrap()
    }

    /// The Linkerd environment for a proxy using `addrs`.
    pub fn env(&self, addrs: &[SocketAddr], svc_name: Option<&str>) -> HashMap<String, String> {
        let mut env = HashMap::new();
        env.insert(
            "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS".into(),
            self.anchor.cert_pem.clone(),
        );
        env.insert("LINKERD2_PROXY_IDENTITY_LOCAL_NAME".into(), NAME.into());
        env.insert(
            "LINKERD2_PROXY_IDENTITY_TOKEN_FILE".into(),
            self.path("token").display().to_string(),
        );
        env.insert(
            "LINKERD2_PROXY_IDENTITY_SVC_ADDR".into(),
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        match svc_name {
            Some(n) => {
                env.insert("LINKERD2_PROXY_IDENTITY_SVC_NAME".into(), n.into());
                // Tests run on loopback, where Linkerd's rule would skip TLS.
                env.insert("TANDEM_IDENTITY_SVC_PLAINTEXT".into(), "false".into());
            }
            None => {
                env.insert("TANDEM_IDENTITY_SVC_PLAINTEXT".into(), "true".into());
            }
        }
        // Renew every few hundred milliseconds so tests see several renewals.
        env.insert("LINKERD2_PROXY_IDENTITY_MIN_REFRESH".into(), "50ms".into());
        env.insert("LINKERD2_PROXY_IDENTITY_MAX_REFRESH".into(), "300ms".into());
        env
    }

    pub fn client_config(&self, env: &HashMap<String, String>) -> ClientConfig {
        let mut c = ClientConfig::from_lookup(|k| env.get(k).cloned())
            .unwrap()
            .unwrap();
        c.backoff_min = Duration::from_millis(20);
        c.backoff_max = Duration::from_millis(200);
        c.request_timeout = Duration::from_secs(5);
        c
    }
}

/// Fetches an admin path; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Polls `cond` until it holds, failing after [`BOUND`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + BOUND;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads the value of a metric line (exact name with labels) from `/metrics` text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The subject public key of a DER certificate.
pub fn spki(der: &[u8]) -> Vec<u8> {
    let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
    x.public_key().subject_public_key.data.to_vec()
}

/// The issuer common name of a DER certificate.
pub fn issuer_cn(der: &[u8]) -> String {
    let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
    x.issuer().to_string()
}

pub fn is_tmpfs(p: &Path) -> bool {
    tandem_identity::tmpfs::is_memory_backed(p).unwrap()
}
