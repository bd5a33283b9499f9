//! The TokenReview authenticator against a stand-in for the Kubernetes API: a real
//! HTTPS server (certificate from a test CA) that answers TokenReviews the way
//! kube-apiserver does. A real API server cannot run here; the stand-in checks the
//! request the authenticator sends (path, bearer token, audiences) as one would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use tandem_identity::auth::Authenticator;
use tandem_identity::issuer::Refusal;
use tandem_identity::token_review::TokenReview;

const SUFFIX: &str = "serviceaccount.identity.tandem.cluster.local";

#[derive(Default)]
struct Seen {
    bearer: Vec<String>,
    bodies: Vec<serde_json::Value>,
}

struct FakeApi {
    addr: SocketAddr,
    ca_pem: String,
    seen: Arc<Mutex<Seen>>,
}

fn answer(body: &serde_json::Value) -> serde_json::Value {
    let status = match body["spec"]["token"].as_str().unwrap_or("") {
        "web-token" => serde_json::json!({
            "authenticated": true,
            "user": {"username": "system:serviceaccount:shop:web"},
            "audiences": ["identity.l5d.io"],
        }),
        "other-audience" => serde_json::json!({
            "authenticated": true,
            "user": {"username": "system:serviceaccount:shop:web"},
            "audiences": ["https://kubernetes.default.svc"],
        }),
        "no-audience" => serde_json::json!({
            "authenticated": true,
            "user": {"username": "system:serviceaccount:shop:web"},
        }),
        "node-token" => serde_json::json!({
            "authenticated": true,
            "user": {"username": "system:node:worker-1"},
            "audiences": ["identity.l5d.io"],
        }),
        _ => serde_json::json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})
}

async fn start_fake_api() -> FakeApi {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(tandem_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = recorder.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let path = request.uri().path().to_string();
                            let bearer = request
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            let reply = if path != "/apis/authentication.k8s.io/v1/tokenreviews" {
                                (
                                    StatusCode::NOT_FOUND,
                                    serde_json::json!({"reason": "NotFound"}),
                                )
                            } else if !bearer.starts_with("Bearer issuer-") {
                                (
                                    StatusCode::FORBIDDEN,
                                    serde_json::json!({"reason": "Forbidden"}),
                                )
                            } else {
                                (StatusCode::CREATED, answer(&body))
                            };
                            let mut seen = seen.lock().unwrap();
                            seen.bearer.push(bearer);
                            seen.bodies.push(body);
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(reply.0)
                                    .body(Full::new(Bytes::from(reply.1.to_string())))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    FakeApi {
        addr,
        ca_pem: ca.pem(),
        seen,
    }
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(ca_pem: &str, own_token: &str) -> Files {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca_pem).unwrap();
        std::fs::write(dir.path().join("token"), own_token).unwrap();
        Files { dir }
    }

    fn review(&self, api: SocketAddr) -> TokenReview {
        TokenReview::new(
            &api.to_string(),
            &self.dir.path().join("ca.crt"),
            &self.dir.path().join("token"),
            SUFFIX,
        )
        .unwrap()
    }
}

fn identity(sa: &str, ns: &str) -> String {
    format!("{sa}.{ns}.{SUFFIX}")
}

