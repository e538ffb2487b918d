//! Upstream pools: which instance of a service gets a request, and passive health.
//!
//! Per-upstream state ([`Upstream`]: requests in flight, latency EWMA, consecutive failures,
//! ejection) outlives routing-table swaps — it is keyed by address in the proxy — so a registry
//! change neither forgets an ejection nor resets least-requests accounting. Time and randomness
//! come in as arguments where a decision depends on them, so the logic is tested exactly.

use crate::model::l7::{Algorithm, Passive};
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// One upstream's live state.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, parsed once: every request's upstream URI is built from it.
    pub authority: Option<hyper::http::uri::Authority>,
    pub in_flight: AtomicU64,
    /// Latency EWMA in microseconds (0: no sample yet).
    ewma_us: AtomicU64,
    failures: AtomicU32,
    ejection: Mutex<Ejection>,
    /// Whether `ejection.until` is set (written under the lock): every request asks, and a
    /// healthy upstream answers without taking the lock.
    ejecting: AtomicBool,
    /// Requests holding a connection to it (from the send to the answer's end): each is one
    /// connection, and the service's cap bounds them ([`Upstream::slot`]).
    busy: AtomicUsize,
    freed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Ejection {
    until: Option<Instant>,
    /// Ejections in a row (reset by a success after coming back).
    streak: u32,
}

/// One connection's worth of an upstream, held from a request's send to its answer's end.
pub struct Slot(Arc<Upstream>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// One request or connection on an upstream, counted while it lasts — however it ends (an
/// answer, an error, the client going away).
pub struct InFlight(Arc<Upstream>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstream {
    /// Counts one more in flight until the guard is dropped.
    pub fn start(this: &Arc<Upstream>) -> InFlight {
        this.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(this.clone())
    }

    pub fn new(addr: SocketAddr) -> Upstream {
        Upstream {
            addr,
            authority: hyper::http::uri::Authority::from_maybe_shared(bytes::Bytes::from(
                addr.to_string(),
            ))
            .ok(),
            in_flight: AtomicU64::new(0),
            ewma_us: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejection: Mutex::new(Ejection::default()),
            ejecting: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// A connection's worth of this upstream, if fewer than `cap` are taken.
    pub fn try_slot(this: &Arc<Upstream>, cap: usize) -> Option<Slot> {
        this.busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(this.clone()))
    }

    /// A connection's worth of this upstream: waits (in line with the others waiting) until
    /// one of the `cap` is free, or `until`.
    pub async fn slot(
        this: &Arc<Upstream>,
        cap: usize,
        until: tokio::time::Instant,
    ) -> Option<Slot> {
        loop {
            let freed = this.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before looking: a slot freed in between still wakes this waiter.
            freed.as_mut().enable();
            if let Some(s) = Upstream::try_slot(this, cap) {
                return Some(s);
            }
            tokio::time::timeout_at(until, freed).await.ok()?;
        }
    }

    /// Connections' worth taken now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    pub fn ejected(&self, now: Instant) -> bool {
        if !self.ejecting.load(Ordering::Acquire) {
            return false;
        }
        self.ejection
            .lock()
            .map(|e| e.until.is_some_and(|u| now < u))
            .unwrap_or(false)
    }

    /// Records a request's outcome (`ok`: answered below 500) and its latency.
    pub fn record(&self, ok: bool, latency: Duration, passive: &Passive, now: Instant) {
        let sample = latency.as_micros().min(u64::MAX as u128) as u64;
        let old = self.ewma_us.load(Ordering::Relaxed);
        // α = 1/8, as in TCP's SRTT: recent enough, not jumpy.
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.ewma_us.store(new.max(1), Ordering::Relaxed);
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            // Not ejecting: `until` is unset and the streak is 0 already (they change together).
            if !self.ejecting.load(Ordering::Acquire) {
                return;
            }
            if let Ok(mut e) = self.ejection.lock() {
                if e.until.is_none_or(|u| now >= u) {
                    e.until = None;
                    e.streak = 0;
                    self.ejecting.store(false, Ordering::Release);
                }
            }
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= passive.failures {
            self.failures.store(0, Ordering::Relaxed);
            if let Ok(mut e) = self.ejection.lock() {
                let factor = 1u32 << e.streak.min(4);
                e.until = Some(now + passive.backoff * factor);
                e.streak += 1;
                self.ejecting.store(true, Ordering::Release);
                tracing::warn!(upstream = %self.addr, seconds = (passive.backoff * factor).as_secs(), "ejected after consecutive failures");
            }
        }
    }

    fn score(&self) -> u64 {
        let ewma = self.ewma_us.load(Ordering::Relaxed).max(1);
        ewma.saturating_mul(self.in_flight.load(Ordering::Relaxed) + 1)
    }
}

/// Retries may add at most ~20% to a service's load (plus a small reserve): every request deposits
/// 0.2, every retry withdraws 1. Under an outage this stops retries from multiplying traffic.
#[derive(Debug)]
pub struct RetryBudget {
    tokens: Mutex<f64>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            tokens: Mutex::new(10.0),
        }
    }
}

