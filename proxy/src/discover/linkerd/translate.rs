//! Linkerd's control-plane messages, read into Tandem's model: pure functions,
//! tested against messages built from the `linkerd2-proxy-api` crate and fuzzed.
//!
//! - [`endpoint`]: a `WeightedAddr` (from `Destination.Get`, a profile's `endpoint`
//!   or a `Forward` backend) to an [`Endpoint`];
//! - [`EndpointSet::apply`]: a `Destination.Get` update to the endpoint set, with
//!   Linkerd's rules after a reconnect;
//! - [`spec`]: what `OutboundPolicies.Watch` and `Destination.GetProfile` say of a
//!   target, combined as linkerd2-proxy combines them (`linkerd-control-plane.md`
//!   §3.1), to the destination's shape ([`Spec`]). Routes are read for their
//!   default backend only; route matching comes with routes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use linkerd2_proxy_api::destination::{self as dst, protocol_hint, tls_identity};
use linkerd2_proxy_api::meta::{metadata, Metadata};
use linkerd2_proxy_api::outbound::{self as ob, backend, proxy_protocol};

use crate::discover::balance::BalancerName;
use crate::discover::outbound_routes::{
    read_accrual, read_grpc_routes, read_http_routes, RouteTable,
};
use crate::discover::{Endpoint, HttpVia, Labels, Refusal};

/// An endpoint from a `WeightedAddr`, with `set_labels` (the update's) under its
/// own. `None` for an entry without a usable address, which Linkerd skips too.
pub fn endpoint(
    addr: &dst::WeightedAddr,
    set_labels: &HashMap<String, String>,
) -> Option<Endpoint> {
    let tcp = addr.addr?;
    let port = u16::try_from(tcp.port).ok().filter(|p| *p != 0)?;
    let ip = std::net::IpAddr::try_from(tcp.ip?).ok()?;
    let (identity, server_name) = tls(addr.tls_identity.as_ref());
    let hint = addr.protocol_hint.as_ref();
    let http2 = matches!(
        hint.and_then(|h| h.protocol.as_ref()),
        Some(protocol_hint::Protocol::H2(_))
    );
    let opaque_port = hint
        .and_then(|h| h.opaque_transport.as_ref())
        .and_then(|t| u16::try_from(t.inbound_port).ok())
        .filter(|p| *p != 0 && *p != u16::MAX);
    let labels = Labels::new(set_labels.iter().chain(addr.metric_labels.iter()));
    Some(Endpoint {
        addr: SocketAddr::new(ip, port),
        weight: if addr.weight == 0 { 1 } else { addr.weight },
        // Without an identity there is no mTLS, so no peer proxy to upgrade to or to
        // send opaque connections through.
        http2: http2 && identity.is_some(),
        opaque_port: opaque_port.filter(|_| identity.is_some()),
        http_via: match hint.and_then(|h| h.protocol.as_ref()) {
            _ if opaque_port.is_none() || identity.is_none() => HttpVia::AppPort,
            Some(protocol_hint::Protocol::Opaque(_)) => HttpVia::OpaqueHeader,
            _ => HttpVia::Header,
        },
        identity,
        server_name,
        labels: Arc::new(labels),
    })
}

/// The identity a peer must prove and the SNI to reach it by: a DNS identity is its
/// own SNI unless `server_name` says otherwise; a URI identity needs a server name
/// (SNI cannot carry a URI), and without one there is no TLS, as in Linkerd.
fn tls(identity: Option<&dst::TlsIdentity>) -> (Option<Arc<str>>, Option<Arc<str>>) {
    let Some(identity) = identity else {
        return (None, None);
    };
    let server_name = identity
        .server_name
        .as_ref()
        .map(|n| n.name.to_ascii_lowercase())
        .filter(|n| rustls::pki_types::DnsName::try_from(n.as_str()).is_ok());
    match &identity.strategy {
        Some(tls_identity::Strategy::DnsLikeIdentity(dns)) => {
            let name = dns.name.to_ascii_lowercase();
            if rustls::pki_types::DnsName::try_from(name.as_str()).is_err() {
                return (None, None);
            }
            let name: Arc<str> = Arc::from(name);
            let sni = match server_name {
                Some(sni) if *sni != *name => Arc::from(sni),
                _ => name.clone(),
            };
            (Some(name), Some(sni))
        }
        Some(tls_identity::Strategy::UriLikeIdentity(uri)) => match server_name {
            Some(sni) if !uri.uri.is_empty() => {
                (Some(Arc::from(uri.uri.as_str())), Some(Arc::from(sni)))
            }
            _ => (None, None),
        },
        None => (None, None),
    }
}

