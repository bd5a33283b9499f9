//! Protocol detection: what is the client speaking?
//!
//! The proxy reads the client's first bytes into a bounded buffer and classifies them
//! as a TLS ClientHello (with its SNI), the HTTP/2 prior-knowledge preface, an HTTP/1.x
//! request line, or something else. The bytes read are returned to the caller, which
//! replays them upstream unchanged: detection never loses or alters a byte.
//!
//! [`classify`] is pure (and fuzzed); [`detect`] does the I/O with the timeout.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The most bytes detection will hold. A client that sends this much without being
/// recognised is forwarded as opaque TCP, so garbage cannot grow memory without bound.
/// It fits the largest TLS record (16 KiB + header) that can carry a ClientHello.
pub const DETECT_LIMIT: usize = 16 * 1024 + 5;

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the client's first bytes say it speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A TLS ClientHello; `sni` is its server name, when it carries one we could read.
    Tls {
        sni: Option<String>,
    },
    Unknown,
}

/// The result of classifying a buffer that may still be incomplete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Classification {
    Found(Protocol),
    /// The bytes so far are a valid start of some protocol: read more.
    NeedMore,
}

/// How detection of one connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Detected(Protocol),
    /// No decision within the timeout (the client may be waiting for the server to
    /// speak first). The connection falls back to raw TCP.
    Timeout,
}

/// What detection concluded for one connection, the `result` label of
/// `tandem_protocol_detect_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectResult {
    Http1,
    Http2,
    Tls,
    Unknown,
    Timeout,
    /// The port is opaque: detection was not attempted.
    Skipped,
    /// The client was silent and the server spoke first.
    ServerFirst,
}

impl DetectResult {
    pub const ALL: [DetectResult; 7] = [
        Self::Http1,
        Self::Http2,
        Self::Tls,
        Self::Unknown,
        Self::Timeout,
        Self::Skipped,
        Self::ServerFirst,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "http/1",
            Self::Http2 => "http/2",
            Self::Tls => "tls",
            Self::Unknown => "unknown",
            Self::Timeout => "timeout",
            Self::Skipped => "opaque_port",
            Self::ServerFirst => "server_first",
        }
    }

    pub fn of(outcome: &Outcome) -> DetectResult {
        match outcome {
            Outcome::Detected(Protocol::Http1) => DetectResult::Http1,
            Outcome::Detected(Protocol::Http2) => DetectResult::Http2,
            Outcome::Detected(Protocol::Tls { .. }) => DetectResult::Tls,
            Outcome::Detected(Protocol::Unknown) => DetectResult::Unknown,
            Outcome::Timeout => DetectResult::Timeout,
        }
    }
}

/// Classifies the first bytes of a stream.
pub fn classify(buf: &[u8]) -> Classification {
    use Classification::*;
    match buf.first() {
        None => NeedMore,
        Some(0x16) => classify_tls(buf),
        Some(_) if buf.starts_with(HTTP2_PREFACE) => Found(Protocol::Http2),
        Some(_) if HTTP2_PREFACE.starts_with(buf) => NeedMore,
        Some(_) => classify_http1(buf),
    }
}

/// A TLS record starts with content type 0x16 (handshake) and major version 3. The
/// ClientHello must fit in the first record, which every mainstream client does; one
/// split across records is still TLS, only without a readable SNI.
fn classify_tls(buf: &[u8]) -> Classification {
    use Classification::*;
    if buf.len() >= 2 && buf[1] != 0x03 {
        return classify_http1(buf);
    }
    if buf.len() < 6 {
        return NeedMore;
    }
    if buf[5] != 0x01 {
        // A handshake record that is not a ClientHello cannot open a connection.
        return Found(Protocol::Unknown);
    }
    let record_len = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < record_len {
        return if record_len <= DETECT_LIMIT {
            NeedMore
        } else {
            Found(Protocol::Tls { sni: None })
        };
    }
    Found(Protocol::Tls {
        sni: read_sni(&buf[..record_len]),
    })
}

/// Reads the SNI with rustls' own ClientHello parser rather than a hand-written one.
fn read_sni(record: &[u8]) -> Option<String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = record;
    while !input.is_empty() {
        match acceptor.read_tls(&mut input) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted
            .client_hello()
            .server_name()
            .map(str::to_ascii_lowercase),
        _ => None,
    }
}

