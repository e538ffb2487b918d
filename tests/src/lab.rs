//! A test topology in namespaces: a client, the balancer, backends, joined by bridges in a
//! "switch" namespace, with the real `lb` agent attached natively to the balancer's veths.
//!
//! ```text
//!  client (10.0.0.1, fd00::1) ─┐            ┌─ DSR backends (10.0.0.11.., VIP on lo)
//!                        br0 (switch) ── lb eth0 (10.0.0.2, fd00::2)
//!                                           lb eth1 (10.1.0.1, fd01::1) ── br1 ── NAT backends
//!                                                                            (10.1.0.11.., fd01::11..)
//! ```
//! The client routes the VIP via the balancer. In DSR the backends answer the client directly; in
//! NAT they route through the balancer, whose program reverses the rewrite.
//! Veth quirks handled here (see ../shared/TOOLCHAIN.md): a pass-through XDP program on the
//! bridge-side peers of the balancer's veths (`XDP_TX` and `XDP_REDIRECT` need one there), and
//! `tx off` on every sender so no partial checksums reach the program.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};

use crate::{
    netns::Netns,
    server::{http, Server},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Dsr,
    Nat,
    /// DSR's topology; the balancer encapsulates and the backends run `lb decap`.
    Ipip,
    /// The VIP is the balancer's own (on its `lo`): XDP passes it to the L7 proxy, whose upstreams
    /// are the backends.
    Local,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Dsr => "dsr",
            Mode::Nat => "nat",
            Mode::Ipip => "ipip",
            Mode::Local => "local",
        }
    }
}

pub const VIP4: &str = "10.0.0.100";
pub const VIP6: &str = "fd00::100";
pub const VIP_PORT: u16 = 80;
/// NAT backends listen here (the program rewrites the port too).
pub const NAT_PORT: u16 = 8080;
pub const API: &str = "127.0.0.1:9090";
pub const TOKEN: &str = "lab-test-token-0123456789";

pub struct Lab {
    pub name: String,
    pub mode: Mode,
    pub ipv6: bool,
    pub sw: Netns,
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    pub servers: Vec<Server>,
    pub out_dir: PathBuf,
    pub pin_root: PathBuf,
    /// `[agent] debug` in the configs this lab writes (kernel-side log messages).
    pub debug: bool,
    agent: Option<Child>,
    agent_runs: u32,
    /// `lb decap` processes on the backends.
    helpers: Vec<Child>,
    pass: Vec<Ebpf>,
}

/// The `lb` binary xtask built (LB_BIN), or the workspace's debug build.
pub fn lb_bin() -> PathBuf {
    std::env::var_os("LB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb"))
}

impl Lab {
    /// Builds the topology with `backends` backend namespaces (not yet serving, agent not started).
    /// `name` must be short and unique: namespaces are called `<prefix>-<name>-<role>`.
    pub fn new(prefix: &str, name: &str, mode: Mode, backends: usize, ipv6: bool) -> Result<Lab> {
        let p = format!("{prefix}-{name}");
        let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("output")
            .join(name);
        // A fresh state directory: the API store of an earlier run must not leak into this one.
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir_all(&out_dir)?;
        let mut lab = Lab {
            name: name.into(),
            mode,
            ipv6,
            sw: Netns::new(&format!("{p}-sw"))?,
            client: Netns::new(&format!("{p}-cl"))?,
            lb: Netns::new(&format!("{p}-lb"))?,
            backends: Vec::new(),
            servers: Vec::new(),
            pin_root: PathBuf::from(format!("/sys/fs/bpf/{p}-{}", std::process::id())),
            out_dir,
            debug: false,
            agent: None,
            agent_runs: 0,
            helpers: Vec::new(),
            pass: Vec::new(),
        };
        for i in 0..backends {
            lab.backends.push(Netns::new(&format!("{p}-b{i}"))?);
        }
        lab.wire()?;
        Ok(lab)
    }

    fn sw_exec(&self, cmd: &str) -> Result<String> {
        self.sw.exec(cmd)
    }

