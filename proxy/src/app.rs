//! The running proxy: binds listeners, starts the admin server, accepts connections,
//! and drains on shutdown.
//!
//! Start-up order: bind every listener first (so a port conflict fails fast, before
//! anything is served), start admin, then the accept loops, then report ready.
//! Shutdown: stop accepting (the listening sockets close, so new connections are
//! refused rather than left hanging), let open connections finish, and exit once
//! they are done or the grace period ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::discover::balance::BalanceSettings;
use crate::discover::file::FileDiscovery;
use crate::discover::linkerd::inbound::{InboundPolicies, InboundSettings};
use crate::discover::linkerd::Linkerd;
use crate::discover::{Discover, Layered, NoDiscovery};
use crate::http::client::Pools;
use crate::http::HttpProxy;
use crate::inbound::{Inbound, PortPolicy};
use crate::mesh::identity::{self, LocalIdentity};
use crate::mesh::tls::{NoTlsReason, TlsStatus};
use crate::mesh::Dialer;
use crate::metrics::Metrics;
use crate::opaque::carrier::{self, Carriers};
use crate::ops::admin::{self, Admin};
use crate::ops::drain::Drain;
use crate::ops::log::LogLevel;
use crate::outbound::Outbound;

/// Runs the proxy until it is told to stop and has drained.
pub fn run(config: Config, log_level: LogLevel) -> anyhow::Result<()> {
    let available = crate::ops::cores::available();
    let threads = crate::ops::cores::worker_threads(&config.cores, available);
    tracing::debug!(threads, available_cpus = available, "worker threads");
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(crate::ops::memory::on_worker_idle)
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(threads)
            .enable_all()
            .on_thread_park(crate::ops::memory::on_worker_idle)
            .build()
    }
    .context("cannot start the runtime")?;
    let admin_stop = CancellationToken::new();
    let mut admin_thread = None;
    let result = runtime.block_on(serve_until_drained(
        config,
        log_level,
        &admin_stop,
        &mut admin_thread,
    ));
    // The admin server outlives the drain so probes keep answering, and stops last so
    // that whoever asked for the shutdown gets its answer before the process exits.
    admin_stop.cancel();
    if let Some(thread) = admin_thread {
        let _ = thread.join();
    }
    result
}

