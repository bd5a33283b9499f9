//! The proxy side: obtains and renews the proxy's certificate from an issuer
//! service and publishes it on a watch channel.
//!
//! Configured with Linkerd's environment variables (see [`ClientConfig::from_env`]).

use crate::env::Env;
use crate::metrics::IdentityMetrics;
use crate::refresh::{Schedule, Validity, WallClock};
use crate::tls::BoxedIo;
use anyhow::{bail, Context, Result};
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use linkerd2_proxy_api::identity::CertifyRequest;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

pub const ENV_DIR: &str = "LINKERD2_PROXY_IDENTITY_DIR";
pub const ENV_TRUST_ANCHORS: &str = "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS";
pub const ENV_LOCAL_NAME: &str = "LINKERD2_PROXY_IDENTITY_LOCAL_NAME";
pub const ENV_TOKEN_FILE: &str = "LINKERD2_PROXY_IDENTITY_TOKEN_FILE";
pub const ENV_SVC_ADDR: &str = "LINKERD2_PROXY_IDENTITY_SVC_ADDR";
pub const ENV_SVC_NAME: &str = "LINKERD2_PROXY_IDENTITY_SVC_NAME";
pub const ENV_MIN_REFRESH: &str = "LINKERD2_PROXY_IDENTITY_MIN_REFRESH";
pub const ENV_MAX_REFRESH: &str = "LINKERD2_PROXY_IDENTITY_MAX_REFRESH";
pub const ENV_PLAINTEXT: &str = "TANDEM_IDENTITY_SVC_PLAINTEXT";
pub const ENV_ALLOW_DISK: &str = "TANDEM_IDENTITY_ALLOW_DISK";

/// Default `LINKERD2_PROXY_IDENTITY_MIN_REFRESH`.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(10);
/// Default `LINKERD2_PROXY_IDENTITY_MAX_REFRESH`.
pub const DEFAULT_MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// Name of the certificate chain written to the identity directory (PEM, 0600).
pub const CERT_FILE: &str = "crt.pem";
/// Key provided by Linkerd's `linkerd2-proxy-identity` wrapper (PKCS#8 DER).
pub const KEY_FILE: &str = "key.p8";
/// CSR provided by Linkerd's wrapper (DER).
pub const CSR_FILE: &str = "csr.der";

/// The proxy's current TLS credentials.
pub struct Credentials {
    /// The proxy's identity: its certificate's DNS SAN, or URI SAN for a SPIFFE ID.
    pub name: String,
    /// Leaf first, then intermediates (not the anchor).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 ECDSA P-256 key of the leaf.
    pub key: PrivateKeyDer<'static>,
    /// When the leaf (or an intermediate) expires.
    pub not_after: SystemTime,
    /// The trust anchors peers are verified against.
    pub trust_anchors: Vec<CertificateDer<'static>>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            not_after: self.not_after,
            trust_anchors: self.trust_anchors.clone(),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("name", &self.name)
            .field(
                "cert_chain",
                &format_args!("[{} certificates]", self.cert_chain.len()),
            )
            .field("key", &format_args!("<redacted>"))
            .field("not_after", &crate::pem::rfc3339(self.not_after))
            .field(
                "trust_anchors",
                &format_args!("[{} certificates]", self.trust_anchors.len()),
            )
            .finish()
    }
}

/// Client configuration; usually built by [`ClientConfig::from_env`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `LINKERD2_PROXY_IDENTITY_DIR`: must be memory-backed; holds `key.p8` and
    /// `csr.der` when provided, and receives `crt.pem`.
    pub dir: Option<PathBuf>,
    /// `LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS` (PEM text, one or more certificates).
    pub trust_anchors: Vec<CertificateDer<'static>>,
    /// `LINKERD2_PROXY_IDENTITY_LOCAL_NAME`.
    pub local_name: String,
    /// `LINKERD2_PROXY_IDENTITY_TOKEN_FILE`, re-read on every attempt.
    pub token_file: PathBuf,
    /// `LINKERD2_PROXY_IDENTITY_SVC_ADDR`: one or more comma-separated
    /// `host:port`; every address a host resolves to is a replica.
    pub svc_addrs: Vec<String>,
    /// `LINKERD2_PROXY_IDENTITY_SVC_NAME`: the issuer service's TLS identity.
    /// `None` means plaintext.
    pub svc_name: Option<String>,
    /// `LINKERD2_PROXY_IDENTITY_MIN_REFRESH`.
    pub min_refresh: Duration,
    /// `LINKERD2_PROXY_IDENTITY_MAX_REFRESH`.
    pub max_refresh: Duration,
    /// `TANDEM_IDENTITY_ALLOW_DISK`: allow a directory that is not memory-backed.
    pub allow_disk: bool,
    /// First retry delay after a failure (1s).
    pub backoff_min: Duration,
    /// Longest retry delay (60s; never later than the certificate's expiry).
    pub backoff_max: Duration,
    /// Bound on connecting to one replica, and on one Certify call (10s).
    pub request_timeout: Duration,
}

