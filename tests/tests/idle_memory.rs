//! Idle connections cost the proxies little memory: a connection waiting for its
//! first bytes holds no detection buffer, and a forwarded connection with nothing in
//! flight holds no copy buffers. Hundreds of idle connections are held through the
//! meshed pair and each proxy's resident memory per connection, read from `/proc`,
//! must stay under a bound: generous, so that it is not a measurement, yet below
//! what eager buffers cost, so that they cannot come back unnoticed. The figures for
//! ten thousand connections are `tandem-bench idle`'s (benches/RESULTS.md).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tandem_tests::apps::{connect, serve_echo};
use tandem_tests::mesh::{env_refs, MeshedPair};
use tandem_tests::{wait_for, Proxy, PATIENCE};

const CONNECTIONS: usize = 400;
/// Detected, and never spoken on here.
const SILENT_PORT: u16 = 7180;
/// Opaque by default: forwarded as bytes.
const ECHO_PORT: u16 = 6379;
/// KiB per connection: eager buffers cost more than twice these in a debug build,
/// the build the tests run.
const BOUND_WAITING_KIB: f64 = 4.0;
const BOUND_FORWARDED_KIB: f64 = 20.0;

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the proxy's descriptors")
        .count()
}

/// Waits until `proxy` holds at least `count` descriptors (its connections are
/// accepted, or forwarded, once they are). The baseline was read just after the
/// warm-up's connection was closed, when the proxy may still have held its two
/// descriptors.
fn wait_descriptors(proxy: &Proxy<'_>, count: usize) {
    let count = count - 2;
    let pid = proxy.process.pid();
    wait_for(
        &format!(
            "the proxy in {} to hold {count} descriptors",
            proxy.pod.name
        ),
        PATIENCE,
        || (descriptors(pid) >= count).then_some(()),
    );
}

/// Memory per connection over `before`, in KiB.
fn kib_per_connection(pid: u32, before: u64) -> f64 {
    (rss(pid).saturating_sub(before)) as f64 / 1024.0 / CONNECTIONS as f64
}

/// Each test holds its connections and its echo server's ends in this process, and
/// each proxy two descriptors per connection: the soft limit goes up to the hard one
/// (a machine whose soft limit is 1,024 would otherwise run out); the proxies
/// inherit it.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let needed = 4 * CONNECTIONS as u64 + 1024;
    assert!(
        limit.rlim_cur >= needed,
        "the descriptor limit is {}; this test needs {needed}",
        limit.rlim_cur
    );
}

fn start_pair(world: &MeshedPair) -> (Proxy<'_>, Proxy<'_>) {
    raise_descriptor_limit();
    // The server-first window off and long detection timeouts: silent connections
    // stay waiting for detection for the whole test.
    let settings = [
        ("TANDEM_OUTBOUND_SERVER_FIRST_WINDOW", "0"),
        ("TANDEM_INBOUND_SERVER_FIRST_WINDOW", "0"),
        ("LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT", "120s"),
        ("LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT", "120s"),
    ];
    let (env_a, env_b) = (world.env(0, true, &settings), world.env(1, true, &settings));
    let client_side = Proxy::start(world.a(), &env_refs(&env_a));
    let server_side = Proxy::start(world.b(), &env_refs(&env_b));
    (client_side, server_side)
}

/// One echo exchange through the pair first: certificates, the first connection
/// between the proxies, and the buffers of a first connection are then part of the
/// baseline rather than of the measured connections.
fn warm_up(world: &MeshedPair) {
    let mut stream = connect(world.a(), world.b_addr(ECHO_PORT));
    exchange(&mut stream);
}

fn exchange(stream: &mut TcpStream) {
    let message = [0x5a_u8; 1024];
    stream.write_all(&message).expect("send through the mesh");
    let mut back = [0u8; 1024];
    stream.read_exact(&mut back).expect("read the echo");
    assert_eq!(back, message, "the echo came back altered");
}

#[test]
fn connections_waiting_for_detection_hold_no_buffers() {
    tandem_tests::require_root();
    let world = MeshedPair::new();
    let _issuer = world.start_issuer(&[]);
    serve_echo(world.b(), SocketAddr::from(([0, 0, 0, 0], ECHO_PORT)));
    let (client_side, _server_side) = start_pair(&world);
    warm_up(&world);
    let pid = client_side.process.pid();
    let (before, idle_descriptors) = (rss(pid), descriptors(pid));

    let target = world.b_addr(SILENT_PORT);
    let held: Vec<TcpStream> = world
        .a()
        .run(|| {
            (0..CONNECTIONS)
                .map(|_| TcpStream::connect(target))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .expect("connect to a silent port");
    wait_descriptors(&client_side, idle_descriptors + CONNECTIONS);

    let per_connection = kib_per_connection(pid, before);
    eprintln!("{per_connection:.1} KiB per connection waiting for detection");
    // Eagerly, each held a detection buffer and a task sized for its largest plan.
    assert!(
        per_connection < BOUND_WAITING_KIB,
        "{per_connection:.1} KiB per connection waiting for detection"
    );
    drop(held);
}

#[test]
fn forwarded_connections_with_nothing_in_flight_hold_no_buffers() {
    tandem_tests::require_root();
    let world = MeshedPair::new();
    let _issuer = world.start_issuer(&[]);
    serve_echo(world.b(), SocketAddr::from(([0, 0, 0, 0], ECHO_PORT)));
    let (client_side, server_side) = start_pair(&world);
    warm_up(&world);
    let proxies = [&client_side, &server_side];
    let before = proxies.map(|p| (rss(p.process.pid()), descriptors(p.process.pid())));

    let target = world.b_addr(ECHO_PORT);
    let held: Vec<TcpStream> = world.a().run(|| {
        (0..CONNECTIONS)
            .map(|_| {
                let mut stream = TcpStream::connect(target).expect("connect to the echo port");
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                exchange(&mut stream);
                stream
            })
            .collect()
    });
    // Two descriptors per connection in each: the client's and the one to the peer,
    // the peer's and the application's.
    for (proxy, (_, descriptors)) in proxies.iter().zip(before) {
        wait_descriptors(proxy, descriptors + 2 * CONNECTIONS);
    }

    for (proxy, (rss_before, _)) in proxies.iter().zip(before) {
        let per_connection = kib_per_connection(proxy.process.pid(), rss_before);
        eprintln!(
            "{per_connection:.1} KiB per idle forwarded connection in {}",
            proxy.pod.name
        );
        // Eagerly, each direction kept a copy buffer that its kilobyte had written to.
        assert!(
            per_connection < BOUND_FORWARDED_KIB,
            "{per_connection:.1} KiB per idle forwarded connection in {}",
            proxy.pod.name
        );
    }
    drop(held);
}
