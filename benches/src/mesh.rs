//! The mesh benchmark: the demo's topology (two pods with `tandem-init` rules and a
//! proxy each, and the issuer), every scenario on three paths in the same run: on
//! ports the rules leave alone (the direct baseline, same pods, same kernel), through
//! a plain TCP relay in each pod (the floor a proxy pair starts from on this machine),
//! and through the proxies; and one table of the figures.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tandem_tests::mesh::{env_refs, MeshedPair};
use tandem_tests::{bin_path, wait_for, Pod, Proc, Proxy, Signals, PATIENCE};

use crate::load::Report;

/// Meshed ports: HTTP is detected; 6379 and 5432 are opaque by default.
const HTTP: u16 = 8080;
const ECHO: u16 = 6379;
const SINK: u16 = 5432;
/// The same backends on ports the redirect rules skip in both pods.
const DIRECT_HTTP: u16 = 18080;
const DIRECT_ECHO: u16 = 16379;
const DIRECT_SINK: u16 = 15432;

/// The floor path: a plain TCP relay in each pod (see `relay.rs`), on ports the rules
/// skip. The client-side relay listens on a direct port plus `RELAY_OUT`, the
/// server-side one on it plus `RELAY_IN`, and that one relays to the direct port.
const RELAY_OUT: u16 = 10000;
const RELAY_IN: u16 = 20000;
const _: () = assert!(
    DIRECT_HTTP < u16::MAX - RELAY_IN
        && DIRECT_ECHO < u16::MAX - RELAY_IN
        && DIRECT_SINK < u16::MAX - RELAY_IN
);

/// Bytes of the single-stream bulk transfer.
const BULK_BYTES: u64 = 1 << 30;

/// A Service's virtual address, which the client-side proxy balances over three
/// endpoints: the HTTP backend on `HTTP` and on the two `SERVICE_PORTS` of the
/// server pod (the discovery file's `endpoints:`).
const SERVICE: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10)),
    80,
);
const SERVICE_PORTS: [u16; 2] = [8081, 8082];
/// A Service of one endpoint (the backend on `HTTP`): the balancer on the path, the
/// connections between the proxies as to one pod.
const SERVICE_OF_ONE: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 11)),
    80,
);

/// The Service of three endpoints again, under a route table of a realistic size: 20
/// HTTPRoute-like routes (path prefixes, half with a header match), the last a
/// catch-all that splits requests between two backends of the Service's endpoints
/// (the discovery file's `routes:`).
const ROUTED_SERVICE: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 12)),
    80,
);

struct Scenario {
    name: &'static str,
    mode: &'static str,
    conns: usize,
    meshed_port: u16,
    direct_port: u16,
    /// The meshed path dials this Service instead of one pod.
    service: Option<SocketAddr>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "HTTP 1000 rps, 4 conns",
        mode: "http-fixed-rate",
        conns: 4,
        meshed_port: HTTP,
        direct_port: DIRECT_HTTP,
        service: None,
    },
    Scenario {
        name: "HTTP 1000 rps, 4 conns in step (h2load's pacing)",
        mode: "http-fixed-rate-in-step",
        conns: 4,
        meshed_port: HTTP,
        direct_port: DIRECT_HTTP,
        service: None,
    },
    Scenario {
        name: "HTTP saturated, 50 conns",
        mode: "http",
        conns: 50,
        meshed_port: HTTP,
        direct_port: DIRECT_HTTP,
        service: None,
    },
    Scenario {
        name: "HTTP saturated, 1 conn",
        mode: "http",
        conns: 1,
        meshed_port: HTTP,
        direct_port: DIRECT_HTTP,
        service: None,
    },
    Scenario {
        name: "opaque TCP 1 KiB echo, 4 conns",
        mode: "echo",
        conns: 4,
        meshed_port: ECHO,
        direct_port: DIRECT_ECHO,
        service: None,
    },
    Scenario {
        name: "HTTP, new conn per request",
        mode: "http-new-conn",
        conns: 4,
        meshed_port: HTTP,
        direct_port: DIRECT_HTTP,
        service: None,
    },
    Scenario {
        name: "opaque, new conn per exchange",
        mode: "echo-new-conn",
        conns: 4,
        meshed_port: ECHO,
        direct_port: DIRECT_ECHO,
        service: None,
    },
    Scenario {
        name: "bulk, one TCP stream (1 GiB)",
        mode: "bulk",
        conns: 1,
        meshed_port: SINK,
        direct_port: DIRECT_SINK,
        service: None,
    },
    Scenario {
        name: "HTTP saturated to a Service of 1 endpoint, 50 conns",
        mode: "http",
        conns: 50,
        meshed_port: SERVICE_OF_ONE.port(),
        direct_port: DIRECT_HTTP,
        service: Some(SERVICE_OF_ONE),
    },
    Scenario {
        name: "HTTP saturated to a Service of 3 endpoints, 50 conns",
        mode: "http",
        conns: 50,
        meshed_port: SERVICE.port(),
        direct_port: DIRECT_HTTP,
        service: Some(SERVICE),
    },
    Scenario {
        name: "HTTP saturated to that Service under 20 routes, 2 backends, 50 conns",
        mode: "http",
        conns: 50,
        meshed_port: ROUTED_SERVICE.port(),
        direct_port: DIRECT_HTTP,
        service: Some(ROUTED_SERVICE),
    },
];

