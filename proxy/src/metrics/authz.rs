//! Inbound authorization decisions, counted under Linkerd's names and labels
//! (`linkerd-control-plane.md` §7.2) so that its policy dashboards carry over:
//!
//! - `inbound_tcp_authz_allow_total{target_*, srv_*, authz_*, tls…}` and
//!   `inbound_tcp_authz_deny_total{target_*, srv_*, tls…}`: connections forwarded
//!   as bytes;
//! - `inbound_http_authz_allow_total{target_*, srv_*, route_*, authz_*, tls…}`,
//!   `inbound_http_authz_deny_total{target_*, srv_*, route_*, tls…}` and
//!   `inbound_http_route_not_found_total{target_*, srv_*, tls…}`: requests.
//!
//! The label sets are bounded by the pod's ports and the policies' resources (and,
//! as in Linkerd, by the client identities seen).

use std::net::SocketAddr;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::discover::inbound_policy::{Meta, ServerPolicy};
use crate::mesh::tls::TlsStatus;

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Default)]
pub struct AuthzMetrics {
    tcp_allow: Family<Labels, Counter>,
    tcp_deny: Family<Labels, Counter>,
    http_allow: Family<Labels, Counter>,
    http_deny: Family<Labels, Counter>,
    route_not_found: Family<Labels, Counter>,
}

/// What every decision is labelled with: the target, the server, the client's TLS.
pub struct Subject<'a> {
    pub target: SocketAddr,
    pub policy: &'a ServerPolicy,
    pub tls: &'a TlsStatus,
}

impl AuthzMetrics {
    pub fn register(registry: &mut Registry) -> AuthzMetrics {
        let metrics = AuthzMetrics::default();
        for (name, help, family) in [
            (
                "inbound_tcp_authz_allow",
                "Inbound TCP connections authorized",
                &metrics.tcp_allow,
            ),
            (
                "inbound_tcp_authz_deny",
                "Inbound TCP connections denied",
                &metrics.tcp_deny,
            ),
            (
                "inbound_http_authz_allow",
                "Inbound HTTP requests authorized",
                &metrics.http_allow,
            ),
            (
                "inbound_http_authz_deny",
                "Inbound HTTP requests denied",
                &metrics.http_deny,
            ),
            (
                "inbound_http_route_not_found",
                "Inbound HTTP requests that matched no route",
                &metrics.route_not_found,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        metrics
    }

    pub fn tcp_allowed(&self, subject: &Subject, authz: &Meta) {
        let mut labels = target_and_server(subject);
        meta(&mut labels, AUTHZ, authz);
        tls(&mut labels, subject.tls);
        self.tcp_allow.get_or_create(&labels).inc();
    }

    pub fn tcp_denied(&self, subject: &Subject) {
        let mut labels = target_and_server(subject);
        tls(&mut labels, subject.tls);
        self.tcp_deny.get_or_create(&labels).inc();
    }

    /// The counter of requests allowed on `route` by `authz`, for a connection to
    /// keep while its requests keep taking that route.
    pub fn http_allowed(&self, subject: &Subject, route: &Meta, authz: &Meta) -> Counter {
        let mut labels = target_and_server(subject);
        meta(&mut labels, ROUTE, route);
        meta(&mut labels, AUTHZ, authz);
        tls(&mut labels, subject.tls);
        self.http_allow.get_or_create(&labels).clone()
    }

    pub fn http_denied(&self, subject: &Subject, route: &Meta) {
        let mut labels = target_and_server(subject);
        meta(&mut labels, ROUTE, route);
        tls(&mut labels, subject.tls);
        self.http_deny.get_or_create(&labels).inc();
    }

    pub fn route_not_found(&self, subject: &Subject) {
        let mut labels = target_and_server(subject);
        tls(&mut labels, subject.tls);
        self.route_not_found.get_or_create(&labels).inc();
    }
}

fn target_and_server(subject: &Subject) -> Labels {
    let mut labels = vec![
        ("target_addr", subject.target.to_string()),
        ("target_ip", subject.target.ip().to_string()),
        ("target_port", subject.target.port().to_string()),
    ];
    meta(&mut labels, SRV, &subject.policy.meta);
    labels.push(("srv_port", subject.target.port().to_string()));
    labels
}

const SRV: [&str; 3] = ["srv_group", "srv_kind", "srv_name"];
const ROUTE: [&str; 3] = ["route_group", "route_kind", "route_name"];
const AUTHZ: [&str; 3] = ["authz_group", "authz_kind", "authz_name"];

fn meta(labels: &mut Labels, [group, kind, name]: [&'static str; 3], meta: &Meta) {
    labels.push((group, meta.group.to_string()));
    labels.push((kind, meta.kind.to_string()));
    labels.push((name, meta.name.to_string()));
}

fn tls(labels: &mut Labels, tls: &TlsStatus) {
    match tls {
        TlsStatus::NoIdentity(reason) => {
            labels.push(("tls", "no_identity".into()));
            labels.push(("no_tls_reason", reason.label().into()));
        }
        TlsStatus::Opaque => labels.push(("tls", "opaque".into())),
        TlsStatus::Established(id) => {
            labels.push(("tls", "true".into()));
            labels.push(("client_id", id.as_deref().unwrap_or("").into()));
        }
    }
}
