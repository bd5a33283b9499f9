//! The discovery file (`TANDEM_DISCOVERY_FILE`): destinations matched by address or
//! network and port, parsed (YAML or TOML) into a table that is replaced whole when the
//! file changes, so lookups never wait for a lock. Parsing is fuzzed.
//!
//! A destination is either one peer (`identity`, `http2`, … at its own level: the
//! connection goes to the address that was dialled, as before endpoints existed) or
//! a set of `endpoints:` (a Service's VIP mapped to its pods), which the proxy
//! balances as it balances endpoints from the control plane. A balancer is made once
//! per destination and port and kept across reloads: a reload updates it in place,
//! so connections already open follow an edit of the file.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::Deserialize;
use tracing::{info, warn};

use super::balance::{BalanceSettings, Balancer, BalancerName, BalancerRegistry};
use super::file_routes::{self, FileAccrual, FileRoute, DEFAULT_BACKEND};
use super::outbound_routes::RouteTable;
use super::{Backend, Destination, Discover, Endpoint, Labels, Resolution, Routing, RoutingCell};
use crate::metrics::routes::RouteMetrics;

/// A parsed discovery file: destinations matched by address or CIDR and port.
#[derive(Debug, Default, PartialEq)]
pub struct Table {
    entries: Vec<Entry>,
}

#[derive(Debug, PartialEq)]
struct Entry {
    /// Names the entry across reloads: its `addr` and `ports` as written.
    key: String,
    net: IpNet,
    /// Inclusive port ranges; empty means every port.
    ports: Vec<(u16, u16)>,
    opaque: bool,
    target: EntryTarget,
    /// Named sets of endpoints the routes split over.
    backends: Vec<(String, Vec<FileEndpoint>)>,
    routes: Option<Arc<RouteTable>>,
}

#[derive(Debug, PartialEq)]
enum EntryTarget {
    /// The dialled address itself, as this peer.
    Peer(Peer),
    /// These endpoints, balanced.
    Endpoints(Vec<FileEndpoint>),
}

/// How to reach a meshed (or unmeshed) peer; an endpoint without an address yet.
#[derive(Clone, Debug, PartialEq)]
struct Peer {
    identity: Option<Arc<str>>,
    server_name: Option<Arc<str>>,
    http2: bool,
    inbound_port: u16,
    labels: Arc<Labels>,
}

impl Peer {
    fn at(&self, addr: SocketAddr, weight: u32) -> Endpoint {
        Endpoint {
            addr,
            weight,
            identity: self.identity.clone(),
            server_name: self.server_name.clone(),
            http2: self.http2,
            // Opaque connections to a meshed peer go to its proxy's inbound port.
            opaque_port: self.identity.as_ref().map(|_| self.inbound_port),
            http_via: super::HttpVia::AppPort,
            labels: self.labels.clone(),
        }
    }
}

#[derive(Debug, PartialEq)]
struct FileEndpoint {
    ip: IpAddr,
    /// `None`: the port that was dialled.
    port: Option<u16>,
    weight: u32,
    peer: Peer,
}

