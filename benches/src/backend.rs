//! The benchmark's backends, run inside the server pod by `tandem-bench serve`.
//!
//! They share the machine's few cores with the proxies under measurement, so they stay
//! lean: one current-thread runtime, one buffer per connection, and responses written
//! from preformatted static bytes.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// An HTTP/1.1 keep-alive server answering every request with 200 and a 1 KiB body.
    #[arg(long)]
    pub http: Vec<SocketAddr>,
    /// A TCP echo server (the opaque scenarios: 1 KiB request, 1 KiB response).
    #[arg(long)]
    pub echo: Vec<SocketAddr>,
    /// A sink: reads to end of stream, then answers the byte count (the bulk scenario).
    #[arg(long)]
    pub sink: Vec<SocketAddr>,
    /// A server that speaks first: a banner line on accept, then it reads to end of
    /// stream (the server-first scenario of `tandem-bench idle`).
    #[arg(long)]
    pub banner: Vec<SocketAddr>,
}

/// Binds every listener, prints `ready` on stdout, then serves until killed.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.http.is_empty()
        && args.echo.is_empty()
        && args.sink.is_empty()
        && args.banner.is_empty()
    {
        anyhow::bail!("nothing to serve: give --http, --echo, --sink or --banner");
    }
    let listeners = Listeners::bind(&args)?;
    runtime_announcing_ready()?.block_on(serve_listeners(listeners))
}

/// A one-thread runtime (the backend and the relays share the machine's few cores
/// with what is measured), after printing `ready` on stdout. The orchestrator starts
/// the load as soon as it reads that line, so every listener must already be bound.
pub fn runtime_announcing_ready() -> anyhow::Result<tokio::runtime::Runtime> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready")
        .and_then(|()| stdout.flush())
        .context("announcing readiness on stdout")?;
    Ok(runtime)
}

pub const HTTP_BODY_LEN: usize = 1024;

const KEEP_ALIVE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nContent-Type: text/plain\r\n\r\n";
const CLOSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nContent-Type: text/plain\r\n\
Connection: close\r\n\r\n";

static KEEP_ALIVE_RESPONSE: [u8; KEEP_ALIVE_HEAD.len() + HTTP_BODY_LEN] = response(KEEP_ALIVE_HEAD);
static CLOSE_RESPONSE: [u8; CLOSE_HEAD.len() + HTTP_BODY_LEN] = response(CLOSE_HEAD);

const fn response<const LEN: usize>(head: &[u8]) -> [u8; LEN] {
    let mut bytes = [b'x'; LEN];
    let mut at = 0;
    while at < head.len() {
        bytes[at] = head[at];
        at += 1;
    }
    bytes[LEN - 1] = b'\n';
    bytes
}

/// Request heads larger than this are refused; the load generator's are tiny.
const HTTP_BUFFER_LEN: usize = 8 * 1024;
const ECHO_BUFFER_LEN: usize = 16 * 1024;
const SINK_BUFFER_LEN: usize = 256 * 1024;

/// Every backend listener, bound but not yet serving.
pub struct Listeners {
    pub http: Vec<std::net::TcpListener>,
    pub echo: Vec<std::net::TcpListener>,
    pub sink: Vec<std::net::TcpListener>,
    pub banner: Vec<std::net::TcpListener>,
}