    /// A veth from `ns` (named `ifname` there) to port `port` of `bridge` in the switch.
    fn plug(&self, ns: &Netns, ifname: &str, port: &str, bridge: &str) -> Result<()> {
        self.sw_exec(&format!(
            "ip link add {port} type veth peer name {ifname} netns {} && ip link set {port} master {bridge} up && ethtool -K {port} tx off >/dev/null",
            ns.name
        ))?;
        ns.exec(&format!(
            "ip link set {ifname} up && ethtool -K {ifname} tx off >/dev/null"
        ))?;
        Ok(())
    }

    fn wire(&mut self) -> Result<()> {
        self.sw_exec("ip link add br0 type bridge && ip link set br0 up && ip link add br1 type bridge && ip link set br1 up")?;
        self.sw_exec("sysctl -qw net.ipv6.conf.all.disable_ipv6=0")?;
        self.plug(&self.client, "eth0", "cl", "br0")?;
        self.plug(&self.lb, "eth0", "lb0", "br0")?;
        self.client.exec(&format!(
            "ip addr add 10.0.0.1/24 dev eth0 && ip -6 addr add fd00::1/64 dev eth0 nodad && \
             ip route add {VIP4}/32 via 10.0.0.2 && ip -6 route add {VIP6}/128 via fd00::2"
        ))?;
        self.lb
            .exec("ip addr add 10.0.0.2/24 dev eth0 && ip -6 addr add fd00::2/64 dev eth0 nodad")?;
        match self.mode {
            Mode::Dsr | Mode::Ipip | Mode::Local => {
                if self.mode == Mode::Local {
                    self.lb.exec(&format!(
                        "ip addr add {VIP4}/32 dev lo && ip -6 addr add {VIP6}/128 dev lo nodad"
                    ))?;
                }
                for (i, b) in self.backends.iter().enumerate() {
                    self.plug(b, "eth0", &format!("b{i}"), "br0")?;
                    b.exec(&format!(
                        "ip addr add 10.0.0.{}/24 dev eth0 && ip -6 addr add fd00::{}/64 dev eth0 nodad && \
                         ip addr add {VIP4}/32 dev lo && ip -6 addr add {VIP6}/128 dev lo nodad && \
                         sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
                        11 + i,
                        11 + i
                    ))?;
                }
            }
            Mode::Nat => {
                self.plug(&self.lb, "eth1", "lb1", "br1")?;
                self.lb.exec(
                    "ip addr add 10.1.0.1/24 dev eth1 && ip -6 addr add fd01::1/64 dev eth1 nodad && \
                     sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
                )?;
                for (i, b) in self.backends.iter().enumerate() {
                    self.plug(b, "eth0", &format!("b{i}"), "br1")?;
                    b.exec(&format!(
                        "ip addr add 10.1.0.{}/24 dev eth0 && ip -6 addr add fd01::{}/64 dev eth0 nodad && \
                         ip route add default via 10.1.0.1 && ip -6 route add default via fd01::1",
                        11 + i,
                        11 + i
                    ))?;
                }
            }
        }
        // XDP_TX / XDP_REDIRECT frames reach the switch only if the receiving peer runs XDP too.
        let ports: &[&str] = if self.mode == Mode::Nat {
            &["lb0", "lb1"]
        } else {
            &["lb0"]
        };
        for port in ports {
            let port = port.to_string();
            let ebpf = self.sw.run(move || -> Result<Ebpf> {
                let mut ebpf = Ebpf::load(lb_userspace::l4::dataplane::PASS_OBJECT)?;
                let prog: &mut Xdp = ebpf.program_mut("lb_pass").context("lb_pass")?.try_into()?;
                prog.load()?;
                prog.attach(&port, XdpMode::Driver)?;
                Ok(ebpf)
            })??;
            self.pass.push(ebpf);
        }
        Ok(())
    }

    /// The backend's address as the balancer reaches it.
    pub fn backend_addr(&self, i: usize, v6: bool) -> IpAddr {
        let s = match (self.mode, v6) {
            (Mode::Dsr | Mode::Ipip | Mode::Local, false) => format!("10.0.0.{}", 11 + i),
            (Mode::Dsr | Mode::Ipip | Mode::Local, true) => format!("fd00::{}", 11 + i),
            (Mode::Nat, false) => format!("10.1.0.{}", 11 + i),
            (Mode::Nat, true) => format!("fd01::{}", 11 + i),
        };
        s.parse().expect("static address")
    }