/// The pods of a Service mostly share a service account, hence an identity: an
/// update's endpoints share one copy of each name instead of holding their own.
#[derive(Default)]
struct SharedNames(Vec<Arc<str>>);

impl SharedNames {
    /// How many distinct names are remembered; beyond that, names are kept as given.
    const LIMIT: usize = 8;

    fn share(&mut self, mut endpoint: Endpoint) -> Endpoint {
        for name in [&mut endpoint.identity, &mut endpoint.server_name]
            .into_iter()
            .flatten()
        {
            match self.0.iter().find(|known| **known == *name) {
                Some(known) => *name = known.clone(),
                None if self.0.len() < Self::LIMIT => self.0.push(name.clone()),
                None => {}
            }
        }
        endpoint
    }
}

/// The endpoints `Destination.Get` has given one path.
#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: BTreeMap<SocketAddr, Arc<Endpoint>>,
    /// The stream was (re)opened and has sent nothing yet.
    fresh: bool,
}

impl EndpointSet {
    /// The stream was (re)opened: its first `Add` replaces the set.
    pub fn reconnected(&mut self) {
        self.fresh = true;
    }

    /// Applies one update; `true` when the set changed. After a reconnect the first
    /// `Add` replaces the set and a first `Remove` is ignored; `NoEndpoints` empties
    /// it; an `Add` with no usable address changes nothing (Linkerd's rules).
    pub fn apply(&mut self, update: &dst::Update) -> bool {
        let Some(update) = &update.update else {
            return false;
        };
        let fresh = std::mem::take(&mut self.fresh);
        match update {
            dst::update::Update::Add(set) => {
                let mut names = SharedNames::default();
                let added: Vec<Endpoint> = set
                    .addrs
                    .iter()
                    .filter_map(|a| endpoint(a, &set.metric_labels))
                    .map(|e| names.share(e))
                    .collect();
                if added.is_empty() {
                    self.fresh = fresh;
                    return false;
                }
                if fresh {
                    self.endpoints.clear();
                }
                for endpoint in added {
                    self.endpoints.insert(endpoint.addr, Arc::new(endpoint));
                }
                true
            }
            dst::update::Update::Remove(set) => {
                if fresh {
                    return false;
                }
                let before = self.endpoints.len();
                for addr in &set.addrs {
                    if let Ok(addr) = SocketAddr::try_from(*addr) {
                        self.endpoints.remove(&addr);
                    }
                }
                self.endpoints.len() != before
            }
            dst::update::Update::NoEndpoints(_) => {
                let changed = !self.endpoints.is_empty();
                self.endpoints.clear();
                changed
            }
        }
    }

    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints.values().cloned().collect()
    }
}

/// What the policy API answered for a target.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyAnswer {
    Policy(Box<ob::OutboundPolicy>),
    /// `NotFound` or `Unimplemented`: the control plane does not know the target.
    Unknown,
    /// `InvalidArgument` or `FailedPrecondition`: it never will.
    Rejected,
}

/// The shape of a destination as the control plane describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub opaque: bool,
    pub backend: BackendSpec,
    /// The policy's parent (the Service), as `parent_*` labels.
    pub parent: Labels,
    /// The policy's HTTP or gRPC routes; none for an opaque or unknown destination.
    pub routes: Option<Arc<RouteTable>>,
}

/// Where a destination's traffic goes.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendSpec {
    /// The original destination, unmeshed: the control plane does not know it.
    Fallback,
    Forward(Endpoint),
    /// Endpoints from `Destination.Get` on `path`.
    Balance {
        path: String,
        name: BalancerName,
    },
    /// A distribution with no backend: never ready.
    Empty {
        name: BalancerName,
    },
    Refused(Refusal),
}

/// What a policy says, read once when it arrives (the message itself is not kept).
#[derive(Clone, Debug, PartialEq)]
pub enum PolicySpec {
    Known(Spec),
    /// The control plane does not know the target.
    Unknown,
    /// It rejected the target for good.
    Rejected,
}

/// What a profile says: a forced opaque protocol, and a pod's endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProfileSpec {
    pub opaque: bool,
    pub endpoint: Option<Endpoint>,
}

/// Reads a profile (`None`: none was asked for, or the controller has none).
pub fn read_profile(profile: Option<&dst::DestinationProfile>) -> ProfileSpec {
    ProfileSpec {
        opaque: profile.is_some_and(|p| p.opaque_protocol),
        endpoint: profile
            .and_then(|p| p.endpoint.as_ref())
            .and_then(|e| endpoint(e, &HashMap::new())),
    }
}

