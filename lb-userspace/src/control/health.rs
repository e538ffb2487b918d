//! Active health checks (TCP connect, HTTP GET) with rise/fall thresholds and flap damping.
//!
//! The verdict logic ([`Verdict`]) is pure — results and the clock come in as arguments — so it is
//! tested deterministically; the monitor only runs the probes and reports transitions to the
//! control loop, which marks a down backend `Down` in BACKENDS (its flows are re-picked) and
//! rebuilds the Maglev table without it.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

use crate::{
    model::instance::InstanceKey,
    model::{CheckKind, HealthSpec},
    sources::Event,
};

/// Damping window: down-transitions within it make the next recovery slower.
const FLAP_WINDOW: Duration = Duration::from_secs(60);
/// At most this factor on `rise` for a flapping backend.
const MAX_DAMPING: u32 = 8;

/// One backend's health as the thresholds see it. Starts up: a new agent must not black-hole a
/// VIP for `fall × interval` before the first verdicts arrive.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub up: bool,
    ok_streak: u32,
    fail_streak: u32,
    #[serde(skip)]
    downs: VecDeque<Instant>,
}

impl Default for Verdict {
    fn default() -> Self {
        Verdict {
            up: true,
            ok_streak: 0,
            fail_streak: 0,
            downs: VecDeque::new(),
        }
    }
}

impl Verdict {
    /// Successes needed to come back: `rise`, doubled for every further down-transition within
    /// the flap window (up to ×8), so a flapping backend stays out longer each time.
    pub fn required_rise(&self, rise: u32, now: Instant) -> u32 {
        let recent = self
            .downs
            .iter()
            .filter(|t| now.duration_since(**t) < FLAP_WINDOW)
            .count() as u32;
        let factor = 1u32 << recent.saturating_sub(1).min(3);
        rise * factor.min(MAX_DAMPING)
    }

    /// Feeds one probe result; returns the new state when it changes.
    pub fn observe(&mut self, ok: bool, spec: &HealthSpec, now: Instant) -> Option<bool> {
        while self
            .downs
            .front()
            .is_some_and(|t| now.duration_since(*t) >= FLAP_WINDOW)
        {
            self.downs.pop_front();
        }
        if ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
            if !self.up && self.ok_streak >= self.required_rise(spec.rise, now) {
                self.up = true;
                return Some(true);
            }
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
            if self.up && self.fail_streak >= spec.fall {
                self.up = false;
                self.downs.push_back(now);
                return Some(false);
            }
        }
        None
    }
}

/// Probes `addr` once within the spec's timeout.
pub async fn probe(spec: &HealthSpec, addr: SocketAddr) -> bool {
    tokio::time::timeout(spec.timeout, async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        if spec.check == CheckKind::Tcp {
            return Some(true);
        }
        let req = format!(
            "GET {} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: lb-health\r\n\r\n",
            spec.path
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 16];
        let mut n = 0;
        while n < 12 {
            let r = s.read(&mut buf[n..]).await.ok()?;
            if r == 0 {
                break;
            }
            n += r;
        }
        // "HTTP/1.x 2xx" or 3xx.
        let status = std::str::from_utf8(&buf[..n])
            .ok()?
            .split_whitespace()
            .nth(1)?
            .to_string();
        Some(status.starts_with('2') || status.starts_with('3'))
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Health state by VIP and backend, shared with the API.
pub type Table = Arc<Mutex<BTreeMap<(String, InstanceKey), Verdict>>>;

/// Checks one VIP's backends every interval, forever. `targets` says what to probe now (the
/// control loop's current backends of the VIP and the port to probe).
pub async fn monitor(
    vip: String,
    spec: HealthSpec,
    targets: impl Fn() -> Vec<(InstanceKey, SocketAddr)> + Send + 'static,
    table: Table,
    events: mpsc::Sender<Event>,
) {
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let list = targets();
        let mut probes = tokio::task::JoinSet::new();
        for (k, addr) in list.iter().copied() {
            let spec = spec.clone();
            probes.spawn(async move { (k, probe(&spec, addr).await) });
        }
        let results = probes.join_all().await;
        let now = crate::clock::now();
        let mut changes = Vec::new();
        {
            let mut t = table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            t.retain(|(v, k), _| v != &vip || list.iter().any(|(x, _)| x == k));
            for (k, ok) in results {
                let verdict = t.entry((vip.clone(), k)).or_default();
                if let Some(up) = verdict.observe(ok, &spec, now) {
                    changes.push((k, up));
                }
            }
        }
        for (key, up) in changes {
            tracing::info!(vip, backend = %key, up, "health changed");
            if events
                .send(Event::Health {
                    vip: vip.clone(),
                    key,
                    up,
                    at: now,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HealthSpec {
        HealthSpec {
            check: CheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            path: "/".into(),
            port: 0,
        }
    }

    #[test]
    fn fall_then_rise() {
        let (s, t) = (spec(), crate::clock::now());
        let mut v = Verdict::default();
        assert_eq!(v.observe(false, &s, t), None);
        assert_eq!(v.observe(false, &s, t), None);
        assert_eq!(
            v.observe(false, &s, t),
            Some(false),
            "down after `fall` failures"
        );
        assert_eq!(v.observe(true, &s, t), None);
        assert_eq!(
            v.observe(true, &s, t),
            Some(true),
            "up after `rise` successes"
        );
        // One failure among successes does not take it down.
        assert_eq!(v.observe(false, &s, t), None);
        assert_eq!(v.observe(true, &s, t), None);
        assert!(v.up);
    }

    #[test]
    fn flapping_is_damped_and_damping_decays() {
        let (s, t0) = (spec(), crate::clock::now());
        let mut v = Verdict::default();
        let mut t = t0;
        let mut successes_needed = Vec::new();
        for _ in 0..4 {
            for _ in 0..3 {
                v.observe(false, &s, t);
            }
            assert!(!v.up);
            let mut n = 0;
            while !v.up {
                v.observe(true, &s, t);
                n += 1;
            }
            successes_needed.push(n);
            t += Duration::from_secs(1);
        }
        assert_eq!(successes_needed, vec![2, 4, 8, 16]);
        // A minute later the history has aged out: back to `rise`.
        t += FLAP_WINDOW;
        for _ in 0..3 {
            v.observe(false, &s, t);
        }
        assert_eq!(v.required_rise(s.rise, t), 2);
    }
}
