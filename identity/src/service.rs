//! The issuer service (`tandem-identity serve`): Linkerd's
//! `io.linkerd.proxy.identity.Identity/Certify` over gRPC, issuer hot-reload,
//! and an admin port with `/metrics`, `/ready` and `/live`.
//!
//! The service keeps no state besides the issuer files, so any number of
//! replicas loaded with the same issuer can serve the same proxies.

use crate::auth::Authenticator;
use crate::issuer::{Issuer, Refusal};
use crate::metrics::IssuerMetrics;
use crate::tls::{BoxedIo, SwappableCert};
use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use prometheus_client::registry::Registry;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Default gRPC address, as Linkerd's identity service.
pub const DEFAULT_ADDR: &str = "0.0.0.0:8080";
/// Default admin address.
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:9990";

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `serve` needs.
pub struct ServiceConfig {
    /// gRPC listen address.
    pub addr: SocketAddr,
    /// Admin (metrics/readiness) listen address.
    pub admin_addr: SocketAddr,
    /// Issuer certificate PEM (the issuer first, optionally followed by intermediates).
    pub issuer_cert: PathBuf,
    /// Issuer private key PEM.
    pub issuer_key: PathBuf,
    /// Trust anchors PEM; when set the issuer must chain to them.
    pub trust_anchors: Option<PathBuf>,
    /// Decides which token may claim which identity.
    pub authenticator: Arc<dyn Authenticator>,
    /// Lifetime of issued certificates.
    pub cert_lifetime: Duration,
    /// How far `not_before` is backdated for clocks behind ours.
    pub clock_skew: Duration,
    /// How often the issuer files are checked for changes.
    pub reload_interval: Duration,
    /// When set, gRPC is served over TLS with a certificate for this name,
    /// issued by the current issuer (what `LINKERD2_PROXY_IDENTITY_SVC_NAME`
    /// names on the proxy side).
    pub tls_name: Option<String>,
}

struct Shared {
    issuer: RwLock<Arc<Issuer>>,
    auth: Arc<dyn Authenticator>,
    metrics: IssuerMetrics,
    lifetime: Duration,
    skew: Duration,
}

impl Shared {
    fn issuer(&self) -> Arc<Issuer> {
        match self.issuer.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_issuer(&self, issuer: Issuer) {
        self.metrics.issuer_expiry(issuer.not_after);
        let issuer = Arc::new(issuer);
        match self.issuer.write() {
            Ok(mut g) => *g = issuer,
            Err(p) => *p.into_inner() = issuer,
        }
    }

    async fn certify(&self, req: CertifyRequest) -> Result<CertifyResponse, Refusal> {
        let identity = req.identity.as_str();
        if rustls_pki_types::DnsName::try_from(identity).is_err() {
            return Err(Refusal::InvalidCsr(format!(
                "requested identity {identity:?} is not a DNS name"
            )));
        }
        self.auth.authenticate(&req.token, identity).await?;
        let issuer = self.issuer();
        let now = SystemTime::now();
        let issued = issuer.certify(
            identity,
            &req.certificate_signing_request,
            now,
            self.lifetime,
            self.skew,
        )?;
        if issued.shortened {
            tracing::warn!(
                identity,
                not_after = %crate::pem::rfc3339(issued.not_after),
                "certificate lifetime shortened to the issuer's expiry; rotate the issuer"
            );
        }
        tracing::info!(identity, not_after = %crate::pem::rfc3339(issued.not_after), "issued certificate");
        Ok(CertifyResponse {
            leaf_certificate: issued.leaf.to_vec(),
            intermediate_certificates: issued.intermediates.iter().map(|c| c.to_vec()).collect(),
            valid_until: Some(prost_types::Timestamp {
                seconds: crate::pem::unix_secs(issued.not_after),
                nanos: 0,
            }),
        })
    }
}

fn status(refusal: &Refusal) -> tonic::Status {
    let msg = refusal.message().to_string();
    match refusal {
        Refusal::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
        Refusal::PermissionDenied(_) => tonic::Status::permission_denied(msg),
        Refusal::InvalidCsr(_) => tonic::Status::invalid_argument(msg),
        Refusal::IssuerUnavailable(_) => tonic::Status::failed_precondition(msg),
        Refusal::Internal(_) => tonic::Status::internal(msg),
    }
}

#[derive(Clone)]
struct Handler(Arc<Shared>);

#[tonic::async_trait]
impl Identity for Handler {
    async fn certify(
        &self,
        request: tonic::Request<CertifyRequest>,
    ) -> Result<tonic::Response<CertifyResponse>, tonic::Status> {
        let req = request.into_inner();
        let identity = req.identity.clone();
        match self.0.certify(req).await {
            Ok(rsp) => {
                self.0.metrics.issued();
                Ok(tonic::Response::new(rsp))
            }
            Err(refusal) => {
                self.0.metrics.refused(refusal.reason());
                tracing::warn!(identity, reason = refusal.reason(), "refused: {refusal}");
                Err(status(&refusal))
            }
        }
    }
}

/// A running service; dropping it stops every listener and connection.
pub struct Running {
    /// The bound gRPC address.
    pub addr: SocketAddr,
    /// The bound admin address.
    pub admin_addr: SocketAddr,
    tasks: JoinSet<Result<()>>,
}

impl Running {
    /// Waits until a listener fails.
    pub async fn wait(mut self) -> Result<()> {
        match self.tasks.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(anyhow::anyhow!("service task failed: {e}")),
            None => Ok(()),
        }
    }

