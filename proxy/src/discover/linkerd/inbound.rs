//! The inbound policy of the pod's ports, from Linkerd's policy controller
//! (`InboundServerPolicies.WatchPort`), as linkerd2-proxy keeps it:
//!
//! - the ports of `LINKERD2_PROXY_INBOUND_PORTS` (the pod's container ports) are
//!   watched from start-up and never forgotten; any other port is watched from its
//!   first connection and forgotten after `LINKERD2_PROXY_INBOUND_DISCOVERY_IDLE_TIMEOUT`;
//! - a connection never waits for the controller: until it answers, a port has the
//!   default policy (`LINKERD2_PROXY_INBOUND_DEFAULT_POLICY`), and while it is away
//!   the last answer stays;
//! - `InvalidArgument` and `FailedPrecondition` are final (the last value stays),
//!   any other error is retried with backoff; an answer that cannot be read makes
//!   the port refuse everything (HTTP: 500), as a `Server` linkerd2-proxy cannot
//!   read does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use linkerd2_proxy_api::inbound::{PortSpec, Server};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;
use tracing::{debug, warn};

use super::client::{self, Limited, Next};
use super::grpc::Messages;
use crate::config::{PortSet, StreamLimits};
use crate::discover::balance::Backoff;
use crate::discover::inbound_policy::{
    self as policy, Client, DefaultPolicy, RequestDecision, RequestRefusal, ServerPolicy,
};
use crate::metrics::authz::{AuthzMetrics, Subject};
use crate::metrics::control::{Api, ControlMetrics};
use crate::net::error::ConnError;

pub const WATCH_PORT: &str = "/io.linkerd.proxy.inbound.InboundServerPolicies/WatchPort";

/// What the inbound policy source is set up with.
#[derive(Clone, Debug)]
pub struct InboundSettings {
    /// `LINKERD2_PROXY_POLICY_WORKLOAD`, sent as `PortSpec.workload`.
    pub workload: String,
    pub stream: StreamLimits,
    pub backoff: Backoff,
    /// `LINKERD2_PROXY_INBOUND_PORTS`: watched from start-up, never forgotten.
    pub ports: Vec<u16>,
    /// Other ports unused this long are forgotten.
    pub idle: Duration,
    pub default: DefaultPolicy,
    /// `LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS`.
    pub cluster_networks: Vec<IpNet>,
    /// Ports whose default policy is opaque.
    pub opaque_ports: PortSet,
}

pub struct InboundPolicies {
    shared: Arc<Shared>,
    ports: Mutex<HashMap<u16, Arc<PortWatch>>>,
}

struct Shared {
    settings: InboundSettings,
    channel: Channel,
    metrics: Arc<ControlMetrics>,
    authz: Arc<AuthzMetrics>,
    started: Instant,
}

struct PortWatch {
    policy: watch::Receiver<Arc<ServerPolicy>>,
    used_ms: AtomicU64,
    pinned: bool,
    task: tokio::task::AbortHandle,
}

impl Drop for PortWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl InboundPolicies {
    /// Starts watching the listed ports, and forgetting other ports when idle.
    pub fn start(
        settings: InboundSettings,
        channel: Channel,
        metrics: Arc<ControlMetrics>,
        authz: Arc<AuthzMetrics>,
    ) -> Arc<InboundPolicies> {
        let policies = Arc::new(InboundPolicies {
            shared: Arc::new(Shared {
                settings,
                channel,
                metrics,
                authz,
                started: Instant::now(),
            }),
            ports: Mutex::default(),
        });
        for port in policies.shared.settings.ports.clone() {
            policies.watch(port, true);
        }
        super::sweep_every_second(Arc::downgrade(&policies), InboundPolicies::forget_idle);
        policies
    }

    /// The current policy of `port`, and how it changes.
    pub fn port(&self, port: u16) -> watch::Receiver<Arc<ServerPolicy>> {
        self.watch(port, false)
    }

    /// The protocol `port` is declared with now.
    pub fn protocol(&self, port: u16) -> policy::PortProtocol {
        self.port(port).borrow().protocol
    }

    /// May `client` have its connection to `target` forwarded as bytes? Counted in
    /// `inbound_tcp_authz_{allow,deny}_total`; a denied connection is refused.
    pub fn authorize_tcp(&self, target: SocketAddr, client: &Client) -> Result<(), ConnError> {
        let policy = self.port(target.port()).borrow().clone();
        let subject = Subject {
            target,
            policy: &policy,
            tls: &client.tls,
        };
        match policy::authorize_tcp(&policy, client) {
            Some(authz) => {
                self.shared.authz.tcp_allowed(&subject, &authz.meta);
                Ok(())
            }
            None => {
                debug!(%target, client = %client.ip, server = %policy.meta.name, "connection denied");
                self.shared.authz.tcp_denied(&subject);
                Err(ConnError::Unauthorized)
            }
        }
    }

