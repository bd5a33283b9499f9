//! `tandem-bench discovery`: the control plane at scale.
//!
//! The test control plane (in the client pod, on loopback, as linkerd2-proxy's own
//! tests run it) describes `--services` Services, each an opaque port with
//! `--endpoints` meshed endpoints, labelled and identified as Linkerd's destination
//! controller describes pods; the client-side proxy resolves every one (a connection
//! to each Service's address, carried with mTLS to one of its endpoints' proxy).
//! Reported:
//! - the proxy's resident memory before and after, per Service, and per endpoint
//!   (from a second run with one endpoint per Service, so that the Service's own cost
//!   and its endpoints' cost come apart);
//! - the time from an endpoint update on the control plane to the first connection
//!   that reaches the new endpoint;
//! - that the discovery streams of Services no longer used are closed after
//!   `LINKERD2_PROXY_OUTBOUND_DISCOVERY_IDLE_TIMEOUT`, and the memory after that
//!   (with the connections' metric series dropped too: they are kept for
//!   `LINKERD2_PROXY_METRICS_RETAIN_IDLE`, 5 s here, 10 min by default).
//!
//! Endpoints are addresses of the server pod (secondary addresses on its link),
//! whose proxy takes the transport header on 4143 and where one echo server
//! answers with the address it was reached on.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tandem_tests::control::{endpoint, service_policy, ControlPlane, Hint};
use tandem_tests::mesh::{env_refs, identity_of, TrustDomain};
use tandem_tests::proc::Proc;
use tandem_tests::{wait_for, Mesh, Pod, Proxy};

#[derive(Debug, Args)]
pub struct DiscoveryArgs {
    /// How many Services the control plane describes.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints per Service (addresses of the server pod; at most 100).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
}

const PORT: u16 = 7000;
const CONTROL: &str = "127.0.0.1:8086";
const IDLE: Duration = Duration::from_secs(5);

fn service_addr(index: usize) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::new(10, 96, (index / 250) as u8, (index % 250 + 1) as u8),
        PORT,
    ))
}

fn endpoint_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 100 + index as u8)
}

fn path(index: usize) -> String {
    format!("svc-{index}.default.svc.cluster.local:{PORT}")
}

/// The proxy's resident memory, from `/proc`.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

/// One exchange through the mesh: returns the endpoint address that answered.
fn exchange(client: &Pod, target: SocketAddr) -> anyhow::Result<String> {
    client.run(|| {
        let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("connect to {target}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(b"?")?;
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)
            .with_context(|| format!("read from {target}"))?;
        Ok(answer)
    })
}

/// The client pod (0), the server pod (1) and the issuer (pod 2, unmeshed).
struct World {
    mesh: Mesh,
    domain: TrustDomain,
    _issuer: Proc,
}

/// The server pod's proxy's identity, which every endpoint carries.
fn server_identity() -> String {
    identity_of("server")
}

/// An endpoint as the destination controller describes a meshed pod on an opaque
/// port.
fn meshed_endpoint(ip: Ipv4Addr, pod: &str) -> tandem_tests::control::WeightedAddr {
    endpoint(
        SocketAddr::from((ip, PORT)),
        Some(&server_identity()),
        Hint::Opaque(4143),
        pod,
    )
}

