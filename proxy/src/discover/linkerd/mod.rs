//! Discovery from Linkerd's control plane: what current linkerd2-proxy asks for an
//! outbound target, read with the `linkerd2-proxy-api` crate over tonic.
//!
//! For each original destination in use (a Service's ClusterIP:port, a pod's
//! IP:port), one task watches `OutboundPolicies.Watch` (the target's protocol and
//! backends) and, for addresses in `LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS`,
//! `Destination.GetProfile` (a pod's endpoint, `opaque_protocol`); it publishes the
//! [`Destination`] they describe (`translate.rs`) on a watch channel that every
//! connection to the target reads. Each balancer backend is fed by a
//! `Destination.Get` stream on its discovery path, on a task that ends with the
//! balancer. Streams break and reopen with jittered backoff; what they said last
//! stays in use meanwhile, so a destination described as meshed is never reached in
//! plaintext while the control plane is away.
//!
//! A target nobody has looked up for `LINKERD2_PROXY_OUTBOUND_DISCOVERY_IDLE_TIMEOUT`
//! is forgotten and its streams are dropped; connections still open keep their
//! balancer (and its `Get` stream) until they end.
//!
//! Where linkerd2-proxy waits for an unreachable control plane without limit, a
//! first lookup here waits at most the outbound fail-fast timeout and then answers
//! [`DiscoveryError::Unavailable`]: HTTP gets a 503 saying so, TCP a reset.

pub mod client;
pub mod grpc;
pub mod inbound;
pub mod translate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ipnet::IpNet;
use linkerd2_proxy_api::destination::{DestinationProfile, GetDestination};
use linkerd2_proxy_api::outbound::{traffic_spec, OutboundPolicy, TrafficSpec};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use self::client::{Limited, Next};
use self::grpc::Messages;
use self::translate::{BackendSpec, EndpointSet, PolicyAnswer, PolicySpec, ProfileSpec};
use super::balance::{Backoff, BalanceSettings, Balancer, BalancerRegistry};
use super::{
    Backend, Destination, Discover, DiscoveryError, Endpoint, Resolution, Resolved, Routing,
    RoutingCell,
};
use crate::config::ControlPlane;
use crate::mesh::Dialer;
use crate::metrics::control::{Api, ControlMetrics};
use crate::metrics::routes::RouteMetrics;

/// What the control-plane source is set up with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub control: ControlPlane,
    /// Balancers made for backends.
    pub balance: BalanceSettings,
    /// How long a first lookup waits for the control plane.
    pub failfast: Duration,
    /// Reconnecting streams.
    pub backoff: Backoff,
    /// A target unused this long is forgotten.
    pub idle: Duration,
}

/// The control-plane source.
pub struct Linkerd {
    shared: Arc<Shared>,
    targets: Mutex<HashMap<SocketAddr, Arc<TargetWatch>>>,
}

/// What every watch task uses.
struct Shared {
    settings: Settings,
    destination: Channel,
    policy: Channel,
    metrics: Arc<ControlMetrics>,
    balancers: Arc<BalancerRegistry>,
    routes: Arc<RouteMetrics>,
    started: Instant,
}

/// One target's published destination, and its task.
struct TargetWatch {
    state: watch::Receiver<Option<Arc<Destination>>>,
    /// Milliseconds after the source started of the last lookup.
    used_ms: AtomicU64,
    task: tokio::task::AbortHandle,
}

impl Drop for TargetWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Linkerd {
    /// Connects (lazily) to the control plane, and starts forgetting idle targets.
    pub fn start(
        settings: Settings,
        dialer: Arc<Dialer>,
        metrics: Arc<ControlMetrics>,
        balancers: Arc<BalancerRegistry>,
        routes: Arc<RouteMetrics>,
    ) -> Result<Arc<Linkerd>, String> {
        let destination = client::channel(&settings.control.destination, dialer.clone())
            .map_err(|e| format!("LINKERD2_PROXY_DESTINATION_SVC_ADDR: {e}"))?;
        let policy = client::channel(&settings.control.policy, dialer)
            .map_err(|e| format!("LINKERD2_PROXY_POLICY_SVC_ADDR: {e}"))?;
        info!(
            destination = %settings.control.destination.addr,
            policy = %settings.control.policy.addr,
            "discovery from Linkerd's control plane"
        );
        let linkerd = Arc::new(Linkerd {
            shared: Arc::new(Shared {
                settings,
                destination,
                policy,
                metrics,
                balancers,
                routes,
                started: Instant::now(),
            }),
            targets: Mutex::default(),
        });
        sweep_every_second(Arc::downgrade(&linkerd), Linkerd::forget_idle);
        Ok(linkerd)
    }

