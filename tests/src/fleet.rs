//! A fleet of lb nodes behind a BGP router, in namespaces: the topology of README's "Running
//! several nodes".
//!
//! ```text
//!  client ── router (bird2: 3 eBGP peers, ECMP, L4 hash) ── fabric br0 (switch ns)
//!  10.10.0.2   eth-c 10.10.0.1 / eth-f 10.20.0.1              │
//!  fd10::2     fd10::1           fd20::1                       ├── node i: eth0 10.20.0.1{i}, fd20::1{i}
//!                                                              │   lb agent (DSR, XDP on eth0) + its own bird
//!                                                              └── backend j: eth0 10.20.0.2{j}, fd20::2{j},
//!                                                                  the VIPs on lo, default route via the router
//! ```
//!
//! The router learns each VIP from every node's bird (AS 65001) and installs one multipath route
//! (bird's `merge paths`), hashed on the 5-tuple (`fib_multipath_hash_policy=1`). Nodes forward
//! DSR: backends answer the client through the router, never through lb. Every process (agents,
//! birds) is killed, every program detached and every namespace deleted on drop.

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
    lab::lb_bin,
    netns::Netns,
    server::{http, Server},
};

pub const VIP4: &str = "10.99.0.100";
pub const VIP6: &str = "fd99::100";
pub const PORT: u16 = 80;
pub const TOKEN: &str = "fleet-test-token-0123456789";
/// BGP hold time on both sides (≥ 9 s: keepalives lag on two busy cores).
pub const HOLD: u64 = 9;
const API: &str = "127.0.0.1:9090";
/// etcd's client address, on the fabric (in the probe namespace), when the fleet is a cluster.
pub const ETCD: &str = "10.20.0.5:2379";

pub struct Fleet {
    pub name: String,
    pub sw: Netns,
    pub client: Netns,
    pub router: Netns,
    /// On the fabric (10.20.0.5, fd20::5): sends one flow through one chosen node.
    pub probe: Netns,
    pub nodes: Vec<Netns>,
    pub backends: Vec<Netns>,
    pub dir: PathBuf,
    pin_root: PathBuf,
    agents: Vec<Option<Child>>,
    birds: Vec<Option<Child>>,
    router_bird: Option<Child>,
    servers: Vec<Server>,
    pass: Vec<Ebpf>,
    runs: u32,
    /// Every node's lb.toml gets a `[cluster]` on [`ETCD`] (set before the agents start).
    pub cluster: bool,
    etcd: Option<Child>,
}

