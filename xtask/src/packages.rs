//! The one list of system packages the project needs, grouped by the command that needs them.
//!
//! Each package is probed by a file it installs rather than by asking dpkg, so the check means the
//! same on every distribution and notices a tool that was removed by hand. On Debian and Ubuntu the
//! missing ones are installed with apt-get (the commands need root anyway); elsewhere xtask prints
//! the Debian names and stops, since package names and managers differ.
//!
//! The README names only what must exist before xtask itself can be compiled (a C toolchain for
//! the linker, git, curl and ca-certificates for rustup): everything else is here.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{is_root, root};

/// What a package is needed for; a command asks for the groups it uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Group {
    /// `cargo build` of the workspace.
    Build,
    /// `cargo xtask run` and the demo: namespaces, veth, XDP attachments.
    Run,
    /// `cargo xtask test`: the servers and clients the tests start.
    Test,
    /// `cargo xtask bench`: the load generators and the proxies lb is compared with.
    Bench,
    /// `cargo xtask fresh-check`: the pristine Debian root.
    FreshCheck,
}

struct Package {
    name: &'static str,
    /// A path that exists once the package is installed (absolute), or a command on PATH.
    probe: &'static str,
    why: &'static str,
    groups: &'static [Group],
}

use Group::*;

/// Every system package any xtask command needs. A new one goes here, nowhere else.
const PACKAGES: &[Package] = &[
    Package {
        name: "protobuf-compiler",
        probe: "protoc",
        why: "etcd-client's build script compiles etcd's gRPC protos",
        groups: &[Build],
    },
    Package {
        // Only a Recommends of protobuf-compiler: `--no-install-recommends` would skip it.
        name: "libprotobuf-dev",
        probe: "/usr/include/google/protobuf/descriptor.proto",
        why: "the well-known protos etcd's protos import",
        groups: &[Build],
    },
    Package {
        name: "iproute2",
        probe: "ip",
        why: "network namespaces, veth and routes",
        groups: &[Run, Test, Bench],
    },
    Package {
        name: "ethtool",
        probe: "ethtool",
        why: "checksum offload off on veth, which XDP_TX needs",
        groups: &[Run, Test, Bench],
    },
    Package {
        name: "util-linux",
        probe: "nsenter",
        why: "nsenter keeps the host's bpffs inside a namespace; taskset pins the benchmark",
        groups: &[Run, Test, Bench],
    },
    Package {
        name: "curl",
        probe: "curl",
        why: "the demo's client line and the TLS tests' second client",
        groups: &[Run, Test],
    },
    Package {
        name: "redis-server",
        probe: "redis-server",
        why: "the Redis provider tests start their own server",
        groups: &[Test],
    },
    Package {
        name: "etcd-server",
        probe: "/usr/bin/etcd",
        why: "the etcd provider tests start their own member",
        groups: &[Test],
    },
    Package {
        name: "bird2",
        probe: "bird",
        why: "the fleet tests' BGP routers (a router namespace and one bird per lb node)",
        groups: &[Test],
    },
    Package {
        name: "pebble",
        probe: "pebble-challtestsrv",
        why: "the ACME tests' CA and its DNS server",
        groups: &[Test],
    },
    Package {
        name: "testssl.sh",
        probe: "testssl",
        why: "the TLS scan of an entry point",
        groups: &[Test],
    },
    Package {
        name: "chromium",
        probe: "chromium",
        why: "the dashboard test's headless browser",
        groups: &[Test],
    },
    Package {
        name: "chromium-driver",
        probe: "chromedriver",
        why: "drives that browser over WebDriver",
        groups: &[Test],
    },
    Package {
        name: "wrk",
        probe: "wrk",
        why: "HTTP/1.1 load (the bench; the reload soak's traffic)",
        groups: &[Test, Bench],
    },
    Package {
        name: "nghttp2-client",
        probe: "h2load",
        why: "HTTP/2 load",
        groups: &[Bench],
    },
    Package {
        name: "nginx",
        probe: "nginx",
        why: "the L7 baseline",
        groups: &[Bench],
    },
    Package {
        name: "haproxy",
        probe: "haproxy",
        why: "the other L7 baseline",
        groups: &[Bench],
    },
    Package {
        name: "nftables",
        probe: "nft",
        why: "the L4 baseline",
        groups: &[Bench],
    },
    Package {
        name: "debootstrap",
        probe: "debootstrap",
        why: "builds the pristine Debian root",
        groups: &[FreshCheck],
    },
];

/// Services some of these packages would start: the tests and benchmarks run their own instances
/// on their own ports, so the packaged ones must not hold those ports or CPU.
const SERVICES: &[&str] = &["nginx", "haproxy", "redis-server", "etcd", "bird"];