    fn now_ms(&self) -> u64 {
        self.shared.started.elapsed().as_millis() as u64
    }

    /// The channel to the policy controller, for the inbound side's port policies.
    pub fn policy_channel(&self) -> Channel {
        self.shared.policy.clone()
    }

    /// Drops the watches of targets nobody looked up within the idle timeout.
    fn forget_idle(&self) {
        let now = self.now_ms();
        let idle = self.shared.settings.idle.as_millis() as u64;
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.retain(|target, watch| {
            let keep = now.saturating_sub(watch.used_ms.load(Ordering::Relaxed)) < idle;
            if !keep {
                debug!(%target, "forgetting an idle target");
            }
            keep
        });
    }

    /// The number of targets watched now (for tests and benchmarks).
    pub fn watched(&self) -> usize {
        self.targets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn watch(&self, target: SocketAddr) -> Arc<TargetWatch> {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let watch = targets
            .entry(target)
            .or_insert_with(|| {
                let (tx, rx) = watch::channel(None);
                let task = tokio::spawn(watch_target(self.shared.clone(), target, tx));
                Arc::new(TargetWatch {
                    state: rx,
                    used_ms: AtomicU64::new(0),
                    task: task.abort_handle(),
                })
            })
            .clone();
        watch.used_ms.store(self.now_ms(), Ordering::Relaxed);
        watch
    }
}

impl Discover for Linkerd {
    fn resolve(&self, target: SocketAddr) -> Resolution<'_> {
        let watch = self.watch(target);
        if let Some(destination) = &*watch.state.borrow() {
            return Resolution::Known(Ok(destination.clone()));
        }
        let failfast = self.shared.settings.failfast;
        let mut state = watch.state.clone();
        Resolution::Pending(Box::pin(async move {
            let answered = tokio::time::timeout(failfast, state.wait_for(Option::is_some)).await;
            let resolved: Resolved = match answered {
                Ok(Ok(destination)) => Ok(destination.clone().expect("waited for a value")),
                _ => {
                    debug!(%target, "the control plane has not answered; failing fast");
                    Err(DiscoveryError::Unavailable)
                }
            };
            resolved
        }))
    }
}

/// Calls `forget` on what `owner` points to every second, until it is gone: how
/// idle watches are dropped.
fn sweep_every_second<T: Send + Sync + 'static>(owner: Weak<T>, forget: fn(&T)) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(owner) = owner.upgrade() else {
                return;
            };
            forget(&owner);
        }
    });
}

/// What a target's two streams have said so far, read into specs as they arrive
/// (the messages are not kept), and a signal that it changed.
#[derive(Default)]
struct Said {
    state: Mutex<(Option<PolicySpec>, Option<ProfileSpec>)>,
    changed: tokio::sync::Notify,
}

impl Said {
    fn policy(&self, spec: PolicySpec) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(spec);
        self.changed.notify_one();
    }

    fn profile(&self, spec: ProfileSpec) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = Some(spec);
        self.changed.notify_one();
    }
}

