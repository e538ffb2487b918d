//! The ordering rules of a plan, without BPF: each test reads the writes a plan emits as short
//! words (`gates+8080`, `backend 1 usable`, `ring 0.1`, `flip 0→1`, `clear 1`) and checks their
//! order.

use std::net::IpAddr;

use lb_common::{backend_flags, Backend, VipMeta};

use super::*;
use crate::model::{Limits, Protocol};

const RING: u32 = 13;

fn limits(max_backends: u32) -> Limits {
    Limits {
        max_vips: 4,
        max_backends,
        ring_size: RING,
        max_flows: 1024,
        udp_timeout_secs: 30,
        ipip_source_v4: "10.255.0.0".parse().expect("static"),
        ipip_source_v6: "fd00:ffff::".parse().expect("static"),
    }
}

fn vip(name: &str, addr: &str, port: u16, mode: Mode) -> VipSpec {
    VipSpec {
        name: name.into(),
        address: addr.parse().expect("static"),
        port,
        protocol: Protocol::Tcp,
        mode,
        service: name.into(),
        backends: Vec::new(),
        health: None,
    }
}

fn key(addr: &str, port: u16) -> InstanceKey {
    InstanceKey {
        address: addr.parse().expect("static"),
        port,
    }
}

fn active(addr: &str, port: u16) -> Desired {
    Desired {
        key: key(addr, port),
        weight: 1,
        mac: None,
        state: BackendMode::Active,
    }
}

fn with(d: Desired, f: impl FnOnce(&mut Desired)) -> Desired {
    let mut d = d;
    f(&mut d);
    d
}

/// The NAT reply ports a gate write opens, for reading plans.
fn ports(g: &Gates) -> Vec<u16> {
    [80u16, 8080, 8081, 8082]
        .into_iter()
        .filter(|p| g.has_nat_port(*p))
        .collect()
}

fn words(plan: &Plan) -> Vec<String> {
    plan.writes
        .iter()
        .map(|w| match w {
            Write::Gates(g) if *g == Gates::open() => "gates open".to_string(),
            Write::Gates(g) => format!(
                "gates{}",
                ports(g).iter().map(|p| format!("+{p}")).collect::<String>()
            ),
            Write::ResetCounters { backend } => format!("reset {backend}"),
            Write::Backend { id, entry } if *entry == Backend::default() => format!("clear {id}"),
            Write::Backend { id, entry } => {
                let state = match entry.flags {
                    f if f == backend_flags::USABLE => "usable",
                    f if f == backend_flags::USABLE | backend_flags::DRAINING => "draining",
                    _ => "down",
                };
                let mac = if entry.mac == [0; 6] { "" } else { " mac" };
                format!("backend {id} {state}{mac}")
            }
            Write::Ring { vip, half, .. } => format!("ring {vip}.{half}"),
            Write::Vip { meta, .. } => format!("flip {}→{}", meta.id, meta.ring_slot),
            Write::RemoveVip { .. } => "remove vip".to_string(),
        })
        .collect()
}

fn ring(plan: &Plan) -> Vec<u32> {
    plan.writes
        .iter()
        .rev()
        .find_map(|w| match w {
            Write::Ring { ids, .. } => Some(ids.clone()),
            _ => None,
        })
        .expect("a ring write")
}

fn fresh(vips: &[VipSpec], max_backends: u32) -> L4State {
    L4State::adopt(&limits(max_backends), &Existing::default(), vips)
        .expect("adopt")
        .0
}

#[test]
fn a_new_vip_starts_with_an_empty_table_behind_open_gates() {
    let (s, plan) = L4State::adopt(
        &limits(8),
        &Existing::default(),
        &[vip("web", "10.9.0.1", 80, Mode::Dsr)],
    )
    .expect("adopt");
    assert_eq!(
        words(&plan),
        ["gates open", "ring 0.0", "flip 0→0", "gates"],
        "a new VIP's table is empty, written before its entry; the gates close last"
    );
    assert!(ring(&plan).iter().all(|&id| id == lb_common::BACKEND_NONE));
    let Some(Write::Gates(g)) = plan.writes.last() else {
        panic!("gates last");
    };
    let mut want = Gates::default();
    want.vip_addr(&addr_words("10.9.0.1".parse().expect("static")));
    assert_eq!(*g, want, "only the VIP's address bit is set");
    assert_eq!(s.rebuilds()["web"], 1);
}

