//! Opaque connections between two Tandem proxies, carried as HTTP/2 `CONNECT` streams
//! over one pooled mTLS connection per peer proxy.
//!
//! Why: Linkerd gives every new opaque connection its own TCP connection and mTLS
//! handshake to the peer's inbound port (with a transport header naming the real
//! port). A resumed TLS 1.3 handshake still costs an X25519 exchange on both sides
//! and a second connection set-up per proxy, which made new opaque connections about
//! ten times dearer through the mesh than without it. A stream on an open connection
//! costs one HEADERS frame each way.
//!
//! The price: streams of one carrier share one socket and one task per proxy, and
//! their bytes are copied into HTTP/2 frames. In `tandem-bench` on a 2-vCPU VM new
//! opaque connections came 2-2.6 times as fast, but exchanges on long-lived
//! connections ran slower (`benches/RESULTS.md`). Most opaque traffic (database and cache clients) rides pooled long-lived
//! connections, so the outbound side offers carriers only when
//! `TANDEM_OUTBOUND_OPAQUE_CARRIER=true`; the inbound side accepts them by default.
//!
//! Negotiation stays compatible with Linkerd: the client
//! dials the peer's inbound port offering two ALPN protocols, [`ALPN`] first and
//! Linkerd's transport header second. A Tandem peer picks [`ALPN`] (a TLS server picks
//! by its own preference) and the connection becomes the peer's carrier; a Linkerd
//! peer picks the transport header, the connection is used the classic way for this
//! one client connection, and the peer is remembered as classic for a while.
//!
//! On a carrier, one client connection is one stream: `CONNECT` with `:authority`
//! naming the target (only its port is used: the peer connects to its own address, as
//! with the transport header). The client starts sending at once; the peer connects
//! to the target, answers `200`, and copies. A failure on either side resets the
//! stream (`RST_STREAM`), and the other proxy resets its TCP side, so a refused or
//! reset connection still reaches the application as a reset; a FIN is an empty DATA
//! frame with END_STREAM, so half-closes pass through as with plain TCP.
//!
//! Both sides PING the other (`TANDEM_*_HTTP2_KEEPALIVE_*`, idle or not): a peer that
//! vanished without a FIN, whose streams would otherwise wait for TCP to give up,
//! loses its carrier, and every stream on it is reset.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::config::HttpConfig;
use crate::discover::inbound_policy::Client;
use crate::discover::linkerd::inbound::InboundPolicies;
use crate::http::h2_streams::keepalive;
use crate::mesh::tls::{NoTlsReason, TlsStatus};
use crate::mesh::{AcceptedTls, Dialer, MeshAlpn, MeshTls, PeerId};
use crate::metrics::transport::Peer;
use crate::metrics::DirectionMetrics;
use crate::net::batched_writes::batched;
use crate::net::error::{ConnError, Errno};
use crate::net::forward::{self, Downstream, Transport};
use crate::net::socket;
use crate::ops::drain::Drain;

/// The ALPN protocol a Tandem inbound proxy selects for a carrier connection.
pub const ALPN: &[u8] = crate::mesh::tls::CARRIER_ALPN;

/// Streams one carrier takes before new client connections go the classic way, so
/// long-lived connections can never use up a carrier. The server allows twice as
/// many, since a stream the client has finished with may still be closing there.
const MAX_STREAMS: usize = 32;

/// HTTP/2 flow-control windows. A stream's window bounds what one slow reader can
/// leave buffered in the proxy. 1 MiB keeps one bulk stream at full speed (256 KiB
/// cost it a third of its throughput in `tandem-bench`). The connection's window
/// holds every stream's, so readers that stall (or wait on each other) can never
/// stop the other streams of their carrier, as separate sockets would not.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = STREAM_WINDOW * MAX_STREAMS as u32;

/// How long a peer that chose the transport header (a Linkerd proxy) is dialled the
/// classic way before a carrier is tried again.
const RETRY_CARRIER_AFTER: Duration = Duration::from_secs(60);