async fn serve_until_drained(
    config: Config,
    log_level: LogLevel,
    admin_stop: &CancellationToken,
    admin_thread: &mut Option<std::thread::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let bind = |addr: SocketAddr, var: &str| {
        crate::net::socket::bind(addr).with_context(|| format!("cannot listen on {addr} ({var})"))
    };
    let inbound_listeners = config
        .inbound
        .listen
        .iter()
        .map(|a| bind(*a, "LINKERD2_PROXY_INBOUND_LISTEN_ADDR"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outbound_listeners = config
        .outbound
        .listen
        .iter()
        .map(|a| bind(*a, "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let admin_listener = std::net::TcpListener::bind(config.admin_listen).with_context(|| {
        format!(
            "cannot listen on {} (LINKERD2_PROXY_ADMIN_LISTEN_ADDR)",
            config.admin_listen
        )
    })?;

    let mut metrics = Metrics::new(&config);
    let identity_metrics = config
        .identity
        .as_ref()
        .map(|_| tandem_identity::metrics::IdentityMetrics::register(&mut metrics.registry));
    let metrics = Arc::new(metrics);
    let file_discovery = match &config.discovery_file {
        Some(path) => {
            let (discovery, reload) = FileDiscovery::start(
                path.clone(),
                config.discovery_reload_interval,
                balance_settings(&config),
                metrics.balancers.clone(),
                metrics.routes.clone(),
            )
            .map_err(|e| anyhow::anyhow!("cannot load TANDEM_DISCOVERY_FILE: {e}"))?;
            tokio::spawn(reload);
            Some(discovery)
        }
        None => None,
    };
    let shutdown = CancellationToken::new();
    let mut signals = Signals::listen();
    let ready = Arc::new(AtomicBool::new(false));
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        ready: ready.clone(),
        log_level,
        shutdown_endpoint_enabled: config.shutdown_endpoint_enabled,
        shutdown: shutdown.clone(),
    });
    *admin_thread = Some(spawn_admin_thread(
        admin,
        admin_listener,
        admin_stop.clone(),
    )?);

    // As Linkerd: no traffic is served before the first certificate, so nothing meshed
    // can ever go out (or be accepted) in plaintext. `/live` answers meanwhile.
    let identity = match (config.identity.clone(), identity_metrics) {
        (Some(identity_config), Some(identity_metrics)) => tokio::select! {
            identity = identity::start(identity_config, identity_metrics) => Some(identity?),
            _ = signals.stop_requested(&shutdown) => return Ok(()),
        },
        _ => None,
    };

    let connections = TaskTracker::new();
    let drain = Arc::new(Drain::default());
    let (inbound, outbound) = directions(
        &config,
        &metrics,
        identity,
        file_discovery,
        &drain,
        &connections,
    )?;
    for sweep in [
        Handler::Inbound(inbound.clone()),
        Handler::Outbound(outbound.clone()),
    ] {
        tokio::spawn(sweep_pools(sweep, shutdown.clone()));
    }
    tokio::spawn(crate::ops::memory::tick());
    tokio::spawn(crate::metrics::budget::sample(
        metrics.budget.clone(),
        [metrics.inbound.http.clone(), metrics.outbound.http.clone()],
    ));
    let mut accept_loops = Vec::new();
    for listener in inbound_listeners {
        info!(direction = "inbound", addr = %listener.local_addr()?, "listening");
        let handler = Handler::Inbound(inbound.clone());
        accept_loops.push(tokio::spawn(accept_loop(
            handler,
            listener,
            connections.clone(),
            shutdown.clone(),
        )));
    }
    for listener in outbound_listeners {
        info!(direction = "outbound", addr = %listener.local_addr()?, "listening");
        let handler = Handler::Outbound(outbound.clone());
        accept_loops.push(tokio::spawn(accept_loop(
            handler,
            listener,
            connections.clone(),
            shutdown.clone(),
        )));
    }
    ready.store(true, Ordering::Release);
    info!(admin = %config.admin_listen, "proxy ready");

    let cause = signals.stop_requested(&shutdown).await;
    if cause == StopCause::Signal && !config.shutdown_delay.is_zero() {
        // A classic sidecar gets SIGTERM together with its app; the app may still
        // need to call out while it finishes, so keep serving for a while first.
        info!(delay = ?config.shutdown_delay, "serving on before draining (TANDEM_SHUTDOWN_DELAY)");
        tokio::select! {
            _ = tokio::time::sleep(config.shutdown_delay) => {}
            cause = signals.stop_requested(&shutdown) => {
                info!(?cause, "asked again; draining now");
            }
        }
    }
    shutdown.cancel();
    drain.start();
    for accept_loop in accept_loops {
        // The loops end as soon as they see the cancellation, dropping their listeners.
        let _ = accept_loop.await;
    }
    connections.close();
    let open = connections.len();
    info!(open_connections = open, grace = ?config.shutdown_grace_period, "draining");
    if tokio::time::timeout(config.shutdown_grace_period, connections.wait())
        .await
        .is_err()
    {
        warn!(
            open_connections = connections.len(),
            "grace period over; closing remaining connections"
        );
    } else {
        info!("drained");
    }
    Ok(())
}

