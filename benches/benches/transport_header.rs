//! Linkerd's transport header: `TransportHeader::encode` and `TransportHeader::decode`.
//!
//! A client proxy encodes one header per opaque connection it sends to a meshed peer's
//! inbound port, and the server proxy decodes one per such connection before it can
//! forward a byte, so both sit on the per-connection hot path. Two headers are measured:
//! the one Tandem's outbound sends today (the target port only), and a full one with a
//! name and a session protocol, as Linkerd proxies may send (gateway / HTTP upgrade).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tandem_proxy::mesh::transport_header::{SessionProtocol, TransportHeader};

fn headers() -> [(&'static str, TransportHeader); 2] {
    [
        (
            "port_only",
            TransportHeader {
                port: 8080,
                name: None,
                protocol: None,
            },
        ),
        (
            "port_name_protocol",
            TransportHeader {
                port: 8080,
                name: Some("web.emojivoto.svc.cluster.local".to_string()),
                protocol: Some(SessionProtocol::Http2),
            },
        ),
    ]
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("transport_header/encode");
    for (name, header) in headers() {
        group.bench_function(name, |b| b.iter(|| black_box(&header).encode()));
    }
    group.finish();
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("transport_header/decode");
    for (name, header) in headers() {
        let bytes = header.encode();
        assert_eq!(
            TransportHeader::decode(&bytes),
            Ok(Some((header.clone(), bytes.len())))
        );
        group.bench_function(name, |b| {
            b.iter(|| TransportHeader::decode(black_box(&bytes)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_encode, bench_decode
}
criterion_main!(benches);
