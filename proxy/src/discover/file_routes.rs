//! The discovery file's routes: the vocabulary of `OutboundPolicies.Watch` (routes,
//! splits, filters, retries, timeouts, failure accrual) for standalone and VM users,
//! read into the same [`RouteTable`] the control plane's policies become, so one
//! request path executes both. Every mistake is one error line naming where it is.
//!
//! ```yaml
//! backends:                       # named sets of endpoints, beside the destination's
//!   v2: {endpoints: [{addr: 10.42.0.9:8080, identity: web-v2.default...}]}
//! failure_accrual: {consecutive_failures: 5, backoff: {min: 1s, max: 60s}}
//! routes:
//!   - name: canary
//!     hosts: [web.example.com]    # optional; `*.example.com` for a suffix
//!     rules:
//!       - matches: [{path_prefix: /api, headers: {x-canary: "true"}, method: GET},
//!                   {path_regex: "/v[0-9]+/.*"}]
//!         backends: {default: 90, v2: 10}
//!         timeouts: {request: 2s, response: 1s, idle: 30s}
//!         retry: {limit: 2, http_statuses: "500-599", max_request_bytes: 65536,
//!                 timeout: 500ms, backoff: {min: 25ms, max: 250ms, jitter: 1.0}}
//!         filters:
//!           - request_headers: {add: {x-a: "1"}, set: {x-b: "2"}, remove: [x-c]}
//!           - response_headers: {set: {x-route: canary}}
//!           - redirect: {host: new.example.com, path_prefix: /v2, status: 301}
//!           - fail: {status: 503, ratio: 0.1, message: chaos}
//! ```
//!
//! `default` names the destination's own endpoints (or peer). A destination with no
//! `routes` takes every request to them, as before.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::accrual::Accrual;
use super::linkerd::translate::BackendSpec;
use super::outbound_routes::{
    retry_grpc_item, retry_status_item, Backoff, Distribution, Failure, Filter, HeaderChanges,
    PathChange, Ratio, Redirect, Retry, RetryOn, Route, RouteBackend, RouteTable, Rule, Timeouts,
};
use super::route_match::{Host, PathRule, Pattern, RequestMatch};
use super::Labels;

