//! Balancing: what choosing an endpoint costs a request, on its own.
//!
//! One request's work in the balancer when an endpoint is ready: `try_pick` (what
//! `pick` does first: a ready-set scan, three random draws,
//! two endpoints' load estimates), then `answered` (the latency folded into the
//! chosen endpoint's estimate) and the drop of the pick (its in-flight count). For
//! a Service of 3 endpoints and of 300 (a pick weighs two endpoints, whatever their
//! number), and with a third of them backed off.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tandem_proxy::discover::balance::{BalanceSettings, Balancer, BalancerName};
use tandem_proxy::discover::Endpoint;

fn balancer(endpoints: u16) -> std::sync::Arc<Balancer> {
    let settings = BalanceSettings {
        backoff: tandem_proxy::config::Backoff {
            min: Duration::from_secs(60),
            max: Duration::from_secs(60),
            jitter: 0.0,
        },
        default_rtt: Duration::from_millis(30),
        decay: Duration::from_secs(10),
    };
    let balancer = Balancer::new(BalancerName::default(), settings);
    balancer.update(
        (0..endpoints).map(|port| Endpoint::unmeshed(SocketAddr::from(([10, 42, 0, 1], port)))),
    );
    balancer
}

fn pick_and_answer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let mut group = c.benchmark_group("balance");
    for (name, endpoints, backed_off) in [
        ("pick and answer, 3 endpoints", 3, 0),
        ("pick and answer, 300 endpoints", 300, 0),
        ("pick and answer, 300 endpoints, 100 backed off", 300, 100),
    ] {
        let balancer = balancer(endpoints);
        for member in balancer.members().iter().take(backed_off) {
            balancer.failed(member);
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                let picked = balancer.try_pick().expect("a ready endpoint");
                picked.answered(black_box(Instant::now()));
                black_box(picked)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pick_and_answer);
criterion_main!(benches);
