//! Who and how much: client address ranges, request rates, requests in flight, body sizes.
//!
//! ```toml
//! [[middleware]]
//! name = "office"
//! ip_allow_list = { source_range = ["10.0.0.0/8", "192.0.2.7"] }
//! [[middleware]]
//! name = "per-client"
//! rate_limit = { average = 100, burst = 50 }                  # per client address
//! [[middleware]]
//! name = "per-tenant"
//! rate_limit = { average = 10, burst = 10, source_header = "X-Tenant" }
//! [[middleware]]
//! name = "cluster-wide"                                       # one bucket per client for every node
//! rate_limit = { average = 100, burst = 50, redis = { url = "redis://10.0.0.5:6379/0", on_error = "open" } }
//! [[middleware]]
//! name = "one-at-a-time"
//! in_flight_req = { amount = 1 }
//! [[middleware]]
//! name = "small-bodies"
//! buffering = { max_request_body_bytes = 1048576, max_response_body_bytes = 10485760 }
//! ```

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use hyper::{
    header::{self, HeaderName, HeaderValue},
    Response, StatusCode,
};
use ipnet::IpNet;

use super::{answer, full, header_name, BoxFuture, BuildError, Ctx, Flow, Middleware, Req};
use crate::model::middleware::{
    BufferingConfig, InFlightReqConfig, IpAllowListConfig, IpStrategyConfig, RateLimitConfig,
    RateLimitFailure,
};