/// The destination a policy and a profile describe together, as linkerd2-proxy
/// combines them: the policy when there is one (a profile can still force opaque);
/// without one, the profile's endpoint (a pod's address), else the original
/// destination unmeshed.
pub fn combine(policy: &PolicySpec, profile: &ProfileSpec) -> Spec {
    match policy {
        PolicySpec::Known(spec) => Spec {
            opaque: spec.opaque || profile.opaque,
            ..spec.clone()
        },
        PolicySpec::Rejected => Spec {
            opaque: profile.opaque,
            backend: BackendSpec::Refused(Refusal::Invalid),
            parent: Labels::default(),
            routes: None,
        },
        PolicySpec::Unknown => Spec {
            opaque: profile.opaque,
            backend: profile
                .endpoint
                .clone()
                .map_or(BackendSpec::Fallback, BackendSpec::Forward),
            parent: Labels::default(),
            routes: None,
        },
    }
}

/// The destination `policy` and `profile` describe for `target`.
pub fn spec(
    target: SocketAddr,
    policy: &PolicyAnswer,
    profile: Option<&dst::DestinationProfile>,
) -> Spec {
    combine(&read_policy(target, policy), &read_profile(profile))
}

/// Reads a policy answer for `target`.
pub fn read_policy(target: SocketAddr, policy: &PolicyAnswer) -> PolicySpec {
    let policy = match policy {
        PolicyAnswer::Policy(policy) => &**policy,
        PolicyAnswer::Rejected => return PolicySpec::Rejected,
        PolicyAnswer::Unknown => return PolicySpec::Unknown,
    };
    let parent = meta_labels("parent", policy.metadata.as_ref(), target.port());
    let kind = policy.protocol.as_ref().and_then(|p| p.kind.as_ref());
    let (opaque, backend) = match kind {
        None => (false, BackendSpec::Refused(Refusal::Invalid)),
        Some(proxy_protocol::Kind::Detect(detect)) => {
            let http = detect
                .http1
                .as_ref()
                .map(|h| http_backend(&h.routes, &parent, target))
                .or_else(|| {
                    detect
                        .http2
                        .as_ref()
                        .map(|h| http_backend(&h.routes, &parent, target))
                });
            let opaque = detect
                .opaque
                .as_ref()
                .map(|o| opaque_backend(&o.routes, &parent, target));
            (
                false,
                http.or(opaque)
                    .unwrap_or(BackendSpec::Refused(Refusal::Invalid)),
            )
        }
        Some(proxy_protocol::Kind::Http1(h)) => (false, http_backend(&h.routes, &parent, target)),
        Some(proxy_protocol::Kind::Http2(h)) => (false, http_backend(&h.routes, &parent, target)),
        Some(proxy_protocol::Kind::Grpc(g)) => (false, grpc_backend(&g.routes, &parent, target)),
        Some(proxy_protocol::Kind::Opaque(o)) => (true, opaque_backend(&o.routes, &parent, target)),
        Some(proxy_protocol::Kind::Tls(t)) => (true, tls_backend(&t.routes, &parent, target)),
    };
    let routes = read_routes(kind, &parent, target).map(Arc::new);
    PolicySpec::Known(Spec {
        opaque,
        backend,
        parent,
        routes,
    })
}

/// The route table of a policy's HTTP or gRPC protocol: with detection, HTTP/1's
/// routes (the controller sends HTTP/2 the same ones).
fn read_routes(
    kind: Option<&proxy_protocol::Kind>,
    parent: &Labels,
    target: SocketAddr,
) -> Option<RouteTable> {
    let http = |routes: &[ob::HttpRoute], accrual: Option<&ob::FailureAccrual>| RouteTable {
        accrual: read_accrual(accrual),
        ..read_http_routes(routes, parent, target)
    };
    match kind? {
        proxy_protocol::Kind::Detect(detect) => match (&detect.http1, &detect.http2) {
            (Some(h), _) => Some(http(&h.routes, h.failure_accrual.as_ref())),
            (None, Some(h)) => Some(http(&h.routes, h.failure_accrual.as_ref())),
            (None, None) => None,
        },
        proxy_protocol::Kind::Http1(h) => Some(http(&h.routes, h.failure_accrual.as_ref())),
        proxy_protocol::Kind::Http2(h) => Some(http(&h.routes, h.failure_accrual.as_ref())),
        proxy_protocol::Kind::Grpc(g) => Some(RouteTable {
            accrual: read_accrual(g.failure_accrual.as_ref()),
            ..read_grpc_routes(&g.routes, parent, target)
        }),
        proxy_protocol::Kind::Opaque(_) | proxy_protocol::Kind::Tls(_) => None,
    }
}

