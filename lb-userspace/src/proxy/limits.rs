//! How long a client connection may hold lb's resources while it does nothing useful.
//!
//! A client is never trusted to finish what it starts: to send its head, its body, to read the
//! answer or to go away. Each of those has a bound here, per entry point, and each bound counts
//! only time spent waiting on the *client*: an upstream that is slow to read a body or to
//! answer is the upstream's problem (its own timeouts), never the client's, and the reverse
//! holds for health — a client's slowness is never counted against an upstream.
//!
//! - **head**: a request's headers must arrive within `header_timeout` (hyper's own timer for
//!   HTTP/1; for HTTP/2 the first stream must open within it).
//! - **idle**: a keep-alive connection with nothing in flight closes after `idle_timeout`
//!   (HTTP/1 parked, HTTP/2 with no open stream: GOAWAY).
//! - **body**: while lb waits for a request body, a gap of `body_timeout` without a byte, or an
//!   average below `body_min_rate` bytes/s (after a first `body_timeout` of grace), cuts it
//!   ([`BodyTooSlow`]: a `408`, the client's fault).
//! - **write**: an answer the client does not take for `write_timeout` — a socket that stays
//!   unwritable, an HTTP/2 stream whose window stays shut — ends the connection (HTTP/1) or the
//!   stream (HTTP/2), and with it what it held upstream.
//! - **HTTP/2**: PING every `h2_keepalive` (no answer within it: closed); at most
//!   `h2_max_streams` streams at once, which is also the most upstream requests one client
//!   connection can hold.
//! - **connections**: at most `max_connections` per entry point; beyond it lb stops accepting
//!   until one closes (the kernel's backlog holds the rest).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{Body, BoxError};
use crate::model::l7::ConnLimits;

/// A request body cut because the client sent it too slowly.
#[derive(Debug)]
pub struct BodyTooSlow;

impl std::fmt::Display for BodyTooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body too slow")
    }
}

impl std::error::Error for BodyTooSlow {}

/// Whether `e` (or what it wraps) is a [`BodyTooSlow`].
pub fn is_too_slow(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<BodyTooSlow>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A client's request body, cut when it arrives too slowly. Time counts only while lb is
/// waiting for the client's bytes (a read that found nothing), never while the reader (the
/// upstream, a middleware) is not asking.
pub struct SlowBody {
    body: Body,
    gap: Duration,
    min_rate: u64,
    /// Bytes so far, and time spent waiting for them before the current wait.
    bytes: u64,
    waited: Duration,
    /// The current wait: since when, and its timer (kept: a body that waits often reuses it).
    waiting_since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl SlowBody {
    pub fn new(body: Body, limits: &ConnLimits) -> SlowBody {
        SlowBody {
            body,
            gap: limits.body_timeout,
            min_rate: limits.body_min_rate,
            bytes: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: None,
        }
    }

    /// When the current wait, begun at `since`, has lasted too long: the gap, or the point
    /// where the average over all waiting falls below the rate (after one gap of grace).
    fn deadline(&self, since: Instant) -> Instant {
        let gap = since + self.gap;
        if self.min_rate == 0 {
            return gap;
        }
        let earned = self.gap + Duration::from_secs_f64(self.bytes as f64 / self.min_rate as f64);
        let left = earned.saturating_sub(self.waited);
        gap.min(since + left)
    }
}

impl hyper::body::Body for SlowBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_frame(cx);
        let now = crate::clock::timer_now();
        if r.is_ready() {
            if let Some(since) = this.waiting_since.take() {
                this.waited += now.saturating_duration_since(since);
            }
            if let Poll::Ready(Some(Ok(f))) = &r {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            return r;
        }
        let since = *this.waiting_since.get_or_insert(now);
        let at = this.deadline(since);
        let timer = match &mut this.timer {
            Some(t) => {
                if t.deadline() != at {
                    t.as_mut().reset(at);
                }
                t
            }
            None => this.timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTooSlow)))),
            Poll::Pending => Poll::Pending,
        }
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Milliseconds since a connection's start, 0 meaning "not": cheap to keep in an atomic.
#[derive(Debug)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            base: crate::clock::timer_now(),
        }
    }
    pub fn now(&self) -> u64 {
        (self.base.elapsed().as_millis() as u64).saturating_add(1)
    }
    pub fn at(&self, stamp: u64) -> Instant {
        self.base + Duration::from_millis(stamp.saturating_sub(1))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// What an HTTP/2 connection has open, for its idle timeout: streams counted from their head
/// to the end of their answer, and since when none has been open.
pub struct Activity {
    clock: Clock,
    open: AtomicUsize,
    idle_since: AtomicU64,
    /// A stream was ever opened: until then the connection has the (shorter) head timeout.
    used: std::sync::atomic::AtomicBool,
    waker: AtomicWaker,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        let clock = Clock::new();
        let now = clock.now();
        Arc::new(Activity {
            clock,
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now),
            used: Default::default(),
            waker: AtomicWaker::new(),
        })
    }

    /// One stream, open until the guard is dropped.
    pub fn open(this: &Arc<Activity>) -> Open {
        this.used.store(true, Ordering::Relaxed);
        this.open.fetch_add(1, Ordering::AcqRel);
        Open(this.clone())
    }

    pub fn register(&self, cx: &Context<'_>) {
        self.waker.register(cx.waker());
    }

    /// When the connection, idle now, should close: `None` while a stream is open.
    pub fn idle_deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.clock.at(self.idle_since.load(Ordering::Acquire));
        Some(match self.used.load(Ordering::Relaxed) {
            true => since + limits.idle_timeout,
            false => since + limits.header_timeout,
        })
    }
}