/// What one scenario measured on one path, with the cost of the two processes in the
/// path (proxies or relays; none on the direct path) over it.
struct Measured {
    report: Report,
    hops: Vec<HopCost>,
    /// The backend's CPU over the same run: a calibration of what one trivial process
    /// costs per request on this machine.
    backend_cores: f64,
    host: HostTicks,
}

#[derive(Clone, Copy)]
struct HopCost {
    cores: f64,
    peak_rss: u64,
    final_rss: u64,
    /// Times the process's threads gave up the CPU (woke for work and went back to
    /// sleep, or were preempted) over the run: its wake-ups.
    switches: u64,
    /// System calls over the run, when `perf` can count them here.
    syscalls: Option<u64>,
}

pub fn run(
    seconds: Duration,
    only: &[String],
    rounds: u32,
    proxy_env: &[(String, String)],
    signals: &Signals,
) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (it creates network namespaces and firewall rules); run it with sudo");
    }
    let bench = std::env::current_exe().context("cannot find tandem-bench's own path")?;
    let proxy_bin = bin_path("tandem-proxy");
    let direct_ports = [DIRECT_HTTP, DIRECT_ECHO, DIRECT_SINK];
    let relay_ports = direct_ports.map(|p| [p + RELAY_OUT, p + RELAY_IN]);
    let skipped: Vec<u16> = direct_ports
        .into_iter()
        .chain(relay_ports.into_iter().flatten())
        .collect();
    let world = MeshedPair::with_direct_ports(&skipped);
    let (client_pod, server_pod) = (world.a(), world.b());
    let _issuer = world.start_issuer(&[]);
    // A new connection per request leaves the closing side's ports in TIME_WAIT;
    // reusing them keeps long runs from running out of ports (as busy hosts do).
    for pod in [client_pod, server_pod] {
        pod.must("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"]);
        pod.must(
            "sysctl",
            &["-qw", "net.ipv4.ip_local_port_range=10000 65000"],
        );
    }

    // The Service's address routes out of the client pod, so that a connection to
    // it starts (the client-side proxy takes it before it leaves).
    client_pod.must("ip", &["route", "add", "10.96.0.0/16", "dev", "veth0"]);
    let mut serve = Command::new(&bench);
    serve.arg("serve");
    for port in SERVICE_PORTS {
        serve.arg("--http").arg(format!("0.0.0.0:{port}"));
    }
    for (flag, ports) in [
        ("--http", [HTTP, DIRECT_HTTP]),
        ("--echo", [ECHO, DIRECT_ECHO]),
        ("--sink", [SINK, DIRECT_SINK]),
    ] {
        for port in ports {
            serve.arg(flag).arg(format!("0.0.0.0:{port}"));
        }
    }
    let backend = spawn_ready(server_pod, "backend", serve);
    let relays = start_relays(&world, &bench, &direct_ports);
    let relay_pids = relays.each_ref().map(Proc::pid);

    // Production settings: warnings only, the default single worker thread.
    let mut settings = vec![("LINKERD2_PROXY_LOG", "warn")];
    settings.extend(proxy_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let (env_a, env_b) = (world.env(0, true, &settings), world.env(1, true, &settings));
    let chosen: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|text| s.name.contains(text.as_str())))
        .collect();
    // Only when asked for: a proxy from before routes would refuse the file.
    let routed = chosen.iter().any(|s| s.service == Some(ROUTED_SERVICE));
    add_service(&env_a, server_pod, routed)?;
    let alpha = Proxy::start(client_pod, &env_refs(&env_a));
    let beta = Proxy::start(server_pod, &env_refs(&env_b));
    let proxies = [alpha.process.pid(), beta.process.pid()];

    println!(
        "tandem-bench: {} s per scenario; proxy {} (client side pid {}, server side pid {}); backend and load generator: tandem-bench (Rust, one thread each)",
        seconds.as_secs(),
        proxy_bin.display(),
        alpha.process.pid(),
        beta.process.pid(),
    );
    for (name, value) in proxy_env {
        println!("tandem-bench: both proxies run with {name}={value}");
    }
    // Warm up: certificates are issued already; this opens the pooled HTTP/2
    // connection between the proxies and faults in their buffers, and the relays'
    // and the backend's alike, so no path's first scenario pays for it.
    let relay_http = SocketAddr::from((client_pod.ipv4, DIRECT_HTTP + RELAY_OUT));
    for target in [world.b_addr(HTTP), relay_http] {
        load(
            client_pod,
            &bench,
            "http-fixed-rate",
            4,
            target,
            Duration::from_secs(1),
        )?;
    }

    // A scenario measured on one path: to `target`, through the `hops`' processes.
    let on = |scenario: &Scenario, target, hops: &[u32]| {
        measure(
            client_pod,
            &bench,
            scenario,
            target,
            seconds,
            hops,
            backend.pid(),
        )
    };
    // Its meshed path: through the proxies, to its Service or the server pod.
    let meshed_of = |scenario: &Scenario| {
        let target = scenario
            .service
            .unwrap_or_else(|| world.b_addr(scenario.meshed_port));
        on(scenario, target, &proxies)
    };
    let mut results = Vec::new();
    for &scenario in &chosen {
        if signals.pending().is_some() {
            bail!("interrupted; the pods are removed");
        }
        let direct = on(scenario, world.b_addr(scenario.direct_port), &[])?;
        let relayed = on(
            scenario,
            SocketAddr::from((client_pod.ipv4, scenario.direct_port + RELAY_OUT)),
            &relay_pids,
        )?;
        let meshed = meshed_of(scenario)?;
        eprintln!("  done: {}", scenario.name);
        results.push(Row {
            scenario,
            direct,
            relayed,
            meshed,
        });
    }
    print!("{}", table(&results));
    let mut paired = Vec::new();
    for round in 1..=rounds {
        // Every other round in the reverse order: a steady drift across a round then
        // falls on each scenario alike, over two rounds.
        let mut order: Vec<usize> = (0..chosen.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        let mut costs: Vec<Option<MeshedCost>> = chosen.iter().map(|_| None).collect();
        for index in order {
            let scenario = chosen[index];
            if signals.pending().is_some() {
                bail!("interrupted; the pods are removed");
            }
            let meshed = meshed_of(scenario)?;
            costs[index] = Some(MeshedCost::of(scenario, &meshed));
        }
        eprintln!("  done: round {round}");
        paired.push(costs.into_iter().flatten().collect());
    }
    if !paired.is_empty() {
        print!("{}", rounds_table(&paired));
    }
    Ok(())
}