impl World {
    fn new(endpoints: usize) -> anyhow::Result<World> {
        if endpoints == 0 || endpoints > 100 {
            bail!("--endpoints must be between 1 and 100");
        }
        let mesh = Mesh::new(3);
        tandem_tests::proxy::redirect(mesh.pod(0));
        tandem_tests::proxy::redirect(mesh.pod(1));
        let domain = TrustDomain::new();
        let issuer = domain.start_issuer(mesh.pod(2), &[]);
        let client = mesh.pod(0);
        let server = mesh.pod(1);
        client.must("ip", &["route", "add", "10.96.0.0/16", "dev", "veth0"]);
        for i in 0..endpoints {
            server.must(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/32", endpoint_ip(i)),
                    "dev",
                    "veth0",
                ],
            );
        }
        // The echo server answers with the address it was reached on.
        let listener = server
            .run(|| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], PORT))))
            .context("bind the echo server")?;
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    let local = conn.local_addr().map(|a| a.ip().to_string());
                    let mut byte = [0u8; 1];
                    let _ = conn.read(&mut byte);
                    let _ = conn.write_all(local.unwrap_or_default().as_bytes());
                });
            }
        });
        Ok(World {
            mesh,
            domain,
            _issuer: issuer,
        })
    }

    fn issuer(&self) -> SocketAddr {
        SocketAddr::from((self.mesh.pod(2).ipv4, 8080))
    }
}

/// What one run measured.
struct Run {
    before: u64,
    resolved: u64,
    idle: u64,
    watchers_left: usize,
    resolve_time: Duration,
    update_latencies: Vec<Duration>,
}

