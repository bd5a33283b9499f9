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
pub mod route_decide;
mod routed;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use std::sync::Mutex;

use arc_swap::ArcSwapOption;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, HOST, UPGRADE};
use hyper::http::uri::Authority;
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio_util::task::TaskTracker;
use tracing::debug;

use self::body::{BoxError, Recorder, RecvBody, ResponseBody};
use self::client::{Checkin, Pool, PoolKey, Pools, ReadyH1, Sender2};
use self::errors::ErrorKind;
use self::metrics::{Outcome, SeriesHandle};
use crate::config::HttpConfig;
use crate::discover::balance::{Balancer, Member, PickError, Picked};
use crate::discover::linkerd::inbound::RequestAuthz;
use crate::discover::{Backend, Routing, RoutingCell};
use crate::discover::{Endpoint, HttpVia, Labels};
use crate::mesh::tls::{NoTlsReason, TlsStatus};
use crate::mesh::PeerId;
use crate::metrics::routes::BackendSeries;
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
    /// How long, and how many, requests wait for a balanced destination's endpoint.
    pub queue: crate::config::Queue,
    pub drain: Arc<Drain>,
    /// Where an upgraded connection's tunnel (a WebSocket) runs, so that draining
    /// waits for it as for any connection.
    pub tasks: TaskTracker,
}

/// What differs between the two directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// HTTP/1 requests to a peer that accepts HTTP/2 are carried over one HTTP/2
    /// connection with `l5d-orig-proto` (per upstream: [`Upstream::h2_upgrade`]).
    Outbound,
    /// `client_id`: the meshed client's verified identity, if any.
    Inbound { client_id: Option<Arc<str>> },
}

/// Where an accepted connection's requests go, decided once per connection.
#[derive(Clone, Debug)]
pub struct Route {
    pub role: Role,
    /// The address the client dialled: the authority of an upgraded HTTP/1.0 request
    /// that named none, and the `target_addr` of requests that reach no endpoint.
    pub logical: SocketAddr,
    pub target: Target,
    /// The client speaks HTTP/1: its header-name case is recorded.
    pub http1_case: bool,
    /// Outbound, the control plane's routes, read per request; their backends are
    /// reached over mTLS when `meshed`.
    pub routes: Option<Arc<RoutingCell>>,
    pub meshed: bool,
}

/// Where requests go.
#[derive(Clone, Debug)]
pub enum Target {
    /// One upstream for every request.
    Upstream(Upstream),
    /// Each request goes to an endpoint the balancer picks; `meshed`: this proxy has
    /// an identity, so meshed endpoints are reached over mTLS.
    Balance {
        balancer: Arc<Balancer>,
        meshed: bool,
    },
    /// Every request fails with this error.
    Fail(ErrorKind),
}

impl PartialEq for Route {
    fn eq(&self, other: &Route) -> bool {
        let same_routes = match (&self.routes, &other.routes) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        self.role == other.role
            && self.logical == other.logical
            && self.target == other.target
            && self.http1_case == other.http1_case
            && same_routes
            // Only routes' backends are reached by it.
            && (self.routes.is_none() || self.meshed == other.meshed)
    }
}

/// Where the outbound side's requests to `backend` go (`meshed`: the proxy has an
/// identity of its own). Pure; decided once per connection and backend.
pub fn outbound_target(backend: &Backend, meshed: bool, http1_case: bool) -> Target {
    match backend {
        Backend::Forward(endpoint) => {
            Target::Upstream(outbound_upstream(endpoint, meshed, http1_case))
        }
        Backend::Balance(balancer) => Target::Balance {
            balancer: balancer.clone(),
            meshed,
        },
        Backend::Refused(_) => Target::Fail(ErrorKind::NoBackend),
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Target) -> bool {
        match (self, other) {
            (Target::Upstream(a), Target::Upstream(b)) => a == b,
            (
                Target::Balance {
                    balancer: a,
                    meshed: x,
                },
                Target::Balance {
                    balancer: b,
                    meshed: y,
                },
            ) => Arc::ptr_eq(a, b) && x == y,
            (Target::Fail(a), Target::Fail(b)) => a == b,
            _ => false,
        }
    }
}

