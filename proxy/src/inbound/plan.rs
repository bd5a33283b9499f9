//! What the inbound side decides for one connection, as values.
//!
//! Three pure functions, in the order a connection meets them:
//! - [`plan`]: before any TLS, from the original destination and the first bytes:
//!   detect (or not, on an opaque port), then pass the connection through to the
//!   application, terminate mesh TLS, or refuse it;
//! - [`plan_meshed`]: once mesh TLS is terminated, from the client's identity and
//!   the ALPN protocol it negotiated: a carrier, a transport header to read, or the
//!   decrypted stream to detect and hand to the application;
//! - [`to_app`]: from the protocol, HTTP served request by request or bytes.
//!
//! `inbound/mod.rs` does what they say.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::http::client::PoolKey;
use crate::http::{Role, Route, Target, Upstream};
use crate::mesh::tls::{NoTlsReason, TlsStatus};
use crate::mesh::transport_header::{SessionProtocol, TransportHeader};
use crate::net::detect::Protocol;
use crate::net::error::ConnError;

/// What is known about an inbound connection before any TLS.
#[derive(Clone, Debug)]
pub struct Facts {
    pub orig_dst: SocketAddr,
    /// The listener's own address: a connection that dialled it was not redirected
    /// (a peer proxy sending opaque traffic).
    pub local: SocketAddr,
    /// The port is in the inbound opaque-port list.
    pub opaque_port: bool,
    /// The original destination is not one of the pod's addresses
    /// (`LINKERD2_PROXY_INBOUND_IPS`, when set).
    pub foreign_ip: bool,
    /// The port's policy: mesh TLS required, and a client identity required.
    pub require_tls: bool,
    pub require_identity: bool,
    /// The SNI this proxy answers to, when it has a mesh identity.
    pub server_name: Option<Arc<str>>,
    /// Accept carriers from peer proxies (`TANDEM_INBOUND_OPAQUE_CARRIER`).
    pub accept_carriers: bool,
    pub detection: Detection,
}

/// Where protocol detection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detection {
    NotYet,
    /// The port is opaque: the client's bytes are not looked at.
    Skipped,
    Detected(Protocol),
    /// The client said nothing within the server-first window.
    Silent,
}

/// The next thing to do with a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Learn a fact first.
    Need(Need),
    Go(InboundPlan),
}

/// The fact a connection's plan waits for. Apart from [`Step`] so that the executor
/// keeps only this small value, not a whole step, while it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Read the client's first bytes to learn its protocol.
    Detect,
    /// Do not read them: the port is opaque.
    SkipDetection,
}

/// What to do with an inbound connection before any TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundPlan {
    /// Refuse it; the client is counted with `tls` and reset.
    Refuse { error: ConnError, tls: TlsStatus },
    /// Not mesh TLS for us: to the application as it came (TLS for another name,
    /// the application's own, passes through untouched).
    PassThrough { protocol: Protocol, tls: TlsStatus },
    /// Mesh TLS for our name: terminate it with the server configuration for `with`.
    Terminate { with: ServerTls },
    /// The client is silent: connect to the application and let whichever side
    /// speaks first decide (the application's bytes make the connection opaque; the
    /// client's go back to detection). The client is counted with `tls`.
    ServerFirst { tls: TlsStatus },
}

/// Which TLS server configuration a connection is terminated with: what a client
/// may negotiate by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerTls {
    /// Redirected to us: no ALPN; the decrypted stream is detected.
    Redirected,
    /// Dialled the inbound port directly: a carrier or the transport header.
    Direct,
    /// Dialled directly with carriers turned off: the transport header only.
    DirectHeaderOnly,
}

