//! Out of file descriptors, an entry point backs off instead of spinning on `accept`, and serves
//! again once descriptors are free. Its own test binary: it lowers this process's descriptor
//! limit, which would starve any test running beside it.
#![allow(clippy::disallowed_methods)] // tests drive real time

use std::{
    collections::HashMap,
    io::{Read, Write},
    time::Duration,
};

mod common;
use common::*;

fn nofile() -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    assert_eq!(rc, 0, "getrlimit");
    r
}

fn set_nofile(soft: u64, hard: u64) {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct; lowering the soft limit needs no privilege.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    assert_eq!(rc, 0, "setrlimit");
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count() as u64
}

#[tokio::test]
async fn accept_backs_off_when_descriptors_run_out_and_recovers() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let app = upstream("app").await;
    let svcs = services(&[("app", &[(app, 1)])]);
    let routers = vec![router("app", "Host(`app.test`)", "app", None)];
    let (_proxy, addr) = start_with(routers, &svcs, HashMap::new()).await;
    // Warm: the proxy has its upstream connection pool and its listener; one request through.
    let c = client();
    assert_eq!(get(&c, addr, "app.test", "/warm", &[]).await.0, 200);
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let before = nofile();
    // Room for exactly one more descriptor: the client's socket. The proxy's accept of it then
    // finds none left (EMFILE) while the connection waits in the listener's backlog.
    // (`open_fds` counts the directory it reads, closed again when it returns.)
    set_nofile(open_fds(), before.rlim_max);
    let connected = std::net::TcpStream::connect(addr);
    let warnings = |c: &Captured| c.text().matches("accept:").count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let in_a_second = warnings(&captured);
    set_nofile(before.rlim_cur, before.rlim_max);
    eprintln!("accept failed {in_a_second} times in a second");
    let mut stream = connected.expect("the client's socket (the one descriptor left)");
    assert!(
        (3..=40).contains(&in_a_second),
        "accept failed {in_a_second} times in a second: it must retry, 50 ms apart, not spin"
    );

    // Descriptors are back: the connection that waited in the backlog is served.
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let answer = tokio::task::spawn_blocking(move || {
        stream
            .write_all(b"GET /after HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    })
    .await
    .expect("client");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