impl IpStrategyConfig {
    pub fn build(&self) -> Result<IpStrategy, BuildError> {
        let excluded = self
            .excluded_ips
            .iter()
            .map(|r| {
                crate::model::ip_net(r).ok_or_else(|| BuildError::Expected {
                    field: "ip_strategy.excluded_ips",
                    value: r.clone(),
                    expected: "an address or a CIDR",
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.ipv6_subnet.is_some_and(|p| p == 0 || p > 128) {
            return Err(BuildError::OutOfRange {
                field: "ip_strategy.ipv6_subnet",
                bound: "1 ..= 128",
            });
        }
        Ok(IpStrategy {
            depth: self.depth,
            excluded,
            ipv6_subnet: self.ipv6_subnet,
        })
    }
}

/// Whose address a middleware looks at (Traefik's `ipStrategy`, see [`IpStrategyConfig`]).
/// `X-Forwarded-For` is read as it reached the middlewares: only a trusted proxy's, since lb
/// drops it from everyone else before routing.
#[derive(Debug, Clone)]
pub struct IpStrategy {
    depth: usize,
    excluded: Vec<IpNet>,
    ipv6_subnet: Option<u8>,
}

impl IpStrategy {
    /// The client's address; `None` when the strategy names none (a depth beyond the list, or
    /// an entry that is not an address), which no allow list admits.
    pub fn client(&self, peer: IpAddr, headers: &hyper::HeaderMap) -> Option<IpAddr> {
        // A line that is not text is no address list at all (it would shift the count).
        let mut list: Vec<&str> = Vec::new();
        for v in headers.get_all("x-forwarded-for") {
            list.extend(v.to_str().ok()?.split(',').map(str::trim));
        }
        let ip = if self.depth > 0 {
            let at = list.len().checked_sub(self.depth)?;
            self.mask(list[at].parse::<IpAddr>().ok()?.to_canonical())
        } else if !self.excluded.is_empty() {
            // Traefik's: no header, no client.
            if list.is_empty() {
                return None;
            }
            // The rightmost entry that is not one of the excluded proxies, as it is written:
            // one that is not an address ends the search (nothing to its left is believed).
            let mut found = None;
            for s in list.iter().rev().filter(|s| !s.is_empty()) {
                let ip = s.parse::<IpAddr>().ok()?.to_canonical();
                if !self.excluded.iter().any(|n| n.contains(&ip)) {
                    found = Some(ip);
                    break;
                }
            }
            found?
        } else {
            self.mask(peer.to_canonical())
        };
        Some(ip)
    }

    fn mask(&self, ip: IpAddr) -> IpAddr {
        match (ip, self.ipv6_subnet) {
            (IpAddr::V6(a), Some(p)) => ipnet::Ipv6Net::new(a, p)
                .map(|n| IpAddr::V6(n.trunc().addr()))
                .unwrap_or(ip),
            _ => ip,
        }
    }
}

/// The address a limit or a list looks at: the strategy's, or the client's.
fn client_of(strategy: Option<&IpStrategy>, ctx: &Ctx, req: &Req) -> Option<IpAddr> {
    match strategy {
        None => Some(ctx.client_ip),
        Some(s) => s.client(ctx.client_ip, req.headers()),
    }
}
use crate::proxy::Body;

impl IpAllowListConfig {
    pub fn build(&self) -> Result<IpAllowList, BuildError> {
        let ranges = self
            .source_range
            .iter()
            .map(|r| {
                crate::model::ip_net(r).ok_or_else(|| BuildError::Expected {
                    field: "source_range",
                    value: r.clone(),
                    expected: "an address or a CIDR",
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let strategy = self.ip_strategy.as_ref().map(|s| s.build()).transpose()?;
        Ok(IpAllowList { ranges, strategy })
    }
}

/// Only clients from these ranges; others get 403.
pub struct IpAllowList {
    ranges: Vec<IpNet>,
    strategy: Option<IpStrategy>,
}

impl Middleware for IpAllowList {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let client = client_of(self.strategy.as_ref(), ctx, req);
        if client.is_some_and(|ip| self.ranges.iter().any(|n| n.contains(&ip))) {
            return Flow::Next;
        }
        Flow::Answer(answer(StatusCode::FORBIDDEN, "forbidden"))
    }
}

/// A token bucket: `average` tokens a second, up to `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token if there is one, refilling for the time since the last call.
    pub fn take(&mut self, average: f64, burst: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * average).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl RateLimitConfig {
    pub fn build(&self) -> Result<RateLimit, BuildError> {
        self.build_named("unnamed")
    }

    /// `name` keys the buckets in Redis: the same middleware on every node shares them.
    pub fn build_named(&self, name: &str) -> Result<RateLimit, BuildError> {
        if self.average <= 0.0 || !self.average.is_finite() {
            return Err(BuildError::OutOfRange {
                field: "average",
                bound: "> 0",
            });
        }
        if !self.burst.is_finite() {
            return Err(BuildError::OutOfRange {
                field: "burst",
                bound: "a number",
            });
        }
        let mut r = RateLimit::new(self.average, self.burst);
        r.source_header = self.source_header.as_deref().map(header_name).transpose()?;
        r.strategy = self.ip_strategy.as_ref().map(|s| s.build()).transpose()?;
        if let Some(c) = &self.redis {
            if !(1..=10_000).contains(&c.timeout_ms) {
                return Err(BuildError::OutOfRange {
                    field: "redis.timeout_ms",
                    bound: "1 ..= 10000",
                });
            }
            let client = redis::Client::open(c.url.as_str()).map_err(|_| BuildError::Expected {
                field: "redis.url",
                // The URL may hold a password: it is not repeated.
                value: String::new(),
                expected: "redis://[user:password@]host:port/db",
            })?;
            r.store = Store::Redis(Box::new(RedisBuckets {
                client,
                key_prefix: format!("{}{name}:", c.prefix),
                name: name.to_string(),
                on_error: c.on_error,
                timeout: std::time::Duration::from_millis(c.timeout_ms),
                conn: Mutex::new(None),
                last_connect: Mutex::new(None),
                last_warning: Mutex::new(None),
            }));
        }
        Ok(r)
    }
}

/// Counts the decisions Redis could not make, by what the request got.
pub static STORE_ERRORS: std::sync::LazyLock<prometheus::IntCounterVec> =
    std::sync::LazyLock::new(|| {
        prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "lb_rate_limit_store_errors_total",
                "Rate-limit decisions Redis could not make in time, by middleware and what the \
                 request got (allowed: on_error = open; refused: closed)",
            ),
            &["middleware", "outcome"],
        )
        .unwrap_or_else(|_| panic!("static metric definition"))
    });

/// The token bucket of [`Bucket::take`], in Redis, atomic: refill for the time since the last
/// call (Redis's clock, one for the cluster; or ARGV[3] in µs, for tests), then take a token if
/// there is one. The key expires once the bucket would be full again.
const TAKE_SCRIPT: &str = r#"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now
if ARGV[3] then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local b = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens = tonumber(b[1])
local at = tonumber(b[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
local dt = now - at
if dt < 0 then dt = 0 end
tokens = math.min(burst, tokens + dt * rate / 1000000)
local ok = 0
if tokens >= 1 then
  tokens = tokens - 1
  ok = 1
end
if now > at then at = now end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'at', string.format('%d', at))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return ok
"#;

/// Where a rate limit keeps its buckets.
enum Store {
    Local(Mutex<Buckets>),
    Redis(Box<RedisBuckets>),
}

/// Buckets in Redis, reached over one multiplexed connection made when first needed and again
/// after it failed (at most every 500 ms: a Redis that is down is not asked on every request).
pub struct RedisBuckets {
    client: redis::Client,
    key_prefix: String,
    name: String,
    on_error: RateLimitFailure,
    timeout: std::time::Duration,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
    last_connect: Mutex<Option<Instant>>,
    last_warning: Mutex<Option<Instant>>,
}

impl RedisBuckets {
    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        if let Some(c) = self.conn.lock().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        {
            let now = crate::clock::now();
            let mut last = self
                .last_connect
                .lock()
                .map_err(|_| "poisoned".to_string())?;
            if last.is_some_and(|t| now.saturating_duration_since(t).as_millis() < 500) {
                return Err("Redis unreachable (reconnecting)".into());
            }
            *last = Some(now);
        }
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        let c = tokio::time::timeout(
            self.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&cfg),
        )
        .await
        .map_err(|_| "connecting to Redis: timed out".to_string())?
        .map_err(|e| format!("connecting to Redis: {e}"))?;
        if let Ok(mut slot) = self.conn.lock() {
            *slot = Some(c.clone());
        }
        Ok(c)
    }

    /// Takes a token from `key`'s bucket: whether there was one. `now_us`: the clock to use
    /// instead of Redis's (tests).
    pub async fn take(
        &self,
        key: u64,
        average: f64,
        burst: f64,
        now_us: Option<u64>,
    ) -> Result<bool, String> {
        let sha = script_sha();
        let work = async {
            let mut c = self.connection().await?;
            let bucket = format!("{}{key:016x}", self.key_prefix);
            let call = |script: bool| {
                let mut cmd = if script {
                    let mut cmd = redis::cmd("EVAL");
                    cmd.arg(TAKE_SCRIPT);
                    cmd
                } else {
                    let mut cmd = redis::cmd("EVALSHA");
                    cmd.arg(&sha);
                    cmd
                };
                cmd.arg(1).arg(&bucket).arg(average).arg(burst);
                if let Some(t) = now_us {
                    cmd.arg(t);
                }
                cmd
            };
            let first: Result<i64, redis::RedisError> = call(false).query_async(&mut c).await;
            let took = match first {
                // Not cached on this server yet (or it restarted): EVAL caches it.
                Err(e) if e.code() == Some("NOSCRIPT") => call(true).query_async(&mut c).await,
                other => other,
            };
            took.map(|n| n == 1).map_err(|e| {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    if let Ok(mut slot) = self.conn.lock() {
                        *slot = None;
                    }
                }
                format!("Redis: {e}")
            })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| format!("Redis: no answer within {:?}", self.timeout))?
    }

    /// Redis could not decide: what `on_error` says, counted, and logged at most every 10 s.
    fn failed(&self, why: &str) -> Option<Response<Body>> {
        let outcome = match self.on_error {
            RateLimitFailure::Open => "allowed",
            RateLimitFailure::Closed => "refused",
        };
        STORE_ERRORS
            .with_label_values(&[self.name.as_str(), outcome])
            .inc();
        let now = crate::clock::now();
        if let Ok(mut last) = self.last_warning.lock() {
            if last.is_none_or(|t| now.saturating_duration_since(t).as_secs() >= 10) {
                *last = Some(now);
                tracing::warn!(
                    middleware = self.name,
                    "rate limit: {why}; requests {outcome}"
                );
            }
        }
        match self.on_error {
            RateLimitFailure::Open => None,
            RateLimitFailure::Closed => {
                let mut r = answer(StatusCode::SERVICE_UNAVAILABLE, "rate limit unavailable");
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Some(r)
            }
        }
    }
}

/// The script's SHA-1, as EVALSHA names it.
fn script_sha() -> String {
    static SHA: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let d = ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            TAKE_SCRIPT.as_bytes(),
        );
        d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    });
    SHA.clone()
}

