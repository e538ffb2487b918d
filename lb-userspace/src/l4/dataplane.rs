//! The only code that touches the BPF maps and the XDP attachments.
//!
//! One map set per agent instance, pinned under `<pin_root>/<instance>/v<LAYOUT_VERSION>/`, shared
//! by every interface the instance attaches to (the NAT reply path on the backend side must see the
//! entries the client side made). Links are pinned too, under `links/<ifname>`: when the agent
//! stops, the program keeps forwarding; a restarted agent reuses the maps (flows survive) and swaps
//! its program into the existing links atomically; `lb detach` removes both.
// The one module allowed `unsafe` (lib.rs denies it elsewhere): it owns the maps' fds.
#![allow(unsafe_code)]

use super::plan::Gates;
use crate::model::{AttachMode, Limits};
use std::{
    collections::HashMap as StdHashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{links::FdLink, links::PinnedLink, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{
    Backend, Counters, Flow, FlowKey, NatReverse, Reason, VipKey, VipMeta, LAYOUT_VERSION,
    REASON_COUNT,
};
use tracing::{info, warn};

/// The balancer's object file, built by build.rs from lb-ebpf.
pub static LB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// Strips the balancer's IP-in-IP header on an `ipip` backend (`lb decap`).
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));
/// A program that only returns `XDP_PASS`: veth peers need one for `XDP_TX` frames to arrive.
pub static PASS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-pass"));
/// `cargo xtask bench`: the floor programs (MAC swap + `XDP_TX`, bare redirect, counting sink).
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-floor"));
/// `cargo xtask bench`: restores a frame and tail-calls the program under test; live-frames generator.
pub static HARNESS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-harness"));

/// The map set and attachments of one agent instance.
pub struct Dataplane {
    ebpf: Ebpf,
    dir: PathBuf,
    limits: Limits,
    vips: HashMap<MapData, VipKey, VipMeta>,
    backends: Array<MapData, Backend>,
    rings: Array<MapData, u32>,
    flows: HashMap<MapData, FlowKey, Flow>,
    nat_reverse: HashMap<MapData, FlowKey, NatReverse>,
    stats_vip: PerCpuArray<MapData, Counters>,
    stats_backend: PerCpuArray<MapData, Counters>,
    stats_reason: PerCpuArray<MapData, u64>,
    nat_ports: Array<MapData, u64>,
    wildcard: Array<MapData, u32>,
    vip_addrs: Array<MapData, u64>,
    /// What the gate maps hold, once this agent has written them.
    gates: Option<Gates>,
    /// What each (vip id, slot) half of RINGS holds, so a rebuild writes only the slots that change.
    written: StdHashMap<(u32, u8), Vec<u32>>,
    /// RINGS was created by this load (not adopted from pins): every half is known to be zeros.
    fresh_rings: bool,
    /// `debug`: the program's aya-log messages, for the agent to forward.
    kernel_logs: Option<KernelLogs>,
    /// The interfaces this agent attached to, with their index then: a link deleted (or
    /// deleted and made again) no longer has it.
    attached: StdHashMap<String, u32>,
}

/// Writes `new` into `map` from index `base`, skipping entries equal to `old`'s (all are written
/// without `old`). Returns the number written.
fn write_changed<T: aya::Pod + PartialEq>(
    map: &mut Array<MapData, T>,
    base: usize,
    new: &[T],
    old: Option<&[T]>,
    name: &str,
) -> Result<usize> {
    let mut writes = 0;
    for (i, w) in new.iter().enumerate() {
        if old.is_none_or(|o| o.get(i) != Some(w)) {
            map.set((base + i) as u32, *w, 0)
                .with_context(|| format!("updating {name}"))?;
            writes += 1;
        }
    }
    Ok(writes)
}

/// The reader of the program's log ring buffer (aya-log), writing to the `log` facade.
pub type KernelLogs = aya_log::EbpfLogger<&'static dyn log::Log>;

/// `<pin_root>/<instance>/v<LAYOUT_VERSION>`.
pub fn pin_dir(pin_root: &Path, instance: &str) -> PathBuf {
    pin_root.join(instance).join(format!("v{LAYOUT_VERSION}"))
}

