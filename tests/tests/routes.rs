//! Outbound routes from `OutboundPolicies.Watch` (issue 28), in a cluster's topology:
//! the client pod's proxy applies the HTTPRoutes and GRPCRoutes the test control
//! plane serves, and changes at run time, to real requests (curl, an HTTP/2 gRPC
//! client) to a Service whose backends are Services of their own: `web-v1` (pod
//! `web-a`) and `web-v2` (pod `web-b`), each a balancer on its own discovery path.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use linkerd2_proxy_api::outbound as ob;

use tandem_tests::apps::connect;
use tandem_tests::control::{
    balancer, grpc_policy, grpc_rule, header_is, http_policy, http_route, http_rule, path_prefix,
    path_regex,
};
use tandem_tests::probe::metric;
use tandem_tests::world::*;
use tandem_tests::{wait_for, Pod, Proxy, PATIENCE};

const V1: &str = "web-v1.default.svc.cluster.local:80";
const V2: &str = "web-v2.default.svc.cluster.local:80";
const URL: &str = "http://10.96.0.10/";

/// A cluster whose Service `web` has two backend Services: `web-v1` (server 0) and
/// `web-v2` (server 1).
struct Routed {
    world: World,
    v1: ob::Backend,
    v2: ob::Backend,
}

impl Routed {
    fn new() -> Routed {
        tandem_tests::require_root();
        let world = World::new(0);
        world.control.set_endpoints(
            V1,
            world.endpoints(&[0], tandem_tests::control::Hint::H2, APP_PORT),
        );
        world.control.set_endpoints(
            V2,
            world.endpoints(&[1], tandem_tests::control::Hint::H2, APP_PORT),
        );
        Routed {
            world,
            v1: balancer("web-v1", 80, V1),
            v2: balancer("web-v2", 80, V2),
        }
    }

    fn routes(&self, routes: Vec<ob::HttpRoute>) {
        self.world
            .control
            .set_policy(vip(80), http_policy("web", 80, PATH, routes, None));
    }

    fn client(&self) -> &Pod {
        self.world.client()
    }
}

