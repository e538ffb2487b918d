//! What the maps must become, as a value: the L4 state the agent believes the maps hold, and the
//! ordered writes that take it to a desired state.
//!
//! Nothing here touches a map, a socket or a clock, so every ordering rule is a unit test
//! (`plan/tests.rs`) rather than a root-only end-to-end one. The rules, in the order a plan emits
//! them:
//! - A NAT VIP's reply gate opens for a new backend's port *before* the backend's entry exists:
//!   its replies may come back as soon as a flow reaches it.
//! - A changed table goes into the VIP's spare ring half, and only then does one VIPS write flip
//!   `ring_slot` to it: a packet sees the old table or the new one, never a mix.
//! - A removed backend leaves the table (the flip) *before* its entry is cleared, and its id goes
//!   to the back of the free list: a tracked flow still holding the old id must not land on a new
//!   backend that got it.
//! - Gates that nothing needs any more close last.
//!
//! A plan is computed on a copy of the state and the copy is kept only once every write of the
//! plan succeeded ([`super::Balancer`]); a failed write leaves the old state, with only the ring
//! flips that did happen recorded ([`L4State::note_flips`]).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{backend_flags, family, gate, Backend, VipKey, VipMeta};

use super::maglev::{MaglevError, Member, Table};
use crate::model::{addr_words, instance::InstanceKey, BackendMode, Limits, Mac, Mode, VipSpec};

/// What the control loop wants for one backend of a VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub key: InstanceKey,
    pub weight: u32,
    /// Given by the source (registry metadata); otherwise the neighbour table's, once known.
    pub mac: Option<Mac>,
    pub state: BackendMode,
}

/// One map write, in the order the plan needs it done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Bring the gate maps to these words (the writer skips words that did not change).
    Gates(Gates),
    /// Zero a backend id's counters before a new backend gets it.
    ResetCounters {
        backend: u32,
    },
    /// A backend's entry; `Backend::default()` clears it (its flows stop being forwarded).
    Backend {
        id: u32,
        entry: Backend,
    },
    /// One half of a VIP's double-buffered ring.
    Ring {
        vip: u32,
        half: u8,
        ids: Vec<u32>,
    },
    /// A VIP's entry: created, or its ring flipped.
    Vip {
        key: VipKey,
        meta: VipMeta,
    },
    RemoveVip {
        key: VipKey,
    },
}

/// A table a plan publishes: for the log and the rebuild counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub vip: String,
    pub members: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub writes: Vec<Write>,
    pub published: Vec<Published>,
}

/// What lets a packet that is not for a VIP skip lookups ([`lb_common::gate`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gates {
    pub nat_ports: Vec<u64>,
    pub wildcard: Vec<u32>,
    pub vip_addrs: Vec<u64>,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            nat_ports: vec![0; gate::NAT_PORT_WORDS as usize],
            wildcard: vec![0; gate::PROTOCOLS as usize],
            vip_addrs: vec![0; gate::VIP_ADDR_WORDS as usize],
        }
    }
}

impl Gates {
    /// Every gate open: the program looks everything up, as if there were no gates.
    pub fn open() -> Self {
        Gates {
            nat_ports: vec![u64::MAX; gate::NAT_PORT_WORDS as usize],
            wildcard: vec![1; gate::PROTOCOLS as usize],
            vip_addrs: vec![u64::MAX; gate::VIP_ADDR_WORDS as usize],
        }
    }

    /// A NAT backend may answer from `port`; 0 means any port (a port-0 VIP whose backends keep
    /// the client's destination port).
    pub fn nat_port(&mut self, port: u16) {
        if port == 0 {
            self.nat_ports.fill(u64::MAX);
        } else {
            self.nat_ports[port as usize / 64] |= 1 << (port % 64);
        }
    }

    #[cfg(test)]
    pub fn has_nat_port(&self, port: u16) -> bool {
        self.nat_ports[port as usize / 64] & (1 << (port % 64)) != 0
    }

    /// A VIP of protocol `proto` takes every port.
    pub fn wildcard(&mut self, proto: u8) {
        self.wildcard[proto as usize] = 1;
    }

    /// A VIP's address, as the maps store it.
    pub fn vip_addr(&mut self, addr: &[u32; 4]) {
        let bit = gate::addr_bit(addr) as usize;
        self.vip_addrs[bit / 64] |= 1 << (bit % 64);
    }
}

