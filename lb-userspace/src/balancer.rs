//! The L4 desired state — VIPs and their backends — and how a change reaches the maps.
//!
//! Every change rebuilds the VIP's Maglev table, writes it into the spare half of the VIP's ring
//! (only the slots that differ), and then flips `ring_slot` in one VIPS update: a packet sees the
//! old table or the new one, never a mix. Removing a backend takes it out of the table *before*
//! clearing its `USABLE` flag, so no new flow is ever sent to a backend that is going away.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    time::Instant,
};

use anyhow::{anyhow, bail, Context as _, Result};
use lb_common::{backend_flags, family, Backend, Counters, VipKey, VipMeta};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    dataplane::{Dataplane, Gates},
    maglev::{Member, Table},
    model::{addr_words, BackendMode, Mac, Mode, Protocol, VipSpec},
    neighbor,
    registry::InstanceKey,
};

/// A VIP as the agent holds it.
struct Vip {
    spec: VipSpec,
    id: u32,
    /// The live half of the ring (mirrors `VipMeta::ring_slot`).
    slot: u8,
    backends: BTreeMap<InstanceKey, BackendState>,
}

/// What the control loop wants for one backend of a VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub key: InstanceKey,
    pub weight: u32,
    pub mac: Option<Mac>,
    pub state: BackendMode,
}

struct BackendState {
    id: u32,
    weight: u32,
    state: BackendMode,
    /// DSR: the MAC in use (configured or resolved); `None` until the neighbour is known.
    mac: Option<Mac>,
    /// The MAC came from the registry, not from the neighbour table.
    mac_given: bool,
}

/// Ids handed out in FIFO order of release, so a freed backend id is reused as late as possible:
/// a tracked flow still holding the old id must not land on a new backend that got it.
struct IdPool {
    free: VecDeque<u32>,
}

