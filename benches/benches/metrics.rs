//! Metrics: encoding the `/metrics` text of a busy proxy, and the record operations.
//!
//! `Metrics::encode` runs once per Prometheus scrape (typically every 10 s per proxy,
//! on the admin runtime), so its cost scales with the number of series a busy proxy
//! holds: here 52 transport series (inbound and outbound, `src`/`dst`, meshed with peer
//! identities, unmeshed, loopback, opaque), each with opens, closes (some with an errno)
//! and bytes, plus 20 request series (authorities × targets) with several status
//! codes, gRPC statuses, a proxy error and full latency histograms. The scrape also
//! reads `/proc/self` for the process metrics, as it does in the proxy.
//!
//! The record operations are the per-connection and per-request hot path: opening and
//! closing a connection's transport series, looking up a connection's request series,
//! counting bytes, counting a detection result, and recording one request/response.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tandem_proxy::config::Config;
use tandem_proxy::http::errors::ErrorKind;
use tandem_proxy::http::metrics::{Outcome, SeriesHandle};
use tandem_proxy::mesh::tls::{NoTlsReason, TlsStatus};
use tandem_proxy::metrics::transport::{OpenConnection, Peer};
use tandem_proxy::metrics::Metrics;
use tandem_proxy::net::detect::DetectResult;
use tandem_proxy::net::error::Errno;

/// A deterministic xorshift generator, so every run builds the same registry.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn identity(service: &str, namespace: &str) -> TlsStatus {
    TlsStatus::Established(Some(Arc::from(format!(
        "{service}.{namespace}.serviceaccount.identity.linkerd.cluster.local"
    ))))
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a socket address")
}

/// A busy proxy's registry, and the handles a proxy holds while connections are open
/// (open connections keep their series from being evicted, as in the proxy).
struct Busy {
    metrics: Metrics,
    _open: Vec<OpenConnection>,
    requests: Vec<SeriesHandle>,
}

/// Opens `n` connections on one series, moves bytes on each, and closes all but the
/// last (some with an errno), which stays open.
fn connections(
    metrics: &Metrics,
    inbound: bool,
    peer: Peer,
    target: SocketAddr,
    tls: &TlsStatus,
    rng: &mut Rng,
    open: &mut Vec<OpenConnection>,
) {
    let direction = if inbound {
        &metrics.inbound
    } else {
        &metrics.outbound
    };
    let n = 5 + rng.below(200);
    for i in 0..n {
        let mut conn = direction.transport.open(peer, target, tls.clone());
        conn.series().add_read(200 + rng.below(1 << 20) as usize);
        conn.series().add_write(200 + rng.below(1 << 16) as usize);
        if i + 1 == n {
            open.push(conn);
        } else {
            if rng.below(20) == 0 {
                let errno = Errno::ALL[1 + rng.below(3) as usize];
                conn.set_errno(errno);
            }
            drop(conn);
        }
    }
}

/// Records requests on one request series: mostly 200s, with a few other statuses,
/// gRPC statuses and proxy errors, and latencies spread over the buckets.
fn requests(series: &SeriesHandle, grpc: bool, rng: &mut Rng) {
    for _ in 0..(50 + rng.below(500)) {
        series.request();
        let outcome = match (grpc, rng.below(100)) {
            (true, 0..=94) => Outcome::Status {
                status: 200,
                grpc: Some(0),
            },
            (true, 95..=97) => Outcome::Status {
                status: 200,
                grpc: Some(5),
            },
            (true, _) => Outcome::Status {
                status: 200,
                grpc: Some(14),
            },
            (false, 0..=84) => Outcome::Status {
                status: 200,
                grpc: None,
            },
            (false, 85..=89) => Outcome::Status {
                status: 201,
                grpc: None,
            },
            (false, 90..=95) => Outcome::Status {
                status: 404,
                grpc: None,
            },
            (false, 96..=98) => Outcome::Status {
                status: 503,
                grpc: None,
            },
            (false, _) => Outcome::Error(ErrorKind::ConnectRefused),
        };
        // Mostly a few milliseconds, with a long tail.
        let latency = Duration::from_micros(300 + rng.below(8_000) * (1 + rng.below(4) * 10));
        series.response(outcome, latency);
    }
}

