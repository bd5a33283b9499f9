//! Authenticating proxies in Kubernetes: each proxy sends its projected
//! service-account token (audience `identity.l5d.io`), and the Kubernetes API's
//! TokenReview says whose it is. As in Linkerd, a token of service account `SA`
//! in namespace `NS` may claim exactly `SA.NS.<identity suffix>`.
//!
//! Requests are rare (a proxy renews about every 17 hours), so each review is one
//! short HTTP/1.1 connection: no pool to keep healthy, no state to go stale. The
//! issuer's own token is re-read every time because kubelet rotates it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls_pki_types::ServerName;

use crate::auth::{AuthFuture, Authenticator};
use crate::issuer::Refusal;

/// The audience proxies request for their token, Linkerd's, so either issuer works.
pub const AUDIENCE: &str = "identity.l5d.io";
/// Where Kubernetes mounts a pod's own service-account credentials.
pub const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const LIMIT: Duration = Duration::from_secs(10);

pub struct TokenReview {
    /// `host:port` of the API server.
    api: String,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    own_token: PathBuf,
    identity_suffix: String,
}

impl TokenReview {
    /// `api` is `host:port` (in a pod: `$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`),
    /// `ca` the PEM bundle that signs the API server's certificate, `own_token` the
    /// issuer's service-account token, allowed to create TokenReviews.
    pub fn new(api: &str, ca: &Path, own_token: &Path, identity_suffix: &str) -> Result<Self> {
        let host = match api.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => anyhow::bail!("Kubernetes API address {api:?}: expected host:port"),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string())
            .with_context(|| format!("Kubernetes API address {api:?}: not a host name or IP"))?;
        let pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::pem::certs(&pem)
            .with_context(|| format!("{}: no PEM certificates", ca.display()))?
        {
            roots
                .add(cert)
                .with_context(|| format!("{}: invalid CA certificate", ca.display()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        std::fs::metadata(own_token)
            .with_context(|| format!("service-account token {}", own_token.display()))?;
        let suffix = identity_suffix.trim_matches('.');
        if suffix.is_empty() {
            anyhow::bail!("--identity-suffix must not be empty");
        }
        Ok(Self {
            api: api.to_string(),
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            own_token: own_token.to_path_buf(),
            identity_suffix: suffix.to_string(),
        })
    }

    async fn review(&self, token: &str) -> Result<ReviewStatus, String> {
        let own = tokio::fs::read_to_string(&self.own_token)
            .await
            .map_err(|e| format!("cannot read {}: {e}", self.own_token.display()))?;
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [AUDIENCE]},
        });
        let request = hyper::Request::post(REVIEW_PATH)
            .header(hyper::header::HOST, &self.api)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", own.trim()),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(&self.api)
                .await
                .map_err(|e| {
                    format!("cannot connect to the Kubernetes API at {}: {e}", self.api)
                })?;
            let tls = self
                .tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS with the Kubernetes API failed: {e}"))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("TokenReview request failed: {e}"))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&bytes);
                return Err(format!(
                    "the Kubernetes API answered {status}: {}",
                    text.trim()
                ));
            }
            serde_json::from_slice::<ReviewReply>(&bytes)
                .map(|reply| reply.status)
                .map_err(|e| format!("unexpected TokenReview answer: {e}"))
        };
        tokio::time::timeout(LIMIT, exchange)
            .await
            .map_err(|_| "the Kubernetes API did not answer in time".to_string())?
    }
}

#[derive(serde::Deserialize)]
struct ReviewReply {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(serde::Deserialize, Default)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: User,
    #[serde(default)]
    audiences: Option<Vec<String>>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(serde::Deserialize, Default)]
struct User {
    #[serde(default)]
    username: String,
}

impl Authenticator for TokenReview {
    fn authenticate<'a>(&'a self, token: &'a [u8], identity: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let token = std::str::from_utf8(token.trim_ascii())
                .map_err(|_| Refusal::Unauthenticated("the token is not text".into()))?;
            if token.is_empty() {
                return Err(Refusal::Unauthenticated("no token in the request".into()));
            }
            let status = self.review(token).await.map_err(|e| {
                tracing::error!(error = %e, "TokenReview failed");
                Refusal::Internal(format!("cannot review the token: {e}"))
            })?;
            if !status.authenticated {
                let why = status.error.unwrap_or_else(|| "rejected".into());
                return Err(Refusal::Unauthenticated(format!(
                    "the Kubernetes API did not accept the token: {why}"
                )));
            }
            // The API must confirm the audience we asked for: without it, the token
            // may only be valid for the API server itself (e.g. a pod's default token).
            let for_us = status
                .audiences
                .as_ref()
                .is_some_and(|audiences| audiences.iter().any(|a| a == AUDIENCE));
            if !for_us {
                return Err(Refusal::Unauthenticated(format!(
                    "the token is not for audience {AUDIENCE}"
                )));
            }
            let Some(account) = status.user.username.strip_prefix("system:serviceaccount:") else {
                return Err(Refusal::PermissionDenied(format!(
                    "{} is not a service account",
                    status.user.username
                )));
            };
            let Some((namespace, name)) = account.split_once(':') else {
                return Err(Refusal::PermissionDenied(format!(
                    "unexpected service-account name {account:?}"
                )));
            };
            let allowed = format!("{name}.{namespace}.{}", self.identity_suffix);
            if allowed.eq_ignore_ascii_case(identity) {
                Ok(())
            } else {
                Err(Refusal::PermissionDenied(format!(
                    "service account {namespace}/{name} may claim {allowed}, not {identity:?}"
                )))
            }
        })
    }
}
