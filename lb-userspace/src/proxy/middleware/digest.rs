//! HTTP Digest authentication (RFC 7616, MD5 with `qop=auth`), as Traefik's `digestAuth` and
//! every browser and curl speak it.
//!
//! Nonces are lb's own, never stored: the time they were made and an HMAC of it under a key
//! drawn at start, so any node restart makes clients authenticate again (answered `stale`). A
//! nonce is good for [`NONCE_LIFE`]; within it each use must carry a higher `nc` than the last
//! one seen, so a captured request cannot be replayed. The digest must be for the request's own
//! method and target. The header is parsed strictly and bounded; the upstream never sees it.
//!
//! ```toml
//! [[middleware]]
//! name = "staff"
//! digest_auth = { users = ["alice:staff:2f9c1d…"], realm = "staff" }
//! ```

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, UNIX_EPOCH},
};

use hyper::{
    header::{self, HeaderName, HeaderValue},
    StatusCode,
};
use md5::{Digest as _, Md5};

use super::{answer, header_name, BuildError, Ctx, Flow, Middleware, Req};
use crate::model::middleware::DigestAuthConfig;
use crate::proxy::Body;

/// How long a nonce is accepted after lb made it.
pub const NONCE_LIFE: Duration = Duration::from_secs(300);
/// Nonces whose last `nc` is remembered; beyond it the expired ones go, then all (clients are
/// then asked again, `stale`).
const MAX_NONCES: usize = 10_000;
/// An `Authorization: Digest …` longer than this is refused unread.
const MAX_HEADER: usize = 4096;

impl DigestAuthConfig {
    pub fn build(&self) -> Result<DigestAuth, BuildError> {
        let mut users = HashMap::new();
        for u in &self.users {
            let mut parts = u.splitn(3, ':');
            let (Some(user), Some(realm), Some(ha1)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(BuildError::Expected {
                    field: "users",
                    value: u.split(':').next().unwrap_or("").to_string(),
                    expected: "user:realm:HA1 (htdigest's lines)",
                });
            };
            let ha1 = ha1.trim().to_ascii_lowercase();
            if ha1.len() != 32 || !ha1.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(BuildError::Expected {
                    field: "users",
                    value: user.to_string(),
                    expected: "an HA1 of 32 hex digits (MD5 of user:realm:password)",
                });
            }
            // htdigest files hold several realms: this middleware's lines only.
            if realm == self.realm {
                users.insert(user.to_string(), ha1);
            }
        }
        if users.is_empty() {
            return Err(BuildError::Empty("users (of this realm)"));
        }
        if self.realm.contains('"') || self.realm.contains('\\') {
            return Err(BuildError::Expected {
                field: "realm",
                value: self.realm.clone(),
                expected: "no quotes or backslashes",
            });
        }
        let mut key = [0u8; 32];
        for chunk in key.chunks_mut(8) {
            chunk.copy_from_slice(&crate::clock::random::<u64>().to_le_bytes());
        }
        Ok(DigestAuth {
            users,
            realm: self.realm.clone(),
            header_field: self.header_field.as_deref().map(header_name).transpose()?,
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            seen: Mutex::new(HashMap::new()),
        })
    }
}

pub struct DigestAuth {
    /// user → HA1 (lowercase hex).
    users: HashMap<String, String>,
    realm: String,
    header_field: Option<HeaderName>,
    key: ring::hmac::Key,
    /// nonce → the highest `nc` used with it.
    seen: Mutex<HashMap<String, u32>>,
}

fn md5_hex(parts: &[&str]) -> String {
    let mut h = Md5::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update(b":");
        }
        h.update(p.as_bytes());
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Equal bytes, in a time that depends only on the length.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn now_secs() -> u64 {
    crate::clock::wall()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Why a request is asked again.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// No credentials, or wrong ones.
    Ask,
    /// A nonce lb made but that has expired (or is forgotten): the client may retry at once.
    Stale,
}

impl DigestAuth {
    fn nonce_at(&self, secs: u64) -> String {
        let tag = ring::hmac::sign(&self.key, &secs.to_be_bytes());
        format!("{secs:x}-{}", hex(&tag.as_ref()[..16]))
    }

    /// Whether lb made `nonce` (`Some(its time)`).
    fn made(&self, nonce: &str) -> Option<u64> {
        let (t, _) = nonce.split_once('-')?;
        if t.is_empty() || t.len() > 16 {
            return None;
        }
        let secs = u64::from_str_radix(t, 16).ok()?;
        same(self.nonce_at(secs).as_bytes(), nonce.as_bytes()).then_some(secs)
    }

