//! With `TANDEM_OUTBOUND_OPAQUE_CARRIER`, meshed opaque connections between two Tandem
//! proxies ride one pooled carrier (an mTLS HTTP/2 connection to the peer's inbound
//! port, one stream per connection); a peer that takes no carrier (as a Linkerd
//! proxy) gets Linkerd's transport header.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use tandem_tests::apps::{
    connect, read_all, read_some, send_and_finish, Noise, NoiseCheck, Server, IO_LIMIT,
};
use tandem_tests::capture::{contains, Capture};
use tandem_tests::mesh::{env_refs, identity_of, MeshedPair};
use tandem_tests::probe::metric;
use tandem_tests::{wait_for_or, Pod, Proxy};

fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// Echoes `count` connections on `addr` in `pod`, each on its own thread, and returns
/// how many bytes each echoed.
fn echo_server(pod: &Pod, addr: SocketAddr, count: usize) -> JoinHandle<Vec<usize>> {
    let listener = pod
        .run(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
    std::thread::spawn(move || {
        let echoes: Vec<JoinHandle<usize>> = (0..count)
            .map(|_| {
                let (mut conn, _) = listener.accept().expect("accept");
                conn.set_read_timeout(Some(IO_LIMIT)).unwrap();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut total = 0;
                    loop {
                        let n = read_some(&mut conn, &mut buf).expect("read");
                        if n == 0 {
                            conn.shutdown(std::net::Shutdown::Write).unwrap();
                            return total;
                        }
                        conn.write_all(&buf[..n]).expect("write");
                        total += n;
                    }
                })
            })
            .collect();
        echoes.into_iter().map(|e| e.join().unwrap()).collect()
    })
}

/// Sends `size` bytes of noise seeded with `seed` and checks the echo, concurrently.
fn echo_noise(mut client: TcpStream, seed: u64, size: usize) {
    let mut writer = client.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut noise = Noise::new(seed);
        let mut chunk = vec![0u8; 32 * 1024];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            noise.fill(&mut chunk[..n]);
            writer.write_all(&chunk[..n]).expect("write");
            left -= n;
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut check = NoiseCheck::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = read_some(&mut client, &mut buf).expect("read the echo");
        if n == 0 {
            break;
        }
        check.check(&buf[..n]);
    }
    sender.join().unwrap();
    assert_eq!(
        check.checked, size,
        "echo of connection {seed} was cut short"
    );
}

const CARRIER: (&str, &str) = ("TANDEM_OUTBOUND_OPAQUE_CARRIER", "true");

/// The issuer, and alpha with carriers on, and beta (which accepts them by default).
fn start(world: &MeshedPair) -> (tandem_tests::Proc, Proxy<'_>, Proxy<'_>) {
    let (env_a, env_b) = (world.env(0, false, &[CARRIER]), world.env(1, false, &[]));
    let issuer = world.start_issuer(&[]);
    let a = Proxy::start(world.a(), &env_refs(&env_a));
    let b = Proxy::start(world.b(), &env_refs(&env_b));
    (issuer, a, b)
}