/// One upstream: its pool, whether HTTP/1 is upgraded to HTTP/2 on the way, and
/// the labels its requests are counted with (`tls`: the peer's on the outbound
/// side, the client's on the inbound side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub pool: PoolKey,
    pub h2_upgrade: bool,
    pub tls: TlsStatus,
    pub labels: Arc<Labels>,
}

/// The upstream for the outbound side's requests to `endpoint` (`meshed`: the proxy
/// has an identity of its own, so it can originate mTLS). Pure; decided once per
/// connection, or once per endpoint a connection's requests are balanced over.
pub fn outbound_upstream(endpoint: &Endpoint, meshed: bool, http1_case: bool) -> Upstream {
    let peer = endpoint
        .identity
        .clone()
        .filter(|_| meshed)
        .map(|identity| PeerId {
            sni: endpoint
                .server_name
                .clone()
                .unwrap_or_else(|| identity.clone()),
            identity,
        });
    let tls = match &peer {
        Some(peer) => TlsStatus::Established(Some(peer.identity.clone())),
        None => TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery),
    };
    let header_port = endpoint
        .opaque_port
        .filter(|_| endpoint.http_via != HttpVia::AppPort && peer.is_some());
    Upstream {
        h2_upgrade: peer.is_some() && endpoint.http2,
        pool: PoolKey {
            target: endpoint.addr,
            peer,
            // Recorded even when requests go on over HTTP/2: an Upgrade or CONNECT
            // stays HTTP/1 to the peer, and which request is one is known only
            // after its head was parsed.
            http1_case,
            header_port,
            header_names_protocol: endpoint.http_via == HttpVia::Header,
        },
        tls,
        labels: endpoint.labels.clone(),
    }
}

/// How one request is sent upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// As it came, over HTTP/1.
    Http1,
    /// An `Upgrade` or `CONNECT`: over HTTP/1, and the connection becomes a tunnel.
    Tunnel,
    /// As it came, over HTTP/2.
    Http2,
    /// HTTP/1 carried over HTTP/2 between proxies (`l5d-orig-proto`).
    UpgradeToHttp2,
    /// Restored to the HTTP/1 request the peer proxy's client sent.
    DowngradeToHttp1,
}

/// How `request` goes to an upstream that takes HTTP/2 from us when `h2_upgrade`.
fn mode<B>(role: &Role, request: &Request<B>, h2_upgrade: bool) -> Mode {
    let http2 = request.version() == Version::HTTP_2;
    match role {
        Role::Inbound { .. } if http2 && orig_proto::is_downgradable(request) => {
            Mode::DowngradeToHttp1
        }
        _ if http2 => Mode::Http2,
        _ if is_upgrade(request) => Mode::Tunnel,
        Role::Outbound if h2_upgrade => Mode::UpgradeToHttp2,
        _ => Mode::Http1,
    }
}

/// A connection ready to take one request.
enum Ready {
    Http1(ReadyH1),
    Http2(Sender2),
}

/// An upstream a connection's requests go to, with its pool and the series of the
/// connection's last authority to it (almost every connection sends one).
struct Bound {
    upstream: Upstream,
    pool: Arc<Pool>,
    series: ArcSwapOption<CachedSeries>,
}

/// The most upstreams one connection remembers when balancing; beyond it, a
/// request to another endpoint binds afresh.
const BOUND_CACHE: usize = 64;

/// Where a connection's requests go, with what is bound once per connection.
enum ConnTarget {
    One(Arc<Bound>),
    Balance {
        balancer: Arc<Balancer>,
        meshed: bool,
        bound: Mutex<Vec<(Arc<Member>, Arc<Bound>)>>,
    },
    Fail(ErrorKind),
}

impl ConnTarget {
    fn new(proxy: &HttpProxy, target: Target) -> ConnTarget {
        match target {
            Target::Upstream(upstream) => ConnTarget::One(proxy.bind(upstream)),
            Target::Balance { balancer, meshed } => ConnTarget::Balance {
                balancer,
                meshed,
                bound: Mutex::new(Vec::new()),
            },
            Target::Fail(kind) => ConnTarget::Fail(kind),
        }
    }