/// An HTTP/1 request line (`METHOD target HTTP/1.x`) must be complete before we call it
/// HTTP, so that a binary protocol whose first bytes happen to be letters is not
/// mistaken for HTTP. Only the first line is judged, so the decision cannot depend on
/// how the client's bytes were split into reads.
fn classify_http1(buf: &[u8]) -> Classification {
    use Classification::*;
    let line_end = buf.iter().position(|b| *b == b'\n');
    let line = line_end.map_or(buf, |end| &buf[..=end]);
    let mut request = httparse::Request::new(&mut []);
    match (request.parse(line), line_end) {
        (Ok(_), Some(_)) if request.version.is_some() => Found(Protocol::Http1),
        (Ok(httparse::Status::Partial), None) if buf.len() < DETECT_LIMIT => NeedMore,
        _ => Found(Protocol::Unknown),
    }
}

/// Whether the client sends something (or closes) within `window`: a silent client
/// may be waiting for a server that speaks first.
pub async fn speaks_within(
    stream: &tokio::net::TcpStream,
    window: Duration,
) -> std::io::Result<bool> {
    match tokio::time::timeout(window, speaks(stream)).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(error)) => Err(error),
        Err(_elapsed) => Ok(false),
    }
}

/// Returns once the client has sent something (or closed), consuming nothing. A
/// peek rather than a readiness check: readiness may be reported spuriously.
pub async fn speaks(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    stream.peek(&mut [0u8; 1]).await.map(|_| ())
}

/// Which side of a silent client's connection, given to the server, speaks first:
/// `None` the client (nothing is consumed from it), `Some` the server, with its first
/// bytes (none: it closed).
pub async fn first_to_speak<S: AsyncRead + Unpin>(
    client: &tokio::net::TcpStream,
    server: &mut S,
) -> std::io::Result<Option<Vec<u8>>> {
    tokio::select! {
        ready = speaks(client) => ready.map(|()| None),
        read = first_bytes(server, FIRST_READ) => read.map(Some),
    }
}

/// Reads from `io` until the protocol is known, the buffer limit is reached, the
/// client closes, or `timeout` passes. Returns the outcome and every byte read.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> std::io::Result<(Outcome, Vec<u8>)> {
    let mut buf = Vec::new();
    let read_until_known = async {
        // Nothing is allocated for a connection until its first bytes arrive: a
        // flood of connections that send nothing costs only their tasks.
        buf = first_bytes(&mut *io, FIRST_READ).await?;
        loop {
            if buf.is_empty() {
                // The client finished sending before we could tell; forward what it sent.
                return Ok(Protocol::Unknown);
            }
            match classify(&buf) {
                Classification::Found(protocol) => return Ok(protocol),
                Classification::NeedMore if buf.len() >= DETECT_LIMIT => {
                    return Ok(Protocol::Unknown)
                }
                Classification::NeedMore => {}
            }
            if buf.len() == buf.capacity() {
                buf.reserve((buf.capacity() * 2).min(DETECT_LIMIT) - buf.len());
            }
            let spare = DETECT_LIMIT - buf.len();
            if (&mut *io).take(spare as u64).read_buf(&mut buf).await? == 0 {
                return Ok(Protocol::Unknown);
            }
        }
    };
    let outcome = match tokio::time::timeout(timeout, read_until_known).await {
        Ok(Ok(protocol)) => Outcome::Detected(protocol),
        Ok(Err(error)) => return Err(error),
        Err(_elapsed) => Outcome::Timeout,
    };
    Ok((outcome, buf))
}

/// How much detection reads at first: every request line and ClientHello seen in
/// practice fits, and a buffer of this size is a small allocation.
const FIRST_READ: usize = 1024;

