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
    BufferingConfig, InFlightReqConfig, IpAllowListConfig, RateLimitConfig,
};
use crate::proxy::Body;

impl IpAllowListConfig {
    pub fn build(&self) -> Result<IpAllowList, BuildError> {
        let ranges = self
            .source_range
            .iter()
            .map(|r| {
                r.parse::<IpNet>()
                    .or_else(|_| r.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| BuildError::Expected {
                        field: "source_range",
                        value: r.clone(),
                        expected: "an address or a CIDR",
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(IpAllowList { ranges })
    }
}

/// Only clients from these ranges; others get 403.
pub struct IpAllowList {
    ranges: Vec<IpNet>,
}

impl Middleware for IpAllowList {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, _: &'a mut Req) -> Flow<'a> {
        if self.ranges.iter().any(|n| n.contains(&ctx.client_ip)) {
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
        if self.average <= 0.0 || self.average.is_nan() {
            return Err(BuildError::OutOfRange {
                field: "average",
                bound: "> 0",
            });
        }
        let mut r = RateLimit::new(self.average, self.burst);
        r.source_header = self.source_header.as_deref().map(header_name).transpose()?;
        Ok(r)
    }
}

/// Token buckets per client key; over the limit: 429. The bucket map is bounded: when it is
/// full, buckets idle long enough to be full again are dropped (they would allow a burst anyway).
pub struct RateLimit {
    average: f64,
    burst: f64,
    source_header: Option<HeaderName>,
    /// By a hash of the key: fixed-size entries whatever clients send.
    buckets: Mutex<Buckets>,
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
            buckets: Mutex::new(Buckets::default()),
        }
    }

    pub fn allow(&self, key: u64, now: Instant) -> bool {
        let Ok(mut guard) = self.buckets.lock() else {
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
            None => match ctx.client_ip {
                IpAddr::V4(a) => xxhash_rust::xxh3::xxh3_64(&a.octets()),
                IpAddr::V6(a) => xxhash_rust::xxh3::xxh3_64(&a.octets()),
            },
        }
    }
}

impl Middleware for RateLimit {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        if self.allow(self.key(ctx, req), ctx.now) {
            return Flow::Next;
        }
        let mut r = answer(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        Flow::Answer(r)
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
        Ok(InFlightReq {
            amount: self.amount,
            current: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// At most `amount` requests of this router in flight; the rest get 429 at once.
pub struct InFlightReq {
    amount: u64,
    current: Arc<AtomicU64>,
}

struct Slot(Arc<AtomicU64>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Middleware for InFlightReq {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, _: &'a mut Req) -> Flow<'a> {
        if self.current.fetch_add(1, Ordering::SeqCst) >= self.amount {
            self.current.fetch_sub(1, Ordering::SeqCst);
            return Flow::Answer(answer(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests in flight",
            ));
        }
        ctx.guards.push(Box::new(Slot(self.current.clone())));
        Flow::Next
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
