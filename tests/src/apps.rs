//! Stand-ins for applications: real sockets in a pod, driven by test code.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::Pod;

/// A listener bound in a pod before this returns, so a client can never race it.
/// The handler runs on the first accepted connection; `join` returns its result.
pub struct Server<T> {
    pub addr: SocketAddr,
    thread: JoinHandle<T>,
}

impl<T: Send + 'static> Server<T> {
    pub fn start(
        pod: &Pod,
        addr: SocketAddr,
        handler: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> Server<T> {
        let listener = pod
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("cannot listen on {addr} in pod {}: {e}", pod.name));
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(IO_LIMIT))
                .expect("read timeout");
            handler(stream)
        });
        Server { addr, thread }
    }

    /// Waits for the handler and returns its result (re-raising its panic).
    pub fn join(self) -> T {
        self.thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// Bounds every blocking read in tests, so a proxy bug shows up as a failure rather
/// than a hung suite. No test asserts on durations.
pub const IO_LIMIT: Duration = Duration::from_secs(60);

/// Connects from inside `pod`, as an application there would.
pub fn connect(pod: &Pod, addr: SocketAddr) -> TcpStream {
    let stream = pod
        .run(|| TcpStream::connect(addr))
        .unwrap_or_else(|e| panic!("cannot connect from pod {} to {addr}: {e}", pod.name));
    stream
        .set_read_timeout(Some(IO_LIMIT))
        .expect("read timeout");
    stream
}

/// One `read`, retried when interrupted. With a read timeout set, Linux returns
/// EINTR (rather than restarting) after the process was stopped or frozen and resumed,
/// which says nothing about the proxy under test.
pub fn read_some(stream: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads until the peer's end of stream.
pub fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut data = Vec::new();
    stream
        .read_to_end(&mut data)
        .expect("read to end of stream");
    data
}

/// Reads until `needle` has been seen, returning everything read.
pub fn read_until(stream: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    while !data.windows(needle.len()).any(|w| w == needle) {
        let n = read_some(stream, &mut chunk).expect("read");
        assert!(
            n > 0,
            "stream ended before {:?}; got {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&chunk[..n]);
    }
    data
}

/// Writes all of `data` and half-closes the write side.
pub fn send_and_finish(stream: &mut TcpStream, data: &[u8]) {
    stream.write_all(data).expect("write");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
}

/// A deterministic pseudo-random byte stream (xorshift), so both ends can generate
/// and check the same bytes without holding them.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Noise {
        Noise(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Checks that received bytes continue a [`Noise`] stream, across any read sizes.
pub struct NoiseCheck {
    noise: Noise,
    expected: Vec<u8>,
    used: usize,
    pub checked: usize,
}

impl NoiseCheck {
    pub fn new(seed: u64) -> NoiseCheck {
        NoiseCheck {
            noise: Noise::new(seed),
            expected: vec![0; 64 * 1024],
            used: 64 * 1024,
            checked: 0,
        }
    }

    /// Panics at the first byte that differs from the stream.
    pub fn check(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.used == self.expected.len() {
                self.noise.fill(&mut self.expected);
                self.used = 0;
            }
            let n = data.len().min(self.expected.len() - self.used);
            assert!(
                data[..n] == self.expected[self.used..self.used + n],
                "bytes differ near offset {}",
                self.checked
            );
            self.used += n;
            self.checked += n;
            data = &data[n..];
        }
    }
}

/// A server and a client TLS configuration for an application's own TLS (not the
/// mesh's): a self-signed certificate for `name` that only this client trusts.
pub fn app_tls(
    name: &str,
) -> (
    std::sync::Arc<rustls::ServerConfig>,
    std::sync::Arc<rustls::ClientConfig>,
) {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("certificate");
    let cert_der = cert.cert.der().clone();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key_der)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// Runs an application TLS exchange from `client_pod` to `server_addr` in
/// `server_pod`: both handshakes must succeed end to end and each side must receive
/// exactly what the other sent.
pub fn app_tls_exchange(
    client_pod: &Pod,
    server_pod: &Pod,
    server_addr: SocketAddr,
    listen: SocketAddr,
) {
    let (server_config, client_config) = app_tls("app.example");
    let server = Server::start(server_pod, listen, move |conn| {
        let tls = rustls::ServerConnection::new(server_config).expect("server connection");
        let mut stream = rustls::StreamOwned::new(tls, conn);
        let mut request = [0u8; 12];
        stream
            .read_exact(&mut request)
            .expect("read request over TLS");
        stream.write_all(b"secret reply").expect("write reply");
        stream.flush().expect("flush");
        request
    });
    let tls = rustls::ClientConnection::new(client_config, "app.example".try_into().expect("name"))
        .expect("client");
    let mut stream = rustls::StreamOwned::new(tls, connect(client_pod, server_addr));
    stream.write_all(b"secret hello").expect("write over TLS");
    let mut reply = [0u8; 12];
    stream.read_exact(&mut reply).expect("read reply over TLS");
    assert_eq!(&reply, b"secret reply");
    assert_eq!(&server.join(), b"secret hello");
}

/// Echoes every connection to `addr` in `pod`, each on its own thread, until the
/// test process ends: for tests that open an unknown number of connections.
pub fn serve_echo(pod: &Pod, addr: SocketAddr) {
    let listener = pod
        .run(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("cannot listen on {addr} in pod {}: {e}", pod.name));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(IO_LIMIT));
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = read_some(&mut conn, &mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// An HTTP application (HTTP/1 and HTTP/2, told apart by the preface) on `port` of
/// `pod`, answering every request with `answer(request)`, until the test process ends.
pub fn http_app(
    pod: &Pod,
    port: u16,
    answer: impl Fn(&hyper::Request<hyper::body::Incoming>) -> bytes::Bytes + Send + Sync + 'static,
) {
    let listener = pod
        .run(|| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))
        .unwrap_or_else(|e| panic!("cannot listen on {port} in pod {}: {e}", pod.name));
    listener.set_nonblocking(true).expect("nonblocking");
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let answer = answer.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let body = answer(&request);
                            async move {
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(body),
                                ))
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
    });
}