fn http_backend(routes: &[ob::HttpRoute], parent: &Labels, target: SocketAddr) -> BackendSpec {
    use ob::http_route::distribution::Kind;
    let distribution = routes
        .first()
        .and_then(|r| r.rules.first())
        .and_then(|rule| rule.backends.as_ref())
        .and_then(|d| d.kind.as_ref());
    match distribution {
        None => BackendSpec::Refused(Refusal::Invalid),
        Some(Kind::Empty(_)) => BackendSpec::Empty {
            name: empty_name(parent),
        },
        Some(Kind::FirstAvailable(first)) => first
            .backends
            .first()
            .and_then(|b| b.backend.as_ref())
            .map_or(BackendSpec::Refused(Refusal::Invalid), |b| {
                backend_spec(b, parent, target)
            }),
        Some(Kind::RandomAvailable(random)) => random
            .backends
            .iter()
            .filter(|b| b.weight > 0)
            .find_map(|b| b.backend.as_ref()?.backend.as_ref())
            .map_or(BackendSpec::Refused(Refusal::Invalid), |b| {
                backend_spec(b, parent, target)
            }),
    }
}

fn grpc_backend(routes: &[ob::GrpcRoute], parent: &Labels, target: SocketAddr) -> BackendSpec {
    use ob::grpc_route::distribution::Kind;
    let distribution = routes
        .first()
        .and_then(|r| r.rules.first())
        .and_then(|rule| rule.backends.as_ref())
        .and_then(|d| d.kind.as_ref());
    match distribution {
        None => BackendSpec::Refused(Refusal::Invalid),
        Some(Kind::Empty(_)) => BackendSpec::Empty {
            name: empty_name(parent),
        },
        Some(Kind::FirstAvailable(first)) => first
            .backends
            .first()
            .and_then(|b| b.backend.as_ref())
            .map_or(BackendSpec::Refused(Refusal::Invalid), |b| {
                backend_spec(b, parent, target)
            }),
        Some(Kind::RandomAvailable(random)) => random
            .backends
            .iter()
            .filter(|b| b.weight > 0)
            .find_map(|b| b.backend.as_ref()?.backend.as_ref())
            .map_or(BackendSpec::Refused(Refusal::Invalid), |b| {
                backend_spec(b, parent, target)
            }),
    }
}

fn opaque_backend(routes: &[ob::OpaqueRoute], parent: &Labels, target: SocketAddr) -> BackendSpec {
    use ob::opaque_route::distribution::Kind;
    use ob::opaque_route::filter::Kind as Filter;
    let Some(rule) = routes.first().and_then(|r| r.rules.first()) else {
        return BackendSpec::Refused(Refusal::Invalid);
    };
    // Only the first filter counts, as in Linkerd: a Service port it does not
    // define comes as an opaque route whose filter forbids it.
    match rule.filters.first().and_then(|f| f.kind.as_ref()) {
        Some(Filter::Forbidden(_)) => return BackendSpec::Refused(Refusal::Forbidden),
        Some(Filter::Invalid(_)) => return BackendSpec::Refused(Refusal::Invalid),
        None => {}
    }
    match rule.backends.as_ref().and_then(|d| d.kind.as_ref()) {
        None => BackendSpec::Refused(Refusal::Invalid),
        Some(Kind::Empty(_)) => BackendSpec::Empty {
            name: empty_name(parent),
        },
        Some(Kind::FirstAvailable(first)) => first
            .backends
            .first()
            .and_then(|b| b.backend.as_ref())
            .map_or(BackendSpec::Refused(Refusal::Invalid), |b| {
                backend_spec(b, parent, target)
            }),
        Some(Kind::RandomAvailable(random)) => random
            .backends
            .iter()
            .filter(|b| b.weight > 0)
            .find_map(|b| b.backend.as_ref()?.backend.as_ref())
            .map_or(BackendSpec::Refused(Refusal::Invalid), |b| {
                backend_spec(b, parent, target)
            }),
    }
}

