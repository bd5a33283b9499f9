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

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

use self::plan::{Detection, Dial, Facts, Need, OpaqueVia, OutboundPlan, Settings, Step};
use crate::config::DirectionConfig;
use crate::discover::balance::Picked;
use crate::discover::{Backend, Discover, Endpoint};
use crate::http::HttpProxy;
use crate::mesh::tls::{NoTlsReason, TlsStatus};
use crate::mesh::transport_header::TransportHeader;
use crate::mesh::{Dialed, Dialer, MeshAlpn, PeerId};
use crate::metrics::transport::{OpenConnection, Peer};
use crate::metrics::DirectionMetrics;
use crate::net::detect::{self, DetectResult, Outcome};
use crate::net::error::{ConnError, Errno};
use crate::net::forward::{self, Downstream};
use crate::net::socket::{self, Accepted};
use crate::opaque::carrier::{self, Carriers, Opened};

/// The outbound side: its settings, and what only it owns (the HTTP pools to
/// destinations, the carriers to peer proxies).
pub struct Outbound {
    pub config: DirectionConfig,
    pub metrics: Arc<DirectionMetrics>,
    pub discovery: Arc<dyn Discover>,
    pub dialer: Arc<Dialer>,
    pub http: Arc<HttpProxy>,
    pub carriers: Carriers,
    /// How long, and how many, connections wait for a balanced destination's endpoint.
    pub tcp_queue: crate::config::Queue,
    /// The pod's own addresses (`LINKERD2_PROXY_INBOUND_IPS`): never meshed.
    pub local_ips: Vec<IpAddr>,
}

/// How many endpoints a connection tries when their connections fail.
const ATTEMPTS: usize = 3;

