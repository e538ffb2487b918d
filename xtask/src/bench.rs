//! `cargo xtask bench [--quick] [--only …] [--baseline <commit>]`: installs the load generators and the proxies lb is compared
//! with (the bench group of [`crate::packages`]), builds everything in release, runs the Maglev criterion bench, then `lb-bench`, which
//! prints the tables and writes `<target>/bench/bench.json` and `<target>/bench/BENCHMARKS.md`.
//!
//! `--baseline` builds another commit's `lb` (from `git archive`, with its own target directory
//! under `target/bench-baseline/`) and runs its XDP object and its binary beside this tree's, in the
//! same interleaved rounds, so a refactor can show it costs nothing.
//!
//! Namespaces and pins of the benchmark are all named `lbb-…`; they are removed before and after
//! the run (after a failure too), together with any process still inside those namespaces.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, ensure_toolchain, output, packages::Group, preflight, root, run};

pub fn bench(quick: bool, only: Option<String>, baseline: Option<String>) -> Result<()> {
    preflight(&[Group::Build, Group::Run, Group::Bench])?;
    ensure_toolchain()?;
    run(cargo().args(["build", "--release", "--bins"]))?;
    run(cargo().args(["build", "--release", "-p", "lb-bench"]))?;
    let target = target_dir();
    let baseline = baseline
        .map(|rev| build_baseline(&target, &rev))
        .transpose()?;
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
    if let Some(b) = &baseline {
        command += &format!(" --baseline {}", b.name);
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
    if let Some(b) = &baseline {
        c.arg("--baseline-name")
            .arg(&b.name)
            .arg("--baseline-bin")
            .arg(&b.bin)
            .arg("--baseline-object")
            .arg(&b.object);
    }
    let result = run(&mut c);
    clean_leftovers();
    result
}

/// Another commit's release build: its `lb` and the XDP object built into it.
struct Baseline {
    /// The commit as given (a short hash reads best in the tables).
    name: String,
    bin: PathBuf,
    object: PathBuf,
}

/// Extracts `rev` with `git archive` (no worktree to clean up) into
/// `target/bench-baseline/<commit>/src` once, then builds it there in release with a target
/// directory of its own, so neither build invalidates the other's cache.
fn build_baseline(target: &Path, rev: &str) -> Result<Baseline> {
    let commit = output(
        Command::new("git")
            .current_dir(root())
            .args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("{rev}^{{commit}}")),
    )
    .map(|c| c.trim().to_string())
    .filter(|c| !c.is_empty())
    .with_context(|| format!("--baseline {rev}: not a commit of this repository"))?;
    let base = target.join("bench-baseline").join(&commit);
    let src = base.join("src");
    let marker = src.join(".lb-baseline-commit");
    if fs::read_to_string(&marker).ok().as_deref() != Some(commit.as_str()) {
        let _ = fs::remove_dir_all(&src);
        fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
        eprintln!("xtask: extracting {rev} ({commit}) into {}", src.display());
        let mut archive = Command::new("git")
            .current_dir(root())
            .args(["archive", "--format=tar", &commit])
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning git archive")?;
        let stdout = archive.stdout.take().context("git archive's stdout")?;
        let untar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&src)
            .stdin(stdout)
            .status()
            .context("spawning tar")?;
        let archived = archive.wait().context("waiting for git archive")?;
        if !archived.success() || !untar.success() {
            bail!("extracting {commit} failed (git archive {archived}, tar {untar})");
        }
        fs::write(&marker, &commit)?;
    }
    eprintln!("xtask: building the baseline {rev} in release");
    let out = base.join("target");
    run(cargo()
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &out)
        .args(["build", "--release", "--bins", "-p", "lb-userspace"]))?;
    let bin = out.join("release/lb");
    // The build script's OUT_DIR holds the object the binary embeds; after rebuilds there can be
    // several, and the newest is the one the binary was linked with.
    let object = fs::read_dir(out.join("release/build"))
        .context("the baseline's build directory")?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("lb-userspace-"))
        .map(|e| e.path().join("out/lb"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .context(
            "the baseline's build produced no XDP object (release/build/lb-userspace-*/out/lb)",
        )?;
    Ok(Baseline {
        name: rev.to_string(),
        bin,
        object,
    })
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
