//! The issuer service and the client together: issuance, refusals, replicas,
//! outages, issuer expiry and rotation, key rotation.

mod common;

use common::*;
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use linkerd2_proxy_api::identity::CertifyRequest;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tandem_identity::{Credentials, IdentityMetrics};
use tokio::sync::watch;

type Rx = watch::Receiver<Option<Arc<Credentials>>>;

/// Waits for a certificate different from `previous` (any, when `None`).
async fn next_creds(rx: &mut Rx, previous: Option<&Arc<Credentials>>) -> Arc<Credentials> {
    let fut = rx.wait_for(|c| match (c, previous) {
        (Some(c), Some(p)) => c.cert_chain[0] != p.cert_chain[0],
        (Some(_), None) => true,
        (None, _) => false,
    });
    let creds = tokio::time::timeout(BOUND, fut)
        .await
        .expect("timed out waiting for a certificate")
        .expect("identity client stopped");
    creds.clone().unwrap()
}

async fn raw_certify(addr: std::net::SocketAddr, req: CertifyRequest) -> Result<(), tonic::Status> {
    let mut client = IdentityClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client.certify(req).await.map(|_| ())
}

fn request(identity: &str, token: &str, csr: Vec<u8>) -> CertifyRequest {
    CertifyRequest {
        identity: identity.into(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: csr,
    }
}

#[tokio::test]
async fn client_obtains_a_certificate_over_tls_that_verifies_against_the_anchor() {
    let pki = Pki::new();
    let svc = pki.start(Some(SVC_NAME)).await;
    let mut registry = Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    let mut rx = tandem_identity::spawn(
        pki.client_config(&pki.env(&[svc.addr], Some(SVC_NAME))),
        metrics,
    )
    .unwrap();
    let creds = next_creds(&mut rx, None).await;

    assert_eq!(creds.name, NAME);
    let anchors = tandem_identity::pem::certs(pki.anchor.cert_pem.as_bytes()).unwrap();
    tandem_identity::tls::verify(&creds.cert_chain, &anchors, NAME, SystemTime::now()).unwrap();
    assert!(tandem_identity::tls::verify(
        &creds.cert_chain,
        &anchors,
        "db.default.serviceaccount.identity.linkerd.cluster.local",
        SystemTime::now()
    )
    .is_err());
    let (_, leaf) = x509_parser::parse_x509_certificate(&creds.cert_chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    let names: Vec<String> = san.general_names.iter().map(|g| g.to_string()).collect();
    assert_eq!(names, [format!("DNSName({NAME})")]);
    // The key in the credentials is the certified one, and Debug hides it.
    let kp = rcgen::KeyPair::try_from(&creds.key).unwrap();
    assert_eq!(kp.public_key_raw(), spki(&creds.cert_chain[0]));
    let debug = format!("{creds:?}");
    assert!(
        debug.contains("redacted") && !debug.contains("PrivatePkcs8"),
        "{debug}"
    );

    // Metrics under both names.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for series in [
        "identity_cert_expiration_timestamp_seconds",
        "control_identity_cert_expiration_timestamp_seconds",
        "identity_cert_refresh_timestamp_seconds",
        "control_identity_cert_refresh_timestamp_seconds",
    ] {
        assert!(
            metric(&text, series).unwrap() > 0.0,
            "{series} missing:\n{text}"
        );
    }
    assert!(
        metric(&text, "identity_cert_refresh_total{result=\"ok\"}").unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        metric(&text, "identity_cert_refresh_count").unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "control_identity_cert_refreshes_total{result=\"ok\"}"
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );

    // The issuer's own metrics and readiness.
    let (status, body) = http_get(svc.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metric(&body, "identity_certificates_issued_total").unwrap() >= 1.0,
        "{body}"
    );
    assert!(
        metric(&body, "identity_issuer_expiry_timestamp_seconds").unwrap() > 0.0,
        "{body}"
    );
    assert_eq!(http_get(svc.admin_addr, "/ready").await.0, 200);
    assert_eq!(http_get(svc.admin_addr, "/live").await.0, 200);
}

#[tokio::test]
async fn tls_to_the_issuer_checks_its_name() {
    let pki = Pki::new();
    let svc = pki.start(Some(SVC_NAME)).await;
    let mut registry = Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    let env = pki.env(&[svc.addr], Some("someone-else.linkerd.cluster.local"));
    let _rx = tandem_identity::spawn(pki.client_config(&env), metrics).unwrap();
    eventually("a refresh failure", || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        async move { metric(&text, "identity_cert_refresh_total{result=\"failure\"}").is_some() }
    })
    .await;
    let (_, body) = http_get(svc.admin_addr, "/metrics").await;
    assert_eq!(
        metric(&body, "identity_certificates_issued_total"),
        Some(0.0),
        "{body}"
    );
}