/// A boolean setting (`crate::env::boolean`); a bad value is reported as `false`.
pub(crate) fn parse_bool(var: &str, v: &str, errors: &mut Vec<String>) -> bool {
    crate::env::boolean(v).unwrap_or_else(|why| {
        errors.push(format!("{var}={v:?}: {why}"));
        false
    })
}

fn is_loopback_host(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl ClientConfig {
    /// Reads the configuration from `env`.
    ///
    /// Returns `Ok(None)` when identity is not configured (neither
    /// `LINKERD2_PROXY_IDENTITY_LOCAL_NAME` nor `..._SVC_ADDR` set). Every
    /// problem is reported, each naming its variable.
    ///
    /// TLS to the issuer is verified against the trust anchors with the name
    /// in `..._SVC_NAME`. With `TANDEM_IDENTITY_SVC_PLAINTEXT` unset, as in
    /// Linkerd, TLS is used unless every address is loopback (then plaintext,
    /// and the name is optional); `=true` forces plaintext; `=false` forces
    /// TLS, even to loopback.
    pub fn from_env(env: &Env) -> Result<Option<ClientConfig>, Vec<String>> {
        Self::read(env)
    }

    /// [`ClientConfig::from_env`] over a lookup function (tests, tools).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<ClientConfig>, Vec<String>> {
        Self::read(&Env::new(&lookup))
    }

    fn read(env: &Env) -> Result<Option<ClientConfig>, Vec<String>> {
        let get = |k: &str| env.setting(k);
        let local_name = get(ENV_LOCAL_NAME);
        let svc_addr = get(ENV_SVC_ADDR);
        if local_name.is_none() && svc_addr.is_none() {
            return Ok(None);
        }
        let mut errors = Vec::new();

        let local_name = match local_name {
            None => {
                errors.push(format!(
                    "{ENV_LOCAL_NAME}: required when {ENV_SVC_ADDR} is set"
                ));
                String::new()
            }
            Some(n) => {
                let n = n.trim().to_string();
                if rustls_pki_types::DnsName::try_from(n.as_str()).is_err() {
                    errors.push(format!("{ENV_LOCAL_NAME}={n:?}: expected a DNS name"));
                }
                n
            }
        };
        let svc_addrs: Vec<String> = match svc_addr {
            None => {
                errors.push(format!(
                    "{ENV_SVC_ADDR}: required when {ENV_LOCAL_NAME} is set"
                ));
                Vec::new()
            }
            Some(a) => {
                let addrs: Vec<String> = a
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                for one in &addrs {
                    let ok = one.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0)
                    });
                    if !ok {
                        errors.push(format!("{ENV_SVC_ADDR}={a:?}: expected host:port (comma-separated for several)"));
                        break;
                    }
                }
                addrs
            }
        };
        let trust_anchors = match get(ENV_TRUST_ANCHORS) {
            None => {
                errors.push(format!("{ENV_TRUST_ANCHORS}: required (PEM trust anchors)"));
                Vec::new()
            }
            Some(pem) => match crate::pem::certs(pem.as_bytes()) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("{ENV_TRUST_ANCHORS}: {e:#}"));
                    Vec::new()
                }
            },
        };
        let token_file = match get(ENV_TOKEN_FILE) {
            Some(p) => PathBuf::from(p),
            None => {
                errors.push(format!("{ENV_TOKEN_FILE}: required"));
                PathBuf::new()
            }
        };
        let duration = |var: &str, default: Duration, errors: &mut Vec<String>| match get(var) {
            None => default,
            Some(v) => crate::env::duration(&v).unwrap_or_else(|_| {
                errors.push(format!("{var}={v:?}: expected a duration such as 10s"));
                default
            }),
        };
        let min_refresh = duration(ENV_MIN_REFRESH, DEFAULT_MIN_REFRESH, &mut errors);
        let max_refresh = duration(ENV_MAX_REFRESH, DEFAULT_MAX_REFRESH, &mut errors);
        if min_refresh > max_refresh {
            errors.push(format!(
                "{ENV_MIN_REFRESH}: {} is longer than {ENV_MAX_REFRESH} ({})",
                crate::env::human(min_refresh),
                crate::env::human(max_refresh)
            ));
        }
        // Unset: Linkerd's rule (TLS when a name is given, except to loopback).
        let plaintext_flag = get(ENV_PLAINTEXT).map(|v| parse_bool(ENV_PLAINTEXT, &v, &mut errors));
        let allow_disk =
            get(ENV_ALLOW_DISK).is_some_and(|v| parse_bool(ENV_ALLOW_DISK, &v, &mut errors));
        let loopback = !svc_addrs.is_empty() && svc_addrs.iter().all(|a| is_loopback_host(a));
        let name = get(ENV_SVC_NAME).map(|n| n.trim().to_string());
        if let Some(n) = &name {
            if rustls_pki_types::DnsName::try_from(n.as_str()).is_err() {
                errors.push(format!("{ENV_SVC_NAME}={n:?}: expected a DNS name"));
            }
        }
        let svc_name = match (plaintext_flag, name) {
            (Some(true), _) => None,
            (Some(false), Some(n)) => Some(n),
            (None, Some(_)) if loopback => None,
            (None, Some(n)) => Some(n),
            (None, None) if loopback => None,
            (Some(false), None) | (None, None) => {
                if !svc_addrs.is_empty() {
                    errors.push(format!(
                        "{ENV_SVC_NAME}: required to verify the identity service over TLS \
                         (or set {ENV_PLAINTEXT}=true to use plaintext)"
                    ));
                }
                None
            }
        };
        let dir = get(ENV_DIR).map(PathBuf::from);

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Some(ClientConfig {
            dir,
            trust_anchors,
            local_name,
            token_file,
            svc_addrs,
            svc_name,
            min_refresh,
            max_refresh,
            allow_disk,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }))
    }

    fn schedule(&self) -> Schedule {
        Schedule {
            min_refresh: self.min_refresh,
            max_refresh: self.max_refresh,
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
        }
    }
}

