//! The L4 desired state — VIPs and their backends — and how a change reaches the maps.
//!
//! Every change rebuilds the VIP's Maglev table, writes it into the spare half of the VIP's ring
//! (only the slots that differ), and then flips `ring_slot` in one VIPS update: a packet sees the
//! old table or the new one, never a mix. Removing a backend takes it out of the table *before*
//! clearing its `USABLE` flag, so no new flow is ever sent to a backend that is going away.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use anyhow::{anyhow, bail, Context as _, Result};
use lb_common::{backend_flags, family, Backend, Counters, VipKey, VipMeta};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    config::{BackendSpec, Mac, Mode, Protocol, VipSpec},
    dataplane::Dataplane,
    maglev::{Member, Table},
    neighbor,
};

/// A VIP as the agent holds it.
struct Vip {
    spec: VipSpec,
    id: u32,
    /// The live half of the ring (mirrors `VipMeta::ring_slot`).
    slot: u8,
    backends: Vec<BackendState>,
}

struct BackendState {
    spec: BackendSpec,
    id: u32,
    draining: bool,
    /// DSR: the MAC in use (configured or resolved); `None` until the neighbour is known.
    mac: Option<Mac>,
}

impl BackendState {
    fn identity(&self) -> String {
        SocketAddr::new(self.spec.address, self.spec.port).to_string()
    }
}

/// Ids handed out in FIFO order of release, so a freed backend id is reused as late as possible:
/// a tracked flow still holding the old id must not land on a new backend that got it.
struct IdPool {
    free: VecDeque<u32>,
}

