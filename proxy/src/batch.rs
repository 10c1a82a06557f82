//! Calls from many requests, sent to Redis in batches by one task. While one batch is on its
//! way the next one gathers, so a lone item leaves at once and under load each round trip (and
//! each script call, whose fixed cost is most of its cost) carries many. Calls nobody waits for
//! linger a little to gather more, unless an awaited call comes: it takes them along, in the
//! order they came (so a settlement always goes before the next reservation).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::sync::lock;
use tokio::sync::Notify;

/// How long calls nobody waits for (settlements) gather before they leave, at most.
pub const UNAWAITED_LINGER: Duration = Duration::from_millis(20);

/// What the sender task does with a batch.
type SendFn<T> = Box<dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Sync + Send>;

/// Items gathered for one sender task.
pub struct Batcher<T> {
    queue: Mutex<Vec<T>>,
    /// An item came.
    wake: Notify,
    /// An awaited item came: no lingering.
    hurry: Notify,
    /// Most items one batch carries.
    max: usize,
    /// What the sender task does with a batch.
    send: SendFn<T>,
    /// Set once the sender task runs: it starts with the first item, on the runtime that
    /// pushed it.
    started: OnceLock<()>,
}

impl<T: Send + 'static> Batcher<T> {
    pub fn new<F, Fut>(max: usize, send: F) -> Arc<Self>
    where
        F: Fn(Vec<T>) -> Fut + Sync + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Arc::new(Self {
            queue: Mutex::new(Vec::new()),
            wake: Notify::new(),
            hurry: Notify::new(),
            max: max.max(1),
            send: Box::new(move |batch| Box::pin(send(batch))),
            started: OnceLock::new(),
        })
    }

    /// Queues an item somebody waits for: it leaves with the next batch.
    pub fn push(self: &Arc<Self>, item: T) {
        self.enqueue(item);
        self.hurry.notify_one();
    }

    /// Queues an item nobody waits for: it may linger up to [`UNAWAITED_LINGER`].
    pub fn push_lazy(self: &Arc<Self>, item: T) {
        self.enqueue(item);
    }

    fn enqueue(self: &Arc<Self>, item: T) {
        lock(&self.queue).push(item);
        if self.started.get().is_none() {
            // Outside a runtime (never on the request path) the item waits for the next push.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                self.started.get_or_init(|| {
                    let me = self.clone();
                    runtime.spawn(async move { me.run().await });
                });
            }
        }
        self.wake.notify_one();
    }

    async fn run(&self) {
        // Armed again only once its deadline has passed, at most once per linger rather than per item:
        // arming a timer wakes the runtime's driver (a system call and a turn of its loop), which
        // per request was a measurable part of a lone client's cost.
        let linger = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(linger);
        loop {
            self.wake.notified().await;
            let now = tokio::time::Instant::now();
            if linger.deadline() <= now {
                linger.as_mut().reset(now + UNAWAITED_LINGER);
            }
            tokio::select! {
                biased;
                _ = self.hurry.notified() => {}
                _ = &mut linger => {}
            }
            loop {
                let batch = {
                    let mut queue = lock(&self.queue);
                    let n = queue.len().min(self.max);
                    queue.drain(..n).collect::<Vec<_>>()
                };
                if batch.is_empty() {
                    break;
                }
                (self.send)(batch).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn every_item_is_sent_once_in_batches_no_larger_than_the_cap() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let (s, c) = (seen.clone(), calls.clone());
        let batcher = Batcher::new(8, move |batch: Vec<usize>| {
            let (seen, calls) = (s.clone(), c.clone());
            async move {
                assert!(batch.len() <= 8);
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
                lock(&seen).extend(batch);
            }
        });
        for i in 0..100 {
            batcher.push(i);
        }
        for _ in 0..200 {
            if lock(&seen).len() == 100 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut got = lock(&seen).clone();
        got.sort_unstable();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        // Pushed faster than sent: they went out together.
        assert!(calls.load(Ordering::Relaxed) < 100);
    }

    #[tokio::test]
    async fn lazy_items_wait_until_an_awaited_one_takes_them_along_in_order() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let batcher = Batcher::new(64, move |batch: Vec<&'static str>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(batch);
            }
        });
        batcher.push_lazy("settle a");
        batcher.push_lazy("settle b");
        batcher.push("reserve c");
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(first, Some(vec!["settle a", "settle b", "reserve c"]));
        // Alone after a quiet spell, a lazy item leaves after a whole linger.
        tokio::time::sleep(2 * UNAWAITED_LINGER).await;
        let started = tokio::time::Instant::now();
        batcher.push_lazy("settle d");
        let second = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(second, Some(vec!["settle d"]));
        assert!(started.elapsed() >= UNAWAITED_LINGER);
    }
}