    /// What authorizes the requests of `client`'s HTTP connection to `target`, each
    /// against the port's policy as it is when the request comes.
    pub fn for_requests(&self, target: SocketAddr, client: Client) -> RequestAuthz {
        RequestAuthz {
            policy: self.port(target.port()),
            client,
            target,
            metrics: self.shared.authz.clone(),
            last_allowed: Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        self.shared.started.elapsed().as_millis() as u64
    }

    fn watch(&self, port: u16, pinned: bool) -> watch::Receiver<Arc<ServerPolicy>> {
        let now = self.now_ms();
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        let watch = ports.entry(port).or_insert_with(|| {
            let settings = &self.shared.settings;
            let default = policy::default_policy(
                settings.default,
                &settings.cluster_networks,
                settings.opaque_ports.contains(port),
            );
            let (tx, rx) = watch::channel(Arc::new(default));
            let task = tokio::spawn(watch_port(self.shared.clone(), port, tx));
            Arc::new(PortWatch {
                policy: rx,
                used_ms: AtomicU64::new(now),
                pinned,
                task: task.abort_handle(),
            })
        });
        watch.used_ms.store(now, Ordering::Relaxed);
        watch.policy.clone()
    }

    fn forget_idle(&self) {
        let now = self.now_ms();
        let idle = self.shared.settings.idle.as_millis() as u64;
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        ports.retain(|port, watch| {
            let keep =
                watch.pinned || now.saturating_sub(watch.used_ms.load(Ordering::Relaxed)) < idle;
            if !keep {
                debug!(port, "forgetting an idle inbound port policy");
            }
            keep
        });
    }
}

/// Authorizes the requests of one HTTP connection.
pub struct RequestAuthz {
    policy: watch::Receiver<Arc<ServerPolicy>>,
    client: Client,
    target: SocketAddr,
    metrics: Arc<AuthzMetrics>,
    last_allowed: Mutex<Option<Allowed>>,
}

/// The last decision that allowed a request of the connection, and its counter.
struct Allowed {
    policy: Arc<ServerPolicy>,
    route: policy::Meta,
    authorization: Arc<policy::Authorization>,
    counter: prometheus_client::metrics::counter::Counter,
}

impl RequestAuthz {
    /// Is this request authorized? Counted in `inbound_http_authz_*` or
    /// `inbound_http_route_not_found_total`; a refusal is the error it gets.
    pub fn check<B>(
        &self,
        request: &hyper::Request<B>,
        authority: Option<&str>,
    ) -> Result<(), RequestRefusal> {
        let policy = self.policy.borrow().clone();
        let decision = policy::authorize_request(
            &policy,
            &self.client,
            request.method(),
            request.uri(),
            request.headers(),
            authority,
        );
        let subject = Subject {
            target: self.target,
            policy: &policy,
            tls: &self.client.tls,
        };
        match decision {
            RequestDecision::Allow {
                route,
                authorization,
            } => {
                // A connection's requests mostly take one route under one policy: its
                // counter is looked up once, not per request.
                let mut last = self.last_allowed.lock().unwrap_or_else(|p| p.into_inner());
                match &*last {
                    Some(allowed)
                        if Arc::ptr_eq(&allowed.policy, &policy)
                            && Arc::ptr_eq(&allowed.authorization, &authorization)
                            && allowed.route == route =>
                    {
                        allowed.counter.inc();
                    }
                    _ => {
                        let counter =
                            self.metrics
                                .http_allowed(&subject, &route, &authorization.meta);
                        counter.inc();
                        *last = Some(Allowed {
                            policy: policy.clone(),
                            route,
                            authorization,
                            counter,
                        });
                    }
                }
                Ok(())
            }
            RequestDecision::Deny { route } => {
                debug!(target = %self.target, client = %self.client.ip, route = %route.name, "request denied");
                self.metrics.http_denied(&subject, &route);
                Err(RequestRefusal::Forbidden)
            }
            RequestDecision::NoRoute => {
                self.metrics.route_not_found(&subject);
                Err(RequestRefusal::NoRoute)
            }
            RequestDecision::Invalid => Err(RequestRefusal::InvalidPolicy),
        }
    }
}

/// `WatchPort` for `port`, reopened whenever it ends, each answer published.
async fn watch_port(shared: Arc<Shared>, port: u16, tx: watch::Sender<Arc<ServerPolicy>>) {
    let limits = shared.settings.stream;
    let request = PortSpec {
        workload: shared.settings.workload.clone(),
        port: u32::from(port),
    };
    let mut failures = 0u32;
    loop {
        let opened = Instant::now();
        let stream: Result<Messages<Server>, _> = Box::pin(client::open(
            &shared.channel,
            WATCH_PORT,
            request.clone(),
            &limits,
        ))
        .await;
        let mut stream = match stream {
            Ok(stream) => Limited::new(stream, opened, limits),
            Err(status) => {
                shared.metrics.error(Api::Policy);
                if is_final(status.code()) {
                    warn!(port, %status, "the policy controller refused to describe the port; keeping its last policy");
                    return;
                }
                failures += 1;
                debug!(port, %status, "cannot watch the port's policy");
                tokio::time::sleep(client::retry_delay(&shared.settings.backoff, failures)).await;
                continue;
            }
        };
        loop {
            match stream.next().await {
                Next::Message(server) => {
                    failures = 0;
                    let policy = match policy::read_server(&server) {
                        Ok(policy) => policy,
                        Err(error) => {
                            warn!(port, %error, "an inbound policy that cannot be read; the port refuses every client");
                            policy::invalid_policy()
                        }
                    };
                    debug!(port, server = %policy.meta.name, "inbound policy");
                    tx.send_replace(Arc::new(policy));
                }
                Next::Ended => break,
                Next::Failed(status) => {
                    shared.metrics.error(Api::Policy);
                    if is_final(status.code()) {
                        return;
                    }
                    failures += 1;
                    debug!(port, %status, "the port's policy stream failed");
                    tokio::time::sleep(client::retry_delay(&shared.settings.backoff, failures))
                        .await;
                    break;
                }
            }
        }
        shared.metrics.reconnect(Api::Policy);
    }
}

fn is_final(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
    )
}
