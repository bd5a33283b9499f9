//! The inbound authorization policy of a port, as Linkerd's policy controller
//! describes it (`InboundServerPolicies.WatchPort` → `Server`), and the pure
//! decisions made from it: which clients may open a TCP connection, which requests
//! are allowed, and by which authorization.
//!
//! [`read_server`] turns a `Server` message into a [`ServerPolicy`] (fuzzed, in
//! `control_plane`); [`default_policy`] is what a port gets from
//! `LINKERD2_PROXY_INBOUND_DEFAULT_POLICY` until the controller answers, and
//! [`authorize_tcp`] / [`authorize_request`] decide. As in linkerd2-proxy, a
//! `localhost` authorization is always added, a route's authorizations are its own
//! plus the server's, and a server without HTTP routes gets one catch-all route
//! (`default`) carrying the server's authorizations. Routes' filters and local rate
//! limits are not applied (a request they would change or limit is let through or
//! refused on its authorizations alone).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::http::{HeaderMap, Method, Uri};
use ipnet::IpNet;
use linkerd2_proxy_api::http_route::HostMatch;
use linkerd2_proxy_api::inbound::{self as api, authn, proxy_protocol};
use linkerd2_proxy_api::meta::{metadata, Metadata};

use crate::discover::route_match::{self, Host, RequestMatch};
use crate::mesh::tls::TlsStatus;

/// A resource's name in metric labels (`<prefix>_group`, `_kind`, `_name`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Meta {
    pub group: Box<str>,
    pub kind: Box<str>,
    pub name: Box<str>,
}

impl Meta {
    fn new(group: &str, kind: &str, name: &str) -> Meta {
        Meta {
            group: group.into(),
            kind: kind.into(),
            name: name.into(),
        }
    }

    /// A default resource, as Linkerd names them (group `""`, kind `default`).
    fn default_named(name: &str) -> Meta {
        Meta::new("", "default", name)
    }
}

/// What a port speaks, for the proxy's purposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortProtocol {
    /// Detect it (`Detect`, and the declared `Http1`, `Http2`, `Grpc`, which are
    /// still detected: an HTTP client is found either way).
    Detect { timeout: Option<Duration> },
    /// Bytes, not looked at.
    Opaque,
    /// The application's own TLS: detected as any port is (its ClientHello is not
    /// for the proxy's name, so it passes through), and authorized as TCP.
    Tls,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerPolicy {
    pub meta: Meta,
    pub protocol: PortProtocol,
    /// The server's authorizations, `localhost` included.
    pub authorizations: Vec<Arc<Authorization>>,
    /// HTTP routes; never empty for a valid policy (the catch-all `default`).
    pub routes: Vec<Route>,
    /// The controller's answer could not be read: no connection is authorized and
    /// HTTP requests get a 500, as in linkerd2-proxy.
    pub invalid: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub meta: Meta,
    pub networks: Vec<Network>,
    pub authentication: Authentication,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub net: IpNet,
    pub except: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authentication {
    /// Anyone.
    Unauthenticated,
    /// Mesh TLS terminated here; any identity, or none.
    MeshTls,
    /// Mesh TLS with one of these identities, exactly, or ending in one of the
    /// suffixes (kept with their leading dot; `""` matches every identity).
    Identities {
        names: Vec<String>,
        suffixes: Vec<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub meta: Meta,
    pub hosts: Vec<Host>,
    /// Any of them selects the route (none: every request).
    pub matches: Vec<RequestMatch>,
    /// The route's own and the server's.
    pub authorizations: Vec<Arc<Authorization>>,
}

/// `LINKERD2_PROXY_INBOUND_DEFAULT_POLICY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultPolicy {
    AllUnauthenticated,
    AllAuthenticated,
    ClusterUnauthenticated,
    ClusterAuthenticated,
    Audit,
    Deny,
}

impl DefaultPolicy {
    pub fn parse(text: &str) -> Result<DefaultPolicy, String> {
        Ok(match text {
            "all-unauthenticated" => DefaultPolicy::AllUnauthenticated,
            "all-authenticated" => DefaultPolicy::AllAuthenticated,
            "cluster-unauthenticated" => DefaultPolicy::ClusterUnauthenticated,
            "cluster-authenticated" => DefaultPolicy::ClusterAuthenticated,
            "audit" => DefaultPolicy::Audit,
            "deny" => DefaultPolicy::Deny,
            other => return Err(format!("not a default policy: {other:?} (all-unauthenticated, all-authenticated, cluster-unauthenticated, cluster-authenticated, audit, deny)")),
        })
    }

    fn name(self) -> &'static str {
        match self {
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::ClusterUnauthenticated => "cluster-unauthenticated",
            DefaultPolicy::ClusterAuthenticated => "cluster-authenticated",
            DefaultPolicy::Audit => "audit",
            DefaultPolicy::Deny => "deny",
        }
    }
}

