//! A cluster's topology in network namespaces: a node that routes between its pods
//! and translates Service addresses to pods the way kube-proxy does.
//!
//! The node is a namespace of its own with one veth leg per pod; pod `i` (from 0)
//! is `10.244.<i+1>.2` behind the node's `10.244.<i+1>.1`, its default route. A
//! [`Cluster::service`] installs kube-proxy's iptables rules in the node: a packet to
//! the virtual IP and port is DNATed to one of the backend pods, each rule taking its
//! share with `-m statistic --mode random`, so an application that dials a Service
//! address without a mesh reaches a random pod per connection, as in a cluster.
//! Everything is removed in `Drop`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::netns::{run_ip, sweep_namespaces_of_dead_runs, Pod};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A node and its pods.
pub struct Cluster {
    pub node: Pod,
    pub pods: Vec<Pod>,
}

impl Cluster {
    /// A node with `count` pods, links up and routes working.
    pub fn new(count: usize) -> Cluster {
        crate::require_root();
        assert!((1..=200).contains(&count), "between 1 and 200 pods");
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_namespaces_of_dead_runs);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // The prefix the harness's sweep recognises: `tdm<pid>x…`.
        let prefix = format!("tdm{}xc{id}", std::process::id());
        let node_name = format!("{prefix}node");
        run_ip(&["netns", "add", &node_name]);
        let mut cluster = Cluster {
            node: Pod {
                name: node_name,
                ipv4: Ipv4Addr::new(10, 244, 1, 1),
                ipv6: Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1),
            },
            pods: Vec::new(),
        };
        let node = cluster.node.name.clone();
        run_ip(&["-n", &node, "link", "set", "lo", "up"]);
        sysctl(
            &node,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        );
        for i in 1..=count {
            let name = format!("{prefix}p{i}");
            run_ip(&["netns", "add", &name]);
            let subnet = i as u8;
            let pod = Pod {
                name,
                ipv4: Ipv4Addr::new(10, 244, subnet, 2),
                ipv6: Ipv6Addr::new(0xfd00, 0, 0, subnet as u16, 0, 0, 0, 2),
            };
            // Pushed first, so that a failure below still deletes it.
            cluster.pods.push(pod);
            let pod = cluster.pods.last().expect("just pushed");
            let leg = format!("leg{i}");
            run_ip(&[
                "link", "add", "veth0", "netns", &pod.name, "type", "veth", "peer", "name", &leg,
                "netns", &node,
            ]);
            sysctl(
                &pod.name,
                &[
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            );
            let gateway4 = format!("10.244.{subnet}.1");
            let gateway6 = format!("fd00:0:0:{subnet}::1");
            run_ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("{gateway4}/24"),
                "dev",
                &leg,
            ]);
            run_ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("{gateway6}/64"),
                "dev",
                &leg,
                "nodad",
            ]);
            run_ip(&["-n", &node, "link", "set", &leg, "up"]);
            let p = pod.name.as_str();
            run_ip(&["-n", p, "link", "set", "lo", "up"]);
            run_ip(&[
                "-n",
                p,
                "addr",
                "add",
                &format!("{}/24", pod.ipv4),
                "dev",
                "veth0",
            ]);
            run_ip(&[
                "-n",
                p,
                "addr",
                "add",
                &format!("{}/64", pod.ipv6),
                "dev",
                "veth0",
                "nodad",
            ]);
            run_ip(&["-n", p, "link", "set", "veth0", "up"]);
            run_ip(&["-n", p, "route", "add", "default", "via", &gateway4]);
            run_ip(&["-n", p, "-6", "route", "add", "default", "via", &gateway6]);
        }
        cluster.wait_until_routes_carry_traffic();
        cluster
    }

    pub fn pod(&self, index: usize) -> &Pod {
        &self.pods[index]
    }

    /// Pod `index`'s address at `port`.
    pub fn addr(&self, index: usize, port: u16) -> SocketAddr {
        SocketAddr::from((self.pods[index].ipv4, port))
    }

    /// The node's address as pods reach it (on the first pod's link).
    pub fn node_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.node.ipv4, port))
    }

    /// A Service: `vip:port` DNATed to `backends` (pod index, port), spread at
    /// random per connection, as kube-proxy's iptables mode spreads them.
    pub fn service(&self, vip: Ipv4Addr, port: u16, backends: &[(usize, u16)]) {
        let count = backends.len();
        for (n, (pod, target)) in backends.iter().enumerate() {
            let to = format!("{}:{target}", self.pods[*pod].ipv4);
            let mut args: Vec<String> = [
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                &vip.to_string(),
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let remaining = count - n;
            if remaining > 1 {
                // The first of the remaining rules takes 1/remaining of what is left.
                let probability = 1.0 / remaining as f64;
                args.extend(
                    ["-m", "statistic", "--mode", "random", "--probability"]
                        .iter()
                        .map(|s| s.to_string()),
                );
                args.push(format!("{probability:.5}"));
            }
            args.extend(
                ["-j", "DNAT", "--to-destination", &to]
                    .iter()
                    .map(|s| s.to_string()),
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.node.must("iptables", &args);
        }
    }

    /// A fresh link drops the first neighbour discovery; a refused connection from
    /// each pod to the node (and to every other pod, through it) proves the routes.
    fn wait_until_routes_carry_traffic(&self) {
        for from in &self.pods {
            let targets = std::iter::once(IpAddr::V4(self.node.ipv4))
                .chain(self.pods.iter().map(|p| IpAddr::V4(p.ipv4)));
            for ip in targets {
                let closed = SocketAddr::new(ip, 9);
                crate::wait_for(
                    &format!("{} to reach {ip}", from.name),
                    crate::PATIENCE,
                    || {
                        let attempt = from.run(|| {
                            TcpStream::connect_timeout(&closed, Duration::from_millis(200))
                        });
                        matches!(attempt, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
                            .then_some(())
                    },
                );
            }
        }
    }
}

fn sysctl(namespace: &str, settings: &[&str]) {
    let mut args = vec!["netns", "exec", namespace, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    run_ip(&args);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for name in self
            .pods
            .iter()
            .map(|p| &p.name)
            .chain(std::iter::once(&self.node.name))
        {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}