#[test]
fn a_nat_reply_gate_opens_before_its_backend_and_closes_after_it_is_gone() {
    let s = fresh(&[vip("web", "10.9.0.1", 80, Mode::Nat)], 8);
    let (s, plan) = s.plan("web", &[active("10.1.0.11", 8080)]).expect("plan");
    assert_eq!(
        words(&plan),
        [
            "gates+8080",
            "reset 1",
            "backend 1 usable",
            "ring 0.1",
            "flip 0→1"
        ],
        "the reply gate is open before the backend can get a flow"
    );
    let (s, plan) = s.plan("web", &[active("10.1.0.12", 8081)]).expect("plan");
    assert_eq!(
        words(&plan),
        [
            "gates+8080+8081",
            "reset 2",
            "backend 2 usable",
            "ring 0.0",
            "flip 0→0",
            "clear 1",
            "gates+8081"
        ],
        "the new port opens first; the old one closes only after its backend is cleared"
    );
    let (_, plan) = s.plan("web", &[]).expect("plan");
    assert_eq!(words(&plan), ["ring 0.1", "flip 0→1", "clear 2", "gates"]);
    assert!(ring(&plan).iter().all(|&id| id == lb_common::BACKEND_NONE));
}

#[test]
fn a_table_goes_into_the_spare_half_and_then_one_write_flips_to_it() {
    let s = fresh(&[vip("web", "10.9.0.1", 80, Mode::Local)], 8);
    let mut s = s;
    let mut halves = Vec::new();
    for n in 1..=4 {
        let want: Vec<Desired> = (0..n)
            .map(|i| active(&format!("10.0.0.{}", 11 + i), 80))
            .collect();
        let (next, plan) = s.plan("web", &want).expect("plan");
        let w = words(&plan);
        let ring_at = w.iter().position(|x| x.starts_with("ring")).expect("ring");
        let flip_at = w.iter().position(|x| x.starts_with("flip")).expect("flip");
        assert_eq!(flip_at, ring_at + 1, "the flip follows its ring: {w:?}");
        assert!(
            w[..ring_at]
                .iter()
                .filter(|x| x.starts_with("backend"))
                .count()
                == 1,
            "the new backend's entry exists before a table names it: {w:?}"
        );
        halves.push(w[ring_at].clone());
        let live = match plan.writes[flip_at] {
            Write::Vip { meta, .. } => meta.ring_slot,
            _ => unreachable!("checked above"),
        };
        assert_eq!(
            format!("ring 0.{live}"),
            w[ring_at],
            "the flip names the half just written"
        );
        s = next;
    }
    assert_eq!(halves, ["ring 0.1", "ring 0.0", "ring 0.1", "ring 0.0"]);
}

#[test]
fn an_unchanged_state_plans_no_write() {
    let s = fresh(&[vip("web", "10.9.0.1", 80, Mode::Nat)], 8);
    let want = [active("10.1.0.11", 8080), active("10.1.0.12", 8080)];
    let (s, plan) = s.plan("web", &want).expect("plan");
    assert!(!plan.writes.is_empty());
    let (_, again) = s.plan("web", &want).expect("plan");
    assert_eq!(again, Plan::default());
}

#[test]
fn freed_ids_are_reused_last() {
    let s = fresh(&[vip("web", "10.9.0.1", 80, Mode::Local)], 5);
    let a = active("10.0.0.11", 80);
    let b = active("10.0.0.12", 80);
    let c = active("10.0.0.13", 80);
    let d = active("10.0.0.14", 80);
    let e = active("10.0.0.15", 80);
    let (s, _) = s.plan("web", &[a.clone(), b.clone()]).expect("plan");
    let (s, plan) = s.plan("web", std::slice::from_ref(&b)).expect("plan");
    assert!(words(&plan).contains(&"clear 1".to_string()));
    let (s, plan) = s.plan("web", &[b.clone(), c.clone()]).expect("plan");
    assert!(
        words(&plan).contains(&"backend 3 usable".to_string()),
        "a never-used id comes before a freed one: {:?}",
        words(&plan)
    );
    let (s, _) = s
        .plan("web", &[b.clone(), c.clone(), d.clone()])
        .expect("plan");
    let (_, plan) = s.plan("web", &[b, c, d, e]).expect("plan");
    assert!(
        words(&plan).contains(&"backend 1 usable".to_string()),
        "only then the freed one: {:?}",
        words(&plan)
    );
}