/// One case of the limiter's contract: its `average` and `burst`, and decisions in order —
/// (client key, milliseconds since the start, allowed).
pub struct BucketCase {
    pub what: &'static str,
    pub average: f64,
    pub burst: f64,
    pub steps: &'static [(u64, u64, bool)],
}

/// The contract, one table for every store: the in-memory limiter's unit test and the Redis
/// store's test against a real server both run it.
pub const BUCKET_CASES: &[BucketCase] = &[
    BucketCase {
        what: "a burst, then the average",
        average: 10.0,
        burst: 5.0,
        steps: &[
            (1, 0, true),
            (1, 0, true),
            (1, 0, true),
            (1, 0, true),
            (1, 0, true),
            (1, 0, false),
            (1, 0, false),
            (1, 100, true),
            (1, 110, false),
        ],
    },
    BucketCase {
        what: "each client its own bucket",
        average: 10.0,
        burst: 2.0,
        steps: &[
            (1, 0, true),
            (1, 0, true),
            (1, 0, false),
            (2, 0, true),
            (2, 0, true),
            (2, 0, false),
            (1, 100, true),
            (2, 50, false),
        ],
    },
    BucketCase {
        what: "refilled up to the burst, never past it",
        average: 1.0,
        burst: 3.0,
        steps: &[
            (1, 0, true),
            (1, 0, true),
            (1, 0, true),
            (1, 0, false),
            (1, 10_000, true),
            (1, 10_000, true),
            (1, 10_000, true),
            (1, 10_000, false),
        ],
    },
    BucketCase {
        what: "fractions of a token add up",
        average: 4.0,
        burst: 1.0,
        steps: &[
            (1, 0, true),
            (1, 100, false),
            (1, 200, false),
            (1, 300, true),
            (1, 310, false),
            (1, 560, true),
        ],
    },
    BucketCase {
        what: "a burst below one is one",
        average: 2.0,
        burst: 0.0,
        steps: &[(1, 0, true), (1, 0, false), (1, 400, false), (1, 600, true)],
    },
];

