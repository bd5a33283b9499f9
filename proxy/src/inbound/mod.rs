//! Inbound: connections from the world to the application, redirected to us by the
//! pod's PREROUTING rules, and direct connections from other proxies.
//!
//! [`Inbound::serve`] is one connection's whole path: accept (original
//! destination), detect (unless the port is opaque), then what `plan.rs` decides:
//! pass the connection to the application as it came, refuse it, or terminate mesh
//! TLS for our name; after the handshake, serve a peer proxy's carrier
//! (`opaque/carrier.rs`), read the transport header that names the local port, or
//! detect the decrypted stream; and finally reach the application (the pod's
//! address and the app's port) request by request (`http/`) or as bytes. Its
//! failure is counted once, at the end.

pub mod plan;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

use self::plan::{
    AppPlan, Detection, Facts, InboundPlan, Meshed, MeshedPlan, Need, Negotiated, ServerTls, Step,
};
use crate::config::{DirectionConfig, PortSet};
use crate::discover::inbound_policy::{Client, PortProtocol};
use crate::discover::linkerd::inbound::InboundPolicies;
use crate::http::HttpProxy;
use crate::mesh::identity::LocalIdentity;
use crate::mesh::tls::{self, NoTlsReason, TlsStatus, CARRIER_ALPN, TRANSPORT_HEADER_ALPN};
use crate::mesh::transport_header::TransportHeader;
use crate::mesh::Dialer;
use crate::metrics::transport::Peer;
use crate::metrics::DirectionMetrics;
use crate::net::detect::{self, DetectResult, Outcome, Protocol};
use crate::net::error::{ConnError, Errno};
use crate::net::forward::{self, Downstream, Transport};
use crate::net::socket::{self, Accepted};
use crate::opaque::carrier;

/// Per-port requirements (`LINKERD2_PROXY_INBOUND_PORTS_REQUIRE_*`).
pub struct PortPolicy {
    pub require_identity: PortSet,
    pub require_tls: PortSet,
}

/// The inbound side: its settings, and what only it owns (the HTTP pools to the
/// application, the port policy, the carriers it accepts).
pub struct Inbound {
    pub config: DirectionConfig,
    pub metrics: Arc<DirectionMetrics>,
    pub identity: Option<Arc<LocalIdentity>>,
    pub policy: PortPolicy,
    /// Connects to the application.
    pub dialer: Arc<Dialer>,
    pub http: Arc<HttpProxy>,
    pub carriers: Arc<carrier::Acceptor>,
    /// The pod's addresses (`LINKERD2_PROXY_INBOUND_IPS`); when set, connections to
    /// any other address are refused.
    pub local_ips: Vec<std::net::IpAddr>,
    /// The ports' policies from Linkerd's policy controller, when there is one:
    /// which protocol a port speaks, and who may connect.
    pub policies: Option<Arc<InboundPolicies>>,
}

