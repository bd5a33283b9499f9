//! Prometheus metrics for the proxy-side client ([`IdentityMetrics`]) and the
//! issuer service (`IssuerMetrics`, with the `issuer` feature).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::time::SystemTime;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[cfg(feature = "issuer")]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The proxy's certificate metrics, registered under Tandem's names and under
/// Linkerd's names (`identity_cert_refresh_count`, `control_identity_*`) so existing
/// dashboards and alerts work.
#[derive(Clone, Debug, Default)]
pub struct IdentityMetrics {
    expiration: Gauge,
    refresh: Gauge,
    /// Successful refreshes, as linkerd2-proxy's `identity_cert_refresh_count`. A
    /// gauge only because a counter would be exposed with a `_total` suffix, and
    /// queries name the series exactly.
    refresh_count: Gauge,
    refreshes: Family<ResultLabel, Counter>,
    linkerd_refreshes: Family<ResultLabel, Counter>,
}

impl IdentityMetrics {
    /// Registers the families in `registry`:
    /// `identity_cert_expiration_timestamp_seconds`,
    /// `identity_cert_refresh_timestamp_seconds`,
    /// `identity_cert_refresh_total{result="ok"|"failure"}`, and Linkerd's
    /// `identity_cert_refresh_count`,
    /// `control_identity_cert_expiration_timestamp_seconds`,
    /// `control_identity_cert_refresh_timestamp_seconds`,
    /// `control_identity_cert_refreshes_total{result="ok"|"error"}`.
    pub fn register(registry: &mut Registry) -> IdentityMetrics {
        let m = IdentityMetrics::default();
        registry.register(
            "identity_cert_expiration_timestamp_seconds",
            "Expiry of the proxy's current certificate (Unix seconds)",
            m.expiration.clone(),
        );
        registry.register(
            "identity_cert_refresh_timestamp_seconds",
            "Time of the last successful certificate refresh (Unix seconds)",
            m.refresh.clone(),
        );
        registry.register(
            "identity_cert_refresh",
            "Certificate refresh attempts by result",
            m.refreshes.clone(),
        );
        registry.register(
            "identity_cert_refresh_count",
            "Successful certificate refreshes (Linkerd name; only ever increases)",
            m.refresh_count.clone(),
        );
        registry.register(
            "control_identity_cert_expiration_timestamp_seconds",
            "Expiry of the proxy's current certificate (Unix seconds; Linkerd name)",
            m.expiration.clone(),
        );
        registry.register(
            "control_identity_cert_refresh_timestamp_seconds",
            "Time of the last successful certificate refresh (Unix seconds; Linkerd name)",
            m.refresh.clone(),
        );
        registry.register(
            "control_identity_cert_refreshes",
            "Certificate refresh attempts by result (Linkerd name)",
            m.linkerd_refreshes.clone(),
        );
        m
    }

    pub(crate) fn refreshed(&self, at: SystemTime, not_after: SystemTime) {
        self.expiration.set(crate::pem::unix_secs(not_after));
        self.refresh.set(crate::pem::unix_secs(at));
        self.refresh_count.inc();
        self.refreshes
            .get_or_create(&ResultLabel { result: "ok" })
            .inc();
        self.linkerd_refreshes
            .get_or_create(&ResultLabel { result: "ok" })
            .inc();
    }

    pub(crate) fn failed(&self) {
        self.refreshes
            .get_or_create(&ResultLabel { result: "failure" })
            .inc();
        self.linkerd_refreshes
            .get_or_create(&ResultLabel { result: "error" })
            .inc();
    }
}

/// The issuer service's metrics.
#[cfg(feature = "issuer")]
#[derive(Clone, Debug, Default)]
pub struct IssuerMetrics {
    issued: Counter,
    refusals: Family<ReasonLabel, Counter>,
    issuer_expiry: Gauge,
    reloads: Family<ResultLabel, Counter>,
}

#[cfg(feature = "issuer")]
impl IssuerMetrics {
    /// Registers `identity_certificates_issued_total`,
    /// `identity_refusals_total{reason}`,
    /// `identity_issuer_expiry_timestamp_seconds` and
    /// `identity_issuer_reloads_total{result="ok"|"failure"}`.
    pub fn register(registry: &mut Registry) -> IssuerMetrics {
        let m = IssuerMetrics::default();
        registry.register(
            "identity_certificates_issued",
            "Certificates issued",
            m.issued.clone(),
        );
        registry.register(
            "identity_refusals",
            "Certification requests refused, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "identity_issuer_expiry_timestamp_seconds",
            "Expiry of the loaded issuer certificate chain (Unix seconds)",
            m.issuer_expiry.clone(),
        );
        registry.register(
            "identity_issuer_reloads",
            "Issuer file changes picked up (ok) or rejected (failure)",
            m.reloads.clone(),
        );
        m
    }

    pub(crate) fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "failure" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    pub(crate) fn issued(&self) {
        self.issued.inc();
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn issuer_expiry(&self, not_after: SystemTime) {
        self.issuer_expiry.set(crate::pem::unix_secs(not_after));
    }
}
