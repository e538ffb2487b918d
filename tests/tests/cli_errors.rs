//! Expected failures of `lb run` read as errors: one `error:` line with its cause and what to do,
//! exit status 1, and no backtrace even with RUST_BACKTRACE=1 (a backtrace is for panics).
//! Runs as root (as `cargo xtask test` does): the unprivileged case drops to `nobody` itself.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("lb-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        // `nobody` must reach the config and the binary copied here.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config that `lb run` accepts: no interfaces, no VIPs, its own pin root and state directory.
fn config(dir: &Path, api: &str, pin_root: &Path) -> PathBuf {
    let path = dir.join("lb.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\ninstance = \"cli\"\npin_root = \"{}\"\nstate_dir = \"{}\"\n\n\
             [api]\nlisten = \"{api}\"\ntoken = \"cli-test-token-0123456789abcdef\"\n",
            pin_root.display(),
            dir.join("state").display()
        ),
    )
    .expect("write config");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

fn lb(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    c
}

/// Exit status 1, exactly one `error:` line that contains every one of `wants`, no backtrace.
fn assert_one_error(out: &Output, wants: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(out.status.code(), Some(1), "exit status; stderr:\n{stderr}");
    assert_eq!(errors.len(), 1, "one error line; stderr:\n{stderr}");
    for w in wants {
        assert!(errors[0].contains(w), "{w:?} missing from {:?}", errors[0]);
    }
    let lower = stderr.to_lowercase();
    assert!(
        !lower.contains("backtrace") && !lower.contains("panicked"),
        "a backtrace or panic on an expected failure:\n{stderr}"
    );
}

#[test]
fn a_bad_config_is_one_error_line_with_file_line_and_field() {
    let dir = TempDir::new("bad");
    let path = dir.0.join("bad.toml");
    std::fs::write(
        &path,
        "[agent]\ninstance = \"cli\"\n\n[[vip]]\nname = \"web\"\naddress = \"10.0.1.x\"\nport = 80\n",
    )
    .expect("write");
    let out = lb(&lb_tests::lab::lb_bin())
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .expect("run lb");
    assert_one_error(&out, &["bad.toml:6", "address", "10.0.1.x"]);
}

#[test]
fn a_port_in_use_is_one_error_line_and_touches_no_dataplane() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = TempDir::new("port");
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/lb-test-cli-{}", std::process::id()));
    let cfg = config(&dir.0, &addr, &pin_root);
    let out = lb(&lb_tests::lab::lb_bin())
        .args(["run", "-c"])
        .arg(&cfg)
        .output()
        .expect("run lb");
    let pinned = pin_root.exists();
    let _ = std::fs::remove_dir_all(&pin_root);
    assert_one_error(&out, &["admin API", &addr, "[api] listen"]);
    assert!(!pinned, "a failed start created {}", pin_root.display());
}

#[test]
fn without_privileges_is_one_error_line_saying_run_as_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test drops from root to nobody: run it as root (cargo xtask test does)"
    );
    let dir = TempDir::new("nobody");
    // The build's binary may sit under a directory nobody cannot enter (/root).
    let bin = dir.0.join("lb");
    std::fs::copy(lb_tests::lab::lb_bin(), &bin).expect("copy lb");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let pin_root = PathBuf::from(format!(
        "/sys/fs/bpf/lb-test-cli-nobody-{}",
        std::process::id()
    ));
    let cfg = config(&dir.0, "127.0.0.1:0", &pin_root);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["run", "-c"])
        .arg(&cfg)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux)");
    let _ = std::fs::remove_dir_all(&pin_root);
    assert_one_error(&out, &["CAP_BPF", "run it as root"]);
}