/// The first read of a stream, into a buffer allocated only once there is something
/// to keep: the read goes to the stack, and only what arrived is copied out. Empty
/// at end of stream.
async fn first_bytes<I: AsyncRead + Unpin>(io: &mut I, at_most: usize) -> std::io::Result<Vec<u8>> {
    std::future::poll_fn(|cx| {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut read = tokio::io::ReadBuf::uninit(&mut stack[..at_most.min(FIRST_READ)]);
        std::task::ready!(std::pin::Pin::new(&mut *io).poll_read(cx, &mut read))?;
        let mut bytes = Vec::with_capacity(at_most.min(FIRST_READ));
        bytes.extend_from_slice(read.filled());
        std::task::Poll::Ready(Ok(bytes))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::Classification::*;
    use super::*;

    fn found(p: Protocol) -> Classification {
        Found(p)
    }

    /// A real ClientHello, produced by rustls itself, for the given server name.
    fn client_hello(server_name: &str) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = server_name.to_string().try_into().unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn http1_request_lines() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            found(Protocol::Http1)
        );
        assert_eq!(classify(b"POST /x HTTP/1.0\r\n"), found(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1\n"), found(Protocol::Http1));
        assert_eq!(
            classify(b"CONNECT a:443 HTTP/1.1\r\n"),
            found(Protocol::Http1)
        );
        // Too few headers slots is still HTTP.
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nA: b\r\nC: d\r\n"),
            found(Protocol::Http1)
        );
    }

    #[test]
    fn incomplete_request_line_waits() {
        assert_eq!(classify(b"GET"), NeedMore);
        assert_eq!(classify(b"GET /index.html HTT"), NeedMore);
        // The version is parsed but the line is not finished: its end decides.
        assert_eq!(classify(b"PRI * HTTP/1.0\r"), NeedMore);
        assert_eq!(classify(b"PRI * HTTP/1.0\rT"), found(Protocol::Unknown));
    }

    #[test]
    fn not_http() {
        assert_eq!(
            classify(b"SSH-2.0-OpenSSH_9.2\r\n"),
            found(Protocol::Unknown)
        );
        assert_eq!(classify(b"\x00\x01\x02"), found(Protocol::Unknown));
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), found(Protocol::Unknown));
        assert_eq!(classify(b"hello world\n"), found(Protocol::Unknown));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), found(Protocol::Unknown));
    }

    #[test]
    fn http2_preface_split_one_byte_at_a_time() {
        for end in 1..HTTP2_PREFACE.len() {
            assert_eq!(
                classify(&HTTP2_PREFACE[..end]),
                NeedMore,
                "after {end} bytes"
            );
        }
        assert_eq!(classify(HTTP2_PREFACE), found(Protocol::Http2));
        let mut with_frames = HTTP2_PREFACE.to_vec();
        with_frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(classify(&with_frames), found(Protocol::Http2));
    }

    #[test]
    fn tls_client_hello_with_sni() {
        let hello = client_hello("Web.Example.COM");
        assert_eq!(
            classify(&hello),
            found(Protocol::Tls {
                sni: Some("web.example.com".into())
            })
        );
        for end in 1..hello.len() {
            assert_eq!(classify(&hello[..end]), NeedMore, "after {end} bytes");
        }
    }

    #[test]
    fn tls_without_sni() {
        // rustls omits SNI for IP addresses.
        let hello = client_hello("192.0.2.1");
        assert_eq!(classify(&hello), found(Protocol::Tls { sni: None }));
    }

    #[test]
    fn tls_garbage_after_record_header() {
        let mut record = vec![0x16, 0x03, 0x01, 0x00, 0x08, 0x01];
        record.extend_from_slice(&[0xff; 8]);
        assert_eq!(classify(&record[..13]), found(Protocol::Tls { sni: None }));
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x08, 0x02]),
            found(Protocol::Unknown)
        );
        assert_eq!(classify(&[0x16, 0x99]), found(Protocol::Unknown));
    }

    #[test]
    fn oversized_tls_record_is_not_buffered() {
        // Claims a 65535-byte record: more than the limit, so it is decided at once.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0xff, 0xff, 0x01]),
            found(Protocol::Tls { sni: None })
        );
    }

    #[tokio::test]
    async fn detect_reads_split_preface_and_keeps_every_byte() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for byte in HTTP2_PREFACE {
                client.write_all(&[*byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.write_all(b"rest").await.unwrap();
            client
        });
        let (outcome, bytes) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(outcome, Outcome::Detected(Protocol::Http2));
        assert!(bytes.starts_with(HTTP2_PREFACE));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn oversized_input_stops_at_the_limit() {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        // A request line that never ends.
        let mut endless = b"GET /".to_vec();
        endless.resize(DETECT_LIMIT * 3, b'a');
        use tokio::io::AsyncWriteExt;
        client.write_all(&endless).await.unwrap();
        let (outcome, bytes) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(outcome, Outcome::Detected(Protocol::Unknown));
        assert_eq!(bytes.len(), DETECT_LIMIT);
        assert_eq!(bytes[..], endless[..DETECT_LIMIT]);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_times_out_with_partial_bytes_kept() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client.write_all(b"GE").await.unwrap();
        let (outcome, bytes) = detect(&mut server, Duration::from_secs(10)).await.unwrap();
        assert_eq!(outcome, Outcome::Timeout);
        assert_eq!(bytes, b"GE");
    }

    #[tokio::test]
    async fn early_close_forwards_what_was_sent() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client.write_all(b"GE").await.unwrap();
        drop(client);
        let (outcome, bytes) = detect(&mut server, Duration::from_secs(10)).await.unwrap();
        assert_eq!(outcome, Outcome::Detected(Protocol::Unknown));
        assert_eq!(bytes, b"GE");
    }
}