/// What one meshed run cost each proxy per request.
struct MeshedCost {
    scenario: &'static str,
    per_second: f64,
    /// CPU µs per request: client side, server side.
    client_us: f64,
    server_us: f64,
}

impl MeshedCost {
    fn of(scenario: &Scenario, meshed: &Measured) -> MeshedCost {
        let per_second = meshed.report.per_second();
        let per_request =
            |hop: Option<&HopCost>| hop.map_or(f64::NAN, |h| h.cores / per_second * 1e6);
        MeshedCost {
            scenario: scenario.name,
            per_second,
            client_us: per_request(meshed.hops.first()),
            server_us: per_request(meshed.hops.get(1)),
        }
    }
}

/// Each round's costs, and each scenario's difference from the round's first in
/// client-side CPU per request less the server side's change over the same two runs
/// (the server-side proxy does the same work in every HTTP scenario, so its change
/// is the machine's drift); then the median of those differences.
fn rounds_table(rounds: &[Vec<MeshedCost>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| round | scenario | req/s | CPU µs per request (client side / server side) | client side less server side, vs the round's first |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|");
    let mut differences: Vec<Vec<f64>> = vec![Vec::new(); rounds[0].len()];
    for (round, costs) in rounds.iter().enumerate() {
        let first = &costs[0];
        for (index, cost) in costs.iter().enumerate() {
            let difference =
                (cost.client_us - first.client_us) - (cost.server_us - first.server_us);
            differences[index].push(difference);
            let shown = if index == 0 {
                String::new()
            } else {
                format!("{difference:+.2}")
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.2} / {:.2} | {shown} |",
                round + 1,
                cost.scenario,
                cost.per_second,
                cost.client_us,
                cost.server_us,
            );
        }
    }
    let _ = writeln!(out);
    for (index, mut values) in differences.into_iter().enumerate().skip(1) {
        values.sort_by(f64::total_cmp);
        let middle = values.len() / 2;
        let median = if values.len() % 2 == 0 {
            (values[middle - 1] + values[middle]) / 2.0
        } else {
            values[middle]
        };
        let (low, high) = (values[0], values[values.len() - 1]);
        let _ = writeln!(
            out,
            "{} vs {}: median {median:+.2} µs per request (from {low:+.2} to {high:+.2}) over {} rounds",
            rounds[0][index].scenario,
            rounds[0][0].scenario,
            values.len(),
        );
    }
    out
}

