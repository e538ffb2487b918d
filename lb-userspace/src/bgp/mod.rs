//! Announcing the VIPs through bird2. Control says which VIP addresses should be announced
//! (each with a backend taking new flows, on a node whose program is attached and that is not
//! leaving); this task writes bird's include for that set and has bird apply it, then keeps
//! reading bird's sessions for the node's status.
//!
//! bird outlives the agent. Who withdraws what, when:
//! - the agent restarts or is upgraded (SIGTERM, SIGKILL): nothing is withdrawn — the program
//!   keeps forwarding, and bird keeps announcing from the file;
//! - `lb leave`: the agent withdraws, waits until bird exports nothing, drains, exits;
//! - `lb detach` (the program goes): `lb detach` withdraws first, then detaches;
//! - the link is deleted: bird withdraws by itself — the static routes are bound to it;
//! - the program is detached while the agent runs, or the last backend of a VIP goes: the
//!   agent withdraws within a second.

pub mod bird;

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::model::bgp::{Announce, BgpSpec, BgpStatus};

/// bird's sessions are read this often for the status (and a refused or unreachable bird is
/// tried again).
const REFRESH: Duration = Duration::from_secs(2);

/// Runs until `want`'s sender goes away.
pub async fn run(
    spec: BgpSpec,
    node: String,
    mut want: watch::Receiver<Announce>,
    status: watch::Sender<BgpStatus>,
) {
    // What bird has applied, as far as lb knows: none until the first configure succeeds.
    let mut applied: Option<Announce> = None;
    loop {
        let wanted = want.borrow_and_update().clone();
        let (spec2, node2, wanted2, todo) = (
            spec.clone(),
            node.clone(),
            wanted.clone(),
            applied.as_ref() != Some(&wanted),
        );
        let r = tokio::task::spawn_blocking(move || {
            let bird = bird::Bird {
                socket: &spec2.socket,
            };
            let applied = if todo {
                Some(bird::apply(&spec2, &node2, &wanted2))
            } else {
                None
            };
            let sessions = bird.sessions(&spec2);
            let exported: Vec<usize> = match &sessions {
                Ok(list) => list
                    .iter()
                    .map(|s| bird.exported(&s.name).unwrap_or(usize::MAX))
                    .collect(),
                Err(_) => Vec::new(),
            };
            (applied, sessions, exported)
        })
        .await;
        let mut next = BgpStatus::default();
        match r {
            Ok((done, sessions, exported)) => {
                match done {
                    Some(Ok(())) => {
                        info!(announced = ?wanted, "bgp: bird applied the announcements");
                        applied = Some(wanted.clone());
                    }
                    Some(Err(e)) => {
                        warn!("bgp: {e:#}");
                        next.error = Some(format!("{e:#}"));
                    }
                    None => {}
                }
                match sessions {
                    Ok(mut list) => {
                        for (s, n) in list.iter_mut().zip(exported) {
                            s.exported = (n != usize::MAX).then_some(n as u64);
                        }
                        next.sessions = list;
                    }
                    Err(e) => {
                        next.error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            Err(e) => next.error = Some(format!("bgp task: {e}")),
        }
        next.announced = applied.iter().flatten().copied().collect();
        status.send_if_modified(|s| {
            let changed = *s != next;
            *s = next;
            changed
        });
        tokio::select! {
            r = want.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
}

/// Withdraws everything this node announces (`lb detach`, `lb leave`), now, without the
/// agent: the include is rewritten empty and bird applies it.
pub fn withdraw_all(spec: &BgpSpec, node: &str) -> anyhow::Result<()> {
    bird::apply(spec, node, &Announce::new())
}

/// Whether bird exports nothing to any of lb's sessions: the neighbours have been told.
pub fn withdrawn(spec: &BgpSpec) -> anyhow::Result<bool> {
    let bird = bird::Bird {
        socket: &spec.socket,
    };
    for i in 0..spec.neighbors.len() {
        if bird.exported(&bird::session_name(i))? > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}
