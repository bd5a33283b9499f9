//! Forwarding a byte stream between two sockets.
//!
//! Each direction is copied independently, so a FIN from one side is passed on as a
//! FIN (half-close) while the other direction keeps flowing. A failure in either
//! direction (a reset, a broken pipe) ends both: the proxy resets the other side too,
//! so an upstream RST reaches the client as an RST rather than as a hang or a clean
//! end of stream that would hide the failure.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::metrics::TransportSeries;

/// Bytes buffered per direction: large enough for bulk throughput. It is allocated
/// only once data flows, so idle connections cost little.
const COPY_BUFFER: usize = 16 * 1024;

/// One side of a forwarded connection and the series its bytes are counted in.
pub struct Side<'a> {
    pub stream: TcpStream,
    pub series: &'a TransportSeries,
}

/// Which side failed, and how, when forwarding ends with an error.
#[derive(Debug)]
pub struct ForwardError {
    pub client_failed: bool,
    pub error: io::Error,
}

/// Copies `client` ⇄ `server` until both directions have ended, writing `prefix`
/// (bytes already read from the client during detection) to the server first.
pub async fn forward(
    client: Side<'_>,
    prefix: &[u8],
    server: Side<'_>,
) -> Result<(), ForwardError> {
    let Side {
        stream: mut client_stream,
        series: client_series,
    } = client;
    let Side {
        stream: mut server_stream,
        series: server_series,
    } = server;
    let result = {
        let (mut client_read, mut client_write) = client_stream.split();
        let (mut server_read, mut server_write) = server_stream.split();
        let upstream = async {
            if !prefix.is_empty() {
                server_write
                    .write_all(prefix)
                    .await
                    .map_err(|e| (false, e))?;
                server_series.add_write(prefix.len());
            }
            copy(
                &mut client_read,
                client_series,
                &mut server_write,
                server_series,
            )
            .await
        };
        let downstream = async {
            copy(
                &mut server_read,
                server_series,
                &mut client_write,
                client_series,
            )
            .await
            .map_err(|(read_failed, e)| (!read_failed, e))
        };
        // try_join stops at the first error, so a failure in one direction does not
        // wait for the other direction to end on its own.
        tokio::try_join!(upstream, downstream)
    };
    match result {
        Ok(_) => Ok(()),
        Err((client_failed, error)) => {
            crate::transport::reset_on_close(&client_stream);
            crate::transport::reset_on_close(&server_stream);
            Err(ForwardError {
                client_failed,
                error,
            })
        }
    }
}

/// Copies until end of stream, then half-closes the writer. An error says whether
/// it came from the reader (`true`) or the writer (`false`).
async fn copy(
    reader: &mut ReadHalf<'_>,
    read_series: &TransportSeries,
    writer: &mut WriteHalf<'_>,
    write_series: &TransportSeries,
) -> Result<(), (bool, io::Error)> {
    // Allocate only once the peer has something to say, so connections that are idle
    // in one direction (most of them) hold no buffer for it.
    reader.as_ref().readable().await.map_err(|e| (true, e))?;
    let mut buf = vec![0; COPY_BUFFER];
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| (true, e))?;
        if n == 0 {
            return writer.shutdown().await.map_err(|e| (false, e));
        }
        read_series.add_read(n);
        writer.write_all(&buf[..n]).await.map_err(|e| (false, e))?;
        write_series.add_write(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, NoTlsReason, Peer, TlsStatus};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn half_close_passes_and_other_direction_keeps_flowing() {
        let metrics = Metrics::new(&crate::config::Config::from_lookup(|_| None).unwrap());
        let tls = TlsStatus::NoIdentity(NoTlsReason::Loopback);
        let target = "127.0.0.1:1".parse().unwrap();
        let src = metrics.outbound.transport.open(Peer::Src, target, tls);
        let dst = metrics.outbound.transport.open(Peer::Dst, target, tls);
        let (mut app, proxy_client) = pair().await;
        let (proxy_server, mut upstream) = pair().await;
        let forwarding = async {
            forward(
                Side {
                    stream: proxy_client,
                    series: src.series(),
                },
                b"pre",
                Side {
                    stream: proxy_server,
                    series: dst.series(),
                },
            )
            .await
        };
        let peers = async {
            app.write_all(b"hello").await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"prehello");
            // The client's FIN arrived, yet the server can still answer.
            upstream.write_all(b"answer").await.unwrap();
            upstream.shutdown().await.unwrap();
            let mut answer = Vec::new();
            app.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, b"answer");
        };
        let (result, ()) = tokio::join!(forwarding, peers);
        result.unwrap();
    }
}