/// One destination as written in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDestination {
    /// An address (`192.0.2.2`) or a network (`192.0.2.0/24`, `2001:db8::/64`).
    addr: String,
    /// Ports and ranges (`8080,9000-9100`); all ports when absent.
    #[serde(default)]
    ports: Option<PortsField>,
    #[serde(default)]
    identity: Option<String>,
    /// Required when `identity` is a SPIFFE ID (SNI cannot carry a URI).
    #[serde(default)]
    server_name: Option<String>,
    #[serde(default)]
    opaque: bool,
    #[serde(default)]
    http2: bool,
    #[serde(default = "default_inbound_port")]
    inbound_port: u16,
    /// The destination's metric labels (`service`, `namespace`, …), printed as
    /// `dst_<name>`.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// The pods behind a Service's address, balanced; the destination's own
    /// `identity`, `http2` and `inbound_port` are their defaults.
    #[serde(default)]
    endpoints: Option<Vec<FileEndpointSpec>>,
    /// Other sets of endpoints, by name, that routes split requests over.
    #[serde(default)]
    backends: BTreeMap<String, FileBackend>,
    /// HTTP routes, as HTTPRoutes describe them (`file_routes.rs`).
    #[serde(default)]
    routes: Option<Vec<FileRoute>>,
    #[serde(default)]
    failure_accrual: Option<FileAccrual>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    endpoints: Vec<FileEndpointSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpointSpec {
    /// `10.42.0.5` (the dialled port) or `10.42.0.5:8080`.
    addr: String,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    server_name: Option<String>,
    #[serde(default)]
    http2: Option<bool>,
    #[serde(default)]
    inbound_port: Option<u16>,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// A peer's identity and the SNI to reach it by; both `None` when it is not meshed.
type MeshNames = (Option<Arc<str>>, Option<Arc<str>>);

/// The identity a peer must prove and the SNI to reach it by. DNS identities are
/// compared case-insensitively, so they are lower-cased here; a SPIFFE ID is kept
/// as written (its path is case-sensitive) and needs a `server_name`.
fn mesh_names(identity: Option<String>, server_name: Option<String>) -> Result<MeshNames, String> {
    let Some(identity) = identity.map(|id| id.trim().to_string()) else {
        if server_name.is_some() {
            return Err("server_name without an identity".into());
        }
        return Ok((None, None));
    };
    if identity.is_empty() {
        return Err("identity is empty".into());
    }
    let dns = |name: &str| {
        rustls::pki_types::DnsName::try_from(name)
            .map(|_| Arc::<str>::from(name.to_ascii_lowercase()))
            .map_err(|_| format!("{name:?} is not a DNS name"))
    };
    let server_name = server_name.map(|n| dns(n.trim())).transpose()?;
    if tandem_identity::tls::is_spiffe_id(&identity) {
        tandem_identity::tls::check_spiffe_id(&identity).map_err(|e| format!("identity: {e:#}"))?;
        let Some(server_name) = server_name else {
            return Err(format!(
                "identity {identity} is a SPIFFE ID: server_name (the DNS name the peer answers to in SNI) is required"
            ));
        };
        return Ok((Some(Arc::from(identity)), Some(server_name)));
    }
    let identity = Arc::<str>::from(identity.to_ascii_lowercase());
    let server_name = server_name.unwrap_or_else(|| identity.clone());
    Ok((Some(identity), Some(server_name)))
}

/// Ports may be written as a number or as a list string.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortsField {
    One(u16),
    List(String),
}

fn default_inbound_port() -> u16 {
    4143
}

fn default_weight() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    destinations: Vec<FileDestination>,
}

fn labels(map: BTreeMap<String, String>) -> Labels {
    Labels::new(map)
}

impl Table {
    /// Parses a discovery file; `.toml` files are TOML, anything else YAML (or JSON).
    pub fn parse(text: &str, path: &Path) -> Result<Table, String> {
        let file: File = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(text).map_err(|e| e.to_string())?
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?
        };
        let mut entries = Vec::with_capacity(file.destinations.len());
        for (index, d) in file.destinations.into_iter().enumerate() {
            let name = format!("destination {} ({})", index + 1, d.addr);
            entries.push(entry(d).map_err(|why| format!("{name}: {why}"))?);
        }
        Ok(Table { entries })
    }

    /// The most specific entry (longest prefix) that matches the address and port;
    /// among equals, the first in the file.
    fn entry(&self, target: SocketAddr) -> Option<&Entry> {
        let ip = crate::net::socket::unmap(target).ip();
        let port = target.port();
        self.entries
            .iter()
            .filter(|e| e.net.contains(&ip))
            .filter(|e| {
                e.ports.is_empty()
                    || e.ports
                        .iter()
                        .any(|(low, high)| (*low..=*high).contains(&port))
            })
            .fold(None::<&Entry>, |best, e| match best {
                Some(b) if b.net.prefix_len() >= e.net.prefix_len() => Some(b),
                _ => Some(e),
            })
    }

    /// The routes the table gives `target`, if it has any.
    pub fn routes_of(&self, target: SocketAddr) -> Option<&Arc<RouteTable>> {
        self.entry(target)?.routes.as_ref()
    }

    /// The endpoints the table gives `target`: itself as the entry's peer, or the
    /// entry's endpoints (with the dialled port where they name none). `None` when
    /// no entry matches.
    pub fn lookup(&self, target: SocketAddr) -> Option<(bool, Vec<Endpoint>)> {
        let entry = self.entry(target)?;
        Some((entry.opaque, endpoints(entry, target)))
    }
}

