//! One direction of a session: reads whatever the socket has into the thread's scratch
//! buffer, lets a [`FrameScanner`] walk the message headers (a [`Watch`] sees the few
//! messages that matter), and writes the same bytes on. Only when the writer is slow are the
//! bytes it has not taken kept in a backlog owned by the direction, and reading pauses until it
//! is drained; an idle direction owns no buffer.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::frame::{FrameError, FrameScanner, Interests, Message};

/// The per-thread read buffer every session borrows for one read and the write that follows.
/// Bigger reads mean fewer syscalls for large results; being per thread, its size costs idle
/// sessions nothing.
const SCRATCH_SIZE: usize = 64 * 1024;

/// Buffer of the rare reads that happen outside the forwarding loop (draining a lost client's
/// last statement).
pub(super) const DISCARD_BUFFER_SIZE: usize = 8 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// What a direction does with the bytes passing through it.
pub(super) trait Watch {
    /// True when freshly read bytes must be held back, unscanned and unwritten.
    fn hold(&self) -> bool;
    /// Counts bytes read.
    fn count(&self, n: usize);
    /// Called for each message the direction's scanner reports.
    fn on_message(&mut self, m: Message<'_>);
    /// Asked whenever everything read so far has been written: true ends the direction.
    /// `at_boundary` says whether that is a message boundary.
    fn stop(&self, at_boundary: bool) -> bool;
}

/// How a direction's forwarding stopped.
pub(super) enum Stopped {
    Eof,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
    Invalid(FrameError),
    /// [`Watch::hold`] asked to hold bytes: they wait in the backlog, unscanned.
    Held,
    /// [`Watch::stop`] said so.
    Stop,
}

/// Where [`Flow::forward_nonblocking`] left a direction.
pub(super) enum Paused {
    /// The reader has nothing more for now.
    Drained,
    /// The writer did not take everything: the rest waits in the backlog.
    Backlogged,
    Stopped(Stopped),
}

/// One direction's forwarding state.
pub(super) struct Flow {
    pub(super) scanner: FrameScanner,
    /// Bytes read but not yet taken by the writer (it was slow), from `backlog_start` on; or,
    /// when `held`, bytes held back whole. Unallocated in the common case and freed once
    /// drained, so idle sessions keep no buffer.
    pub(super) backlog: Vec<u8>,
    pub(super) backlog_start: usize,
    pub(super) held: bool,
    /// The writer took bytes it may still buffer (TLS): flush before reading more.
    unflushed: bool,
}

impl Flow {
    pub(super) fn new(interests: &'static Interests) -> Flow {
        Flow {
            scanner: FrameScanner::new(interests),
            backlog: Vec::new(),
            backlog_start: 0,
            held: false,
            unflushed: false,
        }
    }

    /// True when nothing waits in the direction: no bytes held back, none backed up.
    pub(super) fn is_clear(&self) -> bool {
        !self.held && self.backlog.is_empty()
    }

    /// True when what the writer has been given ends at a message boundary.
    pub(super) fn written_to_boundary(&self) -> bool {
        self.scanner.at_boundary() && (self.held || self.backlog_start == self.backlog.len())
    }

