//! Idle connections and server-first protocols (`tandem-bench idle`): what the
//! meshed pair's proxies hold for connections that carry nothing, whether that memory
//! goes back once they close, and how long a server that speaks first waits for its
//! client to hear it.
//!
//! Floods of `--conns` connections from the client pod to the server pod, held open:
//! - silent, with the server-first windows off: first while the client-side proxy
//!   waits to detect them, then after detection has timed out and each is forwarded
//!   in mesh TLS (the server-side proxy then holds them too);
//! - silent, with the default settings: handed to the server after the server-first
//!   window, so forwarded from the start;
//! - HTTP keep-alive: one request each, then quiet, the way connection pools keep them.
//!
//! After each flood closes, memory is read again `--settle` seconds later. Then
//! a banner server on a port nobody declared opaque is reached a few times, each
//! connection timed to the banner's first byte.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tandem_tests::mesh::{env_refs, MeshedPair};
use tandem_tests::{wait_for_or, Pod, Proxy, Signals};

use crate::backend::{BANNER, HTTP_BODY_LEN};

const HTTP: u16 = 8080;
/// A port no default opaque list names, so that connections to it are detected.
const BANNER_PORT: u16 = 2525;
/// How long detection waits in the first flood: long enough to read the memory of
/// every waiting connection, the default of both linkerd2-proxy and Tandem.
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);
const KIB: f64 = 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(clap::Args, Clone)]
pub struct IdleArgs {
    /// Connections in each flood.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Seconds after a flood closes at which memory is read again.
    #[arg(long, default_value_t = 30)]
    settle: u64,
    /// Connections timed to a server-first backend's banner.
    #[arg(long, default_value_t = 5)]
    banners: usize,
    /// Extra setting for both proxies, `NAME=VALUE` (repeatable).
    #[arg(long = "proxy-env", value_name = "NAME=VALUE", value_parser = crate::parse_setting)]
    proxy_env: Vec<(String, String)>,
}

/// Resident memory of both proxies at one moment, client side first.
#[derive(Clone, Copy)]
struct Rss([u64; 2]);

/// One line of the table: memory at one moment of a flood, against its baseline.
struct Reading {
    flood: &'static str,
    moment: String,
    rss: Rss,
    baseline: Rss,
    /// Connections each proxy held at that moment (none after the flood closed).
    held: [usize; 2],
    target: &'static str,
}

