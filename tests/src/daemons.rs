//! Real servers the tests start on free loopback ports — redis-server and etcd — each in its
//! own temporary directory and killed (and reaped) when its guard drops, also on failure.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// How long a server has to answer after it starts.
const WAIT: Duration = Duration::from_secs(10);

/// A loopback port free for TCP and UDP alike, taken from below the kernel's ephemeral range.
/// A port from `bind(:0)` is one the kernel may hand out again, to any `connect()` or `bind(:0)`
/// in the time between this call and the daemon's own bind, and then the daemon dies with
/// "address in use" (CI saw pebble's management port go that way). Ports under the range are
/// never given out implicitly; the start point moves with the pid so concurrent test processes
/// rarely probe the same ones.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const FLOOR: u32 = 10_000;
    if low > FLOOR + 1_000 {
        let span = low - FLOOR;
        let base = std::process::id().wrapping_mul(7919);
        for _ in 0..span {
            let port = FLOOR + base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if TcpListener::bind(("127.0.0.1", port)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    // The range starts too low to leave room below it: the kernel's choice, with the race.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "lb-test-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process: killed (and reaped) on drop, restartable with the same arguments. Declared
/// after its TempDir where both live in one scope, so it dies before the directory goes.
pub struct Server {
    program: &'static str,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    ready: fn(u16) -> bool,
    pub port: u16,
}

impl Server {
    pub fn start(
        program: &'static str,
        args: Vec<String>,
        log: PathBuf,
        port: u16,
        ready: fn(u16) -> bool,
    ) -> Server {
        let mut s = Server {
            program,
            args,
            log,
            child: None,
            ready,
            port,
        };
        s.restart();
        s
    }

    /// Starts the process (again) and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let child = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} (is it installed?)", self.program));
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while !(self.ready)(self.port) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "{} exited ({status}): {}",
                    self.program,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {WAIT:?}: {}",
                self.program,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn redis_ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

pub fn etcd_ready(port: u16) -> bool {
    etcd_healthy(&format!("http://127.0.0.1:{port}/health"))
}

/// etcd's `/health` at `url` says it is.
pub fn etcd_healthy(url: &str) -> bool {
    ureq::get(url)
        .timeout(Duration::from_secs(1))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .is_some_and(|b| b.contains("\"true\""))
}

/// A redis-server on its own port, without persistence (a restart comes back empty).
pub fn start_redis(dir: &Path) -> Server {
    let port = free_port();
    let args = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        &dir.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    Server::start(
        "redis-server",
        args,
        dir.join("redis.log"),
        port,
        redis_ready,
    )
}

/// A single-member etcd with its data directory under `dir` (a restart keeps the state).
pub fn start_etcd(dir: &Path) -> Server {
    let (port, peer) = (free_port(), free_port());
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{peer}");
    let args = vec![
        "--name".into(),
        "lbtest".into(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--listen-client-urls".into(),
        client.clone(),
        "--advertise-client-urls".into(),
        client,
        "--listen-peer-urls".into(),
        peer.clone(),
        "--initial-advertise-peer-urls".into(),
        peer.clone(),
        "--initial-cluster".into(),
        format!("lbtest={peer}"),
    ];
    Server::start(
        "/usr/bin/etcd",
        args,
        dir.join("etcd.log"),
        port,
        etcd_ready,
    )
}
