//! Outbound routes (issue 28, first part): what `OutboundPolicies.Watch` says about a
//! target's HTTP and gRPC routes, read into values once, when the policy arrives, and
//! the pure decisions a request needs from them: which route rule it takes, and which
//! backend of a weighted split.
//!
//! On the request path so far: a request that no route takes is refused with 404
//! (`http::ServerConn::dispatch`), as in linkerd2-proxy. A request a route takes
//! still goes to the default route's first backend (`translate.rs`); the rule's
//! backends, filters, retries and timeouts are to be executed from these values.
//!
//! Precedence is Gateway API's, as the issue asks: a route whose hosts match the
//! request's beats one with no hosts (an exact host over a wildcard, a longer host
//! over a shorter), then the rule whose match is most specific
//! ([`route_match::Score`]), then the earlier route and rule.

use std::cmp::Reverse;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use hyper::http::{HeaderMap, Method, Uri};
use linkerd2_proxy_api::http_route as hr;
use linkerd2_proxy_api::http_types;
use linkerd2_proxy_api::outbound as ob;

use super::accrual::{Accrual, SuccessRate};
use super::linkerd::translate::{backend_spec, meta_labels, BackendSpec};
use super::route_match::{self, Host, PathRule, RequestMatch, Score};
use super::Labels;
pub use crate::config::Backoff;

/// A target's routes, HTTP or gRPC, in the order the control plane sent them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteTable {
    pub routes: Vec<Route>,
    /// gRPC routes (`outbound_grpc_route_*`, gRPC statuses judge retries and accrual).
    pub grpc: bool,
    /// How many route backends the table has: their [`RouteBackend::slot`]s are
    /// `0..backends`, in table order.
    pub backends: usize,
    /// Failure accrual for the endpoints of the table's balanced backends.
    pub accrual: Option<Accrual>,
    /// The paths the rules' matches need, read before the rules themselves (made
    /// from `routes` on the first request, which the routes do not change after).
    pub gates: PathGates,
}

impl RouteTable {
    fn gates(&self) -> &Gates {
        self.gates.0.get_or_init(|| PathGates::of(&self.routes))
    }

    /// Whether any route names hosts: if none does, a request's authority cannot
    /// change the rule it takes, and [`select`] may be given none.
    pub fn names_hosts(&self) -> bool {
        self.gates().hosts
    }
}

/// The path each match of a table's rules needs, laid out together, shortest first,
/// and made on the table's first request: a request's rule is found by reading these
/// (up to the longest that its path could fit), and then only the rules whose paths
/// fit it, not every route, rule and match of the table.
#[derive(Debug, Default)]
pub struct PathGates(std::sync::OnceLock<Gates>);

/// Small and in one allocation, their paths in another: what a request reads of a
/// table's rules it does not take.
#[derive(Debug)]
pub struct Gates {
    gates: Vec<Gate>,
    paths: Vec<u8>,
    /// Some route names hosts: only then is a request's authority read.
    hosts: bool,
}

#[derive(Debug)]
struct Gate {
    route: u32,
    rule: u32,
    kind: GateKind,
    /// The path (a prefix without its trailing slashes) at `start..start + len` of
    /// [`Gates::paths`].
    start: u32,
    len: u32,
}

#[derive(Debug)]
enum GateKind {
    /// Anything the rule's match can only tell by reading it: no path rule, a
    /// pattern.
    Any,
    Exact,
    Prefix,
}

impl PathGates {
    fn of(routes: &[Route]) -> Gates {
        let mut gates = Gates {
            gates: Vec::new(),
            paths: Vec::new(),
            hosts: routes.iter().any(|route| !route.hosts.is_empty()),
        };
        for (route_index, route) in routes.iter().enumerate() {
            for (rule_index, rule) in route.rules.iter().enumerate() {
                let mut push = |kind, path: &str| {
                    let start = gates.paths.len();
                    gates.paths.extend_from_slice(path.as_bytes());
                    gates.gates.push(Gate {
                        route: route_index as u32,
                        rule: rule_index as u32,
                        kind,
                        start: start as u32,
                        len: path.len() as u32,
                    });
                };
                if rule.matches.is_empty() {
                    push(GateKind::Any, "");
                }
                for matched in &rule.matches {
                    match &matched.path {
                        PathRule::Exact(path) => push(GateKind::Exact, path),
                        PathRule::Prefix(prefix) => {
                            push(GateKind::Prefix, prefix.trim_end_matches('/'))
                        }
                        PathRule::Any | PathRule::Regex(_) => push(GateKind::Any, ""),
                    }
                }
            }
        }
        // Shortest first (in table order among equals): a request reads only the
        // gates as long as its path or shorter.
        gates.gates.sort_by_key(|gate| gate.len);
        gates
    }
}

