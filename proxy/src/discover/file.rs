//! The discovery file (`TANDEM_DISCOVERY_FILE`): destinations matched by address or
//! network and port, parsed (YAML or TOML) into a table that is replaced whole when the
//! file changes, so lookups never wait for a lock. Parsing is fuzzed.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::Deserialize;
use tracing::{info, warn};

use super::{Discover, Endpoint, Resolution};

/// A parsed discovery file: destinations matched by address or CIDR and port.
#[derive(Debug, Default, PartialEq)]
pub struct Table {
    entries: Vec<Entry>,
}

#[derive(Debug, PartialEq)]
struct Entry {
    net: IpNet,
    /// Inclusive port ranges; empty means every port.
    ports: Vec<(u16, u16)>,
    endpoint: Arc<Endpoint>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    destinations: Vec<FileDestination>,
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
            let what = |why: String| format!("destination {} ({}): {why}", index + 1, d.addr);
            let net = parse_net(&d.addr).map_err(what)?;
            let ports = match &d.ports {
                None => Vec::new(),
                Some(PortsField::One(port)) => vec![(*port, *port)],
                Some(PortsField::List(list)) => parse_port_ranges(list).map_err(what)?,
            };
            let (identity, server_name) = mesh_names(d.identity, d.server_name).map_err(what)?;
            let endpoint = Endpoint {
                identity,
                server_name,
                opaque: d.opaque,
                http2: d.http2,
                inbound_port: d.inbound_port,
            };
            entries.push(Entry {
                net,
                ports,
                endpoint: Arc::new(endpoint),
            });
        }
        Ok(Table { entries })
    }

    /// The most specific entry (longest prefix) that matches the address and port;
    /// among equals, the first in the file.
    pub fn lookup(&self, target: SocketAddr) -> Option<Arc<Endpoint>> {
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
            .map(|e| e.endpoint.clone())
    }
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

fn parse_port_ranges(text: &str) -> Result<Vec<(u16, u16)>, String> {
    Ok(crate::config::PortSet::parse(text)?.ranges())
}

/// The file source: a table replaced whole when the file changes, so lookups never
/// wait for a lock.
pub struct FileDiscovery {
    table: ArcSwap<Table>,
    /// File versions the reloader has processed, valid or not.
    versions_seen: std::sync::atomic::AtomicU64,
}

impl Discover for FileDiscovery {
    fn resolve(&self, target: SocketAddr) -> Resolution<'_> {
        Resolution::Known(self.table.load().lookup(target))
    }
}

impl FileDiscovery {
    /// Loads `path` now (a missing file is an empty table until it appears; an invalid
    /// one is an error) and returns the source with a task that reloads it.
    pub fn start(
        path: PathBuf,
        interval: Duration,
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
                        watcher.table.store(Arc::new(table));
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
        let endpoint = from_yaml.lookup(at("192.0.2.7:9001")).unwrap();
        assert_eq!(
            endpoint.identity.as_deref(),
            Some("web.ns.serviceaccount.identity.linkerd.cluster.local")
        );
        assert!(endpoint.http2 && !endpoint.opaque);
        assert_eq!(endpoint.inbound_port, 4143);
        assert!(from_yaml.lookup(at("192.0.2.7:9003")).is_none());
        assert!(from_yaml.lookup(at("198.51.100.1:8080")).is_none());
    }

    #[test]
    fn the_most_specific_entry_wins() {
        let table = yaml(
            "destinations:\n  - addr: 192.0.2.0/24\n    identity: a.example\n  - addr: 192.0.2.5\n    ports: 80\n    identity: b.example\n    opaque: true\n",
        );
        assert_eq!(
            table
                .lookup(at("192.0.2.5:80"))
                .unwrap()
                .identity
                .as_deref(),
            Some("b.example")
        );
        assert_eq!(
            table
                .lookup(at("192.0.2.5:81"))
                .unwrap()
                .identity
                .as_deref(),
            Some("a.example")
        );
        assert!(table.lookup(at("192.0.2.5:80")).unwrap().opaque);
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
        let vm = table.lookup(at("192.0.2.10:80")).unwrap();
        assert_eq!(
            vm.identity.as_deref(),
            Some("spiffe://root.linkerd.cluster.local/VM-1")
        );
        assert_eq!(vm.server_name.as_deref(), Some("vm-1.example.com"));
        let pod = table.lookup(at("192.0.2.11:80")).unwrap();
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
        let (discovery, reload) =
            FileDiscovery::start(path.clone(), Duration::from_millis(10)).unwrap();
        let reload = tokio::spawn(reload);
        let identity = |d: &FileDiscovery| {
            d.table
                .load()
                .lookup(at("192.0.2.1:80"))
                .and_then(|e| e.identity.clone())
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
