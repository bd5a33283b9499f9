//! `tandem-identity`: trust anchor and issuer tooling, certificate checks, and
//! the issuer service. Errors reach the user as one line `tandem-identity: …`.
//!
//! Exit codes: 0 success; 1 failure; 2 usage error. `check` exits 0 when all
//! is well, 1 with warnings and 2 with errors.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tandem_identity::{auth, ca, check, env, service, token_review};

/// Trust anchors, issuers and the identity issuer service for Tandem and Linkerd proxies.
#[derive(Parser)]
#[command(name = "tandem-identity", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create trust anchors and issuers.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Check an anchor bundle, issuer or proxy certificate (exit 0 ok, 1 warning, 2 error).
    Check {
        /// PEM file with one or more certificates.
        file: PathBuf,
        /// PEM trust anchors to verify the chain against.
        #[arg(long)]
        anchors: Option<PathBuf>,
        /// Warn when a certificate expires within this long.
        #[arg(long, default_value = "60d", value_parser = env::duration)]
        warn_within: Duration,
    },
    /// Run the issuer service (io.linkerd.proxy.identity.Identity/Certify).
    Serve(ServeArgs),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a self-signed ECDSA P-256 trust anchor.
    Anchor {
        /// Where to write the certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the private key (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Subject common name and DNS SAN.
        #[arg(long, default_value = ca::DEFAULT_ANCHOR_NAME)]
        name: String,
        /// Validity, e.g. 3650d.
        #[arg(long, default_value = "3650d", value_parser = env::duration)]
        validity: Duration,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Create an issuer certificate and key signed by a trust anchor.
    Issuer {
        /// Trust anchor certificate (PEM).
        #[arg(long)]
        anchor_cert: PathBuf,
        /// Trust anchor private key (PEM).
        #[arg(long)]
        anchor_key: PathBuf,
        /// Where to write the issuer certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the issuer private key (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Subject common name and DNS SAN.
        #[arg(long, default_value = ca::DEFAULT_ISSUER_NAME)]
        name: String,
        /// Validity, e.g. 365d (cut to the anchor's expiry).
        #[arg(long, default_value = "365d", value_parser = env::duration)]
        validity: Duration,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, default_value = service::DEFAULT_ADDR)]
    addr: SocketAddr,
    /// Admin listen address (/metrics, /ready, /live).
    #[arg(long, default_value = service::DEFAULT_ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// Issuer certificate (PEM; may be followed by intermediates).
    #[arg(long)]
    issuer_cert: PathBuf,
    /// Issuer private key (PEM).
    #[arg(long)]
    issuer_key: PathBuf,
    /// Trust anchors (PEM); the issuer must chain to one of them.
    #[arg(long)]
    trust_anchors: Option<PathBuf>,
    /// File of `TOKEN IDENTITY` lines saying which token may claim which identity.
    #[arg(
        long,
        required_unless_present = "kubernetes_token_review",
        conflicts_with = "kubernetes_token_review"
    )]
    tokens: Option<PathBuf>,
    /// Authenticate proxies' projected service-account tokens with the Kubernetes
    /// TokenReview API (in a pod: its own service account must be allowed to
    /// create tokenreviews).
    #[arg(long)]
    kubernetes_token_review: bool,
    /// What follows `SA.NS.` in the identity a service account may claim.
    #[arg(long, default_value = "serviceaccount.identity.linkerd.cluster.local")]
    identity_suffix: String,
    /// Kubernetes API `host:port`; in a pod, from KUBERNETES_SERVICE_HOST/PORT.
    #[arg(long)]
    kube_api: Option<String>,
    /// CA bundle of the Kubernetes API.
    #[arg(long, default_value = concat!("/var/run/secrets/kubernetes.io/serviceaccount", "/ca.crt"))]
    kube_ca: PathBuf,
    /// The issuer's own service-account token, re-read for every review.
    #[arg(long, default_value = concat!("/var/run/secrets/kubernetes.io/serviceaccount", "/token"))]
    kube_token: PathBuf,
    /// Lifetime of issued certificates.
    #[arg(long, default_value = "24h", value_parser = env::duration)]
    cert_lifetime: Duration,
    /// How far certificates are backdated for clocks behind ours.
    #[arg(long, default_value = "1m", value_parser = env::duration)]
    clock_skew: Duration,
    /// How often the issuer files are checked for changes.
    #[arg(long, default_value = "5s", value_parser = env::duration)]
    reload_interval: Duration,
    /// Serve gRPC over TLS with a certificate for this name issued by the
    /// issuer (the proxies' LINKERD2_PROXY_IDENTITY_SVC_NAME). Plaintext when unset.
    #[arg(long)]
    tls_name: Option<String>,
}

