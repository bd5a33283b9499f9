//! Request metrics with Linkerd's names: `request_total`, `response_total` and
//! `response_latency_ms`.
//!
//! As with transport metrics, labels are resolved per connection (or per authority
//! change on a connection), never per request: a request only adds to atomics in a
//! series it already holds. Response outcomes are indexed arrays (status code, gRPC
//! status, error kind) rather than a map, and latencies go to one of a few histogram
//! slots claimed per status code, so recording a response takes no lock and
//! allocates nothing after a series' first response with a given status. Series are keyed by target address and authority, which churn,
//! so idle ones are dropped at scrape time and their number is capped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::NoLabelSet;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, LabelSetEncoder,
};
use prometheus_client::metrics::MetricType;

use super::errors::ErrorKind;
use crate::discover::Labels as DstLabels;
use crate::mesh::tls::TlsStatus;
use crate::metrics::Direction;

/// Linkerd's latency buckets, in milliseconds.
pub const LATENCY_BUCKETS_MS: [u64; 25] = [
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000, 3000, 4000, 5000,
    10000, 20000, 30000, 40000, 50000,
];

/// gRPC status codes 0..=16 have their own slot; anything else shares the last.
const GRPC_SLOTS: usize = 18;

/// The gRPC statuses current Linkerd classifies as failures by default: UNKNOWN,
/// DEADLINE_EXCEEDED, PERMISSION_DENIED, INTERNAL, UNAVAILABLE, DATA_LOSS. The
/// others (NOT_FOUND, INVALID_ARGUMENT, CANCELLED, …) are answers the caller asked
/// for, so they count as successes, as in Linkerd's success rates.
const GRPC_FAILURES: [usize; 6] = [2, 4, 7, 13, 14, 15];

/// The counters of every request with the same labels.
#[derive(Debug, Default)]
pub struct RequestSeries {
    requests: AtomicU64,
    /// One lazily allocated block of 100 counters per status class (1xx … 5xx), so a
    /// series that only sees 200s costs one block.
    statuses: [OnceLock<Box<[AtomicU64; 100]>>; 5],
    /// gRPC responses (HTTP 200) by grpc-status.
    grpc: [AtomicU64; GRPC_SLOTS],
    /// Responses the proxy made up, or streams that failed, by cause.
    errors: [AtomicU64; ErrorKind::ALL.len()],
    /// `response_latency_ms` by status code, as Linkerd labels it: each slot is
    /// claimed by the first status that needs one, so a series that only answers 200
    /// holds one histogram.
    latency: [OnceLock<Box<Latency>>; LATENCY_SLOTS],
    last_active_ms: AtomicU64,
}

/// Latency histograms per series. The first codes seen claim one each; the last is
/// shared by the codes that come after, and is exported without a `status_code`
/// label once a second code uses it, so sums over all labels stay whole.
const LATENCY_SLOTS: usize = 6;

/// The status of responses the proxy has none for (a stream that failed midway).
const NO_STATUS: u16 = 0;
/// The last slot's status: several codes share it.
const MIXED_STATUS: u16 = u16::MAX;

#[derive(Debug)]
struct Latency {
    /// `NO_STATUS`, a status code, or `MIXED_STATUS`.
    status: AtomicU16,
    /// Non-cumulative bucket counts; the last is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    sum_us: AtomicU64,
}

impl Latency {
    fn new(status: u16) -> Box<Latency> {
        Box::new(Latency {
            status: AtomicU16::new(status),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        })
    }

    fn record(&self, latency: Duration) {
        // Prometheus buckets are inclusive upper bounds.
        let us = latency.as_micros() as u64;
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|le| us <= le * 1000)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }
}

/// How one response ended, for `response_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A complete response with this status (and gRPC status, if it had one).
    Status { status: u16, grpc: Option<u32> },
    /// The proxy failed the request, or the response stream failed.
    Error(ErrorKind),
}

impl RequestSeries {
    pub fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    pub fn response(&self, outcome: Outcome, latency: Duration) {
        let status = match outcome {
            Outcome::Status { status, .. } => status,
            Outcome::Error(kind) => kind.status().map_or(NO_STATUS, |s| s.as_u16()),
        };
        self.latency_for(status).record(latency);
        match outcome {
            Outcome::Status {
                status: 200,
                grpc: Some(code),
            } => {
                let slot = (code as usize).min(GRPC_SLOTS - 1);
                self.grpc[slot].fetch_add(1, Relaxed);
            }
            Outcome::Status { status, .. } if (100..600).contains(&status) => {
                let class = usize::from(status / 100 - 1);
                let block = self.statuses[class]
                    .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
                block[usize::from(status % 100)].fetch_add(1, Relaxed);
            }
            Outcome::Status { .. } => {
                self.errors[ErrorKind::Stream.index()].fetch_add(1, Relaxed);
            }
            Outcome::Error(kind) => {
                self.errors[kind.index()].fetch_add(1, Relaxed);
            }
        }
    }