/// A stream of an HTTP/2 connection, open while this lives.
pub struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.clock.now(), Ordering::Release);
        if a.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.waker.wake();
        }
    }
}

/// Whether one HTTP/2 stream's answer is waiting on the client (its flow-control window): the
/// stamp of when its last frame was handed to hyper, 0 while lb itself is waiting (for the
/// upstream) or done.
#[derive(Default)]
pub struct StreamClock {
    clock: Clock,
    handed: AtomicU64,
}

tokio::task_local! {
    /// The stream a task spawned by [`StallExec`] runs.
    static STREAM: Arc<StreamClock>;
}

/// The clock of the HTTP/2 stream this task runs, if any.
pub fn stream_clock() -> Option<Arc<StreamClock>> {
    STREAM.try_with(|c| c.clone()).ok()
}

/// hyper's executor for an HTTP/2 connection's streams: each stream's task (which polls the
/// service and then pipes the answer out) is dropped — hyper's stream reset, and the upstream
/// response it was piping dropped with it — once its answer has waited `write_timeout` on a
/// client that does not open its window.
#[derive(Clone)]
pub struct StallExec {
    pub write_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StallExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let clock = Arc::new(StreamClock::default());
        let task = Watchdog {
            inner: Box::pin(STREAM.scope(clock.clone(), fut)),
            clock,
            limit: self.write_timeout,
            timer: None,
        };
        tokio::spawn(task);
    }
}

