//! `tandem-bench`: the mesh benchmark.
//!
//! `tandem-bench` (no subcommand) builds the demo's topology, runs every scenario
//! through the meshed pair and through a direct path in the same run, and prints one
//! table. The `serve`, `load` and `relay` subcommands are the backend, the load
//! generator and the plain relays it starts inside the pods; they are separate
//! processes so that their CPU time never mixes with the proxies'.

mod backend;
mod discovery;
mod idle;
mod load;
mod mesh;
mod relay;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tandem-bench",
    about = "Benchmark a meshed pod pair against a direct path"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Seconds each scenario runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Run only the scenarios whose name contains this text (e.g. to profile one);
    /// repeated, those whose name contains any of them.
    #[arg(long)]
    only: Vec<String>,
    /// After the table, measure the chosen scenarios' meshed path this many times
    /// more, taking turns (in reverse order every other round), and compare each with
    /// the first chosen in the same round: a difference between two scenarios with
    /// this machine's drift paired out.
    #[arg(long, default_value_t = 0)]
    rounds: u32,
    /// Extra setting for both proxies, `NAME=VALUE` (repeatable), e.g.
    /// `TANDEM_OUTBOUND_OPAQUE_CARRIER=true`.
    #[arg(long = "proxy-env", value_name = "NAME=VALUE", value_parser = parse_setting)]
    proxy_env: Vec<(String, String)>,
}

pub(crate) fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))?;
    Ok((name.to_string(), value.to_string()))
}

#[derive(Subcommand)]
enum Command {
    /// Run the backends (used inside the server pod).
    #[command(hide = true)]
    Serve(backend::ServeArgs),
    /// Run one load scenario and print its report line (used inside the client pod).
    #[command(hide = true)]
    Load(load::LoadArgs),
    /// Run the plain TCP relay that stands in for a proxy in the floor rows.
    #[command(hide = true)]
    Relay(relay::RelayArgs),
    /// Discovery at scale: a control plane describing many Services, the memory
    /// and update latency of the proxy that resolves them.
    Discovery(discovery::DiscoveryArgs),
    /// Idle connections and server-first protocols: the proxies' memory under floods
    /// of idle connections (while held, after they close) and the time a banner takes
    /// through the mesh.
    Idle(idle::IdleArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Serve(args)) => backend::serve(args),
        Some(Command::Load(args)) => load::run(args).map(|report| println!("{}", report.to_line())),
        Some(Command::Relay(args)) => relay::relay(args),
        Some(Command::Discovery(args)) => {
            let _signals = tandem_tests::Signals::block();
            tandem_tests::catch_harness_failure(|| discovery::run(args))
                .unwrap_or_else(|failure| Err(anyhow::anyhow!(failure)))
        }
        Some(Command::Idle(args)) => {
            let signals = tandem_tests::Signals::block();
            tandem_tests::catch_harness_failure(|| idle::run(args, &signals))
                .unwrap_or_else(|failure| Err(anyhow::anyhow!(failure)))
        }
        None => {
            let signals = tandem_tests::Signals::block();
            let result = tandem_tests::catch_harness_failure(|| {
                mesh::run(
                    Duration::from_secs(cli.seconds),
                    &cli.only,
                    cli.rounds,
                    &cli.proxy_env,
                    &signals,
                )
            })
            .unwrap_or_else(|failure| Err(anyhow::anyhow!(failure)));
            if signals.pending().is_some() {
                eprintln!("tandem-bench: interrupted; the pods are removed");
                std::process::exit(130);
            }
            result
        }
    };
    if let Err(error) = result {
        eprintln!("tandem-bench: {error:#}");
        std::process::exit(1);
    }
}