/// One curl request; returns (status, headers and body as curl printed them).
fn curl(pod: &Pod, args: &[&str]) -> (u16, String) {
    let mut all = vec!["-s", "-i", "--max-time", "60", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let out = pod.must("curl", &all);
    let (text, code) = out.rsplit_once('\n').expect("curl printed the status");
    (
        code.trim().parse().expect("a status code"),
        text.to_string(),
    )
}

/// `count` requests to `url` from `pod` over one connection: their statuses, a line
/// each.
fn statuses(pod: &Pod, url: &str, count: usize) -> String {
    let mut args = vec![
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        "--max-time",
        "60",
    ];
    args.extend(std::iter::repeat_n(url, count));
    pod.must("curl", &args)
}

/// Waits until the client's proxy answers with the route named `route`: a policy
/// update has reached it.
fn wait_for_route(client: &Proxy<'_>, pod: &Pod, route: &str, path: &str) {
    let url = format!("http://10.96.0.10{path}");
    let used = tandem_tests::wait_for_or(PATIENCE, || {
        curl(pod, &[&url]);
        let text = client.metrics();
        let labels = [("route_name", route)];
        metric(&text, "outbound_http_route_request_statuses_total", &labels).filter(|n| *n > 0.0)
    });
    if used.is_none() {
        let (status, text) = curl(pod, &[&url]);
        let metrics = client.metrics();
        let routes: Vec<&str> = metrics.lines().filter(|l| l.contains("_route_")).collect();
        panic!(
            "route {route} not in use: {status} {text}\n{}",
            routes.join("\n")
        );
    }
}

/// The share of `n` requests each backend got is within 3σ of its weight.
fn assert_binomial(got: usize, n: usize, p: f64, what: &str) {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    let low = (mean - 3.0 * sigma).floor() as usize;
    let high = (mean + 3.0 * sigma).ceil() as usize;
    assert!(
        (low..=high).contains(&got),
        "{what}: {got} of {n}, expected {low}..={high}"
    );
}

/// A 90/10 split over 1,000 requests on one connection follows its weights; turned
/// to 10/90 mid-run, the same connection's next requests follow the new weights.
#[test]
fn a_weighted_split_follows_its_weights_and_their_changes() {
    let cluster = Routed::new();
    let (_proxies, apps) = cluster.world.servers();
    let split = |name: &str, w1, w2| {
        http_route(
            name,
            vec![http_rule(
                vec![path_prefix("/")],
                &[(&cluster.v1, w1), (&cluster.v2, w2)],
            )],
        )
    };
    cluster.routes(vec![split("split-90-10", 90, 10)]);
    let client = cluster.world.client_proxy(&[]);
    wait_for_route(&client, cluster.client(), "split-90-10", "/");

    reset(&apps);
    let bodies = curl_many(cluster.client(), URL, 1000);
    assert_eq!(bodies.lines().count(), 1000, "every request answered");
    let [a, b, c] = counts(&apps)[..] else {
        unreachable!()
    };
    assert_eq!((a + b, c), (1000, 0), "only the split's backends");
    assert_binomial(a, 1000, 0.9, "web-v1 at 90");
    assert_binomial(b, 1000, 0.1, "web-v2 at 10");

    cluster.routes(vec![split("split-10-90", 10, 90)]);
    wait_for_route(&client, cluster.client(), "split-10-90", "/");
    reset(&apps);
    curl_many(cluster.client(), URL, 1000);
    let [a, b, _] = counts(&apps)[..] else {
        unreachable!()
    };
    assert_eq!(a + b, 1000);
    assert_binomial(a, 1000, 0.1, "web-v1 at 10");
    assert_binomial(b, 1000, 0.9, "web-v2 at 90");

    // Per-backend requests, with Linkerd's labels.
    let text = client.metrics();
    let labels = [("route_name", "split-10-90"), ("backend_name", "web-v2")];
    // (Counting the requests that waited for the update too.)
    let counted = metric(&text, "outbound_http_route_backend_requests_total", &labels);
    assert!(counted.is_some_and(|n| n >= b as f64), "{b}: {text}");
}

/// A path prefix, a header and a path pattern take requests to `web-v2`; the rest go
/// to `web-v1`.
#[test]
fn requests_are_routed_by_host_path_and_header() {
    let cluster = Routed::new();
    let (_proxies, _apps) = cluster.world.servers();
    // A route for one host name outranks the routes for any host (Gateway API), only
    // for the requests that name it.
    let mut for_canary_host = http_route(
        "canary-host",
        vec![http_rule(vec![path_prefix("/")], &[(&cluster.v2, 1)])],
    );
    for_canary_host.hosts = vec![linkerd2_proxy_api::http_route::HostMatch {
        r#match: Some(linkerd2_proxy_api::http_route::host_match::Match::Exact(
            "canary.example.com".into(),
        )),
    }];
    cluster.routes(vec![
        http_route(
            "by-path-and-header",
            vec![
                http_rule(vec![path_prefix("/")], &[(&cluster.v1, 1)]),
                http_rule(vec![path_prefix("/v2")], &[(&cluster.v2, 1)]),
                http_rule(vec![header_is("x-canary", "true")], &[(&cluster.v2, 1)]),
                http_rule(vec![path_regex("/legacy/v[0-9]+/.*")], &[(&cluster.v2, 1)]),
            ],
        ),
        for_canary_host,
    ]);
    let _client = cluster.world.client_proxy(&[]);
    let pod = cluster.client();
    for http in ["--http1.1", "--http2-prior-knowledge"] {
        let served = |path: &str, headers: &[&str]| {
            let mut args = vec![http];
            for header in headers {
                args.extend(["-H", header]);
            }
            let url = format!("http://10.96.0.10{path}");
            args.push(&url);
            let (status, text) = curl(pod, &args);
            assert_eq!(status, 200, "{path}: {text}");
            text.lines().last().unwrap_or_default().to_string()
        };
        assert_eq!(served("/", &[]), "web-a", "{http}");
        assert_eq!(served("/v2/users", &[]), "web-b", "{http}");
        assert_eq!(
            served("/v2x", &[]),
            "web-a",
            "{http}: a prefix ends on a segment"
        );
        assert_eq!(served("/any", &["x-canary: true"]), "web-b", "{http}");
        assert_eq!(served("/any", &["x-canary: false"]), "web-a", "{http}");
        assert_eq!(
            served("/legacy/v3/x", &[]),
            "web-b",
            "{http}: a path pattern"
        );
        assert_eq!(
            served("/legacy/vx/x", &[]),
            "web-a",
            "{http}: not the pattern"
        );
        assert_eq!(
            served("/any", &["Host: canary.example.com"]),
            "web-b",
            "{http}: the route for the request's host"
        );
        assert_eq!(
            served("/any", &["Host: Canary.Example.com:80"]),
            "web-b",
            "{http}: host names compare without case or port"
        );
        assert_eq!(
            served("/any", &["Host: other.example.com"]),
            "web-a",
            "{http}: another host"
        );
    }
}

