//! Start-up, shutdown and configuration errors of `tandem-proxy`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

use tandem_tests::apps::{connect, read_all, read_until, Server};
use tandem_tests::proxy::redirect;
use tandem_tests::{bin_path, wait_for, Mesh, Proxy, PATIENCE};

/// Two pods with rules and proxies, and an echo-by-line server on an opaque port of B.
fn mesh_with_open_connection<'m>(
    mesh: &'m Mesh,
    env: &[(&str, &str)],
) -> (Proxy<'m>, Proxy<'m>, TcpStream, Server<Vec<u8>>) {
    let (a, b) = (mesh.pod(0), mesh.pod(1));
    redirect(a);
    redirect(b);
    let (proxy_a, proxy_b) = (Proxy::start(a, env), Proxy::start(b, env));
    let server = Server::start(b, SocketAddr::from(([0, 0, 0, 0], 6379)), echo_bytes);
    let mut client = connect(a, SocketAddr::from((b.ipv4, 6379)));
    client.write_all(b"before\n").unwrap();
    assert_eq!(read_until(&mut client, b"\n"), b"before\n");
    (proxy_a, proxy_b, client, server)
}

/// Echoes byte by byte until the client closes; returns what it saw.
fn echo_bytes(mut conn: TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while let Ok(1) = std::io::Read::read(&mut conn, &mut byte) {
        seen.push(byte[0]);
        if conn.write_all(&byte).is_err() {
            break;
        }
    }
    seen
}

/// SIGTERM to pod A's proxy while `client` (which already exchanged `before`) is
/// open: new connections are refused, yet `client` keeps working both ways and the
/// proxy exits 0 only after it closes.
fn drain_waits_for(
    mesh: &Mesh,
    proxy: &mut Proxy<'_>,
    mut client: TcpStream,
    server: Server<Vec<u8>>,
) {
    proxy.process.signal(libc::SIGTERM);
    wait_until_not_accepting(mesh);
    client.write_all(b"after\n").unwrap();
    assert_eq!(read_until(&mut client, b"\n"), b"after\n");
    assert!(
        proxy.process.try_exit().is_none(),
        "the proxy exited with a connection open"
    );
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut client), b"");
    assert_eq!(server.join(), b"before\nafter\n");
    let status = proxy.process.wait_exit(PATIENCE);
    assert!(
        status.success(),
        "exit status {status}\n{}",
        proxy.process.output()
    );
}

/// Waits until the pod's outbound listener is gone: a new connection is refused.
fn wait_until_not_accepting(mesh: &Mesh) {
    let target = SocketAddr::from((mesh.pod(1).ipv4, 6380));
    wait_for("the outbound listener to close", PATIENCE, || {
        let refused = mesh.pod(0).run(|| TcpStream::connect(target)).is_err();
        refused.then_some(())
    });
}

#[test]
fn sigterm_lets_open_connections_finish_then_exits_zero() {
    let mesh = Mesh::new(2);
    let (mut proxy_a, _proxy_b, client, server) = mesh_with_open_connection(&mesh, &[]);
    // The connection opened before the signal still works both ways.
    drain_waits_for(&mesh, &mut proxy_a, client, server);
}

#[test]
fn draining_waits_for_an_upgraded_http_connection() {
    let mesh = Mesh::new(2);
    let (a, b) = (mesh.pod(0), mesh.pod(1));
    redirect(a);
    redirect(b);
    let (mut proxy_a, _proxy_b) = (Proxy::start(a, &[]), Proxy::start(b, &[]));
    // A WebSocket-style server on an HTTP port: after the 101, it echoes bytes.
    let server = Server::start(b, SocketAddr::from(([0, 0, 0, 0], 8082)), |mut conn| {
        read_until(&mut conn, b"\r\n\r\n");
        conn.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").unwrap();
        echo_bytes(conn)
    });
    let mut client = connect(a, SocketAddr::from((b.ipv4, 8082)));
    client.write_all(b"GET /chat HTTP/1.1\r\nHost: beta\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").unwrap();
    let head = read_until(&mut client, b"\r\n\r\n");
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    client.write_all(b"before\n").unwrap();
    assert_eq!(read_until(&mut client, b"\n"), b"before\n");

    // The tunnel outlives its HTTP connection's task; the drain must still wait for it.
    drain_waits_for(&mesh, &mut proxy_a, client, server);
}