/// Watches one target's policy and profile and publishes its destination.
async fn watch_target(
    shared: Arc<Shared>,
    target: SocketAddr,
    tx: watch::Sender<Option<Arc<Destination>>>,
) {
    let said = Said::default();
    let profiled = shared
        .settings
        .control
        .profile_networks
        .iter()
        .any(|net: &IpNet| net.contains(&target.ip()));
    let policy = watch_policy(&shared, target, &said);
    let profile = async {
        if profiled {
            watch_profile(&shared, target, &said).await
        } else {
            said.profile(ProfileSpec::default());
        }
    };
    let publish = async {
        let mut balancers: HashMap<String, Arc<Balancer>> = HashMap::new();
        let mut routing = None;
        loop {
            said.changed.notified().await;
            let spec = {
                let state = said.state.lock().unwrap_or_else(|p| p.into_inner());
                let (Some(policy), Some(profile)) = &*state else {
                    continue;
                };
                translate::combine(policy, profile)
            };
            debug!(%target, ?spec, "destination");
            let destination = destination(&shared, target, spec, &mut balancers, &mut routing);
            tx.send_replace(Some(Arc::new(destination)));
        }
    };
    tokio::join!(policy, profile, publish);
}
#[cfg(test)]
mod sizes {
    /// How much a watched target's tasks hold while they wait for messages: the
    /// stream-opening futures are boxed, so they are paid for only while opening.
    #[test]
    fn the_watch_futures_stay_small() {
        let settings = super::Settings {
            control: crate::config::ControlPlane {
                destination: crate::config::ControlAddr {
                    addr: "127.0.0.1:1".into(),
                    name: None,
                },
                policy: crate::config::ControlAddr {
                    addr: "127.0.0.1:1".into(),
                    name: None,
                },
                context: String::new(),
                workload: String::new(),
                profile_networks: Vec::new(),
                stream: crate::config::StreamLimits::default(),
            },
            balance: crate::discover::balance::BalanceSettings {
                backoff: crate::config::Backoff {
                    min: std::time::Duration::from_millis(1),
                    max: std::time::Duration::from_secs(1),
                    jitter: 0.0,
                },
                default_rtt: std::time::Duration::from_millis(30),
                decay: std::time::Duration::from_secs(10),
            },
            failfast: std::time::Duration::from_secs(1),
            backoff: crate::config::Backoff {
                min: std::time::Duration::from_millis(1),
                max: std::time::Duration::from_secs(1),
                jitter: 0.0,
            },
            idle: std::time::Duration::from_secs(5),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let endpoint = tonic::transport::Endpoint::from_static("http://127.0.0.1:1");
            let shared = std::sync::Arc::new(super::Shared {
                settings,
                destination: endpoint.connect_lazy(),
                policy: endpoint.connect_lazy(),
                metrics: std::sync::Arc::new(crate::metrics::control::ControlMetrics::register(
                    &mut Default::default(),
                )),
                balancers: Default::default(),
                routes: Default::default(),
                started: tokio::time::Instant::now(),
            });
            let (tx, _rx) = tokio::sync::watch::channel(None);
            let target = "10.0.0.1:80".parse().unwrap();
            let watch = super::watch_target(shared.clone(), target, tx);
            let feed = super::feed_balancer(shared, String::new(), std::sync::Weak::new());
            let (watch, feed) = (std::mem::size_of_val(&watch), std::mem::size_of_val(&feed));
            eprintln!("watch_target {watch} B, feed_balancer {feed} B");
            assert!(watch < 4096 && feed < 2048, "{watch} {feed}");
        });
    }
}

/// The destination a spec describes; balancers are kept by discovery path, so a
/// policy update that keeps a backend keeps its endpoints and their state.
fn destination(
    shared: &Arc<Shared>,
    target: SocketAddr,
    spec: translate::Spec,
    balancers: &mut HashMap<String, Arc<Balancer>>,
    routing: &mut Option<Arc<RoutingCell>>,
) -> Destination {
    let backend = resolve(shared, target, spec.backend, balancers);
    let routes = spec.routes.map(|table| {
        let accrual = table.accrual;
        let resolved = Routing::new(table, &spec.parent, &shared.routes, |backend| {
            let backend = resolve(shared, target, backend.backend.clone(), balancers);
            if let Backend::Balance(balancer) = &backend {
                balancer.set_accrual(accrual);
            }
            backend
        });
        match routing {
            Some(cell) => {
                cell.store(Arc::new(resolved));
                cell.clone()
            }
            None => routing
                .insert(Arc::new(RoutingCell::from_pointee(resolved)))
                .clone(),
        }
    });
    Destination {
        opaque: spec.opaque,
        backend,
        routes,
    }
}

