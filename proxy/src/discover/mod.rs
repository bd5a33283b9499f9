//! Discovery: what the proxy knows about a destination before connecting to it.
//!
//! A logical destination (what the application dialled: a Service's ClusterIP:port,
//! or a pod's IP:port) resolves to a [`Destination`]: whether it is opaque, its own
//! metric labels, and its [`Backend`]: one endpoint to forward to, or a balancer over
//! a set of endpoints that discovery keeps up to date. An [`Endpoint`] says where to
//! connect and how: the peer proxy's identity and SNI, whether it takes HTTP/2, the
//! port it takes opaque connections on, its weight and metric labels.
//!
//! Two sources produce this model: the discovery file ([`file`]) and Linkerd's
//! control plane ([`linkerd`]). A destination neither knows is forwarded to the
//! original destination unmeshed, as Linkerd does. A source answers from its cache
//! with [`Resolution::Known`], or with [`Resolution::Pending`] while it asks, so the
//! file source never pays for a future it does not need.

pub mod accrual;
pub mod balance;
pub mod file;
pub mod file_routes;
pub mod inbound_policy;
pub mod linkerd;
pub mod outbound_routes;
pub mod route_match;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use self::balance::Balancer;
use crate::metrics::routes::{BackendSeries, RouteMetrics, RouteSeries};

/// Metric labels, sorted by name, printed as `dst_<name>` on outbound metrics.
/// Every endpoint of a Service holds a set, so a set is packed into one string
/// (`name NUL value NUL …`) instead of two strings per label; a name or value
/// that itself holds a NUL (no Kubernetes name does) is left out.
#[derive(Clone, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Labels(Box<str>);

impl Labels {
    /// Labels from pairs, sorted; a later pair with the same name wins.
    pub fn new<N: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (N, V)>) -> Labels {
        let mut labels: Vec<(N, V)> = Vec::new();
        for (name, value) in pairs {
            if name.as_ref().contains('\0') || value.as_ref().contains('\0') {
                continue;
            }
            match labels.iter_mut().find(|(n, _)| n.as_ref() == name.as_ref()) {
                Some(slot) => slot.1 = value,
                None => labels.push((name, value)),
            }
        }
        labels.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        let mut packed = String::with_capacity(
            labels
                .iter()
                .map(|(n, v)| n.as_ref().len() + v.as_ref().len() + 2)
                .sum(),
        );
        for (name, value) in &labels {
            packed.push_str(name.as_ref());
            packed.push('\0');
            packed.push_str(value.as_ref());
            packed.push('\0');
        }
        Labels(packed.into_boxed_str())
    }

    /// `self`, with `over`'s labels replacing any of the same name.
    pub fn merged(&self, over: &Labels) -> Labels {
        Labels::new(self.iter().chain(over.iter()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The labels as (name, value), sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut parts = self.0.split_terminator('\0');
        std::iter::from_fn(move || Some((parts.next()?, parts.next()?)))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// One endpoint of a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Its share of requests relative to its peers (1 by default).
    pub weight: u32,
    /// The peer proxy's identity (e.g.
    /// `web.ns.serviceaccount.identity.linkerd.cluster.local`); `None`: not meshed.
    pub identity: Option<Arc<str>>,
    /// The name to send in SNI when meshed: the identity itself when it is a DNS
    /// name; for a SPIFFE ID, the peer's `LINKERD2_PROXY_IDENTITY_SERVER_NAME`.
    pub server_name: Option<Arc<str>>,
    /// The peer proxy accepts HTTP/2 (so HTTP/1 is multiplexed over it).
    pub http2: bool,
    /// The peer proxy's inbound port for opaque connections, which carry a
    /// transport header (or ride a carrier) naming the real port.
    pub opaque_port: Option<u16>,
    /// How HTTP reaches it when it is meshed.
    pub http_via: HttpVia,
    /// Metric labels (the destination's merged under the endpoint's own).
    pub labels: Arc<Labels>,
}

/// How HTTP reaches a meshed endpoint: as linkerd2-proxy does, through its proxy's
/// inbound port whenever the control plane gives the endpoint an opaque-transport
/// port (Linkerd's default transport mode, and a pod's own opaque ports, which its
/// proxy would not detect on the application's port).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HttpVia {
    /// The application's port (the discovery file's peers).
    #[default]
    AppPort,
    /// The proxy's inbound port (`opaque_port`), behind a transport header naming the
    /// session protocol (HTTP/1 or HTTP/2, as the connection speaks).
    Header,
    /// The same, the header naming no protocol: the endpoint's port is opaque, and its
    /// proxy forwards the HTTP bytes as they come.
    OpaqueHeader,
}

impl Endpoint {
    /// The original destination itself, unmeshed: what discovery does not know.
    pub fn unmeshed(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            weight: 1,
            identity: None,
            server_name: None,
            http2: false,
            opaque_port: None,
            http_via: HttpVia::AppPort,
            labels: Arc::default(),
        }
    }
}

/// What discovery says about a logical destination.
#[derive(Debug)]
pub struct Destination {
    /// Skip protocol detection: connections are carried as bytes.
    pub opaque: bool,
    pub backend: Backend,
    /// The control plane's routes for its HTTP or gRPC requests, kept up to date as
    /// the policy changes (connections read it per request). None: every request
    /// takes the backend.
    pub routes: Option<Arc<RoutingCell>>,
}

