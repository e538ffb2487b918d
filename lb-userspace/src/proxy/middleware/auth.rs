//! Who may pass: HTTP Basic against password hashes, API keys against their digests, or an
//! external service asked per request (ForwardAuth). Secrets are never configured in plain text.
//!
//! ```toml
//! [[middleware]]
//! name = "staff"
//! basic_auth = { users = ["alice:$2y$05$…"], realm = "staff", header_field = "X-User" }
//! [[middleware]]
//! name = "keys"
//! api_key = { keys = ["sha256:5e8848…"], header = "X-API-Key", query = "api_key" }
//! [[middleware]]
//! name = "sso"
//! forward_auth = { address = "http://127.0.0.1:9091/verify", auth_response_headers = ["X-User"] }
//! ```
//! An API key's digest is `printf %s "$KEY" | sha256sum`.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    header::{self, HeaderName, HeaderValue},
    Request, Response, StatusCode, Uri,
};

use super::{answer, full, header_name, BuildError, Ctx, Flow, Middleware, Req};
pub use crate::model::middleware::weak_hash;
use crate::proxy::{client::UpstreamClient, Body, BoxError};

impl BasicAuthConfig {
    pub fn build(&self) -> Result<BasicAuth, BuildError> {
        let mut auth = BasicAuth::new(&self.users, &self.realm)?;
        auth.header_field = self.header_field.as_deref().map(header_name).transpose()?;
        Ok(auth)
    }
}

/// HTTP Basic authentication against bcrypt (`$2…`) or argon2 (`$argon2…`) hashes, and the
/// weak ones htpasswd and Traefik's documentation still produce (`$apr1$`, `{SHA}`), accepted
/// with a warning ([`weak_hash`]); plain-text passwords are refused when the configuration is
/// loaded.
pub struct BasicAuth {
    /// user → hash.
    users: HashMap<String, Arc<str>>,
    /// What an unknown user's password is checked against, its result thrown away: the first
    /// configured user's hash, so an unknown name costs exactly the time of a known one (same
    /// algorithm, same cost) and the answer's timing does not tell which names exist.
    decoy: Option<Arc<str>>,
    realm: String,
    header_field: Option<HeaderName>,
}

/// How many password hashes are checked at once, across every `basic_auth`: one per CPU, at
/// least 2 and at most 8. A check is milliseconds of CPU by design, so more at once only adds
/// latency, and without a bound a flood of guesses would grow tokio's blocking pool (up to 512
/// threads) and starve everything else that needs it.
fn verify_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

static VERIFY: LazyLock<Arc<tokio::sync::Semaphore>> =
    LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(verify_slots())));

/// How long a request waits for a free slot before it is answered 503 (with `Retry-After`).
const VERIFY_WAIT: Duration = Duration::from_secs(2);

/// A password check on the bounded pool: `None` when no slot freed up in time. The slot is held
/// by a task of its own until the hash is done, even when the client goes away first: the CPU
/// is spent either way, so it must count against the bound.
async fn verify_bounded(hash: Arc<str>, password: String) -> Option<bool> {
    let permit = tokio::time::timeout(VERIFY_WAIT, VERIFY.clone().acquire_owned())
        .await
        .ok()?
        .ok()?;
    let task = tokio::spawn(async move {
        let ok = tokio::task::spawn_blocking(move || verify_hash(&hash, &password))
            .await
            .unwrap_or(false);
        drop(permit);
        ok
    });
    Some(task.await.unwrap_or(false))
}

impl BasicAuth {
    pub fn new(users: &[String], realm: &str) -> Result<BasicAuth, BuildError> {
        let mut map = HashMap::new();
        for u in users {
            let (name, hash) = u.split_once(':').ok_or_else(|| BuildError::Expected {
                field: "users",
                value: u.clone(),
                expected: "user:hash",
            })?;
            if !(hash.starts_with("$2") || hash.starts_with("$argon2") || weak_hash(hash).is_some())
            {
                return Err(BuildError::PlainPassword {
                    user: name.to_string(),
                });
            }
            if let Some(why) = weak_hash(hash) {
                tracing::warn!(
                    user = name,
                    "basic auth: weak password hash accepted: {why}"
                );
            }
            map.insert(name.to_string(), Arc::<str>::from(hash));
        }
        let decoy = users
            .first()
            .and_then(|u| u.split_once(':'))
            .and_then(|(name, _)| map.get(name).cloned());
        Ok(BasicAuth {
            users: map,
            decoy,
            realm: realm.to_string(),
            header_field: None,
        })
    }

    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|hash| verify_hash(hash, password))
    }

    fn busy(&self) -> hyper::Response<Body> {
        let mut r = answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "authentication busy, retry shortly",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }

    fn challenge(&self) -> hyper::Response<Body> {
        let mut r = answer(StatusCode::UNAUTHORIZED, "authentication required");
        if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", self.realm)) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        r
    }
}

