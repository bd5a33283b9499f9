//! HTTP through two meshed pods: real clients (curl, raw sockets, a hyper HTTP/2
//! client) and real servers, with the proxies serving requests one by one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use tandem_tests::apps::{connect, read_until};
use tandem_tests::mesh::{env_refs, identity_of, TrustDomain};
use tandem_tests::probe::metric;
use tandem_tests::proxy::redirect;
use tandem_tests::{Mesh, Pod, Proc, Proxy};

/// Pods alpha (0) and beta (1) with rules, and the issuer in pod 2.
struct World {
    mesh: Mesh,
    domain: TrustDomain,
}

impl World {
    fn new() -> World {
        let mesh = Mesh::new(3);
        redirect(mesh.pod(0));
        redirect(mesh.pod(1));
        World {
            mesh,
            domain: TrustDomain::new(),
        }
    }

    /// Starts the issuer and both proxies; `http2` marks each peer as accepting HTTP/2.
    fn start(&self, http2: bool) -> (Proc, Proxy<'_>, Proxy<'_>) {
        let issuer = SocketAddr::from((self.mesh.pod(2).ipv4, 8080));
        let issuer_proc = self.domain.start_issuer(self.mesh.pod(2), &[]);
        let names = ["alpha", "beta"];
        let mut proxies = (0..2).map(|index| {
            let peer = 1 - index;
            let peer_addr = self.mesh.pod(peer).ipv4.to_string();
            let env = self.domain.proxy_env_with(
                names[index],
                issuer,
                &[(&peer_addr, names[peer])],
                http2,
            );
            Proxy::start(self.mesh.pod(index), &env_refs(&env))
        });
        let a = proxies.next().unwrap();
        let b = proxies.next().unwrap();
        (issuer_proc, a, b)
    }

    fn a(&self) -> &Pod {
        self.mesh.pod(0)
    }

    fn b(&self) -> &Pod {
        self.mesh.pod(1)
    }

    fn b_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.b().ipv4, port))
    }
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// A hyper server (HTTP/1 and HTTP/2 on the same port, by preface) in `pod`, serving
/// on its own thread until the test ends.
fn hyper_server(pod: &Pod, port: u16) {
    let listener = pod
        .run(|| TcpListener::bind(any(port)))
        .expect("bind the test server");
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(data: impl Into<Bytes>) -> AppBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The test application: what it does depends on the path.
async fn app(request: Request<Incoming>) -> Result<Response<AppBody>, hyper::Error> {
    let client_id = request
        .headers()
        .get("l5d-client-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let version = format!("{:?}", request.version());
    match request.uri().path() {
        "/echo" => {
            // Streams the request body back, trailers included.
            let body = request.into_body().boxed();
            Ok(Response::builder()
                .header("x-version", version)
                .body(body)
                .unwrap())
        }
        "/test.Svc/Unary" => {
            // Echoes the request message, then grpc-status 0 in trailers.
            let got = request.into_body().collect().await?.to_bytes();
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let body = Full::new(got)
                .map_err(|never| match never {})
                .with_trailers(async move { Some(Ok(trailers)) });
            Ok(Response::builder()
                .header("content-type", "application/grpc")
                .body(body.boxed())
                .unwrap())
        }
        "/test.Svc/Fail" => Ok(Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "7")
            .header("grpc-message", "not for you")
            .body(full(""))
            .unwrap()),
        _ => Ok(Response::builder()
            .header("x-client-id", client_id)
            .header("x-version", version)
            .body(full("hello from beta\n"))
            .unwrap()),
    }
}

/// One HTTP/2 request from `pod` (prior knowledge), as an application there makes it.
fn h2_request(
    pod: &Pod,
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
) -> (Response<()>, Bytes, Option<hyper::HeaderMap>) {
    let stream = pod.run(|| TcpStream::connect(addr)).expect("connect");
    stream.set_nonblocking(true).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        let response = sender.send_request(request).await.expect("h2 response");
        let (parts, mut body) = response.into_parts();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("h2 body");
            if let Some(chunk) = frame.data_ref() {
                data.extend_from_slice(chunk);
            }
            if let Some(t) = frame.trailers_ref() {
                trailers = Some(t.clone());
            }
        }
        (Response::from_parts(parts, ()), Bytes::from(data), trailers)
    })
}