/// A unary gRPC call over HTTP/2 from `pod` to the Service: (grpc-status, body).
fn grpc_call(pod: &Pod, path: &str) -> (Option<u32>, String) {
    let stream = connect(pod, vip(80));
    stream.set_nonblocking(true).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        // An empty message: flag 0, length 0.
        let request = hyper::Request::post(format!("http://10.96.0.10{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(60), sender.send_request(request))
            .await
            .expect("an answer within a minute")
            .expect("a response");
        let status = |headers: &hyper::HeaderMap| {
            headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse().ok())
        };
        let from_headers = status(response.headers());
        let collected = response.into_body().collect().await.expect("the body");
        let from_trailers = collected.trailers().and_then(status);
        let body = String::from_utf8_lossy(&collected.to_bytes())
            .trim()
            .to_string();
        (from_headers.or(from_trailers), body)
    })
}

/// GRPCRoutes route calls by method; a call no route takes is refused (UNIMPLEMENTED
/// is the server's answer; the proxy's "no route" is NOT_FOUND, as linkerd2-proxy's).
#[test]
fn grpc_calls_are_routed_by_method() {
    let cluster = Routed::new();
    let (_proxies, _apps) = cluster.world.servers();
    cluster.world.control.set_policy(
        vip(80),
        grpc_policy(
            "web",
            80,
            vec![
                grpc_rule("demo.Greeter", "Hello", &cluster.v1),
                grpc_rule("demo.Greeter", "Goodbye", &cluster.v2),
            ],
        ),
    );
    let _client = cluster.world.client_proxy(&[]);
    let pod = cluster.client();
    let hello = wait_for("the gRPC routes", PATIENCE, || {
        let answer = grpc_call(pod, "/demo.Greeter/Hello");
        (answer.0 == Some(0)).then_some(answer)
    });
    assert_eq!(hello.1, "web-a");
    assert_eq!(
        grpc_call(pod, "/demo.Greeter/Goodbye"),
        (Some(0), "web-b".into())
    );
    assert_eq!(grpc_call(pod, "/demo.Greeter/Other").0, Some(5));
}

fn retry_rule(backend: &ob::Backend, max_request_bytes: u32) -> ob::http_route::Rule {
    let mut rule = http_rule(vec![path_prefix("/")], &[(backend, 1)]);
    rule.retry = Some(ob::http_route::Retry {
        max_retries: 2,
        max_request_bytes,
        conditions: Some(ob::http_route::retry::Conditions {
            status_ranges: vec![ob::http_route::retry::conditions::StatusRange {
                start: 500,
                end: 599,
            }],
        }),
        timeout: None,
        backoff: Some(ob::ExponentialBackoff {
            min_backoff: Some(millis(5)),
            max_backoff: Some(millis(50)),
            jitter_ratio: 0.5,
            ..Default::default()
        }),
    });
    rule
}

fn millis(ms: i32) -> prost_types::Duration {
    prost_types::Duration {
        seconds: 0,
        nanos: ms * 1_000_000,
    }
}

