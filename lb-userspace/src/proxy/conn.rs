//! A client connection's life after accept (and TLS): which protocol it speaks, its requests,
//! and what it holds between them.
//!
//! Why connections are parked: hyper's HTTP/1 server keeps an 8 KiB read buffer (reserved again
//! while it waits for the next request) and an 8 KiB header write buffer for as long as a
//! connection lives. With thousands of idle keep-alive clients that was most of lb's memory
//! (nginx and HAProxy free their buffers between requests). So an HTTP/1 connection is served
//! one hyper connection per busy spell: when hyper has answered everything it was sent, has
//! flushed, and waits for bytes that have not come, it is asked to close *while idle* (which
//! writes nothing to the client), taken apart with [`http1::Connection::into_parts`], and only
//! the socket is kept. When the socket is readable again, a new hyper connection is built on it,
//! with any bytes hyper had read but not used replayed first ([`Prefixed`]).
//!
//! Idle is known from outside hyper by [`Turn`]: every request body read to its end, every
//! response body finished (hyper drops it once written), the last write complete and the last
//! read found nothing. A connection that cannot be shown idle (a request body left unread, the
//! client asked to close) is never parked: hyper finishes it as before.
//!
//! Upgrades (WebSocket): a hyper connection taken apart cannot fulfil hyper's own upgrade, so
//! the request carries a [`ClientUpgrade`] instead, fulfilled here with the socket once hyper
//! has written the `101`.
//!
//! HTTP/2 (prior knowledge, or ALPN `h2`) is served by hyper's h2 server for the connection's
//! whole life, as before.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body_util::BodyExt as _;
use hyper::{
    body::{Body as _, Frame, Incoming, SizeHint},
    header,
    server::conn::{http1, http2},
    Request, Response, StatusCode, Version,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
    sync::oneshot,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::model::l7::ConnLimits;

use super::{
    limits::{Activity, H2Answer, SlowBody, StallExec, WriteStall},
    tcp::Prefixed,
    Body, BoxError, Proxy, MAX_HEADER_BYTES,
};

/// The HTTP/2 connection preface: a client speaking h2c with prior knowledge starts with it.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Writing what is left (a TLS close_notify) to a client that is not reading is not waited
/// for longer than this.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client stream: a TCP stream, maybe with bytes to replay, maybe under TLS.
pub trait Socket: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The TCP stream under it, waited on while the connection is parked.
    fn tcp(&self) -> &TcpStream;
    /// Bytes already taken off the TCP stream that a read would return at once.
    fn buffered(&self) -> bool;
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
    fn buffered(&self) -> bool {
        false
    }
}

impl<S: Socket> Socket for Prefixed<S> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().tcp()
    }
    fn buffered(&self) -> bool {
        Prefixed::buffered(self) || self.get_ref().buffered()
    }
}

/// rustls decrypts every whole record it reads, and a parked connection's last read found
/// nothing: what it holds is never readable without new bytes on the TCP stream.
impl<S: Socket> Socket for tokio_rustls::server::TlsStream<S> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.tcp()
    }
    fn buffered(&self) -> bool {
        false
    }
}

/// The client side of an HTTP/1 upgrade: the connection, once the `101` is written. (Shared
/// only because request extensions must be `Clone`; one taker gets it.)
#[derive(Clone)]
pub struct ClientUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

pub type Upgraded = Box<dyn UpgradedIo>;

pub trait UpgradedIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> UpgradedIo for T {}

impl ClientUpgrade {
    /// The upgraded connection; `None` when it was not upgraded after all.
    pub async fn get(self) -> Option<Upgraded> {
        let rx = self.0.lock().ok()?.take()?;
        rx.await.ok()
    }
}