/// Adds the Services to the client-side proxy's discovery file: one balanced over the
/// server pod's HTTP backend on three ports, one over the backend on one port; each
/// endpoint meshed.
fn add_service(client_env: &[(String, String)], server: &Pod, routed: bool) -> anyhow::Result<()> {
    let file = client_env
        .iter()
        .find(|(name, _)| name == "TANDEM_DISCOVERY_FILE")
        .map(|(_, path)| path.clone())
        .context("the client-side proxy has no discovery file")?;
    let identity = tandem_tests::mesh::identity_of("beta");
    let mut text = std::fs::read_to_string(&file).context("read the discovery file")?;
    let three: Vec<u16> = std::iter::once(HTTP).chain(SERVICE_PORTS).collect();
    for (service, ports) in [(SERVICE, &three[..]), (SERVICE_OF_ONE, &[HTTP][..])] {
        let _ = write!(
            text,
            "  - addr: \"{}\"\n    ports: {}\n    identity: {identity}\n    http2: true\n    endpoints:\n",
            service.ip(),
            service.port()
        );
        for port in ports {
            let _ = writeln!(text, "      - addr: \"{}:{port}\"", server.ipv4);
        }
    }
    if routed {
        text.push_str(&routed_service(server, &identity));
    }
    std::fs::write(&file, text).context("write the discovery file")
}

/// The discovery file's entry for `ROUTED_SERVICE`: the default backend is the
/// backend on `HTTP` and the first `SERVICE_PORTS`, `v2` the last; 19 routes that
/// the benchmark's requests (`/`) do not take, then the catch-all split 2:1.
fn routed_service(server: &Pod, identity: &str) -> String {
    let ip = server.ipv4;
    let [first, second] = SERVICE_PORTS;
    let mut text = format!(
        "  - addr: \"{}\"\n    ports: {}\n    identity: {identity}\n    http2: true\n    endpoints: [{{addr: \"{ip}:{HTTP}\"}}, {{addr: \"{ip}:{first}\"}}]\n    backends:\n      v2: {{endpoints: [{{addr: \"{ip}:{second}\"}}]}}\n    routes:\n",
        ROUTED_SERVICE.ip(),
        ROUTED_SERVICE.port(),
    );
    for i in 0..19 {
        let header = if i % 2 == 1 {
            ", headers: {x-tenant: blue}"
        } else {
            ""
        };
        let _ = writeln!(
            text,
            "      - {{name: service-{i}, rules: [{{matches: [{{path_prefix: /api/v1/service-{i}{header}}}], backends: {{v2: 1}}}}]}}"
        );
    }
    // Weighted by the backends' sizes, so each endpoint takes the share of requests
    // it takes without routes: the two scenarios differ in routing, not in load.
    text.push_str("      - {name: catch-all, rules: [{backends: {default: 2, v2: 1}}]}\n");
    text
}