/// A backend that fails every other request with 503: with retries, every request
/// succeeds. A body over `max_request_bytes` is sent once, intact, and not retried;
/// a small one is retried up to the limit.
#[test]
fn retries_hide_a_backend_that_fails_half_its_requests() {
    let cluster = Routed::new();
    let (_proxies, apps) = cluster.world.servers();
    cluster.routes(vec![http_route(
        "retried",
        vec![retry_rule(&cluster.v1, 1024)],
    )]);
    let client = cluster.world.client_proxy(&[]);
    let pod = cluster.client();
    wait_for_route(&client, pod, "retried", "/");

    apps[0].fail(Fails::EveryOther);
    reset(&apps);
    let codes = statuses(pod, URL, 200);
    let ok = codes.lines().filter(|c| *c == "200").count();
    assert!(ok * 100 >= 99 * 200, "{ok} of 200 succeeded: {codes}");
    let served = apps[0].requests.load(Ordering::SeqCst);
    assert!(
        served > 200,
        "the failures were retried: {served} requests served"
    );
    let text = client.metrics();
    let retries = metric(
        &text,
        "outbound_http_route_retry_requests_total",
        &[("route_name", "retried")],
    );
    assert!(retries.is_some_and(|r| r > 0.0), "{text}");

    // Now every request fails: a body over the limit is sent once and arrives
    // whole; a small one is tried three times.
    apps[0].fail(Fails::All);
    let big: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let file = format!("/tmp/tandem-routes-body-{}", std::process::id());
    std::fs::write(&file, &big).unwrap();
    reset(&apps);
    let data = format!("@{file}");
    let (status, _) = curl(pod, &["--data-binary", &data, URL]);
    std::fs::remove_file(&file).ok();
    assert_eq!(status, 503);
    assert_eq!(apps[0].requests.load(Ordering::SeqCst), 1, "not retried");
    let body = *apps[0].last_body.lock().unwrap();
    assert_eq!(
        body,
        Some((big.len(), checksum(&big))),
        "the body arrived intact"
    );
    reset(&apps);
    let (status, _) = curl(pod, &["--data-binary", "small", URL]);
    assert_eq!(status, 503);
    assert_eq!(
        apps[0].requests.load(Ordering::SeqCst),
        3,
        "tried 1 + 2 times"
    );
    assert_eq!(
        *apps[0].last_body.lock().unwrap(),
        Some((5, checksum(b"small")))
    );
    let text = client.metrics();
    let exceeded = metric(
        &text,
        "outbound_http_route_retry_limit_exceeded_total",
        &[("route_name", "retried")],
    );
    assert!(exceeded.is_some_and(|n| n >= 1.0), "{text}");
}

/// A request timeout answers a slow request 504 (gRPC: DEADLINE_EXCEEDED) and the
/// server sees the request cancelled.
#[test]
fn a_request_timeout_answers_504_and_cancels_the_request() {
    let cluster = Routed::new();
    let (_proxies, apps) = cluster.world.servers();
    let mut rule = http_rule(vec![path_prefix("/")], &[(&cluster.v1, 1)]);
    rule.timeouts = Some(linkerd2_proxy_api::http_route::Timeouts {
        request: Some(millis(500)),
        ..Default::default()
    });
    cluster.routes(vec![http_route("timed", vec![rule])]);
    let client = cluster.world.client_proxy(&[]);
    let pod = cluster.client();
    wait_for_route(&client, pod, "timed", "/");

    reset(&apps);
    let (status, text) = curl(pod, &["http://10.96.0.10/slow"]);
    assert_eq!(status, 504, "{text}");
    assert!(text.contains("l5d-proxy-error: timed out"), "{text}");
    wait_for("the server to see the request cancelled", PATIENCE, || {
        (apps[0].cancelled.load(Ordering::SeqCst) >= 1).then_some(())
    });
    let text = client.metrics();
    let labels = [("route_name", "timed"), ("error", "REQUEST_TIMEOUT")];
    assert_eq!(
        metric(&text, "outbound_http_route_request_statuses_total", &labels),
        Some(1.0),
        "{text}"
    );

    // gRPC over HTTP/2: the same timeout is DEADLINE_EXCEEDED.
    let (code, _) = grpc_call(pod, "/slow");
    assert_eq!(code, Some(4));
    wait_for("the server to see the call cancelled", PATIENCE, || {
        (apps[0].cancelled.load(Ordering::SeqCst) >= 2).then_some(())
    });
}

