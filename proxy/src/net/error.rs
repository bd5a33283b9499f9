//! Why a connection failed: the one error type every step of a connection returns.
//!
//! A step that fails returns a [`ConnError`] and does nothing else; the function that
//! owns the connection counts it once, where the connection ends
//! (`inbound_tcp_errors_total{error}` or the outbound twin, Linkerd's family names),
//! and the socket it closes records the errno in `tcp_close_total`. A new failure
//! mode is one variant here and one label, not one more place that counts.

use std::io;

/// Why the proxy gave up on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnError {
    /// The original destination is the proxy itself; forwarding would loop.
    Loop,
    /// The kernel had no original destination for the socket.
    OrigDst,
    ConnectRefused,
    ConnectTimeout,
    /// Any other failure to connect (unreachable, no route, …).
    Connect(Errno),
    /// Reading the client's first bytes failed.
    Detect,
    /// A stream failed while it was carried (reset, broken pipe).
    Io(Errno),
    /// Mesh TLS could not be established (either side).
    TlsHandshake(Errno),
    /// The peer's certificate does not name the identity discovery expected.
    PeerIdentity,
    /// A direct connection without a valid transport header, or a peer that did not
    /// accept one.
    TransportHeader,
    /// The port's policy requires mTLS (or a client identity) the client lacked.
    Unauthorized,
    /// The control plane could not be asked where the connection goes.
    Discovery,
    /// No endpoint of the destination was ready within the fail-fast timeout (or
    /// its queue was full).
    Unavailable,
    /// The control plane forbids the destination (or described it unusably).
    Forbidden,
}

impl ConnError {
    /// Every `error` label, in the order the counters are registered.
    pub const LABELS: [&'static str; 14] = [
        "loop",
        "orig_dst",
        "connect_refused",
        "connect_timeout",
        "connect_error",
        "detect",
        "i/o",
        "tls_handshake",
        "peer_identity",
        "transport_header",
        "unauthorized",
        "discovery",
        "unavailable",
        "forbidden",
    ];

    /// The position of this error's label in [`ConnError::LABELS`].
    pub fn index(self) -> usize {
        match self {
            ConnError::Loop => 0,
            ConnError::OrigDst => 1,
            ConnError::ConnectRefused => 2,
            ConnError::ConnectTimeout => 3,
            ConnError::Connect(_) => 4,
            ConnError::Detect => 5,
            ConnError::Io(_) => 6,
            ConnError::TlsHandshake(_) => 7,
            ConnError::PeerIdentity => 8,
            ConnError::TransportHeader => 9,
            ConnError::Unauthorized => 10,
            ConnError::Discovery => 11,
            ConnError::Unavailable => 12,
            ConnError::Forbidden => 13,
        }
    }

    /// The `error` label.
    pub fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }

    /// How the socket the failure closes ends, for `tcp_close_total{errno}`.
    pub fn errno(self) -> Errno {
        match self {
            ConnError::ConnectRefused => Errno::ConnRefused,
            ConnError::ConnectTimeout => Errno::TimedOut,
            ConnError::Connect(errno) | ConnError::Io(errno) | ConnError::TlsHandshake(errno) => {
                errno
            }
            _ => Errno::Other,
        }
    }

    /// A failed connect, from the error the kernel gave.
    pub fn connect(error: &io::Error) -> ConnError {
        match error.kind() {
            io::ErrorKind::ConnectionRefused => ConnError::ConnectRefused,
            io::ErrorKind::TimedOut => ConnError::ConnectTimeout,
            _ => ConnError::Connect(Errno::of(error)),
        }
    }
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.errno() {
            Errno::Other | Errno::Clean => f.write_str(self.label()),
            errno => write!(f, "{} ({})", self.label(), errno.label()),
        }
    }
}

impl std::error::Error for ConnError {}

/// How a forwarded socket closed, as the `errno` label of `tcp_close_total`: a
/// bounded set, as Linkerd's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Errno {
    /// A clean close (label "").
    #[default]
    Clean,
    ConnReset,
    Pipe,
    TimedOut,
    ConnRefused,
    ConnAborted,
    HostUnreach,
    NetUnreach,
    Other,
}

impl Errno {
    pub const ALL: [Errno; 9] = [
        Errno::Clean,
        Errno::ConnReset,
        Errno::Pipe,
        Errno::TimedOut,
        Errno::ConnRefused,
        Errno::ConnAborted,
        Errno::HostUnreach,
        Errno::NetUnreach,
        Errno::Other,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Errno::Clean => "",
            Errno::ConnReset => "ECONNRESET",
            Errno::Pipe => "EPIPE",
            Errno::TimedOut => "ETIMEDOUT",
            Errno::ConnRefused => "ECONNREFUSED",
            Errno::ConnAborted => "ECONNABORTED",
            Errno::HostUnreach => "EHOSTUNREACH",
            Errno::NetUnreach => "ENETUNREACH",
            Errno::Other => "other",
        }
    }

    /// The errno of an I/O error; `Other` when it has none we label.
    pub fn of(error: &io::Error) -> Errno {
        match error.raw_os_error() {
            Some(libc::ECONNRESET) => Errno::ConnReset,
            Some(libc::EPIPE) => Errno::Pipe,
            Some(libc::ETIMEDOUT) => Errno::TimedOut,
            Some(libc::ECONNREFUSED) => Errno::ConnRefused,
            Some(libc::ECONNABORTED) => Errno::ConnAborted,
            Some(libc::EHOSTUNREACH) => Errno::HostUnreach,
            Some(libc::ENETUNREACH) => Errno::NetUnreach,
            _ => Errno::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_errnos() {
        let table = [
            (ConnError::Loop, "loop", ""),
            (ConnError::ConnectRefused, "connect_refused", "ECONNREFUSED"),
            (ConnError::ConnectTimeout, "connect_timeout", "ETIMEDOUT"),
            (
                ConnError::Connect(Errno::NetUnreach),
                "connect_error",
                "ENETUNREACH",
            ),
            (ConnError::Io(Errno::ConnReset), "i/o", "ECONNRESET"),
            (
                ConnError::TlsHandshake(Errno::Other),
                "tls_handshake",
                "other",
            ),
            (ConnError::Unauthorized, "unauthorized", "other"),
        ];
        for (error, label, errno) in table {
            assert_eq!(error.label(), label);
            let expected = if errno.is_empty() { "other" } else { errno };
            assert_eq!(error.errno().label(), expected, "{error:?}");
        }
        for (i, errno) in Errno::ALL.iter().enumerate() {
            assert_eq!(errno.index(), i);
        }
        assert_eq!(
            ConnError::connect(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            ConnError::ConnectRefused
        );
        assert_eq!(
            ConnError::connect(&io::Error::from_raw_os_error(libc::EHOSTUNREACH)),
            ConnError::Connect(Errno::HostUnreach)
        );
    }
}
