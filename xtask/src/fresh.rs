//! `cargo xtask fresh-check`: the README's two commands, run as written on a machine that has
//! nothing but the README's prerequisites, so a package once installed here by hand cannot hide a
//! missing install step again.
//!
//! The machine is a Debian 12 root made by debootstrap (its default variant), entered in a mount
//! namespace of its own: the root bound onto itself (so its `/` is a mount point, which
//! `ip netns exec` needs), fresh /proc, /sys, a new bpffs instance, /dev with its own /dev/shm, and a
//! private /run/netns, so its namespaces and pins never meet the host's. Rust comes from the host's
//! rustup through an overlay that shows only the stable toolchain and a `nightly` without rust-src
//! (what such a machine is given), and CARGO_HOME holds only rustup's proxies: the pinned nightly,
//! bpf-linker and every crate are fetched as a stranger's first run would. A policy-rc.d keeps
//! every packaged service from starting. The network namespace is the host's: Debian's mirror and
//! crates.io are reached from there, and the tests' servers listen on loopback as on any machine.

use std::{
    collections::BTreeSet,
    env,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{output, packages, packages::Group, require_root, root, show};

/// What the README tells a new user to install before the first command.
pub const PREREQUISITES: &[&str] = &["build-essential", "ca-certificates", "curl", "git"];
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Inside the root: the checkout, with ../shared beside it as CI has it.
const CHECKOUT: &str = "/work/lb";
const PATH: &str = "/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct Root {
    dir: PathBuf,
    root: PathBuf,
    host_rustup: PathBuf,
}

pub fn check(dir: Option<PathBuf>, demo_only: bool) -> Result<()> {
    require_root()?;
    packages::ensure(&[Group::FreshCheck])?;
    let dir = dir.unwrap_or_else(|| root().join("target/fresh-check"));
    let dir = if dir.is_absolute() {
        dir
    } else {
        env::current_dir()?.join(dir)
    };
    if output(
        Command::new("git")
            .current_dir(root())
            .args(["status", "--porcelain"]),
    )
    .is_some_and(|s| !s.trim().is_empty())
    {
        eprintln!("xtask: fresh-check: the work tree has uncommitted changes; the check clones what is committed (HEAD)");
    }
    let started = Instant::now();
    let mut report = Vec::<String>::new();
    let mut step = |name: &str, f: &mut dyn FnMut() -> Result<String>| -> Result<()> {
        eprintln!("xtask: fresh-check: {name}");
        let t = Instant::now();
        let r = f();
        let line = match &r {
            Ok(detail) => format!("{name}: ok in {:.0} s{detail}", t.elapsed().as_secs_f64()),
            Err(e) => format!(
                "{name}: FAILED after {:.0} s: {e:#}",
                t.elapsed().as_secs_f64()
            ),
        };
        eprintln!("xtask: fresh-check: {line}");
        report.push(line);
        r.map(|_| ())
    };
    let r = (|| -> Result<Root> {
        let mut made = None;
        step("debootstrap a Debian 12 root", &mut || {
            made = Some(make_root(&dir)?);
            Ok(String::new())
        })?;
        let r = made.context("no root")?;
        step(
            &format!(
                "install the README's prerequisites ({})",
                PREREQUISITES.join(" ")
            ),
            &mut || {
                r.exec(
                    &format!(
                        "apt-get update -q && apt-get install -y -q --no-install-recommends {}",
                        PREREQUISITES.join(" ")
                    ),
                    &r.dir.join("prerequisites.log"),
                )?;
                Ok(String::new())
            },
        )?;
        Ok(r)
    })();
    let r = match r {
        Ok(r) => r,
        Err(e) => return finish(&dir, &report, started, Err(e)),
    };
    let baseline = r.installed()?;
    let mut result = step("cargo xtask run (the demo, then Ctrl-C)", &mut || {
        r.exec(DEMO, &r.dir.join("demo.log"))?;
        let answers =
            std::fs::read_to_string(r.root.join("work/demo-answers.txt")).unwrap_or_default();
        Ok(format!(
            ": {}",
            answers.split_whitespace().collect::<Vec<_>>().join(" ")
        ))
    });
    if result.is_ok() && !demo_only {
        result = step("cargo xtask test", &mut || {
            let log = r.dir.join("test.log");
            let run = r.exec(
                &format!("cd {CHECKOUT} && timeout 90m cargo xtask test"),
                &log,
            );
            let (passed, failed) = count_tests(&std::fs::read_to_string(&log).unwrap_or_default());
            run.map(|_| format!(": {passed} tests passed, {failed} failed"))
                .with_context(|| format!("{passed} tests passed, {failed} failed"))
        });
    }
    // What the commands installed: the packages of the list they asked for, and everything apt
    // brought with them.
    if let Ok(after) = r.installed() {
        let new: BTreeSet<&String> = after.difference(&baseline).collect();
        let listed: Vec<&str> = packages::names(&[Group::Build, Group::Run, Group::Test])
            .into_iter()
            .filter(|p| new.iter().any(|n| n.as_str() == *p))
            .collect();
        report.push(format!(
            "installed by xtask: {} ({} packages with their dependencies)",
            listed.join(" "),
            new.len()
        ));
    }
    finish(&dir, &report, started, result)
}