/// With failure accrual, an endpoint that fails every request is ejected after the
/// configured consecutive failures, gets nothing while ejected, and is probed back
/// in once it recovers.
#[test]
fn a_failing_endpoint_is_ejected_then_probed_back() {
    let cluster = Routed::new();
    let (_proxies, apps) = cluster.world.servers();
    // One backend balanced over both pods.
    cluster.world.control.set_endpoints(
        V1,
        cluster
            .world
            .endpoints(&[0, 1], tandem_tests::control::Hint::H2, APP_PORT),
    );
    let accrual = ob::FailureAccrual {
        kind: Some(ob::failure_accrual::Kind::ConsecutiveFailures(
            ob::failure_accrual::ConsecutiveFailures {
                max_failures: 3,
                backoff: Some(ob::ExponentialBackoff {
                    min_backoff: Some(prost_types::Duration {
                        seconds: 3,
                        nanos: 0,
                    }),
                    max_backoff: Some(prost_types::Duration {
                        seconds: 3,
                        nanos: 0,
                    }),
                    jitter_ratio: 0.0,
                    ..Default::default()
                }),
            },
        )),
        ejection: None,
    };
    let routes = vec![http_route(
        "accrued",
        vec![http_rule(vec![path_prefix("/")], &[(&cluster.v1, 1)])],
    )];
    cluster
        .world
        .control
        .set_policy(vip(80), http_policy("web", 80, PATH, routes, Some(accrual)));
    let client = cluster.world.client_proxy(&[]);
    let pod = cluster.client();
    wait_for_route(&client, pod, "accrued", "/");

    apps[0].fail(Fails::All);
    let pending = [("backend_name", "web-v1"), ("endpoint_state", "pending")];
    // Requests until web-a has failed three in a row and is ejected.
    wait_for("web-a to be ejected", PATIENCE, || {
        curl(pod, &[URL]);
        let text = client.metrics();
        (metric(&text, "outbound_http_balancer_endpoints", &pending) == Some(1.0)).then_some(())
    });
    let before = apps[0].requests.load(Ordering::SeqCst);
    let bodies = curl_many(pod, URL, 20);
    let still_ejected = metric(
        &client.metrics(),
        "outbound_http_balancer_endpoints",
        &pending,
    );
    if still_ejected == Some(1.0) {
        // Still within the backoff (and no probe sent, which would need it over).
        assert_eq!(
            apps[0].requests.load(Ordering::SeqCst),
            before,
            "nothing while ejected"
        );
        assert_eq!(
            bodies.lines().filter(|l| *l == "web-b").count(),
            20,
            "{bodies}"
        );
    }
    // It recovers; after the backoff, one probe readmits it.
    apps[0].fail(Fails::None);
    wait_for(
        "web-a to be probed back in",
        Duration::from_secs(60),
        || {
            curl(pod, &[URL]);
            (apps[0].requests.load(Ordering::SeqCst) > before).then_some(())
        },
    );
    wait_for("web-a ready again", PATIENCE, || {
        let text = client.metrics();
        (metric(&text, "outbound_http_balancer_endpoints", &pending) == Some(0.0)).then_some(())
    });
}

