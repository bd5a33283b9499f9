//! Metrics of discovery: the health of the control-plane streams, and the endpoints
//! of each balancer.
//!
//! - `tandem_control_stream_errors_total{api}` and
//!   `tandem_control_stream_reconnects_total{api}` (`api` = `destination`, `profile`,
//!   `policy`): Linkerd counts neither, so an operator cannot tell a flapping
//!   control plane from a quiet one; these are Tandem's own names.
//! - `outbound_http_balancer_endpoints{parent_*, backend_*, endpoint_state}`:
//!   Linkerd's gauge, endpoints `ready` or `pending` (backed off) per balancer,
//!   read at scrape time from the live balancers (balancers with the same names,
//!   one per original destination of one Service, are summed).

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, LabelSetEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::discover::balance::{BalancerName, BalancerRegistry};

/// A control-plane API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Destination,
    Profile,
    Policy,
}

impl Api {
    const ALL: [Api; 3] = [Api::Destination, Api::Profile, Api::Policy];

    fn label(self) -> &'static str {
        match self {
            Api::Destination => "destination",
            Api::Profile => "profile",
            Api::Policy => "policy",
        }
    }
}

/// Counters of the control-plane streams, resolved at start-up.
#[derive(Debug)]
pub struct ControlMetrics {
    errors: Vec<Counter>,
    reconnects: Vec<Counter>,
}

impl ControlMetrics {
    pub fn register(registry: &mut Registry) -> ControlMetrics {
        let errors = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "tandem_control_stream_errors",
            "Control-plane streams that failed or could not be opened, by API",
            errors.clone(),
        );
        let reconnects = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "tandem_control_stream_reconnects",
            "Control-plane streams opened again after one ended, by API",
            reconnects.clone(),
        );
        let per_api = |family: &Family<[(&'static str, &'static str); 1], Counter>| {
            Api::ALL
                .iter()
                .map(|api| family.get_or_create(&[("api", api.label())]).clone())
                .collect()
        };
        ControlMetrics {
            errors: per_api(&errors),
            reconnects: per_api(&reconnects),
        }
    }

    pub fn error(&self, api: Api) {
        self.errors[api as usize].inc();
    }

    pub fn reconnect(&self, api: Api) {
        self.reconnects[api as usize].inc();
    }
}

/// Encodes `outbound_http_balancer_endpoints` at scrape time.
#[derive(Debug)]
pub struct BalancerCollector {
    pub balancers: Arc<BalancerRegistry>,
}

impl std::fmt::Debug for BalancerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BalancerRegistry")
    }
}

struct EndpointLabels<'a> {
    name: &'a BalancerName,
    state: &'static str,
}

impl EncodeLabelSet for EndpointLabels<'_> {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        for (name, value) in self.name.parent.iter().chain(self.name.backend.iter()) {
            (name, value).encode(encoder.encode_label())?;
        }
        ("endpoint_state", self.state).encode(encoder.encode_label())
    }
}

impl Collector for BalancerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut totals: BTreeMap<BalancerName, (i64, i64)> = BTreeMap::new();
        for balancer in self.balancers.live() {
            let (ready, pending) = balancer.readiness();
            let total = totals.entry(balancer.name.clone()).or_default();
            total.0 += ready as i64;
            total.1 += pending as i64;
        }
        let mut family = encoder.encode_descriptor(
            "outbound_http_balancer_endpoints",
            "The number of endpoints of a balancer, by state",
            None,
            MetricType::Gauge,
        )?;
        for (name, (ready, pending)) in &totals {
            for (state, count) in [("ready", ready), ("pending", pending)] {
                family
                    .encode_family(&EndpointLabels { name, state })?
                    .encode_gauge(count)?;
            }
        }
        Ok(())
    }
}