fn too_many() -> Response<Body> {
    let mut r = answer(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Token buckets per client key; over the limit: 429. The bucket map is bounded: when it is
/// full, buckets idle long enough to be full again are dropped (they would allow a burst anyway).
pub struct RateLimit {
    average: f64,
    burst: f64,
    source_header: Option<HeaderName>,
    strategy: Option<IpStrategy>,
    /// By a hash of the key: fixed-size entries whatever clients send.
    store: Store,
}

#[derive(Default)]
struct Buckets {
    map: HashMap<u64, Bucket>,
    /// When full buckets were last swept out (at most once a second: a sweep costs O(n)).
    swept: Option<Instant>,
}

const MAX_BUCKETS: usize = 100_000;

impl RateLimit {
    pub fn new(average: f64, burst: f64) -> RateLimit {
        RateLimit {
            average,
            burst: burst.max(1.0),
            source_header: None,
            strategy: None,
            store: Store::Local(Mutex::new(Buckets::default())),
        }
    }

    /// The Redis store, when the buckets are there.
    pub fn redis(&self) -> Option<&RedisBuckets> {
        match &self.store {
            Store::Redis(r) => Some(r),
            Store::Local(_) => None,
        }
    }

    /// A decision with the clock given: this process's (`now`) for local buckets, `now` as µs
    /// since a fixed point for Redis ones (tests run one table of cases through both).
    pub async fn allow_at(&self, key: u64, now: Instant, redis_us: u64) -> Result<bool, String> {
        match &self.store {
            Store::Local(_) => Ok(self.allow(key, now)),
            Store::Redis(r) => r.take(key, self.average, self.burst, Some(redis_us)).await,
        }
    }

    /// Local buckets only (Redis ones always allow here: see [`RateLimit::allow_at`]).
    pub fn allow(&self, key: u64, now: Instant) -> bool {
        let Store::Local(buckets) = &self.store else {
            return true;
        };
        let Ok(mut guard) = buckets.lock() else {
            return true;
        };
        let b = &mut *guard;
        if b.map.len() >= MAX_BUCKETS && !b.map.contains_key(&key) {
            let due = b
                .swept
                .is_none_or(|t| now.saturating_duration_since(t).as_secs() >= 1);
            if due {
                let full_after = self.burst / self.average.max(f64::MIN_POSITIVE);
                b.map
                    .retain(|_, v| now.saturating_duration_since(v.at).as_secs_f64() < full_after);
                b.swept = Some(now);
            }
            // Still full (a flood of new keys): one goes, whichever — the map stays bounded.
            if b.map.len() >= MAX_BUCKETS {
                if let Some(k) = b.map.keys().next().copied() {
                    b.map.remove(&k);
                }
            }
        }
        let burst = self.burst;
        b.map
            .entry(key)
            .or_insert(Bucket {
                tokens: burst,
                at: now,
            })
            .take(self.average, burst, now)
    }

    fn key(&self, ctx: &Ctx, req: &Req) -> u64 {
        let by_header = self
            .source_header
            .as_ref()
            .and_then(|h| req.headers().get(h));
        match by_header {
            Some(v) => xxhash_rust::xxh3::xxh3_64_with_seed(v.as_bytes(), 1),
            None => match client_of(self.strategy.as_ref(), ctx, req) {
                Some(IpAddr::V4(a)) => xxhash_rust::xxh3::xxh3_64(&a.octets()),
                Some(IpAddr::V6(a)) => xxhash_rust::xxh3::xxh3_64(&a.octets()),
                // No address the strategy believes: one bucket for all such requests.
                None => xxhash_rust::xxh3::xxh3_64_with_seed(b"", 2),
            },
        }
    }
}

impl Middleware for RateLimit {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let key = self.key(ctx, req);
        if let Store::Redis(r) = &self.store {
            return Flow::Wait(Box::pin(async move {
                match r.take(key, self.average, self.burst, None).await {
                    Ok(true) => None,
                    Ok(false) => Some(too_many()),
                    Err(why) => r.failed(&why),
                }
            }));
        }
        if self.allow(key, ctx.now) {
            return Flow::Next;
        }
        Flow::Answer(too_many())
    }
}

impl InFlightReqConfig {
    pub fn build(&self) -> Result<InFlightReq, BuildError> {
        if self.amount == 0 {
            return Err(BuildError::OutOfRange {
                field: "amount",
                bound: "≥ 1",
            });
        }
        let header = match (self.per, &self.source_header) {
            (crate::model::middleware::InFlightPer::Header, Some(h)) => Some(header_name(h)?),
            (crate::model::middleware::InFlightPer::Header, None) => {
                return Err(BuildError::OutOfRange {
                    field: "source_header",
                    bound: "required with per = \"header\"",
                })
            }
            _ => None,
        };
        Ok(InFlightReq {
            amount: self.amount,
            per: self.per,
            header,
            strategy: self.ip_strategy.as_ref().map(|s| s.build()).transpose()?,
            current: Arc::new(AtomicU64::new(0)),
            by_source: Arc::default(),
        })
    }
}

/// At most `amount` requests in flight, of the router or of each source; the rest get 429 at
/// once.
pub struct InFlightReq {
    amount: u64,
    per: crate::model::middleware::InFlightPer,
    header: Option<HeaderName>,
    strategy: Option<IpStrategy>,
    current: Arc<AtomicU64>,
    /// Per source: requests in flight by the source's key. An entry lives while its source has
    /// one in flight, so the map is no larger than the requests in flight.
    by_source: Arc<Mutex<HashMap<u64, u64>>>,
}

struct Slot(Arc<AtomicU64>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct SourceSlot(Arc<Mutex<HashMap<u64, u64>>>, u64);

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl Middleware for InFlightReq {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        use crate::model::middleware::InFlightPer;
        let refuse = || {
            Flow::Answer(answer(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests in flight",
            ))
        };
        if self.per == InFlightPer::Router {
            if self.current.fetch_add(1, Ordering::SeqCst) >= self.amount {
                self.current.fetch_sub(1, Ordering::SeqCst);
                return refuse();
            }
            ctx.guards.push(Box::new(Slot(self.current.clone())));
            return Flow::Next;
        }
        let key = source_key(self.header.as_ref(), self.strategy.as_ref(), ctx, req);
        {
            let mut m = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(key).or_insert(0);
            if *n >= self.amount {
                return refuse();
            }
            *n += 1;
        }
        ctx.guards
            .push(Box::new(SourceSlot(self.by_source.clone(), key)));
        Flow::Next
    }
}

/// A request's source, as the limits count it: the header's value when there is one, else
/// the client's address (the one the entry point believes: its peer, or a trusted proxy's
/// word). Keyed, not compared: xxh3 with a per-process seed, so a client cannot aim at
/// another's key.
fn source_key(
    header: Option<&HeaderName>,
    strategy: Option<&IpStrategy>,
    ctx: &Ctx,
    req: &Req,
) -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(crate::clock::random::<u64>);
    match header.and_then(|h| req.headers().get(h)) {
        Some(v) => xxhash_rust::xxh3::xxh3_64_with_seed(v.as_bytes(), seed ^ 1),
        None => match client_of(strategy, ctx, req) {
            Some(IpAddr::V4(a)) => xxhash_rust::xxh3::xxh3_64_with_seed(&a.octets(), seed),
            Some(IpAddr::V6(a)) => xxhash_rust::xxh3::xxh3_64_with_seed(&a.octets(), seed),
            None => xxhash_rust::xxh3::xxh3_64_with_seed(b"", seed ^ 2),
        },
    }
}