    /// The histogram of `status`: its slot, else the first free one (claimed for
    /// it), else the shared last one.
    fn latency_for(&self, status: u16) -> &Latency {
        let (last, own) = self.latency.split_last().expect("LATENCY_SLOTS > 0");
        for slot in own {
            let latency = slot.get_or_init(|| Latency::new(status));
            if latency.status.load(Relaxed) == status {
                return latency;
            }
        }
        let shared = last.get_or_init(|| Latency::new(status));
        let claimed = shared.status.load(Relaxed);
        if claimed != status && claimed != MIXED_STATUS {
            shared.status.store(MIXED_STATUS, Relaxed);
        }
        shared
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    /// `None` without an authority label, or for the overflow series.
    authority: Option<Arc<str>>,
    /// `None` once the cap is reached: such requests share one overflow series.
    target: Option<SocketAddr>,
    tls: TlsStatus,
    /// Discovery's labels of the endpoint, printed as `dst_<name>`.
    dst: Arc<DstLabels>,
}

/// The request series of one direction.
#[derive(Debug)]
pub struct RequestMetrics {
    direction: Direction,
    retain_idle: Duration,
    max_series: usize,
    started: Instant,
    series: Mutex<HashMap<Key, Arc<RequestSeries>>>,
    /// Requests of series already evicted, so that the total never goes back.
    evicted_requests: AtomicU64,
}

/// A request's hold on its series; marks the series active while held.
#[derive(Clone, Debug)]
pub struct SeriesHandle {
    series: Arc<RequestSeries>,
    metrics: Arc<RequestMetrics>,
}

impl SeriesHandle {
    pub fn request(&self) {
        self.series.request();
        self.touch();
    }

    pub fn response(&self, outcome: Outcome, latency: Duration) {
        self.series.response(outcome, latency);
        self.touch();
    }

    fn touch(&self) {
        self.series
            .last_active_ms
            .store(self.metrics.started.elapsed().as_millis() as u64, Relaxed);
    }
}

impl RequestMetrics {
    pub fn new(direction: Direction, retain_idle: Duration, max_series: usize) -> RequestMetrics {
        RequestMetrics {
            direction,
            retain_idle,
            max_series,
            started: Instant::now(),
            series: Mutex::new(HashMap::new()),
            evicted_requests: AtomicU64::new(0),
        }
    }

    /// Every request counted so far (off the request path: it walks the series).
    pub fn requests_total(&self) -> u64 {
        let map = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let live: u64 = map.values().map(|s| s.requests.load(Relaxed)).sum();
        self.evicted_requests.load(Relaxed) + live
    }

    /// The series for requests to `target` with `authority` over `tls`, labelled with
    /// discovery's `dst` labels; called once per connection and upstream, or when a
    /// connection's authority changes.
    pub fn series(
        self: &Arc<Self>,
        authority: Option<&str>,
        target: SocketAddr,
        tls: &TlsStatus,
        dst: &Arc<DstLabels>,
    ) -> SeriesHandle {
        let mut map = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = Key {
            authority: authority.map(Arc::from),
            target: Some(target),
            tls: tls.clone(),
            dst: dst.clone(),
        };
        if !map.contains_key(&key) && map.len() >= self.max_series {
            self.evict_idle(&mut map);
            if map.len() >= self.max_series {
                key.authority = None;
                key.target = None;
                key.dst = Arc::default();
            }
        }
        let series = map.entry(key).or_default().clone();
        SeriesHandle {
            series,
            metrics: self.clone(),
        }
    }

    fn evict_idle(&self, map: &mut HashMap<Key, Arc<RequestSeries>>) {
        let now = self.started.elapsed().as_millis() as u64;
        let retain = self.retain_idle.as_millis() as u64;
        map.retain(|_, s| {
            let keep = Arc::strong_count(s) > 1
                || now.saturating_sub(s.last_active_ms.load(Relaxed)) < retain;
            if !keep {
                self.evicted_requests
                    .fetch_add(s.requests.load(Relaxed), Relaxed);
            }
            keep
        });
    }