    /// Stops the service (same as dropping it).
    pub fn shutdown(mut self) {
        self.tasks.abort_all();
    }
}

async fn read_pair(cert: &PathBuf, key: &PathBuf) -> Result<(Vec<u8>, Vec<u8>)> {
    let c = tokio::fs::read(cert)
        .await
        .with_context(|| format!("read issuer certificate {}", cert.display()))?;
    let k = tokio::fs::read(key)
        .await
        .with_context(|| format!("read issuer key {}", key.display()))?;
    Ok((c, k))
}

/// Loads the issuer, binds both ports and starts serving. Fails when the
/// issuer files cannot be loaded or an address cannot be bound; an expired
/// issuer loads (so `/ready` and refusals can say so) but is not ready.
pub async fn start(config: ServiceConfig) -> Result<Running> {
    let anchors: Option<Vec<CertificateDer<'static>>> = match &config.trust_anchors {
        Some(p) => {
            let pem = tokio::fs::read(p)
                .await
                .with_context(|| format!("read trust anchors {}", p.display()))?;
            Some(
                crate::pem::certs(&pem)
                    .with_context(|| format!("trust anchors {}", p.display()))?,
            )
        }
        None => None,
    };
    let (cert_pem, key_pem) = read_pair(&config.issuer_cert, &config.issuer_key).await?;
    let issuer = Issuer::from_pem(&cert_pem, &key_pem, anchors.as_deref())
        .with_context(|| format!("issuer {}", config.issuer_cert.display()))?;
    let now = SystemTime::now();
    match issuer.check_valid(now) {
        Ok(()) => tracing::info!(
            subject = %issuer.subject,
            not_after = %crate::pem::rfc3339(issuer.not_after),
            "issuer loaded"
        ),
        Err(e) => tracing::error!(subject = %issuer.subject, "issuer loaded but unusable: {e}"),
    }

    let mut registry = Registry::default();
    let metrics = IssuerMetrics::register(&mut registry);
    metrics.issuer_expiry(issuer.not_after);
    let shared = Arc::new(Shared {
        issuer: RwLock::new(Arc::new(issuer)),
        auth: config.authenticator.clone(),
        metrics,
        lifetime: config.cert_lifetime,
        skew: config.clock_skew,
    });

    let serving = match &config.tls_name {
        Some(name) => {
            let cert = Arc::new(SwappableCert::default());
            // An expired issuer cannot sign its own serving certificate; the
            // service still starts so readiness and logs explain why.
            let due = match renew_serving_cert(&shared, name, &cert) {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!(name = %name, "cannot issue the TLS serving certificate: {e:#}");
                    SystemTime::now()
                }
            };
            Some(Serving {
                name: name.clone(),
                cert,
                due,
            })
        }
        None => None,
    };
    let acceptor = match &serving {
        Some(Serving { cert, .. }) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            crate::tls::server_config(cert.clone())?,
        ))),
        None => None,
    };

    let grpc = TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("bind gRPC address {}", config.addr))?;
    let admin = TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("bind admin address {}", config.admin_addr))?;
    let addr = grpc.local_addr().context("gRPC local address")?;
    let admin_addr = admin.local_addr().context("admin local address")?;
    tracing::info!(%addr, tls = config.tls_name.is_some(), "serving Identity/Certify");
    tracing::info!(%admin_addr, "serving /metrics, /ready, /live");

    let mut tasks = JoinSet::new();
    tasks.spawn(serve_grpc(grpc, shared.clone(), acceptor));
    tasks.spawn(serve_admin(admin, shared.clone(), Arc::new(registry)));
    tasks.spawn(reload(
        shared,
        config.issuer_cert,
        config.issuer_key,
        anchors,
        (cert_pem, key_pem),
        config.reload_interval,
        serving,
    ));
    Ok(Running {
        addr,
        admin_addr,
        tasks,
    })
}