/// A balancer's key: entry key, backend name, dialled port.
type BalancerKey = (String, String, u16);

/// The endpoints of `entry`'s backend `name` for `target` (none when it has no such
/// backend, or its own target is a peer).
fn backend_endpoints(entry: &Entry, name: &str, target: SocketAddr) -> Vec<Endpoint> {
    if name == DEFAULT_BACKEND {
        return match &entry.target {
            EntryTarget::Peer(_) => Vec::new(),
            EntryTarget::Endpoints(_) => endpoints(entry, target),
        };
    }
    entry
        .backends
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, list)| list.iter().map(|e| e.at(target)).collect())
        .unwrap_or_default()
}

fn endpoints(entry: &Entry, target: SocketAddr) -> Vec<Endpoint> {
    match &entry.target {
        EntryTarget::Peer(peer) => vec![peer.at(target, 1)],
        EntryTarget::Endpoints(list) => list.iter().map(|e| e.at(target)).collect(),
    }
}

impl FileEndpoint {
    /// The endpoint, at the dialled port unless it names its own.
    fn at(&self, target: SocketAddr) -> Endpoint {
        let addr = SocketAddr::new(self.ip, self.port.unwrap_or(target.port()));
        self.peer.at(addr, self.weight)
    }
}

fn entry(d: FileDestination) -> Result<Entry, String> {
    let net = parse_net(&d.addr)?;
    let ports = match &d.ports {
        None => Vec::new(),
        Some(PortsField::One(port)) => vec![(*port, *port)],
        Some(PortsField::List(list)) => parse_port_ranges(list)?,
    };
    let key = format!(
        "{} {}",
        d.addr.trim(),
        match &d.ports {
            None => String::new(),
            Some(PortsField::One(port)) => port.to_string(),
            Some(PortsField::List(list)) => list.trim().to_string(),
        }
    );
    let destination_labels = labels(d.labels);
    let defaults = Defaults {
        identity: d.identity.clone(),
        server_name: d.server_name.clone(),
        http2: d.http2,
        inbound_port: d.inbound_port,
        labels: destination_labels.clone(),
    };
    let target = match d.endpoints {
        None => {
            let (identity, server_name) = mesh_names(d.identity, d.server_name)?;
            EntryTarget::Peer(Peer {
                identity,
                server_name,
                http2: d.http2,
                inbound_port: d.inbound_port,
                labels: Arc::new(destination_labels),
            })
        }
        Some(list) => EntryTarget::Endpoints(file_endpoints(list, &defaults)?),
    };
    let mut backends = Vec::with_capacity(d.backends.len());
    for (name, backend) in d.backends {
        if name == DEFAULT_BACKEND {
            return Err(format!(
                "backend {DEFAULT_BACKEND:?} names the destination's own endpoints"
            ));
        }
        let list = file_endpoints(backend.endpoints, &defaults)
            .map_err(|why| format!("backend {name}: {why}"))?;
        backends.push((name, list));
    }
    let routes = match d.routes {
        None => None,
        Some(routes) => {
            let names: Vec<String> = backends.iter().map(|(n, _)| n.clone()).collect();
            let port = ports.first().map_or(0, |(low, _)| *low);
            let table = file_routes::read_routes(routes, &names, d.failure_accrual, port)?;
            Some(Arc::new(table))
        }
    };
    Ok(Entry {
        key,
        net,
        ports,
        opaque: d.opaque,
        target,
        backends,
        routes,
    })
}

