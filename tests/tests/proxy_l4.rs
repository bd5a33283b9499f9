//! The transparent L4 proxy, end to end: an app in pod A connects to an app in pod B
//! by address; the connection passes A's outbound and B's inbound proxy, redirected by
//! real firewall rules in real network namespaces.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};

use tandem_tests::apps::{
    app_tls_exchange, connect, read_all, read_some, read_until, send_and_finish, Noise, NoiseCheck,
    Server,
};
use tandem_tests::probe::metric;
use tandem_tests::proxy::redirect;
use tandem_tests::{Mesh, Pod, Proxy};

/// Two pods, each with redirect rules and a proxy started with `env`.
fn meshed<'m>(mesh: &'m Mesh, env: &[(&str, &str)]) -> (Proxy<'m>, Proxy<'m>) {
    let (a, b) = (mesh.pod(0), mesh.pod(1));
    redirect(a);
    redirect(b);
    (Proxy::start(a, env), Proxy::start(b, env))
}

fn addr(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::from((pod.ipv4, port))
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

#[test]
fn http1_request_and_response_arrive_unchanged() {
    let mesh = Mesh::new(2);
    let (proxy_a, proxy_b) = meshed(&mesh, &[]);
    let request = b"GET /hello?x=1 HTTP/1.1\r\nHost: b.example\r\nX-Mixed-CASE: Yes\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Server: B\r\n\r\nworld";
    let server = Server::start(mesh.pod(1), any(8080), move |mut conn| {
        let got = read_until(&mut conn, b"\r\n\r\n");
        conn.write_all(response).unwrap();
        got
    });
    let mut client = connect(mesh.pod(0), addr(mesh.pod(1), 8080));
    client.write_all(request).unwrap();
    let mut got = vec![0; response.len()];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, response);
    assert_eq!(server.join(), request);

    let detected = [("direction", "outbound"), ("result", "http/1")];
    proxy_a.wait_metric("tandem_protocol_detect_total", &detected, 1.0);
    let detected = [("direction", "inbound"), ("result", "http/1")];
    proxy_b.wait_metric("tandem_protocol_detect_total", &detected, 1.0);
}

