//! The steps every proxied connection takes, whichever direction it came from:
//! find where it was going, detect its protocol, (terminate or originate TLS),
//! connect, forward.
//!
//! `inbound.rs` and `outbound.rs` call these in the same order; only the decisions
//! that differ by direction live there.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::{DirectionConfig, PortSet};
use crate::detect::{self, Outcome, Protocol};
use crate::discovery::Discover;
use crate::identity::LocalIdentity;
use crate::metrics::{ConnError, DetectResult, DirectionMetrics, OpenConnection, Peer, TlsStatus};
use crate::tcp::{self, Side, Transport};
use crate::transport::{self, ConnectError};

/// What one direction of the proxy needs to handle a connection.
pub struct Context {
    pub config: DirectionConfig,
    /// Pooled HTTP connections to this direction's destinations.
    pub http: crate::http::client::Pools,
    pub metrics: Arc<DirectionMetrics>,
    pub discovery: Arc<dyn Discover>,
    /// The proxy's mesh identity, when it has one.
    pub identity: Option<Arc<LocalIdentity>>,
    pub require_identity: PortSet,
    pub require_tls: PortSet,
    /// Carriers to peer proxies for opaque connections (outbound).
    pub tunnels: crate::tunnel::Peers,
    /// Started when the proxy starts draining.
    pub drain: Arc<crate::drain::Drain>,
    /// Every accepted connection's task, and the tunnel an upgraded HTTP connection
    /// becomes: draining waits for all of them.
    pub connections: tokio_util::task::TaskTracker,
}

/// The accepted socket and where it was going.
pub struct Accepted {
    pub stream: TcpStream,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    /// The listener's address: an original destination equal to it was never redirected.
    pub local: SocketAddr,
}

/// Reads the original destination of a freshly accepted socket.
pub fn accept(ctx: &Context, stream: TcpStream, client: SocketAddr) -> Option<Accepted> {
    if let Err(error) = transport::set_options(&stream, ctx.config.accept) {
        debug!(%client, %error, "cannot set socket options");
    }
    let addrs = stream
        .local_addr()
        .and_then(|local| Ok((local, transport::original_dst(&stream)?)));
    match addrs {
        Ok((local, orig_dst)) => Some(Accepted {
            stream,
            client: transport::unmap(client),
            orig_dst,
            local: transport::unmap(local),
        }),
        Err(error) => {
            tracing::warn!(%client, %error, "no original destination; closing the connection");
            ctx.metrics.error(ConnError::OrigDst);
            None
        }
    }
}

/// Sniffs the first bytes of `io`. Returns the protocol (`Unknown` on timeout) and the
/// bytes to replay upstream, or `None` when the client failed.
pub async fn detect<I: AsyncRead + Unpin>(
    ctx: &Context,
    io: &mut I,
    client: SocketAddr,
) -> Option<(Protocol, Vec<u8>)> {
    match detect::detect(io, ctx.config.detect_timeout).await {
        Ok((outcome, prefix)) => {
            let result = match &outcome {
                Outcome::Detected(Protocol::Http1) => DetectResult::Http1,
                Outcome::Detected(Protocol::Http2) => DetectResult::Http2,
                Outcome::Detected(Protocol::Tls { .. }) => DetectResult::Tls,
                Outcome::Detected(Protocol::Unknown) => DetectResult::Unknown,
                Outcome::Timeout => DetectResult::Timeout,
            };
            ctx.metrics.detected(result);
            debug!(%client, ?outcome, "detected");
            match outcome {
                Outcome::Detected(protocol) => Some((protocol, prefix)),
                Outcome::Timeout => Some((Protocol::Unknown, prefix)),
            }
        }
        Err(error) => {
            debug!(%client, %error, "client failed during detection");
            ctx.metrics.error(ConnError::Detect);
            None
        }
    }
}

/// A client connection whose handling is decided, counted in the transport metrics
/// from here until it closes.
pub struct Client<C> {
    pub stream: C,
    pub addr: SocketAddr,
    pub metrics: OpenConnection,
}

/// Starts counting `stream` as an accepted connection for `orig_dst`. `already_read`
/// bytes were read from it during detection.
pub fn client<C>(
    ctx: &Context,
    stream: C,
    addr: SocketAddr,
    orig_dst: SocketAddr,
    tls: TlsStatus,
    already_read: usize,
) -> Client<C> {
    let metrics = ctx.metrics.transport.open(Peer::Src, orig_dst, tls);
    metrics.series().add_read(already_read);
    Client {
        stream,
        addr,
        metrics,
    }
}

