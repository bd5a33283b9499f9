//! What one mesh TLS handshake costs both sides together, in memory (no sockets):
//! mutual TLS 1.3 with P-256 certificates, full and resumed, with the classical key
//! exchange (X25519, what Tandem offered before) and with the post-quantum hybrid
//! `X25519MLKEM768` first (what it offers now, as linkerd2-proxy does). Also prints
//! the size of each first flight (the ClientHello).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

const NAME: &str = "web.ns.serviceaccount.identity.linkerd.cluster.local";

struct Certs {
    anchor: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn certs() -> Certs {
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let ca_key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![NAME.to_string()]).unwrap();
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    Certs {
        anchor: ca.der().clone(),
        chain: vec![leaf.der().clone(), ca.der().clone()],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

fn configs(
    provider: Arc<CryptoProvider>,
    certs: &Certs,
    resume: bool,
) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let mut roots = RootCertStore::empty();
    roots.add(certs.anchor.clone()).unwrap();
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .unwrap();
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.chain.clone(), certs.key.clone_key())
        .unwrap();
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs.chain.clone(), certs.key.clone_key())
        .unwrap();
    if !resume {
        client.resumption = rustls::client::Resumption::disabled();
    }
    (Arc::new(client), Arc::new(server))
}

/// One handshake, both sides; the size of the client's first flight.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> usize {
    let name = ServerName::try_from(NAME).unwrap();
    let mut client = ClientConnection::new(client.clone(), name).unwrap();
    let mut server = ServerConnection::new(server.clone()).unwrap();
    let mut buf = Vec::with_capacity(4096);
    let mut first_flight = 0;
    while client.is_handshaking() || server.is_handshaking() {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        if first_flight == 0 {
            first_flight = buf.len();
        }
        let mut read = &buf[..];
        while !read.is_empty() {
            server.read_tls(&mut read).unwrap();
        }
        server.process_new_packets().unwrap();
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut read = &buf[..];
        while !read.is_empty() {
            client.read_tls(&mut read).unwrap();
        }
        client.process_new_packets().unwrap();
    }
    first_flight
}

fn classical() -> Arc<CryptoProvider> {
    let mut provider = (*tandem_proxy::mesh::tls::provider()).clone();
    provider.kx_groups = vec![
        rustls::crypto::ring::kx_group::X25519,
        rustls::crypto::ring::kx_group::SECP256R1,
        rustls::crypto::ring::kx_group::SECP384R1,
    ];
    Arc::new(provider)
}

fn bench(c: &mut Criterion) {
    let certs = certs();
    let mut group = c.benchmark_group("handshake");
    for (kx, provider) in [
        ("x25519", classical()),
        ("x25519mlkem768", tandem_proxy::mesh::tls::provider()),
    ] {
        for resume in [false, true] {
            let (client, server) = configs(provider.clone(), &certs, resume);
            let flight = handshake(&client, &server);
            let kind = if resume { "resumed" } else { "full" };
            eprintln!("{kx}, {kind}: first flight {flight} bytes");
            group.bench_function(format!("{kx}/{kind}"), |b| {
                b.iter(|| handshake(&client, &server))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
