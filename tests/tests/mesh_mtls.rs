//! Meshed traffic: two pods whose proxies are certified by a real issuer (running in a
//! third pod) talk over mutual TLS, each knowing who the other is.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use tandem_tests::apps::{
    app_tls_exchange, connect, read_all, read_until, send_and_finish, Server,
};
use tandem_tests::capture::{contains, Capture};
use tandem_tests::mesh::{env_refs, identity_of, MeshedPair, TrustDomain};
use tandem_tests::probe::metric;
use tandem_tests::Proxy;

fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

#[test]
fn meshed_traffic_is_mtls_on_the_wire_and_arrives_intact() {
    let world = MeshedPair::new();
    let (env_a, env_b) = (world.env(0, false, &[]), world.env(1, false, &[]));
    let _issuer = world.start_issuer(&[]);
    let (a, b) = (world.mesh.pod(0), world.mesh.pod(1));
    let proxy_a = Proxy::start(a, &env_refs(&env_a));
    let proxy_b = Proxy::start(b, &env_refs(&env_b));
    let capture = Capture::start(b, "veth0");

    // A detected protocol (HTTP/1) on a regular port.
    let request = b"POST /orders HTTP/1.1\r\nHost: beta\r\nX-Secret: SECRET-REQUEST-4b1d\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nSECRET-RESPONSE-77e0";
    let server = Server::start(b, any(8080), move |mut conn| {
        let got = read_until(&mut conn, b"\r\n\r\n");
        conn.write_all(response).unwrap();
        got
    });
    let mut client = connect(a, SocketAddr::from((b.ipv4, 8080)));
    client.write_all(request).unwrap();
    let mut got = vec![0; response.len()];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, response);
    // Unchanged, but for the client identity the inbound proxy vouches for.
    let expected = format!(
        "POST /orders HTTP/1.1\r\nHost: beta\r\nX-Secret: SECRET-REQUEST-4b1d\r\nl5d-client-id: {}\r\n\r\n",
        identity_of("alpha")
    );
    assert_eq!(String::from_utf8_lossy(&server.join()), expected);

    // An opaque port: carried to the peer's inbound port with a transport header.
    let server = Server::start(b, any(5432), |mut conn| {
        let got = read_all(&mut conn);
        conn.write_all(b"SECRET-OPAQUE-REPLY-19c2").unwrap();
        got
    });
    let mut client = connect(a, SocketAddr::from((b.ipv4, 5432)));
    send_and_finish(&mut client, b"SECRET-OPAQUE-REQUEST-a83f");
    assert_eq!(read_all(&mut client), b"SECRET-OPAQUE-REPLY-19c2");
    assert_eq!(server.join(), b"SECRET-OPAQUE-REQUEST-a83f");

    let (alpha, beta) = (identity_of("alpha"), identity_of("beta"));
    let inbound = [
        ("direction", "inbound"),
        ("peer", "src"),
        ("tls", "true"),
        ("client_id", alpha.as_str()),
    ];
    let text = proxy_b.wait_metric("tcp_open_total", &inbound, 2.0);
    // The opaque connection came in on 4143 with a transport header; it is counted
    // under the port the header named, as Linkerd counts it.
    let real_port = [
        ("direction", "inbound"),
        ("peer", "src"),
        ("target_port", "5432"),
        ("client_id", alpha.as_str()),
    ];
    assert_eq!(
        metric(&text, "tcp_open_total", &real_port),
        Some(1.0),
        "{text}"
    );
    let outbound = [
        ("direction", "outbound"),
        ("peer", "dst"),
        ("tls", "true"),
        ("server_id", beta.as_str()),
    ];
    let text = proxy_a.wait_metric("tcp_open_total", &outbound, 2.0);
    // The opaque connection went to beta's inbound port, not to 5432.
    let direct = [
        ("direction", "outbound"),
        ("peer", "dst"),
        ("target_port", "4143"),
    ];
    assert_eq!(
        metric(&text, "tcp_open_total", &direct),
        Some(1.0),
        "{text}"
    );
    // By default with Linkerd's transport header, not on a carrier (opt-in).
    assert_eq!(
        metric(&text, "tandem_carriers_total", &[("direction", "outbound")]),
        Some(0.0),
        "{text}"
    );

    let wire = capture.stop();
    for secret in [
        "SECRET-REQUEST-4b1d",
        "SECRET-RESPONSE-77e0",
        "SECRET-OPAQUE-REQUEST-a83f",
        "SECRET-OPAQUE-REPLY-19c2",
    ] {
        assert!(
            !contains(&wire, secret.as_bytes()),
            "{secret} crossed the wire in plaintext"
        );
    }
    // TLS 1.3 application-data records went both ways instead.
    assert!(
        contains(&wire, &[0x17, 0x03, 0x03]),
        "no TLS records captured ({} bytes)",
        wire.len()
    );
}

