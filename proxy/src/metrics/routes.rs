//! Route metrics with Linkerd's names, so its dashboards carry over:
//! `outbound_http_route_*` and `outbound_grpc_route_*`.
//!
//! - Per route (labels `parent_*`, `route_*`, `hostname`), one observation per client
//!   request, after retries: `request_duration_seconds`, `request_statuses_total`,
//!   and `retry_requests_total`, `retry_successes_total`,
//!   `retry_limit_exceeded_total`, `retry_overflow_total` for routes that retry.
//! - Per route backend (labels `parent_*`, `route_*`, `backend_*`), one per attempt:
//!   `backend_requests_total`, `backend_response_duration_seconds`,
//!   `backend_response_statuses_total`.
//!
//! Series are found when a policy arrives (keyed by their labels, so an update keeps
//! them) and held by the destination's routing: a request only adds to atomics (a
//! lock is taken only for an outcome beyond a series' first few). Like Linkerd's,
//! they never expire; their number is bounded by the routes and backends the control
//! plane describes.
//! `hostname` is always empty (Linkerd's default, without
//! `OUTBOUND_METRICS_HOSTNAME_LABELS`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, LabelSetEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;

use crate::discover::Labels;

const REQUEST_BUCKETS: [f64; 4] = [0.05, 0.5, 1.0, 10.0];
const BACKEND_BUCKETS: [f64; 7] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0];

/// gRPC status names, by code, as Linkerd labels them.
const GRPC_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The `error` label: why a request or attempt had no complete response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteError {
    FailFast,
    LoadShed,
    RequestTimeout,
    ResponseHeadersTimeout,
    ResponseStreamTimeout,
    IdleTimeout,
    Io,
    Unknown,
}

/// Every [`RouteError`], in a fixed order.
const ROUTE_ERRORS: [RouteError; 8] = [
    RouteError::FailFast,
    RouteError::LoadShed,
    RouteError::RequestTimeout,
    RouteError::ResponseHeadersTimeout,
    RouteError::ResponseStreamTimeout,
    RouteError::IdleTimeout,
    RouteError::Io,
    RouteError::Unknown,
];

impl RouteError {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteError::FailFast => "FAIL_FAST",
            RouteError::LoadShed => "LOAD_SHED",
            RouteError::RequestTimeout => "REQUEST_TIMEOUT",
            RouteError::ResponseHeadersTimeout => "RESPONSE_HEADERS_TIMEOUT",
            RouteError::ResponseStreamTimeout => "RESPONSE_STREAM_TIMEOUT",
            RouteError::IdleTimeout => "IDLE_TIMEOUT",
            RouteError::Io => "IO",
            RouteError::Unknown => "UNKNOWN",
        }
    }
}

/// How one request or attempt ended: its status (if headers came), its gRPC status
/// (if any, for gRPC routes), and the error that cut it short (if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ended {
    pub status: Option<u16>,
    pub grpc: Option<u32>,
    pub error: Option<RouteError>,
}