#[tokio::test]
async fn bad_requests_are_refused_with_clear_statuses() {
    let pki = Pki::new();
    let svc = pki.start(None).await;
    let (_, csr) = tandem_identity::issuer::generate_csr(NAME).unwrap();

    // Sanity: the right request passes.
    raw_certify(svc.addr, request(NAME, TOKEN, csr.clone()))
        .await
        .unwrap();

    let e = raw_certify(svc.addr, request(NAME, "wrong-token", csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("token"), "{e:?}");

    // A CSR for another name than the requested identity.
    let (_, other) = tandem_identity::issuer::generate_csr(
        "db.default.serviceaccount.identity.linkerd.cluster.local",
    )
    .unwrap();
    let e = raw_certify(svc.addr, request(NAME, TOKEN, other.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("db.default"), "{e:?}");

    // Claiming another identity with our token.
    let e = raw_certify(
        svc.addr,
        request(
            "db.default.serviceaccount.identity.linkerd.cluster.local",
            TOKEN,
            other,
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not allowed"), "{e:?}");

    // A URI SAN next to the DNS SAN.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![NAME.to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/ns/default/sa/web"
            .try_into()
            .unwrap(),
    ));
    let csr_uri = params.serialize_request(&key).unwrap().der().to_vec();
    let e = raw_certify(svc.addr, request(NAME, TOKEN, csr_uri))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("URI SAN"), "{e:?}");

    // An RSA key.
    let rsa = rcgen::KeyPair::from_pem(include_str!("data/rsa2048.pem")).unwrap();
    let params = rcgen::CertificateParams::new(vec![NAME.to_string()]).unwrap();
    let csr_rsa = params.serialize_request(&rsa).unwrap().der().to_vec();
    let e = raw_certify(svc.addr, request(NAME, TOKEN, csr_rsa))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("RSA key"), "{e:?}");

    // Garbage and a tampered signature.
    let e = raw_certify(svc.addr, request(NAME, TOKEN, b"not a csr".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let mut tampered = csr.clone();
    let n = tampered.len();
    tampered[n - 5] ^= 0x55;
    let e = raw_certify(svc.addr, request(NAME, TOKEN, tampered))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    let (_, body) = http_get(svc.admin_addr, "/metrics").await;
    assert_eq!(
        metric(&body, "identity_refusals_total{reason=\"unauthenticated\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "identity_refusals_total{reason=\"permission_denied\"}"
        ),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "identity_refusals_total{reason=\"invalid_csr\"}"),
        Some(4.0),
        "{body}"
    );
}

#[tokio::test]
async fn renewal_survives_a_dead_replica_and_rotates_keys() {
    let pki = Pki::new();
    let a = pki.start(None).await;
    let b = pki.start(None).await;
    let mut registry = Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    let mut rx = tandem_identity::spawn(
        pki.client_config(&pki.env(&[a.addr, b.addr], None)),
        metrics,
    )
    .unwrap();
    let first = next_creds(&mut rx, None).await;
    let second = next_creds(&mut rx, Some(&first)).await;
    assert_ne!(
        spki(&first.cert_chain[0]),
        spki(&second.cert_chain[0]),
        "each renewal uses a fresh key"
    );

    // Kill the first replica: renewals go to the second one.
    let (_, before) = http_get(b.admin_addr, "/metrics").await;
    let issued_by_b = metric(&before, "identity_certificates_issued_total").unwrap();
    a.shutdown();
    let third = next_creds(&mut rx, Some(&second)).await;
    let fourth = next_creds(&mut rx, Some(&third)).await;
    assert_ne!(spki(&third.cert_chain[0]), spki(&fourth.cert_chain[0]));
    let (_, after) = http_get(b.admin_addr, "/metrics").await;
    assert!(metric(&after, "identity_certificates_issued_total").unwrap() > issued_by_b);
}

#[tokio::test]
async fn client_keeps_its_certificate_while_the_issuer_is_down_and_recovers() {
    let pki = Pki::new();
    let svc = pki.start(None).await;
    let addr = svc.addr;
    let mut registry = Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    let mut rx =
        tandem_identity::spawn(pki.client_config(&pki.env(&[addr], None)), metrics).unwrap();
    let held = next_creds(&mut rx, None).await;

    svc.shutdown();
    let failures = |registry: &Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        metric(&text, "identity_cert_refresh_total{result=\"failure\"}").unwrap_or(0.0)
    };
    let registry = Arc::new(registry);
    {
        let registry = registry.clone();
        eventually("renewals to fail", move || {
            let f = failures(&registry);
            async move { f >= 3.0 }
        })
        .await;
    }
    // Still the same (valid) certificate.
    let current = rx.borrow().clone().unwrap();
    assert_eq!(current.cert_chain[0], held.cert_chain[0]);
    assert!(current.not_after > SystemTime::now());

    let _svc = pki.start_at(addr, None).await;
    let renewed = next_creds(&mut rx, Some(&held)).await;
    assert_ne!(spki(&renewed.cert_chain[0]), spki(&held.cert_chain[0]));
}

#[tokio::test]
async fn expired_issuer_is_refused_and_a_replaced_issuer_is_picked_up() {
    let pki = Pki::new();
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    pki.write_issuer(&pki.issuer(
        "expired.linkerd.cluster.local",
        two_days_ago,
        Duration::from_secs(86_400),
    ));
    let svc = pki.start(None).await;

    let (_, csr) = tandem_identity::issuer::generate_csr(NAME).unwrap();
    let e = raw_certify(svc.addr, request(NAME, TOKEN, csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("issuer certificate expired at"),
        "{e:?}"
    );
    let (status, body) = http_get(svc.admin_addr, "/ready").await;
    assert_eq!(status, 503, "{body}");

    let mut registry = Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    let mut rx =
        tandem_identity::spawn(pki.client_config(&pki.env(&[svc.addr], None)), metrics).unwrap();

    // An invalid replacement is rejected and the old issuer is kept.
    std::fs::write(pki.path("issuer.crt"), "not a certificate").unwrap();
    eventually("the bad file to be rejected", || async {
        let (_, body) = http_get(svc.admin_addr, "/metrics").await;
        metric(&body, "identity_issuer_reloads_total{result=\"failure\"}").is_some()
    })
    .await;
    let e = raw_certify(svc.addr, request(NAME, TOKEN, csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(rx.borrow().is_none());

    // A valid replacement is picked up without a restart.
    pki.write_issuer(&pki.issuer(
        "rotated.linkerd.cluster.local",
        SystemTime::now(),
        Duration::from_secs(86_400),
    ));
    let creds = next_creds(&mut rx, None).await;
    assert!(issuer_cn(&creds.cert_chain[0]).contains("rotated.linkerd.cluster.local"));
    assert_eq!(http_get(svc.admin_addr, "/ready").await.0, 200);
}

#[tokio::test]
async fn certificates_never_outlive_the_issuer() {
    let pki = Pki::new();
    // The issuer has 10 minutes left; the service issues 1h certificates.
    let m = pki.issuer(
        "short.linkerd.cluster.local",
        SystemTime::now() - Duration::from_secs(3600),
        Duration::from_secs(4200),
    );
    pki.write_issuer(&m);
    let issuer = tandem_identity::issuer::Issuer::from_pem(
        m.cert_pem.as_bytes(),
        m.key_pem.as_bytes(),
        None,
    )
    .unwrap();
    let svc = pki.start(None).await;
    let mut registry = Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    let mut rx =
        tandem_identity::spawn(pki.client_config(&pki.env(&[svc.addr], None)), metrics).unwrap();
    let creds = next_creds(&mut rx, None).await;
    assert!(creds.not_after <= issuer.not_after);
}