    fn challenge(&self, stale: bool) -> hyper::Response<Body> {
        let mut r = answer(StatusCode::UNAUTHORIZED, "authentication required");
        let v = format!(
            "Digest realm=\"{}\", qop=\"auth\", algorithm=MD5, nonce=\"{}\"{}",
            self.realm,
            self.nonce_at(now_secs()),
            if stale { ", stale=true" } else { "" }
        );
        if let Ok(v) = HeaderValue::from_str(&v) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        r
    }

    /// The user, when `value` (the header's) proves the request.
    fn check(&self, value: &str, method: &str, target: &str) -> Result<String, Refusal> {
        let p = params(value).ok_or(Refusal::Ask)?;
        let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let (Some(user), Some(realm), Some(nonce), Some(uri), Some(response)) = (
            get("username"),
            get("realm"),
            get("nonce"),
            get("uri"),
            get("response"),
        ) else {
            return Err(Refusal::Ask);
        };
        let (Some("auth"), Some(nc), Some(cnonce)) = (get("qop"), get("nc"), get("cnonce")) else {
            return Err(Refusal::Ask);
        };
        if get("algorithm").is_some_and(|a| !a.eq_ignore_ascii_case("MD5"))
            || realm != self.realm
            || uri != target
            || nc.len() != 8
            || cnonce.is_empty()
        {
            return Err(Refusal::Ask);
        }
        let count = u32::from_str_radix(nc, 16).map_err(|_| Refusal::Ask)?;
        let made = self.made(nonce).ok_or(Refusal::Ask)?;
        let now = now_secs();
        if now.saturating_sub(made) > NONCE_LIFE.as_secs() || made > now + 60 {
            return Err(Refusal::Stale);
        }
        let ha1 = self.users.get(user).ok_or(Refusal::Ask)?;
        let ha2 = md5_hex(&[method, uri]);
        let want = md5_hex(&[ha1, nonce, nc, cnonce, "auth", &ha2]);
        if !same(want.as_bytes(), response.to_ascii_lowercase().as_bytes()) {
            return Err(Refusal::Ask);
        }
        // Proven: the count must move on, or this is a replay.
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_NONCES && !seen.contains_key(nonce) {
            seen.retain(|n, _| {
                self.made(n)
                    .is_some_and(|t| now.saturating_sub(t) <= NONCE_LIFE.as_secs())
            });
            if seen.len() >= MAX_NONCES {
                seen.clear();
            }
        }
        let last = seen.entry(nonce.to_string()).or_insert(0);
        if count <= *last {
            return Err(Refusal::Stale);
        }
        *last = count;
        Ok(user.to_string())
    }
}

/// `Digest k=v, k="v", …` as (lowercase key, value); `None` when it is not that.
fn params(value: &str) -> Option<Vec<(String, String)>> {
    if value.len() > MAX_HEADER {
        return None;
    }
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("digest") {
        return None;
    }
    let mut out = Vec::new();
    let b = rest.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i] == b' ' || b[i] == b',' || b[i] == b'\t') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'-' || b[i] == b'_') {
            i += 1;
        }
        let key = rest[start..i].to_ascii_lowercase();
        if key.is_empty() || b.get(i) != Some(&b'=') || out.len() >= 16 {
            return None;
        }
        i += 1;
        let mut val = String::new();
        if b.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match b.get(i)? {
                    b'"' => {
                        i += 1;
                        break;
                    }
                    b'\\' => {
                        val.push(char::from(*b.get(i + 1)?));
                        i += 2;
                    }
                    c => {
                        val.push(char::from(*c));
                        i += 1;
                    }
                }
            }
        } else {
            let s = i;
            while i < b.len() && b[i] != b',' && b[i] != b' ' {
                i += 1;
            }
            val.push_str(&rest[s..i]);
        }
        // A key twice would let one copy be checked and the other used.
        if out.iter().any(|(k, _)| *k == key) {
            return None;
        }
        out.push((key, val));
    }
    Some(out)
}

