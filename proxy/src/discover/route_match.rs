//! Which route a request takes: Linkerd's route matches (Gateway API's
//! `HTTPRouteMatch` and `GRPCRouteMatch`, as the `linkerd2-proxy-api` crate carries
//! them) read into values, and a pure function that scores a request against them.
//!
//! Used by the inbound policy (a route's authorizations) and by outbound routes.
//! Regular expressions (paths, headers, query parameters) are compiled once, when the
//! policy is read, anchored to the whole value as Gateway API and Linkerd match them,
//! with a bound on their compiled size; one that does not compile makes its match
//! match nothing, so a route that only it would select is not taken (on the inbound
//! side, its requests fall to another route or are refused, never let through).

use hyper::http::{HeaderMap, Method, Uri};
use linkerd2_proxy_api::grpc_route::GrpcRouteMatch;
use linkerd2_proxy_api::http_route::{
    header_match, host_match, path_match, query_param_match, HeaderMatch, HostMatch, HttpRouteMatch,
};

/// A host a route applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Suffix(String),
}

/// One match: every part of it must apply.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RequestMatch {
    pub path: PathRule,
    pub method: Option<Method>,
    /// Headers with exactly these values (names lower-cased).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Headers with a value the pattern matches whole.
    pub header_patterns: Vec<(String, Pattern)>,
    pub query: Vec<(String, String)>,
    pub query_patterns: Vec<(String, Pattern)>,
    /// It needs something that cannot be evaluated (a pattern that does not
    /// compile, a method that is not one): it matches nothing.
    pub unsupported: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum PathRule {
    #[default]
    Any,
    Exact(String),
    Prefix(String),
    Regex(Pattern),
}

/// A regular expression matched against a whole value, compiled once.
#[derive(Clone, Debug)]
pub struct Pattern {
    source: String,
    regex: regex::bytes::Regex,
}

/// The most a pattern from a policy may compile to: any route a person writes fits
/// many times over, and a hostile one cannot take the proxy's memory.
const PATTERN_SIZE_LIMIT: usize = 256 * 1024;

impl Pattern {
    /// Compiles `source` to match whole values; None when it does not compile
    /// within the size limit.
    pub fn new(source: &str) -> Option<Pattern> {
        let regex = regex::bytes::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(PATTERN_SIZE_LIMIT)
            .dfa_size_limit(PATTERN_SIZE_LIMIT)
            .build()
            .ok()?;
        Some(Pattern {
            source: source.to_string(),
            regex,
        })
    }

