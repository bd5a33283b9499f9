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

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::conn::Context;
use crate::discovery::{Discover, FileDiscovery, NoDiscovery};
use crate::drain::Drain;
use crate::identity;
use crate::log::LogLevel;
use crate::metrics::{Direction, Metrics};

/// Runs the proxy until it is told to stop and has drained.
pub fn run(config: Config, log_level: LogLevel) -> anyhow::Result<()> {
    let available = crate::cores::available();
    let threads = crate::cores::worker_threads(&config.cores, available);
    tracing::debug!(threads, available_cpus = available, "worker threads");
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(threads)
            .enable_all()
            .build()
    }
    .context("cannot start the runtime")?;
    let admin_stop = CancellationToken::new();
    let mut admin_thread = None;
    let result = runtime.block_on(serve(config, log_level, &admin_stop, &mut admin_thread));
    // The admin server outlives the drain so probes keep answering, and stops last so
    // that whoever asked for the shutdown gets its answer before the process exits.
    admin_stop.cancel();
    if let Some(thread) = admin_thread {
        let _ = thread.join();
    }
    result
}

async fn serve(
    config: Config,
    log_level: LogLevel,
    admin_stop: &CancellationToken,
    admin_thread: &mut Option<std::thread::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let bind = |addr: SocketAddr, var: &str| {
        crate::transport::bind(addr).with_context(|| format!("cannot listen on {addr} ({var})"))
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
    let discovery: Arc<dyn Discover> = match &config.discovery_file {
        Some(path) => {
            let (discovery, reload) =
                FileDiscovery::start(path.clone(), config.discovery_reload_interval)
                    .map_err(|e| anyhow::anyhow!("cannot load TANDEM_DISCOVERY_FILE: {e}"))?;
            tokio::spawn(reload);
            discovery
        }
        None => Arc::new(NoDiscovery),
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
    let directions = [
        (
            Direction::Inbound,
            inbound_listeners,
            config.inbound.clone(),
            metrics.inbound.clone(),
        ),
        (
            Direction::Outbound,
            outbound_listeners,
            config.outbound.clone(),
            metrics.outbound.clone(),
        ),
    ];
    let mut accept_loops = Vec::new();
    for (direction, listeners, direction_config, direction_metrics) in directions {
        let mut pool_config = direction_config.http.clone();
        if direction == Direction::Inbound {
            // The inbound pool reaches the local app: a PING there finds nothing a
            // FIN would not, and would cut an app that stalls (GC, a blocked loop).
            pool_config.keepalive_interval = std::time::Duration::ZERO;
        }
        let ctx = Arc::new(Context {
            http: crate::http::client::Pools::new(pool_config),
            config: direction_config,
            metrics: direction_metrics,
            discovery: discovery.clone(),
            identity: identity.clone(),
            require_identity: config.inbound_require_identity.clone(),
            require_tls: config.inbound_require_tls.clone(),
            tunnels: Default::default(),
            drain: drain.clone(),
            connections: connections.clone(),
        });
        tokio::spawn(sweep_pools(ctx.clone(), shutdown.clone()));
        for listener in listeners {
            info!(direction = direction.as_str(), addr = %listener.local_addr()?, "listening");
            accept_loops.push(tokio::spawn(accept_loop(
                direction,
                listener,
                ctx.clone(),
                shutdown.clone(),
            )));
        }
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

/// Closes idle pooled HTTP connections on time, even when no request comes to notice.
async fn sweep_pools(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(ctx.http.sweep_interval());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {
                ctx.http.sweep();
                ctx.tunnels.sweep(ctx.config.http.max_connection_age);
            }
        }
    }
}

async fn accept_loop(
    direction: Direction,
    listener: TcpListener,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, client)) => {
                let ctx = ctx.clone();
                let connections = ctx.connections.clone();
                connections.spawn(async move {
                    match direction {
                        Direction::Inbound => crate::inbound::handle(&ctx, stream, client).await,
                        Direction::Outbound => crate::outbound::handle(&ctx, stream, client).await,
                    }
                });
            }
            Err(error) => {
                // Usually EMFILE/ENFILE: pause briefly instead of spinning on the error.
                warn!(direction = direction.as_str(), %error, "accept failed");
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