/// Who the client is, for every request of its connection.
pub struct Client {
    pub proxy: Arc<Proxy>,
    pub entrypoint: Arc<str>,
    pub peer: SocketAddr,
    pub scheme: &'static str,
    pub trusted: bool,
    /// Cancelled when the entry point drains: a parked connection closes at once, a busy one
    /// finishes the request it is on (HTTP/1 with `Connection: close`, HTTP/2 with GOAWAY).
    pub drain: CancellationToken,
    pub obs: super::obs::EntryPointObs,
    /// The entry point's bounds on what the connection may hold.
    pub limits: Arc<ConnLimits>,
    /// The certificates a TLS client presented (DER, its own first), once the handshake is
    /// done: what `passTLSClientCert` passes on.
    pub certificates: std::sync::OnceLock<ClientCertificates>,
    /// The TLS options its handshake was made under: a router answers only connections of its
    /// own (Traefik's SNI check).
    pub tls_options: std::sync::OnceLock<TlsOptionsUsed>,
}

/// The TLS options a connection's handshake was made under (their name, and what they asked
/// then), in each request's extensions on it.
#[derive(Clone, Debug)]
pub struct TlsOptionsUsed(pub Arc<str>, pub Option<Arc<crate::model::l7::TlsOptions>>);

/// A TLS client's certificate chain, in each request's extensions on its connection.
#[derive(Clone, Debug)]
pub struct ClientCertificates(pub Arc<[Vec<u8>]>);

/// Serves a client connection until it closes. `h2`: ALPN chose HTTP/2; otherwise the first
/// bytes say (the h2c preface or HTTP/1).
pub async fn serve<S: Socket>(io: S, h2: bool, client: Arc<Client>) {
    let deadline = crate::clock::timer_now() + client.limits.header_timeout;
    let mut io = Prefixed::new(io, Vec::new());
    let h2 = h2 || {
        // Nothing of hyper's exists until the client has said something.
        let sniffed = tokio::select! {
            biased;
            () = client.drain.cancelled() => return,
            r = tokio::time::timeout_at(deadline, sniff(&mut io)) => r,
        };
        match sniffed {
            Ok(Ok(h2)) => h2,
            Ok(Err(e)) => {
                debug!(peer = %client.peer, "before the first request: {e}");
                return;
            }
            Err(_) => {
                debug!(peer = %client.peer, "no request in time: closed");
                return;
            }
        }
    };
    // Boxed, each: the task keeps room only for the protocol it speaks.
    match h2 {
        true => Box::pin(http2(io, &client)).await,
        false => Box::pin(http1(io, deadline, &client)).await,
    }
}

/// Reads until the first bytes are, or cannot be, the HTTP/2 preface; they are replayed.
async fn sniff<S: Socket>(io: &mut Prefixed<S>) -> io::Result<bool> {
    let mut seen = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    while n < seen.len() && seen[..n] == H2_PREFACE[..n] {
        match io.read(&mut seen[n..]).await? {
            0 if n == 0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            0 => break,
            k => n += k,
        }
    }
    io.unread(&seen[..n]);
    Ok(seen[..] == *H2_PREFACE)
}

async fn http2<S: Socket>(io: Prefixed<S>, client: &Arc<Client>) {
    let limits = &*client.limits;
    let activity = Activity::new();
    let svc = {
        let (client, activity) = (client.clone(), activity.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            // Open from the head to the answer's end: the connection is not idle meanwhile.
            let open = Activity::open(&activity);
            let client = client.clone();
            async move {
                let req = req.map(|b| {
                    let streamed = !b.is_end_stream();
                    let b = b.map_err(|e| Box::new(e) as BoxError).boxed();
                    match streamed {
                        true => SlowBody::new(b, &client.limits).boxed(),
                        false => b,
                    }
                });
                let resp = client.handle(req).await;
                Ok::<_, Infallible>(resp.map(|b| H2Answer::new(b, open)))
            }
        })
    };
    let mut builder = http2::Builder::new(StallExec {
        write_timeout: limits.write_timeout,
    });
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(limits.h2_max_streams)
        .keep_alive_interval(limits.h2_keepalive);
    if let Some(k) = limits.h2_keepalive {
        builder.keep_alive_timeout(k);
    }
    let mut conn = builder.serve_connection(TokioIo::new(io), svc);
    let mut conn = Pin::new(&mut conn);
    let mut drained = std::pin::pin!(client.drain.cancelled());
    let mut idle = std::pin::pin!(tokio::time::sleep(limits.header_timeout));
    // Once lb has said GOAWAY for idleness, a client that does not let the connection close
    // (by not reading) is not waited for long.
    let mut closing: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut draining = false;
    let served = std::future::poll_fn(|cx| loop {
        activity.register(cx);
        if !draining && drained.as_mut().poll(cx).is_ready() {
            draining = true;
            conn.as_mut().graceful_shutdown();
        }
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if let Some(t) = &mut closing {
            if t.as_mut().poll(cx).is_ready() {
                debug!(peer = %client.peer, "HTTP/2: did not close after GOAWAY; dropped");
                return Poll::Ready(Ok(()));
            }
        }
        if draining {
            return Poll::Pending;
        }
        let Some(at) = activity.idle_deadline(limits) else {
            return Poll::Pending;
        };
        if idle.deadline() != at {
            idle.as_mut().reset(at);
        }
        if idle.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        debug!(peer = %client.peer, "HTTP/2: idle; GOAWAY");
        draining = true;
        conn.as_mut().graceful_shutdown();
        closing = Some(Box::pin(tokio::time::sleep(CLOSE_TIMEOUT)));
    })
    .await;
    if let Err(e) = served {
        debug!(peer = %client.peer, "HTTP/2 connection: {e}");
    }
}