/// Starts `cmd` in `pod` and waits for it to print `ready` (everything bound).
pub(crate) fn spawn_ready(pod: &Pod, label: &str, cmd: Command) -> Proc {
    let mut process = pod.spawn(label, cmd);
    wait_for(&format!("the {label} to listen"), PATIENCE, || {
        if let Some(status) = process.try_exit() {
            panic!("the {label} exited with {status}: {}", process.output());
        }
        process.output().contains("ready").then_some(())
    });
    process
}

/// The two plain relays of the floor path, client side first; they run until dropped.
/// Client pod: direct port + `RELAY_OUT` to the server pod's direct port + `RELAY_IN`;
/// server pod: that to the backend's direct port.
fn start_relays(world: &MeshedPair, bench: &Path, direct_ports: &[u16]) -> [Proc; 2] {
    let server = world.b().ipv4;
    let start = |pod: &Pod, label: &str, hop: &dyn Fn(u16) -> (u16, u16)| {
        let mut cmd = Command::new(bench);
        cmd.arg("relay");
        for &port in direct_ports {
            let (listen, target) = hop(port);
            cmd.arg("--forward")
                .arg(format!("0.0.0.0:{listen}={server}:{target}"));
        }
        spawn_ready(pod, label, cmd)
    };
    let client_side = start(world.a(), "client-side relay", &|p| {
        (p + RELAY_OUT, p + RELAY_IN)
    });
    let server_side = start(world.b(), "server-side relay", &|p| (p + RELAY_IN, p));
    [client_side, server_side]
}

fn measure(
    client: &Pod,
    bench: &Path,
    scenario: &Scenario,
    target: SocketAddr,
    seconds: Duration,
    hops: &[u32],
    backend: u32,
) -> anyhow::Result<Measured> {
    for &pid in hops {
        reset_peak_rss(pid)?;
    }
    let before: Vec<u64> = hops
        .iter()
        .map(|&pid| cpu_ticks(pid))
        .collect::<anyhow::Result<_>>()?;
    let switches_before: Vec<u64> = hops
        .iter()
        .map(|&pid| context_switches(pid))
        .collect::<anyhow::Result<_>>()?;
    let syscall_counters: Vec<Option<SyscallCounter>> =
        hops.iter().map(|&pid| SyscallCounter::start(pid)).collect();
    let backend_before = cpu_ticks(backend)?;
    let host_before = host_ticks()?;
    let started = Instant::now();
    let report = load(
        client,
        bench,
        scenario.mode,
        scenario.conns,
        target,
        seconds,
    )?;
    let wall = started.elapsed().as_secs_f64();
    let ticks_per_second = ticks_per_second();
    let mut costs = Vec::new();
    let counted = before
        .into_iter()
        .zip(switches_before)
        .zip(syscall_counters);
    for (&pid, ((before, switches_before), syscalls)) in hops.iter().zip(counted) {
        let used = cpu_ticks(pid)?.saturating_sub(before) as f64 / ticks_per_second;
        let (peak_rss, final_rss) = rss(pid)?;
        costs.push(HopCost {
            cores: used / wall,
            peak_rss,
            final_rss,
            switches: context_switches(pid)?.saturating_sub(switches_before),
            syscalls: syscalls.and_then(SyscallCounter::stop),
        });
    }
    let backend_used = cpu_ticks(backend)?.saturating_sub(backend_before) as f64;
    let host = host_ticks()?.since(&host_before);
    Ok(Measured {
        report,
        hops: costs,
        backend_cores: backend_used / ticks_per_second / wall,
        host,
    })
}

