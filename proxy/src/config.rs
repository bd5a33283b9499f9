//! The proxy's configuration, read from the environment.
//!
//! Every variable the proxy reads, its default and its error message live here (the
//! identity source's own variables are read by `tandem_identity`, with the same
//! reader, `tandem_identity::env`), so the README's configuration table can be
//! checked against the code. Names, defaults and formats follow linkerd2-proxy
//! wherever it has the setting, so injection templates carry over; Tandem-only
//! settings are `TANDEM_*`. The inbound and outbound settings are read by one
//! function from the two directions' tables of names ([`INBOUND`], [`OUTBOUND`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tandem_identity::env::{self, Env};
pub use tandem_identity::env::{duration as parse_duration, PortSet};

/// Ports whose traffic is never protocol-detected by default (server-speaks-first or
/// otherwise detection-hostile protocols: SMTP, MySQL, Galera, PostgreSQL, Redis,
/// Elasticsearch transport, Memcached), as in Linkerd.
pub const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4444,5432,6379,9300,11211";

/// How log lines are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Settings for one direction's listener and connections.
#[derive(Clone, Debug)]
pub struct DirectionConfig {
    pub listen: Vec<SocketAddr>,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    /// Options for the sockets this direction accepts, and for those it opens.
    pub accept: SocketOptions,
    pub connect: SocketOptions,
    pub opaque_ports: PortSet,
    pub http: HttpConfig,
    /// Outbound: offer peer proxies a carrier for meshed opaque connections. Inbound:
    /// accept carriers from peer proxies (`opaque/carrier.rs`).
    pub opaque_carrier: bool,
    /// A client silent this long is given to the server, whose first bytes (if it
    /// speaks first) make the connection opaque; zero: off.
    pub server_first_window: Duration,
}

impl DirectionConfig {
    /// How long a TLS handshake may take: it needs a connect's time at least, and a
    /// client's first bytes' time at most.
    pub fn handshake_timeout(&self) -> Duration {
        self.connect_timeout.max(self.detect_timeout)
    }
}

/// TCP options for one kind of socket (accepted or opened, per direction).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOptions {
    /// TCP keepalive idle time: dead peers are noticed on long-idle connections.
    pub keepalive: Option<Duration>,
    /// `TCP_USER_TIMEOUT`: a connection whose sent data stays unacknowledged this
    /// long is closed, so a peer that vanished with data in flight is noticed in
    /// seconds rather than after minutes of retransmissions.
    pub user_timeout: Option<Duration>,
}

/// HTTP connection pooling towards one direction's destinations.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// An idle pooled connection (HTTP/1 idle, or HTTP/2 without requests) is closed
    /// after this long.
    pub pool_idle_timeout: Duration,
    /// Idle HTTP/1 connections kept per endpoint; beyond it a finished connection is closed.
    pub max_idle_per_endpoint: usize,
    /// No new request goes on a connection older than this, so connections are
    /// rebalanced over time; requests already on it run to their end.
    pub max_connection_age: Duration,
    /// Label request metrics with the request's authority. Always on outbound; inbound
    /// only with `LINKERD2_PROXY_INBOUND_METRICS_AUTHORITY_LABELS=unsafe`, since there
    /// clients choose it and the series count would be unbounded.
    pub authority_labels: bool,
    /// HTTP/2 connections across the network (outbound: pooled HTTP/2 and carriers
    /// to upstreams; inbound: HTTP/2 and carriers served to remote clients) send a
    /// PING this often and are closed when the answer takes longer than
    /// `keepalive_timeout`, so a peer that went away without a FIN (node lost,
    /// process frozen) fails its streams instead of stalling them until TCP gives
    /// up. Connections with the local app are never pinged.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl HttpConfig {
    /// The PING interval, `None` when keepalive is off (either setting `0`).
    pub fn keepalive(&self) -> Option<Duration> {
        (!self.keepalive_interval.is_zero() && !self.keepalive_timeout.is_zero())
            .then_some(self.keepalive_interval)
    }
}

/// An address of Linkerd's control plane and the identity it must prove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlAddr {
    /// `host:port`; a name is resolved on each dial.
    pub addr: String,
    /// The control plane's identity (and SNI); `None` only for loopback, where the
    /// connection is plaintext.
    pub name: Option<String>,
}

/// Linkerd's limits on a control-plane stream; unset means none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamLimits {
    /// The first message must arrive within this.
    pub initial: Option<Duration>,
    /// A stream silent this long ends and is opened again.
    pub idle: Option<Duration>,
    /// A stream this old ends and is opened again.
    pub lifetime: Option<Duration>,
}

/// Linkerd's control plane, as its injector configures a proxy.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlPlane {
    pub destination: ControlAddr,
    pub policy: ControlAddr,
    /// `LINKERD2_PROXY_DESTINATION_CONTEXT`, sent as the context token.
    pub context: String,
    /// `LINKERD2_PROXY_POLICY_WORKLOAD`, sent as the source workload.
    pub workload: String,
    /// Addresses whose profile is asked for.
    pub profile_networks: Vec<ipnet::IpNet>,
    pub stream: StreamLimits,
}

