//! The client side: connections to destinations, pooled per endpoint.
//!
//! A [`Pool`] (for one target address, plus the peer identity when meshed) holds idle
//! HTTP/1 connections and at most one shared HTTP/2 connection. HTTP/1 connections are
//! checked out for one request and come back when its response body has been read to
//! the end (a connection whose body was abandoned is closed instead, since its state
//! is unknown). HTTP/2 requests share the one connection, multiplexed; it is replaced
//! when it closes or reaches its maximum age. A connection is only ever reused for
//! the endpoint (and identity) it was opened for.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use super::body::RecvBody;
use super::errors::ErrorKind;
use super::h2_client;
use crate::config::HttpConfig;
use crate::discover::Labels;
use crate::mesh::tls::TlsStatus;
use crate::mesh::transport_header::{SessionProtocol, TransportHeader};
use crate::mesh::{Dialed, Dialer, PeerId};
use crate::metrics::transport::{OpenConnection, Peer};
use crate::metrics::DirectionMetrics;
use crate::net::error::ConnError;

type Sender1 = http1::SendRequest<RecvBody>;
pub type Sender2 = h2_client::Sender;

/// What a pooled connection was opened for; it is reused for nothing else.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub target: SocketAddr,
    /// The peer proxy: connections are mesh TLS to it.
    pub peer: Option<PeerId>,
    /// HTTP/1 header-name case is recorded on this path: the client speaks HTTP/1.
    /// Inbound from a peer's HTTP/2 connection its names are lower case already, and
    /// recording the case (a map and an extension per message) would be wasted; such
    /// connections to the app pool apart from those that keep it.
    pub http1_case: bool,
    /// Connections go to the peer proxy's inbound port at this port of the target's
    /// address, with a transport header naming the target's port and the session
    /// protocol (HTTP/1 or HTTP/2, as the connection speaks).
    pub header_port: Option<u16>,
    /// The header names the session protocol (else the peer forwards the bytes).
    pub header_names_protocol: bool,
}

/// Every pool of one direction, and what their connections are opened with.
pub struct Pools {
    config: HttpConfig,
    endpoints: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    dial: Arc<Dial>,
}

/// How a pool opens connections: the direction's dialer, its metrics, and the `tls`
/// label of a connection without mesh TLS.
struct Dial {
    dialer: Arc<Dialer>,
    metrics: Arc<DirectionMetrics>,
    plain: TlsStatus,
}

impl Pools {
    pub fn new(
        config: HttpConfig,
        dialer: Arc<Dialer>,
        metrics: Arc<DirectionMetrics>,
        plain: TlsStatus,
    ) -> Pools {
        Pools {
            config,
            endpoints: Mutex::new(HashMap::new()),
            dial: Arc::new(Dial {
                dialer,
                metrics,
                plain,
            }),
        }
    }

    /// The pool for `key`, looked up once per accepted connection (and upstream);
    /// its connections are counted with `labels` (discovery's, `dst_*`).
    pub fn pool(&self, key: PoolKey, labels: &Arc<Labels>) -> Arc<Pool> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Pool {
                    key,
                    labels: labels.clone(),
                    config: self.config.clone(),
                    dial: self.dial.clone(),
                    idle: Mutex::new(Vec::new()),
                    h2: ArcSwapOption::empty(),
                    connecting: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// Closes idle connections past their idle timeout or age and forgets endpoints
    /// nothing uses. Runs periodically, so idle sockets do not wait for a next request.
    pub fn sweep(&self) {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, endpoint| {
            let idle_left = endpoint.sweep();
            let h2_open = endpoint.h2.load().as_ref().is_some_and(|c| !c.is_closed());
            Arc::strong_count(endpoint) > 1 || idle_left || h2_open
        });
    }

    pub fn sweep_interval(&self) -> Duration {
        (self.config.pool_idle_timeout / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(30))
    }
}

/// The connections to one endpoint.
pub struct Pool {
    key: PoolKey,
    labels: Arc<Labels>,
    config: HttpConfig,
    dial: Arc<Dial>,
    idle: Mutex<Vec<Idle>>,
    h2: ArcSwapOption<h2_client::H2Connection>,
    /// Held while opening the HTTP/2 connection, so concurrent first requests share
    /// one connection instead of racing to open several.
    connecting: tokio::sync::Mutex<()>,
}