/// HTTP/1: a hyper connection while there is something to do, only the socket in between.
async fn http1<S: Socket>(mut io: Prefixed<S>, mut deadline: Instant, client: &Arc<Client>) {
    let limits = &*client.limits;
    loop {
        if !io.buffered() {
            // Parked.
            let _idle = client.obs.parked();
            let ready = tokio::select! {
                biased;
                () = client.drain.cancelled() => Err(()),
                r = tokio::time::timeout_at(deadline, io.tcp().readable()) => match r {
                    Ok(Ok(())) => Ok(()),
                    _ => Err(()),
                },
            };
            if ready.is_err() {
                // Politely: a TLS client gets its close_notify.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, io.shutdown()).await;
                return;
            }
            // Bytes came: the head they begin has its own time from now.
            deadline = crate::clock::timer_now() + limits.header_timeout;
        }
        let turn = Arc::new(Turn::default());
        // Boxed: a parked connection's task must not keep room for a hyper connection. hyper
        // times every later request's headers itself (from when it goes idle, as before
        // connections were parked); the first request's deadline runs on from the park, in
        // `until_idle`, so a client cannot reset it by trickling bytes across two connections.
        let mut conn = Box::new(
            http1::Builder::new()
                .timer(TokioTimer::new())
                .max_buf_size(MAX_HEADER_BYTES)
                .header_read_timeout(limits.header_timeout)
                .serve_connection(
                    TokioIo::new(Watched {
                        io,
                        turn: turn.clone(),
                    }),
                    Svc {
                        client: client.clone(),
                        turn: turn.clone(),
                    },
                ),
        );
        let parked = match until_idle(&mut conn, &turn, client, deadline).await {
            Ok(Idle::Parked) => true,
            Ok(Idle::Done) => false,
            Ok(Idle::Stalled) => {
                debug!(
                    peer = %client.peer,
                    "the client took nothing for {:?}: closed", limits.write_timeout
                );
                return;
            }
            Err(e) => {
                debug!(peer = %client.peer, "connection: {e}");
                return;
            }
        };
        let parts = conn.into_parts();
        let mut rest = parts.io.into_inner().io;
        rest.unread(&parts.read_buf);
        drop(parts.read_buf);
        let upgrade = turn.upgrade.lock().ok().and_then(|mut u| u.take());
        if let Some(client_side) = upgrade {
            let _ = client_side.send(Box::new(rest));
            return;
        }
        if !parked {
            // hyper answered and is done (the client asked to close, or went away), and left
            // the closing to its owner.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, rest.shutdown()).await;
            return;
        }
        io = rest;
        deadline = crate::clock::timer_now() + limits.idle_timeout;
    }
}

type H1Conn<S> = http1::Connection<TokioIo<Watched<Prefixed<S>>>, Svc>;