    pub fn matches(&self, value: &[u8]) -> bool {
        self.regex.is_match(value)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

/// How specific a match was, as Gateway API ranks them: an exact path over a prefix,
/// a longer prefix over a shorter, then a method, then more headers, then more query
/// parameters. Greater is more specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Score {
    path: (u8, usize),
    method: bool,
    headers: usize,
    query: usize,
}

impl RequestMatch {
    /// How specifically this matches the request, if it does.
    pub fn score(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Score> {
        if self.unsupported {
            return None;
        }
        let path = uri.path();
        let path_score = match &self.path {
            PathRule::Any => (0, 0),
            PathRule::Exact(exact) if path == exact => (2, exact.len()),
            PathRule::Prefix(prefix) if prefix_matches(prefix, path) => (1, prefix.len()),
            // Gateway API leaves patterns to the implementation: ranked as linkerd2-proxy
            // ranks them, as long as the path they matched whole (so a pattern beats
            // the catch-all prefix `/`).
            PathRule::Regex(pattern) if pattern.matches(path.as_bytes()) => (1, path.len()),
            _ => return None,
        };
        if self.method.as_ref().is_some_and(|m| m != method) {
            return None;
        }
        let headers_match = self.headers.iter().all(|(name, value)| {
            headers
                .get_all(name.as_str())
                .iter()
                .any(|v| v.as_bytes() == value.as_slice())
        });
        let patterns_match = self.header_patterns.iter().all(|(name, pattern)| {
            headers
                .get_all(name.as_str())
                .iter()
                .any(|v| pattern.matches(v.as_bytes()))
        });
        if !headers_match || !patterns_match {
            return None;
        }
        let query = uri.query().unwrap_or("");
        let query_matches = self.query.iter().all(|(name, value)| {
            query.split('&').any(|pair| {
                let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                n == name && v == value
            })
        });
        let query_patterns_match = self.query_patterns.iter().all(|(name, pattern)| {
            query.split('&').any(|pair| {
                let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                n == name && pattern.matches(v.as_bytes())
            })
        });
        if !query_matches || !query_patterns_match {
            return None;
        }
        Some(Score {
            path: path_score,
            method: self.method.is_some(),
            headers: self.headers.len() + self.header_patterns.len(),
            query: self.query.len() + self.query_patterns.len(),
        })
    }
}

/// A path prefix matches whole segments: `/api` matches `/api` and `/api/x`, not
/// `/apix`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    segments_fit(prefix.trim_end_matches('/').as_bytes(), path.as_bytes())
}

/// Whether `path` begins with the whole segments of `prefix`, a prefix without its
/// trailing slashes.
pub fn segments_fit(prefix: &[u8], path: &[u8]) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest[0] == b'/',
        None => false,
    }
}

/// The score of a rule that names no match, which takes every request: what an
/// empty match scores, known without reading the request.
const CATCH_ALL: Score = Score {
    path: (0, 0),
    method: false,
    headers: 0,
    query: 0,
};

/// The best score of `matches` for a request; no matches at all match everything.
pub fn best_score(
    matches: &[RequestMatch],
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<Score> {
    if matches.is_empty() {
        return Some(CATCH_ALL);
    }
    matches
        .iter()
        .filter_map(|m| m.score(method, uri, headers))
        .max()
}

/// Does a route for `hosts` apply to a request for `authority` (no hosts: any)?
pub fn host_matches(hosts: &[Host], authority: Option<&str>) -> bool {
    if hosts.is_empty() {
        return true;
    }
    let Some(host) = request_host(authority) else {
        return false;
    };
    hosts.iter().any(|pattern| host_is(host, pattern))
}

/// The host a request's authority names, without its port.
pub fn request_host(authority: Option<&str>) -> Option<&[u8]> {
    let authority = authority?;
    let host = authority
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(authority, |(host, _)| host);
    Some(host.as_bytes())
}

/// Whether a request's `host` is the one `pattern` names. Compared without
/// lower-casing a copy: no allocation per request; the routes' hosts are lower-cased
/// when the policy is read.
pub fn host_is(host: &[u8], pattern: &Host) -> bool {
    match pattern {
        Host::Exact(exact) => host.eq_ignore_ascii_case(exact.as_bytes()),
        Host::Suffix(suffix) => {
            let suffix = suffix.as_bytes();
            host.len() >= suffix.len()
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
    }
}

pub fn read_hosts(hosts: &[HostMatch]) -> Vec<Host> {
    hosts
        .iter()
        .filter_map(|h| match h.r#match.as_ref()? {
            host_match::Match::Exact(exact) => Some(Host::Exact(exact.to_ascii_lowercase())),
            host_match::Match::Suffix(suffix) => {
                let mut labels = suffix.reverse_labels.clone();
                labels.reverse();
                Some(Host::Suffix(
                    format!(".{}", labels.join(".")).to_ascii_lowercase(),
                ))
            }
        })
        .collect()
}

/// Header matches (names lower-cased), exact and by pattern; a pattern that does not
/// compile marks the match `unsupported`.
type HeaderMatches = (Vec<(String, Vec<u8>)>, Vec<(String, Pattern)>);

fn read_headers(headers: &[HeaderMatch], unsupported: &mut bool) -> HeaderMatches {
    let mut exact = Vec::new();
    let mut patterns = Vec::new();
    for h in headers {
        let name = h.name.to_ascii_lowercase();
        match h.value.as_ref() {
            Some(header_match::Value::Exact(value)) => exact.push((name, value.clone())),
            Some(header_match::Value::Regex(source)) => match Pattern::new(source) {
                Some(pattern) => patterns.push((name, pattern)),
                None => *unsupported = true,
            },
            None => *unsupported = true,
        }
    }
    (exact, patterns)
}

pub fn read_http_match(m: &HttpRouteMatch) -> RequestMatch {
    let mut unsupported = false;
    let path = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
        None => PathRule::Any,
        Some(path_match::Kind::Exact(exact)) => PathRule::Exact(exact.clone()),
        Some(path_match::Kind::Prefix(prefix)) => PathRule::Prefix(prefix.clone()),
        Some(path_match::Kind::Regex(source)) => match Pattern::new(source) {
            Some(pattern) => PathRule::Regex(pattern),
            None => {
                unsupported = true;
                PathRule::Any
            }
        },
    };
    let method = match m.method.clone() {
        None => None,
        Some(method) => match Method::try_from(method) {
            Ok(method) => Some(method),
            Err(_) => {
                unsupported = true;
                None
            }
        },
    };
    let (headers, header_patterns) = read_headers(&m.headers, &mut unsupported);
    let mut query = Vec::new();
    let mut query_patterns = Vec::new();
    for q in &m.query_params {
        match q.value.as_ref() {
            Some(query_param_match::Value::Exact(value)) => {
                query.push((q.name.clone(), value.clone()))
            }
            Some(query_param_match::Value::Regex(source)) => match Pattern::new(source) {
                Some(pattern) => query_patterns.push((q.name.clone(), pattern)),
                None => unsupported = true,
            },
            None => unsupported = true,
        }
    }
    RequestMatch {
        path,
        method,
        headers,
        header_patterns,
        query,
        query_patterns,
        unsupported,
    }
}