fn renew_serving_cert(shared: &Shared, name: &str, cert: &SwappableCert) -> Result<SystemTime> {
    let issuer = shared.issuer();
    let (key, csr) = crate::issuer::generate_csr(name)?;
    let issued = issuer
        .certify(name, &csr, SystemTime::now(), shared.lifetime, shared.skew)
        .map_err(|r| anyhow::anyhow!("{r}"))?;
    let mut chain = vec![issued.leaf];
    chain.extend(issued.intermediates);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    cert.set(chain, &key)?;
    tracing::info!(name, not_after = %crate::pem::rfc3339(issued.not_after), "TLS serving certificate issued");
    let now = SystemTime::now();
    let renew_in = crate::refresh::next_refresh(
        now,
        issued.not_before,
        issued.not_after,
        Duration::from_secs(1),
        Duration::from_secs(86_400),
    );
    Ok(now + renew_in)
}

/// The service's own TLS certificate and when to renew it.
struct Serving {
    name: String,
    cert: Arc<SwappableCert>,
    due: SystemTime,
}

async fn reload(
    shared: Arc<Shared>,
    cert_path: PathBuf,
    key_path: PathBuf,
    anchors: Option<Vec<CertificateDer<'static>>>,
    mut last: (Vec<u8>, Vec<u8>),
    interval: Duration,
    mut serving: Option<Serving>,
) -> Result<()> {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut read_failing = false;
    let mut serving_needed = false;
    loop {
        tick.tick().await;
        match read_pair(&cert_path, &key_path).await {
            Err(e) => {
                if !read_failing {
                    tracing::error!("cannot read issuer files; keeping the current issuer: {e:#}");
                }
                read_failing = true;
            }
            Ok(pair) => {
                read_failing = false;
                if pair != last {
                    match Issuer::from_pem(&pair.0, &pair.1, anchors.as_deref()) {
                        Ok(issuer) => {
                            tracing::info!(
                                subject = %issuer.subject,
                                not_after = %crate::pem::rfc3339(issuer.not_after),
                                "issuer reloaded"
                            );
                            shared.set_issuer(issuer);
                            shared.metrics.reloaded(true);
                            serving_needed = serving.is_some();
                        }
                        // Rotation writes cert and key separately; a torn pair
                        // is retried when the files change again.
                        Err(e) => {
                            shared.metrics.reloaded(false);
                            tracing::error!(
                                "new issuer files are invalid; keeping the current issuer: {e:#}"
                            )
                        }
                    }
                    last = pair;
                }
            }
        }
        if let Some(s) = &mut serving {
            if serving_needed || SystemTime::now() >= s.due {
                match renew_serving_cert(&shared, &s.name, &s.cert) {
                    Ok(due) => {
                        s.due = due;
                        serving_needed = false;
                    }
                    Err(e) => {
                        tracing::error!(name = %s.name, "cannot renew the TLS serving certificate: {e:#}");
                        s.due = SystemTime::now() + Duration::from_secs(10);
                    }
                }
            }
        }
    }
}

async fn serve_grpc(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<()> {
    let svc = IdentityServer::new(Handler(shared));
    // Owned here so aborting this task also closes every open connection.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let svc = svc.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let io: BoxedIo = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => Box::new(tcp),
            };
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(
                    TokioIo::new(io),
                    hyper_util::service::TowerToHyperService::new(svc),
                );
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "gRPC connection error: {e}");
            }
        });
    }
}

async fn serve_admin(
    listener: TcpListener,
    shared: Arc<Shared>,
    registry: Arc<Registry>,
) -> Result<()> {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let registry = registry.clone();
        conns.spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let rsp = admin_response(req.uri().path(), &shared, &registry);
                    async move { Ok::<_, std::convert::Infallible>(rsp) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn admin_response(
    path: &str,
    shared: &Shared,
    registry: &Registry,
) -> hyper::Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => (500, "text/plain", format!("encoding failed: {e}\n")),
            }
        }
        "/ready" => match shared.issuer().check_valid(SystemTime::now()) {
            Ok(()) => (200, "text/plain", "ready\n".to_string()),
            Err(e) => (503, "text/plain", format!("not ready: {e}\n")),
        },
        "/live" => (200, "text/plain", "live\n".to_string()),
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    let mut rsp = hyper::Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        rsp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    rsp
}
