//! Mutual TLS between proxies: dialling a peer (connect, then originate mesh TLS and
//! check the peer's identity) and terminating mesh TLS on the inbound side.
//!
//! The proxy's own identity and its rustls configurations live in [`identity`] and
//! [`tls`]; this module is the two handshakes every meshed connection starts with.
//! A meshed destination is never reached in plaintext: any failure here is an error,
//! never a fallback.

pub mod identity;
pub mod tls;
pub mod transport_header;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use self::identity::LocalIdentity;
use self::tls::{TlsStatus, CARRIER_ALPN, TRANSPORT_HEADER_ALPN};
use crate::config::SocketOptions;
use crate::net::error::{ConnError, Errno};
use crate::net::forward::Transport;
use crate::net::replay::Replay;
use crate::net::socket;

/// A meshed connection this proxy opened.
pub type MeshTls = tokio_rustls::client::TlsStream<Replay<TcpStream>>;

/// A meshed connection this proxy accepted.
pub type AcceptedTls = tokio_rustls::server::TlsStream<Replay<TcpStream>>;

/// What a meshed connection negotiates by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshAlpn {
    /// Nothing: the peer's inbound detects what follows.
    None,
    /// Linkerd's transport header, which the peer must accept.
    TransportHeader,
    /// A Tandem carrier, or else the transport header (`opaque/carrier.rs`).
    CarrierOrHeader,
}

/// Who a meshed connection must reach: the identity the peer must prove and the
/// name to ask for in SNI.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PeerId {
    pub identity: Arc<str>,
    pub sni: Arc<str>,
}

/// Opens connections for one direction: TCP with its timeout and socket options, and
/// mesh TLS with the proxy's identity.
pub struct Dialer {
    pub identity: Option<Arc<LocalIdentity>>,
    pub connect_timeout: Duration,
    /// Bounds a TLS handshake (the larger of the connect and detect timeouts).
    pub handshake_timeout: Duration,
    pub options: SocketOptions,
}

impl Dialer {
    /// A TCP connection to `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, ConnError> {
        socket::connect(addr, self.connect_timeout, self.options)
            .await
            .inspect_err(|error| debug!(%addr, %error, "cannot connect"))
    }

    /// Originates mesh TLS on `tcp` towards a peer that must prove `peer.identity`,
    /// negotiating `alpn`. On failure the socket is reset.
    pub async fn originate(
        &self,
        tcp: TcpStream,
        peer: &PeerId,
        alpn: MeshAlpn,
    ) -> Result<MeshTls, ConnError> {
        let Some(local) = &self.identity else {
            return Err(ConnError::TlsHandshake(Errno::Other));
        };
        let configs = local.configs();
        let config = match alpn {
            MeshAlpn::None => &configs.client,
            MeshAlpn::TransportHeader => &configs.client_transport_header,
            MeshAlpn::CarrierOrHeader => &configs.client_tunnel,
        };
        let Ok(server_name) = ServerName::try_from(peer.sni.to_string()) else {
            debug!(identity = %peer.identity, sni = %peer.sni, "not a valid TLS server name");
            return Err(ConnError::PeerIdentity);
        };
        let handshake = tokio_rustls::TlsConnector::from(config.clone())
            .connect(server_name, Replay::under_tls(Vec::new(), tcp));
        let tls = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                debug!(identity = %peer.identity, %error, "mesh TLS handshake failed");
                return Err(ConnError::TlsHandshake(Errno::of(&error)));
            }
            Err(_) => {
                debug!(identity = %peer.identity, "mesh TLS handshake timed out");
                return Err(ConnError::TlsHandshake(Errno::TimedOut));
            }
        };
        let session = tls.get_ref().1;
        if !tls::names(session.peer_certificates(), &peer.identity) {
            debug!(expected = %peer.identity, found = ?tls::peer_identity(session.peer_certificates()), "peer identity mismatch");
            socket::reset_on_close(tls.get_ref().0.get_ref());
            return Err(ConnError::PeerIdentity);
        }
        if !alpn_accepted(alpn, session.alpn_protocol()) {
            debug!(identity = %peer.identity, "the peer did not accept the transport header");
            socket::reset_on_close(tls.get_ref().0.get_ref());
            return Err(ConnError::TransportHeader);
        }
        debug!(local = %configs.name, server = %peer.identity, "meshed connection");
        Ok(tls)
    }

    /// A connection to `addr`: mesh TLS to `peer` when there is one, else plain TCP.
    /// Returns it with the `tls` label its transport series gets.
    pub async fn dial(
        &self,
        addr: SocketAddr,
        peer: Option<&PeerId>,
        plain: TlsStatus,
    ) -> Result<(Dialed, TlsStatus), ConnError> {
        let tcp = self.connect(addr).await?;
        match peer {
            Some(peer) => {
                let tls = self.originate(tcp, peer, MeshAlpn::None).await?;
                let status = TlsStatus::Established(Some(peer.identity.clone()));
                Ok((Dialed::Tls(Box::new(tls)), status))
            }
            None => Ok((Dialed::Plain(tcp), plain)),
        }
    }
}