    fn snapshot(&self) -> Vec<(Key, Arc<RequestSeries>)> {
        let mut map = self.series.lock().unwrap_or_else(|p| p.into_inner());
        self.evict_idle(&mut map);
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Encodes both directions' request families at scrape time.
#[derive(Debug)]
pub struct RequestCollector {
    pub directions: [Arc<RequestMetrics>; 2],
}

struct Labels<'a> {
    direction: Direction,
    key: &'a Key,
    response: Option<ResponseLabels>,
    /// `response_latency_ms`'s status (`NO_STATUS` and `MIXED_STATUS` included).
    latency_status: Option<u16>,
}

#[derive(Clone, Copy)]
struct ResponseLabels {
    status: Option<u16>,
    grpc: Option<u32>,
    failure: bool,
    error: Option<&'static str>,
}

impl EncodeLabelSet for Labels<'_> {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("direction", self.direction.as_str()).encode(encoder.encode_label())?;
        if let Some(authority) = &self.key.authority {
            ("authority", &**authority).encode(encoder.encode_label())?;
        }
        match self.key.target {
            Some(addr) => {
                ("target_addr", addr.to_string()).encode(encoder.encode_label())?;
                ("target_ip", addr.ip().to_string()).encode(encoder.encode_label())?;
                ("target_port", addr.port().to_string()).encode(encoder.encode_label())?;
            }
            None => ("target_addr", "overflow").encode(encoder.encode_label())?,
        }
        crate::metrics::transport::encode_tls(self.direction, &self.key.tls, &mut encoder)?;
        crate::metrics::transport::encode_dst(&self.key.dst, &mut encoder)?;
        if let Some(r) = self.response {
            let status = r.status.map(|s| s.to_string()).unwrap_or_default();
            ("status_code", status).encode(encoder.encode_label())?;
            let class = if r.failure { "failure" } else { "success" };
            ("classification", class).encode(encoder.encode_label())?;
            let grpc = r.grpc.map(|s| s.to_string()).unwrap_or_default();
            ("grpc_status", grpc).encode(encoder.encode_label())?;
            if let Some(error) = r.error {
                ("error", error).encode(encoder.encode_label())?;
            }
        }
        match self.latency_status {
            None | Some(MIXED_STATUS) => {}
            Some(NO_STATUS) => ("status_code", "").encode(encoder.encode_label())?,
            Some(status) => ("status_code", status.to_string()).encode(encoder.encode_label())?,
        }
        Ok(())
    }
}

/// Every non-zero response counter of a series, with its labels.
fn responses(s: &RequestSeries) -> Vec<(ResponseLabels, u64)> {
    let mut out = Vec::new();
    for (class, block) in s.statuses.iter().enumerate() {
        let Some(block) = block.get() else { continue };
        for (i, count) in block.iter().enumerate() {
            let count = count.load(Relaxed);
            if count > 0 {
                let status = (class as u16 + 1) * 100 + i as u16;
                let labels = ResponseLabels {
                    status: Some(status),
                    grpc: None,
                    failure: status >= 500,
                    error: None,
                };
                out.push((labels, count));
            }
        }
    }
    for (code, count) in s.grpc.iter().enumerate() {
        let count = count.load(Relaxed);
        if count > 0 {
            let labels = ResponseLabels {
                status: Some(200),
                grpc: Some(code as u32),
                failure: GRPC_FAILURES.contains(&code),
                error: None,
            };
            out.push((labels, count));
        }
    }
    for (kind, count) in ErrorKind::ALL.iter().zip(&s.errors) {
        let count = count.load(Relaxed);
        if count > 0 {
            let labels = ResponseLabels {
                status: kind.status().map(|s| s.as_u16()),
                grpc: None,
                failure: true,
                error: Some(kind.as_str()),
            };
            out.push((labels, count));
        }
    }
    out
}