/// Runs the load generator in the client pod and reads its report.
fn load(
    client: &Pod,
    bench: &Path,
    mode: &str,
    conns: usize,
    target: SocketAddr,
    seconds: Duration,
) -> anyhow::Result<Report> {
    let target = target.to_string();
    let bench = bench.to_string_lossy();
    let out = client.exec(
        &bench,
        &[
            "load",
            "--addr",
            &target,
            "--mode",
            mode,
            "--conns",
            &conns.to_string(),
            "--seconds",
            &seconds.as_secs().to_string(),
            "--bytes",
            &BULK_BYTES.to_string(),
        ],
    );
    if !out.status.success() {
        bail!(
            "load {mode} to {target} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Report::from_line(stdout.trim()).with_context(|| format!("load {mode} to {target}"))
}

/// The machine's CPU time from `/proc/stat`, for the share the hypervisor took
/// (steal) and the network stack ran outside any process (softirq): the first says
/// how much a run was disturbed, the second what three TCP hops cost the kernel.
#[derive(Clone, Copy, Debug, Default)]
struct HostTicks {
    total: u64,
    steal: u64,
    softirq: u64,
}

impl HostTicks {
    fn since(&self, before: &HostTicks) -> HostTicks {
        HostTicks {
            total: self.total.saturating_sub(before.total),
            steal: self.steal.saturating_sub(before.steal),
            softirq: self.softirq.saturating_sub(before.softirq),
        }
    }

    fn percent(&self, part: u64) -> f64 {
        100.0 * part as f64 / self.total.max(1) as f64
    }
}

fn host_ticks() -> anyhow::Result<HostTicks> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    parse_host_ticks(&stat).context("unexpected first line in /proc/stat")
}

/// `cpu  user nice system idle iowait irq softirq steal …` (proc(5)).
fn parse_host_ticks(stat: &str) -> Option<HostTicks> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // guest and guest_nice (fields 9 and 10) are already counted in user and nice.
    Some(HostTicks {
        total: fields.iter().take(8).sum(),
        softirq: *fields.get(6)?,
        steal: *fields.get(7)?,
    })
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// User plus system CPU time of every thread of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name may contain spaces; fields resume after its closing paren.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the paren.
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))
    };
    Ok(field(11)? + field(12)?)
}

/// Context switches, voluntary and not, of every thread of `pid` so far.
fn context_switches(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("cannot list the threads of {pid}"))?;
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        total += status
            .lines()
            .filter_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.ends_with("ctxt_switches")
                    .then(|| value.trim().parse::<u64>().ok())?
            })
            .sum::<u64>();
    }
    Ok(total)
}

/// `perf stat` counting one process's system calls while a scenario runs. Absent
/// when `perf` is not installed or not allowed here: the column is then empty.
struct SyscallCounter(std::process::Child);

impl SyscallCounter {
    fn start(pid: u32) -> Option<SyscallCounter> {
        use std::os::unix::process::CommandExt;
        let mut perf = Command::new("perf");
        perf.args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p"])
            .arg(pid.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // The benchmark blocks SIGINT to clean up on Ctrl-C, and a child inherits
        // the mask: perf must take the SIGINT that ends its count.
        // SAFETY: between fork and exec only async-signal-safe calls are made.
        unsafe {
            perf.pre_exec(|| {
                let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                libc::sigemptyset(none.as_mut_ptr());
                libc::pthread_sigmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut());
                Ok(())
            });
        }
        Some(SyscallCounter(perf.spawn().ok()?))
    }

    /// Stops counting (as Ctrl-C would) and reads the count.
    fn stop(self) -> Option<u64> {
        // SAFETY: kill with the pid of a child we own and a valid signal number.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let output = self.0.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&output.stderr);
        text.lines()
            .find(|line| line.contains("raw_syscalls:sys_enter"))
            .and_then(|line| line.split(',').next()?.trim().parse().ok())
    }
}

/// Restarts the kernel's peak-RSS record (`VmHWM`) so each scenario gets its own peak.
fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("cannot reset the peak RSS of {pid}"))
}

