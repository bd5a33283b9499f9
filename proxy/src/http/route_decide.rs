//! The per-request decisions of an outbound route, as pure functions of the rule, the
//! request and random draws: what its filters do, which backend it goes to, whether
//! its response is retried and after how long, and whether an endpoint's response is
//! a failure for failure accrual. `routed.rs` executes them.

use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::Uri;

use super::errors::ErrorKind;
use crate::discover::outbound_routes::{
    retry_grpc_item, retry_status_item, Backoff, Distribution, Failure, Filter, HeaderChanges,
    PathChange, Redirect, Retry, RetryOn, RouteBackend, Timeouts,
};

/// A response the proxy makes instead of sending the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Synthetic {
    /// A failure injector fired.
    Injected { failure: Failure, message: String },
    /// A redirect: `status` with `location`.
    Redirect { status: u16, location: String },
    /// The proxy's own error.
    Error(ErrorKind),
}

/// Applies `filters` to a request's headers, in order: header changes are made; the
/// first failure injector that fires or redirect that applies answers the request.
/// `draw` gives a uniform `u32` per injector; `matched_prefix` is the length of the
/// path prefix the rule matched, if it matched by prefix (a redirect replaces it).
pub fn request_filters(
    filters: &[Filter],
    headers: &mut HeaderMap,
    uri: &Uri,
    authority: Option<&str>,
    matched_prefix: Option<usize>,
    draw: &mut impl FnMut() -> u32,
) -> Result<(), Synthetic> {
    for filter in filters {
        match filter {
            Filter::FailureInjector {
                status,
                message,
                ratio,
            } => {
                if fires(ratio.numerator, ratio.denominator, draw()) {
                    return Err(Synthetic::Injected {
                        failure: *status,
                        message: message.clone(),
                    });
                }
            }
            Filter::RequestHeaders(changes) => change_headers(changes, headers),
            Filter::ResponseHeaders(_) => {}
            Filter::Redirect(redirect) => {
                match redirect_location(redirect, uri, authority, matched_prefix) {
                    Ok(Some(location)) => {
                        return Err(Synthetic::Redirect {
                            status: redirect.status,
                            location,
                        })
                    }
                    Ok(None) => {}
                    Err(NoPrefixMatched) => return Err(Synthetic::Error(ErrorKind::InvalidRoute)),
                }
            }
            Filter::Invalid => return Err(Synthetic::Error(ErrorKind::InvalidRoute)),
        }
    }
    Ok(())
}

/// Applies `filters`' response header changes.
pub fn response_filters(filters: &[Filter], headers: &mut HeaderMap) {
    for filter in filters {
        if let Filter::ResponseHeaders(changes) = filter {
            change_headers(changes, headers);
        }
    }
}

/// `numerator` of every `denominator` draws fire (a zero denominator: none).
fn fires(numerator: u32, denominator: u32, draw: u32) -> bool {
    denominator != 0 && (u64::from(draw) * u64::from(denominator)) >> 32 < u64::from(numerator)
}

/// Adds, then sets, then removes, as Gateway API's header modifier does. A name or
/// value the policy gave that HTTP does not allow is skipped.
fn change_headers(changes: &HeaderChanges, headers: &mut HeaderMap) {
    let pair = |(name, value): &(String, Vec<u8>)| {
        Some((
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_bytes(value).ok()?,
        ))
    };
    for (name, value) in changes.add.iter().filter_map(pair) {
        headers.append(name, value);
    }
    for (name, value) in changes.set.iter().filter_map(pair) {
        headers.insert(name, value);
    }
    for name in &changes.remove {
        headers.remove(name.as_str());
    }
}

/// A redirect asked to replace the path prefix of a request its rule did not match
/// by prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoPrefixMatched;