/// Mounts bpffs on /sys/fs/bpf when it is not there (it is not, on a fresh Debian boot).
pub fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs on /sys/fs/bpf (needs root)")
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Dataplane {
    /// Loads the program and creates (or reuses) the pinned map set.
    pub fn open(pin_root: &Path, instance: &str, limits: &Limits, debug: bool) -> Result<Self> {
        Self::open_object(LB_OBJECT, pin_root, instance, limits, debug)
    }

    /// [`Dataplane::open`] with another build of the program, one with the same maps and
    /// globals: `cargo xtask bench --baseline` times an older commit's object through this
    /// writer, so both run on identical map contents.
    pub fn open_object(
        object: &[u8],
        pin_root: &Path,
        instance: &str,
        limits: &Limits,
        debug: bool,
    ) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("lb needs root (CAP_BPF, CAP_NET_ADMIN) to load XDP programs");
        }
        ensure_bpffs()?;
        let dir = pin_dir(pin_root, instance);
        fs::create_dir_all(&dir)
            .with_context(|| format!("creating pin directory {}", dir.display()))?;
        let rings = 2u64 * limits.max_vips as u64 * limits.ring_size as u64;
        let rings = u32::try_from(rings)
            .map_err(|_| anyhow!("2 × max_vips × ring_size = {rings} is too large"))?;
        let udp_ns = limits.udp_timeout_secs.saturating_mul(1_000_000_000);
        let log_level: u8 = if debug { 0xff } else { 0 };
        let fresh_rings = !dir.join("RINGS").exists();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .map_max_entries("VIPS", limits.max_vips)
            .map_max_entries("STATS_VIP", limits.max_vips)
            .map_max_entries("BACKENDS", limits.max_backends)
            .map_max_entries("STATS_BACKEND", limits.max_backends)
            .map_max_entries("RINGS", rings)
            .map_max_entries("FLOWS", limits.max_flows)
            .map_max_entries("NAT_REVERSE", limits.max_flows)
            .override_global("RING_SIZE", &limits.ring_size, true)
            .override_global("UDP_TIMEOUT_NS", &udp_ns, true)
            .override_global(
                "IPIP_SRC_V4",
                &u32::from_ne_bytes(limits.ipip_source_v4.octets()),
                true,
            )
            .override_global(
                "IPIP_SRC_V6",
                &crate::model::addr_words(limits.ipip_source_v6.into()),
                true,
            )
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .load(object)
            .context("loading the XDP object (is BPF available on this kernel?)")?;
        let kernel_logs = match debug {
            true => aya_log::EbpfLogger::init(&mut ebpf)
                .inspect_err(|e| warn!("kernel-side logging unavailable: {e}"))
                .ok(),
            false => None,
        };
        let rings_map: Array<MapData, u32> = take(&mut ebpf, "RINGS")?;
        if rings_map.len() != rings {
            bail!(
                "the maps pinned at {} were created for another size (RINGS has {} entries, this config needs {rings}); \
                 run `lb detach` to remove them, or restore max_vips/ring_size",
                dir.display(),
                rings_map.len()
            );
        }
        let mut dp = Dataplane {
            vips: take(&mut ebpf, "VIPS")?,
            backends: take(&mut ebpf, "BACKENDS")?,
            rings: rings_map,
            flows: take(&mut ebpf, "FLOWS")?,
            nat_reverse: take(&mut ebpf, "NAT_REVERSE")?,
            stats_vip: take(&mut ebpf, "STATS_VIP")?,
            stats_backend: take(&mut ebpf, "STATS_BACKEND")?,
            stats_reason: take(&mut ebpf, "STATS_REASON")?,
            nat_ports: take(&mut ebpf, "NAT_PORTS")?,
            wildcard: take(&mut ebpf, "WILDCARD")?,
            vip_addrs: take(&mut ebpf, "VIP_ADDRS")?,
            gates: None,
            ebpf,
            dir,
            limits: limits.clone(),
            written: StdHashMap::new(),
            fresh_rings,
            kernel_logs,
            attached: StdHashMap::new(),
        };
        if dp.backends.len() != limits.max_backends || dp.stats_vip.len() != limits.max_vips {
            bail!(
                "the maps pinned at {} were created with other limits; run `lb detach` first",
                dp.dir.display()
            );
        }
        let prog: &mut Xdp = dp
            .ebpf
            .program_mut("lb")
            .ok_or_else(|| anyhow!("program lb missing from the object"))?
            .try_into()?;
        prog.load()
            .context("the verifier rejected the XDP program")?;
        Ok(dp)
    }

    /// The program's log reader (only with `debug`), once: its owner drives it
    /// ([`forward_kernel_logs`]).
    pub fn take_kernel_logs(&mut self) -> Option<KernelLogs> {
        self.kernel_logs.take()
    }

    /// The loaded balancer program: the benchmark harness tail-calls it through a program array.
    pub fn program(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program("lb")
            .ok_or_else(|| anyhow!("program lb missing"))?
            .try_into()?)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    fn link_path(&self, iface: &str) -> PathBuf {
        self.dir.join("links").join(iface)
    }

    fn note_attached(&mut self, iface: &str) {
        if let Ok(i) = nix::net::if_::if_nametoindex(iface) {
            self.attached.insert(iface.to_string(), i);
        }
    }

    /// Whether the program is still attached on every one of `ifaces`: its link is pinned
    /// (`lb detach` removes the pin) and the interface is the one it was attached to (a deleted
    /// link takes the program with it). False with no interface at all.
    pub fn serving(&self, ifaces: &[String]) -> bool {
        !ifaces.is_empty()
            && ifaces.iter().all(|i| {
                self.link_path(i).exists()
                    && nix::net::if_::if_nametoindex(i.as_str()).ok()
                        == self.attached.get(i).copied()
            })
    }

    /// Attaches to `iface`, or swaps this program into the link a previous agent pinned there
    /// (atomic: packets see the old program or the new one, never none). Returns the mode used.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str> {
        let link_path = self.link_path(iface);
        let prog: &mut Xdp = self
            .ebpf
            .program_mut("lb")
            .ok_or_else(|| anyhow!("program lb missing"))?
            .try_into()?;
        if link_path.exists() {
            let pinned = PinnedLink::from_pin(&link_path)
                .with_context(|| format!("opening pinned link {}", link_path.display()))?;
            let fd: FdLink = pinned.into();
            let link = aya::programs::xdp::XdpLink::try_from(fd)
                .with_context(|| format!("{} is not an XDP link", link_path.display()))?;
            let id = prog
                .attach_to_link(link)
                .with_context(|| format!("replacing the program on {iface}"))?;
            // The pin keeps the link alive: dropping our handle closes an fd, it does not detach.
            drop(prog.take_link(id)?);
            info!(iface, "replaced the program in the existing link");
            self.note_attached(iface);
            return Ok("existing link");
        }
        let attempts: &[(XdpMode, &'static str)] = match mode {
            AttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
            AttachMode::Native => &[(XdpMode::Driver, "native")],
            AttachMode::Generic => &[(XdpMode::Skb, "generic")],
        };
        let mut last_err = None;
        for (i, (m, name)) in attempts.iter().enumerate() {
            match prog.attach(iface, *m) {
                Ok(id) => {
                    if i > 0 {
                        warn!(
                            iface,
                            "native XDP unavailable, attached in generic (skb) mode: slower"
                        );
                    }
                    let link = prog.take_link(id)?;
                    let fd = FdLink::try_from(link).map_err(|e| {
                        anyhow!("{iface}: XDP attached through netlink, cannot pin it: {e}")
                    })?;
                    fs::create_dir_all(self.dir.join("links"))?;
                    fd.pin(&link_path)
                        .with_context(|| format!("pinning link at {}", link_path.display()))?;
                    info!(iface, mode = name, "attached");
                    self.note_attached(iface);
                    return Ok(name);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(anyhow!(
            "attaching to {iface}: {}",
            last_err.map(|e| format!("{e:#}")).unwrap_or_default()
        ))
    }

    /// Runs the loaded program once on `frame` with BPF_PROG_TEST_RUN, as if it had arrived on
    /// `ifindex` (0: no device; the FIB lookups of NAT need one). Returns the verdict and the frame
    /// as the program left it.
    pub fn test_run(&self, frame: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let prog: &Xdp = self
            .ebpf
            .program("lb")
            .ok_or_else(|| anyhow!("program lb missing"))?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        if ifindex != 0 {
            opts.ctx_in = Some(&ctx);
        }
        let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        self.vips.insert(key, meta, 0).context("updating VIPS")
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        match self.vips.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from VIPS"),
        }
    }

    /// All VIP entries currently in the map (the agent reconciles against them at start).
    pub fn vip_entries(&self) -> Result<Vec<(VipKey, VipMeta)>> {
        self.vips
            .iter()
            .map(|r| r.context("reading VIPS"))
            .collect()
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("updating BACKENDS[{id}]"))
    }

    /// Every BACKENDS entry in use (flags or address set), for adoption after a restart.
    pub fn backend_entries(&self) -> Result<Vec<(u32, Backend)>> {
        let mut out = Vec::new();
        for id in 1..self.backends.len() {
            let b = self.backends.get(&id, 0).context("reading BACKENDS")?;
            if b.flags != 0 {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    /// Writes one half of a VIP's double-buffered table. Only entries that differ from what that
    /// half held are written; the caller flips `ring_slot` afterwards.
    pub fn write_ring(&mut self, vip_id: u32, slot: u8, table: &[u32]) -> Result<usize> {
        let m = self.limits.ring_size as usize;
        if table.len() != m {
            bail!("table has {} entries, ring size is {m}", table.len());
        }
        let base = (vip_id as usize * 2 + (slot & 1) as usize) * m;
        let old = self
            .written
            .remove(&(vip_id, slot & 1))
            .or_else(|| self.fresh_rings.then(|| vec![0; m]));
        let writes = write_changed(&mut self.rings, base, table, old.as_deref(), "RINGS")?;
        self.written.insert((vip_id, slot & 1), table.to_vec());
        Ok(writes)
    }

    /// Brings the program's gates to `gates`, writing only the words that differ from what this
    /// agent wrote last (all of them the first time: pins may hold a previous agent's).
    pub fn set_gates(&mut self, gates: &Gates) -> Result<usize> {
        let old = self.gates.take();
        let old = old.as_ref();
        let writes = write_changed(
            &mut self.nat_ports,
            0,
            &gates.nat_ports,
            old.map(|o| &o.nat_ports[..]),
            "NAT_PORTS",
        )? + write_changed(
            &mut self.wildcard,
            0,
            &gates.wildcard,
            old.map(|o| &o.wildcard[..]),
            "WILDCARD",
        )? + write_changed(
            &mut self.vip_addrs,
            0,
            &gates.vip_addrs,
            old.map(|o| &o.vip_addrs[..]),
            "VIP_ADDRS",
        )?;
        self.gates = Some(gates.clone());
        Ok(writes)
    }

    /// Empties connection tracking (and the NAT reverse entries): every flow is re-picked by
    /// Maglev on its next packet. An operator tool, and how tests show Maglev's own stability.
    pub fn clear_flows(&mut self) -> Result<usize> {
        let keys: Vec<FlowKey> = self.flows.keys().filter_map(|k| k.ok()).collect();
        for k in &keys {
            let _ = self.flows.remove(k);
        }
        let rev: Vec<FlowKey> = self.nat_reverse.keys().filter_map(|k| k.ok()).collect();
        for k in &rev {
            let _ = self.nat_reverse.remove(k);
        }
        Ok(keys.len())
    }

    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter(|k| k.is_ok()).count()
    }

    fn sum(map: &PerCpuArray<MapData, Counters>, index: u32) -> Result<Counters> {
        let per_cpu = map.get(&index, 0).context("reading counters")?;
        Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            new_flows: a.new_flows + c.new_flows,
        }))
    }

    pub fn vip_counters(&self, vip_id: u32) -> Result<Counters> {
        Self::sum(&self.stats_vip, vip_id)
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<Counters> {
        Self::sum(&self.stats_backend, backend_id)
    }

    /// Zeroes a backend's counters when its id is given to a new backend.
    pub fn reset_backend_counters(&mut self, backend_id: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![Counters::default(); cpus])?;
        self.stats_backend
            .set(backend_id, zero, 0)
            .context("resetting counters")
    }

    /// Verdict counters, summed over CPUs, by reason.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>> {
        let mut out = Vec::with_capacity(REASON_COUNT as usize);
        for r in Reason::ALL {
            let v = self
                .stats_reason
                .get(&(r as u32), 0)
                .context("reading STATS_REASON")?;
            out.push((r, v.iter().sum()));
        }
        Ok(out)
    }
}