/// The inbound side's port policies from Linkerd's policy controller.
#[derive(Clone, Debug)]
pub struct InboundPolicyConfig {
    /// `LINKERD2_PROXY_INBOUND_PORTS`: watched from start-up.
    pub ports: Vec<u16>,
    /// `LINKERD2_PROXY_INBOUND_DEFAULT_POLICY`: a port's policy until the
    /// controller answers.
    pub default: crate::discover::inbound_policy::DefaultPolicy,
    /// `LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS`, for the `cluster-*` defaults.
    pub cluster_networks: Vec<ipnet::IpNet>,
    /// `LINKERD2_PROXY_INBOUND_DISCOVERY_IDLE_TIMEOUT`: a port outside the list is
    /// forgotten after this long unused.
    pub idle: Duration,
}

/// A queue before a balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queue {
    pub capacity: usize,
    /// Waiting longer fails (503 for HTTP, a reset for TCP).
    pub failfast: Duration,
}

/// Exponential backoff with jitter (Linkerd's `…_EXP_BACKOFF_{MIN,MAX,JITTER}`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    /// A fraction of each delay added at random.
    pub jitter: f64,
}

impl Backoff {
    /// The delay after `failures` failures in a row (1 or more), before jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(30));
        self.min.saturating_mul(factor).min(self.max)
    }

    /// [`Backoff::delay`] with `random` (in [0, 1)) times the jitter added.
    pub fn jittered(&self, failures: u32, random: f64) -> Duration {
        let delay = self.delay(failures);
        delay + delay.mul_f64(self.jitter.max(0.0) * random)
    }
}

/// The names of one direction's variables, with the defaults that differ between
/// the directions. A name of `None` is a setting the direction does not read.
pub struct DirectionNames {
    /// A list of up to two addresses, read instead of `listen` when set.
    pub listen_list: Option<&'static str>,
    pub listen: &'static str,
    pub listen_default: &'static str,
    pub detect_timeout: &'static str,
    pub connect_timeout: &'static str,
    pub connect_timeout_default: &'static str,
    pub accept_keepalive: &'static str,
    pub accept_user_timeout: &'static str,
    pub connect_keepalive: &'static str,
    pub connect_user_timeout: &'static str,
    pub opaque_ports: &'static str,
    pub opaque_carrier: &'static str,
    pub opaque_carrier_default: &'static str,
    pub server_first_window: &'static str,
    pub pool_idle_timeout: &'static str,
    pub max_idle_per_endpoint: &'static str,
    pub max_connection_age: &'static str,
    /// `None`: authority labels are always on.
    pub authority_labels: Option<&'static str>,
    pub keepalive_interval: &'static str,
    pub keepalive_timeout: &'static str,
}

pub const INBOUND: DirectionNames = DirectionNames {
    listen_list: None,
    listen: "LINKERD2_PROXY_INBOUND_LISTEN_ADDR",
    listen_default: "0.0.0.0:4143",
    detect_timeout: "LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT",
    connect_timeout: "LINKERD2_PROXY_INBOUND_CONNECT_TIMEOUT",
    connect_timeout_default: "300ms",
    accept_keepalive: "LINKERD2_PROXY_INBOUND_ACCEPT_KEEPALIVE",
    accept_user_timeout: "LINKERD2_PROXY_INBOUND_ACCEPT_USER_TIMEOUT",
    connect_keepalive: "LINKERD2_PROXY_INBOUND_CONNECT_KEEPALIVE",
    connect_user_timeout: "LINKERD2_PROXY_INBOUND_CONNECT_USER_TIMEOUT",
    opaque_ports: "LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION",
    opaque_carrier: "TANDEM_INBOUND_OPAQUE_CARRIER",
    opaque_carrier_default: "true",
    server_first_window: "TANDEM_INBOUND_SERVER_FIRST_WINDOW",
    pool_idle_timeout: "LINKERD2_PROXY_INBOUND_HTTP1_CONNECTION_POOL_IDLE_TIMEOUT",
    // Linkerd's name: the inbound one has no INBOUND_.
    max_idle_per_endpoint: "LINKERD2_PROXY_MAX_IDLE_CONNS_PER_ENDPOINT",
    max_connection_age: "TANDEM_INBOUND_HTTP_MAX_CONNECTION_AGE",
    authority_labels: Some("LINKERD2_PROXY_INBOUND_METRICS_AUTHORITY_LABELS"),
    keepalive_interval: "TANDEM_INBOUND_HTTP2_KEEPALIVE_INTERVAL",
    keepalive_timeout: "TANDEM_INBOUND_HTTP2_KEEPALIVE_TIMEOUT",
};

