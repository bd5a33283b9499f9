//! What the outbound side decides for one connection, as values.
//!
//! [`plan`] is a pure function of what is known about the connection so far
//! ([`Facts`]). Until it knows enough it asks for the next fact ([`Need::Discover`],
//! then [`Need::Detect`] unless the destination is opaque); then it says what to do
//! ([`OutboundPlan`]). A byte stream goes to one endpoint of its destination's
//! backend, picked per connection; [`dial`] says how to reach that endpoint. HTTP is
//! served request by request, each request to an endpoint of its own
//! (`http::Target`). `outbound/mod.rs` does what they say. New inputs (routes,
//! policy) are new fields of [`Facts`] and new variants, tested here in a table, not
//! branches inside the I/O.

use std::net::SocketAddr;

use crate::discover::{Backend, Destination, DiscoveryError, Endpoint, Resolved};
use crate::http::errors::ErrorKind;
#[cfg(test)]
use crate::http::outbound_upstream;
use crate::http::{outbound_target, Role, Route, Target};
use crate::mesh::PeerId;
use crate::net::detect::Protocol;
use crate::net::error::ConnError;

/// Settings that shape every outbound plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// The original destination is one of the pod's own addresses
    /// (`LINKERD2_PROXY_INBOUND_IPS`): a local connection, never meshed.
    pub local_ip: bool,
    /// What discovery said, once asked.
    pub discovered: Option<Resolved>,
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
    /// The client said nothing within the server-first window.
    Silent,
}

/// The next thing to do with a connection.
// A step is matched as soon as it is returned and never held (the executor keeps
// only the small `Need` while it waits), so its size costs nothing; boxing the plan
// would cost an allocation per connection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Learn a fact first.
    Need(Need),
    Go(OutboundPlan),
}

/// The fact a connection's plan waits for. Apart from [`Step`] so that the executor
/// keeps only this small value, not a whole step, while it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Ask discovery about the original destination.
    Discover,
    /// Read the client's first bytes to learn its protocol.
    Detect,
    /// Do not read them: the destination is opaque.
    SkipDetection,
}

/// What to do with an outbound connection.
#[derive(Clone, Debug)]
pub enum OutboundPlan {
    Refuse(ConnError),
    /// Serve it request by request (`http/`) with the server for `protocol`.
    Http {
        protocol: Protocol,
        route: Route,
    },
    /// Carry its bytes to an endpoint of `backend` (`Forward` or `Balance`), reached
    /// as [`dial`] says; `opaque`: the destination is opaque.
    Tcp {
        backend: Backend,
        opaque: bool,
    },
    /// The client is silent: open the way to an endpoint of `backend` as for an
    /// opaque destination (so a peer proxy does not wait for it either), and let
    /// whichever side speaks first decide: the server's bytes make the connection
    /// opaque; the client's go back to detection.
    ServerFirst {
        backend: Backend,
    },
}

impl PartialEq for OutboundPlan {
    fn eq(&self, other: &OutboundPlan) -> bool {
        match (self, other) {
            (OutboundPlan::Refuse(a), OutboundPlan::Refuse(b)) => a == b,
            (
                OutboundPlan::Http {
                    protocol: p,
                    route: r,
                },
                OutboundPlan::Http {
                    protocol: q,
                    route: s,
                },
            ) => p == q && r == s,
            (
                OutboundPlan::Tcp {
                    backend: a,
                    opaque: x,
                },
                OutboundPlan::Tcp {
                    backend: b,
                    opaque: y,
                },
            ) => x == y && same_backend(a, b),
            (
                OutboundPlan::ServerFirst { backend: a },
                OutboundPlan::ServerFirst { backend: b },
            ) => same_backend(a, b),
            _ => false,
        }
    }
}

fn same_backend(a: &Backend, b: &Backend) -> bool {
    match (a, b) {
        (Backend::Forward(a), Backend::Forward(b)) => a == b,
        (Backend::Balance(a), Backend::Balance(b)) => std::sync::Arc::ptr_eq(a, b),
        (Backend::Refused(a), Backend::Refused(b)) => a == b,
        _ => false,
    }
}

