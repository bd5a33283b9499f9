//! `tandem-demo`: a local mesh in one command.
//!
//! It builds the topology of a meshed Kubernetes pod pair out of network namespaces:
//! a trust anchor and an issuer (`tandem-identity ca`), the issuer service
//! (`tandem-identity serve`), and two pods, alpha and beta, each with `tandem-init`
//! rules and a `tandem-proxy`. Beta runs a small HTTP server and a TCP echo server on
//! an opaque port; alpha's client sends a short burst to both through the proxies. The
//! summary is read from the proxies' own metrics, so it shows what they saw: the peer
//! identities they verified, that the hop was mTLS, and the request counts.
//!
//! Everything it creates (namespaces, processes, files) is owned by guards from the
//! test harness and removed when they drop, on success, on error and on Ctrl-C.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::Parser;
use tandem_tests::mesh::{env_refs, identity_of, MeshedPair};
use tandem_tests::probe::metric;
use tandem_tests::{Proxy, Signals};

/// The HTTP port of beta's server: detected as HTTP and proxied per request.
const HTTP_PORT: u16 = 8080;
/// The echo server's port: 6379 is opaque by default (as in Linkerd), so the proxies
/// carry it as raw TCP inside mTLS, with no protocol detection.
const OPAQUE_PORT: u16 = 6379;

#[derive(Parser)]
#[command(
    name = "tandem-demo",
    about = "Start a local two-pod mesh, send traffic through it and show what the proxies saw"
)]
struct Args {
    /// Keep the mesh running after the summary, until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// HTTP requests in the burst.
    #[arg(long, default_value_t = 200)]
    requests: u32,
    /// Opaque TCP exchanges (1 KiB each way) in the burst.
    #[arg(long, default_value_t = 50)]
    exchanges: u32,
}

fn main() {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "tandem-demo: needs root (it creates network namespaces and firewall rules); run it with sudo: sudo {}",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "tandem-demo".into())
        );
        std::process::exit(1);
    }
    let signals = Signals::block();
    let outcome = tandem_tests::catch_harness_failure(|| run(&args, &signals));
    // Every guard has dropped by now: namespaces, processes and files are gone.
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(format!("{error:#}")),
        Err(failure) => Some(failure),
    };
    if signals.pending().is_some() {
        eprintln!("tandem-demo: interrupted; the mesh is removed");
        std::process::exit(130);
    }
    if let Some(failure) = failure {
        eprintln!("tandem-demo: {failure} (the mesh is removed)");
        std::process::exit(1);
    }
    println!("The mesh is removed.");
}

