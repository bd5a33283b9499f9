//! `tandem-proxy`: with no subcommand, parse the environment, set up logging and run
//! until drained; `inject` and `await` are the Kubernetes helpers, kept in the same
//! binary so the proxy image carries them (distroless-safe, no shell needed).
//!
//! Exit codes: 0 after a clean shutdown, 64 (EX_USAGE, as Linkerd) for invalid
//! configuration, 1 when the proxy cannot start or fails while running. `await`
//! passes its command's status through; `inject` exits 1 on bad input.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tandem_proxy::k8s::await_ready::{self, AwaitOptions};
use tandem_proxy::k8s::inject::{self, InjectOptions};

// mimalloc: 5-6 % fewer instructions per proxied request than glibc's malloc
// (benches/RESULTS.md, stop 21), mostly tokio's task cells, whose 128-byte alignment
// takes glibc's slow `posix_memalign` path. Built without transparent huge pages: with
// them a proxy's RSS doubles to 18 MiB at 1,000 requests/s.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "tandem-proxy",
    version,
    about = "Tandem's sidecar proxy. Without a subcommand it runs the proxy, configured by \
             LINKERD2_PROXY_* and TANDEM_* environment variables (see the README)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add Tandem to Kubernetes workloads: reads YAML (a file or `-` for stdin),
    /// writes it to stdout, and reports each workload on stderr.
    Inject(Box<InjectArgs>),
    /// Wait until the proxy is ready, then run a command (the app's entrypoint).
    Await(AwaitArgs),
}

#[derive(Debug, Args)]
struct InjectArgs {
    /// YAML file with Pods, Deployments, StatefulSets, DaemonSets, Jobs, CronJobs or Lists.
    #[arg(default_value = "-")]
    file: PathBuf,
    /// Trust anchors PEM, put in every proxy's environment.
    #[arg(long)]
    trust_anchors: PathBuf,
    /// Run the proxy as a native sidecar (an init container with restartPolicy Always; Kubernetes 1.29+).
    #[arg(long)]
    native_sidecar: bool,
    /// Give proxies production resource requests and limits (Linkerd's HA values).
    #[arg(long)]
    ha: bool,
    #[arg(long, default_value = concat!("ghcr.io/tandem-mesh/tandem-proxy:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    #[arg(long, default_value = concat!("ghcr.io/tandem-mesh/tandem-init:", env!("CARGO_PKG_VERSION")))]
    init_image: String,
    /// Namespace the issuer (tandem-identity) runs in.
    #[arg(long, default_value = "tandem")]
    control_plane_namespace: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The cluster's DNS domain (for the issuer's address).
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Run the proxies under Linkerd's control plane in this namespace (usually
    /// `linkerd`): certificates from Linkerd's identity service, endpoints, policies
    /// and profiles from its Destination and policy APIs, set as Linkerd's injector
    /// sets them. Replaces --control-plane-namespace.
    #[arg(long)]
    linkerd_namespace: Option<String>,
    /// With --linkerd-namespace: the Destination API's `host:port`, if not
    /// `linkerd-dst-headless.<ns>.svc.<domain>.:8086`.
    #[arg(long, requires = "linkerd_namespace")]
    destination_addr: Option<String>,
    /// With --linkerd-namespace: the policy API's `host:port`, if not
    /// `linkerd-policy.<ns>.svc.<domain>.:8090`.
    #[arg(long, requires = "linkerd_namespace")]
    policy_addr: Option<String>,
    /// With --linkerd-namespace: the pod networks, whose addresses are asked for
    /// profiles (Linkerd's `clusterNetworks`).
    #[arg(
        long,
        default_value = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8"
    )]
    cluster_networks: String,
}

#[derive(Debug, Args)]
struct AwaitArgs {
    /// The proxy's admin port on loopback.
    #[arg(long, default_value_t = 4191)]
    port: u16,
    /// Give up (exit 69) when the proxy is not ready after this long, e.g. `2m`.
    #[arg(long, default_value = "2m", value_parser = tandem_proxy::config::parse_duration)]
    timeout: Duration,
    /// When the command ends, ask the proxy to shut down (needs
    /// LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED=true), so that a Job completes.
    #[arg(long, short = 'S')]
    shutdown: bool,
    /// The command to run once the proxy is ready; its exit status is passed through.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        None => run_proxy(),
        Some(Command::Inject(args)) => run_inject(*args),
        Some(Command::Await(args)) => await_ready::run(&AwaitOptions {
            admin: std::net::SocketAddr::from(([127, 0, 0, 1], args.port)),
            timeout: args.timeout,
            shutdown: args.shutdown,
            disabled: std::env::var_os("TANDEM_AWAIT_DISABLED").is_some_and(|v| !v.is_empty()),
            command: args.command,
        }),
    }
}

fn run_proxy() -> ExitCode {
    let config = match tandem_proxy::config::Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tandem-proxy: invalid configuration: {error}");
            return ExitCode::from(64);
        }
    };
    let log_level = match tandem_proxy::ops::log::init(&config.log_filter, config.log_format) {
        Ok(level) => level,
        Err(error) => {
            eprintln!("tandem-proxy: invalid configuration: {error}");
            return ExitCode::from(64);
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    match tandem_proxy::app::run(config, log_level) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tandem-proxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_inject(args: InjectArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("tandem-proxy inject: {message}");
        ExitCode::FAILURE
    };
    let trust_anchors_pem = match std::fs::read_to_string(&args.trust_anchors) {
        Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => pem,
        Ok(_) => {
            return fail(format!(
                "{}: no PEM certificate",
                args.trust_anchors.display()
            ))
        }
        Err(e) => return fail(format!("cannot read {}: {e}", args.trust_anchors.display())),
    };
    let mut input = String::new();
    let read = if args.file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut input)
    } else {
        std::fs::File::open(&args.file).and_then(|mut f| f.read_to_string(&mut input))
    };
    if let Err(e) = read {
        return fail(format!("cannot read {}: {e}", args.file.display()));
    }
    let options = InjectOptions {
        native_sidecar: args.native_sidecar,
        ha: args.ha,
        proxy_image: args.proxy_image,
        init_image: args.init_image,
        trust_anchors_pem,
        control_plane_namespace: args.control_plane_namespace,
        trust_domain: args.trust_domain,
        cluster_domain: args.cluster_domain,
        linkerd: args
            .linkerd_namespace
            .map(|namespace| inject::LinkerdControlPlane {
                namespace,
                destination_addr: args.destination_addr,
                policy_addr: args.policy_addr,
                cluster_networks: args.cluster_networks,
            }),
    };
    match inject::inject_stream(&input, &options) {
        Ok((output, report)) => {
            for line in report {
                eprintln!("{line}");
            }
            if let Err(e) = std::io::stdout().write_all(output.as_bytes()) {
                return fail(format!("cannot write the output: {e}"));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