impl RetryBudget {
    pub fn deposit(&self) {
        if let Ok(mut t) = self.tokens.lock() {
            *t = (*t + 0.2).min(100.0);
        }
    }

    pub fn withdraw(&self) -> bool {
        match self.tokens.lock() {
            Ok(mut t) if *t >= 1.0 => {
                *t -= 1.0;
                true
            }
            _ => false,
        }
    }
}

/// A stable, opaque id for an upstream in a sticky cookie (not its address).
pub fn sticky_key(addr: SocketAddr) -> u64 {
    xxhash_rust::xxh3::xxh3_64(addr.to_string().as_bytes())
}

/// A service's upstreams as one routing table sees them.
pub struct Pool {
    pub algorithm: Algorithm,
    pub budget: RetryBudget,
    members: Vec<(Arc<Upstream>, i64)>,
    /// Per member, the active checks' verdict (`true`: down) when the service is checked;
    /// empty when it is not.
    down: Vec<Option<Arc<AtomicBool>>>,
    /// Every member's index: the candidates when none is ejected (or all are).
    all: Vec<usize>,
    /// Smooth WRR's current weights.
    current: Mutex<Vec<i64>>,
    /// Where least-requests starts looking, so ties rotate.
    cursor: std::sync::atomic::AtomicUsize,
}

impl Pool {
    pub fn new(algorithm: Algorithm, members: Vec<(Arc<Upstream>, u32)>) -> Pool {
        let members: Vec<(Arc<Upstream>, i64)> = members
            .into_iter()
            .filter(|(_, w)| *w > 0)
            .map(|(u, w)| (u, w as i64))
            .collect();
        let n = members.len();
        Pool {
            algorithm,
            all: (0..n).collect(),
            members,
            down: Vec::new(),
            budget: RetryBudget::default(),
            current: Mutex::new(vec![0; n]),
            cursor: Default::default(),
        }
    }

    /// Attaches the active checks' verdicts: `verdict(addr)` is the flag its checker keeps.
    pub fn with_checks(mut self, verdict: impl Fn(SocketAddr) -> Option<Arc<AtomicBool>>) -> Pool {
        self.down = self.members.iter().map(|(u, _)| verdict(u.addr)).collect();
        self
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Its members' addresses.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.members.iter().map(|(u, _)| u.addr)
    }

    /// Whether a request could go to one of its upstreams: one its active checks did not take
    /// out (a passively ejected one still answers when it is the last).
    pub fn available(&self) -> bool {
        (0..self.members.len()).any(|i| !self.checked_down(i))
    }

    /// Whether the active checks have taken member `i` out.
    fn checked_down(&self, i: usize) -> bool {
        self.down
            .get(i)
            .and_then(Option::as_ref)
            .is_some_and(|d| d.load(Ordering::Acquire))
    }