fn run(args: &Args, signals: &Signals) -> anyhow::Result<()> {
    println!("Starting a local mesh (pods are network namespaces; nothing outside them changes)");
    let world = MeshedPair::new();
    let (alpha_pod, beta_pod, issuer_pod) = (world.a(), world.b(), world.mesh.pod(2));
    step(
        signals,
        "trust anchor and issuer created with `tandem-identity ca`",
    )?;

    let issuer = world.start_issuer(&[]);
    step(
        signals,
        &format!(
            "identity service `tandem-identity serve` ready at {} (namespace {})",
            world.issuer_addr(),
            issuer_pod.name
        ),
    )?;

    let servers = beta_pod
        .run(|| {
            let http = TcpListener::bind(("0.0.0.0", HTTP_PORT))?;
            let echo = TcpListener::bind(("0.0.0.0", OPAQUE_PORT))?;
            Ok::<_, std::io::Error>((http, echo))
        })
        .context("cannot start beta's servers")?;
    serve(servers.0, http_connection);
    serve(servers.1, echo_connection);

    let (env_a, env_b) = (world.env(0, true, &[]), world.env(1, true, &[]));
    let alpha = Proxy::start(alpha_pod, &env_refs(&env_a));
    let beta = Proxy::start(beta_pod, &env_refs(&env_b));
    for (name, pod, proxy) in [("alpha", alpha_pod, &alpha), ("beta", beta_pod, &beta)] {
        step(
            signals,
            &format!(
                "pod {name:<5} {:<11} namespace {}: tandem-init rules, tandem-proxy pid {} certified",
                pod.ipv4,
                pod.name,
                proxy.process.pid()
            ),
        )?;
    }

    let http_target = world.b_addr(HTTP_PORT);
    let mut latencies = alpha_pod
        .run(|| http_burst(http_target, args.requests))
        .with_context(|| format!("HTTP burst to {http_target}"))?;
    latencies.sort_unstable();
    step(
        signals,
        &format!(
            "sent {} HTTP requests from alpha to {http_target}",
            args.requests
        ),
    )?;
    let opaque_target = world.b_addr(OPAQUE_PORT);
    let echoed = alpha_pod
        .run(|| echo_burst(opaque_target, args.exchanges))
        .with_context(|| format!("opaque TCP burst to {opaque_target}"))?;
    step(
        signals,
        &format!(
            "sent {} opaque TCP exchanges from alpha to {opaque_target}",
            args.exchanges
        ),
    )?;

    let (alpha_id, beta_id) = (identity_of("alpha"), identity_of("beta"));
    let seen_by_beta = [
        ("direction", "inbound"),
        ("tls", "true"),
        ("client_id", alpha_id.as_str()),
    ];
    let beta_metrics = beta.wait_metric("response_total", &seen_by_beta, args.requests.into());
    let alpha_metrics = alpha.metrics();
    let mtls_connections =
        metric(&beta_metrics, "tcp_open_total", &seen_by_beta).unwrap_or_default();
    let opaque_mtls = metric(
        &beta_metrics,
        "tcp_open_total",
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("client_id", alpha_id.as_str()),
            // Opaque traffic travels to the peer's inbound port with a transport
            // header naming the app's port, which beta counts it under.
            ("target_port", &OPAQUE_PORT.to_string()),
        ],
    )
    .unwrap_or_default();
    let verified_server = label_of(
        &alpha_metrics,
        "request_total",
        &[("direction", "outbound"), ("tls", "true")],
        "server_id",
    );
    let verified_client = label_of(
        &beta_metrics,
        "request_total",
        &[("direction", "inbound"), ("tls", "true")],
        "client_id",
    );
    if verified_server.as_deref() != Some(beta_id.as_str())
        || verified_client.as_deref() != Some(alpha_id.as_str())
    {
        bail!(
            "the proxies did not report the expected mTLS identities (alpha saw {verified_server:?}, beta saw {verified_client:?})"
        );
    }

    println!();
    println!("Summary");
    for (name, text) in [("alpha", &alpha_metrics), ("beta", &beta_metrics)] {
        println!(
            "  {name:<5} proxy identity {} ({})",
            identity_of(name),
            expiry(text)
        );
    }
    println!("  mTLS    beta's inbound proxy verified client {alpha_id}");
    println!("          alpha's outbound proxy verified server {beta_id}");
    println!(
        "          {mtls_connections} inbound connections with tls=\"true\" (tcp_open_total), {opaque_mtls} of them opaque (to port 4143 with a transport header for {OPAQUE_PORT})"
    );
    println!(
        "  HTTP    {} requests, all 200 OK; latency p50 {} p99 {} max {} (client side)",
        latencies.len(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0)),
    );
    println!(
        "          beta counted {} inbound responses over mTLS (response_total); alpha counted {} outbound",
        metric(&beta_metrics, "response_total", &seen_by_beta).unwrap_or_default(),
        metric(
            &alpha_metrics,
            "response_total",
            &[("direction", "outbound"), ("tls", "true")]
        )
        .unwrap_or_default(),
    );
    println!(
        "  TCP     {} exchanges on opaque port {OPAQUE_PORT}, {echoed} bytes echoed intact",
        args.exchanges
    );
    println!("  Admin   (each proxy's admin server listens on port 4191 in its pod)");
    for (name, pod) in [("alpha", alpha_pod), ("beta", beta_pod)] {
        println!(
            "          {name:<5} ip netns exec {} curl -s http://127.0.0.1:4191/metrics",
            pod.name
        );
    }

    if args.keep {
        println!();
        println!("The mesh keeps running. Try:");
        println!(
            "  sudo ip netns exec {} curl -s http://{http_target}/",
            alpha_pod.name
        );
        println!(
            "  sudo ip netns exec {} curl -s http://127.0.0.1:4191/ready",
            beta_pod.name
        );
        for (name, proxy) in [("alpha", &alpha), ("beta", &beta)] {
            println!(
                "  proxy log of {name}: {}",
                proxy.process.log_path().display()
            );
        }
        println!("  issuer log: {}", issuer.log_path().display());
        println!("Press Ctrl-C to remove it.");
        signals.wait();
    }
    Ok(())
}

