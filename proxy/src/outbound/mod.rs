//! Outbound: the application's connections to the world, redirected to us by the
//! pod's OUTPUT rules.
//!
//! [`Outbound::serve`] is one connection's whole path: accept (original
//! destination), then whatever [`plan::plan`] asks for (discovery, detection), then
//! the plan it settles on, carried out here: refuse, serve HTTP request by request
//! (`http/`), or forward bytes: plain, in mesh TLS to the original destination, or
//! opaque to the peer proxy's inbound port (with a transport header, or on a pooled
//! carrier, `opaque/carrier.rs`). Its failure is counted once, at the end.

pub mod plan;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

use self::plan::{Detection, Facts, OpaqueVia, OutboundPlan, Settings, Step};
use crate::config::DirectionConfig;
use crate::discover::Discover;
use crate::http::HttpProxy;
use crate::mesh::tls::{NoTlsReason, TlsStatus};
use crate::mesh::{Dialer, MeshAlpn, PeerId};
use crate::metrics::transport::Peer;
use crate::metrics::DirectionMetrics;
use crate::net::detect::{self, DetectResult, Outcome};
use crate::net::error::ConnError;
use crate::net::forward::{self, Downstream};
use crate::net::socket::{self, Accepted};
use crate::opaque::carrier::{Carriers, Opened};
use crate::opaque::transport_header::TransportHeader;

/// The outbound side: its settings, and what only it owns (the HTTP pools to
/// destinations, the carriers to peer proxies).
pub struct Outbound {
    pub config: DirectionConfig,
    pub metrics: Arc<DirectionMetrics>,
    pub discovery: Arc<dyn Discover>,
    pub dialer: Arc<Dialer>,
    pub http: Arc<HttpProxy>,
    pub carriers: Carriers,
}

impl Outbound {
    /// Handles one accepted connection to its end, and counts how it failed, if it did.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, client: SocketAddr) {
        if let Err(error) = self.proxy(stream, client).await {
            debug!(%client, %error, "outbound connection failed");
            self.metrics.error(error);
        }
    }

    async fn proxy(&self, stream: TcpStream, client: SocketAddr) -> Result<(), ConnError> {
        let mut conn = socket::accepted(stream, client, self.config.accept)?;
        let mut facts = Facts {
            orig_dst: conn.orig_dst,
            local: conn.local,
            opaque_port: self.config.opaque_ports.contains(conn.orig_dst.port()),
            discovered: None,
            detection: Detection::NotYet,
            settings: Settings {
                meshed: self.dialer.identity.is_some(),
                carrier: self.config.opaque_carrier,
            },
        };
        let mut prefix = Vec::new();
        let plan = loop {
            match plan::plan(&facts) {
                Step::Discover => {
                    let resolution = self.discovery.resolve(conn.orig_dst);
                    facts.discovered = Some(resolution.await_endpoint().await);
                }
                Step::Detect => {
                    let (outcome, read) =
                        detect::detect(&mut conn.stream, self.config.detect_timeout)
                            .await
                            .map_err(|error| {
                                debug!(%client, %error, "client failed during detection");
                                ConnError::Detect
                            })?;
                    self.metrics.detected(DetectResult::of(&outcome));
                    debug!(%client, ?outcome, "detected");
                    prefix = read;
                    facts.detection = Detection::Detected(match outcome {
                        Outcome::Detected(protocol) => protocol,
                        Outcome::Timeout => detect::Protocol::Unknown,
                    });
                }
                Step::SkipDetection => {
                    self.metrics.detected(DetectResult::Skipped);
                    facts.detection = Detection::Skipped;
                }
                Step::Go(plan) => break plan,
            }
        };
        let transport = &self.metrics.transport;
        let already_read = prefix.len();
        match plan {
            OutboundPlan::Refuse(error) => Err(error),
            OutboundPlan::Http { protocol, route } => {
                let client = self.downstream(conn, already_read);
                crate::http::serve_connection(&self.http, client, prefix, protocol, route).await
            }
            OutboundPlan::Tcp { target } => {
                let client = self.downstream(conn, already_read);
                let server = match self.dialer.connect(target).await {
                    Ok(server) => server,
                    Err(error) => return Err(client.refuse(error)),
                };
                let tls = TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery);
                let dst = transport.open(Peer::Dst, target, tls);
                forward::relay(client, &prefix, server, dst).await
            }
            OutboundPlan::MeshTls { target, peer } => {
                let client = self.downstream(conn, already_read);
                let server = match self.mesh_tls(target, &peer).await {
                    Ok(server) => server,
                    Err(error) => return Err(client.refuse(error)),
                };
                let dst = transport.open(Peer::Dst, target, established(&peer));
                forward::relay(client, &prefix, server, dst).await
            }
            OutboundPlan::Opaque {
                proxy,
                peer,
                port,
                via,
            } => {
                let client = self.downstream(conn, already_read);
                self.opaque(client, proxy, &peer, port, via).await
            }
        }
    }

    /// The accepted client, counted from here on; `already_read` bytes were read
    /// from it during detection.
    fn downstream(&self, conn: Accepted, already_read: usize) -> Downstream<TcpStream> {
        let tls = TlsStatus::NoIdentity(NoTlsReason::Loopback);
        let metrics = self.metrics.transport.open(Peer::Src, conn.orig_dst, tls);
        metrics.series().add_read(already_read);
        Downstream {
            stream: conn.stream,
            addr: conn.client,
            metrics,
        }
    }

    async fn mesh_tls(
        &self,
        target: SocketAddr,
        peer: &PeerId,
    ) -> Result<crate::mesh::MeshTls, ConnError> {
        let tcp = self.dialer.connect(target).await?;
        self.dialer.originate(tcp, peer, MeshAlpn::None).await
    }

    /// An opaque connection to the peer proxy at `proxy`, for its local `port`.
    async fn opaque(
        &self,
        client: Downstream<TcpStream>,
        proxy: SocketAddr,
        peer: &PeerId,
        port: u16,
        via: OpaqueVia,
    ) -> Result<(), ConnError> {
        let opened = match via {
            OpaqueVia::Header => {
                let tcp = self.dialer.connect(proxy).await;
                match tcp {
                    Ok(tcp) => self
                        .dialer
                        .originate(tcp, peer, MeshAlpn::TransportHeader)
                        .await
                        .map(|tls| Opened::Classic(Box::new(tls))),
                    Err(error) => Err(error),
                }
            }
            OpaqueVia::Carrier => self.carriers.open(&self.dialer, proxy, peer, port).await,
        };
        let dst = || {
            self.metrics
                .transport
                .open(Peer::Dst, proxy, established(peer))
        };
        match opened {
            Ok(Opened::Stream(stream)) => forward::relay(client, &[], stream, dst()).await,
            Ok(Opened::Classic(tls)) => {
                let header = TransportHeader {
                    port,
                    name: None,
                    protocol: None,
                };
                forward::relay(client, &header.encode(), *tls, dst()).await
            }
            Err(error) => Err(client.refuse(error)),
        }
    }

    /// Closes idle pooled connections and carriers on time, even when no request
    /// comes to notice.
    pub fn sweep(&self) {
        self.http.pools.sweep();
        self.carriers.sweep();
    }
}

fn established(peer: &PeerId) -> TlsStatus {
    TlsStatus::Established(Some(peer.identity.clone()))
}
