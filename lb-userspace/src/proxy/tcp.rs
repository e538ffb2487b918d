//! TCP routers (Traefik's `HostSNI` routers): connections routed by the TLS server name before
//! anything answers them, then relayed as bytes — passed through still encrypted (the upstream
//! holds the certificate), decrypted here with lb's certificates (the upstream speaks plain TCP),
//! or relayed as they come (plain TCP, where there is no name to route on).
//!
//! Why a connection is read before it is served: the server name is in the client's first
//! bytes, and on an entry point that also has HTTP routers the same connection may yet be
//! HTTP. So the first bytes are read into a copy — bounded ([`PEEK_LIMIT`]) and timed
//! ([`PEEK_TIMEOUT`]), so a silent or slow client cannot hold memory or a task for long — parsed
//! by [`client_hello`], and replayed to whoever gets the connection: the upstream (passthrough),
//! rustls (termination), or the HTTP path ([`Prefixed`]). When nothing on an entry point needs
//! the bytes (only plain routers), nothing is read first: server-first protocols (SMTP, MySQL)
//! work.
//!
//! Routes live in the routing table next to the HTTP routes and share its upstream pools, so a
//! reload or a registry change swaps both at once, and an upstream's passive health (connect
//! failures) is the same whether HTTP or TCP found it failing. Nothing is kept per client: a
//! connection's state is its task.

pub mod client_hello;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::{
    balance::{Pool, Upstream},
    rule::ConnView,
    EntryPointSpec, Proxy, TlsConfig,
};
use crate::model::l7::{Passive, TcpRouterSpec, TlsMode};
use client_hello::{ClientHello, Parsed};

/// The most bytes read from a client before a route is chosen.
pub const PEEK_LIMIT: usize = 16 * 1024;
/// How long a client has to send them.
pub const PEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting to an upstream (as the HTTP client does).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A TLS handshake with lb (termination).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstreams tried for one connection when connecting fails.
const MAX_ATTEMPTS: usize = 4;

/// The ALPN protocol of ACME's TLS-ALPN-01 validations (RFC 8737).
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

pub(super) struct TcpRoute {
    spec: TcpRouterSpec,
    priority: i64,
}

/// TCP routes per entry point, highest priority first (ties by name).
#[derive(Default)]
pub(super) struct Routes(HashMap<String, Vec<Arc<TcpRoute>>>);

impl Routes {
    pub(super) fn build(entrypoints: &[EntryPointSpec], routers: &[TcpRouterSpec]) -> Routes {
        let built = routers
            .iter()
            .map(|r| {
                Arc::new(TcpRoute {
                    spec: r.clone(),
                    priority: r.priority.unwrap_or(r.rule.default_priority),
                })
            })
            .collect();
        let by_ep = super::per_entrypoint(entrypoints, built, |r: &TcpRoute| {
            (&r.spec.entrypoints[..], r.priority, r.spec.name.as_str())
        });
        Routes(by_ep)
    }
}

/// Connections in progress per (TCP router, client address), for `inFlightConn`. It lives in the
/// proxy, not the table, so a reload (a new table) does not reset what is counted.
#[derive(Default)]
pub struct InFlightConns(std::sync::Mutex<HashMap<(String, std::net::IpAddr), u32>>);

/// One connection counted until it ends.
pub struct Held<'a> {
    of: &'a InFlightConns,
    key: (String, std::net::IpAddr),
}