/// The name of the destination's own endpoints among a rule's backends.
pub const DEFAULT_BACKEND: &str = "default";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    name: String,
    #[serde(default)]
    hosts: Vec<String>,
    rules: Vec<FileRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    /// Any of them takes the request; none: every request.
    #[serde(default)]
    matches: Vec<FileMatch>,
    /// Backend name → weight; none: the destination's own endpoints.
    #[serde(default)]
    backends: Option<BTreeMap<String, u32>>,
    #[serde(default)]
    timeouts: Option<FileTimeouts>,
    #[serde(default)]
    retry: Option<FileRetry>,
    #[serde(default)]
    filters: Vec<FileFilter>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMatch {
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    path_exact: Option<String>,
    /// A regular expression the whole path must match.
    #[serde(default)]
    path_regex: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    query: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    response: Option<String>,
    #[serde(default)]
    idle: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetry {
    #[serde(default = "one")]
    limit: u32,
    /// `5xx`, `gateway-error`, `503`, `500-504`, comma-separated.
    #[serde(default)]
    http_statuses: Option<String>,
    /// `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable`, comma-separated.
    #[serde(default)]
    grpc_statuses: Option<String>,
    #[serde(default = "max_request_bytes")]
    max_request_bytes: u32,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    backoff: Option<FileBackoff>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackoff {
    min: String,
    max: String,
    #[serde(default)]
    jitter: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAccrual {
    consecutive_failures: u32,
    backoff: FileBackoff,
}

/// One filter: exactly one of its fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFilter {
    #[serde(default)]
    request_headers: Option<FileHeaderChanges>,
    #[serde(default)]
    response_headers: Option<FileHeaderChanges>,
    #[serde(default)]
    redirect: Option<FileRedirect>,
    #[serde(default)]
    fail: Option<FileFail>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHeaderChanges {
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRedirect {
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default = "moved")]
    status: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFail {
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    grpc_status: Option<u32>,
    #[serde(default = "always")]
    ratio: f64,
    #[serde(default)]
    message: String,
}

fn one() -> u32 {
    1
}

fn max_request_bytes() -> u32 {
    64 * 1024
}

fn moved() -> u16 {
    301
}

fn always() -> f64 {
    1.0
}

/// Reads a destination's routes; `backends` are the names it may split over
/// (besides [`DEFAULT_BACKEND`]). The route backends' `backend_name` label is the
/// backend's name, which the caller resolves.
pub fn read_routes(
    routes: Vec<FileRoute>,
    backends: &[String],
    accrual: Option<FileAccrual>,
    port: u16,
) -> Result<RouteTable, String> {
    let mut slots = 0;
    let mut table = Vec::with_capacity(routes.len());
    for (index, route) in routes.into_iter().enumerate() {
        let at = |why: String| format!("route {} ({}): {why}", index + 1, route.name);
        let hosts = route
            .hosts
            .iter()
            .map(|h| read_host(h))
            .collect::<Result<_, _>>()
            .map_err(at)?;
        if route.rules.is_empty() {
            return Err(at("has no rules".into()));
        }
        let mut rules = Vec::with_capacity(route.rules.len());
        for (r, rule) in route.rules.into_iter().enumerate() {
            let rule = read_rule(rule, backends, port, &mut slots)
                .map_err(|why| at(format!("rule {}: {why}", r + 1)))?;
            rules.push(rule);
        }
        table.push(Route {
            labels: Labels::new([
                ("route_group", ""),
                ("route_kind", "default"),
                ("route_namespace", ""),
                ("route_name", route.name.as_str()),
            ]),
            hosts,
            rules,
        });
    }
    let accrual = accrual
        .map(|a| {
            Ok::<_, String>(Accrual {
                max_failures: a.consecutive_failures,
                success_rate: None,
                backoff: read_backoff(&a.backoff).map_err(|e| format!("failure_accrual: {e}"))?,
            })
        })
        .transpose()?;
    Ok(RouteTable {
        routes: table,
        grpc: false,
        backends: slots,
        accrual,
        gates: Default::default(),
    })
}

fn read_host(host: &str) -> Result<Host, String> {
    let host = host.trim().to_ascii_lowercase();
    match host.strip_prefix("*.") {
        Some(suffix) if !suffix.is_empty() => Ok(Host::Suffix(format!(".{suffix}"))),
        _ if host.is_empty() || host.contains('*') => {
            Err(format!("host {host:?} is not a name or *.suffix"))
        }
        _ => Ok(Host::Exact(host)),
    }
}

fn read_rule(
    rule: FileRule,
    backends: &[String],
    port: u16,
    slots: &mut usize,
) -> Result<Rule, String> {
    let matches = rule
        .matches
        .into_iter()
        .enumerate()
        .map(|(i, m)| read_match(m).map_err(|why| format!("match {}: {why}", i + 1)))
        .collect::<Result<_, _>>()?;
    let weights = rule
        .backends
        .unwrap_or_else(|| BTreeMap::from([(DEFAULT_BACKEND.to_string(), 1)]));
    if weights.is_empty() {
        return Err("backends is empty".into());
    }
    let mut split = Vec::with_capacity(weights.len());
    for (name, weight) in weights {
        if name != DEFAULT_BACKEND && !backends.contains(&name) {
            return Err(format!(
                "backend {name:?} is not one of the destination's backends"
            ));
        }
        let labels = Labels::new([
            ("backend_group", String::new()),
            ("backend_kind", "default".to_string()),
            ("backend_namespace", String::new()),
            ("backend_name", name),
            ("backend_port", port.to_string()),
            ("backend_section_name", String::new()),
        ]);
        let backend = RouteBackend {
            backend: BackendSpec::Fallback,
            labels,
            filters: Vec::new(),
            slot: *slots,
        };
        *slots += 1;
        split.push((backend, weight));
    }
    if split.iter().all(|(_, w)| *w == 0) {
        return Err("every backend weighs 0".into());
    }
    let timeouts = match rule.timeouts {
        None => Timeouts::default(),
        Some(t) => Timeouts {
            request: optional_duration(t.request.as_deref(), "timeouts.request")?,
            response: optional_duration(t.response.as_deref(), "timeouts.response")?,
            idle: optional_duration(t.idle.as_deref(), "timeouts.idle")?,
        },
    };
    let retry = rule.retry.map(read_retry).transpose()?;
    let filters = rule
        .filters
        .into_iter()
        .enumerate()
        .map(|(i, f)| read_filter(f).map_err(|why| format!("filter {}: {why}", i + 1)))
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        matches,
        filters,
        backends: Distribution::RandomAvailable(split),
        timeouts,
        retry,
        allow_l5d_request_headers: false,
    })
}

fn read_match(m: FileMatch) -> Result<RequestMatch, String> {
    let path = match (m.path_prefix, m.path_exact, m.path_regex) {
        (Some(p), None, None) => PathRule::Prefix(absolute(p, "path_prefix")?),
        (None, Some(p), None) => PathRule::Exact(absolute(p, "path_exact")?),
        (None, None, Some(source)) => PathRule::Regex(
            Pattern::new(&source)
                .ok_or_else(|| format!("path_regex {source:?} is not a regular expression"))?,
        ),
        (None, None, None) => PathRule::Any,
        _ => return Err("path_prefix, path_exact and path_regex are exclusive".into()),
    };
    let method = m
        .method
        .map(|method| {
            hyper::Method::from_bytes(method.trim().as_bytes())
                .map_err(|_| format!("method {method:?} is not an HTTP method"))
        })
        .transpose()?;
    let headers = m
        .headers
        .into_iter()
        .map(|(name, value)| header(name, value))
        .collect::<Result<_, _>>()?;
    Ok(RequestMatch {
        path,
        method,
        headers,
        query: m.query.into_iter().collect(),
        ..RequestMatch::default()
    })
}

fn absolute(path: String, what: &str) -> Result<String, String> {
    if path.starts_with('/') {
        Ok(path)
    } else {
        Err(format!("{what} {path:?} does not start with /"))
    }
}

fn header(name: String, value: String) -> Result<(String, Vec<u8>), String> {
    hyper::header::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    hyper::header::HeaderValue::from_str(&value)
        .map_err(|_| format!("the value of {name} is not a header value"))?;
    Ok((name.to_ascii_lowercase(), value.into_bytes()))
}

fn read_retry(retry: FileRetry) -> Result<Retry, String> {
    let on = match (retry.http_statuses, retry.grpc_statuses) {
        (Some(_), Some(_)) => {
            return Err("retry: http_statuses and grpc_statuses are exclusive".into())
        }
        (Some(text), None) => RetryOn::HttpStatuses(read_statuses(&text)?),
        (None, Some(text)) => RetryOn::GrpcCodes(read_grpc_codes(&text)?),
        (None, None) => RetryOn::HttpStatuses(vec![500..=599]),
    };
    Ok(Retry {
        max_retries: retry.limit,
        max_request_bytes: retry.max_request_bytes,
        on,
        timeout: optional_duration(retry.timeout.as_deref(), "retry.timeout")?,
        backoff: retry
            .backoff
            .as_ref()
            .map(read_backoff)
            .transpose()
            .map_err(|e| format!("retry.backoff: {e}"))?,
    })
}

/// `5xx`, `gateway-error`, `503`, `500-504`, comma-separated (Linkerd's
/// `retry.linkerd.io/http` vocabulary).
fn read_statuses(text: &str) -> Result<Vec<std::ops::RangeInclusive<u16>>, String> {
    text.split(',')
        .map(str::trim)
        .map(|item| {
            // Written by hand: spaces around a range's dash are allowed.
            let range = item.split('-').map(str::trim).collect::<Vec<_>>().join("-");
            retry_status_item(&range)
                .ok_or_else(|| format!("retry: {item:?} is not a status, a range or 5xx"))
        })
        .collect()
}

fn read_grpc_codes(text: &str) -> Result<Vec<u32>, String> {
    text.split(',')
        .map(str::trim)
        .map(|item| {
            retry_grpc_item(item).ok_or_else(|| {
                format!(
                    "retry: {:?} is not a retryable gRPC status",
                    item.to_ascii_lowercase()
                )
            })
        })
        .collect()
}

fn read_backoff(backoff: &FileBackoff) -> Result<Backoff, String> {
    let min = duration(&backoff.min, "min")?;
    let max = duration(&backoff.max, "max")?;
    if min > max || max.is_zero() {
        return Err("min must not exceed max, and max must be over 0".into());
    }
    if !(backoff.jitter.is_finite() && (0.0..=100.0).contains(&backoff.jitter)) {
        return Err("jitter must be from 0 to 100".into());
    }
    Ok(Backoff {
        min,
        max,
        jitter: backoff.jitter,
    })
}

fn duration(text: &str, what: &str) -> Result<Duration, String> {
    tandem_identity::env::duration(text.trim()).map_err(|e| format!("{what}: {e}"))
}

fn optional_duration(text: Option<&str>, what: &str) -> Result<Option<Duration>, String> {
    text.map(|t| duration(t, what))
        .transpose()
        .map(|d| d.filter(|d| !d.is_zero()))
}

fn read_filter(filter: FileFilter) -> Result<Filter, String> {
    let FileFilter {
        request_headers,
        response_headers,
        redirect,
        fail,
    } = filter;
    let set = [
        request_headers.is_some(),
        response_headers.is_some(),
        redirect.is_some(),
        fail.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(
            "a filter is one of request_headers, response_headers, redirect or fail".into(),
        );
    }
    Ok(match (request_headers, response_headers, redirect, fail) {
        (Some(changes), ..) => Filter::RequestHeaders(read_changes(changes)?),
        (_, Some(changes), ..) => Filter::ResponseHeaders(read_changes(changes)?),
        (_, _, Some(r), _) => {
            let path = match (r.path, r.path_prefix) {
                (Some(_), Some(_)) => return Err("path and path_prefix are exclusive".into()),
                (Some(p), None) => Some(PathChange::Full(absolute(p, "path")?)),
                (None, Some(p)) => Some(PathChange::Prefix(absolute(p, "path_prefix")?)),
                (None, None) => None,
            };
            if !(300..=399).contains(&r.status) {
                return Err(format!("redirect status {} is not a 3xx", r.status));
            }
            Filter::Redirect(Redirect {
                scheme: r.scheme.map(|s| s.to_ascii_lowercase()),
                host: r.host,
                path,
                port: r.port,
                status: r.status,
            })
        }
        (_, _, _, Some(fail)) => {
            let status = match (fail.status, fail.grpc_status) {
                (Some(s), None) if (100..=599).contains(&s) => Failure::Http(s),
                (None, Some(code)) if code <= 16 => Failure::Grpc(code),
                (None, None) => Failure::Http(500),
                _ => return Err("fail: one of status (100-599) or grpc_status (0-16)".into()),
            };
            if !(fail.ratio.is_finite() && (0.0..=1.0).contains(&fail.ratio)) {
                return Err("fail: ratio must be from 0 to 1".into());
            }
            Filter::FailureInjector {
                status,
                message: fail.message,
                // In millionths: enough for any ratio written by hand.
                ratio: Ratio {
                    numerator: (fail.ratio * 1e6).round() as u32,
                    denominator: 1_000_000,
                },
            }
        }
        (None, None, None, None) => unreachable!("one field is set"),
    })
}

fn read_changes(changes: FileHeaderChanges) -> Result<HeaderChanges, String> {
    let pairs = |map: BTreeMap<String, String>| {
        map.into_iter()
            .map(|(n, v)| header(n, v))
            .collect::<Result<Vec<_>, _>>()
    };
    let remove = changes
        .remove
        .into_iter()
        .map(|name| header(name, String::new()).map(|(n, _)| n))
        .collect::<Result<_, _>>()?;
    Ok(HeaderChanges {
        add: pairs(changes.add)?,
        set: pairs(changes.set)?,
        remove,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(yaml: &str) -> Result<crate::discover::file::Table, String> {
        crate::discover::file::Table::parse(yaml, Path::new("d.yaml"))
    }

    const HEAD: &str = "destinations:\n  - addr: 10.96.0.10\n    ports: 80\n    endpoints: [{addr: 10.0.0.1}]\n    backends:\n      v2: {endpoints: [{addr: 10.0.0.2}]}\n";

    #[test]
    fn a_full_route_reads_into_the_control_planes_vocabulary() {
        let yaml = format!(
            "{HEAD}    failure_accrual: {{consecutive_failures: 5, backoff: {{min: 1s, max: 60s, jitter: 0.5}}}}
    routes:
      - name: canary
        hosts: [web.example.com, '*.web.example.com']
        rules:
          - matches: [{{path_prefix: /api, headers: {{X-Canary: 'true'}}, method: GET}}]
            backends: {{default: 90, v2: 10}}
            timeouts: {{request: 2s, idle: 30s}}
            retry: {{limit: 2, http_statuses: '5xx,429', timeout: 500ms, backoff: {{min: 25ms, max: 250ms, jitter: 1.0}}}}
            filters:
              - request_headers: {{add: {{x-a: '1'}}, remove: [x-c]}}
              - redirect: {{host: new.example.com, path_prefix: /v2, status: 302}}
              - fail: {{status: 503, ratio: 0.25, message: chaos}}
"
        );
        let table = parse(&yaml).unwrap();
        let routes = table.routes_of("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(routes.backends, 2);
        assert_eq!(routes.accrual.map(|a| a.max_failures), Some(5));
        let route = &routes.routes[0];
        assert_eq!(route.labels.get("route_name"), Some("canary"));
        assert_eq!(
            route.hosts,
            [
                Host::Exact("web.example.com".into()),
                Host::Suffix(".web.example.com".into())
            ]
        );
        let rule = &route.rules[0];
        assert_eq!(rule.matches[0].path, PathRule::Prefix("/api".into()));
        assert_eq!(
            rule.matches[0].headers,
            [("x-canary".to_string(), b"true".to_vec())]
        );
        let Distribution::RandomAvailable(split) = &rule.backends else {
            panic!("{:?}", rule.backends);
        };
        let weights: Vec<(Option<&str>, u32)> = split
            .iter()
            .map(|(b, w)| (b.labels.get("backend_name"), *w))
            .collect();
        assert_eq!(weights, [(Some("default"), 90), (Some("v2"), 10)]);
        assert_eq!(rule.timeouts.request, Some(Duration::from_secs(2)));
        let retry = rule.retry.as_ref().unwrap();
        assert_eq!(retry.max_retries, 2);
        assert_eq!(retry.on, RetryOn::HttpStatuses(vec![500..=599, 429..=429]));
        assert_eq!(rule.filters.len(), 3);
        assert!(matches!(
            &rule.filters[2],
            Filter::FailureInjector { status: Failure::Http(503), ratio, .. } if ratio.numerator == 250_000
        ));
    }

    /// Each mistake is one line naming where it is.
    #[test]
    fn mistakes_are_named() {
        let rule = |text: &str| {
            format!("{HEAD}    routes:\n      - name: r\n        rules:\n          - {text}\n")
        };
        let cases = [
            (rule("backends: {v3: 1}"), "route 1 (r): rule 1: backend \"v3\" is not one of the destination's backends"),
            (rule("backends: {default: 0}"), "route 1 (r): rule 1: every backend weighs 0"),
            (rule("matches: [{path_prefix: api}]"), "route 1 (r): rule 1: match 1: path_prefix \"api\" does not start with /"),
            (rule("timeouts: {request: soon}"), "route 1 (r): rule 1: timeouts.request:"),
            (rule("retry: {http_statuses: '600'}"), "route 1 (r): rule 1: retry: \"600\" is not a status, a range or 5xx"),
            (rule("retry: {grpc_statuses: 'maybe'}"), "route 1 (r): rule 1: retry: \"maybe\" is not a retryable gRPC status"),
            (rule("filters: [{fail: {ratio: 2}}]"), "route 1 (r): rule 1: filter 1: fail: ratio must be from 0 to 1"),
            (rule("filters: [{redirect: {status: 200}}]"), "route 1 (r): rule 1: filter 1: redirect status 200 is not a 3xx"),
            (rule("filters: [{request_headers: {set: {'bad name': x}}}]"), "route 1 (r): rule 1: filter 1: \"bad name\" is not a header name"),
            (rule("matches: [{path_regex: '(/'}]"), "route 1 (r): rule 1: match 1: path_regex \"(/\" is not a regular expression"),
            (rule("matches: [{path_prefix: /a, path_exact: /b}]"), "route 1 (r): rule 1: match 1: path_prefix, path_exact and path_regex are exclusive"),
            (rule("matches: [{method: 'G T'}]"), "route 1 (r): rule 1: match 1: method \"G T\" is not an HTTP method"),
            (format!("{HEAD}    routes:\n      - name: r\n        rules: []\n"), "route 1 (r): has no rules"),
            (format!("{HEAD}    routes:\n      - name: r\n        hosts: ['*']\n        rules: [{{}}]\n"), "route 1 (r): host \"*\" is not a name or *.suffix"),
            (format!("{HEAD}    failure_accrual: {{consecutive_failures: 1, backoff: {{min: 2s, max: 1s}}}}\n    routes: []\n"), "failure_accrual: min must not exceed max"),
            (format!("{HEAD}      default: {{endpoints: [{{addr: 10.0.0.3}}]}}\n"), "backend \"default\" names the destination's own endpoints"),
        ];
        for (yaml, expected) in cases {
            let error = parse(&yaml).expect_err(&yaml);
            assert!(
                error.starts_with("destination 1 (10.96.0.10): ") && error.contains(expected),
                "{error}\nexpected: {expected}"
            );
            assert!(!error.contains('\n'), "one line: {error}");
        }
    }
}
