//! L4: VIPs and their backends, from the desired state to the BPF maps.
//!
//! [`plan`] decides — ids, adoption, ring halves, the order of writes — as a pure function of
//! what the maps hold and what is wanted. [`Balancer`] only carries a plan out through the
//! [`dataplane`] (the one module touching maps and attachments) and keeps the new state once every
//! write succeeded. [`neighbor`] is the task that finds MACs for the modes that rewrite them; what
//! it finds comes back as an event, so no lock is held while it runs `ip`.

use std::{collections::BTreeSet, net::IpAddr, time::Instant};

use anyhow::Result;
use lb_common::Counters;
use serde::Serialize;
use tracing::{info, warn};

use crate::model::{BackendMode, Mac, Mode, Protocol, VipSpec};

pub mod dataplane;
pub mod maglev;
pub mod neighbor;
pub mod plan;

use dataplane::Dataplane;
pub use plan::{Desired, Gates};
use plan::{Existing, L4State, Plan, Write};

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
    /// The live Maglev table as slot → backend `address:port`, hashed (16 hex digits): the
    /// same on every node that sees the same backends, whatever ids each gave them. `None`
    /// until this agent published a table of its own.
    pub table_digest: Option<String>,
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
    state: L4State,
    /// What the neighbour task should resolve, updated after every plan carried out.
    wanted_neighbours: Option<tokio::sync::watch::Sender<BTreeSet<IpAddr>>>,
}

impl Balancer {
    /// Takes over the dataplane: adopts the VIP and backend ids a previous agent left in the
    /// pinned maps (so its tracked flows stay valid), removes VIPs this config no longer has, and
    /// creates the rest with no backends; [`Balancer::apply`] fills them.
    pub fn new(dp: Dataplane, vips: &[VipSpec]) -> Result<Self> {
        let existing = Existing {
            vips: dp.vip_entries()?,
            backends: dp.backend_entries()?,
        };
        let (state, plan) = L4State::adopt(dp.limits(), &existing, vips)?;
        // Nothing is written yet, so a failed write leaves no state to keep: the balancer goes.
        let mut bal = Balancer {
            dp,
            state,
            wanted_neighbours: None,
        };
        bal.write(&plan, crate::clock::now())?;
        if bal.state.adoptable() > 0 {
            info!(
                backends = bal.state.adoptable(),
                "found backends of a previous agent in the pinned maps"
            );
        }
        Ok(bal)
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// See [`Dataplane::serving`].
    pub fn serving(&self, ifaces: &[String]) -> bool {
        self.dp.serving(ifaces)
    }

    /// Where the addresses still needing a MAC are published for the neighbour task.
    pub fn want_neighbours(&mut self, tx: tokio::sync::watch::Sender<BTreeSet<IpAddr>>) {
        self.wanted_neighbours = Some(tx);
        self.publish_unresolved();
    }

    /// A MAC the neighbour task found; the VIP's next [`Balancer::apply`] uses it.
    pub fn learn_neighbour(&mut self, address: IpAddr, mac: Mac) -> bool {
        self.state.learn_neighbour(address, mac)
    }

    /// Addresses of backends still waiting for their MAC.
    pub fn unresolved(&self) -> BTreeSet<IpAddr> {
        self.state.unresolved()
    }

    /// The addresses still waiting, as the neighbour task sees them: shrinks as MACs are applied.
    pub fn neighbour_watch(&self) -> Option<tokio::sync::watch::Receiver<BTreeSet<IpAddr>>> {
        self.wanted_neighbours.as_ref().map(|tx| tx.subscribe())
    }

    /// Releases adoptable ids no apply claimed: those backends are gone from every source.
    pub fn finish_adoption(&mut self) -> Result<()> {
        let (next, plan) = self.state.finish_adoption();
        self.carry_out(next, plan, crate::clock::now())?;
        Ok(())
    }

    /// Brings a VIP's backends to `desired` ([`L4State::plan`]). Returns the number of map
    /// writes.
    pub fn apply(&mut self, vip_name: &str, desired: &[Desired]) -> Result<usize> {
        let started = crate::clock::now();
        let (next, plan) = self.state.plan(vip_name, desired)?;
        self.carry_out(next, plan, started)
    }

    /// Does a plan's writes in order; keeps `next` only if all of them succeeded.
    fn carry_out(&mut self, next: L4State, plan: Plan, started: Instant) -> Result<usize> {
        let writes = self.write(&plan, started)?;
        self.state = next;
        if !plan.writes.is_empty() {
            self.publish_unresolved();
        }
        Ok(writes)
    }

    /// The writes themselves, in order. On a failure the ring flips that did land are noted in
    /// the current state, so the next table goes into the half that is really spare.
    fn write(&mut self, plan: &Plan, started: Instant) -> Result<usize> {
        let mut writes = 0;
        let mut slot_writes = Vec::new();
        for (i, w) in plan.writes.iter().enumerate() {
            let r = match w {
                Write::Gates(g) => self.dp.set_gates(g),
                Write::ResetCounters { backend } => {
                    self.dp.reset_backend_counters(*backend).map(|()| 0)
                }
                Write::Backend { id, entry } => self.dp.set_backend(*id, entry).map(|()| 1),
                Write::Ring { vip, half, ids } => {
                    let r = self.dp.write_ring(*vip, *half, ids);
                    if let Ok(n) = r {
                        slot_writes.push(n);
                    }
                    r
                }
                Write::Vip { key, meta } => self.dp.set_vip(key, meta).map(|()| 1),
                Write::RemoveVip { key } => self.dp.remove_vip(key).map(|()| 0),
            };
            match r {
                Ok(n) => writes += n,
                Err(e) => {
                    self.state.note_flips(&plan.writes[..i]);
                    return Err(e);
                }
            }
        }
        let elapsed_us = started.elapsed().as_micros() as u64;
        for (p, n) in plan.published.iter().zip(slot_writes) {
            info!(
                vip = p.vip,
                backends = p.members,
                slot_writes = n,
                elapsed_us,
                "published Maglev table"
            );
        }
        Ok(writes)
    }

    fn publish_unresolved(&self) {
        let Some(tx) = &self.wanted_neighbours else {
            return;
        };
        let now = self.state.unresolved();
        for addr in &now {
            if !tx.borrow().contains(addr) {
                warn!(backend = %addr, "MAC not resolved yet; will retry");
            }
        }
        tx.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
    }

    /// Maglev tables published per VIP since this agent started.
    pub fn rebuilds(&self) -> std::collections::BTreeMap<String, u64> {
        self.state.rebuilds()
    }

    pub fn vip_names(&self) -> Vec<String> {
        self.state.vip_names()
    }

    pub fn clear_flows(&mut self) -> Result<usize> {
        self.dp.clear_flows()
    }

    pub fn list(&self) -> Result<Vec<VipView>> {
        self.state
            .vips()
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
                            slots: b.slots,
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
                    table_digest: (v.rebuilds > 0).then(|| format!("{:016x}", v.digest)),
                    counters: self.dp.vip_counters(v.id)?.into(),
                    backends,
                })
            })
            .collect()
    }
}