fn present(probe: &str) -> bool {
    if probe.starts_with('/') {
        return Path::new(probe).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(probe).is_file()))
        .unwrap_or(false)
        // Debian keeps some of these in sbin, which a non-root PATH may lack.
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(probe).is_file())
}

fn debian_like() -> bool {
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let family = release
        .lines()
        .filter_map(|l| l.strip_prefix("ID=").or_else(|| l.strip_prefix("ID_LIKE=")))
        .any(|v| {
            v.trim_matches('"')
                .split_whitespace()
                .any(|id| id == "debian" || id == "ubuntu")
        });
    family && present("apt-get")
}

/// Every package the groups need that is missing here, each once, in list order.
fn missing(groups: &[Group]) -> Vec<&'static Package> {
    let mut seen = BTreeSet::new();
    PACKAGES
        .iter()
        .filter(|p| p.groups.iter().any(|g| groups.contains(g)))
        .filter(|p| !present(p.probe))
        .filter(|p| seen.insert(p.name))
        .collect()
}

/// Installs what `groups` need and this machine lacks, saying what and why first.
pub fn ensure(groups: &[Group]) -> Result<()> {
    let need = missing(groups);
    if need.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = need.iter().map(|p| p.name).collect();
    let line = format!(
        "apt-get install -y --no-install-recommends {}",
        names.join(" ")
    );
    if !debian_like() {
        bail!(
            "missing system packages (Debian names): {}; this is not Debian or Ubuntu, so install \
             their equivalents with your distribution's package manager, then run this again",
            names.join(", ")
        );
    }
    if !is_root() {
        bail!("missing system packages: run this as root so xtask installs them, or run `sudo {line}`");
    }
    let why: Vec<String> = need
        .iter()
        .map(|p| format!("{} ({})", p.name, p.why))
        .collect();
    eprintln!("xtask: installing with apt-get: {}", why.join("; "));
    install(&names).with_context(|| format!("installing system packages; by hand: {line}"))?;
    if let Some(p) = missing(groups).first() {
        bail!("{} is installed but {} is still missing", p.name, p.probe);
    }
    Ok(())
}

/// apt-get, quietly (its output goes to a log shown on failure), with no service allowed to start
/// while it runs: a policy-rc.d that denies every start, present only during the install.
fn install(names: &[&str]) -> Result<()> {
    let log_dir = root().join("target");
    std::fs::create_dir_all(&log_dir)?;
    let log = log_dir.join("xtask-apt.log");
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask: no service starts while it installs packages\nexit 101\n",
        )
        .context("writing /usr/sbin/policy-rc.d")?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let apt = |args: &[&str]| -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let status = Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .context("spawning apt-get")?;
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            for l in tail.into_iter().rev() {
                eprintln!("  apt: {l}");
            }
            bail!(
                "apt-get {} failed ({status}); its log: {}",
                args[0],
                log.display()
            );
        }
        Ok(())
    };
    let result = apt(&["update", "-q"]).and_then(|_| {
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend_from_slice(names);
        apt(&args)
    });
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    result?;
    // Where systemd runs, keep the packaged services from starting at boot or by socket.
    if present("systemctl") && Path::new("/run/systemd/system").exists() {
        for svc in SERVICES {
            let _ = Command::new("systemctl")
                .args(["disable", "--now", svc])
                .output();
        }
    }
    Ok(())
}

/// The packages of `groups`, for the README and the fresh-machine check's report.
pub fn names(groups: &[Group]) -> Vec<&'static str> {
    PACKAGES
        .iter()
        .filter(|p| p.groups.iter().any(|g| groups.contains(g)))
        .map(|p| p.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_package_is_listed_once_and_probed() {
        let mut seen = BTreeSet::new();
        for p in PACKAGES {
            assert!(seen.insert(p.name), "{} listed twice", p.name);
            assert!(!p.groups.is_empty(), "{} is needed by nothing", p.name);
            assert!(!p.probe.is_empty() && !p.why.is_empty(), "{}", p.name);
        }
    }

    #[test]
    fn groups_select_their_packages() {
        let build = names(&[Build]);
        assert!(build.contains(&"libprotobuf-dev"));
        assert!(!build.contains(&"nginx"));
        let test = names(&[Build, Run, Test]);
        assert!(test.contains(&"etcd-server") && test.contains(&"ethtool"));
        assert!(!test.contains(&"debootstrap"));
    }

    #[test]
    fn probes_find_paths_and_commands() {
        assert!(present("/"));
        assert!(present("sh"));
        assert!(!present("/no/such/file/anywhere"));
        assert!(!present("no-such-command-lb-xtask"));
    }
}