/// How a byte stream reaches one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dial {
    /// Unmeshed: the bytes go to the endpoint as they are.
    Plain { addr: SocketAddr },
    /// Meshed, not opaque: mesh TLS to the endpoint, where the peer's rules hand the
    /// connection to its proxy, which detects what follows.
    MeshTls { addr: SocketAddr, peer: PeerId },
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
    let destination = match &facts.discovered {
        // The pod's own addresses are not asked about: they are never meshed.
        None if facts.local_ip => Ok(Destination::fallback(facts.orig_dst)),
        None => return Step::Need(Need::Discover),
        Some(resolved) => resolved.clone(),
    };
    let destination = match destination {
        Ok(destination) => destination,
        Err(DiscoveryError::Unavailable) => return unavailable(facts),
    };
    if let Backend::Refused(_) = destination.backend {
        return Step::Go(OutboundPlan::Refuse(ConnError::Forbidden));
    }
    let opaque = facts.opaque_port || destination.opaque;
    let protocol = match &facts.detection {
        Detection::NotYet if opaque => return Step::Need(Need::SkipDetection),
        Detection::NotYet => return Step::Need(Need::Detect),
        Detection::Skipped => Protocol::Unknown,
        Detection::Detected(protocol) => protocol.clone(),
        Detection::Silent => {
            return Step::Go(OutboundPlan::ServerFirst {
                backend: destination.backend.clone(),
            })
        }
    };
    let meshed = facts.settings.meshed;
    if matches!(protocol, Protocol::Http1 | Protocol::Http2) {
        let http1_case = protocol == Protocol::Http1;
        let target = outbound_target(&destination.backend, meshed, http1_case);
        let route = Route {
            role: Role::Outbound,
            logical: facts.orig_dst,
            target,
            http1_case,
            routes: destination.routes.clone(),
            meshed,
        };
        return Step::Go(OutboundPlan::Http { protocol, route });
    }
    Step::Go(OutboundPlan::Tcp {
        backend: destination.backend.clone(),
        opaque,
    })
}

/// The control plane could not be asked: HTTP gets an error response per request
/// (so it learns why), anything else is refused; never plaintext to a destination
/// that may be meshed.
fn unavailable(facts: &Facts) -> Step {
    match &facts.detection {
        Detection::NotYet if facts.opaque_port => Step::Need(Need::SkipDetection),
        Detection::NotYet => Step::Need(Need::Detect),
        Detection::Detected(protocol @ (Protocol::Http1 | Protocol::Http2)) => {
            Step::Go(OutboundPlan::Http {
                protocol: protocol.clone(),
                route: Route {
                    role: Role::Outbound,
                    logical: facts.orig_dst,
                    target: Target::Fail(ErrorKind::Discovery),
                    http1_case: *protocol == Protocol::Http1,
                    routes: None,
                    meshed: false,
                },
            })
        }
        _ => Step::Go(OutboundPlan::Refuse(ConnError::Discovery)),
    }
}