/// A pooled HTTP/1 connection that can take a request now.
pub struct ReadyH1 {
    sender: Sender1,
    opened: Instant,
}

struct Idle {
    sender: Sender1,
    opened: Instant,
    since: Instant,
}

/// A checked-out HTTP/1 connection, returned to its endpoint when the response ends.
pub struct Checkin {
    endpoint: Arc<Pool>,
    sender: Sender1,
    opened: Instant,
}

impl Checkin {
    pub fn release(self) {
        let endpoint = self.endpoint;
        if self.opened.elapsed() >= endpoint.config.max_connection_age {
            return;
        }
        let mut idle = endpoint.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < endpoint.config.max_idle_per_endpoint {
            idle.push(Idle {
                sender: self.sender,
                opened: self.opened,
                since: Instant::now(),
            });
        }
    }
}

impl Pool {
    /// The endpoint's address.
    pub fn target(&self) -> SocketAddr {
        self.key.target
    }

    fn usable(&self, idle: &Idle) -> bool {
        !idle.sender.is_closed()
            && idle.since.elapsed() < self.config.pool_idle_timeout
            && idle.opened.elapsed() < self.config.max_connection_age
    }

    /// Drops expired idle connections; true if any remain.
    fn sweep(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|i| self.usable(i));
        !idle.is_empty()
    }

    fn checkout(&self) -> Option<(Sender1, Instant)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Most recently used first: it is the likeliest to still be open.
        while let Some(candidate) = idle.pop() {
            if self.usable(&candidate) {
                return Some((candidate.sender, candidate.opened));
            }
        }
        None
    }

    /// An HTTP/1 connection ready to take a request: an idle one or a new one. A
    /// failure here leaves the request untouched, so it may go elsewhere.
    pub async fn ready_h1(&self) -> Result<ReadyH1, ErrorKind> {
        while let Some((mut sender, opened)) = self.checkout() {
            // A pooled connection the server has closed meanwhile fails here, before
            // the request is committed to it.
            if sender.ready().await.is_ok() {
                return Ok(ReadyH1 { sender, opened });
            }
        }
        // Boxed: opening (connect, TLS) is rare next to reuse, and inline it would
        // size every request's future for a handshake.
        let sender = Box::pin(self.open_h1()).await?;
        Ok(ReadyH1 {
            sender,
            opened: Instant::now(),
        })
    }

    /// Sends an HTTP/1 request on `ready`. The returned [`Checkin`] gives the
    /// connection back once the response body has ended.
    pub async fn send_h1(
        self: &Arc<Self>,
        ready: ReadyH1,
        request: Request<RecvBody>,
    ) -> Result<(Response<RecvBody>, Checkin), ErrorKind> {
        let ReadyH1 { mut sender, opened } = ready;
        let response = sender.send_request(request).await.map_err(upstream_error)?;
        let checkin = Checkin {
            endpoint: self.clone(),
            sender,
            opened,
        };
        Ok((response.map(RecvBody::Http1), checkin))
    }

    async fn open_h1(&self) -> Result<Sender1, ErrorKind> {
        let io = self.dial(SessionProtocol::Http1).await?;
        let (sender, connection) = http1::Builder::new()
            .preserve_header_case(self.key.http1_case)
            .title_case_headers(false)
            .handshake(TokioIo::new(io))
            .await
            .map_err(upstream_error)?;
        let target = self.key.target;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                debug!(%target, %error, "HTTP/1 connection failed");
            }
        });
        Ok(sender)
    }

    /// A handle on the endpoint's shared HTTP/2 connection, opened if need be. A
    /// connection the peer is closing (GOAWAY) is not offered, so a new connection
    /// takes the request instead.
    pub async fn ready_h2(&self) -> Result<Sender2, ErrorKind> {
        match self.current_h2() {
            Some(sender) => Ok(sender),
            None => Box::pin(self.open_h2()).await,
        }
    }

    /// Sends a request on the endpoint's shared HTTP/2 connection.
    pub async fn send_h2(
        sender: Sender2,
        request: Request<RecvBody>,
    ) -> Result<Response<RecvBody>, ErrorKind> {
        let response = sender.send(request).map_err(|error| {
            debug!(%error, "cannot send the request over HTTP/2");
            h2_error(&error)
        })?;
        let response = response.await.map_err(|error| {
            debug!(%error, "upstream request failed");
            h2_error(&error)
        })?;
        Ok(response.map(RecvBody::Http2))
    }

    fn current_h2(&self) -> Option<Sender2> {
        let guard = self.h2.load();
        let connection = guard.as_ref()?;
        if connection.opened.elapsed() >= self.config.max_connection_age {
            return None;
        }
        connection.sender()
    }

    async fn open_h2(&self) -> Result<Sender2, ErrorKind> {
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.current_h2() {
            return Ok(sender);
        }
        let io = self.dial(SessionProtocol::Http2).await?;
        let connection = h2_client::H2Connection::handshake(io, &self.config, self.key.target)
            .await
            .map_err(|error| {
                debug!(target = %self.key.target, %error, "HTTP/2 handshake failed");
                ErrorKind::Upstream
            })?;
        let sender = connection.sender().ok_or(ErrorKind::Unavailable)?;
        self.h2.store(Some(Arc::new(connection)));
        Ok(sender)
    }

    /// Opens a connection to the endpoint: TCP, then mesh TLS when it has a peer
    /// (through its proxy's inbound port, behind a transport header naming the
    /// target's port and `protocol`, when the key says so). A failure ends this
    /// upstream connection before it began: it is counted here, and the request gets
    /// the matching error response.
    async fn dial(&self, protocol: SessionProtocol) -> Result<Counted<Dialed>, ErrorKind> {
        let Dial {
            dialer,
            metrics,
            plain,
        } = &*self.dial;
        let target = self.key.target;
        let dialed = match (self.key.header_port, &self.key.peer) {
            (Some(port), Some(peer)) => {
                let header = TransportHeader {
                    port: target.port(),
                    name: None,
                    protocol: self.key.header_names_protocol.then_some(protocol),
                };
                dialer
                    .dial_with_header(SocketAddr::new(target.ip(), port), peer, &header.encode())
                    .await
            }
            _ => {
                dialer
                    .dial(target, self.key.peer.as_ref(), plain.clone())
                    .await
            }
        };
        match dialed {
            Ok((stream, tls)) => {
                let series = metrics
                    .transport
                    .open_labelled(Peer::Dst, target, tls, &self.labels);
                Ok(Counted::new(stream, series))
            }
            Err(error) => {
                metrics.error(error);
                Err(match error {
                    ConnError::ConnectRefused => ErrorKind::ConnectRefused,
                    ConnError::ConnectTimeout => ErrorKind::ConnectTimeout,
                    ConnError::Connect(_) => ErrorKind::Connect,
                    _ => ErrorKind::Tls,
                })
            }
        }
    }
}

/// A request the server did not process is `Unavailable` (503): it refused the
/// stream, or announced GOAWAY before it; any other failure is the upstream's.
/// (A request HTTP/2 cannot carry fails in `send`, as `Upstream`, as with hyper.)
fn h2_error(error: &h2::Error) -> ErrorKind {
    let unprocessed = error.reason() == Some(h2::Reason::REFUSED_STREAM)
        || (error.is_go_away() && error.is_remote());
    if unprocessed {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Upstream
    }
}

fn upstream_error(error: hyper::Error) -> ErrorKind {
    debug!(%error, "upstream request failed");
    if error.is_canceled() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Upstream
    }
}

/// A stream whose bytes are counted in its transport series; the connection is
/// counted closed when the stream is dropped (hyper drops it when the connection ends).
pub struct Counted<T> {
    inner: T,
    metrics: OpenConnection,
}

impl<T> Counted<T> {
    pub fn new(inner: T, metrics: OpenConnection) -> Counted<T> {
        Counted { inner, metrics }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.metrics.series().add_read(buf.filled().len() - before);
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            this.metrics.series().add_write(*n);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            this.metrics.series().add_write(*n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