/// Header modifiers change the request and response headers; a redirect answers
/// with its location; a failure injector answers its share of requests itself.
#[test]
fn filters_change_headers_redirect_and_inject_failures() {
    use linkerd2_proxy_api::http_route as hr;
    use linkerd2_proxy_api::http_types::{headers::Header, Headers};
    let cluster = Routed::new();
    let (_proxies, apps) = cluster.world.servers();
    let filter = |kind| ob::http_route::Filter { kind: Some(kind) };
    let headers = |pairs: &[(&str, &str)]| {
        Some(Headers {
            headers: pairs
                .iter()
                .map(|(n, v)| Header {
                    name: n.to_string(),
                    value: v.as_bytes().to_vec(),
                })
                .collect(),
        })
    };
    let mut modified = http_rule(vec![path_prefix("/headers")], &[(&cluster.v1, 1)]);
    modified.filters = vec![
        filter(ob::http_route::filter::Kind::RequestHeaderModifier(
            hr::RequestHeaderModifier {
                add: headers(&[("x-added", "1")]),
                set: headers(&[("x-set", "new")]),
                remove: vec!["x-gone".into()],
            },
        )),
        filter(ob::http_route::filter::Kind::ResponseHeaderModifier(
            hr::ResponseHeaderModifier {
                add: None,
                set: headers(&[("x-route", "modified")]),
                remove: vec![],
            },
        )),
    ];
    let mut redirected = http_rule(vec![path_prefix("/old")], &[(&cluster.v1, 1)]);
    redirected.filters = vec![filter(ob::http_route::filter::Kind::Redirect(
        hr::RequestRedirect {
            path: Some(hr::PathModifier {
                replace: Some(hr::path_modifier::Replace::Prefix("/new".into())),
            }),
            status: 301,
            ..Default::default()
        },
    ))];
    let mut flaky = http_rule(vec![path_prefix("/flaky")], &[(&cluster.v1, 1)]);
    flaky.filters = vec![filter(ob::http_route::filter::Kind::FailureInjector(
        hr::HttpFailureInjector {
            status: 500,
            message: "injected".into(),
            ratio: Some(hr::Ratio {
                numerator: 1,
                denominator: 4,
            }),
        },
    ))];
    cluster.routes(vec![http_route(
        "filtered",
        vec![modified, redirected, flaky],
    )]);
    let client = cluster.world.client_proxy(&[]);
    let pod = cluster.client();
    wait_for_route(&client, pod, "filtered", "/headers");

    let (status, text) = curl(
        pod,
        &[
            "-H",
            "x-set: old",
            "-H",
            "x-gone: 1",
            "http://10.96.0.10/headers",
        ],
    );
    assert_eq!(status, 200, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("x-route: modified"),
        "{text}"
    );
    let seen = apps[0].last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen.get("x-added").map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert_eq!(seen.get("x-set").map(|v| v.as_bytes()), Some(&b"new"[..]));
    assert!(!seen.contains_key("x-gone"), "{seen:?}");

    reset(&apps);
    let (status, text) = curl(pod, &["http://10.96.0.10/old/page?x=1"]);
    assert_eq!(status, 301, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("location: http://10.96.0.10/new/page?x=1"),
        "{text}"
    );
    assert_eq!(
        apps[0].requests.load(Ordering::SeqCst),
        0,
        "answered by the proxy"
    );

    reset(&apps);
    let codes = statuses(pod, "http://10.96.0.10/flaky", 400);
    let injected = codes.lines().filter(|c| *c == "500").count();
    assert_binomial(injected, 400, 0.25, "injected failures");
    assert_eq!(
        apps[0].requests.load(Ordering::SeqCst),
        400 - injected,
        "injected failures never reach the server"
    );
}

/// A policy update while a request is in flight leaves that request alone: it
/// finishes on the backend it went to.
#[test]
fn a_policy_update_during_a_long_request_does_not_disturb_it() {
    let cluster = Routed::new();
    let (_proxies, apps) = cluster.world.servers();
    let to = |name: &str, backend: &ob::Backend| {
        http_route(
            name,
            vec![http_rule(vec![path_prefix("/")], &[(backend, 1)])],
        )
    };
    cluster.routes(vec![to("to-v1", &cluster.v1)]);
    let client = cluster.world.client_proxy(&[]);
    let pod = cluster.client();
    wait_for_route(&client, pod, "to-v1", "/");

    reset(&apps);
    let mut curl_held = std::process::Command::new("curl");
    curl_held.args([
        "-s",
        "--max-time",
        "60",
        "-w",
        "%{http_code}",
        "http://10.96.0.10/hold",
    ]);
    let mut held = pod.spawn("held request", curl_held);
    wait_for("the long request to arrive", PATIENCE, || {
        (apps[0].requests.load(Ordering::SeqCst) == 1).then_some(())
    });
    cluster.routes(vec![to("to-v2", &cluster.v2)]);
    wait_for_route(&client, pod, "to-v2", "/");
    apps[0].release.store(true, Ordering::SeqCst);
    assert!(held.wait_exit(PATIENCE).success());
    let text = held.output();
    assert!(
        text.contains("web-a\n200"),
        "finished where it started: {text}"
    );
}