impl Listeners {
    fn bind(args: &ServeArgs) -> anyhow::Result<Listeners> {
        let bind_all = |addrs: &[SocketAddr], role: &str| {
            addrs
                .iter()
                .map(|addr| {
                    // std sets SO_REUSEADDR on Unix, so a restarted backend rebinds at once.
                    std::net::TcpListener::bind(addr)
                        .with_context(|| format!("binding the {role} listener on {addr}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        };
        Ok(Listeners {
            http: bind_all(&args.http, "http")?,
            echo: bind_all(&args.echo, "echo")?,
            sink: bind_all(&args.sink, "sink")?,
            banner: bind_all(&args.banner, "banner")?,
        })
    }
}

#[derive(Clone, Copy)]
enum Role {
    Http,
    Echo,
    Sink,
    Banner,
}

/// Serves every listener on the current runtime until the process ends.
pub async fn serve_listeners(listeners: Listeners) -> anyhow::Result<()> {
    let roles = [
        (Role::Http, listeners.http),
        (Role::Echo, listeners.echo),
        (Role::Sink, listeners.sink),
        (Role::Banner, listeners.banner),
    ];
    let mut accept_loops = Vec::new();
    for (role, role_listeners) in roles {
        for listener in role_listeners {
            listener
                .set_nonblocking(true)
                .context("making a listener non-blocking")?;
            let listener = TcpListener::from_std(listener).context("registering a listener")?;
            accept_loops.push(tokio::spawn(accept_loop(listener, role)));
        }
    }
    for accept_loop in accept_loops {
        accept_loop.await.context("an accept loop panicked")?;
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, role: Role) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Running out of descriptors would otherwise spin this loop at full speed.
                eprintln!("tandem-bench serve: accept: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // A failed connection only costs that connection: the client sees it and counts
        // the error, so there is nothing to report here.
        tokio::spawn(async move {
            let _ = match role {
                Role::Http => serve_http(stream).await,
                Role::Echo => serve_echo(stream).await,
                Role::Sink => serve_sink(stream).await,
                Role::Banner => serve_banner(stream).await,
            };
        });
    }
}

/// What the head of one request asks of the connection.
struct RequestHead {
    body_len: u64,
    close_after: bool,
}

fn parse_request_head(bytes: &[u8]) -> io::Result<Option<(usize, RequestHead)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(io::Error::new(io::ErrorKind::InvalidData, error)),
    };
    // HTTP/1.0 closes unless asked to keep alive; HTTP/1.1 keeps alive unless asked to close.
    let mut close_after = request.version == Some(0);
    let mut body_len = 0;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(header.value)
                .ok()
                .and_then(|value| value.trim().parse().ok())
                .ok_or_else(|| invalid_data("bad content-length"))?;
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked bodies are never sent by the load generator; refusing them keeps
            // this server small.
            return Err(invalid_data("transfer-encoding is not supported"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            if has_token(header.value, "close") {
                close_after = true;
            } else if has_token(header.value, "keep-alive") {
                close_after = false;
            }
        }
    }
    Ok(Some((
        head_len,
        RequestHead {
            body_len,
            close_after,
        },
    )))
}

pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn invalid_data(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

async fn serve_http(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buffer = vec![0; HTTP_BUFFER_LEN];
    let (mut start, mut end) = (0, 0);
    // Only pipelined requests need their responses gathered into one write.
    let mut batch = Vec::new();
    let mut body_left = 0u64;
    let mut close_after = false;
    loop {
        let mut keep_alive_responses = 0;
        let mut closing = false;
        loop {
            if body_left > 0 {
                let skipped = body_left.min((end - start) as u64);
                start += skipped as usize;
                body_left -= skipped;
                if body_left > 0 {
                    break;
                }
            } else {
                let Some((head_len, head)) = parse_request_head(&buffer[start..end])? else {
                    break;
                };
                start += head_len;
                body_left = head.body_len;
                close_after = head.close_after;
                if body_left > 0 {
                    continue;
                }
            }
            // A request, body included, is complete.
            if close_after {
                closing = true;
                break;
            }
            keep_alive_responses += 1;
        }
        match (keep_alive_responses, closing) {
            (0, false) => {}
            (1, false) => stream.write_all(&KEEP_ALIVE_RESPONSE).await?,
            (0, true) => stream.write_all(&CLOSE_RESPONSE).await?,
            _ => {
                batch.clear();
                for _ in 0..keep_alive_responses {
                    batch.extend_from_slice(&KEEP_ALIVE_RESPONSE);
                }
                if closing {
                    batch.extend_from_slice(&CLOSE_RESPONSE);
                }
                stream.write_all(&batch).await?;
            }
        }
        if closing {
            return stream.shutdown().await;
        }
        buffer.copy_within(start..end, 0);
        end -= start;
        start = 0;
        if end == buffer.len() {
            return Err(invalid_data("request head too large"));
        }
        let read = stream.read(&mut buffer[end..]).await?;
        if read == 0 {
            return Ok(());
        }
        end += read;
    }
}

async fn serve_echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buffer = vec![0; ECHO_BUFFER_LEN];
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buffer[..read]).await?;
    }
}

async fn serve_sink(mut stream: TcpStream) -> io::Result<()> {
    let mut buffer = vec![0; SINK_BUFFER_LEN];
    let mut received = 0u64;
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        received += read as u64;
    }
    stream.write_all(&received.to_be_bytes()).await?;
    stream.shutdown().await
}

