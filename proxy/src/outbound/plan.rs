//! What the outbound side decides for one connection, as a value.
//!
//! [`plan`] is a pure function of what is known about the connection so far
//! ([`Facts`]). Until it knows enough it asks for the next fact ([`Step::Discover`],
//! then [`Step::Detect`] unless the destination is opaque); then it says what to do
//! ([`OutboundPlan`]), and `outbound/mod.rs` does it. New inputs (endpoints from the
//! control plane, routes, policy) are new fields of [`Facts`] and new variants of the
//! plan, tested here in a table, not branches inside the I/O.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::discover::Endpoint;
use crate::http::client::PoolKey;
use crate::http::{Role, Route};
use crate::mesh::tls::{NoTlsReason, TlsStatus};
use crate::mesh::PeerId;
use crate::net::detect::Protocol;
use crate::net::error::ConnError;

/// Settings that shape every outbound plan.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// The proxy has a mesh identity, so it can originate mTLS.
    pub meshed: bool,
    /// Offer peer proxies a carrier for opaque connections (`TANDEM_OUTBOUND_OPAQUE_CARRIER`).
    pub carrier: bool,
}

/// What is known about an outbound connection.
#[derive(Clone, Debug)]
pub struct Facts {
    pub orig_dst: SocketAddr,
    /// The listener's own address.
    pub local: SocketAddr,
    /// The original destination's port is in the outbound opaque-port list.
    pub opaque_port: bool,
    /// What discovery said, once asked: `Some(None)` for a destination it does not
    /// know.
    pub discovered: Option<Option<Arc<Endpoint>>>,
    pub detection: Detection,
    pub settings: Settings,
}

/// Where protocol detection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detection {
    NotYet,
    /// The destination is opaque: the client's bytes are not looked at.
    Skipped,
    Detected(Protocol),
}

/// The next thing to do with a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Ask discovery about the original destination.
    Discover,
    /// Read the client's first bytes to learn its protocol.
    Detect,
    /// Do not read them: the destination is opaque.
    SkipDetection,
    Go(OutboundPlan),
}

/// What to do with an outbound connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboundPlan {
    Refuse(ConnError),
    /// Serve it request by request (`http/`) with the server for `protocol`.
    Http {
        protocol: Protocol,
        route: Route,
    },
    /// Unmeshed: the bytes go to the original destination as they are.
    Tcp {
        target: SocketAddr,
    },
    /// Meshed, not HTTP: mesh TLS to the original destination, where the peer's
    /// rules hand the connection to its proxy, which detects what follows.
    MeshTls {
        target: SocketAddr,
        peer: PeerId,
    },
    /// Meshed and opaque: to the peer proxy's inbound port, which learns the real
    /// `port` from a transport header or from the carrier stream it arrives on.
    Opaque {
        proxy: SocketAddr,
        peer: PeerId,
        port: u16,
        via: OpaqueVia,
    },
}

/// How a meshed opaque connection reaches the peer proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpaqueVia {
    /// A connection of its own, starting with Linkerd's transport header.
    Header,
    /// A stream of the pooled carrier to that proxy, falling back to the header for
    /// a proxy that takes no carrier.
    Carrier,
}

/// The next step for a connection, given `facts`.
pub fn plan(facts: &Facts) -> Step {
    // A connection straight to the outbound listener, or to loopback (never
    // redirected to us by the rules), would make the proxy connect to itself.
    if facts.orig_dst == facts.local || facts.orig_dst.ip().is_loopback() {
        return Step::Go(OutboundPlan::Refuse(ConnError::Loop));
    }
    let Some(endpoint) = &facts.discovered else {
        return Step::Discover;
    };
    let endpoint = endpoint.as_deref();
    let opaque = facts.opaque_port || endpoint.is_some_and(|e| e.opaque);
    let protocol = match &facts.detection {
        Detection::NotYet if opaque => return Step::SkipDetection,
        Detection::NotYet => return Step::Detect,
        Detection::Skipped => Protocol::Unknown,
        Detection::Detected(protocol) => protocol.clone(),
    };
    let peer = endpoint.filter(|_| facts.settings.meshed).and_then(peer_of);
    if matches!(protocol, Protocol::Http1 | Protocol::Http2) {
        let h2_upgrade = peer.is_some() && endpoint.is_some_and(|e| e.http2);
        let tls = match &peer {
            Some(peer) => TlsStatus::Established(Some(peer.identity.clone())),
            None => TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery),
        };
        let route = Route {
            pool: PoolKey {
                target: facts.orig_dst,
                peer,
                // Recorded even when requests go on over HTTP/2: an Upgrade or
                // CONNECT stays HTTP/1 to the peer, and which request is one is
                // known only after its head was parsed.
                http1_case: protocol == Protocol::Http1,
            },
            role: Role::Outbound { h2_upgrade },
            tls,
        };
        return Step::Go(OutboundPlan::Http { protocol, route });
    }
    let plan = match (peer, endpoint) {
        (None, _) | (_, None) => OutboundPlan::Tcp {
            target: facts.orig_dst,
        },
        // Opaque traffic goes to the peer proxy's inbound port, since it cannot be
        // detected there; everything else to the original destination, where the
        // peer's rules hand it to its proxy.
        (Some(peer), Some(endpoint)) if opaque => OutboundPlan::Opaque {
            proxy: SocketAddr::new(facts.orig_dst.ip(), endpoint.inbound_port),
            peer,
            port: facts.orig_dst.port(),
            via: if facts.settings.carrier {
                OpaqueVia::Carrier
            } else {
                OpaqueVia::Header
            },
        },
        (Some(peer), Some(_)) => OutboundPlan::MeshTls {
            target: facts.orig_dst,
            peer,
        },
    };
    Step::Go(plan)
}

