//! The proxy against Linkerd's sizing rule (0.25 cores and 20 MB per 1,000
//! requests/s), without arithmetic on the operator's side: over a recent window
//! (`TANDEM_BUDGET_WINDOW`), the proxy's request rate, its CPU cores and resident
//! memory, and both per 1,000 requests/s.
//!
//! A task samples counters the proxy keeps anyway (its CPU time and resident memory
//! from `/proc/self/stat`, the request counters of both directions) a few times per
//! window, off the request path; [`budget`] turns the oldest and newest samples into
//! the figures, and nothing is reported while the rate is under
//! `TANDEM_BUDGET_MIN_RPS` (a proxy at a handful of requests per second has a
//! meaningless cost per 1,000). `deploy/prometheus/tandem-budget.rules.yml` records and
//! alerts on them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use crate::http::metrics::RequestMetrics;

/// What the budget is computed over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetSettings {
    pub window: Duration,
    /// Below this many requests per second, nothing is reported.
    pub min_rps: f64,
}

/// The counters at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since the sampler started.
    pub at: f64,
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub requests: u64,
}

/// The proxy's cost over a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub window_seconds: f64,
    pub requests_per_second: f64,
    pub cpu_cores: f64,
    pub cpu_cores_per_thousand_rps: f64,
    pub resident_bytes: u64,
    pub resident_bytes_per_thousand_rps: f64,
}

/// The cost between two samples (memory as of the newer), or nothing when the window
/// is empty or the rate is under `min_rps`.
pub fn budget(oldest: &Sample, newest: &Sample, min_rps: f64) -> Option<Budget> {
    let window = newest.at - oldest.at;
    if window <= 0.0 || newest.requests < oldest.requests {
        return None;
    }
    let rps = (newest.requests - oldest.requests) as f64 / window;
    if rps < min_rps || rps <= 0.0 {
        return None;
    }
    let cores = (newest.cpu_seconds - oldest.cpu_seconds).max(0.0) / window;
    let thousands = rps / 1000.0;
    Some(Budget {
        window_seconds: window,
        requests_per_second: rps,
        cpu_cores: cores,
        cpu_cores_per_thousand_rps: cores / thousands,
        resident_bytes: newest.resident_bytes,
        resident_bytes_per_thousand_rps: newest.resident_bytes as f64 / thousands,
    })
}

/// The samples of the current window and the figures they give.
#[derive(Debug)]
pub struct BudgetMeter {
    settings: BudgetSettings,
    samples: Mutex<VecDeque<Sample>>,
    current: Mutex<Option<Budget>>,
}

impl BudgetMeter {
    pub fn new(settings: BudgetSettings) -> BudgetMeter {
        BudgetMeter {
            settings,
            samples: Mutex::default(),
            current: Mutex::default(),
        }
    }

    /// How often the sampler runs: four samples per window, at most one a second.
    pub fn interval(&self) -> Duration {
        (self.settings.window / 4).clamp(Duration::from_millis(250), Duration::from_secs(1))
    }

    /// Adds a sample, forgets those older than the window, and updates the figures.
    pub fn add(&self, sample: Sample) {
        let window = self.settings.window.as_secs_f64();
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back(sample);
        while samples
            .get(1)
            .is_some_and(|second| sample.at - second.at >= window)
        {
            samples.pop_front();
        }
        let figures = match (samples.front(), samples.back()) {
            (Some(oldest), Some(newest)) => budget(oldest, newest, self.settings.min_rps),
            _ => None,
        };
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = figures;
    }