/// Ids handed out in FIFO order of release, so a freed id is reused as late as possible: ids
/// never used come first (ascending, skipping those a previous agent left), then released ones
/// in the order they were released. Cheap to copy: the unused ids are a counter, and the
/// released ones are shared until a plan takes or gives one.
#[derive(Clone, Debug)]
struct IdPool {
    next: u32,
    end: u32,
    /// Ids at or above `next` that are in use (adopted from a previous agent).
    taken: BTreeSet<u32>,
    released: Arc<VecDeque<u32>>,
}

impl IdPool {
    fn new(range: std::ops::Range<u32>, taken: &BTreeSet<u32>) -> Self {
        IdPool {
            next: range.start,
            end: range.end,
            taken: taken
                .iter()
                .copied()
                .filter(|i| range.contains(i))
                .collect(),
            released: Arc::new(VecDeque::new()),
        }
    }

    fn take(&mut self) -> Option<u32> {
        while self.next < self.end {
            let id = self.next;
            self.next += 1;
            if !self.taken.remove(&id) {
                return Some(id);
            }
        }
        if self.released.is_empty() {
            return None;
        }
        Arc::make_mut(&mut self.released).pop_front()
    }

    fn give_back(&mut self, id: u32) {
        Arc::make_mut(&mut self.released).push_back(id);
    }
}

/// A VIP as the agent believes the maps hold it.
#[derive(Clone, Debug)]
pub struct VipState {
    pub spec: VipSpec,
    pub id: u32,
    /// The live half of the ring (mirrors `VipMeta::ring_slot`).
    pub slot: u8,
    pub backends: BTreeMap<InstanceKey, BackendState>,
    /// Tables published since this agent started (for metrics).
    pub rebuilds: u64,
    /// The live table as slot → backend identity, hashed ([`table_digest`]): what nodes
    /// compare, since the ids in the ring are each agent's own.
    pub digest: u64,
}

/// A digest of a table as slot → backend identity (`address:port`), independent of the ids
/// an agent gave its backends: two nodes whose digests agree send every flow hash to the same
/// backend. xxh3 over the sorted identities, then each slot's index into them; an empty table
/// is the digest of no identities and `M` empty slots.
pub fn table_digest(identities: &[&str], slots: impl Iterator<Item = Option<u32>>) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(identities.len() as u64).to_le_bytes());
    for id in identities {
        h.update(id.as_bytes());
        h.update(&[0]);
    }
    for s in slots {
        h.update(&s.unwrap_or(u32::MAX).to_le_bytes());
    }
    h.digest()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendState {
    pub id: u32,
    pub weight: u32,
    pub state: BackendMode,
    /// For modes that rewrite the MAC: the one in use; `None` until the neighbour is known.
    pub mac: Option<Mac>,
    /// Maglev slots it owns in the live table (for the API).
    pub slots: u32,
}

/// What a previous agent left in the pinned maps.
#[derive(Clone, Debug, Default)]
pub struct Existing {
    pub vips: Vec<(VipKey, VipMeta)>,
    /// Ids with a non-empty entry.
    pub backends: Vec<(u32, Backend)>,
}