pub const OUTBOUND: DirectionNames = DirectionNames {
    listen_list: Some("LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS"),
    listen: "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR",
    listen_default: "127.0.0.1:4140",
    detect_timeout: "LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT",
    connect_timeout: "LINKERD2_PROXY_OUTBOUND_CONNECT_TIMEOUT",
    connect_timeout_default: "1s",
    accept_keepalive: "LINKERD2_PROXY_OUTBOUND_ACCEPT_KEEPALIVE",
    accept_user_timeout: "LINKERD2_PROXY_OUTBOUND_ACCEPT_USER_TIMEOUT",
    connect_keepalive: "LINKERD2_PROXY_OUTBOUND_CONNECT_KEEPALIVE",
    connect_user_timeout: "LINKERD2_PROXY_OUTBOUND_CONNECT_USER_TIMEOUT",
    opaque_ports: "TANDEM_OUTBOUND_PORTS_DISABLE_PROTOCOL_DETECTION",
    opaque_carrier: "TANDEM_OUTBOUND_OPAQUE_CARRIER",
    opaque_carrier_default: "false",
    server_first_window: "TANDEM_OUTBOUND_SERVER_FIRST_WINDOW",
    pool_idle_timeout: "LINKERD2_PROXY_OUTBOUND_HTTP1_CONNECTION_POOL_IDLE_TIMEOUT",
    max_idle_per_endpoint: "LINKERD2_PROXY_OUTBOUND_MAX_IDLE_CONNS_PER_ENDPOINT",
    max_connection_age: "TANDEM_OUTBOUND_HTTP_MAX_CONNECTION_AGE",
    authority_labels: None,
    keepalive_interval: "TANDEM_OUTBOUND_HTTP2_KEEPALIVE_INTERVAL",
    keepalive_timeout: "TANDEM_OUTBOUND_HTTP2_KEEPALIVE_TIMEOUT",
};

#[derive(Clone, Debug)]
pub struct Config {
    /// Settings that were ignored, one line each, to log once logging is set up.
    pub warnings: Vec<String>,
    pub inbound: DirectionConfig,
    pub outbound: DirectionConfig,
    pub admin_listen: SocketAddr,
    pub metrics_retain_idle: Duration,
    /// Upper bound on distinct transport-metric series per direction; beyond it new
    /// targets share one `target_addr="overflow"` series instead of growing memory.
    pub metrics_max_targets: usize,
    pub shutdown_endpoint_enabled: bool,
    pub shutdown_grace_period: Duration,
    pub log_filter: String,
    pub log_format: LogFormat,
    /// Worker-thread bounds; `crate::ops::cores` turns them into a thread count.
    pub cores: crate::ops::cores::CoreSettings,
    /// After SIGTERM, keep accepting and serving for this long before draining,
    /// so that a classic sidecar's app can still call out while it shuts down.
    pub shutdown_delay: Duration,
    /// Where the proxy's certificate comes from; `None` runs without mesh identity
    /// (no mTLS, nothing meshed).
    pub identity: Option<tandem_identity::IdentityConfig>,
    pub discovery_file: Option<PathBuf>,
    pub discovery_reload_interval: Duration,
    /// Inbound ports that refuse connections without an mTLS client identity.
    pub inbound_require_identity: PortSet,
    /// Inbound ports that refuse connections without mesh TLS.
    pub inbound_require_tls: PortSet,
    /// Linkerd's control plane, when the injector configured one.
    pub control_plane: Option<ControlPlane>,
    /// How the inbound side keeps its ports' policies (under the control plane).
    pub inbound_policy: InboundPolicyConfig,
    /// The window and minimum rate of the budget gauges (`metrics::budget`).
    pub budget: crate::metrics::budget::BudgetSettings,
    /// A target unused this long is forgotten, with its discovery streams.
    pub outbound_discovery_idle_timeout: Duration,
    pub outbound_http_queue: Queue,
    pub outbound_tcp_queue: Queue,
    /// Endpoints whose connections fail, and control-plane streams, are retried
    /// after this.
    pub outbound_backoff: Backoff,
    /// The pod's addresses (`LINKERD2_PROXY_INBOUND_IPS`): the inbound side refuses
    /// others, the outbound side treats them as local (never meshed).
    pub inbound_ips: Vec<IpAddr>,
}