fn all_networks() -> Vec<Network> {
    ["0.0.0.0/0", "::/0"]
        .into_iter()
        .map(|net| Network {
            net: net.parse().expect("a network"),
            except: Vec::new(),
        })
        .collect()
}

/// The `localhost` authorization linkerd2-proxy adds to every server.
fn localhost() -> Arc<Authorization> {
    Arc::new(Authorization {
        meta: Meta::default_named("localhost"),
        networks: ["127.0.0.1/32", "::1/128"]
            .into_iter()
            .map(|net| Network {
                net: net.parse().expect("a network"),
                except: Vec::new(),
            })
            .collect(),
        authentication: Authentication::Unauthenticated,
    })
}

/// The policy of a port before (or without) the controller's answer; `opaque`: the
/// port is in `LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION`.
pub fn default_policy(kind: DefaultPolicy, cluster: &[IpNet], opaque: bool) -> ServerPolicy {
    let networks = || match kind {
        DefaultPolicy::ClusterUnauthenticated | DefaultPolicy::ClusterAuthenticated => cluster
            .iter()
            .map(|net| Network {
                net: *net,
                except: Vec::new(),
            })
            .collect(),
        _ => all_networks(),
    };
    let authentication = match kind {
        DefaultPolicy::AllAuthenticated | DefaultPolicy::ClusterAuthenticated => {
            Authentication::MeshTls
        }
        _ => Authentication::Unauthenticated,
    };
    let mut authorizations = match kind {
        DefaultPolicy::Deny => Vec::new(),
        _ => vec![Arc::new(Authorization {
            meta: Meta::default_named(kind.name()),
            networks: networks(),
            authentication,
        })],
    };
    authorizations.push(localhost());
    let protocol = if opaque || kind == DefaultPolicy::Deny {
        PortProtocol::Opaque
    } else {
        PortProtocol::Detect {
            timeout: Some(Duration::from_secs(10)),
        }
    };
    ServerPolicy {
        meta: Meta::default_named(kind.name()),
        protocol,
        routes: vec![catch_all(&authorizations)],
        authorizations,
        invalid: false,
    }
}

fn catch_all(authorizations: &[Arc<Authorization>]) -> Route {
    Route {
        meta: Meta::default_named("default"),
        hosts: Vec::new(),
        matches: Vec::new(),
        authorizations: authorizations.to_vec(),
    }
}

/// A policy no connection passes: an answer that could not be read.
pub fn invalid_policy() -> ServerPolicy {
    ServerPolicy {
        meta: Meta::default_named("invalid"),
        protocol: PortProtocol::Detect { timeout: None },
        authorizations: Vec::new(),
        routes: Vec::new(),
        invalid: true,
    }
}