/// A fresh ECDSA P-256 key and a DER CSR naming `name` as its only DNS SAN,
/// the shape the issuer's `certify` accepts.
pub fn generate_csr(name: &str) -> Result<(rcgen::KeyPair, Vec<u8>)> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generate key")?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .with_context(|| format!("invalid name {name:?}"))?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).context("build CSR")?;
    Ok((key, csr.der().to_vec()))
}

/// The key and CSR Linkerd's wrapper left in the identity directory.
struct ProvidedKey {
    key: PrivatePkcs8KeyDer<'static>,
    csr: Vec<u8>,
}

/// Starts the identity client: checks the identity directory (memory-backed,
/// or explicitly allowed), loads `key.p8`/`csr.der` when both exist, checks the
/// token file, then spawns the refresh task on the current tokio runtime.
///
/// The receiver holds `None` until the first certificate arrives. After a
/// failed renewal it keeps the last certificate, even past `not_after`
/// (callers decide readiness from [`Credentials::not_after`]). The task stops
/// when every receiver is dropped.
pub fn spawn(
    config: ClientConfig,
    metrics: IdentityMetrics,
) -> Result<watch::Receiver<Option<Arc<Credentials>>>, anyhow::Error> {
    let provided = match &config.dir {
        Some(dir) => {
            crate::tmpfs::check_dir(dir, config.allow_disk)?;
            load_provided(dir)?
        }
        None => None,
    };
    let token = std::fs::read(&config.token_file).with_context(|| {
        format!(
            "{ENV_TOKEN_FILE}: cannot read {}",
            config.token_file.display()
        )
    })?;
    if token.trim_ascii().is_empty() {
        bail!("{ENV_TOKEN_FILE}: {} is empty", config.token_file.display());
    }
    if config.trust_anchors.is_empty() {
        bail!("{ENV_TRUST_ANCHORS}: no trust anchors");
    }
    let tls = match &config.svc_name {
        Some(name) => {
            let cfg =
                crate::tls::client_config(&config.trust_anchors).context(ENV_TRUST_ANCHORS)?;
            let server_name = ServerName::try_from(name.clone())
                .with_context(|| format!("{ENV_SVC_NAME}={name:?}"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(cfg)), server_name))
        }
        None => {
            tracing::info!("talking to the identity service in plaintext");
            None
        }
    };
    let handle = tokio::runtime::Handle::try_current()
        .context("the identity client must be started inside a tokio runtime")?;

    let (tx, rx) = watch::channel(None);
    let client = Arc::new(Client {
        config,
        metrics,
        provided,
        tls,
        tx,
    });
    handle.spawn(async move {
        let schedule = client.config.schedule();
        let attempt = {
            let client = client.clone();
            move || {
                let client = client.clone();
                async move { client.refresh().await }
            }
        };
        tokio::select! {
            _ = crate::refresh::drive(schedule, WallClock::new(), attempt) => {}
            _ = client.tx.closed() => tracing::debug!("identity client stopped: no more receivers"),
        }
    });
    Ok(rx)
}