/// Every configuration problem found, each naming its variable.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_vars(&std::env::vars().collect())
    }

    /// Reads the configuration from `vars`, and warns of the Linkerd variables among
    /// them that Tandem does not read (yet).
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
        let lookup = |name: &str| vars.get(name).cloned();
        let env = Env::new(&lookup);
        Config::read(env, vars.keys().map(String::as_str))
    }

    /// Reads the configuration through `lookup`, collecting every error rather than
    /// stopping at the first, so one run tells the operator everything that is wrong.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::read(Env::new(&lookup), std::iter::empty())
    }

    fn read<'n>(
        mut env: Env<'_>,
        set: impl IntoIterator<Item = &'n str>,
    ) -> Result<Config, ConfigError> {
        let extra_opaque = env.parse("TANDEM_EXTRA_OPAQUE_PORTS", "", PortSet::parse);
        let inbound = direction(&mut env, &INBOUND, &extra_opaque);
        let outbound = direction(&mut env, &OUTBOUND, &extra_opaque);
        let identity = match tandem_identity::IdentityConfig::from_env(&env) {
            Ok(identity) => identity,
            Err(errors) => {
                for error in errors {
                    env.error(error);
                }
                None
            }
        };
        let mut config = Config {
            warnings: Vec::new(),
            inbound,
            outbound,
            admin_listen: env.parse(
                "LINKERD2_PROXY_ADMIN_LISTEN_ADDR",
                "127.0.0.1:4191",
                env::socket_addr,
            ),
            metrics_retain_idle: env.parse(
                "LINKERD2_PROXY_METRICS_RETAIN_IDLE",
                "10m",
                env::duration,
            ),
            metrics_max_targets: env.parse("TANDEM_METRICS_MAX_TARGETS", "10000", env::positive),
            shutdown_endpoint_enabled: env.parse(
                "LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED",
                "false",
                strict_bool,
            ),
            shutdown_grace_period: env.parse(
                "LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD",
                "120s",
                env::duration,
            ),
            log_filter: env
                .value("LINKERD2_PROXY_LOG")
                .unwrap_or_else(|| "warn,tandem=info".into()),
            log_format: env.parse("LINKERD2_PROXY_LOG_FORMAT", "plain", parse_log_format),
            // Linkerd ignores a bad thread count with a warning rather than refusing
            // to start; so does Tandem, since a pod is better slow than down.
            cores: crate::ops::cores::CoreSettings {
                min: env
                    .parse_or_ignore("LINKERD2_PROXY_CORES_MIN", env::positive)
                    .or_else(|| env.parse_or_ignore("LINKERD2_PROXY_CORES", env::positive)),
                max: env.parse_or_ignore("LINKERD2_PROXY_CORES_MAX", env::positive),
                max_ratio: env.parse_or_ignore("LINKERD2_PROXY_CORES_MAX_RATIO", parse_ratio),
            },
            shutdown_delay: env.parse("TANDEM_SHUTDOWN_DELAY", "0s", env::duration),
            identity,
            discovery_file: env.setting("TANDEM_DISCOVERY_FILE").map(PathBuf::from),
            discovery_reload_interval: env.parse(
                "TANDEM_DISCOVERY_RELOAD_INTERVAL",
                "2s",
                env::duration,
            ),
            inbound_require_identity: env.parse(
                "LINKERD2_PROXY_INBOUND_PORTS_REQUIRE_IDENTITY",
                "",
                PortSet::parse,
            ),
            inbound_require_tls: env.parse(
                "LINKERD2_PROXY_INBOUND_PORTS_REQUIRE_TLS",
                "",
                PortSet::parse,
            ),
            control_plane: control_plane(&mut env),
            inbound_policy: inbound_policy(&mut env),
            budget: crate::metrics::budget::BudgetSettings {
                window: env.parse("TANDEM_BUDGET_WINDOW", "1m", env::duration),
                min_rps: env.parse("TANDEM_BUDGET_MIN_RPS", "10", parse_rate),
            },
            outbound_discovery_idle_timeout: env.parse(
                "LINKERD2_PROXY_OUTBOUND_DISCOVERY_IDLE_TIMEOUT",
                "5s",
                env::duration,
            ),
            outbound_http_queue: Queue {
                capacity: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_HTTP_QUEUE_CAPACITY",
                    "10000",
                    env::count,
                ),
                failfast: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_HTTP_QUEUE_FAILFAST_TIMEOUT",
                    "3s",
                    env::duration,
                ),
            },
            outbound_tcp_queue: Queue {
                capacity: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_TCP_QUEUE_CAPACITY",
                    "10000",
                    env::count,
                ),
                failfast: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_TCP_QUEUE_FAILFAST_TIMEOUT",
                    "3s",
                    env::duration,
                ),
            },
            outbound_backoff: Backoff {
                min: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_CONNECT_EXP_BACKOFF_MIN",
                    "100ms",
                    env::duration,
                ),
                max: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_CONNECT_EXP_BACKOFF_MAX",
                    "60s",
                    env::duration,
                ),
                jitter: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_CONNECT_EXP_BACKOFF_JITTER",
                    "0.1",
                    parse_jitter,
                ),
            },
            inbound_ips: env.parse("LINKERD2_PROXY_INBOUND_IPS", "", parse_ips),
        };
        if config.outbound_backoff.min > config.outbound_backoff.max {
            env.error("LINKERD2_PROXY_OUTBOUND_CONNECT_EXP_BACKOFF_MIN: longer than _MAX".into());
        }
        if let Some(control) = &config.control_plane {
            let remote = [&control.destination, &control.policy]
                .into_iter()
                .any(|c| !crate::discover::linkerd::client::is_loopback(&c.addr));
            if remote && config.identity.is_none() {
                env.error(
                    "LINKERD2_PROXY_DESTINATION_SVC_ADDR: the control plane is reached over mTLS, which needs mesh identity (LINKERD2_PROXY_IDENTITY_*)".into(),
                );
            }
        }
        if config.identity.is_some()
            && config.control_plane.is_none()
            && config.discovery_file.is_none()
        {
            env.warn("mesh identity is configured but no discovery source is (LINKERD2_PROXY_DESTINATION_SVC_ADDR or TANDEM_DISCOVERY_FILE): every destination is reached unmeshed, in plaintext".into());
        }
        let unread = env.unread(set, "LINKERD2_PROXY_");
        if !unread.is_empty() {
            env.warn(format!(
                "Linkerd settings that Tandem does not support yet, ignored: {}",
                unread.join(", ")
            ));
        }
        let needs_identity =
            !config.inbound_require_identity.is_empty() || !config.inbound_require_tls.is_empty();
        if needs_identity && config.identity.is_none() {
            env.error(
                "LINKERD2_PROXY_INBOUND_PORTS_REQUIRE_IDENTITY/_TLS need mesh identity (LINKERD2_PROXY_IDENTITY_*)".into(),
            );
        }
        match env.finish() {
            Ok(warnings) => {
                config.warnings = warnings;
                Ok(config)
            }
            Err(errors) => Err(ConfigError(errors)),
        }
    }
}

