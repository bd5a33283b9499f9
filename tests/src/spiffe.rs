//! A SPIFFE Workload API server for tests, as a SPIRE agent serves it: tonic's gRPC
//! server side with the messages from `tandem_identity::spiffe::api`, on a Unix
//! socket, streaming whatever X.509-SVIDs the test pushes. SVIDs are minted from the
//! test trust domain's issuer, so they chain to the same anchor as issued certificates.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tandem_identity::spiffe::api::{X509Svid, X509SvidRequest, X509SvidResponse};
use tokio::sync::mpsc;

use crate::mesh::TrustDomain;

/// One minted certificate: the chain (leaf, then the issuer) and the leaf's key.
#[derive(Clone)]
pub struct Minted {
    pub leaf: Vec<u8>,
    pub issuer: Vec<u8>,
    /// PKCS#8 DER.
    pub key: Vec<u8>,
    pub not_after: SystemTime,
}

impl Minted {
    /// The chain as PEM (leaf first), as files on a host hold it.
    pub fn chain_pem(&self) -> String {
        [&self.leaf, &self.issuer]
            .iter()
            .map(|der| pem_block("CERTIFICATE", der))
            .collect()
    }

    pub fn key_pem(&self) -> String {
        pem_block("PRIVATE KEY", &self.key)
    }

    /// The SVID message for `id`, with `bundle` (DER) as its trust bundle.
    pub fn svid(&self, id: &str, bundle: &[u8]) -> X509Svid {
        X509Svid {
            spiffe_id: id.to_string(),
            x509_svid: [self.leaf.as_slice(), self.issuer.as_slice()].concat(),
            x509_svid_key: self.key.clone(),
            bundle: bundle.to_vec(),
            hint: String::new(),
        }
    }
}

fn pem_block(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

/// The first certificate of a PEM text, DER.
fn first_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .to_vec()
}

/// The names a minted leaf carries.
pub enum Names<'a> {
    /// A SPIFFE ID as its only (URI) SAN: an X.509-SVID.
    Spiffe(&'a str),
    /// A DNS SAN, as the issuer gives pods.
    Dns(&'a str),
}

/// Mints a leaf for `names`, signed by `domain`'s issuer and valid for `lifetime`.
pub fn mint(domain: &TrustDomain, names: Names<'_>, lifetime: Duration) -> Minted {
    let issuer_pem = std::fs::read_to_string(&domain.issuer_cert).expect("issuer certificate");
    let issuer_key =
        KeyPair::from_pem(&std::fs::read_to_string(&domain.issuer_key).expect("issuer key"))
            .expect("issuer key");
    let issuer_params = CertificateParams::from_ca_cert_pem(&issuer_pem).expect("issuer params");
    // rcgen signs with a `Certificate`; re-signing the parsed issuer keeps its name
    // and key identifier, which is all a child refers to.
    let issuer = issuer_params
        .self_signed(&issuer_key)
        .expect("issuer signer");
    let issuer_der = first_der(&issuer_pem);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    match names {
        Names::Spiffe(id) => {
            params.subject_alt_names = vec![SanType::URI(
                id.try_into().expect("SPIFFE ID as an IA5 string"),
            )];
            dn.push(DnType::OrganizationName, "SPIRE");
        }
        Names::Dns(name) => {
            params.subject_alt_names = vec![SanType::DnsName(name.try_into().expect("DNS name"))];
            dn.push(DnType::CommonName, name);
        }
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = SystemTime::now();
    let not_after = now + lifetime;
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = not_after.into();
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(
        &now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_be_bytes()[4..],
    ));
    let cert = params
        .signed_by(&key, &issuer, &issuer_key)
        .expect("sign leaf");
    Minted {
        leaf: cert.der().to_vec(),
        issuer: issuer_der,
        key: key.serialize_der(),
        // Whole seconds, as the certificate holds it.
        not_after: SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
            ),
    }
}

/// The trust anchor of `domain`, DER, as a bundle.
pub fn bundle(domain: &TrustDomain) -> Vec<u8> {
    first_der(&domain.anchor_pem)
}

type Sender = mpsc::UnboundedSender<Result<X509SvidResponse, tonic::Status>>;

#[derive(Default)]
struct State {
    current: Option<X509SvidResponse>,
    watchers: Vec<Sender>,
}