pub fn run(args: IdleArgs, signals: &Signals) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (it creates network namespaces and firewall rules); run it with sudo");
    }
    // Each held connection is a descriptor here and two in each proxy; the proxies
    // inherit the limit. A container may forbid raising the hard limit: then the
    // floods are as large as it allows.
    let limit = raise_descriptor_limit(2 * args.conns as u64 + SPARE_DESCRIPTORS)?;
    let conns = args
        .conns
        .min((limit.saturating_sub(SPARE_DESCRIPTORS) / 2) as usize);
    if conns < args.conns {
        println!(
            "tandem-bench: the descriptor limit is {limit} and cannot be raised here: {conns} connections per flood instead of {}",
            args.conns
        );
    }
    let args = IdleArgs { conns, ..args };
    let extra: Vec<(&str, &str)> = args
        .proxy_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let bench = std::env::current_exe().context("cannot find tandem-bench's own path")?;
    let world = MeshedPair::new();
    let (client_pod, server_pod) = (world.a(), world.b());
    let _issuer = world.start_issuer(&[]);
    let mut serve = Command::new(&bench);
    serve
        .arg("serve")
        .arg("--http")
        .arg(format!("0.0.0.0:{HTTP}"))
        .arg("--banner")
        .arg(format!("0.0.0.0:{BANNER_PORT}"));
    let _backend = crate::mesh::spawn_ready(server_pod, "backend", serve);
    let settle = Duration::from_secs(args.settle);
    let banners = args.banners;
    let mut readings = Vec::new();

    let mut windows_off = vec![
        ("LINKERD2_PROXY_LOG", "warn"),
        ("TANDEM_OUTBOUND_SERVER_FIRST_WINDOW", "0"),
        ("TANDEM_INBOUND_SERVER_FIRST_WINDOW", "0"),
        ("LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT", "10s"),
        ("LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT", "10s"),
    ];
    windows_off.extend_from_slice(&extra);
    let mut defaults = vec![("LINKERD2_PROXY_LOG", "warn")];
    defaults.extend_from_slice(&extra);
    {
        let pair = Pair::start(&world, &windows_off);
        let baseline = pair.warm_up(world.b_addr(HTTP))?;
        eprintln!("  silent flood, server-first windows off");
        let started = Instant::now();
        let held = pair.hold(args.conns, world.b_addr(HTTP), false)?;
        let flood = "silent, windows off";
        // Waiting: one descriptor each, in the client-side proxy only.
        readings.push(pair.reading(
            flood,
            baseline,
            [1, 0],
            "≤ 2 KiB per conn (client side)",
            || {
                format!(
                    "waiting for detection ({:.1} s after the first connect)",
                    started.elapsed().as_secs_f64()
                )
            },
        )?);
        // Forwarded: the client's connection and the one to the peer in the client-side
        // proxy, the peer's and the application's in the server-side one. Those that
        // failed to be forwarded (a storm of handshakes at the timeout) are gone.
        pair.sleep_until(started + DETECT_TIMEOUT, signals)?;
        readings.push(pair.reading(
            flood,
            baseline,
            [2, 2],
            "≤ 6 KiB per conn per proxy",
            || {
                format!(
                    "forwarded after detection timed out ({:.1} s)",
                    started.elapsed().as_secs_f64()
                )
            },
        )?);
        readings.extend(pair.close(held, flood, baseline, settle, signals)?);
    }
    let mut banner_times = Vec::new();
    {
        let pair = Pair::start(&world, &defaults);
        let baseline = pair.warm_up(world.b_addr(HTTP))?;
        eprintln!("  silent flood, default settings");
        let flood = "silent, default settings";
        let held = pair.hold(args.conns, world.b_addr(HTTP), false)?;
        readings.push(pair.reading(
            flood,
            baseline,
            [2, 2],
            "≤ 6 KiB per conn per proxy",
            || "forwarded after the server-first window".into(),
        )?);
        readings.extend(pair.close(held, flood, baseline, settle, signals)?);

        eprintln!("  HTTP keep-alive flood");
        let baseline = pair.rss()?;
        let flood = "HTTP keep-alive, one request each";
        let held = pair.hold(args.conns, world.b_addr(HTTP), true)?;
        // The requests share the connections between the proxies: only the client's
        // connection is held per connection, in the client-side proxy.
        readings.push(pair.reading(
            flood,
            baseline,
            [1, 0],
            "≤ 6 KiB per conn (client side)",
            || "held after their request".into(),
        )?);
        readings.extend(pair.close(held, flood, baseline, settle, signals)?);

        eprintln!("  server-first banners");
        for _ in 0..banners {
            banner_times.push(time_to_banner(client_pod, world.b_addr(BANNER_PORT))?);
        }
    }
    print!("{}", table(args.conns, &readings, &banner_times));
    Ok(())
}

/// The meshed pair's two proxies, started for one part of the run.
struct Pair<'w> {
    proxies: [Proxy<'w>; 2],
    client_pod: &'w Pod,
    /// Descriptors each proxy holds with nothing in flight: listeners, the runtime,
    /// the control-plane and peer connections.
    idle_descriptors: std::cell::Cell<[usize; 2]>,
}

