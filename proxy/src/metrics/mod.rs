//! The proxy's metrics: one prometheus-client registry, served on the admin `/metrics`.
//!
//! Labels are decided once per connection: a connection gets an `Arc` handle to its
//! series when it is accepted and then only adds to atomics, so the byte path never
//! looks up a label set. Transport series are keyed by target address, which churns
//! with pod IPs, so they are dropped after `LINKERD2_PROXY_METRICS_RETAIN_IDLE` without
//! an open connection (as Linkerd does) and capped in number.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder,
    LabelValueEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::config::Config;

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

/// Which end of a forwarded connection a series describes, in Linkerd's terms: `src`
/// is the accepted connection, `dst` the one the proxy opened.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Peer {
    Src,
    Dst,
}

/// The `tls` label of a connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum TlsStatus {
    /// No mesh TLS, for the reason given (Linkerd's `no_tls_reason` values).
    NoIdentity(NoTlsReason),
    /// The application's own TLS, passed through untouched.
    Opaque,
    /// Mesh TLS: `tls="true"` with the peer's identity as `client_id` (inbound) or
    /// `server_id` (outbound); a client without a certificate has none.
    Established(Option<Arc<str>>),
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum NoTlsReason {
    Loopback,
    NoTlsFromRemote,
    NotProvidedByServiceDiscovery,
}

impl NoTlsReason {
    fn as_str(self) -> &'static str {
        match self {
            NoTlsReason::Loopback => "loopback",
            NoTlsReason::NoTlsFromRemote => "no_tls_from_remote",
            NoTlsReason::NotProvidedByServiceDiscovery => "not_provided_by_service_discovery",
        }
    }
}

/// How a forwarded socket closed, as the `errno` label of `tcp_close_total`.
/// The first entry, "", is a clean close.
pub const CLOSE_ERRNOS: [&str; 9] = [
    "",
    "ECONNRESET",
    "EPIPE",
    "ETIMEDOUT",
    "ECONNREFUSED",
    "ECONNABORTED",
    "EHOSTUNREACH",
    "ENETUNREACH",
    "other",
];

/// What protocol detection concluded, one counter each (`tandem_protocol_detect_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectResult {
    Http1,
    Http2,
    Tls,
    Unknown,
    Timeout,
    /// The port is opaque: detection was not attempted.
    Skipped,
}

impl DetectResult {
    const ALL: [DetectResult; 6] = [
        Self::Http1,
        Self::Http2,
        Self::Tls,
        Self::Unknown,
        Self::Timeout,
        Self::Skipped,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http/1",
            Self::Http2 => "http/2",
            Self::Tls => "tls",
            Self::Unknown => "unknown",
            Self::Timeout => "timeout",
            Self::Skipped => "opaque_port",
        }
    }
}

/// Why the proxy gave up on a connection (`inbound_tcp_errors_total{error}` and the
/// outbound twin, Linkerd's family names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnError {
    /// The original destination is the proxy itself; forwarding would loop.
    Loop,
    /// The kernel had no original destination for the socket.
    OrigDst,
    ConnectRefused,
    ConnectTimeout,
    ConnectError,
    /// Reading the client's first bytes failed.
    Detect,
    /// A forwarded stream ended with an error (reset, broken pipe).
    Io,
    /// Mesh TLS could not be established (either side).
    TlsHandshake,
    /// The peer's certificate does not name the identity discovery expected.
    PeerIdentity,
    /// A direct connection without a valid transport header, or a peer that did not
    /// accept one.
    TransportHeader,
    /// The port's policy requires mTLS (or a client identity) the client lacked.
    Unauthorized,
}

impl ConnError {
    const ALL: [ConnError; 11] = [
        Self::Loop,
        Self::OrigDst,
        Self::ConnectRefused,
        Self::ConnectTimeout,
        Self::ConnectError,
        Self::Detect,
        Self::Io,
        Self::TlsHandshake,
        Self::PeerIdentity,
        Self::TransportHeader,
        Self::Unauthorized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loop => "loop",
            Self::OrigDst => "orig_dst",
            Self::ConnectRefused => "connect_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::ConnectError => "connect_error",
            Self::Detect => "detect",
            Self::Io => "i/o",
            Self::TlsHandshake => "tls_handshake",
            Self::PeerIdentity => "peer_identity",
            Self::TransportHeader => "transport_header",
            Self::Unauthorized => "unauthorized",
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
        self.detect[DetectResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0)]
        .inc();
    }

    pub fn error(&self, error: ConnError) {
        self.errors[ConnError::ALL.iter().position(|e| *e == error).unwrap_or(0)].inc();
    }
}