    pub fn backend_port(&self) -> u16 {
        match self.mode {
            Mode::Dsr | Mode::Ipip => 0,
            Mode::Nat => NAT_PORT,
            // The proxy's upstreams: the servers' own port.
            Mode::Local => VIP_PORT,
        }
    }

    pub fn vip(&self) -> SocketAddr {
        let ip: IpAddr = if self.ipv6 { VIP6 } else { VIP4 }
            .parse()
            .expect("static address");
        SocketAddr::new(ip, VIP_PORT)
    }

    fn server_port(&self) -> u16 {
        match self.mode {
            Mode::Dsr | Mode::Ipip | Mode::Local => VIP_PORT,
            Mode::Nat => NAT_PORT,
        }
    }

    /// Runs `lb decap` (native) on every backend's eth0 until the lab is dropped.
    pub fn start_decap(&mut self) -> Result<()> {
        for (i, b) in self.backends.iter().enumerate() {
            let log = std::fs::File::create(self.out_dir.join(format!("decap-b{i}.log")))?;
            let child = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", b.name))
                .arg(lb_bin())
                .args(["decap", "--iface", "eth0", "--mode", "native"])
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .spawn()?;
            self.helpers.push(child);
        }
        for b in &self.backends {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !b.exec("ip -d link show eth0")?.contains("prog/xdp") {
                if Instant::now() > deadline {
                    bail!("lb decap did not attach in {}", b.name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Starts a server named `b<i>` in every backend namespace.
    pub fn start_servers(&mut self) -> Result<()> {
        for (i, b) in self.backends.iter().enumerate() {
            self.servers
                .push(Server::start(b, &format!("b{i}"), self.server_port())?);
        }
        Ok(())
    }

    /// Stops backend `i`'s server (its listener closes: connects are refused).
    pub fn stop_server(&mut self, i: usize) {
        self.servers[i].stop();
    }

    /// Starts backend `i`'s server again.
    pub fn restart_server(&mut self, i: usize) -> Result<()> {
        self.servers[i] = Server::start(&self.backends[i], &format!("b{i}"), self.server_port())?;
        Ok(())
    }

    /// Writes the agent's config with the first `n` backends at `weights`, starts `lb run` in the
    /// balancer namespace and waits for its API.
    pub fn start_agent(&mut self, weights: &[u32]) -> Result<()> {
        self.start_agent_with(weights, "", &lb_bin())
    }

    /// Like [`Lab::start_agent`], with `extra` appended to the config (a `[vip.health]` table for
    /// the VIP, more VIPs) and a given `lb` binary.
    /// The agent's config for this lab: the VIP with the first `weights.len()` backends, then
    /// `extra` (more tables: a `[vip.health]`, more VIPs, entry points, routers).
    pub fn config_text(&self, weights: &[u32], extra: &str) -> String {
        let mut cfg = format!(
            "[agent]\ninstance = \"t\"\npin_root = \"{}\"\nstate_dir = \"{}\"\ninterfaces = [{}]\nxdp_mode = \"native\"\ndebug = {}\n\n\
             [dataplane]\nmax_vips = 4\nmax_backends = 256\n\n[api]\nlisten = \"{API}\"\ntoken = \"{TOKEN}\"\n\n\
             [[vip]]\nname = \"web\"\naddress = \"{}\"\nport = {VIP_PORT}\nprotocol = \"tcp\"\nmode = \"{}\"\n",
            self.pin_root.display(),
            self.out_dir.join("state").display(),
            if self.mode == Mode::Nat { "\"eth0\", \"eth1\"" } else { "\"eth0\"" },
            self.debug,
            self.vip().ip(),
            self.mode.as_str(),
        );
        for (i, w) in weights.iter().enumerate() {
            cfg += &format!(
                "\n[[vip.backend]]\naddress = \"{}\"\nport = {}\nweight = {w}\n",
                self.backend_addr(i, self.ipv6),
                self.backend_port()
            );
        }
        cfg += extra;
        cfg
    }

    /// Replaces the running agent's config file atomically (write, then rename), as deploy tools do.
    pub fn update_config(&self, text: &str) -> Result<()> {
        let tmp = self.out_dir.join(".lb.toml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.out_dir.join("lb.toml"))?;
        Ok(())
    }

    pub fn start_agent_with(
        &mut self,
        weights: &[u32],
        extra: &str,
        bin: &std::path::Path,
    ) -> Result<()> {
        let cfg = self.config_text(weights, extra);
        let cfg_path = self.out_dir.join("lb.toml");
        std::fs::write(&cfg_path, cfg)?;
        self.agent_runs += 1;
        let log =
            std::fs::File::create(self.out_dir.join(format!("agent-{}.log", self.agent_runs)))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.lb.name))
            .arg(bin)
            .args(["run", "--config"])
            .arg(&cfg_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = self.api("GET", "/healthz", None) {
                return Ok(());
            }
            if let Some(c) = self.agent.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("agent exited ({st}); see {}", self.out_dir.display());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "agent API not up after 20 s; see {}",
                    self.out_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The running agent's process id (to signal it).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Stops the agent with SIGTERM (the pinned program keeps forwarding).
    pub fn stop_agent(&mut self) -> Result<()> {
        if let Some(mut c) = self.agent.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    bail!("agent ignored SIGTERM for 10 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// SIGKILL: a crash, not a shutdown (nothing of the agent's runs after it).
    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut c) = self.agent.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            c.wait()?;
        }
        Ok(())
    }

    /// `lb detach` with the lab's config.
    pub fn detach(&self) -> Result<()> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.lb.name))
            .arg(lb_bin())
            .args(["detach", "--config"])
            .arg(self.out_dir.join("lb.toml"))
            .output()?;
        if !out.status.success() {
            bail!("lb detach: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// An admin API call from inside the balancer namespace (the API listens on its loopback).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        let (m, p, b) = (
            method.to_string(),
            path.to_string(),
            body.map(str::to_string),
        );
        self.lb.run(move || {
            http(
                API.parse().expect("static"),
                &m,
                &p,
                Some(TOKEN),
                b.as_deref(),
            )
        })?
    }

    /// The VIP's state from `GET /api/v1/vips`.
    pub fn vip_state(&self) -> Result<serde_json::Value> {
        let (code, body) = self.api("GET", "/api/v1/vips", None)?;
        if code != 200 {
            bail!("GET /api/v1/vips: {code} {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["vips"][0].clone())
    }

    /// Per-backend `new_flows` counters, by backend address.
    pub fn backend_new_flows(&self) -> Result<Vec<(IpAddr, u64)>> {
        let v = self.vip_state()?;
        let mut out = Vec::new();
        for b in v["backends"].as_array().cloned().unwrap_or_default() {
            let addr: IpAddr = b["address"].as_str().unwrap_or_default().parse()?;
            out.push((addr, b["counters"]["new_flows"].as_u64().unwrap_or(0)));
        }
        Ok(out)
    }

    /// Asserts the balancer's interfaces run the program in native mode (`xdp`, not `xdpgeneric`).
    pub fn assert_native(&self) -> Result<()> {
        let ifaces: &[&str] = if self.mode == Mode::Nat {
            &["eth0", "eth1"]
        } else {
            &["eth0"]
        };
        for i in ifaces {
            let out = self.lb.exec(&format!("ip -d link show {i}"))?;
            if out.contains("xdpgeneric") || !out.contains("prog/xdp") {
                bail!("{i} is not attached natively:\n{out}");
            }
        }
        Ok(())
    }

    pub fn xdp_attached(&self) -> Result<bool> {
        Ok(self.lb.exec("ip -d link show eth0")?.contains("prog/xdp"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.stop_agent();
        for mut h in self.helpers.drain(..) {
            let _ = h.kill();
            let _ = h.wait();
        }
        self.servers.clear();
        let _ = std::fs::remove_dir_all(&self.pin_root);
        self.pass.clear();
        // The namespaces (fields) delete themselves after this.
    }
}