/// Where a redirect sends the request; `Ok(None)` when that is where it is already
/// (the filter is skipped, as in linkerd2-proxy).
pub fn redirect_location(
    redirect: &Redirect,
    uri: &Uri,
    authority: Option<&str>,
    matched_prefix: Option<usize>,
) -> Result<Option<String>, NoPrefixMatched> {
    let scheme = redirect
        .scheme
        .as_deref()
        .or(uri.scheme_str())
        .unwrap_or("http");
    let authority = authority.unwrap_or("");
    let (request_host, request_port) = split_authority(authority);
    let default_port = |scheme: &str| match scheme {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    let host = redirect.host.as_deref().unwrap_or(request_host);
    let port = redirect.port.or(request_port);
    let host_port = match port {
        Some(port) if Some(port) != default_port(scheme) => format!("{host}:{port}"),
        _ => host.to_string(),
    };
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = match &redirect.path {
        None => path_and_query.to_string(),
        Some(PathChange::Full(path)) => path.clone(),
        Some(PathChange::Prefix(prefix)) => {
            let matched = matched_prefix.ok_or(NoPrefixMatched)?;
            let rest = path_and_query.get(matched..).unwrap_or("");
            let joined = match (prefix.ends_with('/'), rest.starts_with('/')) {
                (true, true) => format!("{prefix}{}", &rest[1..]),
                (false, false) if !rest.is_empty() && !rest.starts_with('?') => {
                    format!("{prefix}/{rest}")
                }
                _ => format!("{prefix}{rest}"),
            };
            if joined.is_empty() {
                "/".to_string()
            } else {
                joined
            }
        }
    };
    let location = format!("{scheme}://{host_port}{path}");
    let same = uri.scheme_str().unwrap_or("http") == scheme
        && host_port.eq_ignore_ascii_case(authority)
        && path == path_and_query;
    Ok((!same).then_some(location))
}

fn split_authority(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            match port.parse() {
                Ok(port) => (host, Some(port)),
                Err(_) => (authority, None),
            }
        }
        _ => (authority, None),
    }
}

/// The backend a request goes to: the first available one, or one drawn by weight
/// among the available ones (redrawn without a backend that is not). None when no
/// backend is available, or every weight is 0 (which Tandem treats as no backend;
/// linkerd2-proxy fails on it), and the request is shed (503).
pub fn choose_backend<'a>(
    distribution: &'a Distribution,
    available: impl Fn(&RouteBackend) -> bool,
    draw: &mut impl FnMut() -> u32,
) -> Option<&'a RouteBackend> {
    match distribution {
        Distribution::Empty => None,
        Distribution::FirstAvailable(backends) => backends.iter().find(|b| available(b)),
        Distribution::RandomAvailable(backends) => {
            // Weights on the stack for the common split of a few backends.
            let mut weights: smallvec::SmallVec<[u32; 4]> =
                backends.iter().map(|(_, w)| *w).collect();
            loop {
                let index = crate::discover::outbound_routes::pick_weighted(&weights, draw())?;
                let backend = &backends[index].0;
                if available(backend) {
                    return Some(backend);
                }
                weights[index] = 0;
            }
        }
    }
}

/// What ended an attempt, for the retry decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempted {
    /// Response headers came with this status (and gRPC status in them, if any).
    Response { status: u16, grpc: Option<u32> },
    /// The proxy's own failure.
    Error(ErrorKind),
}

/// Whether an attempt's outcome is one the route retries. The proxy's connection
/// failures count as the 502 (gRPC: UNAVAILABLE) they become; fail-fast and a
/// per-try timeout are always retried, as in linkerd2-proxy; timeouts of the whole
/// request, shedding and refusals never are.
pub fn retryable(on: &RetryOn, attempted: Attempted) -> bool {
    let (status, grpc) = match attempted {
        Attempted::Response { status, grpc } => (status, grpc),
        Attempted::Error(ErrorKind::FailFast | ErrorKind::ResponseTimeout) => return true,
        Attempted::Error(kind) if kind.is_dial() || kind == ErrorKind::Upstream => (502, Some(14)),
        Attempted::Error(_) => return false,
    };
    match on {
        RetryOn::HttpStatuses(ranges) => ranges.iter().any(|r| r.contains(&status)),
        RetryOn::GrpcCodes(codes) => grpc.is_some_and(|code| codes.contains(&code)),
    }
}

/// Whether a routed request goes out in one attempt with nothing around it: its rule
/// (after its `l5d-*` headers) has no timeout, and no retry or a request that cannot
/// be retried (an upgrade or `CONNECT`).
pub fn sends_once(retry: Option<&Retry>, timeouts: &Timeouts, upgrade: bool) -> bool {
    let retries = retry.is_some() && !upgrade;
    !retries && *timeouts == Timeouts::default()
}

/// How long to wait before retry `retry` (1 for the first), `jitter` in [0, 1); no
/// backoff: at once.
pub fn retry_delay(backoff: Option<&Backoff>, retry: u32, jitter: f64) -> Duration {
    backoff.map_or(Duration::ZERO, |b| b.jittered(retry, jitter).min(b.max))
}

/// A request's retry and timeouts after its `l5d-*` headers.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestPolicy {
    pub retry: Option<Retry>,
    pub timeouts: Timeouts,
}