/// Where a backend's traffic goes: a balancer is kept by discovery path.
fn resolve(
    shared: &Arc<Shared>,
    target: SocketAddr,
    backend: BackendSpec,
    balancers: &mut HashMap<String, Arc<Balancer>>,
) -> Backend {
    match backend {
        BackendSpec::Fallback => Backend::Forward(Arc::new(Endpoint::unmeshed(target))),
        BackendSpec::Forward(endpoint) => Backend::Forward(Arc::new(endpoint)),
        BackendSpec::Refused(refusal) => Backend::Refused(refusal),
        BackendSpec::Empty { name } => {
            let balancer = Balancer::new(name, shared.settings.balance.clone());
            shared.balancers.register(&balancer);
            Backend::Balance(balancer)
        }
        BackendSpec::Balance { path, name } => {
            let balancer = balancers
                .entry(path.clone())
                .or_insert_with(|| {
                    let balancer = Balancer::new(name, shared.settings.balance.clone());
                    shared.balancers.register(&balancer);
                    let feed = tokio::spawn(feed_balancer(
                        shared.clone(),
                        path,
                        Arc::downgrade(&balancer),
                    ));
                    balancer.fed_by(feed.abort_handle());
                    balancer
                })
                .clone();
            Backend::Balance(balancer)
        }
    }
}

/// `OutboundPolicies.Watch` for `target`, reopened whenever it ends; a
/// non-recoverable answer (`NotFound`, `Unimplemented`: unknown; `InvalidArgument`,
/// `FailedPrecondition`: rejected) is final, as in linkerd2-proxy.
async fn watch_policy(shared: &Shared, target: SocketAddr, said: &Said) {
    let limits = shared.settings.control.stream;
    let request = TrafficSpec {
        source_workload: shared.settings.control.workload.clone(),
        target: Some(traffic_spec::Target::Addr(target.into())),
    };
    let mut failures = 0u32;
    loop {
        let opened = Instant::now();
        let stream: Result<Messages<OutboundPolicy>, _> = Box::pin(client::open(
            &shared.policy,
            client::POLICY_WATCH,
            request.clone(),
            &limits,
        ))
        .await;
        let mut stream = match stream {
            Ok(stream) => Limited::new(stream, opened, limits),
            Err(status) => {
                if let Some(answer) = final_policy_answer(status.code()) {
                    debug!(%target, code = ?status.code(), "the policy controller has no policy");
                    said.policy(translate::read_policy(target, &answer));
                    return;
                }
                failures += 1;
                shared.metrics.error(Api::Policy);
                debug!(%target, %status, "cannot watch the target's policy");
                tokio::time::sleep(client::retry_delay(&shared.settings.backoff, failures)).await;
                continue;
            }
        };
        loop {
            match stream.next().await {
                Next::Message(policy) => {
                    failures = 0;
                    let answer = PolicyAnswer::Policy(Box::new(policy));
                    said.policy(translate::read_policy(target, &answer));
                }
                Next::Ended => break,
                Next::Failed(status) => {
                    if let Some(answer) = final_policy_answer(status.code()) {
                        said.policy(translate::read_policy(target, &answer));
                        return;
                    }
                    failures += 1;
                    shared.metrics.error(Api::Policy);
                    debug!(%target, %status, "the policy stream failed");
                    tokio::time::sleep(client::retry_delay(&shared.settings.backoff, failures))
                        .await;
                    break;
                }
            }
        }
        shared.metrics.reconnect(Api::Policy);
    }
}

fn final_policy_answer(code: tonic::Code) -> Option<PolicyAnswer> {
    match code {
        tonic::Code::NotFound | tonic::Code::Unimplemented => Some(PolicyAnswer::Unknown),
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            Some(PolicyAnswer::Rejected)
        }
        _ => None,
    }
}