/// The agent's model of the maps, advanced only by plans whose writes all succeeded. A plan
/// works on a copy, so copying is cheap: each VIP, the gates and the neighbours are shared until
/// a plan changes them, and a plan changes one VIP.
#[derive(Clone, Debug)]
pub struct L4State {
    vips: BTreeMap<String, Arc<VipState>>,
    vip_ids: IdPool,
    backend_ids: IdPool,
    /// Backend ids a previous agent left, by (vip id, instance): claimed by the first plans so
    /// tracked flows keep their backend across a restart; the rest go with
    /// [`L4State::finish_adoption`].
    adoptable: BTreeMap<(u32, InstanceKey), u32>,
    /// MACs the neighbour task found, by backend address.
    neighbours: Arc<BTreeMap<IpAddr, Mac>>,
    /// The gates as last written.
    gates: Arc<Gates>,
    ring_size: u32,
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

pub fn vip_key(spec: &VipSpec) -> VipKey {
    VipKey {
        addr: addr_words(spec.address),
        port: spec.port.to_be(),
        proto: spec.protocol.number(),
        _pad: 0,
    }
}

fn words_addr(w: [u32; 4], fam: u8) -> Option<IpAddr> {
    match fam {
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

pub fn backend_entry(
    key: &InstanceKey,
    vip_id: u32,
    mac: Option<Mac>,
    state: BackendMode,
) -> Backend {
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

/// Why a plan could not be made; the state it started from is unchanged.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no VIP {0}")]
    NoVip(String),
    #[error("VIP {0:?} exists")]
    VipExists(String),
    #[error("max_vips reached")]
    MaxVips,
    #[error("max_backends reached")]
    MaxBackends,
    #[error("VIP {vip}: {source}")]
    Table {
        vip: String,
        #[source]
        source: MaglevError,
    },
}

impl L4State {
    /// Takes over what a previous agent left: keeps the ids of VIPs `vips` still has (so its
    /// tracked flows stay valid), removes the others, and creates the rest with an empty table.
    /// Every gate is open while this happens (the program may be running on these maps) and
    /// closes to what the VIPs need at the end.
    pub fn adopt(
        limits: &Limits,
        existing: &Existing,
        vips: &[VipSpec],
    ) -> Result<(L4State, Plan), PlanError> {
        let wanted: Vec<VipKey> = vips.iter().map(vip_key).collect();
        let mut plan = Plan::default();
        plan.writes.push(Write::Gates(Gates::open()));
        let mut vip_taken = BTreeSet::new();
        for (key, meta) in &existing.vips {
            if wanted.contains(key) {
                vip_taken.insert(meta.id);
            } else {
                plan.writes.push(Write::RemoveVip { key: *key });
            }
        }
        let mut adoptable = BTreeMap::new();
        let mut backend_taken = BTreeSet::new();
        // The MACs a previous agent resolved are in its entries: its DSR and ipip backends stay
        // in their tables across the restart instead of waiting for the neighbour task.
        let mut neighbours = BTreeMap::new();
        let rewrites_mac: BTreeSet<u32> = existing
            .vips
            .iter()
            .filter(|(k, m)| {
                wanted.contains(k)
                    && (m.mode == Mode::Dsr.number() || m.mode == Mode::Ipip.number())
            })
            .map(|(_, m)| m.id)
            .collect();
        for (id, b) in &existing.backends {
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
            if rewrites_mac.contains(&b.vip_id) && b.mac != [0; 6] {
                neighbours.insert(address, Mac(b.mac));
            }
            adoptable.insert((b.vip_id, key), *id);
            backend_taken.insert(*id);
        }
        let mut s = L4State {
            vips: BTreeMap::new(),
            vip_ids: IdPool::new(0..limits.max_vips, &vip_taken),
            backend_ids: IdPool::new(1..limits.max_backends, &backend_taken),
            adoptable,
            neighbours: Arc::new(neighbours),
            gates: Arc::new(Gates::open()),
            ring_size: limits.ring_size,
        };
        for spec in vips {
            let adopted = existing
                .vips
                .iter()
                .find(|(k, _)| *k == vip_key(spec))
                .map(|(_, m)| *m);
            s.add_vip(spec.clone(), adopted, &mut plan)?;
        }
        let gates = s.wanted_gates();
        s.set_gates(gates, &mut plan);
        Ok((s, plan))
    }

    fn add_vip(
        &mut self,
        spec: VipSpec,
        adopted: Option<VipMeta>,
        plan: &mut Plan,
    ) -> Result<(), PlanError> {
        if self.vips.contains_key(&spec.name) {
            return Err(PlanError::VipExists(spec.name));
        }
        let (id, slot) = match adopted {
            Some(m) => (m.id, m.ring_slot & 1),
            None => (self.vip_ids.take().ok_or(PlanError::MaxVips)?, 1),
        };
        let name = spec.name.clone();
        self.vips.insert(
            name.clone(),
            Arc::new(VipState {
                spec,
                id,
                slot,
                backends: BTreeMap::new(),
                rebuilds: 0,
                // Not known until this agent publishes a table of its own.
                digest: 0,
            }),
        );
        if adopted.is_none() {
            // A new VIP starts with an empty table (every slot "none") until its backends arrive.
            self.publish(&name, plan)?;
        }
        Ok(())
    }

    /// Releases the adoptable ids no plan claimed: those backends are gone from every source.
    pub fn finish_adoption(&self) -> (L4State, Plan) {
        let mut s = self.clone();
        let mut plan = Plan::default();
        for (_, id) in std::mem::take(&mut s.adoptable) {
            plan.writes.push(Write::Backend {
                id,
                entry: Backend::default(),
            });
            s.backend_ids.give_back(id);
        }
        let gates = s.wanted_gates();
        s.set_gates(gates, &mut plan);
        (s, plan)
    }

    /// Brings a VIP's backends to `desired`: new backends get ids (adopted when a previous agent
    /// had them), changed ones are updated, missing ones removed after the new table is live.
    /// The table is rebuilt only when the set of members or their weights changed.
    pub fn plan(&self, vip_name: &str, desired: &[Desired]) -> Result<(L4State, Plan), PlanError> {
        let mut s = self.clone();
        let mut plan = Plan::default();
        s.step(vip_name, desired, &mut plan)?;
        Ok((s, plan))
    }

    fn step(
        &mut self,
        vip_name: &str,
        desired: &[Desired],
        plan: &mut Plan,
    ) -> Result<(), PlanError> {
        let spec = self
            .vips
            .get(vip_name)
            .ok_or_else(|| PlanError::NoVip(vip_name.into()))?
            .spec
            .clone();
        if spec.mode == Mode::Nat {
            let mut gates = self.wanted_gates();
            for d in desired {
                gates.nat_port(nat_reply_port(&d.key, &spec));
            }
            self.set_gates(gates, plan);
        }
        let neighbours = &self.neighbours;
        let Some(vip) = self.vips.get_mut(vip_name).map(Arc::make_mut) else {
            return Err(PlanError::NoVip(vip_name.into()));
        };
        let vip_id = vip.id;
        let needs_mac = spec.mode.needs_mac();
        let mac_for = |d: &Desired| {
            if !needs_mac {
                return d.mac;
            }
            d.mac.or_else(|| neighbours.get(&d.key.address).copied())
        };
        let want: BTreeMap<InstanceKey, &Desired> = desired.iter().map(|d| (d.key, d)).collect();
        let gone: Vec<InstanceKey> = vip
            .backends
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        let member = |b: &BackendState| {
            b.state == BackendMode::Active && b.weight > 0 && (!needs_mac || b.mac.is_some())
        };
        let mut table_changed = gone.iter().any(|k| vip.backends.get(k).is_some_and(member));
        for (key, d) in &want {
            let mac = mac_for(d);
            match vip.backends.get_mut(key) {
                Some(b) => {
                    let next = BackendState {
                        id: b.id,
                        weight: d.weight,
                        state: d.state,
                        mac,
                        slots: b.slots,
                    };
                    let was = member(b);
                    let now = member(&next);
                    if was != now || (now && b.weight != next.weight) {
                        table_changed = true;
                    }
                    if b.state != next.state || b.mac != next.mac {
                        plan.writes.push(Write::Backend {
                            id: b.id,
                            entry: backend_entry(key, vip_id, next.mac, next.state),
                        });
                    }
                    *b = next;
                }
                None => {
                    let id = match self.adoptable.remove(&(vip_id, *key)) {
                        Some(id) => id,
                        None => {
                            let id = self.backend_ids.take().ok_or(PlanError::MaxBackends)?;
                            plan.writes.push(Write::ResetCounters { backend: id });
                            id
                        }
                    };
                    plan.writes.push(Write::Backend {
                        id,
                        entry: backend_entry(key, vip_id, mac, d.state),
                    });
                    let b = BackendState {
                        id,
                        weight: d.weight,
                        state: d.state,
                        mac,
                        slots: 0,
                    };
                    table_changed |= member(&b);
                    vip.backends.insert(*key, b);
                }
            }
        }
        let removed: Vec<BackendState> =
            gone.iter().filter_map(|k| vip.backends.remove(k)).collect();
        if table_changed || !removed.is_empty() {
            self.publish(vip_name, plan)?;
        }
        // Only now that no table points at them: release their flows and ids.
        for b in removed {
            plan.writes.push(Write::Backend {
                id: b.id,
                entry: Backend::default(),
            });
            self.backend_ids.give_back(b.id);
        }
        if spec.mode == Mode::Nat {
            let gates = self.wanted_gates();
            self.set_gates(gates, plan);
        }
        if !gone.is_empty() && !self.neighbours.is_empty() {
            let in_use: BTreeSet<IpAddr> = self
                .vips
                .values()
                .flat_map(|v| v.backends.keys().map(|k| k.address))
                .chain(self.adoptable.keys().map(|(_, k)| k.address))
                .collect();
            Arc::make_mut(&mut self.neighbours).retain(|a, _| in_use.contains(a));
        }
        Ok(())
    }

    /// Builds the VIP's table from its members and publishes it: the spare half, then the flip.
    fn publish(&mut self, name: &str, plan: &mut Plan) -> Result<(), PlanError> {
        let Some(vip) = self.vips.get_mut(name).map(Arc::make_mut) else {
            return Err(PlanError::NoVip(name.into()));
        };
        let needs_mac = vip.spec.mode.needs_mac();
        let mut active: Vec<(String, u32, u32)> = vip
            .backends
            .iter()
            // A backend that needs a MAC and has none cannot be forwarded to: it joins when
            // the neighbour is known.
            .filter(|(_, b)| b.state == BackendMode::Active && b.weight > 0)
            .filter(|(_, b)| !needs_mac || b.mac.is_some())
            .map(|(k, b)| (k.to_string(), b.weight, b.id))
            .collect();
        // The table depends on member order: sort by identity so every node agrees.
        active.sort();
        let mut slots = BTreeMap::new();
        let identities: Vec<&str> = active.iter().map(|(i, _, _)| i.as_str()).collect();
        let digest;
        let ids: Vec<u32> = if active.is_empty() {
            digest = table_digest(&[], (0..self.ring_size).map(|_| None));
            vec![lb_common::BACKEND_NONE; self.ring_size as usize]
        } else {
            let members: Vec<Member<'_>> = active
                .iter()
                .map(|(ident, w, _)| Member {
                    identity: ident,
                    weight: *w,
                })
                .collect();
            let table =
                Table::build(&members, self.ring_size).map_err(|source| PlanError::Table {
                    vip: name.into(),
                    source,
                })?;
            for (i, count) in table.counts().into_iter().enumerate() {
                slots.insert(active[i].2, count);
            }
            digest = table_digest(&identities, table.slots().iter().map(|&m| Some(m)));
            table
                .slots()
                .iter()
                .map(|&m| active[m as usize].2)
                .collect()
        };
        let spare = vip.slot ^ 1;
        plan.writes.push(Write::Ring {
            vip: vip.id,
            half: spare,
            ids,
        });
        plan.writes.push(Write::Vip {
            key: vip_key(&vip.spec),
            meta: VipMeta {
                id: vip.id,
                mode: vip.spec.mode.number(),
                ring_slot: spare,
                _pad: [0; 2],
            },
        });
        vip.slot = spare;
        vip.rebuilds += 1;
        vip.digest = digest;
        for b in vip.backends.values_mut() {
            b.slots = slots.get(&b.id).copied().unwrap_or(0);
        }
        plan.published.push(Published {
            vip: name.into(),
            members: active.len(),
        });
        Ok(())
    }

    /// The gates the VIPs and their backends need, adoptable ones included (a previous agent's
    /// flows to them may still be answered).
    fn wanted_gates(&self) -> Gates {
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

    fn set_gates(&mut self, gates: Gates, plan: &mut Plan) {
        if gates != *self.gates {
            self.gates = Arc::new(gates.clone());
            plan.writes.push(Write::Gates(gates));
        }
    }

    /// A MAC the neighbour task found. The next plan of its VIP puts it in the backend's entry
    /// and the backend in the table. Returns whether it was news.
    pub fn learn_neighbour(&mut self, address: IpAddr, mac: Mac) -> bool {
        if self.neighbours.get(&address) == Some(&mac) {
            return false;
        }
        Arc::make_mut(&mut self.neighbours).insert(address, mac);
        true
    }

    /// Addresses of backends that need a MAC and have none: what the neighbour task resolves.
    pub fn unresolved(&self) -> BTreeSet<IpAddr> {
        self.vips
            .values()
            .filter(|v| v.spec.mode.needs_mac())
            .flat_map(|v| v.backends.iter())
            .filter(|(_, b)| b.mac.is_none())
            .map(|(k, _)| k.address)
            .collect()
    }

    /// After a plan failed part way: the ring flips among the writes that were done, so the
    /// next plan writes into the half that is really spare.
    pub fn note_flips(&mut self, done: &[Write]) {
        for w in done {
            if let Write::Vip { key, meta } = w {
                if let Some(v) = self.vips.values_mut().find(|v| vip_key(&v.spec) == *key) {
                    Arc::make_mut(v).slot = meta.ring_slot & 1;
                }
            }
        }
    }

    pub fn vips(&self) -> impl Iterator<Item = &VipState> {
        self.vips.values().map(|v| &**v)
    }

    pub fn vip_names(&self) -> Vec<String> {
        self.vips.keys().cloned().collect()
    }

    /// Tables published per VIP since this agent started.
    pub fn rebuilds(&self) -> BTreeMap<String, u64> {
        self.vips
            .iter()
            .map(|(n, v)| (n.clone(), v.rebuilds))
            .collect()
    }

    pub fn adoptable(&self) -> usize {
        self.adoptable.len()
    }
}

#[cfg(test)]
mod tests;
