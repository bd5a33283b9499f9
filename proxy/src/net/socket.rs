//! Everything that touches sockets: listeners, accepting with `SO_ORIGINAL_DST`,
//! socket options, connecting with a timeout, and resetting a connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::error::ConnError;
use crate::config::SocketOptions;

/// Binds a listener the way a sidecar needs: address reuse so a restarted proxy can
/// bind while old connections sit in TIME_WAIT, and a dual-stack socket for `[::]`.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Where the client meant to go before iptables/nftables redirected it to us.
///
/// The kernel also answers for connections that were never redirected (it returns the
/// local address), so callers compare the result with the listener's address to spot
/// direct connections and loops.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let is_v4 = match local.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(ip) => ip.to_ipv4_mapped().is_some(),
    };
    let addr = if is_v4 {
        sock.original_dst()?
    } else {
        sock.original_dst_ipv6()?
    };
    addr.as_socket()
        .map(unmap)
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST returned a non-IP address"))
}

/// Dual-stack listeners report IPv4 peers as `::ffff:a.b.c.d`; metrics, logs and
/// connects should see the plain IPv4 address.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Options for every socket the proxy accepts or opens: no Nagle delay (the proxy
/// must not add latency to small writes), then the configured keepalive and user
/// timeout.
pub fn set_options(stream: &TcpStream, options: SocketOptions) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = SockRef::from(stream);
    if let Some(idle) = options.keepalive {
        socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))?;
    }
    if let Some(timeout) = options.user_timeout {
        socket.set_tcp_user_timeout(Some(timeout))?;
    }
    Ok(())
}

/// Connects to `addr` within `timeout` and sets `options` on the new socket.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    options: SocketOptions,
) -> Result<TcpStream, ConnError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnError::ConnectTimeout),
        Ok(Err(e)) => return Err(ConnError::connect(&e)),
        Ok(Ok(stream)) => stream,
    };
    set_options(&stream, options).map_err(|e| ConnError::connect(&e))?;
    Ok(stream)
}

/// A socket just accepted, and where it was going.
pub struct Accepted {
    pub stream: TcpStream,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    /// The listener's address: an original destination equal to it was never redirected.
    pub local: SocketAddr,
}

/// Sets `options` on a freshly accepted socket and reads its original destination.
pub fn accepted(
    stream: TcpStream,
    client: SocketAddr,
    options: SocketOptions,
) -> Result<Accepted, ConnError> {
    if let Err(error) = set_options(&stream, options) {
        tracing::debug!(%client, %error, "cannot set socket options");
    }
    let addrs = stream
        .local_addr()
        .and_then(|local| Ok((local, original_dst(&stream)?)));
    match addrs {
        Ok((local, orig_dst)) => Ok(Accepted {
            stream,
            client: unmap(client),
            orig_dst,
            local: unmap(local),
        }),
        Err(error) => {
            tracing::warn!(%client, %error, "no original destination; closing the connection");
            Err(ConnError::OrigDst)
        }
    }
}

/// Makes the next close send RST instead of FIN, so a failure on one side of a
/// forwarded connection reaches the other side as a failure, not as a clean end.
pub fn reset_on_close(stream: &TcpStream) {
    // Ignoring the error is right: the socket may already be dead, and then there is
    // nothing left to reset.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// A second handle on a connection's socket, kept beside a protocol stack that owns
/// the stream and gives no access to it (h2), so the connection can still be made to
/// end with RST. The socket closes when both handles are gone.
pub struct ResetHandle(std::os::fd::OwnedFd);

impl ResetHandle {
    /// Duplicates `stream`'s descriptor (close-on-exec); fails only when the process
    /// is out of descriptors.
    pub fn of(stream: &TcpStream) -> io::Result<ResetHandle> {
        use std::os::fd::AsFd;
        stream.as_fd().try_clone_to_owned().map(ResetHandle)
    }

    /// The close (once the stack has dropped its handle too) sends RST: a peer that
    /// stopped answering gets no FIN that its kernel would retransmit for minutes.
    pub fn reset_on_close(&self) {
        // As in `reset_on_close`: a dead socket has nothing left to reset.
        let _ = SockRef::from(&self.0).set_linger(Some(Duration::ZERO));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn options_reach_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let options = SocketOptions {
            keepalive: Some(Duration::from_secs(7)),
            user_timeout: Some(Duration::from_millis(30_500)),
        };
        let stream = connect(
            listener.local_addr().unwrap(),
            Duration::from_secs(5),
            options,
        )
        .await
        .unwrap();
        let socket = SockRef::from(&stream);
        assert!(stream.nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(30_500))
        );

        let plain = connect(
            listener.local_addr().unwrap(),
            Duration::from_secs(5),
            SocketOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(SockRef::from(&plain).tcp_user_timeout().unwrap(), None);
    }
}
