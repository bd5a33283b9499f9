//! The mesh benchmark: the demo's topology (two pods with `tandem-init` rules and a
//! proxy each, and the issuer), every scenario once through the proxies and once on
//! ports the rules leave alone (the direct baseline, same pods, same kernel, same run),
//! and one table of the figures.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tandem_tests::mesh::{env_refs, MeshedPair};
use tandem_tests::{bin_path, wait_for, Pod, Proxy, Signals, PATIENCE};

use crate::load::Report;

/// Meshed ports: HTTP is detected; 6379 and 5432 are opaque by default.
const HTTP: u16 = 8080;
const ECHO: u16 = 6379;
const SINK: u16 = 5432;
/// The same backends on ports the redirect rules skip in both pods.
const DIRECT_HTTP: u16 = 18080;
const DIRECT_ECHO: u16 = 16379;
const DIRECT_SINK: u16 = 15432;

/// Bytes of the single-stream bulk transfer.
const BULK_BYTES: u64 = 1 << 30;

struct Scenario {
    name: &'static str,
    mode: &'static str,
    conns: usize,
    meshed_port: u16,
    direct_port: u16,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "HTTP 1000 rps, 4 conns",
        mode: "http-fixed-rate",
        conns: 4,
        meshed_port: HTTP,
        direct_port: DIRECT_HTTP,
    },
    Scenario {
        name: "HTTP saturated, 50 conns",
        mode: "http",
        conns: 50,
        meshed_port: HTTP,
        direct_port: DIRECT_HTTP,
    },
    Scenario {
        name: "HTTP saturated, 1 conn",
        mode: "http",
        conns: 1,
        meshed_port: HTTP,
        direct_port: DIRECT_HTTP,
    },
    Scenario {
        name: "opaque TCP 1 KiB echo, 4 conns",
        mode: "echo",
        conns: 4,
        meshed_port: ECHO,
        direct_port: DIRECT_ECHO,
    },
    Scenario {
        name: "HTTP, new conn per request",
        mode: "http-new-conn",
        conns: 4,
        meshed_port: HTTP,
        direct_port: DIRECT_HTTP,
    },
    Scenario {
        name: "opaque, new conn per exchange",
        mode: "echo-new-conn",
        conns: 4,
        meshed_port: ECHO,
        direct_port: DIRECT_ECHO,
    },
    Scenario {
        name: "bulk, one TCP stream (1 GiB)",
        mode: "bulk",
        conns: 1,
        meshed_port: SINK,
        direct_port: DIRECT_SINK,
    },
];

/// What one scenario measured on one path, with the proxies' cost over it.
struct Measured {
    report: Report,
    proxies: Vec<ProxyCost>,
    /// The backend's CPU over the same run: a calibration of what one trivial process
    /// costs per request on this machine.
    backend_cores: f64,
    host: HostTicks,
}

#[derive(Clone, Copy)]
struct ProxyCost {
    cores: f64,
    peak_rss: u64,
    final_rss: u64,
}