/// The banner a server-first backend writes on accept, as SMTP or MySQL would.
pub const BANNER: &[u8] = b"220 tandem-bench ready\r\n";

async fn serve_banner(mut stream: TcpStream) -> io::Result<()> {
    stream.write_all(BANNER).await?;
    let mut discard = [0u8; 1024];
    while stream.read(&mut discard).await? != 0 {}
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use std::io::Read;

    use super::*;

    /// The addresses of an in-process backend serving one listener of each kind.
    pub struct Backend {
        pub http: SocketAddr,
        pub echo: SocketAddr,
        pub sink: SocketAddr,
    }

    /// Starts a backend on its own thread; it lives until the test process exits.
    pub fn start_backend() -> Backend {
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listeners = Listeners {
            http: vec![bind()],
            echo: vec![bind()],
            sink: vec![bind()],
            banner: Vec::new(),
        };
        let local_addr = |listeners: &[std::net::TcpListener]| listeners[0].local_addr().unwrap();
        let backend = Backend {
            http: local_addr(&listeners.http),
            echo: local_addr(&listeners.echo),
            sink: local_addr(&listeners.sink),
        };
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(serve_listeners(listeners))
                .unwrap();
        });
        backend
    }

    fn connect(addr: SocketAddr) -> std::net::TcpStream {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    fn read_to_end(mut stream: std::net::TcpStream) -> Vec<u8> {
        let mut received = Vec::new();
        stream.read_to_end(&mut received).unwrap();
        received
    }

    #[test]
    fn static_responses_are_well_formed() {
        for (bytes, closes) in [
            (&KEEP_ALIVE_RESPONSE[..], false),
            (&CLOSE_RESPONSE[..], true),
        ] {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut response = httparse::Response::new(&mut headers);
            let head_len = response.parse(bytes).unwrap().unwrap();
            assert_eq!(response.code, Some(200));
            let header = |name: &str| {
                response
                    .headers
                    .iter()
                    .find(|header| header.name.eq_ignore_ascii_case(name))
                    .map(|header| header.value)
            };
            assert_eq!(header("content-length"), Some(&b"1024"[..]));
            assert_eq!(header("content-type"), Some(&b"text/plain"[..]));
            assert_eq!(header("connection").is_some(), closes);
            assert_eq!(bytes.len() - head_len, HTTP_BODY_LEN);
        }
    }

    #[test]
    fn http_answers_pipelined_split_requests_with_bodies_then_closes() {
        let backend = start_backend();
        let mut stream = connect(backend.http);
        let requests: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        // Split inside a request line, a header and a body.
        for piece in [
            &requests[..7],
            &requests[7..50],
            &requests[50..77],
            &requests[77..],
        ] {
            stream.write_all(piece).unwrap();
            stream.flush().unwrap();
        }
        let mut expected = KEEP_ALIVE_RESPONSE.repeat(2);
        expected.extend_from_slice(&CLOSE_RESPONSE);
        assert_eq!(read_to_end(stream), expected);
    }

    #[test]
    fn http_closes_on_chunked_requests() {
        let backend = start_backend();
        let mut stream = connect(backend.http);
        stream
            .write_all(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        assert!(read_to_end(stream).is_empty());
    }

    #[test]
    fn echo_returns_every_byte_then_ends() {
        let backend = start_backend();
        let mut stream = connect(backend.echo);
        // Small enough to sit in the socket buffers while nothing reads the echo yet.
        let sent: Vec<u8> = (0..50_000u32).map(|n| n as u8).collect();
        stream.write_all(&sent).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(read_to_end(stream), sent);
    }

    #[test]
    fn sink_answers_the_byte_count() {
        let backend = start_backend();
        let mut stream = connect(backend.sink);
        stream.write_all(&vec![7; 300_001]).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(read_to_end(stream), 300_001u64.to_be_bytes());
    }
}
