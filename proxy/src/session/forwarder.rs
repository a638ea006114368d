//! The forwarding thread: carries sessions in their steady state (plain sockets, past startup,
//! nothing backed up) with one `epoll` loop of its own, so a round trip costs a read, a scan
//! and a write per direction and nothing of an async runtime's task and readiness machinery
//! (README, "Proxy CPU per transaction against PgBouncer's").
//!
//! The session's task hands the thread its sockets and its pump state, then waits. The thread
//! forwards with the same [`Flow`](super::flow::Flow)s and watches as the pump, and gives the
//! session back, state and sockets, as soon as anything but plain forwarding is due: a
//! direction stopped (end of stream, an error, a Terminate, bytes held for a kill), a writer
//! did not take everything (the pump drains the backlog), or the task recalled it (a kill, the
//! proxy's shutdown). The pump then goes on exactly where the thread stopped.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use guard_core::SessionRecord;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::flow::{Paused, Stopped};
use super::pump::{ClientWatch, ServerWatch, Sides};
use super::SessionContext;
use crate::stats::ProxyStats;

/// Readiness events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;

/// The forwarding threads' name.
pub(super) const THREAD_NAME: &str = "lockguard-forward";

/// The token of the thread's waker (new sessions, recalls, stop).
const WAKER: Token = Token(usize::MAX);

/// A session's plain sockets, out of tokio's reactor (non-blocking).
pub struct PlainSockets {
    pub client: TcpStream,
    pub server: PlainUpstream,
}

/// The upstream socket of [`PlainSockets`].
pub enum PlainUpstream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl PlainUpstream {
    fn raw_fd(&self) -> RawFd {
        match self {
            PlainUpstream::Tcp(s) => s.as_raw_fd(),
            PlainUpstream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for PlainUpstream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PlainUpstream::Tcp(s) => s.read(buf),
            PlainUpstream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for PlainUpstream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            PlainUpstream::Tcp(s) => s.write(buf),
            PlainUpstream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A session as the thread carries it.
struct Carried {
    sockets: PlainSockets,
    sides: Sides,
    record: Arc<SessionRecord>,
    recall: Arc<AtomicBool>,
    reply: oneshot::Sender<Returned>,
}

/// A session given back to its task.
pub(super) struct Returned {
    pub sockets: PlainSockets,
    pub sides: Sides,
    /// How each direction stopped on the thread, if it did: the pump starts from there.
    pub client_stopped: Option<Stopped>,
    pub server_stopped: Option<Stopped>,
}

/// A handle on one forwarding thread; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Forwarder {
    inner: Arc<Handle>,
}

struct Handle {
    adopt: Sender<Box<Carried>>,
    waker: Waker,
    /// Bumped by every recall, so the thread looks for recalled sessions only when there are.
    recalls: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    /// Cleared when the thread ends, however it ends (a panic included).
    alive: Arc<AtomicBool>,
}

impl Handle {
    /// Wakes the thread to look at new sessions, recalls, or its end.
    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            error!(error = %e, "could not wake the forwarding thread");
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        self.wake();
    }
}

impl Forwarder {
    /// Starts a forwarding thread; it counts the sessions it carries in `stats`.
    pub fn start(stats: Arc<ProxyStats>) -> io::Result<Forwarder> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let (adopt, adopted) = mpsc::channel();
        let recalls = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let thread = Thread {
            poll,
            adopted,
            recalls: Arc::clone(&recalls),
            recalls_seen: 0,
            stopping: Arc::clone(&stopping),
            slots: Vec::new(),
            free: Vec::new(),
            stats,
            alive: Arc::clone(&alive),
        };
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || thread.run())?;
        Ok(Forwarder {
            inner: Arc::new(Handle {
                adopt,
                waker,
                recalls,
                stopping,
                alive,
            }),
        })
    }

    /// False once the thread has ended (it only ends early by failing or panicking): the pump
    /// then stops offering it sessions.
    pub(super) fn is_alive(&self) -> bool {
        self.inner.alive.load(Ordering::Acquire)
    }

    /// Lets the thread forward the session until it gives it back; recalls it early when the
    /// session is killed or the proxy shuts down. `None`: the session is lost with its sockets
    /// (the thread is gone, or forwarding it panicked), and both sockets are closed.
    pub(super) async fn carry(
        &self,
        sockets: PlainSockets,
        sides: Sides,
        record: &Arc<SessionRecord>,
        ctx: &SessionContext,
    ) -> Option<Returned> {
        let (reply, returned) = oneshot::channel();
        let recall = Arc::new(AtomicBool::new(false));
        let carried = Box::new(Carried {
            sockets,
            sides,
            record: Arc::clone(record),
            recall: Arc::clone(&recall),
            reply,
        });
        if let Err(mpsc::SendError(carried)) = self.inner.adopt.send(carried) {
            return Some(carried.into_returned(None, None).1);
        }
        self.inner.wake();
        tokio::pin!(returned);
        tokio::select! {
            back = &mut returned => return back.ok(),
            _ = record.killed() => {}
            _ = ctx.shutdown.cancelled() => {}
            _ = ctx.hard_stop.cancelled() => {}
        }
        recall.store(true, Ordering::Release);
        self.inner.recalls.fetch_add(1, Ordering::AcqRel);
        self.inner.wake();
        returned.await.ok()
    }
}