/// Apache's MD5-crypt (`$apr1$<salt>$<digest>`): MD5 rounds over the password and salt, as
/// htpasswd -m writes them. Only `digest` is returned, in crypt's base-64.
fn apr1(password: &[u8], salt: &[u8]) -> String {
    use md5::{Digest as _, Md5};
    const MAGIC: &[u8] = b"$apr1$";
    let alt = Md5::new()
        .chain_update(password)
        .chain_update(salt)
        .chain_update(password)
        .finalize();
    let mut ctx = Md5::new()
        .chain_update(password)
        .chain_update(MAGIC)
        .chain_update(salt);
    for chunk in password.chunks(16) {
        ctx.update(&alt[..chunk.len()]);
    }
    let mut n = password.len();
    while n > 0 {
        if n & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update(&password[..1]);
        }
        n >>= 1;
    }
    let mut f = ctx.finalize();
    for i in 0..1000 {
        let mut c = Md5::new();
        if i & 1 == 1 {
            c.update(password);
        } else {
            c.update(f);
        }
        if i % 3 != 0 {
            c.update(salt);
        }
        if i % 7 != 0 {
            c.update(password);
        }
        if i & 1 == 1 {
            c.update(f);
        } else {
            c.update(password);
        }
        f = c.finalize();
    }
    const ITOA64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(22);
    let mut put = |v: u32, n: usize| {
        let mut v = v;
        for _ in 0..n {
            out.push(char::from(ITOA64[(v & 0x3f) as usize]));
            v >>= 6;
        }
    };
    for (a, b, c) in [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)] {
        put(
            (u32::from(f[a]) << 16) | (u32::from(f[b]) << 8) | u32::from(f[c]),
            4,
        );
    }
    put(u32::from(f[11]), 2);
    out
}

/// Equal bytes, in a time that depends only on the length.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a password against a bcrypt or argon2 hash: deliberately slow (milliseconds).
fn verify_hash(hash: &str, password: &str) -> bool {
    if let Some(rest) = hash.strip_prefix("$apr1$") {
        let Some((salt, digest)) = rest.split_once('$') else {
            return false;
        };
        // htpasswd's salts are 8 characters; crypt reads at most 8.
        let salt = &salt.as_bytes()[..salt.len().min(8)];
        return same_bytes(
            apr1(password.as_bytes(), salt).as_bytes(),
            digest.as_bytes(),
        );
    }
    if let Some(b64) = hash.strip_prefix("{SHA}") {
        use base64::Engine as _;
        let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, password.as_bytes());
        let want = base64::engine::general_purpose::STANDARD.encode(d.as_ref());
        return same_bytes(want.as_bytes(), b64.as_bytes());
    }
    if hash.starts_with("$argon2") {
        use argon2::{password_hash::PasswordHash, PasswordVerifier as _};
        return PasswordHash::new(hash).is_ok_and(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        });
    }
    bcrypt::verify(password, hash).unwrap_or(false)
}

impl Middleware for BasicAuth {
    fn request<'a>(&'a self, _: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        use base64::Engine as _;
        let creds = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|b| String::from_utf8(b).ok());
        let Some((user, pass)) = creds
            .as_deref()
            .and_then(|c| c.split_once(':'))
            .map(|(u, p)| (u.to_string(), p.to_string()))
        else {
            return Flow::Answer(self.challenge());
        };
        // An unknown user is checked too (against the decoy), so both take the same time.
        let (hash, known) = match self.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => match &self.decoy {
                Some(d) => (d.clone(), false),
                None => return Flow::Answer(self.challenge()),
            },
        };
        // The hash check takes milliseconds of CPU by design: not on the runtime's threads.
        Flow::Wait(Box::pin(async move {
            let Some(ok) = verify_bounded(hash, pass).await else {
                return Some(self.busy());
            };
            if !(ok && known) {
                return Some(self.challenge());
            }
            // The upstream never sees the password.
            req.headers_mut().remove(header::AUTHORIZATION);
            if let (Some(h), Ok(v)) = (&self.header_field, HeaderValue::from_str(&user)) {
                req.headers_mut().insert(h.clone(), v);
            }
            None
        }))
    }
}