/// What a destination's endpoints inherit from it.
struct Defaults {
    identity: Option<String>,
    server_name: Option<String>,
    http2: bool,
    inbound_port: u16,
    labels: Labels,
}

fn file_endpoints(
    list: Vec<FileEndpointSpec>,
    defaults: &Defaults,
) -> Result<Vec<FileEndpoint>, String> {
    if list.is_empty() {
        return Err("endpoints is empty".into());
    }
    let mut endpoints = Vec::with_capacity(list.len());
    for (index, e) in list.into_iter().enumerate() {
        let what = |why: String| format!("endpoint {} ({}): {why}", index + 1, e.addr);
        let (ip, port) = parse_endpoint_addr(&e.addr).map_err(what)?;
        let identity = e.identity.or_else(|| defaults.identity.clone());
        let server_name = e.server_name.or_else(|| defaults.server_name.clone());
        let (identity, server_name) = mesh_names(identity, server_name).map_err(what)?;
        endpoints.push(FileEndpoint {
            ip,
            port,
            weight: e.weight,
            peer: Peer {
                identity,
                server_name,
                http2: e.http2.unwrap_or(defaults.http2),
                inbound_port: e.inbound_port.unwrap_or(defaults.inbound_port),
                labels: Arc::new(defaults.labels.merged(&labels(e.labels))),
            },
        });
    }
    Ok(endpoints)
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{text:?} is neither an address nor a network"))
}

/// `10.0.0.1`, `10.0.0.1:80`, `2001:db8::1` or `[2001:db8::1]:80`.
fn parse_endpoint_addr(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok((addr.ip(), Some(addr.port())));
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| (ip, None))
        .map_err(|_| format!("{text:?} is not an address, with or without a port"))
}

fn parse_port_ranges(text: &str) -> Result<Vec<(u16, u16)>, String> {
    Ok(crate::config::PortSet::parse(text)?.ranges())
}

/// The file source: a table replaced whole when the file changes, so lookups never
/// wait for a lock, and the balancers its entries with endpoints have made.
pub struct FileDiscovery {
    table: ArcSwap<Table>,
    /// By entry key, backend name ([`DEFAULT_BACKEND`]: the entry's own endpoints)
    /// and dialled port.
    balancers: Mutex<HashMap<BalancerKey, Arc<Balancer>>>,
    /// The routing of entries with routes, by entry key and dialled port: kept across
    /// reloads, so open connections follow an edit.
    routings: Mutex<HashMap<(String, u16), Arc<RoutingCell>>>,
    route_metrics: Arc<RouteMetrics>,
    balance: BalanceSettings,
    registry: Arc<BalancerRegistry>,
    /// File versions the reloader has processed, valid or not.
    versions_seen: std::sync::atomic::AtomicU64,
}

impl Discover for FileDiscovery {
    fn resolve(&self, target: SocketAddr) -> Resolution<'_> {
        Resolution::Known(Ok(self
            .lookup(target)
            .unwrap_or_else(|| Destination::fallback(target))))
    }
}

impl FileDiscovery {
    /// What the file says of `target`, `None` when no entry matches.
    pub fn lookup(&self, target: SocketAddr) -> Option<Arc<Destination>> {
        let table = self.table.load();
        let entry = table.entry(target)?;
        let mut balancers = self.balancers.lock().unwrap_or_else(|p| p.into_inner());
        let backend = self.backend(entry, DEFAULT_BACKEND, target, &mut balancers);
        let routes = entry.routes.as_ref().map(|routes| {
            let mut routings = self.routings.lock().unwrap_or_else(|p| p.into_inner());
            routings
                .entry((entry.key.clone(), target.port()))
                .or_insert_with(|| {
                    let routing = self.routing(entry, routes, target, &mut balancers);
                    Arc::new(RoutingCell::from_pointee(routing))
                })
                .clone()
        });
        Some(Arc::new(Destination {
            routes,
            opaque: entry.opaque,
            backend,
        }))
    }