impl InFlightConns {
    /// Counts one more of `router`'s connections from `ip`, unless `max` are open already.
    fn take(&self, router: &str, ip: std::net::IpAddr, max: u32) -> Option<Held<'_>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (router.to_string(), ip);
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Held { of: self, key })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut m = self.of.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// A stream whose first bytes were already read: they are read again first. This is how a
/// connection inspected for its ClientHello reaches rustls or hyper as if untouched.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(inner: S, prefix: Vec<u8>) -> Prefixed<S> {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }

    /// Puts bytes back in front of what is still to be replayed: a reader that took more than
    /// it used (hyper's read buffer) hands the rest on this way.
    pub fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut prefix = Vec::with_capacity(bytes.len() + self.prefix.len() - self.at);
        prefix.extend_from_slice(bytes);
        prefix.extend_from_slice(&self.prefix[self.at..]);
        self.prefix = prefix;
        self.at = 0;
    }

    /// Bytes to replay before the stream is read again.
    pub fn buffered(&self) -> bool {
        self.at < self.prefix.len()
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = this.prefix.get(this.at..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.at += n;
            if this.at >= this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What the first bytes of a connection turned out to be.
enum Seen {
    Hello(ClientHello),
    /// Not TLS.
    Plain,
    /// Nothing yet: nothing was needed, or the client sent nothing in time.
    Silent,
    /// Closed (or failed) before saying enough.
    Gone,
    /// TLS that can never be a valid ClientHello, or too slow or too large to become one.
    Bad(&'static str),
}

/// Reads until the first bytes are a whole ClientHello or clearly something else.
/// `buf` holds what was read already (the bytes after a PROXY header).
async fn inspect(stream: &mut TcpStream, mut buf: Vec<u8>) -> (Vec<u8>, Seen) {
    let deadline = crate::clock::timer_now() + PEEK_TIMEOUT;
    loop {
        match client_hello::parse(&buf) {
            Parsed::NeedMore if buf.len() >= PEEK_LIMIT => {
                return (buf, Seen::Bad("no ClientHello in the first 16 KiB"))
            }
            Parsed::NeedMore => {}
            Parsed::NotTls => return (buf, Seen::Plain),
            Parsed::Hello(h) => return (buf, Seen::Hello(h)),
            Parsed::Malformed(why) => return (buf, Seen::Bad(why)),
        }
        let room = PEEK_LIMIT - buf.len();
        buf.reserve(room.min(4096));
        let mut limited = (&mut *stream).take(room as u64);
        match tokio::time::timeout_at(deadline, limited.read_buf(&mut buf)).await {
            Err(_) if buf.is_empty() => return (buf, Seen::Silent),
            Err(_) => return (buf, Seen::Bad("ClientHello not complete in time")),
            Ok(Err(_)) | Ok(Ok(0)) => return (buf, Seen::Gone),
            Ok(Ok(_)) => {}
        }
    }
}

/// The TCP routers' turn at a freshly accepted connection of `entrypoint`, `read` its bytes
/// read already. Returns the connection (with whatever was read from it replayed) when it is for
/// the HTTP routers; `None` when a TCP router served it, or it was closed. `peer` is the
/// client's address (a PROXY header's, where the entry point believes one).
pub(super) async fn intercept(
    proxy: &Proxy,
    entrypoint: &str,
    mut stream: TcpStream,
    read: Vec<u8>,
    peer: SocketAddr,
    tls: Option<&TlsConfig>,
) -> Option<Prefixed<TcpStream>> {
    let table = proxy.table.load_full();
    let Some(routes) = table.tcp.0.get(entrypoint).filter(|r| !r.is_empty()) else {
        return Some(Prefixed::new(stream, read));
    };
    let http = table.routes.get(entrypoint).is_some_and(|r| !r.is_empty());
    // Only a ClientHello or an HTTP request can change the choice: without TLS routers and
    // HTTP routers, the client's bytes are not waited for.
    let needs_bytes = http || routes.iter().any(|r| r.spec.tls != TlsMode::Plain);
    let (prefix, seen) = match needs_bytes {
        true => inspect(&mut stream, read).await,
        false => (read, Seen::Silent),
    };
    // An ACME TLS-ALPN-01 validation is about lb's own certificates: on an entry point where
    // lb terminates TLS it goes to lb's TLS path, never to a TCP router (as in Traefik).
    if let (Seen::Hello(h), Some(_)) = (&seen, tls) {
        if h.alpn.iter().any(|p| p.as_slice() == ACME_TLS_ALPN) {
            return Some(Prefixed::new(stream, prefix));
        }
    }
    let client_ip = peer.ip();
    let route = match &seen {
        Seen::Hello(h) => {
            let view = ConnView {
                sni: h.sni.as_deref(),
                alpn: &h.alpn,
                client_ip,
            };
            routes
                .iter()
                .find(|r| r.spec.tls != TlsMode::Plain && r.spec.rule.matches(&view))
        }
        Seen::Plain | Seen::Silent => {
            let view = ConnView {
                sni: None,
                alpn: &[],
                client_ip,
            };
            routes
                .iter()
                .find(|r| r.spec.tls == TlsMode::Plain && r.spec.rule.matches(&view))
        }
        Seen::Gone => return None,
        Seen::Bad(why) => {
            debug!(entrypoint, %peer, "closed: {why}");
            return None;
        }
    };
    let Some(route) = route.cloned() else {
        if http {
            return Some(Prefixed::new(stream, prefix));
        }
        if let Seen::Hello(h) = &seen {
            let sni = h.sni.as_deref().unwrap_or("");
            debug!(entrypoint, %peer, sni, "no TCP router matches: closed");
        } else {
            debug!(entrypoint, %peer, "no TCP router for plain TCP: closed");
        }
        return None;
    };
    // The router's guards, before anything is relayed: a client they refuse is closed.
    let ip = client_ip.to_canonical();
    let guards = &route.spec.guards;
    if !guards
        .allow
        .iter()
        .all(|l| l.iter().any(|n| n.contains(&ip)))
    {
        debug!(entrypoint, %peer, router = route.spec.name, "not in the router's ipAllowList: closed");
        return None;
    }
    let _held = match guards.in_flight_per_ip {
        None => None,
        Some(max) => match proxy.tcp_in_flight.take(&route.spec.name, ip, max) {
            Some(held) => Some(held),
            None => {
                debug!(entrypoint, %peer, router = route.spec.name, max, "inFlightConn: at the limit for this address: closed");
                return None;
            }
        },
    };
    let (pool, spec) = table
        .service(&route.spec.service)
        .map(|s| (s.pool.clone(), s.spec.clone()))?;
    // The router's TLS options, for a handshake lb makes (none when they are broken or gone).
    let name: Arc<str> = route
        .spec
        .tls_options
        .as_deref()
        .unwrap_or(crate::model::l7::DEFAULT_TLS_OPTIONS)
        .into();
    let options = table.tls_named(name);
    drop(table);
    let router = route.spec.name.as_str();
    match route.spec.tls {
        TlsMode::Plain | TlsMode::Passthrough => {
            relay(stream, &prefix, &pool, &spec.passive, router).await;
        }
        TlsMode::Terminate => {
            let Some(config) = tls else {
                warn!(
                    router,
                    entrypoint, "tls = \"terminate\" on an entry point without certificates"
                );
                return None;
            };
            // The entry point's certificates and client verification, without its HTTP ALPN
            // protocols: what runs inside is not HTTP, so no protocol is negotiated.
            let base = config.load_full();
            let server = match &options {
                Ok((_, None)) => base.config(),
                Ok((name, Some(o))) => match base.config_for(name, o) {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(router, "no TLS handshake under {e:#}");
                        return None;
                    }
                },
                Err(why) => {
                    warn!(router, "no TLS handshake: {why}");
                    return None;
                }
            };
            let mut server = (*server).clone();
            server.alpn_protocols.clear();
            let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server))
                .accept(Prefixed::new(stream, prefix));
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(tls_stream)) => relay(tls_stream, &[], &pool, &spec.passive, router).await,
                Ok(Err(e)) => debug!(router, %peer, "TLS handshake: {e}"),
                Err(_) => debug!(router, %peer, "TLS handshake timed out"),
            }
        }
    }
    None
}

