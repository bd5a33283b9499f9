//! `tandem-identity`: the CA tooling and issuer service arrive with the identity issue.
//! Until then the binary exists so the workspace, image and injection templates have a
//! stable name to point at; it refuses every command instead of pretending to work.

use clap::Parser;

/// Trust anchor and issuer tooling for Tandem (not implemented yet).
#[derive(Parser)]
#[command(name = "tandem-identity", version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("tandem-identity: not implemented yet (see the README feature table)");
    std::process::exit(2);
}