impl Fleet {
    /// Builds the namespaces and links (nothing started). `name` is short and unique.
    pub fn new(name: &str, nodes: usize, backends: usize) -> Result<Fleet> {
        let p = format!("lbf-{name}");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("output")
            .join(format!("fleet-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut f = Fleet {
            name: name.into(),
            sw: Netns::new(&format!("{p}-sw"))?,
            client: Netns::new(&format!("{p}-cl"))?,
            router: Netns::new(&format!("{p}-rt"))?,
            probe: Netns::new(&format!("{p}-pr"))?,
            nodes: Vec::new(),
            backends: Vec::new(),
            pin_root: PathBuf::from(format!("/sys/fs/bpf/{p}-{}", std::process::id())),
            dir,
            agents: Vec::new(),
            birds: Vec::new(),
            router_bird: None,
            servers: Vec::new(),
            pass: Vec::new(),
            runs: 0,
            cluster: false,
            etcd: None,
        };
        for i in 0..nodes {
            f.nodes.push(Netns::new(&format!("{p}-n{i}"))?);
            f.agents.push(None);
            f.birds.push(None);
        }
        for j in 0..backends {
            f.backends.push(Netns::new(&format!("{p}-b{j}"))?);
        }
        f.wire()?;
        Ok(f)
    }

    pub fn node_addr(i: usize, v6: bool) -> IpAddr {
        let s = if v6 {
            format!("fd20::1{i}")
        } else {
            format!("10.20.0.1{i}")
        };
        s.parse().expect("static")
    }

    pub fn backend_addr(j: usize, v6: bool) -> IpAddr {
        let s = if v6 {
            format!("fd20::2{j}")
        } else {
            format!("10.20.0.2{j}")
        };
        s.parse().expect("static")
    }

    fn plug(&self, ns: &Netns, port: &str) -> Result<()> {
        self.sw.exec(&format!(
            "ip link add {port} type veth peer name eth0 netns {} && ip link set {port} master br0 up && ethtool -K {port} tx off >/dev/null",
            ns.name
        ))?;
        ns.exec("ip link set eth0 up && ethtool -K eth0 tx off >/dev/null")?;
        Ok(())
    }

    fn wire(&mut self) -> Result<()> {
        self.sw.exec("ip link add br0 type bridge && ip link set br0 up && sysctl -qw net.ipv6.conf.all.disable_ipv6=0")?;
        // Client ↔ router: one veth pair.
        self.router.exec(&format!(
            "ip link add eth-c type veth peer name eth0 netns {} && ip link set eth-c up && ethtool -K eth-c tx off >/dev/null",
            self.client.name
        ))?;
        self.client.exec(
            "ip link set eth0 up && ethtool -K eth0 tx off >/dev/null && \
             ip addr add 10.10.0.2/24 dev eth0 && ip -6 addr add fd10::2/64 dev eth0 nodad && \
             ip route add default via 10.10.0.1 && ip -6 route add default via fd10::1",
        )?;
        // The router's fabric side is a port of the switch like the nodes'.
        self.sw.exec(&format!(
            "ip link add rt type veth peer name eth-f netns {} && ip link set rt master br0 up && ethtool -K rt tx off >/dev/null",
            self.router.name
        ))?;
        self.router.exec(
            "ip link set eth-f up && ethtool -K eth-f tx off >/dev/null && \
             ip addr add 10.10.0.1/24 dev eth-c && ip -6 addr add fd10::1/64 dev eth-c nodad && \
             ip addr add 10.20.0.1/24 dev eth-f && ip -6 addr add fd20::1/64 dev eth-f nodad && \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
               net.ipv4.fib_multipath_hash_policy=1 net.ipv6.fib_multipath_hash_policy=1 \
               net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0",
        )?;
        self.plug(&self.probe, "pr")?;
        self.probe.exec(
            "ip addr add 10.20.0.5/24 dev eth0 && ip -6 addr add fd20::5/64 dev eth0 nodad",
        )?;
        for i in 0..self.nodes.len() {
            self.plug(&self.nodes[i], &format!("n{i}"))?;
            self.nodes[i].exec(&format!(
                "ip addr add {}/24 dev eth0 && ip -6 addr add {}/64 dev eth0 nodad",
                Self::node_addr(i, false),
                Self::node_addr(i, true)
            ))?;
        }
        for j in 0..self.backends.len() {
            self.plug(&self.backends[j], &format!("b{j}"))?;
            self.backends[j].exec(&format!(
                "ip addr add {}/24 dev eth0 && ip -6 addr add {}/64 dev eth0 nodad && \
                 ip addr add {VIP4}/32 dev lo && ip -6 addr add {VIP6}/128 dev lo nodad && \
                 sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 && \
                 ip route add default via 10.20.0.1 && ip -6 route add default via fd20::1",
                Self::backend_addr(j, false),
                Self::backend_addr(j, true)
            ))?;
        }
        // XDP_TX frames leave a veth only if its peer runs XDP: a pass program on each node's port.
        for i in 0..self.nodes.len() {
            let port = format!("n{i}");
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

    pub fn start_servers(&mut self) -> Result<()> {
        for j in 0..self.backends.len() {
            self.servers
                .push(Server::start(&self.backends[j], &format!("b{j}"), PORT)?);
        }
        Ok(())
    }

    fn spawn_in(
        &mut self,
        ns: &str,
        what: &str,
        program: &std::path::Path,
        args: &[String],
    ) -> Result<Child> {
        self.runs += 1;
        let log = std::fs::File::create(self.dir.join(format!("{what}-{}.log", self.runs)))?;
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", program.display()))
    }

    /// The router's bird: one eBGP session per node and family, multipath into the kernel.
    pub fn start_router_bird(&mut self) -> Result<()> {
        let mut conf = String::from(
            "router id 10.20.0.1;\nprotocol device { scan time 1; }\n\
             protocol kernel { ipv4 { import none; export all; }; merge paths on; }\n\
             protocol kernel { ipv6 { import none; export all; }; merge paths on; }\n",
        );
        for i in 0..self.nodes.len() {
            for v6 in [false, true] {
                let (local, fam, sfx) = if v6 {
                    ("fd20::1", "ipv6", "v6")
                } else {
                    ("10.20.0.1", "ipv4", "v4")
                };
                conf += &format!(
                    "protocol bgp n{i}{sfx} {{ local {local} as 65000; neighbor {} as 65001; \
                     hold time {HOLD}; keepalive time 3; connect retry time 1; \
                     {fam} {{ import all; export none; }}; }}\n",
                    Self::node_addr(i, v6)
                );
            }
        }
        let path = self.dir.join("router-bird.conf");
        std::fs::write(&path, conf)?;
        let args = self.bird_args(&path, "router");
        let ns = self.router.name.clone();
        self.router_bird =
            Some(self.spawn_in(&ns, "router-bird", std::path::Path::new("bird"), &args)?);
        Ok(())
    }

    fn bird_args(&self, conf: &std::path::Path, who: &str) -> Vec<String> {
        vec![
            "-f".into(),
            "-c".into(),
            conf.display().to_string(),
            "-s".into(),
            self.dir
                .join(format!("{who}-bird.ctl"))
                .display()
                .to_string(),
        ]
    }

    /// Node `i`'s bird: its router id and the include the agent writes.
    pub fn start_node_bird(&mut self, i: usize) -> Result<()> {
        let include = self.include(i);
        if !include.exists() {
            std::fs::write(&include, "")?;
        }
        let path = self.dir.join(format!("n{i}-bird.conf"));
        std::fs::write(
            &path,
            format!(
                "router id {};\nprotocol device {{ scan time 1; }}\ninclude \"{}\";\n",
                Self::node_addr(i, false),
                include.display()
            ),
        )?;
        let args = self.bird_args(&path, &format!("n{i}"));
        let ns = self.nodes[i].name.clone();
        self.birds[i] = Some(self.spawn_in(
            &ns,
            &format!("n{i}-bird"),
            std::path::Path::new("bird"),
            &args,
        )?);
        Ok(())
    }

    pub fn include(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}-lb-bgp.conf"))
    }

    pub fn config(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}-lb.toml"))
    }

    /// Node `i`'s lb.toml: both VIPs in DSR with every backend, announced through its bird.
    pub fn write_config(&self, i: usize) -> Result<()> {
        let mut cfg = format!(
            "[agent]\ninstance = \"f{i}\"\npin_root = \"{}\"\nstate_dir = \"{}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\n\n\
             [dataplane]\nmax_vips = 4\nmax_backends = 64\n\n[api]\nlisten = \"{API}\"\ntoken = \"{TOKEN}\"\n\n\
             [bgp]\nsocket = \"{}\"\ninclude = \"{}\"\nlocal_as = 65001\nhold_time_secs = {HOLD}\ndrain_secs = 3\n\
             med = 10\ncommunities = [\"65001:100\"]\n\n\
             [[bgp.neighbor]]\naddress = \"10.20.0.1\"\nas = 65000\n\n[[bgp.neighbor]]\naddress = \"fd20::1\"\nas = 65000\n",
            self.pin_root.display(),
            self.dir.join(format!("n{i}-state")).display(),
            self.dir.join(format!("n{i}-bird.ctl")).display(),
            self.include(i).display(),
        );
        if self.cluster {
            cfg += &format!(
                "\n[cluster]\nname = \"f{}\"\nnode = \"n{i}\"\nstatus_ttl_secs = 6\n\n\
                 [cluster.etcd]\nendpoints = [\"http://{ETCD}\"]\nprefix = \"lbfleet/\"\n",
                self.name
            );
        }
        for (name, vip, v6) in [("web", VIP4, false), ("web6", VIP6, true)] {
            cfg += &format!(
                "\n[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nport = {PORT}\nprotocol = \"tcp\"\nmode = \"dsr\"\n"
            );
            for j in 0..self.backends.len() {
                cfg += &format!(
                    "\n[[vip.backend]]\naddress = \"{}\"\nport = {PORT}\n",
                    Self::backend_addr(j, v6)
                );
            }
        }
        std::fs::write(self.config(i), cfg)?;
        Ok(())
    }

    /// Starts node `i`'s agent and waits for its API.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        self.write_config(i)?;
        let args = vec![
            "run".to_string(),
            "--config".into(),
            self.config(i).display().to_string(),
        ];
        let ns = self.nodes[i].name.clone();
        let child = self.spawn_in(&ns, &format!("n{i}-agent"), &lb_bin(), &args)?;
        self.agents[i] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = self.api(i, "GET", "/healthz", None) {
                return Ok(());
            }
            if let Some(st) = self.agents[i]
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("node {i}: agent exited ({st}); see {}", self.dir.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {i}: API not up after 20 s; see {}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn api(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String)> {
        let (m, p, b) = (
            method.to_string(),
            path.to_string(),
            body.map(str::to_string),
        );
        self.nodes[i].run(move || {
            http(
                API.parse().expect("static"),
                &m,
                &p,
                Some(TOKEN),
                b.as_deref(),
            )
        })?
    }

    /// SIGTERM node `i`'s agent and waits for it: a restart's first half (the program keeps
    /// forwarding, bird keeps announcing).
    pub fn stop_agent(&mut self, i: usize) -> Result<()> {
        if let Some(c) = self.agents[i].as_ref() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id())?);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        }
        self.wait_agent_exit(i, Duration::from_secs(15))
    }

    /// etcd on the fabric (in the probe namespace, at [`ETCD`]): the cluster's one store. Its
    /// data directory outlives a stop, as a real member's does.
    pub fn start_etcd(&mut self) -> Result<()> {
        let peer = "http://10.20.0.5:2380";
        let client = format!("http://{ETCD}");
        let data = self.dir.join("etcd-data").display().to_string();
        let args: Vec<String> = [
            "--name",
            "fleet",
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            &format!("fleet={peer}"),
        ]
        .map(String::from)
        .to_vec();
        let ns = self.probe.name.clone();
        self.etcd =
            Some(self.spawn_in(&ns, "etcd", std::path::Path::new("/usr/bin/etcd"), &args)?);
        let deadline = Instant::now() + Duration::from_secs(15);
        let health = format!("http://{ETCD}/health");
        loop {
            let h = health.clone();
            if self.probe.run(move || crate::daemons::etcd_healthy(&h))? {
                return Ok(());
            }
            if let Some(st) = self.etcd.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("etcd exited ({st}); see {}", self.dir.display());
            }
            if Instant::now() > deadline {
                bail!("etcd not healthy after 15 s; see {}", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL etcd: the store gone, not shut down.
    pub fn stop_etcd(&mut self) {
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL node `i`'s agent (its program keeps forwarding; bird keeps announcing).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for node `i`'s agent to exit by itself (after `lb leave`), at most `within`.
    pub fn wait_agent_exit(&mut self, i: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        if let Some(c) = self.agents[i].as_mut() {
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    bail!("node {i}: the agent did not exit within {within:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.agents[i] = None;
        Ok(())
    }

    /// Runs `lb <args…> --config <node i's lb.toml>` in node `i`'s namespace; its stdout.
    pub fn lb(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.nodes[i].name))
            .arg(lb_bin())
            .args(args)
            .arg("--config")
            .arg(self.config(i))
            .output()?;
        if !out.status.success() {
            bail!(
                "lb {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Deletes node `i`'s link (its veth pair, so the switch port goes too).
    pub fn delete_link(&self, i: usize) -> Result<()> {
        self.sw.exec(&format!("ip link del n{i}"))?;
        Ok(())
    }

    /// The router's next hops for `vip` now (empty: no route).
    pub fn next_hops(&self, vip: &str) -> Vec<IpAddr> {
        let fam = if vip.contains(':') { "-6" } else { "-4" };
        let out = self
            .router
            .exec(&format!("ip {fam} route show {vip}"))
            .unwrap_or_default();
        let mut hops: Vec<IpAddr> = out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect();
        hops.sort();
        hops
    }

    /// The next hop the router's hash picks for a client flow from `sport` to the VIP.
    pub fn next_hop_of(&self, v6: bool, sport: u16) -> Option<IpAddr> {
        let (fam, vip, src) = if v6 {
            ("-6", VIP6, "fd10::2")
        } else {
            ("-4", VIP4, "10.10.0.2")
        };
        let out = self
            .router
            .exec(&format!(
                "ip {fam} route get {vip} from {src} iif eth-c ipproto tcp sport {sport} dport {PORT}"
            ))
            .ok()?;
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "via")
            .and_then(|w| w[1].parse().ok())
    }

    /// From the probe, through node `i`: for each source port, which backend answers. Each
    /// flow is one connection closed with a reset (no TIME_WAIT), so the same 5-tuple can go
    /// through the next node.
    pub fn probe_through(
        &self,
        i: usize,
        v6: bool,
        ports: std::ops::Range<u16>,
    ) -> Result<Vec<String>> {
        let (fam, vip) = if v6 { ("-6", VIP6) } else { ("-4", VIP4) };
        self.probe.exec(&format!(
            "ip {fam} route replace {vip} via {}",
            Self::node_addr(i, v6)
        ))?;
        let src: IpAddr = if v6 { "fd20::5" } else { "10.20.0.5" }.parse()?;
        let dst = Self::vip(v6);
        self.probe.run(move || -> Result<Vec<String>> {
            ports
                .map(|p| probe_one(SocketAddr::new(src, p), dst))
                .collect()
        })?
    }

    pub fn vip(v6: bool) -> SocketAddr {
        let ip: IpAddr = if v6 { VIP6 } else { VIP4 }.parse().expect("static");
        SocketAddr::new(ip, PORT)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for i in 0..self.agents.len() {
            self.kill_agent(i);
            let _ = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.nodes[i].name))
                .arg(lb_bin())
                .args(["detach", "--config"])
                .arg(self.config(i))
                .output();
        }
        for c in self
            .birds
            .iter_mut()
            .chain(std::iter::once(&mut self.router_bird))
        {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.stop_etcd();
        self.servers.clear();
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

/// One connection from `src` to `dst`: the backend's name, then a reset.
fn probe_one(src: SocketAddr, dst: SocketAddr) -> Result<String> {
    use nix::sys::socket::{
        bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
        SockaddrStorage,
    };
    use std::io::{BufRead as _, Write as _};
    let fam = if src.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let tv = nix::sys::time::TimeVal::new(3, 0);
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(src),
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(dst),
    )
    .with_context(|| format!("{src} → {dst}"))?;
    setsockopt(
        &fd,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    let mut s = std::net::TcpStream::from(fd);
    s.write_all(b"who\n")?;
    let mut name = String::new();
    std::io::BufReader::new(&s).read_line(&mut name)?;
    if name.is_empty() {
        bail!("{src} → {dst}: closed before the backend named itself");
    }
    Ok(name.trim().to_string())
}