/// Peak and current resident set size of `pid`, in bytes.
pub(crate) fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kib = |key: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
            .with_context(|| format!("no {key} in /proc/{pid}/status"))
    };
    Ok((kib("VmHWM:")?, kib("VmRSS:")?))
}

const MIB: f64 = 1024.0 * 1024.0;

/// One scenario on its three paths.
struct Row<'a> {
    scenario: &'a Scenario,
    direct: Measured,
    /// Through the plain relays: the floor any user-space proxy pair starts from.
    relayed: Measured,
    meshed: Measured,
}

fn table(rows: &[Row<'_>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| scenario | path | req/s | vs direct | p50 ms | p99 ms | max ms | errors | CPU cores (client side / server side) | peak RSS MiB | final RSS MiB | backend cores | host steal / softirq % |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in rows {
        let paths = [
            ("direct", &row.direct),
            ("plain relays", &row.relayed),
            ("meshed", &row.meshed),
        ];
        for (path, m) in paths {
            let r = &m.report;
            let rate = if row.scenario.mode == "bulk" {
                format!(
                    "{:.0} MiB/s",
                    r.bytes as f64 / MIB / r.elapsed.as_secs_f64()
                )
            } else {
                format!("{:.0}", r.per_second())
            };
            let (ratio, cores, peak, last) = match m.hops.as_slice() {
                [a, b] => (
                    format!(
                        "{:.0} %",
                        100.0 * throughput(r) / throughput(&row.direct.report)
                    ),
                    format!("{:.3} / {:.3}", a.cores, b.cores),
                    format!(
                        "{:.1} / {:.1}",
                        a.peak_rss as f64 / MIB,
                        b.peak_rss as f64 / MIB
                    ),
                    format!(
                        "{:.1} / {:.1}",
                        a.final_rss as f64 / MIB,
                        b.final_rss as f64 / MIB
                    ),
                ),
                _ => Default::default(),
            };
            let _ = writeln!(
                out,
                "| {} | {path} | {rate} | {ratio} | {:.3} | {:.3} | {:.3} | {} | {cores} | {peak} | {last} | {:.3} | {:.0} / {:.0} |",
                row.scenario.name,
                ms(r.p50),
                ms(r.p99),
                ms(r.max),
                r.errors,
                m.backend_cores,
                m.host.percent(m.host.steal),
                m.host.percent(m.host.softirq),
            );
        }
    }
    let _ = writeln!(out);
    let _ = write!(out, "{}", derived(rows));
    out
}