    /// The upstream a sticky cookie names, if it is still in the pool and neither ejected nor
    /// down.
    pub fn by_key(&self, key: u64, now: Instant) -> Option<Arc<Upstream>> {
        (0..self.members.len())
            .find(|&i| {
                let u = &self.members[i].0;
                sticky_key(u.addr) == key && !u.ejected(now) && !self.checked_down(i)
            })
            .map(|i| self.members[i].0.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Picks an upstream. Ejected ones are skipped while any other is available (if all are
    /// ejected, they are all candidates: answering beats refusing). Ones the active checks took
    /// out are never candidates: with all of them down there is none. `rand` gives uniform u64s.
    pub fn pick(&self, now: Instant, rand: &mut impl FnMut() -> u64) -> Option<Arc<Upstream>> {
        // Usually none is ejected or down: every member is a candidate, from a list made once.
        let healthy: Vec<usize>;
        let cands: &[usize] = if (0..self.members.len())
            .all(|i| !self.members[i].0.ejected(now) && !self.checked_down(i))
        {
            &self.all
        } else {
            let alive: Vec<usize> = (0..self.members.len())
                .filter(|&i| !self.checked_down(i))
                .collect();
            let answering: Vec<usize> = alive
                .iter()
                .copied()
                .filter(|&i| !self.members[i].0.ejected(now))
                .collect();
            healthy = if answering.is_empty() {
                alive
            } else {
                answering
            };
            &healthy
        };
        if cands.is_empty() {
            return None;
        }
        let i = match self.algorithm {
            Algorithm::WeightedRoundRobin => self.smooth(cands)?,
            Algorithm::Random => {
                let total: i64 = cands.iter().map(|&i| self.members[i].1).sum();
                let mut r = (rand() % total as u64) as i64;
                let mut pick = cands[0];
                for &i in cands {
                    if r < self.members[i].1 {
                        pick = i;
                        break;
                    }
                    r -= self.members[i].1;
                }
                pick
            }
            Algorithm::LeastRequests => {
                // in_flight / weight, compared without division; the rotation breaks ties.
                let start = self.cursor.fetch_add(1, Ordering::Relaxed) as i64;
                let n = cands.len();
                let mut best = cands[(start.rem_euclid(n as i64)) as usize];
                for k in 0..n {
                    let i = cands[(start.rem_euclid(n as i64) as usize + k) % n];
                    let (a, wa) = (
                        self.members[i].0.in_flight.load(Ordering::Relaxed) as i128,
                        self.members[i].1 as i128,
                    );
                    let (b, wb) = (
                        self.members[best].0.in_flight.load(Ordering::Relaxed) as i128,
                        self.members[best].1 as i128,
                    );
                    if a * wb < b * wa {
                        best = i;
                    }
                }
                best
            }
            Algorithm::P2c => {
                let n = cands.len();
                let a = cands[(rand() % n as u64) as usize];
                let mut b = cands[(rand() % n as u64) as usize];
                if n > 1 && a == b {
                    b = cands[(cands.iter().position(|&x| x == a).unwrap_or(0) + 1) % n];
                }
                if self.members[b].0.score() < self.members[a].0.score() {
                    b
                } else {
                    a
                }
            }
        };
        Some(self.members[i].0.clone())
    }

    fn smooth(&self, cands: &[usize]) -> Option<usize> {
        let total: i64 = cands.iter().map(|&i| self.members[i].1).sum();
        let mut cur = self.current.lock().ok()?;
        let mut best: Option<usize> = None;
        for &i in cands {
            cur[i] += self.members[i].1;
            if best.is_none_or(|b| cur[i] > cur[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        cur[b] -= total;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ups(n: usize) -> Vec<Arc<Upstream>> {
        (0..n)
            .map(|i| {
                Arc::new(Upstream::new(SocketAddr::from((
                    [10, 0, 0, 1 + i as u8],
                    80,
                ))))
            })
            .collect()
    }

    /// xorshift: a fixed, reproducible stream.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    fn tally(p: &Pool, n: usize, now: Instant, r: &mut impl FnMut() -> u64) -> Vec<usize> {
        let mut t = vec![0; p.len()];
        for _ in 0..n {
            let u = p.pick(now, r).unwrap();
            let i = p
                .members
                .iter()
                .position(|(m, _)| Arc::ptr_eq(m, &u))
                .unwrap();
            t[i] += 1;
        }
        t
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves_by_weight() {
        let u = ups(3);
        let p = Pool::new(
            Algorithm::WeightedRoundRobin,
            vec![(u[0].clone(), 5), (u[1].clone(), 1), (u[2].clone(), 1)],
        );
        let now = crate::clock::now();
        let seq: Vec<u8> = (0..7)
            .map(|_| {
                p.pick(now, &mut rng(1))
                    .unwrap()
                    .addr
                    .ip()
                    .to_string()
                    .as_bytes()[7]
                    - b'0'
            })
            .collect();
        assert_eq!(
            seq,
            vec![1, 1, 2, 1, 3, 1, 1],
            "nginx's documented sequence for 5:1:1"
        );
        assert!(
            Pool::new(Algorithm::WeightedRoundRobin, vec![(u[0].clone(), 0)])
                .pick(now, &mut rng(1))
                .is_none()
        );
    }

    #[test]
    fn random_follows_weights() {
        let u = ups(2);
        let p = Pool::new(
            Algorithm::Random,
            vec![(u[0].clone(), 1), (u[1].clone(), 3)],
        );
        let t = tally(&p, 40_000, crate::clock::now(), &mut rng(7));
        let share = t[1] as f64 / 40_000.0;
        assert!((share - 0.75).abs() < 0.01, "{t:?}");
    }

    #[test]
    fn least_requests_prefers_the_idle_and_rotates_ties() {
        let u = ups(3);
        let p = Pool::new(
            Algorithm::LeastRequests,
            u.iter().map(|x| (x.clone(), 1)).collect(),
        );
        let now = crate::clock::now();
        u[0].in_flight.store(5, Ordering::Relaxed);
        u[1].in_flight.store(1, Ordering::Relaxed);
        u[2].in_flight.store(3, Ordering::Relaxed);
        assert_eq!(p.pick(now, &mut rng(1)).unwrap().addr, u[1].addr);
        for x in &u {
            x.in_flight.store(0, Ordering::Relaxed);
        }
        let t = tally(&p, 300, now, &mut rng(1));
        assert_eq!(t, vec![100, 100, 100], "ties rotate");
    }

    #[test]
    fn p2c_avoids_the_slow_and_the_busy() {
        let u = ups(4);
        let p = Pool::new(Algorithm::P2c, u.iter().map(|x| (x.clone(), 1)).collect());
        let now = crate::clock::now();
        let passive = Passive::default();
        for (i, x) in u.iter().enumerate() {
            let ms = if i == 0 { 50 } else { 5 };
            x.record(true, Duration::from_millis(ms), &passive, now);
        }
        let t = tally(&p, 10_000, now, &mut rng(3));
        // The slow one only wins when both random picks are it: about 1/16 of the time.
        assert!(t[0] < 1_000, "{t:?}");
        assert!(t[1..].iter().all(|&n| n > 2_500), "{t:?}");
    }

    #[test]
    fn consecutive_failures_eject_and_back_off_doubles() {
        let u = ups(2);
        let p = Pool::new(
            Algorithm::WeightedRoundRobin,
            u.iter().map(|x| (x.clone(), 1)).collect(),
        );
        let passive = Passive {
            failures: 3,
            backoff: Duration::from_secs(10),
        };
        let t0 = crate::clock::now();
        for _ in 0..2 {
            u[0].record(false, Duration::from_millis(1), &passive, t0);
        }
        assert!(!u[0].ejected(t0), "two failures are not enough");
        u[0].record(false, Duration::from_millis(1), &passive, t0);
        assert!(u[0].ejected(t0));
        assert_eq!(
            tally(&p, 10, t0, &mut rng(1)),
            vec![0, 10],
            "an ejected upstream gets nothing"
        );
        let t1 = t0 + Duration::from_secs(11);
        assert!(!u[0].ejected(t1), "back after the back-off");
        // Failing again at once: ejected for twice as long.
        for _ in 0..3 {
            u[0].record(false, Duration::from_millis(1), &passive, t1);
        }
        assert!(
            u[0].ejected(t1 + Duration::from_secs(19))
                && !u[0].ejected(t1 + Duration::from_secs(21))
        );
        // All ejected: still answered.
        for _ in 0..3 {
            u[1].record(false, Duration::from_millis(1), &passive, t1);
        }
        assert!(p.pick(t1, &mut rng(1)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn slots_cap_an_upstream_and_queue_in_line() {
        let u = ups(1).remove(0);
        let a = Upstream::try_slot(&u, 2).expect("first");
        let b = Upstream::try_slot(&u, 2).expect("second");
        assert!(Upstream::try_slot(&u, 2).is_none(), "the cap is 2");
        assert_eq!(u.busy(), 2);
        // A waiter gets the slot freed while it waits.
        let waiter = {
            let u = u.clone();
            tokio::spawn(async move {
                let until = crate::clock::timer_now() + Duration::from_secs(5);
                Upstream::slot(&u, 2, until).await.is_some()
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(a);
        assert!(
            waiter.await.expect("task"),
            "a freed slot goes to the waiter"
        );
        // Nothing frees: the wait ends at its deadline, empty-handed.
        let start = crate::clock::timer_now();
        let until = start + Duration::from_secs(2);
        let _c = Upstream::try_slot(&u, 2);
        assert!(Upstream::slot(&u, 2, until).await.is_none());
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        drop(b);
        assert_eq!(u.busy(), 1, "only `_c` is held: every other slot came back");
    }

    #[test]
    fn members_the_checks_took_out_are_never_picked() {
        let u = ups(3);
        let flags: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::default()).collect();
        let verdict = |a: SocketAddr| u.iter().position(|x| x.addr == a).map(|i| flags[i].clone());
        let now = crate::clock::now();
        for alg in [
            Algorithm::WeightedRoundRobin,
            Algorithm::Random,
            Algorithm::LeastRequests,
            Algorithm::P2c,
        ] {
            let p = Pool::new(alg, u.iter().map(|x| (x.clone(), 1)).collect()).with_checks(verdict);
            flags[1].store(true, Ordering::Release);
            let t = tally(&p, 300, now, &mut rng(3));
            assert_eq!(t[1], 0, "{alg:?}: {t:?}");
            assert!(t[0] > 0 && t[2] > 0, "{alg:?}: {t:?}");
            assert!(p.by_key(sticky_key(u[1].addr), now).is_none());
            assert!(p.by_key(sticky_key(u[0].addr), now).is_some());
            // Passive ejection of the others does not bring a checked-down member back.
            let passive = Passive {
                failures: 1,
                backoff: Duration::from_secs(60),
            };
            u[0].record(false, Duration::from_millis(1), &passive, now);
            u[2].record(false, Duration::from_millis(1), &passive, now);
            for _ in 0..20 {
                let got = p
                    .pick(now, &mut rng(5))
                    .expect("an ejected member still answers");
                assert_ne!(got.addr, u[1].addr, "{alg:?}");
            }
            // All down: no upstream, so the caller answers 503.
            flags[0].store(true, Ordering::Release);
            flags[2].store(true, Ordering::Release);
            assert!(p.pick(now, &mut rng(5)).is_none(), "{alg:?}");
            // Back up: picked again.
            flags[1].store(false, Ordering::Release);
            assert_eq!(p.pick(now, &mut rng(5)).expect("up").addr, u[1].addr);
            for f in &flags {
                f.store(false, Ordering::Release);
            }
            let later = now + Duration::from_secs(3600);
            u[0].record(true, Duration::from_millis(1), &passive, later);
            u[2].record(true, Duration::from_millis(1), &passive, later);
        }
    }
}