/// Reads a `Server`; an error names what is missing or wrong.
pub fn read_server(server: &api::Server) -> Result<ServerPolicy, String> {
    let meta = server_meta(&server.labels)?;
    let mut authorizations = read_authzs(&server.authorizations)?;
    authorizations.push(localhost());
    let kind = server
        .protocol
        .as_ref()
        .and_then(|p| p.kind.as_ref())
        .ok_or("a server without a protocol")?;
    let (protocol, routes) = match kind {
        proxy_protocol::Kind::Detect(detect) => {
            let timeout = detect
                .timeout
                .ok_or("a detect protocol without a timeout")?;
            let timeout = Duration::try_from(timeout).map_err(|_| "a negative detect timeout")?;
            let routes = http_routes(&detect.http_routes, &authorizations)?;
            (
                PortProtocol::Detect {
                    timeout: Some(timeout),
                },
                routes,
            )
        }
        proxy_protocol::Kind::Http1(http) => (
            PortProtocol::Detect { timeout: None },
            http_routes(&http.routes, &authorizations)?,
        ),
        proxy_protocol::Kind::Http2(http) => (
            PortProtocol::Detect { timeout: None },
            http_routes(&http.routes, &authorizations)?,
        ),
        proxy_protocol::Kind::Grpc(grpc) => (
            PortProtocol::Detect { timeout: None },
            grpc_routes(&grpc.routes, &authorizations)?,
        ),
        proxy_protocol::Kind::Opaque(_) => (PortProtocol::Opaque, Vec::new()),
        proxy_protocol::Kind::Tls(_) => (PortProtocol::Tls, Vec::new()),
    };
    let routes = if routes.is_empty() {
        vec![catch_all(&authorizations)]
    } else {
        routes
    };
    Ok(ServerPolicy {
        meta,
        protocol,
        authorizations,
        routes,
        invalid: false,
    })
}

/// A server's labels: `name` is required; `group` and `kind` default to Linkerd's.
fn server_meta(labels: &HashMap<String, String>) -> Result<Meta, String> {
    let name = labels.get("name").ok_or("a server without a name label")?;
    if let Some(default) = name.strip_prefix("default:") {
        return Ok(Meta::default_named(default));
    }
    let group = labels
        .get("group")
        .map_or("policy.linkerd.io", |g| g.as_str());
    let kind = labels.get("kind").map_or("server", |k| k.as_str());
    Ok(Meta::new(group, kind, name))
}

fn meta_of(metadata: Option<&Metadata>) -> Option<Meta> {
    match metadata?.kind.as_ref()? {
        metadata::Kind::Default(name) => Some(Meta::default_named(name)),
        metadata::Kind::Resource(r) => Some(Meta::new(&r.group, &r.kind, &r.name)),
    }
}

