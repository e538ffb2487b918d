//! `cargo xtask build|run|test|demo|bench|fresh-check`: the project's only entry points.
//!
//! Everything a new machine lacks is installed here, with one line saying what and why, and
//! everything that cannot be had fails with one `error:` line saying what to do: the system
//! packages of [`packages`], the pinned nightly with `rust-src`, and `bpf-linker` built against
//! that nightly's own LLVM (so their LLVM majors always match; see ../shared/TOOLCHAIN.md).

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use packages::Group;

mod bench;
mod fresh;
mod packages;

/// Must match `EBPF_TOOLCHAIN` in lb-userspace/build.rs.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the XDP programs and the agent.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the agent as root with CONFIG; with no config, run the demo.
    Run { config: Option<PathBuf> },
    /// Unit, packet (BPF_PROG_TEST_RUN) and end-to-end (namespaces) tests, then `demo --check`.
    Test,
    /// Namespaces with a client, the balancer and three HTTP backends; Ctrl-C tears it down.
    Demo {
        /// Non-interactive: send requests, assert every backend answered, tear down.
        #[arg(long)]
        check: bool,
    },
    /// Benchmarks (XDP ns/packet, L7 vs nginx/HAProxy, control plane, end to end vs nftables):
    /// prints the tables, writes target/bench/{bench.json,BENCHMARKS.md}. Installs its tools.
    Bench {
        /// Fewer rounds and shorter runs (a few minutes).
        #[arg(long)]
        quick: bool,
        /// Only these sections, comma-separated: xdp, l7, control, e2e.
        #[arg(long)]
        only: Option<String>,
        /// A commit whose build runs as an extra contender in the XDP and L7 sections
        /// (its XDP object and its `lb` binary, built from `git archive` under target/).
        #[arg(long)]
        baseline: Option<String>,
    },
    /// The long fuzz modes: `--packets N` runs the packet fuzzer (root) on N random frames
    /// through BPF_PROG_TEST_RUN; `--parsers` runs every cargo-fuzz target in fuzz/ for
    /// `--minutes` each (installs cargo-fuzz). Neither flag: both. `cargo xtask test` runs a
    /// bounded sample of the first and replays the second's corpora.
    Fuzz {
        /// Frames for the packet fuzzer.
        #[arg(long)]
        packets: Option<u64>,
        /// The parser targets under libFuzzer.
        #[arg(long)]
        parsers: bool,
        /// Minutes per parser target.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Replay a packet run: the seed a failure printed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// The reload soak's long mode (root): CHANGES configuration changes (file and API, L4 and
    /// L7) under wrk and TCP flows through the XDP tier; `cargo xtask test` runs 100.
    Soak {
        #[arg(long, default_value_t = 1000)]
        changes: u32,
    },
    /// From nothing: a debootstrapped Debian 12 root with only the README's prerequisites, where
    /// the README's two commands run as written (tens of minutes; never beside the host's tests).
    FreshCheck {
        /// Where the root is built (default: target/fresh-check); removed first.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Skip `cargo xtask test` inside the root (the demo only).
        #[arg(long)]
        demo_only: bool,
    },
}

/// Expected failures (a missing tool, not root, a failed test) are one `error:` line with their
/// causes, whatever RUST_BACKTRACE says: a backtrace is for panics.
fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd.unwrap_or(Cmd::Run { config: None }) {
        Cmd::Build { release } => build(release),
        Cmd::Run { config: Some(c) } => {
            preflight(&[Group::Build, Group::Run])?;
            build(false)?;
            let c = c
                .canonicalize()
                .with_context(|| format!("config {}", c.display()))?;
            run(Command::new(lb_bin()).arg("run").arg("--config").arg(c))
        }
        Cmd::Run { config: None } => demo(false),
        Cmd::Demo { check } => demo(check),
        Cmd::Test => test(),
        Cmd::Bench {
            quick,
            only,
            baseline,
        } => bench::bench(quick, only, baseline),
        Cmd::Fuzz {
            packets,
            parsers,
            minutes,
            seed,
        } => {
            let both = packets.is_none() && !parsers;
            if let Some(n) = packets.or(both.then_some(1_000_000)) {
                fuzz_packets(n, seed)?;
            }
            if parsers || both {
                fuzz_parsers(minutes)?;
            }
            Ok(())
        }
        Cmd::Soak { changes } => soak(changes),
        Cmd::FreshCheck { dir, demo_only } => fresh::check(dir, demo_only),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn lb_bin() -> PathBuf {
    root().join("target/debug/lb")
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs `cmd`; a failure names the program and its arguments (cargo's own output above it says
/// what went wrong).
fn run(cmd: &mut Command) -> Result<()> {
    let status: ExitStatus = cmd
        .status()
        .with_context(|| format!("spawning {}", show(cmd)))?;
    if !status.success() {
        bail!(
            "`{}` failed ({status}); its output above says why",
            show(cmd)
        );
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn require_root() -> Result<()> {
    if !is_root() {
        bail!("this needs root (loading XDP programs and creating network namespaces need CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN): run it again with sudo");
    }
    Ok(())
}

/// The pinned nightly with rust-src, and bpf-linker paired with its LLVM.
fn ensure_toolchain() -> Result<()> {
    let sysroot =
        output(Command::new("rustup").args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"]));
    let has_src = sysroot
        .as_deref()
        .map(|s| {
            Path::new(s.trim())
                .join("lib/rustlib/src/rust/library/core")
                .exists()
        })
        .unwrap_or(false);
    if !has_src {
        eprintln!("xtask: installing the eBPF toolchain {EBPF_TOOLCHAIN} with rust-src (one time, ~15 s)…");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--no-self-update",
        ]))
        .context("installing the eBPF toolchain (rustup must reach static.rust-lang.org)")?;
    }
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against {EBPF_TOOLCHAIN}'s LLVM (one time, ~1 min)…");
    let sysroot =
        output(Command::new("rustup").args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"]))
            .context("cannot find the eBPF toolchain's sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so")))
        .context("no libLLVM in the eBPF toolchain")?;
    let major: String = llvm
        .trim_start_matches("libLLVM.so.")
        .trim_start_matches("libLLVM-")
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    // bpf-linker keeps this folder as its RUNPATH: it must outlive `cargo clean`.
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = cargo_home.join("lb-bpf-llvm").join(EBPF_TOOLCHAIN);
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".to_string(), llvm.clone()] {
        let link = prefix_lib.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)?;
    }
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .env("LD_LIBRARY_PATH", &lib)
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ]))
    .context("building bpf-linker")
}

