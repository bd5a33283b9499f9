//! Wire compatibility with linkerd2-proxy, at the byte level: what a linkerd2-proxy
//! client sends to a pod's inbound port (mesh TLS with ALPN `transport.l5d.io/v1`,
//! then Linkerd's transport header naming the real port and a session protocol),
//! encoded here from Linkerd's documented format rather than by Tandem's codec; and
//! what Tandem sends when the control plane describes an endpoint as linkerd2-proxy's
//! destination controller does by default (HTTP/2 through the inbound port).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};

use tandem_tests::apps::{connect, http_app};
use tandem_tests::control::{endpoint, pod_profile, ControlPlane, Hint};
use tandem_tests::mesh::{env_refs, identity_of, MeshedPair};
use tandem_tests::{Pod, Proxy};

const APP: u16 = 8080;
const CONTROL: &str = "127.0.0.1:8086";

/// An HTTP server (HTTP/1 and HTTP/2) answering each request with the
/// `l5d-client-id` it arrived with and its protocol version.
fn identity_echo(pod: &Pod, port: u16) {
    http_app(pod, port, |request| {
        let id = request
            .headers()
            .get("l5d-client-id")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        Bytes::from(format!("{id} {:?}", request.version()))
    });
}

/// Linkerd's transport header, encoded from its documented format
/// (`linkerd/transport-header`): the preface, a big-endian `u32` length, then the
/// protobuf `Header { int32 port = 1; SessionProtocol session_protocol = 3; }` with
/// `SessionProtocol { oneof kind { Http1 http1 = 1; Http2 http2 = 2; } }`.
fn linkerd_header(port: u16, protocol: Option<u8>) -> Vec<u8> {
    let mut message = vec![0x08];
    let mut value = u32::from(port);
    while value >= 0x80 {
        message.push((value as u8) | 0x80);
        value >>= 7;
    }
    message.push(value as u8);
    if let Some(field) = protocol {
        // Field 3, length-delimited: an empty message in field 1 (HTTP/1) or 2 (HTTP/2).
        message.extend_from_slice(&[0x1a, 0x02, field << 3 | 2, 0x00]);
    }
    let mut header = b"transport.l5d.io/v1\r\n\r\n".to_vec();
    header.extend_from_slice(&(message.len() as u32).to_be_bytes());
    header.extend_from_slice(&message);
    header
}

const HTTP1: u8 = 1;
const HTTP2: u8 = 2;

/// A client with a mesh certificate for `gamma`, offering only the transport
/// header's ALPN, as linkerd2-proxy does to an endpoint with an opaque-transport port.
fn linkerd_like_client(pair: &MeshedPair) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for anchor in
        rustls::pki_types::CertificateDer::pem_slice_iter(pair.domain.anchor_pem.as_bytes())
    {
        roots.add(anchor.unwrap()).unwrap();
    }
    let (chain, key) = pair.domain.leaf(&identity_of("gamma"));
    let mut config = rustls::ClientConfig::builder_with_provider(tandem_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"transport.l5d.io/v1".to_vec()];
    Arc::new(config)
}

/// A transport header naming HTTP/1, then HTTP/2, sends the stream through beta's
/// HTTP path to the port it names: the application gets HTTP with `l5d-client-id`,
/// where Tandem used to relay the bytes as if they were opaque.
#[test]
fn a_header_naming_a_session_protocol_reaches_the_app_as_http() {
    let pair = MeshedPair::new();
    let _issuer = pair.start_issuer(&[]);
    let env_b = pair.env(1, true, &[]);
    let beta = Proxy::start(pair.b(), &env_refs(&env_b));
    identity_echo(pair.b(), APP);
    let config = linkerd_like_client(&pair);
    let inbound = pair.b_addr(4143);
    let gamma = identity_of("gamma");
    let client_pod = pair.mesh.pod(2);

    // HTTP/1 behind a header that says so.
    let name = identity_of("beta").try_into().unwrap();
    let tls = rustls::ClientConnection::new(config.clone(), name).unwrap();
    let mut stream = rustls::StreamOwned::new(tls, connect(client_pod, inbound));
    stream.write_all(&linkerd_header(APP, Some(HTTP1))).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: beta\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    // rustls reports a close without `close_notify` as an error.
    stream
        .read_to_end(&mut response)
        .expect("the response, then a clean TLS close (close_notify)");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with(&format!("{gamma} HTTP/1.1")),
        "{response}"
    );

    // Prior-knowledge HTTP/2 behind a header that says so, as linkerd2-proxy sends
    // HTTP/1 requests upgraded to HTTP/2 (`l5d-orig-proto`) and HTTP/2 itself.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = connect(client_pod, inbound);
    socket.set_nonblocking(true).unwrap();
    let body = runtime.block_on(async move {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpStream::from_std(socket).unwrap();
        let name = identity_of("beta").try_into().unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, socket)
            .await
            .expect("mesh TLS to beta's inbound port");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"transport.l5d.io/v1"[..])
        );
        tls.write_all(&linkerd_header(APP, Some(HTTP2)))
            .await
            .unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("HTTP/2 through the header");
        tokio::spawn(connection);
        let request = Request::get("http://beta/")
            .version(hyper::Version::HTTP_2)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.expect("a response");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    });
    assert_eq!(body, format!("{gamma} HTTP/2.0"));

    // Both counted as requests from gamma, and the connections under the real port.
    let labels = [
        ("direction", "inbound"),
        ("target_port", "8080"),
        ("client_id", gamma.as_str()),
    ];
    let text = beta.wait_metric("request_total", &labels, 2.0);
    let opened = [
        ("direction", "inbound"),
        ("peer", "src"),
        ("target_port", "8080"),
        ("client_id", gamma.as_str()),
    ];
    assert_eq!(
        tandem_tests::probe::metric(&text, "tcp_open_total", &opened),
        Some(2.0),
        "{text}"
    );
}