fn curl(pod: &Pod, args: &[&str]) -> String {
    let out = pod.exec("curl", args);
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

#[test]
fn http1_and_http2_through_the_mesh_with_client_identity_and_metrics() {
    let world = World::new();
    let (_issuer, proxy_a, proxy_b) = world.start(false);
    hyper_server(world.b(), 8080);
    let url = format!("http://{}/hello", world.b_addr(8080));

    // HTTP/1.1 from curl; a forged client id is replaced by the verified one.
    let out = curl(
        world.a(),
        &["-sS", "-i", "-H", "l5d-client-id: forged", &url],
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("hello from beta"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains(&format!("x-client-id: {}", identity_of("alpha"))),
        "{out}"
    );

    // HTTP/2 with prior knowledge.
    let out = curl(world.a(), &["-sS", "-i", "--http2-prior-knowledge", &url]);
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("x-version: HTTP/2.0"), "{out}");

    // A chunked upload streamed back.
    let out = curl(
        world.a(),
        &[
            "-sS",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "chunked body",
            &format!("http://{}/echo", world.b_addr(8080)),
        ],
    );
    assert_eq!(out, "chunked body");

    let beta = identity_of("beta");
    let alpha = identity_of("alpha");
    let outbound = [
        ("direction", "outbound"),
        ("tls", "true"),
        ("server_id", beta.as_str()),
        ("status_code", "200"),
        ("classification", "success"),
    ];
    let text = proxy_a.wait_metric("response_total", &outbound, 3.0);
    assert_eq!(
        metric(
            &text,
            "request_total",
            &[("direction", "outbound"), ("server_id", beta.as_str())]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "response_latency_ms_count",
            &[("direction", "outbound"), ("server_id", beta.as_str())]
        ),
        Some(3.0),
        "{text}"
    );
    let inbound = [
        ("direction", "inbound"),
        ("tls", "true"),
        ("client_id", alpha.as_str()),
        ("status_code", "200"),
    ];
    proxy_b.wait_metric("response_total", &inbound, 3.0);
}

#[test]
fn header_case_and_order_survive_http1_end_to_end() {
    let world = World::new();
    let (_issuer, _a, _b) = world.start(false);
    let request_head = "GET /case HTTP/1.1\r\nHost: beta\r\nX-MiXeD-CaSe: 1\r\nlower-case: 2\r\nUPPER-CASE: 3\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nX-Reply-CaSe: a\r\nContent-Length: 2\r\n\r\nok";
    let server = tandem_tests::apps::Server::start(world.b(), any(8081), move |mut conn| {
        let got = read_until(&mut conn, b"\r\n\r\n");
        conn.write_all(response).unwrap();
        got
    });
    let mut client = connect(world.a(), world.b_addr(8081));
    client.write_all(request_head.as_bytes()).unwrap();
    let got = read_until(&mut client, b"ok");
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("\r\nX-Reply-CaSe: a\r\n"), "{got}");
    let seen = String::from_utf8(server.join()).unwrap();
    let names: Vec<&str> = seen
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n))
        .collect();
    assert_eq!(
        names[..4],
        ["Host", "X-MiXeD-CaSe", "lower-case", "UPPER-CASE"],
        "{seen}"
    );
}