/// 10 MiB each way through both proxies at once, every byte checked, then the byte
/// counters of every side checked against what was sent.
#[test]
fn ten_mib_each_way_arrive_intact_and_are_counted() {
    const SIZE: usize = 10 << 20;
    let mesh = Mesh::new(2);
    let (proxy_a, proxy_b) = meshed(&mesh, &[]);
    let server = Server::start(mesh.pod(1), any(9000), |mut conn| {
        // Echo while receiving, then finish once the client has.
        let mut buf = vec![0; 64 * 1024];
        let mut total = 0;
        loop {
            let n = read_some(&mut conn, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            conn.write_all(&buf[..n]).unwrap();
            total += n;
        }
        conn.shutdown(Shutdown::Write).unwrap();
        total
    });
    let client = connect(mesh.pod(0), addr(mesh.pod(1), 9000));
    let mut writer = client.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        let mut noise = Noise::new(7);
        let mut chunk = vec![0; 64 * 1024];
        for _ in 0..SIZE / chunk.len() {
            noise.fill(&mut chunk);
            writer.write_all(&chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = client;
    let mut check = NoiseCheck::new(7);
    let mut buf = vec![0; 64 * 1024];
    while check.checked < SIZE {
        let n = read_some(&mut reader, &mut buf).unwrap();
        assert!(n > 0, "echo ended after {} bytes", check.checked);
        check.check(&buf[..n]);
    }
    assert_eq!(read_all(&mut reader), b"", "nothing after the echo");
    sending.join().unwrap();
    assert_eq!(server.join(), SIZE);

    let size = SIZE as f64;
    let target = "192.0.2.2:9000";
    for (proxy, direction) in [(&proxy_a, "outbound"), (&proxy_b, "inbound")] {
        let d = ("direction", direction);
        let t = ("target_addr", target);
        let text = proxy.wait_metric("tcp_open_connections", &[d, t], 0.0);
        for peer in ["src", "dst"] {
            let labels = [d, t, ("peer", peer)];
            assert_eq!(
                metric(&text, "tcp_open_total", &labels),
                Some(1.0),
                "{direction} {peer}\n{text}"
            );
            assert_eq!(
                metric(&text, "tcp_read_bytes_total", &labels),
                Some(size),
                "{direction} {peer}\n{text}"
            );
            assert_eq!(
                metric(&text, "tcp_write_bytes_total", &labels),
                Some(size),
                "{direction} {peer}\n{text}"
            );
            let clean = [d, t, ("peer", peer), ("errno", "")];
            assert_eq!(
                metric(&text, "tcp_close_total", &clean),
                Some(1.0),
                "{direction} {peer}\n{text}"
            );
        }
    }
}

#[test]
fn server_first_protocol_on_an_opaque_port_is_not_delayed() {
    let mesh = Mesh::new(2);
    // Detection would wait an hour: only skipping it lets the banner through.
    let env = [
        ("LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT", "1h"),
        ("LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT", "1h"),
    ];
    let (proxy_a, proxy_b) = meshed(&mesh, &env);
    let server = Server::start(mesh.pod(1), any(3306), |mut conn| {
        conn.write_all(b"BANNER mysql-ish\n").unwrap();
        read_until(&mut conn, b"login\n")
    });
    let mut client = connect(mesh.pod(0), addr(mesh.pod(1), 3306));
    assert_eq!(read_until(&mut client, b"\n"), b"BANNER mysql-ish\n");
    client.write_all(b"login\n").unwrap();
    assert_eq!(server.join(), b"login\n");
    let skipped = [("direction", "outbound"), ("result", "opaque_port")];
    proxy_a.wait_metric("tandem_protocol_detect_total", &skipped, 1.0);
    let skipped = [("direction", "inbound"), ("result", "opaque_port")];
    proxy_b.wait_metric("tandem_protocol_detect_total", &skipped, 1.0);
}

#[test]
fn server_first_protocol_on_a_detected_port_arrives_after_the_detect_timeout() {
    let mesh = Mesh::new(2);
    // With the server-first window off: the detection timeout's own fallback.
    let env = [
        ("LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT", "300ms"),
        ("LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT", "300ms"),
        ("TANDEM_OUTBOUND_SERVER_FIRST_WINDOW", "0"),
        ("TANDEM_INBOUND_SERVER_FIRST_WINDOW", "0"),
    ];
    let (proxy_a, proxy_b) = meshed(&mesh, &env);
    let server = Server::start(mesh.pod(1), any(7000), |mut conn| {
        conn.write_all(b"220 hello from the server\r\n").unwrap();
        read_until(&mut conn, b"QUIT\r\n")
    });
    let mut client = connect(mesh.pod(0), addr(mesh.pod(1), 7000));
    assert_eq!(
        read_until(&mut client, b"\r\n"),
        b"220 hello from the server\r\n"
    );
    client.write_all(b"QUIT\r\n").unwrap();
    assert_eq!(server.join(), b"QUIT\r\n");
    let timeout = [("direction", "outbound"), ("result", "timeout")];
    proxy_a.wait_metric("tandem_protocol_detect_total", &timeout, 1.0);
    let timeout = [("direction", "inbound"), ("result", "timeout")];
    proxy_b.wait_metric("tandem_protocol_detect_total", &timeout, 1.0);
}

#[test]
fn client_half_close_passes_while_the_server_keeps_answering() {
    let mesh = Mesh::new(2);
    let (_a, _b) = meshed(&mesh, &[]);
    let server = Server::start(mesh.pod(1), any(9001), |mut conn| {
        let request = read_all(&mut conn);
        // The client has finished sending; the answer must still reach it.
        conn.write_all(b"answer to: ").unwrap();
        conn.write_all(&request).unwrap();
        request
    });
    let mut client = connect(mesh.pod(0), addr(mesh.pod(1), 9001));
    send_and_finish(&mut client, b"question one");
    assert_eq!(read_all(&mut client), b"answer to: question one");
    assert_eq!(server.join(), b"question one");
}

#[test]
fn server_half_close_passes_while_the_client_keeps_sending() {
    let mesh = Mesh::new(2);
    let (_a, _b) = meshed(&mesh, &[]);
    // An opaque port, so the server may speak first.
    let server = Server::start(mesh.pod(1), any(5432), |mut conn| {
        send_and_finish(&mut conn, b"all I have to say");
        read_all(&mut conn)
    });
    let mut client = connect(mesh.pod(0), addr(mesh.pod(1), 5432));
    assert_eq!(read_all(&mut client), b"all I have to say");
    send_and_finish(&mut client, b"but I was not done");
    assert_eq!(server.join(), b"but I was not done");
}

#[test]
fn refused_upstream_resets_the_client() {
    let mesh = Mesh::new(2);
    let (_proxy_a, proxy_b) = meshed(&mesh, &[]);
    // Nothing listens on 8081 in pod B. (Not HTTP: an HTTP client gets a 502 with
    // `l5d-proxy-error` instead, see mesh_http.rs.)
    let mut client = connect(mesh.pod(0), addr(mesh.pod(1), 8081));
    client.write_all(b"HELLO not http\r\n").unwrap();
    let mut buf = [0u8; 64];
    let error = client
        .read(&mut buf)
        .expect_err("the client must see the failure, not data or a clean end");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    proxy_b.wait_metric(
        "inbound_tcp_errors_total",
        &[("error", "connect_refused")],
        1.0,
    );
}

/// The application's own TLS passes through both proxies untouched: the handshake and
/// the encrypted exchange succeed end to end, and the inbound proxy saw the SNI.
#[test]
fn application_tls_passes_through_untouched() {
    let mesh = Mesh::new(2);
    let (proxy_a, proxy_b) = meshed(&mesh, &[]);
    app_tls_exchange(mesh.pod(0), mesh.pod(1), addr(mesh.pod(1), 8443), any(8443));
    let tls = [("direction", "outbound"), ("result", "tls")];
    proxy_a.wait_metric("tandem_protocol_detect_total", &tls, 1.0);
    let tls = [("direction", "inbound"), ("result", "tls")];
    let text = proxy_b.wait_metric("tandem_protocol_detect_total", &tls, 1.0);
    let passthrough = [("direction", "inbound"), ("peer", "src"), ("tls", "opaque")];
    assert_eq!(
        metric(&text, "tcp_open_total", &passthrough),
        Some(1.0),
        "{text}"
    );
}

/// A connection straight to the outbound listener would make the proxy dial itself.
#[test]
fn connections_that_would_loop_are_refused_and_counted() {
    let mesh = Mesh::new(2);
    let (proxy_a, _proxy_b) = meshed(&mesh, &[]);
    let mut client = connect(mesh.pod(0), SocketAddr::from(([127, 0, 0, 1], 4140)));
    // The loop is refused at once, before anything is read: the reset may come before
    // this write is done, which is a refusal too.
    let _ = client.write_all(b"GET / HTTP/1.1\r\n\r\n");
    let mut buf = [0u8; 16];
    // Closed without a byte of response (a clean close or a reset are both refusals).
    assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
    proxy_a.wait_metric("outbound_tcp_errors_total", &[("error", "loop")], 1.0);
}

/// IPv6: the original destination comes from the IPv6 socket option, on dual-stack
/// listeners, and appears in the metrics as the address the app dialled.
#[test]
fn ipv6_connections_are_redirected_and_forwarded() {
    let mesh = Mesh::new(2);
    let env = [
        (
            "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS",
            "127.0.0.1:4140,[::1]:4140",
        ),
        ("LINKERD2_PROXY_INBOUND_LISTEN_ADDR", "[::]:4143"),
    ];
    let (proxy_a, proxy_b) = meshed(&mesh, &env);
    let b = mesh.pod(1);
    let server = Server::start(
        b,
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 9002)),
        |mut conn| {
            let got = read_all(&mut conn);
            conn.write_all(b"six reply").unwrap();
            got
        },
    );
    let mut client = connect(mesh.pod(0), SocketAddr::from((b.ipv6, 9002)));
    send_and_finish(&mut client, b"six request");
    assert_eq!(read_all(&mut client), b"six reply");
    assert_eq!(server.join(), b"six request");
    let target = ("target_addr", "[2001:db8::2]:9002");
    for (proxy, direction) in [(&proxy_a, "outbound"), (&proxy_b, "inbound")] {
        let labels = [("direction", direction), ("peer", "src"), target];
        proxy.wait_metric("tcp_read_bytes_total", &labels, 11.0);
    }
}

/// IPv4 clients of a dual-stack inbound listener are reported as plain IPv4.
#[test]
fn ipv4_through_a_dual_stack_inbound_listener() {
    let mesh = Mesh::new(2);
    let (_proxy_a, proxy_b) = meshed(
        &mesh,
        &[("LINKERD2_PROXY_INBOUND_LISTEN_ADDR", "[::]:4143")],
    );
    let server = Server::start(mesh.pod(1), any(9003), |mut conn| read_all(&mut conn));
    let mut client = connect(mesh.pod(0), addr(mesh.pod(1), 9003));
    send_and_finish(&mut client, b"four");
    assert_eq!(server.join(), b"four");
    let labels = [
        ("direction", "inbound"),
        ("peer", "src"),
        ("target_addr", "192.0.2.2:9003"),
    ];
    proxy_b.wait_metric("tcp_read_bytes_total", &labels, 4.0);
}