use crate::model::middleware::{ApiKeyConfig, BasicAuthConfig, ForwardAuthConfig};

impl ApiKeyConfig {
    pub fn build(&self) -> Result<ApiKey, BuildError> {
        let digests = self
            .keys
            .iter()
            .map(|k| {
                let hex = k.strip_prefix("sha256:").ok_or(BuildError::PlainKey)?;
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| {
                        hex.get(i..i + 2)
                            .and_then(|b| u8::from_str_radix(b, 16).ok())
                    })
                    .collect::<Option<Vec<u8>>>()
                    .filter(|b| b.len() == 32)
                    .ok_or_else(|| BuildError::Expected {
                        field: "keys",
                        value: k.clone(),
                        expected: "sha256: and 64 hex digits",
                    })?;
                let mut d = [0u8; 32];
                d.copy_from_slice(&bytes);
                Ok(d)
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        if digests.is_empty() {
            return Err(BuildError::Empty("keys"));
        }
        Ok(ApiKey {
            digests,
            header: header_name(&self.header)?,
            query: self.query.clone(),
        })
    }
}

/// A request passes with a key whose SHA-256 is configured. The key is removed before the
/// request is forwarded, and digests are compared in constant time.
pub struct ApiKey {
    digests: Vec<[u8; 32]>,
    header: HeaderName,
    query: Option<String>,
}

fn same(a: &[u8; 32], b: &[u8]) -> bool {
    b.len() == 32 && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiKey {
    fn accepts(&self, key: &str) -> bool {
        let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        // Every digest is compared, so the time does not tell which one matched.
        self.digests
            .iter()
            .fold(false, |ok, k| same(k, d.as_ref()) | ok)
    }
}

impl Middleware for ApiKey {
    fn secret_query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    fn request<'a>(&'a self, _: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let from_header = req
            .headers()
            .get(&self.header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let from_query = self.query.as_ref().and_then(|name| {
            req.uri().query().and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.to_string())
            })
        });
        let ok = from_header.as_deref().is_some_and(|k| self.accepts(k))
            || from_query.as_deref().is_some_and(|k| self.accepts(k));
        if !ok {
            return Flow::Answer(answer(
                StatusCode::UNAUTHORIZED,
                "a valid API key is required",
            ));
        }
        req.headers_mut().remove(&self.header);
        if let (Some(name), Some(q)) = (&self.query, req.uri().query()) {
            let kept: Vec<&str> = q
                .split('&')
                .filter(|kv| kv.split_once('=').map_or(*kv, |(k, _)| k) != name)
                .collect();
            let pq = if kept.is_empty() {
                req.uri().path().to_string()
            } else {
                format!("{}?{}", req.uri().path(), kept.join("&"))
            };
            let mut parts = req.uri().clone().into_parts();
            if let Ok(p) = pq.parse() {
                parts.path_and_query = Some(p);
                if let Ok(u) = Uri::from_parts(parts) {
                    *req.uri_mut() = u;
                }
            }
        }
        Flow::Next
    }
}

impl ForwardAuthConfig {
    pub fn build(&self) -> Result<ForwardAuth, BuildError> {
        let bad_address = || BuildError::Expected {
            field: "address",
            value: self.address.clone(),
            expected: "http://host[:port]/path or https://…",
        };
        let uri: Uri = self.address.parse().map_err(|_| bad_address())?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return Err(bad_address());
        }
        let names = |list: &[String]| {
            list.iter()
                .map(|h| header_name(h))
                .collect::<Result<Vec<_>, _>>()
        };
        // Plain http needs no CA (nor the system's bundle).
        let tls = (uri.scheme_str() == Some("https")).then(|| crate::model::l7::UpstreamTls {
            ca_file: self.ca_file.clone(),
            ..Default::default()
        });
        Ok(ForwardAuth {
            uri,
            trust_forward_header: self.trust_forward_header,
            response_headers: names(&self.auth_response_headers)?,
            request_headers: names(&self.auth_request_headers)?,
            timeout: Duration::from_millis(self.timeout_ms.max(1)),
            client: UpstreamClient::new(&crate::proxy::client::ClientKey {
                tls,
                ..Default::default()
            })
            .map_err(|e| BuildError::Client(format!("{e:#}")))?,
        })
    }
}

/// Asks an authentication service about each request (a GET with the request's headers and
/// `X-Forwarded-Method/-Proto/-Host/-Uri/-For`): a 2xx lets it through, with chosen headers of
/// the answer added; anything else is the answer the client gets. An unreachable service: 502.
pub struct ForwardAuth {
    uri: Uri,
    trust_forward_header: bool,
    response_headers: Vec<HeaderName>,
    request_headers: Vec<HeaderName>,
    timeout: Duration,
    client: UpstreamClient,
}