    /// Whether a request sent now would be taken: a balancer in fail-fast is not.
    fn available(&self, queue: crate::config::Queue) -> bool {
        match self {
            ConnTarget::Balance { balancer, .. } => balancer.available(queue),
            ConnTarget::One(_) | ConnTarget::Fail(_) => true,
        }
    }
}

/// A connection's targets for the route backends of one routing, by slot.
struct RoutedConn {
    routing: Arc<Routing>,
    slots: Vec<RoutedSlot>,
    /// The proxy's, copied here: a routed request reads it to find its backends
    /// available.
    queue: crate::config::Queue,
}

/// A connection's view of its destination's routing: the routing cell's current
/// value, told changed by one pointer read (no reference taken per request), and the
/// connection's targets for it.
struct RoutedCache {
    routing: arc_swap::Cache<Arc<RoutingCell>, Arc<Routing>>,
    conn: Option<Arc<RoutedConn>>,
}

/// One route backend, as a connection's request reaches it: together, what a request
/// sent to it reads.
struct RoutedSlot {
    target: ConnTarget,
    series: Arc<BackendSeries>,
}

/// One accepted HTTP connection.
pub struct ServerConn {
    proxy: Arc<HttpProxy>,
    role: Role,
    target: ConnTarget,
    logical: SocketAddr,
    http1_case: bool,
    /// Used as `:authority` for an upgraded HTTP/1.0 request that named none.
    fallback_authority: Authority,
    /// Inbound: the verified client identity as an `l5d-client-id` value, made once
    /// per connection rather than per request.
    client_id: Option<HeaderValue>,
    authority_labels: bool,
    /// Inbound, under Linkerd's policy controller: each request is authorized.
    authz: Option<RequestAuthz>,
    /// Outbound, the control plane's routes, and this connection's targets for the
    /// backends of the routing it last used.
    routes: Option<Mutex<RoutedCache>>,
    meshed: bool,
}

struct CachedSeries {
    authority: Option<Box<str>>,
    handle: SeriesHandle,
}