impl Carried {
    /// The session as its task gets it back, and the way back to the task.
    fn into_returned(
        self,
        client_stopped: Option<Stopped>,
        server_stopped: Option<Stopped>,
    ) -> (oneshot::Sender<Returned>, Returned) {
        let returned = Returned {
            sockets: self.sockets,
            sides: self.sides,
            client_stopped,
            server_stopped,
        };
        (self.reply, returned)
    }

    /// Gives the session back to its task; if the task is gone (its runtime shut down), the
    /// sockets close here.
    fn send_back(self, client_stopped: Option<Stopped>, server_stopped: Option<Stopped>) {
        let (reply, returned) = self.into_returned(client_stopped, server_stopped);
        let _ = reply.send(returned);
    }

    /// Forwards what the socket of one side (the client's or the server's) has. `Some` when the
    /// session must go back, with how each direction stopped.
    fn serve(&mut self, from_client: bool) -> Option<(Option<Stopped>, Option<Stopped>)> {
        let Carried {
            sockets,
            sides,
            record,
            ..
        } = self;
        let paused = if from_client {
            let mut watch = ClientWatch {
                record,
                tracker: &sides.tracker,
                goodbye: &mut sides.client.goodbye,
            };
            sides.client.flow.forward_nonblocking(
                &mut sockets.client,
                &mut sockets.server,
                &mut watch,
            )
        } else {
            let mut watch = ServerWatch {
                record,
                tracker: &sides.tracker,
                sent_fatal: &mut sides.server.sent_fatal,
                draining: &NOT_DRAINING,
                ready_count: None,
            };
            sides.server.flow.forward_nonblocking(
                &mut sockets.server,
                &mut sockets.client,
                &mut watch,
            )
        };
        match paused {
            Paused::Drained => None,
            Paused::Backlogged => Some((None, None)),
            Paused::Stopped(stopped) if from_client => Some((Some(stopped), None)),
            Paused::Stopped(stopped) => Some((None, Some(stopped))),
        }
    }
}

/// The thread never drains: shutdown recalls its sessions, and the pump drains them.
static NOT_DRAINING: AtomicBool = AtomicBool::new(false);

/// The forwarding thread's state.
struct Thread {
    poll: Poll,
    adopted: Receiver<Box<Carried>>,
    recalls: Arc<AtomicUsize>,
    recalls_seen: usize,
    stopping: Arc<AtomicBool>,
    /// Carried sessions; a session in slot `i` has tokens `2i` (client) and `2i + 1` (server).
    /// A hand-written slot list rather than the `slab` crate: with `Slab` the thread ran about
    /// 100 more instructions per transaction (callgrind, `--sections profile`).
    slots: Vec<Option<Box<Carried>>>,
    free: Vec<usize>,
    stats: Arc<ProxyStats>,
    alive: Arc<AtomicBool>,
}

impl Drop for Thread {
    /// The thread's end, however it ends (its stop, `epoll_wait` failing, a panic outside the
    /// forwarding of one session): its sessions go back to their tasks and go on in the runtime.
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
        self.give_back_all();
    }
}