fn read_authz(authz: &api::Authz) -> Result<Authorization, String> {
    let meta = match meta_of(authz.metadata.as_ref()) {
        Some(meta) => meta,
        None => {
            let name = authz
                .labels
                .get("name")
                .ok_or("an authorization without a name")?;
            let group = authz
                .labels
                .get("group")
                .map_or("policy.linkerd.io", |g| g.as_str());
            let kind = authz
                .labels
                .get("kind")
                .map_or("serverauthorization", |k| k.as_str());
            Meta::new(group, kind, name)
        }
    };
    if authz.networks.is_empty() {
        return Err(format!("authorization {} has no networks", meta.name));
    }
    let networks = authz
        .networks
        .iter()
        .map(|n| {
            let net = n
                .net
                .ok_or("a network without an address")
                .and_then(|net| IpNet::try_from(net).map_err(|_| "a bad network"))?;
            let except = n
                .except
                .iter()
                .map(|e| IpNet::try_from(*e).map_err(|_| "a bad network"))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, &str>(Network { net, except })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let permit = authz
        .authentication
        .as_ref()
        .and_then(|a| a.permit.as_ref())
        .ok_or("an authorization without authentication")?;
    let authentication = match permit {
        authn::Permit::Unauthenticated(_) => Authentication::Unauthenticated,
        authn::Permit::MeshTls(mesh) => match mesh.clients.as_ref() {
            Some(authn::permit_mesh_tls::Clients::Unauthenticated(_)) => Authentication::MeshTls,
            Some(authn::permit_mesh_tls::Clients::Identities(ids)) => Authentication::Identities {
                names: ids.identities.iter().map(|i| i.name.clone()).collect(),
                suffixes: ids
                    .suffixes
                    .iter()
                    .map(|s| {
                        if s.parts.is_empty() {
                            String::new()
                        } else {
                            format!(".{}", s.parts.join("."))
                        }
                    })
                    .collect(),
            },
            None => return Err("mesh TLS authentication without clients".into()),
        },
    };
    Ok(Authorization {
        meta,
        networks,
        authentication,
    })
}

fn read_authzs(authorizations: &[api::Authz]) -> Result<Vec<Arc<Authorization>>, String> {
    authorizations
        .iter()
        .map(|a| read_authz(a).map(Arc::new))
        .collect()
}

/// A route of an HTTP or gRPC kind: its authorizations are its own and the server's.
fn route(
    metadata: Option<&Metadata>,
    hosts: &[HostMatch],
    own: &[api::Authz],
    matches: Vec<RequestMatch>,
    server: &[Arc<Authorization>],
) -> Result<Route, String> {
    let mut authorizations = read_authzs(own)?;
    authorizations.extend(server.iter().cloned());
    Ok(Route {
        meta: meta_of(metadata).ok_or("a route without metadata")?,
        hosts: route_match::read_hosts(hosts),
        matches,
        authorizations,
    })
}

fn http_routes(
    routes: &[api::HttpRoute],
    server: &[Arc<Authorization>],
) -> Result<Vec<Route>, String> {
    routes
        .iter()
        .map(|r| {
            let matches = r
                .rules
                .iter()
                .flat_map(|rule| rule_matches(&rule.matches, route_match::read_http_match));
            route(
                r.metadata.as_ref(),
                &r.hosts,
                &r.authorizations,
                matches.collect(),
                server,
            )
        })
        .collect()
}

fn grpc_routes(
    routes: &[api::GrpcRoute],
    server: &[Arc<Authorization>],
) -> Result<Vec<Route>, String> {
    routes
        .iter()
        .map(|r| {
            let matches = r
                .rules
                .iter()
                .flat_map(|rule| rule_matches(&rule.matches, route_match::read_grpc_match));
            route(
                r.metadata.as_ref(),
                &r.hosts,
                &r.authorizations,
                matches.collect(),
                server,
            )
        })
        .collect()
}

/// A rule without matches matches every request.
fn rule_matches<M>(matches: &[M], read: fn(&M) -> RequestMatch) -> Vec<RequestMatch> {
    if matches.is_empty() {
        vec![RequestMatch::default()]
    } else {
        matches.iter().map(read).collect()
    }
}

/// The client, as authorizations see it.
#[derive(Clone, Debug)]
pub struct Client {
    pub ip: IpAddr,
    pub tls: TlsStatus,
}

fn permits(authz: &Authorization, client: &Client) -> bool {
    let in_network = authz
        .networks
        .iter()
        .any(|n| n.net.contains(&client.ip) && !n.except.iter().any(|e| e.contains(&client.ip)));
    if !in_network {
        return false;
    }
    match (&authz.authentication, &client.tls) {
        (Authentication::Unauthenticated, _) => true,
        (Authentication::MeshTls, TlsStatus::Established(_)) => true,
        (Authentication::Identities { names, suffixes }, TlsStatus::Established(Some(id))) => {
            names.iter().any(|n| **n == **id)
                || suffixes
                    .iter()
                    .any(|s| s.is_empty() || id.ends_with(s.as_str()))
        }
        _ => false,
    }
}

fn first_permitting(
    authorizations: &[Arc<Authorization>],
    client: &Client,
) -> Option<Arc<Authorization>> {
    authorizations.iter().find(|a| permits(a, client)).cloned()
}

/// May `client` open a connection that is forwarded as bytes? The authorization
/// that allows it, if one does.
pub fn authorize_tcp(policy: &ServerPolicy, client: &Client) -> Option<Arc<Authorization>> {
    if policy.invalid {
        return None;
    }
    first_permitting(&policy.authorizations, client)
}

/// What a request gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestDecision {
    Allow {
        route: Meta,
        authorization: Arc<Authorization>,
    },
    /// 403 (gRPC: `PERMISSION_DENIED`).
    Deny { route: Meta },
    /// 404 (gRPC: `NOT_FOUND`): no route takes the request.
    NoRoute,
    /// 500: the policy could not be read.
    Invalid,
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestRefusal {
    Forbidden,
    NoRoute,
    InvalidPolicy,
}

/// The request's route (the most specific match among the routes for its host)
/// and whether `client` is authorized on it.
pub fn authorize_request(
    policy: &ServerPolicy,
    client: &Client,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    authority: Option<&str>,
) -> RequestDecision {
    if policy.invalid {
        return RequestDecision::Invalid;
    }
    let route = policy
        .routes
        .iter()
        .filter(|r| route_match::host_matches(&r.hosts, authority))
        .filter_map(|r| {
            Some((
                route_match::best_score(&r.matches, method, uri, headers)?,
                r,
            ))
        })
        .max_by(|a, b| a.0.cmp(&b.0));
    let Some((_, route)) = route else {
        return RequestDecision::NoRoute;
    };
    match first_permitting(&route.authorizations, client) {
        Some(authorization) => RequestDecision::Allow {
            route: route.meta.clone(),
            authorization,
        },
        None => RequestDecision::Deny {
            route: route.meta.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::tls::NoTlsReason;
    use linkerd2_proxy_api::inbound::{Authn, Authz, HttpRoute, ProxyProtocol, Server};
    use linkerd2_proxy_api::meta::Resource;

    const ALPHA: &str = "alpha.ns.serviceaccount.identity.linkerd.cluster.local";
    const BETA: &str = "beta.other.serviceaccount.identity.linkerd.cluster.local";

    fn plain(ip: &str) -> Client {
        Client {
            ip: ip.parse().unwrap(),
            tls: TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote),
        }
    }

    fn meshed(ip: &str, id: Option<&str>) -> Client {
        Client {
            ip: ip.parse().unwrap(),
            tls: TlsStatus::Established(id.map(Arc::from)),
        }
    }

    fn allowed_by(policy: &ServerPolicy, client: &Client) -> Option<String> {
        authorize_tcp(policy, client).map(|a| a.meta.name.to_string())
    }

    #[test]
    fn default_policies_as_in_linkerd() {
        let cluster: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        type Row = (DefaultPolicy, Client, Option<&'static str>);
        let rows: Vec<Row> = vec![
            (
                DefaultPolicy::AllUnauthenticated,
                plain("192.168.1.1"),
                Some("all-unauthenticated"),
            ),
            (DefaultPolicy::AllAuthenticated, plain("10.1.1.1"), None),
            (
                DefaultPolicy::AllAuthenticated,
                meshed("10.1.1.1", Some(ALPHA)),
                Some("all-authenticated"),
            ),
            (
                DefaultPolicy::ClusterUnauthenticated,
                plain("10.1.1.1"),
                Some("cluster-unauthenticated"),
            ),
            (
                DefaultPolicy::ClusterUnauthenticated,
                plain("192.168.1.1"),
                None,
            ),
            (
                DefaultPolicy::ClusterAuthenticated,
                meshed("192.168.1.1", Some(ALPHA)),
                None,
            ),
            (DefaultPolicy::Audit, plain("192.168.1.1"), Some("audit")),
            (DefaultPolicy::Deny, meshed("10.1.1.1", Some(ALPHA)), None),
            (DefaultPolicy::Deny, plain("127.0.0.1"), Some("localhost")),
            (
                DefaultPolicy::AllAuthenticated,
                plain("::1"),
                Some("localhost"),
            ),
        ];
        for (kind, client, expected) in rows {
            let policy = default_policy(kind, &cluster, false);
            assert_eq!(
                allowed_by(&policy, &client).as_deref(),
                expected,
                "{kind:?} {client:?}"
            );
        }
        assert_eq!(
            default_policy(DefaultPolicy::Deny, &cluster, false).protocol,
            PortProtocol::Opaque
        );
        assert_eq!(
            default_policy(DefaultPolicy::AllUnauthenticated, &cluster, true).protocol,
            PortProtocol::Opaque
        );
        assert!(DefaultPolicy::parse("everyone").is_err());
    }

    fn resource(kind: &str, name: &str) -> Option<Metadata> {
        Some(Metadata {
            kind: Some(metadata::Kind::Resource(Resource {
                group: "policy.linkerd.io".into(),
                kind: kind.into(),
                name: name.into(),
                ..Default::default()
            })),
        })
    }

    fn net(text: &str) -> linkerd2_proxy_api::net::IpNetwork {
        text.parse::<IpNet>().unwrap().into()
    }

    fn authz(name: &str, nets: &[&str], except: &[&str], permit: authn::Permit) -> Authz {
        Authz {
            networks: nets
                .iter()
                .map(|n| api::Network {
                    net: Some(net(n)),
                    except: except.iter().map(|e| net(e)).collect(),
                })
                .collect(),
            authentication: Some(Authn {
                permit: Some(permit),
            }),
            labels: HashMap::new(),
            metadata: resource("authorizationpolicy", name),
        }
    }

    fn identities(names: &[&str], suffixes: &[&[&str]]) -> authn::Permit {
        authn::Permit::MeshTls(authn::PermitMeshTls {
            clients: Some(authn::permit_mesh_tls::Clients::Identities(
                authn::permit_mesh_tls::PermitClientIdentities {
                    identities: names
                        .iter()
                        .map(|n| api::Identity {
                            name: n.to_string(),
                        })
                        .collect(),
                    suffixes: suffixes
                        .iter()
                        .map(|s| api::IdentitySuffix {
                            parts: s.iter().map(|p| p.to_string()).collect(),
                        })
                        .collect(),
                },
            )),
        })
    }

    fn server(kind: proxy_protocol::Kind, authorizations: Vec<Authz>) -> Server {
        Server {
            protocol: Some(ProxyProtocol { kind: Some(kind) }),
            server_ips: vec![],
            authorizations,
            labels: [("name".to_string(), "web-http".to_string())].into(),
        }
    }

    fn detect(routes: Vec<HttpRoute>) -> proxy_protocol::Kind {
        proxy_protocol::Kind::Detect(proxy_protocol::Detect {
            timeout: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            http_routes: routes,
            http_local_rate_limit: None,
        })
    }

    #[test]
    fn servers_are_read_with_linkerds_rules() {
        let unauth = authn::Permit::Unauthenticated(authn::PermitUnauthenticated {});
        let policy = read_server(&server(
            detect(vec![]),
            vec![authz(
                "web",
                &["10.0.0.0/8"],
                &["10.9.0.0/16"],
                unauth.clone(),
            )],
        ))
        .unwrap();
        assert_eq!(
            policy.meta,
            Meta::new("policy.linkerd.io", "server", "web-http")
        );
        assert_eq!(
            policy.protocol,
            PortProtocol::Detect {
                timeout: Some(Duration::from_secs(10))
            }
        );
        // localhost is added; a catch-all route carries the server's authorizations.
        assert_eq!(policy.authorizations.len(), 2);
        assert_eq!(policy.routes.len(), 1);
        assert_eq!(&*policy.routes[0].meta.name, "default");
        assert_eq!(policy.routes[0].authorizations, policy.authorizations);

        type Row = (&'static str, Server, Result<(), ()>);
        let rows: Vec<Row> = vec![
            (
                "no name label",
                Server {
                    labels: HashMap::new(),
                    ..server(detect(vec![]), vec![])
                },
                Err(()),
            ),
            (
                "no protocol",
                Server {
                    protocol: None,
                    ..server(detect(vec![]), vec![])
                },
                Err(()),
            ),
            (
                "detect without a timeout",
                server(
                    proxy_protocol::Kind::Detect(proxy_protocol::Detect::default()),
                    vec![],
                ),
                Err(()),
            ),
            (
                "an authorization without networks",
                server(detect(vec![]), vec![authz("x", &[], &[], unauth.clone())]),
                Err(()),
            ),
            (
                "opaque",
                server(proxy_protocol::Kind::Opaque(Default::default()), vec![]),
                Ok(()),
            ),
        ];
        for (name, server, expected) in rows {
            assert_eq!(
                read_server(&server).map(|_| ()).map_err(|_| ()),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn connections_are_authorized_by_network_and_identity() {
        let unauth = authn::Permit::Unauthenticated(authn::PermitUnauthenticated {});
        let any_mesh = authn::Permit::MeshTls(authn::PermitMeshTls {
            clients: Some(authn::permit_mesh_tls::Clients::Unauthenticated(
                authn::PermitUnauthenticated {},
            )),
        });
        let policy = |a: Authz| read_server(&server(detect(vec![]), vec![a])).unwrap();
        type Row = (&'static str, ServerPolicy, Client, Option<&'static str>);
        let rows: Vec<Row> = vec![
            (
                "in the network",
                policy(authz("a", &["10.0.0.0/8"], &[], unauth.clone())),
                plain("10.1.2.3"),
                Some("a"),
            ),
            (
                "in an exception",
                policy(authz(
                    "a",
                    &["10.0.0.0/8"],
                    &["10.1.0.0/16"],
                    unauth.clone(),
                )),
                plain("10.1.2.3"),
                None,
            ),
            (
                "outside the network",
                policy(authz("a", &["10.0.0.0/8"], &[], unauth.clone())),
                plain("172.16.0.1"),
                None,
            ),
            (
                "mesh TLS required, plaintext client",
                policy(authz("a", &["0.0.0.0/0"], &[], any_mesh.clone())),
                plain("10.1.2.3"),
                None,
            ),
            (
                "mesh TLS required, meshed without a certificate",
                policy(authz("a", &["0.0.0.0/0"], &[], any_mesh.clone())),
                meshed("10.1.2.3", None),
                Some("a"),
            ),
            (
                "the application's own TLS is not mesh TLS",
                policy(authz("a", &["0.0.0.0/0"], &[], any_mesh)),
                Client {
                    ip: "10.1.2.3".parse().unwrap(),
                    tls: TlsStatus::Opaque,
                },
                None,
            ),
            (
                "an identity listed",
                policy(authz("a", &["0.0.0.0/0"], &[], identities(&[ALPHA], &[]))),
                meshed("10.1.2.3", Some(ALPHA)),
                Some("a"),
            ),
            (
                "an identity not listed",
                policy(authz("a", &["0.0.0.0/0"], &[], identities(&[ALPHA], &[]))),
                meshed("10.1.2.3", Some(BETA)),
                None,
            ),
            (
                "an identity listed, no certificate",
                policy(authz("a", &["0.0.0.0/0"], &[], identities(&[ALPHA], &[]))),
                meshed("10.1.2.3", None),
                None,
            ),
            (
                "an identity by suffix",
                policy(authz(
                    "a",
                    &["0.0.0.0/0"],
                    &[],
                    identities(
                        &[],
                        &[&[
                            "other",
                            "serviceaccount",
                            "identity",
                            "linkerd",
                            "cluster",
                            "local",
                        ]],
                    ),
                )),
                meshed("10.1.2.3", Some(BETA)),
                Some("a"),
            ),
            (
                "the empty suffix matches every identity",
                policy(authz("a", &["0.0.0.0/0"], &[], identities(&[], &[&[]]))),
                meshed("10.1.2.3", Some(BETA)),
                Some("a"),
            ),
            (
                "localhost always",
                policy(authz("a", &["10.0.0.0/8"], &[], identities(&[ALPHA], &[]))),
                plain("127.0.0.1"),
                Some("localhost"),
            ),
        ];
        for (name, policy, client, expected) in rows {
            assert_eq!(allowed_by(&policy, &client).as_deref(), expected, "{name}");
        }
        assert_eq!(authorize_tcp(&invalid_policy(), &plain("127.0.0.1")), None);
    }

    #[test]
    fn requests_take_the_most_specific_route_and_its_authorizations() {
        use linkerd2_proxy_api::http_route::{path_match, HttpRouteMatch, PathMatch};
        use linkerd2_proxy_api::inbound::http_route::Rule;
        let unauth = authn::Permit::Unauthenticated(authn::PermitUnauthenticated {});
        let route = |name: &str, path: path_match::Kind, authorizations: Vec<Authz>| HttpRoute {
            metadata: resource("httproute", name),
            hosts: vec![],
            authorizations,
            rules: vec![Rule {
                matches: vec![HttpRouteMatch {
                    path: Some(PathMatch { kind: Some(path) }),
                    ..Default::default()
                }],
                filters: vec![],
            }],
        };
        // The server lets only ALPHA in; probes are open; /admin also lets BETA in.
        let policy = read_server(&server(
            detect(vec![
                route("default", path_match::Kind::Prefix("/".into()), vec![]),
                route(
                    "probe",
                    path_match::Kind::Exact("/ready".into()),
                    vec![authz("probe", &["0.0.0.0/0"], &[], unauth)],
                ),
                route(
                    "admin",
                    path_match::Kind::Prefix("/admin".into()),
                    vec![authz("beta", &["0.0.0.0/0"], &[], identities(&[BETA], &[]))],
                ),
            ]),
            vec![authz(
                "alpha",
                &["0.0.0.0/0"],
                &[],
                identities(&[ALPHA], &[]),
            )],
        ))
        .unwrap();
        let decide = |client: &Client, path: &str| {
            let uri: Uri = path.parse().unwrap();
            match authorize_request(&policy, client, &Method::GET, &uri, &HeaderMap::new(), None) {
                RequestDecision::Allow {
                    route,
                    authorization,
                } => format!("allow {} by {}", route.name, authorization.meta.name),
                RequestDecision::Deny { route } => format!("deny {}", route.name),
                other => format!("{other:?}"),
            }
        };
        let alpha = meshed("10.1.1.1", Some(ALPHA));
        let beta = meshed("10.1.1.2", Some(BETA));
        let kubelet = plain("10.1.1.3");
        type Row<'a> = (&'a Client, &'static str, &'static str);
        let rows: Vec<Row> = vec![
            (&alpha, "/", "allow default by alpha"),
            (&beta, "/", "deny default"),
            (&kubelet, "/ready", "allow probe by probe"),
            (&kubelet, "/ready/x", "deny default"),
            (&beta, "/admin/users", "allow admin by beta"),
            (&alpha, "/admin", "allow admin by alpha"),
            (&kubelet, "/admin", "deny admin"),
        ];
        for (client, path, expected) in rows {
            assert_eq!(decide(client, path), expected, "{path} {client:?}");
        }
        // Routes that match nothing leave a request without a route.
        let narrow = read_server(&server(
            detect(vec![route(
                "only",
                path_match::Kind::Exact("/a".into()),
                vec![],
            )]),
            vec![],
        ))
        .unwrap();
        let uri: Uri = "/b".parse().unwrap();
        assert_eq!(
            authorize_request(&narrow, &alpha, &Method::GET, &uri, &HeaderMap::new(), None),
            RequestDecision::NoRoute
        );
        assert_eq!(
            authorize_request(
                &invalid_policy(),
                &alpha,
                &Method::GET,
                &uri,
                &HeaderMap::new(),
                None
            ),
            RequestDecision::Invalid
        );
    }
}
