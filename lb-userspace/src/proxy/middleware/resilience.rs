//! Failing well: retries with back-off, and a circuit breaker that stops sending to a service
//! that is failing and lets traffic back gradually.
//!
//! ```toml
//! [[middleware]]
//! name = "retry"
//! retry = { attempts = 3, initial_interval_ms = 100 }
//! [[middleware]]
//! name = "breaker"
//! circuit_breaker = { expression = "NetworkErrorRatio() > 0.30 || ResponseCodeRatio(500, 600, 0, 600) > 0.25 || LatencyAtQuantileMS(50.0) > 100", fallback_duration_ms = 10000, recovery_duration_ms = 10000 }
//! ```
//! `retry` replaces the service's retry count for the router's requests: an attempt that got no
//! answer (connection refused or reset, timeout) is sent to another upstream after a back-off
//! that doubles from `initial_interval_ms` — only when the request can be sent again (no body,
//! or a body `buffering` holds) and, unless the connection was never made, only for idempotent
//! methods. The service's retry budget still caps retries overall.
//!
//! The breaker watches the last 10 seconds of the router's responses. Its expression combines
//! `NetworkErrorRatio()` (answers lb made because the upstream could not be reached),
//! `ResponseCodeRatio(from, to, dividend_from, dividend_to)` (responses with a status in
//! `[from, to)` over those in `[dividend_from, dividend_to)`) and `LatencyAtQuantileMS(q)` with
//! `>`, `>=`, `<`, `<=`, `==`, `!=`, `&&`, `||` and parentheses. When it holds, the breaker opens:
//! every request gets `response_code` (503) for `fallback_duration_ms`; then it recovers,
//! letting a share of traffic through that grows linearly over `recovery_duration_ms`, and
//! opens again if the expression holds again.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use hyper::{Response, StatusCode};

use super::{
    answer, BoxFuture, BuildError, ClientFault, Ctx, Flow, Middleware, Req, UpstreamFailure,
};
use crate::model::middleware::{CircuitBreakerConfig, RetryConfig};
use crate::proxy::Body;

/// How one request is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Back-off before the second attempt; doubled for each one after.
    pub initial_interval: Duration,
    /// Answers with these statuses are sent again (bit `s - 100` for status `s`).
    pub status: [u64; 8],
    /// No retry once this long has passed since the first attempt.
    pub timeout: Option<Duration>,
    /// Whether an attempt that got no answer is sent again.
    pub network_errors: bool,
    /// Whether methods that are not idempotent are sent again.
    pub non_idempotent: bool,
}

impl RetryPolicy {
    /// Whether an answer with `status` is sent again.
    pub fn retries_status(&self, status: u16) -> bool {
        let Some(i) = status
            .checked_sub(100)
            .map(usize::from)
            .filter(|i| *i < 512)
        else {
            return false;
        };
        self.status[i / 64] & (1 << (i % 64)) != 0
    }

    /// The wait before attempt `n` (1-based; attempt 1 waits nothing).
    pub fn backoff(&self, n: u32) -> Duration {
        if n <= 1 {
            return Duration::ZERO;
        }
        self.initial_interval
            .saturating_mul(1u32 << (n - 2).min(16))
            .min(Duration::from_secs(10))
    }
}

impl RetryConfig {
    pub fn build(&self) -> Result<Retry, BuildError> {
        if self.attempts == 0 || self.attempts > 10 {
            return Err(BuildError::OutOfRange {
                field: "attempts",
                bound: "1..=10",
            });
        }
        let mut status = [0u64; 8];
        for s in &self.status {
            let bad = || BuildError::Expected {
                field: "status",
                value: s.clone(),
                expected: "a status (502) or a range (500-599) within 100..=599",
            };
            let (a, b) = match s.trim().split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (s.trim(), s.trim()),
            };
            let (a, b) = (
                a.parse::<u16>().map_err(|_| bad())?,
                b.parse::<u16>().map_err(|_| bad())?,
            );
            if !(100..=599).contains(&a) || !(a..=599).contains(&b) {
                return Err(bad());
            }
            for code in a..=b {
                let i = usize::from(code - 100);
                status[i / 64] |= 1 << (i % 64);
            }
        }
        Ok(Retry(RetryPolicy {
            attempts: self.attempts,
            initial_interval: Duration::from_millis(self.initial_interval_ms),
            status,
            timeout: (self.timeout_ms > 0).then(|| Duration::from_millis(self.timeout_ms)),
            network_errors: !self.disable_retry_on_network_error,
            non_idempotent: self.retry_non_idempotent_method,
        }))
    }
}

