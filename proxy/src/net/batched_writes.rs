//! One write per wake-up for an HTTP/2 connection, instead of one per response.
//!
//! `h2` sends a DATA frame of 256 bytes or more without copying it, and so must
//! flush its socket before it can queue the next frame. With many streams that
//! means a TLS record and a `writev` per response: at 50 concurrent requests the
//! server-side proxy woke once for a score of responses and wrote them in a score of
//! `writev`s. Under [`BatchedWrites`], what `h2` writes in one poll of its connection
//! is gathered in a buffer, and the task that drives the connection writes it out
//! when that poll is over ([`Flusher::drive`]): one record per 16 KiB, one
//! system call.
//!
//! Large DATA frames are gathered too, though `h2` hands them over without a copy:
//! copying them here, to [`LEAD`] bytes into our own buffer, is what keeps rustls's
//! own copy of them into its records fast. From where `h2` has them (the start of a
//! body chunk, often the start of a page), rustls's copy ran at a thirtieth of its
//! speed on AMD hosts (`forward.rs` says why) and took a quarter of the proxy's time in a
//! large download; our extra copy costs a few per cent of the AES-GCM that follows.
//!
//! The buffer is shared by the connection (which `h2` owns) and its driving task
//! through a mutex. Both live on that one task, so the lock is never contended; it
//! only proves to the compiler what the task's order already guarantees.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes up to this size are gathered; a larger one (only a peer that allows frames
/// over 64 KiB can cause one) goes straight through after what was gathered before
/// it. With [`LEAD`], the buffer is one 64 KiB allocation, an allocator size class.
const BATCH_LIMIT: usize = 64 * 1024 - LEAD;
/// Where gathered bytes start in the batch's buffer (see `forward.rs`).
const LEAD: usize = super::forward::LEAD;

/// Wraps `io` for `h2`: the first half goes to `h2`, the second stays with the task
/// that polls the connection, which must poll it through [`Flusher::drive`]. Until the first such call, flushes go through at once (the
/// handshake's, whose peer may wait for them).
pub fn batched<T>(io: T) -> (BatchedWrites<T>, Flusher<T>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        batch: Vec::new(),
        deferring: false,
        failed: None,
    }));
    (BatchedWrites(shared.clone()), Flusher(shared))
}

struct Shared<T> {
    io: T,
    /// What was written since the last flush, not yet handed to `io`, after
    /// [`LEAD`] unused bytes; empty (no allocation) when nothing is gathered.
    batch: Vec<u8>,
    /// Whether flushes wait for the driving task.
    deferring: bool,
    /// A failure of a write the driving task made, for `h2` to see at its next
    /// write or flush.
    failed: Option<io::Error>,
}

pub struct BatchedWrites<T>(Arc<Mutex<Shared<T>>>);

pub struct Flusher<T>(Arc<Mutex<Shared<T>>>);