fn finish(dir: &Path, report: &[String], started: Instant, result: Result<()>) -> Result<()> {
    let mut text = report.join("\n");
    text += &format!("\ntotal: {:.0} s\n", started.elapsed().as_secs_f64());
    eprintln!("xtask: fresh-check report\n{text}");
    if dir.exists() {
        let _ = std::fs::write(dir.join("report.txt"), &text);
    }
    match result {
        Ok(()) => {
            // A passed check's root is tens of GB (a Debian system and a whole build): it goes,
            // and the report and logs stay. A failed one stays for a look.
            let root = dir.join("root");
            let mounted = std::fs::read_to_string("/proc/mounts")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .any(|m| Path::new(m).starts_with(&root));
            if mounted {
                eprintln!(
                    "xtask: fresh-check passed; something is still mounted under {}, so it stays",
                    root.display()
                );
            } else if let Err(e) = std::fs::remove_dir_all(&root) {
                eprintln!(
                    "xtask: fresh-check passed; removing {}: {e}",
                    root.display()
                );
            } else {
                eprintln!(
                    "xtask: fresh-check passed; its root is removed, the report and logs are in {}",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) => Err(e.context(format!(
            "the fresh-machine check failed; its root and logs are in {}",
            dir.display()
        ))),
    }
}

/// Runs in the root: start the demo as a terminal would (its own process group), wait for its
/// curl line, follow it, then Ctrl-C the group and check it tore everything down.
const DEMO: &str = r#"
cd /work/lb
rm -f /work/demo-run.log /work/demo-answers.txt
setsid cargo xtask run > /work/demo-run.log 2>&1 < /dev/null &
pid=$!
end=$((SECONDS + 3600))
while ! grep -q 'curl -s http' /work/demo-run.log; do
  if ! kill -0 "$pid" 2>/dev/null; then
    cat /work/demo-run.log; echo "the demo exited before printing its curl line"; exit 1
  fi
  if [ "$SECONDS" -ge "$end" ]; then
    kill -INT -- "-$pid"; cat /work/demo-run.log; echo "no curl line within an hour"; exit 1
  fi
  sleep 2
done
cat /work/demo-run.log
line=$(grep -o 'ip netns exec [^ ]* curl -s http://[^ ]*' /work/demo-run.log | head -n 1)
echo "following the demo's line: $line"
for i in 1 2 3 4 5 6; do timeout 5 $line >> /work/demo-answers.txt || true; echo >> /work/demo-answers.txt; done
cat /work/demo-answers.txt
kill -INT -- "-$pid"
for i in $(seq 1 60); do pgrep -g "$pid" > /dev/null || break; sleep 1; done
if pgrep -g "$pid" > /dev/null; then echo "the demo did not exit within 60 s of Ctrl-C"; exit 1; fi
tail -n 5 /work/demo-run.log
left=$(ip netns list)
if [ -n "$left" ]; then echo "Ctrl-C left namespaces behind: $left"; exit 1; fi
if ! grep -q . /work/demo-answers.txt; then echo "no backend answered the curl line"; exit 1; fi
"#;

fn count_tests(log: &str) -> (u64, u64) {
    let mut passed = 0;
    let mut failed = 0;
    for l in log.lines() {
        let Some(rest) = l.trim().strip_prefix("test result: ") else {
            continue;
        };
        for part in rest.split(';') {
            let mut w = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (w.next(), w.next()) else {
                continue;
            };
            let n: u64 = n.parse().unwrap_or(0);
            match what {
                "passed" => passed += n,
                "failed" => failed += n,
                _ => {}
            }
        }
    }
    (passed, failed)
}

/// What a passed check's root held at its largest (32 GiB measured), with room to spare.
const NEEDED_BYTES: u64 = 40 << 30;
const GIB: f64 = (1u64 << 30) as f64;

/// Bytes an unprivileged writer could still put on the file system holding `path`.
fn free_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is written by statvfs before it is read.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail * st.f_frsize)
}