fn run_once(services: usize, endpoints: usize, measure_updates: bool) -> anyhow::Result<Run> {
    let world = World::new(endpoints)?;
    let client = world.mesh.pod(0);
    let control = ControlPlane::start(client, CONTROL.parse()?);
    for s in 0..services {
        control.set_policy(
            service_addr(s),
            service_policy(&format!("svc-{s}"), PORT, &path(s), true),
        );
        let addrs = (0..endpoints)
            .map(|e| meshed_endpoint(endpoint_ip(e), &format!("svc-{s}-{e}")))
            .collect();
        control.set_endpoints(&path(s), addrs);
    }
    let mut server_env = world.domain.identity_env("server", world.issuer());
    server_env.push(("LINKERD2_PROXY_LOG".into(), "warn".into()));
    let server = Proxy::start(world.mesh.pod(1), &env_refs(&server_env));
    let mut settings: Vec<(String, String)> = world.domain.identity_env("client", world.issuer());
    settings.extend(
        [
            ("LINKERD2_PROXY_LOG", "warn"),
            ("LINKERD2_PROXY_DESTINATION_SVC_ADDR", CONTROL),
            ("LINKERD2_PROXY_POLICY_SVC_ADDR", CONTROL),
            (
                "LINKERD2_PROXY_POLICY_WORKLOAD",
                "{\"ns\":\"default\",\"pod\":\"bench\"}",
            ),
            ("LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS", "10.0.0.0/8"),
            ("LINKERD2_PROXY_OUTBOUND_DISCOVERY_IDLE_TIMEOUT", "5s"),
            // The connections' metric series (one per endpoint reached, with its
            // labels) go as soon as they are idle, so that what stays is not them.
            ("LINKERD2_PROXY_METRICS_RETAIN_IDLE", "5s"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let proxy = Proxy::start(client, &env_refs(&settings));
    let pid = proxy.process.pid();
    let said = |e: anyhow::Error| {
        let output = proxy.process.output();
        let tail: Vec<&str> = output.lines().rev().take(20).collect();
        let output = server.process.output();
        let server_tail: Vec<&str> = output.lines().rev().take(20).collect();
        anyhow::anyhow!(
            "{e:#}; the proxy said: {}; the server: {}",
            tail.join(" | "),
            server_tail.join(" | ")
        )
    };
    // Warm up the proxy's own allocations with one Service before the baseline.
    exchange(client, service_addr(0)).map_err(said)?;
    let before = rss(pid)?;
    let started = Instant::now();
    for s in 0..services {
        let answer = exchange(client, service_addr(s)).map_err(said)?;
        if !answer.starts_with("192.0.2.") {
            bail!("{}: unexpected answer {answer:?}", service_addr(s));
        }
    }
    let resolve_time = started.elapsed();
    let resolved = rss(pid)?;

    let mut update_latencies = Vec::new();
    if measure_updates {
        // One Service moves to an address none of its endpoints had: how long until
        // a connection reaches it.
        let moved = 0;
        let spare = endpoint_ip(endpoints.min(99));
        world.mesh.pod(1).must(
            "ip",
            &["addr", "add", &format!("{spare}/32"), "dev", "veth0"],
        );
        for round in 0..10 {
            let target = if round % 2 == 0 {
                spare
            } else {
                endpoint_ip(0)
            };
            let updated = Instant::now();
            control.set_endpoints(&path(moved), vec![meshed_endpoint(target, "svc-moved-0")]);
            loop {
                if exchange(client, service_addr(moved))? == target.to_string() {
                    break;
                }
                if updated.elapsed() > Duration::from_secs(10) {
                    bail!("the update never took effect");
                }
            }
            update_latencies.push(updated.elapsed());
        }
    }

    // Nothing uses the Services now: their streams go after the idle timeout.
    wait_for("the discovery streams to close", IDLE * 6, || {
        (0..services)
            .all(|s| control.endpoint_watchers(&path(s)) == 0)
            .then_some(())
    });
    // A scrape drops the idle metric series; then the proxy's idle worker gives freed
    // memory back within `ops::memory::INTERVAL` (a second).
    proxy.metrics();
    std::thread::sleep(Duration::from_secs(3));
    let idle = rss(pid)?;
    let watchers_left = (0..services)
        .map(|s| control.endpoint_watchers(&path(s)))
        .sum();
    Ok(Run {
        before,
        resolved,
        idle,
        watchers_left,
        resolve_time,
        update_latencies,
    })
}

const MIB: f64 = 1024.0 * 1024.0;

pub fn run(args: DiscoveryArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (it creates network namespaces and firewall rules); run it with sudo");
    }
    let one = run_once(args.services, 1, false)?;
    let many = run_once(args.services, args.endpoints, true)?;
    let grown = |r: &Run| r.resolved.saturating_sub(r.before) as f64;
    let per_service = grown(&one) / args.services as f64;
    let per_endpoint =
        (grown(&many) - grown(&one)) / (args.services * (args.endpoints - 1).max(1)) as f64;
    let mut latencies = many.update_latencies.clone();
    latencies.sort();
    let median = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();
    let max = latencies.last().copied().unwrap_or_default();
    println!(
        "| figure | {} Services × 1 endpoint | {} Services × {} endpoints | target |",
        args.services, args.services, args.endpoints
    );
    println!("|---|---:|---:|---:|");
    for (name, f) in [
        (
            "RSS before (MiB)",
            (|r: &Run| format!("{:.1}", r.before as f64 / MIB)) as fn(&Run) -> String,
        ),
        ("RSS with every Service resolved (MiB)", |r| {
            format!("{:.1}", r.resolved as f64 / MIB)
        }),
        ("added by discovery (MiB)", |r| {
            format!("{:.1}", r.resolved.saturating_sub(r.before) as f64 / MIB)
        }),
        ("RSS after the idle timeout (MiB)", |r| {
            format!("{:.1}", r.idle as f64 / MIB)
        }),
        ("Get streams left open after it", |r| {
            r.watchers_left.to_string()
        }),
        ("time to resolve every Service (s)", |r| {
            format!("{:.1}", r.resolve_time.as_secs_f64())
        }),
    ] {
        let target = match name {
            "added by discovery (MiB)" => "≤ 20 (whole set)",
            "Get streams left open after it" => "0",
            _ => "",
        };
        println!("| {name} | {} | {} | {target} |", f(&one), f(&many));
    }
    println!("| per Service (KiB) | {:.1} | | |", per_service / 1024.0);
    println!(
        "| per endpoint (KiB, from the difference) | | {:.2} | |",
        per_endpoint / 1024.0
    );
    println!(
        "| endpoint update to the first connection that follows it, median / max (ms) | | {:.1} / {:.1} | ≤ 100 |",
        median.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    Ok(())
}