    /// Forwards from `reader` to `writer` until either has nothing more to do for now
    /// (`Pending`) or forwarding stops. Per burst of traffic: one read into the thread's
    /// scratch buffer, one scan, one write.
    pub(super) fn poll_forward<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        watch: &mut impl Watch,
    ) -> Poll<Stopped>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if let Err(e) = ready!(self.poll_drain(cx, writer)) {
                return Poll::Ready(Stopped::WriteFailed(e));
            }
            if watch.stop(self.scanner.at_boundary()) {
                return Poll::Ready(Stopped::Stop);
            }
            let step = with_scratch(|scratch| {
                let mut buf = ReadBuf::new(scratch);
                match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Stopped::ReadFailed(e))),
                    Poll::Ready(Ok(())) => Poll::Ready(self.pass_on(
                        buf.filled(),
                        |data| Pin::new(&mut *writer).poll_write(cx, data),
                        watch,
                    )),
                }
            });
            if let Some(stopped) = ready!(step) {
                return Poll::Ready(stopped);
            }
        }
    }

    /// The forwarding thread's [`poll_forward`](Self::poll_forward), on non-blocking sockets
    /// it watches itself: reads until the reader would block (a short read means it would:
    /// new bytes raise a new readiness event), passing each read on with one write.
    pub(super) fn forward_nonblocking(
        &mut self,
        reader: &mut impl Read,
        writer: &mut impl Write,
        watch: &mut impl Watch,
    ) -> Paused {
        // Set by a short read: the reader has nothing more, once what it gave is passed on.
        let mut drained = false;
        loop {
            if self.backlog_start < self.backlog.len() {
                return Paused::Backlogged;
            }
            // Also after a read: what was just passed on may end the direction (a Terminate).
            if watch.stop(self.scanner.at_boundary()) {
                return Paused::Stopped(Stopped::Stop);
            }
            if drained {
                return Paused::Drained;
            }
            let step = with_scratch(|scratch| match reader.read(scratch) {
                Ok(n) => {
                    let write = |data: &[u8]| match writer.write(data) {
                        Err(e) if would_block(&e) => Poll::Pending,
                        done => Poll::Ready(done),
                    };
                    match self.pass_on(&scratch[..n], write, watch) {
                        Some(stopped) => Err(Paused::Stopped(stopped)),
                        None => Ok(n < scratch.len()),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Paused::Drained),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
                Err(e) => Err(Paused::Stopped(Stopped::ReadFailed(e))),
            });
            match step {
                Ok(short) => drained = short,
                Err(paused) => return paused,
            }
        }
    }

    /// Scans freshly read `data` and hands it to `write`; what the writer does not take now
    /// goes to the backlog. `Some` when forwarding stops.
    fn pass_on(
        &mut self,
        data: &[u8],
        write: impl FnOnce(&[u8]) -> Poll<io::Result<usize>>,
        watch: &mut impl Watch,
    ) -> Option<Stopped> {
        if data.is_empty() {
            return Some(Stopped::Eof);
        }
        if watch.hold() {
            self.backlog.extend_from_slice(data);
            self.held = true;
            return Some(Stopped::Held);
        }
        watch.count(data.len());
        if let Err(e) = self.scanner.feed(data, |m| watch.on_message(m)) {
            return Some(Stopped::Invalid(e));
        }
        self.unflushed = true;
        let taken = match write(data) {
            Poll::Ready(Ok(0)) => {
                return Some(Stopped::WriteFailed(io::ErrorKind::WriteZero.into()))
            }
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Some(Stopped::WriteFailed(e)),
            Poll::Pending => 0,
        };
        if taken < data.len() {
            self.backlog.extend_from_slice(&data[taken..]);
        }
        None
    }

    /// Writes the backlog, then flushes. `Ready(Ok)` once the writer has everything.
    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> Poll<io::Result<()>> {
        while self.backlog_start < self.backlog.len() {
            let rest = &self.backlog[self.backlog_start..];
            match ready!(Pin::new(&mut *writer).poll_write(cx, rest)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.backlog_start += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if !self.backlog.is_empty() {
            // A slow peer is rare: give the memory back rather than keep it per session.
            self.backlog = Vec::new();
            self.backlog_start = 0;
        }
        if self.unflushed {
            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Lets held bytes go on after all: counts and scans them; the next
    /// [`poll_forward`](Self::poll_forward) writes them.
    pub(super) fn release_held(&mut self, watch: &mut impl Watch) -> Result<(), FrameError> {
        self.held = false;
        watch.count(self.backlog.len());
        self.unflushed = true;
        self.scanner.feed(&self.backlog, |m| watch.on_message(m))
    }
}

/// Whether a non-blocking call found nothing to do (or was interrupted before it did any).
fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Runs `f` with this thread's scratch buffer. A session polls one direction at a time and
/// neither socket calls back into the pump, so the buffer is always free; should that ever
/// change, `f` gets a fresh buffer rather than a panic.
fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut vec![0; DISCARD_BUFFER_SIZE]),
    })
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::frame::CLIENT_INTERESTS;
    use crate::protocol::frontend;

    /// A watch that records what it is shown, and holds or stops when told to.
    #[derive(Default)]
    struct Recorder {
        tags: Vec<u8>,
        counted: std::cell::Cell<usize>,
        hold: bool,
        stop_at_boundary: bool,
    }

    impl Watch for Recorder {
        fn hold(&self) -> bool {
            self.hold
        }
        fn count(&self, n: usize) {
            self.counted.set(self.counted.get() + n);
        }
        fn on_message(&mut self, m: Message<'_>) {
            self.tags.push(m.tag);
        }
        fn stop(&self, at_boundary: bool) -> bool {
            self.stop_at_boundary && at_boundary
        }
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&u32::try_from(body.len() + 4).expect("small").to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Polls the flow once; `None` when it has nothing more to do for now.
    async fn step(
        flow: &mut Flow,
        reader: &mut DuplexStream,
        writer: &mut DuplexStream,
        watch: &mut Recorder,
    ) -> Option<Stopped> {
        poll_fn(|cx| match flow.poll_forward(cx, reader, writer, watch) {
            Poll::Ready(stopped) => Poll::Ready(Some(stopped)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }

    /// Reads `n` bytes from `stream`.
    async fn read_exactly(stream: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        stream.read_exact(&mut buf).await.expect("read");
        buf
    }

    #[tokio::test]
    async fn bytes_pass_unchanged_and_the_watch_sees_each_message_once() {
        let (mut client, mut reader) = duplex(1 << 16);
        let (mut writer, mut server) = duplex(1 << 16);
        let mut flow = Flow::new(&CLIENT_INTERESTS);
        let mut watch = Recorder::default();
        let mut stream = message(frontend::QUERY, b"SELECT 1\0");
        stream.extend(message(b'B', &[0; 8]));
        stream.extend(message(frontend::SYNC, b""));
        // Split inside the second header: the scanner carries the partial header over.
        let (first, second) = stream.split_at(16);
        client.write_all(first).await.expect("write");
        assert!(step(&mut flow, &mut reader, &mut writer, &mut watch)
            .await
            .is_none());
        client.write_all(second).await.expect("write");
        assert!(step(&mut flow, &mut reader, &mut writer, &mut watch)
            .await
            .is_none());
        assert_eq!(read_exactly(&mut server, stream.len()).await, stream);
        assert_eq!(watch.tags, [frontend::QUERY, frontend::SYNC]);
        assert!(flow.written_to_boundary());
        drop(client);
        let stopped = step(&mut flow, &mut reader, &mut writer, &mut watch).await;
        assert!(matches!(stopped, Some(Stopped::Eof)));
    }

    #[tokio::test]
    async fn a_slow_writer_backs_bytes_up_and_pauses_reading_until_drained() {
        let (mut client, mut reader) = duplex(1 << 20);
        let (mut writer, mut server) = duplex(64);
        let mut flow = Flow::new(&CLIENT_INTERESTS);
        let mut watch = Recorder::default();
        let first = message(frontend::QUERY, &[b'x'; 1000]);
        client.write_all(&first).await.expect("write");
        assert!(step(&mut flow, &mut reader, &mut writer, &mut watch)
            .await
            .is_none());
        assert_eq!(flow.backlog.len() - flow.backlog_start, first.len() - 64);
        assert!(!flow.written_to_boundary());
        // More input waits in the socket while the backlog is not drained.
        let second = message(frontend::SYNC, b"");
        client.write_all(&second).await.expect("write");
        assert!(step(&mut flow, &mut reader, &mut writer, &mut watch)
            .await
            .is_none());
        assert_eq!(watch.tags, [frontend::QUERY], "the Sync is not read yet");

        let reading = tokio::spawn(async move {
            let mut buf = vec![0; first.len() + second.len()];
            server
                .read_exact(&mut buf)
                .await
                .map(|_| (buf, first, second))
        });
        let mut forwarded = false;
        while !forwarded {
            assert!(step(&mut flow, &mut reader, &mut writer, &mut watch)
                .await
                .is_none());
            forwarded = watch.tags.len() == 2 && flow.written_to_boundary();
            tokio::task::yield_now().await;
        }
        let (got, first, second) = reading.await.expect("join").expect("read");
        assert_eq!(got, [first, second].concat());
        assert_eq!(flow.backlog.capacity(), 0, "a drained backlog is freed");
    }

    #[tokio::test]
    async fn held_bytes_wait_unscanned_until_released() {
        let (mut client, mut reader) = duplex(1 << 16);
        let (mut writer, mut server) = duplex(1 << 16);
        let mut flow = Flow::new(&CLIENT_INTERESTS);
        let mut watch = Recorder {
            hold: true,
            ..Recorder::default()
        };
        let query = message(frontend::QUERY, b"SELECT 1\0");
        client.write_all(&query).await.expect("write");
        let stopped = step(&mut flow, &mut reader, &mut writer, &mut watch).await;
        assert!(matches!(stopped, Some(Stopped::Held)));
        assert!(watch.tags.is_empty());
        assert!(
            flow.written_to_boundary(),
            "held bytes were not given to the writer"
        );

        assert_eq!(
            watch.counted.get(),
            0,
            "held bytes are counted when released"
        );
        watch.hold = false;
        flow.release_held(&mut watch).expect("valid");
        assert_eq!(watch.tags, [frontend::QUERY]);
        assert!(step(&mut flow, &mut reader, &mut writer, &mut watch)
            .await
            .is_none());
        assert_eq!(read_exactly(&mut server, query.len()).await, query);
        assert_eq!(watch.counted.get(), query.len());
    }

    #[tokio::test]
    async fn the_watch_stops_a_direction_at_a_message_boundary() {
        let (mut client, mut reader) = duplex(1 << 16);
        let (mut writer, _server) = duplex(1 << 16);
        let mut flow = Flow::new(&CLIENT_INTERESTS);
        let mut watch = Recorder::default();
        let query = message(frontend::QUERY, b"SELECT 1\0");
        client.write_all(&query[..3]).await.expect("write");
        assert!(step(&mut flow, &mut reader, &mut writer, &mut watch)
            .await
            .is_none());
        watch.stop_at_boundary = true;
        // Mid-message: the direction goes on.
        assert!(step(&mut flow, &mut reader, &mut writer, &mut watch)
            .await
            .is_none());
        client.write_all(&query[3..]).await.expect("write");
        let stopped = step(&mut flow, &mut reader, &mut writer, &mut watch).await;
        assert!(matches!(stopped, Some(Stopped::Stop)));
    }

    #[tokio::test]
    async fn an_impossible_length_stops_the_direction_as_invalid() {
        let (mut client, mut reader) = duplex(1 << 16);
        let (mut writer, _server) = duplex(1 << 16);
        let mut flow = Flow::new(&CLIENT_INTERESTS);
        let mut watch = Recorder::default();
        client
            .write_all(&[frontend::QUERY, 0, 0, 0, 2])
            .await
            .expect("write");
        let stopped = step(&mut flow, &mut reader, &mut writer, &mut watch).await;
        assert!(matches!(stopped, Some(Stopped::Invalid(_))));
    }
}