fn make_root(dir: &Path) -> Result<Root> {
    if dir.exists() {
        // A mount left under the old root would make removing it reach into the host's /dev.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = dir.to_string_lossy();
        if let Some(m) = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .find(|m| m.starts_with(prefix.as_ref()))
        {
            bail!(
                "{m} is still mounted: unmount it (umount -R {m}) before the check removes {}",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    // A full disk shows up twenty minutes later as a linker's bus error, so refuse up front.
    let free = free_bytes(&root)?;
    if free < NEEDED_BYTES {
        bail!(
            "{} has {:.1} GiB free; the check needs {} GiB (the root, its toolchain and two \
             builds of the workspace): free some (cargo clean) and run it again",
            root.display(),
            free as f64 / GIB,
            NEEDED_BYTES / (1 << 30)
        );
    }
    let log = dir.join("debootstrap.log");
    let status = Command::new("debootstrap")
        .args([SUITE])
        .arg(&root)
        .arg(MIRROR)
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.join("debootstrap.err"))?)
        .status()
        .context("spawning debootstrap")?;
    if !status.success() {
        bail!("debootstrap failed ({status}); see {}", log.display());
    }
    std::fs::write(
        root.join("etc/apt/sources.list"),
        format!(
            "deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\n\
             deb http://deb.debian.org/debian-security {SUITE}-security main\n"
        ),
    )?;
    let policy = root.join("usr/sbin/policy-rc.d");
    std::fs::write(
        &policy,
        "#!/bin/sh\n# fresh-check: no service starts in this root\nexit 101\n",
    )?;
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755))?;
    // The machine's own trust anchors (a network that inspects TLS installs its CA here); the
    // root's ca-certificates, installed with the prerequisites, adds them to its bundle.
    let local_ca = Path::new("/usr/local/share/ca-certificates");
    if local_ca.is_dir() {
        let into = root.join("usr/local/share/ca-certificates");
        std::fs::create_dir_all(&into)?;
        for e in std::fs::read_dir(local_ca)?.flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), into.join(e.file_name()))?;
            }
        }
    }
    for f in ["etc/resolv.conf", "etc/hosts"] {
        let _ = std::fs::remove_file(root.join(f));
        std::fs::copy(Path::new("/").join(f), root.join(f)).with_context(|| format!("/{f}"))?;
    }
    // The checkout: what is committed, cloned as CI clones it, with ../shared beside it.
    let work = root.join("work");
    std::fs::create_dir_all(&work)?;
    let mut clone = Command::new("git");
    clone
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(crate::root())
        .arg(work.join("lb"));
    crate::run(&mut clone)?;
    let shared = crate::root().join("../shared");
    if shared.is_dir() {
        crate::run(
            Command::new("cp")
                .arg("-a")
                .arg(&shared)
                .arg(work.join("shared")),
        )?;
    }
    let host_rustup = env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")))
        .context("neither RUSTUP_HOME nor HOME is set")?;
    let host_cargo = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    rustup_overlay(&host_rustup, dir)?;
    // CARGO_HOME: rustup's proxies and nothing else.
    let bin = root.join("root/.cargo/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(host_cargo.join("bin/rustup"), bin.join("rustup"))
        .context("copying rustup from the host's CARGO_HOME")?;
    for proxy in [
        "cargo",
        "rustc",
        "rustdoc",
        "cargo-clippy",
        "clippy-driver",
        "rustfmt",
        "cargo-fmt",
    ] {
        std::os::unix::fs::symlink("rustup", bin.join(proxy))?;
    }
    std::fs::create_dir_all(root.join("opt/rustup"))?;
    Ok(Root {
        dir: dir.to_path_buf(),
        root,
        host_rustup,
    })
}