const L5D_RETRY_HTTP: &str = "l5d-retry-http";
const L5D_RETRY_GRPC: &str = "l5d-retry-grpc";
const L5D_RETRY_LIMIT: &str = "l5d-retry-limit";
const L5D_RETRY_TIMEOUT: &str = "l5d-retry-timeout";
const L5D_TIMEOUT: &str = "l5d-timeout";
const L5D_REQUEST_TIMEOUT: &str = "l5d-request-timeout";
const L5D_RESPONSE_TIMEOUT: &str = "l5d-response-timeout";

/// For a rule that allows them (`allow_l5d_request_headers`), what the request's
/// `l5d-retry-*` and `l5d-*timeout` headers change of its retry and timeouts, as
/// linkerd2-proxy reads them; the headers are removed. None when the request has
/// none (the rule's own policy applies). A value that does not read is ignored; an
/// `l5d-retry-http` or `-grpc` with no valid item retries on nothing of its kind.
pub fn l5d_overrides(
    retry: Option<&Retry>,
    timeouts: &Timeouts,
    grpc: bool,
    headers: &mut HeaderMap,
) -> Option<RequestPolicy> {
    let names = [
        L5D_RETRY_HTTP,
        L5D_RETRY_GRPC,
        L5D_RETRY_LIMIT,
        L5D_RETRY_TIMEOUT,
        L5D_TIMEOUT,
        L5D_REQUEST_TIMEOUT,
        L5D_RESPONSE_TIMEOUT,
    ];
    if !names.iter().any(|n| headers.contains_key(*n)) {
        return None;
    }
    let text = |headers: &HeaderMap, name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_http = text(headers, L5D_RETRY_HTTP).map(|v| l5d_statuses(&v));
    let retry_grpc = text(headers, L5D_RETRY_GRPC).map(|v| l5d_grpc_codes(&v));
    let limit = text(headers, L5D_RETRY_LIMIT).and_then(|v| v.trim().parse().ok());
    let retry_timeout = text(headers, L5D_RETRY_TIMEOUT).and_then(|v| l5d_duration(&v));
    let request_timeout = text(headers, L5D_REQUEST_TIMEOUT)
        .and_then(|v| l5d_duration(&v))
        .or_else(|| text(headers, L5D_TIMEOUT).and_then(|v| l5d_duration(&v)));
    let response_timeout = text(headers, L5D_RESPONSE_TIMEOUT).and_then(|v| l5d_duration(&v));
    for name in names {
        headers.remove(name);
    }
    let asks_retry =
        retry_http.is_some() || retry_grpc.is_some() || limit.is_some() || retry_timeout.is_some();
    let retry = match (retry, asks_retry) {
        (retry, false) => retry.cloned(),
        (base, true) => {
            let mut retry = base.cloned().unwrap_or_else(|| Retry {
                on: if grpc {
                    RetryOn::GrpcCodes(Vec::new())
                } else {
                    RetryOn::HttpStatuses(Vec::new())
                },
                ..Retry::default()
            });
            match (&mut retry.on, retry_http, retry_grpc) {
                (RetryOn::HttpStatuses(ranges), Some(asked), _) => *ranges = asked,
                (RetryOn::GrpcCodes(codes), _, Some(asked)) => *codes = asked,
                _ => {}
            }
            if let Some(limit) = limit {
                retry.max_retries = limit;
            }
            if let Some(timeout) = retry_timeout {
                retry.timeout = Some(timeout).filter(|t| !t.is_zero());
            }
            Some(retry)
        }
    };
    let timeouts = Timeouts {
        request: request_timeout.map_or(timeouts.request, |t| Some(t).filter(|t| !t.is_zero())),
        response: response_timeout.map_or(timeouts.response, |t| Some(t).filter(|t| !t.is_zero())),
        idle: timeouts.idle,
    };
    Some(RequestPolicy { retry, timeouts })
}

/// `l5d-retry-http`, as linkerd2-proxy reads it: no whitespace trimmed, items that do
/// not read dropped.
fn l5d_statuses(text: &str) -> Vec<std::ops::RangeInclusive<u16>> {
    text.split(',').filter_map(retry_status_item).collect()
}

fn l5d_grpc_codes(text: &str) -> Vec<u32> {
    text.split(',').filter_map(retry_grpc_item).collect()
}

/// `<integer><unit>` with `ms`, `s`, `m`, `h` or `d`, or `0`.
fn l5d_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number.checked_mul(unit_ms).map(Duration::from_millis)
}