impl<C: Transport> Client<C> {
    /// Refuses the connection: counts `error` and resets the client, so it learns of
    /// the failure as it would without a proxy.
    pub fn refuse(mut self, ctx: &Context, error: ConnError, errno: &'static str) {
        ctx.metrics.error(error);
        self.metrics.set_errno(errno);
        self.stream.reset_on_close();
    }
}

/// Connects to `target`, refusing the client when that fails.
pub async fn connect<C: Transport>(
    ctx: &Context,
    client: Client<C>,
    target: SocketAddr,
) -> Option<(Client<C>, TcpStream)> {
    match transport::connect(target, ctx.config.connect_timeout, ctx.config.connect).await {
        Ok(server) => Some((client, server)),
        Err(error) => {
            debug!(client = %client.addr, %target, %error, "cannot connect");
            let (counted, errno) = connect_failure(&error);
            client.refuse(ctx, counted, errno);
            None
        }
    }
}

/// What to count, and the errno label, for a failed connect.
pub fn connect_failure(error: &ConnectError) -> (ConnError, &'static str) {
    match error {
        ConnectError::Refused => (ConnError::ConnectRefused, "ECONNREFUSED"),
        ConnectError::TimedOut => (ConnError::ConnectTimeout, "ETIMEDOUT"),
        ConnectError::Other(e) => (ConnError::ConnectError, transport::errno_label(e)),
    }
}

/// A meshed connection this proxy opened.
pub type MeshTls = tokio_rustls::client::TlsStream<Replay<TcpStream>>;

/// What a meshed connection negotiates by ALPN.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MeshAlpn {
    /// Nothing: the peer's inbound detects what follows.
    None,
    /// Linkerd's transport header, which the peer must accept.
    TransportHeader,
    /// A Tandem carrier, or else the transport header (`tunnel.rs`).
    CarrierOrHeader,
}

/// Originates mesh TLS on `server` towards a peer that must prove `identity` (asking
/// for `sni`), negotiating `alpn`. Never falls back to plaintext: on any failure the client is
/// refused.
pub async fn originate_tls<C: Transport>(
    ctx: &Context,
    client: Client<C>,
    server: TcpStream,
    identity: &str,
    sni: &str,
    alpn: MeshAlpn,
) -> Option<(Client<C>, MeshTls)> {
    match mesh_tls(ctx, server, identity, sni, alpn).await {
        Ok(tls) => Some((client, tls)),
        Err((error, errno)) => {
            debug!(client = %client.addr, "refusing the client: no mesh TLS to its destination");
            client.refuse(ctx, error, errno);
            None
        }
    }
}

/// Mesh TLS towards a peer that must prove `identity` (see [`originate_tls`]). On
/// failure returns what to count and the errno label; the server socket is reset.
pub async fn mesh_tls(
    ctx: &Context,
    server: TcpStream,
    identity: &str,
    sni: &str,
    alpn: MeshAlpn,
) -> Result<MeshTls, (ConnError, &'static str)> {
    let Some(local) = &ctx.identity else {
        return Err((ConnError::TlsHandshake, "other"));
    };
    let configs = local.configs();
    let config = match alpn {
        MeshAlpn::None => &configs.client,
        MeshAlpn::TransportHeader => &configs.client_transport_header,
        MeshAlpn::CarrierOrHeader => &configs.client_tunnel,
    };
    let Ok(server_name) = ServerName::try_from(sni.to_string()) else {
        debug!(%identity, %sni, "not a valid TLS server name");
        return Err((ConnError::PeerIdentity, "other"));
    };
    let handshake = tokio_rustls::TlsConnector::from(config.clone())
        .connect(server_name, Replay::under_tls(Vec::new(), server));
    let tls = match tokio::time::timeout(
        ctx.config.connect_timeout.max(ctx.config.detect_timeout),
        handshake,
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            debug!(%identity, %error, "mesh TLS handshake failed");
            return Err((ConnError::TlsHandshake, transport::errno_label(&error)));
        }
        Err(_) => {
            debug!(%identity, "mesh TLS handshake timed out");
            return Err((ConnError::TlsHandshake, "ETIMEDOUT"));
        }
    };
    let session = tls.get_ref().1;
    if !crate::tls::names(session.peer_certificates(), identity) {
        debug!(expected = %identity, found = ?crate::tls::peer_identity(session.peer_certificates()), "peer identity mismatch");
        transport::reset_on_close(tls.get_ref().0.get_ref());
        return Err((ConnError::PeerIdentity, "other"));
    }
    let negotiated = session.alpn_protocol();
    let accepted = match alpn {
        MeshAlpn::None => true,
        MeshAlpn::TransportHeader => negotiated == Some(crate::transport_header::ALPN),
        MeshAlpn::CarrierOrHeader => {
            negotiated == Some(crate::transport_header::ALPN)
                || negotiated == Some(crate::tunnel::ALPN)
        }
    };
    if !accepted {
        debug!(%identity, "the peer did not accept the transport header");
        transport::reset_on_close(tls.get_ref().0.get_ref());
        return Err((ConnError::TransportHeader, "other"));
    }
    debug!(local = %configs.name, server = %identity, "meshed connection");
    Ok(tls)
}

