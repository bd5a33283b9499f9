//! HTTP-aware proxying: once detection finds HTTP/1 or HTTP/2, the connection is
//! served request by request instead of forwarded as bytes.
//!
//! One [`ServerConn`] describes an accepted connection: where its requests go (one
//! [`client::Pool`]), how (outbound: possibly upgraded to HTTP/2 between proxies;
//! inbound: restored from that upgrade, with `l5d-client-id`), and the series its
//! requests are counted in. Everything per connection is decided once, in
//! [`serve_connection`]; a request only reads it. What a direction's HTTP connections
//! share (pools, metrics, drain) is one [`HttpProxy`], which the direction owns: this
//! module knows nothing of inbound or outbound beyond the [`Role`] it is given.
//!
//! Transparency: requests and responses pass through as they came (header-name case
//! for HTTP/1, absolute-form URIs, trailers, upstream errors and gRPC statuses); only
//! the proxy's own failures produce made-up responses (`errors.rs`).

pub mod body;
pub mod client;
pub mod errors;
pub mod h2_client;
pub mod h2_streams;
pub mod metrics;
pub mod orig_proto;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, HOST, UPGRADE};
use hyper::http::uri::Authority;
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio_util::task::TaskTracker;
use tracing::debug;

use self::body::{BoxError, Recorder, RecvBody, ResponseBody};
use self::client::{Checkin, Pool, PoolKey, Pools};
use self::errors::ErrorKind;
use self::metrics::{Outcome, SeriesHandle};
use crate::config::HttpConfig;
use crate::mesh::tls::TlsStatus;
use crate::metrics::DirectionMetrics;
use crate::net::detect::Protocol;
use crate::net::error::{ConnError, Errno};
use crate::net::forward::{Downstream, Transport};
use crate::net::replay::Replay;
use crate::ops::drain::Drain;

const L5D_CLIENT_ID: HeaderName = HeaderName::from_static("l5d-client-id");

/// What one direction's HTTP connections share.
pub struct HttpProxy {
    pub pools: Pools,
    pub metrics: Arc<DirectionMetrics>,
    pub config: HttpConfig,
    pub drain: Arc<Drain>,
    /// Where an upgraded connection's tunnel (a WebSocket) runs, so that draining
    /// waits for it as for any connection.
    pub tasks: TaskTracker,
}

/// What differs between the two directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// `h2_upgrade`: the peer proxy accepts HTTP/2, so HTTP/1 requests are carried
    /// over one HTTP/2 connection with `l5d-orig-proto`.
    Outbound { h2_upgrade: bool },
    /// `client_id`: the meshed client's verified identity, if any.
    Inbound { client_id: Option<Arc<str>> },
}

/// Where an accepted connection's requests go, decided once per connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub pool: PoolKey,
    pub role: Role,
    /// The `tls` label of the request series.
    pub tls: TlsStatus,
}

/// One accepted HTTP connection.
pub struct ServerConn {
    proxy: Arc<HttpProxy>,
    pool: Arc<Pool>,
    role: Role,
    target: SocketAddr,
    tls: TlsStatus,
    /// Used as `:authority` for an upgraded HTTP/1.0 request that named none.
    fallback_authority: Authority,
    /// Inbound: the verified client identity as an `l5d-client-id` value, made once
    /// per connection rather than per request.
    client_id: Option<HeaderValue>,
    authority_labels: bool,
    /// The series of the last authority seen on this connection: almost every
    /// connection sends one authority, so this is looked up once.
    series: ArcSwapOption<CachedSeries>,
}

struct CachedSeries {
    authority: Option<Box<str>>,
    handle: SeriesHandle,
}

/// Serves a client connection detected as HTTP/1 or HTTP/2 (`protocol`); `prefix` is
/// what detection already read from it.
pub async fn serve_connection<C: Transport + 'static>(
    proxy: &Arc<HttpProxy>,
    client: Downstream<C>,
    prefix: Vec<u8>,
    protocol: Protocol,
    route: Route,
) -> Result<(), ConnError> {
    let target = route.pool.target;
    let client_id = match &route.role {
        Role::Inbound { client_id } => client_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok()),
        Role::Outbound { .. } => None,
    };
    let connection = Arc::new(ServerConn {
        proxy: proxy.clone(),
        pool: proxy.pools.pool(route.pool),
        role: route.role,
        target,
        tls: route.tls,
        fallback_authority: Authority::try_from(target.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("localhost")),
        client_id,
        authority_labels: proxy.config.authority_labels,
        series: ArcSwapOption::empty(),
    });
    let Downstream {
        stream,
        addr,
        metrics,
    } = client;
    let io = client::Counted::new(Replay::new(prefix, stream), metrics);
    let failure: Option<BoxError> = match protocol {
        Protocol::Http2 => server::serve_h2(io, connection).await.err(),
        _ => server::serve_h1(io, connection).await.err().map(Into::into),
    };
    match failure {
        Some(error) => {
            debug!(client = %addr, %error, "HTTP connection failed");
            Err(ConnError::Io(Errno::Other))
        }
        None => Ok(()),
    }
}