/// How a byte stream reaches `endpoint`, given whether its destination is `opaque`.
pub fn dial(endpoint: &Endpoint, opaque: bool, settings: Settings) -> Dial {
    let Some(peer) = peer_of(endpoint).filter(|_| settings.meshed) else {
        return Dial::Plain {
            addr: endpoint.addr,
        };
    };
    match endpoint.opaque_port {
        // Opaque traffic goes to the peer proxy's inbound port, since it cannot be
        // detected there; everything else to the endpoint, where the peer's rules
        // hand it to its proxy.
        Some(inbound_port) if opaque => Dial::Opaque {
            proxy: SocketAddr::new(endpoint.addr.ip(), inbound_port),
            peer,
            port: endpoint.addr.port(),
            via: if settings.carrier {
                OpaqueVia::Carrier
            } else {
                OpaqueVia::Header
            },
        },
        _ => Dial::MeshTls {
            addr: endpoint.addr,
            peer,
        },
    }
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
    use std::sync::Arc;

    use super::*;
    use crate::discover::balance::{Backoff, BalanceSettings, Balancer, BalancerName};
    use crate::discover::HttpVia;
    use crate::discover::Refusal;
    use crate::mesh::tls::{NoTlsReason, TlsStatus};

    const WEB: &str = "web.ns.serviceaccount.identity.linkerd.cluster.local";

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn endpoint(at: &str, identity: Option<&str>, http2: bool) -> Endpoint {
        Endpoint {
            identity: identity.map(Arc::from),
            http2,
            opaque_port: identity.map(|_| 4143),
            ..Endpoint::unmeshed(addr(at))
        }
    }

    fn destination(opaque: bool, backend: Backend) -> Option<Resolved> {
        Some(Ok(Arc::new(Destination {
            opaque,
            backend,
            routes: None,
        })))
    }

    fn forward(endpoint: Endpoint) -> Backend {
        Backend::Forward(Arc::new(endpoint))
    }

    fn facts(dst: &str) -> Facts {
        Facts {
            orig_dst: addr(dst),
            local: addr("127.0.0.1:4140"),
            opaque_port: false,
            local_ip: false,
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

    fn http(dst: &str, target: Target, http1: bool) -> Step {
        let protocol = if http1 {
            Protocol::Http1
        } else {
            Protocol::Http2
        };
        Step::Go(OutboundPlan::Http {
            protocol,
            route: Route {
                role: Role::Outbound,
                logical: addr(dst),
                target,
                http1_case: http1,
                routes: None,
                meshed: false,
            },
        })
    }

    fn balancer() -> Arc<Balancer> {
        Balancer::new(
            BalancerName::default(),
            BalanceSettings {
                backoff: Backoff {
                    min: std::time::Duration::from_millis(100),
                    max: std::time::Duration::from_secs(60),
                    jitter: 0.1,
                },
                default_rtt: std::time::Duration::from_millis(30),
                decay: std::time::Duration::from_secs(10),
            },
        )
    }

    /// Every branch of the outbound decision, one row each.
    #[test]
    fn outbound_plans() {
        let dst = "10.0.0.7:8080";
        let meshed = forward(endpoint(dst, Some(WEB), false));
        let meshed_h2 = forward(endpoint(dst, Some(WEB), true));
        let unmeshed = forward(endpoint(dst, None, true));
        let pods = balancer();
        let balanced = Backend::Balance(pods.clone());
        let detected = Detection::Detected;
        let tls = || Protocol::Tls {
            sni: Some("app.example".into()),
        };
        let upstream =
            |endpoint: Endpoint, http1| Target::Upstream(outbound_upstream(&endpoint, true, http1));
        let no_identity = Settings {
            meshed: false,
            carrier: false,
        };
        struct Row {
            what: &'static str,
            facts: Facts,
            expected: Step,
        }
        let row = |what, facts, expected| Row {
            what,
            facts,
            expected,
        };
        let rows = vec![
            row(
                "a connection to the listener itself loops",
                facts("127.0.0.1:4140"),
                Step::Go(OutboundPlan::Refuse(ConnError::Loop)),
            ),
            row(
                "so does one to loopback",
                facts("127.0.0.1:8080"),
                Step::Go(OutboundPlan::Refuse(ConnError::Loop)),
            ),
            row(
                "discovery comes first",
                facts(dst),
                Step::Need(Need::Discover),
            ),
            row(
                "but not for the pod's own addresses",
                Facts {
                    local_ip: true,
                    ..facts(dst)
                },
                Step::Need(Need::Detect),
            ),
            row(
                "which are forwarded unmeshed",
                Facts {
                    local_ip: true,
                    detection: detected(Protocol::Unknown),
                    ..facts(dst)
                },
                Step::Go(OutboundPlan::Tcp {
                    backend: forward(Endpoint::unmeshed(addr(dst))),
                    opaque: false,
                }),
            ),
            row(
                "then detection",
                Facts {
                    discovered: destination(false, meshed.clone()),
                    ..facts(dst)
                },
                Step::Need(Need::Detect),
            ),
            row(
                "a client silent through the server-first window: the server may speak",
                Facts {
                    discovered: destination(false, meshed.clone()),
                    detection: Detection::Silent,
                    ..facts(dst)
                },
                Step::Go(OutboundPlan::ServerFirst {
                    backend: meshed.clone(),
                }),
            ),
            row(
                "the same to a Service",
                Facts {
                    discovered: destination(false, balanced.clone()),
                    detection: Detection::Silent,
                    ..facts(dst)
                },
                Step::Go(OutboundPlan::ServerFirst {
                    backend: balanced.clone(),
                }),
            ),
            row(
                "an opaque port is not detected",
                Facts {
                    opaque_port: true,
                    discovered: destination(false, meshed.clone()),
                    ..facts(dst)
                },
                Step::Need(Need::SkipDetection),
            ),
            row(
                "nor is a destination discovery calls opaque",
                Facts {
                    discovered: destination(true, meshed.clone()),
                    ..facts(dst)
                },
                Step::Need(Need::SkipDetection),
            ),
            row(
                "a refused destination is refused before detection",
                Facts {
                    discovered: destination(false, Backend::Refused(Refusal::Forbidden)),
                    ..facts(dst)
                },
                Step::Go(OutboundPlan::Refuse(ConnError::Forbidden)),
            ),
            row(
                "TCP goes to the backend",
                Facts {
                    discovered: destination(false, meshed.clone()),
                    detection: detected(Protocol::Unknown),
                    ..facts(dst)
                },
                Step::Go(OutboundPlan::Tcp {
                    backend: meshed.clone(),
                    opaque: false,
                }),
            ),
            row(
                "the application's own TLS too",
                Facts {
                    discovered: destination(false, balanced.clone()),
                    detection: detected(tls()),
                    ..facts(dst)
                },
                Step::Go(OutboundPlan::Tcp {
                    backend: balanced.clone(),
                    opaque: false,
                }),
            ),
            row(
                "opaque TCP says so",
                Facts {
                    opaque_port: true,
                    discovered: destination(false, balanced.clone()),
                    detection: Detection::Skipped,
                    ..facts(dst)
                },
                Step::Go(OutboundPlan::Tcp {
                    backend: balanced.clone(),
                    opaque: true,
                }),
            ),
            row(
                "unmeshed HTTP is served per request, in plaintext",
                Facts {
                    discovered: destination(false, unmeshed.clone()),
                    detection: detected(Protocol::Http1),
                    ..facts(dst)
                },
                http(dst, upstream(endpoint(dst, None, true), true), true),
            ),
            row(
                "meshed HTTP/1 to an http2 peer is upgraded",
                Facts {
                    discovered: destination(false, meshed_h2.clone()),
                    detection: detected(Protocol::Http1),
                    ..facts(dst)
                },
                http(dst, upstream(endpoint(dst, Some(WEB), true), true), true),
            ),
            row(
                "HTTP to a Service is balanced per request",
                Facts {
                    discovered: destination(false, balanced.clone()),
                    detection: detected(Protocol::Http2),
                    ..facts(dst)
                },
                http(
                    dst,
                    Target::Balance {
                        balancer: pods.clone(),
                        meshed: true,
                    },
                    false,
                ),
            ),
            row(
                "without an identity of our own nothing is meshed",
                Facts {
                    discovered: destination(false, meshed_h2.clone()),
                    detection: detected(Protocol::Http1),
                    settings: no_identity,
                    ..facts(dst)
                },
                http(
                    dst,
                    Target::Upstream(outbound_upstream(
                        &endpoint(dst, Some(WEB), true),
                        false,
                        true,
                    )),
                    true,
                ),
            ),
            row(
                "an unreachable control plane: detect, to answer HTTP",
                Facts {
                    discovered: Some(Err(DiscoveryError::Unavailable)),
                    ..facts(dst)
                },
                Step::Need(Need::Detect),
            ),
            row(
                "HTTP gets an error per request",
                Facts {
                    discovered: Some(Err(DiscoveryError::Unavailable)),
                    detection: detected(Protocol::Http1),
                    ..facts(dst)
                },
                http(dst, Target::Fail(ErrorKind::Discovery), true),
            ),
            row(
                "anything else is refused",
                Facts {
                    discovered: Some(Err(DiscoveryError::Unavailable)),
                    detection: detected(Protocol::Unknown),
                    ..facts(dst)
                },
                Step::Go(OutboundPlan::Refuse(ConnError::Discovery)),
            ),
            row(
                "and opaque ports are not detected for it",
                Facts {
                    opaque_port: true,
                    discovered: Some(Err(DiscoveryError::Unavailable)),
                    ..facts(dst)
                },
                Step::Need(Need::SkipDetection),
            ),
            row(
                "but refused",
                Facts {
                    opaque_port: true,
                    discovered: Some(Err(DiscoveryError::Unavailable)),
                    detection: Detection::Skipped,
                    ..facts(dst)
                },
                Step::Go(OutboundPlan::Refuse(ConnError::Discovery)),
            ),
        ];
        for Row {
            what,
            facts,
            expected,
        } in rows
        {
            assert_eq!(plan(&facts), expected, "{what}");
        }
    }

    /// How a byte stream reaches one endpoint.
    #[test]
    fn dials() {
        let on = Settings {
            meshed: true,
            carrier: false,
        };
        let carrier = Settings {
            meshed: true,
            carrier: true,
        };
        let off = Settings {
            meshed: false,
            carrier: false,
        };
        let pod = endpoint("10.42.0.5:5432", Some(WEB), false);
        let rows = [
            (
                "unmeshed: plain",
                endpoint("10.42.0.5:5432", None, false),
                true,
                on,
                Dial::Plain {
                    addr: addr("10.42.0.5:5432"),
                },
            ),
            (
                "meshed: mesh TLS to the endpoint",
                pod.clone(),
                false,
                on,
                Dial::MeshTls {
                    addr: addr("10.42.0.5:5432"),
                    peer: web(),
                },
            ),
            (
                "meshed opaque: the peer's inbound port, naming the endpoint's port",
                pod.clone(),
                true,
                on,
                Dial::Opaque {
                    proxy: addr("10.42.0.5:4143"),
                    peer: web(),
                    port: 5432,
                    via: OpaqueVia::Header,
                },
            ),
            (
                "on a carrier when carriers are on",
                pod.clone(),
                true,
                carrier,
                Dial::Opaque {
                    proxy: addr("10.42.0.5:4143"),
                    peer: web(),
                    port: 5432,
                    via: OpaqueVia::Carrier,
                },
            ),
            (
                "opaque without an opaque-transport port: mesh TLS to the endpoint",
                Endpoint {
                    opaque_port: None,
                    ..pod.clone()
                },
                true,
                on,
                Dial::MeshTls {
                    addr: addr("10.42.0.5:5432"),
                    peer: web(),
                },
            ),
            (
                "no identity of our own: plain",
                pod.clone(),
                true,
                off,
                Dial::Plain {
                    addr: addr("10.42.0.5:5432"),
                },
            ),
        ];
        for (what, endpoint, opaque, settings, expected) in rows {
            assert_eq!(dial(&endpoint, opaque, settings), expected, "{what}");
        }
    }

    /// HTTP goes through the peer proxy's inbound port, behind a transport header,
    /// only to a meshed endpoint the control plane gave an opaque-transport port.
    #[test]
    fn http_through_the_inbound_port_when_the_control_plane_says_so() {
        let file_peer = endpoint("10.42.0.5:8080", Some(WEB), true);
        let from_control_plane = Endpoint {
            http_via: HttpVia::Header,
            ..file_peer.clone()
        };
        let unmeshed = Endpoint {
            http_via: HttpVia::Header,
            ..Endpoint::unmeshed(addr("10.42.0.6:8080"))
        };
        type Row<'a> = (&'a str, &'a Endpoint, bool, Option<u16>);
        let rows: [Row; 4] = [
            (
                "a discovery file's peer: the application's port",
                &file_peer,
                true,
                None,
            ),
            (
                "the control plane's meshed endpoint",
                &from_control_plane,
                true,
                Some(4143),
            ),
            ("no identity of our own", &from_control_plane, false, None),
            ("an unmeshed endpoint", &unmeshed, true, None),
        ];
        for (what, endpoint, meshed, expected) in rows {
            let upstream = outbound_upstream(endpoint, meshed, false);
            assert_eq!(upstream.pool.header_port, expected, "{what}");
        }
        let names = |via| {
            let endpoint = Endpoint {
                http_via: via,
                ..file_peer.clone()
            };
            outbound_upstream(&endpoint, true, false)
                .pool
                .header_names_protocol
        };
        assert!(names(HttpVia::Header));
        assert!(
            !names(HttpVia::OpaqueHeader),
            "an opaque port gets the bytes"
        );
    }

    #[test]
    fn a_spiffe_peer_is_asked_for_by_its_server_name() {
        let spiffe = Endpoint {
            identity: Some(Arc::from("spiffe://example.org/vm")),
            server_name: Some(Arc::from("vm.example.org")),
            ..Endpoint::unmeshed(addr("10.0.0.7:9000"))
        };
        let settings = Settings {
            meshed: true,
            carrier: false,
        };
        let Dial::MeshTls { peer, .. } = dial(&spiffe, false, settings) else {
            panic!("meshed TCP expected");
        };
        assert_eq!(&*peer.identity, "spiffe://example.org/vm");
        assert_eq!(&*peer.sni, "vm.example.org");
        let upstream = outbound_upstream(&spiffe, true, false);
        assert_eq!(
            upstream.tls,
            TlsStatus::Established(Some(Arc::from("spiffe://example.org/vm")))
        );
        let unmeshed = outbound_upstream(&spiffe, false, false);
        assert_eq!(
            unmeshed.tls,
            TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery)
        );
    }
}