/// Reads one direction's settings under its `names`; both directions' opaque ports
/// include `extra_opaque` (`TANDEM_EXTRA_OPAQUE_PORTS`).
fn direction(env: &mut Env, names: &DirectionNames, extra_opaque: &PortSet) -> DirectionConfig {
    let listen = match names.listen_list.filter(|var| env.value(var).is_some()) {
        Some(list) => env.parse(list, names.listen_default, parse_addrs),
        None => vec![env.parse(names.listen, names.listen_default, env::socket_addr)],
    };
    let mut opaque_ports = env.parse(names.opaque_ports, DEFAULT_OPAQUE_PORTS, PortSet::parse);
    opaque_ports.extend(extra_opaque);
    let authority_labels = match names.authority_labels {
        Some(var) => env.parse(var, "", parse_authority_labels),
        None => true,
    };
    DirectionConfig {
        listen,
        detect_timeout: env.parse(names.detect_timeout, "10s", env::duration),
        server_first_window: env.parse(names.server_first_window, "300ms", env::duration),
        connect_timeout: env.parse(
            names.connect_timeout,
            names.connect_timeout_default,
            env::duration,
        ),
        accept: SocketOptions {
            keepalive: env.parse(names.accept_keepalive, "10s", parse_keepalive),
            user_timeout: env.parse(names.accept_user_timeout, "", parse_user_timeout),
        },
        connect: SocketOptions {
            keepalive: env.parse(names.connect_keepalive, "10s", parse_keepalive),
            user_timeout: env.parse(names.connect_user_timeout, "", parse_user_timeout),
        },
        opaque_ports,
        opaque_carrier: env.parse(
            names.opaque_carrier,
            names.opaque_carrier_default,
            strict_bool,
        ),
        http: HttpConfig {
            pool_idle_timeout: env.parse(names.pool_idle_timeout, "3s", env::duration),
            max_idle_per_endpoint: env.parse(names.max_idle_per_endpoint, "10000", env::count),
            max_connection_age: env.parse(names.max_connection_age, "1h", env::duration),
            authority_labels,
            keepalive_interval: env.parse(names.keepalive_interval, "10s", env::duration),
            keepalive_timeout: env.parse(names.keepalive_timeout, "20s", env::duration),
        },
    }
}