    /// Where `entry`'s backend `name` sends requests to `target`: its peer, or a
    /// balancer over its endpoints, made once and kept.
    fn backend(
        &self,
        entry: &Entry,
        name: &str,
        target: SocketAddr,
        balancers: &mut HashMap<BalancerKey, Arc<Balancer>>,
    ) -> Backend {
        if let (DEFAULT_BACKEND, EntryTarget::Peer(peer)) = (name, &entry.target) {
            return Backend::Forward(Arc::new(peer.at(target, 1)));
        }
        let key = (entry.key.clone(), name.to_string(), target.port());
        let balancer = balancers.entry(key).or_insert_with(|| {
            let mut balancer_name = BalancerName::default_kind(&entry.key, target.port());
            if name != DEFAULT_BACKEND {
                balancer_name.backend = BalancerName::default_kind(name, target.port()).backend;
            }
            let balancer = Balancer::new(balancer_name, self.balance.clone());
            self.registry.register(&balancer);
            balancer.update(backend_endpoints(entry, name, target));
            balancer.set_accrual(entry.routes.as_ref().and_then(|r| r.accrual));
            balancer
        });
        Backend::Balance(balancer.clone())
    }

    /// `entry`'s routes, their backends resolved.
    fn routing(
        &self,
        entry: &Entry,
        routes: &Arc<RouteTable>,
        target: SocketAddr,
        balancers: &mut HashMap<BalancerKey, Arc<Balancer>>,
    ) -> Routing {
        let parent = BalancerName::default_kind(&entry.key, target.port()).parent;
        Routing::new(routes.clone(), &parent, &self.route_metrics, |backend| {
            let name = backend
                .labels
                .get("backend_name")
                .unwrap_or(DEFAULT_BACKEND);
            self.backend(entry, name, target, balancers)
        })
    }

    /// A new table: balancers whose entry is still there take its endpoints; the
    /// others are forgotten (connections that hold them finish with what they have).
    fn install(&self, table: Table) {
        let mut balancers = self.balancers.lock().unwrap_or_else(|p| p.into_inner());
        balancers.retain(|(key, name, port), balancer| {
            let entry = table.entries.iter().find(|e| &e.key == key);
            let Some(entry) = entry else {
                return false;
            };
            let target = SocketAddr::new(entry.net.addr(), *port);
            let endpoints = backend_endpoints(entry, name, target);
            let keep = !endpoints.is_empty()
                && !matches!(entry.target, EntryTarget::Peer(_) if name == DEFAULT_BACKEND);
            if keep {
                balancer.update(endpoints);
                balancer.set_accrual(entry.routes.as_ref().and_then(|r| r.accrual));
            }
            keep
        });
        let mut routings = self.routings.lock().unwrap_or_else(|p| p.into_inner());
        routings.retain(|(key, port), cell| {
            let entry = table.entries.iter().find(|e| &e.key == key);
            let Some((entry, routes)) = entry.and_then(|e| Some((e, e.routes.as_ref()?))) else {
                return false;
            };
            let target = SocketAddr::new(entry.net.addr(), *port);
            cell.store(Arc::new(self.routing(
                entry,
                routes,
                target,
                &mut balancers,
            )));
            true
        });
        drop(routings);
        drop(balancers);
        self.table.store(Arc::new(table));
    }

