//! A test control plane: Linkerd's Destination, OutboundPolicies and
//! InboundServerPolicies APIs served from
//! the `linkerd2-proxy-api` crate's server side (tonic), answering what each test
//! tells it at run time.
//!
//! It behaves as Linkerd's controllers do where a proxy can tell
//! (`linkerd-control-plane.md` §3.4): `Destination.Get` sends the endpoint set as
//! one `Add` when it has endpoints and nothing when it has none, then the changes as
//! `Add`s and `Remove`s; `GetProfile` answers every address with a profile (empty
//! unless the test set one); `OutboundPolicies.Watch` answers `NotFound` for a target
//! nobody described, and pushes each new policy; `InboundServerPolicies.WatchPort`
//! answers a port nobody described with the cluster default (`all-unauthenticated`,
//! as the policy controller does) and pushes each new `Server`. [`ControlPlane::stop`] takes it off
//! the network (every stream breaks), [`ControlPlane::restart`] brings it back with
//! what it knew. It serves plaintext (for a proxy on the same loopback) or TLS with
//! a certificate of the mesh, and records each call and each client identity.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An endpoint, as the tests hand them to [`ControlPlane::set_endpoints`].
pub use linkerd2_proxy_api::destination::WeightedAddr;
use linkerd2_proxy_api::destination::{
    self as dst,
    destination_server::{Destination, DestinationServer},
    protocol_hint, tls_identity, DestinationProfile, GetDestination, ProtocolHint, TlsIdentity,
    Update, WeightedAddrSet,
};
use linkerd2_proxy_api::inbound::{
    self as ib,
    inbound_server_policies_server::{InboundServerPolicies, InboundServerPoliciesServer},
    PortSpec, Server,
};
use linkerd2_proxy_api::meta::{metadata, Metadata, Resource};
use linkerd2_proxy_api::net::TcpAddress;
use linkerd2_proxy_api::outbound::{
    self as ob,
    outbound_policies_server::{OutboundPolicies, OutboundPoliciesServer},
    proxy_protocol, traffic_spec, OutboundPolicy, TrafficSpec,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::netns::Pod;

type Stream<T> = UnboundedReceiverStream<Result<T, Status>>;
type Tx<T> = mpsc::UnboundedSender<Result<T, Status>>;

/// What a policy watch is answered with.
#[derive(Clone)]
enum PolicyAnswer {
    Policy(Box<OutboundPolicy>),
    Error(tonic::Code),
}

#[derive(Default)]
struct State {
    endpoints: HashMap<String, Vec<WeightedAddr>>,
    endpoint_watchers: HashMap<String, Vec<Tx<Update>>>,
    policies: HashMap<SocketAddr, PolicyAnswer>,
    policy_watchers: HashMap<SocketAddr, Vec<Tx<OutboundPolicy>>>,
    profiles: HashMap<SocketAddr, DestinationProfile>,
    profile_watchers: HashMap<SocketAddr, Vec<Tx<DestinationProfile>>>,
    servers: HashMap<u16, Server>,
    server_watchers: HashMap<u16, Vec<Tx<Server>>>,
    calls: Vec<String>,
    workloads: Vec<String>,
    client_identities: Vec<Option<String>>,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running test control plane.
pub struct ControlPlane {
    pub addr: SocketAddr,
    state: Shared,
    namespace: String,
    tls: Option<Arc<rustls::ServerConfig>>,
    running: Mutex<Option<Running>>,
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl ControlPlane {
    /// Serves plaintext on `addr` in `pod` (loopback, for a proxy in the same pod).
    pub fn start(pod: &Pod, addr: SocketAddr) -> ControlPlane {
        ControlPlane::start_with(pod, addr, None)
    }

    /// Serves TLS with `config` on `addr` in `pod`.
    pub fn start_with(
        pod: &Pod,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> ControlPlane {
        let control = ControlPlane {
            addr,
            state: Arc::default(),
            namespace: pod.name.clone(),
            tls,
            running: Mutex::new(None),
        };
        let running = control.serve(pod);
        *control.running.lock().unwrap() = Some(running);
        control
    }

    fn serve(&self, pod: &Pod) -> Running {
        let listener = pod
            .run(|| std::net::TcpListener::bind(self.addr))
            .unwrap_or_else(|e| panic!("control plane cannot listen on {}: {e}", self.addr));
        listener.set_nonblocking(true).expect("nonblocking");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let state = self.state.clone();
        let tls = self.tls.clone();
        let thread = std::thread::spawn(move || run(listener, state, tls, stopped));
        Running { stop, thread }
    }

    /// Takes the control plane off the network: the listener closes and every open
    /// stream and connection breaks. What it knows is kept.
    pub fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(running) = running {
            let _ = running.stop.send(());
            let _ = running.thread.join();
        }
        let mut state = lock(&self.state);
        state.endpoint_watchers.clear();
        state.policy_watchers.clear();
        state.profile_watchers.clear();
    }

    /// Serves again on the same address, in the pod it was started in.
    pub fn restart(&self, pod: &Pod) {
        assert_eq!(pod.name, self.namespace, "restart in the same pod");
        self.stop();
        let running = self.serve(pod);
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(running);
    }

    /// Sets the endpoints of `path`; open `Get` streams receive the change as an
    /// `Add` of what is new and a `Remove` of what is gone.
    pub fn set_endpoints(&self, path: &str, addrs: Vec<WeightedAddr>) {
        let mut state = lock(&self.state);
        let old = state
            .endpoints
            .insert(path.to_string(), addrs.clone())
            .unwrap_or_default();
        let added: Vec<WeightedAddr> = addrs.iter().filter(|a| !old.contains(a)).cloned().collect();
        let removed: Vec<TcpAddress> = old
            .iter()
            .filter(|o| !addrs.iter().any(|a| a.addr == o.addr))
            .filter_map(|o| o.addr)
            .collect();
        let mut updates = Vec::new();
        if !removed.is_empty() {
            updates.push(Update {
                update: Some(dst::update::Update::Remove(dst::AddrSet { addrs: removed })),
            });
        }
        if !added.is_empty() {
            updates.push(add(path, added));
        }
        if let Some(watchers) = state.endpoint_watchers.get_mut(path) {
            watchers.retain(|w| updates.iter().all(|u| w.send(Ok(u.clone())).is_ok()));
        }
    }

    /// Sets the policy of `target`, pushed to open watches.
    pub fn set_policy(&self, target: SocketAddr, policy: OutboundPolicy) {
        let mut state = lock(&self.state);
        state
            .policies
            .insert(target, PolicyAnswer::Policy(Box::new(policy.clone())));
        if let Some(watchers) = state.policy_watchers.get_mut(&target) {
            watchers.retain(|w| w.send(Ok(policy.clone())).is_ok());
        }
    }

    /// Answers watches of `target` with `code` (which ends open ones).
    pub fn set_policy_error(&self, target: SocketAddr, code: tonic::Code) {
        let mut state = lock(&self.state);
        state.policies.insert(target, PolicyAnswer::Error(code));
        if let Some(watchers) = state.policy_watchers.remove(&target) {
            for w in watchers {
                let _ = w.send(Err(Status::new(code, "set by the test")));
            }
        }
    }

    /// Sets the inbound policy of `port`, pushed to open `WatchPort` streams.
    pub fn set_server(&self, port: u16, server: Server) {
        let mut state = lock(&self.state);
        state.servers.insert(port, server.clone());
        if let Some(watchers) = state.server_watchers.get_mut(&port) {
            watchers.retain(|w| w.send(Ok(server.clone())).is_ok());
        }
    }

    /// Sets the profile of `target`, pushed to open `GetProfile` streams.
    pub fn set_profile(&self, target: SocketAddr, profile: DestinationProfile) {
        let mut state = lock(&self.state);
        state.profiles.insert(target, profile.clone());
        if let Some(watchers) = state.profile_watchers.get_mut(&target) {
            watchers.retain(|w| w.send(Ok(profile.clone())).is_ok());
        }
    }

    /// Every call so far, as `get <path>`, `profile <addr>`, `watch <addr>`.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }

    /// The `source_workload` of every policy watch.
    pub fn workloads(&self) -> Vec<String> {
        lock(&self.state).workloads.clone()
    }

    /// The identity each TLS client proved (`None` for a client without one).
    pub fn client_identities(&self) -> Vec<Option<String>> {
        lock(&self.state).client_identities.clone()
    }

    /// How many `Get` streams on `path` are open now.
    pub fn endpoint_watchers(&self, path: &str) -> usize {
        let mut state = lock(&self.state);
        state.endpoint_watchers.get_mut(path).map_or(0, |watchers| {
            watchers.retain(|w| !w.is_closed());
            watchers.len()
        })
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An `add` as the destination controller sends it: the Service's labels on the
/// set (for a path `<service>.<namespace>.svc.…`), the pods' on each address.
fn add(path: &str, addrs: Vec<WeightedAddr>) -> Update {
    let mut names = path.split('.');
    let metric_labels = match (names.next(), names.next(), names.next()) {
        (Some(service), Some(namespace), Some("svc")) => [
            ("service".to_string(), service.to_string()),
            ("namespace".to_string(), namespace.to_string()),
        ]
        .into(),
        _ => HashMap::new(),
    };
    Update {
        update: Some(dst::update::Update::Add(WeightedAddrSet {
            addrs,
            metric_labels,
        })),
    }
}

fn run(
    listener: std::net::TcpListener,
    state: Shared,
    tls: Option<Arc<rustls::ServerConfig>>,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let accept = async {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = state.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_connection(stream, state).await,
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let identity = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|leaf| {
                                    let sans = tandem_identity::tls::sans(leaf);
                                    sans.dns.into_iter().next()
                                });
                            lock(&state).client_identities.push(identity);
                            serve_connection(stream, state).await
                        }
                    }
                });
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = stopped => {}
        }
    });
    // Dropping the runtime ends every open stream and connection.
    drop(runtime);
}