/// A fixed-bucket histogram of seconds, its counters inline: a request's end touches
/// its series, not allocations beside it.
#[derive(Debug)]
struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    /// The bounds in nanoseconds, which a request's end compares as integers.
    bounds_ns: [u64; N],
    /// Non-cumulative, one per bound.
    buckets: [AtomicU64; N],
    /// Above the last bound (+Inf).
    over: AtomicU64,
    sum_us: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: &'static [f64; N]) -> Histogram<N> {
        Histogram {
            bounds,
            bounds_ns: bounds.map(|le| (le * 1e9).round() as u64),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            over: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    fn record(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let counter = match self.bounds_ns.iter().position(|le| nanos <= *le) {
            Some(bucket) => &self.buckets[bucket],
            None => &self.over,
        };
        counter.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(nanos / 1000, Relaxed);
    }

    fn encode(&self, family: &mut prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(
                self.buckets
                    .iter()
                    .chain([&self.over])
                    .map(|c| c.load(Relaxed)),
            )
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        family.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Counts by how requests ended. A series sees few distinct outcomes: the first
/// few each take a slot, claimed once and then only added to, so a request's end
/// takes no lock; any more go to a list under a lock.
#[derive(Debug, Default)]
struct Statuses {
    slots: [StatusSlot; STATUS_SLOTS],
    more: Mutex<Vec<(Ended, u64)>>,
}

const STATUS_SLOTS: usize = 4;

/// An outcome, as its [`Ended::key`] (0 while the slot is free), and its count.
#[derive(Debug, Default)]
struct StatusSlot {
    key: AtomicU64,
    count: AtomicU64,
}

impl Statuses {
    fn add(&self, ended: Ended) {
        let key = ended.key();
        for slot in &self.slots {
            let claimed = match slot.key.load(Relaxed) {
                0 => match slot.key.compare_exchange(0, key, Relaxed, Relaxed) {
                    Ok(_) => key,
                    Err(other) => other,
                },
                other => other,
            };
            if claimed == key {
                slot.count.fetch_add(1, Relaxed);
                return;
            }
        }
        let mut more = self.more.lock().unwrap_or_else(|p| p.into_inner());
        match more.iter_mut().find(|(e, _)| *e == ended) {
            Some((_, count)) => *count += 1,
            None => more.push((ended, 1)),
        }
    }

    fn snapshot(&self) -> Vec<(Ended, u64)> {
        let mut list: Vec<(Ended, u64)> = self
            .slots
            .iter()
            .filter_map(|slot| {
                let ended = Ended::from_key(slot.key.load(Relaxed))?;
                // A slot is claimed just before its first count.
                let count = slot.count.load(Relaxed);
                (count > 0).then_some((ended, count))
            })
            .collect();
        list.extend(self.more.lock().unwrap_or_else(|p| p.into_inner()).iter());
        list
    }
}

impl Ended {
    /// One number per outcome, never 0: bit 63 set; the status in bits 0..16 and
    /// present at bit 16; the gRPC status in bits 17..49 and present at bit 49; the
    /// error's position in [`ROUTE_ERRORS`], plus one, from bit 50.
    fn key(self) -> u64 {
        let status = self.status.map_or(0, |s| u64::from(s) | 1 << 16);
        let grpc = self.grpc.map_or(0, |g| (u64::from(g) | 1 << 32) << 17);
        let error = self.error.map_or(0, |e| {
            let position = ROUTE_ERRORS.iter().position(|x| *x == e).unwrap_or(0);
            (position as u64 + 1) << 50
        });
        1 << 63 | status | grpc | error
    }

    fn from_key(key: u64) -> Option<Ended> {
        if key == 0 {
            return None;
        }
        let status = (key & 1 << 16 != 0).then_some(key as u16);
        let grpc = (key & 1 << 49 != 0).then_some((key >> 17) as u32);
        let error = match (key >> 50) & 0xf {
            0 => None,
            position => ROUTE_ERRORS.get(position as usize - 1).copied(),
        };
        Some(Ended {
            status,
            grpc,
            error,
        })
    }
}

/// One route's series.
#[derive(Debug)]
pub struct RouteSeries {
    duration: Histogram<4>,
    statuses: Statuses,
    /// The retry counters exist once a request with a retry policy took the route.
    retries: AtomicBool,
    retry_requests: AtomicU64,
    retry_successes: AtomicU64,
    retry_limit_exceeded: AtomicU64,
    retry_overflow: AtomicU64,
}

/// How a request's retries ended, for the retry counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryEnd {
    /// It was not retried, or its last response was not one to retry.
    Done,
    /// It was retried and the last attempt succeeded.
    Succeeded,
    /// The last response asked for a retry, but none was left.
    LimitExceeded,
    /// The last response asked for a retry, but the request could not be replayed.
    Overflow,
}

impl RouteSeries {
    fn new() -> RouteSeries {
        RouteSeries {
            duration: Histogram::new(&REQUEST_BUCKETS),
            statuses: Statuses::default(),
            retries: AtomicBool::new(false),
            retry_requests: AtomicU64::new(0),
            retry_successes: AtomicU64::new(0),
            retry_limit_exceeded: AtomicU64::new(0),
            retry_overflow: AtomicU64::new(0),
        }
    }

    /// A request with a retry policy took the route.
    pub fn retry_policy(&self) {
        if !self.retries.load(Relaxed) {
            self.retries.store(true, Relaxed);
        }
    }

    /// A retry was sent.
    pub fn retried(&self) {
        self.retry_requests.fetch_add(1, Relaxed);
    }

    pub fn retries_ended(&self, end: RetryEnd) {
        let counter = match end {
            RetryEnd::Done => return,
            RetryEnd::Succeeded => &self.retry_successes,
            RetryEnd::LimitExceeded => &self.retry_limit_exceeded,
            RetryEnd::Overflow => &self.retry_overflow,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// The request ended, `elapsed` after it took the route.
    pub fn ended(&self, ended: Ended, elapsed: Duration) {
        self.duration.record(elapsed);
        self.statuses.add(ended);
    }
}

/// One route backend's series.
#[derive(Debug)]
pub struct BackendSeries {
    requests: AtomicU64,
    duration: Histogram<7>,
    statuses: Statuses,
}

impl BackendSeries {
    fn new() -> BackendSeries {
        BackendSeries {
            requests: AtomicU64::new(0),
            duration: Histogram::new(&BACKEND_BUCKETS),
            statuses: Statuses::default(),
        }
    }

    pub fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    /// The attempt ended, `elapsed` after it was sent.
    pub fn ended(&self, ended: Ended, elapsed: Duration) {
        self.duration.record(elapsed);
        self.statuses.add(ended);
    }
}

type RouteKey = (Labels, Labels);
type RetryCounter = fn(&RouteSeries) -> &AtomicU64;
type BackendKey = (Labels, Labels, Labels);

/// The series of one protocol's routes.
#[derive(Debug, Default)]
struct Families {
    routes: Mutex<HashMap<RouteKey, Arc<RouteSeries>>>,
    backends: Mutex<HashMap<BackendKey, Arc<BackendSeries>>>,
}

/// Every route series of the outbound side.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    http: Families,
    grpc: Families,
}

impl RouteMetrics {
    fn families(&self, grpc: bool) -> &Families {
        if grpc {
            &self.grpc
        } else {
            &self.http
        }
    }

    /// The series of the route `route` of `parent`.
    pub fn route(&self, grpc: bool, parent: &Labels, route: &Labels) -> Arc<RouteSeries> {
        let mut map = self
            .families(grpc)
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry((parent.clone(), route.clone()))
            .or_insert_with(|| Arc::new(RouteSeries::new()))
            .clone()
    }

    /// The series of `backend` under `route` of `parent`.
    pub fn backend(
        &self,
        grpc: bool,
        parent: &Labels,
        route: &Labels,
        backend: &Labels,
    ) -> Arc<BackendSeries> {
        let mut map = self
            .families(grpc)
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry((parent.clone(), route.clone(), backend.clone()))
            .or_insert_with(|| Arc::new(BackendSeries::new()))
            .clone()
    }
}

/// Encodes the route families at scrape time.
#[derive(Debug)]
pub struct RouteCollector {
    pub metrics: Arc<RouteMetrics>,
}

struct SeriesLabels<'a> {
    groups: [Option<&'a Labels>; 3],
    hostname: bool,
    grpc: bool,
    ended: Option<Ended>,
}

impl EncodeLabelSet for SeriesLabels<'_> {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        for labels in self.groups.into_iter().flatten() {
            for (name, value) in labels.iter() {
                (name, value).encode(encoder.encode_label())?;
            }
        }
        if self.hostname {
            ("hostname", "").encode(encoder.encode_label())?;
        }
        if let Some(ended) = self.ended {
            if self.grpc {
                // Linkerd's: UNKNOWN when the response carried none.
                let name = GRPC_NAMES
                    .get(ended.grpc.unwrap_or(2) as usize)
                    .copied()
                    .unwrap_or("UNKNOWN");
                ("grpc_status", name).encode(encoder.encode_label())?;
            } else {
                let status = ended.status.map(|s| s.to_string()).unwrap_or_default();
                ("http_status", status).encode(encoder.encode_label())?;
            }
            let error = ended.error.map_or("", RouteError::as_str);
            ("error", error).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

impl Collector for RouteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (grpc, prefix) in [
            (false, "outbound_http_route"),
            (true, "outbound_grpc_route"),
        ] {
            let families = self.metrics.families(grpc);
            let routes: Vec<(RouteKey, Arc<RouteSeries>)> = families
                .routes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let backends: Vec<(BackendKey, Arc<BackendSeries>)> = families
                .backends
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if routes.is_empty() && backends.is_empty() {
                continue;
            }
            let name = format!("{prefix}_request_duration_seconds");
            let mut family = encoder.encode_descriptor(
                &name,
                "The time between request initialization and response completion",
                None,
                MetricType::Histogram,
            )?;
            for (key, series) in &routes {
                let labels = SeriesLabels::route(key, grpc, None);
                series
                    .duration
                    .encode(&mut family.encode_family(&labels)?)?;
            }
            let name = format!("{prefix}_request_statuses");
            let mut family = encoder.encode_descriptor(
                &name,
                "Completed request-response streams",
                None,
                MetricType::Counter,
            )?;
            for (key, series) in &routes {
                for (ended, count) in series.statuses.snapshot() {
                    let labels = SeriesLabels::route(key, grpc, Some(ended));
                    family
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
                }
            }
            let retrying: Vec<&(RouteKey, Arc<RouteSeries>)> = routes
                .iter()
                .filter(|(_, s)| s.retries.load(Relaxed))
                .collect();
            if !retrying.is_empty() {
                let counters: [(&str, &str, RetryCounter); 4] = [
                    ("retry_requests", "Retry requests emitted", |s| {
                        &s.retry_requests
                    }),
                    (
                        "retry_successes",
                        "Successful responses to retry requests",
                        |s| &s.retry_successes,
                    ),
                    (
                        "retry_limit_exceeded",
                        "Retryable requests not sent due to retry limits",
                        |s| &s.retry_limit_exceeded,
                    ),
                    (
                        "retry_overflow",
                        "Retryable requests not sent due to circuit breakers",
                        |s| &s.retry_overflow,
                    ),
                ];
                for (name, help, counter) in counters {
                    let name = format!("{prefix}_{name}");
                    let mut family =
                        encoder.encode_descriptor(&name, help, None, MetricType::Counter)?;
                    for (key, series) in &retrying {
                        let labels = SeriesLabels::route(key, grpc, None);
                        family
                            .encode_family(&labels)?
                            .encode_counter::<NoLabelSet, _, u64>(
                                &counter(series).load(Relaxed),
                                None,
                            )?;
                    }
                }
            }
            let name = format!("{prefix}_backend_requests");
            let mut family = encoder.encode_descriptor(
                &name,
                "The total number of requests dispatched",
                None,
                MetricType::Counter,
            )?;
            for (key, series) in &backends {
                family
                    .encode_family(&SeriesLabels::backend(key, grpc, None))?
                    .encode_counter::<NoLabelSet, _, u64>(&series.requests.load(Relaxed), None)?;
            }
            let name = format!("{prefix}_backend_response_duration_seconds");
            let mut family = encoder.encode_descriptor(
                &name,
                "The time between request completion and response completion",
                None,
                MetricType::Histogram,
            )?;
            for (key, series) in &backends {
                let labels = SeriesLabels::backend(key, grpc, None);
                series
                    .duration
                    .encode(&mut family.encode_family(&labels)?)?;
            }
            let name = format!("{prefix}_backend_response_statuses");
            let mut family = encoder.encode_descriptor(
                &name,
                "Completed responses",
                None,
                MetricType::Counter,
            )?;
            for (key, series) in &backends {
                for (ended, count) in series.statuses.snapshot() {
                    family
                        .encode_family(&SeriesLabels::backend(key, grpc, Some(ended)))?
                        .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
                }
            }
        }
        Ok(())
    }
}