/// A peer proxy: its inbound address and identity.
type PeerKey = (SocketAddr, Arc<str>);

/// The outbound side's carriers, by peer proxy.
pub struct Carriers {
    peers: Mutex<HashMap<PeerKey, Arc<PeerCarrier>>>,
    /// `TANDEM_OUTBOUND_OPAQUE_CARRIER`: offer carriers at all.
    enabled: bool,
    http: HttpConfig,
    metrics: Arc<DirectionMetrics>,
}

/// One peer proxy's carrier, and whether it takes carriers.
#[derive(Default)]
struct PeerCarrier {
    carrier: Mutex<Option<Arc<Carrier>>>,
    classic_until: Mutex<Option<Instant>>,
}

struct Carrier {
    sender: h2::client::SendRequest<Bytes>,
    opened: Instant,
    /// Set by the task driving the connection when it ends.
    closed: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
}

impl Carrier {
    /// Still open and young enough to be pooled.
    fn alive(&self, max_age: Duration) -> bool {
        !self.closed.load(Ordering::Acquire) && self.opened.elapsed() < max_age
    }

    /// Alive, with room for another stream.
    fn usable(&self, max_age: Duration) -> bool {
        self.alive(max_age) && self.streams.load(Ordering::Relaxed) < MAX_STREAMS
    }
}

impl Carriers {
    pub fn new(enabled: bool, http: HttpConfig, metrics: Arc<DirectionMetrics>) -> Carriers {
        Carriers {
            peers: Mutex::default(),
            enabled,
            http,
            metrics,
        }
    }

    fn peer(&self, addr: SocketAddr, identity: &Arc<str>) -> Arc<PeerCarrier> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.entry((addr, identity.clone())).or_default().clone()
    }

    /// Lets carriers past their age go (their open streams run on; the connection
    /// closes after the last) and forgets peers with no carrier that nothing is
    /// dialling.
    pub fn sweep(&self) {
        let max_age = self.http.max_connection_age;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|_, peer| {
            let mut carrier = peer.carrier.lock().unwrap_or_else(|p| p.into_inner());
            if carrier.as_ref().is_some_and(|c| !c.alive(max_age)) {
                *carrier = None;
            }
            carrier.is_some() || Arc::strong_count(peer) > 1
        });
    }
}

/// How an opaque client connection reaches the peer proxy.
pub enum Opened {
    /// A stream on a carrier.
    Stream(Stream),
    /// A connection of its own, with the transport-header ALPN negotiated: the
    /// caller sends the header first.
    Classic(Box<MeshTls>),
}

impl Carriers {
    /// Opens the way to `port` behind the peer proxy at `addr` (its inbound address),
    /// which must prove `peer.identity`.
    pub async fn open(
        &self,
        dialer: &Dialer,
        addr: SocketAddr,
        peer: &PeerId,
        port: u16,
    ) -> Result<Opened, ConnError> {
        if !self.enabled {
            let tcp = dialer.connect(addr).await?;
            let tls = dialer
                .originate(tcp, peer, MeshAlpn::TransportHeader)
                .await?;
            return Ok(Opened::Classic(Box::new(tls)));
        }
        let state = self.peer(addr, &peer.identity);
        let max_age = self.http.max_connection_age;
        let carrier = state
            .carrier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|c| c.usable(max_age));
        if let Some(carrier) = carrier {
            if let Some(stream) = carrier.open_stream(&self.metrics, addr, port) {
                return Ok(Opened::Stream(stream));
            }
        }
        let classic = state
            .classic_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| Instant::now() < until);
        let tcp = dialer.connect(addr).await?;
        let alpn = if classic {
            MeshAlpn::TransportHeader
        } else {
            MeshAlpn::CarrierOrHeader
        };
        let tls = dialer.originate(tcp, peer, alpn).await?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
            if !classic {
                debug!(%addr, "the peer proxy takes no carrier; using the transport header");
                *state
                    .classic_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + RETRY_CARRIER_AFTER);
            }
            return Ok(Opened::Classic(Box::new(tls)));
        }
        let carrier = start_carrier(&self.http, &self.metrics, tls, addr).await?;
        self.metrics.carriers.inc();
        let stream = carrier.open_stream(&self.metrics, addr, port);
        // Connections that dialled at the same time each get a carrier; the last one
        // stays pooled and the others close when their stream ends.
        *state.carrier.lock().unwrap_or_else(|p| p.into_inner()) = Some(carrier);
        stream
            .map(Opened::Stream)
            .ok_or(ConnError::Io(Errno::Other))
    }
}

