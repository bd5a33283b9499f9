//! The proxy's metrics: one prometheus-client registry, served on the admin `/metrics`.
//!
//! Labels are decided once per connection: a connection gets an `Arc` handle to its
//! series when it is accepted and then only adds to atomics, so the byte path never
//! looks up a label set. The label types belong to the domain they describe
//! (`net::error::ConnError`, `net::detect::DetectResult`, `mesh::tls::TlsStatus`);
//! this module only prints them. Transport series ([`transport`]) and request series
//! (`http::metrics`) are keyed by target address, which churns with pod IPs, so they
//! are dropped after `LINKERD2_PROXY_METRICS_RETAIN_IDLE` without activity (as
//! Linkerd does) and capped in number.

pub mod authz;
pub mod budget;
pub mod control;
pub mod process;
pub mod routes;
pub mod transport;

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use self::transport::{TransportCollector, TransportMetrics};
use crate::config::Config;
use crate::discover::balance::BalancerRegistry;
use crate::net::detect::DetectResult;
use crate::net::error::ConnError;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// The counters of one direction that connections touch, resolved at start-up.
#[derive(Debug)]
pub struct DirectionMetrics {
    pub direction: Direction,
    pub transport: Arc<TransportMetrics>,
    /// `request_total`, `response_total`, `response_latency_ms`.
    pub http: Arc<crate::http::metrics::RequestMetrics>,
    detect: Vec<Counter>,
    errors: Vec<Counter>,
    /// Carriers to peer proxies opened (outbound) or accepted (inbound).
    pub carriers: Counter,
    /// Opaque connections carried as streams of a carrier.
    pub carrier_streams: Counter,
}

impl DirectionMetrics {
    pub fn detected(&self, result: DetectResult) {
        self.detect[result.index()].inc();
    }

    /// Counts a failed connection; called once, where the connection ends.
    pub fn error(&self, error: ConnError) {
        self.errors[error.index()].inc();
    }
}

/// Everything the proxy measures.
pub struct Metrics {
    pub registry: Registry,
    pub inbound: Arc<DirectionMetrics>,
    pub outbound: Arc<DirectionMetrics>,
    /// The control-plane streams' health.
    pub control: Arc<control::ControlMetrics>,
    /// Inbound authorization decisions (under Linkerd's control plane).
    pub authz: Arc<authz::AuthzMetrics>,
    /// The proxy against Linkerd's sizing rule, sampled by `budget::sample`.
    pub budget: Arc<budget::BudgetMeter>,
    /// Every live balancer, whose endpoints are reported at scrape time.
    pub balancers: Arc<BalancerRegistry>,
    /// Outbound route and route-backend series.
    pub routes: Arc<routes::RouteMetrics>,
}

