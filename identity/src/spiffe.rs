//! The SPIFFE Workload API client: the proxy's certificate from a local SPIRE
//! agent (or any Workload API server) on a Unix socket.
//!
//! One server-streaming `FetchX509SVID` call is kept open; every response that
//! carries an X.509-SVID for our SPIFFE ID is checked and published, so rotation
//! is pushed by the agent. When the stream or socket fails, the current
//! certificate stays in use and the call is retried with jittered exponential
//! backoff (100 ms to 1 s by default, as linkerd2-proxy).
//!
//! Unlike linkerd2-proxy, which trusts only `LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS`,
//! the SVID's bundle is trusted too, so a SPIRE CA rotation is followed without a
//! restart. Federated bundles are not used.

use anyhow::{Context, Result};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::client::Credentials;
use crate::metrics::IdentityMetrics;
use crate::refresh::Backoff;

/// The Workload API socket (`unix:///path` or `/path`).
pub const ENV_ADDRESS: &str = "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS";
/// linkerd2-proxy's older name for [`ENV_ADDRESS`].
pub const ENV_SOCKET: &str = "LINKERD2_PROXY_IDENTITY_SPIRE_SOCKET";
pub const ENV_BACKOFF_MIN: &str = "LINKERD2_PROXY_IDENTITY_SPIRE_EXP_BACKOFF_MIN";
pub const ENV_BACKOFF_MAX: &str = "LINKERD2_PROXY_IDENTITY_SPIRE_EXP_BACKOFF_MAX";

/// The Workload API's messages (SPIFFE `workload.proto`), for prost.
pub mod api {
    /// The service is declared without a package, so its path has no prefix;
    /// SPIRE agents answer `unknown service` to `spiffe.workloadapi.SpiffeWorkloadAPI`.
    pub const SERVICE: &str = "SpiffeWorkloadAPI";
    pub const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
    /// Metadata every call must carry; servers refuse calls without it.
    pub const SECURITY_HEADER: &str = "workload.spiffe.io";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509SvidRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509SvidResponse {
        #[prost(message, repeated, tag = "1")]
        pub svids: Vec<X509Svid>,
        /// DER CRLs (not used).
        #[prost(bytes = "vec", repeated, tag = "2")]
        pub crl: Vec<Vec<u8>>,
        /// Bundles of other trust domains, DER certificates concatenated (not used).
        #[prost(map = "string, bytes", tag = "3")]
        pub federated_bundles: std::collections::HashMap<String, Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    #[prost(skip_debug)]
    pub struct X509Svid {
        #[prost(string, tag = "1")]
        pub spiffe_id: String,
        /// The leaf, then intermediates: DER certificates concatenated.
        #[prost(bytes = "vec", tag = "2")]
        pub x509_svid: Vec<u8>,
        /// PKCS#8 DER.
        #[prost(bytes = "vec", tag = "3")]
        pub x509_svid_key: Vec<u8>,
        /// The trust domain's CA certificates, DER concatenated.
        #[prost(bytes = "vec", tag = "4")]
        pub bundle: Vec<u8>,
        #[prost(string, tag = "5")]
        pub hint: String,
    }

    impl std::fmt::Debug for X509Svid {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("X509Svid")
                .field("spiffe_id", &self.spiffe_id)
                .field(
                    "x509_svid",
                    &format_args!("[{} bytes]", self.x509_svid.len()),
                )
                .field("x509_svid_key", &format_args!("<redacted>"))
                .field("bundle", &format_args!("[{} bytes]", self.bundle.len()))
                .field("hint", &self.hint)
                .finish()
        }
    }
}