pub struct Retry(RetryPolicy);

impl Middleware for Retry {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, _: &'a mut Req) -> Flow<'a> {
        ctx.retry = Some(self.0);
        Flow::Next
    }
}

// ------------------------------------------------------------------ the breaker's expression

#[derive(Debug, Clone, Copy, PartialEq)]
enum Metric {
    NetworkErrorRatio,
    ResponseCodeRatio(u16, u16, u16, u16),
    LatencyAtQuantileMs(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Test(Metric, Cmp, f64),
}

struct Parser<'s> {
    s: &'s [u8],
    at: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.at < self.s.len() && self.s[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn err<T>(&self, what: &'static str) -> Result<T, BuildError> {
        Err(BuildError::Expression {
            column: self.at + 1,
            what,
        })
    }

    fn eat(&mut self, t: &str) -> bool {
        self.ws();
        if self.s[self.at..].starts_with(t.as_bytes()) {
            self.at += t.len();
            true
        } else {
            false
        }
    }

    fn number(&mut self) -> Result<f64, BuildError> {
        self.ws();
        let start = self.at;
        while self.at < self.s.len()
            && (self.s[self.at].is_ascii_digit() || matches!(self.s[self.at], b'.' | b'-'))
        {
            self.at += 1;
        }
        std::str::from_utf8(&self.s[start..self.at])
            .ok()
            .and_then(|n| n.parse().ok())
            .map_or_else(|| self.err("expected a number"), Ok)
    }

    fn or(&mut self) -> Result<Cond, BuildError> {
        let mut l = self.and()?;
        while self.eat("||") {
            l = Cond::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }

    fn and(&mut self) -> Result<Cond, BuildError> {
        let mut l = self.test()?;
        while self.eat("&&") {
            l = Cond::And(Box::new(l), Box::new(self.test()?));
        }
        Ok(l)
    }

    fn test(&mut self) -> Result<Cond, BuildError> {
        if self.eat("(") {
            let c = self.or()?;
            if !self.eat(")") {
                return self.err("expected )");
            }
            return Ok(c);
        }
        let metric = if self.eat("NetworkErrorRatio") {
            if !(self.eat("(") && self.eat(")")) {
                return self.err("expected ()");
            }
            Metric::NetworkErrorRatio
        } else if self.eat("ResponseCodeRatio") {
            let mut v = [0u16; 4];
            if !self.eat("(") {
                return self.err("expected (");
            }
            for (i, slot) in v.iter_mut().enumerate() {
                if i > 0 && !self.eat(",") {
                    return self.err("expected ,");
                }
                let n = self.number()?;
                if !(0.0..=1000.0).contains(&n) {
                    return self.err("status codes are 0..1000");
                }
                *slot = n as u16;
            }
            if !self.eat(")") {
                return self.err("expected )");
            }
            Metric::ResponseCodeRatio(v[0], v[1], v[2], v[3])
        } else if self.eat("LatencyAtQuantileMS") {
            if !self.eat("(") {
                return self.err("expected (");
            }
            let q = self.number()?;
            if !(0.0..=100.0).contains(&q) || !self.eat(")") {
                return self.err("expected a quantile 0..100 and )");
            }
            Metric::LatencyAtQuantileMs(q)
        } else {
            return self.err(
                "expected NetworkErrorRatio(), ResponseCodeRatio(…), LatencyAtQuantileMS(…) or (",
            );
        };
        let cmp = if self.eat(">=") {
            Cmp::Ge
        } else if self.eat("<=") {
            Cmp::Le
        } else if self.eat("==") {
            Cmp::Eq
        } else if self.eat("!=") {
            Cmp::Ne
        } else if self.eat(">") {
            Cmp::Gt
        } else if self.eat("<") {
            Cmp::Lt
        } else {
            return self.err("expected a comparison");
        };
        Ok(Cond::Test(metric, cmp, self.number()?))
    }
}

fn parse(expr: &str) -> Result<Cond, BuildError> {
    let mut p = Parser {
        s: expr.as_bytes(),
        at: 0,
    };
    let c = p.or()?;
    p.ws();
    if p.at != p.s.len() {
        return p.err("unexpected text");
    }
    Ok(c)
}

// ------------------------------------------------------------------ the rolling window

/// Latency histogram buckets: bucket i holds latencies up to 1.25^i ms (i = 0..64 reaches
/// about 1.6 hours), so a quantile is known within 25%.
const LAT_BUCKETS: usize = 64;
const LAT_FACTOR: f64 = 1.25;
/// The window: this many one-second slices.
const SLICES: usize = 10;

#[derive(Default, Clone)]
struct Slice {
    /// Which second (since the breaker's epoch) this slice holds.
    second: u64,
    total: u64,
    network_errors: u64,
    codes: HashMap<u16, u64>,
    latency: Vec<u64>,
}

struct Window {
    epoch: Instant,
    slices: Vec<Slice>,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            epoch: now,
            slices: vec![Slice::default(); SLICES],
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() + 1
    }

    fn record(&mut self, now: Instant, code: u16, network_error: bool, latency: Duration) {
        let sec = self.second(now);
        let s = &mut self.slices[(sec % SLICES as u64) as usize];
        if s.second != sec {
            *s = Slice {
                second: sec,
                latency: vec![0; LAT_BUCKETS],
                ..Slice::default()
            };
        }
        s.total += 1;
        if network_error {
            s.network_errors += 1;
        }
        *s.codes.entry(code).or_default() += 1;
        let ms = latency.as_secs_f64() * 1000.0;
        let i = if ms <= 1.0 {
            0
        } else {
            (ms.ln() / LAT_FACTOR.ln()).ceil() as usize
        };
        s.latency[i.min(LAT_BUCKETS - 1)] += 1;
    }

    fn live(&self, now: Instant) -> impl Iterator<Item = &Slice> {
        let sec = self.second(now);
        self.slices
            .iter()
            .filter(move |s| s.second != 0 && s.second + (SLICES as u64) > sec)
    }

    fn value(&self, m: Metric, now: Instant) -> f64 {
        match m {
            Metric::NetworkErrorRatio => {
                let (e, t) = self
                    .live(now)
                    .fold((0, 0), |(e, t), s| (e + s.network_errors, t + s.total));
                if t == 0 {
                    0.0
                } else {
                    e as f64 / t as f64
                }
            }
            Metric::ResponseCodeRatio(a, b, c, d) => {
                let count = |lo: u16, hi: u16| -> u64 {
                    self.live(now)
                        .flat_map(|s| s.codes.iter())
                        .filter(|(code, _)| (lo..hi).contains(*code))
                        .map(|(_, n)| *n)
                        .sum()
                };
                let den = count(c, d);
                if den == 0 {
                    0.0
                } else {
                    count(a, b) as f64 / den as f64
                }
            }
            Metric::LatencyAtQuantileMs(q) => {
                let mut hist = [0u64; LAT_BUCKETS];
                for s in self.live(now) {
                    for (h, n) in hist.iter_mut().zip(&s.latency) {
                        *h += n;
                    }
                }
                let total: u64 = hist.iter().sum();
                if total == 0 {
                    return 0.0;
                }
                let want = ((q / 100.0) * total as f64).ceil().max(1.0) as u64;
                let mut seen = 0;
                for (i, n) in hist.iter().enumerate() {
                    seen += n;
                    if seen >= want {
                        return LAT_FACTOR.powi(i as i32);
                    }
                }
                LAT_FACTOR.powi(LAT_BUCKETS as i32 - 1)
            }
        }
    }

    fn holds(&self, c: &Cond, now: Instant) -> bool {
        match c {
            Cond::And(a, b) => self.holds(a, now) && self.holds(b, now),
            Cond::Or(a, b) => self.holds(a, now) || self.holds(b, now),
            Cond::Test(m, cmp, x) => {
                let v = self.value(*m, now);
                match cmp {
                    Cmp::Gt => v > *x,
                    Cmp::Ge => v >= *x,
                    Cmp::Lt => v < *x,
                    Cmp::Le => v <= *x,
                    Cmp::Eq => v == *x,
                    Cmp::Ne => v != *x,
                }
            }
        }
    }
}

// ------------------------------------------------------------------ the breaker

impl CircuitBreakerConfig {
    pub fn build(&self) -> Result<CircuitBreaker, BuildError> {
        let code = StatusCode::from_u16(self.response_code).map_err(|_| BuildError::Expected {
            field: "response_code",
            value: self.response_code.to_string(),
            expected: "a status (100..=999)",
        })?;
        Ok(CircuitBreaker {
            cond: parse(&self.expression)?,
            check_period: Duration::from_millis(self.check_period_ms),
            fallback: Duration::from_millis(self.fallback_duration_ms),
            recovery: Duration::from_millis(self.recovery_duration_ms),
            code,
            state: Mutex::new(State {
                window: Window::new(crate::clock::now()),
                mode: Mode::Closed,
                checked: None,
            }),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Closed,
    Open { until: Instant },
    Recovering { since: Instant },
}

struct State {
    window: Window,
    mode: Mode,
    checked: Option<Instant>,
}

pub struct CircuitBreaker {
    cond: Cond,
    check_period: Duration,
    fallback: Duration,
    recovery: Duration,
    code: StatusCode,
    state: Mutex<State>,
}

impl CircuitBreaker {
    /// Whether a request arriving now may pass; `pick` is a uniform number in [0, 1) for the
    /// share let through while recovering.
    fn admit(&self, now: Instant, pick: f64) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return true;
        };
        loop {
            match s.mode {
                Mode::Closed => return true,
                Mode::Open { until } if now < until => return false,
                Mode::Open { until } => s.mode = Mode::Recovering { since: until },
                Mode::Recovering { since } => {
                    let done = now.saturating_duration_since(since);
                    if done >= self.recovery {
                        s.mode = Mode::Closed;
                        continue;
                    }
                    return pick < done.as_secs_f64() / self.recovery.as_secs_f64();
                }
            }
        }
    }

    fn observe(&self, now: Instant, code: u16, network_error: bool, latency: Duration) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        s.window.record(now, code, network_error, latency);
        if s.checked
            .is_some_and(|t| now.saturating_duration_since(t) < self.check_period)
        {
            return;
        }
        s.checked = Some(now);
        if !matches!(s.mode, Mode::Open { .. }) && s.window.holds(&self.cond, now) {
            tracing::warn!(mode = ?s.mode, "circuit breaker opens");
            s.mode = Mode::Open {
                until: now + self.fallback,
            };
            // What tripped it is not evidence about the service once it has had a rest.
            s.window = Window::new(now);
        }
    }
}

impl Middleware for CircuitBreaker {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, _: &'a mut Req) -> Flow<'a> {
        if self.admit(ctx.now, crate::clock::random::<f64>()) {
            return Flow::Next;
        }
        Flow::Answer(answer(self.code, "service unavailable (circuit open)"))
    }