impl BufferingConfig {
    pub fn build(&self) -> Result<Buffering, BuildError> {
        Ok(Buffering {
            max_request: usize::try_from(self.max_request_body_bytes).unwrap_or(usize::MAX),
            max_response: usize::try_from(self.max_response_body_bytes).unwrap_or(usize::MAX),
        })
    }
}

/// Reads the whole request body before the upstream is chosen (a slow client then ties up no
/// upstream connection, and the body can be sent again on a retry), and the whole response
/// before the client gets it, each within its limit.
pub struct Buffering {
    max_request: usize,
    max_response: usize,
}

fn limit(max: usize) -> usize {
    if max == 0 {
        usize::MAX
    } else {
        max
    }
}

impl Buffering {
    async fn read_request(&self, ctx: &mut Ctx, req: &mut Req) -> Option<Response<Body>> {
        let max = limit(self.max_request);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Some(too_large());
        }
        let body = std::mem::replace(req.body_mut(), full(""));
        match super::read_body(body, max).await {
            Ok(bytes) => {
                req.headers_mut().remove(header::TRANSFER_ENCODING);
                req.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                *req.body_mut() = full(bytes.clone());
                ctx.replay = Some(bytes);
                None
            }
            Err(super::ReadError::TooLarge) => Some(too_large()),
            // The client's doing either way: never evidence against the service.
            Err(super::ReadError::Broken(e)) if crate::proxy::limits::is_too_slow(&*e) => {
                let mut r = answer(StatusCode::REQUEST_TIMEOUT, "request body too slow");
                r.extensions_mut().insert(super::ClientFault);
                Some(r)
            }
            Err(super::ReadError::Broken(e)) => {
                tracing::debug!("request body: {e}");
                let mut r = answer(StatusCode::BAD_REQUEST, "incomplete request body");
                r.extensions_mut().insert(super::ClientFault);
                Some(r)
            }
        }
    }

    async fn read_response(&self, resp: &mut Response<Body>) {
        let body = std::mem::replace(resp.body_mut(), full(""));
        match super::read_body(body, limit(self.max_response)).await {
            Ok(bytes) => {
                resp.headers_mut().remove(header::TRANSFER_ENCODING);
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                *resp.body_mut() = full(bytes);
            }
            Err(e) => {
                tracing::warn!("response body: {e:?}");
                *resp = answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "upstream response too large or incomplete",
                );
            }
        }
    }
}

