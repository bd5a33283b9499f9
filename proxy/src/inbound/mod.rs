//! Inbound: connections from the world to the application, redirected to us by the
//! pod's PREROUTING rules, and direct connections from other proxies.
//!
//! accept → original destination → detect (unless opaque) → terminate mesh TLS when
//! the SNI is our identity (else pass TLS through untouched) → apply the port's policy
//! → connect to the original destination (the pod's address and the app's port) →
//! forward.
//!
//! A direct connection (one that dialled the inbound port itself, not redirected) is a
//! peer proxy sending opaque traffic: it must be mTLS with a client identity and
//! either a Tandem carrier (`tunnel.rs`: streams name the local ports) or the
//! transport-header ALPN (the header names the local port to connect to).

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::debug;

use crate::conn::{self, Context, Replay};
use crate::detect::Protocol;
use crate::http::{self, client::EndpointKey};
use crate::metrics::{ConnError, NoTlsReason, TlsStatus};
use crate::tcp::Transport;
use crate::transport_header::TransportHeader;

pub async fn handle(ctx: &Arc<Context>, stream: tokio::net::TcpStream, client: SocketAddr) {
    let Some(mut conn) = conn::accept(ctx, stream, client) else {
        return;
    };
    let direct = conn.orig_dst == conn.local;
    let port = conn.orig_dst.port();
    if ctx.config.opaque_ports.contains(port) && !direct {
        ctx.metrics.detected(crate::metrics::DetectResult::Skipped);
        let tls = TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote);
        let client = conn::client(ctx, conn.stream, conn.client, conn.orig_dst, tls, 0);
        return to_app(
            ctx,
            client,
            Vec::new(),
            Protocol::Unknown,
            conn.orig_dst,
            None,
        )
        .await;
    }
    let Some((protocol, prefix)) = conn::detect(ctx, &mut conn.stream, conn.client).await else {
        return;
    };
    let local = ctx.identity.as_ref().filter(
        |id| matches!(&protocol, Protocol::Tls { sni: Some(sni) } if **sni == *id.server_name),
    );
    let Some(local) = local else {
        let tls = match protocol {
            // The application's own TLS (or mesh TLS for another identity): untouched.
            Protocol::Tls { .. } => TlsStatus::Opaque,
            _ => TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote),
        };
        let client = conn::client(
            ctx,
            conn.stream,
            conn.client,
            conn.orig_dst,
            tls,
            prefix.len(),
        );
        if direct {
            debug!(client = %conn.client, "refusing a direct connection without mesh TLS");
            return client.refuse(ctx, ConnError::TransportHeader, "other");
        }
        if ctx.require_tls.contains(port) || ctx.require_identity.contains(port) {
            debug!(client = %conn.client, port, "refusing a connection without mTLS to a port that requires it");
            return client.refuse(ctx, ConnError::Unauthorized, "other");
        }
        return to_app(ctx, client, prefix, protocol, conn.orig_dst, None).await;
    };

    let configs = local.configs();
    let config = if direct && ctx.config.opaque_carrier {
        configs.server_direct.clone()
    } else if direct {
        configs.server_transport_header.clone()
    } else {
        configs.server.clone()
    };
    let handshake =
        tokio_rustls::TlsAcceptor::from(config).accept(Replay::under_tls(prefix, conn.stream));
    let tls = match tokio::time::timeout(ctx.config.detect_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            debug!(client = %conn.client, %error, "mesh TLS handshake failed");
            ctx.metrics.error(ConnError::TlsHandshake);
            return;
        }
        Err(_) => {
            debug!(client = %conn.client, "mesh TLS handshake timed out");
            ctx.metrics.error(ConnError::TlsHandshake);
            return;
        }
    };
    let session = tls.get_ref().1;
    let client_id = crate::tls::peer_identity(session.peer_certificates());
    let negotiated_header = session.alpn_protocol() == Some(crate::transport_header::ALPN);
    let negotiated_carrier = session.alpn_protocol() == Some(crate::tunnel::ALPN);
    debug!(client = %conn.client, client_id = ?client_id, local = %configs.name, "meshed connection");
    if direct && negotiated_carrier {
        let Some(client_id) = client_id else {
            debug!(client = %conn.client, "refusing a carrier without a client identity");
            ctx.metrics.error(ConnError::TransportHeader);
            let mut tls = tls;
            return tls.reset_on_close();
        };
        return crate::tunnel::serve(ctx, tls, conn.client, client_id, conn.orig_dst).await;
    }
    let tls_status = TlsStatus::Established(client_id.clone());
    let mut client = conn::client(ctx, tls, conn.client, conn.orig_dst, tls_status, 0);

    if direct {
        // Direct connections must be mutually authenticated and carry a header.
        if client_id.is_none() || !negotiated_header {
            debug!(client = %conn.client, "refusing a direct connection without a client identity and transport header");
            return client.refuse(ctx, ConnError::TransportHeader, "other");
        }
        let header = match TransportHeader::read(&mut client.stream, ctx.config.detect_timeout)
            .await
        {
            Ok((header, _)) if header.name.is_some() => {
                debug!(client = %conn.client, name = ?header.name, "gateway forwarding is not supported");
                return client.refuse(ctx, ConnError::TransportHeader, "other");
            }
            Ok(header) => header,
            Err(error) => {
                debug!(client = %conn.client, %error, "bad transport header");
                return client.refuse(ctx, ConnError::TransportHeader, "other");
            }
        };
        let (header, rest) = header;
        client.metrics.series().add_read(rest.len());
        let target = SocketAddr::new(conn.orig_dst.ip(), header.port);
        if target.port() == conn.local.port() {
            return client.refuse(ctx, ConnError::Loop, "other");
        }
        return to_app(ctx, client, rest, Protocol::Unknown, target, None).await;
    }
    if ctx.require_identity.contains(port) && client_id.is_none() {
        debug!(client = %conn.client, port, "refusing an mTLS connection without a client identity");
        return client.refuse(ctx, ConnError::Unauthorized, "other");
    }
    // The decrypted stream is detected like any other.
    let Some((protocol, prefix)) = conn::detect(ctx, &mut client.stream, conn.client).await else {
        return;
    };
    client.metrics.series().add_read(prefix.len());
    let tls = TlsStatus::Established(client_id);
    to_app(ctx, client, prefix, protocol, conn.orig_dst, Some(tls)).await;
}

/// Forwards a connection (plain, passed-through TLS, or decrypted mesh TLS) to the
/// local application: request by request when it is HTTP, else as bytes. `mesh` is
/// the mesh TLS status of a decrypted connection.
async fn to_app<C: Transport + 'static>(
    ctx: &Arc<Context>,
    client: conn::Client<C>,
    prefix: Vec<u8>,
    protocol: Protocol,
    target: SocketAddr,
    mesh: Option<TlsStatus>,
) {
    if matches!(protocol, Protocol::Http1 | Protocol::Http2) {
        let client_id = match &mesh {
            Some(TlsStatus::Established(id)) => id.clone(),
            _ => None,
        };
        let route = http::Route {
            endpoint: EndpointKey {
                target,
                identity: None,
                server_name: None,
                http1_case: protocol == Protocol::Http1,
            },
            side: http::Side::Inbound { client_id },
            tls: mesh.unwrap_or(TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote)),
        };
        return http::serve(ctx, client, prefix, protocol, route).await;
    }
    let Some((client, server)) = conn::connect(ctx, client, target).await else {
        return;
    };
    let tls = TlsStatus::NoIdentity(NoTlsReason::Loopback);
    conn::relay(ctx, client, &prefix, server, target, tls).await;
}