impl Dialer {
    /// Connects to a peer proxy's inbound port at `proxy`, originates mesh TLS with
    /// the transport header's ALPN, and writes `header` (encoded) first: the
    /// connection then carries what the header says, to the port it names.
    pub async fn dial_with_header(
        &self,
        proxy: SocketAddr,
        peer: &PeerId,
        header: &[u8],
    ) -> Result<(Dialed, TlsStatus), ConnError> {
        let tcp = self.connect(proxy).await?;
        let mut tls = self.originate(tcp, peer, MeshAlpn::TransportHeader).await?;
        tokio::io::AsyncWriteExt::write_all(&mut tls, header)
            .await
            .map_err(|e| ConnError::Io(Errno::of(&e)))?;
        let status = TlsStatus::Established(Some(peer.identity.clone()));
        Ok((Dialed::Tls(Box::new(tls)), status))
    }
}

/// Whether the peer agreed to what a connection asked for by ALPN.
fn alpn_accepted(asked: MeshAlpn, negotiated: Option<&[u8]>) -> bool {
    match asked {
        MeshAlpn::None => true,
        MeshAlpn::TransportHeader => negotiated == Some(TRANSPORT_HEADER_ALPN),
        MeshAlpn::CarrierOrHeader => {
            negotiated == Some(TRANSPORT_HEADER_ALPN) || negotiated == Some(CARRIER_ALPN)
        }
    }
}

/// Terminates mesh TLS on an accepted connection whose ClientHello detection already
/// read (`prefix`), within `timeout`.
pub async fn terminate(
    config: Arc<rustls::ServerConfig>,
    prefix: Vec<u8>,
    stream: TcpStream,
    timeout: Duration,
) -> Result<AcceptedTls, ConnError> {
    let handshake =
        tokio_rustls::TlsAcceptor::from(config).accept(Replay::under_tls(prefix, stream));
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(error)) => {
            debug!(%error, "mesh TLS handshake failed");
            Err(ConnError::TlsHandshake(Errno::of(&error)))
        }
        Err(_) => {
            debug!("mesh TLS handshake timed out");
            Err(ConnError::TlsHandshake(Errno::TimedOut))
        }
    }
}

/// A connection the proxy dialled: plain TCP, or mesh TLS over TCP.
pub enum Dialed {
    Plain(TcpStream),
    Tls(Box<MeshTls>),
}

impl AsyncRead for Dialed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Dialed::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Dialed::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Dialed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Dialed::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Dialed::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    // Forwarded so that hyper and h2 gather a frame head and its body into one
    // write (see `Replay`).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Dialed::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Dialed::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Dialed::Plain(s) => s.is_write_vectored(),
            Dialed::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Dialed::Plain(s) => Pin::new(s).poll_flush(cx),
            Dialed::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Dialed::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Dialed::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Transport for Dialed {
    fn reset_on_close(&mut self) {
        match self {
            Dialed::Plain(s) => s.reset_on_close(),
            Dialed::Tls(s) => s.reset_on_close(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_each_alpn_request_accepts() {
        let header = Some(TRANSPORT_HEADER_ALPN);
        let carrier = Some(CARRIER_ALPN);
        let table: [(MeshAlpn, Option<&[u8]>, bool); 7] = [
            (MeshAlpn::None, None, true),
            (MeshAlpn::None, header, true),
            (MeshAlpn::TransportHeader, header, true),
            (MeshAlpn::TransportHeader, None, false),
            (MeshAlpn::TransportHeader, carrier, false),
            (MeshAlpn::CarrierOrHeader, carrier, true),
            (MeshAlpn::CarrierOrHeader, None, false),
        ];
        for (asked, negotiated, accepted) in table {
            assert_eq!(
                alpn_accepted(asked, negotiated),
                accepted,
                "{asked:?} {negotiated:?}"
            );
        }
    }
}