/// When the application closes an opaque connection, beta's proxy ends mesh TLS
/// with `close_notify`, so the peer proxy can tell the clean end from a truncation
/// (rustls reports a close without it as an error, which a proxy passes on as a
/// reset). A port that refuses stays a reset (nothing is answered).
#[test]
fn the_application_closing_ends_mesh_tls_with_close_notify() {
    let pair = MeshedPair::new();
    let _issuer = pair.start_issuer(&[]);
    let env_b = pair.env(1, true, &[]);
    let _beta = Proxy::start(pair.b(), &env_refs(&env_b));
    let server = tandem_tests::apps::Server::start(
        pair.b(),
        SocketAddr::from(([0, 0, 0, 0], 5432)),
        |mut conn| {
            conn.write_all(b"bye").unwrap();
        },
    );
    let config = linkerd_like_client(&pair);
    let open = |port: u16| {
        let name = identity_of("beta").try_into().unwrap();
        let tls = rustls::ClientConnection::new(config.clone(), name).unwrap();
        let mut stream =
            rustls::StreamOwned::new(tls, connect(pair.mesh.pod(2), pair.b_addr(4143)));
        stream.write_all(&linkerd_header(port, None)).unwrap();
        stream.flush().unwrap();
        stream
    };
    let mut stream = open(5432);
    let mut got = Vec::new();
    stream
        .read_to_end(&mut got)
        .expect("the bytes, then close_notify");
    assert_eq!(got, b"bye");
    server.join();

    // Nothing listens on 5433: a reset, as the client would get without a mesh.
    let mut stream = open(5433);
    let mut got = Vec::new();
    let error = stream
        .read_to_end(&mut got)
        .expect_err("a refused port is no clean end");
    assert!(got.is_empty(), "{error}");
}

/// An endpoint the control plane describes with the HTTP/2 hint and an
/// opaque-transport port gets its HTTP through its proxy's inbound port, behind a
/// header naming HTTP/2, as linkerd2-proxy sends it. Beta's port is opaque on its
/// own side, so only that path can serve the request: mesh TLS on the application's
/// port would be relayed to the application undecrypted.
#[test]
fn http_to_an_endpoint_with_an_opaque_transport_port_goes_through_its_inbound_port() {
    let pair = MeshedPair::new();
    let _issuer = pair.start_issuer(&[]);
    let control = ControlPlane::start(pair.a(), CONTROL.parse().unwrap());
    let beta_app = pair.b_addr(APP);
    control.set_profile(
        beta_app,
        pod_profile(endpoint(
            beta_app,
            Some(&identity_of("beta")),
            Hint::H2Through(4143),
            "beta",
        )),
    );
    let env_b = pair.env(
        1,
        true,
        &[(
            "LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION",
            "8080",
        )],
    );
    let beta = Proxy::start(pair.b(), &env_refs(&env_b));
    identity_echo(pair.b(), APP);
    let mut env_a = pair.domain.identity_env("alpha", pair.issuer_addr());
    env_a.extend(
        [
            ("LINKERD2_PROXY_DESTINATION_SVC_ADDR", CONTROL),
            ("LINKERD2_PROXY_POLICY_SVC_ADDR", CONTROL),
            (
                "LINKERD2_PROXY_POLICY_WORKLOAD",
                "{\"ns\":\"default\",\"pod\":\"alpha\"}",
            ),
            (
                "LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS",
                "192.0.2.0/24",
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let _alpha = Proxy::start(pair.a(), &env_refs(&env_a));

    let url = format!("http://{beta_app}/");
    let body = pair.a().must("curl", &["-sS", "--max-time", "30", &url]);
    let alpha = identity_of("alpha");
    // HTTP/1 from the application, carried as HTTP/2 and restored for the app.
    assert_eq!(body, format!("{alpha} HTTP/1.1"));
    let opened = [
        ("direction", "inbound"),
        ("peer", "src"),
        ("target_port", "8080"),
        ("client_id", alpha.as_str()),
    ];
    beta.wait_metric("tcp_open_total", &opened, 1.0);
}