fn tls_backend(routes: &[ob::TlsRoute], parent: &Labels, target: SocketAddr) -> BackendSpec {
    use ob::tls_route::distribution::Kind;
    use ob::tls_route::filter::Kind as Filter;
    let Some(rule) = routes.first().and_then(|r| r.rules.first()) else {
        return BackendSpec::Refused(Refusal::Invalid);
    };
    match rule.filters.first().and_then(|f| f.kind.as_ref()) {
        Some(Filter::Forbidden(_)) => return BackendSpec::Refused(Refusal::Forbidden),
        Some(Filter::Invalid(_)) => return BackendSpec::Refused(Refusal::Invalid),
        None => {}
    }
    match rule.backends.as_ref().and_then(|d| d.kind.as_ref()) {
        None => BackendSpec::Refused(Refusal::Invalid),
        Some(Kind::Empty(_)) => BackendSpec::Empty {
            name: empty_name(parent),
        },
        Some(Kind::FirstAvailable(first)) => first
            .backends
            .first()
            .and_then(|b| b.backend.as_ref())
            .map_or(BackendSpec::Refused(Refusal::Invalid), |b| {
                backend_spec(b, parent, target)
            }),
        Some(Kind::RandomAvailable(random)) => random
            .backends
            .iter()
            .filter(|b| b.weight > 0)
            .find_map(|b| b.backend.as_ref()?.backend.as_ref())
            .map_or(BackendSpec::Refused(Refusal::Invalid), |b| {
                backend_spec(b, parent, target)
            }),
    }
}

pub fn backend_spec(backend: &ob::Backend, parent: &Labels, target: SocketAddr) -> BackendSpec {
    let name = BalancerName {
        parent: parent.clone(),
        backend: meta_labels("backend", backend.metadata.as_ref(), target.port()),
    };
    match &backend.kind {
        Some(backend::Kind::Forward(addr)) => endpoint(addr, &HashMap::new())
            .map_or(BackendSpec::Refused(Refusal::Invalid), BackendSpec::Forward),
        Some(backend::Kind::Balancer(balancer)) => {
            let path = balancer
                .discovery
                .as_ref()
                .and_then(|d| d.kind.as_ref())
                .map(|backend::endpoint_discovery::Kind::Dst(dst)| dst.path.clone())
                .filter(|path| !path.is_empty());
            match path {
                Some(path) => BackendSpec::Balance { path, name },
                None => BackendSpec::Refused(Refusal::Invalid),
            }
        }
        // Linkerd answers such a backend with 502 "no dispatcher".
        None => BackendSpec::Refused(Refusal::Invalid),
    }
}

fn empty_name(parent: &Labels) -> BalancerName {
    BalancerName {
        parent: parent.clone(),
        backend: Labels::default(),
    }
}