/// Prints a progress line, or stops the demo if Ctrl-C was pressed meanwhile.
fn step(signals: &Signals, done: &str) -> anyhow::Result<()> {
    if signals.pending().is_some() {
        bail!("interrupted");
    }
    println!("  ok  {done}");
    Ok(())
}

/// Accepts connections on `listener` forever, a thread per connection: the demo's
/// load is a few hundred requests.
fn serve(listener: TcpListener, handle: fn(TcpStream) -> std::io::Result<()>) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || handle(stream));
        }
    });
}

const GREETING: &str = "hello from beta\n";

/// A minimal HTTP/1.1 keep-alive server: the demo only sends GETs without bodies.
fn http_connection(stream: TcpStream) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{GREETING}",
        GREETING.len()
    );
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        // Request line and headers, up to the blank line.
        let mut saw_request = false;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" && saw_request {
                break;
            }
            saw_request = true;
        }
        // One write per response: several small writes would meet Nagle's algorithm
        // and the peer's delayed ACK, and add 40 ms to every request.
        writer.write_all(response.as_bytes())?;
    }
}

fn echo_connection(stream: TcpStream) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = stream;
    std::io::copy(&mut reader, &mut writer)?;
    writer.shutdown(std::net::Shutdown::Write)
}

/// Sends `count` GETs on one keep-alive connection; returns each one's latency.
fn http_burst(target: SocketAddr, count: u32) -> anyhow::Result<Vec<Duration>> {
    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut latencies = Vec::with_capacity(count as usize);
    let mut line = String::new();
    for _ in 0..count {
        let started = Instant::now();
        writer.write_all(b"GET / HTTP/1.1\r\nHost: beta\r\n\r\n")?;
        line.clear();
        reader.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            bail!("unexpected response {:?}", line.trim_end());
        }
        let mut length = None;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                bail!("connection closed in the middle of a response");
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let mut body = vec![0; length.context("response without Content-Length")?];
        reader.read_exact(&mut body)?;
        if body != GREETING.as_bytes() {
            bail!("unexpected body {:?}", String::from_utf8_lossy(&body));
        }
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

/// Sends `count` 1 KiB messages on one connection and checks each echo; returns the
/// number of bytes that came back intact.
fn echo_burst(target: SocketAddr, count: u32) -> anyhow::Result<usize> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut echoed = 0;
    let mut reply = [0u8; 1024];
    for round in 0..count {
        let message: Vec<u8> = (0..1024u32).map(|i| (i ^ round) as u8).collect();
        stream.write_all(&message)?;
        stream.read_exact(&mut reply)?;
        if reply[..] != message[..] {
            bail!("exchange {round} came back altered");
        }
        echoed += reply.len();
    }
    Ok(echoed)
}

/// The `q` quantile of `sorted`, by nearest rank.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// When the proxy's certificate expires, from its `identity_cert_expiration_timestamp_seconds`.
fn expiry(metrics: &str) -> String {
    let Some(expires) = metric(metrics, "identity_cert_expiration_timestamp_seconds", &[]) else {
        return "expiry unknown".into();
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let left = (expires - now).max(0.0) as u64;
    format!(
        "certificate valid for another {}h{:02}m, rotates by itself",
        left / 3600,
        left % 3600 / 60
    )
}

/// The value of label `wanted` on the first sample of `name` that carries all `labels`.
fn label_of(text: &str, name: &str, labels: &[(&str, &str)], wanted: &str) -> Option<String> {
    let has = |line: &str, key: &str, value: &str| {
        let pair = format!("{key}=\"{value}\"");
        line.contains(&format!("{{{pair}")) || line.contains(&format!(",{pair}"))
    };
    let line = text.lines().find(|line| {
        line.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{'))
            && labels.iter().all(|(k, v)| has(line, k, v))
    })?;
    let key = format!("{wanted}=\"");
    let start = line
        .find(&format!("{{{key}"))
        .or_else(|| line.find(&format!(",{key}")))?
        + key.len()
        + 1;
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_string())
}