impl Inbound {
    /// Handles one accepted connection to its end, and counts how it failed, if it did.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, client: SocketAddr) {
        if let Err(error) = self.proxy(stream, client).await {
            debug!(%client, %error, "inbound connection failed");
            self.metrics.error(error);
        }
    }

    async fn proxy(&self, stream: TcpStream, client: SocketAddr) -> Result<(), ConnError> {
        let mut conn = socket::accepted(stream, client, self.config.accept)?;
        let port = conn.orig_dst.port();
        let mut facts = Facts {
            orig_dst: conn.orig_dst,
            local: conn.local,
            opaque_port: match &self.policies {
                // A direct connection names its port later, in its header. A `Tls`
                // port is detected like any other: the application's TLS passes
                // through, and mesh TLS for our name is still terminated.
                Some(policies) if port != conn.local.port() => {
                    policies.protocol(port) == PortProtocol::Opaque
                }
                _ => self.config.opaque_ports.contains(port),
            },
            foreign_ip: !self.local_ips.is_empty() && !self.local_ips.contains(&conn.orig_dst.ip()),
            require_tls: self.policy.require_tls.contains(port),
            require_identity: self.policy.require_identity.contains(port),
            server_name: self.identity.as_ref().map(|id| id.server_name.clone()),
            accept_carriers: self.config.opaque_carrier,
            detection: Detection::NotYet,
        };
        // The server-first window is waited out once, before the first detection of
        // a redirected connection (a direct one is a peer proxy's mesh TLS).
        let mut window = if port == conn.local.port() {
            std::time::Duration::ZERO
        } else {
            self.config.server_first_window
        };
        loop {
            let mut prefix = Vec::new();
            let plan = loop {
                let need = match plan::plan(&facts) {
                    Step::Go(plan) => break plan,
                    Step::Need(need) => need,
                };
                match need {
                    Need::Detect if !window.is_zero() => {
                        let window = std::mem::take(&mut window);
                        let silent = !detect::speaks_within(&conn.stream, window)
                            .await
                            .map_err(|_| ConnError::Detect)?;
                        if silent {
                            debug!(%client, "client silent; the application may speak first");
                            facts.detection = Detection::Silent;
                        }
                    }
                    Need::Detect => {
                        let protocol;
                        (protocol, prefix) = self.detect(&mut conn.stream, conn.client).await?;
                        facts.detection = Detection::Detected(protocol);
                    }
                    Need::SkipDetection => {
                        self.metrics.detected(DetectResult::Skipped);
                        facts.detection = Detection::Skipped;
                    }
                }
            };
            let already_read = prefix.len();
            // Each plan's future is boxed: the connection's own future is then only
            // as large as the steps before the plan (what a connection waiting for
            // its first bytes holds), not as its largest plan.
            return match plan {
                InboundPlan::Refuse { error, tls } => {
                    let client =
                        self.downstream(conn.stream, conn.client, conn.orig_dst, tls, already_read);
                    Err(client.refuse(error))
                }
                InboundPlan::PassThrough { protocol, tls } => {
                    let target = conn.orig_dst;
                    let client = self.downstream(
                        conn.stream,
                        conn.client,
                        target,
                        tls.clone(),
                        already_read,
                    );
                    Box::pin(self.to_app(client, prefix, protocol, target, tls)).await
                }
                InboundPlan::Terminate { with } => {
                    Box::pin(self.terminate(conn, prefix, with)).await
                }
                InboundPlan::ServerFirst { tls } => {
                    match Box::pin(self.app_first(&conn, &tls)).await {
                        Ok(Some((app, first))) => {
                            self.metrics.detected(DetectResult::ServerFirst);
                            let target = conn.orig_dst;
                            let client = self.downstream(conn.stream, conn.client, target, tls, 0);
                            let loopback = TlsStatus::NoIdentity(NoTlsReason::Loopback);
                            let dst = self.metrics.transport.open(Peer::Dst, target, loopback);
                            Box::pin(forward::relay_after_server(client, &first, app, dst)).await
                        }
                        // The client spoke first: it is detected as any client.
                        Ok(None) => {
                            facts.detection = Detection::NotYet;
                            continue;
                        }
                        Err(error) => {
                            let client =
                                self.downstream(conn.stream, conn.client, conn.orig_dst, tls, 0);
                            Err(client.refuse(error))
                        }
                    }
                }
            };
        }
    }

    /// For a silent client: connects to the application (when the port's policy
    /// admits the client) and waits for either side. `Some` with the application's
    /// first bytes when it spoke (or closed) first; `None` when the client did, and
    /// the application's connection is closed.
    async fn app_first(
        &self,
        conn: &Accepted,
        tls: &TlsStatus,
    ) -> Result<Option<(TcpStream, Vec<u8>)>, ConnError> {
        let target = conn.orig_dst;
        if let Some(policies) = &self.policies {
            let client = Client {
                ip: conn.client.ip(),
                tls: tls.clone(),
            };
            policies.authorize_tcp(target, &client)?;
        }
        let mut app = self.dialer.connect(target).await?;
        let spoke = detect::first_to_speak(&conn.stream, &mut app)
            .await
            .map_err(|e| ConnError::Io(Errno::of(&e)))?;
        Ok(spoke.map(|first| (app, first)))
    }

    /// Reads the client's first bytes: its protocol, and the bytes to replay.
    async fn detect<I: tokio::io::AsyncRead + Unpin>(
        &self,
        io: &mut I,
        client: SocketAddr,
    ) -> Result<(Protocol, Vec<u8>), ConnError> {
        let (outcome, prefix) = detect::detect(io, self.config.detect_timeout)
            .await
            .map_err(|error| {
                debug!(%client, %error, "client failed during detection");
                ConnError::Detect
            })?;
        self.metrics.detected(DetectResult::of(&outcome));
        debug!(%client, ?outcome, "detected");
        let protocol = match outcome {
            Outcome::Detected(protocol) => protocol,
            Outcome::Timeout => Protocol::Unknown,
        };
        Ok((protocol, prefix))
    }

    /// Terminates mesh TLS (its ClientHello is in `prefix`), then does what the
    /// client's identity and ALPN call for.
    async fn terminate(
        &self,
        conn: Accepted,
        prefix: Vec<u8>,
        with: ServerTls,
    ) -> Result<(), ConnError> {
        let configs = self
            .identity
            .as_ref()
            .map(|id| id.configs())
            .ok_or(ConnError::TlsHandshake(Errno::Other))?;
        let config = match with {
            ServerTls::Redirected => &configs.server,
            ServerTls::Direct => &configs.server_direct,
            ServerTls::DirectHeaderOnly => &configs.server_transport_header,
        };
        let Accepted {
            stream,
            client,
            orig_dst,
            local,
        } = conn;
        let handshake =
            crate::mesh::terminate(config.clone(), prefix, stream, self.config.detect_timeout);
        // The stream is boxed: it moves through several futures from here on, and
        // each would otherwise hold a copy of its size.
        let tls = Box::new(Box::pin(handshake).await?);
        let session = tls.get_ref().1;
        let client_id = tls::peer_identity(session.peer_certificates());
        let negotiated = match session.alpn_protocol() {
            Some(alpn) if alpn == CARRIER_ALPN => Negotiated::Carrier,
            Some(alpn) if alpn == TRANSPORT_HEADER_ALPN => Negotiated::TransportHeader,
            _ => Negotiated::Nothing,
        };
        debug!(%client, client_id = ?client_id, local = %configs.name, "meshed connection");
        let meshed = Meshed {
            direct: with != ServerTls::Redirected,
            client_id: client_id.clone(),
            negotiated,
            require_identity: self.policy.require_identity.contains(orig_dst.port()),
        };
        let established = TlsStatus::Established(client_id);
        let downstream = |stream, target, already_read| Downstream {
            stream,
            addr: client,
            metrics: self.counted(target, established.clone(), already_read),
        };
        match plan::plan_meshed(&meshed) {
            MeshedPlan::Refuse(error) => Err(downstream(tls, orig_dst, 0).refuse(error)),
            MeshedPlan::Carrier { client_id } => {
                Box::pin(carrier::accept(
                    &self.carriers,
                    tls,
                    client,
                    client_id,
                    orig_dst,
                ))
                .await
            }
            MeshedPlan::ReadHeader => {
                let mut tls = tls;
                let read = TransportHeader::read(&mut tls, self.config.detect_timeout).await;
                let (header, rest) = match read {
                    Ok(read) => read,
                    Err(error) => {
                        debug!(%client, %error, "bad transport header");
                        let error = ConnError::TransportHeader;
                        return Err(downstream(tls, orig_dst, 0).refuse(error));
                    }
                };
                match plan::header_target(&header, orig_dst, local) {
                    // Counted under the port the header names, as Linkerd counts it
                    // (and as carrier streams are).
                    Ok(target) => {
                        let client = downstream(tls, target, rest.len());
                        let protocol = plan::header_protocol(&header);
                        let to_app =
                            self.to_app(client, rest, protocol, target, established.clone());
                        Box::pin(to_app).await
                    }
                    Err(error) => Err(downstream(tls, orig_dst, 0).refuse(error)),
                }
            }
            MeshedPlan::Detect => {
                // The decrypted stream is detected like any other.
                let mut client = downstream(tls, orig_dst, 0);
                let (protocol, prefix) = self.detect(&mut client.stream, client.addr).await?;
                client.metrics.series().add_read(prefix.len());
                let to_app = self.to_app(client, prefix, protocol, orig_dst, established.clone());
                Box::pin(to_app).await
            }
        }
    }

    /// Hands a connection (plain, passed-through TLS, or decrypted mesh TLS) to the
    /// application: request by request when it is HTTP, else as bytes.
    async fn to_app<C: Transport + 'static>(
        &self,
        client: Downstream<C>,
        prefix: Vec<u8>,
        protocol: Protocol,
        target: SocketAddr,
        tls: TlsStatus,
    ) -> Result<(), ConnError> {
        let facts = || Client {
            ip: client.addr.ip(),
            tls: tls.clone(),
        };
        match plan::to_app(protocol, target, tls.clone()) {
            AppPlan::Http { protocol, route } => {
                let authz = self
                    .policies
                    .as_ref()
                    .map(|p| p.for_requests(target, facts()));
                // Boxed: the HTTP server's state is several times a byte stream's.
                let http = &self.http;
                Box::pin(crate::http::serve_connection(
                    http, client, prefix, protocol, route, authz,
                ))
                .await
            }
            AppPlan::Tcp { target } => {
                if let Some(policies) = &self.policies {
                    if let Err(error) = policies.authorize_tcp(target, &facts()) {
                        return Err(client.refuse(error));
                    }
                }
                let server = match self.dialer.connect(target).await {
                    Ok(server) => server,
                    Err(error) => return Err(client.refuse(error)),
                };
                let tls = TlsStatus::NoIdentity(NoTlsReason::Loopback);
                let dst = self.metrics.transport.open(Peer::Dst, target, tls);
                forward::relay(client, &prefix, server, dst).await
            }
        }
    }

    /// The accepted client, counted from here on as a connection to `target`.
    fn downstream(
        &self,
        stream: TcpStream,
        client: SocketAddr,
        target: SocketAddr,
        tls: TlsStatus,
        already_read: usize,
    ) -> Downstream<TcpStream> {
        Downstream {
            stream,
            addr: client,
            metrics: self.counted(target, tls, already_read),
        }
    }

    fn counted(
        &self,
        target: SocketAddr,
        tls: TlsStatus,
        already_read: usize,
    ) -> crate::metrics::transport::OpenConnection {
        let metrics = self.metrics.transport.open(Peer::Src, target, tls);
        metrics.series().add_read(already_read);
        metrics
    }

    /// Closes idle pooled connections to the application on time.
    pub fn sweep(&self) {
        self.http.pools.sweep();
    }
}