    fn response<'a>(
        &'a self,
        ctx: &'a Ctx,
        resp: &'a mut Response<Body>,
    ) -> Option<BoxFuture<'a, ()>> {
        if resp.extensions().get::<ClientFault>().is_some() {
            return None;
        }
        let now = crate::clock::now();
        self.observe(
            now,
            resp.status().as_u16(),
            resp.extensions().get::<UpstreamFailure>().is_some(),
            now.saturating_duration_since(ctx.now),
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_statuses_are_ranges_and_bad_ones_are_refused() {
        let cfg = |status: &[&str]| RetryConfig {
            attempts: 2,
            initial_interval_ms: 0,
            status: status.iter().map(|s| s.to_string()).collect(),
            timeout_ms: 0,
            disable_retry_on_network_error: false,
            retry_non_idempotent_method: false,
        };
        let Retry(p) = cfg(&["400", "500-503", " 599 "]).build().expect("valid");
        for (code, want) in [
            (400, true),
            (401, false),
            (500, true),
            (503, true),
            (504, false),
            (599, true),
            (100, false),
            (99, false),
            (600, false),
        ] {
            assert_eq!(p.retries_status(code), want, "{code}");
        }
        for bad in ["600", "99", "503-500", "5xx", "", "500-"] {
            assert!(cfg(&[bad]).build().is_err(), "{bad:?}");
        }
    }

    fn breaker(expr: &str) -> CircuitBreaker {
        CircuitBreakerConfig {
            expression: expr.into(),
            check_period_ms: 0,
            fallback_duration_ms: 1000,
            recovery_duration_ms: 1000,
            response_code: 503,
        }
        .build()
        .unwrap()
    }

    #[test]
    fn expressions_parse_and_errors_name_the_column() {
        assert!(parse("NetworkErrorRatio() > 0.5").is_ok());
        assert!(parse(
            "(ResponseCodeRatio(500, 600, 0, 600) > 0.25 && LatencyAtQuantileMS(50.0) >= 100) || NetworkErrorRatio() != 0"
        )
        .is_ok());
        let e = parse("NetworkErrorRatio() >").unwrap_err();
        assert!(e.to_string().contains("column 22"), "{e}");
        let e = parse("Bogus() > 1").unwrap_err();
        assert!(e.to_string().contains("column 1"), "{e}");
        assert!(parse("NetworkErrorRatio() > 0.5 junk").is_err());
        assert!(parse("LatencyAtQuantileMS(120) > 1").is_err());
    }

    #[test]
    fn opens_on_errors_then_recovers_gradually() {
        let b = breaker("NetworkErrorRatio() > 0.5");
        let t0 = crate::clock::now();
        let ms = Duration::from_millis;
        for i in 0..4 {
            assert!(b.admit(t0 + ms(i), 0.99));
            b.observe(t0 + ms(i), 200, false, ms(1));
        }
        for i in 4..9 {
            b.observe(t0 + ms(i), 502, true, ms(1));
        }
        assert!(!b.admit(t0 + ms(10), 0.0), "5 of 9 failed: open");
        assert!(!b.admit(t0 + ms(900), 0.0), "still within the fallback");
        // Recovering from 1009 ms: a quarter of the way, a quarter of the traffic.
        let t = t0 + ms(1009 + 250);
        assert!(b.admit(t, 0.2) && !b.admit(t, 0.3));
        assert!(b.admit(t0 + ms(2100), 0.99), "recovered: closed");
    }

    #[test]
    fn status_ratio_and_latency_quantile() {
        let t0 = crate::clock::now();
        let mut w = Window::new(t0);
        for i in 0..100u64 {
            let code = if i < 30 { 500 } else { 200 };
            w.record(t0, code, false, Duration::from_millis(i + 1));
        }
        let ratio = w.value(Metric::ResponseCodeRatio(500, 600, 0, 600), t0);
        assert!((ratio - 0.3).abs() < 1e-9, "{ratio}");
        let p50 = w.value(Metric::LatencyAtQuantileMs(50.0), t0);
        assert!((50.0..=50.0 * LAT_FACTOR).contains(&p50), "{p50}");
        // Ten seconds on, the window has forgotten.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(w.value(Metric::NetworkErrorRatio, later), 0.0);
        assert_eq!(w.value(Metric::LatencyAtQuantileMs(99.0), later), 0.0);
    }
}