async fn serve_connection<S>(stream: S, state: Shared)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let destination = DestinationServer::new(Api(state.clone()));
    let policies = OutboundPoliciesServer::new(Api(state.clone()));
    let inbound = InboundServerPoliciesServer::new(Api(state));
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let destination = destination.clone();
            let policies = policies.clone();
            let inbound = inbound.clone();
            async move {
                use tower::ServiceExt;
                let path = request.uri().path();
                let response = if path.starts_with("/io.linkerd.proxy.destination.Destination/") {
                    destination.oneshot(request).await
                } else if path.starts_with("/io.linkerd.proxy.outbound.OutboundPolicies/") {
                    policies.oneshot(request).await
                } else if path.starts_with("/io.linkerd.proxy.inbound.InboundServerPolicies/") {
                    inbound.oneshot(request).await
                } else {
                    Ok(Status::unimplemented(format!("unknown method {path}")).into_http())
                };
                Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
            }
        });
    // A proxy keeps a stream open per target it uses; Linkerd's controllers (gRPC
    // servers) set no limit to the streams of a connection, so neither does this.
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .max_concurrent_streams(u32::MAX)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

#[derive(Clone)]
struct Api(Shared);

#[tonic::async_trait]
impl Destination for Api {
    type GetStream = Stream<Update>;
    type GetProfileStream = Stream<DestinationProfile>;