/// Builds the two directions. What every connection shares (identity, drain, the
/// task tracker) is handed to both; what one direction owns (its pools, carriers,
/// port policy) is built into it alone.
fn directions(
    config: &Config,
    metrics: &Metrics,
    identity: Option<Arc<LocalIdentity>>,
    file_discovery: Option<Arc<FileDiscovery>>,
    drain: &Arc<Drain>,
    connections: &TaskTracker,
) -> anyhow::Result<(Arc<Inbound>, Arc<Outbound>)> {
    let dialer = |direction: &crate::config::DirectionConfig, identity| Dialer {
        identity,
        connect_timeout: direction.connect_timeout,
        handshake_timeout: direction.handshake_timeout(),
        options: direction.connect,
    };
    let http = |direction: &crate::config::DirectionConfig,
                pool_config,
                dialer: &Arc<Dialer>,
                metrics: &Arc<crate::metrics::DirectionMetrics>,
                plain| {
        Arc::new(HttpProxy {
            pools: Pools::new(pool_config, dialer.clone(), metrics.clone(), plain),
            metrics: metrics.clone(),
            config: direction.http.clone(),
            queue: config.outbound_http_queue,
            drain: drain.clone(),
            tasks: connections.clone(),
        })
    };

    let out = &config.outbound;
    let out_dialer = Arc::new(dialer(out, identity.clone()));
    let (discovery, policies) = discovery(config, metrics, file_discovery, &out_dialer)?;
    let unmeshed = TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery);
    let outbound = Arc::new(Outbound {
        config: out.clone(),
        metrics: metrics.outbound.clone(),
        discovery,
        http: http(
            out,
            out.http.clone(),
            &out_dialer,
            &metrics.outbound,
            unmeshed,
        ),
        carriers: Carriers::new(
            out.opaque_carrier,
            out.http.clone(),
            metrics.outbound.clone(),
        ),
        dialer: out_dialer,
        tcp_queue: config.outbound_tcp_queue,
        local_ips: config.inbound_ips.clone(),
    });

    let inb = &config.inbound;
    // The inbound side dials only the local application, never with mesh TLS.
    let app_dialer = Arc::new(dialer(inb, None));
    let mut app_pools = inb.http.clone();
    // The inbound pool reaches the local app: a PING there finds nothing a FIN would
    // not, and would cut an app that stalls (GC, a blocked loop).
    app_pools.keepalive_interval = std::time::Duration::ZERO;
    let loopback = TlsStatus::NoIdentity(NoTlsReason::Loopback);
    let inbound = Arc::new(Inbound {
        config: inb.clone(),
        metrics: metrics.inbound.clone(),
        http: http(inb, app_pools, &app_dialer, &metrics.inbound, loopback),
        carriers: Arc::new(carrier::Acceptor {
            dialer: dialer(inb, None),
            metrics: metrics.inbound.clone(),
            drain: drain.clone(),
            http: inb.http.clone(),
            handshake_timeout: inb.detect_timeout,
            policies: policies.clone(),
        }),
        identity,
        policy: PortPolicy {
            require_identity: config.inbound_require_identity.clone(),
            require_tls: config.inbound_require_tls.clone(),
        },
        dialer: app_dialer,
        local_ips: config.inbound_ips.clone(),
        policies,
    });
    Ok((inbound, outbound))
}

/// What discovery gives each direction.
type Sources = (Arc<dyn Discover>, Option<Arc<InboundPolicies>>);

/// Where the outbound side learns about destinations: Linkerd's control plane, the
/// discovery file, both (the file first, for peers the cluster does not know), or
/// neither; and, under the control plane, where the inbound side learns its ports'
/// policies.
fn discovery(
    config: &Config,
    metrics: &Metrics,
    file: Option<Arc<FileDiscovery>>,
    dialer: &Arc<Dialer>,
) -> anyhow::Result<Sources> {
    let Some(control) = &config.control_plane else {
        let discover: Arc<dyn Discover> = match file {
            Some(file) => file,
            None => Arc::new(NoDiscovery),
        };
        return Ok((discover, None));
    };
    let settings = crate::discover::linkerd::Settings {
        control: control.clone(),
        balance: balance_settings(config),
        failfast: config.outbound_http_queue.failfast,
        backoff: config.outbound_backoff,
        idle: config.outbound_discovery_idle_timeout,
    };
    let linkerd = Linkerd::start(
        settings,
        dialer.clone(),
        metrics.control.clone(),
        metrics.balancers.clone(),
        metrics.routes.clone(),
    )
    .map_err(|e| anyhow::anyhow!("cannot reach the control plane: {e}"))?;
    let policy = &config.inbound_policy;
    let policies = InboundPolicies::start(
        InboundSettings {
            workload: control.workload.clone(),
            stream: control.stream,
            backoff: config.outbound_backoff,
            ports: policy.ports.clone(),
            idle: policy.idle,
            default: policy.default,
            cluster_networks: policy.cluster_networks.clone(),
            opaque_ports: config.inbound.opaque_ports.clone(),
        },
        linkerd.policy_channel(),
        metrics.control.clone(),
        metrics.authz.clone(),
    );
    let discover: Arc<dyn Discover> = match file {
        Some(first) => Arc::new(Layered {
            first,
            then: linkerd,
        }),
        None => linkerd,
    };
    Ok((discover, Some(policies)))
}