    /// Loads `path` now (a missing file is an empty table until it appears; an invalid
    /// one is an error) and returns the source with a task that reloads it.
    pub fn start(
        path: PathBuf,
        interval: Duration,
        balance: BalanceSettings,
        registry: Arc<BalancerRegistry>,
        route_metrics: Arc<RouteMetrics>,
    ) -> Result<(Arc<FileDiscovery>, impl Future<Output = ()>), String> {
        let initial = match std::fs::read_to_string(&path) {
            Ok(text) => {
                Some(Table::parse(&text, &path).map_err(|e| format!("{}: {e}", path.display()))?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                warn!(path = %path.display(), "discovery file not found; every destination is unmeshed until it appears");
                None
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let mut last_text = initial
            .is_some()
            .then(|| std::fs::read_to_string(&path).unwrap_or_default());
        let discovery = Arc::new(FileDiscovery {
            table: ArcSwap::from_pointee(initial.unwrap_or_default()),
            balancers: Mutex::default(),
            routings: Mutex::default(),
            route_metrics,
            balance,
            registry,
            versions_seen: Default::default(),
        });
        let watcher = discovery.clone();
        let reload = async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Reading whole files keeps the check simple and also catches the symlink
                // swaps Kubernetes uses to update mounted ConfigMaps.
                let text = match tokio::fs::read_to_string(&path).await {
                    Ok(text) => text,
                    Err(_) => continue,
                };
                if last_text.as_deref() == Some(text.as_str()) {
                    continue;
                }
                match Table::parse(&text, &path) {
                    Ok(table) => {
                        info!(path = %path.display(), destinations = table.entries.len(), "discovery file reloaded");
                        watcher.install(table);
                    }
                    Err(error) => {
                        warn!(path = %path.display(), %error, "invalid discovery file; keeping the last good table")
                    }
                }
                last_text = Some(text);
                watcher
                    .versions_seen
                    .fetch_add(1, std::sync::atomic::Ordering::Release);
            }
        };
        Ok((discovery, reload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Table {
        Table::parse(text, Path::new("d.yaml")).unwrap()
    }

    fn at(addr: &str) -> SocketAddr {
        addr.parse().unwrap()
    }

    /// The one peer an entry without endpoints gives `addr`.
    fn peer(table: &Table, addr: &str) -> Option<Endpoint> {
        let (_, mut endpoints) = table.lookup(at(addr))?;
        assert_eq!(endpoints.len(), 1);
        endpoints.pop()
    }

    fn settings() -> BalanceSettings {
        use super::super::balance::Backoff;
        BalanceSettings {
            backoff: Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(60),
                jitter: 0.1,
            },
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
        }
    }

    #[test]
    fn yaml_and_toml_describe_the_same_table() {
        let from_yaml = yaml(
            "destinations:\n  - addr: 192.0.2.0/24\n    ports: \"8080,9000-9002\"\n    identity: Web.NS.serviceaccount.identity.linkerd.cluster.local\n    http2: true\n",
        );
        let from_toml = Table::parse(
            "[[destinations]]\naddr = \"192.0.2.0/24\"\nports = \"8080,9000-9002\"\nidentity = \"web.ns.serviceaccount.identity.linkerd.cluster.local\"\nhttp2 = true\n",
            Path::new("d.toml"),
        )
        .unwrap();
        assert_eq!(from_yaml, from_toml);
        let (opaque, _) = from_yaml.lookup(at("192.0.2.7:9001")).unwrap();
        let endpoint = peer(&from_yaml, "192.0.2.7:9001").unwrap();
        assert_eq!(endpoint.addr, at("192.0.2.7:9001"));
        assert_eq!(
            endpoint.identity.as_deref(),
            Some("web.ns.serviceaccount.identity.linkerd.cluster.local")
        );
        assert!(endpoint.http2 && !opaque);
        assert_eq!(endpoint.opaque_port, Some(4143));
        assert!(from_yaml.lookup(at("192.0.2.7:9003")).is_none());
        assert!(from_yaml.lookup(at("198.51.100.1:8080")).is_none());
    }

    #[test]
    fn the_most_specific_entry_wins() {
        let table = yaml(
            "destinations:\n  - addr: 192.0.2.0/24\n    identity: a.example\n  - addr: 192.0.2.5\n    ports: 80\n    identity: b.example\n    opaque: true\n",
        );
        assert_eq!(
            peer(&table, "192.0.2.5:80").unwrap().identity.as_deref(),
            Some("b.example")
        );
        assert_eq!(
            peer(&table, "192.0.2.5:81").unwrap().identity.as_deref(),
            Some("a.example")
        );
        assert!(table.lookup(at("192.0.2.5:80")).unwrap().0);
        // IPv4-mapped addresses from dual-stack sockets match IPv4 entries.
        assert!(table.lookup(at("[::ffff:192.0.2.9]:1")).is_some());
        let v6 = yaml("destinations:\n  - addr: 2001:db8::/64\n    identity: six.example\n");
        assert!(v6.lookup(at("[2001:db8::2]:80")).is_some());
    }

    #[test]
    fn invalid_files_say_where() {
        let bad = |text: &str| Table::parse(text, Path::new("d.yaml")).unwrap_err();
        assert!(bad("destinations:\n  - addr: nowhere\n").contains("destination 1 (nowhere)"));
        assert!(
            bad("destinations:\n  - addr: 192.0.2.1\n    ports: \"99999\"\n")
                .contains("destination 1")
        );
        assert!(bad("destinations:\n  - addr: 192.0.2.1\n    colour: blue\n").contains("colour"));
        assert!(bad("destinations:\n  - addr: 192.0.2.1\n    identity: \" \"\n").contains("empty"));
    }

    #[test]
    fn spiffe_identities_keep_their_case_and_need_a_server_name() {
        let table = yaml(
            "destinations:\n  - addr: 192.0.2.10\n    identity: spiffe://root.linkerd.cluster.local/VM-1\n    server_name: VM-1.Example.com\n  - addr: 192.0.2.11\n    identity: Web.Example\n",
        );
        let vm = peer(&table, "192.0.2.10:80").unwrap();
        assert_eq!(
            vm.identity.as_deref(),
            Some("spiffe://root.linkerd.cluster.local/VM-1")
        );
        assert_eq!(vm.server_name.as_deref(), Some("vm-1.example.com"));
        let pod = peer(&table, "192.0.2.11:80").unwrap();
        assert_eq!(pod.identity.as_deref(), Some("web.example"));
        assert_eq!(pod.server_name.as_deref(), Some("web.example"));

        let bad = |text: &str| Table::parse(text, Path::new("d.yaml")).unwrap_err();
        let no_sni =
            bad("destinations:\n  - addr: 192.0.2.1\n    identity: spiffe://example.org/vm\n");
        assert!(
            no_sni.contains("server_name") && no_sni.contains("destination 1"),
            "{no_sni}"
        );
        assert!(bad("destinations:\n  - addr: 192.0.2.1\n    identity: spiffe://Example.org/vm\n    server_name: vm.example.org\n").contains("trust domain"));
        assert!(
            bad("destinations:\n  - addr: 192.0.2.1\n    server_name: vm.example.org\n")
                .contains("without an identity")
        );
    }

    #[tokio::test]
    async fn edits_apply_and_invalid_edits_keep_the_last_good_table() {
        use std::sync::atomic::Ordering;
        let dir = std::env::temp_dir().join(format!("tandem-discovery-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.yaml");
        std::fs::write(
            &path,
            "destinations:\n  - addr: 192.0.2.1\n    identity: one.example\n",
        )
        .unwrap();
        let (discovery, reload) = FileDiscovery::start(
            path.clone(),
            Duration::from_millis(10),
            settings(),
            Arc::default(),
            Arc::default(),
        )
        .unwrap();
        let reload = tokio::spawn(reload);
        let identity = |d: &FileDiscovery| {
            peer(&d.table.load(), "192.0.2.1:80").and_then(|e| e.identity.clone())
        };
        assert_eq!(identity(&discovery).as_deref(), Some("one.example"));

        std::fs::write(
            &path,
            "destinations:\n  - addr: 192.0.2.1\n    identity: two.example\n",
        )
        .unwrap();
        wait_until(|| discovery.versions_seen.load(Ordering::Acquire) == 1).await;
        assert_eq!(identity(&discovery).as_deref(), Some("two.example"));

        std::fs::write(&path, "destinations: [oops\n").unwrap();
        wait_until(|| discovery.versions_seen.load(Ordering::Acquire) == 2).await;
        assert_eq!(identity(&discovery).as_deref(), Some("two.example"));
        reload.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn endpoints_map_an_address_to_its_pods() {
        let table = yaml(concat!(
            "destinations:\n",
            "  - addr: 10.96.0.10\n",
            "    ports: 80\n",
            "    identity: default.prod.serviceaccount.identity.linkerd.cluster.local\n",
            "    http2: true\n",
            "    labels: {service: web, namespace: prod}\n",
            "    endpoints:\n",
            "      - addr: 10.42.0.5\n",
            "        labels: {pod: web-a}\n",
            "      - addr: 10.42.0.6:8080\n",
            "        identity: b.prod.serviceaccount.identity.linkerd.cluster.local\n",
            "        weight: 3\n",
            "        http2: false\n",
            "      - addr: \"[2001:db8::7]\"\n",
        ));
        let (opaque, endpoints) = table.lookup(at("10.96.0.10:80")).unwrap();
        assert!(!opaque);
        let addrs: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(
            addrs,
            ["10.42.0.5:80", "10.42.0.6:8080", "[2001:db8::7]:80"]
        );
        let (a, b) = (&endpoints[0], &endpoints[1]);
        // The destination's mesh settings are the endpoints' defaults.
        assert_eq!(
            a.identity.as_deref(),
            Some("default.prod.serviceaccount.identity.linkerd.cluster.local")
        );
        assert!(a.http2 && !b.http2);
        assert_eq!(
            b.identity.as_deref(),
            Some("b.prod.serviceaccount.identity.linkerd.cluster.local")
        );
        assert_eq!((a.weight, b.weight), (1, 3));
        assert_eq!(a.labels.get("service"), Some("web"));
        assert_eq!(a.labels.get("pod"), Some("web-a"));
        assert_eq!(b.labels.get("pod"), None);
        assert!(table.lookup(at("10.96.0.10:81")).is_none());

        let bad = |text: &str| Table::parse(text, Path::new("d.yaml")).unwrap_err();
        let error =
            bad("destinations:\n  - addr: 10.96.0.10\n    endpoints:\n      - addr: pod-a\n");
        assert!(
            error.contains("destination 1") && error.contains("endpoint 1 (pod-a)"),
            "{error}"
        );
        assert!(bad("destinations:\n  - addr: 10.96.0.10\n    endpoints: []\n").contains("empty"));
    }

    /// A reload updates the balancer in place, so connections that hold it follow.
    #[tokio::test]
    async fn a_reload_updates_the_balancers_it_made() {
        let discovery = FileDiscovery {
            table: ArcSwap::from_pointee(yaml(
                "destinations:\n  - addr: 10.96.0.10\n    endpoints:\n      - addr: 10.42.0.5\n      - addr: 10.42.0.6\n",
            )),
            balancers: Mutex::default(),
            routings: Mutex::default(),
            route_metrics: Arc::default(),
            balance: settings(),
            registry: Arc::default(),
            versions_seen: Default::default(),
        };
        let destination = discovery.lookup(at("10.96.0.10:80")).unwrap();
        let Backend::Balance(balancer) = &destination.backend else {
            panic!("a balancer expected");
        };
        assert_eq!(balancer.endpoints().len(), 2);
        discovery.install(yaml(
            "destinations:\n  - addr: 10.96.0.10\n    endpoints:\n      - addr: 10.42.0.7\n",
        ));
        let ports: Vec<SocketAddr> = balancer.endpoints().iter().map(|e| e.addr).collect();
        assert_eq!(ports, [at("10.42.0.7:80")]);
        let again = discovery.lookup(at("10.96.0.10:80")).unwrap();
        let Backend::Balance(same) = &again.backend else {
            panic!("a balancer expected");
        };
        assert!(Arc::ptr_eq(balancer, same));
    }

    async fn wait_until(mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