impl<'w> Pair<'w> {
    fn start(world: &'w MeshedPair, settings: &[(&str, &str)]) -> Pair<'w> {
        let (env_a, env_b) = (world.env(0, true, settings), world.env(1, true, settings));
        let proxies = [
            Proxy::start(world.a(), &env_refs(&env_a)),
            Proxy::start(world.b(), &env_refs(&env_b)),
        ];
        let idle = proxies
            .each_ref()
            .map(|p| descriptors(p.process.pid()).unwrap_or(0));
        Pair {
            proxies,
            client_pod: world.a(),
            idle_descriptors: std::cell::Cell::new(idle),
        }
    }

    /// One request through the pair (certificates, the connection between the
    /// proxies), then the baseline every flood is measured from.
    fn warm_up(&self, target: SocketAddr) -> anyhow::Result<Rss> {
        let mut held = self.hold(1, target, true)?;
        held.clear();
        // The warm-up leaves the connection between the proxies open.
        let mut idle = self.idle_descriptors.get();
        for (count, pid) in idle.iter_mut().zip(self.pids()) {
            *count = descriptors(pid)?.max(*count);
        }
        self.idle_descriptors.set(idle);
        self.wait_idle(0)?;
        self.rss()
    }

    fn pids(&self) -> [u32; 2] {
        self.proxies.each_ref().map(|p| p.process.pid())
    }

    fn rss(&self) -> anyhow::Result<Rss> {
        let [a, b] = self.pids();
        Ok(Rss([crate::mesh::rss(a)?.1, crate::mesh::rss(b)?.1]))
    }

    /// Opens `conns` connections from the client pod; with `request`, each sends
    /// one HTTP request and reads its response before the next opens.
    fn hold(
        &self,
        conns: usize,
        target: SocketAddr,
        request: bool,
    ) -> anyhow::Result<Vec<TcpStream>> {
        self.client_pod.run(|| {
            (0..conns)
                .map(|i| {
                    let mut stream = TcpStream::connect(target)
                        .with_context(|| format!("connection {i} to {target}"))?;
                    if request {
                        one_request(&mut stream)
                            .with_context(|| format!("request on connection {i}"))?;
                    }
                    Ok(stream)
                })
                .collect()
        })
    }

    /// Memory once the flood's connections are settled in the proxies (see
    /// [`Pair::held_connections`]), against `baseline`; `moment` names it then.
    fn reading(
        &self,
        flood: &'static str,
        baseline: Rss,
        per_connection: [usize; 2],
        target: &'static str,
        moment: impl FnOnce() -> String,
    ) -> anyhow::Result<Reading> {
        let held = self.held_connections(per_connection)?;
        Ok(Reading {
            flood,
            moment: moment(),
            rss: self.rss()?,
            baseline,
            held,
            target,
        })
    }

    /// Waits until both proxies' descriptor counts have stopped changing, then
    /// returns the connections each holds over idle, given how many descriptors one
    /// connection takes in each (0: none there).
    fn held_connections(&self, per_connection: [usize; 2]) -> anyhow::Result<[usize; 2]> {
        let idle = self.idle_descriptors.get();
        let mut counts = [0; 2];
        for (index, pid) in self.pids().into_iter().enumerate() {
            counts[index] = settled_descriptors(pid)?;
        }
        Ok(std::array::from_fn(|i| {
            counts[i].saturating_sub(idle[i]) / per_connection[i].max(1) * per_connection[i].min(1)
        }))
    }

    /// Waits until proxy `index` is back to its idle descriptors (within a couple:
    /// a closing connection may still be on its way out).
    fn wait_idle(&self, index: usize) -> anyhow::Result<()> {
        let pid = self.pids()[index];
        let idle = self.idle_descriptors.get()[index];
        let mut last = 0;
        let done = wait_for_or(Duration::from_secs(120), || {
            last = descriptors(pid).ok()?;
            (last <= idle + 2).then_some(())
        });
        done.with_context(|| format!("proxy {index} still holds {last} descriptors, {idle} idle"))
    }

    fn sleep_until(&self, until: Instant, signals: &Signals) -> anyhow::Result<()> {
        // A benchmark waits out the time it reports on; nothing here synchronises.
        while Instant::now() < until {
            if signals.pending().is_some() {
                bail!("interrupted; the pods are removed");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Closes the flood's connections and reads memory once they are gone from the
    /// client-side proxy and again `settle` later.
    fn close(
        &self,
        held: Vec<TcpStream>,
        flood: &'static str,
        baseline: Rss,
        settle: Duration,
        signals: &Signals,
    ) -> anyhow::Result<Vec<Reading>> {
        drop(held);
        self.wait_idle(0)?;
        self.wait_idle(1)?;
        let closed = Reading {
            flood,
            moment: "all closed".into(),
            rss: self.rss()?,
            baseline,
            held: [0, 0],
            target: "",
        };
        self.sleep_until(Instant::now() + settle, signals)?;
        let settled = Reading {
            flood,
            moment: format!("{} s after they closed", settle.as_secs()),
            rss: self.rss()?,
            baseline,
            held: [0, 0],
            target: "< 2× the baseline",
        };
        Ok(vec![closed, settled])
    }
}

/// A proxy's descriptor count once it has not changed for a second.
fn settled_descriptors(pid: u32) -> anyhow::Result<usize> {
    let mut last = (descriptors(pid)?, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = descriptors(pid)?;
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1) {
            return Ok(now);
        }
    }
}

fn descriptors(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("cannot list /proc/{pid}/fd"))?
        .count())
}

fn one_request(stream: &mut TcpStream) -> anyhow::Result<()> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n")?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("closed before the response ended");
        }
        response.extend_from_slice(&buf[..n]);
        if let Some(head) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            if response.len() >= head + 4 + HTTP_BODY_LEN {
                return Ok(());
            }
        }
    }
}

