//! `cargo xtask build|run|test|demo|bench`: the project's only entry points.
//!
//! Everything a fresh machine lacks for the eBPF build is installed here, with a message, and
//! everything that cannot be had fails with a clear error: the pinned nightly with `rust-src`, and
//! `bpf-linker` built against that nightly's own LLVM (so their LLVM majors always match; see
//! ../shared/TOOLCHAIN.md).

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;

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
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd.unwrap_or(Cmd::Run { config: None }) {
        Cmd::Build { release } => build(release),
        Cmd::Run { config: Some(c) } => {
            build(false)?;
            require_root()?;
            let c = c
                .canonicalize()
                .with_context(|| format!("config {}", c.display()))?;
            run(Command::new(lb_bin()).arg("run").arg("--config").arg(c))
        }
        Cmd::Run { config: None } => demo(false),
        Cmd::Demo { check } => demo(check),
        Cmd::Test => test(),
        Cmd::Bench { quick, only } => bench::bench(quick, only),
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

fn run(cmd: &mut Command) -> Result<()> {
    let status: ExitStatus = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root: loading XDP programs and creating network namespaces need CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN");
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
    ensure_toolchain()?;
    let mut c = cargo();
    c.args(["build", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

/// BPF needs root and a kernel with BPF; bpffs is mounted by the agent and tests when absent.
fn preflight() -> Result<()> {
    require_root()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() && !Path::new("/sys/fs/bpf").exists() {
        bail!("this kernel has no BPF support visible (/sys/fs/bpf and BTF missing)");
    }
    for tool in ["ip", "ethtool", "nsenter"] {
        if output(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}")),
        )
        .is_none()
        {
            bail!("{tool} is missing: install iproute2, ethtool and util-linux (see .ci/run)");
        }
    }
    Ok(())
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

fn test() -> Result<()> {
    preflight()?;
    // The ACME tests run pebble, an ACME test CA, with pebble-challtestsrv as its DNS server;
    // the dashboard test drives Debian's chromium through chromedriver.
    for (tool, package) in [
        ("pebble", "pebble"),
        ("pebble-challtestsrv", "pebble"),
        ("chromium", "chromium"),
        ("chromedriver", "chromium-driver"),
    ] {
        if output(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}")),
        )
        .is_none()
        {
            bail!("{tool} is missing: install {package} (see .ci/run)");
        }
    }
    build(false)?;
    clean_leftovers();
    eprintln!("xtask: unit and packet tests");
    run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "lb-tests",
        "--exclude",
        "lb-ebpf",
    ]))?;
    eprintln!("xtask: end-to-end tests (one at a time: they share the kernel)");
    run(cargo().env("LB_BIN", lb_bin()).args([
        "test",
        "-p",
        "lb-tests",
        "--",
        "--test-threads=1",
        "--nocapture",
    ]))?;
    eprintln!("xtask: demo --check");
    demo(true)?;
    clean_leftovers();
    Ok(())
}

fn demo(check: bool) -> Result<()> {
    preflight()?;
    build(false)?;
    run(cargo().args(["build", "-p", "lb-tests", "--bin", "lb-demo"]))?;
    let mut c = Command::new(root().join("target/debug/lb-demo"));
    c.env("LB_BIN", lb_bin());
    if check {
        c.arg("--check");
    }
    run(&mut c)
}
