//! A socket that first yields bytes already read from it, and reads ahead under TLS.
//!
//! Detection consumes a connection's first bytes; [`Replay`] hands them to whoever
//! reads next (a TLS server that must see the ClientHello, an HTTP server that must
//! see the request line), so no byte is lost or reordered.

use tokio::io::{AsyncRead, AsyncWrite};

use super::forward::Transport;

/// A socket that first yields bytes already read from it (during detection), so a
/// TLS server can read a ClientHello the detector consumed.
///
/// Under a TLS session it also reads ahead: rustls asks for at most 4 KiB per read,
/// so a 16 KiB record took five `recvfrom` calls. Once a read fills what rustls asked
/// for (more is likely waiting), reads go through a [`READ_AHEAD`] buffer instead,
/// one syscall for several records; after eight reads in a row that would have fitted
/// rustls's own buffer, the buffer is freed again. Request/response traffic of a few
/// KiB never engages it, so it costs neither a copy nor memory there.
pub struct Replay<T> {
    prefix: Vec<u8>,
    read: usize,
    read_ahead: Option<ReadAhead>,
    inner: T,
}

/// Bytes a TLS socket reads at once when it reads ahead: about two full records.
const READ_AHEAD: usize = 32 * 1024;

/// Read-ahead state: `buf` is allocated (non-empty) only while engaged.
#[derive(Default)]
struct ReadAhead {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Reads in a row that returned no more than the caller asked for.
    small_reads: u8,
}

impl<T> Replay<T> {
    /// Replays `prefix`, then reads `inner` directly: for readers with their own
    /// large buffers (hyper).
    pub fn new(prefix: Vec<u8>, inner: T) -> Replay<T> {
        Replay {
            prefix,
            read: 0,
            read_ahead: None,
            inner,
        }
    }

    /// Replays `prefix`, then reads ahead when the peer sends more than a TLS
    /// session asks for at once.
    pub fn under_tls(prefix: Vec<u8>, inner: T) -> Replay<T> {
        Replay {
            read_ahead: Some(ReadAhead::default()),
            ..Replay::new(prefix, inner)
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    #[cfg(test)]
    fn reading_ahead(&self) -> bool {
        self.read_ahead.as_ref().is_some_and(|a| !a.buf.is_empty())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.read < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.read);
            let start = this.read;
            buf.put_slice(&this.prefix[start..start + n]);
            this.read += n;
            if this.read == this.prefix.len() {
                this.prefix = Vec::new();
                this.read = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        match &mut this.read_ahead {
            None => std::pin::Pin::new(&mut this.inner).poll_read(cx, buf),
            Some(ahead) => ahead.poll_read(&mut this.inner, cx, buf),
        }
    }
}

impl ReadAhead {
    fn poll_read<T: AsyncRead + Unpin>(
        &mut self,
        inner: &mut T,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::{ready, Poll};
        let wanted = out.remaining();
        if self.start == self.end {
            if self.buf.is_empty() {
                // Not engaged: read straight into the caller's buffer.
                let before = out.filled().len();
                ready!(std::pin::Pin::new(inner).poll_read(cx, out))?;
                if wanted > 0 && out.filled().len() - before == wanted && wanted < READ_AHEAD {
                    self.buf = vec![0; READ_AHEAD].into_boxed_slice();
                    self.small_reads = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut into = tokio::io::ReadBuf::new(&mut self.buf);
            ready!(std::pin::Pin::new(inner).poll_read(cx, &mut into))?;
            let n = into.filled().len();
            (self.start, self.end) = (0, n);
            if n <= wanted {
                self.small_reads += 1;
            } else {
                self.small_reads = 0;
            }
        }
        let n = wanted.min(self.end - self.start);
        out.put_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        if self.start == self.end && self.small_reads >= 8 {
            self.buf = Box::default();
            (self.start, self.end) = (0, 0);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    // Without these, h2 and hyper see a stream that cannot gather writes and
    // split each body chunk over 1 KiB into two writes: two TLS records, two
    // segments, and often two wake-ups at the peer.
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Transport> Transport for Replay<T> {
    fn reset_on_close(&mut self) {
        self.inner.reset_on_close()
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;

    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{Replay, READ_AHEAD};

    /// Reads `len` bytes in 4 KiB reads, as rustls does.
    async fn read_as_tls_does(reader: &mut Replay<TcpStream>, len: usize) -> Vec<u8> {
        let mut received = Vec::with_capacity(len);
        let mut chunk = [0u8; 4096];
        while received.len() < len {
            let n = reader.read(&mut chunk).await.unwrap();
            assert_ne!(n, 0, "end of stream after {} bytes", received.len());
            received.extend_from_slice(&chunk[..n]);
        }
        received
    }

    /// A connected client socket and the server side of it, over loopback.
    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// A burst engages the read-ahead buffer without losing or reordering a byte,
    /// and small exchanges afterwards free it again.
    #[tokio::test]
    async fn tls_socket_reads_ahead_through_bursts_only() {
        let (mut writer, accepted) = loopback_pair().await;
        let mut reader = Replay::under_tls(b"hello".to_vec(), accepted);

        let burst: Vec<u8> = (0..4 * READ_AHEAD + 123).map(|i| (i % 251) as u8).collect();
        let mut expected = b"hello".to_vec();
        expected.extend_from_slice(&burst);
        // The first 8 KiB wait in the socket before the first read (loopback delivers
        // during the send), so that read fills what it asked for; the rest follows
        // while the reader reads.
        writer.write_all(&burst[..8192]).await.unwrap();
        let sending = tokio::spawn(async move {
            writer.write_all(&burst[8192..]).await.unwrap();
            writer
        });
        let received = read_as_tls_does(&mut reader, expected.len()).await;
        let mut writer = sending.await.unwrap();
        assert!(received == expected, "the burst arrived changed");
        assert!(reader.reading_ahead(), "a burst must engage read-ahead");

        for round in 0..8u8 {
            writer.write_all(&[round; 100]).await.unwrap();
            assert_eq!(read_as_tls_does(&mut reader, 100).await, vec![round; 100]);
        }
        assert!(
            !reader.reading_ahead(),
            "small exchanges must free the buffer"
        );

        drop(writer);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "end of stream passes through");
    }

    /// Request/response traffic never allocates the buffer.
    #[tokio::test]
    async fn tls_socket_reads_small_messages_directly() {
        let (mut writer, accepted) = loopback_pair().await;
        let mut reader = Replay::under_tls(Vec::new(), accepted);
        for round in 0..20u8 {
            writer.write_all(&[round; 1091]).await.unwrap();
            assert_eq!(read_as_tls_does(&mut reader, 1091).await, vec![round; 1091]);
            assert!(!reader.reading_ahead());
        }
    }

    /// A frame head and its body leave in one write; without vectored writes h2
    /// sends each body chunk over 1 KiB as two TLS records.
    #[tokio::test]
    async fn replay_gathers_writes() {
        let (client, mut reader) = loopback_pair().await;
        let mut writer = Replay::new(b"seen".to_vec(), client);

        assert!(writer.is_write_vectored());
        let written = writer
            .write_vectored(&[IoSlice::new(b"head"), IoSlice::new(b"body")])
            .await
            .unwrap();
        assert_eq!(written, 8, "both slices in one write");
        let mut received = [0u8; 8];
        reader.read_exact(&mut received).await.unwrap();
        assert_eq!(&received, b"headbody");
    }
}