/// Forwards the client's stream to `server` (writing `prefix` first), counting the
/// server side as a connection to `target` with `tls`.
pub async fn relay<C: Transport, S: Transport>(
    ctx: &Context,
    client: Client<C>,
    prefix: &[u8],
    server: S,
    target: SocketAddr,
    tls: TlsStatus,
) {
    let Client {
        stream,
        addr,
        metrics: mut src,
    } = client;
    let mut dst = ctx.metrics.transport.open(Peer::Dst, target, tls);
    let result = tcp::forward(
        Side {
            stream,
            series: src.series(),
        },
        prefix,
        Side {
            stream: server,
            series: dst.series(),
        },
    )
    .await;
    if let Err(failure) = result {
        debug!(client = %addr, %target, error = %failure.error, "forwarding failed");
        ctx.metrics.error(ConnError::Io);
        let errno = transport::errno_label(&failure.error);
        if failure.client_failed {
            src.set_errno(errno)
        } else {
            dst.set_errno(errno)
        }
    }
}

/// A socket that first yields bytes already read from it (during detection), so a
/// TLS server can read a ClientHello the detector consumed.
///
/// Under a TLS session it also reads ahead: rustls asks for at most 4 KiB per read,
/// so a 16 KiB record took five `recvfrom` calls. Once a read fills what rustls asked
/// for (more is likely waiting), reads go through a [`READ_AHEAD`] buffer instead,
/// one syscall for several records; after eight reads in a row that would have fitted
/// rustls's own buffer, the buffer is freed again. Request/response traffic of a few
/// KiB never engages it, so it costs neither a copy nor memory there.
pub struct Replay<T> {
    prefix: Vec<u8>,
    read: usize,
    read_ahead: Option<ReadAhead>,
    inner: T,
}

/// Bytes a TLS socket reads at once when it reads ahead: about two full records.
const READ_AHEAD: usize = 32 * 1024;

/// Read-ahead state: `buf` is allocated (non-empty) only while engaged.
#[derive(Default)]
struct ReadAhead {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Reads in a row that returned no more than the caller asked for.
    small_reads: u8,
}

impl<T> Replay<T> {
    /// Replays `prefix`, then reads `inner` directly: for readers with their own
    /// large buffers (hyper).
    pub fn new(prefix: Vec<u8>, inner: T) -> Replay<T> {
        Replay {
            prefix,
            read: 0,
            read_ahead: None,
            inner,
        }
    }