impl<'a> SeriesLabels<'a> {
    fn route((parent, route): &'a RouteKey, grpc: bool, ended: Option<Ended>) -> Self {
        SeriesLabels {
            groups: [Some(parent), Some(route), None],
            hostname: true,
            grpc,
            ended,
        }
    }

    fn backend((parent, route, backend): &'a BackendKey, grpc: bool, ended: Option<Ended>) -> Self {
        SeriesLabels {
            groups: [Some(parent), Some(route), Some(backend)],
            hostname: false,
            grpc,
            ended,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(metrics: &Arc<RouteMetrics>) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(RouteCollector {
            metrics: metrics.clone(),
        }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoding");
        text
    }

    #[test]
    fn an_outcome_is_one_key_and_back() {
        let mut outcomes = vec![
            (None, None, None),
            (Some(200), None, None),
            (Some(503), None, None),
            (Some(u16::MAX), None, None),
            (Some(200), Some(0), None),
            (Some(200), Some(14), None),
            (None, Some(u32::MAX), None),
        ];
        for error in ROUTE_ERRORS {
            outcomes.push((None, None, Some(error)));
            outcomes.push((Some(504), Some(4), Some(error)));
        }
        let mut keys = std::collections::HashSet::new();
        for (status, grpc, error) in outcomes {
            let ended = Ended {
                status,
                grpc,
                error,
            };
            let key = ended.key();
            assert_ne!(key, 0, "{ended:?}");
            assert!(keys.insert(key), "{ended:?} shares its key");
            assert_eq!(Ended::from_key(key), Some(ended));
        }
        assert_eq!(Ended::from_key(0), None);
    }

    #[test]
    fn statuses_count_every_outcome_beyond_their_slots() {
        let statuses = Statuses::default();
        let ended = |status| Ended {
            status: Some(status),
            grpc: None,
            error: None,
        };
        // Twice as many outcomes as slots, each seen as many times as its status's
        // last digit plus one.
        let codes: Vec<u16> = (0..2 * STATUS_SLOTS as u16).map(|i| 200 + i).collect();
        for &code in &codes {
            for _ in 0..=(code % 10) {
                statuses.add(ended(code));
            }
        }
        let mut counted = statuses.snapshot();
        counted.sort_by_key(|(e, _)| e.status);
        let expected: Vec<(Ended, u64)> = codes
            .iter()
            .map(|&code| (ended(code), u64::from(code % 10) + 1))
            .collect();
        assert_eq!(counted, expected);
    }

    #[test]
    fn a_duration_on_a_bound_is_counted_in_that_bound() {
        let histogram = Histogram::new(&REQUEST_BUCKETS);
        histogram.record(Duration::from_millis(50));
        histogram.record(Duration::from_nanos(50_000_001));
        histogram.record(Duration::from_secs(10));
        histogram.record(Duration::from_secs(11));
        let counts: Vec<u64> = histogram.buckets.iter().map(|c| c.load(Relaxed)).collect();
        assert_eq!(counts, [1, 1, 0, 1]);
        assert_eq!(histogram.over.load(Relaxed), 1);
        assert_eq!(histogram.sum_us.load(Relaxed), 21_100_000);
    }

    #[test]
    fn route_and_backend_series_carry_linkerds_names_and_labels() {
        let metrics = Arc::new(RouteMetrics::default());
        let parent = Labels::new([("parent_kind", "Service"), ("parent_name", "web")]);
        let route = Labels::new([("route_kind", "HTTPRoute"), ("route_name", "canary")]);
        let backend = Labels::new([("backend_kind", "Service"), ("backend_name", "web-v2")]);
        let series = metrics.route(false, &parent, &route);
        assert!(Arc::ptr_eq(&series, &metrics.route(false, &parent, &route)));
        let ok = Ended {
            status: Some(200),
            grpc: None,
            error: None,
        };
        series.ended(ok, Duration::from_millis(30));
        series.ended(
            Ended {
                status: None,
                grpc: None,
                error: Some(RouteError::RequestTimeout),
            },
            Duration::from_secs(2),
        );
        let b = metrics.backend(false, &parent, &route, &backend);
        b.request();
        b.ended(ok, Duration::from_millis(20));
        let grpc = metrics.route(true, &parent, &route);
        grpc.retry_policy();
        grpc.retried();
        grpc.retries_ended(RetryEnd::Succeeded);
        grpc.ended(
            Ended {
                status: Some(200),
                grpc: None,
                error: None,
            },
            Duration::from_millis(1),
        );
        let text = scrape(&metrics);
        for line in [
            r#"outbound_http_route_request_statuses_total{parent_kind="Service",parent_name="web",route_kind="HTTPRoute",route_name="canary",hostname="",http_status="200",error=""} 1"#,
            r#"outbound_http_route_request_statuses_total{parent_kind="Service",parent_name="web",route_kind="HTTPRoute",route_name="canary",hostname="",http_status="",error="REQUEST_TIMEOUT"} 1"#,
            r#"outbound_http_route_request_duration_seconds_bucket{le="0.05",parent_kind="Service",parent_name="web",route_kind="HTTPRoute",route_name="canary",hostname=""} 1"#,
            r#"outbound_http_route_backend_requests_total{parent_kind="Service",parent_name="web",route_kind="HTTPRoute",route_name="canary",backend_kind="Service",backend_name="web-v2"} 1"#,
            r#"outbound_http_route_backend_response_duration_seconds_bucket{le="0.025",parent_kind="Service",parent_name="web",route_kind="HTTPRoute",route_name="canary",backend_kind="Service",backend_name="web-v2"} 1"#,
            r#"outbound_grpc_route_request_statuses_total{parent_kind="Service",parent_name="web",route_kind="HTTPRoute",route_name="canary",hostname="",grpc_status="UNKNOWN",error=""} 1"#,
            r#"outbound_grpc_route_retry_requests_total{parent_kind="Service",parent_name="web",route_kind="HTTPRoute",route_name="canary",hostname=""} 1"#,
            r#"outbound_grpc_route_retry_successes_total{parent_kind="Service",parent_name="web",route_kind="HTTPRoute",route_name="canary",hostname=""} 1"#,
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
        // Retry counters only for routes that retry.
        assert!(!text.contains("outbound_http_route_retry"), "{text}");
    }
}