/// Everything the proxy measures.
pub struct Metrics {
    pub registry: Registry,
    pub inbound: Arc<DirectionMetrics>,
    pub outbound: Arc<DirectionMetrics>,
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
                                ("result", r.as_str()),
                            ])
                            .clone()
                    })
                    .collect(),
                errors: ConnError::ALL
                    .iter()
                    .map(|e| errors.get_or_create(&[("error", e.as_str())]).clone())
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
        registry.register_collector(Box::new(ProcessCollector::new()));

        let build_info = Family::<[(&'static str, &'static str); 4], Gauge>::default();
        build_info
            .get_or_create(&[
                ("version", env!("CARGO_PKG_VERSION")),
                (
                    "git_sha",
                    option_env!("TANDEM_GIT_SHA").unwrap_or("unknown"),
                ),
                (
                    "profile",
                    if cfg!(debug_assertions) {
                        "debug"
                    } else {
                        "release"
                    },
                ),
                ("vendor", "tandem"),
            ])
            .set(1);
        registry.register("proxy_build_info", "Proxy build information", build_info);
        Metrics {
            registry,
            inbound,
            outbound,
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

/// One transport series: the counters of every connection with the same labels.
#[derive(Debug, Default)]
pub struct TransportSeries {
    open_total: AtomicU64,
    open_connections: AtomicI64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    close_total: [AtomicU64; CLOSE_ERRNOS.len()],
    /// Milliseconds since the proxy started at the last open or close.
    last_active_ms: AtomicU64,
}

impl TransportSeries {
    pub fn add_read(&self, bytes: usize) {
        self.read_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub fn add_write(&self, bytes: usize) {
        self.write_bytes.fetch_add(bytes as u64, Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct TransportKey {
    peer: Peer,
    /// `None` once the series cap is reached: such targets share one overflow series.
    target: Option<SocketAddr>,
    tls: TlsStatus,
}

/// The transport series of one direction.
#[derive(Debug)]
pub struct TransportMetrics {
    direction: Direction,
    retain_idle: Duration,
    max_series: usize,
    started: Instant,
    series: Mutex<HashMap<TransportKey, Arc<TransportSeries>>>,
}

/// An open connection's hold on its series: counts the open on creation and the
/// close (with its errno) when finished, so no path can forget either.
#[derive(Debug)]
pub struct OpenConnection {
    series: Arc<TransportSeries>,
    errno: &'static str,
    metrics: Arc<TransportMetrics>,
}

impl OpenConnection {
    pub fn series(&self) -> &TransportSeries {
        &self.series
    }

    /// Records how the connection ended; the default is a clean close.
    pub fn set_errno(&mut self, errno: &'static str) {
        self.errno = errno;
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let index = CLOSE_ERRNOS
            .iter()
            .position(|e| *e == self.errno)
            .unwrap_or(CLOSE_ERRNOS.len() - 1);
        self.series.close_total[index].fetch_add(1, Relaxed);
        self.series.open_connections.fetch_sub(1, Relaxed);
        self.series
            .last_active_ms
            .store(self.metrics.now_ms(), Relaxed);
    }
}

impl TransportMetrics {
    fn new(direction: Direction, retain_idle: Duration, max_series: usize) -> TransportMetrics {
        TransportMetrics {
            direction,
            retain_idle,
            max_series,
            started: Instant::now(),
            series: Mutex::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Counts a new connection to or from `target` and returns its handle.
    pub fn open(
        self: &Arc<Self>,
        peer: Peer,
        target: SocketAddr,
        tls: TlsStatus,
    ) -> OpenConnection {
        let series = {
            let mut map = self
                .series
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut key = TransportKey {
                peer,
                target: Some(target),
                tls,
            };
            if !map.contains_key(&key) && map.len() >= self.max_series {
                self.evict_idle(&mut map);
                if map.len() >= self.max_series {
                    key.target = None;
                }
            }
            map.entry(key).or_default().clone()
        };
        series.open_total.fetch_add(1, Relaxed);
        series.open_connections.fetch_add(1, Relaxed);
        series.last_active_ms.store(self.now_ms(), Relaxed);
        OpenConnection {
            series,
            errno: "",
            metrics: self.clone(),
        }
    }

    /// Drops series with no open connection and no activity within the retain period.
    fn evict_idle(&self, map: &mut HashMap<TransportKey, Arc<TransportSeries>>) {
        let now = self.now_ms();
        let retain = self.retain_idle.as_millis() as u64;
        map.retain(|_, s| {
            Arc::strong_count(s) > 1 || now.saturating_sub(s.last_active_ms.load(Relaxed)) < retain
        });
    }

    fn snapshot(&self) -> Vec<(TransportKey, Arc<TransportSeries>)> {
        let mut map = self
            .series
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.evict_idle(&mut map);
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Encodes the transport families at scrape time with Linkerd's names and labels.
#[derive(Debug)]
struct TransportCollector {
    directions: [Arc<TransportMetrics>; 2],
}

struct TransportLabels {
    direction: Direction,
    key: TransportKey,
    /// Only `tcp_close_total` carries an errno.
    errno: Option<&'static str>,
}

impl EncodeLabelSet for TransportLabels {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("direction", self.direction.as_str()).encode(encoder.encode_label())?;
        let peer = match self.key.peer {
            Peer::Src => "src",
            Peer::Dst => "dst",
        };
        ("peer", peer).encode(encoder.encode_label())?;
        match self.key.target {
            Some(addr) => {
                ("target_addr", Shown(addr)).encode(encoder.encode_label())?;
                ("target_ip", Shown(addr.ip())).encode(encoder.encode_label())?;
                ("target_port", Shown(addr.port())).encode(encoder.encode_label())?;
            }
            None => ("target_addr", "overflow").encode(encoder.encode_label())?,
        }
        encode_tls(self.direction, &self.key.tls, &mut encoder)?;
        match self.errno {
            Some(errno) => ("errno", errno).encode(encoder.encode_label()),
            None => Ok(()),
        }
    }
}

/// The `tls` label and its companions (`no_tls_reason`, or the peer's identity as
/// `client_id` inbound and `server_id` outbound), shared by transport and request series.
pub fn encode_tls(
    direction: Direction,
    tls: &TlsStatus,
    encoder: &mut LabelSetEncoder,
) -> Result<(), std::fmt::Error> {
    match tls {
        TlsStatus::NoIdentity(reason) => {
            ("tls", "no_identity").encode(encoder.encode_label())?;
            ("no_tls_reason", reason.as_str()).encode(encoder.encode_label())
        }
        TlsStatus::Opaque => ("tls", "opaque").encode(encoder.encode_label()),
        TlsStatus::Established(peer_id) => {
            ("tls", "true").encode(encoder.encode_label())?;
            let name = match direction {
                Direction::Inbound => "client_id",
                Direction::Outbound => "server_id",
            };
            (name, peer_id.as_deref().unwrap_or("")).encode(encoder.encode_label())
        }
    }
}

/// A label value printed with `Display`.
struct Shown<T>(T);

impl<T: std::fmt::Display> EncodeLabelValue for Shown<T> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        write!(encoder, "{}", self.0)
    }
}

impl Collector for TransportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series: Vec<(TransportLabels, Arc<TransportSeries>)> = self
            .directions
            .iter()
            .flat_map(|d| {
                d.snapshot().into_iter().map(|(key, s)| {
                    (
                        TransportLabels {
                            direction: d.direction,
                            key,
                            errno: None,
                        },
                        s,
                    )
                })
            })
            .collect();
        type Read = fn(&TransportSeries) -> u64;
        let counters: [(&str, &str, Read); 3] = [
            ("tcp_open", "Total count of opened connections", |s| {
                s.open_total.load(Relaxed)
            }),
            (
                "tcp_read_bytes",
                "Total count of bytes read from peers",
                |s| s.read_bytes.load(Relaxed),
            ),
            (
                "tcp_write_bytes",
                "Total count of bytes written to peers",
                |s| s.write_bytes.load(Relaxed),
            ),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, s) in &series {
                family
                    .encode_family(labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&read(s), None)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "tcp_open_connections",
            "Number of currently-open connections",
            None,
            MetricType::Gauge,
        )?;
        for (labels, s) in &series {
            family
                .encode_family(labels)?
                .encode_gauge(&s.open_connections.load(Relaxed))?;
        }
        let mut family = encoder.encode_descriptor(
            "tcp_close",
            "Total count of closed connections",
            None,
            MetricType::Counter,
        )?;
        for (labels, s) in &series {
            for (errno, count) in CLOSE_ERRNOS.iter().zip(&s.close_total) {
                let count = count.load(Relaxed);
                if count > 0 {
                    let labels = TransportLabels {
                        direction: labels.direction,
                        key: labels.key.clone(),
                        errno: Some(errno),
                    };
                    family
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
                }
            }
        }
        Ok(())
    }
}

/// Process metrics read from `/proc/self` at scrape time, with the names Linkerd's
/// proxy exports (`process_cpu_seconds_total`, `process_resident_memory_bytes`, …).
#[derive(Debug)]
struct ProcessCollector {
    clock_ticks: f64,
    page_size: u64,
    boot_time: u64,
}

impl ProcessCollector {
    fn new() -> ProcessCollector {
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                stat.lines()
                    .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(0);
        ProcessCollector {
            clock_ticks: ticks.max(1) as f64,
            page_size: page.max(1) as u64,
            boot_time,
        }
    }
}

/// The fields of `/proc/self/stat` we export.
struct ProcStat {
    cpu_ticks: u64,
    threads: i64,
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

fn read_proc_stat() -> Option<ProcStat> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces and parentheses; fields follow the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field numbers from proc(5), minus 3 for pid, comm and the split.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        cpu_ticks: field(14)? + field(15)?,
        threads: field(20)? as i64,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

fn max_open_files() -> Option<i64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur as i64)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stat) = read_proc_stat() else {
            return Ok(());
        };
        let cpu_seconds = stat.cpu_ticks as f64 / self.clock_ticks;
        let start_time = self.boot_time as f64 + stat.start_ticks as f64 / self.clock_ticks;
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as i64)
            .unwrap_or(0);

        let mut enc = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?;
        enc.encode_counter::<NoLabelSet, _, f64>(&cpu_seconds, None)?;
        let gauges: [(&str, &str, f64); 4] = [
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                start_time,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                (stat.resident_pages * self.page_size) as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stat.virtual_bytes as f64,
            ),
            (
                "process_threads",
                "Number of OS threads in the process",
                stat.threads as f64,
            ),
        ];
        for (name, help, value) in gauges {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
        encoder
            .encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&open_fds)?;
        if let Some(max) = max_open_files() {
            encoder
                .encode_descriptor(
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&max)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        conn.set_errno("ECONNRESET");
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
    fn idle_series_are_evicted_only_without_open_connections() {
        let metrics = TransportMetrics::new(Direction::Inbound, Duration::ZERO, 100);
        let metrics = Arc::new(metrics);
        let tls = TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote);
        let open = metrics.open(Peer::Src, "192.0.2.1:1".parse().unwrap(), tls.clone());
        drop(metrics.open(Peer::Src, "192.0.2.1:2".parse().unwrap(), tls));
        let kept: Vec<_> = metrics
            .snapshot()
            .into_iter()
            .map(|(k, _)| k.target)
            .collect();
        assert_eq!(kept, vec![Some("192.0.2.1:1".parse().unwrap())]);
        drop(open);
        assert!(metrics.snapshot().is_empty());
    }

    #[test]
    fn series_beyond_the_cap_share_one_overflow_series() {
        let metrics = Arc::new(TransportMetrics::new(
            Direction::Inbound,
            Duration::from_secs(600),
            2,
        ));
        let tls = TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote);
        let _held: Vec<_> = (1..=5)
            .map(|port| {
                metrics.open(
                    Peer::Src,
                    SocketAddr::from(([192, 0, 2, 1], port)),
                    tls.clone(),
                )
            })
            .collect();
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.len(), 3);
        let overflow = snapshot
            .iter()
            .find(|(k, _)| k.target.is_none())
            .expect("overflow series");
        assert_eq!(overflow.1.open_connections.load(Relaxed), 3);
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
}