impl IdPool {
    fn new(range: std::ops::Range<u32>, taken: &BTreeSet<u32>) -> Self {
        IdPool {
            free: range.filter(|i| !taken.contains(i)).collect(),
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
    pub service: String,
    pub id: u32,
    pub counters: CountersView,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: BackendMode,
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

pub struct Balancer {
    dp: Dataplane,
    vips: BTreeMap<String, Vip>,
    vip_ids: IdPool,
    backend_ids: IdPool,
    /// Backend ids a previous agent left in BACKENDS, by (vip id, instance): claimed by the first
    /// applies so tracked flows keep their backend across a restart; the rest are released by
    /// [`Balancer::finish_adoption`].
    adoptable: BTreeMap<(u32, InstanceKey), u32>,
    /// Slot counts of each backend in its VIP's live table (for the API).
    slot_counts: BTreeMap<u32, u32>,
    /// Maglev tables published per VIP (for metrics).
    rebuilds: BTreeMap<String, u64>,
}

/// The source port a NAT backend answers from: its own, or the VIP's when it keeps the client's
/// (0, from a port-0 VIP: any).
fn nat_reply_port(key: &InstanceKey, vip: &VipSpec) -> u16 {
    if key.port != 0 {
        key.port
    } else {
        vip.port
    }
}

fn vip_key(spec: &VipSpec) -> VipKey {
    VipKey {
        addr: addr_words(spec.address),
        port: spec.port.to_be(),
        proto: spec.protocol.number(),
        _pad: 0,
    }
}

fn words_addr(w: [u32; 4], family: u8) -> Option<IpAddr> {
    match family {
        family::V4 => Some(IpAddr::from(w[0].to_ne_bytes())),
        family::V6 => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
            }
            Some(IpAddr::from(o))
        }
        _ => None,
    }
}

impl Balancer {
    /// Takes over the dataplane: adopts the VIP and backend ids a previous agent left in the
    /// pinned maps (so its tracked flows stay valid), removes VIPs this config no longer has, and
    /// creates the rest with no backends; [`Balancer::apply`] fills them.
    pub fn new(mut dp: Dataplane, vips: &[VipSpec]) -> Result<Self> {
        let limits = dp.limits().clone();
        let existing = dp.vip_entries()?;
        let wanted: Vec<VipKey> = vips.iter().map(vip_key).collect();
        let mut vip_taken = BTreeSet::new();
        for (key, meta) in &existing {
            if wanted.contains(key) {
                vip_taken.insert(meta.id);
            } else {
                dp.remove_vip(key)?;
            }
        }
        let mut adoptable = BTreeMap::new();
        let mut backend_taken = BTreeSet::new();
        for (id, b) in dp.backend_entries()? {
            let Some(address) = words_addr(b.addr, b.family) else {
                continue;
            };
            if b.flags == 0 || !vip_taken.contains(&b.vip_id) {
                continue;
            }
            let key = InstanceKey {
                address,
                port: u16::from_be(b.port),
            };
            adoptable.insert((b.vip_id, key), id);
            backend_taken.insert(id);
        }
        let mut bal = Balancer {
            dp,
            vips: BTreeMap::new(),
            vip_ids: IdPool::new(0..limits.max_vips, &vip_taken),
            backend_ids: IdPool::new(1..limits.max_backends, &backend_taken),
            adoptable,
            slot_counts: BTreeMap::new(),
            rebuilds: BTreeMap::new(),
        };
        // The program may be running on these maps (a reload): every lookup stays on until the
        // VIPs are in, then the gates close to what they need.
        bal.dp.set_gates(&Gates::open())?;
        for spec in vips {
            let adopted = existing
                .iter()
                .find(|(k, _)| *k == vip_key(spec))
                .map(|(_, m)| *m);
            bal.add_vip(spec.clone(), adopted)?;
        }
        let gates = bal.gates();
        bal.dp.set_gates(&gates)?;
        if !bal.adoptable.is_empty() {
            info!(
                backends = bal.adoptable.len(),
                "found backends of a previous agent in the pinned maps"
            );
        }
        Ok(bal)
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    fn add_vip(&mut self, spec: VipSpec, adopted: Option<VipMeta>) -> Result<()> {
        if self.vips.contains_key(&spec.name) {
            bail!("VIP {:?} exists", spec.name);
        }
        let (id, slot) = match adopted {
            Some(m) => (m.id, m.ring_slot & 1),
            None => (
                self.vip_ids
                    .take()
                    .ok_or_else(|| anyhow!("max_vips reached"))?,
                1,
            ),
        };
        let name = spec.name.clone();
        self.vips.insert(
            name.clone(),
            Vip {
                spec,
                id,
                slot,
                backends: BTreeMap::new(),
            },
        );
        if adopted.is_none() {
            // A new VIP starts with an empty table (every slot "none") until its backends arrive.
            self.rebuild(&name)?;
        }
        Ok(())
    }

    /// Releases adoptable ids no apply claimed: those backends are gone from every source.
    pub fn finish_adoption(&mut self) -> Result<()> {
        for (_, id) in std::mem::take(&mut self.adoptable) {
            self.dp.set_backend(id, &Backend::default())?;
            self.backend_ids.give_back(id);
        }
        let gates = self.gates();
        self.dp.set_gates(&gates)?;
        Ok(())
    }

    /// The gates the VIPs and their backends need, adoptable ones included (a previous agent's
    /// flows to them may still be answered).
    fn gates(&self) -> Gates {
        let mut g = Gates::default();
        for vip in self.vips.values() {
            g.vip_addr(&addr_words(vip.spec.address));
            if vip.spec.port == 0 {
                g.wildcard(vip.spec.protocol.number());
            }
            if vip.spec.mode != Mode::Nat {
                continue;
            }
            let adopted = self
                .adoptable
                .keys()
                .filter(|(id, _)| *id == vip.id)
                .map(|(_, k)| k);
            for key in vip.backends.keys().chain(adopted) {
                g.nat_port(nat_reply_port(key, &vip.spec));
            }
        }
        g
    }

    /// Maglev tables published per VIP since this agent started.
    pub fn rebuilds(&self) -> &BTreeMap<String, u64> {
        &self.rebuilds
    }

    pub fn vip_names(&self) -> Vec<String> {
        self.vips.keys().cloned().collect()
    }

    /// Brings a VIP's backends to `desired`: new backends get ids (adopted when a previous agent
    /// had them), changed ones are updated, missing ones removed — after the new table is live.
    /// The table is rebuilt only when the set of active backends or their weights changed.
    /// Returns the number of map writes.
    pub fn apply(&mut self, vip_name: &str, desired: &[Desired]) -> Result<usize> {
        let spec = &self
            .vips
            .get(vip_name)
            .ok_or_else(|| anyhow!("no VIP {vip_name}"))?
            .spec;
        let mut writes = 0;
        // Replies from a new NAT backend may come back as soon as its entry is written: open the
        // gate first (and close what is no longer needed once the change is done, below).
        if spec.mode == Mode::Nat {
            let mut gates = self.gates();
            for d in desired {
                gates.nat_port(nat_reply_port(&d.key, spec));
            }
            writes += self.dp.set_gates(&gates)?;
        }
        let vip = self
            .vips
            .get_mut(vip_name)
            .ok_or_else(|| anyhow!("no VIP {vip_name}"))?;
        let (vip_id, mode) = (vip.id, vip.spec.mode);
        let mut table_changed = false;
        let want: BTreeMap<InstanceKey, &Desired> = desired.iter().map(|d| (d.key, d)).collect();
        let gone: Vec<InstanceKey> = vip
            .backends
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in &gone {
            table_changed |= vip
                .backends
                .get(k)
                .is_some_and(|b| b.state == BackendMode::Active);
        }
        for (key, d) in &want {
            let mac_given = d.mac.is_some();
            match vip.backends.get_mut(key) {
                Some(b) => {
                    let was_active = b.state == BackendMode::Active;
                    let now_active = d.state == BackendMode::Active;
                    if was_active != now_active || (now_active && b.weight != d.weight) {
                        table_changed = true;
                    }
                    let mac = if mac_given {
                        d.mac
                    } else if b.mac_given {
                        None
                    } else {
                        b.mac
                    };
                    if mode.needs_mac() && b.mac.is_some() != mac.is_some() {
                        table_changed = true;
                    }
                    if b.state != d.state || b.mac != mac {
                        b.state = d.state;
                        b.mac = mac;
                        b.mac_given = mac_given;
                        let entry = backend_entry(key, vip_id, b.mac, b.state);
                        self.dp.set_backend(b.id, &entry)?;
                        writes += 1;
                    }
                    b.weight = d.weight;
                }
                None => {
                    let id = match self.adoptable.remove(&(vip_id, *key)) {
                        Some(id) => id,
                        None => {
                            let id = self
                                .backend_ids
                                .take()
                                .ok_or_else(|| anyhow!("max_backends reached"))?;
                            self.dp.reset_backend_counters(id)?;
                            id
                        }
                    };
                    let mac = match (mode.needs_mac(), d.mac) {
                        (true, None) => {
                            let m = neighbor::resolve(key.address);
                            if m.is_none() {
                                warn!(vip = vip_name, backend = %key, "MAC not resolved yet; will retry");
                            }
                            m
                        }
                        (_, m) => m,
                    };
                    self.dp
                        .set_backend(id, &backend_entry(key, vip_id, mac, d.state))?;
                    writes += 1;
                    vip.backends.insert(
                        *key,
                        BackendState {
                            id,
                            weight: d.weight,
                            state: d.state,
                            mac,
                            mac_given,
                        },
                    );
                    table_changed |= d.state == BackendMode::Active;
                }
            }
        }
        let removed: Vec<BackendState> =
            gone.iter().filter_map(|k| vip.backends.remove(k)).collect();
        if table_changed || !removed.is_empty() {
            writes += self.rebuild(vip_name)?;
        }
        // Only now that no table points at them: release their flows and ids.
        for b in removed {
            self.dp.set_backend(b.id, &Backend::default())?;
            self.slot_counts.remove(&b.id);
            self.backend_ids.give_back(b.id);
            writes += 1;
        }
        if mode == Mode::Nat {
            let gates = self.gates();
            writes += self.dp.set_gates(&gates)?;
        }
        Ok(writes)
    }

    /// Builds the VIP's table from its active backends and publishes it (write spare, flip).
    fn rebuild(&mut self, name: &str) -> Result<usize> {
        let started = Instant::now();
        let ring_size = self.dp.limits().ring_size;
        let vip = self
            .vips
            .get_mut(name)
            .ok_or_else(|| anyhow!("no VIP {name}"))?;
        let mut active: Vec<(String, u32, u32)> = vip
            .backends
            .iter()
            // A DSR backend without a MAC cannot be forwarded to: it joins when resolved.
            .filter(|(_, b)| b.state == BackendMode::Active && b.weight > 0)
            .filter(|(_, b)| !vip.spec.mode.needs_mac() || b.mac.is_some())
            .map(|(k, b)| (k.to_string(), b.weight, b.id))
            .collect();
        // The table depends on member order: sort by identity so every node agrees.
        active.sort();
        for b in vip.backends.values() {
            self.slot_counts.insert(b.id, 0);
        }
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
        *self.rebuilds.entry(name.to_string()).or_default() += 1;
        info!(
            vip = name,
            backends = active.len(),
            slot_writes = writes,
            elapsed_us = started.elapsed().as_micros() as u64,
            "published Maglev table"
        );
        Ok(writes + 1)
    }

    /// Retries MAC resolution for DSR backends that have none (the neighbour may not have been
    /// reachable when it was added). Returns how many were resolved.
    pub fn refresh_neighbors(&mut self) -> Result<usize> {
        let mut updates = Vec::new();
        let mut rebuild = BTreeSet::new();
        for (name, vip) in self.vips.iter_mut() {
            if !vip.spec.mode.needs_mac() {
                continue;
            }
            for (key, b) in vip.backends.iter_mut().filter(|(_, b)| b.mac.is_none()) {
                if let Some(mac) = neighbor::resolve(key.address) {
                    b.mac = Some(mac);
                    updates.push((b.id, backend_entry(key, vip.id, b.mac, b.state)));
                    rebuild.insert(name.clone());
                }
            }
        }
        for (id, entry) in &updates {
            self.dp
                .set_backend(*id, entry)
                .context("updating a resolved MAC")?;
        }
        for name in rebuild {
            self.rebuild(&name)?;
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
                    .map(|(k, b)| {
                        Ok(BackendView {
                            address: k.address,
                            port: k.port,
                            weight: b.weight,
                            state: b.state,
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
                    service: v.spec.service.clone(),
                    id: v.id,
                    counters: self.dp.vip_counters(v.id)?.into(),
                    backends,
                })
            })
            .collect()
    }
}

fn backend_entry(key: &InstanceKey, vip_id: u32, mac: Option<Mac>, state: BackendMode) -> Backend {
    let flags = match state {
        BackendMode::Active => backend_flags::USABLE,
        BackendMode::Draining => backend_flags::USABLE | backend_flags::DRAINING,
        BackendMode::Down => 0,
    };
    Backend {
        addr: addr_words(key.address),
        port: key.port.to_be(),
        flags,
        family: if key.address.is_ipv4() {
            family::V4
        } else {
            family::V6
        },
        mac: mac.unwrap_or_default().0,
        _pad: [0; 2],
        vip_id,
    }
}
