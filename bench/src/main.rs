//! `lb-bench`: the benchmarks behind `cargo xtask bench` (which builds everything, installs the
//! tools, then runs this). Prints the tables, writes `bench.json` (raw numbers, every round) and
//! `BENCHMARKS.md` into `--out`.
//!
//! Every comparison is interleaved — each round runs every contender once, in turn — and reported
//! as a median with its range, so drift on a shared machine shows instead of favouring whoever ran
//! first. Nothing here asserts a timing: wrong *behaviour* (a verdict, a failed request) fails the
//! run, slow numbers are only reported.

mod control;
mod e2e;
mod l7;
mod report;
mod sys;
mod xdp;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::Parser;

use crate::{report::Machine, sys::Cpus};

#[derive(Parser)]
struct Cli {
    /// Fewer rounds and shorter runs: the whole suite in a few minutes.
    #[arg(long)]
    quick: bool,
    /// Sections to run (default: all): xdp, l7, control, e2e.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where bench.json and BENCHMARKS.md go.
    #[arg(long)]
    out: PathBuf,
    /// The `lb` binary (a release build).
    #[arg(long)]
    lb_bin: PathBuf,
    /// Criterion's output directory (`<target>/criterion`), for the Maglev build times.
    #[arg(long)]
    criterion: Option<PathBuf>,
    /// Another commit's build to time beside this one (`cargo xtask bench --baseline <commit>`):
    /// its name in the tables…
    #[arg(long, requires_all = ["baseline_bin", "baseline_object"])]
    baseline_name: Option<String>,
    /// … its `lb` binary (the L7 table) …
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// … and its XDP object (the XDP table).
    #[arg(long)]
    baseline_object: Option<PathBuf>,
    /// The command line to print in the report.
    #[arg(long, default_value = "cargo xtask bench")]
    command: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("lb-bench needs root (BPF, namespaces)");
    }
    let want = |s: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == s);
    let cpus = Cpus::detect();
    let machine = machine(&cli.command);
    eprintln!(
        "lb-bench: {} on {} ({} cores); load on CPU {}, system under test on CPU {}",
        if cli.quick { "quick run" } else { "full run" },
        machine.cpu,
        machine.cores,
        cpus.load,
        cpus.work
    );
    let mut tables = Vec::new();
    let mut failures = Vec::new();
    let mut section = |name: &str, f: &mut dyn FnMut() -> Result<Vec<report::Table>>| {
        if !want(name) {
            return;
        }
        eprintln!("lb-bench: {name} …");
        let started = std::time::Instant::now();
        match f() {
            Ok(ts) => {
                for t in ts {
                    println!("{}", t.markdown());
                    tables.push(t);
                }
                eprintln!("lb-bench: {name} done in {:.0?}", started.elapsed());
            }
            Err(e) => {
                eprintln!("lb-bench: {name} FAILED: {e:#}");
                failures.push(format!("{name}: {e:#}"));
            }
        }
    };
    let quick = cli.quick;
    let baseline_object = match (&cli.baseline_name, &cli.baseline_object) {
        (Some(name), Some(path)) => Some((
            name.clone(),
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )),
        _ => None,
    };
    let baseline_bin = cli.baseline_name.clone().zip(cli.baseline_bin.clone());
    section("xdp", &mut || {
        Ok(vec![xdp::run(xdp::Opts {
            rounds: if quick { 3 } else { 7 },
            repeat: if quick { 200_000 } else { 1_000_000 },
            cpu: cpus.work,
            baseline: baseline_object.clone(),
        })?])
    });
    section("l7", &mut || {
        l7::run(&l7::Opts {
            rounds: if quick { 2 } else { 3 },
            secs: if quick { 3 } else { 10 },
            idle_conns: 10_000,
            cpus,
            lb_bin: cli.lb_bin.clone(),
            baseline: baseline_bin.clone(),
            out: cli.out.join("l7"),
        })
    });
    section("control", &mut || {
        control::run(&control::Opts {
            rounds: if quick { 3 } else { 10 },
            criterion: cli.criterion.clone(),
            lb_bin: cli.lb_bin.clone(),
        })
    });
    section("e2e", &mut || {
        e2e::run(&e2e::Opts {
            rounds: if quick { 2 } else { 5 },
            secs: if quick { 2.0 } else { 5.0 },
            cpus,
            lb_bin: cli.lb_bin.clone(),
            out: cli.out.join("e2e"),
        })
    });
    report::write(&cli.out, &machine, cli.quick, &tables)?;
    eprintln!(
        "lb-bench: wrote {} and {}",
        cli.out.join("bench.json").display(),
        cli.out.join("BENCHMARKS.md").display()
    );
    if !failures.is_empty() {
        bail!("sections failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn machine(command: &str) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let status =
        first_line(Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]));
    let dirty = !status.is_empty() && status != "unknown";
    let commit = first_line(Command::new("git").args(["rev-parse", "--short", "HEAD"]));
    Machine {
        kernel: first_line(Command::new("uname").arg("-r")),
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
        commit: if dirty && commit != "unknown" {
            format!("{commit} (with uncommitted changes)")
        } else {
            commit
        },
        command: command.into(),
    }
}