/// Time from the start of a connect to the first byte of the server's banner.
fn time_to_banner(client: &Pod, target: SocketAddr) -> anyhow::Result<Duration> {
    client.run(|| {
        let started = Instant::now();
        let mut stream = TcpStream::connect(target).context("connect to the banner server")?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut first = vec![0u8; BANNER.len()];
        stream
            .read_exact(&mut first)
            .context("read the banner through the mesh")?;
        let elapsed = started.elapsed();
        if first != BANNER {
            bail!("the banner arrived altered: {first:?}");
        }
        Ok(elapsed)
    })
}

/// Descriptors a proxy needs besides the flood's.
const SPARE_DESCRIPTORS: u64 = 256;

/// Raises the descriptor limit to `want`, or as far as the hard limit allows when it
/// cannot be raised (no `CAP_SYS_RESOURCE`); returns the limit in force.
fn raise_descriptor_limit(want: u64) -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot read the descriptor limit");
    }
    for (soft, hard) in [
        (want, want.max(limit.rlim_max)),
        (limit.rlim_max, limit.rlim_max),
    ] {
        let wanted = libc::rlimit {
            rlim_cur: soft.min(hard),
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
            return Ok(wanted.rlim_cur);
        }
    }
    Err(std::io::Error::last_os_error()).context("cannot raise the descriptor limit")
}

fn table(conns: usize, readings: &[Reading], banners: &[Duration]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n{conns} connections per flood.\n");
    let _ = writeln!(
        out,
        "| flood | moment | conns held (client side / server side) | RSS MiB | KiB per conn over the baseline | × baseline | target |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---|");
    for r in readings {
        let [a, b] = r.rss.0;
        let [base_a, base_b] = r.baseline.0;
        let kib = |now: u64, base: u64, held: usize| match held {
            0 => "-".to_string(),
            held => format!("{:.1}", (now as f64 - base as f64) / KIB / held as f64),
        };
        let per_conn = format!(
            "{} / {}",
            kib(a, base_a, r.held[0]),
            kib(b, base_b, r.held[1])
        );
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} | {:.1} / {:.1} | {per_conn} | {:.1} / {:.1} | {} |",
            r.flood,
            r.moment,
            r.held[0],
            r.held[1],
            a as f64 / MIB,
            b as f64 / MIB,
            a as f64 / base_a.max(1) as f64,
            b as f64 / base_b.max(1) as f64,
            r.target,
        );
    }
    let _ = writeln!(
        out,
        "\nServer-first backend on port {BANNER_PORT} (not opaque), meshed, time to the banner's first byte: {} (target < 500 ms)",
        banners
            .iter()
            .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out
}