/// The discovery file's routes, for standalone and VM users: a path routed to another
/// backend, and retries that hide a backend failing every other request.
#[test]
fn the_discovery_files_routes_route_and_retry() {
    tandem_tests::require_root();
    let world = World::new(0);
    let (_proxies, apps) = world.servers();
    let endpoint = |i: usize| {
        format!(
            "{{addr: '{}', identity: {}}}",
            world.cluster.addr(i + 1, APP_PORT),
            tandem_tests::mesh::identity_of(SERVERS[i])
        )
    };
    let file = format!(
        "destinations:
  - addr: 10.96.0.10
    ports: 80
    http2: true
    endpoints: [{}]
    backends:
      v2: {{endpoints: [{}]}}
    routes:
      - name: web
        rules:
          - retry: {{limit: 2, http_statuses: 5xx}}
          - matches: [{{path_prefix: /v2}}]
            backends: {{v2: 1}}
",
        endpoint(0),
        endpoint(1)
    );
    let mut env = world.domain.identity_env("client", world.issuer());
    env.push(world.domain.discovery_file("client", &file));
    let client = Proxy::start(world.client(), &tandem_tests::mesh::env_refs(&env));
    let pod = world.client();
    let (status, text) = curl(pod, &["http://10.96.0.10/v2/x"]);
    assert_eq!(
        (status, text.lines().last()),
        (200, Some("web-b")),
        "{text}"
    );

    apps[0].fail(Fails::EveryOther);
    reset(&apps);
    let codes = statuses(pod, URL, 100);
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        100,
        "{codes}"
    );
    assert!(apps[0].requests.load(Ordering::SeqCst) > 100, "retried");
    let text = client.metrics();
    let labels = [
        ("route_name", "web"),
        ("route_kind", "default"),
        ("http_status", "200"),
    ];
    assert!(
        metric(&text, "outbound_http_route_request_statuses_total", &labels)
            .is_some_and(|n| n >= 100.0),
        "{text}"
    );
}

/// A gRPC route retries UNAVAILABLE, found in the trailers that follow the one message
/// of a failed call; an HTTP route that allows `l5d-*` request headers takes its retry
/// from them, and they do not reach the server.
#[test]
fn grpc_statuses_in_trailers_and_l5d_headers_drive_retries() {
    let cluster = Routed::new();
    let (_proxies, apps) = cluster.world.servers();
    let mut rule = grpc_rule("demo.Greeter", "", &cluster.v1);
    rule.retry = Some(ob::grpc_route::Retry {
        max_retries: 2,
        max_request_bytes: 1024,
        conditions: Some(ob::grpc_route::retry::Conditions {
            unavailable: true,
            ..Default::default()
        }),
        timeout: None,
        backoff: None,
    });
    cluster
        .world
        .control
        .set_policy(vip(80), grpc_policy("web", 80, vec![rule]));
    let client = cluster.world.client_proxy(&[]);
    let pod = cluster.client();
    wait_for("the gRPC route", PATIENCE, || {
        (grpc_call(pod, "/demo.Greeter/Hello").0 == Some(0)).then_some(())
    });
    apps[0].fail(Fails::EveryOther);
    reset(&apps);
    for _ in 0..20 {
        assert_eq!(
            grpc_call(pod, "/demo.Greeter/Hello"),
            (Some(0), "web-a".into())
        );
    }
    assert!(apps[0].requests.load(Ordering::SeqCst) > 20, "retried");
    let text = client.metrics();
    let retried = metric(&text, "outbound_grpc_route_retry_requests_total", &[]);
    assert!(retried.is_some_and(|n| n > 0.0), "{text}");

    // HTTP, retries asked for by the request itself.
    let mut rule = http_rule(vec![path_prefix("/")], &[(&cluster.v1, 1)]);
    rule.allow_l5d_request_headers = true;
    cluster.routes(vec![http_route("asked", vec![rule])]);
    wait_for_route(&client, pod, "asked", "/");
    apps[0].fail(Fails::All);
    reset(&apps);
    let (status, _) = curl(
        pod,
        &["-H", "l5d-retry-http: 5xx", "-H", "l5d-retry-limit: 2", URL],
    );
    assert_eq!(status, 503);
    assert_eq!(apps[0].requests.load(Ordering::SeqCst), 3, "1 + 2 retries");
    let seen = apps[0].last_headers.lock().unwrap().clone().unwrap();
    assert!(!seen.contains_key("l5d-retry-http"), "{seen:?}");
}