/// Linkerd's control-plane settings; `None` when no control plane is configured.
/// The destination and policy addresses come together, each with the identity it
/// must prove unless it is loopback.
fn control_plane(env: &mut Env) -> Option<ControlPlane> {
    let destination = env.setting("LINKERD2_PROXY_DESTINATION_SVC_ADDR");
    let policy = env.setting("LINKERD2_PROXY_POLICY_SVC_ADDR");
    let addr = |env: &mut Env, var: &str, name_var: &str, value: Option<String>| {
        let value = value?;
        if let Err(why) = control_addr(&value) {
            env.error(format!("{var}={value:?}: {why}"));
        }
        let name = env.optional(name_var, dns_name);
        if name.is_none() && !crate::discover::linkerd::client::is_loopback(&value) {
            env.error(format!(
                "{name_var}: required with {var} (the identity the control plane must prove; only a loopback address goes without)"
            ));
        }
        Some(ControlAddr { addr: value, name })
    };
    let destination = addr(
        env,
        "LINKERD2_PROXY_DESTINATION_SVC_ADDR",
        "LINKERD2_PROXY_DESTINATION_SVC_NAME",
        destination,
    );
    let policy = addr(
        env,
        "LINKERD2_PROXY_POLICY_SVC_ADDR",
        "LINKERD2_PROXY_POLICY_SVC_NAME",
        policy,
    );
    let context = env
        .value("LINKERD2_PROXY_DESTINATION_CONTEXT")
        .unwrap_or_default();
    let workload = env.setting("LINKERD2_PROXY_POLICY_WORKLOAD");
    let profile_networks = env.parse(
        "LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS",
        "",
        parse_networks,
    );
    let stream = StreamLimits {
        initial: env.optional(
            "LINKERD2_PROXY_CONTROL_STREAM_INITIAL_TIMEOUT",
            env::duration,
        ),
        idle: env.optional("LINKERD2_PROXY_CONTROL_STREAM_IDLE_TIMEOUT", env::duration),
        lifetime: env.optional("LINKERD2_PROXY_CONTROL_STREAM_LIFETIME", env::duration),
    };
    match (destination, policy) {
        (None, None) => None,
        (Some(_), None) => {
            env.error("LINKERD2_PROXY_POLICY_SVC_ADDR: required with LINKERD2_PROXY_DESTINATION_SVC_ADDR (Linkerd's control plane answers both)".into());
            None
        }
        (None, Some(_)) => {
            env.error("LINKERD2_PROXY_DESTINATION_SVC_ADDR: required with LINKERD2_PROXY_POLICY_SVC_ADDR (Linkerd's control plane answers both)".into());
            None
        }
        (Some(destination), Some(policy)) => {
            let workload = workload.unwrap_or_else(|| {
                env.error("LINKERD2_PROXY_POLICY_WORKLOAD: required with LINKERD2_PROXY_POLICY_SVC_ADDR (the pod, as JSON {\"ns\",\"pod\"} or ns:pod)".into());
                String::new()
            });
            Some(ControlPlane {
                destination,
                policy,
                context,
                workload,
                profile_networks,
                stream,
            })
        }
    }
}

/// A rate: a number of requests per second, zero or more.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err("expected a number of requests per second, 0 or more".into()),
    }
}

fn inbound_policy(env: &mut Env) -> InboundPolicyConfig {
    use crate::discover::inbound_policy::DefaultPolicy;
    let ports = env.parse("LINKERD2_PROXY_INBOUND_PORTS", "", PortSet::parse);
    let default = env.parse(
        "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY",
        "all-unauthenticated",
        DefaultPolicy::parse,
    );
    let cluster_networks = env.parse("LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS", "", parse_networks);
    let cluster = matches!(
        default,
        DefaultPolicy::ClusterAuthenticated | DefaultPolicy::ClusterUnauthenticated
    );
    if cluster && cluster_networks.is_empty() {
        env.error("LINKERD2_PROXY_INBOUND_DEFAULT_POLICY: a cluster-* policy needs LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS".into());
    }
    InboundPolicyConfig {
        ports: (0..=u16::MAX).filter(|p| ports.contains(*p)).collect(),
        default,
        cluster_networks,
        idle: env.parse(
            "LINKERD2_PROXY_INBOUND_DISCOVERY_IDLE_TIMEOUT",
            "90s",
            env::duration,
        ),
    }
}

/// `host:port`, the host a name or an address.
fn control_addr(text: &str) -> Result<(), String> {
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match text.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !host.contains(['/', ' '])
                && port.parse::<u16>().is_ok_and(|p| p != 0) =>
        {
            Ok(())
        }
        _ => Err(
            "expected host:port, such as linkerd-dst-headless.linkerd.svc.cluster.local.:8086"
                .into(),
        ),
    }
}

fn dns_name(text: &str) -> Result<String, String> {
    rustls::pki_types::DnsName::try_from(text)
        .map(|_| text.to_ascii_lowercase())
        .map_err(|_| "expected a DNS name".to_string())
}

fn parse_networks(text: &str) -> Result<Vec<ipnet::IpNet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.parse::<ipnet::IpNet>()
                .map(|net| net.trunc())
                .map_err(|_| format!("{n:?} is not a network such as 10.0.0.0/8"))
        })
        .collect()
}

fn parse_ips(text: &str) -> Result<Vec<IpAddr>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|ip| !ip.is_empty())
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| format!("{ip:?} is not an IP address"))
        })
        .collect()
}

fn parse_jitter(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(j) if (0.0..=100.0).contains(&j) => Ok(j),
        _ => Err("expected a number of 0 or more".into()),
    }
}

/// `true` or `false`; unlike a blank identity setting, a blank one here is a mistake.
fn strict_bool(text: &str) -> Result<bool, String> {
    if text.is_empty() {
        return Err("expected true or false".into());
    }
    env::boolean(text)
}

/// A keepalive of `0` turns TCP keepalive off.
fn parse_keepalive(text: &str) -> Result<Option<Duration>, String> {
    env::duration(text).map(|d| (!d.is_zero()).then_some(d))
}

/// Unset or `0` leaves the kernel's behaviour; the kernel takes whole milliseconds.
fn parse_user_timeout(text: &str) -> Result<Option<Duration>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let timeout = parse_keepalive(text)?;
    match timeout {
        Some(t) if t.as_millis() > u128::from(u32::MAX) => {
            Err("too long for TCP_USER_TIMEOUT (at most 49 days)".into())
        }
        _ => Ok(timeout),
    }
}