/// A destination's routes with what they resolved to.
#[derive(Debug)]
pub struct Routing {
    pub table: Arc<outbound_routes::RouteTable>,
    /// Each route backend's, by its slot.
    pub backends: Vec<RoutedBackend>,
    /// Each route's series, by its index.
    pub series: Vec<Arc<RouteSeries>>,
}

#[derive(Debug)]
pub struct RoutedBackend {
    pub backend: Backend,
    pub series: Arc<BackendSeries>,
}

/// The latest routing of a destination: one cell per watched destination, so a policy
/// update reaches the connections already open; a request holds the routing it started
/// with until it ends.
pub type RoutingCell = arc_swap::ArcSwap<Routing>;

impl Routing {
    /// Resolves `table`'s backends with `resolve`, and finds its series in `metrics`.
    pub fn new(
        table: Arc<outbound_routes::RouteTable>,
        parent: &Labels,
        metrics: &RouteMetrics,
        mut resolve: impl FnMut(&outbound_routes::RouteBackend) -> Backend,
    ) -> Routing {
        let grpc = table.grpc;
        let mut backends: Vec<Option<RoutedBackend>> = (0..table.backends).map(|_| None).collect();
        for route in &table.routes {
            for rule in &route.rules {
                for backend in rule.backends.backends() {
                    backends[backend.slot] = Some(RoutedBackend {
                        backend: resolve(backend),
                        series: metrics.backend(grpc, parent, &route.labels, &backend.labels),
                    });
                }
            }
        }
        let series = table
            .routes
            .iter()
            .map(|route| metrics.route(grpc, parent, &route.labels))
            .collect();
        Routing {
            backends: backends
                .into_iter()
                .map(|b| {
                    b.unwrap_or_else(|| RoutedBackend {
                        backend: Backend::Refused(Refusal::Invalid),
                        series: metrics.backend(
                            grpc,
                            parent,
                            &Labels::default(),
                            &Labels::default(),
                        ),
                    })
                })
                .collect(),
            series,
            table,
        }
    }
}

impl Destination {
    /// A destination discovery does not know: its own address, unmeshed.
    pub fn fallback(addr: SocketAddr) -> Arc<Destination> {
        Arc::new(Destination {
            opaque: false,
            backend: Backend::Forward(Arc::new(Endpoint::unmeshed(addr))),
            routes: None,
        })
    }
}

/// Where a destination's connections and requests go.
#[derive(Clone, Debug)]
pub enum Backend {
    /// To one endpoint.
    Forward(Arc<Endpoint>),
    /// To one of a set of endpoints, chosen per request (HTTP) or per connection.
    Balance(Arc<Balancer>),
    /// Nowhere: the control plane forbids it (a Service port it does not define)
    /// or described it in a way the proxy cannot use.
    Refused(Refusal),
}

/// Why a destination takes no traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The policy forbids it.
    Forbidden,
    /// The policy is invalid (Linkerd fails such destinations the same way).
    Invalid,
}

/// Why discovery could not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscoveryError {
    /// The control plane was not reached within the fail-fast timeout.
    Unavailable,
}

impl fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscoveryError::Unavailable => f.write_str("the control plane is unavailable"),
        }
    }
}

/// The result of a lookup.
pub type Resolved = Result<Arc<Destination>, DiscoveryError>;

/// The answer to a lookup: known now, or once the source has asked elsewhere.
pub enum Resolution<'a> {
    Known(Resolved),
    Pending(Pin<Box<dyn Future<Output = Resolved> + Send + 'a>>),
}

impl Resolution<'_> {
    pub async fn resolved(self) -> Resolved {
        match self {
            Resolution::Known(resolved) => resolved,
            Resolution::Pending(lookup) => lookup.await,
        }
    }
}

/// A source of discovery information.
pub trait Discover: Send + Sync + 'static {
    fn resolve(&self, target: SocketAddr) -> Resolution<'_>;
}

/// No discovery configured: every destination is unmeshed.
pub struct NoDiscovery;

impl Discover for NoDiscovery {
    fn resolve(&self, target: SocketAddr) -> Resolution<'_> {
        Resolution::Known(Ok(Destination::fallback(target)))
    }
}

/// Two sources: the first's answer where it knows the destination, else the
/// second's (the discovery file beside the control plane, for peers outside the
/// cluster).
pub struct Layered {
    pub first: Arc<file::FileDiscovery>,
    pub then: Arc<dyn Discover>,
}

impl Discover for Layered {
    fn resolve(&self, target: SocketAddr) -> Resolution<'_> {
        match self.first.lookup(target) {
            Some(destination) => Resolution::Known(Ok(destination)),
            None => self.then.resolve(target),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_sorted_and_merged_by_name() {
        let pairs = |p: &[(&str, &str)]| Labels::new(p.iter().copied());
        let service = pairs(&[("service", "web"), ("namespace", "prod")]);
        let pod = pairs(&[("pod", "web-1"), ("namespace", "other")]);
        let merged = service.merged(&pod);
        assert_eq!(
            merged,
            pairs(&[("namespace", "other"), ("pod", "web-1"), ("service", "web")])
        );
        assert_eq!(merged.get("pod"), Some("web-1"));
        assert_eq!(merged.get("absent"), None);
        assert!(Labels::default().is_empty());
        assert_eq!(Labels::default().iter().count(), 0);
        assert_eq!(
            merged.iter().collect::<Vec<_>>(),
            [("namespace", "other"), ("pod", "web-1"), ("service", "web")]
        );
        assert_eq!(
            pairs(&[("a", "x\0y"), ("b", "")])
                .iter()
                .collect::<Vec<_>>(),
            [("b", "")]
        );
    }
}