fn load_provided(dir: &std::path::Path) -> Result<Option<ProvidedKey>> {
    let key_path = dir.join(KEY_FILE);
    let csr_path = dir.join(CSR_FILE);
    match (key_path.exists(), csr_path.exists()) {
        (false, false) => Ok(None),
        (true, true) => {
            let key =
                std::fs::read(&key_path).with_context(|| format!("read {}", key_path.display()))?;
            let csr =
                std::fs::read(&csr_path).with_context(|| format!("read {}", csr_path.display()))?;
            if key.is_empty() || csr.is_empty() {
                bail!(
                    "{} and {} must not be empty",
                    key_path.display(),
                    csr_path.display()
                );
            }
            let key = PrivatePkcs8KeyDer::from(key);
            rcgen::KeyPair::try_from(&key)
                .ok()
                .filter(|k| k.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256)
                .with_context(|| {
                    format!("{}: expected a PKCS#8 ECDSA P-256 key", key_path.display())
                })?;
            tracing::info!(dir = %dir.display(), "using the provided key.p8 and csr.der (the key is not rotated)");
            Ok(Some(ProvidedKey { key, csr }))
        }
        _ => bail!(
            "{}: {KEY_FILE} and {CSR_FILE} must be provided together",
            dir.display()
        ),
    }
}

struct Client {
    config: ClientConfig,
    metrics: IdentityMetrics,
    provided: Option<ProvidedKey>,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    tx: watch::Sender<Option<Arc<Credentials>>>,
}

impl Client {
    async fn refresh(&self) -> Result<Validity> {
        match self.certify().await {
            Ok((creds, validity)) => {
                let now = SystemTime::now();
                self.metrics.refreshed(now, creds.not_after);
                if let Some(dir) = &self.config.dir {
                    if let Err(e) = write_chain(dir, &creds.cert_chain) {
                        tracing::warn!("cannot write {CERT_FILE}: {e:#}");
                    }
                }
                tracing::info!(
                    name = %creds.name,
                    not_after = %crate::pem::rfc3339(creds.not_after),
                    "certified"
                );
                self.tx.send_replace(Some(Arc::new(creds)));
                Ok(validity)
            }
            Err(e) => {
                self.metrics.failed();
                Err(e)
            }
        }
    }

    /// One certification: a key and CSR, the token, then each replica in turn.
    async fn certify(&self) -> Result<(Credentials, Validity)> {
        let (key, csr) = match &self.provided {
            Some(p) => (p.key.clone_key(), p.csr.clone()),
            // A fresh key per renewal: a leaked key is only useful until the
            // next rotation.
            None => {
                let (kp, csr) = generate_csr(&self.config.local_name)?;
                (PrivatePkcs8KeyDer::from(kp.serialize_der()), csr)
            }
        };
        let token = tokio::fs::read(&self.config.token_file)
            .await
            .with_context(|| format!("read token file {}", self.config.token_file.display()))?;
        let request = CertifyRequest {
            identity: self.config.local_name.clone(),
            token,
            certificate_signing_request: csr,
        };

        let addrs = self.resolve().await?;
        let mut failures = Vec::new();
        for addr in &addrs {
            match self.certify_at(*addr, request.clone()).await {
                Ok(rsp) => match self.accept(rsp, &key) {
                    Ok(done) => return Ok(done),
                    Err(e) => failures.push(format!("{addr}: {e:#}")),
                },
                Err(e) => {
                    tracing::debug!(%addr, "identity replica failed: {e:#}");
                    failures.push(format!("{addr}: {e:#}"));
                }
            }
        }
        bail!(
            "no identity service replica certified us: {}",
            failures.join("; ")
        )
    }