/// A connection opened to an endpoint, with the bytes to send before the client's.
enum Upstream {
    Dialed(Dialed, Vec<u8>),
    Carried(carrier::Stream),
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
            local_ip: self.local_ips.contains(&conn.orig_dst.ip()),
            discovered: None,
            detection: Detection::NotYet,
            settings: self.settings(),
        };
        // The server-first window is waited out once per connection, before the
        // first detection.
        let mut window = self.config.server_first_window;
        loop {
            let mut prefix = Vec::new();
            let plan = loop {
                let need = match plan::plan(&facts) {
                    Step::Go(plan) => break plan,
                    Step::Need(need) => need,
                };
                match need {
                    Need::Discover => {
                        let resolution = self.discovery.resolve(conn.orig_dst);
                        facts.discovered = Some(resolution.resolved().await);
                    }
                    Need::Detect if !window.is_zero() => {
                        let window = std::mem::take(&mut window);
                        let silent = !detect::speaks_within(&conn.stream, window)
                            .await
                            .map_err(|_| ConnError::Detect)?;
                        if silent {
                            debug!(%client, "client silent; the server may speak first");
                            facts.detection = Detection::Silent;
                        }
                    }
                    Need::Detect => {
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
                    Need::SkipDetection => {
                        self.metrics.detected(DetectResult::Skipped);
                        facts.detection = Detection::Skipped;
                    }
                }
            };
            let already_read = prefix.len();
            return match plan {
                OutboundPlan::Refuse(error) => {
                    // A reset, so the client learns it was refused (not a clean end).
                    socket::reset_on_close(&conn.stream);
                    Err(error)
                }
                // Each plan's future is boxed: the connection's own future is then
                // only as large as the steps before the plan (what a connection
                // waiting for its first bytes holds), not as its largest plan.
                OutboundPlan::Http { protocol, route } => {
                    let client = self.downstream(conn, already_read);
                    let http = &self.http;
                    Box::pin(crate::http::serve_connection(
                        http, client, prefix, protocol, route, None,
                    ))
                    .await
                }
                OutboundPlan::Tcp { backend, opaque } => {
                    let client = self.downstream(conn, already_read);
                    Box::pin(self.tcp(client, prefix, backend, opaque)).await
                }
                OutboundPlan::ServerFirst { backend } => {
                    match Box::pin(self.server_first(&conn.stream, &backend)).await {
                        Ok(Some(spoke)) => {
                            self.metrics.detected(DetectResult::ServerFirst);
                            let client = self.downstream(conn, 0);
                            Box::pin(spoke.relay(client)).await
                        }
                        // The client spoke first: it is detected as any client.
                        Ok(None) => {
                            facts.detection = Detection::NotYet;
                            continue;
                        }
                        Err(error) => {
                            let client = self.downstream(conn, 0);
                            Err(client.refuse(error))
                        }
                    }
                }
            };
        }
    }

    /// Opens the way to an endpoint of `backend` for a silent client, as for an
    /// opaque destination, and waits for either side: `Some` when the server spoke
    /// (or closed) first, with its first bytes; `None` when the client did, and the
    /// opened connection is dropped.
    async fn server_first(
        &self,
        client: &TcpStream,
        backend: &Backend,
    ) -> Result<Option<ServerSpoke>, ConnError> {
        let (endpoint, picked) = match backend {
            Backend::Refused(_) => return Err(ConnError::Forbidden),
            Backend::Forward(endpoint) => (endpoint.clone(), None),
            Backend::Balance(balancer) => {
                let picked = balancer
                    .pick(self.tcp_queue)
                    .await
                    .map_err(|error| {
                        debug!(?error, "no endpoint is ready");
                        ConnError::Unavailable
                    })?
                    .without_accrual();
                (picked.member.endpoint.clone(), Some(picked))
            }
        };
        let (upstream, dst) = match Box::pin(self.open(&endpoint, true)).await {
            Ok(opened) => opened,
            Err(error) => {
                if let (Some(picked), Backend::Balance(balancer)) = (&picked, backend) {
                    if endpoint_failed(error) {
                        balancer.failed(&picked.member);
                    }
                }
                return Err(error);
            }
        };
        let mut upstream = match upstream {
            Upstream::Dialed(mut server, header) => {
                // The header goes now, so that the peer proxy reaches its application.
                use tokio::io::AsyncWriteExt;
                let written = async {
                    server.write_all(&header).await?;
                    server.flush().await
                };
                written.await.map_err(|e| ConnError::Io(Errno::of(&e)))?;
                dst.series().add_write(header.len());
                Upstream::Dialed(server, Vec::new())
            }
            carried => carried,
        };
        let spoke = match &mut upstream {
            Upstream::Dialed(server, _) => detect::first_to_speak(client, server).await,
            Upstream::Carried(stream) => detect::first_to_speak(client, stream).await,
        };
        let Some(first) = spoke.map_err(|e| ConnError::Io(Errno::of(&e)))? else {
            debug!("the client spoke first; back to detection");
            return Ok(None);
        };
        Ok(Some(ServerSpoke {
            upstream,
            dst,
            first,
            _picked: picked,
        }))
    }

    fn settings(&self) -> Settings {
        Settings {
            meshed: self.dialer.identity.is_some(),
            carrier: self.config.opaque_carrier,
        }
    }

    /// Carries a byte stream to an endpoint of `backend`. With a balancer, an
    /// endpoint whose connection fails is backed off and another is tried: the
    /// client's bytes have not gone anywhere yet.
    async fn tcp(
        &self,
        client: Downstream<TcpStream>,
        prefix: Vec<u8>,
        backend: Backend,
        opaque: bool,
    ) -> Result<(), ConnError> {
        let balancer = match backend {
            Backend::Refused(_) => return Err(client.refuse(ConnError::Forbidden)),
            Backend::Forward(endpoint) => {
                return match Box::pin(self.open(&endpoint, opaque)).await {
                    Ok((upstream, dst)) => relay(client, prefix, upstream, dst).await,
                    Err(error) => Err(client.refuse(error)),
                };
            }
            Backend::Balance(balancer) => balancer,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let picked: Picked = match balancer.pick(self.tcp_queue).await {
                Ok(picked) => picked.without_accrual(),
                Err(error) => {
                    debug!(?error, "no endpoint is ready");
                    return Err(client.refuse(ConnError::Unavailable));
                }
            };
            match Box::pin(self.open(&picked.member.endpoint, opaque)).await {
                Ok((upstream, dst)) => {
                    picked.member.succeeded();
                    // Held in flight while the connection lasts: its load.
                    let result = relay(client, prefix, upstream, dst).await;
                    drop(picked);
                    return result;
                }
                Err(error) if endpoint_failed(error) && attempt < ATTEMPTS => {
                    debug!(endpoint = %picked.member.endpoint.addr, %error, "endpoint failed; trying another");
                    balancer.failed(&picked.member);
                }
                Err(error) => {
                    if endpoint_failed(error) {
                        balancer.failed(&picked.member);
                    }
                    return Err(client.refuse(error));
                }
            }
        }
    }

    /// Opens the way to `endpoint` as [`plan::dial`] says, with the series its
    /// side of the connection is counted in. Callers box it: a connect and a
    /// handshake are several times the size of the forwarding that follows.
    async fn open(
        &self,
        endpoint: &Endpoint,
        opaque: bool,
    ) -> Result<(Upstream, OpenConnection), ConnError> {
        let transport = &self.metrics.transport;
        let count = |addr, tls| transport.open_labelled(Peer::Dst, addr, tls, &endpoint.labels);
        match plan::dial(endpoint, opaque, self.settings()) {
            Dial::Plain { addr } => {
                let server = self.dialer.connect(addr).await?;
                let tls = TlsStatus::NoIdentity(NoTlsReason::NotProvidedByServiceDiscovery);
                Ok((
                    Upstream::Dialed(Dialed::Plain(server), Vec::new()),
                    count(addr, tls),
                ))
            }
            Dial::MeshTls { addr, peer } => {
                let tcp = self.dialer.connect(addr).await?;
                let tls = self.dialer.originate(tcp, &peer, MeshAlpn::None).await?;
                let upstream = Upstream::Dialed(Dialed::Tls(Box::new(tls)), Vec::new());
                Ok((upstream, count(addr, established(&peer))))
            }
            Dial::Opaque {
                proxy,
                peer,
                port,
                via,
            } => {
                let opened = match via {
                    OpaqueVia::Header => {
                        let tcp = self.dialer.connect(proxy).await?;
                        let tls = self
                            .dialer
                            .originate(tcp, &peer, MeshAlpn::TransportHeader)
                            .await?;
                        Opened::Classic(Box::new(tls))
                    }
                    OpaqueVia::Carrier => {
                        self.carriers.open(&self.dialer, proxy, &peer, port).await?
                    }
                };
                let upstream = match opened {
                    Opened::Stream(stream) => Upstream::Carried(stream),
                    Opened::Classic(tls) => {
                        let header = TransportHeader {
                            port,
                            name: None,
                            protocol: None,
                        };
                        Upstream::Dialed(Dialed::Tls(tls), header.encode())
                    }
                };
                Ok((upstream, count(proxy, established(&peer))))
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

    /// Closes idle pooled connections and carriers on time, even when no request
    /// comes to notice.
    pub fn sweep(&self) {
        self.http.pools.sweep();
        self.carriers.sweep();
    }
}

/// Forwards the client to an opened upstream: what must precede the client's bytes
/// (a transport header) first, then what detection read.
/// A connection whose server spoke first: its first bytes, and the way to it.
struct ServerSpoke {
    upstream: Upstream,
    dst: OpenConnection,
    first: Vec<u8>,
    /// The balanced endpoint, held in flight while the connection lasts.
    _picked: Option<Picked>,
}

impl ServerSpoke {
    /// Hands the server's first bytes to the client, then forwards both ways (the
    /// transport header, if any, went before the race).
    async fn relay(self, client: Downstream<TcpStream>) -> Result<(), ConnError> {
        match self.upstream {
            Upstream::Carried(stream) => {
                forward::relay_after_server(client, &self.first, stream, self.dst).await
            }
            Upstream::Dialed(server, _) => {
                forward::relay_after_server(client, &self.first, server, self.dst).await
            }
        }
    }
}

async fn relay(
    client: Downstream<TcpStream>,
    prefix: Vec<u8>,
    upstream: Upstream,
    dst: OpenConnection,
) -> Result<(), ConnError> {
    match upstream {
        Upstream::Carried(stream) => forward::relay(client, &prefix, stream, dst).await,
        Upstream::Dialed(server, mut first) => {
            first.extend_from_slice(&prefix);
            forward::relay(client, &first, server, dst).await
        }
    }
}

/// A failure that says the endpoint is not taking connections now, so it is backed
/// off and another one may do.
fn endpoint_failed(error: ConnError) -> bool {
    matches!(
        error,
        ConnError::ConnectRefused
            | ConnError::ConnectTimeout
            | ConnError::Connect(_)
            | ConnError::TlsHandshake(_)
    )
}

fn established(peer: &PeerId) -> TlsStatus {
    TlsStatus::Established(Some(peer.identity.clone()))
}