#[test]
fn running_out_of_ids_fails_and_changes_nothing() {
    let s = fresh(&[vip("web", "10.9.0.1", 80, Mode::Local)], 3);
    let three = [
        active("10.0.0.11", 80),
        active("10.0.0.12", 80),
        active("10.0.0.13", 80),
    ];
    assert_eq!(s.plan("web", &three).err(), Some(PlanError::MaxBackends));
    let (_, plan) = s.plan("web", &three[1..]).expect("plan");
    assert_eq!(
        words(&plan)[..3],
        ["reset 1", "backend 1 usable", "reset 2"],
        "the failed plan took no id"
    );
    assert_eq!(
        s.plan("nope", &[]).err(),
        Some(PlanError::NoVip("nope".into()))
    );
}

#[test]
fn a_drain_keeps_the_entry_and_leaves_the_table() {
    let s = fresh(&[vip("web", "10.9.0.1", 80, Mode::Local)], 8);
    let a = active("10.0.0.11", 80);
    let b = active("10.0.0.12", 80);
    let (s, _) = s.plan("web", &[a.clone(), b.clone()]).expect("plan");
    let drained = with(b.clone(), |d| d.state = BackendMode::Draining);
    let (s, plan) = s.plan("web", &[a.clone(), drained.clone()]).expect("plan");
    assert_eq!(
        words(&plan),
        ["backend 2 draining", "ring 0.0", "flip 0→0"],
        "its tracked flows stay (USABLE|DRAINING); new ones go elsewhere"
    );
    assert!(ring(&plan).iter().all(|&id| id == 1));
    let heavier = with(drained, |d| d.weight = 9);
    let (s, plan) = s.plan("web", &[a.clone(), heavier]).expect("plan");
    assert_eq!(
        plan,
        Plan::default(),
        "a drained backend's weight changes no table"
    );
    let (_, plan) = s
        .plan("web", &[with(a, |d| d.weight = 0), b])
        .expect("plan");
    assert_eq!(
        words(&plan),
        ["backend 2 usable", "ring 0.1", "flip 0→1"],
        "weight 0 leaves the table but keeps the entry"
    );
    assert!(ring(&plan).iter().all(|&id| id == 2));
}

#[test]
fn a_previous_agents_ids_are_adopted_and_the_unclaimed_released() {
    let web = vip("web", "10.9.0.1", 80, Mode::Nat);
    let old = vip("old", "10.9.0.2", 80, Mode::Nat);
    let entry = |k: &InstanceKey, vip_id| backend_entry(k, vip_id, None, BackendMode::Active);
    let (a, b) = (key("10.1.0.11", 8080), key("10.1.0.12", 8082));
    let existing = Existing {
        vips: vec![
            (
                vip_key(&web),
                VipMeta {
                    id: 2,
                    mode: Mode::Nat.number(),
                    ring_slot: 1,
                    _pad: [0; 2],
                },
            ),
            (
                vip_key(&old),
                VipMeta {
                    id: 3,
                    mode: Mode::Nat.number(),
                    ring_slot: 0,
                    _pad: [0; 2],
                },
            ),
        ],
        backends: vec![(5, entry(&a, 2)), (6, entry(&b, 2)), (7, entry(&a, 3))],
    };
    let (s, plan) = L4State::adopt(&limits(8), &existing, &[web]).expect("adopt");
    assert_eq!(
        words(&plan),
        ["gates open", "remove vip", "gates+8080+8082"],
        "the kept VIP's table stays live; the adopted backends' reply ports stay open"
    );
    assert_eq!(s.adoptable(), 2);
    let (s, plan) = s
        .plan(
            "web",
            &[active("10.1.0.11", 8080), active("10.1.0.13", 8081)],
        )
        .expect("plan");
    assert_eq!(
        words(&plan),
        [
            "gates+8080+8081+8082",
            "backend 5 usable",
            "reset 1",
            "backend 1 usable",
            "ring 2.0",
            "flip 2→0"
        ],
        "the same instance keeps its id (its flows stay); a new one skips the adopted ids"
    );
    let (s, plan) = s.finish_adoption();
    assert_eq!(words(&plan), ["clear 6", "gates+8080+8081"]);
    assert_eq!(s.adoptable(), 0);
}

