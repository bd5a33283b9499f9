//! The floor: a plain TCP relay, run by `tandem-bench relay` in each pod in place of
//! the proxies. No TLS, no detection, no HTTP, no metrics: accept, connect, copy both
//! ways. It pays what any user-space proxy pair pays on this machine (two more
//! processes to wake per request, four more sockets, two more TCP hops), so the
//! proxies' figures can be read against it rather than only against a direct path.

use std::io;
use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args)]
pub struct RelayArgs {
    /// `LISTEN=TARGET`: accept on LISTEN, relay each connection to TARGET (repeatable).
    #[arg(long = "forward", value_name = "LISTEN=TARGET", value_parser = parse_forward, required = true)]
    pub forwards: Vec<(SocketAddr, SocketAddr)>,
}

fn parse_forward(text: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, target) = text
        .split_once('=')
        .ok_or_else(|| format!("expected LISTEN=TARGET, got {text:?}"))?;
    let addr = |s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|e| format!("{s:?} is not an address: {e}"))
    };
    Ok((addr(listen)?, addr(target)?))
}

/// The proxies' largest copy buffer, so one bulk stream is not held back by a smaller
/// one than theirs.
const BUFFER: usize = 64 * 1024;

/// Binds every listener, prints `ready` on stdout, then relays until killed.
pub fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let mut forwards = Vec::new();
    for (listen, target) in args.forwards {
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("cannot listen on {listen}"))?;
        forwards.push((listener, target));
    }
    // One thread, like a proxy with its default single worker.
    crate::backend::runtime_announcing_ready()?.block_on(relay_all(forwards))
}

async fn relay_all(forwards: Vec<(std::net::TcpListener, SocketAddr)>) -> anyhow::Result<()> {
    let mut loops = tokio::task::JoinSet::new();
    for (listener, target) in forwards {
        listener
            .set_nonblocking(true)
            .context("cannot make a listener non-blocking")?;
        let listener = TcpListener::from_std(listener).context("cannot register a listener")?;
        loops.spawn(accept_loop(listener, target));
    }
    while let Some(done) = loops.join_next().await {
        done.context("a listener task failed")??;
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, target: SocketAddr) -> anyhow::Result<()> {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(error) => {
                // Aborted handshakes and a full descriptor table pass; the relay
                // must outlive them, as a proxy does.
                eprintln!("tandem-bench relay: accept failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            // A failed relay shows as an error in the load generator's report.
            let _ = relay_one(client, target).await;
        });
    }
}

async fn relay_one(mut client: TcpStream, target: SocketAddr) -> io::Result<()> {
    let mut server = TcpStream::connect(target).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, BUFFER, BUFFER).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::tests::start_backend;
    use crate::load::{run_scenario, Mode, Scenario};

    /// A relay to `target` on its own thread; it lives until the test process exits.
    fn start_relay(target: SocketAddr) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(relay_all(vec![(listener, target)]))
                .unwrap();
        });
        addr
    }

    #[test]
    fn relays_requests_and_every_byte_of_a_stream() {
        let backend = start_backend();
        let scenario = |addr, mode, bytes| Scenario {
            addr,
            mode,
            conns: 2,
            rate: 1000,
            duration: Duration::from_millis(200),
            bytes,
        };
        for (target, mode) in [
            (backend.http, Mode::Http),
            (backend.http, Mode::HttpNewConn),
            (backend.echo, Mode::Echo),
        ] {
            let report = run_scenario(scenario(start_relay(target), mode, 0)).unwrap();
            assert!(report.requests > 0, "{report:?}");
            assert_eq!(report.errors, 0, "{report:?}");
            assert_eq!(report.bytes, report.requests * 1024, "{report:?}");
        }
        // The sink answers the count it received, which the load generator checks.
        let bytes = 3 * BUFFER as u64 + 12_345;
        let report = run_scenario(scenario(start_relay(backend.sink), Mode::Bulk, bytes)).unwrap();
        assert_eq!(
            (report.requests, report.errors, report.bytes),
            (1, 0, bytes)
        );
    }

    #[test]
    fn forwards_parse_as_two_addresses() {
        let (listen, target) = parse_forward("0.0.0.0:28080=10.1.2.3:38080").unwrap();
        assert_eq!(listen, "0.0.0.0:28080".parse().unwrap());
        assert_eq!(target, "10.1.2.3:38080".parse().unwrap());
        assert!(parse_forward("0.0.0.0:28080").is_err());
        assert!(parse_forward("here=10.1.2.3:38080").is_err());
    }
}
