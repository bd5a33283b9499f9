//! Outbound routes: what choosing a request's route rule costs, on its own.
//!
//! `outbound_routes::select` for the route table Linkerd's policy controller sends a
//! Service without HTTPRoutes (one default route, prefix `/`), and for a realistic
//! table of 20 routes (a path prefix each, every other one also matching a header)
//! with 2 backends per rule, for a request that only the last route takes and for
//! one that none takes; and all a routed request adds per request: the rule, the
//! backend its split draws, the route's and the backend's series.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use hyper::http::{HeaderMap, HeaderValue, Method, Uri};
use tandem_proxy::discover::linkerd::translate::BackendSpec;
use tandem_proxy::discover::outbound_routes::{
    select, Distribution, Route, RouteBackend, RouteTable, Rule, Timeouts,
};
use tandem_proxy::discover::route_match::{PathRule, RequestMatch};
use tandem_proxy::discover::{Labels, Refusal};
use tandem_proxy::http::route_decide::choose_backend;
use tandem_proxy::metrics::routes::{Ended, RouteMetrics};

fn rule(matches: Vec<RequestMatch>) -> Rule {
    let backend = |slot| RouteBackend {
        backend: BackendSpec::Refused(Refusal::Invalid),
        labels: Labels::default(),
        filters: Vec::new(),
        slot,
    };
    Rule {
        matches,
        filters: Vec::new(),
        backends: Distribution::RandomAvailable(vec![(backend(0), 90), (backend(1), 10)]),
        timeouts: Timeouts::default(),
        retry: None,
        allow_l5d_request_headers: false,
    }
}

fn table(routes: usize) -> RouteTable {
    RouteTable {
        routes: (0..routes)
            .map(|i| {
                let mut matched = RequestMatch {
                    path: PathRule::Prefix(format!("/api/v1/service-{i}")),
                    ..RequestMatch::default()
                };
                if i % 2 == 1 {
                    matched.headers.push(("x-tenant".into(), b"blue".to_vec()));
                }
                Route {
                    labels: Labels::default(),
                    hosts: Vec::new(),
                    rules: vec![rule(vec![matched])],
                }
            })
            .collect(),
        ..RouteTable::default()
    }
}

fn default_route() -> RouteTable {
    RouteTable {
        routes: vec![Route {
            labels: Labels::default(),
            hosts: Vec::new(),
            rules: vec![rule(vec![RequestMatch {
                path: PathRule::Prefix("/".into()),
                ..RequestMatch::default()
            }])],
        }],
        ..RouteTable::default()
    }
}

fn select_route(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("blue"));
    headers.insert("user-agent", HeaderValue::from_static("curl/8.0"));
    let last = Uri::from_static("/api/v1/service-19/items?limit=10");
    let none = Uri::from_static("/healthz");
    let authority = Some("web.default.svc.cluster.local:80");
    let mut group = c.benchmark_group("route");
    let default = default_route();
    group.bench_function("select, the default route", |b| {
        b.iter(|| black_box(select(&default, &Method::GET, &last, &headers, authority)))
    });
    let twenty = table(20);
    // The 20 routes and a catch-all split last, as `tandem-bench` routes its requests.
    let mut twenty_and_all = table(20);
    let mut catch_all = default_route().routes.remove(0);
    catch_all.rules[0].backends = twenty_and_all.routes[0].rules[0].backends.clone();
    twenty_and_all.routes.push(catch_all);
    group.bench_function("select, 20 routes, the last one taken", |b| {
        b.iter(|| black_box(select(&twenty, &Method::GET, &last, &headers, authority)))
    });
    group.bench_function("select, 20 routes, none taken", |b| {
        b.iter(|| black_box(select(&twenty, &Method::GET, &none, &headers, authority)))
    });
    // What a routed request does beyond an unrouted one, but for its response's
    // extra body wrapper: the rule, the backend drawn, the route's and the backend's
    // series recorded.
    let metrics = RouteMetrics::default();
    let parent = Labels::new([("parent_name", "web")]);
    let route_series = metrics.route(false, &parent, &Labels::new([("route_name", "r")]));
    let backend_series = metrics.backend(false, &parent, &Labels::default(), &Labels::default());
    let ended = Ended {
        status: Some(200),
        grpc: None,
        error: None,
    };
    let root = Uri::from_static("/");
    // Draws spread over the range, as a random source would give them.
    let mut draw = 0u32;
    let mut next = move || {
        draw = draw.wrapping_add(0x9E37_79B9);
        draw
    };
    group.bench_function("route a request, 20 routes, a 50/50 split", |b| {
        b.iter(|| {
            let selected = select(&twenty_and_all, &Method::GET, &root, &headers, authority);
            let rule = &twenty_and_all.routes[selected.unwrap().route].rules[0];
            let backend = choose_backend(&rule.backends, |_| true, &mut next);
            backend_series.request();
            backend_series.ended(ended, Duration::from_millis(2));
            route_series.ended(ended, Duration::from_millis(2));
            black_box(backend.map(|b| b.slot))
        })
    });
    group.finish();
}

criterion_group!(benches, select_route);
criterion_main!(benches);
