//! Connections and streams to Linkerd's control plane.
//!
//! One gRPC channel per control-plane address (`…_DESTINATION_SVC_ADDR`,
//! `…_POLICY_SVC_ADDR`), shared by every stream to it and re-dialled when it breaks.
//! A name is resolved on each dial, so a restarted control plane with a new address
//! is found. Dialling goes through the outbound side's `mesh::Dialer`: mTLS with the
//! proxy's own identity, the server required to prove `…_SVC_NAME`; plaintext only
//! to a loopback address, as linkerd2-proxy does.
//!
//! [`next`] reads a stream under Linkerd's limits
//! (`LINKERD2_PROXY_CONTROL_STREAM_{INITIAL_TIMEOUT,IDLE_TIMEOUT,LIFETIME}`): the
//! first message must come within the initial timeout, a stream silent for the idle
//! timeout or older than the lifetime ends (cleanly) and is opened again.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use super::grpc::{self, Messages};
use crate::config::{ControlAddr, StreamLimits};
use crate::mesh::{Dialed, Dialer, MeshAlpn, PeerId};

/// A lazily connected channel to `addr`, dialled through `dialer`.
pub fn channel(addr: &ControlAddr, dialer: Arc<Dialer>) -> Result<Channel, String> {
    let endpoint = TonicEndpoint::from_shared(format!("http://{}", addr.addr))
        .map_err(|e| format!("{}: {e}", addr.addr))?;
    let host = addr.addr.clone();
    let tls = addr
        .name
        .clone()
        .filter(|_| !is_loopback(&addr.addr))
        .map(|name| {
            let name: Arc<str> = Arc::from(name.as_str());
            PeerId {
                identity: name.clone(),
                sni: name,
            }
        });
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let dialer = dialer.clone();
        let host = host.clone();
        let tls = tls.clone();
        async move {
            let target = resolve(&host).await?;
            let tcp = dialer.connect(target).await.map_err(io::Error::other)?;
            let io = match &tls {
                Some(peer) => Dialed::Tls(Box::new(
                    dialer
                        .originate(tcp, peer, MeshAlpn::None)
                        .await
                        .map_err(io::Error::other)?,
                )),
                None => Dialed::Plain(tcp),
            };
            Ok::<_, io::Error>(TokioIo::new(io))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Whether `addr` (`host:port`) is loopback: an IP loopback address, or exactly
/// `localhost.` (Linkerd's rule: `localhost` without the dot is a name like others).
pub fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost." || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The address to dial for `addr` (`host:port`): an IP as it is, `localhost.` as
/// 127.0.0.1, any other name looked up now.
async fn resolve(addr: &str) -> io::Result<SocketAddr> {
    if let Ok(addr) = addr.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = addr.strip_prefix("localhost.:") {
        let port = port
            .parse()
            .map_err(|_| io::Error::other(format!("{addr}: not a port")))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    let mut found: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
    if found.is_empty() {
        return Err(io::Error::other(format!("{addr}: no address")));
    }
    // Several addresses are replicas: spread the dials over them.
    let pick = fastrand::usize(..found.len());
    Ok(found.swap_remove(pick))
}

/// How reading one stream message ended.
pub enum Next<T> {
    Message(T),
    /// The server ended the stream, or a limit did (idle, lifetime): reopen it.
    Ended,
    Failed(tonic::Status),
}

/// Reads a stream under the limits, from a stream opened at `opened` that has
/// `received` a message or not.
pub struct Limited<T> {
    stream: Messages<T>,
    opened: Instant,
    received: bool,
    limits: StreamLimits,
}

impl<T: prost::Message + Default> Limited<T> {
    pub fn new(stream: Messages<T>, opened: Instant, limits: StreamLimits) -> Limited<T> {
        Limited {
            stream,
            opened,
            received: false,
            limits,
        }
    }

    /// The next message, or how the stream ended.
    pub async fn next(&mut self) -> Next<T> {
        let now = Instant::now();
        let mut deadline: Option<(Instant, bool)> = None;
        let mut tighten = |at: Instant, fails: bool| {
            if deadline.is_none_or(|(d, _)| at < d) {
                deadline = Some((at, fails));
            }
        };
        if !self.received {
            if let Some(initial) = self.limits.initial {
                tighten(self.opened + initial, true);
            }
        }
        if let Some(idle) = self.limits.idle {
            tighten(now + idle, false);
        }
        if let Some(lifetime) = self.limits.lifetime {
            tighten(self.opened + lifetime, false);
        }
        let message = match deadline {
            None => self.stream.message().await,
            Some((at, fails)) => match tokio::time::timeout_at(at, self.stream.message()).await {
                Ok(message) => message,
                Err(_) if fails => {
                    return Next::Failed(tonic::Status::deadline_exceeded(
                        "no first message within the initial timeout",
                    ))
                }
                Err(_) => return Next::Ended,
            },
        };
        match message {
            Ok(Some(message)) => {
                self.received = true;
                Next::Message(message)
            }
            Ok(None) => Next::Ended,
            Err(status) => Next::Failed(status),
        }
    }
}

/// The control plane's streaming calls.
pub const POLICY_WATCH: &str = "/io.linkerd.proxy.outbound.OutboundPolicies/Watch";
pub const DESTINATION_GET: &str = "/io.linkerd.proxy.destination.Destination/Get";
pub const DESTINATION_GET_PROFILE: &str = "/io.linkerd.proxy.destination.Destination/GetProfile";

/// Opens the streaming call `path` with `request` on `channel`, within the initial
/// timeout (the response headers count towards it, as in linkerd2-proxy).
pub async fn open<Req, Resp>(
    channel: &Channel,
    path: &'static str,
    request: Req,
    limits: &StreamLimits,
) -> Result<Messages<Resp>, tonic::Status>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let call = grpc::call(channel, path, &request);
    match limits.initial {
        Some(initial) => tokio::time::timeout(initial, call).await.map_err(|_| {
            tonic::Status::deadline_exceeded("no response within the initial timeout")
        })?,
        None => call.await,
    }
}

/// The delay before the next attempt after `failures` failures in a row.
pub fn retry_delay(backoff: &crate::discover::balance::Backoff, failures: u32) -> Duration {
    backoff.jittered(failures.max(1), fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_as_linkerd_reads_it() {
        for (addr, loopback) in [
            ("127.0.0.1:8086", true),
            ("[::1]:8090", true),
            ("localhost.:8086", true),
            ("localhost:8086", false),
            (
                "linkerd-dst-headless.linkerd.svc.cluster.local.:8086",
                false,
            ),
            ("10.0.0.1:8086", false),
        ] {
            assert_eq!(is_loopback(addr), loopback, "{addr}");
        }
    }

    #[tokio::test]
    async fn addresses_resolve_without_a_lookup_when_they_can() {
        assert_eq!(
            resolve("192.0.2.1:8086").await.unwrap(),
            "192.0.2.1:8086".parse().unwrap()
        );
        assert_eq!(
            resolve("localhost.:8090").await.unwrap(),
            "127.0.0.1:8090".parse().unwrap()
        );
    }
}
