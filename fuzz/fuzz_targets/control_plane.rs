//! Fuzzes what the proxy reads from Linkerd's control plane: any bytes cut into
//! gRPC messages (arriving in frames of any size), and decoded as a
//! `Destination.Get` update, an outbound policy, a profile and an inbound `Server`,
//! then read into the proxy's model (endpoints, the endpoint set's rules, the
//! destination's shape, a port's policy and its decisions for a request), never
//! panic.
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