impl Middleware for DigestAuth {
    fn request<'a>(&'a self, _: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let target = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(value) = header else {
            return Flow::Answer(self.challenge(false));
        };
        match self.check(value, req.method().as_str(), &target) {
            Ok(user) => {
                // The upstream never sees the credentials.
                req.headers_mut().remove(header::AUTHORIZATION);
                if let (Some(h), Ok(v)) = (&self.header_field, HeaderValue::from_str(&user)) {
                    req.headers_mut().insert(h.clone(), v);
                }
                Flow::Next
            }
            Err(r) => Flow::Answer(self.challenge(r == Refusal::Stale)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> DigestAuth {
        // htdigest -c users staff alice (password "s3cret").
        let ha1 = md5_hex(&["alice", "staff", "s3cret"]);
        DigestAuthConfig {
            users: vec![format!("alice:staff:{ha1}"), format!("bob:other:{ha1}")],
            realm: "staff".into(),
            header_field: None,
        }
        .build()
        .unwrap()
    }

    fn header(a: &DigestAuth, user: &str, pass: &str, nonce: &str, nc: &str, uri: &str) -> String {
        let ha1 = md5_hex(&[user, &a.realm, pass]);
        let ha2 = md5_hex(&["GET", uri]);
        let resp = md5_hex(&[&ha1, nonce, nc, "abc", "auth", &ha2]);
        format!(
            "Digest username=\"{user}\", realm=\"{}\", nonce=\"{nonce}\", uri=\"{uri}\", \
             algorithm=MD5, qop=auth, nc={nc}, cnonce=\"abc\", response=\"{resp}\"",
            a.realm
        )
    }

    #[test]
    fn a_digest_is_checked_against_the_request_and_never_replayed() {
        let a = auth();
        let nonce = a.nonce_at(now_secs());
        let ok = header(&a, "alice", "s3cret", &nonce, "00000001", "/a?b=1");
        assert_eq!(a.check(&ok, "GET", "/a?b=1"), Ok("alice".into()));
        // The same request again (a replay), and one with a count not above the last.
        assert_eq!(a.check(&ok, "GET", "/a?b=1"), Err(Refusal::Stale));
        let next = header(&a, "alice", "s3cret", &nonce, "00000002", "/a?b=1");
        assert_eq!(a.check(&next, "GET", "/a?b=1"), Ok("alice".into()));
        // For another target or method, a wrong password, another realm's user, a forged or
        // expired nonce.
        let more = header(&a, "alice", "s3cret", &nonce, "00000003", "/a?b=1");
        assert_eq!(a.check(&more, "GET", "/other"), Err(Refusal::Ask));
        assert_eq!(a.check(&more, "POST", "/a?b=1"), Err(Refusal::Ask));
        let wrong = header(&a, "alice", "guess", &nonce, "00000004", "/");
        assert_eq!(a.check(&wrong, "GET", "/"), Err(Refusal::Ask));
        let bob = header(&a, "bob", "s3cret", &nonce, "00000001", "/");
        assert_eq!(a.check(&bob, "GET", "/"), Err(Refusal::Ask));
        let forged = header(&a, "alice", "s3cret", "5f5e100-00", "00000001", "/");
        assert_eq!(a.check(&forged, "GET", "/"), Err(Refusal::Ask));
        let old = a.nonce_at(now_secs() - NONCE_LIFE.as_secs() - 5);
        let expired = header(&a, "alice", "s3cret", &old, "00000001", "/");
        assert_eq!(a.check(&expired, "GET", "/"), Err(Refusal::Stale));
    }

    #[test]
    fn the_header_is_read_strictly() {
        let a = auth();
        let nonce = a.nonce_at(now_secs());
        let ok = header(&a, "alice", "s3cret", &nonce, "00000001", "/");
        for bad in [
            ok.replacen("qop=auth", "qop=auth-int", 1),
            ok.replacen("nc=00000001", "nc=1", 1),
            ok.replacen("algorithm=MD5", "algorithm=SHA-256", 1),
            format!("{ok}, realm=\"staff\""),
            ok.replacen("Digest ", "Basic ", 1),
            ok.replacen("response=\"", "response=\"x", 1),
            format!("Digest {}", "a=b, ".repeat(2000)),
            "Digest username=\"alice".into(),
        ] {
            assert_eq!(a.check(&bad, "GET", "/"), Err(Refusal::Ask), "{bad}");
        }
        let p = params(r#"Digest a="x\"y", b=tok, c="""#).unwrap();
        assert_eq!(
            p,
            [
                ("a".to_string(), "x\"y".to_string()),
                ("b".into(), "tok".into()),
                ("c".into(), "".into())
            ]
        );
    }
}