/// The most of the auth service's refusal body passed on to the client.
const MAX_AUTH_BODY: usize = 64 * 1024;

impl ForwardAuth {
    fn auth_request(&self, ctx: &Ctx, req: &Req) -> Option<Request<Body>> {
        let mut b = Request::get(self.uri.clone());
        let headers = b.headers_mut()?;
        for (k, v) in req.headers() {
            let wanted = self.request_headers.is_empty() || self.request_headers.contains(k);
            let framing = k == header::CONTENT_LENGTH
                || k == header::TRANSFER_ENCODING
                || k == header::CONNECTION
                || k == header::HOST;
            if wanted && !framing {
                headers.append(k.clone(), v.clone());
            }
        }
        let forwarded = [
            ("x-forwarded-method", req.method().as_str().to_string()),
            ("x-forwarded-proto", ctx.scheme.to_string()),
            ("x-forwarded-host", ctx.host.clone()),
            (
                "x-forwarded-uri",
                req.uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/")
                    .to_string(),
            ),
            ("x-forwarded-for", ctx.client_ip.to_string()),
        ];
        for (k, v) in forwarded {
            if self.trust_forward_header && headers.contains_key(k) {
                continue;
            }
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(k, v);
            }
        }
        b.body(full(Bytes::new())).ok()
    }

    async fn check(&self, ctx: &mut Ctx, req: &mut Req) -> Option<Response<Body>> {
        let Some(auth) = self.auth_request(ctx, req) else {
            return Some(answer(StatusCode::BAD_REQUEST, "bad request"));
        };
        let resp = match tokio::time::timeout(self.timeout, self.client.request(auth)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(address = %self.uri, "forward auth: {e}");
                return Some(answer(
                    StatusCode::BAD_GATEWAY,
                    "authentication unavailable",
                ));
            }
            Err(_) => {
                tracing::warn!(address = %self.uri, "forward auth: timed out");
                return Some(answer(
                    StatusCode::BAD_GATEWAY,
                    "authentication unavailable",
                ));
            }
        };
        if resp.status().is_success() {
            for name in &self.response_headers {
                req.headers_mut().remove(name);
                for v in resp.headers().get_all(name) {
                    req.headers_mut().append(name.clone(), v.clone());
                }
            }
            return None;
        }
        // The refusal goes to the client as the auth service wrote it (a login redirect, 401
        // with its challenge, 403), body bounded.
        let (mut parts, body) = resp.into_parts();
        crate::proxy::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::CONTENT_LENGTH);
        let body = super::read_body(
            body.map_err(|e| Box::new(e) as BoxError).boxed(),
            MAX_AUTH_BODY,
        )
        .await
        .unwrap_or_default();
        Some(Response::from_parts(parts, full(body)))
    }
}