/// The API server's address as Kubernetes tells every pod.
fn in_cluster_api() -> Result<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").context("KUBERNETES_SERVICE_HOST unset")?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    Ok(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

fn main() {
    let args = Args::parse();
    init_tracing();
    let code = match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem-identity: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn run(args: Args) -> Result<i32> {
    match args.command {
        Command::Ca(CaCommand::Anchor {
            cert,
            key,
            name,
            validity,
            force,
        }) => {
            let m = ca::anchor(&name, SystemTime::now(), validity)?;
            ca::write(&m, &cert, &key, force)?;
            println!(
                "trust anchor {name} written to {} (key {})",
                cert.display(),
                key.display()
            );
            Ok(0)
        }
        Command::Ca(CaCommand::Issuer {
            anchor_cert,
            anchor_key,
            cert,
            key,
            name,
            validity,
            force,
        }) => {
            let ac = std::fs::read_to_string(&anchor_cert)
                .with_context(|| format!("read {}", anchor_cert.display()))?;
            let ak = std::fs::read_to_string(&anchor_key)
                .with_context(|| format!("read {}", anchor_key.display()))?;
            let m = ca::issuer(&ac, &ak, &name, SystemTime::now(), validity)?;
            ca::write(&m, &cert, &key, force)?;
            println!(
                "issuer {name} written to {} (key {})",
                cert.display(),
                key.display()
            );
            Ok(0)
        }
        Command::Check {
            file,
            anchors,
            warn_within,
        } => {
            let pem = std::fs::read(&file).with_context(|| format!("read {}", file.display()));
            let anchors_pem = anchors
                .as_ref()
                .map(|a| std::fs::read(a).with_context(|| format!("read {}", a.display())))
                .transpose();
            let (pem, anchors_pem) = match (pem, anchors_pem) {
                (Ok(p), Ok(a)) => (p, a),
                (Err(e), _) | (_, Err(e)) => {
                    println!("error: {e:#}");
                    return Ok(2);
                }
            };
            let report = check::check(&pem, anchors_pem.as_deref(), SystemTime::now(), warn_within);
            for f in &report.findings {
                println!("{f}");
            }
            Ok(report.exit_code())
        }
        Command::Serve(s) => {
            let authenticator: Arc<dyn auth::Authenticator> = match &s.tokens {
                Some(tokens) => Arc::new(auth::TokenFile::open(tokens)?),
                None => {
                    let api = match &s.kube_api {
                        Some(api) => api.clone(),
                        None => in_cluster_api()
                            .context("--kubernetes-token-review outside a pod needs --kube-api")?,
                    };
                    Arc::new(
                        token_review::TokenReview::new(
                            &api,
                            &s.kube_ca,
                            &s.kube_token,
                            &s.identity_suffix,
                        )
                        .context("cannot set up TokenReview")?,
                    )
                }
            };
            let config = service::ServiceConfig {
                addr: s.addr,
                admin_addr: s.admin_addr,
                issuer_cert: s.issuer_cert,
                issuer_key: s.issuer_key,
                trust_anchors: s.trust_anchors,
                authenticator,
                cert_lifetime: s.cert_lifetime,
                clock_skew: s.clock_skew,
                reload_interval: s.reload_interval,
                tls_name: s.tls_name,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start tokio runtime")?;
            rt.block_on(async move {
                let running = service::start(config).await?;
                tokio::select! {
                    r = running.wait() => r.map(|()| 0),
                    r = shutdown_signal() => r.map(|()| {
                        tracing::info!("shutting down");
                        0
                    }),
                }
            })
        }
    }
}

async fn shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
