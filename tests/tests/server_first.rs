//! Server-first protocols on ports nobody declared opaque: a client silent for the
//! server-first window is given to the server, whose banner then arrives long before
//! any detection timeout; a client that speaks, before the window or after it, is
//! detected and served as before. The detection timeouts are set to 30 s, and every
//! client read here gives up after 20 s, so a pass cannot come from a timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_tests::apps::{connect, Server};
use tandem_tests::mesh::{env_refs, MeshedPair};
use tandem_tests::probe::metric;
use tandem_tests::{wait_for, Pod, Proxy, PATIENCE};

const BANNER_PORT: u16 = 7000;
const HTTP_PORT: u16 = 7080;

/// Settings of both proxies: long detection timeouts, and `extra`.
fn env(pair: &MeshedPair, index: usize, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut settings = vec![
        ("LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT", "30s"),
        ("LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT", "30s"),
    ];
    settings.extend_from_slice(extra);
    pair.env(index, true, &settings)
}

/// A server that greets each client first, then echoes a line.
fn banner_server(pod: &Pod) -> Server<Vec<u8>> {
    Server::start(
        pod,
        SocketAddr::from(([0, 0, 0, 0], BANNER_PORT)),
        |mut conn| {
            conn.write_all(b"220 ready\r\n").unwrap();
            let mut line = vec![0u8; 64];
            let n = conn.read(&mut line).unwrap();
            line.truncate(n);
            conn.write_all(&line).unwrap();
            line
        },
    )
}

/// An HTTP/1 server answering `ok` on each connection that sends a request head (a
/// connection that closes without one, as the one opened for a silent client that
/// then spoke, is let go); each head it got comes out of the channel, and the count
/// of connections it accepted is kept.
fn http_server(pod: &Pod, port: u16) -> (std::sync::mpsc::Receiver<String>, Arc<AtomicUsize>) {
    let listener = pod
        .run(|| std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))
        .expect("bind the HTTP server");
    let (heads, received) = std::sync::mpsc::channel();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let heads = heads.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
            });
        }
    });
    (received, accepted)
}

/// Reads exactly `n` bytes, giving up well before the detection timeouts.
fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = vec![0u8; n];
    stream
        .read_exact(&mut buf)
        .expect("the server's bytes before any detection timeout");
    buf
}

fn server_first_count(proxy: &Proxy, direction: &str) -> Option<f64> {
    metric(
        &proxy.metrics(),
        "tandem_protocol_detect_total",
        &[("direction", direction), ("result", "server_first")],
    )
}

/// Meshed client, meshed server: the client-side proxy gives the silent client to
/// the server through beta's inbound port with a transport header (opaque), so
/// beta's proxy does not wait either; the banner and the exchange arrive intact.
#[test]
fn a_banner_crosses_the_mesh_without_waiting_for_detection() {
    let pair = MeshedPair::new();
    let _issuer = pair.start_issuer(&[]);
    let (env_a, env_b) = (env(&pair, 0, &[]), env(&pair, 1, &[]));
    let alpha = Proxy::start(pair.a(), &env_refs(&env_a));
    let _beta = Proxy::start(pair.b(), &env_refs(&env_b));
    let server = banner_server(pair.b());
    let mut client = connect(pair.a(), pair.b_addr(BANNER_PORT));
    assert_eq!(read_exactly(&mut client, 11), b"220 ready\r\n");
    client.write_all(b"HELO alpha\r\n").unwrap();
    assert_eq!(read_exactly(&mut client, 12), b"HELO alpha\r\n");
    assert_eq!(server.join(), b"HELO alpha\r\n");
    assert_eq!(server_first_count(&alpha, "outbound"), Some(1.0));
}

/// An unmeshed client to a meshed server: beta's proxy applies the same rule.
#[test]
fn a_banner_reaches_an_unmeshed_client_without_waiting_for_detection() {
    let pair = MeshedPair::new();
    let _issuer = pair.start_issuer(&[]);
    let env_b = env(&pair, 1, &[]);
    let beta = Proxy::start(pair.b(), &env_refs(&env_b));
    let server = banner_server(pair.b());
    let mut client = connect(pair.mesh.pod(2), pair.b_addr(BANNER_PORT));
    assert_eq!(read_exactly(&mut client, 11), b"220 ready\r\n");
    client.write_all(b"HELO gamma\r\n").unwrap();
    assert_eq!(read_exactly(&mut client, 12), b"HELO gamma\r\n");
    assert_eq!(server.join(), b"HELO gamma\r\n");
    assert_eq!(server_first_count(&beta, "inbound"), Some(1.0));
}

/// HTTP clients are still served request by request: one that speaks within the
/// window, and one that speaks after it, once the connection opened for the server
/// has reached it (that connection is dropped and the client's bytes are detected).
/// Counted in the client proxy's request metrics, which only the HTTP path writes.
#[test]
fn late_http_clients_are_still_served_request_by_request() {
    for (window, after_the_window) in [("10s", false), ("50ms", true)] {
        let pair = MeshedPair::new();
        let _issuer = pair.start_issuer(&[]);
        let env_a = env(&pair, 0, &[("TANDEM_OUTBOUND_SERVER_FIRST_WINDOW", window)]);
        let env_b = env(&pair, 1, &[]);
        let alpha = Proxy::start(pair.a(), &env_refs(&env_a));
        let _beta = Proxy::start(pair.b(), &env_refs(&env_b));
        let (heads, accepted) = http_server(pair.b(), HTTP_PORT);
        let mut client = connect(pair.a(), pair.b_addr(HTTP_PORT));
        if after_the_window {
            // The proxy gives a silent client to the server only once the window
            // has passed: the server's first connection says it has.
            wait_for("the silent client given to the server", PATIENCE, || {
                (accepted.load(Ordering::SeqCst) >= 1).then_some(())
            });
        }
        client
            .write_all(b"GET /late HTTP/1.1\r\nHost: beta\r\n\r\n")
            .unwrap();
        let response = tandem_tests::apps::read_until(&mut client, b"\r\n\r\nok");
        assert!(
            response.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&response)
        );
        let head = heads.recv().expect("the request reached the server");
        assert!(head.starts_with("GET /late HTTP/1.1\r\n"), "{head}");
        let text = alpha.wait_metric(
            "request_total",
            &[("direction", "outbound"), ("target_port", "7080")],
            1.0,
        );
        assert_eq!(
            metric(
                &text,
                "tandem_protocol_detect_total",
                &[("direction", "outbound"), ("result", "server_first")]
            ),
            Some(0.0),
            "window {window}: the server never spoke first: {text}"
        );
    }
}