/// Certificates a fake peer can present instead of beta's real one.
fn bad_certificates(
    domain: &TrustDomain,
) -> Vec<(
    &'static str,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let issuer_pem = std::fs::read_to_string(&domain.issuer_cert).unwrap();
    let issuer_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(&domain.issuer_key).unwrap()).unwrap();
    let issuer = rcgen::CertificateParams::from_ca_cert_pem(&issuer_pem)
        .unwrap()
        .self_signed(&issuer_key)
        .unwrap();
    let issuer_der = CertificateDer::from_pem_slice(issuer_pem.as_bytes()).unwrap();

    let leaf =
        |name: &str, expired: bool, signer: &rcgen::Certificate, signer_key: &rcgen::KeyPair| {
            let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2020, 1, 2);
            }
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, signer, signer_key).unwrap();
            (
                cert.der().clone(),
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
        };

    let mut other_params =
        rcgen::CertificateParams::new(vec!["root.elsewhere.example".to_string()]).unwrap();
    other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other_anchor = other_params.self_signed(&other_key).unwrap();

    let beta = identity_of("beta");
    let (wrong_name, k1) = leaf(&identity_of("gamma"), false, &issuer, &issuer_key);
    let (other_domain, k2) = leaf(&beta, false, &other_anchor, &other_key);
    let (expired, k3) = leaf(&beta, true, &issuer, &issuer_key);
    vec![
        ("another identity", vec![wrong_name, issuer_der.clone()], k1),
        (
            "another trust anchor",
            vec![other_domain, other_anchor.der().clone()],
            k2,
        ),
        ("an expired certificate", vec![expired, issuer_der], k3),
    ]
}