/// The next step for a connection, given `facts`.
pub fn plan(facts: &Facts) -> Step {
    if facts.foreign_ip {
        return Step::Go(InboundPlan::Refuse {
            error: ConnError::Forbidden,
            tls: TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote),
        });
    }
    // The port alone: on a pod with several addresses, a connection to another of
    // them is redirected to the interface's first address.
    let direct = facts.orig_dst.port() == facts.local.port();
    if facts.detection == Detection::Silent && !direct {
        let tls = TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote);
        if facts.require_tls || facts.require_identity {
            return Step::Go(InboundPlan::Refuse {
                error: ConnError::Unauthorized,
                tls,
            });
        }
        return Step::Go(InboundPlan::ServerFirst { tls });
    }
    let protocol = match &facts.detection {
        Detection::NotYet if facts.opaque_port && !direct => {
            return Step::Need(Need::SkipDetection)
        }
        Detection::NotYet | Detection::Silent => return Step::Need(Need::Detect),
        Detection::Skipped => Protocol::Unknown,
        Detection::Detected(protocol) => protocol.clone(),
    };
    let ours = match (&protocol, &facts.server_name) {
        (Protocol::Tls { sni: Some(sni) }, Some(name)) => **sni == **name,
        _ => false,
    };
    if ours {
        let with = match (direct, facts.accept_carriers) {
            (false, _) => ServerTls::Redirected,
            (true, true) => ServerTls::Direct,
            (true, false) => ServerTls::DirectHeaderOnly,
        };
        return Step::Go(InboundPlan::Terminate { with });
    }
    let tls = match protocol {
        // The application's own TLS (or mesh TLS for another identity): untouched.
        Protocol::Tls { .. } => TlsStatus::Opaque,
        _ => TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote),
    };
    let refuse = |error| {
        Step::Go(InboundPlan::Refuse {
            error,
            tls: tls.clone(),
        })
    };
    if direct {
        // A direct connection must be mesh TLS with a transport header or a carrier.
        return refuse(ConnError::TransportHeader);
    }
    if facts.require_tls || facts.require_identity {
        return refuse(ConnError::Unauthorized);
    }
    Step::Go(InboundPlan::PassThrough { protocol, tls })
}

/// What is known once mesh TLS is terminated.
#[derive(Clone, Debug)]
pub struct Meshed {
    /// The connection dialled the inbound port directly.
    pub direct: bool,
    /// The identity the client proved with its certificate, if it presented one.
    pub client_id: Option<Arc<str>>,
    pub negotiated: Negotiated,
    /// The port requires a client identity.
    pub require_identity: bool,
}

/// What the client negotiated by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Negotiated {
    Nothing,
    TransportHeader,
    Carrier,
}

/// What to do with a connection once mesh TLS is terminated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshedPlan {
    /// Refuse it; the client is counted with its `tls="true"` label and reset.
    Refuse(ConnError),
    /// Serve the connection as a carrier of a peer proxy that proved `client_id`.
    Carrier { client_id: Arc<str> },
    /// Read the transport header, which names the local port ([`header_target`]).
    ReadHeader,
    /// Detect the decrypted stream and hand it to the application.
    Detect,
}

pub fn plan_meshed(meshed: &Meshed) -> MeshedPlan {
    if meshed.direct {
        // Direct connections must be mutually authenticated, and say where they go.
        let Some(client_id) = meshed.client_id.clone() else {
            return MeshedPlan::Refuse(ConnError::TransportHeader);
        };
        return match meshed.negotiated {
            Negotiated::Carrier => MeshedPlan::Carrier { client_id },
            Negotiated::TransportHeader => MeshedPlan::ReadHeader,
            Negotiated::Nothing => MeshedPlan::Refuse(ConnError::TransportHeader),
        };
    }
    if meshed.require_identity && meshed.client_id.is_none() {
        return MeshedPlan::Refuse(ConnError::Unauthorized);
    }
    MeshedPlan::Detect
}

/// The local address a transport header sends its connection to: the header's port
/// on the address the connection came in on. Named headers are for gateways, which
/// Tandem is not; a header naming the inbound port itself would loop.
pub fn header_target(
    header: &TransportHeader,
    orig_dst: SocketAddr,
    local: SocketAddr,
) -> Result<SocketAddr, ConnError> {
    if header.name.is_some() {
        return Err(ConnError::TransportHeader);
    }
    if header.port == local.port() {
        return Err(ConnError::Loop);
    }
    Ok(SocketAddr::new(orig_dst.ip(), header.port))
}