fn lock<T>(shared: &Mutex<Shared<T>>) -> MutexGuard<'_, Shared<T>> {
    // A panic while writing would lose the connection's state anyway, and both
    // halves go with the task that panicked; nothing is left to protect.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T: AsyncWrite + Unpin> Shared<T> {
    /// Hands the whole batch to `io`; `Pending` while `io` cannot take it all.
    fn poll_write_batch(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut written = LEAD;
        while written < self.batch.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.batch[written..]) {
                Poll::Ready(Ok(0)) => {
                    self.batch.drain(LEAD..written);
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(error)) => {
                    self.batch.drain(LEAD..written);
                    return Poll::Ready(Err(error));
                }
                Poll::Pending => {
                    self.batch.drain(LEAD..written);
                    return Poll::Pending;
                }
            }
        }
        // Freed rather than kept: a connection idle after this costs nothing, and
        // under load one allocation serves a whole poll's responses.
        self.batch = Vec::new();
        Poll::Ready(Ok(()))
    }

    fn poll_write_through(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_write_batch(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn take_failure(&mut self) -> io::Result<()> {
        match self.failed.take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Whether `len` more bytes are to be gathered; if not, the batch has been
    /// written out first (or `Pending` says it could not be).
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        self.take_failure()?;
        if self.batch.len() + len > LEAD + BATCH_LIMIT {
            std::task::ready!(self.poll_write_batch(cx))?;
            if len > BATCH_LIMIT {
                return Poll::Ready(Ok(false));
            }
        }
        if self.batch.is_empty() {
            // Exactly one batch: appends never exceed it, so it never reallocates.
            self.batch.reserve_exact(LEAD + BATCH_LIMIT);
            self.batch.resize(LEAD, 0);
        }
        Poll::Ready(Ok(true))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchedWrites<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &mut *lock(&self.0);
        if std::task::ready!(shared.poll_room(cx, buf.len()))? {
            shared.batch.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        } else {
            Pin::new(&mut shared.io).poll_write(cx, buf)
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let shared = &mut *lock(&self.0);
        let len = bufs.iter().map(|buf| buf.len()).sum();
        if std::task::ready!(shared.poll_room(cx, len))? {
            for buf in bufs {
                shared.batch.extend_from_slice(buf);
            }
            Poll::Ready(Ok(len))
        } else {
            Pin::new(&mut shared.io).poll_write_vectored(cx, bufs)
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &mut *lock(&self.0);
        shared.take_failure()?;
        if shared.deferring {
            return Poll::Ready(Ok(()));
        }
        shared.poll_write_through(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &mut *lock(&self.0);
        shared.take_failure()?;
        std::task::ready!(shared.poll_write_batch(cx))?;
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}

impl<T: AsyncWrite + Unpin> Flusher<T> {
    /// Polls the connection with `poll` until it is ready, writing out after each
    /// poll what that poll gathered; the only way a driving task should poll it.
    pub fn drive<'a, R>(
        &'a self,
        mut poll: impl FnMut(&mut Context<'_>) -> Poll<R> + 'a,
    ) -> impl Future<Output = R> + 'a {
        poll_fn(move |cx| {
            let polled = poll(cx);
            self.poll_flush(cx);
            polled
        })
    }

    /// Writes out what the connection's last poll gathered. A failure is kept for
    /// the connection, and the task woken so that `h2` meets it and closes.
    fn poll_flush(&self, cx: &mut Context<'_>) {
        let shared = &mut *lock(&self.0);
        shared.deferring = true;
        if shared.failed.is_some() {
            return;
        }
        if let Poll::Ready(Err(error)) = shared.poll_write_through(cx) {
            shared.failed = Some(error);
            cx.waker().wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Writes out what the connection gathered, as its driving task does after a poll.
    async fn run_flusher<T: AsyncWrite + Unpin>(flusher: &Flusher<T>) {
        poll_fn(|cx| {
            flusher.poll_flush(cx);
            Poll::Ready(())
        })
        .await
    }

    /// Whether a read from `far` would wait: nothing was written to it yet.
    async fn nothing_to_read(far: &mut tokio::io::DuplexStream) -> bool {
        let mut nothing = [0; 1];
        poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut nothing);
            Poll::Ready(Pin::new(&mut *far).poll_read(cx, &mut buf).is_pending())
        })
        .await
    }

    #[tokio::test]
    async fn writes_wait_for_the_flusher_once_it_has_run() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let (mut io, flusher) = batched(near);
        io.write_all(b"handshake").await.unwrap();
        io.flush().await.unwrap();
        let mut got = [0; 9];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"handshake");

        run_flusher(&flusher).await;
        io.write_all(b"one ").await.unwrap();
        io.flush().await.unwrap();
        let written = io
            .write_vectored(&[IoSlice::new(b"two "), IoSlice::new(b"three")])
            .await
            .unwrap();
        assert_eq!(written, 9, "a small vectored write is gathered whole");
        io.flush().await.unwrap();
        let pending = nothing_to_read(&mut far).await;
        assert!(pending, "a deferred flush wrote before the flusher ran");

        run_flusher(&flusher).await;
        let mut got = [0; 13];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two three");
        assert_eq!(
            lock(&io.0).batch.capacity(),
            0,
            "a connection with nothing to write holds no buffer"
        );
    }

    #[tokio::test]
    async fn a_write_larger_than_a_batch_goes_after_the_batch_in_order() {
        let (near, mut far) = tokio::io::duplex(256 * 1024);
        let (mut io, flusher) = batched(near);
        run_flusher(&flusher).await;
        let large: Vec<u8> = (0..BATCH_LIMIT * 2).map(|i| i as u8).collect();
        io.write_all(b"small").await.unwrap();
        io.write_all(&large).await.unwrap();
        io.write_all(b"tail").await.unwrap();
        run_flusher(&flusher).await;
        let mut got = vec![0; 5 + large.len() + 4];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..5], b"small");
        assert_eq!(&got[5..5 + large.len()], &large[..]);
        assert_eq!(&got[5 + large.len()..], b"tail");
    }

    #[tokio::test]
    async fn a_full_size_data_frame_is_gathered_too() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let (mut io, flusher) = batched(near);
        run_flusher(&flusher).await;
        // A frame head and a 16 KiB payload, as `h2` writes a DATA frame.
        let payload: Vec<u8> = (0..16 * 1024).map(|i| i as u8).collect();
        let written = io
            .write_vectored(&[IoSlice::new(&[0; 9]), IoSlice::new(&payload)])
            .await
            .unwrap();
        assert_eq!(written, 9 + payload.len());
        io.flush().await.unwrap();
        let pending = nothing_to_read(&mut far).await;
        assert!(
            pending,
            "the frame went straight through instead of being gathered"
        );
        run_flusher(&flusher).await;
        let mut got = vec![0; 9 + payload.len()];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[9..], &payload[..]);
    }

    #[tokio::test]
    async fn a_failed_deferred_write_reaches_the_connection() {
        let (near, far) = tokio::io::duplex(1024);
        let (mut io, flusher) = batched(near);
        run_flusher(&flusher).await;
        drop(far);
        io.write_all(b"lost").await.unwrap();
        run_flusher(&flusher).await;
        assert!(io.flush().await.is_err());
    }
}