/// Connects to an upstream of the pool (another one after a failure, up to [`MAX_ATTEMPTS`]),
/// sends `prefix`, then copies bytes both ways until both sides are done; a side that closes
/// its writing half has the other side's closed too (half-close), the rest keeps flowing.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    prefix: &[u8],
    pool: &Pool,
    passive: &Passive,
    router: &str,
) {
    let Some((mut up, upstream)) = connect(pool, passive, router).await else {
        debug!(router, "no upstream reachable: closed");
        return;
    };
    let _in_flight = Upstream::start(&upstream);
    if !prefix.is_empty() {
        if let Err(e) = up.write_all(prefix).await {
            debug!(router, upstream = %upstream.addr, "relay: {e}");
            return;
        }
    }
    match tokio::io::copy_bidirectional(&mut client, &mut up).await {
        Ok((to_up, to_client)) => {
            debug!(router, upstream = %upstream.addr, to_up, to_client, "relay done")
        }
        Err(e) => debug!(router, upstream = %upstream.addr, "relay: {e}"),
    }
}

/// A connection to an upstream of `pool`. A failure to connect counts for passive health (as an
/// HTTP connect error does) and the next attempt prefers an upstream not yet tried.
async fn connect(
    pool: &Pool,
    passive: &Passive,
    router: &str,
) -> Option<(TcpStream, Arc<Upstream>)> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    for _ in 0..pool.len().min(MAX_ATTEMPTS) {
        let now = crate::clock::now();
        let picked = (0..4)
            .filter_map(|_| pool.pick(now, &mut || crate::clock::random::<u64>()))
            .find(|u| !tried.contains(&u.addr));
        let upstream = picked?;
        let started = crate::clock::now();
        let error =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream.addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    upstream.record(true, started.elapsed(), passive, crate::clock::now());
                    return Some((s, upstream));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
        warn!(router, upstream = %upstream.addr, "connect: {error}");
        upstream.record(false, started.elapsed(), passive, crate::clock::now());
        tried.push(upstream.addr);
    }
    None
}