fn too_large() -> Response<Body> {
    let mut r = answer(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    r.extensions_mut().insert(super::ClientFault);
    // The rest of the body is not read: the connection cannot be reused.
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The request was a HEAD: its answer has no body whatever its Content-Length says.
#[derive(Clone, Copy)]
struct Head;

impl Middleware for Buffering {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        if req.method() == hyper::Method::HEAD {
            ctx.notes.insert(Head);
        }
        Flow::Wait(Box::pin(self.read_request(ctx, req)))
    }

    fn response<'a>(
        &'a self,
        ctx: &'a Ctx,
        resp: &'a mut Response<Body>,
    ) -> Option<BoxFuture<'a, ()>> {
        // Nothing to buffer, and a Content-Length written for it would be wrong.
        let s = resp.status();
        if ctx.notes.get::<Head>().is_some()
            || s.is_informational()
            || s == StatusCode::NO_CONTENT
            || s == StatusCode::NOT_MODIFIED
        {
            return None;
        }
        Some(Box::pin(self.read_response(resp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Traefik's ip strategies (middlewares/http/ipallowlist, "ipStrategy"), case by case.
    #[test]
    fn ip_strategies_pick_the_address_traefik_picks() {
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let xff = |v: &str| {
            let mut h = hyper::HeaderMap::new();
            h.insert("x-forwarded-for", v.parse().unwrap());
            h
        };
        let s = |depth, excluded: &[&str], v6: Option<u8>| {
            IpStrategyConfig {
                depth,
                excluded_ips: excluded.iter().map(|e| e.to_string()).collect(),
                ipv6_subnet: v6,
            }
            .build()
            .unwrap()
        };
        let ip = |t: &str| Some(t.parse::<IpAddr>().unwrap());
        let chain = xff("203.0.113.5, 198.51.100.2, 192.0.2.1");
        assert_eq!(s(1, &[], None).client(peer, &chain), ip("192.0.2.1"));
        assert_eq!(s(3, &[], None).client(peer, &chain), ip("203.0.113.5"));
        assert_eq!(
            s(4, &[], None).client(peer, &chain),
            None,
            "beyond the list"
        );
        // Depth wins over excludedIPs.
        assert_eq!(
            s(2, &["198.51.100.0/24"], None).client(peer, &chain),
            ip("198.51.100.2")
        );
        assert_eq!(
            s(0, &["192.0.2.0/24", "198.51.100.2"], None).client(peer, &chain),
            ip("203.0.113.5")
        );
        assert_eq!(
            s(0, &["0.0.0.0/0"], None).client(peer, &chain),
            None,
            "every entry excluded"
        );
        assert_eq!(
            s(0, &["192.0.2.1"], None).client(peer, &xff("junk, 192.0.2.1")),
            None,
            "what is not an address ends the search"
        );
        // No header: the connection's address, or none where proxies are excluded (Traefik's).
        let none = hyper::HeaderMap::new();
        assert_eq!(s(0, &["192.0.2.1"], None).client(peer, &none), None);
        assert_eq!(s(1, &[], None).client(peer, &none), None);
        assert_eq!(s(0, &[], None).client(peer, &chain), Some(peer));
        // Several header lines read as one list; IPv6 keyed by its prefix; v4-mapped is v4.
        let mut two = xff("203.0.113.5");
        two.append("x-forwarded-for", "2001:db8:1:2::7".parse().unwrap());
        assert_eq!(s(1, &[], Some(64)).client(peer, &two), ip("2001:db8:1:2::"));
        assert_eq!(s(2, &[], Some(64)).client(peer, &two), ip("203.0.113.5"));
        assert_eq!(
            s(1, &[], None).client(peer, &xff("::ffff:192.0.2.1")),
            ip("192.0.2.1")
        );
        for bad in [0, 129] {
            assert!(IpStrategyConfig {
                ipv6_subnet: Some(bad),
                ..Default::default()
            }
            .build()
            .is_err());
        }
    }

    /// The contract's table on the in-memory buckets (tests/tests/rate_limit.rs runs it on
    /// Redis's).
    #[test]
    fn the_bucket_cases_hold_in_memory() {
        for case in BUCKET_CASES {
            let rl = RateLimit::new(case.average, case.burst);
            let t0 = crate::clock::now();
            for (i, &(key, ms, want)) in case.steps.iter().enumerate() {
                let got = rl.allow(key, t0 + Duration::from_millis(ms));
                assert_eq!(got, want, "{}: step {i}", case.what);
            }
        }
    }

    #[test]
    fn token_bucket_allows_burst_then_average() {
        let t0 = crate::clock::now();
        let rl = RateLimit::new(10.0, 5.0);
        let first: Vec<bool> = (0..7).map(|_| rl.allow(1, t0)).collect();
        assert_eq!(
            first,
            vec![true, true, true, true, true, false, false],
            "burst of 5"
        );
        assert!(
            rl.allow(1, t0 + Duration::from_millis(100)),
            "one token after 100 ms at 10/s"
        );
        assert!(!rl.allow(1, t0 + Duration::from_millis(110)));
        assert!(rl.allow(2, t0), "buckets are per client");
    }
}