/// How a hyper connection's busy spell ended.
enum Idle {
    /// Closed because it was idle: the client expects the connection to stay open.
    Parked,
    /// hyper is done with the connection (or no request came in time).
    Done,
    /// The client took none of the answer for the write timeout: abandon it.
    Stalled,
}

/// Drives a hyper connection until it is done; asks it to close once it is idle. Until its
/// first request arrives, the connection closes at `deadline`.
async fn until_idle<S: Socket>(
    conn: &mut H1Conn<S>,
    turn: &Turn,
    client: &Client,
    deadline: Instant,
) -> hyper::Result<Idle> {
    let mut drained = std::pin::pin!(client.drain.cancelled());
    let mut late = std::pin::pin!(tokio::time::sleep_until(deadline));
    let mut stall: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let (mut parking, mut draining) = (false, false);
    std::future::poll_fn(|cx| loop {
        // Woken when a body another task reads ends: that may be what makes the connection idle.
        turn.waker.register(cx.waker());
        if !draining && drained.as_mut().poll(cx).is_ready() {
            draining = true;
            Pin::new(&mut *conn).graceful_shutdown();
        }
        if !turn.answered.load(Ordering::Relaxed) && late.as_mut().poll(cx).is_ready() {
            // No request in time (hyper's own timer restarted with this connection).
            return Poll::Ready(Ok(Idle::Done));
        }
        match conn.poll_without_shutdown(cx) {
            Poll::Ready(r) => {
                return Poll::Ready(r.map(|()| match parking && !draining {
                    true => Idle::Parked,
                    false => Idle::Done,
                }))
            }
            // Asked to close while idle, hyper is done at once; if it is not, it had something
            // left to do after all, and will say `Connection: close` when it has: not a park.
            Poll::Pending if parking => {
                parking = false;
                draining = true;
                return Poll::Pending;
            }
            Poll::Pending => {}
        }
        // A write that cannot finish: the client is not reading.
        if let Some(at) = turn.stall.deadline(client.limits.write_timeout) {
            let t = stall.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if t.deadline() != at {
                t.as_mut().reset(at);
            }
            if t.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(Idle::Stalled));
            }
        }
        if draining || !turn.idle() {
            return Poll::Pending;
        }
        // Idle, hyper closes without writing anything: the next poll returns.
        parking = true;
        Pin::new(&mut *conn).graceful_shutdown();
    })
    .await
}

type SvcFuture = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

/// The requests of one hyper connection, reporting to its [`Turn`].
struct Svc {
    client: Arc<Client>,
    turn: Arc<Turn>,
}

impl hyper::service::Service<Request<Incoming>> for Svc {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = SvcFuture;

    fn call(&self, mut req: Request<Incoming>) -> SvcFuture {
        let (client, turn) = (self.client.clone(), self.turn.clone());
        // hyper parses a head only once the previous request's body has ended or been drained:
        // bodies dropped unread before this request no longer hold the connection busy.
        let abandoned = turn.abandoned.swap(0, Ordering::Relaxed);
        turn.open.fetch_sub(abandoned, Ordering::Relaxed);
        turn.open.fetch_add(1, Ordering::Relaxed);
        turn.read_waiting.store(false, Ordering::Relaxed);
        turn.answered.store(true, Ordering::Relaxed);
        if wants_close(&req) {
            turn.closing.store(true, Ordering::Relaxed);
        }
        // hyper's own upgrade cannot happen on a connection taken apart: ours replaces it.
        if req
            .extensions_mut()
            .remove::<hyper::upgrade::OnUpgrade>()
            .is_some()
        {
            let (tx, rx) = oneshot::channel();
            if let Ok(mut u) = turn.upgrade.lock() {
                *u = Some(tx);
            }
            req.extensions_mut()
                .insert(ClientUpgrade(Arc::new(Mutex::new(Some(rx)))));
        }
        let limits = client.limits.clone();
        let req = req.map(|b| {
            let streamed = !b.is_end_stream();
            let b = RequestBody::new(b, turn.clone()).boxed();
            match streamed {
                true => SlowBody::new(b, &limits).boxed(),
                false => b,
            }
        });
        Box::pin(async move {
            let resp = client.handle(req).await;
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                if let Ok(mut u) = turn.upgrade.lock() {
                    u.take();
                }
            }
            Ok(resp.map(|body| Tracked { body, turn }))
        })
    }
}