impl Thread {
    /// The event loop. Its sessions go back to their tasks when it returns (or panics): see
    /// the `Drop` above.
    fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_PER_WAIT);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!(error = %e, "the forwarding thread cannot wait for events; giving its sessions back");
                return;
            }
            // A panic while forwarding one session (a bug) must not take the others down: that
            // session is closed (its flows may be half-way through a message), and the thread
            // goes on with the rest of the batch. One `catch_unwind` per batch, not per event:
            // around each event it kept `serve` from being inlined (~25 instructions an event).
            let (at, woken) = (Cell::new(0), Cell::new(false));
            let mut from = 0;
            while let Err(_panic) = panic::catch_unwind(AssertUnwindSafe(|| {
                self.serve_events(&events, from, &at, &woken)
            })) {
                if let Some(event) = events.iter().nth(at.get()) {
                    self.close_failed(event.token().0 / 2);
                }
                from = at.get() + 1;
            }
            if woken.get() {
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                self.adopt_new();
                self.give_back_recalled();
            }
        }
    }

    /// Forwards for the events of a batch from the `from`th on, noting in `at` the one at hand
    /// and in `woken` whether the waker was among them.
    fn serve_events(&mut self, events: &Events, from: usize, at: &Cell<usize>, woken: &Cell<bool>) {
        for (i, event) in events.iter().enumerate().skip(from) {
            at.set(i);
            let token = event.token();
            if token == WAKER {
                woken.set(true);
                continue;
            }
            let (slot, from_client) = (token.0 / 2, token.0 % 2 == 0);
            let back = match self.slots.get_mut(slot) {
                Some(Some(carried)) => carried.serve(from_client),
                // An event for a session given back earlier in this batch.
                _ => None,
            };
            if let Some((client_stopped, server_stopped)) = back {
                self.give_back(slot, client_stopped, server_stopped);
            }
        }
    }

    fn adopt_new(&mut self) {
        while let Ok(carried) = self.adopted.try_recv() {
            let slot = match self.free.pop() {
                Some(slot) => slot,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            let client_fd = carried.sockets.client.as_raw_fd();
            let server_fd = carried.sockets.server.raw_fd();
            let registry = self.poll.registry();
            let registered = registry
                .register(
                    &mut SourceFd(&client_fd),
                    Token(2 * slot),
                    Interest::READABLE,
                )
                .and_then(|()| {
                    registry
                        .register(
                            &mut SourceFd(&server_fd),
                            Token(2 * slot + 1),
                            Interest::READABLE,
                        )
                        .inspect_err(|_| {
                            let _ = registry.deregister(&mut SourceFd(&client_fd));
                        })
                });
            match registered {
                Ok(()) => {
                    self.slots[slot] = Some(carried);
                    self.stats.session_carried();
                }
                Err(e) => {
                    warn!(error = %e, "the forwarding thread could not watch a session; the pump keeps it");
                    self.free.push(slot);
                    carried.send_back(None, None);
                }
            }
        }
    }

    fn give_back_recalled(&mut self) {
        let recalls = self.recalls.load(Ordering::Acquire);
        if recalls == self.recalls_seen {
            return;
        }
        self.recalls_seen = recalls;
        for slot in 0..self.slots.len() {
            let recalled = self.slots[slot]
                .as_ref()
                .is_some_and(|c| c.recall.load(Ordering::Acquire));
            if recalled {
                self.give_back(slot, None, None);
            }
        }
    }

    fn give_back_all(&mut self) {
        for slot in 0..self.slots.len() {
            self.give_back(slot, None, None);
        }
    }

    fn give_back(
        &mut self,
        slot: usize,
        client_stopped: Option<Stopped>,
        server_stopped: Option<Stopped>,
    ) {
        if let Some(carried) = self.remove(slot) {
            carried.send_back(client_stopped, server_stopped);
        }
    }

    /// Closes the session in `slot`, whose forwarding panicked: its task sees the session lost
    /// (as if the thread were gone), and its backend sees the end of its connection.
    fn close_failed(&mut self, slot: usize) {
        if let Some(carried) = self.remove(slot) {
            error!(
                session = carried.record.id,
                client = %carried.record.client.addr,
                "forwarding this session failed (a bug: see the panic above); closing it"
            );
        }
    }

    /// Takes the session in `slot` off the thread (its sockets unwatched, its slot free).
    fn remove(&mut self, slot: usize) -> Option<Box<Carried>> {
        let carried = self.slots.get_mut(slot).and_then(Option::take)?;
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut SourceFd(&carried.sockets.client.as_raw_fd()));
        let _ = registry.deregister(&mut SourceFd(&carried.sockets.server.raw_fd()));
        self.free.push(slot);
        self.stats.session_given_back();
        Some(carried)
    }
}