#[test]
fn a_shutdown_delay_keeps_serving_new_outbound_connections_then_exits_zero() {
    let mesh = Mesh::new(2);
    let env = [("TANDEM_SHUTDOWN_DELAY", "5s")];
    let (mut proxy_a, _proxy_b, mut client, server) = mesh_with_open_connection(&mesh, &env);
    let late = Server::start(
        mesh.pod(1),
        SocketAddr::from(([0, 0, 0, 0], 6381)),
        |mut conn| {
            let line = read_until(&mut conn, b"\n");
            conn.write_all(&line).unwrap();
            line
        },
    );
    proxy_a.process.signal(libc::SIGTERM);
    wait_for("the proxy to start its shutdown delay", PATIENCE, || {
        proxy_a
            .process
            .output()
            .contains("serving on before draining")
            .then_some(())
    });
    // As an app still finishing its work after SIGTERM: a new outbound connection.
    let mut during = connect(mesh.pod(0), SocketAddr::from((mesh.pod(1).ipv4, 6381)));
    during.write_all(b"during the delay\n").unwrap();
    assert_eq!(read_until(&mut during, b"\n"), b"during the delay\n");
    drop(during);
    assert_eq!(late.join(), b"during the delay\n");
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut client), b"");
    assert_eq!(server.join(), b"before\n");
    // Idle once the delay is over: the drain is immediate and the exit clean.
    let status = proxy_a.process.wait_exit(PATIENCE);
    let output = proxy_a.process.output();
    assert!(status.success(), "exit status {status}\n{output}");
    assert!(output.contains("drained"), "{output}");
}

#[test]
fn the_grace_period_bounds_the_drain() {
    let mesh = Mesh::new(2);
    let env = [("LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD", "200ms")];
    let (mut proxy_a, _proxy_b, mut client, _server) = mesh_with_open_connection(&mesh, &env);
    proxy_a.process.signal(libc::SIGTERM);
    // The connection stays open, yet the proxy exits cleanly once the grace period ends.
    let status = proxy_a.process.wait_exit(PATIENCE);
    assert!(
        status.success(),
        "exit status {status}\n{}",
        proxy_a.process.output()
    );
    // And the client learns that its connection is gone.
    let mut rest = Vec::new();
    let ended = std::io::Read::read_to_end(&mut client, &mut rest);
    assert!(ended.is_err() || rest.is_empty(), "{ended:?} {rest:?}");
}

#[test]
fn an_invalid_variable_exits_64_with_one_line_naming_it() {
    let out = Command::new(bin_path("tandem-proxy"))
        .env_clear()
        .env("LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("tandem-proxy: invalid configuration: "),
        "{stderr}"
    );
    assert!(
        stderr.contains("LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT=\"soon\""),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn an_invalid_log_filter_exits_64() {
    let out = Command::new(bin_path("tandem-proxy"))
        .env_clear()
        .env("LINKERD2_PROXY_LOG", "=[")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("LINKERD2_PROXY_LOG"), "{stderr}");
}

#[test]
fn a_port_in_use_fails_with_one_line_naming_the_variable() {
    let mesh = Mesh::new(1);
    let pod = mesh.pod(0);
    let _taken = pod
        .run(|| std::net::TcpListener::bind("127.0.0.1:4140"))
        .unwrap();
    let mut cmd = Command::new(bin_path("tandem-proxy"));
    cmd.env_clear();
    let mut proxy = pod.spawn("tandem-proxy", cmd);
    let status = proxy.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(1));
    let output = proxy.output();
    assert_eq!(output.lines().count(), 1, "{output}");
    assert!(
        output.contains("cannot listen on 127.0.0.1:4140 (LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR)"),
        "{output}"
    );
}

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let mesh = Mesh::new(1);
    let mut proxy = Proxy::start(
        mesh.pod(0),
        &[
            ("LINKERD2_PROXY_LOG_FORMAT", "json"),
            ("LINKERD2_PROXY_LOG", "info"),
        ],
    );
    proxy.process.signal(libc::SIGTERM);
    assert!(proxy.process.wait_exit(PATIENCE).success());
    let output = proxy.process.output();
    let lines: Vec<&str> = output.lines().collect();
    assert!(lines.iter().any(|l| l.contains("proxy ready")), "{output}");
    for line in lines {
        let record: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            record["level"].is_string() && record["timestamp"].is_string(),
            "{line}"
        );
    }
}