    pub fn current(&self) -> Option<Budget> {
        *self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Samples the proxy's counters until the process ends.
pub async fn sample(meter: Arc<BudgetMeter>, requests: [Arc<RequestMetrics>; 2]) {
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(meter.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some((cpu_seconds, resident_bytes)) = super::process::cpu_and_resident() else {
            continue;
        };
        meter.add(Sample {
            at: started.elapsed().as_secs_f64(),
            cpu_seconds,
            resident_bytes,
            requests: requests.iter().map(|r| r.requests_total()).sum(),
        });
    }
}

/// Encodes the figures at scrape time, when there are any.
#[derive(Debug)]
pub struct BudgetCollector {
    pub meter: Arc<BudgetMeter>,
}

impl Collector for BudgetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(budget) = self.meter.current() else {
            return Ok(());
        };
        let gauges: [(&str, &str, f64); 6] = [
            (
                "tandem_budget_window_seconds",
                "The window the budget figures were computed over",
                budget.window_seconds,
            ),
            (
                "tandem_budget_requests_per_second",
                "HTTP requests per second through the proxy (both directions) over the window",
                budget.requests_per_second,
            ),
            (
                "tandem_budget_cpu_cores",
                "CPU cores the proxy used over the window",
                budget.cpu_cores,
            ),
            (
                "tandem_budget_cpu_cores_per_thousand_rps",
                "CPU cores per 1,000 requests/s over the window (Linkerd's budget: 0.25)",
                budget.cpu_cores_per_thousand_rps,
            ),
            (
                "tandem_budget_resident_memory_bytes",
                "Resident memory at the end of the window",
                budget.resident_bytes as f64,
            ),
            (
                "tandem_budget_resident_memory_bytes_per_thousand_rps",
                "Resident memory per 1,000 requests/s over the window (Linkerd's budget: 20 MB)",
                budget.resident_bytes_per_thousand_rps,
            ),
        ];
        for (name, help, value) in gauges {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, cpu_seconds: f64, requests: u64) -> Sample {
        Sample {
            at,
            cpu_seconds,
            resident_bytes: 10_000_000,
            requests,
        }
    }

    #[test]
    fn figures_over_a_window() {
        type Row = (&'static str, Sample, Sample, Option<(f64, f64, f64)>);
        let rows: [Row; 5] = [
            (
                "1,000 rps on a tenth of a core",
                sample(0.0, 1.0, 0),
                sample(10.0, 2.0, 10_000),
                Some((1000.0, 0.1, 10_000_000.0)),
            ),
            (
                "500 rps on a fifth of a core: 0.4 cores per 1,000",
                sample(5.0, 0.0, 1_000),
                sample(15.0, 2.0, 6_000),
                Some((500.0, 0.4, 20_000_000.0)),
            ),
            (
                "under the minimum rate: nothing",
                sample(0.0, 0.0, 0),
                sample(10.0, 1.0, 50),
                None,
            ),
            (
                "an empty window",
                sample(3.0, 0.0, 0),
                sample(3.0, 1.0, 100),
                None,
            ),
            (
                "counters that went back: nothing",
                sample(0.0, 0.0, 500),
                sample(10.0, 1.0, 100),
                None,
            ),
        ];
        for (what, oldest, newest, expected) in rows {
            let got = budget(&oldest, &newest, 10.0).map(|b| {
                (
                    b.requests_per_second,
                    b.cpu_cores_per_thousand_rps,
                    b.resident_bytes_per_thousand_rps,
                )
            });
            assert_eq!(got, expected, "{what}");
        }
    }

    #[test]
    fn the_window_slides() {
        let meter = BudgetMeter::new(BudgetSettings {
            window: Duration::from_secs(10),
            min_rps: 1.0,
        });
        assert_eq!(meter.interval(), Duration::from_secs(1));
        meter.add(sample(0.0, 0.0, 0));
        assert_eq!(meter.current(), None, "one sample is no window");
        for second in 1..=30u32 {
            // 100 rps for 20 s, then 10 rps.
            let requests = 100 * second.min(20) + 10 * second.saturating_sub(20);
            meter.add(sample(f64::from(second), 0.0, u64::from(requests)));
        }
        let budget = meter.current().expect("figures");
        assert_eq!(budget.window_seconds, 10.0);
        assert_eq!(budget.requests_per_second, 10.0);
    }
}