impl Gates {
    /// The route and rule of each match whose path `path` fits, shortest path first.
    fn admitting<'a>(&'a self, path: &'a [u8]) -> impl Iterator<Item = (usize, usize)> + 'a {
        self.gates
            .iter()
            .take_while(move |gate| gate.len as usize <= path.len())
            .filter(move |gate| {
                let start = gate.start as usize;
                let own = &self.paths[start..start + gate.len as usize];
                match gate.kind {
                    GateKind::Any => true,
                    GateKind::Exact => path == own,
                    GateKind::Prefix => route_match::segments_fit(own, path),
                }
            })
            .map(|gate| (gate.route as usize, gate.rule as usize))
    }
}

/// Derived from the routes: a copy makes its own, and two tables are alike whatever
/// either has made.
impl Clone for PathGates {
    fn clone(&self) -> PathGates {
        PathGates::default()
    }
}

impl PartialEq for PathGates {
    fn eq(&self, _: &PathGates) -> bool {
        true
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// `route_group`, `route_kind`, `route_namespace`, `route_name`, for metrics.
    pub labels: Labels,
    pub hosts: Vec<Host>,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// None: the rule takes every request.
    pub matches: Vec<RequestMatch>,
    pub filters: Vec<Filter>,
    pub backends: Distribution,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
    /// `l5d-retry-*` and `l5d-timeout` request headers may change retries and timeouts.
    pub allow_l5d_request_headers: bool,
}

/// Where a rule's requests go.
#[derive(Clone, Debug, PartialEq)]
pub enum Distribution {
    /// Nowhere: every request fails (503).
    Empty,
    /// The first backend that is available.
    FirstAvailable(Vec<RouteBackend>),
    /// A backend drawn by weight (a traffic split); backends of weight 0 are never drawn.
    RandomAvailable(Vec<(RouteBackend, u32)>),
}

impl Distribution {
    /// Its backends, in order.
    pub fn backends(&self) -> impl Iterator<Item = &RouteBackend> {
        let (first, random): (&[RouteBackend], &[(RouteBackend, u32)]) = match self {
            Distribution::Empty => (&[], &[]),
            Distribution::FirstAvailable(list) => (list, &[]),
            Distribution::RandomAvailable(list) => (&[], list),
        };
        first.iter().chain(random.iter().map(|(b, _)| b))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteBackend {
    pub backend: BackendSpec,
    /// `backend_*` labels, for metrics.
    pub labels: Labels,
    pub filters: Vec<Filter>,
    /// Its place among the table's backends: what the destination resolved it to,
    /// and each connection's target for it, are found by it.
    pub slot: usize,
}

/// What a rule or a backend does to a request before it is sent.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    /// Answer `ratio` of the requests with `status` (HTTP) or `grpc_status`, without
    /// sending them.
    FailureInjector {
        status: Failure,
        message: String,
        ratio: Ratio,
    },
    RequestHeaders(HeaderChanges),
    ResponseHeaders(HeaderChanges),
    Redirect(Redirect),
    /// A filter this proxy does not understand: the rule's requests fail (500), as
    /// linkerd2-proxy answers an invalid policy.
    Invalid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Http(u16),
    Grpc(u32),
}

/// `numerator` out of every `denominator` (a zero denominator: never).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ratio {
    pub numerator: u32,
    pub denominator: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderChanges {
    pub add: Vec<(String, Vec<u8>)>,
    pub set: Vec<(String, Vec<u8>)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub path: Option<PathChange>,
    pub port: Option<u16>,
    /// 301 when the policy leaves it unset, as linkerd2-proxy does.
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathChange {
    Full(String),
    Prefix(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// From the request's start until its response has ended.
    pub request: Option<Duration>,
    /// From the end of the request until the end of the response.
    pub response: Option<Duration>,
    /// Without a frame in either direction.
    pub idle: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Retry {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// A request whose body is larger is not retried (and not kept beyond this).
    pub max_request_bytes: u32,
    pub on: RetryOn,
    /// Each attempt's own timeout.
    pub timeout: Option<Duration>,
    pub backoff: Option<Backoff>,
}

impl Default for Retry {
    /// What a retry set by `l5d-retry-*` headers alone starts from, as in Linkerd.
    fn default() -> Retry {
        Retry {
            max_retries: 1,
            max_request_bytes: 64 * 1024,
            on: RetryOn::HttpStatuses(Vec::new()),
            timeout: None,
            backoff: Some(Backoff {
                min: Duration::from_millis(25),
                max: Duration::from_millis(250),
                jitter: 1.0,
            }),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum RetryOn {
    HttpStatuses(Vec<RangeInclusive<u16>>),
    GrpcCodes(Vec<u32>),
}

/// The rule a request takes: `routes[route].rules[rule]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selected {
    pub route: usize,
    pub rule: usize,
}

/// How well a route's hosts match the request's authority. Greater is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum HostRank {
    /// The route names no hosts.
    Any,
    /// A wildcard, by the length of its suffix.
    Suffix(usize),
    Exact(usize),
}

/// How well a rule takes a request, greater first: its route's hosts, its best
/// match, then its place in the table (the earlier wins a tie).
type Rank = (HostRank, Score, Reverse<(usize, usize)>);

/// The rule `request` takes, if any route takes it (none: 404, or gRPC status 12 in
/// linkerd2-proxy's answer "no route").
pub fn select(
    table: &RouteTable,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    authority: Option<&str>,
) -> Option<Selected> {
    let request_host = route_match::request_host(authority);
    let gates = table.gates();
    let mut best: Option<(Rank, Selected)> = None;
    let mut last_read = None;
    for (route_index, rule_index) in gates.admitting(uri.path().as_bytes()) {
        // A rule whose matches' paths fit one after the other is read once (a rule
        // read again scores the same, and does not replace itself).
        if last_read == Some((route_index, rule_index)) {
            continue;
        }
        last_read = Some((route_index, rule_index));
        let route = &table.routes[route_index];
        let Some(host) = host_rank(&route.hosts, request_host) else {
            continue;
        };
        let rule = &route.rules[rule_index];
        let Some(score) = route_match::best_score(&rule.matches, method, uri, headers) else {
            continue;
        };
        // The earlier route and rule win ties (rules are not read in table order).
        let rank = (host, score, Reverse((route_index, rule_index)));
        if best.as_ref().is_none_or(|(best_rank, _)| rank > *best_rank) {
            let selected = Selected {
                route: route_index,
                rule: rule_index,
            };
            best = Some((rank, selected));
        }
    }
    best.map(|(_, selected)| selected)
}

fn host_rank(hosts: &[Host], request_host: Option<&[u8]>) -> Option<HostRank> {
    if hosts.is_empty() {
        return Some(HostRank::Any);
    }
    let request_host = request_host?;
    hosts
        .iter()
        .filter(|host| route_match::host_is(request_host, host))
        .map(|host| match host {
            Host::Exact(name) => HostRank::Exact(name.len()),
            Host::Suffix(suffix) => HostRank::Suffix(suffix.len()),
        })
        .max()
}

/// Which backend of a weighted split a request goes to, for a `draw` uniform over
/// `0..u32::MAX`: each backend takes the share of draws its weight is of the total.
/// None when every weight is 0.
pub fn pick_weighted(weights: &[u32], draw: u32) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    // Scaled to the total without bias worth a request: `draw * total / 2^32`.
    let mut point = (u64::from(draw) * total) >> 32;
    for (index, weight) in weights.iter().enumerate() {
        let weight = u64::from(*weight);
        if point < weight {
            return Some(index);
        }
        point -= weight;
    }
    None
}

/// Reads a route table from a policy's HTTP or gRPC routes. The two kinds' messages
/// differ only in their types (`ob::http_route` and `ob::grpc_route` name every field
/// alike) and in how a match, a filter and a retry condition read, so one reading
/// serves both.
macro_rules! read_route_table {
    ($routes:expr, $parent:expr, $target:expr, $kind:ident, $read_match:path, $read_filter:path, $retry_on:path) => {{
        use ob::$kind::distribution::Kind;
        let (parent, target) = ($parent, $target);
        let slots = std::cell::Cell::new(0);
        let backend = |b: &ob::$kind::RouteBackend| {
            let slot = slots.replace(slots.get() + 1);
            route_backend(
                b.backend.as_ref(),
                &b.filters,
                $read_filter,
                parent,
                target,
                slot,
            )
        };
        let routes = $routes
            .iter()
            .map(|route| Route {
                labels: route_labels(route.metadata.as_ref()),
                hosts: route_match::read_hosts(&route.hosts),
                rules: route
                    .rules
                    .iter()
                    .map(|rule| Rule {
                        matches: rule.matches.iter().map($read_match).collect(),
                        filters: rule.filters.iter().map($read_filter).collect(),
                        backends: match rule.backends.as_ref().and_then(|d| d.kind.as_ref()) {
                            None | Some(Kind::Empty(_)) => Distribution::Empty,
                            Some(Kind::FirstAvailable(first)) => Distribution::FirstAvailable(
                                first.backends.iter().map(backend).collect(),
                            ),
                            Some(Kind::RandomAvailable(random)) => Distribution::RandomAvailable(
                                random
                                    .backends
                                    .iter()
                                    .filter_map(|b| Some((backend(b.backend.as_ref()?), b.weight)))
                                    .collect(),
                            ),
                        },
                        timeouts: read_timeouts(rule.timeouts.as_ref()),
                        retry: rule.retry.as_ref().map(|retry| Retry {
                            max_retries: retry.max_retries,
                            max_request_bytes: retry.max_request_bytes,
                            on: $retry_on(retry),
                            timeout: retry.timeout.as_ref().and_then(duration),
                            backoff: retry.backoff.as_ref().and_then(read_backoff),
                        }),
                        allow_l5d_request_headers: rule.allow_l5d_request_headers,
                    })
                    .collect(),
            })
            .collect();
        RouteTable {
            routes,
            grpc: false,
            backends: slots.get(),
            accrual: None,
            gates: PathGates::default(),
        }
    }};
}

/// Reads a policy's HTTP routes (`Detect`, `Http1`, `Http2` protocols).
pub fn read_http_routes(
    routes: &[ob::HttpRoute],
    parent: &Labels,
    target: SocketAddr,
) -> RouteTable {
    read_route_table!(
        routes,
        parent,
        target,
        http_route,
        route_match::read_http_match,
        read_http_filter,
        http_retry_on
    )
}

/// Reads a policy's gRPC routes (`Grpc` protocol).
pub fn read_grpc_routes(
    routes: &[ob::GrpcRoute],
    parent: &Labels,
    target: SocketAddr,
) -> RouteTable {
    let table = read_route_table!(
        routes,
        parent,
        target,
        grpc_route,
        route_match::read_grpc_match,
        read_grpc_filter,
        grpc_retry_on
    );
    RouteTable {
        grpc: true,
        ..table
    }
}

/// A route's metric labels: Linkerd's `route_*` carry no port or section.
fn route_labels(metadata: Option<&linkerd2_proxy_api::meta::Metadata>) -> Labels {
    let all = meta_labels("route", metadata, 0);
    Labels::new(
        all.iter()
            .filter(|(name, _)| !matches!(*name, "route_port" | "route_section_name")),
    )
}

/// One item of Linkerd's retry-status vocabulary (`retry.linkerd.io/http`,
/// `l5d-retry-http`): `5xx`, `gateway-error`, `NNN` or `NNN-MMM` (100 to 599),
/// keywords in any case.
pub fn retry_status_item(item: &str) -> Option<RangeInclusive<u16>> {
    match item.to_ascii_lowercase().as_str() {
        "5xx" => Some(500..=599),
        "gateway-error" => Some(502..=504),
        other => {
            let (low, high) = other.split_once('-').unwrap_or((other, other));
            let status = |s: &str| s.parse::<u16>().ok().filter(|s| (100..=599).contains(s));
            let (low, high) = (status(low)?, status(high)?);
            (low <= high).then_some(low..=high)
        }
    }
}

/// One item of Linkerd's retryable gRPC statuses (`retry.linkerd.io/grpc`,
/// `l5d-retry-grpc`), in any case.
pub fn retry_grpc_item(item: &str) -> Option<u32> {
    match item.to_ascii_lowercase().as_str() {
        "cancelled" => Some(1),
        "deadline-exceeded" => Some(4),
        "resource-exhausted" => Some(8),
        "internal" => Some(13),
        "unavailable" => Some(14),
        _ => None,
    }
}

/// The status ranges an HTTP route retries (an inverted or out-of-range one is
/// dropped).
fn http_retry_on(retry: &ob::http_route::Retry) -> RetryOn {
    RetryOn::HttpStatuses(
        retry
            .conditions
            .iter()
            .flat_map(|c| &c.status_ranges)
            .filter_map(|r| {
                let start = u16::try_from(r.start).ok()?;
                let end = u16::try_from(r.end).ok()?;
                (start <= end).then_some(start..=end)
            })
            .collect(),
    )
}

/// The gRPC codes a gRPC route retries.
fn grpc_retry_on(retry: &ob::grpc_route::Retry) -> RetryOn {
    RetryOn::GrpcCodes(
        retry
            .conditions
            .as_ref()
            .map(|c| {
                [
                    (c.cancelled, 1),
                    (c.deadine_exceeded, 4),
                    (c.resource_exhausted, 8),
                    (c.internal, 13),
                    (c.unavailable, 14),
                ]
                .into_iter()
                .filter_map(|(on, code)| on.then_some(code))
                .collect()
            })
            .unwrap_or_default(),
    )
}

/// A rule's backend and its filters; a missing backend is refused, as linkerd2-proxy
/// answers it.
fn route_backend<F>(
    backend: Option<&ob::Backend>,
    filters: &[F],
    read_filter: fn(&F) -> Filter,
    parent: &Labels,
    target: SocketAddr,
    slot: usize,
) -> RouteBackend {
    RouteBackend {
        backend: match backend {
            Some(backend) => backend_spec(backend, parent, target),
            None => BackendSpec::Refused(super::Refusal::Invalid),
        },
        labels: meta_labels(
            "backend",
            backend.and_then(|b| b.metadata.as_ref()),
            target.port(),
        ),
        filters: filters.iter().map(read_filter).collect(),
        slot,
    }
}

fn read_http_filter(filter: &ob::http_route::Filter) -> Filter {
    use ob::http_route::filter::Kind;
    match filter.kind.as_ref() {
        Some(Kind::FailureInjector(failure)) => match u16::try_from(failure.status) {
            Ok(status) if (100..=599).contains(&status) => Filter::FailureInjector {
                status: Failure::Http(status),
                message: failure.message.clone(),
                ratio: read_ratio(failure.ratio.as_ref()),
            },
            _ => Filter::Invalid,
        },
        Some(Kind::RequestHeaderModifier(changes)) => Filter::RequestHeaders(read_header_changes(
            &changes.add,
            &changes.set,
            &changes.remove,
        )),
        Some(Kind::ResponseHeaderModifier(changes)) => Filter::ResponseHeaders(
            read_header_changes(&changes.add, &changes.set, &changes.remove),
        ),
        Some(Kind::Redirect(redirect)) => read_redirect(redirect),
        None => Filter::Invalid,
    }
}

fn read_grpc_filter(filter: &ob::grpc_route::Filter) -> Filter {
    use ob::grpc_route::filter::Kind;
    match filter.kind.as_ref() {
        Some(Kind::FailureInjector(failure)) if failure.code <= 16 => Filter::FailureInjector {
            status: Failure::Grpc(failure.code),
            message: failure.message.clone(),
            ratio: read_ratio(failure.ratio.as_ref()),
        },
        Some(Kind::RequestHeaderModifier(changes)) => Filter::RequestHeaders(read_header_changes(
            &changes.add,
            &changes.set,
            &changes.remove,
        )),
        _ => Filter::Invalid,
    }
}

/// No ratio: every request fails, as linkerd2-proxy reads it.
fn read_ratio(ratio: Option<&hr::Ratio>) -> Ratio {
    ratio.map_or(
        Ratio {
            numerator: 1,
            denominator: 1,
        },
        |r| Ratio {
            numerator: r.numerator.min(r.denominator),
            denominator: r.denominator,
        },
    )
}

fn read_header_changes(
    add: &Option<http_types::Headers>,
    set: &Option<http_types::Headers>,
    remove: &[String],
) -> HeaderChanges {
    let pairs = |headers: &Option<http_types::Headers>| {
        headers
            .iter()
            .flat_map(|h| &h.headers)
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect()
    };
    HeaderChanges {
        add: pairs(add),
        set: pairs(set),
        remove: remove
            .iter()
            .map(|name| name.to_ascii_lowercase())
            .collect(),
    }
}

fn read_redirect(redirect: &hr::RequestRedirect) -> Filter {
    use http_types::scheme::{Registered, Type};
    let scheme = match redirect.scheme.as_ref().and_then(|s| s.r#type.as_ref()) {
        None => None,
        Some(Type::Registered(n)) => match Registered::try_from(*n) {
            Ok(Registered::Http) => Some("http".to_string()),
            Ok(Registered::Https) => Some("https".to_string()),
            Err(_) => return Filter::Invalid,
        },
        Some(Type::Unregistered(name)) => Some(name.to_ascii_lowercase()),
    };
    let path =
        redirect
            .path
            .as_ref()
            .and_then(|p| p.replace.as_ref())
            .map(|replace| match replace {
                hr::path_modifier::Replace::Full(full) => PathChange::Full(full.clone()),
                hr::path_modifier::Replace::Prefix(prefix) => PathChange::Prefix(prefix.clone()),
            });
    let port = match redirect.port {
        0 => None,
        port => match u16::try_from(port) {
            Ok(port) => Some(port),
            Err(_) => return Filter::Invalid,
        },
    };
    let status = match redirect.status {
        0 => 301,
        status @ 300..=399 => status as u16,
        _ => return Filter::Invalid,
    };
    Filter::Redirect(Redirect {
        scheme,
        host: Some(redirect.host.clone()).filter(|h| !h.is_empty()),
        path,
        port,
        status,
    })
}

fn read_timeouts(timeouts: Option<&hr::Timeouts>) -> Timeouts {
    let Some(timeouts) = timeouts else {
        return Timeouts::default();
    };
    Timeouts {
        request: timeouts.request.as_ref().and_then(duration),
        response: timeouts.response.as_ref().and_then(duration),
        idle: timeouts.idle.as_ref().and_then(duration),
    }
}

pub fn read_backoff(backoff: &ob::ExponentialBackoff) -> Option<Backoff> {
    let min = backoff.min_backoff.as_ref().and_then(duration)?;
    let max = backoff.max_backoff.as_ref().and_then(duration)?;
    let jitter = f64::from(backoff.jitter_ratio);
    (min <= max && jitter.is_finite() && jitter >= 0.0).then_some(Backoff { min, max, jitter })
}

/// A protocol's failure accrual; none when absent or without a usable backoff (the
/// API requires one).
pub fn read_accrual(accrual: Option<&ob::FailureAccrual>) -> Option<Accrual> {
    use ob::failure_accrual::Kind;
    match accrual?.kind.as_ref()? {
        Kind::ConsecutiveFailures(c) => Some(Accrual {
            max_failures: c.max_failures,
            success_rate: None,
            backoff: read_backoff(c.backoff.as_ref()?)?,
        }),
        Kind::Unified(u) => {
            let threshold = u.success_rate_threshold;
            let success_rate = (threshold.is_finite() && threshold > 0.0).then(|| SuccessRate {
                threshold: threshold.min(1.0),
                decay: u
                    .decay
                    .as_ref()
                    .and_then(duration)
                    .unwrap_or(Duration::from_secs(10))
                    .max(Duration::from_millis(10)),
                min_requests: u.min_requests,
            });
            Some(Accrual {
                max_failures: u.max_consecutive_failures,
                success_rate,
                backoff: read_backoff(u.backoff.as_ref()?)?,
            })
        }
    }
}

/// A protobuf duration; none when negative, zero or out of range (no timeout).
fn duration(d: &prost_types::Duration) -> Option<Duration> {
    let d = Duration::try_from(*d).ok()?;
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::http::HeaderValue;

    fn request(
        method: &str,
        uri: &str,
        headers: &[(&'static str, &str)],
    ) -> (Method, Uri, HeaderMap) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        (method.parse().unwrap(), uri.parse().unwrap(), map)
    }

    fn rule(matches: Vec<RequestMatch>) -> Rule {
        Rule {
            matches,
            filters: Vec::new(),
            backends: Distribution::Empty,
            timeouts: Timeouts::default(),
            retry: None,
            allow_l5d_request_headers: false,
        }
    }

    fn route(hosts: Vec<Host>, rules: Vec<Rule>) -> Route {
        Route {
            labels: Labels::default(),
            hosts,
            rules,
        }
    }

    fn prefix(path: &str) -> RequestMatch {
        RequestMatch {
            path: route_match::PathRule::Prefix(path.into()),
            ..RequestMatch::default()
        }
    }

    fn exact(path: &str) -> RequestMatch {
        RequestMatch {
            path: route_match::PathRule::Exact(path.into()),
            ..RequestMatch::default()
        }
    }

    fn with_header(mut m: RequestMatch, name: &str, value: &str) -> RequestMatch {
        m.headers.push((name.into(), value.as_bytes().to_vec()));
        m
    }

    #[test]
    fn the_most_specific_rule_wins_and_ties_go_to_the_earlier() {
        let table = RouteTable {
            routes: vec![
                route(
                    Vec::new(),
                    vec![rule(vec![prefix("/")]), rule(vec![prefix("/api")])],
                ),
                route(
                    Vec::new(),
                    vec![
                        rule(vec![exact("/api/users")]),
                        rule(vec![with_header(prefix("/api"), "x-canary", "1")]),
                        rule(vec![prefix("/api")]),
                    ],
                ),
            ],
            ..RouteTable::default()
        };
        // (path, headers, the route and rule taken)
        type Case = (
            &'static str,
            &'static [(&'static str, &'static str)],
            Option<(usize, usize)>,
        );
        let cases: &[Case] = &[
            ("/", &[], Some((0, 0))),
            ("/other", &[], Some((0, 0))),
            // A longer prefix over a shorter; equal ones: the earlier route.
            ("/api/orders", &[], Some((0, 1))),
            // An exact path over any prefix.
            ("/api/users", &[], Some((1, 0))),
            // More headers over fewer, with the same prefix.
            ("/api/orders", &[("x-canary", "1")], Some((1, 1))),
            ("/api/orders", &[("x-canary", "2")], Some((0, 1))),
        ];
        for (path, headers, expected) in cases {
            let (method, uri, headers) = request("GET", path, headers);
            let selected = select(&table, &method, &uri, &headers, Some("web.example.com"));
            assert_eq!(
                selected.map(|s| (s.route, s.rule)),
                *expected,
                "{path} {headers:?}"
            );
        }
    }

    #[test]
    fn a_route_for_the_requests_host_beats_one_for_any_host() {
        let exact_host = Host::Exact("web.example.com".into());
        let wildcard = Host::Suffix(".example.com".into());
        let table = RouteTable {
            routes: vec![
                route(Vec::new(), vec![rule(vec![exact("/x")])]),
                route(vec![wildcard.clone()], vec![rule(vec![prefix("/")])]),
                route(vec![exact_host], vec![rule(vec![prefix("/")])]),
            ],
            ..RouteTable::default()
        };
        let cases = [
            (Some("web.example.com"), Some(2)),
            (Some("WEB.example.com:8080"), Some(2)),
            (Some("api.example.com"), Some(1)),
            // Only the route without hosts applies, and only to its path.
            (Some("example.org"), None),
            (None, None),
        ];
        for (authority, expected) in cases {
            let (method, uri, headers) = request("GET", "/y", &[]);
            let selected = select(&table, &method, &uri, &headers, authority);
            assert_eq!(selected.map(|s| s.route), expected, "{authority:?}");
        }
        let (method, uri, headers) = request("GET", "/x", &[]);
        let selected = select(&table, &method, &uri, &headers, Some("example.org"));
        assert_eq!(selected, Some(Selected { route: 0, rule: 0 }));
    }

    #[test]
    fn a_rule_is_found_by_any_of_its_matches_paths() {
        let pattern = RequestMatch {
            path: route_match::PathRule::Regex(route_match::Pattern::new("/v[0-9]+/.*").unwrap()),
            ..RequestMatch::default()
        };
        let table = RouteTable {
            routes: vec![
                route(Vec::new(), vec![rule(vec![prefix("/a"), exact("/b")])]),
                route(
                    Vec::new(),
                    vec![rule(vec![pattern]), rule(vec![prefix("/")])],
                ),
                route(Vec::new(), vec![rule(vec![prefix("/c/")])]),
            ],
            ..RouteTable::default()
        };
        let cases = [
            ("/a/x", Some((0, 0))),
            // The first match's path does not fit; the second's does.
            ("/b", Some((0, 0))),
            ("/b/x", Some((1, 1))),
            ("/v2/items", Some((1, 0))),
            // A prefix with a trailing slash matches as without it.
            ("/c", Some((2, 0))),
            ("/cd", Some((1, 1))),
            ("/c/", Some((2, 0))),
            ("/c/d/e", Some((2, 0))),
            // Shorter or longer than a path, or only sharing its length, it does not fit.
            ("/", Some((1, 1))),
            ("/ax", Some((1, 1))),
            ("/bb", Some((1, 1))),
            ("/x", Some((1, 1))),
        ];
        for (path, expected) in cases {
            let (method, uri, headers) = request("GET", path, &[]);
            // The table's gates are made on its first request and kept.
            for _ in 0..2 {
                let selected = select(&table, &method, &uri, &headers, None);
                assert_eq!(selected.map(|s| (s.route, s.rule)), expected, "{path}");
            }
        }
    }

    #[test]
    fn ties_go_to_the_earlier_rule_whatever_its_paths_length() {
        let pattern = |source| RequestMatch {
            path: route_match::PathRule::Regex(route_match::Pattern::new(source).unwrap()),
            ..RequestMatch::default()
        };
        // A pattern that matched the whole path ranks as a prefix as long as the path:
        // its gate is read first (it has no path of its own), its rule may still lose.
        let table = RouteTable {
            routes: vec![
                route(Vec::new(), vec![rule(vec![prefix("/abc")])]),
                route(Vec::new(), vec![rule(vec![pattern("/ab.")])]),
                route(Vec::new(), vec![rule(vec![pattern("/x.*")])]),
                route(Vec::new(), vec![rule(vec![prefix("/xyz")])]),
                route(Vec::new(), vec![rule(Vec::new())]),
                route(Vec::new(), vec![rule(Vec::new())]),
            ],
            ..RouteTable::default()
        };
        let cases = [
            ("/abc", Some(0)),
            ("/abd", Some(1)),
            ("/xyz", Some(2)),
            ("/xyz/1", Some(2)),
            // Both catch-alls match; the first is taken.
            ("/", Some(4)),
        ];
        for (path, expected) in cases {
            let (method, uri, headers) = request("GET", path, &[]);
            let selected = select(&table, &method, &uri, &headers, None);
            assert_eq!(selected.map(|s| s.route), expected, "{path}");
        }
    }

    #[test]
    fn a_table_names_hosts_when_any_route_does() {
        let anywhere = route(Vec::new(), vec![rule(Vec::new())]);
        let mut table = RouteTable {
            routes: vec![anywhere.clone(), anywhere.clone()],
            ..RouteTable::default()
        };
        assert!(!table.names_hosts());
        assert!(!RouteTable::default().names_hosts());
        table.routes[1].hosts = vec![Host::Exact("web.example.com".into())];
        // A changed table is a new one: its gates are made again (as a clone's are).
        assert!(table.clone().names_hosts());
    }

    #[test]
    fn no_route_no_rule() {
        let (method, uri, headers) = request("GET", "/", &[]);
        assert_eq!(
            select(&RouteTable::default(), &method, &uri, &headers, None),
            None
        );
        let unsupported = RequestMatch {
            unsupported: true,
            ..RequestMatch::default()
        };
        let table = RouteTable {
            routes: vec![route(Vec::new(), vec![rule(vec![unsupported])])],
            ..RouteTable::default()
        };
        assert_eq!(select(&table, &method, &uri, &headers, None), None);
        // A rule without matches takes everything.
        let table = RouteTable {
            routes: vec![route(Vec::new(), vec![rule(Vec::new())])],
            ..RouteTable::default()
        };
        assert!(select(&table, &method, &uri, &headers, None).is_some());
    }

    #[test]
    fn weighted_picks_follow_the_weights() {
        let cases: &[(&[u32], u32, Option<usize>)] = &[
            (&[], 0, None),
            (&[0, 0], 12345, None),
            (&[1], u32::MAX, Some(0)),
            (&[90, 10], 0, Some(0)),
            (&[90, 10], u32::MAX, Some(1)),
            (&[0, 5, 0], 7, Some(1)),
        ];
        for (weights, draw, expected) in cases {
            assert_eq!(
                pick_weighted(weights, *draw),
                *expected,
                "{weights:?} {draw}"
            );
        }
        // Over draws spread evenly across the range (the middle of each thousandth),
        // each backend takes its weight's share.
        let weights = [90, 10];
        let mut counts = [0u32; 2];
        for step in 0..1000u64 {
            let draw = (((2 * step + 1) << 31) / 1000) as u32;
            counts[pick_weighted(&weights, draw).unwrap()] += 1;
        }
        assert_eq!(counts, [900, 100]);
    }

    #[test]
    fn policies_read_into_routes() {
        use ob::http_route::{distribution, Distribution as PbDistribution, Filter as PbFilter};
        let status_range = ob::http_route::retry::conditions::StatusRange {
            start: 500,
            end: 504,
        };
        let backend = |weight| ob::http_route::WeightedRouteBackend {
            backend: Some(ob::http_route::RouteBackend {
                backend: Some(ob::Backend {
                    metadata: None,
                    kind: None,
                    queue: None,
                }),
                filters: Vec::new(),
                ..Default::default()
            }),
            weight,
        };
        let seconds = |s| prost_types::Duration {
            seconds: s,
            nanos: 0,
        };
        let policy = ob::HttpRoute {
            metadata: None,
            hosts: Vec::new(),
            rules: vec![ob::http_route::Rule {
                matches: Vec::new(),
                filters: vec![
                    PbFilter {
                        kind: Some(ob::http_route::filter::Kind::FailureInjector(
                            hr::HttpFailureInjector {
                                status: 503,
                                message: "injected".into(),
                                ratio: Some(hr::Ratio {
                                    numerator: 1,
                                    denominator: 10,
                                }),
                            },
                        )),
                    },
                    PbFilter {
                        kind: Some(ob::http_route::filter::Kind::Redirect(
                            hr::RequestRedirect {
                                host: "other.example.com".into(),
                                ..Default::default()
                            },
                        )),
                    },
                    PbFilter { kind: None },
                ],
                backends: Some(PbDistribution {
                    kind: Some(distribution::Kind::RandomAvailable(
                        distribution::RandomAvailable {
                            backends: vec![backend(90), backend(10)],
                        },
                    )),
                }),
                timeouts: Some(hr::Timeouts {
                    request: Some(seconds(5)),
                    response: None,
                    idle: Some(seconds(0)),
                }),
                retry: Some(ob::http_route::Retry {
                    max_retries: 3,
                    max_request_bytes: 64 * 1024,
                    conditions: Some(ob::http_route::retry::Conditions {
                        status_ranges: vec![
                            status_range,
                            ob::http_route::retry::conditions::StatusRange {
                                start: 600,
                                end: 500,
                            },
                        ],
                    }),
                    timeout: Some(seconds(1)),
                    backoff: None,
                }),
                ..Default::default()
            }],
        };
        let target = "10.96.0.1:80".parse().unwrap();
        let table = read_http_routes(&[policy], &Labels::default(), target);
        let rule = &table.routes[0].rules[0];
        assert_eq!(
            rule.filters,
            vec![
                Filter::FailureInjector {
                    status: Failure::Http(503),
                    message: "injected".into(),
                    ratio: Ratio {
                        numerator: 1,
                        denominator: 10
                    },
                },
                Filter::Redirect(Redirect {
                    scheme: None,
                    host: Some("other.example.com".into()),
                    path: None,
                    port: None,
                    status: 301,
                }),
                Filter::Invalid,
            ]
        );
        let Distribution::RandomAvailable(backends) = &rule.backends else {
            panic!("a split: {:?}", rule.backends);
        };
        assert_eq!(
            backends.iter().map(|(_, w)| *w).collect::<Vec<_>>(),
            [90, 10]
        );
        // A backend the policy leaves without a kind is refused, as linkerd2-proxy does.
        assert!(matches!(backends[0].0.backend, BackendSpec::Refused(_)));
        assert_eq!(
            rule.timeouts,
            Timeouts {
                request: Some(Duration::from_secs(5)),
                response: None,
                idle: None,
            }
        );
        let retry = rule.retry.as_ref().expect("a retry policy");
        assert_eq!(retry.on, RetryOn::HttpStatuses(vec![500..=504]));
        assert_eq!(retry.timeout, Some(Duration::from_secs(1)));
        assert_eq!((retry.max_retries, retry.max_request_bytes), (3, 64 * 1024));
    }
}