/// `Destination.GetProfile` for `target`'s address, reopened whenever it ends;
/// `InvalidArgument` and `FailedPrecondition` mean no profile, for good.
async fn watch_profile(shared: &Shared, target: SocketAddr, said: &Said) {
    let limits = shared.settings.control.stream;
    let request = GetDestination {
        scheme: "k8s".into(),
        path: target.to_string(),
        context_token: shared.settings.control.context.clone(),
    };
    let mut failures = 0u32;
    loop {
        let opened = Instant::now();
        let stream: Result<Messages<DestinationProfile>, _> = Box::pin(client::open(
            &shared.destination,
            client::DESTINATION_GET_PROFILE,
            request.clone(),
            &limits,
        ))
        .await;
        let mut stream = match stream {
            Ok(stream) => Limited::new(stream, opened, limits),
            Err(status) => {
                if no_profile(status.code()) {
                    said.profile(ProfileSpec::default());
                    return;
                }
                failures += 1;
                shared.metrics.error(Api::Profile);
                debug!(%target, %status, "cannot watch the target's profile");
                tokio::time::sleep(client::retry_delay(&shared.settings.backoff, failures)).await;
                continue;
            }
        };
        loop {
            match stream.next().await {
                Next::Message(profile) => {
                    failures = 0;
                    said.profile(translate::read_profile(Some(&profile)));
                }
                Next::Ended => break,
                Next::Failed(status) => {
                    if no_profile(status.code()) {
                        said.profile(ProfileSpec::default());
                        return;
                    }
                    failures += 1;
                    shared.metrics.error(Api::Profile);
                    debug!(%target, %status, "the profile stream failed");
                    tokio::time::sleep(client::retry_delay(&shared.settings.backoff, failures))
                        .await;
                    break;
                }
            }
        }
        shared.metrics.reconnect(Api::Profile);
    }
}

fn no_profile(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
    )
}

/// `Destination.Get` on `path`, feeding `balancer` until it is gone. Every error
/// is retried (a Service that does not exist yet answers `NotFound`); the endpoints
/// stay as they were meanwhile.
async fn feed_balancer(shared: Arc<Shared>, path: String, balancer: Weak<Balancer>) {
    let limits = shared.settings.control.stream;
    let request = GetDestination {
        scheme: "k8s".into(),
        path: path.clone(),
        context_token: shared.settings.control.context.clone(),
    };
    let mut set = EndpointSet::default();
    let mut failures = 0u32;
    loop {
        let opened = Instant::now();
        let stream: Result<Messages<linkerd2_proxy_api::destination::Update>, _> =
            Box::pin(client::open(
                &shared.destination,
                client::DESTINATION_GET,
                request.clone(),
                &limits,
            ))
            .await;
        let mut stream = match stream {
            Ok(stream) => Limited::new(stream, opened, limits),
            Err(status) => {
                failures += 1;
                shared.metrics.error(Api::Destination);
                debug!(%path, %status, "cannot watch the endpoints");
                tokio::time::sleep(client::retry_delay(&shared.settings.backoff, failures)).await;
                continue;
            }
        };
        set.reconnected();
        loop {
            match stream.next().await {
                Next::Message(update) => {
                    failures = 0;
                    if set.apply(&update) {
                        let Some(balancer) = balancer.upgrade() else {
                            return;
                        };
                        let endpoints = set.endpoints();
                        debug!(%path, endpoints = endpoints.len(), "endpoints");
                        balancer.update(endpoints);
                    }
                }
                Next::Ended => break,
                Next::Failed(status) => {
                    failures += 1;
                    shared.metrics.error(Api::Destination);
                    if failures == 1 {
                        warn!(%path, %status, "the endpoint stream failed; keeping the last endpoints");
                    }
                    tokio::time::sleep(client::retry_delay(&shared.settings.backoff, failures))
                        .await;
                    break;
                }
            }
        }
        if balancer.strong_count() == 0 {
            return;
        }
        shared.metrics.reconnect(Api::Destination);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answers_as_in_linkerd() {
        assert_eq!(
            final_policy_answer(tonic::Code::NotFound),
            Some(PolicyAnswer::Unknown)
        );
        assert_eq!(
            final_policy_answer(tonic::Code::Unimplemented),
            Some(PolicyAnswer::Unknown)
        );
        assert_eq!(
            final_policy_answer(tonic::Code::InvalidArgument),
            Some(PolicyAnswer::Rejected)
        );
        assert_eq!(final_policy_answer(tonic::Code::Unavailable), None);
        assert!(no_profile(tonic::Code::FailedPrecondition));
        assert!(!no_profile(tonic::Code::NotFound));
    }
}