/// What a transport header's stream carries: HTTP when the header names a session
/// protocol (linkerd2-proxy sends HTTP to a pod's inbound port this way, with no
/// detection on either side), else bytes.
pub fn header_protocol(header: &TransportHeader) -> Protocol {
    match header.protocol {
        Some(SessionProtocol::Http1) => Protocol::Http1,
        Some(SessionProtocol::Http2) => Protocol::Http2,
        None => Protocol::Unknown,
    }
}

/// How a connection reaches the application.
#[derive(Clone, Debug, PartialEq)]
pub enum AppPlan {
    /// Request by request, with the server for `protocol`.
    Http { protocol: Protocol, route: Route },
    /// As bytes.
    Tcp { target: SocketAddr },
}

/// How a connection to `target` that carries `protocol` reaches the application.
/// `tls` is how the client reached us; a meshed client's identity becomes
/// `l5d-client-id` on its requests.
pub fn to_app(protocol: Protocol, target: SocketAddr, tls: TlsStatus) -> AppPlan {
    if !matches!(protocol, Protocol::Http1 | Protocol::Http2) {
        return AppPlan::Tcp { target };
    }
    let client_id = match &tls {
        TlsStatus::Established(id) => id.clone(),
        _ => None,
    };
    let http1_case = protocol == Protocol::Http1;
    let route = Route {
        role: Role::Inbound { client_id },
        logical: target,
        target: Target::Upstream(Upstream {
            pool: PoolKey {
                target,
                peer: None,
                http1_case,
                header_port: None,
                header_names_protocol: false,
            },
            h2_upgrade: false,
            tls,
            labels: Arc::default(),
        }),
        http1_case,
        routes: None,
        meshed: false,
    };
    AppPlan::Http { protocol, route }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "beta.ns.serviceaccount.identity.linkerd.cluster.local";
    const ALPHA: &str = "alpha.ns.serviceaccount.identity.linkerd.cluster.local";

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn facts(dst: &str) -> Facts {
        Facts {
            orig_dst: addr(dst),
            local: addr("10.0.0.2:4143"),
            opaque_port: false,
            foreign_ip: false,
            require_tls: false,
            require_identity: false,
            server_name: Some(Arc::from(OURS)),
            accept_carriers: true,
            detection: Detection::NotYet,
        }
    }

    fn tls_for(sni: &str) -> Protocol {
        Protocol::Tls {
            sni: Some(sni.into()),
        }
    }

    fn plain() -> TlsStatus {
        TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote)
    }

    /// Every branch of the decision before TLS, one row each.
    #[test]
    fn inbound_plans() {
        let app = "10.0.0.2:8080";
        let direct = "10.0.0.2:4143";
        let detected = Detection::Detected;
        let go = Step::Go;
        type Row = (&'static str, Facts, Step);
        let rows: Vec<Row> = vec![
            ("first, detection", facts(app), Step::Need(Need::Detect)),
            (
                "a silent client: the application may speak first",
                Facts {
                    detection: Detection::Silent,
                    ..facts(app)
                },
                go(InboundPlan::ServerFirst { tls: plain() }),
            ),
            (
                "unless the port requires mesh TLS",
                Facts {
                    detection: Detection::Silent,
                    require_tls: true,
                    ..facts(app)
                },
                go(InboundPlan::Refuse {
                    error: ConnError::Unauthorized,
                    tls: plain(),
                }),
            ),
            (
                "a direct connection is never server-first",
                Facts {
                    detection: Detection::Silent,
                    ..facts(direct)
                },
                Step::Need(Need::Detect),
            ),
            (
                "an address that is not the pod's is refused",
                Facts {
                    foreign_ip: true,
                    ..facts(app)
                },
                go(InboundPlan::Refuse {
                    error: ConnError::Forbidden,
                    tls: plain(),
                }),
            ),
            (
                "not on an opaque port",
                Facts {
                    opaque_port: true,
                    ..facts(app)
                },
                Step::Need(Need::SkipDetection),
            ),
            (
                "a direct connection is detected even on an opaque port",
                Facts {
                    opaque_port: true,
                    ..facts(direct)
                },
                Step::Need(Need::Detect),
            ),
            (
                "an opaque port passes through as bytes",
                Facts {
                    opaque_port: true,
                    detection: Detection::Skipped,
                    ..facts(app)
                },
                go(InboundPlan::PassThrough {
                    protocol: Protocol::Unknown,
                    tls: plain(),
                }),
            ),
            (
                "plain HTTP passes through",
                Facts {
                    detection: detected(Protocol::Http1),
                    ..facts(app)
                },
                go(InboundPlan::PassThrough {
                    protocol: Protocol::Http1,
                    tls: plain(),
                }),
            ),
            (
                "TLS for another name is the application's: untouched",
                Facts {
                    detection: detected(tls_for("app.example")),
                    ..facts(app)
                },
                go(InboundPlan::PassThrough {
                    protocol: tls_for("app.example"),
                    tls: TlsStatus::Opaque,
                }),
            ),
            (
                "mesh TLS for our name is terminated",
                Facts {
                    detection: detected(tls_for(OURS)),
                    ..facts(app)
                },
                go(InboundPlan::Terminate {
                    with: ServerTls::Redirected,
                }),
            ),
            (
                "without an identity of our own, nothing is ours",
                Facts {
                    server_name: None,
                    detection: detected(tls_for(OURS)),
                    ..facts(app)
                },
                go(InboundPlan::PassThrough {
                    protocol: tls_for(OURS),
                    tls: TlsStatus::Opaque,
                }),
            ),
            (
                "a direct connection is terminated for a carrier or a header",
                Facts {
                    detection: detected(tls_for(OURS)),
                    ..facts(direct)
                },
                go(InboundPlan::Terminate {
                    with: ServerTls::Direct,
                }),
            ),
            (
                "direct to another of the pod's addresses too",
                Facts {
                    detection: detected(tls_for(OURS)),
                    ..facts("10.0.0.9:4143")
                },
                go(InboundPlan::Terminate {
                    with: ServerTls::Direct,
                }),
            ),
            (
                "for a header only when carriers are off",
                Facts {
                    accept_carriers: false,
                    detection: detected(tls_for(OURS)),
                    ..facts(direct)
                },
                go(InboundPlan::Terminate {
                    with: ServerTls::DirectHeaderOnly,
                }),
            ),
            (
                "a direct connection without mesh TLS is refused",
                Facts {
                    detection: detected(Protocol::Http1),
                    ..facts(direct)
                },
                go(InboundPlan::Refuse {
                    error: ConnError::TransportHeader,
                    tls: plain(),
                }),
            ),
            (
                "a port requiring TLS refuses plaintext",
                Facts {
                    require_tls: true,
                    detection: detected(Protocol::Http1),
                    ..facts(app)
                },
                go(InboundPlan::Refuse {
                    error: ConnError::Unauthorized,
                    tls: plain(),
                }),
            ),
            (
                "a port requiring identity refuses the application's TLS",
                Facts {
                    require_identity: true,
                    detection: detected(tls_for("app.example")),
                    ..facts(app)
                },
                go(InboundPlan::Refuse {
                    error: ConnError::Unauthorized,
                    tls: TlsStatus::Opaque,
                }),
            ),
            (
                "and terminates mesh TLS, to check the identity after",
                Facts {
                    require_identity: true,
                    detection: detected(tls_for(OURS)),
                    ..facts(app)
                },
                go(InboundPlan::Terminate {
                    with: ServerTls::Redirected,
                }),
            ),
        ];
        for (what, facts, expected) in rows {
            assert_eq!(plan(&facts), expected, "{what}");
        }
    }

    /// Every branch once mesh TLS is terminated.
    #[test]
    fn meshed_plans() {
        let alpha = || Some(Arc::<str>::from(ALPHA));
        let meshed = |direct, client_id, negotiated, require_identity| Meshed {
            direct,
            client_id,
            negotiated,
            require_identity,
        };
        use Negotiated::*;
        let rows = [
            (
                "a carrier from a peer proxy",
                meshed(true, alpha(), Carrier, false),
                MeshedPlan::Carrier {
                    client_id: Arc::from(ALPHA),
                },
            ),
            (
                "a carrier without a client identity",
                meshed(true, None, Carrier, false),
                MeshedPlan::Refuse(ConnError::TransportHeader),
            ),
            (
                "a transport header",
                meshed(true, alpha(), TransportHeader, false),
                MeshedPlan::ReadHeader,
            ),
            (
                "a header without a client identity",
                meshed(true, None, TransportHeader, false),
                MeshedPlan::Refuse(ConnError::TransportHeader),
            ),
            (
                "a direct connection that negotiated neither",
                meshed(true, alpha(), Nothing, false),
                MeshedPlan::Refuse(ConnError::TransportHeader),
            ),
            (
                "a redirected one is detected",
                meshed(false, None, Nothing, false),
                MeshedPlan::Detect,
            ),
            (
                "unless the port requires an identity it lacks",
                meshed(false, None, Nothing, true),
                MeshedPlan::Refuse(ConnError::Unauthorized),
            ),
            (
                "which a meshed client has",
                meshed(false, alpha(), Nothing, true),
                MeshedPlan::Detect,
            ),
        ];
        for (what, meshed, expected) in rows {
            assert_eq!(plan_meshed(&meshed), expected, "{what}");
        }
    }

    #[test]
    fn transport_headers_name_a_local_port() {
        let orig_dst = addr("10.0.0.2:4143");
        let header = |port, name: Option<&str>| TransportHeader {
            port,
            name: name.map(String::from),
            protocol: None,
        };
        assert_eq!(
            header_target(&header(5432, None), orig_dst, orig_dst),
            Ok(addr("10.0.0.2:5432"))
        );
        assert_eq!(
            header_target(&header(4143, None), orig_dst, orig_dst),
            Err(ConnError::Loop)
        );
        assert_eq!(
            header_target(
                &header(80, Some("web.ns.svc.cluster.local")),
                orig_dst,
                orig_dst
            ),
            Err(ConnError::TransportHeader)
        );
    }

    #[test]
    fn a_header_with_a_session_protocol_carries_http() {
        let header = |protocol| TransportHeader {
            port: 8080,
            name: None,
            protocol,
        };
        let rows = [
            (None, Protocol::Unknown),
            (Some(SessionProtocol::Http1), Protocol::Http1),
            (Some(SessionProtocol::Http2), Protocol::Http2),
        ];
        for (protocol, expected) in rows {
            assert_eq!(header_protocol(&header(protocol)), expected, "{protocol:?}");
        }
    }

    #[test]
    fn http_goes_request_by_request_with_the_client_identity() {
        let target = addr("10.0.0.2:8080");
        let meshed = TlsStatus::Established(Some(Arc::from(ALPHA)));
        let AppPlan::Http { protocol, route } = to_app(Protocol::Http2, target, meshed.clone())
        else {
            panic!("HTTP expected");
        };
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(
            route.role,
            Role::Inbound {
                client_id: Some(Arc::from(ALPHA))
            }
        );
        assert!(!route.http1_case);
        let Target::Upstream(upstream) = &route.target else {
            panic!("the application is one upstream");
        };
        assert_eq!(upstream.tls, meshed);
        assert_eq!(upstream.pool.target, target);
        assert!(!upstream.h2_upgrade && upstream.pool.peer.is_none());
        let AppPlan::Http { route, .. } = to_app(Protocol::Http1, target, plain()) else {
            panic!("HTTP expected");
        };
        assert_eq!(route.role, Role::Inbound { client_id: None });
        assert!(route.http1_case);
        for other in [Protocol::Unknown, tls_for("app.example")] {
            assert_eq!(to_app(other, target, plain()), AppPlan::Tcp { target });
        }
    }
}