/// The gRPC statuses Linkerd classifies as failures: UNKNOWN, DEADLINE_EXCEEDED,
/// PERMISSION_DENIED, INTERNAL, UNAVAILABLE, DATA_LOSS.
const GRPC_FAILURES: [u32; 6] = [2, 4, 7, 13, 14, 15];

/// Whether a response is a failure, for failure accrual: an error, a 5xx, or (for
/// gRPC) a failing gRPC status; a gRPC response without a status is a success.
pub fn is_failure(status: Option<u16>, grpc: Option<u32>, error: bool) -> bool {
    error
        || status.is_none_or(|s| s >= 500)
        || grpc.is_some_and(|code| GRPC_FAILURES.contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::linkerd::translate::BackendSpec;
    use crate::discover::outbound_routes::Ratio;
    use crate::discover::Labels;

    fn redirect(
        scheme: Option<&str>,
        host: Option<&str>,
        port: Option<u16>,
        path: Option<PathChange>,
    ) -> Redirect {
        Redirect {
            scheme: scheme.map(Into::into),
            host: host.map(Into::into),
            path,
            port,
            status: 302,
        }
    }

    #[test]
    fn a_request_goes_out_once_without_retries_or_timeouts() {
        let retry = Retry::default();
        let second = Some(Duration::from_secs(1));
        let timeouts = |request, response, idle| Timeouts {
            request,
            response,
            idle,
        };
        let cases = [
            (None, timeouts(None, None, None), false, true),
            (Some(&retry), timeouts(None, None, None), false, false),
            // An upgrade is never retried: its retry policy does not count.
            (Some(&retry), timeouts(None, None, None), true, true),
            (None, timeouts(second, None, None), false, false),
            (None, timeouts(None, second, None), false, false),
            (None, timeouts(None, None, second), true, false),
        ];
        for (retry, timeouts, upgrade, once) in cases {
            assert_eq!(
                sends_once(retry, &timeouts, upgrade),
                once,
                "{retry:?} {timeouts:?} upgrade {upgrade}"
            );
        }
    }

    #[test]
    fn redirects_build_their_location_as_gateway_api_says() {
        type Row = (
            Redirect,
            &'static str,
            Option<usize>,
            Result<Option<&'static str>, NoPrefixMatched>,
        );
        let rows: Vec<Row> = vec![
            // Host only: the request's path and query stay.
            (
                redirect(None, Some("new.example"), None, None),
                "/a/b?x=1",
                None,
                Ok(Some("http://new.example/a/b?x=1")),
            ),
            // A port that is the scheme's default is left out.
            (
                redirect(Some("https"), None, Some(443), None),
                "/",
                None,
                Ok(Some("https://web/")),
            ),
            (
                redirect(None, None, Some(8080), Some(PathChange::Full("/v2".into()))),
                "/v1?q",
                None,
                Ok(Some("http://web:8080/v2")),
            ),
            // The matched prefix is replaced; the rest and the query stay.
            (
                redirect(None, None, None, Some(PathChange::Prefix("/v2".into()))),
                "/v1/users?id=7",
                Some(3),
                Ok(Some("http://web/v2/users?id=7")),
            ),
            (
                redirect(None, None, None, Some(PathChange::Prefix("/".into()))),
                "/v1/users",
                Some(3),
                Ok(Some("http://web/users")),
            ),
            // Prefix replacement without a prefix match cannot be made.
            (
                redirect(None, None, None, Some(PathChange::Prefix("/v2".into()))),
                "/v1",
                None,
                Err(NoPrefixMatched),
            ),
            // A redirect to where the request already is, is skipped.
            (
                redirect(None, Some("web"), None, None),
                "/x",
                None,
                Ok(None),
            ),
        ];
        for (redirect, path, prefix, expected) in rows {
            let uri: Uri = path.parse().unwrap();
            let got = redirect_location(&redirect, &uri, Some("web"), prefix);
            assert_eq!(
                got,
                expected.map(|o| o.map(String::from)),
                "{redirect:?} {path}"
            );
        }
    }

    #[test]
    fn filters_change_headers_inject_failures_and_redirect_in_order() {
        let changes = HeaderChanges {
            add: vec![
                ("x-added".into(), b"1".to_vec()),
                ("x-kept".into(), b"2".to_vec()),
            ],
            set: vec![("x-set".into(), b"new".to_vec())],
            remove: vec!["x-gone".into()],
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-kept", HeaderValue::from_static("1"));
        headers.insert("x-set", HeaderValue::from_static("old"));
        headers.insert("x-gone", HeaderValue::from_static("1"));
        let uri: Uri = "/".parse().unwrap();
        let filters = [Filter::RequestHeaders(changes)];
        assert_eq!(
            request_filters(&filters, &mut headers, &uri, Some("web"), None, &mut || 0),
            Ok(())
        );
        assert_eq!(headers.get_all("x-kept").iter().count(), 2);
        assert_eq!(headers["x-set"], "new");
        assert!(!headers.contains_key("x-gone"));
        assert_eq!(headers["x-added"], "1");

        let inject = |numerator, denominator| Filter::FailureInjector {
            status: Failure::Http(503),
            message: "injected".into(),
            ratio: Ratio {
                numerator,
                denominator,
            },
        };
        let injected = Err(Synthetic::Injected {
            failure: Failure::Http(503),
            message: "injected".into(),
        });
        // (numerator, denominator, draw, fires)
        for (n, d, draw, fire) in [
            (1, 1, u32::MAX, true),
            (0, 1, 0, false),
            (1, 2, 0, true),
            (1, 2, u32::MAX / 2 + 1, false),
            (1, 0, 0, false),
        ] {
            let got = request_filters(&[inject(n, d)], &mut headers, &uri, None, None, &mut || {
                draw
            });
            let expected = if fire { injected.clone() } else { Ok(()) };
            assert_eq!(got, expected, "{n}/{d} at {draw}");
        }
        // An invalid filter fails the request; nothing after a firing filter runs.
        assert_eq!(
            request_filters(
                &[Filter::Invalid],
                &mut headers,
                &uri,
                None,
                None,
                &mut || 0
            ),
            Err(Synthetic::Error(ErrorKind::InvalidRoute))
        );
    }

    fn backend(slot: usize) -> RouteBackend {
        RouteBackend {
            backend: BackendSpec::Fallback,
            labels: Labels::default(),
            filters: Vec::new(),
            slot,
        }
    }

    #[test]
    fn backends_are_chosen_among_the_available() {
        let first = Distribution::FirstAvailable(vec![backend(0), backend(1)]);
        let pick = |d: &Distribution, up: &[usize], draws: &[u32]| {
            let mut draws = draws.iter().copied();
            choose_backend(d, |b| up.contains(&b.slot), &mut || {
                draws.next().unwrap_or(0)
            })
            .map(|b| b.slot)
        };
        assert_eq!(pick(&first, &[0, 1], &[]), Some(0));
        assert_eq!(pick(&first, &[1], &[]), Some(1));
        assert_eq!(pick(&first, &[], &[]), None);
        let split = Distribution::RandomAvailable(vec![(backend(0), 90), (backend(1), 10)]);
        assert_eq!(pick(&split, &[0, 1], &[0]), Some(0));
        assert_eq!(pick(&split, &[0, 1], &[u32::MAX]), Some(1));
        // The draw lands on an unavailable backend: the other is drawn.
        assert_eq!(pick(&split, &[1], &[0, 0]), Some(1));
        assert_eq!(pick(&split, &[], &[0, 0]), None);
        let zero = Distribution::RandomAvailable(vec![(backend(0), 0), (backend(1), 0)]);
        assert_eq!(pick(&zero, &[0, 1], &[0]), None);
        assert_eq!(pick(&Distribution::Empty, &[0], &[0]), None);
    }

    #[test]
    fn retry_conditions() {
        let http = RetryOn::HttpStatuses(vec![500..=504]);
        let grpc = RetryOn::GrpcCodes(vec![14]);
        let response = |status, grpc| Attempted::Response { status, grpc };
        // (conditions, outcome, retried)
        let rows = [
            (&http, response(503, None), true),
            (&http, response(404, None), false),
            (&http, response(200, Some(14)), false),
            (&grpc, response(200, Some(14)), true),
            (&grpc, response(200, Some(5)), false),
            (&grpc, response(503, None), false),
            (&http, Attempted::Error(ErrorKind::ConnectRefused), true),
            (&grpc, Attempted::Error(ErrorKind::Upstream), true),
            (&http, Attempted::Error(ErrorKind::FailFast), true),
            (&http, Attempted::Error(ErrorKind::ResponseTimeout), true),
            (&http, Attempted::Error(ErrorKind::RequestTimeout), false),
            (&http, Attempted::Error(ErrorKind::LoadShed), false),
            (
                &RetryOn::HttpStatuses(Vec::new()),
                response(500, None),
                false,
            ),
        ];
        for (on, attempted, expected) in rows {
            assert_eq!(retryable(on, attempted), expected, "{on:?} {attempted:?}");
        }
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_maximum() {
        let backoff = Backoff {
            min: Duration::from_millis(25),
            max: Duration::from_millis(250),
            jitter: 1.0,
        };
        let ms = |retry, jitter| retry_delay(Some(&backoff), retry, jitter).as_millis();
        assert_eq!(ms(1, 0.0), 25);
        assert_eq!(ms(2, 0.0), 50);
        assert_eq!(ms(3, 0.5), 150);
        assert_eq!(ms(5, 0.0), 250);
        assert_eq!(ms(5, 0.99), 250);
        assert_eq!(retry_delay(None, 3, 0.5), Duration::ZERO);
    }

    #[test]
    fn l5d_headers_override_the_rules_retry_and_timeouts() {
        let base = Retry {
            max_retries: 2,
            on: RetryOn::HttpStatuses(vec![503..=503]),
            ..Retry::default()
        };
        let timeouts = Timeouts {
            request: Some(Duration::from_secs(10)),
            ..Timeouts::default()
        };
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (n, v) in pairs {
                map.insert(*n, HeaderValue::from_static(v));
            }
            map
        };
        let run = |pairs: &[(&'static str, &'static str)], retry: Option<&Retry>, grpc| {
            let mut map = headers(pairs);
            let policy = l5d_overrides(retry, &timeouts, grpc, &mut map);
            assert!(
                map.keys().all(|k| !k.as_str().starts_with("l5d-")),
                "removed: {map:?}"
            );
            policy
        };
        // None present: the rule's own.
        assert_eq!(run(&[("x-other", "1")], Some(&base), false), None);
        // Each header overrides its field.
        let policy = run(
            &[
                ("l5d-retry-http", "5xx,429,bad"),
                ("l5d-retry-limit", "5"),
                ("l5d-timeout", "2s"),
            ],
            Some(&base),
            false,
        )
        .unwrap();
        let retry = policy.retry.unwrap();
        assert_eq!(retry.on, RetryOn::HttpStatuses(vec![500..=599, 429..=429]));
        assert_eq!(retry.max_retries, 5);
        assert_eq!(policy.timeouts.request, Some(Duration::from_secs(2)));
        // `l5d-request-timeout` wins over `l5d-timeout`; 0 turns a timeout off.
        let policy = run(
            &[
                ("l5d-timeout", "2s"),
                ("l5d-request-timeout", "0"),
                ("l5d-response-timeout", "150ms"),
            ],
            Some(&base),
            false,
        )
        .unwrap();
        assert_eq!(policy.timeouts.request, None);
        assert_eq!(policy.timeouts.response, Some(Duration::from_millis(150)));
        assert_eq!(policy.retry.as_ref(), Some(&base));
        // Without a route retry, a header makes one from Linkerd's defaults.
        let policy = run(&[("l5d-retry-grpc", "unavailable,internal")], None, true).unwrap();
        let retry = policy.retry.unwrap();
        assert_eq!(retry.on, RetryOn::GrpcCodes(vec![14, 13]));
        assert_eq!((retry.max_retries, retry.max_request_bytes), (1, 64 * 1024));
        // A value that does not read is ignored; a retry list with nothing valid
        // retries on nothing.
        let policy = run(
            &[("l5d-retry-limit", "many"), ("l5d-retry-http", " 503")],
            Some(&base),
            false,
        )
        .unwrap();
        let retry = policy.retry.unwrap();
        assert_eq!(
            (retry.max_retries, retry.on),
            (2, RetryOn::HttpStatuses(Vec::new()))
        );
        for (text, ms) in [
            ("0", Some(0)),
            ("15ms", Some(15)),
            ("2m", Some(120_000)),
            ("1.5s", None),
            ("s", None),
            ("3w", None),
        ] {
            assert_eq!(
                l5d_duration(text).map(|d| d.as_millis() as u64),
                ms,
                "{text}"
            );
        }
    }

    #[test]
    fn failures_for_accrual() {
        assert!(is_failure(Some(503), None, false));
        assert!(!is_failure(Some(404), None, false));
        assert!(is_failure(Some(200), None, true));
        assert!(is_failure(None, None, false));
        assert!(is_failure(Some(200), Some(14), false));
        assert!(!is_failure(Some(200), Some(5), false));
        assert!(!is_failure(Some(200), None, false));
    }
}