fn throughput(r: &Report) -> f64 {
    if r.requests == 1 {
        r.bytes as f64 / r.elapsed.as_secs_f64()
    } else {
        r.per_second()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One figure of the summary, computed the same way for the proxies and for the
/// relays in their place.
fn figure(
    out: &mut String,
    name: &str,
    of: &dyn Fn(&Measured) -> String,
    row: &Row<'_>,
    target: &str,
    budget: &str,
) {
    let (tandem, floor) = (of(&row.meshed), of(&row.relayed));
    let _ = writeln!(out, "| {name} | {tandem} | {floor} | {target} | {budget} |");
}

/// Context switches and system calls per request at 1,000 RPS, each proxy's (or
/// relay's): where a proxy at low load spends its time.
fn wake_ups(out: &mut String, row: &Row<'_>, pacing: &str) {
    let per_request = |m: &Measured, count: &dyn Fn(&HopCost) -> Option<u64>| {
        let requests = m.report.requests.max(1) as f64;
        m.hops
            .iter()
            .map(|h| count(h).map_or("-".into(), |n| format!("{:.1}", n as f64 / requests)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    figure(
        out,
        &format!("context switches per request at 1,000 RPS{pacing} (client side / server side)"),
        &|m| per_request(m, &|h| Some(h.switches)),
        row,
        "",
        "",
    );
    figure(
        out,
        &format!("system calls per request at 1,000 RPS{pacing} (client side / server side)"),
        &|m| per_request(m, &|h| h.syscalls),
        row,
        "",
        "",
    );
}

/// The figures the budget is stated in, next to the target and the budget.
fn derived(rows: &[Row<'_>]) -> String {
    let find = |mode: &str, conns: usize| {
        rows.iter().find(|r| {
            r.scenario.mode == mode && r.scenario.conns == conns && r.scenario.service.is_none()
        })
    };
    let busier_cores = |m: &Measured| m.hops.iter().map(|h| h.cores).fold(0.0, f64::max);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| figure | Tandem | plain relays (floor) | target | runbook budget |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    if let Some(row) = find("http-fixed-rate", 4) {
        let direct = &row.direct;
        figure(
            &mut out,
            "CPU cores per 1,000 RPS per proxy (busier one)",
            &|m| format!("{:.3}", busier_cores(m) / (m.report.per_second() / 1000.0)),
            row,
            "≤ 0.05",
            "0.25",
        );
        wake_ups(&mut out, row, "");
        figure(
            &mut out,
            "MiB per proxy (peak RSS at 1,000 RPS)",
            &|m| {
                let peak = m.hops.iter().map(|h| h.peak_rss).max().unwrap_or(0);
                format!("{:.1}", peak as f64 / MIB)
            },
            row,
            "≤ 10",
            "19 (20 MB)",
        );
        figure(
            &mut out,
            "added latency at 1,000 RPS, p50 / p99 (ms)",
            &|m| {
                format!(
                    "{:.3} / {:.3}",
                    ms(m.report.p50) - ms(direct.report.p50),
                    ms(m.report.p99) - ms(direct.report.p99)
                )
            },
            row,
            "≤ 0.3 / 0.6",
            "",
        );
        let _ = writeln!(
            out,
            "| calibration: the backend's CPU cores per 1,000 RPS on the direct path | {:.3} | | | |",
            direct.backend_cores / (direct.report.per_second() / 1000.0)
        );
    }
    if let Some(row) = find("http-fixed-rate-in-step", 4) {
        figure(
            &mut out,
            "CPU cores per 1,000 RPS per proxy, requests 4 at a time (h2load's pacing)",
            &|m| format!("{:.3}", busier_cores(m) / (m.report.per_second() / 1000.0)),
            row,
            "",
            "",
        );
        wake_ups(&mut out, row, ", 4 at a time");
    }
    if let Some(row) = find("http", 50) {
        let direct_rps = row.direct.report.per_second();
        figure(
            &mut out,
            "CPU µs per request per proxy, saturated (busier one)",
            &|m| format!("{:.1}", busier_cores(m) * 1e6 / m.report.per_second()),
            row,
            "≤ 20",
            "",
        );
        for (service, name, target) in [
            (
                SERVICE_OF_ONE,
                "the same to a Service of 1 endpoint (the balancer on the path)",
                "≤ single endpoint + 1",
            ),
            (
                SERVICE,
                "the same to a Service of 3 endpoints (3 connections between the proxies)",
                "",
            ),
        ] {
            if let Some(row) = rows.iter().find(|r| r.scenario.service == Some(service)) {
                figure(
                    &mut out,
                    name,
                    &|m| format!("{:.1}", busier_cores(m) * 1e6 / m.report.per_second()),
                    row,
                    target,
                    "",
                );
            }
        }
        figure(
            &mut out,
            "saturated HTTP, 50 conns, vs direct",
            &|m| format!("{:.0} %", 100.0 * m.report.per_second() / direct_rps),
            row,
            "≥ 60 %",
            "",
        );
    }
    for (mode, conns, name) in [
        ("echo-new-conn", 4, "new opaque conn per request, vs direct"),
        ("bulk", 1, "bulk transfer, one stream, vs direct"),
    ] {
        if let Some(row) = find(mode, conns) {
            let direct = throughput(&row.direct.report);
            figure(
                &mut out,
                name,
                &|m| format!("{:.0} %", 100.0 * throughput(&m.report) / direct),
                row,
                "≥ 25 %",
                "",
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ticks_read_steal_and_softirq() {
        let stat = "cpu  100 5 50 800 10 2 30 3 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        let ticks = parse_host_ticks(stat).unwrap();
        assert_eq!(ticks.total, 1000, "guest time is already in user time");
        assert_eq!((ticks.softirq, ticks.steal), (30, 3));
        assert_eq!(ticks.percent(ticks.softirq), 3.0);
        assert!(parse_host_ticks("intr 1 2 3\n").is_none());
    }
}
