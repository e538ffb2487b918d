//! Named network namespaces that delete themselves, and running code or commands inside them.
//!
//! Code enters a namespace with `setns(2)` on a dedicated thread (net namespace only), never with
//! `ip netns exec`, which remounts /sys and hides the host's bpffs. A socket keeps the namespace
//! it was created in, so a socket made on such a thread can be used from anywhere afterwards.

use std::{fs::File, process::Command};

use anyhow::{bail, Context as _, Result};

/// A namespace under /run/netns, deleted on drop (also when a test fails).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Netns> {
        // A leftover of a crashed run with the same name goes first.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        sh(&format!("ip netns add {name}"))?;
        let ns = Netns { name: name.into() };
        ns.exec("ip link set lo up")?;
        Ok(ns)
    }

    /// Runs a shell command inside the namespace (`nsenter --net`, so bpffs stays visible).
    pub fn exec(&self, cmd: &str) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.name))
            .args(["sh", "-c", cmd])
            .output()
            .with_context(|| format!("nsenter {}", self.name))?;
        if !out.status.success() {
            bail!(
                "[{}] {cmd}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || -> Result<T> {
            enter(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    /// Spawns a long-lived thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || -> Result<T> {
            enter(&path)?;
            Ok(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns {path}"))
}

pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .context("sh")?;
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