#[test]
fn a_backend_without_its_mac_joins_the_table_once_the_neighbour_is_known() {
    let s = fresh(&[vip("web", "10.9.0.1", 80, Mode::Dsr)], 8);
    let given = with(active("10.0.0.11", 0), |d| {
        d.mac = Some(Mac([2, 0, 0, 0, 0, 11]))
    });
    let unknown = active("10.0.0.12", 0);
    let want = [given, unknown];
    let (mut s, plan) = s.plan("web", &want).expect("plan");
    assert_eq!(
        words(&plan),
        [
            "reset 1",
            "backend 1 usable mac",
            "reset 2",
            "backend 2 usable",
            "ring 0.1",
            "flip 0→1"
        ]
    );
    assert!(
        ring(&plan).iter().all(|&id| id == 1),
        "no frame goes to a zero MAC"
    );
    let unresolved: Vec<IpAddr> = s.unresolved().into_iter().collect();
    assert_eq!(unresolved, ["10.0.0.12".parse::<IpAddr>().expect("static")]);
    assert!(s.learn_neighbour(
        "10.0.0.12".parse().expect("static"),
        Mac([2, 0, 0, 0, 0, 12])
    ));
    let (s, plan) = s.plan("web", &want).expect("plan");
    assert_eq!(
        words(&plan),
        ["backend 2 usable mac", "ring 0.0", "flip 0→0"]
    );
    assert!(ring(&plan).contains(&2) && ring(&plan).contains(&1));
    assert!(s.unresolved().is_empty());
    let (s, _) = s.plan("web", &want[..1]).expect("plan");
    let (_, plan) = s.plan("web", &want).expect("plan");
    assert!(
        words(&plan).contains(&"backend 3 usable".to_string()),
        "a MAC is forgotten with the last backend at its address (and the id is a new one): {:?}",
        words(&plan)
    );
}

#[test]
fn after_a_failed_write_the_next_table_goes_into_the_half_that_is_really_spare() {
    let s = fresh(&[vip("web", "10.9.0.1", 80, Mode::Local)], 8);
    let (next, plan) = s.plan("web", &[active("10.0.0.11", 80)]).expect("plan");
    assert_eq!(
        words(&next.plan("web", &[]).expect("plan").1)[0],
        "ring 0.0"
    );
    // The flip landed, the write after it did not: the state kept is `s`, with the flip noted.
    let mut kept = s.clone();
    let flip = plan
        .writes
        .iter()
        .position(|w| matches!(w, Write::Vip { .. }))
        .expect("flip");
    kept.note_flips(&plan.writes[..=flip]);
    let (_, again) = kept.plan("web", &[active("10.0.0.11", 80)]).expect("plan");
    assert!(
        words(&again).contains(&"ring 0.0".to_string()),
        "half 1 is live now: {:?}",
        words(&again)
    );
}

#[test]
fn a_wildcard_vip_opens_its_protocol_and_any_nat_reply_port() {
    let (_, plan) = L4State::adopt(
        &limits(8),
        &Existing::default(),
        &[vip("all", "10.9.0.3", 0, Mode::Nat)],
    )
    .expect("adopt");
    let Some(Write::Gates(g)) = plan.writes.last() else {
        panic!("gates last");
    };
    assert_eq!(g.wildcard[Protocol::Tcp.number() as usize], 1);
    let s = fresh(&[vip("all", "10.9.0.3", 0, Mode::Nat)], 8);
    let (_, plan) = s.plan("all", &[active("10.1.0.11", 0)]).expect("plan");
    let Some(Write::Gates(g)) = plan.writes.first() else {
        panic!("gates first");
    };
    assert!(
        g.nat_ports.iter().all(|w| *w == u64::MAX),
        "replies come from any port"
    );
}