#[tokio::test]
async fn a_service_account_token_may_claim_exactly_its_own_identity() {
    let api = start_fake_api().await;
    let files = Files::new(&api.ca_pem, "issuer-token\n");
    let review = files.review(api.addr);

    review
        .authenticate(b"web-token", &identity("web", "shop"))
        .await
        .expect("web's token claims web's identity");
    let seen = api.seen.lock().unwrap().bodies.last().cloned().unwrap();
    assert_eq!(seen["kind"], "TokenReview");
    assert_eq!(seen["spec"]["token"], "web-token");
    assert_eq!(
        seen["spec"]["audiences"],
        serde_json::json!(["identity.l5d.io"])
    );
    assert_eq!(
        api.seen.lock().unwrap().bearer.last().unwrap(),
        "Bearer issuer-token",
        "the issuer's own token, trimmed"
    );

    match review
        .authenticate(b"web-token", &identity("db", "shop"))
        .await
    {
        Err(Refusal::PermissionDenied(why)) => assert!(why.contains("shop/web"), "{why}"),
        other => panic!("another identity must be denied: {other:?}"),
    }
    match review
        .authenticate(b"stolen", &identity("web", "shop"))
        .await
    {
        Err(Refusal::Unauthenticated(why)) => {
            assert!(why.contains("invalid bearer token"), "{why}")
        }
        other => panic!("a rejected token is unauthenticated: {other:?}"),
    }
    match review
        .authenticate(b"other-audience", &identity("web", "shop"))
        .await
    {
        Err(Refusal::Unauthenticated(why)) => assert!(why.contains("audience"), "{why}"),
        other => panic!("a token for another audience is refused: {other:?}"),
    }
    match review
        .authenticate(b"node-token", &identity("web", "shop"))
        .await
    {
        Err(Refusal::PermissionDenied(why)) => {
            assert!(why.contains("not a service account"), "{why}")
        }
        other => panic!("a node's token is not a workload's: {other:?}"),
    }
    match review.authenticate(b"  ", &identity("web", "shop")).await {
        Err(Refusal::Unauthenticated(_)) => {}
        other => panic!("an empty token is refused without asking: {other:?}"),
    }
}

#[tokio::test]
async fn the_issuers_own_token_is_read_again_for_each_review() {
    let api = start_fake_api().await;
    let files = Files::new(&api.ca_pem, "issuer-first");
    let review = files.review(api.addr);
    review
        .authenticate(b"web-token", &identity("web", "shop"))
        .await
        .unwrap();
    // kubelet rotates projected tokens in place.
    std::fs::write(files.dir.path().join("token"), "issuer-rotated").unwrap();
    review
        .authenticate(b"web-token", &identity("web", "shop"))
        .await
        .unwrap();
    let bearer = api.seen.lock().unwrap().bearer.clone();
    assert_eq!(bearer, ["Bearer issuer-first", "Bearer issuer-rotated"]);
}

#[tokio::test]
async fn api_failures_are_internal_errors_not_refusals_of_the_proxy() {
    let api = start_fake_api().await;
    // The API refuses the issuer itself (its service account lacks the RBAC grant).
    let files = Files::new(&api.ca_pem, "not-allowed");
    match files
        .review(api.addr)
        .authenticate(b"web-token", &identity("web", "shop"))
        .await
    {
        Err(Refusal::Internal(why)) => assert!(why.contains("403"), "{why}"),
        other => panic!("{other:?}"),
    }
    // A server whose certificate the configured CA did not sign.
    let other = start_fake_api().await;
    let files = Files::new(&other.ca_pem, "issuer-token");
    match files
        .review(api.addr)
        .authenticate(b"web-token", &identity("web", "shop"))
        .await
    {
        Err(Refusal::Internal(why)) => assert!(why.contains("TLS"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Nothing listening.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    match files
        .review(closed)
        .authenticate(b"web-token", &identity("web", "shop"))
        .await
    {
        Err(Refusal::Internal(why)) => assert!(why.contains("cannot connect"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_settings_fail_at_start() {
    let files = Files::new("not a certificate", "t");
    let error = TokenReview::new(
        "10.0.0.1:443",
        &files.dir.path().join("ca.crt"),
        &files.dir.path().join("token"),
        SUFFIX,
    )
    .err()
    .expect("no CA certificate");
    assert!(format!("{error:#}").contains("ca.crt"), "{error:#}");
    let error = TokenReview::new(
        "kubernetes",
        &files.dir.path().join("ca.crt"),
        &files.dir.path().join("token"),
        SUFFIX,
    )
    .err()
    .expect("no port");
    assert!(format!("{error:#}").contains("host:port"), "{error:#}");
}