impl Client {
    async fn handle(&self, mut req: Request<Body>) -> Response<Body> {
        if let Some(c) = self.certificates.get() {
            req.extensions_mut().insert(c.clone());
        }
        if let Some(o) = self.tls_options.get() {
            req.extensions_mut().insert(o.clone());
        }
        self.proxy
            .handle(
                &self.entrypoint,
                self.peer.ip(),
                self.scheme,
                self.trusted,
                req,
            )
            .await
    }
}

/// `Connection: close`, or HTTP/1.0 without `keep-alive`: hyper closes after this answer.
fn wants_close<B>(req: &Request<B>) -> bool {
    let has = |token: &str| {
        req.headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has("close") || (req.version() == Version::HTTP_10 && !has("keep-alive"))
}

/// What the connection's task knows of hyper's progress, to tell when it is idle.
#[derive(Default)]
struct Turn {
    /// A request was taken. Before its exchange ends hyper is not idle (its keep-alive state
    /// starts busy): asked to close then, it would answer with `Connection: close`.
    answered: AtomicBool,
    /// Request bodies not yet read to their end and response bodies hyper still holds. A
    /// request body dropped before its end stays counted until the next request (hyper drains
    /// it, or closes the connection, first).
    open: AtomicUsize,
    /// Request bodies dropped before their end, forgiven at the next request.
    abandoned: AtomicUsize,
    /// The connection's task, woken when a body ends on another task.
    waker: AtomicWaker,
    /// hyper's last read found nothing (and came after the last body ended).
    read_waiting: AtomicBool,
    /// hyper's last write or flush could not finish: it still holds bytes for the client.
    write_waiting: AtomicBool,
    /// Since when that has been so.
    stall: WriteStall,
    /// A request asked to close the connection after its answer.
    closing: AtomicBool,
    /// Where the connection goes when the answer is a `101`.
    upgrade: Mutex<Option<oneshot::Sender<Upgraded>>>,
}

impl Turn {
    fn idle(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
            && self.open.load(Ordering::Relaxed) == 0
            && self.read_waiting.load(Ordering::Relaxed)
            && !self.write_waiting.load(Ordering::Relaxed)
            && !self.closing.load(Ordering::Relaxed)
    }

    fn body_done(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.read_waiting.store(false, Ordering::Relaxed);
        self.waker.wake();
    }
}

/// The socket as hyper sees it: every read and write reports to the [`Turn`].
struct Watched<S> {
    io: S,
    turn: Arc<Turn>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        this.turn
            .read_waiting
            .store(r.is_pending(), Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> Watched<S> {
    fn watch<T>(&self, r: Poll<T>) -> Poll<T> {
        self.turn
            .write_waiting
            .store(r.is_pending(), Ordering::Relaxed);
        self.turn.stall.wrote(r.is_pending());
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(r)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(r)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(r)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request body that tells the [`Turn`] when it has been read to its end.
struct RequestBody {
    body: Incoming,
    turn: Option<Arc<Turn>>,
}

impl RequestBody {
    fn new(body: Incoming, turn: Arc<Turn>) -> RequestBody {
        let turn = (!body.is_end_stream()).then(|| {
            turn.open.fetch_add(1, Ordering::Relaxed);
            turn
        });
        RequestBody { body, turn }
    }

    /// The body has ended (its last frame read, or the stream said so): hyper may go idle.
    fn ended(&mut self) {
        if let Some(t) = self.turn.take() {
            t.body_done();
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(t) = self.turn.take() {
            t.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.ended(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.ended(),
            _ => {}
        }
        r.map(|f| f.map(|f| f.map_err(|e| Box::new(e) as BoxError)))
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that tells the [`Turn`] when hyper is done with it (it drops it once
/// written, or on an error that ends the connection).
pub struct Tracked {
    body: Body,
    turn: Arc<Turn>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.turn.body_done();
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