impl ServerConn {
    fn series(&self, request: &Request<RecvBody>) -> SeriesHandle {
        let authority = if self.authority_labels {
            authority_of(request)
        } else {
            None
        };
        if let Some(cached) = &*self.series.load() {
            if cached.authority.as_deref() == authority {
                return cached.handle.clone();
            }
        }
        let handle = self
            .proxy
            .metrics
            .http
            .series(authority, self.target, &self.tls);
        self.series.store(Some(Arc::new(CachedSeries {
            authority: authority.map(Box::from),
            handle: handle.clone(),
        })));
        handle
    }

    async fn forward(
        &self,
        mut request: Request<RecvBody>,
    ) -> Result<(Response<RecvBody>, Option<Checkin>), ErrorKind> {
        match &self.role {
            Role::Inbound { .. } => {
                // Only the proxy vouches for a client's identity: whatever the client
                // itself put in the header goes (`insert` replaces every value).
                match &self.client_id {
                    Some(id) => request.headers_mut().insert(L5D_CLIENT_ID, id.clone()),
                    None => request.headers_mut().remove(L5D_CLIENT_ID),
                };
                if request.version() == Version::HTTP_2 {
                    if let Some(original) = orig_proto::downgrade(&mut request) {
                        let (mut response, checkin) = self.pool.send_h1(request).await?;
                        response
                            .headers_mut()
                            .insert(orig_proto::L5D_ORIG_PROTO, original);
                        return Ok((response, Some(checkin)));
                    }
                    return Ok((self.pool.send_h2(request).await?, None));
                }
                self.http1(request).await
            }
            Role::Outbound { h2_upgrade } => {
                if request.version() == Version::HTTP_2 {
                    return Ok((self.pool.send_h2(request).await?, None));
                }
                if *h2_upgrade && !is_upgrade(&request) {
                    let version = orig_proto::upgrade(&mut request, &self.fallback_authority);
                    let mut response = self.pool.send_h2(request).await?;
                    orig_proto::restore(&mut response, version);
                    return Ok((response, None));
                }
                self.http1(request).await
            }
        }
    }

    /// HTTP/1 to the destination. An `Upgrade` or `CONNECT` the destination accepts
    /// turns both connections into one byte stream, forwarded like opaque TCP.
    async fn http1(
        &self,
        mut request: Request<RecvBody>,
    ) -> Result<(Response<RecvBody>, Option<Checkin>), ErrorKind> {
        if !is_upgrade(&request) {
            let (response, checkin) = self.pool.send_h1(request).await?;
            return Ok((response, Some(checkin)));
        }
        let downstream = hyper::upgrade::on(&mut request);
        let connect = request.method() == Method::CONNECT;
        let (mut response, checkin) = self.pool.send_h1(request).await?;
        let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (connect && response.status().is_success());
        if !switched {
            return Ok((response, Some(checkin)));
        }
        let upstream = hyper::upgrade::on(&mut response);
        let target = self.target;
        // Tracked like a connection: draining waits for the tunnel (a WebSocket) too.
        // The tunnel is a connection of its own, so it counts its own failure.
        let metrics = self.proxy.metrics.clone();
        self.proxy.tasks.spawn(async move {
            let (down, up) = match tokio::join!(downstream, upstream) {
                (Ok(down), Ok(up)) => (down, up),
                (down, up) => {
                    debug!(%target, down = ?down.err(), up = ?up.err(), "upgrade failed");
                    metrics.error(ConnError::Io(Errno::Other));
                    return;
                }
            };
            // The connection is the tunnel now; it never goes back to the pool.
            drop(checkin);
            let mut down = hyper_util::rt::TokioIo::new(down);
            let mut up = hyper_util::rt::TokioIo::new(up);
            if let Err(error) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                debug!(%target, %error, "upgraded connection failed");
                metrics.error(ConnError::Io(Errno::of(&error)));
            }
        });
        Ok((response, None))
    }
}

/// Handles one request: forwards it and wraps the response so its end is measured.
async fn handle(connection: Arc<ServerConn>, request: Request<RecvBody>) -> Response<ResponseBody> {
    let start = Instant::now();
    let series = connection.series(&request);
    series.request();
    let grpc = errors::is_grpc(&request);
    match connection.forward(request).await {
        Ok((response, checkin)) => {
            let recorder = Recorder {
                series,
                start,
                first_byte: None,
                status: response.status().as_u16(),
                grpc: body::grpc_status(response.headers()),
            };
            let (parts, body) = response.into_parts();
            let body = ResponseBody::new(body, recorder, checkin);
            Response::from_parts(parts, body)
        }
        Err(kind) => {
            series.response(Outcome::Error(kind), start.elapsed());
            errors::respond(kind, grpc)
        }
    }
}

/// An HTTP/1.1 `Upgrade` (e.g. WebSocket) or a `CONNECT`.
fn is_upgrade<B>(request: &Request<B>) -> bool {
    if request.method() == Method::CONNECT {
        return true;
    }
    let connection_upgrade = request.headers().get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    connection_upgrade && request.headers().contains_key(UPGRADE)
}

fn authority_of(request: &Request<RecvBody>) -> Option<&str> {
    match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request.headers().get(HOST).and_then(|h| h.to_str().ok()),
    }
}