pub fn run(
    seconds: Duration,
    only: Option<&str>,
    proxy_env: &[(String, String)],
    signals: &Signals,
) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (it creates network namespaces and firewall rules); run it with sudo");
    }
    let bench = std::env::current_exe().context("cannot find tandem-bench's own path")?;
    let proxy_bin = bin_path("tandem-proxy");
    let world = MeshedPair::with_direct_ports(&[DIRECT_HTTP, DIRECT_ECHO, DIRECT_SINK]);
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

    let mut serve = Command::new(&bench);
    serve.arg("serve");
    for (flag, ports) in [
        ("--http", [HTTP, DIRECT_HTTP]),
        ("--echo", [ECHO, DIRECT_ECHO]),
        ("--sink", [SINK, DIRECT_SINK]),
    ] {
        for port in ports {
            serve.arg(flag).arg(format!("0.0.0.0:{port}"));
        }
    }
    let mut backend = server_pod.spawn("backend", serve);
    wait_for("the backend to listen", PATIENCE, || {
        if let Some(status) = backend.try_exit() {
            panic!("the backend exited with {status}: {}", backend.output());
        }
        backend.output().contains("ready").then_some(())
    });

    // Production settings: warnings only, the default single worker thread.
    let mut settings = vec![("LINKERD2_PROXY_LOG", "warn")];
    settings.extend(proxy_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let (env_a, env_b) = (world.env(0, true, &settings), world.env(1, true, &settings));
    let alpha = Proxy::start(client_pod, &env_refs(&env_a));
    let beta = Proxy::start(server_pod, &env_refs(&env_b));
    let proxies = [&alpha, &beta];

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
    // connection between the proxies and faults in their buffers.
    load(
        client_pod,
        &bench,
        "http-fixed-rate",
        4,
        world.b_addr(HTTP),
        Duration::from_secs(1),
    )?;

    let mut results = Vec::new();
    let chosen = SCENARIOS
        .iter()
        .filter(|s| only.is_none_or(|text| s.name.contains(text)));
    for scenario in chosen {
        if signals.pending().is_some() {
            bail!("interrupted; the pods are removed");
        }
        let on_port = |port| {
            let target = world.b_addr(port);
            measure(
                client_pod,
                &bench,
                scenario,
                target,
                seconds,
                &proxies,
                backend.pid(),
            )
        };
        let direct = on_port(scenario.direct_port)?;
        let meshed = on_port(scenario.meshed_port)?;
        eprintln!("  done: {}", scenario.name);
        results.push((scenario, direct, meshed));
    }
    print!("{}", table(&results));
    Ok(())
}