struct Watchdog<F> {
    inner: Pin<Box<F>>,
    clock: Arc<StreamClock>,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<F: Future<Output = ()>> Future for Watchdog<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.inner.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // The answer's frames move only inside this task: whatever the stamp is now, it stays
        // until the task is polled again.
        let handed = this.clock.handed.load(Ordering::Relaxed);
        if handed == 0 {
            return Poll::Pending;
        }
        let at = this.clock.clock.at(handed) + this.limit;
        let timer = match &mut this.timer {
            Some(t) => {
                if t.deadline() != at {
                    t.as_mut().reset(at);
                }
                t
            }
            None => this.timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::debug!(
                    "HTTP/2 stream: the client took nothing for {:?}",
                    this.limit
                );
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// An HTTP/2 answer: keeps its stream open for the idle timeout and tells the stream's clock
/// when a frame waits for the client.
pub struct H2Answer {
    body: Body,
    clock: Option<Arc<StreamClock>>,
    _open: Open,
}

impl H2Answer {
    pub fn new(body: Body, open: Open) -> H2Answer {
        H2Answer {
            body,
            clock: stream_clock(),
            _open: open,
        }
    }
}

impl hyper::body::Body for H2Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_frame(cx);
        if let Some(c) = &this.clock {
            // Asked again: hyper sent what it had. A frame handed over now waits for the window.
            let handed = match &r {
                Poll::Ready(Some(Ok(_))) => c.clock.now(),
                _ => 0,
            };
            c.handed.store(handed, Ordering::Relaxed);
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// When an HTTP/1 connection's pending write began (a [`Clock`] stamp, 0: none pending).
#[derive(Default)]
pub struct WriteStall {
    clock: Clock,
    since: AtomicU64,
}

impl WriteStall {
    /// Called with every write's outcome: pending starts (or continues) a stall, done ends it.
    pub fn wrote(&self, pending: bool) {
        if !pending {
            self.since.store(0, Ordering::Relaxed);
        } else if self.since.load(Ordering::Relaxed) == 0 {
            self.since.store(self.clock.now(), Ordering::Relaxed);
        }
    }

    /// When the current stall, if any, has gone on for `limit`.
    pub fn deadline(&self, limit: Duration) -> Option<Instant> {
        match self.since.load(Ordering::Relaxed) {
            0 => None,
            s => Some(self.clock.at(s) + limit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn limits(gap_ms: u64, rate: u64) -> ConnLimits {
        ConnLimits {
            body_timeout: Duration::from_millis(gap_ms),
            body_min_rate: rate,
            ..ConnLimits::default()
        }
    }

    /// A body fed by hand: each `send` is one frame.
    fn fed() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        (tx, http_body_util::StreamBody::new(stream).boxed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_is_cut_after_the_gap() {
        let (tx, body) = fed();
        let mut b = SlowBody::new(body, &limits(1000, 0));
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        assert!(b.frame().await.unwrap().is_ok());
        let start = crate::clock::timer_now();
        let e = b.frame().await.unwrap().unwrap_err();
        assert!(is_too_slow(&*e));
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_below_the_rate_is_cut_one_above_it_is_not() {
        // 100 B/s wanted, 1 s of grace. One byte every 500 ms (2 B/s): cut once the waiting
        // passes grace + bytes/rate, a little over 1 s in.
        let (tx, body) = fed();
        let mut b = SlowBody::new(body, &limits(1000, 100));
        let feeder = tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if tx.send(Bytes::from_static(b"x")).await.is_err() {
                    return;
                }
            }
        });
        let start = crate::clock::timer_now();
        let mut got = 0;
        let cut = loop {
            match b.frame().await {
                Some(Ok(_)) => got += 1,
                Some(Err(e)) => break e,
                None => panic!("ended"),
            }
        };
        assert!(is_too_slow(&*cut));
        assert!(got <= 3, "{got} bytes before the cut");
        assert!(start.elapsed() < Duration::from_millis(1600));
        feeder.abort();

        // 200 B every 500 ms (400 B/s) is never cut.
        let (tx, body) = fed();
        let mut b = SlowBody::new(body, &limits(1000, 100));
        tokio::spawn(async move {
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = tx.send(Bytes::from(vec![b'x'; 200])).await;
            }
        });
        let mut frames = 0;
        while let Some(f) = b.frame().await {
            f.expect("never cut");
            frames += 1;
        }
        assert_eq!(frames, 40);
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_is_not_asking_is_not_the_clients() {
        let (tx, body) = fed();
        let mut b = SlowBody::new(body, &limits(1000, 0));
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(b.frame().await.unwrap().is_ok());
        // The upstream does not read for 10 s: the next bytes were there all along.
        tokio::time::sleep(Duration::from_secs(10)).await;
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        assert!(b.frame().await.unwrap().is_ok());
    }
}
