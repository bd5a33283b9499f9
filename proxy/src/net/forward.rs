//! Forwarding a byte stream between two connections (plain TCP, TLS over TCP, or a
//! stream on a carrier between proxies).
//!
//! Each direction is copied independently, so a FIN from one side is passed on as a
//! FIN (half-close) while the other direction keeps flowing. A failure in either
//! direction (a reset, a broken pipe) ends both: the proxy resets the other side too,
//! so an upstream RST reaches the client as an RST rather than as a hang or a clean
//! end of stream that would hide the failure.
//!
//! Both directions are polled from one future on the connection's task: no halves, no
//! locks, no second task per connection.
//!
//! [`relay`] is the step every byte-stream path ends in: the accepted client
//! ([`Downstream`], already counted in the transport metrics) and the stream the
//! proxy opened for it, each counted until it closes, a failure returned once.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use super::error::{ConnError, Errno};
use crate::metrics::transport::{OpenConnection, TransportSeries};

/// A direction's buffer at first: a TLS record's worth (less [`LEAD`]). The
/// allocation is exactly 16 KiB, an allocator size class; 64 bytes more would round
/// up to 20 KiB.
const COPY_BUFFER: usize = 16 * 1024;
/// What a direction's buffers grow to once a read fills one (a bulk transfer): four
/// TLS records per read and per write instead of one.
const BULK_COPY_BUFFER: usize = 64 * 1024;
/// Where a direction's bytes start in its buffer. rustls copies what it is given into
/// a new record whose payload starts 5 bytes into its allocation; with both buffers
/// page-aligned, source and destination sit 5 bytes apart modulo 4 KiB, and glibc's
/// `rep movsb` copy then runs some 30 times slower on the AMD EPYC hosts we measure on
/// (2-3 instead of 80-105 GB/s for 16 KiB, whenever the destination is 1 to 15 bytes
/// past the source modulo 4 KiB). That one copy was 29 % of the client-side proxy's
/// time in a bulk transfer. Starting 64 bytes in puts the destination 59 bytes before
/// the source instead, where the copy runs at full speed.
pub const LEAD: usize = 64;

/// A stream the proxy forwards: plain TCP, TLS over TCP, or a stream on a carrier
/// between proxies (`opaque/carrier.rs`). A failure must be able to end it with a reset.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// Makes the coming close a reset (TCP `RST`, HTTP/2 `RST_STREAM`) instead of a
    /// clean end of stream.
    fn reset_on_close(&mut self);
}

impl Transport for TcpStream {
    fn reset_on_close(&mut self) {
        super::socket::reset_on_close(self)
    }
}

impl<T: Transport> Transport for tokio_rustls::server::TlsStream<T> {
    fn reset_on_close(&mut self) {
        self.get_mut().0.reset_on_close()
    }
}

impl<T: Transport> Transport for tokio_rustls::client::TlsStream<T> {
    fn reset_on_close(&mut self) {
        self.get_mut().0.reset_on_close()
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn reset_on_close(&mut self) {
        (**self).reset_on_close()
    }
}

/// One end of a forwarded connection and the series its bytes are counted in.
pub struct End<'a, T> {
    pub stream: T,
    pub series: &'a TransportSeries,
}

/// Which side failed, and how, when forwarding ends with an error.
#[derive(Debug)]
pub struct ForwardError {
    pub client_failed: bool,
    pub error: io::Error,
}