#[derive(Clone, Debug)]
pub struct SpiffeConfig {
    /// The Workload API's Unix socket.
    pub socket: PathBuf,
    /// The SPIFFE ID whose SVID we use (`LINKERD2_PROXY_IDENTITY_SERVER_ID`).
    pub id: String,
    /// Trusted besides each SVID's bundle (`LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS`, optional).
    pub trust_anchors: Vec<CertificateDer<'static>>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl SpiffeConfig {
    pub fn from_env(env: &crate::env::Env, id: &str) -> Result<SpiffeConfig, Vec<String>> {
        let get = |var: &str| env.setting(var);
        let mut errors = Vec::new();
        let (var, address) = match get(ENV_ADDRESS) {
            Some(a) => (ENV_ADDRESS, a),
            None => (ENV_SOCKET, get(ENV_SOCKET).unwrap_or_default()),
        };
        let path = address.strip_prefix("unix://").unwrap_or(&address);
        if !path.starts_with('/') {
            errors.push(format!(
                "{var}={address:?}: expected a Unix socket path (unix:///path or /path)"
            ));
        }
        let trust_anchors = crate::source::optional_anchors(env, &mut errors);
        let duration = |var: &str, default: Duration, errors: &mut Vec<String>| {
            crate::source::duration_setting(env, var, default, errors)
        };
        let backoff_min = duration(ENV_BACKOFF_MIN, Duration::from_millis(100), &mut errors);
        let backoff_max = duration(ENV_BACKOFF_MAX, Duration::from_secs(1), &mut errors);
        if backoff_min.is_zero() || backoff_min > backoff_max {
            errors.push(format!(
                "{ENV_BACKOFF_MIN}: must be above zero and at most {ENV_BACKOFF_MAX}"
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(SpiffeConfig {
            socket: PathBuf::from(path),
            id: id.to_string(),
            trust_anchors,
            backoff_min,
            backoff_max,
        })
    }
}

/// Starts the Workload API client on the current tokio runtime; see the module
/// documentation. The task stops when every receiver is dropped.
pub fn spawn(
    config: SpiffeConfig,
    metrics: IdentityMetrics,
) -> Result<watch::Receiver<Option<Arc<Credentials>>>> {
    let handle = tokio::runtime::Handle::try_current()
        .context("the SPIFFE client must be started inside a tokio runtime")?;
    let (tx, rx) = watch::channel(None);
    handle.spawn(async move {
        tokio::select! {
            _ = watch_forever(&config, &metrics, &tx) => {}
            _ = tx.closed() => debug!("SPIFFE client stopped: no more receivers"),
        }
    });
    Ok(rx)
}

async fn watch_forever(
    config: &SpiffeConfig,
    metrics: &IdentityMetrics,
    tx: &watch::Sender<Option<Arc<Credentials>>>,
) {
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    // Each distinct problem is a warning once, not on every retry: an agent that is
    // down and then refuses us shows both causes.
    let mut warned: Option<String> = None;
    loop {
        let mut accepted = false;
        let error = match watch_once(config, metrics, tx, &mut accepted).await {
            Ok(()) => anyhow::anyhow!("the Workload API ended the stream"),
            Err(e) => e,
        };
        if accepted {
            backoff.reset();
            warned = None;
        }
        metrics.failed();
        let socket = config.socket.display();
        let problem = format!("{error:#}");
        if warned.as_ref() == Some(&problem) {
            debug!(%socket, "SPIFFE Workload API: {problem}");
        } else {
            warn!(%socket, "SPIFFE Workload API: {problem}; keeping the current certificate and retrying");
            warned = Some(problem);
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One `FetchX509SVID` stream, until it fails or ends; `accepted` is set once an
/// SVID from it was published.
async fn watch_once(
    config: &SpiffeConfig,
    metrics: &IdentityMetrics,
    tx: &watch::Sender<Option<Arc<Credentials>>>,
    accepted: &mut bool,
) -> Result<()> {
    let mut stream = fetch_x509_svid(&config.socket).await?;
    while let Some(response) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
    {
        match credentials_from(&response, config, SystemTime::now()) {
            Ok(credentials) => {
                *accepted = true;
                metrics.refreshed(SystemTime::now(), credentials.not_after);
                info!(
                    id = %credentials.name,
                    not_after = %crate::pem::rfc3339(credentials.not_after),
                    "X.509-SVID received"
                );
                tx.send_replace(Some(Arc::new(credentials)));
            }
            Err(e) => {
                metrics.failed();
                warn!("unusable X.509-SVID update, keeping the current certificate: {e:#}");
            }
        }
    }
    Ok(())
}

/// Opens the stream on the Unix socket at `socket`.
pub async fn fetch_x509_svid(
    socket: &std::path::Path,
) -> Result<tonic::Streaming<api::X509SvidResponse>> {
    let path = socket.to_path_buf();
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    // The authority is a placeholder: the connector ignores it.
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .with_context(|| format!("{} is not ready", socket.display()))?;
    let mut request = tonic::Request::new(api::X509SvidRequest {});
    request.metadata_mut().insert(
        api::SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let response = grpc
        .server_streaming(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(api::FETCH_X509_SVID),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .map_err(|s| anyhow::anyhow!("FetchX509SVID: {:?}: {}", s.code(), s.message()))?;
    Ok(response.into_inner())
}

/// Our SVID from a response, checked: the one for our SPIFFE ID, its key, and a
/// chain that verifies against its bundle (plus the configured anchors).
pub fn credentials_from(
    response: &api::X509SvidResponse,
    config: &SpiffeConfig,
    now: SystemTime,
) -> Result<Credentials> {
    let Some(svid) = response.svids.iter().find(|s| s.spiffe_id == config.id) else {
        let offered: Vec<&str> = response
            .svids
            .iter()
            .map(|s| s.spiffe_id.as_str())
            .collect();
        anyhow::bail!("no SVID for {} (offered: {offered:?})", config.id);
    };
    let chain = crate::source::split_der(&svid.x509_svid).context("x509_svid")?;
    let mut anchors = crate::source::split_der(&svid.bundle).context("bundle")?;
    crate::source::merge_anchors(&mut anchors, &config.trust_anchors);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.clone()));
    crate::source::checked_credentials(&config.id, chain, key, anchors, now)
        .with_context(|| format!("SVID for {}", config.id))
}