impl Collector for RequestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series: Vec<(Direction, Key, Arc<RequestSeries>)> = self
            .directions
            .iter()
            .flat_map(|d| d.snapshot().into_iter().map(|(k, s)| (d.direction, k, s)))
            .collect();
        let mut family = encoder.encode_descriptor(
            "request",
            "Total count of HTTP requests",
            None,
            MetricType::Counter,
        )?;
        for (direction, key, s) in &series {
            let labels = Labels {
                direction: *direction,
                key,
                response: None,
                latency_status: None,
            };
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&s.requests.load(Relaxed), None)?;
        }
        let mut family = encoder.encode_descriptor(
            "response",
            "Total count of HTTP responses",
            None,
            MetricType::Counter,
        )?;
        for (direction, key, s) in &series {
            for (response, count) in responses(s) {
                let labels = Labels {
                    direction: *direction,
                    key,
                    response: Some(response),
                    latency_status: None,
                };
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "response_latency_ms",
            "Elapsed times between a request's headers being received and the first bytes of its response body (or its end, without a body)",
            None,
            MetricType::Histogram,
        )?;
        for (direction, key, s) in &series {
            for latency in s.latency.iter().filter_map(OnceLock::get) {
                let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_MS
                    .iter()
                    .map(|le| *le as f64)
                    .chain([f64::MAX])
                    .zip(latency.buckets.iter().map(|c| c.load(Relaxed)))
                    .collect();
                let count = buckets.iter().map(|(_, c)| c).sum();
                let sum_ms = latency.sum_us.load(Relaxed) as f64 / 1000.0;
                let labels = Labels {
                    direction: *direction,
                    key,
                    response: None,
                    latency_status: Some(latency.status.load(Relaxed)),
                };
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum_ms, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}

/// What a scrape shows of `metrics`, registered for both directions.
#[cfg(test)]
pub(crate) fn scrape(metrics: &Arc<RequestMetrics>) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(RequestCollector {
        directions: [metrics.clone(), metrics.clone()],
    }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoding");
    text
}

/// A fresh registry of `direction` (60 s idle retention, 10 targets) and one series in
/// it, to 192.0.2.1:80.
#[cfg(test)]
pub(crate) fn test_series(
    direction: Direction,
    authority: Option<&str>,
    tls: TlsStatus,
) -> (Arc<RequestMetrics>, SeriesHandle) {
    let metrics = Arc::new(RequestMetrics::new(direction, Duration::from_secs(60), 10));
    let series = metrics.series(
        authority,
        "192.0.2.1:80".parse().unwrap(),
        &tls,
        &Arc::default(),
    );
    (metrics, series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::tls::NoTlsReason;

    #[test]
    fn responses_are_counted_by_status_grpc_status_and_error() {
        let tls = TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery);
        let (metrics, series) = test_series(Direction::Outbound, Some("web:80"), tls);
        series.request();
        series.response(
            Outcome::Status {
                status: 204,
                grpc: None,
            },
            Duration::from_millis(3),
        );
        series.response(
            Outcome::Status {
                status: 200,
                grpc: Some(14),
            },
            Duration::from_millis(3),
        );
        series.response(
            Outcome::Status {
                status: 200,
                grpc: Some(5),
            },
            Duration::from_millis(3),
        );
        series.response(
            Outcome::Error(ErrorKind::ConnectRefused),
            Duration::from_millis(3),
        );
        let text = scrape(&metrics);
        assert!(
            text.contains(r#"status_code="204",classification="success",grpc_status="""#),
            "{text}"
        );
        assert!(
            text.contains(r#"status_code="200",classification="failure",grpc_status="14""#),
            "{text}"
        );
        assert!(
            text.contains(r#"status_code="200",classification="success",grpc_status="5""#),
            "NOT_FOUND is an answer, not a failure: {text}"
        );
        assert!(text.contains(r#"status_code="502",classification="failure",grpc_status="",error="connect_refused""#), "{text}");
        assert!(
            text.contains(r#"response_latency_ms_count{direction="outbound",authority="web:80""#),
            "{text}"
        );
        // Latency by status code, as Linkerd labels it.
        for (status, count) in [("204", "1"), ("200", "2"), ("502", "1")] {
            assert_eq!(latency_bucket(&text, "2.0", status), Some("0"), "{text}");
            assert_eq!(latency_bucket(&text, "3.0", status), Some(count), "{text}");
        }
    }

    /// The `le` bucket of the latency histogram labelled `status_code` (`None`: the
    /// one without the label).
    fn latency_bucket<'t>(
        text: &'t str,
        le: &str,
        status: impl Into<Option<&'static str>>,
    ) -> Option<&'t str> {
        let status = status.into();
        text.lines()
            .filter(|l| l.starts_with(&format!("response_latency_ms_bucket{{le=\"{le}\"")))
            .find(|l| match status {
                Some(code) => l.contains(&format!("status_code=\"{code}\"")),
                None => !l.contains("status_code="),
            })
            .and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn latency_slots_are_claimed_per_status_and_the_last_is_shared() {
        let tls = TlsStatus::NoIdentity(NoTlsReason::Loopback);
        let (metrics, series) = test_series(Direction::Inbound, None, tls);
        let codes = [200, 201, 202, 203, 204, 205, 206, 207];
        for (i, status) in codes.into_iter().enumerate() {
            // 200 three times, the codes at odd positions twice, the others once.
            for _ in 0..if status == 200 { 3 } else { 1 } + i % 2 {
                series.response(
                    Outcome::Status { status, grpc: None },
                    Duration::from_millis(1),
                );
            }
        }
        series.response(Outcome::Error(ErrorKind::Stream), Duration::from_millis(1));
        let text = scrape(&metrics);
        // The first five statuses have their own histogram (counts 3, 2, 1, 2, 1)...
        for (status, count) in [
            ("200", "3"),
            ("201", "2"),
            ("202", "1"),
            ("203", "2"),
            ("204", "1"),
        ] {
            assert_eq!(latency_bucket(&text, "1.0", status), Some(count), "{text}");
        }
        // ...the rest (205, 206, 207 and the failed stream: 2 + 1 + 2 + 1) share one
        // without a status_code label, so sums over all labels stay whole.
        assert_eq!(latency_bucket(&text, "1.0", "205"), None, "{text}");
        assert_eq!(latency_bucket(&text, "1.0", None), Some("6"), "{text}");
    }
}