async fn start_carrier(
    http: &HttpConfig,
    metrics: &Arc<DirectionMetrics>,
    tls: MeshTls,
    peer: SocketAddr,
) -> Result<Arc<Carrier>, ConnError> {
    let socket = socket::ResetHandle::of(tls.get_ref().0.get_ref()).map_err(|error| {
        debug!(%peer, %error, "cannot keep a handle on the carrier's socket");
        ConnError::Io(Errno::of(&error))
    })?;
    let (tls, flusher) = batched(tls);
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|error| {
            debug!(%peer, %error, "carrier handshake failed");
            ConnError::Io(Errno::Other)
        })?;
    let closed = Arc::new(AtomicBool::new(false));
    let on_close = closed.clone();
    let keepalive = keepalive(http, connection.ping_pong(), None);
    let metrics = metrics.clone();
    tokio::spawn(async move {
        tokio::select! {
            // The connection first: after the proxy itself was paused, a PONG waiting
            // in the socket must count before the expired timeout does.
            biased;
            ended = flusher.drive(|cx| Pin::new(&mut connection).poll(cx)) => if let Err(error) = ended {
                debug!(%peer, %error, "carrier failed");
            },
            () = keepalive => {
                debug!(%peer, "the peer proxy stopped answering PINGs; resetting its carrier");
                metrics.error(ConnError::Io(Errno::TimedOut));
                socket.reset_on_close();
            }
        }
        // Dropping the connection fails the streams still on it.
        drop(connection);
        drop(flusher);
        drop(socket);
        on_close.store(true, Ordering::Release);
    });
    Ok(Arc::new(Carrier {
        sender,
        opened: Instant::now(),
        closed,
        streams: Arc::new(AtomicUsize::new(0)),
    }))
}

impl Carrier {
    /// Opens a stream to `port`. `None` when the carrier can take no more streams
    /// (it is closing, or went away).
    fn open_stream(
        &self,
        metrics: &DirectionMetrics,
        peer: SocketAddr,
        port: u16,
    ) -> Option<Stream> {
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority(peer, port))
            .body(())
            .ok()?;
        // `SendRequest` is ready unless a stream was just opened and not yet sent;
        // the clone has its own readiness, so this only fails on a closed carrier.
        let mut sender = self.sender.clone();
        let (response, send) = match sender.send_request(request, false) {
            Ok(opened) => opened,
            Err(error) => {
                debug!(%peer, %error, "cannot open a stream on the carrier");
                return None;
            }
        };
        self.streams.fetch_add(1, Ordering::Relaxed);
        metrics.carrier_streams.inc();
        Some(Stream {
            send,
            recv: Recv::Waiting(response),
            buf: Bytes::new(),
            sent_eos: false,
            count: Some(self.streams.clone()),
        })
    }
}

/// What the inbound side lends the carriers it accepts.
pub struct Acceptor {
    /// Connects each stream to the application.
    pub dialer: Dialer,
    pub metrics: Arc<DirectionMetrics>,
    pub drain: Arc<Drain>,
    pub http: HttpConfig,
    pub handshake_timeout: Duration,
    /// The ports' policies, when Linkerd's policy controller gives them: each
    /// stream is authorized as a connection of its own.
    pub policies: Option<Arc<InboundPolicies>>,
}

