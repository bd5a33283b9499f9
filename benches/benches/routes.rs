//! Outbound routes: what choosing a request's route rule costs, on its own.
//!
//! `outbound_routes::select` for the route table Linkerd's policy controller sends a
//! Service without HTTPRoutes (one default route, prefix `/`), and for a realistic
//! table of 20 routes (a path prefix each, every other one also matching a header)
//! with 2 backends per rule, for a request that only the last route takes and for
//! one that none takes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use hyper::http::{HeaderMap, HeaderValue, Method, Uri};
use tandem_proxy::discover::linkerd::translate::BackendSpec;
use tandem_proxy::discover::outbound_routes::{
    select, Distribution, Route, RouteBackend, RouteTable, Rule, Timeouts,
};
use tandem_proxy::discover::route_match::{PathRule, RequestMatch};
use tandem_proxy::discover::{Labels, Refusal};

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
    group.bench_function("select, 20 routes, the last one taken", |b| {
        b.iter(|| black_box(select(&twenty, &Method::GET, &last, &headers, authority)))
    });
    group.bench_function("select, 20 routes, none taken", |b| {
        b.iter(|| black_box(select(&twenty, &Method::GET, &none, &headers, authority)))
    });
    group.finish();
}

criterion_group!(benches, select_route);
criterion_main!(benches);