#[test]
fn peers_with_the_wrong_identity_anchor_or_expiry_are_refused() {
    let world = MeshedPair::new();
    let env_a = world.env(0, false, &[]);
    let _issuer = world.start_issuer(&[]);
    let (a, b) = (world.mesh.pod(0), world.mesh.pod(1));
    let proxy_a = Proxy::start(a, &env_refs(&env_a));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    for (case, chain, key) in bad_certificates(&world.domain) {
        // An impostor in pod B answers on the inbound port in place of beta's proxy.
        let config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let impostor = Server::start(b, any(4143), move |conn| {
            let tls = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            let mut stream = rustls::StreamOwned::new(tls, conn);
            let mut received = Vec::new();
            let _ = stream.read_to_end(&mut received);
            received
        });
        let mut client = connect(a, SocketAddr::from((b.ipv4, 8080)));
        client
            .write_all(b"GET /secret HTTP/1.1\r\nHost: beta\r\n\r\n")
            .unwrap();
        // HTTP is proxied per request: the proxy's own failure is a 502 naming it.
        let mut buf = [0u8; 64];
        match client.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) if buf[..n].starts_with(b"HTTP/1.1 502 Bad Gateway\r\nl5d-proxy-error: ") => {}
            Ok(n) => panic!(
                "{case}: the client received {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        }
        assert_eq!(
            impostor.join(),
            b"",
            "{case}: application bytes reached the impostor"
        );
    }
    let text = proxy_a.wait_metric(
        "outbound_tcp_errors_total",
        &[("error", "tls_handshake")],
        2.0,
    );
    assert_eq!(
        metric(
            &text,
            "outbound_tcp_errors_total",
            &[("error", "peer_identity")]
        ),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn a_port_that_requires_identity_refuses_unmeshed_clients_and_accepts_meshed_ones() {
    let world = MeshedPair::new();
    let require = [("LINKERD2_PROXY_INBOUND_PORTS_REQUIRE_IDENTITY", "8080")];
    let (env_a, env_b) = (world.env(0, false, &[]), world.env(1, false, &require));
    let _issuer = world.start_issuer(&[]);
    let (a, b, unmeshed) = (world.mesh.pod(0), world.mesh.pod(1), world.mesh.pod(2));
    let _proxy_a = Proxy::start(a, &env_refs(&env_a));
    let proxy_b = Proxy::start(b, &env_refs(&env_b));
    let server = Server::start(b, any(8080), |mut conn| read_until(&mut conn, b"\r\n\r\n"));

    // Pod 2 has no proxy: its plaintext connection is refused before the app.
    let mut plain = connect(unmeshed, SocketAddr::from((b.ipv4, 8080)));
    plain.write_all(b"GET /plain HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 16];
    assert!(
        matches!(plain.read(&mut buf), Ok(0) | Err(_)),
        "the unmeshed client got an answer"
    );
    proxy_b.wait_metric(
        "inbound_tcp_errors_total",
        &[("error", "unauthorized")],
        1.0,
    );

    let mut meshed = connect(a, SocketAddr::from((b.ipv4, 8080)));
    meshed.write_all(b"GET /meshed HTTP/1.1\r\n\r\n").unwrap();
    // The inbound proxy vouches for the meshed client with `l5d-client-id`.
    let expected = format!(
        "GET /meshed HTTP/1.1\r\nl5d-client-id: {}\r\n\r\n",
        identity_of("alpha")
    );
    assert_eq!(String::from_utf8_lossy(&server.join()), expected);
}

#[test]
fn application_tls_inside_the_mesh_is_untouched() {
    let world = MeshedPair::new();
    let (env_a, env_b) = (world.env(0, false, &[]), world.env(1, false, &[]));
    let _issuer = world.start_issuer(&[]);
    let (a, b) = (world.mesh.pod(0), world.mesh.pod(1));
    let _proxy_a = Proxy::start(a, &env_refs(&env_a));
    let proxy_b = Proxy::start(b, &env_refs(&env_b));
    app_tls_exchange(a, b, SocketAddr::from((b.ipv4, 8443)), any(8443));
    // The app's TLS rode inside mesh TLS: beta terminated the mesh and found TLS inside.
    let alpha = identity_of("alpha");
    let inbound = [
        ("direction", "inbound"),
        ("peer", "src"),
        ("tls", "true"),
        ("client_id", alpha.as_str()),
    ];
    let text = proxy_b.wait_metric("tcp_open_total", &inbound, 1.0);
    assert_eq!(
        metric(
            &text,
            "tandem_protocol_detect_total",
            &[("direction", "inbound"), ("result", "tls")]
        ),
        Some(2.0),
        "{text}"
    );
}

/// The certificate beta's inbound port presents to a new client (DER).
fn presented_certificate(from: &tandem_tests::Pod, to: SocketAddr, anchor_pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for anchor in rustls::pki_types::CertificateDer::pem_slice_iter(anchor_pem.as_bytes()) {
        roots.add(anchor.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = identity_of("beta").try_into().unwrap();
    let mut tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut socket = connect(from, to);
    while tls.is_handshaking() {
        tls.complete_io(&mut socket)
            .expect("handshake with beta's inbound port");
    }
    tls.peer_certificates().expect("beta's certificate")[0].to_vec()
}

#[test]
fn certificates_rotate_under_a_long_lived_connection() {
    let world = MeshedPair::new();
    let fast = [("LINKERD2_PROXY_IDENTITY_MIN_REFRESH", "1s")];
    let (env_a, env_b) = (world.env(0, false, &fast), world.env(1, false, &fast));
    let _issuer = world.start_issuer(&["--cert-lifetime", "4s", "--clock-skew", "0s"]);
    let (a, b, observer) = (world.mesh.pod(0), world.mesh.pod(1), world.mesh.pod(2));
    let proxy_a = Proxy::start(a, &env_refs(&env_a));
    let proxy_b = Proxy::start(b, &env_refs(&env_b));
    let inbound_port = SocketAddr::from((b.ipv4, 4143));
    let first_certificate = presented_certificate(observer, inbound_port, &world.domain.anchor_pem);

    let server = Server::start(b, any(6379), |mut conn| {
        let mut lines = 0;
        loop {
            let line = read_line(&mut conn);
            if line.is_empty() {
                return lines;
            }
            conn.write_all(&line).unwrap();
            lines += 1;
        }
    });
    let mut client = connect(a, SocketAddr::from((b.ipv4, 6379)));
    client.write_all(b"before\n").unwrap();
    assert_eq!(read_until(&mut client, b"\n"), b"before\n");

    // Both proxies renew (several times, with 4-second certificates).
    for proxy in [&proxy_a, &proxy_b] {
        proxy.wait_metric("identity_cert_refresh_total", &[("result", "ok")], 3.0);
    }
    // The connection made with the first certificates is untouched…
    client.write_all(b"after\n").unwrap();
    assert_eq!(read_until(&mut client, b"\n"), b"after\n");
    send_and_finish(&mut client, b"");
    assert_eq!(read_all(&mut client), b"");
    assert_eq!(server.join(), 2);
    // …and new connections get the new certificate.
    assert_ne!(
        presented_certificate(observer, inbound_port, &world.domain.anchor_pem),
        first_certificate
    );
    let server = Server::start(b, any(6380), |mut conn| read_all(&mut conn));
    let mut fresh = connect(a, SocketAddr::from((b.ipv4, 6380)));
    send_and_finish(&mut fresh, b"new connection");
    assert_eq!(server.join(), b"new connection");
}

fn read_line(conn: &mut std::net::TcpStream) -> Vec<u8> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while conn.read(&mut byte).unwrap_or(0) == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    line
}

/// Until it holds a certificate the proxy is alive but not ready, and accepts nothing:
/// a connection made meanwhile waits and is served, meshed, once it is certified.
#[test]
fn the_proxy_is_not_ready_and_serves_nothing_until_certified() {
    let world = MeshedPair::new();
    let (env_a, env_b) = (world.env(0, false, &[]), world.env(1, false, &[]));
    let (a, b) = (world.mesh.pod(0), world.mesh.pod(1));
    let mut proxy_a = Proxy::launch(a, &env_refs(&env_a));
    tandem_tests::wait_for("the admin server", tandem_tests::PATIENCE, || {
        proxy_a
            .admin_request("GET", "/live", "")
            .ok()
            .filter(|(status, _)| *status == 200)
    });
    assert_eq!(proxy_a.admin_request("GET", "/ready", "").unwrap().0, 503);

    let server = Server::start(b, any(8080), |mut conn| {
        let got = read_until(&mut conn, b"\r\n\r\n");
        conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        got
    });
    let mut early = connect(a, SocketAddr::from((b.ipv4, 8080)));
    early.write_all(b"GET /early HTTP/1.1\r\n\r\n").unwrap();
    let text = proxy_a.metrics();
    assert_eq!(
        metric(&text, "tcp_open_total", &[("direction", "outbound")]),
        None,
        "{text}"
    );

    let _issuer = world.start_issuer(&[]);
    let _proxy_b = Proxy::start(b, &env_refs(&env_b));
    proxy_a.wait_ready();
    assert_eq!(
        read_until(&mut early, b"\r\n\r\n"),
        b"HTTP/1.1 204 No Content\r\n\r\n"
    );
    let expected = format!(
        "GET /early HTTP/1.1\r\nl5d-client-id: {}\r\n\r\n",
        identity_of("alpha")
    );
    assert_eq!(String::from_utf8_lossy(&server.join()), expected);
    let beta = identity_of("beta");
    let meshed = [
        ("direction", "outbound"),
        ("peer", "dst"),
        ("tls", "true"),
        ("server_id", beta.as_str()),
    ];
    proxy_a.wait_metric("tcp_open_total", &meshed, 1.0);
}

/// The TLS code point of the post-quantum hybrid `X25519MLKEM768`, and of X25519.
const X25519MLKEM768: [u8; 2] = [0x11, 0xec];
const X25519: [u8; 2] = [0x00, 0x1d];

/// ClientHellos whose `supported_groups` extension lists the hybrid first and X25519
/// second: the extension's type (`00 0a`), two lengths, then the list.
fn hellos_preferring_the_hybrid(wire: &[u8]) -> usize {
    let list = [X25519MLKEM768, X25519].concat();
    wire.windows(10)
        .filter(|w| w[..2] == [0x00, 0x0a] && w[6..] == list[..])
        .count()
}

/// ServerHellos that chose the hybrid: a `key_share` extension (`00 33`, 1,124
/// bytes) holding the hybrid's group and its 1,120-byte share.
fn servers_choosing_the_hybrid(wire: &[u8]) -> usize {
    let share = [
        &[0x00, 0x33, 0x04, 0x64][..],
        &X25519MLKEM768,
        &[0x04, 0x60],
    ]
    .concat();
    wire.windows(share.len()).filter(|w| *w == share).count()
}

/// Mesh TLS and the identity client both offer the post-quantum hybrid key exchange
/// first, as linkerd2-proxy does, and two Tandem proxies (and the proxy and its
/// issuer) agree on it: seen in the ClientHellos and ServerHellos on the wire.
#[test]
fn handshakes_prefer_the_post_quantum_hybrid() {
    let world = MeshedPair::new();
    let (env_a, env_b) = (world.env(0, false, &[]), world.env(1, false, &[]));
    let _issuer = world.start_issuer(&[]);
    let (a, b) = (world.mesh.pod(0), world.mesh.pod(1));
    let _proxy_a = Proxy::start(a, &env_refs(&env_a));
    // Beta's certificate request to the issuer crosses its interface.
    let capture = Capture::start(b, "veth0");
    let _proxy_b = Proxy::start(b, &env_refs(&env_b));
    let identity_wire = capture.stop();
    assert!(
        hellos_preferring_the_hybrid(&identity_wire) >= 1,
        "the identity client offers the hybrid first"
    );
    assert!(
        servers_choosing_the_hybrid(&identity_wire) >= 1,
        "the issuer and the identity client agree on the hybrid"
    );

    let capture = Capture::start(b, "veth0");
    let server = Server::start(b, any(5432), |mut conn| read_all(&mut conn));
    let mut client = connect(a, SocketAddr::from((b.ipv4, 5432)));
    send_and_finish(&mut client, b"over a post-quantum exchange");
    assert_eq!(read_all(&mut client), b"");
    assert_eq!(server.join(), b"over a post-quantum exchange");
    let mesh_wire = capture.stop();
    assert!(
        hellos_preferring_the_hybrid(&mesh_wire) >= 1,
        "the mesh client offers the hybrid first"
    );
    assert!(
        servers_choosing_the_hybrid(&mesh_wire) >= 1,
        "two Tandem proxies agree on the hybrid"
    );
}