#[test]
fn http1_is_multiplexed_over_one_http2_connection_between_proxies() {
    let world = World::new();
    let (_issuer, _proxy_a, proxy_b) = world.start(true);
    hyper_server(world.b(), 8080);
    let addr = world.b_addr(8080);
    // 50 concurrent HTTP/1 connections from alpha's application.
    let clients: Vec<TcpStream> = (0..50).map(|_| connect(world.a(), addr)).collect();
    let threads: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            std::thread::spawn(move || {
                client
                    .write_all(b"GET /hello HTTP/1.1\r\nHost: beta\r\n\r\n")
                    .unwrap();
                let got = read_until(&mut client, b"hello from beta\n");
                String::from_utf8_lossy(&got).into_owned()
            })
        })
        .collect();
    for thread in threads {
        let got = thread.join().unwrap();
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        // Beta's application saw HTTP/1.1 again, restored from l5d-orig-proto.
        assert!(got.contains("x-version: HTTP/1.1"), "{got}");
    }
    let alpha = identity_of("alpha");
    let inbound = [
        ("direction", "inbound"),
        ("tls", "true"),
        ("client_id", alpha.as_str()),
        ("status_code", "200"),
    ];
    let text = proxy_b.wait_metric("response_total", &inbound, 50.0);
    let opened = [
        ("direction", "inbound"),
        ("peer", "src"),
        ("client_id", alpha.as_str()),
    ];
    assert_eq!(
        metric(&text, "tcp_open_total", &opened),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn grpc_passes_through_and_proxy_failures_become_errors() {
    let world = World::new();
    let (_issuer, proxy_a, _proxy_b) = world.start(true);
    hyper_server(world.b(), 8080);
    let addr = world.b_addr(8080);
    let grpc = |path: &str| {
        Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(grpc_frame(b"ping")))
            .unwrap()
    };
    let (response, data, trailers) = h2_request(world.a(), addr, grpc("/test.Svc/Unary"));
    assert_eq!(response.status(), 200);
    assert_eq!(data, grpc_frame(b"ping"));
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");

    // A non-OK status from the server arrives unchanged.
    let (response, _, _) = h2_request(world.a(), addr, grpc("/test.Svc/Fail"));
    assert_eq!(response.headers()["grpc-status"], "7");
    assert_eq!(response.headers()["grpc-message"], "not for you");
    assert!(response.headers().get("l5d-proxy-error").is_none());

    // Nothing listens on 9999 in beta: HTTP/1 gets a 502, gRPC gets UNAVAILABLE.
    let down = world.b_addr(9999);
    let out = curl(world.a(), &["-sS", "-i", &format!("http://{down}/")]);
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("l5d-proxy-error: "),
        "{out}"
    );
    let request = Request::post(format!("http://{down}/test.Svc/Unary"))
        .header("content-type", "application/grpc")
        .body(Full::new(grpc_frame(b"ping")))
        .unwrap();
    let (response, _, _) = h2_request(world.a(), down, request);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "14");

    let beta = identity_of("beta");
    let failed = [
        ("direction", "outbound"),
        ("server_id", beta.as_str()),
        ("grpc_status", "7"),
        ("classification", "failure"),
    ];
    proxy_a.wait_metric("response_total", &failed, 1.0);
}

#[test]
fn websocket_upgrade_becomes_a_byte_stream() {
    let world = World::new();
    let (_issuer, _a, _b) = world.start(true);
    let server = tandem_tests::apps::Server::start(world.b(), any(8082), |mut conn| {
        let head = read_until(&mut conn, b"\r\n\r\n");
        conn.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n").unwrap();
        // Echo raw frames until the client closes.
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => conn.write_all(&buf[..n]).unwrap(),
            }
        }
        head
    });
    let mut client = connect(world.a(), world.b_addr(8082));
    client.write_all(b"GET /chat HTTP/1.1\r\nHost: beta\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let head = read_until(&mut client, b"\r\n\r\n");
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    for frame in [
        &b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"[..],
        b"\x82\x02hi",
    ] {
        client.write_all(frame).unwrap();
        let mut echoed = vec![0; frame.len()];
        client.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, frame);
    }
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let head = server.join();
    assert!(head.starts_with(b"GET /chat HTTP/1.1\r\n"));
    let _ = Arc::new(());
}

#[test]
fn h2load_through_the_mesh_has_no_failures() {
    let world = World::new();
    let (_issuer, _a, _b) = world.start(true);
    hyper_server(world.b(), 8080);
    let url = format!("http://{}/hello", world.b_addr(8080));
    let out = world
        .a()
        .exec("h2load", &["-n", "2000", "-c", "10", "-m", "10", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "h2load failed: {text}");
    assert!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
}