fn build(release: bool) -> Result<()> {
    packages::ensure(&[Group::Build])?;
    ensure_toolchain()?;
    let mut c = cargo();
    c.args(["build", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

/// Root, a kernel with BPF, and the system packages of `groups` (installed when missing).
/// bpffs is mounted by the agent and the tests when absent.
fn preflight(groups: &[Group]) -> Result<()> {
    require_root()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() && !Path::new("/sys/fs/bpf").exists() {
        bail!("this kernel shows no BPF support (/sys/fs/bpf and /sys/kernel/btf/vmlinux are both missing): lb needs Linux with BPF and XDP (5.15 or later; tested on 6.18)");
    }
    packages::ensure(groups)
}

/// Removes what an interrupted earlier run may have left: test namespaces and pin roots.
fn clean_leftovers() {
    if let Some(list) = output(Command::new("ip").args(["netns", "list"])) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with("lbt-") || ns.starts_with("lbdemo-") {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("lb-test-") || n.starts_with("lbt-") || n.starts_with("lbdemo-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Wall-clock time of each phase, printed as they end and again as a total, also after a failure:
/// CI's time is a budget, and a phase that grew should be seen.
struct Phases {
    start: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            done: Vec::new(),
        }
    }

    fn run(&mut self, name: &'static str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        eprintln!("xtask: {name}");
        let t = Instant::now();
        let r = f();
        let took = t.elapsed();
        eprintln!(
            "xtask: {name}: {} in {:.0} s",
            if r.is_ok() { "done" } else { "FAILED" },
            took.as_secs_f64()
        );
        self.done.push((name, took));
        r.with_context(|| format!("phase `{name}`"))
    }

    fn summary(&self) {
        eprintln!("xtask: phase times");
        for (name, took) in &self.done {
            eprintln!("  {:>6.0} s  {name}", took.as_secs_f64());
        }
        eprintln!("  {:>6.0} s  total", self.start.elapsed().as_secs_f64());
    }
}

fn test() -> Result<()> {
    let mut phases = Phases::new();
    let r = test_phases(&mut phases);
    phases.summary();
    r
}

fn test_phases(phases: &mut Phases) -> Result<()> {
    phases.run("system packages and toolchain", || {
        preflight(&[Group::Build, Group::Run, Group::Test])?;
        ensure_toolchain()
    })?;
    phases.run("build", || {
        build(false)?;
        run(cargo().args(["build", "--tests", "--workspace", "--exclude", "lb-ebpf"]))
    })?;
    phases.run("the agent's bans (lb-userspace/clippy.toml)", || {
        // rustup's minimal profile has no clippy.
        if output(cargo().args(["clippy", "--version"])).is_none() {
            eprintln!("xtask: adding clippy to the stable toolchain (one time)…");
            run(Command::new("rustup").args(["component", "add", "clippy"]))
                .context("adding clippy (rustup must reach static.rust-lang.org)")?;
        }
        // Only the bans: other lints change with the toolchain and must not turn CI red.
        run(cargo().args([
            "clippy",
            "-p",
            "lb-userspace",
            "--all-targets",
            "--",
            "-A",
            "clippy::all",
            "-D",
            "clippy::disallowed_methods",
        ]))
    })?;
    clean_leftovers();
    phases.run("unit and loopback tests (no root, no daemons)", || {
        run(cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "lb-tests",
            "--exclude",
            "lb-ebpf",
        ]))
    })?;
    phases.run(
        "tests that need root, BPF, namespaces or daemons (one at a time: they share the kernel)",
        || {
            run(cargo().env("LB_BIN", lb_bin()).args([
                "test",
                "-p",
                "lb-tests",
                "--",
                "--test-threads=1",
                "--nocapture",
            ]))
        },
    )?;
    phases.run("demo --check", || demo(true))?;
    clean_leftovers();
    Ok(())
}

/// The reload soak's long mode: the same test as in `cargo xtask test`, with more changes.
fn soak(changes: u32) -> Result<()> {
    preflight(&[Group::Build, Group::Test])?;
    ensure_toolchain()?;
    build(false)?;
    run(cargo()
        .env("LB_BIN", lb_bin())
        .env("LB_SOAK_CHANGES", changes.to_string())
        .args([
            "test",
            "-p",
            "lb-tests",
            "--test",
            "soak",
            "--",
            "--nocapture",
        ]))
}

/// The packet fuzzer's long mode: the same test as in `cargo xtask test`, with more frames.
fn fuzz_packets(packets: u64, seed: Option<u64>) -> Result<()> {
    preflight(&[Group::Build, Group::Test])?;
    ensure_toolchain()?;
    build(false)?;
    let mut c = cargo();
    c.env("LB_PACKET_FUZZ_FRAMES", packets.to_string());
    if let Some(seed) = seed {
        c.env("LB_PACKET_FUZZ_SEED", seed.to_string());
    }
    run(c.args([
        "test",
        "-p",
        "lb-tests",
        "--test",
        "packet",
        "frames_are_judged_legally_under_fuzzing",
        "--",
        "--exact",
        "--nocapture",
    ]))
}

/// Each cargo-fuzz target for `minutes` under libFuzzer (ASan, the eBPF nightly), starting from
/// its checked-in corpus; what it finds new goes to target/fuzz-corpus/, not into the repository.
/// Prints the executions per target; a crash stops the run with libFuzzer's artifact path.
fn fuzz_parsers(minutes: u64) -> Result<()> {
    preflight(&[Group::Build])?;
    ensure_toolchain()?;
    if output(cargo().args(["fuzz", "--version"])).is_none() {
        eprintln!("xtask: installing cargo-fuzz (one time, a few minutes)…");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))
            .context("installing cargo-fuzz (cargo must reach crates.io)")?;
    }
    let fuzz_dir = root().join("fuzz");
    let targets: Vec<String> = std::fs::read_dir(fuzz_dir.join("fuzz_targets"))
        .context("fuzz/fuzz_targets")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_string)
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut report = Vec::new();
    for t in &targets {
        let scratch = root().join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&scratch)?;
        let log = root().join("target/fuzz-corpus").join(format!("{t}.log"));
        eprintln!(
            "xtask: fuzzing {t} for {minutes} min (log: {})",
            log.display()
        );
        let file = std::fs::File::create(&log)?;
        // The rustup proxy with the nightly, as from a shell: not the `cargo` that runs xtask,
        // whose CARGO and RUSTUP_TOOLCHAIN cargo-fuzz would otherwise inherit. (The first run
        // builds the targets with ASan: minutes; later runs reuse the build.)
        let status = Command::new("cargo")
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("CARGO_TARGET_DIR")
            .current_dir(&fuzz_dir)
            .args([&format!("+{EBPF_TOOLCHAIN}"), "fuzz", "run", t])
            .arg(&scratch)
            .arg(fuzz_dir.join("corpus").join(t))
            .args([
                "--",
                &format!("-max_total_time={}", minutes * 60),
                "-print_final_stats=1",
                "-timeout=10",
                "-rss_limit_mb=2048",
            ])
            .stdout(file.try_clone()?)
            .stderr(file)
            .status()
            .context("spawning cargo fuzz")?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let executions = text
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(|n| n.trim().to_string())
            .unwrap_or_else(|| "?".into());
        if !status.success() {
            bail!(
                "{t}: the fuzzer stopped ({status}) after {executions} executions; see {} \
                 (a crash input is under fuzz/artifacts/{t}/: once fixed, add it to \
                 fuzz/corpus/{t}/)",
                log.display()
            );
        }
        report.push(format!("{t}: {executions} executions in {minutes} min"));
    }
    for line in &report {
        println!("{line}");
    }
    Ok(())
}

fn demo(check: bool) -> Result<()> {
    preflight(&[Group::Build, Group::Run])?;
    build(false)?;
    run(cargo().args(["build", "-p", "lb-tests", "--bin", "lb-demo"]))?;
    let mut c = Command::new(root().join("target/debug/lb-demo"));
    c.env("LB_BIN", lb_bin());
    if check {
        c.arg("--check");
    }
    run(&mut c)
}