fn measure(
    client: &Pod,
    bench: &Path,
    scenario: &Scenario,
    target: SocketAddr,
    seconds: Duration,
    proxies: &[&Proxy<'_>],
    backend: u32,
) -> anyhow::Result<Measured> {
    for proxy in proxies {
        reset_peak_rss(proxy.process.pid())?;
    }
    let before: Vec<u64> = proxies
        .iter()
        .map(|p| cpu_ticks(p.process.pid()))
        .collect::<anyhow::Result<_>>()?;
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
    for (proxy, before) in proxies.iter().zip(before) {
        let pid = proxy.process.pid();
        let used = cpu_ticks(pid)?.saturating_sub(before) as f64 / ticks_per_second;
        let (peak_rss, final_rss) = rss(pid)?;
        costs.push(ProxyCost {
            cores: used / wall,
            peak_rss,
            final_rss,
        });
    }
    let backend_used = cpu_ticks(backend)?.saturating_sub(backend_before) as f64;
    let host = host_ticks()?.since(&host_before);
    Ok(Measured {
        report,
        proxies: costs,
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

/// Restarts the kernel's peak-RSS record (`VmHWM`) so each scenario gets its own peak.
fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("cannot reset the peak RSS of {pid}"))
}

/// Peak and current resident set size of `pid`, in bytes.
fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
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

fn table(results: &[(&Scenario, Measured, Measured)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| scenario | path | req/s | vs direct | p50 ms | p99 ms | max ms | errors | CPU cores (client proxy / server proxy) | peak RSS MiB | final RSS MiB | backend cores | host steal / softirq % |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (scenario, direct, meshed) in results {
        for (path, m) in [("direct", direct), ("meshed", meshed)] {
            let r = &m.report;
            let rate = if scenario.mode == "bulk" {
                format!(
                    "{:.0} MiB/s",
                    r.bytes as f64 / MIB / r.elapsed.as_secs_f64()
                )
            } else {
                format!("{:.0}", r.per_second())
            };
            let ratio = if path == "meshed" {
                format!(
                    "{:.0} %",
                    100.0 * throughput(r) / throughput(&direct.report)
                )
            } else {
                String::new()
            };
            let costs = if path == "meshed" {
                let p = &m.proxies;
                (
                    format!("{:.3} / {:.3}", p[0].cores, p[1].cores),
                    format!(
                        "{:.1} / {:.1}",
                        p[0].peak_rss as f64 / MIB,
                        p[1].peak_rss as f64 / MIB
                    ),
                    format!(
                        "{:.1} / {:.1}",
                        p[0].final_rss as f64 / MIB,
                        p[1].final_rss as f64 / MIB
                    ),
                )
            } else {
                Default::default()
            };
            let _ = writeln!(
                out,
                "| {} | {path} | {rate} | {ratio} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {:.3} | {:.0} / {:.0} |",
                scenario.name,
                ms(r.p50),
                ms(r.p99),
                ms(r.max),
                r.errors,
                costs.0,
                costs.1,
                costs.2,
                m.backend_cores,
                m.host.percent(m.host.steal),
                m.host.percent(m.host.softirq),
            );
        }
    }
    let _ = writeln!(out);
    let _ = write!(out, "{}", derived(results));
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

/// The figures the budget is stated in, next to the budget.
fn derived(results: &[(&Scenario, Measured, Measured)]) -> String {
    let by_mode = |mode: &str, conns: usize| {
        results
            .iter()
            .find(|(s, _, _)| s.mode == mode && s.conns == conns)
    };
    let mut out = String::new();
    let _ = writeln!(out, "| figure | Tandem | target | runbook budget |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    if let Some((_, direct, meshed)) = by_mode("http-fixed-rate", 4) {
        let krps = meshed.report.per_second() / 1000.0;
        let worst_cores = meshed.proxies.iter().map(|p| p.cores).fold(0.0, f64::max);
        let worst_peak = meshed.proxies.iter().map(|p| p.peak_rss).max().unwrap_or(0);
        let _ = writeln!(
            out,
            "| CPU cores per 1,000 RPS per proxy (busier proxy) | {:.3} | ≤ 0.05 | 0.25 |",
            worst_cores / krps
        );
        let _ = writeln!(
            out,
            "| MiB per proxy (peak RSS at 1,000 RPS) | {:.1} | ≤ 10 | 19 (20 MB) |",
            worst_peak as f64 / MIB
        );
        let _ = writeln!(
            out,
            "| calibration: the backend's CPU cores per 1,000 RPS on the direct path | {:.3} | | |",
            direct.backend_cores / (direct.report.per_second() / 1000.0)
        );
        let _ = writeln!(
            out,
            "| added latency at 1,000 RPS, p50 / p99 (ms) | {:.3} / {:.3} | ≤ 0.3 / 0.6 | |",
            ms(meshed.report.p50) - ms(direct.report.p50),
            ms(meshed.report.p99) - ms(direct.report.p99),
        );
    }
    if let Some((_, direct, meshed)) = by_mode("http", 50) {
        let rps = meshed.report.per_second();
        let worst_cores = meshed.proxies.iter().map(|p| p.cores).fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "| CPU µs per request per proxy, saturated (busier proxy) | {:.1} | ≤ 20 | |",
            worst_cores * 1e6 / rps
        );
        let _ = writeln!(
            out,
            "| saturated HTTP, 50 conns, vs direct | {:.0} % | ≥ 60 % | |",
            100.0 * rps / direct.report.per_second()
        );
    }
    for (mode, label, target) in [
        (
            "echo-new-conn",
            "new opaque conn per request, vs direct",
            "≥ 25 %",
        ),
        ("bulk", "bulk transfer, one stream, vs direct", "≥ 25 %"),
    ] {
        if let Some((_, direct, meshed)) = by_mode(mode, if mode == "bulk" { 1 } else { 4 }) {
            let _ = writeln!(
                out,
                "| {label} | {:.0} % | {target} | |",
                100.0 * throughput(&meshed.report) / throughput(&direct.report)
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