fn parse_addrs(text: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs = text
        .split(',')
        .map(env::socket_addr)
        .collect::<Result<Vec<_>, _>>()?;
    match addrs.len() {
        1 | 2 => Ok(addrs),
        _ => Err("expected one or two addresses separated by a comma".into()),
    }
}

/// Linkerd's values: `unsafe` turns the inbound authority label on; anything else
/// (it documents `safe`) leaves it off.
fn parse_authority_labels(text: &str) -> Result<bool, String> {
    match text {
        "unsafe" => Ok(true),
        "" | "safe" => Ok(false),
        other => Err(format!("expected `safe` or `unsafe`, not {other:?}")),
    }
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(r),
        _ => Err("expected a number greater than 0 and at most 1".into()),
    }
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text.to_ascii_lowercase().as_str() {
        "plain" => Ok(LogFormat::Plain),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected plain or json".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_match_linkerd() {
        let c = config(&[]).unwrap();
        assert_eq!(c.outbound.listen, vec!["127.0.0.1:4140".parse().unwrap()]);
        assert_eq!(c.inbound.listen, vec!["0.0.0.0:4143".parse().unwrap()]);
        assert_eq!(c.admin_listen, "127.0.0.1:4191".parse().unwrap());
        assert_eq!(c.inbound.detect_timeout, Duration::from_secs(10));
        assert_eq!(c.outbound.detect_timeout, Duration::from_secs(10));
        assert_eq!(c.metrics_retain_idle, Duration::from_secs(600));
        assert_eq!(c.shutdown_grace_period, Duration::from_secs(120));
        assert!(!c.shutdown_endpoint_enabled);
        assert_eq!(c.cores, crate::ops::cores::CoreSettings::default());
        assert_eq!(c.shutdown_delay, Duration::ZERO);
        // Carriers: accepted inbound, offered outbound only when asked for.
        assert!(c.inbound.opaque_carrier);
        assert!(!c.outbound.opaque_carrier);
        // HTTP/2 between proxies: a PING every 10 s, 20 s for its answer; 0 is off.
        for http in [&c.inbound.http, &c.outbound.http] {
            assert_eq!(http.keepalive(), Some(Duration::from_secs(10)));
            assert_eq!(http.keepalive_timeout, Duration::from_secs(20));
        }
        let off = config(&[("TANDEM_OUTBOUND_HTTP2_KEEPALIVE_INTERVAL", "0")]).unwrap();
        assert_eq!(off.outbound.http.keepalive(), None);
        assert_eq!(off.inbound.http.keepalive(), Some(Duration::from_secs(10)));
        // A zero timeout would cut every connection at its first PING: also off.
        let off = config(&[("TANDEM_INBOUND_HTTP2_KEEPALIVE_TIMEOUT", "0")]).unwrap();
        assert_eq!(off.inbound.http.keepalive(), None);
        for port in [25, 587, 3306, 4444, 5432, 6379, 9300, 11211] {
            assert!(c.inbound.opaque_ports.contains(port));
            assert!(c.outbound.opaque_ports.contains(port));
        }
        assert!(!c.inbound.opaque_ports.contains(80));
        assert_eq!(c.inbound.connect_timeout, Duration::from_millis(300));
        assert_eq!(c.outbound.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.inbound.http.max_idle_per_endpoint, 10_000);
        for options in [
            c.inbound.accept,
            c.inbound.connect,
            c.outbound.accept,
            c.outbound.connect,
        ] {
            assert_eq!(options.keepalive, Some(Duration::from_secs(10)));
            assert_eq!(options.user_timeout, None);
        }
    }

    /// The settings Linkerd's injection template sets, under Linkerd's names.
    #[test]
    fn linkerd_template_socket_settings_apply() {
        let c = config(&[
            ("LINKERD2_PROXY_INBOUND_ACCEPT_USER_TIMEOUT", "30s"),
            ("LINKERD2_PROXY_OUTBOUND_CONNECT_USER_TIMEOUT", "30000ms"),
            ("LINKERD2_PROXY_INBOUND_ACCEPT_KEEPALIVE", "10000ms"),
            ("LINKERD2_PROXY_OUTBOUND_CONNECT_KEEPALIVE", "0"),
            ("LINKERD2_PROXY_MAX_IDLE_CONNS_PER_ENDPOINT", "7"),
        ])
        .unwrap();
        assert_eq!(c.inbound.accept.user_timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            c.outbound.connect.user_timeout,
            Some(Duration::from_secs(30))
        );
        assert_eq!(c.inbound.connect.user_timeout, None);
        assert_eq!(c.inbound.accept.keepalive, Some(Duration::from_secs(10)));
        assert_eq!(c.outbound.connect.keepalive, None);
        assert_eq!(c.inbound.http.max_idle_per_endpoint, 7);
        assert_eq!(c.outbound.http.max_idle_per_endpoint, 10_000);
        let error = config(&[("LINKERD2_PROXY_OUTBOUND_ACCEPT_USER_TIMEOUT", "5000h")])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("LINKERD2_PROXY_OUTBOUND_ACCEPT_USER_TIMEOUT"),
            "{error}"
        );
    }

    #[test]
    fn extra_opaque_ports_add_to_the_defaults() {
        let c = config(&[("TANDEM_EXTRA_OPAQUE_PORTS", "8000-8002")]).unwrap();
        for port in [3306, 8000, 8001, 8002] {
            assert!(c.inbound.opaque_ports.contains(port), "{port}");
            assert!(c.outbound.opaque_ports.contains(port), "{port}");
        }
        let c = config(&[(
            "LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION",
            "9",
        )])
        .unwrap();
        assert!(c.inbound.opaque_ports.contains(9));
        assert!(
            !c.inbound.opaque_ports.contains(3306),
            "the Linkerd variable replaces the list"
        );
        assert!(c.outbound.opaque_ports.contains(3306));
    }

    #[test]
    fn core_bounds_accept_linkerds_names() {
        use crate::ops::cores::CoreSettings;
        let c = config(&[("LINKERD2_PROXY_CORES", "2")]).unwrap();
        assert_eq!(c.cores.min, Some(2), "the older name is the minimum");
        let c = config(&[
            ("LINKERD2_PROXY_CORES", "2"),
            ("LINKERD2_PROXY_CORES_MIN", "3"),
            ("LINKERD2_PROXY_CORES_MAX", "4"),
            ("LINKERD2_PROXY_CORES_MAX_RATIO", "0.5"),
        ])
        .unwrap();
        let want = CoreSettings {
            min: Some(3),
            max: Some(4),
            max_ratio: Some(0.5),
        };
        assert_eq!(c.cores, want);
        // Bad values are ignored with a warning, as Linkerd does, not fatal.
        let c = config(&[
            ("LINKERD2_PROXY_CORES_MAX_RATIO", "1.5"),
            ("LINKERD2_PROXY_CORES", "two"),
            ("LINKERD2_PROXY_CORES_MAX", "0"),
        ])
        .unwrap();
        assert_eq!(c.cores, CoreSettings::default());
        assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
        assert!(c.warnings[0].starts_with("LINKERD2_PROXY_CORES=\"two\""));
        assert!(c.warnings.iter().all(|w| w.ends_with("; ignored")));
        // A bad minimum under the new name still falls back to the older name.
        let c = config(&[
            ("LINKERD2_PROXY_CORES_MIN", "x"),
            ("LINKERD2_PROXY_CORES", "2"),
        ])
        .unwrap();
        assert_eq!(c.cores.min, Some(2));
    }

    #[test]
    fn every_error_names_its_variable() {
        let err = config(&[
            ("LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT", "soon"),
            ("LINKERD2_PROXY_ADMIN_LISTEN_ADDR", "localhost"),
            ("LINKERD2_PROXY_OUTBOUND_CONNECT_TIMEOUT", "fast"),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(
            text.contains("LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT=\"soon\""),
            "{text}"
        );
        assert!(text.contains("LINKERD2_PROXY_ADMIN_LISTEN_ADDR"), "{text}");
        assert!(
            text.contains("LINKERD2_PROXY_OUTBOUND_CONNECT_TIMEOUT"),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }

    #[test]
    fn inbound_policy_settings_as_linkerd_reads_them() {
        use crate::discover::inbound_policy::DefaultPolicy;
        let c = config(&[]).unwrap();
        assert_eq!(c.inbound_policy.default, DefaultPolicy::AllUnauthenticated);
        assert!(c.inbound_policy.ports.is_empty());
        assert_eq!(c.inbound_policy.idle, Duration::from_secs(90));
        let c = config(&[
            ("LINKERD2_PROXY_INBOUND_PORTS", "8080,4191,9000-9002"),
            (
                "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY",
                "cluster-authenticated",
            ),
            (
                "LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS",
                "10.0.0.0/8,fd00::/8",
            ),
        ])
        .unwrap();
        assert_eq!(c.inbound_policy.ports, [4191, 8080, 9000, 9001, 9002]);
        assert_eq!(
            c.inbound_policy.default,
            DefaultPolicy::ClusterAuthenticated
        );
        assert_eq!(c.inbound_policy.cluster_networks.len(), 2);
        type Row = (&'static str, &'static str, &'static str);
        let rows: [Row; 2] = [
            (
                "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY",
                "everyone",
                "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY=\"everyone\"",
            ),
            (
                "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY",
                "cluster-unauthenticated",
                "needs LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS",
            ),
        ];
        for (var, value, expected) in rows {
            let err = config(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(expected), "{var}={value}: {err}");
        }
    }

    #[test]
    fn outbound_may_listen_on_two_addresses() {
        let c = config(&[(
            "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS",
            "127.0.0.1:4140,[::1]:4140",
        )])
        .unwrap();
        assert_eq!(c.outbound.listen.len(), 2);
        assert!(config(&[("LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS", "")]).is_err());
    }
}