/// How balancers queue and back off: Linkerd's outbound queue settings, its
/// connect backoff, and its default peak-EWMA parameters.
fn balance_settings(config: &Config) -> BalanceSettings {
    BalanceSettings {
        backoff: config.outbound_backoff,
        default_rtt: std::time::Duration::from_millis(30),
        decay: std::time::Duration::from_secs(10),
    }
}

/// One direction: where its accepted connections go, and whose pools are swept.
#[derive(Clone)]
enum Handler {
    Inbound(Arc<Inbound>),
    Outbound(Arc<Outbound>),
}

/// Closes idle pooled HTTP connections (and carriers) on time, even when no request
/// comes to notice.
async fn sweep_pools(direction: Handler, shutdown: CancellationToken) {
    let period = match &direction {
        Handler::Inbound(inbound) => inbound.http.pools.sweep_interval(),
        Handler::Outbound(outbound) => outbound.http.pools.sweep_interval(),
    };
    let mut interval = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => match &direction {
                Handler::Inbound(inbound) => inbound.sweep(),
                Handler::Outbound(outbound) => outbound.sweep(),
            },
        }
    }
}

async fn accept_loop(
    handler: Handler,
    listener: TcpListener,
    connections: TaskTracker,
    shutdown: CancellationToken,
) {
    let direction = match handler {
        Handler::Inbound(_) => "inbound",
        Handler::Outbound(_) => "outbound",
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, client)) => match &handler {
                Handler::Inbound(inbound) => {
                    connections.spawn(inbound.clone().serve(stream, client));
                }
                Handler::Outbound(outbound) => {
                    connections.spawn(outbound.clone().serve(stream, client));
                }
            },
            Err(error) => {
                // Usually EMFILE/ENFILE: pause briefly instead of spinning on the error.
                warn!(direction, %error, "accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

fn spawn_admin_thread(
    admin: Arc<Admin>,
    listener: std::net::TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    listener
        .set_nonblocking(true)
        .context("cannot configure the admin listener")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the admin runtime")?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => admin::serve(admin, listener, stop).await,
                    Err(error) => warn!(%error, "admin server failed to start"),
                }
            })
        })
        .context("cannot start the admin thread")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopCause {
    Signal,
    AdminEndpoint,
}

/// SIGTERM and SIGINT, registered once so that a second signal during the
/// shutdown delay is seen too.
struct Signals {
    streams: Option<(Signal, Signal)>,
}

impl Signals {
    fn listen() -> Signals {
        let streams = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => {
                warn!("cannot listen for signals; only the admin /shutdown endpoint can stop the proxy");
                None
            }
        };
        Signals { streams }
    }

    async fn stop_requested(&mut self, admin_shutdown: &CancellationToken) -> StopCause {
        let Some((term, int)) = &mut self.streams else {
            admin_shutdown.cancelled().await;
            return StopCause::AdminEndpoint;
        };
        tokio::select! {
            _ = term.recv() => { info!("received SIGTERM; shutting down"); StopCause::Signal }
            _ = int.recv() => { info!("received SIGINT; shutting down"); StopCause::Signal }
            _ = admin_shutdown.cancelled() => {
                info!("shutdown requested through the admin endpoint");
                StopCause::AdminEndpoint
            }
        }
    }
}
