//! The signal that the proxy has begun to drain, for connections that can end
//! gracefully: an HTTP/1 server connection closes once it has no request in
//! flight, an HTTP/2 one (or a carrier) sends GOAWAY and ends with its streams.
//!
//! Why not a `CancellationToken`: a connection's task polls the signal every time
//! it wakes (every frame it reads), and polling a token that has not fired takes
//! its mutex each time. Here a poll is one atomic load; a watcher's waker is
//! stored once, on its first poll (a task's waker does not change).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use slab::Slab;

#[derive(Default)]
pub struct Drain {
    started: AtomicBool,
    watchers: Mutex<Slab<Waker>>,
}

impl Drain {
    /// Starts the drain: every watcher is woken, and sees it.
    pub fn start(&self) {
        self.started.store(true, Ordering::Release);
        let wakers: Vec<Waker> = {
            let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
            watchers.drain().collect()
        };
        for waker in wakers {
            waker.wake();
        }
    }

    pub fn watch(&self) -> Watch<'_> {
        Watch {
            drain: self,
            key: None,
        }
    }
}

/// One connection's view of the [`Drain`]; polled from a single task.
pub struct Watch<'a> {
    drain: &'a Drain,
    key: Option<usize>,
}

impl Watch<'_> {
    /// Ready once the drain has started.
    pub fn poll_started(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.drain.started.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if self.key.is_none() {
            let mut watchers = self
                .drain
                .watchers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // Checked again under the lock: `start` may have drained the watchers
            // between the load above and here, and would not wake this one.
            if self.drain.started.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.key = Some(watchers.insert(cx.waker().clone()));
        }
        Poll::Pending
    }

    pub async fn started(&mut self) {
        std::future::poll_fn(|cx| self.poll_started(cx)).await
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            // After `start` the slab is empty (and stays so): nothing to remove.
            let mut watchers = self
                .drain
                .watchers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            watchers.try_remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn watchers_registered_before_and_after_the_start_see_it() {
        let drain = Arc::new(Drain::default());
        let early = {
            let drain = drain.clone();
            tokio::spawn(async move { drain.watch().started().await })
        };
        // The early watcher registers its waker before the drain starts.
        tokio::task::yield_now().await;
        assert_eq!(drain.watchers.lock().unwrap().len(), 1);
        drain.start();
        early.await.unwrap();
        drain.watch().started().await;
    }

    #[test]
    fn a_dropped_watcher_leaves_nothing_behind() {
        let drain = Drain::default();
        let waker = Waker::noop();
        let mut watch = drain.watch();
        assert!(watch
            .poll_started(&mut Context::from_waker(waker))
            .is_pending());
        assert_eq!(drain.watchers.lock().unwrap().len(), 1);
        drop(watch);
        assert!(drain.watchers.lock().unwrap().is_empty());
    }
}
