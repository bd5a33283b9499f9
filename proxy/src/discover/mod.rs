//! Discovery: what the proxy knows about a destination before connecting to it.
//!
//! For each original destination the outbound side asks [`Discover::resolve`] whether
//! the peer is meshed (and with which identity), whether the port is opaque, and
//! whether the peer proxy accepts HTTP/2. Unknown destinations are unmeshed: forwarded
//! as plain TCP, as Linkerd does for destinations its control plane does not know.
//!
//! The first source is a file (`TANDEM_DISCOVERY_FILE`, [`file`]), reloaded when it changes. A
//! control-plane client (Linkerd's Destination/Policy APIs) implements the same trait:
//! it answers from its cache with [`Resolution::Known`], or with
//! [`Resolution::Pending`] while it asks the control plane, so the file source never
//! pays for a future it does not need.

pub mod file;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

/// What discovery knows about one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The peer proxy's identity (e.g. `web.ns.serviceaccount.identity.linkerd.cluster.local`);
    /// `None` means the destination is not meshed.
    pub identity: Option<Arc<str>>,
    /// The name to send in SNI when meshed: the identity itself when it is a DNS
    /// name; for a SPIFFE ID, the peer's `LINKERD2_PROXY_IDENTITY_SERVER_NAME`.
    pub server_name: Option<Arc<str>>,
    /// Skip protocol detection and carry the bytes opaquely (with the transport header
    /// when meshed).
    pub opaque: bool,
    /// The peer proxy accepts HTTP/2 (for multiplexing HTTP/1 between proxies).
    pub http2: bool,
    /// The peer proxy's inbound port, for opaque traffic sent with a transport header.
    pub inbound_port: u16,
}

/// The answer to a lookup: known now, or once the source has asked elsewhere.
pub enum Resolution<'a> {
    Known(Option<Arc<Endpoint>>),
    Pending(Pin<Box<dyn Future<Output = Option<Arc<Endpoint>>> + Send + 'a>>),
}

impl Resolution<'_> {
    pub async fn await_endpoint(self) -> Option<Arc<Endpoint>> {
        match self {
            Resolution::Known(endpoint) => endpoint,
            Resolution::Pending(lookup) => lookup.await,
        }
    }
}

/// A source of discovery information.
pub trait Discover: Send + Sync + 'static {
    fn resolve(&self, target: SocketAddr) -> Resolution<'_>;
}

/// No discovery configured: every destination is unmeshed.
pub struct NoDiscovery;

impl Discover for NoDiscovery {
    fn resolve(&self, _target: SocketAddr) -> Resolution<'_> {
        Resolution::Known(None)
    }
}