/// Forwards the program's aya-log messages to the agent's log as they arrive (the ring buffer's
/// fd becomes readable), until the task is dropped.
pub async fn forward_kernel_logs(logs: KernelLogs) {
    use tokio::io::{unix::AsyncFd, Interest};
    // SAFETY: the fd is the logger's ring buffer map, owned by the logger, which the AsyncFd
    // owns until it is dropped: it stays open and the same for the AsyncFd's whole life.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logs, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => return warn!("kernel-side logging unavailable: {e}"),
    };
    loop {
        let mut ready = match fd.readable_mut().await {
            Ok(r) => r,
            Err(e) => return warn!("kernel-side logging stopped: {e}"),
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// Attaches the decapsulation program to `iface`; it stays attached while the returned handle
/// lives (`lb decap` holds it until a signal).
pub fn attach_decap(iface: &str, mode: AttachMode) -> Result<Ebpf> {
    ensure_bpffs()?;
    let mut ebpf = Ebpf::load(DECAP_OBJECT).context("loading the decap program")?;
    let prog: &mut Xdp = ebpf
        .program_mut("lb_decap")
        .ok_or_else(|| anyhow!("lb_decap missing"))?
        .try_into()?;
    prog.load()
        .context("the verifier rejected the decap program")?;
    let attempts: &[XdpMode] = match mode {
        AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
        AttachMode::Native => &[XdpMode::Driver],
        AttachMode::Generic => &[XdpMode::Skb],
    };
    let mut last = None;
    for m in attempts {
        match prog.attach(iface, *m) {
            Ok(_) => return Ok(ebpf),
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow!(
        "attaching decap to {iface}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Removes an instance's pinned links (detaching the program) and maps.
pub fn detach(pin_root: &Path, instance: &str) -> Result<bool> {
    let root = pin_root.join(instance);
    if !root.exists() {
        return Ok(false);
    }
    // Unpinning the last reference to a link detaches its program; maps go with their pins.
    fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    Ok(true)
}