/// A gRPC match is a path match on `/<service>/<method>` (either may be empty: any)
/// of a `POST`, with exact headers.
pub fn read_grpc_match(m: &GrpcRouteMatch) -> RequestMatch {
    let mut unsupported = false;
    let path = match &m.rpc {
        None => PathRule::Any,
        Some(rpc) => match (rpc.service.is_empty(), rpc.method.is_empty()) {
            (true, true) => PathRule::Any,
            (false, false) => PathRule::Exact(format!("/{}/{}", rpc.service, rpc.method)),
            (false, true) => PathRule::Prefix(format!("/{}", rpc.service)),
            // A method of any service: not a path prefix.
            (true, false) => {
                unsupported = true;
                PathRule::Any
            }
        },
    };
    let (headers, header_patterns) = read_headers(&m.headers, &mut unsupported);
    RequestMatch {
        path,
        method: Some(Method::POST),
        headers,
        header_patterns,
        unsupported,
        ..RequestMatch::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> (Method, Uri, HeaderMap) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        (method.parse().unwrap(), uri.parse().unwrap(), map)
    }

    fn exact(path: &str) -> RequestMatch {
        RequestMatch {
            path: PathRule::Exact(path.into()),
            ..Default::default()
        }
    }

    fn prefix(path: &str) -> RequestMatch {
        RequestMatch {
            path: PathRule::Prefix(path.into()),
            ..Default::default()
        }
    }

    #[test]
    fn no_matches_score_what_an_empty_match_scores() {
        let requests = [
            ("GET", "/", &[][..]),
            ("POST", "/api/v1/items?page=2", &[("x-tenant", "blue")][..]),
            ("DELETE", "http://web.example.com/x/y", &[][..]),
        ];
        for (method, uri, headers) in requests {
            let (method, uri, headers) = request(method, uri, headers);
            let empty = RequestMatch::default().score(&method, &uri, &headers);
            assert_eq!(empty, Some(CATCH_ALL), "{uri}");
            assert_eq!(best_score(&[], &method, &uri, &headers), empty, "{uri}");
        }
    }

    #[test]
    fn matches_and_their_scores() {
        type Row = (
            &'static str,
            RequestMatch,
            (&'static str, &'static str),
            bool,
        );
        let get = Some(Method::GET);
        let rows: Vec<Row> = vec![
            ("any path", RequestMatch::default(), ("GET", "/x"), true),
            ("exact", exact("/ready"), ("GET", "/ready"), true),
            (
                "exact, other path",
                exact("/ready"),
                ("GET", "/ready/x"),
                false,
            ),
            (
                "exact ignores the query",
                exact("/ready"),
                ("GET", "/ready?a=1"),
                true,
            ),
            ("prefix, itself", prefix("/api"), ("GET", "/api"), true),
            ("prefix, below", prefix("/api/"), ("GET", "/api/v1"), true),
            (
                "prefix, whole segments only",
                prefix("/api"),
                ("GET", "/apix"),
                false,
            ),
            ("prefix /", prefix("/"), ("GET", "/anything"), true),
            (
                "method",
                RequestMatch {
                    method: get.clone(),
                    ..Default::default()
                },
                ("POST", "/"),
                false,
            ),
            (
                "header present",
                RequestMatch {
                    headers: vec![("x-user".into(), b"a".to_vec())],
                    ..Default::default()
                },
                ("GET", "/"),
                true,
            ),
            (
                "query parameter",
                RequestMatch {
                    query: vec![("v".into(), "2".into())],
                    ..Default::default()
                },
                ("GET", "/?a=1&v=2"),
                true,
            ),
            (
                "query parameter, other value",
                RequestMatch {
                    query: vec![("v".into(), "2".into())],
                    ..Default::default()
                },
                ("GET", "/?v=3"),
                false,
            ),
            (
                "an unsupported match matches nothing",
                RequestMatch {
                    unsupported: true,
                    ..Default::default()
                },
                ("GET", "/"),
                false,
            ),
            (
                "a path pattern matches the whole path",
                RequestMatch {
                    path: PathRule::Regex(Pattern::new("/api/v[0-9]+/.*").unwrap()),
                    ..Default::default()
                },
                ("GET", "/api/v2/users?x=1"),
                true,
            ),
            (
                "a path pattern, not the whole path",
                RequestMatch {
                    path: PathRule::Regex(Pattern::new("/api/v[0-9]+").unwrap()),
                    ..Default::default()
                },
                ("GET", "/api/v2/users"),
                false,
            ),
            (
                "a header pattern",
                RequestMatch {
                    header_patterns: vec![("x-user".into(), Pattern::new("[a-c]").unwrap())],
                    ..Default::default()
                },
                ("GET", "/"),
                true,
            ),
            (
                "a header pattern, other value",
                RequestMatch {
                    header_patterns: vec![("x-user".into(), Pattern::new("b|c").unwrap())],
                    ..Default::default()
                },
                ("GET", "/"),
                false,
            ),
            (
                "a query pattern",
                RequestMatch {
                    query_patterns: vec![("v".into(), Pattern::new("[0-9]+").unwrap())],
                    ..Default::default()
                },
                ("GET", "/?v=42"),
                true,
            ),
        ];
        for (name, m, (method, uri), expected) in rows {
            let (method, uri, headers) = request(method, uri, &[("x-user", "a")]);
            assert_eq!(
                m.score(&method, &uri, &headers).is_some(),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn more_specific_matches_score_higher() {
        let (method, uri, headers) = request("GET", "/api/v1/users", &[("x", "1")]);
        let score = |m: RequestMatch| m.score(&method, &uri, &headers).unwrap();
        assert!(score(exact("/api/v1/users")) > score(prefix("/api/v1")));
        assert!(score(prefix("/api/v1")) > score(prefix("/api")));
        assert!(score(prefix("/api")) > score(RequestMatch::default()));
        // A pattern ranks as a prefix as long as the path: over the catch-all and any
        // shorter prefix, under the exact path.
        let pattern = RequestMatch {
            path: PathRule::Regex(Pattern::new("/api/v[0-9]/.*").unwrap()),
            ..Default::default()
        };
        assert!(score(pattern.clone()) > score(prefix("/api/v1")));
        assert!(score(pattern.clone()) > score(prefix("/")));
        assert!(score(exact("/api/v1/users")) > score(pattern));
        let with_method = RequestMatch {
            method: Some(Method::GET),
            ..prefix("/api")
        };
        assert!(score(with_method.clone()) > score(prefix("/api")));
        let with_header = RequestMatch {
            headers: vec![("x".into(), b"1".to_vec())],
            ..with_method.clone()
        };
        assert!(score(with_header) > score(with_method));
        assert_eq!(
            best_score(&[], &method, &uri, &headers),
            Some(score(RequestMatch::default()))
        );
    }

    #[test]
    fn hosts() {
        let hosts = vec![
            Host::Exact("web.example.com".into()),
            Host::Suffix(".svc.cluster.local".into()),
        ];
        assert!(host_matches(&[], None));
        assert!(host_matches(&hosts, Some("web.example.com:8080")));
        assert!(host_matches(&hosts, Some("WEB.example.com")));
        assert!(host_matches(&hosts, Some("a.ns.svc.cluster.local")));
        assert!(!host_matches(&hosts, Some("other.example.com")));
        assert!(!host_matches(&hosts, None));
    }

    #[test]
    fn read_from_the_api() {
        use linkerd2_proxy_api::grpc_route::GrpcRpcMatch;
        use linkerd2_proxy_api::http_route::{HeaderMatch, PathMatch};
        let http = HttpRouteMatch {
            path: Some(PathMatch {
                kind: Some(path_match::Kind::Prefix("/api".into())),
            }),
            headers: vec![HeaderMatch {
                name: "X-User".into(),
                value: Some(header_match::Value::Exact(b"a".to_vec())),
            }],
            query_params: vec![],
            method: Some(Method::GET.into()),
        };
        assert_eq!(
            read_http_match(&http),
            RequestMatch {
                path: PathRule::Prefix("/api".into()),
                method: Some(Method::GET),
                headers: vec![("x-user".into(), b"a".to_vec())],
                unsupported: false,
                ..Default::default()
            }
        );
        let regex = |source: &str| HttpRouteMatch {
            path: Some(PathMatch {
                kind: Some(path_match::Kind::Regex(source.into())),
            }),
            ..Default::default()
        };
        let read = read_http_match(&regex("/v[12]/.*"));
        assert!(!read.unsupported);
        assert_eq!(
            read.path,
            PathRule::Regex(Pattern::new("/v[12]/.*").unwrap())
        );
        // One that does not compile, or compiles too large, matches nothing.
        assert!(read_http_match(&regex("(")).unsupported);
        assert!(read_http_match(&regex("[a-z]{1000}{1000}")).unsupported);
        let grpc = GrpcRouteMatch {
            rpc: Some(GrpcRpcMatch {
                service: "pkg.Svc".into(),
                method: "Get".into(),
            }),
            headers: vec![],
        };
        assert_eq!(
            read_grpc_match(&grpc).path,
            PathRule::Exact("/pkg.Svc/Get".into())
        );
        let suffix = HostMatch {
            r#match: Some(host_match::Match::Suffix(host_match::Suffix {
                reverse_labels: vec!["com".into(), "example".into()],
            })),
        };
        assert_eq!(
            read_hosts(&[suffix]),
            vec![Host::Suffix(".example.com".into())]
        );
    }
}