impl Middleware for ForwardAuth {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        Flow::Wait(Box::pin(self.check(ctx, req)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::middleware::api_key_header;

    /// The vectors are `openssl passwd -apr1 -salt …` and `openssl dgst -sha1 -binary | base64`.
    #[test]
    fn htpasswd_weak_hashes_verify_and_are_called_weak() {
        for (hash, pass) in [
            ("$apr1$saltsalt$64vPg1.FPS6FtcYJ7Ti1V.", "s3cret"),
            ("$apr1$ab$vZXhMKiOqO1yMl8FLQFrs0", "password"),
            ("{SHA}/vNB+F2HQ559kaLUZbmHHvZrXpg=", "s3cret"),
        ] {
            assert!(verify_hash(hash, pass), "{hash}");
            assert!(!verify_hash(hash, "wrong"), "{hash}");
            assert!(!verify_hash(hash, ""), "{hash}");
            assert!(weak_hash(hash).is_some(), "{hash}");
            let auth = BasicAuth::new(&[format!("alice:{hash}")], "r").expect("accepted");
            assert!(auth.verify("alice", pass));
        }
        assert!(!verify_hash("$apr1$saltsalt", "s3cret"), "no digest");
        assert!(!verify_hash(
            "$apr1$saltsalt$64vPg1.FPS6FtcYJ7Ti1V",
            "s3cret"
        ));
        let long = "x".repeat(40);
        assert!(!verify_hash("$apr1$saltsalt$64vPg1.FPS6FtcYJ7Ti1V.", &long));
        assert!(weak_hash("$2y$05$abc").is_none());
    }

    #[test]
    fn basic_auth_accepts_hashes_only() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new(&[format!("alice:{hash}")], "lb").unwrap();
        assert!(auth.verify("alice", "s3cret"));
        assert!(!auth.verify("alice", "wrong"));
        assert!(!auth.verify("bob", "s3cret"));
        assert!(
            BasicAuth::new(&["alice:s3cret".to_string()], "lb").is_err(),
            "plain text refused"
        );
        use argon2::{password_hash::SaltString, PasswordHasher as _};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let a2 = argon2::Argon2::default()
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        let auth = BasicAuth::new(&[format!("carol:{a2}")], "lb").unwrap();
        assert!(auth.verify("carol", "pw") && !auth.verify("carol", "px"));
    }

    fn request(user: &str, pass: &str) -> Req {
        use base64::Engine as _;
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        Request::get("http://a.test/")
            .header(header::AUTHORIZATION, format!("Basic {creds}"))
            .body(full(Bytes::new()))
            .unwrap()
    }

    /// The middleware's answer: `None` lets the request through.
    async fn run(auth: &BasicAuth, user: &str, pass: &str) -> Option<u16> {
        let mut ctx = Ctx::new(
            "127.0.0.1".parse().unwrap(),
            "http",
            "a.test".into(),
            crate::clock::now(),
        );
        let mut req = request(user, pass);
        let answer = match auth.request(&mut ctx, &mut req) {
            Flow::Next => None,
            Flow::Answer(r) => Some(r.status().as_u16()),
            Flow::Wait(f) => f.await.map(|r| r.status().as_u16()),
        };
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_users_take_as_long_as_known_ones() {
        let hash = bcrypt::hash("s3cret", 8).unwrap();
        let auth = BasicAuth::new(&[format!("alice:{hash}")], "lb").unwrap();
        assert_eq!(run(&auth, "alice", "s3cret").await, None);
        let time = |user: &'static str| {
            let auth = &auth;
            async move {
                let t = crate::clock::now();
                for _ in 0..3 {
                    assert_eq!(run(auth, user, "wrong").await, Some(401), "{user}");
                }
                t.elapsed()
            }
        };
        let known = time("alice").await;
        let unknown = time("mallory").await;
        assert!(
            unknown * 2 > known,
            "an unknown user answers in {unknown:?}, a known one in {known:?}: names can be told apart"
        );
    }

    /// Threads of a runtime of their own, named so only they are counted: tokio keeps an idle
    /// blocking thread for 10 s, so after a burst their number is how many ran at once.
    #[test]
    fn password_checks_run_on_a_bounded_pool() {
        const NAME: &str = "lb-auth-pool-test";
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(NAME)
            .enable_all()
            .build()
            .unwrap();
        let hash = bcrypt::hash("s3cret", 5).unwrap();
        let auth = BasicAuth::new(&[format!("alice:{hash}")], "lb").unwrap();
        let answers = rt.block_on(async {
            let all = (0..64).map(|i| {
                let auth = &auth;
                async move { run(auth, "alice", if i % 2 == 0 { "s3cret" } else { "x" }).await }
            });
            tokio::time::timeout(Duration::from_secs(60), futures_util::future::join_all(all))
                .await
                .expect("every check answered in time")
        });
        let threads = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            // The kernel keeps 15 bytes of a thread's name.
            .filter(|comm| comm.trim() == &NAME[..15])
            .count();
        // 8 checks at most at once, 1 worker, a little slack for a thread about to go idle.
        assert!(threads <= 12, "{threads} threads for 64 concurrent checks");
        assert!(answers
            .iter()
            .all(|a| matches!(a, None | Some(401) | Some(503))));
        assert!(
            answers.iter().filter(|a| a.is_none()).count() > 0,
            "{answers:?}"
        );
        drop(rt);
    }

    #[test]
    fn api_keys_are_digests() {
        // sha256("password")
        let d = "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
        let cfg = ApiKeyConfig {
            keys: vec![d.into()],
            header: api_key_header(),
            query: None,
        };
        let k = cfg.build().unwrap();
        assert!(k.accepts("password"));
        assert!(!k.accepts("passwore") && !k.accepts(""));
        let plain = ApiKeyConfig {
            keys: vec!["password".into()],
            ..cfg.clone()
        };
        assert!(plain.build().is_err(), "plain text refused");
        let short = ApiKeyConfig {
            keys: vec!["sha256:5e88".into()],
            ..cfg
        };
        assert!(short.build().is_err());
    }
}
