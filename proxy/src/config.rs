//! The proxy's configuration, read from the environment.
//!
//! Every variable the proxy reads, its default and its error message live here, so
//! the README's configuration table can be checked against one file. Names, defaults
//! and formats follow linkerd2-proxy wherever it has the setting, so injection
//! templates carry over; Tandem-only settings are `TANDEM_*`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// accept carriers from peer proxies (`tunnel.rs`).
    pub opaque_carrier: bool,
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
    /// Worker-thread bounds; `crate::cores` turns them into a thread count.
    pub cores: crate::cores::CoreSettings,
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
        let vars: BTreeMap<String, String> = std::env::vars().collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    /// Reads the configuration through `lookup`, collecting every error rather than
    /// stopping at the first, so one run tells the operator everything that is wrong.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut env = Env {
            lookup: &lookup,
            errors: Vec::new(),
            warnings: Vec::new(),
        };

        let extra_opaque = env.parse("TANDEM_EXTRA_OPAQUE_PORTS", "", PortSet::parse);
        let mut opaque = |var: &str| {
            let mut ports = env.parse(var, DEFAULT_OPAQUE_PORTS, PortSet::parse);
            ports.extend(&extra_opaque);
            ports
        };
        let inbound_opaque = opaque("LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION");
        let outbound_opaque = opaque("TANDEM_OUTBOUND_PORTS_DISABLE_PROTOCOL_DETECTION");

        let outbound_listen = match lookup("LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS") {
            Some(_) => env.parse(
                "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS",
                "127.0.0.1:4140",
                parse_addrs,
            ),
            None => vec![env.parse(
                "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR",
                "127.0.0.1:4140",
                parse_addr,
            )],
        };

        let inbound = DirectionConfig {
            listen: vec![env.parse(
                "LINKERD2_PROXY_INBOUND_LISTEN_ADDR",
                "0.0.0.0:4143",
                parse_addr,
            )],
            detect_timeout: env.parse(
                "LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT",
                "10s",
                parse_duration,
            ),
            connect_timeout: env.parse(
                "LINKERD2_PROXY_INBOUND_CONNECT_TIMEOUT",
                "300ms",
                parse_duration,
            ),
            accept: SocketOptions {
                keepalive: env.parse(
                    "LINKERD2_PROXY_INBOUND_ACCEPT_KEEPALIVE",
                    "10s",
                    parse_keepalive,
                ),
                user_timeout: env.parse(
                    "LINKERD2_PROXY_INBOUND_ACCEPT_USER_TIMEOUT",
                    "",
                    parse_user_timeout,
                ),
            },
            connect: SocketOptions {
                keepalive: env.parse(
                    "LINKERD2_PROXY_INBOUND_CONNECT_KEEPALIVE",
                    "10s",
                    parse_keepalive,
                ),
                user_timeout: env.parse(
                    "LINKERD2_PROXY_INBOUND_CONNECT_USER_TIMEOUT",
                    "",
                    parse_user_timeout,
                ),
            },
            opaque_ports: inbound_opaque,
            opaque_carrier: env.parse("TANDEM_INBOUND_OPAQUE_CARRIER", "true", parse_bool),
            http: HttpConfig {
                pool_idle_timeout: env.parse(
                    "LINKERD2_PROXY_INBOUND_HTTP1_CONNECTION_POOL_IDLE_TIMEOUT",
                    "3s",
                    parse_duration,
                ),
                max_idle_per_endpoint: env.parse(
                    // Linkerd's name: the inbound one has no INBOUND_.
                    "LINKERD2_PROXY_MAX_IDLE_CONNS_PER_ENDPOINT",
                    "10000",
                    parse_count,
                ),
                max_connection_age: env.parse(
                    "TANDEM_INBOUND_HTTP_MAX_CONNECTION_AGE",
                    "1h",
                    parse_duration,
                ),
                authority_labels: env.parse(
                    "LINKERD2_PROXY_INBOUND_METRICS_AUTHORITY_LABELS",
                    "",
                    parse_authority_labels,
                ),
                keepalive_interval: env.parse(
                    "TANDEM_INBOUND_HTTP2_KEEPALIVE_INTERVAL",
                    "10s",
                    parse_duration,
                ),
                keepalive_timeout: env.parse(
                    "TANDEM_INBOUND_HTTP2_KEEPALIVE_TIMEOUT",
                    "20s",
                    parse_duration,
                ),
            },
        };
        let outbound = DirectionConfig {
            listen: outbound_listen,
            detect_timeout: env.parse(
                "LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT",
                "10s",
                parse_duration,
            ),
            connect_timeout: env.parse(
                "LINKERD2_PROXY_OUTBOUND_CONNECT_TIMEOUT",
                "1s",
                parse_duration,
            ),
            accept: SocketOptions {
                keepalive: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_ACCEPT_KEEPALIVE",
                    "10s",
                    parse_keepalive,
                ),
                user_timeout: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_ACCEPT_USER_TIMEOUT",
                    "",
                    parse_user_timeout,
                ),
            },
            connect: SocketOptions {
                keepalive: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_CONNECT_KEEPALIVE",
                    "10s",
                    parse_keepalive,
                ),
                user_timeout: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_CONNECT_USER_TIMEOUT",
                    "",
                    parse_user_timeout,
                ),
            },
            opaque_ports: outbound_opaque,
            opaque_carrier: env.parse("TANDEM_OUTBOUND_OPAQUE_CARRIER", "false", parse_bool),
            http: HttpConfig {
                pool_idle_timeout: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_HTTP1_CONNECTION_POOL_IDLE_TIMEOUT",
                    "3s",
                    parse_duration,
                ),
                max_idle_per_endpoint: env.parse(
                    "LINKERD2_PROXY_OUTBOUND_MAX_IDLE_CONNS_PER_ENDPOINT",
                    "10000",
                    parse_count,
                ),
                max_connection_age: env.parse(
                    "TANDEM_OUTBOUND_HTTP_MAX_CONNECTION_AGE",
                    "1h",
                    parse_duration,
                ),
                authority_labels: true,
                keepalive_interval: env.parse(
                    "TANDEM_OUTBOUND_HTTP2_KEEPALIVE_INTERVAL",
                    "10s",
                    parse_duration,
                ),
                keepalive_timeout: env.parse(
                    "TANDEM_OUTBOUND_HTTP2_KEEPALIVE_TIMEOUT",
                    "20s",
                    parse_duration,
                ),
            },
        };

        let mut config = Config {
            warnings: Vec::new(),
            inbound,
            outbound,
            admin_listen: env.parse(
                "LINKERD2_PROXY_ADMIN_LISTEN_ADDR",
                "127.0.0.1:4191",
                parse_addr,
            ),
            metrics_retain_idle: env.parse(
                "LINKERD2_PROXY_METRICS_RETAIN_IDLE",
                "10m",
                parse_duration,
            ),
            metrics_max_targets: env.parse("TANDEM_METRICS_MAX_TARGETS", "10000", parse_positive),
            shutdown_endpoint_enabled: env.parse(
                "LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED",
                "false",
                parse_bool,
            ),
            shutdown_grace_period: env.parse(
                "LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD",
                "120s",
                parse_duration,
            ),
            log_filter: lookup("LINKERD2_PROXY_LOG").unwrap_or_else(|| "warn,tandem=info".into()),
            log_format: env.parse("LINKERD2_PROXY_LOG_FORMAT", "plain", parse_log_format),
            // Linkerd ignores a bad thread count with a warning rather than refusing
            // to start; so does Tandem, since a pod is better slow than down.
            cores: crate::cores::CoreSettings {
                min: env
                    .parse_or_ignore("LINKERD2_PROXY_CORES_MIN", parse_positive)
                    .or_else(|| env.parse_or_ignore("LINKERD2_PROXY_CORES", parse_positive)),
                max: env.parse_or_ignore("LINKERD2_PROXY_CORES_MAX", parse_positive),
                max_ratio: env.parse_or_ignore("LINKERD2_PROXY_CORES_MAX_RATIO", parse_ratio),
            },
            shutdown_delay: env.parse("TANDEM_SHUTDOWN_DELAY", "0s", parse_duration),
            identity: match tandem_identity::IdentityConfig::from_lookup(&lookup) {
                Ok(identity) => identity,
                Err(errors) => {
                    env.errors.extend(errors);
                    None
                }
            },
            discovery_file: lookup("TANDEM_DISCOVERY_FILE")
                .filter(|p| !p.trim().is_empty())
                .map(PathBuf::from),
            discovery_reload_interval: env.parse(
                "TANDEM_DISCOVERY_RELOAD_INTERVAL",
                "2s",
                parse_duration,
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
        };
        let needs_identity =
            !config.inbound_require_identity.is_empty() || !config.inbound_require_tls.is_empty();
        if needs_identity && config.identity.is_none() {
            env.errors.push(
                "LINKERD2_PROXY_INBOUND_PORTS_REQUIRE_IDENTITY/_TLS need mesh identity (LINKERD2_PROXY_IDENTITY_*)".into(),
            );
        }
        if env.errors.is_empty() {
            config.warnings = env.warnings;
            Ok(config)
        } else {
            Err(ConfigError(env.errors))
        }
    }
}

struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<String>,
    warnings: Vec<String>,
}

impl Env<'_> {
    /// Parses `var` (or `default` when unset), recording an error that names the
    /// variable and falls back to the default so parsing can go on.
    fn parse<T>(
        &mut self,
        var: &str,
        default: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> T {
        if let Some(value) = (self.lookup)(var) {
            match parse(value.trim()) {
                Ok(parsed) => return parsed,
                Err(why) => self.errors.push(format!("{var}={value:?}: {why}")),
            }
        }
        parse(default).unwrap_or_else(|why| panic!("default for {var} is invalid: {why}"))
    }

    /// Parses `var` if set; a value that does not parse is left out with a warning.
    fn parse_or_ignore<T>(
        &mut self,
        var: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = (self.lookup)(var)?;
        parse(value.trim())
            .map_err(|why| {
                self.warnings
                    .push(format!("{var}={value:?}: {why}; ignored"))
            })
            .ok()
    }
}

/// Durations as Linkerd writes them: digits and a unit (`ms`, `s`, `m`, `h`, `d`), or a bare `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let amount: u64 = digits
        .parse()
        .map_err(|_| "expected a duration such as 500ms, 10s, 5m, 1h or 1d".to_string())?;
    let millis = match unit {
        "ms" => Some(amount),
        "s" => amount.checked_mul(1_000),
        "m" => amount.checked_mul(60_000),
        "h" => amount.checked_mul(3_600_000),
        "d" => amount.checked_mul(86_400_000),
        "" => return Err("a duration needs a unit: ms, s, m, h or d".into()),
        other => {
            return Err(format!(
                "unknown duration unit {other:?}; use ms, s, m, h or d"
            ))
        }
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| "duration is too large".to_string())
}