#[test]
fn opaque_connections_ride_one_carrier_intact_and_in_order() {
    let world = MeshedPair::new();
    let (_issuer, proxy_a, proxy_b) = start(&world);
    let (a, b) = (world.a(), world.b());
    let capture = Capture::start(b, "veth0");
    let sequential = 4;
    let concurrent = 6;
    let echo = echo_server(b, any(5432), sequential + concurrent);

    // One at a time first, so the first connection's carrier is there for the rest.
    for i in 0..sequential {
        let mut client = connect(a, world.b_addr(5432));
        let secret = format!("SECRET-CARRIED-{i}-7d1e");
        send_and_finish(&mut client, secret.as_bytes());
        assert_eq!(read_all(&mut client), secret.as_bytes());
    }
    // Then several at once, each with 1 MiB each way: no byte lost, changed, or
    // crossed into another connection's stream.
    let clients: Vec<_> = (0..concurrent)
        .map(|i| {
            let client = connect(a, world.b_addr(5432));
            std::thread::spawn(move || echo_noise(client, 100 + i as u64, 1 << 20))
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let echoed = echo.join().unwrap();
    assert_eq!(echoed.len(), sequential + concurrent);

    let streams = (sequential + concurrent) as f64;
    assert_one_carrier(&proxy_a, "outbound", streams);
    assert_one_carrier(&proxy_b, "inbound", streams);
    // Beta sees each carried connection under its real port, with alpha's identity.
    assert_carried_to(&proxy_b, ("target_port", "5432"), streams);

    let wire = capture.stop();
    assert!(
        !contains(&wire, b"SECRET-CARRIED-"),
        "opaque data crossed the wire in plaintext"
    );
}

/// Over IPv6 the carrier dials the peer's IPv6 inbound address and each stream names
/// an IPv6 target (`[2001:db8::2]:5432`), which beta forwards to its app over IPv6.
#[test]
fn carriers_work_over_ipv6() {
    let world = MeshedPair::new();
    let (a, b) = (world.a(), world.b());
    let dual_stack = [
        (
            "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS",
            "127.0.0.1:4140,[::1]:4140",
        ),
        ("LINKERD2_PROXY_INBOUND_LISTEN_ADDR", "[::]:4143"),
    ];
    let settings = |name: &str, peer: &Pod, peer_name: &str, carrier: bool| {
        let peer_addr = peer.ipv6.to_string();
        let mut env = world.domain.proxy_env_with(
            name,
            world.issuer_addr(),
            &[(&peer_addr, peer_name)],
            false,
        );
        let extra = dual_stack.iter().chain(carrier.then_some(&CARRIER));
        env.extend(extra.map(|(k, v)| (k.to_string(), v.to_string())));
        env
    };
    let (env_a, env_b) = (
        settings("alpha", b, "beta", true),
        settings("beta", a, "alpha", false),
    );
    let _issuer = world.start_issuer(&[]);
    let proxy_a = Proxy::start(a, &env_refs(&env_a));
    let proxy_b = Proxy::start(b, &env_refs(&env_b));

    let echo = echo_server(b, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 5432)), 2);
    for i in 0..2 {
        let mut client = connect(a, SocketAddr::from((b.ipv6, 5432)));
        let secret = format!("SIX-CARRIED-{i}");
        send_and_finish(&mut client, secret.as_bytes());
        assert_eq!(read_all(&mut client), secret.as_bytes());
    }
    assert_eq!(echo.join().unwrap().len(), 2);

    assert_one_carrier(&proxy_a, "outbound", 2.0);
    assert_carried_to(&proxy_b, ("target_addr", "[2001:db8::2]:5432"), 2.0);
}

#[test]
fn failures_cross_a_carrier_as_resets() {
    let world = MeshedPair::new();
    let (_issuer, _proxy_a, proxy_b) = start(&world);
    let (a, b) = (world.a(), world.b());

    // A first exchange opens the carrier, so the failures below all happen on it.
    let echo = echo_server(b, any(6379), 1);
    let mut client = connect(a, world.b_addr(6379));
    send_and_finish(&mut client, b"warm-up");
    assert_eq!(read_all(&mut client), b"warm-up");
    echo.join().unwrap();

    // Nothing listens on 3306 in beta: alpha's app learns it from a reset, as it
    // would without the mesh, never from a clean end of stream. Opaque traffic needs
    // no detection, so on a busy machine the reset can arrive before the app's own
    // `connect` call returns, which then reports it.
    let mut byte = [0u8; 1];
    let error = a
        .run(|| TcpStream::connect(world.b_addr(3306)))
        .and_then(|mut client| {
            client.set_read_timeout(Some(IO_LIMIT))?;
            read_some(&mut client, &mut byte)
        })
        .expect_err("a refused connection must fail");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");

    // The server resets: so does the client's connection.
    let server = Server::start(b, any(5432), |mut conn| {
        let mut got = [0u8; 5];
        conn.read_exact(&mut got).unwrap();
        socket2::SockRef::from(&conn)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(conn);
        got
    });
    let mut client = connect(a, world.b_addr(5432));
    client.write_all(b"hello").unwrap();
    assert_eq!(&server.join(), b"hello");
    let error = read_some(&mut client, &mut byte).expect_err("the server reset the connection");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");

    // The client resets: the server sees a reset too, not an end of stream.
    let server = Server::start(b, any(11211), |mut conn| {
        let mut got = [0u8; 5];
        conn.read_exact(&mut got).unwrap();
        conn.write_all(b"ready").unwrap();
        let mut rest = [0u8; 1];
        (got, conn.read(&mut rest).map_err(|e| e.kind()))
    });
    let mut client = connect(a, world.b_addr(11211));
    client.write_all(b"abort").unwrap();
    let mut ready = [0u8; 5];
    client.read_exact(&mut ready).unwrap();
    socket2::SockRef::from(&client)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(client);
    let (got, after) = server.join();
    assert_eq!(&got, b"abort");
    assert_eq!(after, Err(ErrorKind::ConnectionReset));

    // All of it went over the one carrier.
    let text = proxy_b.wait_metric(
        "tandem_carrier_streams_total",
        &[("direction", "inbound")],
        4.0,
    );
    assert_eq!(
        metric(&text, "tandem_carriers_total", &[("direction", "inbound")]),
        Some(1.0),
        "{text}"
    );
}