/// The peer an endpoint names: its identity, and the SNI to reach it by (the
/// identity itself unless discovery gave a server name).
fn peer_of(endpoint: &Endpoint) -> Option<PeerId> {
    let identity = endpoint.identity.clone()?;
    let sni = endpoint
        .server_name
        .clone()
        .unwrap_or_else(|| identity.clone());
    Some(PeerId { identity, sni })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "web.ns.serviceaccount.identity.linkerd.cluster.local";

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn endpoint(identity: Option<&str>, opaque: bool, http2: bool) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            identity: identity.map(Arc::from),
            server_name: None,
            opaque,
            http2,
            inbound_port: 4143,
        })
    }

    fn facts(dst: &str) -> Facts {
        Facts {
            orig_dst: addr(dst),
            local: addr("127.0.0.1:4140"),
            opaque_port: false,
            discovered: None,
            detection: Detection::NotYet,
            settings: Settings {
                meshed: true,
                carrier: false,
            },
        }
    }

    fn web() -> PeerId {
        PeerId {
            identity: Arc::from(WEB),
            sni: Arc::from(WEB),
        }
    }

    fn http(target: &str, peer: Option<PeerId>, h2_upgrade: bool, http1: bool) -> Step {
        let tls = match &peer {
            Some(p) => TlsStatus::Established(Some(p.identity.clone())),
            None => TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery),
        };
        let protocol = if http1 {
            Protocol::Http1
        } else {
            Protocol::Http2
        };
        Step::Go(OutboundPlan::Http {
            protocol,
            route: Route {
                pool: PoolKey {
                    target: addr(target),
                    peer,
                    http1_case: http1,
                },
                role: Role::Outbound { h2_upgrade },
                tls,
            },
        })
    }

    /// Every branch of the outbound decision, one row each.
    #[test]
    fn outbound_plans() {
        let meshed = Some(Some(endpoint(Some(WEB), false, false)));
        let meshed_h2 = Some(Some(endpoint(Some(WEB), false, true)));
        let meshed_opaque = Some(Some(endpoint(Some(WEB), true, false)));
        let unmeshed = Some(Some(endpoint(None, false, true)));
        let detected = |p: Protocol| Detection::Detected(p);
        let tls = || Protocol::Tls {
            sni: Some("app.example".into()),
        };
        let dst = "10.0.0.7:8080";
        let header = |carrier| OutboundPlan::Opaque {
            proxy: addr("10.0.0.7:4143"),
            peer: web(),
            port: 8080,
            via: carrier,
        };
        type Row = (
            &'static str,
            &'static str,
            bool,
            Option<Option<Arc<Endpoint>>>,
            Detection,
            Settings,
            Step,
        );
        let on = Settings {
            meshed: true,
            carrier: false,
        };
        let carrier = Settings {
            meshed: true,
            carrier: true,
        };
        let no_identity = Settings {
            meshed: false,
            carrier: false,
        };
        let rows: Vec<Row> = vec![
            (
                "a connection to the listener itself loops",
                "127.0.0.1:4140",
                false,
                None,
                Detection::NotYet,
                on,
                Step::Go(OutboundPlan::Refuse(ConnError::Loop)),
            ),
            (
                "so does one to loopback",
                "127.0.0.1:8080",
                false,
                None,
                Detection::NotYet,
                on,
                Step::Go(OutboundPlan::Refuse(ConnError::Loop)),
            ),
            (
                "discovery comes first",
                dst,
                false,
                None,
                Detection::NotYet,
                on,
                Step::Discover,
            ),
            (
                "then detection",
                dst,
                false,
                Some(None),
                Detection::NotYet,
                on,
                Step::Detect,
            ),
            (
                "an opaque port is not detected",
                dst,
                true,
                Some(None),
                Detection::NotYet,
                on,
                Step::SkipDetection,
            ),
            (
                "nor is a destination discovery calls opaque",
                dst,
                false,
                meshed_opaque.clone(),
                Detection::NotYet,
                on,
                Step::SkipDetection,
            ),
            (
                "unknown destinations are forwarded unmeshed",
                dst,
                false,
                Some(None),
                detected(Protocol::Unknown),
                on,
                Step::Go(OutboundPlan::Tcp { target: addr(dst) }),
            ),
            (
                "unmeshed HTTP is served per request, in plaintext",
                dst,
                false,
                Some(None),
                detected(Protocol::Http1),
                on,
                http(dst, None, false, true),
            ),
            (
                "an unmeshed peer is not upgraded, even if marked http2",
                dst,
                false,
                unmeshed.clone(),
                detected(Protocol::Http1),
                on,
                http(dst, None, false, true),
            ),
            (
                "meshed HTTP/1 without http2 stays HTTP/1",
                dst,
                false,
                meshed.clone(),
                detected(Protocol::Http1),
                on,
                http(dst, Some(web()), false, true),
            ),
            (
                "meshed HTTP/1 to an http2 peer is upgraded",
                dst,
                false,
                meshed_h2.clone(),
                detected(Protocol::Http1),
                on,
                http(dst, Some(web()), true, true),
            ),
            (
                "meshed HTTP/2 keeps no HTTP/1 header case",
                dst,
                false,
                meshed_h2.clone(),
                detected(Protocol::Http2),
                on,
                http(dst, Some(web()), true, false),
            ),
            (
                "meshed TCP is mesh TLS to the original destination",
                dst,
                false,
                meshed.clone(),
                detected(Protocol::Unknown),
                on,
                Step::Go(OutboundPlan::MeshTls {
                    target: addr(dst),
                    peer: web(),
                }),
            ),
            (
                "so is the application's own TLS (mesh TLS around it)",
                dst,
                false,
                meshed.clone(),
                detected(tls()),
                on,
                Step::Go(OutboundPlan::MeshTls {
                    target: addr(dst),
                    peer: web(),
                }),
            ),
            (
                "meshed opaque by port goes to the peer proxy with a header",
                dst,
                true,
                meshed.clone(),
                Detection::Skipped,
                on,
                Step::Go(header(OpaqueVia::Header)),
            ),
            (
                "meshed opaque by discovery likewise",
                dst,
                false,
                meshed_opaque.clone(),
                Detection::Skipped,
                on,
                Step::Go(header(OpaqueVia::Header)),
            ),
            (
                "with carriers on, on a carrier",
                dst,
                false,
                meshed_opaque.clone(),
                Detection::Skipped,
                carrier,
                Step::Go(header(OpaqueVia::Carrier)),
            ),
            (
                "unmeshed opaque is plain TCP",
                dst,
                true,
                Some(None),
                Detection::Skipped,
                on,
                Step::Go(OutboundPlan::Tcp { target: addr(dst) }),
            ),
            (
                "without an identity of our own nothing is meshed",
                dst,
                false,
                meshed_opaque.clone(),
                Detection::Skipped,
                no_identity,
                Step::Go(OutboundPlan::Tcp { target: addr(dst) }),
            ),
            (
                "nor is HTTP",
                dst,
                false,
                meshed_h2.clone(),
                detected(Protocol::Http1),
                no_identity,
                http(dst, None, false, true),
            ),
        ];
        for (what, dst, opaque_port, discovered, detection, settings, expected) in rows {
            let facts = Facts {
                opaque_port,
                discovered,
                detection,
                settings,
                ..facts(dst)
            };
            assert_eq!(plan(&facts), expected, "{what}");
        }
    }

    #[test]
    fn a_spiffe_peer_is_asked_for_by_its_server_name() {
        let spiffe = Arc::new(Endpoint {
            identity: Some(Arc::from("spiffe://example.org/vm")),
            server_name: Some(Arc::from("vm.example.org")),
            opaque: false,
            http2: false,
            inbound_port: 4143,
        });
        let facts = Facts {
            discovered: Some(Some(spiffe)),
            detection: Detection::Detected(Protocol::Unknown),
            ..facts("10.0.0.7:9000")
        };
        let Step::Go(OutboundPlan::MeshTls { peer, .. }) = plan(&facts) else {
            panic!("meshed TCP expected");
        };
        assert_eq!(&*peer.identity, "spiffe://example.org/vm");
        assert_eq!(&*peer.sni, "vm.example.org");
    }
}