/// A running Workload API server; stopped (and its socket removed) on drop.
pub struct WorkloadApi {
    pub socket: PathBuf,
    state: Arc<Mutex<State>>,
    calls: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkloadApi {
    /// Serves on `socket` (its directory must exist), readable by any user so a
    /// proxy running as its own uid can connect.
    pub fn start(socket: &Path) -> WorkloadApi {
        let _ = std::fs::remove_file(socket);
        let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind Workload API");
        listener.set_nonblocking(true).expect("nonblocking");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o777))
                .expect("chmod socket");
        }
        let state = Arc::new(Mutex::new(State::default()));
        let calls = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = {
            let (state, calls) = (state.clone(), calls.clone());
            std::thread::spawn(move || serve(listener, state, calls, stopped))
        };
        WorkloadApi {
            socket: socket.to_path_buf(),
            state,
            calls,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Streams `response` to every open `FetchX509SVID` call and to later ones.
    pub fn push(&self, response: X509SvidResponse) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .watchers
            .retain(|watcher| watcher.send(Ok(response.clone())).is_ok());
        state.current = Some(response);
    }

    /// How many `FetchX509SVID` calls carried the security header.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn serve(
    listener: std::os::unix::net::UnixListener,
    state: Arc<Mutex<State>>,
    calls: Arc<AtomicUsize>,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener).expect("listener");
        let accept = async {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (state, calls) = (state.clone(), calls.clone());
                let service = hyper::service::service_fn(move |request| {
                    let (state, calls) = (state.clone(), calls.clone());
                    async move { Ok::<_, Infallible>(route(request, state, calls).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = stopped => {}
        }
    });
    // Dropping the runtime ends every open stream and connection.
    drop(runtime);
}

async fn route(
    request: hyper::Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    calls: Arc<AtomicUsize>,
) -> hyper::Response<tonic::body::Body> {
    if request.uri().path() != tandem_identity::spiffe::api::FETCH_X509_SVID {
        return tonic::Status::unimplemented(format!("unknown method {}", request.uri().path()))
            .into_http();
    }
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
    grpc.server_streaming(FetchX509Svid { state, calls }, request)
        .await
}

struct FetchX509Svid {
    state: Arc<Mutex<State>>,
    calls: Arc<AtomicUsize>,
}

impl tonic::server::ServerStreamingService<X509SvidRequest> for FetchX509Svid {
    type Response = X509SvidResponse;
    type ResponseStream =
        tokio_stream::wrappers::UnboundedReceiverStream<Result<X509SvidResponse, tonic::Status>>;
    type Future = std::future::Ready<Result<tonic::Response<Self::ResponseStream>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<X509SvidRequest>) -> Self::Future {
        // As a SPIRE agent: no security header, no SVID.
        let header = request
            .metadata()
            .get(tandem_identity::spiffe::api::SECURITY_HEADER);
        if header.and_then(|v| v.to_str().ok()) != Some("true") {
            return std::future::ready(Err(tonic::Status::invalid_argument(
                "security header missing from request",
            )));
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = &state.current {
            let _ = tx.send(Ok(current.clone()));
        }
        state.watchers.push(tx);
        std::future::ready(Ok(tonic::Response::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }
}

/// A response carrying one SVID.
pub fn response(svid: X509Svid) -> X509SvidResponse {
    X509SvidResponse {
        svids: vec![svid],
        ..Default::default()
    }
}

/// A TLS client's view of a proxy's mesh TLS, as a peer proxy would open it.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// Opens TLS from `pod` to `addr` asking for `sni`, and returns the stream with the
/// leaf certificate the server presented. The chain is not verified here: tests
/// compare the leaf with the exact certificate they expect, which says more.
pub fn tls_connect(
    pod: &crate::Pod,
    addr: std::net::SocketAddr,
    sni: &str,
) -> (TlsStream, Vec<u8>) {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("SNI");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut tcp = crate::apps::connect(pod, addr);
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .unwrap_or_else(|e| panic!("TLS handshake with {addr} (SNI {sni}): {e}"));
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the server presented a certificate")
        .to_vec();
    (rustls::StreamOwned::new(conn, tcp), leaf)
}

#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let provider = rustls::crypto::ring::default_provider();
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
