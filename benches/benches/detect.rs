//! Protocol detection: `tandem_proxy::net::detect::classify` on the first bytes a client sends.
//!
//! Every connection on a port that is not opaque is classified before anything is
//! forwarded, and again after each read until a decision is made, so this sits on the
//! per-connection hot path and adds directly to connection-setup latency. The inputs
//! are realistic first reads: a TLS ClientHello with SNI and ALPN (written by rustls
//! itself, so its SNI is parsed for real), the HTTP/2 prior-knowledge preface with the
//! client's first SETTINGS and WINDOW_UPDATE frames, an HTTP/1.1 GET with typical
//! headers, 1 KiB of opaque binary, and a request line cut short (needs more bytes).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tandem_proxy::net::detect::{classify, Classification, Protocol};

const SNI: &str = "web.emojivoto.svc.cluster.local";

/// The first flight of a rustls client offering h2 and http/1.1 to [`SNI`].
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = SNI.try_into().expect("a valid DNS name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("a client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("writing to a Vec");
    out
}

/// An HTTP/2 frame header: 24-bit length, type, flags, stream id 0.
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 0];
    out.extend_from_slice(payload);
    out
}

/// The prior-knowledge preface followed by what an h2 client sends next: SETTINGS
/// (ENABLE_PUSH=0, INITIAL_WINDOW_SIZE=4 MiB, MAX_HEADER_LIST_SIZE=16 KiB) and a
/// connection WINDOW_UPDATE.
fn http2_preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let mut settings = Vec::new();
    for (id, value) in [(0x2u16, 0u32), (0x4, 4 << 20), (0x6, 16 << 10)] {
        settings.extend_from_slice(&id.to_be_bytes());
        settings.extend_from_slice(&value.to_be_bytes());
    }
    out.extend_from_slice(&frame(0x4, &settings));
    out.extend_from_slice(&frame(0x8, &(5u32 << 20).to_be_bytes()));
    out
}

const HTTP1_GET: &[u8] = b"GET /api/v1/users/12345/orders?limit=20&sort=desc HTTP/1.1\r\n\
Host: orders.shop.svc.cluster.local:8080\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.c2lnbmF0dXJl\r\n\
X-Request-Id: 0f8fad5b-d9cb-469f-a165-70867728950e\r\n\
Connection: keep-alive\r\n\
\r\n";

/// A request line the client has not finished sending.
const HTTP1_PARTIAL: &[u8] = b"GET /api/v1/users/12345/orders?limit=20&sort=desc HTT";

/// 1 KiB of deterministic pseudo-random bytes (xorshift), as an opaque binary
/// protocol's first write; the first byte is neither a TLS record nor a letter.
fn opaque_payload() -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out: Vec<u8> = (0..1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    out[0] = 0x00;
    out
}

fn bench_classify(c: &mut Criterion) {
    let hello = client_hello();
    let cases: [(&str, Vec<u8>, Classification); 5] = [
        (
            "tls_client_hello_sni",
            hello,
            Classification::Found(Protocol::Tls {
                sni: Some(SNI.to_string()),
            }),
        ),
        (
            "http2_preface_settings",
            http2_preface(),
            Classification::Found(Protocol::Http2),
        ),
        (
            "http1_get",
            HTTP1_GET.to_vec(),
            Classification::Found(Protocol::Http1),
        ),
        (
            "opaque_1k",
            opaque_payload(),
            Classification::Found(Protocol::Unknown),
        ),
        (
            "http1_partial_line",
            HTTP1_PARTIAL.to_vec(),
            Classification::NeedMore,
        ),
    ];
    let mut group = c.benchmark_group("classify");
    for (name, input, expected) in &cases {
        // A benchmark of the wrong branch would measure nothing useful.
        assert_eq!(&classify(input), expected, "{name}");
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_function(*name, |b| b.iter(|| classify(black_box(input))));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_classify
}
criterion_main!(benches);