/// The overlay's upper layer hides every toolchain but `stable-<host>` and `nightly-<host>`, and
/// that nightly's rust-src, with whiteouts (character devices 0:0), so the host's RUSTUP_HOME is shown
/// as a new machine has it and anything installed lands in the upper layer only.
fn rustup_overlay(host: &Path, dir: &Path) -> Result<()> {
    let upper = dir.join("rustup-upper");
    std::fs::create_dir_all(upper.join("toolchains"))?;
    std::fs::create_dir_all(upper.join("update-hashes"))?;
    std::fs::create_dir_all(dir.join("rustup-work"))?;
    // `stable-<host>` and the undated `nightly-<host>`; a dated or numbered toolchain (the pinned
    // nightly xtask installs, `1.95.0-…`) is what a new machine lacks.
    let kept = |n: &str| {
        n.strip_prefix("stable-")
            .or_else(|| n.strip_prefix("nightly-"))
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    for sub in ["toolchains", "update-hashes"] {
        let Ok(entries) = std::fs::read_dir(host.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !kept(&name) {
                whiteout(&upper.join(sub).join(&name))?;
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(host.join("toolchains")) else {
        bail!(
            "{} has no toolchains: install Rust with rustup first",
            host.display()
        );
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("nightly-") || !kept(&name) {
            continue;
        }
        let rustlib = Path::new("toolchains").join(&name).join("lib/rustlib");
        if host.join(&rustlib).join("src").exists() {
            std::fs::create_dir_all(upper.join(&rustlib))?;
            whiteout(&upper.join(&rustlib).join("src"))?;
            let components =
                std::fs::read_to_string(host.join(&rustlib).join("components")).unwrap_or_default();
            let kept: String = components
                .lines()
                .filter(|l| l.trim() != "rust-src")
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(upper.join(&rustlib).join("components"), kept)?;
            let manifest = upper.join(&rustlib).join("manifest-rust-src");
            if host.join(&rustlib).join("manifest-rust-src").exists() {
                whiteout(&manifest)?;
            }
        }
    }
    Ok(())
}

fn whiteout(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path; mknod has no memory preconditions.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("whiteout {}", path.display()));
    }
    Ok(())
}

impl Root {
    /// Runs `body` with bash inside the root, in a mount namespace of its own; its output goes to
    /// `log` and to this terminal.
    fn exec(&self, body: &str, log: &Path) -> Result<()> {
        let r = self.root.display();
        let d = self.dir.display();
        let h = self.host_rustup.display();
        let script = format!(
            r#"set -eu
mount --bind {r} {r}
mount -t proc proc {r}/proc
mount -t sysfs sysfs {r}/sys
mount -t bpf bpf {r}/sys/fs/bpf
mount --rbind /dev {r}/dev
mount --make-rslave {r}/dev
mount -t tmpfs -o mode=1777 tmpfs {r}/dev/shm
mkdir -p {r}/run/netns
mount -t tmpfs -o mode=755 tmpfs {r}/run/netns
mount -t overlay overlay -o lowerdir={h},upperdir={d}/rustup-upper,workdir={d}/rustup-work {r}/opt/rustup
exec chroot {r} /usr/bin/env -i HOME=/root USER=root LANG=C.UTF-8 TERM=dumb RUST_BACKTRACE=1 \
  PATH={PATH} RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo DEBIAN_FRONTEND=noninteractive \
  /bin/bash -c "$1"
"#
        );
        let body = format!("set -euo pipefail\n( {body} ) 2>&1 | tee /work/.step.log\n");
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--fork",
            "--",
            "bash",
            "-c",
        ])
        .arg(&script)
        .arg("fresh-check")
        .arg(&body);
        let status = cmd
            .status()
            .with_context(|| format!("spawning {}", show(&cmd)))?;
        let step_log = self.root.join("work/.step.log");
        if step_log.exists() {
            let text = std::fs::read(&step_log).unwrap_or_default();
            let mut f = std::fs::File::create(log)?;
            f.write_all(&text)?;
        }
        if !status.success() {
            bail!("failed ({status}); its output: {}", log.display());
        }
        Ok(())
    }

    /// The packages installed in the root.
    fn installed(&self) -> Result<BTreeSet<String>> {
        let out = output(Command::new("chroot").arg(&self.root).args([
            "dpkg-query",
            "-W",
            "-f",
            "${Package}\\n",
        ]))
        .context("dpkg-query in the root")?;
        Ok(out.lines().map(str::to_string).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_test_result_line() {
        let log = "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s\n\
                   noise\n   test result: FAILED. 3 passed; 2 failed; 0 ignored\n";
        assert_eq!(count_tests(log), (15, 2));
        assert_eq!(count_tests("nothing here"), (0, 0));
    }
}