impl IdPool {
    fn new(range: std::ops::Range<u32>) -> Self {
        IdPool {
            free: range.collect(),
        }
    }
    fn take(&mut self) -> Option<u32> {
        self.free.pop_front()
    }
    fn give_back(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

/// What the API shows of a VIP.
#[derive(Debug, Serialize)]
pub struct VipView {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    pub id: u32,
    pub counters: CountersView,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: &'static str,
    pub id: u32,
    pub mac: Option<Mac>,
    /// Maglev slots this backend owns in the live table.
    pub slots: u32,
    pub counters: CountersView,
}

#[derive(Debug, Serialize, Default)]
pub struct CountersView {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl From<Counters> for CountersView {
    fn from(c: Counters) -> Self {
        CountersView {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
        }
    }
}

/// Why an API change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("no VIP named {0:?}")]
    NoSuchVip(String),
    #[error("VIP {vip:?} has no backend {backend}")]
    NoSuchBackend { vip: String, backend: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Dataplane(#[from] anyhow::Error),
}

pub struct Balancer {
    dp: Dataplane,
    vips: BTreeMap<String, Vip>,
    vip_ids: IdPool,
    backend_ids: IdPool,
    /// Slot counts of each VIP's live table, by backend id (for the API).
    slot_counts: BTreeMap<u32, u32>,
}

fn vip_key(spec: &VipSpec) -> VipKey {
    VipKey {
        addr: addr_words(spec.address),
        port: spec.port.to_be(),
        proto: spec.protocol.number(),
        _pad: 0,
    }
}

/// An address as the program sees it: the packet's bytes, read as native-endian words.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

impl Balancer {
    /// Takes over the dataplane and programs it from `vips`. Ids are assigned in config order, so
    /// an agent restarted with the same config assigns the same ids and tracked flows stay valid.
    pub fn new(dp: Dataplane, vips: &[VipSpec]) -> Result<Self> {
        let limits = dp.limits().clone();
        let mut b = Balancer {
            dp,
            vips: BTreeMap::new(),
            vip_ids: IdPool::new(0..limits.max_vips),
            backend_ids: IdPool::new(1..limits.max_backends),
            slot_counts: BTreeMap::new(),
        };
        // VIPs a previous agent left that this config does not have stop being balanced.
        let wanted: Vec<VipKey> = vips.iter().map(vip_key).collect();
        for (key, _) in b.dp.vip_entries()? {
            if !wanted.contains(&key) {
                b.dp.remove_vip(&key)?;
            }
        }
        for spec in vips {
            b.add_vip(spec.clone())?;
        }
        Ok(b)
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    fn add_vip(&mut self, spec: VipSpec) -> Result<()> {
        if self.vips.contains_key(&spec.name) {
            bail!("VIP {:?} exists", spec.name);
        }
        let id = self
            .vip_ids
            .take()
            .ok_or_else(|| anyhow!("max_vips reached"))?;
        let mut vip = Vip {
            spec: spec.clone(),
            id,
            slot: 1,
            backends: Vec::new(),
        };
        // Start from whatever the live half holds, so the first rebuild writes only differences.
        if let Some((_, meta)) = self
            .dp
            .vip_entries()?
            .into_iter()
            .find(|(k, _)| *k == vip_key(&spec))
        {
            vip.slot = meta.ring_slot & 1;
        }
        for b in &spec.backends {
            let bid = self
                .backend_ids
                .take()
                .ok_or_else(|| anyhow!("max_backends reached"))?;
            vip.backends.push(BackendState {
                spec: b.clone(),
                id: bid,
                draining: false,
                mac: b.mac,
            });
        }
        for b in &mut vip.backends {
            if spec.mode == Mode::Dsr && b.mac.is_none() {
                b.mac = neighbor::resolve(b.spec.address);
                if b.mac.is_none() {
                    warn!(vip = spec.name, backend = %b.spec.address, "MAC not resolved yet; will retry");
                }
            }
            self.dp
                .set_backend(b.id, &backend_entry(&b.spec, b.mac, false))?;
            self.dp.reset_backend_counters(b.id)?;
        }
        self.vips.insert(spec.name.clone(), vip);
        self.rebuild(&spec.name)
    }

    /// Builds the VIP's table from its active backends and publishes it (write spare, flip).
    fn rebuild(&mut self, name: &str) -> Result<()> {
        let started = Instant::now();
        let ring_size = self.dp.limits().ring_size;
        let vip = self
            .vips
            .get_mut(name)
            .ok_or_else(|| anyhow!("no VIP {name}"))?;
        let mut active: Vec<(String, u32, u32)> = vip
            .backends
            .iter()
            .filter(|b| !b.draining && b.spec.weight > 0)
            .map(|b| (b.identity(), b.spec.weight, b.id))
            .collect();
        // The table depends on member order: sort by identity so every node agrees.
        active.sort();
        let ids: Vec<u32> = if active.is_empty() {
            vec![lb_common::BACKEND_NONE; ring_size as usize]
        } else {
            let members: Vec<Member<'_>> = active
                .iter()
                .map(|(ident, w, _)| Member {
                    identity: ident,
                    weight: *w,
                })
                .collect();
            let table =
                Table::build(&members, ring_size).map_err(|e| anyhow!("VIP {name}: {e}"))?;
            for (i, count) in table.counts().into_iter().enumerate() {
                self.slot_counts.insert(active[i].2, count);
            }
            table
                .slots()
                .iter()
                .map(|&m| active[m as usize].2)
                .collect()
        };
        for b in &vip.backends {
            if b.draining || b.spec.weight == 0 {
                self.slot_counts.insert(b.id, 0);
            }
        }
        let spare = vip.slot ^ 1;
        let writes = self.dp.write_ring(vip.id, spare, &ids)?;
        let meta = VipMeta {
            id: vip.id,
            mode: vip.spec.mode.number(),
            ring_slot: spare,
            _pad: [0; 2],
        };
        self.dp.set_vip(&vip_key(&vip.spec), &meta)?;
        vip.slot = spare;
        info!(
            vip = name,
            backends = active.len(),
            slot_writes = writes,
            elapsed_us = started.elapsed().as_micros() as u64,
            "published Maglev table"
        );
        Ok(())
    }

    fn vip_mut(&mut self, name: &str) -> Result<&mut Vip, ChangeError> {
        self.vips
            .get_mut(name)
            .ok_or_else(|| ChangeError::NoSuchVip(name.into()))
    }

    fn find(vip: &Vip, addr: IpAddr, port: Option<u16>) -> Option<usize> {
        vip.backends
            .iter()
            .position(|b| b.spec.address == addr && port.is_none_or(|p| p == b.spec.port))
    }

    /// Adds a backend, or updates the weight of an existing one and takes it out of draining.
    pub fn add_backend(&mut self, vip_name: &str, spec: BackendSpec) -> Result<bool, ChangeError> {
        if spec.weight > 1000 {
            return Err(ChangeError::Invalid("weight must be 0..=1000".into()));
        }
        let vip = self.vip_mut(vip_name)?;
        let mode = vip.spec.mode;
        if mode == Mode::Nat && spec.address.is_ipv4() != vip.spec.address.is_ipv4() {
            return Err(ChangeError::Invalid(
                "NAT backends must have the VIP's address family".into(),
            ));
        }
        let created = match Self::find(vip, spec.address, Some(spec.port)) {
            Some(i) => {
                let b = &mut vip.backends[i];
                b.spec.weight = spec.weight;
                b.draining = false;
                if spec.mac.is_some() {
                    b.mac = spec.mac;
                }
                let (id, entry) = (b.id, backend_entry(&b.spec, b.mac, false));
                self.dp.set_backend(id, &entry)?;
                false
            }
            None => {
                let id = self
                    .backend_ids
                    .take()
                    .ok_or_else(|| ChangeError::Invalid("max_backends reached".into()))?;
                let mac = match (mode, spec.mac) {
                    (Mode::Dsr, None) => neighbor::resolve(spec.address),
                    (_, m) => m,
                };
                self.dp.reset_backend_counters(id)?;
                self.dp.set_backend(id, &backend_entry(&spec, mac, false))?;
                let vip = self.vip_mut(vip_name)?;
                vip.backends.push(BackendState {
                    spec,
                    id,
                    draining: false,
                    mac,
                });
                true
            }
        };
        self.rebuild(vip_name)?;
        Ok(created)
    }

    /// Removes a backend: out of the table first, then its flows are released (conntrack re-picks
    /// them on their next packet).
    pub fn remove_backend(
        &mut self,
        vip_name: &str,
        addr: IpAddr,
        port: Option<u16>,
    ) -> Result<(), ChangeError> {
        let vip = self.vip_mut(vip_name)?;
        let i = Self::find(vip, addr, port).ok_or_else(|| ChangeError::NoSuchBackend {
            vip: vip_name.into(),
            backend: addr.to_string(),
        })?;
        let gone = vip.backends.remove(i);
        self.rebuild(vip_name)?;
        self.dp.set_backend(gone.id, &Backend::default())?;
        self.slot_counts.remove(&gone.id);
        self.backend_ids.give_back(gone.id);
        info!(vip = vip_name, backend = %gone.identity(), "backend removed");
        Ok(())
    }

    /// Drains a backend: no new flows, tracked ones stay until they end.
    pub fn drain_backend(
        &mut self,
        vip_name: &str,
        addr: IpAddr,
        port: Option<u16>,
    ) -> Result<(), ChangeError> {
        let vip = self.vip_mut(vip_name)?;
        let i = Self::find(vip, addr, port).ok_or_else(|| ChangeError::NoSuchBackend {
            vip: vip_name.into(),
            backend: addr.to_string(),
        })?;
        let b = &mut vip.backends[i];
        b.draining = true;
        let (id, entry) = (b.id, backend_entry(&b.spec, b.mac, true));
        self.rebuild(vip_name)?;
        self.dp.set_backend(id, &entry)?;
        Ok(())
    }

    /// Retries MAC resolution for DSR backends that have none (the neighbour may not have been
    /// reachable when it was added). Returns how many were resolved.
    pub fn refresh_neighbors(&mut self) -> Result<usize> {
        let mut updates = Vec::new();
        for vip in self.vips.values_mut() {
            if vip.spec.mode != Mode::Dsr {
                continue;
            }
            for b in vip.backends.iter_mut().filter(|b| b.mac.is_none()) {
                if let Some(mac) = neighbor::resolve(b.spec.address) {
                    b.mac = Some(mac);
                    updates.push((b.id, backend_entry(&b.spec, b.mac, b.draining)));
                }
            }
        }
        for (id, entry) in &updates {
            self.dp
                .set_backend(*id, entry)
                .context("updating a resolved MAC")?;
        }
        Ok(updates.len())
    }

    pub fn clear_flows(&mut self) -> Result<usize> {
        self.dp.clear_flows()
    }

    pub fn list(&self) -> Result<Vec<VipView>> {
        self.vips
            .values()
            .map(|v| {
                let backends = v
                    .backends
                    .iter()
                    .map(|b| {
                        Ok(BackendView {
                            address: b.spec.address,
                            port: b.spec.port,
                            weight: b.spec.weight,
                            state: if b.draining { "draining" } else { "active" },
                            id: b.id,
                            mac: b.mac,
                            slots: self.slot_counts.get(&b.id).copied().unwrap_or(0),
                            counters: self.dp.backend_counters(b.id)?.into(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(VipView {
                    name: v.spec.name.clone(),
                    address: v.spec.address,
                    port: v.spec.port,
                    protocol: v.spec.protocol,
                    mode: v.spec.mode,
                    id: v.id,
                    counters: self.dp.vip_counters(v.id)?.into(),
                    backends,
                })
            })
            .collect()
    }
}

fn backend_entry(spec: &BackendSpec, mac: Option<Mac>, draining: bool) -> Backend {
    let mut flags = backend_flags::USABLE;
    if draining {
        flags |= backend_flags::DRAINING;
    }
    Backend {
        addr: addr_words(spec.address),
        port: spec.port.to_be(),
        flags,
        family: if spec.address.is_ipv4() {
            family::V4
        } else {
            family::V6
        },
        mac: mac.unwrap_or_default().0,
        _pad: [0; 2],
    }
}