/// A keepalive of `0` turns TCP keepalive off.
fn parse_keepalive(text: &str) -> Result<Option<Duration>, String> {
    parse_duration(text).map(|d| (!d.is_zero()).then_some(d))
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

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| "expected an IP address and port, such as 0.0.0.0:4143 or [::]:4143".into())
}

fn parse_addrs(text: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs = text
        .split(',')
        .map(|a| parse_addr(a.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    match addrs.len() {
        1 | 2 => Ok(addrs),
        _ => Err("expected one or two addresses separated by a comma".into()),
    }
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_count(text: &str) -> Result<usize, String> {
    text.parse()
        .map_err(|_| "expected a whole number".to_string())
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

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a whole number greater than zero".into()),
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

/// A set of TCP ports, looked up once per connection in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet {
    bits: Box<[u64; 1024]>,
}

impl PortSet {
    pub fn empty() -> PortSet {
        PortSet {
            bits: Box::new([0; 1024]),
        }
    }

    /// Parses a list of ports and inclusive ranges: `25,3306,4000-4100`.
    pub fn parse(text: &str) -> Result<PortSet, String> {
        let mut set = PortSet::empty();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (low, high) = match item.split_once('-') {
                Some((low, high)) => (parse_port(low.trim())?, parse_port(high.trim())?),
                None => {
                    let port = parse_port(item)?;
                    (port, port)
                }
            };
            if low > high {
                return Err(format!("port range {item} runs backwards"));
            }
            for port in low..=high {
                set.insert(port);
            }
        }
        Ok(set)
    }

    pub fn insert(&mut self, port: u16) {
        self.bits[usize::from(port) / 64] |= 1 << (port % 64);
    }

    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    pub fn extend(&mut self, other: &PortSet) {
        for (mine, theirs) in self.bits.iter_mut().zip(other.bits.iter()) {
            *mine |= theirs;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|word| *word == 0)
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        (0..=u16::MAX).filter(|p| self.contains(*p))
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.ports()).finish()
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| format!("{text:?} is not a port number (0-65535)"))
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
        assert_eq!(c.cores, crate::cores::CoreSettings::default());
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
        use crate::cores::CoreSettings;
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
    fn durations_follow_linkerd_format() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("10").unwrap_err().contains("unit"));
        assert!(parse_duration("ten s").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unknown"));
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
    fn port_sets() {
        let set = PortSet::parse("4190, 4191,25000-25002").unwrap();
        assert_eq!(
            set.ports().collect::<Vec<_>>(),
            vec![4190, 4191, 25000, 25001, 25002]
        );
        assert!(PortSet::parse("70000").is_err());
        assert!(PortSet::parse("10-5").is_err());
        assert!(PortSet::parse("").unwrap().ports().next().is_none());
        let all = PortSet::parse("0-65535").unwrap();
        assert!(all.contains(0) && all.contains(65535));
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