fn busy() -> Busy {
    let config = Config::from_lookup(|_| None).expect("the default configuration");
    let metrics = Metrics::new(&config);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut open = Vec::new();
    let mut handles = Vec::new();

    // Inbound: this pod (10.42.1.7) serves two ports to six meshed client workloads and
    // some unmeshed clients, and forwards each port to the application over loopback.
    let clients = [
        "frontend",
        "checkout",
        "cart",
        "recommend",
        "ads",
        "shipping",
    ];
    for port in [8080, 9090] {
        let target = addr(&format!("10.42.1.7:{port}"));
        for client in clients {
            let tls = identity(client, "shop");
            connections(&metrics, true, Peer::Src, target, &tls, &mut rng, &mut open);
        }
        let unmeshed = TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote);
        connections(
            &metrics,
            true,
            Peer::Src,
            target,
            &unmeshed,
            &mut rng,
            &mut open,
        );
        let loopback = TlsStatus::NoIdentity(NoTlsReason::Loopback);
        connections(
            &metrics,
            true,
            Peer::Dst,
            target,
            &loopback,
            &mut rng,
            &mut open,
        );
    }

    // Outbound: fourteen meshed endpoints of seven services, three unmeshed endpoints
    // and one opaque-TLS destination, each as the accepted (src) and opened (dst) end.
    let services = [
        "catalog", "checkout", "cart", "payment", "currency", "email", "quote",
    ];
    let mut outbound_targets = Vec::new();
    for (i, service) in services.iter().enumerate() {
        for replica in 0..2 {
            let target = addr(&format!("10.42.{}.{}:8080", 2 + i, 10 + replica));
            outbound_targets.push((target, identity(service, "shop"), *service));
        }
    }
    for i in 0..3 {
        let target = addr(&format!("10.43.0.{}:5432", 20 + i));
        let tls = TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery);
        outbound_targets.push((target, tls, "postgres"));
    }
    outbound_targets.push((addr("203.0.113.40:443"), TlsStatus::Opaque, "api"));
    for (target, tls, _) in &outbound_targets {
        for peer in [Peer::Src, Peer::Dst] {
            connections(&metrics, false, peer, *target, tls, &mut rng, &mut open);
        }
    }

    // Requests: sixteen outbound (authority, endpoint) series for the meshed services,
    // two of them gRPC, and four inbound series for this pod's own authorities.
    for (target, tls, service) in outbound_targets.iter().take(14) {
        let authority = format!("{service}.shop.svc.cluster.local:8080");
        let series =
            metrics
                .outbound
                .http
                .series(Some(&authority), *target, tls, &Default::default());
        requests(&series, *service == "currency", &mut rng);
        handles.push(series);
    }
    for (target, tls, _) in outbound_targets.iter().take(2) {
        let authority = "catalog-canary.shop.svc.cluster.local:8080";
        let series =
            metrics
                .outbound
                .http
                .series(Some(authority), *target, tls, &Default::default());
        requests(&series, false, &mut rng);
        handles.push(series);
    }
    for (port, authority) in [
        (8080, "web.shop.svc.cluster.local:8080"),
        (8080, "web.shop:8080"),
        (9090, "web.shop.svc.cluster.local:9090"),
        (9090, "10.42.1.7:9090"),
    ] {
        let target = addr(&format!("10.42.1.7:{port}"));
        let tls = identity("frontend", "shop");
        let series =
            metrics
                .inbound
                .http
                .series(Some(authority), target, &tls, &Default::default());
        requests(&series, port == 9090, &mut rng);
        handles.push(series);
    }

    Busy {
        metrics,
        _open: open,
        requests: handles,
    }
}

fn bench_encode(c: &mut Criterion) {
    let busy = busy();
    let text = busy.metrics.encode();
    let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(count("tcp_open_total{"), 52, "transport series");
    assert_eq!(count("request_total{"), 20, "request series");
    eprintln!(
        "metrics text: {} bytes, {} lines ({} tcp_close_total, {} response_total samples)",
        text.len(),
        text.lines().count(),
        count("tcp_close_total{"),
        count("response_total{"),
    );
    let mut group = c.benchmark_group("metrics");
    // A scrape takes most of a millisecond: give it enough time for 100 samples.
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("encode_busy", |b| {
        b.iter(|| black_box(&busy.metrics).encode())
    });
    group.finish();
}

fn bench_record(c: &mut Criterion) {
    let busy = busy();
    let metrics = &busy.metrics;
    let mut group = c.benchmark_group("metrics/record");

    // Per request: count it, then its response and latency (lock-free atomics).
    let series = &busy.requests[0];
    group.bench_function("request_response", |b| {
        b.iter(|| {
            let series = black_box(series);
            series.request();
            series.response(
                Outcome::Status {
                    status: 200,
                    grpc: None,
                },
                black_box(Duration::from_micros(2_400)),
            );
        })
    });

    // Per read or write on a forwarded connection.
    let target = addr("10.42.2.10:8080");
    let tls = identity("catalog", "shop");
    let conn = metrics
        .outbound
        .transport
        .open(Peer::Dst, target, tls.clone());
    group.bench_function("add_read_bytes", |b| {
        b.iter(|| conn.series().add_read(black_box(16 * 1024)))
    });

    // Per connection: detection result, the transport series' open and close (a lock
    // and a lookup of an existing series), and the request series lookup.
    group.bench_function("detected", |b| {
        b.iter(|| metrics.outbound.detected(black_box(DetectResult::Http1)))
    });
    group.bench_function("connection_open_close", |b| {
        b.iter(|| {
            drop(
                metrics
                    .outbound
                    .transport
                    .open(Peer::Src, black_box(target), tls.clone()),
            )
        })
    });
    group.bench_function("request_series_lookup", |b| {
        b.iter(|| {
            metrics.outbound.http.series(
                Some(black_box("catalog.shop.svc.cluster.local:8080")),
                black_box(target),
                &tls,
                &Default::default(),
            )
        })
    });
    group.finish();
    drop(conn);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_encode, bench_record
}
criterion_main!(benches);