#[test]
fn a_restarted_agent_keeps_the_macs_its_predecessor_resolved() {
    let web = vip("web", "10.9.0.1", 80, Mode::Dsr);
    let mac = Mac([2, 0, 0, 0, 0, 11]);
    let a = key("10.0.0.11", 0);
    let existing = Existing {
        vips: vec![(
            vip_key(&web),
            VipMeta {
                id: 0,
                mode: Mode::Dsr.number(),
                ring_slot: 0,
                _pad: [0; 2],
            },
        )],
        backends: vec![(1, backend_entry(&a, 0, Some(mac), BackendMode::Active))],
    };
    let (s, _) = L4State::adopt(&limits(8), &existing, &[web]).expect("adopt");
    let (s, plan) = s.plan("web", &[active("10.0.0.11", 0)]).expect("plan");
    assert_eq!(
        words(&plan),
        ["backend 1 usable mac", "ring 0.1", "flip 0→1"],
        "the first table after a restart has the backend: no packet meets an empty table"
    );
    assert!(ring(&plan).iter().all(|&id| id == 1));
    assert!(s.unresolved().is_empty());
}

/// Every slot → backend `address:port`, read from a plan's last ring and the state's ids.
fn owners(s: &L4State, plan: &Plan) -> Vec<String> {
    let v = s.vips().next().expect("one VIP");
    let by_id: BTreeMap<u32, String> = v
        .backends
        .iter()
        .map(|(k, b)| (b.id, k.to_string()))
        .collect();
    ring(plan)
        .iter()
        .map(|id| by_id.get(id).cloned().unwrap_or_else(|| "none".into()))
        .collect()
}

/// Scale-out's promise: nodes that learn the same backends in different orders — one in a
/// single change, one a backend at a time in another order, one restarted on what a previous
/// agent left with other ids — give each its own ids, yet build the same table slot for slot,
/// and their digests say so; a different backend set gives another digest.
#[test]
fn nodes_that_learn_backends_in_any_order_build_the_same_table() {
    let web = vip("web", "10.9.0.1", 80, Mode::Nat);
    let all = [
        active("10.1.0.11", 8080),
        active("10.1.0.12", 8080),
        with(active("10.1.0.13", 8080), |d| d.weight = 2),
    ];
    let a = fresh(std::slice::from_ref(&web), 16);
    let (a, plan_a) = a.plan("web", &all).expect("plan");
    // One at a time, last first; and a backend that came and went on the way.
    let mut b = fresh(std::slice::from_ref(&web), 16);
    let mut plan_b = None;
    for n in [
        vec![all[2].clone()],
        vec![all[2].clone(), active("10.1.0.99", 8080)],
        vec![all[2].clone(), all[0].clone()],
        vec![all[2].clone(), all[0].clone(), all[1].clone()],
    ] {
        let (next, p) = b.plan("web", &n).expect("plan");
        b = next;
        plan_b = Some(p);
    }
    let plan_b = plan_b.expect("planned");
    // Restarted onto a previous agent's maps, whose ids were others.
    let entry = |k: &InstanceKey| backend_entry(k, 3, None, BackendMode::Active);
    let existing = Existing {
        vips: vec![(
            vip_key(&web),
            VipMeta {
                id: 3,
                mode: Mode::Nat.number(),
                ring_slot: 0,
                _pad: [0; 2],
            },
        )],
        backends: vec![(9, entry(&all[1].key)), (4, entry(&all[2].key))],
    };
    let (c, _) = L4State::adopt(&limits(16), &existing, &[web]).expect("adopt");
    let (c, plan_c) = c.plan("web", &all).expect("plan");

    let ids = |s: &L4State| -> Vec<u32> {
        let v = s.vips().next().expect("one VIP");
        all.iter().map(|d| v.backends[&d.key].id).collect()
    };
    assert_ne!(ids(&a), ids(&b), "the nodes' own ids differ");
    assert_ne!(ids(&a), ids(&c));
    let (ta, tb, tc) = (
        owners(&a, &plan_a),
        owners(&b, &plan_b),
        owners(&c, &plan_c),
    );
    assert_eq!(ta, tb, "slot for slot");
    assert_eq!(ta, tc, "slot for slot after a restart");
    assert!(ta.iter().all(|o| o != "none"));
    let digest = |s: &L4State| s.vips().next().expect("one VIP").digest;
    assert_eq!(digest(&a), digest(&b));
    assert_eq!(digest(&a), digest(&c));
    let (d, _) = a.plan("web", &all[..2]).expect("plan");
    assert_ne!(
        digest(&d),
        digest(&a),
        "another backend set, another digest"
    );
}