impl Metrics {
    pub fn new(config: &Config) -> Metrics {
        let mut registry = Registry::default();
        let detect = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "tandem_protocol_detect",
            "Connections by protocol detection result (opaque_port: detection skipped)",
            detect.clone(),
        );
        let carriers = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "tandem_carriers",
            "Connections to peer proxies that carry opaque connections as streams: opened (outbound) or accepted (inbound)",
            carriers.clone(),
        );
        let carrier_streams = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "tandem_carrier_streams",
            "Opaque connections carried as streams of a carrier",
            carrier_streams.clone(),
        );
        let direction = |direction: Direction, registry: &mut Registry| {
            let errors = Family::<[(&'static str, &'static str); 1], Counter>::default();
            registry
                .sub_registry_with_prefix(direction.as_str())
                .register(
                    "tcp_errors",
                    "Connections the proxy failed or refused, by cause",
                    errors.clone(),
                );
            let transport = Arc::new(TransportMetrics::new(
                direction,
                config.metrics_retain_idle,
                config.metrics_max_targets,
            ));
            let http = Arc::new(crate::http::metrics::RequestMetrics::new(
                direction,
                config.metrics_retain_idle,
                config.metrics_max_targets,
            ));
            Arc::new(DirectionMetrics {
                direction,
                transport,
                http,
                detect: DetectResult::ALL
                    .iter()
                    .map(|r| {
                        detect
                            .get_or_create(&[
                                ("direction", direction.as_str()),
                                ("result", r.label()),
                            ])
                            .clone()
                    })
                    .collect(),
                errors: ConnError::LABELS
                    .iter()
                    .map(|label| errors.get_or_create(&[("error", label)]).clone())
                    .collect(),
                carriers: carriers
                    .get_or_create(&[("direction", direction.as_str())])
                    .clone(),
                carrier_streams: carrier_streams
                    .get_or_create(&[("direction", direction.as_str())])
                    .clone(),
            })
        };
        let inbound = direction(Direction::Inbound, &mut registry);
        let outbound = direction(Direction::Outbound, &mut registry);
        registry.register_collector(Box::new(TransportCollector {
            directions: [inbound.transport.clone(), outbound.transport.clone()],
        }));
        registry.register_collector(Box::new(crate::http::metrics::RequestCollector {
            directions: [inbound.http.clone(), outbound.http.clone()],
        }));
        registry.register_collector(Box::new(process::ProcessCollector::new()));
        let control = Arc::new(control::ControlMetrics::register(&mut registry));
        let authz = Arc::new(authz::AuthzMetrics::register(&mut registry));
        let budget = Arc::new(budget::BudgetMeter::new(config.budget));
        registry.register_collector(Box::new(budget::BudgetCollector {
            meter: budget.clone(),
        }));
        let balancers = Arc::new(BalancerRegistry::default());
        registry.register_collector(Box::new(control::BalancerCollector {
            balancers: balancers.clone(),
        }));

        let routes = Arc::new(routes::RouteMetrics::default());
        registry.register_collector(Box::new(routes::RouteCollector {
            metrics: routes.clone(),
        }));

        let build_info = Family::<[(&'static str, &'static str); 4], Gauge>::default();
        build_info
            .get_or_create(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("git_sha", env!("TANDEM_GIT_SHA")),
                ("profile", env!("TANDEM_BUILD_PROFILE")),
                ("vendor", "tandem"),
            ])
            .set(1);
        registry.register("proxy_build_info", "Proxy build information", build_info);
        Metrics {
            registry,
            inbound,
            outbound,
            control,
            authz,
            budget,
            balancers,
            routes,
        }
    }

    /// The text exposition of every metric, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::tls::{NoTlsReason, TlsStatus};
    use crate::net::error::Errno;
    use std::net::SocketAddr;
    use transport::Peer;

    fn config() -> Config {
        Config::from_lookup(|_| None).unwrap()
    }

    fn value(text: &str, prefix: &str) -> Option<String> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
    }

    #[test]
    fn transport_series_count_opens_closes_and_bytes() {
        let metrics = Metrics::new(&config());
        let target: SocketAddr = "192.0.2.2:8080".parse().unwrap();
        let tls = TlsStatus::NoIdentity(NoTlsReason::Loopback);
        let mut conn = metrics.outbound.transport.open(Peer::Src, target, tls);
        conn.series().add_read(10);
        conn.series().add_write(20);
        let text = metrics.encode();
        let labels = r#"{direction="outbound",peer="src",target_addr="192.0.2.2:8080",target_ip="192.0.2.2",target_port="8080",tls="no_identity",no_tls_reason="loopback"}"#;
        assert_eq!(
            value(&text, &format!("tcp_open_total{labels}")).as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            value(&text, &format!("tcp_open_connections{labels}")).as_deref(),
            Some("1")
        );
        assert_eq!(
            value(&text, &format!("tcp_read_bytes_total{labels}")).as_deref(),
            Some("10")
        );
        assert_eq!(
            value(&text, &format!("tcp_write_bytes_total{labels}")).as_deref(),
            Some("20")
        );
        conn.set_errno(Errno::ConnReset);
        drop(conn);
        let text = metrics.encode();
        assert_eq!(
            value(&text, &format!("tcp_open_connections{labels}")).as_deref(),
            Some("0")
        );
        let close = r#"tcp_close_total{direction="outbound",peer="src",target_addr="192.0.2.2:8080",target_ip="192.0.2.2",target_port="8080",tls="no_identity",no_tls_reason="loopback",errno="ECONNRESET"}"#;
        assert_eq!(value(&text, close).as_deref(), Some("1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn enumerated_counters_and_process_metrics_are_exported() {
        let metrics = Metrics::new(&config());
        metrics.inbound.detected(DetectResult::Timeout);
        metrics.outbound.error(ConnError::Loop);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"tandem_protocol_detect_total{direction="inbound",result="timeout"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"outbound_tcp_errors_total{error="loop"} 1"#),
            "{text}"
        );
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_open_fds "), "{text}");
        assert!(text.contains("proxy_build_info{"), "{text}");
    }

    /// What `build.rs` embeds: the profile a build ran under and the commit it was
    /// built from.
    #[test]
    fn build_info_names_the_profile_and_the_commit() {
        let text = Metrics::new(&config()).encode();
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        let line = text
            .lines()
            .find(|l| l.starts_with("proxy_build_info{"))
            .unwrap();
        assert!(
            line.contains(&format!("profile=\"{profile}\""))
                || line.contains("profile=\"production\""),
            "{line}"
        );
        let head = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
        if let Some(head) = head {
            assert!(line.contains(&format!("git_sha=\"{head}\"")), "{line}");
        }
    }
}