/// Serves a client connection detected as HTTP/1 or HTTP/2 (`protocol`); `prefix` is
/// what detection already read from it; `authz`, when there is a policy to apply,
/// authorizes each request before it goes anywhere.
pub async fn serve_connection<C: Transport + 'static>(
    proxy: &Arc<HttpProxy>,
    client: Downstream<C>,
    prefix: Vec<u8>,
    protocol: Protocol,
    route: Route,
    authz: Option<RequestAuthz>,
) -> Result<(), ConnError> {
    let client_id = match &route.role {
        Role::Inbound { client_id } => client_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok()),
        Role::Outbound => None,
    };
    let target = ConnTarget::new(proxy, route.target);
    let connection = Arc::new(ServerConn {
        proxy: proxy.clone(),
        role: route.role,
        target,
        logical: route.logical,
        http1_case: route.http1_case,
        fallback_authority: Authority::try_from(route.logical.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("localhost")),
        client_id,
        authority_labels: proxy.config.authority_labels,
        authz,
        routes: route.routes.map(|cell| {
            Mutex::new(RoutedCache {
                routing: arc_swap::Cache::new(cell),
                conn: None,
            })
        }),
        meshed: route.meshed,
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

impl HttpProxy {
    fn bind(&self, upstream: Upstream) -> Arc<Bound> {
        Arc::new(Bound {
            pool: self.pools.pool(upstream.pool.clone(), &upstream.labels),
            upstream,
            series: ArcSwapOption::empty(),
        })
    }
}

/// How many endpoints a request tries when their connections fail before it is sent.
const ATTEMPTS: usize = 3;

/// A request's way upstream: where, over which connection, and (when balanced) the
/// endpoint it holds in flight.
struct Dispatch {
    bound: Arc<Bound>,
    mode: Mode,
    ready: Ready,
    picked: Option<Picked>,
}

impl ServerConn {
    /// The series of requests with `authority` to `bound`.
    fn series(&self, bound: &Bound, authority: Option<&str>) -> SeriesHandle {
        if let Some(cached) = &*bound.series.load() {
            if cached.authority.as_deref() == authority {
                return cached.handle.clone();
            }
        }
        let upstream = &bound.upstream;
        let handle = self.proxy.metrics.http.series(
            authority,
            upstream.pool.target,
            &upstream.tls,
            &upstream.labels,
        );
        bound.series.store(Some(Arc::new(CachedSeries {
            authority: authority.map(Box::from),
            handle: handle.clone(),
        })));
        handle
    }

    /// The informational headers of the proxy's own error response.
    fn informational(&self, kind: ErrorKind) -> errors::Informational {
        let (outbound, meshed_client) = match &self.role {
            Role::Outbound => (true, false),
            Role::Inbound { client_id } => (false, client_id.is_some()),
        };
        errors::Informational::for_response(outbound, meshed_client, kind)
    }

    /// The series of a request that reached no upstream.
    fn unrouted_series(&self, authority: Option<&str>) -> SeriesHandle {
        let tls = TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery);
        self.proxy
            .metrics
            .http
            .series(authority, self.logical, &tls, &Arc::default())
    }

    /// The upstream for `member`'s endpoint, bound once per connection.
    fn bound_for(
        &self,
        member: &Arc<Member>,
        meshed: bool,
        cache: &Mutex<Vec<(Arc<Member>, Arc<Bound>)>>,
    ) -> Arc<Bound> {
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, bound)) = cache.iter().find(|(m, _)| Arc::ptr_eq(m, member)) {
            return bound.clone();
        }
        let upstream = outbound_upstream(&member.endpoint, meshed, self.http1_case);
        let bound = self.proxy.bind(upstream);
        if cache.len() < BOUND_CACHE {
            cache.push((member.clone(), bound.clone()));
        }
        bound
    }

    /// Chooses the upstream and a connection to it. A connection that fails before
    /// the request is sent backs its endpoint off, and the request tries another.
    async fn dispatch<B>(
        &self,
        target: &ConnTarget,
        request: &Request<B>,
    ) -> Result<Dispatch, ErrorKind> {
        let (balancer, meshed, cache) = match target {
            ConnTarget::Fail(kind) => return Err(*kind),
            ConnTarget::One(bound) => {
                let mode = mode(&self.role, request, bound.upstream.h2_upgrade);
                let ready = ready(&bound.pool, mode).await?;
                return Ok(Dispatch {
                    bound: bound.clone(),
                    mode,
                    ready,
                    picked: None,
                });
            }
            ConnTarget::Balance {
                balancer,
                meshed,
                bound,
            } => (balancer, *meshed, bound),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let picked = balancer
                .pick(self.proxy.queue)
                .await
                .map_err(|error| match error {
                    PickError::FailFast => ErrorKind::FailFast,
                    PickError::LoadShed => ErrorKind::LoadShed,
                })?;
            let bound = self.bound_for(&picked.member, meshed, cache);
            let mode = mode(&self.role, request, bound.upstream.h2_upgrade);
            match ready(&bound.pool, mode).await {
                Ok(ready) => {
                    picked.member.succeeded();
                    return Ok(Dispatch {
                        bound,
                        mode,
                        ready,
                        picked: Some(picked),
                    });
                }
                Err(kind) if kind.is_dial() && attempt < ATTEMPTS => {
                    debug!(endpoint = %picked.member.endpoint.addr, ?kind, "endpoint failed; trying another");
                    balancer.failed(&picked.member);
                }
                Err(kind) => {
                    if kind.is_dial() {
                        balancer.failed(&picked.member);
                    }
                    return Err(kind);
                }
            }
        }
    }

    /// Sends `request` the way `dispatch` chose.
    async fn forward(
        &self,
        mut request: Request<RecvBody>,
        dispatch: Dispatch,
    ) -> Result<(Response<RecvBody>, Option<Checkin>), ErrorKind> {
        if let Role::Inbound { .. } = &self.role {
            // Only the proxy vouches for a client's identity: whatever the client
            // itself put in the header goes (`insert` replaces every value).
            match &self.client_id {
                Some(id) => request.headers_mut().insert(L5D_CLIENT_ID, id.clone()),
                None => request.headers_mut().remove(L5D_CLIENT_ID),
            };
        }
        let pool = &dispatch.bound.pool;
        match (dispatch.mode, dispatch.ready) {
            (Mode::Http2, Ready::Http2(sender)) => {
                Ok((Pool::send_h2(sender, request).await?, None))
            }
            (Mode::UpgradeToHttp2, Ready::Http2(sender)) => {
                let version = orig_proto::upgrade(&mut request, &self.fallback_authority);
                let mut response = Pool::send_h2(sender, request).await?;
                orig_proto::restore(&mut response, version);
                Ok((response, None))
            }
            (Mode::DowngradeToHttp1, Ready::Http1(ready)) => {
                let original = orig_proto::downgrade(&mut request);
                let (mut response, checkin) = pool.send_h1(ready, request).await?;
                if let Some(original) = original {
                    response
                        .headers_mut()
                        .insert(orig_proto::L5D_ORIG_PROTO, original);
                }
                Ok((response, Some(checkin)))
            }
            (Mode::Tunnel, Ready::Http1(ready)) => self.tunnel(pool, ready, request).await,
            (_, Ready::Http1(ready)) => {
                let (response, checkin) = pool.send_h1(ready, request).await?;
                Ok((response, Some(checkin)))
            }
            (_, Ready::Http2(sender)) => Ok((Pool::send_h2(sender, request).await?, None)),
        }
    }

    /// An `Upgrade` or `CONNECT` over HTTP/1: when the destination accepts it, both
    /// connections become one byte stream, forwarded like opaque TCP.
    async fn tunnel(
        &self,
        pool: &Arc<Pool>,
        ready: ReadyH1,
        mut request: Request<RecvBody>,
    ) -> Result<(Response<RecvBody>, Option<Checkin>), ErrorKind> {
        let downstream = hyper::upgrade::on(&mut request);
        let connect = request.method() == Method::CONNECT;
        let (mut response, checkin) = pool.send_h1(ready, request).await?;
        let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (connect && response.status().is_success());
        if !switched {
            return Ok((response, Some(checkin)));
        }
        let upstream = hyper::upgrade::on(&mut response);
        let target = pool.target();
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

/// A connection of `pool` for a request sent in `mode`.
async fn ready(pool: &Pool, mode: Mode) -> Result<Ready, ErrorKind> {
    match mode {
        Mode::Http2 | Mode::UpgradeToHttp2 => pool.ready_h2().await.map(Ready::Http2),
        Mode::Http1 | Mode::Tunnel | Mode::DowngradeToHttp1 => {
            pool.ready_h1().await.map(Ready::Http1)
        }
    }
}

/// A request's answer from upstream, before it goes back to the client.
struct Answer {
    response: Response<RecvBody>,
    checkin: Option<Checkin>,
    picked: Option<Picked>,
    series: SeriesHandle,
}

impl ServerConn {
    /// The routing to use now and this connection's targets for it, rebuilt when the
    /// policy changed since the connection's last request.
    fn routed(&self, cache: &Mutex<RoutedCache>) -> Arc<RoutedConn> {
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        let RoutedCache { routing, conn } = &mut *cache;
        let routing = routing.load();
        if let Some(routed) = conn {
            if Arc::ptr_eq(&routed.routing, routing) {
                return routed.clone();
            }
        }
        let slots = routing
            .backends
            .iter()
            .map(|b| {
                let target = outbound_target(&b.backend, self.meshed, self.http1_case);
                RoutedSlot {
                    target: ConnTarget::new(&self.proxy, target),
                    series: b.series.clone(),
                }
            })
            .collect();
        let routed = Arc::new(RoutedConn {
            routing: routing.clone(),
            slots,
            queue: self.proxy.queue,
        });
        *conn = Some(routed.clone());
        routed
    }

    /// Sends `request` to `target` once: picks the endpoint and connection, counts
    /// it in the endpoint's series (`response_total` is per attempt, as Linkerd's).
    async fn attempt(
        &self,
        target: &ConnTarget,
        request: Request<RecvBody>,
        authority: Option<&str>,
        start: Instant,
    ) -> Result<Answer, ErrorKind> {
        let mut dispatch = match self.dispatch(target, &request).await {
            Ok(dispatch) => dispatch,
            Err(kind) => {
                let series = self.unrouted_series(authority);
                series.request();
                series.response(Outcome::Error(kind), start.elapsed());
                return Err(kind);
            }
        };
        // Only a single meshed endpoint's `close` closes the application's connection, as
        // in linkerd2-proxy: behind a balancer the next request goes elsewhere anyway.
        let closable = dispatch.picked.is_none() && dispatch.bound.upstream.pool.peer.is_some();
        let series = self.series(&dispatch.bound, authority);
        series.request();
        let picked = dispatch.picked.take();
        let sent = picked.is_some().then(Instant::now);
        match self.forward(request, dispatch).await {
            Ok((mut response, checkin)) => {
                if let (Some(picked), Some(sent)) = (&picked, sent) {
                    picked.answered(sent);
                }
                if self.role == Role::Outbound {
                    let close = errors::strip_peer_headers(response.headers_mut());
                    if close && closable && self.http1_case {
                        response
                            .headers_mut()
                            .insert(CONNECTION, HeaderValue::from_static("close"));
                    }
                }
                Ok(Answer {
                    response,
                    checkin,
                    picked,
                    series,
                })
            }
            Err(kind) => {
                series.response(Outcome::Error(kind), start.elapsed());
                Err(kind)
            }
        }
    }
}

impl Answer {
    /// The response to hand the client, measured as its body ends.
    fn into_response(self, start: Instant) -> Response<ResponseBody> {
        let recorder = Recorder {
            series: self.series,
            start,
            first_byte: None,
            status: self.response.status().as_u16(),
            grpc: body::grpc_status(self.response.headers()),
        };
        let (parts, body) = self.response.into_parts();
        let body = ResponseBody::new(body, recorder, self.checkin, self.picked);
        Response::from_parts(parts, body)
    }
}

/// Handles one request: forwards it and wraps the response so its end is measured.
async fn handle(
    connection: Arc<ServerConn>,
    mut request: Request<RecvBody>,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let grpc = errors::is_grpc(&request);
    let authority = if connection.authority_labels {
        authority_of(&request).map(Box::<str>::from)
    } else {
        None
    };
    if let Some(authz) = &connection.authz {
        if let Err(kind) = authz
            .check(&request, authority_of(&request))
            .map_err(ErrorKind::from)
        {
            let series = connection.unrouted_series(authority.as_deref());
            series.request();
            series.response(Outcome::Error(kind), start.elapsed());
            return errors::respond(kind, grpc, connection.informational(kind));
        }
    }
    let mut once = None;
    if let Some(cache) = &connection.routes {
        let routed = connection.routed(cache);
        let authority = authority.as_deref();
        match routed::plan(&connection, &routed, &mut request, grpc, start, authority) {
            routed::Plan::Respond(response) => return *response,
            routed::Plan::Once(planned) => once = Some((routed, planned)),
            routed::Plan::Attempts(planned) => {
                // Boxed: attempts under retries and timeouts hold more state than a
                // request sent once, and every request's future would carry it.
                let attempts = routed::handle_attempts(
                    &connection,
                    &routed,
                    request,
                    planned,
                    grpc,
                    start,
                    authority,
                );
                return Box::pin(attempts).await;
            }
        }
    }
    let target = match &once {
        Some((routed, planned)) => &routed.slots[planned.slot].target,
        None => &connection.target,
    };
    let result = connection
        .attempt(target, request, authority.as_deref(), start)
        .await;
    match (result, once) {
        (Ok(answer), once) => {
            // Finished in place: a response is large, and moved as little as it can be.
            let mut response = answer.into_response(start);
            if let Some((routed, planned)) = once {
                routed::answered_once(&connection, &routed, planned, &mut response, grpc, start);
            }
            response
        }
        (Err(kind), Some((routed, planned))) => {
            routed::failed_once(&connection, &routed, planned, kind, grpc, start)
        }
        (Err(kind), None) => errors::respond(kind, grpc, connection.informational(kind)),
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

fn authority_of<B>(request: &Request<B>) -> Option<&str> {
    match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request.headers().get(HOST).and_then(|h| h.to_str().ok()),
    }
}