/// Beta with carriers turned off answers as a Linkerd proxy does: it selects only the
/// transport header. Alpha then sends each opaque connection the classic way, on the
/// very connection it offered the carrier on.
#[test]
fn a_peer_without_carriers_gets_the_transport_header() {
    let world = MeshedPair::new();
    let env_a = world.env(0, false, &[CARRIER]);
    let env_b = world.env(1, false, &[("TANDEM_INBOUND_OPAQUE_CARRIER", "false")]);
    let _issuer = world.start_issuer(&[]);
    let (a, b) = (world.a(), world.b());
    let proxy_a = Proxy::start(a, &env_refs(&env_a));
    let proxy_b = Proxy::start(b, &env_refs(&env_b));

    let count = 3;
    let echo = echo_server(b, any(5432), count);
    for i in 0..count {
        let mut client = connect(a, world.b_addr(5432));
        let message = format!("classic {i}");
        send_and_finish(&mut client, message.as_bytes());
        assert_eq!(read_all(&mut client), message.as_bytes());
    }
    echo.join().unwrap();

    // Each connection had its own mTLS connection to beta's inbound port.
    let direct = [
        ("direction", "outbound"),
        ("peer", "dst"),
        ("target_port", "4143"),
    ];
    let text = proxy_a.wait_metric("tcp_close_total", &direct, count as f64);
    assert_eq!(metric(&text, "tcp_open_total", &direct), Some(count as f64));
    for (proxy, direction) in [(&proxy_a, "outbound"), (&proxy_b, "inbound")] {
        let text = proxy.metrics();
        for name in ["tandem_carriers_total", "tandem_carrier_streams_total"] {
            assert_eq!(
                metric(&text, name, &[("direction", direction)]),
                Some(0.0),
                "{text}"
            );
        }
    }
}

/// Waits for `streams` carried connections in `direction`, and asserts that they all
/// rode one carrier.
fn assert_one_carrier(proxy: &Proxy<'_>, direction: &str, streams: f64) {
    let labels = [("direction", direction)];
    let text = proxy.wait_metric("tandem_carrier_streams_total", &labels, streams);
    assert_eq!(
        metric(&text, "tandem_carriers_total", &labels),
        Some(1.0),
        "{text}"
    );
}

/// Waits for beta to count `streams` carried connections to `target` (a
/// `target_port` or `target_addr` label), mTLS with alpha's identity.
fn assert_carried_to(beta: &Proxy<'_>, target: (&str, &str), streams: f64) {
    let alpha = identity_of("alpha");
    let carried = [
        ("direction", "inbound"),
        ("peer", "src"),
        target,
        ("tls", "true"),
        ("client_id", alpha.as_str()),
    ];
    beta.wait_metric("tcp_open_total", &carried, streams);
}

/// Asserts that `pod` soon has no TCP connection matching the `ss` filter: the
/// carrier was reset. Closed with a FIN instead, it would stay in FIN-WAIT-2 for
/// `tcp_fin_timeout` (a minute), since a frozen peer's kernel acknowledges the FIN but
/// its proxy never closes its end.
fn assert_no_connection(pod: &Pod, filter: &[&str], what: &str) {
    let mut args = vec!["-tnH", "state", "connected"];
    args.extend(filter);
    let mut left = String::new();
    let gone = wait_for_or(Duration::from_secs(5), || {
        left = pod.must("ss", &args);
        left.trim().is_empty().then_some(())
    });
    assert!(gone.is_some(), "{what} must be reset, but is left: {left}");
}

/// A proxy stopped with SIGSTOP until the guard is dropped (also when the test fails).
struct Frozen<'a>(&'a tandem_tests::Proc);

