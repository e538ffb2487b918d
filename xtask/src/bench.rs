//! `cargo xtask bench [--quick]`: installs the load generators and the proxies lb is compared
//! with (the bench group of [`crate::packages`]), builds everything in release, runs the Maglev criterion bench, then `lb-bench`, which
//! prints the tables and writes `<target>/bench/bench.json` and `<target>/bench/BENCHMARKS.md`.
//!
//! Namespaces and pins of the benchmark are all named `lbb-…`; they are removed before and after
//! the run (after a failure too), together with any process still inside those namespaces.

use std::{env, path::PathBuf, process::Command};

use anyhow::Result;

use crate::{cargo, ensure_toolchain, output, packages::Group, preflight, root, run};

pub fn bench(quick: bool, only: Option<String>) -> Result<()> {
    preflight(&[Group::Build, Group::Run, Group::Bench])?;
    ensure_toolchain()?;
    run(cargo().args(["build", "--release", "--bins"]))?;
    run(cargo().args(["build", "--release", "-p", "lb-bench"]))?;
    let target = target_dir();
    let sections: Vec<String> = only
        .as_deref()
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let wants = |s: &str| sections.is_empty() || sections.iter().any(|x| x == s);
    if wants("control") {
        eprintln!("xtask: Maglev build times (criterion)");
        let mut c = cargo();
        c.args([
            "bench",
            "-p",
            "lb-userspace",
            "--bench",
            "maglev",
            "--",
            "--noplot",
        ]);
        if quick {
            c.args([
                "--warm-up-time",
                "1",
                "--measurement-time",
                "2",
                "--sample-size",
                "10",
            ]);
        }
        run(&mut c)?;
    }
    let mut command = String::from("cargo xtask bench");
    if quick {
        command += " --quick";
    }
    if let Some(o) = &only {
        command += &format!(" --only {o}");
    }
    clean_leftovers();
    let mut c = Command::new(target.join("release/lb-bench"));
    c.current_dir(root())
        .arg("--out")
        .arg(target.join("bench"))
        .arg("--lb-bin")
        .arg(target.join("release/lb"))
        .arg("--criterion")
        .arg(target.join("criterion"))
        .args(["--command", &command]);
    if quick {
        c.arg("--quick");
    }
    if let Some(o) = &only {
        c.args(["--only", o]);
    }
    let result = run(&mut c);
    clean_leftovers();
    result
}

/// Where cargo puts its output: `CARGO_TARGET_DIR`, else `<workspace>/target`.
fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root().join(p) })
        .unwrap_or_else(|| root().join("target"))
}

/// Removes the benchmark's namespaces (killing, by pid, whatever still runs inside them) and pins.
pub fn clean_leftovers() {
    if let Some(list) = output(Command::new("ip").args(["netns", "list"])) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if !ns.starts_with("lbb-") {
                continue;
            }
            if let Some(pids) = output(Command::new("ip").args(["netns", "pids", ns])) {
                for pid in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill has no memory preconditions; the pid was listed in our namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with("lbb-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