    async fn get(
        &self,
        request: Request<GetDestination>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let path = request.into_inner().path;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = lock(&self.0);
        state.calls.push(format!("get {path}"));
        // As Linkerd's controller: the set as one `Add`, or nothing when empty.
        if let Some(addrs) = state.endpoints.get(&path).filter(|a| !a.is_empty()) {
            let _ = tx.send(Ok(add(&path, addrs.clone())));
        }
        state.endpoint_watchers.entry(path).or_default().push(tx);
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn get_profile(
        &self,
        request: Request<GetDestination>,
    ) -> Result<Response<Self::GetProfileStream>, Status> {
        let path = request.into_inner().path;
        let Ok(target) = path.parse::<SocketAddr>() else {
            return Err(Status::invalid_argument(format!("not an address: {path}")));
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = lock(&self.0);
        state.calls.push(format!("profile {target}"));
        let profile = state.profiles.get(&target).cloned().unwrap_or_default();
        let _ = tx.send(Ok(profile));
        state.profile_watchers.entry(target).or_default().push(tx);
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl OutboundPolicies for Api {
    type WatchStream = Stream<OutboundPolicy>;

    async fn get(&self, _: Request<TrafficSpec>) -> Result<Response<OutboundPolicy>, Status> {
        Err(Status::unimplemented("only Watch"))
    }

    async fn watch(
        &self,
        request: Request<TrafficSpec>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let spec = request.into_inner();
        let Some(traffic_spec::Target::Addr(addr)) = spec.target else {
            return Err(Status::invalid_argument("only addresses"));
        };
        let target = SocketAddr::try_from(addr).map_err(|_| Status::invalid_argument("address"))?;
        let mut state = lock(&self.0);
        state.calls.push(format!("watch {target}"));
        state.workloads.push(spec.source_workload);
        match state.policies.get(&target).cloned() {
            None => Err(Status::not_found(format!("no policy for {target}"))),
            Some(PolicyAnswer::Error(code)) => Err(Status::new(code, "set by the test")),
            Some(PolicyAnswer::Policy(policy)) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = tx.send(Ok(*policy));
                state.policy_watchers.entry(target).or_default().push(tx);
                Ok(Response::new(UnboundedReceiverStream::new(rx)))
            }
        }
    }
}

#[tonic::async_trait]
impl InboundServerPolicies for Api {
    type WatchPortStream = Stream<Server>;

    async fn get_port(&self, _: Request<PortSpec>) -> Result<Response<Server>, Status> {
        Err(Status::unimplemented("only WatchPort"))
    }

    async fn watch_port(
        &self,
        request: Request<PortSpec>,
    ) -> Result<Response<Self::WatchPortStream>, Status> {
        let spec = request.into_inner();
        let port = u16::try_from(spec.port).map_err(|_| Status::invalid_argument("port"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = lock(&self.0);
        state.calls.push(format!("watch-port {port}"));
        state.workloads.push(spec.workload);
        let server = state
            .servers
            .get(&port)
            .cloned()
            .unwrap_or_else(|| default_server(port));
        let _ = tx.send(Ok(server));
        state.server_watchers.entry(port).or_default().push(tx);
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// Who an inbound authorization admits.
#[derive(Clone, Debug)]
pub enum Admit {
    /// Anyone from the networks.
    Anyone,
    /// Clients over mesh TLS, with any identity.
    Meshed,
    /// Clients over mesh TLS with one of these identities.
    Identities(Vec<String>),
}

/// An authorization as the policy controller sends one (metadata of an
/// `AuthorizationPolicy` named `name`), for clients from `networks`.
pub fn authz(name: &str, networks: &[&str], admit: Admit) -> ib::Authz {
    use ib::authn::{permit_mesh_tls, Permit, PermitMeshTls, PermitUnauthenticated};
    let permit = match admit {
        Admit::Anyone => Permit::Unauthenticated(PermitUnauthenticated {}),
        Admit::Meshed => Permit::MeshTls(PermitMeshTls {
            clients: Some(permit_mesh_tls::Clients::Unauthenticated(
                PermitUnauthenticated {},
            )),
        }),
        Admit::Identities(names) => Permit::MeshTls(PermitMeshTls {
            clients: Some(permit_mesh_tls::Clients::Identities(
                permit_mesh_tls::PermitClientIdentities {
                    identities: names
                        .into_iter()
                        .map(|name| ib::Identity { name })
                        .collect(),
                    suffixes: vec![],
                },
            )),
        }),
    };
    ib::Authz {
        networks: networks
            .iter()
            .map(|n| ib::Network {
                net: Some(n.parse::<ipnet::IpNet>().expect("a network").into()),
                except: vec![],
            })
            .collect(),
        authentication: Some(ib::Authn {
            permit: Some(permit),
        }),
        labels: HashMap::new(),
        metadata: Some(Metadata {
            kind: Some(metadata::Kind::Resource(Resource {
                group: "policy.linkerd.io".into(),
                kind: "authorizationpolicy".into(),
                name: name.into(),
                ..Default::default()
            })),
        }),
    }
}

/// What a port speaks, in a `Server`.
#[derive(Clone, Debug)]
pub enum ServerProtocol {
    /// Detected, with HTTP routes `(name, exact path, the route's own authorizations)`
    /// (none: the controller's catch-all `default` route).
    Detect(Vec<(String, String, Vec<ib::Authz>)>),
    Opaque,
}

/// A `Server` named `name`, as the policy controller sends one for a `Server`
/// resource with these authorizations.
pub fn server(name: &str, protocol: ServerProtocol, authorizations: Vec<ib::Authz>) -> Server {
    use ib::proxy_protocol::{Detect, Kind, Opaque};
    let route = |name: &str, path: Option<&str>, authorizations: Vec<ib::Authz>| ib::HttpRoute {
        metadata: Some(Metadata {
            kind: Some(metadata::Kind::Default(name.into())),
        }),
        hosts: vec![],
        authorizations,
        rules: vec![ib::http_route::Rule {
            matches: vec![linkerd2_proxy_api::http_route::HttpRouteMatch {
                path: Some(linkerd2_proxy_api::http_route::PathMatch {
                    kind: Some(match path {
                        Some(exact) => {
                            linkerd2_proxy_api::http_route::path_match::Kind::Exact(exact.into())
                        }
                        None => {
                            linkerd2_proxy_api::http_route::path_match::Kind::Prefix("/".into())
                        }
                    }),
                }),
                ..Default::default()
            }],
            filters: vec![],
        }],
    };
    let kind = match protocol {
        ServerProtocol::Detect(routes) => {
            let mut http_routes = vec![route("default", None, vec![])];
            http_routes.extend(
                routes
                    .into_iter()
                    .map(|(name, path, authz)| route(&name, Some(&path), authz)),
            );
            Kind::Detect(Detect {
                timeout: Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
                http_routes,
                http_local_rate_limit: None,
            })
        }
        ServerProtocol::Opaque => Kind::Opaque(Opaque {}),
    };
    Server {
        protocol: Some(ib::ProxyProtocol { kind: Some(kind) }),
        server_ips: vec![],
        authorizations,
        labels: [
            ("group".to_string(), "policy.linkerd.io".to_string()),
            ("kind".to_string(), "server".to_string()),
            ("name".to_string(), name.to_string()),
        ]
        .into(),
    }
}

/// The controller's answer for a port no `Server` selects, under the cluster default
/// `all-unauthenticated`.
pub fn default_server(_port: u16) -> Server {
    let mut server = server(
        "all-unauthenticated",
        ServerProtocol::Detect(vec![]),
        vec![authz(
            "all-unauthenticated",
            &["0.0.0.0/0", "::/0"],
            Admit::Anyone,
        )],
    );
    server.labels = [
        ("group".to_string(), String::new()),
        ("kind".to_string(), "default".to_string()),
        ("name".to_string(), "all-unauthenticated".to_string()),
    ]
    .into();
    server
}

/// What a proxy is told of an endpoint's protocol.
#[derive(Clone, Copy, Debug)]
pub enum Hint {
    None,
    /// It takes HTTP/2 from other proxies.
    H2,
    /// Opaque, through its proxy's inbound port.
    Opaque(u16),
    /// It takes HTTP/2 from other proxies, through its proxy's inbound port (what
    /// Linkerd's destination controller sends in its default transport mode, or for a
    /// pod's own opaque port when the Service's is not).
    H2Through(u16),
}

/// An endpoint as the destination controller sends a meshed (with `identity`) or
/// unmeshed pod: address, weight, labels, TLS identity, protocol hint.
pub fn endpoint(addr: SocketAddr, identity: Option<&str>, hint: Hint, pod: &str) -> WeightedAddr {
    let protocol_hint = match hint {
        Hint::None => None,
        Hint::H2 => Some(ProtocolHint {
            protocol: Some(protocol_hint::Protocol::H2(protocol_hint::H2 {})),
            opaque_transport: None,
        }),
        Hint::H2Through(port) => Some(ProtocolHint {
            protocol: Some(protocol_hint::Protocol::H2(protocol_hint::H2 {})),
            opaque_transport: Some(protocol_hint::OpaqueTransport {
                inbound_port: u32::from(port),
            }),
        }),
        Hint::Opaque(port) => Some(ProtocolHint {
            protocol: Some(protocol_hint::Protocol::Opaque(protocol_hint::Opaque {})),
            opaque_transport: Some(protocol_hint::OpaqueTransport {
                inbound_port: u32::from(port),
            }),
        }),
    };
    WeightedAddr {
        addr: Some(TcpAddress::from(addr)),
        weight: 10_000,
        metric_labels: pod_labels(pod, identity),
        tls_identity: identity.map(|name| TlsIdentity {
            strategy: Some(tls_identity::Strategy::DnsLikeIdentity(
                tls_identity::DnsLikeIdentity {
                    name: name.to_string(),
                },
            )),
            server_name: None,
        }),
        protocol_hint,
        ..Default::default()
    }
}

/// The labels the destination controller puts on a pod's address (the pod
/// `web-a` of a Deployment `web`, its ReplicaSet's hash, its service account as
/// the identity's first name).
fn pod_labels(pod: &str, identity: Option<&str>) -> HashMap<String, String> {
    let deployment = pod.rsplit_once('-').map_or(pod, |(owner, _)| owner);
    let account = identity
        .and_then(|name| name.split('.').next())
        .unwrap_or("default");
    [
        ("pod", pod),
        ("deployment", deployment),
        ("pod_template_hash", "5d8f7c9b64"),
        ("serviceaccount", account),
        ("control_plane_ns", "linkerd"),
        ("namespace", "default"),
        ("zone", "zone-a"),
        ("zone_locality", "local"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect()
}

fn duration(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

fn service(name: &str, port: u16) -> Metadata {
    Metadata {
        kind: Some(metadata::Kind::Resource(Resource {
            group: "core".into(),
            kind: "Service".into(),
            name: name.into(),
            namespace: "default".into(),
            section: String::new(),
            port: u32::from(port),
        })),
    }
}

/// A Service's backend as the policy controller describes it: a balancer over
/// `Destination.Get` on `path`, with Linkerd's queue and load settings.
pub fn balancer(name: &str, port: u16, path: &str) -> ob::Backend {
    use ob::backend;
    ob::Backend {
        metadata: Some(service(name, port)),
        queue: Some(ob::Queue {
            capacity: 100,
            failfast_timeout: Some(duration(3)),
        }),
        kind: Some(backend::Kind::Balancer(backend::BalanceP2c {
            discovery: Some(backend::EndpointDiscovery {
                kind: Some(backend::endpoint_discovery::Kind::Dst(
                    backend::endpoint_discovery::DestinationGet { path: path.into() },
                )),
            }),
            load: Some(backend::balance_p2c::Load::PeakEwma(
                backend::balance_p2c::PeakEwma {
                    default_rtt: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 30_000_000,
                    }),
                    decay: Some(duration(10)),
                },
            )),
        })),
    }
}

/// The policy the policy controller sends for a Service port: protocol detection
/// (or opaque, for an opaque port) and one default route per protocol to one
/// balancer on `path`, with Linkerd's queue and load settings.
pub fn service_policy(name: &str, port: u16, path: &str, opaque: bool) -> OutboundPolicy {
    let backend = balancer(name, port, path);
    let http_routes = || {
        use ob::http_route::{distribution, Distribution, RouteBackend, Rule};
        vec![ob::HttpRoute {
            metadata: Some(Metadata {
                kind: Some(metadata::Kind::Default("http".into())),
            }),
            hosts: vec![],
            rules: vec![Rule {
                matches: vec![linkerd2_proxy_api::http_route::HttpRouteMatch {
                    path: Some(linkerd2_proxy_api::http_route::PathMatch {
                        kind: Some(linkerd2_proxy_api::http_route::path_match::Kind::Prefix(
                            "/".into(),
                        )),
                    }),
                    ..Default::default()
                }],
                backends: Some(Distribution {
                    kind: Some(distribution::Kind::FirstAvailable(
                        distribution::FirstAvailable {
                            backends: vec![RouteBackend {
                                backend: Some(backend.clone()),
                                ..Default::default()
                            }],
                        },
                    )),
                }),
                ..Default::default()
            }],
        }]
    };
    let opaque_routes = {
        use ob::opaque_route::{distribution, Distribution, RouteBackend, Rule};
        vec![ob::OpaqueRoute {
            metadata: Some(Metadata {
                kind: Some(metadata::Kind::Default("opaq".into())),
            }),
            rules: vec![Rule {
                backends: Some(Distribution {
                    kind: Some(distribution::Kind::FirstAvailable(
                        distribution::FirstAvailable {
                            backends: vec![RouteBackend {
                                backend: Some(backend.clone()),
                                filters: vec![],
                            }],
                        },
                    )),
                }),
                filters: vec![],
            }],
        }]
    };
    let kind = if opaque {
        proxy_protocol::Kind::Opaque(proxy_protocol::Opaque {
            routes: opaque_routes,
        })
    } else {
        proxy_protocol::Kind::Detect(proxy_protocol::Detect {
            timeout: Some(duration(10)),
            opaque: Some(proxy_protocol::Opaque {
                routes: opaque_routes,
            }),
            http1: Some(proxy_protocol::Http1 {
                routes: http_routes(),
                failure_accrual: None,
            }),
            http2: Some(proxy_protocol::Http2 {
                routes: http_routes(),
                failure_accrual: None,
            }),
        })
    };
    OutboundPolicy {
        metadata: Some(service(name, port)),
        protocol: Some(ob::ProxyProtocol { kind: Some(kind) }),
    }
}

/// The profile the destination controller sends for a pod's address.
pub fn pod_profile(endpoint: WeightedAddr) -> DestinationProfile {
    DestinationProfile {
        endpoint: Some(endpoint),
        ..Default::default()
    }
}

/// Waits (bounded) for `check` to hold on the control plane.
pub fn wait_until(control: &ControlPlane, what: &str, check: impl Fn(&ControlPlane) -> bool) {
    crate::wait_for(what, Duration::from_secs(30), || {
        check(control).then_some(())
    });
}

/// A route match on a path prefix.
pub fn path_prefix(prefix: &str) -> linkerd2_proxy_api::http_route::HttpRouteMatch {
    use linkerd2_proxy_api::http_route::{path_match, PathMatch};
    linkerd2_proxy_api::http_route::HttpRouteMatch {
        path: Some(PathMatch {
            kind: Some(path_match::Kind::Prefix(prefix.into())),
        }),
        ..Default::default()
    }
}

/// A route match on a regular expression the whole path must match.
pub fn path_regex(pattern: &str) -> linkerd2_proxy_api::http_route::HttpRouteMatch {
    use linkerd2_proxy_api::http_route::{path_match, PathMatch};
    linkerd2_proxy_api::http_route::HttpRouteMatch {
        path: Some(PathMatch {
            kind: Some(path_match::Kind::Regex(pattern.into())),
        }),
        ..Default::default()
    }
}

/// A route match on a header's exact value (any path).
pub fn header_is(name: &str, value: &str) -> linkerd2_proxy_api::http_route::HttpRouteMatch {
    use linkerd2_proxy_api::http_route::{header_match, HeaderMatch};
    linkerd2_proxy_api::http_route::HttpRouteMatch {
        headers: vec![HeaderMatch {
            name: name.into(),
            value: Some(header_match::Value::Exact(value.as_bytes().to_vec())),
        }],
        ..path_prefix("/")
    }
}

/// An HTTPRoute's metadata, as the policy controller sends it.
fn route_meta(kind: &str, name: &str) -> Metadata {
    Metadata {
        kind: Some(metadata::Kind::Resource(Resource {
            group: "gateway.networking.k8s.io".into(),
            kind: kind.into(),
            name: name.into(),
            namespace: "default".into(),
            section: String::new(),
            port: 0,
        })),
    }
}

/// A rule sending what `matches` take to `backends`, split by weight.
pub fn http_rule(
    matches: Vec<linkerd2_proxy_api::http_route::HttpRouteMatch>,
    backends: &[(&ob::Backend, u32)],
) -> ob::http_route::Rule {
    use ob::http_route::{distribution, Distribution, RouteBackend, WeightedRouteBackend};
    ob::http_route::Rule {
        matches,
        backends: Some(Distribution {
            kind: Some(distribution::Kind::RandomAvailable(
                distribution::RandomAvailable {
                    backends: backends
                        .iter()
                        .map(|(backend, weight)| WeightedRouteBackend {
                            backend: Some(RouteBackend {
                                backend: Some((*backend).clone()),
                                ..Default::default()
                            }),
                            weight: *weight,
                        })
                        .collect(),
                },
            )),
        }),
        ..Default::default()
    }
}

/// An HTTPRoute named `name`.
pub fn http_route(name: &str, rules: Vec<ob::http_route::Rule>) -> ob::HttpRoute {
    ob::HttpRoute {
        metadata: Some(route_meta("HTTPRoute", name)),
        hosts: vec![],
        rules,
    }
}

/// A Service port's policy with HTTPRoutes (detected HTTP/1 and HTTP/2 alike), and
/// failure accrual for its balanced backends.
pub fn http_policy(
    name: &str,
    port: u16,
    path: &str,
    routes: Vec<ob::HttpRoute>,
    accrual: Option<ob::FailureAccrual>,
) -> OutboundPolicy {
    let mut policy = service_policy(name, port, path, false);
    if let Some(ob::ProxyProtocol {
        kind: Some(proxy_protocol::Kind::Detect(detect)),
    }) = policy.protocol.as_mut()
    {
        detect.http1 = Some(proxy_protocol::Http1 {
            routes: routes.clone(),
            failure_accrual: accrual,
        });
        detect.http2 = Some(proxy_protocol::Http2 {
            routes,
            failure_accrual: accrual,
        });
    }
    policy
}

/// A GRPCRoute rule for `service`/`method` (empty: any) to `backend`.
pub fn grpc_rule(service: &str, method: &str, backend: &ob::Backend) -> ob::grpc_route::Rule {
    use ob::grpc_route::{distribution, Distribution, RouteBackend};
    ob::grpc_route::Rule {
        matches: vec![linkerd2_proxy_api::grpc_route::GrpcRouteMatch {
            rpc: Some(linkerd2_proxy_api::grpc_route::GrpcRpcMatch {
                service: service.into(),
                method: method.into(),
            }),
            headers: vec![],
        }],
        backends: Some(Distribution {
            kind: Some(distribution::Kind::FirstAvailable(
                distribution::FirstAvailable {
                    backends: vec![RouteBackend {
                        backend: Some(backend.clone()),
                        ..Default::default()
                    }],
                },
            )),
        }),
        ..Default::default()
    }
}

/// A Service port's policy with GRPCRoutes (the `Grpc` protocol, as the policy
/// controller sends it for a Service with GRPCRoutes).
pub fn grpc_policy(name: &str, port: u16, rules: Vec<ob::grpc_route::Rule>) -> OutboundPolicy {
    let route = ob::GrpcRoute {
        metadata: Some(route_meta("GRPCRoute", name)),
        hosts: vec![],
        rules,
    };
    OutboundPolicy {
        metadata: Some(service(name, port)),
        protocol: Some(ob::ProxyProtocol {
            kind: Some(proxy_protocol::Kind::Grpc(proxy_protocol::Grpc {
                routes: vec![route],
                failure_accrual: None,
            })),
        }),
    }
}