/// Copies `client` ⇄ `server` until both directions have ended, writing `prefix`
/// (bytes already read from the client, e.g. during detection) to the server first.
pub async fn forward<C: Transport, S: Transport>(
    client: End<'_, C>,
    prefix: &[u8],
    server: End<'_, S>,
) -> Result<(), ForwardError> {
    let End {
        stream: mut client_stream,
        series: client_series,
    } = client;
    let End {
        stream: mut server_stream,
        series: server_series,
    } = server;
    let mut upstream = OneWay::with_prefix(prefix);
    let mut downstream = OneWay::with_prefix(&[]);
    let result = poll_fn(|cx| {
        // The client's reads feed the server's writes, and the other way round.
        let up = upstream.poll(
            cx,
            &mut client_stream,
            client_series,
            &mut server_stream,
            server_series,
        );
        if let Poll::Ready(Err((read_failed, error))) = up {
            return Poll::Ready(Err(ForwardError {
                client_failed: read_failed,
                error,
            }));
        }
        let down = downstream.poll(
            cx,
            &mut server_stream,
            server_series,
            &mut client_stream,
            client_series,
        );
        if let Poll::Ready(Err((read_failed, error))) = down {
            return Poll::Ready(Err(ForwardError {
                client_failed: !read_failed,
                error,
            }));
        }
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    if result.is_err() {
        client_stream.reset_on_close();
        server_stream.reset_on_close();
    }
    result
}

/// The state of copying one direction.
struct OneWay {
    /// Held only while bytes are in flight: a direction with nothing to copy gives its
    /// buffer back, so an idle forwarded connection holds none.
    buf: Option<CopyBuffer>,
    /// The size of this direction's next buffer: [`COPY_BUFFER`], or
    /// [`BULK_COPY_BUFFER`] once a read has filled one.
    size: usize,
    /// Bytes in `buf[start..end]` are read but not yet written.
    start: usize,
    end: usize,
    /// Bytes were written since the last flush (TLS writers buffer inside the session).
    unflushed: bool,
    read_done: bool,
    done: bool,
}

impl OneWay {
    fn with_prefix(prefix: &[u8]) -> OneWay {
        let end = LEAD + prefix.len();
        let buf = (!prefix.is_empty()).then(|| {
            let mut buf = CopyBuffer::new(COPY_BUFFER.max(end));
            buf.fill(LEAD, prefix);
            buf
        });
        OneWay {
            buf,
            size: COPY_BUFFER,
            start: LEAD,
            end,
            unflushed: false,
            read_done: false,
            done: false,
        }
    }

    /// Copies until end of stream, then half-closes the writer. An error says whether
    /// it came from the reader (`true`) or the writer (`false`).
    fn poll<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        read_series: &TransportSeries,
        writer: &mut W,
        write_series: &TransportSeries,
    ) -> Poll<Result<(), (bool, io::Error)>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(buf) = &self.buf {
                while self.start < self.end {
                    let pending = buf.filled(self.start..self.end);
                    let n = match Pin::new(&mut *writer).poll_write(cx, pending) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err((false, io::ErrorKind::WriteZero.into())))
                        }
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err((false, e))),
                        Poll::Pending => return Poll::Pending,
                    };
                    self.start += n;
                    self.unflushed = true;
                    write_series.add_write(n);
                }
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(|e| (false, e))?;
                self.done = true;
                self.buf = None;
                return Poll::Ready(Ok(()));
            }
            // Gather what is readable now before writing again: a TLS reader yields
            // one record per read, and one write of several records is one syscall.
            (self.start, self.end) = (LEAD, LEAD);
            let size = self.size;
            let buf = self.buf.get_or_insert_with(|| CopyBuffer::new(size));
            loop {
                match buf.poll_read_into(cx, reader, self.end) {
                    Poll::Ready(Ok(0)) => {
                        self.read_done = true;
                        break;
                    }
                    Poll::Ready(Ok(n)) => {
                        read_series.add_read(n);
                        self.end += n;
                        if self.end == buf.len() {
                            // A read filled the buffer: this is a bulk transfer, so
                            // move to the larger buffer (it stays the size of this
                            // direction's buffers from now on).
                            self.size = BULK_COPY_BUFFER;
                            buf.grow(BULK_COPY_BUFFER, LEAD..self.end);
                            break;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((true, e))),
                    Poll::Pending if self.end > LEAD => break,
                    Poll::Pending => {
                        // Nothing more to read for now: push out what the writer holds.
                        if self.unflushed {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))
                                .map_err(|e| (false, e))?;
                            self.unflushed = false;
                        }
                        self.buf = None;
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// A direction's copy buffer, allocated without being zeroed: it is taken and given
/// back each time the direction goes from idle to busy and back, and clearing 16 or
/// 64 KiB each time would cost more than the copy. Only what reads have filled is
/// ever read back.
struct CopyBuffer {
    bytes: Box<[MaybeUninit<u8>]>,
    /// `bytes[..filled]` has been written.
    filled: usize,
}

impl CopyBuffer {
    fn new(len: usize) -> CopyBuffer {
        CopyBuffer {
            bytes: Box::new_uninit_slice(len),
            filled: 0,
        }
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Copies `data` in at `at`.
    fn fill(&mut self, at: usize, data: &[u8]) {
        let end = at + data.len();
        self.bytes[at..end].write_copy_of_slice(data);
        self.filled = self.filled.max(end);
    }

    /// Bytes that reads (or [`CopyBuffer::fill`]) have put in `range`.
    fn filled(&self, range: std::ops::Range<usize>) -> &[u8] {
        assert!(
            range.end <= self.filled,
            "reading a part of the buffer never written"
        );
        // SAFETY: `bytes[..filled]` has been initialised, and `range` lies within it.
        unsafe { self.bytes[range].assume_init_ref() }
    }

    /// Reads from `reader` into the buffer from `at` on; `Ok(0)` is end of stream.
    fn poll_read_into<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        at: usize,
    ) -> Poll<io::Result<usize>> {
        let mut read = ReadBuf::uninit(&mut self.bytes[at..]);
        ready!(Pin::new(reader).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.filled = self.filled.max(at + n);
        Poll::Ready(Ok(n))
    }

    /// Moves to a buffer of `len` bytes, keeping those in `keep` where they are.
    fn grow(&mut self, len: usize, keep: std::ops::Range<usize>) {
        if self.len() < len {
            let mut bigger = CopyBuffer::new(len);
            bigger.fill(keep.start, self.filled(keep));
            *self = bigger;
        }
    }
}

/// The client's side of a connection whose handling is decided: its stream, counted in
/// the transport metrics from here until it closes.
pub struct Downstream<C> {
    pub stream: C,
    pub addr: SocketAddr,
    pub metrics: OpenConnection,
}

impl<C: Transport> Downstream<C> {
    /// Refuses the connection: resets the client, so it learns of the failure as it
    /// would without a proxy, records how its socket closes, and hands the error back
    /// for the connection's owner to count.
    pub fn refuse(mut self, error: ConnError) -> ConnError {
        debug!(client = %self.addr, %error, "refusing the connection");
        self.metrics.set_errno(error.errno());
        self.stream.reset_on_close();
        error
    }
}

/// Forwards a connection whose server spoke first: its first bytes go to the client,
/// then both directions as [`relay`].
pub async fn relay_after_server<C: Transport, S: Transport>(
    mut client: Downstream<C>,
    first: &[u8],
    server: S,
    dst: OpenConnection,
) -> Result<(), ConnError> {
    dst.series().add_read(first.len());
    if let Err(error) = tokio::io::AsyncWriteExt::write_all(&mut client.stream, first).await {
        return Err(client.refuse(ConnError::Io(Errno::of(&error))));
    }
    client.metrics.series().add_write(first.len());
    relay(client, &[], server, dst).await
}

/// Forwards the client's stream to `server` (writing `prefix` first), counting the
/// server side in `dst`, until both directions have ended.
pub async fn relay<C: Transport, S: Transport>(
    client: Downstream<C>,
    prefix: &[u8],
    server: S,
    mut dst: OpenConnection,
) -> Result<(), ConnError> {
    let Downstream {
        stream,
        addr,
        metrics: mut src,
    } = client;
    let result = forward(
        End {
            stream,
            series: src.series(),
        },
        prefix,
        End {
            stream: server,
            series: dst.series(),
        },
    )
    .await;
    let failure = result.err().map(|failure| {
        debug!(client = %addr, error = %failure.error, "forwarding failed");
        let errno = Errno::of(&failure.error);
        if failure.client_failed {
            src.set_errno(errno)
        } else {
            dst.set_errno(errno)
        }
        ConnError::Io(errno)
    });
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::tls::{NoTlsReason, TlsStatus};
    use crate::metrics::transport::{OpenConnection, Peer};
    use crate::metrics::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Client-side and server-side transport series to count a forwarded connection in.
    fn series() -> (OpenConnection, OpenConnection) {
        let metrics = Metrics::new(&crate::config::Config::from_lookup(|_| None).unwrap());
        let tls = TlsStatus::NoIdentity(NoTlsReason::Loopback);
        let target = "127.0.0.1:1".parse().unwrap();
        let src = metrics
            .outbound
            .transport
            .open(Peer::Src, target, tls.clone());
        let dst = metrics.outbound.transport.open(Peer::Dst, target, tls);
        (src, dst)
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn half_close_passes_and_other_direction_keeps_flowing() {
        let (src, dst) = series();
        let (mut app, proxy_client) = pair().await;
        let (proxy_server, mut upstream) = pair().await;
        let forwarding = async {
            forward(
                End {
                    stream: proxy_client,
                    series: src.series(),
                },
                b"pre",
                End {
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

    /// A transfer large enough to grow the buffers arrives whole and in order, in
    /// both directions at once.
    #[tokio::test]
    async fn bulk_passes_unchanged_both_ways() {
        const LEN: usize = 4 << 20;
        let pattern =
            |seed: usize| -> Vec<u8> { (0..LEN).map(|i| ((i * 7 + seed) % 253) as u8).collect() };
        let (src, dst) = series();
        let (app, proxy_client) = pair().await;
        let (proxy_server, upstream) = pair().await;
        let forwarding = forward(
            End {
                stream: proxy_client,
                series: src.series(),
            },
            b"",
            End {
                stream: proxy_server,
                series: dst.series(),
            },
        );
        // Each end sends its pattern and reads the other's, concurrently.
        let exchange = |mut stream: TcpStream, seed: usize, expect: usize| async move {
            let (mut reader, mut writer) = stream.split();
            let sent = pattern(seed);
            let send = async {
                writer.write_all(&sent).await.unwrap();
                writer.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let receive = reader.read_to_end(&mut got);
            let ((), received) = tokio::join!(send, receive);
            received.unwrap();
            assert!(got == pattern(expect), "bytes changed or lost on the way");
        };
        let (result, (), ()) =
            tokio::join!(forwarding, exchange(app, 1, 2), exchange(upstream, 2, 1));
        result.unwrap();
    }

    /// A direction holds a buffer only while bytes are in flight: none before the
    /// first byte, none once what came is written and nothing more is readable.
    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let (src, dst) = series();
        let (mut app, mut from_app) = tokio::io::duplex(1024);
        let (mut to_server, mut server) = tokio::io::duplex(1024);
        let mut way = OneWay::with_prefix(b"");
        let mut poll_once = |way: &mut OneWay| {
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            way.poll(
                &mut cx,
                &mut from_app,
                src.series(),
                &mut to_server,
                dst.series(),
            )
        };
        assert!(poll_once(&mut way).is_pending());
        assert!(way.buf.is_none(), "a buffer before the first byte");
        for message in [&b"hello"[..], b"again"] {
            app.write_all(message).await.unwrap();
            assert!(poll_once(&mut way).is_pending());
            assert!(
                way.buf.is_none(),
                "a buffer kept after the bytes were written"
            );
            let mut got = [0u8; 5];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, message);
        }
    }

    #[tokio::test]
    async fn a_reset_upstream_resets_the_client() {
        let (src, dst) = series();
        let (mut app, proxy_client) = pair().await;
        let (proxy_server, upstream) = pair().await;
        crate::net::socket::reset_on_close(&upstream);
        drop(upstream);
        let result = forward(
            End {
                stream: proxy_client,
                series: src.series(),
            },
            b"request",
            End {
                stream: proxy_server,
                series: dst.series(),
            },
        )
        .await;
        let failure = result.expect_err("the upstream reset");
        assert!(!failure.client_failed);
        let mut buf = [0u8; 8];
        let error = app
            .read(&mut buf)
            .await
            .expect_err("the client sees a reset");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }
}
