//! Wake-gating: the parts of one task polled only when their own waker fired.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The parts of one task (the pump's two directions and its rare events), each polled only
/// after its own waker fired (or on the first poll), so a part with nothing to do costs nothing
/// while another is busy. The task's waker is registered once per poll of the task, for all
/// parts.
pub(super) struct WakeGroup {
    task: Arc<AtomicWaker>,
}

/// One part of a [`WakeGroup`].
pub(super) struct WakeGated<F> {
    future: F,
    flag: Arc<WakeFlag>,
    waker: Waker,
}

/// The wake-up flag of a [`WakeGated`] part, and the task to wake with it.
struct WakeFlag {
    woken: AtomicBool,
    task: Arc<AtomicWaker>,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl WakeGroup {
    pub(super) fn new() -> Self {
        WakeGroup {
            task: Arc::new(AtomicWaker::new()),
        }
    }

    pub(super) fn gate<F: Future + Unpin>(&self, future: F) -> WakeGated<F> {
        let gate = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: Arc::clone(&self.task),
        });
        let waker = Waker::from(Arc::clone(&gate));
        WakeGated {
            future,
            flag: gate,
            waker,
        }
    }

    /// To be called at the start of every poll of the task, before its parts are polled: a
    /// part woken from then on wakes the task again.
    pub(super) fn register(&self, cx: &Context<'_>) {
        self.task.register(cx.waker());
    }
}

impl<F: Future + Unpin> WakeGated<F> {
    /// Polls the part if its waker fired since its last poll. The group must have been
    /// registered in this poll of the task.
    pub(super) fn poll_if_woken(&mut self) -> Poll<F::Output> {
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut self.future).poll(&mut Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts how often the task was woken.
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_part_is_polled_first_and_then_only_after_its_own_wake() {
        let group = WakeGroup::new();
        let polls = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let wakers: [std::sync::Mutex<Option<Waker>>; 2] = Default::default();
        let part = |i: usize| {
            let (polls, wakers) = (&polls, &wakers);
            Box::pin(poll_fn(move |cx: &mut Context<'_>| {
                polls[i].fetch_add(1, Ordering::SeqCst);
                *wakers[i].lock().expect("lock") = Some(cx.waker().clone());
                Poll::<()>::Pending
            }))
        };
        let mut a = group.gate(part(0));
        let mut b = group.gate(part(1));
        let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let task_waker = Waker::from(Arc::clone(&task));
        let cx = Context::from_waker(&task_waker);
        let poll_task = |a: &mut WakeGated<_>, b: &mut WakeGated<_>| {
            group.register(&cx);
            assert!(a.poll_if_woken().is_pending());
            assert!(b.poll_if_woken().is_pending());
        };
        poll_task(&mut a, &mut b);
        assert_eq!(polls.each_ref().map(|p| p.load(Ordering::SeqCst)), [1, 1]);
        // Nobody woke: polling the task again polls no part.
        poll_task(&mut a, &mut b);
        assert_eq!(polls.each_ref().map(|p| p.load(Ordering::SeqCst)), [1, 1]);
        // B's waker fires: the task is woken, and only B is polled.
        let b_waker = wakers[1].lock().expect("lock").take().expect("registered");
        b_waker.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        poll_task(&mut a, &mut b);
        assert_eq!(polls.each_ref().map(|p| p.load(Ordering::SeqCst)), [1, 2]);
    }

    #[tokio::test]
    async fn parts_waiting_on_sockets_run_as_their_sockets_become_ready() {
        let (mut left_peer, mut left) = duplex(64);
        let (mut right_peer, mut right) = duplex(64);
        let group = WakeGroup::new();
        let read_left = Box::pin(async move {
            let mut buf = [0; 4];
            left.read_exact(&mut buf).await.map(|_| buf)
        });
        let read_right = Box::pin(async move {
            let mut buf = [0; 4];
            right.read_exact(&mut buf).await.map(|_| buf)
        });
        let mut read_left = group.gate(read_left);
        let mut read_right = group.gate(read_right);
        let mut results = (None, None);
        let writer = tokio::spawn(async move {
            right_peer.write_all(b"RGHT").await?;
            tokio::task::yield_now().await;
            left_peer.write_all(b"LEFT").await?;
            Ok::<_, std::io::Error>((left_peer, right_peer))
        });
        poll_fn(|cx| {
            group.register(cx);
            if let Poll::Ready(r) = read_left.poll_if_woken() {
                results.0 = Some(r.expect("left"));
            }
            if let Poll::Ready(r) = read_right.poll_if_woken() {
                results.1 = Some(r.expect("right"));
            }
            if results.0.is_some() && results.1.is_some() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        assert_eq!(results, (Some(*b"LEFT"), Some(*b"RGHT")));
        writer.await.expect("join").expect("writes");
    }
}