/// Linkerd's metric labels for a resource's metadata: `<prefix>_group`, `_kind`,
/// `_namespace`, `_name`, `_port`, `_section_name`; a default resource has group
/// `""` and kind `default`.
pub fn meta_labels(prefix: &str, metadata: Option<&Metadata>, port: u16) -> Labels {
    let (group, kind, namespace, name, section, port) = match metadata.and_then(|m| m.kind.as_ref())
    {
        Some(metadata::Kind::Resource(r)) => (
            r.group.clone(),
            r.kind.clone(),
            r.namespace.clone(),
            r.name.clone(),
            r.section.clone(),
            if r.port == 0 { u32::from(port) } else { r.port },
        ),
        Some(metadata::Kind::Default(name)) => (
            String::new(),
            "default".to_string(),
            String::new(),
            name.clone(),
            String::new(),
            u32::from(port),
        ),
        None => (
            String::new(),
            "default".to_string(),
            String::new(),
            String::new(),
            String::new(),
            u32::from(port),
        ),
    };
    Labels::new([
        (format!("{prefix}_group"), group),
        (format!("{prefix}_kind"), kind),
        (format!("{prefix}_namespace"), namespace),
        (format!("{prefix}_name"), name),
        (format!("{prefix}_port"), port.to_string()),
        (format!("{prefix}_section_name"), section),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use linkerd2_proxy_api::destination::{
        protocol_hint::{OpaqueTransport, H2},
        AddrSet, NoEndpoints, ProtocolHint, TlsIdentity, Update, WeightedAddr, WeightedAddrSet,
    };
    use linkerd2_proxy_api::meta::Resource;
    use linkerd2_proxy_api::net::TcpAddress;

    const WEB: &str = "web.prod.serviceaccount.identity.linkerd.cluster.local";

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn weighted(at: &str, identity: Option<&str>, opaque_port: Option<u32>) -> WeightedAddr {
        WeightedAddr {
            addr: Some(TcpAddress::from(addr(at))),
            weight: 10000,
            metric_labels: [("pod".to_string(), at.to_string())].into(),
            tls_identity: identity.map(|name| TlsIdentity {
                strategy: Some(tls_identity::Strategy::DnsLikeIdentity(
                    tls_identity::DnsLikeIdentity {
                        name: name.to_string(),
                    },
                )),
                server_name: None,
            }),
            protocol_hint: Some(ProtocolHint {
                protocol: Some(protocol_hint::Protocol::H2(H2 {})),
                opaque_transport: opaque_port.map(|inbound_port| OpaqueTransport { inbound_port }),
            }),
            ..Default::default()
        }
    }

    fn add(addrs: Vec<WeightedAddr>) -> Update {
        Update {
            update: Some(dst::update::Update::Add(WeightedAddrSet {
                addrs,
                metric_labels: [
                    ("service".to_string(), "web".to_string()),
                    ("pod".to_string(), "overridden".to_string()),
                ]
                .into(),
            })),
        }
    }

    fn remove(addrs: &[&str]) -> Update {
        Update {
            update: Some(dst::update::Update::Remove(AddrSet {
                addrs: addrs.iter().map(|a| TcpAddress::from(addr(a))).collect(),
            })),
        }
    }

    #[test]
    fn weighted_addrs_become_endpoints() {
        let e = endpoint(
            &weighted("10.42.0.5:8080", Some(WEB), Some(4143)),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(e.addr, addr("10.42.0.5:8080"));
        assert_eq!(e.identity.as_deref(), Some(WEB));
        assert_eq!(e.server_name.as_deref(), Some(WEB));
        assert!(e.http2);
        assert_eq!(e.opaque_port, Some(4143));
        assert_eq!(e.weight, 10000);
        assert_eq!(e.labels.get("pod"), Some("10.42.0.5:8080"));

        // Without an identity: no mTLS, so neither the upgrade nor the transport.
        let plain = endpoint(
            &weighted("10.42.0.5:8080", None, Some(4143)),
            &HashMap::new(),
        )
        .unwrap();
        assert!(plain.identity.is_none() && !plain.http2 && plain.opaque_port.is_none());

        // How HTTP reaches a meshed endpoint, as linkerd2-proxy decides it: through the
        // inbound port whenever there is an opaque-transport port, naming the session
        // protocol unless the endpoint's port is opaque.
        assert_eq!(e.http_via, HttpVia::Header);
        assert_eq!(plain.http_via, HttpVia::AppPort);
        let direct = endpoint(
            &weighted("10.42.0.5:8080", Some(WEB), None),
            &HashMap::new(),
        );
        assert_eq!(direct.unwrap().http_via, HttpVia::AppPort);
        let mut opaque = weighted("10.42.0.5:5432", Some(WEB), Some(4143));
        opaque.protocol_hint.as_mut().unwrap().protocol =
            Some(protocol_hint::Protocol::Opaque(protocol_hint::Opaque {}));
        let opaque = endpoint(&opaque, &HashMap::new()).unwrap();
        assert_eq!(opaque.http_via, HttpVia::OpaqueHeader);

        // A URI identity needs a server name.
        let mut uri = weighted("10.42.0.6:80", None, None);
        uri.tls_identity = Some(TlsIdentity {
            strategy: Some(tls_identity::Strategy::UriLikeIdentity(
                tls_identity::UriLikeIdentity {
                    uri: "spiffe://example.org/vm".into(),
                },
            )),
            server_name: None,
        });
        assert!(endpoint(&uri, &HashMap::new()).unwrap().identity.is_none());
        uri.tls_identity.as_mut().unwrap().server_name = Some(tls_identity::DnsLikeIdentity {
            name: "vm.example.org".into(),
        });
        let vm = endpoint(&uri, &HashMap::new()).unwrap();
        assert_eq!(vm.identity.as_deref(), Some("spiffe://example.org/vm"));
        assert_eq!(vm.server_name.as_deref(), Some("vm.example.org"));

        // No address, or port 0: skipped.
        assert!(endpoint(&WeightedAddr::default(), &HashMap::new()).is_none());
        let mut zero = weighted("10.42.0.5:1", None, None);
        zero.addr.as_mut().unwrap().port = 0;
        assert!(endpoint(&zero, &HashMap::new()).is_none());
    }

    #[test]
    fn updates_follow_linkerds_rules() {
        let mut set = EndpointSet::default();
        assert!(set.apply(&add(vec![
            weighted("10.42.0.5:80", Some(WEB), None),
            weighted("10.42.0.6:80", Some(WEB), None),
        ])));
        let addrs = |set: &EndpointSet| -> Vec<String> {
            set.endpoints().iter().map(|e| e.addr.to_string()).collect()
        };
        assert_eq!(addrs(&set), ["10.42.0.5:80", "10.42.0.6:80"]);
        // The pods share one copy of their identity, which is also their SNI.
        let (a, b) = (&set.endpoints()[0], &set.endpoints()[1]);
        let (a_id, b_id) = (a.identity.as_ref().unwrap(), b.identity.as_ref().unwrap());
        assert!(Arc::ptr_eq(a_id, b_id));
        assert!(Arc::ptr_eq(a_id, a.server_name.as_ref().unwrap()));
        // The endpoint's labels win over the set's.
        assert_eq!(set.endpoints()[0].labels.get("pod"), Some("10.42.0.5:80"));
        assert_eq!(set.endpoints()[0].labels.get("service"), Some("web"));
        assert!(set.apply(&remove(&["10.42.0.5:80"])));
        assert_eq!(addrs(&set), ["10.42.0.6:80"]);
        assert!(!set.apply(&remove(&["10.42.0.9:80"])));
        // An add with nothing usable is no reset.
        assert!(!set.apply(&add(vec![WeightedAddr::default()])));
        assert_eq!(addrs(&set), ["10.42.0.6:80"]);

        // After a reconnect: a first remove is ignored, the first add replaces.
        set.reconnected();
        assert!(!set.apply(&remove(&["10.42.0.6:80"])));
        assert_eq!(addrs(&set), ["10.42.0.6:80"]);
        set.reconnected();
        assert!(set.apply(&add(vec![weighted("10.42.0.7:80", None, None)])));
        assert_eq!(addrs(&set), ["10.42.0.7:80"]);
        assert!(set.apply(&add(vec![weighted("10.42.0.8:80", None, None)])));
        assert_eq!(addrs(&set), ["10.42.0.7:80", "10.42.0.8:80"]);

        let no_endpoints = Update {
            update: Some(dst::update::Update::NoEndpoints(NoEndpoints {
                exists: true,
            })),
        };
        assert!(set.apply(&no_endpoints));
        assert!(set.endpoints().is_empty());
    }

    fn service_metadata() -> Option<Metadata> {
        Some(Metadata {
            kind: Some(metadata::Kind::Resource(Resource {
                group: "core".into(),
                kind: "Service".into(),
                name: "web".into(),
                namespace: "prod".into(),
                section: String::new(),
                port: 80,
            })),
        })
    }

    fn balancer_backend(path: &str) -> ob::Backend {
        ob::Backend {
            metadata: service_metadata(),
            queue: Some(ob::Queue {
                capacity: 100,
                failfast_timeout: Some(prost_types::Duration {
                    seconds: 3,
                    nanos: 0,
                }),
            }),
            kind: Some(backend::Kind::Balancer(backend::BalanceP2c {
                discovery: Some(backend::EndpointDiscovery {
                    kind: Some(backend::endpoint_discovery::Kind::Dst(
                        backend::endpoint_discovery::DestinationGet { path: path.into() },
                    )),
                }),
                load: None,
            })),
        }
    }

    fn http_routes(backend: ob::Backend) -> Vec<ob::HttpRoute> {
        use ob::http_route::{distribution, Distribution, RouteBackend, Rule};
        vec![ob::HttpRoute {
            metadata: None,
            hosts: vec![],
            rules: vec![Rule {
                backends: Some(Distribution {
                    kind: Some(distribution::Kind::FirstAvailable(
                        distribution::FirstAvailable {
                            backends: vec![RouteBackend {
                                backend: Some(backend),
                                ..Default::default()
                            }],
                        },
                    )),
                }),
                ..Default::default()
            }],
        }]
    }

    fn opaque_routes(backend: Option<ob::Backend>, forbidden: bool) -> Vec<ob::OpaqueRoute> {
        use ob::opaque_route::{distribution, filter, Distribution, Filter, RouteBackend, Rule};
        vec![ob::OpaqueRoute {
            metadata: None,
            rules: vec![Rule {
                backends: Some(Distribution {
                    kind: Some(match backend {
                        Some(backend) => {
                            distribution::Kind::FirstAvailable(distribution::FirstAvailable {
                                backends: vec![RouteBackend {
                                    backend: Some(backend),
                                    ..Default::default()
                                }],
                            })
                        }
                        None => distribution::Kind::Empty(distribution::Empty {}),
                    }),
                }),
                filters: if forbidden {
                    vec![Filter {
                        kind: Some(filter::Kind::Forbidden(
                            linkerd2_proxy_api::opaque_route::Forbidden {},
                        )),
                    }]
                } else {
                    vec![]
                },
            }],
        }]
    }

    fn policy(kind: proxy_protocol::Kind) -> PolicyAnswer {
        PolicyAnswer::Policy(Box::new(ob::OutboundPolicy {
            metadata: service_metadata(),
            protocol: Some(ob::ProxyProtocol { kind: Some(kind) }),
        }))
    }

    #[test]
    fn policies_and_profiles_combine_as_in_linkerd() {
        let target = addr("10.96.0.10:80");
        let path = "web.prod.svc.cluster.local:80";
        let detect = policy(proxy_protocol::Kind::Detect(proxy_protocol::Detect {
            timeout: None,
            opaque: Some(proxy_protocol::Opaque {
                routes: opaque_routes(Some(balancer_backend(path)), false),
            }),
            http1: Some(proxy_protocol::Http1 {
                routes: http_routes(balancer_backend(path)),
                failure_accrual: None,
            }),
            http2: None,
        }));
        let opaque = policy(proxy_protocol::Kind::Opaque(proxy_protocol::Opaque {
            routes: opaque_routes(Some(balancer_backend(path)), false),
        }));
        let forbidden = policy(proxy_protocol::Kind::Opaque(proxy_protocol::Opaque {
            routes: opaque_routes(Some(balancer_backend(path)), true),
        }));
        let empty = policy(proxy_protocol::Kind::Opaque(proxy_protocol::Opaque {
            routes: opaque_routes(None, false),
        }));
        let opaque_profile = dst::DestinationProfile {
            opaque_protocol: true,
            ..Default::default()
        };
        let pod_profile = dst::DestinationProfile {
            endpoint: Some(weighted("10.42.0.5:8080", Some(WEB), None)),
            ..Default::default()
        };
        let parent = meta_labels("parent", service_metadata().as_ref(), 80);
        let balance = BackendSpec::Balance {
            path: path.into(),
            name: BalancerName {
                parent: parent.clone(),
                backend: meta_labels("backend", service_metadata().as_ref(), 80),
            },
        };
        let pod = endpoint(
            &weighted("10.42.0.5:8080", Some(WEB), None),
            &HashMap::new(),
        )
        .unwrap();
        let rows: Vec<(
            &str,
            PolicyAnswer,
            Option<&dst::DestinationProfile>,
            bool,
            BackendSpec,
        )> = vec![
            (
                "a Service: its balancer",
                detect.clone(),
                None,
                false,
                balance.clone(),
            ),
            (
                "an opaque Service",
                opaque.clone(),
                None,
                true,
                balance.clone(),
            ),
            (
                "a profile can force opaque",
                detect.clone(),
                Some(&opaque_profile),
                true,
                balance.clone(),
            ),
            (
                "a port the Service lacks",
                forbidden,
                None,
                true,
                BackendSpec::Refused(Refusal::Forbidden),
            ),
            (
                "no backend",
                empty,
                None,
                true,
                BackendSpec::Empty {
                    name: BalancerName {
                        parent: parent.clone(),
                        backend: Labels::default(),
                    },
                },
            ),
            (
                "a pod: the profile's endpoint",
                PolicyAnswer::Unknown,
                Some(&pod_profile),
                false,
                BackendSpec::Forward(pod),
            ),
            (
                "an address nobody knows: unmeshed",
                PolicyAnswer::Unknown,
                None,
                false,
                BackendSpec::Fallback,
            ),
            (
                "a rejected target",
                PolicyAnswer::Rejected,
                None,
                false,
                BackendSpec::Refused(Refusal::Invalid),
            ),
            (
                "a policy without a protocol",
                PolicyAnswer::Policy(Box::default()),
                None,
                false,
                BackendSpec::Refused(Refusal::Invalid),
            ),
        ];
        for (what, answer, profile, opaque, backend) in rows {
            let spec = spec(target, &answer, profile);
            assert_eq!((spec.opaque, spec.backend), (opaque, backend), "{what}");
        }
    }

    #[test]
    fn metadata_becomes_linkerds_labels() {
        let labels = meta_labels("parent", service_metadata().as_ref(), 8080);
        assert_eq!(labels.get("parent_kind"), Some("Service"));
        assert_eq!(labels.get("parent_name"), Some("web"));
        assert_eq!(labels.get("parent_namespace"), Some("prod"));
        assert_eq!(labels.get("parent_port"), Some("80"));
        let default = meta_labels(
            "backend",
            Some(&Metadata {
                kind: Some(metadata::Kind::Default("fallback".into())),
            }),
            8080,
        );
        assert_eq!(default.get("backend_kind"), Some("default"));
        assert_eq!(default.get("backend_name"), Some("fallback"));
        assert_eq!(default.get("backend_port"), Some("8080"));
    }
}
