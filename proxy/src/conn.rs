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
    /// Cancelled when the proxy starts draining.
    pub shutdown: tokio_util::sync::CancellationToken,
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
    if let Err(error) = transport::set_options(&stream, ctx.config.accept_keepalive) {
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
    match transport::connect(
        target,
        ctx.config.connect_timeout,
        ctx.config.connect_keepalive,
    )
    .await
    {
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
) -> Option<(Client<C>, tokio_rustls::client::TlsStream<TcpStream>)> {
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
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, (ConnError, &'static str)> {
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
    let handshake = tokio_rustls::TlsConnector::from(config.clone()).connect(server_name, server);
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
        transport::reset_on_close(tls.get_ref().0);
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
        transport::reset_on_close(tls.get_ref().0);
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

/// A stream that first yields bytes already read from it (during detection), so a
/// TLS server can read a ClientHello the detector consumed.
pub struct Replay<T> {
    prefix: Vec<u8>,
    read: usize,
    inner: T,
}

impl<T> Replay<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Replay<T> {
        Replay {
            prefix,
            read: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.read < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.read);
            let start = self.read;
            buf.put_slice(&self.prefix[start..start + n]);
            self.read += n;
            if self.read == self.prefix.len() {
                self.prefix = Vec::new();
                self.read = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
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

    use super::Replay;

    /// A frame head and its body leave in one write; without vectored writes h2
    /// sends each body chunk over 1 KiB as two TLS records.
    #[tokio::test]
    async fn replay_gathers_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut writer = Replay::new(b"seen".to_vec(), client.unwrap());
        let (mut reader, _) = accepted.unwrap();

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
