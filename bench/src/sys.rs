//! Processes the benchmark starts (killed on drop, and when the benchmark dies), CPU pinning, and
//! what /proc says about CPU time and memory.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// A process started by the benchmark: SIGTERM, then SIGKILL, on drop. It also gets SIGKILL when
/// the benchmark process dies, so nothing outlives an interrupted run.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Runs `argv` inside network namespace `ns` (nsenter keeps the host's bpffs visible), pinned
    /// to `cpus` (a taskset list) when given, output to `log`.
    pub fn spawn(
        name: &str,
        ns: Option<&str>,
        cpus: Option<&str>,
        argv: &[&str],
        log: &Path,
    ) -> Result<Proc> {
        let mut full: Vec<String> = Vec::new();
        if let Some(ns) = ns {
            full.push("nsenter".into());
            full.push(format!("--net=/run/netns/{ns}"));
        }
        if let Some(c) = cpus {
            full.extend(["taskset".into(), "-c".into(), c.into()]);
        }
        full.extend(argv.iter().map(|s| s.to_string()));
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(&full[0]);
        cmd.args(&full[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {}", full.join(" ")))?;
        Ok(Proc {
            name: name.into(),
            child,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails when the process has already exited.
    pub fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let tail = fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "{} exited ({st}); log {}:\n{tail}",
                self.name,
                log.display()
            );
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid());
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn run(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `pid` and every process descended from it (the proxies' workers).
pub fn process_tree(pid: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Some(pp) = stat_fields(p).and_then(|f| f.get(1).and_then(|x| x.parse().ok())) {
                parents.push((p, pp));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// Fields of /proc/<pid>/stat after the command name (field 3, the state, is index 0).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU time (user + system) of `pid`'s whole tree, every thread, in nanoseconds, from the
/// scheduler's own accounting (`/proc/<pid>/task/<tid>/schedstat`).
pub fn tree_cpu_ns(pid: i32) -> u64 {
    process_tree(pid).into_iter().map(task_cpu_ns).sum()
}

/// Run time of every thread of one process.
pub fn task_cpu_ns(pid: i32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resident memory of `pid`'s tree, in KiB.
pub fn tree_rss_kib(pid: i32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| {
            let s = fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Kernel threads whose name starts with `prefix` (threaded NAPI: `napi/<dev>-<id>`).
pub fn kthreads(prefix: &str) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(c) = fs::read_to_string(format!("/proc/{p}/comm")) {
                if c.trim_end().starts_with(prefix) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).context("cpu index")?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning to CPU {cpu}"))
}

/// Pins another task (a kernel thread, say) to `cpu`.
pub fn pin_task(pid: i32, cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).context("cpu index")?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &set)
        .with_context(|| format!("pinning task {pid} to CPU {cpu}"))
}

/// Raises the soft open-files limit to the hard one (10,000 idle connections need it; processes
/// started afterwards inherit it). Returns the limit now in force.
pub fn raise_nofile() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: a valid rlimit for RLIMIT_NOFILE, not above the hard limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!("raising RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Waits until `addr` accepts TCP connections from inside `ns` (bounded).
pub fn wait_listening(ns: &str, addr: std::net::SocketAddr, within: Duration) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let deadline = Instant::now() + within;
    loop {
        let p = path.clone();
        let ok = std::thread::spawn(move || -> bool {
            lb_tests::netns::enter(&p).is_ok()
                && std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
        .join()
        .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} in {ns} after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The CPUs the benchmark places work on: `load` for generators and clients, `work` for the
/// system under test, different when the machine has two cores or more.
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    pub load: usize,
    pub work: usize,
}

impl Cpus {
    pub fn detect() -> Cpus {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Cpus {
            load: 0,
            work: n.saturating_sub(1),
        }
    }
}