    /// Replays `prefix`, then reads ahead when the peer sends more than a TLS
    /// session asks for at once.
    pub fn under_tls(prefix: Vec<u8>, inner: T) -> Replay<T> {
        Replay {
            read_ahead: Some(ReadAhead::default()),
            ..Replay::new(prefix, inner)
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    #[cfg(test)]
    fn reading_ahead(&self) -> bool {
        self.read_ahead.as_ref().is_some_and(|a| !a.buf.is_empty())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.read < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.read);
            let start = this.read;
            buf.put_slice(&this.prefix[start..start + n]);
            this.read += n;
            if this.read == this.prefix.len() {
                this.prefix = Vec::new();
                this.read = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        match &mut this.read_ahead {
            None => std::pin::Pin::new(&mut this.inner).poll_read(cx, buf),
            Some(ahead) => ahead.poll_read(&mut this.inner, cx, buf),
        }
    }
}

impl ReadAhead {
    fn poll_read<T: AsyncRead + Unpin>(
        &mut self,
        inner: &mut T,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::{ready, Poll};
        let wanted = out.remaining();
        if self.start == self.end {
            if self.buf.is_empty() {
                // Not engaged: read straight into the caller's buffer.
                let before = out.filled().len();
                ready!(std::pin::Pin::new(inner).poll_read(cx, out))?;
                if wanted > 0 && out.filled().len() - before == wanted && wanted < READ_AHEAD {
                    self.buf = vec![0; READ_AHEAD].into_boxed_slice();
                    self.small_reads = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut into = tokio::io::ReadBuf::new(&mut self.buf);
            ready!(std::pin::Pin::new(inner).poll_read(cx, &mut into))?;
            let n = into.filled().len();
            (self.start, self.end) = (0, n);
            if n <= wanted {
                self.small_reads += 1;
            } else {
                self.small_reads = 0;
            }
        }
        let n = wanted.min(self.end - self.start);
        out.put_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        if self.start == self.end && self.small_reads >= 8 {
            self.buf = Box::default();
            (self.start, self.end) = (0, 0);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    // Without these, h2 and hyper see a stream that cannot gather writes and
    // split each body chunk over 1 KiB into two writes: two TLS records, two
    // segments, and often two wake-ups at the peer.
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Transport> Transport for Replay<T> {
    fn reset_on_close(&mut self) {
        self.inner.reset_on_close()
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;

    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{Replay, READ_AHEAD};

    /// Reads `len` bytes in 4 KiB reads, as rustls does.
    async fn read_as_tls_does(reader: &mut Replay<TcpStream>, len: usize) -> Vec<u8> {
        let mut received = Vec::with_capacity(len);
        let mut chunk = [0u8; 4096];
        while received.len() < len {
            let n = reader.read(&mut chunk).await.unwrap();
            assert_ne!(n, 0, "end of stream after {} bytes", received.len());
            received.extend_from_slice(&chunk[..n]);
        }
        received
    }

    /// A connected client socket and the server side of it, over loopback.
    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// A burst engages the read-ahead buffer without losing or reordering a byte,
    /// and small exchanges afterwards free it again.
    #[tokio::test]
    async fn tls_socket_reads_ahead_through_bursts_only() {
        let (mut writer, accepted) = loopback_pair().await;
        let mut reader = Replay::under_tls(b"hello".to_vec(), accepted);

        let burst: Vec<u8> = (0..4 * READ_AHEAD + 123).map(|i| (i % 251) as u8).collect();
        let mut expected = b"hello".to_vec();
        expected.extend_from_slice(&burst);
        // The first 8 KiB wait in the socket before the first read (loopback delivers
        // during the send), so that read fills what it asked for; the rest follows
        // while the reader reads.
        writer.write_all(&burst[..8192]).await.unwrap();
        let sending = tokio::spawn(async move {
            writer.write_all(&burst[8192..]).await.unwrap();
            writer
        });
        let received = read_as_tls_does(&mut reader, expected.len()).await;
        let mut writer = sending.await.unwrap();
        assert!(received == expected, "the burst arrived changed");
        assert!(reader.reading_ahead(), "a burst must engage read-ahead");

        for round in 0..8u8 {
            writer.write_all(&[round; 100]).await.unwrap();
            assert_eq!(read_as_tls_does(&mut reader, 100).await, vec![round; 100]);
        }
        assert!(
            !reader.reading_ahead(),
            "small exchanges must free the buffer"
        );

        drop(writer);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "end of stream passes through");
    }

    /// Request/response traffic never allocates the buffer.
    #[tokio::test]
    async fn tls_socket_reads_small_messages_directly() {
        let (mut writer, accepted) = loopback_pair().await;
        let mut reader = Replay::under_tls(Vec::new(), accepted);
        for round in 0..20u8 {
            writer.write_all(&[round; 1091]).await.unwrap();
            assert_eq!(read_as_tls_does(&mut reader, 1091).await, vec![round; 1091]);
            assert!(!reader.reading_ahead());
        }
    }

    /// A frame head and its body leave in one write; without vectored writes h2
    /// sends each body chunk over 1 KiB as two TLS records.
    #[tokio::test]
    async fn replay_gathers_writes() {
        let (client, mut reader) = loopback_pair().await;
        let mut writer = Replay::new(b"seen".to_vec(), client);

        assert!(writer.is_write_vectored());
        let written = writer
            .write_vectored(&[IoSlice::new(b"head"), IoSlice::new(b"body")])
            .await
            .unwrap();
        assert_eq!(written, 8, "both slices in one write");
        let mut received = [0u8; 8];
        reader.read_exact(&mut received).await.unwrap();
        assert_eq!(&received, b"headbody");
    }
}