/// Serves a carrier accepted on the inbound port from a peer proxy that proved
/// `client_id`. Each stream is forwarded to a port on `local` on its own task, and
/// counted as a connection of its own; the carrier's task lasts until every stream
/// has ended, so draining waits for them.
pub async fn accept(
    acceptor: &Arc<Acceptor>,
    tls: Box<AcceptedTls>,
    client: SocketAddr,
    client_id: Arc<str>,
    local: SocketAddr,
) -> Result<(), ConnError> {
    // Without a handle a carrier could not be reset when its peer goes silent; a
    // proxy out of descriptors refuses it, and the peer dials the classic way later.
    let socket = socket::ResetHandle::of(tls.get_ref().0.get_ref()).map_err(|error| {
        debug!(%client, %error, "cannot keep a handle on the carrier's socket");
        ConnError::Io(Errno::of(&error))
    })?;
    let (tls, flusher) = batched(tls);
    let connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(2 * MAX_STREAMS as u32)
        // Connect-then-reset bursts (health checks) are normal between proxies.
        .max_pending_accept_reset_streams(2 * MAX_STREAMS)
        .handshake::<_, Bytes>(tls);
    let mut connection = match tokio::time::timeout(acceptor.handshake_timeout, connection).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            debug!(%client, %error, "carrier handshake failed");
            return Err(ConnError::Io(Errno::Other));
        }
        Err(_) => {
            debug!(%client, "carrier handshake timed out");
            return Err(ConnError::Io(Errno::TimedOut));
        }
    };
    acceptor.metrics.carriers.inc();
    let streams = TaskTracker::new();
    let mut draining = false;
    let mut drain = acceptor.drain.watch();
    let keepalive = keepalive(&acceptor.http, connection.ping_pong(), None);
    tokio::pin!(keepalive);
    let mut result = Ok(());
    loop {
        let accepted = tokio::select! {
            // The connection first, as in `start_carrier`.
            biased;
            accepted = flusher.drive(|cx| connection.poll_accept(cx)) => accepted,
            () = &mut keepalive => {
                debug!(%client, "the peer proxy stopped answering PINGs; resetting its carrier");
                socket.reset_on_close();
                result = Err(ConnError::Io(Errno::TimedOut));
                break;
            }
            () = drain.started(), if !draining => {
                // No new streams; the open ones finish.
                connection.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        match accepted {
            Some(Ok((request, respond))) => {
                acceptor.metrics.carrier_streams.inc();
                let acceptor = acceptor.clone();
                let client_id = client_id.clone();
                streams.spawn(async move {
                    let served =
                        serve_stream(&acceptor, request, respond, client, client_id, local).await;
                    if let Err(error) = served {
                        acceptor.metrics.error(error);
                    }
                });
            }
            Some(Err(error)) => {
                debug!(%client, %error, "carrier failed");
                result = Err(ConnError::Io(Errno::Other));
                break;
            }
            None => break,
        }
    }
    // Dropping the connection fails the streams still on it, so none waits on a
    // connection nobody drives any more. The flusher holds the socket too.
    drop(connection);
    drop(flusher);
    drop(socket);
    streams.close();
    streams.wait().await;
    result
}

/// One stream of an accepted carrier: a connection to a port on `local`.
async fn serve_stream(
    acceptor: &Acceptor,
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    client: SocketAddr,
    client_id: Arc<str>,
    local: SocketAddr,
) -> Result<(), ConnError> {
    let port = (request.method() == Method::CONNECT)
        .then(|| request.uri().port_u16())
        .flatten();
    let Some(port) = port.filter(|p| *p != local.port()) else {
        debug!(%client, uri = %request.uri(), "refusing a carrier stream that names no other port");
        let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
        return Err(ConnError::TransportHeader);
    };
    let target = SocketAddr::new(local.ip(), port);
    let stream = Stream {
        send: match respond.send_response(status(StatusCode::OK), false) {
            Ok(send) => send,
            Err(error) => {
                debug!(%client, %error, "carrier stream went away");
                return Ok(());
            }
        },
        recv: Recv::Open(request.into_body()),
        buf: Bytes::new(),
        sent_eos: false,
        count: None,
    };
    let transport = &acceptor.metrics.transport;
    let tls = TlsStatus::Established(Some(client_id));
    let facts = Client {
        ip: client.ip(),
        tls: tls.clone(),
    };
    let client = Downstream {
        stream,
        addr: client,
        metrics: transport.open(Peer::Src, target, tls),
    };
    if let Some(policies) = &acceptor.policies {
        if let Err(error) = policies.authorize_tcp(target, &facts) {
            return Err(client.refuse(error));
        }
    }
    let server = match acceptor.dialer.connect(target).await {
        Ok(server) => server,
        Err(error) => return Err(client.refuse(error)),
    };
    let dst = transport.open(
        Peer::Dst,
        target,
        TlsStatus::NoIdentity(NoTlsReason::Loopback),
    );
    forward::relay(client, &[], server, dst).await
}

/// `:authority` of a stream: the peer's address and the target port (IPv6 in brackets).
fn authority(peer: SocketAddr, port: u16) -> String {
    SocketAddr::new(peer.ip(), port).to_string()
}

fn status(code: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = code;
    response
}

/// One client connection on a carrier, read and written like a socket.
pub struct Stream {
    send: SendStream<Bytes>,
    recv: Recv,
    /// Received and not yet read.
    buf: Bytes,
    sent_eos: bool,
    /// The carrier's count of open streams, on the client side.
    count: Option<Arc<AtomicUsize>>,
}

enum Recv {
    /// The client side, until the peer answers the `CONNECT`.
    Waiting(h2::client::ResponseFuture),
    Open(RecvStream),
    Ended,
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(count) = &self.count {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn h2_to_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    match error.reason() {
        Some(Reason::REFUSED_STREAM) => io::Error::new(io::ErrorKind::ConnectionRefused, error),
        Some(_) => io::Error::new(io::ErrorKind::ConnectionReset, error),
        None => io::Error::other(error),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.buf.is_empty() {
                let n = this.buf.len().min(out.remaining());
                out.put_slice(&this.buf.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match &mut this.recv {
                Recv::Waiting(response) => {
                    let response = ready!(Pin::new(response).poll(cx)).map_err(h2_to_io)?;
                    if response.status() != StatusCode::OK {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            format!("the peer proxy answered {}", response.status()),
                        )));
                    }
                    this.recv = Recv::Open(response.into_body());
                }
                Recv::Open(body) => match ready!(body.poll_data(cx)) {
                    Some(Ok(data)) => {
                        // Our own buffering is this one frame: the window stays the
                        // bound on what waits for a slow writer.
                        let _ = body.flow_control().release_capacity(data.len());
                        this.buf = data;
                    }
                    // Any reset before END_STREAM is a failure (h2 reports a reset
                    // after END_STREAM as the end), never a quiet end of stream.
                    Some(Err(error)) => return Poll::Ready(Err(h2_to_io(error))),
                    None => this.recv = Recv::Ended,
                },
                Recv::Ended => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(buf.len());
        loop {
            let available = send.capacity();
            if available > 0 {
                let n = available.min(buf.len());
                send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_to_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Poll::Ready(Err(h2_to_io(error))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        // The carrier's connection task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        if !self.sent_eos {
            self.sent_eos = true;
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Transport for Stream {
    fn reset_on_close(&mut self) {
        self.send.send_reset(Reason::CANCEL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_authorities_parse_for_both_address_families() {
        for (peer, expected) in [
            ("10.0.0.7:4143", "10.0.0.7:5432"),
            ("[fd00::7]:4143", "[fd00::7]:5432"),
        ] {
            let text = authority(peer.parse().unwrap(), 5432);
            assert_eq!(text, expected);
            let uri: hyper::Uri = text.parse().unwrap();
            assert_eq!(uri.port_u16(), Some(5432), "{text}");
        }
    }
}
