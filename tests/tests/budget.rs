//! The budget gauges (`tandem_budget_*`): after a fixed-rate run through a meshed
//! pair they are present and agree with the counters the same scrape shows; and the
//! Prometheus rules in `deploy/` load.

use std::path::Path;

use bytes::Bytes;

use tandem_tests::apps::http_app;
use tandem_tests::mesh::{env_refs, MeshedPair};
use tandem_tests::probe::metric;
use tandem_tests::{wait_for, Proxy, PATIENCE};

/// The sum of every series of `name` in a scrape.
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn gauge(text: &str, name: &str) -> f64 {
    metric(text, name, &[]).unwrap_or_else(|| panic!("{name} is reported: {text}"))
}

/// A run at a fixed rate through a meshed pair: the client proxy reports its rate,
/// CPU and memory over the window, per 1,000 requests/s, and the figures agree with
/// each other and with `process_cpu_seconds_total` and `request_total` in the same
/// scrape (what a window can count cannot exceed what the counters hold).
#[test]
fn the_budget_gauges_agree_with_the_counters() {
    let pair = MeshedPair::new();
    let _issuer = pair.start_issuer(&[]);
    let settings = [
        ("TANDEM_BUDGET_WINDOW", "2s"),
        ("TANDEM_BUDGET_MIN_RPS", "1"),
    ];
    let env_a = pair.env(0, true, &settings);
    let env_b = pair.env(1, true, &settings);
    let alpha = Proxy::start(pair.a(), &env_refs(&env_a));
    let _beta = Proxy::start(pair.b(), &env_refs(&env_b));
    http_app(pair.b(), 8080, |_| Bytes::from_static(b"ok"));
    // Nothing is reported before there is traffic.
    assert_eq!(
        metric(&alpha.metrics(), "tandem_budget_requests_per_second", &[]),
        None
    );

    let url = format!("http://{}/", pair.b_addr(8080));
    std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            pair.a().must(
                "h2load",
                &["--h1", "-n", "1000", "-c", "1", "--rps", "100", &url],
            )
        });
        let text = wait_for("the budget gauges", PATIENCE, || {
            let text = alpha.metrics();
            metric(&text, "tandem_budget_cpu_cores_per_thousand_rps", &[]).map(|_| text)
        });
        let rps = gauge(&text, "tandem_budget_requests_per_second");
        let window = gauge(&text, "tandem_budget_window_seconds");
        let cores = gauge(&text, "tandem_budget_cpu_cores");
        let cores_per_k = gauge(&text, "tandem_budget_cpu_cores_per_thousand_rps");
        let resident = gauge(&text, "tandem_budget_resident_memory_bytes");
        let resident_per_k = gauge(
            &text,
            "tandem_budget_resident_memory_bytes_per_thousand_rps",
        );
        assert!(rps >= 1.0 && window > 0.0 && resident > 0.0, "{text}");
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
        assert!(close(cores_per_k, cores / (rps / 1000.0)), "{text}");
        assert!(close(resident_per_k, resident / (rps / 1000.0)), "{text}");
        assert!(
            rps * window <= total(&text, "request_total") + 0.5,
            "the window cannot hold more requests than were counted: {text}"
        );
        assert!(
            cores * window <= gauge(&text, "process_cpu_seconds_total") + 0.01,
            "nor more CPU time than the process used: {text}"
        );
        let out = load.join().expect("the load");
        assert!(out.contains("1000 succeeded"), "{out}");
    });
}

/// The recording rules and alerts load in Prometheus's own checker.
#[test]
fn the_budget_rules_load_in_promtool() {
    let rules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/tandem-budget.rules.yml");
    let out = std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool (Debian's prometheus package; .ci/run installs it) cannot run: {e}")
        });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SUCCESS: 6 rules found"), "{text}");
}
