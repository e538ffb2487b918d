//! A backend server and the clients that talk to it, all real TCP in real namespaces.
//!
//! One server speaks two protocols on one port: HTTP (a `GET` gets "hello from NAME", on a
//! connection kept alive unless the client closes it) for curl, the proxy and the demo, and a line
//! protocol for tests: `who` answers the server's name, then every further line is echoed, so a
//! test knows which backend holds each connection and whether it still works.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::netns::Netns;

pub struct Server {
    pub name: String,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Server {
    /// Listens on `[::]:port` (IPv4 too) inside `ns`.
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Server> {
        let listener = ns.run(move || TcpListener::bind(("::", port)))??;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a, n) = (stop.clone(), accepted.clone(), name.to_string());
        let handle = std::thread::spawn(move || accept_loop(listener, &n, &s, &a));
        Ok(Server {
            name: name.into(),
            stop,
            accepted,
            handle: Some(handle),
        })
    }

    /// Closes the listener (new connections are refused); served connections go on.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }

    /// Connections accepted so far: the server's own count, to compare with the balancer's.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Counts UDP datagrams by sequence number (the first 8 bytes, big-endian): what a loss test
/// compares with what was sent.
pub struct UdpSink {
    stop: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
    handle: Option<JoinHandle<()>>,
}

impl UdpSink {
    pub fn start(ns: &Netns, bind: SocketAddr) -> Result<UdpSink> {
        let sock = ns.run(move || std::net::UdpSocket::bind(bind))??;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>> = Default::default();
        let (s, n) = (stop.clone(), seen.clone());
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::SeqCst) {
                if let Ok(len) = sock.recv(&mut buf) {
                    if len >= 8 {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or([0; 8]));
                        if let Ok(mut set) = n.lock() {
                            set.insert(seq);
                        }
                    }
                }
            }
        });
        Ok(UdpSink {
            stop,
            seen,
            handle: Some(handle),
        })
    }

    pub fn seen(&self) -> std::collections::BTreeSet<u64> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    name: &str,
    stop: &AtomicBool,
    accepted: &AtomicU64,
) -> Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(100u16))? == 0 {
            continue;
        }
        let (conn, _) = match listener.accept() {
            Ok(c) => c,
            Err(_) => continue,
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let name = name.to_string();
        std::thread::spawn(move || serve(conn, &name));
    }
    Ok(())
}

fn serve(conn: TcpStream, name: &str) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(());
    }
    // HTTP keeps the connection unless the client says otherwise: a proxy's pool reuses it.
    while line.starts_with("GET ") || line.starts_with("HEAD ") {
        let head = line.starts_with("HEAD ");
        let mut close = line.trim_end().ends_with("HTTP/1.0");
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            let h = h.to_ascii_lowercase();
            if h.starts_with("connection:") && h.contains("close") {
                close = true;
            }
        }
        let body = format!("hello from {name}\n");
        let conn = if close { "close" } else { "keep-alive" };
        let mut resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: {conn}\r\nX-Backend: {name}\r\n\r\n", body.len());
        if !head {
            resp += &body;
        }
        // One write: a head and a body in two would wait for a delayed ACK (Nagle).
        w.write_all(resp.as_bytes())?;
        line.clear();
        if close || r.read_line(&mut line)? == 0 {
            return Ok(());
        }
    }
    if line.trim() != "who" {
        return Ok(());
    }
    writeln!(w, "{name}")?;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        w.write_all(line.as_bytes())?;
    }
}

/// A client connection that knows which backend holds it.
pub struct Conn {
    pub backend: String,
    pub local: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connects (the socket is created in the calling thread's namespace) and asks `who`.
    pub fn open(vip: SocketAddr) -> Result<Conn> {
        let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
            .with_context(|| format!("connect {vip}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.set_nodelay(true)?;
        let local = s.local_addr()?;
        let mut writer = s.try_clone()?;
        let mut reader = BufReader::new(s);
        writer.write_all(b"who\n")?;
        let mut name = String::new();
        reader.read_line(&mut name)?;
        if name.is_empty() {
            bail!("connection closed before the backend named itself");
        }
        Ok(Conn {
            backend: name.trim().into(),
            local,
            reader,
            writer,
        })
    }

    /// Sends a line and checks it comes back: the connection still reaches its own backend.
    pub fn echo(&mut self, msg: &str) -> Result<()> {
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        let mut back = String::new();
        self.reader.read_line(&mut back)?;
        if back.trim() != msg {
            bail!("sent {msg:?}, got {back:?}");
        }
        Ok(())
    }
}

/// One short connection: which backend answered.
pub fn who(vip: SocketAddr) -> Result<String> {
    Conn::open(vip).map(|c| c.backend)
}

/// A minimal HTTP/1.1 request (Connection: close), for the admin API and the demo's backends.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req += &format!("Authorization: Bearer {t}\r\n");
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req += "Content-Type: application/json\r\n";
    }
    req += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