impl<'a> Frozen<'a> {
    fn freeze(process: &'a tandem_tests::Proc) -> Frozen<'a> {
        process.signal(libc::SIGSTOP);
        Frozen(process)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

/// A peer proxy that stops answering (frozen here; a lost node in production) sends
/// no FIN and its kernel still acknowledges, so only HTTP/2 PINGs notice. Each side
/// then closes the carrier: the streams on it fail at once instead of stalling
/// until TCP gives up, and the next connection gets a new carrier.
#[test]
fn a_peer_that_stops_answering_loses_its_carrier() {
    let world = MeshedPair::new();
    let quick = [
        // Short, so the test is quick; long enough that a busy machine never
        // misses an answer from a proxy that runs.
        ("TANDEM_OUTBOUND_HTTP2_KEEPALIVE_INTERVAL", "1s"),
        ("TANDEM_OUTBOUND_HTTP2_KEEPALIVE_TIMEOUT", "5s"),
        ("TANDEM_INBOUND_HTTP2_KEEPALIVE_INTERVAL", "1s"),
        ("TANDEM_INBOUND_HTTP2_KEEPALIVE_TIMEOUT", "5s"),
    ];
    let mut settings_a = vec![CARRIER];
    settings_a.extend(quick);
    let (env_a, env_b) = (
        world.env(0, false, &settings_a),
        world.env(1, false, &quick),
    );
    let _issuer = world.start_issuer(&[]);
    let proxy_a = Proxy::start(world.a(), &env_refs(&env_a));
    let proxy_b = Proxy::start(world.b(), &env_refs(&env_b));
    let (a, b) = (world.a(), world.b());
    let outbound = [("direction", "outbound")];

    // Beta stops answering while a carried connection is open: alpha's app gets a
    // reset, not a connection that hangs.
    let server = Server::start(b, any(6379), |mut conn| {
        let mut got = [0u8; 6];
        conn.read_exact(&mut got).unwrap();
        conn.write_all(&got).unwrap();
        // Whatever beta still delivers once it runs again, the connection ends.
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).map_err(|e| e.kind())
    });
    let mut client = connect(a, world.b_addr(6379));
    client.write_all(b"before").unwrap();
    let mut echoed = [0u8; 6];
    client.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"before");
    {
        let _frozen = Frozen::freeze(&proxy_b.process);
        client.write_all(b"during").unwrap();
        let mut byte = [0u8; 1];
        let error = read_some(&mut client, &mut byte)
            .expect_err("the carrier to a silent peer must fail its streams");
        assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
        let beta_inbound = format!("{}:4143", b.ipv4);
        assert_no_connection(a, &["dst", &beta_inbound], "alpha's carrier to beta");
    }
    drop(client);
    let ended = server.join();
    assert!(
        !matches!(ended, Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "the backend connection of a failed carrier stream must end, got {ended:?}"
    );
    let text = proxy_a.wait_metric("tandem_carriers_total", &outbound, 1.0);
    assert_eq!(
        metric(&text, "tandem_carrier_streams_total", &outbound),
        Some(1.0),
        "{text}"
    );

    // The next connection gets a new carrier and works.
    let server = Server::start(b, any(5432), |mut conn| {
        let mut got = [0u8; 5];
        conn.read_exact(&mut got).unwrap();
        conn.write_all(&got).unwrap();
        // Then alpha stops answering: beta closes the carrier and with it this
        // connection, instead of holding it open for an app that is gone.
        let mut rest = [0u8; 1];
        (got, conn.read(&mut rest).map_err(|e| e.kind()))
    });
    let mut client = connect(a, world.b_addr(5432));
    client.write_all(b"again").unwrap();
    let mut echoed = [0u8; 5];
    client.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"again");
    proxy_a.wait_metric("tandem_carriers_total", &outbound, 2.0);
    let (got, after) = {
        let _frozen = Frozen::freeze(&proxy_a.process);
        server.join()
    };
    assert_eq!(&got, b"again");
    assert!(
        matches!(after, Ok(0) | Err(ErrorKind::ConnectionReset)),
        "beta must end the backend connection of a silent carrier, got {after:?}"
    );
    // Only carriers reach beta's inbound port in this test.
    assert_no_connection(b, &["sport", "=", ":4143"], "beta's carrier from alpha");
}