    async fn resolve(&self) -> Result<Vec<SocketAddr>> {
        let mut out: Vec<SocketAddr> = Vec::new();
        let mut errors = Vec::new();
        for a in &self.config.svc_addrs {
            match tokio::net::lookup_host(a.as_str()).await {
                Ok(found) => {
                    for s in found {
                        if !out.contains(&s) {
                            out.push(s);
                        }
                    }
                }
                Err(e) => errors.push(format!("{a}: {e}")),
            }
        }
        if out.is_empty() {
            bail!("cannot resolve the identity service: {}", errors.join("; "));
        }
        Ok(out)
    }

    async fn certify_at(
        &self,
        addr: SocketAddr,
        request: CertifyRequest,
    ) -> Result<linkerd2_proxy_api::identity::CertifyResponse> {
        let timeout = self.config.request_timeout;
        let tls = self.tls.clone();
        let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                let io: BoxedIo = match tls {
                    Some((connector, name)) => Box::new(connector.connect(name, tcp).await?),
                    None => Box::new(tcp),
                };
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
            }
        });
        // Rebuilt per call: renewals are rare, and a fresh connection lets a
        // restarted or replaced replica be used right away.
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .context("endpoint")?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = tokio::time::timeout(timeout, endpoint.connect_with_connector(connector))
            .await
            .context("connect timed out")?
            .context("connect")?;
        let rsp = IdentityClient::new(channel)
            .certify(request)
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", code_name(s.code()), s.message()))?;
        Ok(rsp.into_inner())
    }

    /// Checks a response before it is published: not expired, chains to the
    /// trust anchors, names us, and certifies our key.
    fn accept(
        &self,
        rsp: linkerd2_proxy_api::identity::CertifyResponse,
        key: &PrivatePkcs8KeyDer<'static>,
    ) -> Result<(Credentials, Validity)> {
        let now = SystemTime::now();
        let valid_until = rsp.valid_until.context("response has no valid_until")?;
        if valid_until.seconds <= crate::pem::unix_secs(now) {
            bail!("response valid_until is in the past");
        }
        let mut chain = vec![der_or_pem(&rsp.leaf_certificate).context("leaf certificate")?];
        for c in &rsp.intermediate_certificates {
            chain.push(der_or_pem(c).context("intermediate certificate")?);
        }
        let (_, leaf) =
            x509_parser::parse_x509_certificate(&chain[0]).context("invalid leaf certificate")?;
        let kp = rcgen::KeyPair::try_from(key).context("invalid local key")?;
        if leaf.public_key().subject_public_key.data.as_ref() != kp.public_key_raw() {
            bail!("the issued certificate is not for our key");
        }
        crate::tls::verify(
            &chain,
            &self.config.trust_anchors,
            &self.config.local_name,
            now,
        )
        .context("the issued certificate does not verify")?;
        let not_before = crate::pem::system_time(&leaf.validity().not_before);
        let mut not_after = crate::pem::system_time(&leaf.validity().not_after);
        for c in &chain[1..] {
            if let Ok((_, x)) = x509_parser::parse_x509_certificate(c) {
                not_after = not_after.min(crate::pem::system_time(&x.validity().not_after));
            }
        }
        let creds = Credentials {
            name: self.config.local_name.clone(),
            cert_chain: chain,
            key: PrivateKeyDer::Pkcs8(key.clone_key()),
            not_after,
            trust_anchors: self.config.trust_anchors.clone(),
        };
        Ok((
            creds,
            Validity {
                not_before,
                not_after,
            },
        ))
    }
}

fn der_or_pem(bytes: &[u8]) -> Result<CertificateDer<'static>> {
    if bytes.starts_with(b"-----BEGIN") {
        Ok(crate::pem::certs(bytes)?.remove(0))
    } else {
        Ok(CertificateDer::from(bytes.to_vec()))
    }
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

fn write_chain(dir: &std::path::Path, chain: &[CertificateDer<'_>]) -> Result<()> {
    let blocks: Vec<pem::Pem> = chain
        .iter()
        .map(|c| pem::Pem::new("CERTIFICATE", c.to_vec()))
        .collect();
    let text = pem::encode_many(&blocks);
    crate::tmpfs::write_private(&dir.join(CERT_FILE), text.as_bytes())
}
