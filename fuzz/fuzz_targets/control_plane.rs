//! Fuzzes what the proxy reads from Linkerd's control plane: any bytes cut into
//! gRPC messages (arriving in frames of any size), and decoded as a
//! `Destination.Get` update, an outbound policy, a profile and an inbound `Server`,
//! then read into the proxy's model (endpoints, the endpoint set's rules, the
//! destination's shape, the outbound routes and the rule and split a request takes,
//! a port's policy and its decisions for a request), never panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use linkerd2_proxy_api::destination::{DestinationProfile, Update, WeightedAddr};
use linkerd2_proxy_api::inbound::Server;
use linkerd2_proxy_api::outbound::OutboundPolicy;
use prost::Message;
use tandem_proxy::discover::inbound_policy::{
    authorize_request, authorize_tcp, read_server, Client,
};
use tandem_proxy::discover::linkerd::grpc::Framer;
use tandem_proxy::discover::linkerd::translate::{endpoint, spec, EndpointSet, PolicyAnswer};
use tandem_proxy::discover::outbound_routes::{
    pick_weighted, read_grpc_routes, read_http_routes, select, Distribution, RouteTable, Rule,
};
use tandem_proxy::http::route_decide::{choose_backend, request_filters, response_filters};
use tandem_proxy::discover::Labels;
use tandem_proxy::mesh::tls::TlsStatus;

fuzz_target!(|data: &[u8]| {
    // Several messages from one input: split at the first byte's position.
    let cut = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
    let (first, second) = data.split_at(cut);
    let target = "10.96.0.10:80".parse().unwrap();
    let mut set = EndpointSet::default();
    for bytes in [first, second] {
        if let Ok(update) = Update::decode(bytes) {
            set.apply(&update);
            set.reconnected();
            set.apply(&update);
            let _ = set.endpoints();
        }
        if let Ok(addr) = WeightedAddr::decode(bytes) {
            let _ = endpoint(&addr, &HashMap::new());
        }
    }
    let policy = OutboundPolicy::decode(first).ok();
    if let Some(policy) = &policy {
        outbound_routes(policy, target);
    }
    let profile = DestinationProfile::decode(second).ok();
    let answer = match policy {
        Some(policy) => PolicyAnswer::Policy(Box::new(policy)),
        None => PolicyAnswer::Unknown,
    };
    let _ = spec(target, &answer, profile.as_ref());

    if let Ok(server) = Server::decode(data) {
        if let Ok(policy) = read_server(&server) {
            let client = Client {
                ip: "10.1.2.3".parse().unwrap(),
                tls: TlsStatus::Established(Some(
                    "a.ns.serviceaccount.identity.linkerd.cluster.local".into(),
                )),
            };
            let _ = authorize_tcp(&policy, &client);
            let uri = hyper::Uri::from_static("/api/v1/users?x=1");
            let headers = hyper::HeaderMap::new();
            let _ = authorize_request(
                &policy,
                &client,
                &hyper::Method::GET,
                &uri,
                &headers,
                Some("web:80"),
            );
        }
    }

    // The same bytes as a stream's body, in frames of any size.
    let frame = usize::from(data.get(1).copied().unwrap_or(1)).max(1);
    let mut framer = Framer::default();
    for piece in data.chunks(frame) {
        framer.push(piece);
        while let Ok(Some(message)) = framer.next_message() {
            if let Ok(update) = Update::decode(message) {
                set.apply(&update);
            }
        }
    }
});

/// Reads every route table the policy carries, and picks a request's rule and backend.
fn outbound_routes(policy: &OutboundPolicy, target: std::net::SocketAddr) {
    use linkerd2_proxy_api::outbound::proxy_protocol::Kind;
    let parent = Labels::default();
    let tables: Vec<RouteTable> = match policy.protocol.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(Kind::Detect(detect)) => {
            let http1 = detect.http1.as_ref().map(|h| &h.routes[..]);
            let http2 = detect.http2.as_ref().map(|h| &h.routes[..]);
            [http1, http2]
                .into_iter()
                .flatten()
                .map(|routes| read_http_routes(routes, &parent, target))
                .collect()
        }
        Some(Kind::Http1(h)) => vec![read_http_routes(&h.routes, &parent, target)],
        Some(Kind::Http2(h)) => vec![read_http_routes(&h.routes, &parent, target)],
        Some(Kind::Grpc(g)) => vec![read_grpc_routes(&g.routes, &parent, target)],
        _ => Vec::new(),
    };
    let uri = hyper::Uri::from_static("/pkg.Service/Method?x=1");
    let headers = hyper::HeaderMap::new();
    for table in &tables {
        let Some(selected) = select(table, &hyper::Method::POST, &uri, &headers, Some("web:80"))
        else {
            continue;
        };
        let rule = &table.routes[selected.route].rules[selected.rule];
        if let Distribution::RandomAvailable(backends) = &rule.backends {
            let weights: Vec<u32> = backends.iter().map(|(_, weight)| *weight).collect();
            let _ = pick_weighted(&weights, u32::MAX);
        }
        decide(rule, &uri);
    }
}

/// A rule's per-request decisions on what the policy said: filters (header changes
/// from the policy's names and values, redirect locations), the backend drawn.
fn decide(rule: &Rule, uri: &hyper::Uri) {
    let mut headers = hyper::HeaderMap::new();
    let mut draw = || 0x8000_0000u32;
    let _ = request_filters(&rule.filters, &mut headers, uri, Some("web:80"), Some(4), &mut draw);
    let _ = choose_backend(&rule.backends, |b| b.slot % 2 == 0, &mut draw);
    response_filters(&rule.filters, &mut headers);
}
