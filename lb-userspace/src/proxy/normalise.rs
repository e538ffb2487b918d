//! The normalise phase: one reading of a request's target, made before anything is routed, so
//! that the router, the middlewares and the upstream all see the same host and the same path.
//!
//! A proxy that routes on one reading and forwards another can be walked around: a rule that
//! guards `Host(`admin.test`)` or `PathPrefix(`/admin`)` is bypassed by a target the router reads
//! one way and the upstream another (`GET http://public.test/` with `Host: admin.test`,
//! `/%61dmin`, `//admin`, `/x/../admin`). So the target is rewritten here into the one form lb
//! routes on and forwards, and what has no single safe reading is refused with `400`:
//!
//! - **Host** (RFC 9112 §3.2.2, RFC 9113 §8.3.1): an absolute-form target's authority replaces
//!   `Host`; HTTP/2's `:authority` and a `host` header must agree; two `Host` headers, an
//!   HTTP/1.1 request without one, an authority with userinfo (`admin.test@public.test`) or one
//!   that is not `host[:port]` are refused. The result is written back as the only `Host`, and
//!   the URI keeps only its path and query.
//! - **Path** ([`path`]), Traefik's reading (its `sanitizePath` and strict `encodedCharacters`):
//!   percent-encoded unreserved characters are decoded and other escapes upper-cased (RFC 3986
//!   §2.3, §6.2.2.1), dot segments removed (§5.2.4), duplicate slashes collapsed; an encoded
//!   `/`, `\`, NUL, `;`, `%`, `?` or `#` — which an upstream may decode into a different path than
//!   the one routed — a raw `\` (a separator to some servers) and a broken escape are refused.
//! - **Connection**: headers the client named in `Connection` are removed now (with
//!   `Connection` itself), not after the middlewares, so a client cannot have lb delete the
//!   identity headers an auth middleware adds (`Connection: X-User`).
//! - **Forwarding headers** from a client outside the entry point's trusted proxies are dropped
//!   here too, before a middleware (ForwardAuth) could pass them on as if lb had set them.

use std::borrow::Cow;

use bytes::Bytes;
use hyper::{
    header::{self, HeaderName, HeaderValue},
    http::uri::{Authority, PathAndQuery},
    HeaderMap, Request, Uri, Version,
};

/// Why a request cannot be read one way only (the body of its `400`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    BadEscape,
    /// An escape for a byte that would change the path's structure (or end it) once an
    /// upstream decodes it: `/`, `\`, NUL, `;`, `%`, `?`, `#`.
    Encoded(u8),
    /// A raw backslash: some servers read it as `/`.
    Backslash,
    /// Not a path at all (it must start with `/`).
    NotAbsolute,
}

impl PathError {
    fn reason(self) -> &'static str {
        match self {
            PathError::BadEscape => "bad percent-encoding in the path",
            PathError::Encoded(_) => "encoded reserved character in the path",
            PathError::Backslash => "backslash in the path",
            PathError::NotAbsolute => "the path must start with /",
        }
    }
}

/// Escapes refused, as Traefik's `encodedCharacters` refuses them when strict.
const REFUSED_ESCAPES: [u8; 7] = [b'/', b'\\', 0, b';', b'%', b'?', b'#'];

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether the path is already in normal form: most are, and they cost one scan and no copy.
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') || b.contains(&b'\\') {
        return false;
    }
    // Escapes in normal form: upper-case, of a byte that must stay escaped and may.
    for (i, _) in b.iter().enumerate().filter(|(_, &c)| c == b'%') {
        let upper = |c: Option<&u8>| {
            c.filter(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
                .and_then(|c| hex(*c))
        };
        let (Some(hi), Some(lo)) = (upper(b.get(i + 1)), upper(b.get(i + 2))) else {
            return false;
        };
        let v = hi << 4 | lo;
        if unreserved(v) || REFUSED_ESCAPES.contains(&v) {
            return false;
        }
    }
    // Every segment after a `/`: none empty (but the last, a trailing slash), none `.` or `..`.
    let mut rest = &b[1..];
    loop {
        let (seg, next) = match rest.iter().position(|&c| c == b'/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if seg == b"." || seg == b".." || (seg.is_empty() && next.is_some()) {
            return false;
        }
        match next {
            Some(n) => rest = n,
            None => return true,
        }
    }
}

/// The path lb routes on and forwards: unreserved escapes decoded, other escapes upper-cased,
/// dot segments removed, duplicate slashes collapsed; a trailing slash is kept (Traefik's
/// `/foo/bar//` → `/foo/bar/`). Refuses what an upstream could read as another path.
pub fn path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if is_normal(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Decode first: `%2e%2e` is `..` and must be removed as one.
    let mut decoded: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let v = hi << 4 | lo;
                if REFUSED_ESCAPES.contains(&v) {
                    return Err(PathError::Encoded(v));
                }
                if unreserved(v) {
                    decoded.push(v);
                } else {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    decoded.extend_from_slice(&[b'%', HEX[hi as usize], HEX[lo as usize]]);
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            c => {
                decoded.push(c);
                i += 1;
            }
        }
    }
    // Only ASCII was replaced by ASCII: the bytes are still the UTF-8 they were.
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::BadEscape)?;
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded[1..].split('/') {
        // A path that ends in `/`, `/.` or `/..` names a directory: it keeps its slash.
        trailing = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// One `host[:port]`, `None` when it is not one. Stricter than RFC 3986's reg-name: a name of
/// letters, digits, `-`, `.` and `_`, or a bracketed IPv6 literal, and a numeric port. Nothing
/// else names a host lb could route to, and nothing else needs escaping wherever it is written
/// (a `Forwarded` element, a log line, a redirect).
fn parse_authority(text: &[u8]) -> Option<Authority> {
    let (host, port) = match text.first() {
        Some(b'[') => {
            let end = text.iter().position(|&c| c == b']')?;
            let inner = &text[1..end];
            let literal = !inner.is_empty()
                && inner
                    .iter()
                    .all(|c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.'));
            if !literal {
                return None;
            }
            (&text[..=end], &text[end + 1..])
        }
        _ => match text.iter().position(|&c| c == b':') {
            Some(i) => (&text[..i], &text[i..]),
            None => (text, &text[text.len()..]),
        },
    };
    let name = host.first() == Some(&b'[')
        || (!host.is_empty()
            && host
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_')));
    let port = port.is_empty()
        || port
            .strip_prefix(b":")
            .and_then(|p| std::str::from_utf8(p).ok())
            .is_some_and(|p| p.bytes().all(|c| c.is_ascii_digit()) && p.parse::<u16>().is_ok());
    if !(name && port) {
        return None;
    }
    Authority::from_maybe_shared(Bytes::copy_from_slice(text)).ok()
}

/// The authority the request is for (see the module's doc), or why there is no single one.
fn authority<B>(req: &Request<B>) -> Result<Option<Authority>, Refused> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refused("more than one Host header"));
    }
    // An empty Host says "no authority" (RFC 9112 §3.2): it routes as no host.
    let host = match host.map(HeaderValue::as_bytes).filter(|h| !h.is_empty()) {
        Some(h) => Some(parse_authority(h).ok_or(Refused("bad Host header"))?),
        None => None,
    };
    let target = match req.uri().authority() {
        Some(a) => Some(
            parse_authority(a.as_str().as_bytes())
                .ok_or(Refused("bad authority in the request target"))?,
        ),
        None => None,
    };
    if let Some(s) = req.uri().scheme_str() {
        if !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https") {
            return Err(Refused("request target scheme is not http or https"));
        }
    }
    match req.version() {
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11 => {
            if req.version() == Version::HTTP_11
                && target.is_none()
                && req.headers().get(header::HOST).is_none()
            {
                return Err(Refused("an HTTP/1.1 request needs a Host header"));
            }
            // Absolute form: the target's authority wins, whatever Host says.
            Ok(target.or(host))
        }
        _ => match (target, host) {
            (Some(t), Some(h)) if !t.as_str().eq_ignore_ascii_case(h.as_str()) => {
                Err(Refused(":authority and host disagree"))
            }
            (t, h) => Ok(t.or(h)),
        },
    }
}

/// Removes the headers a `Connection` header names, and `Connection` itself. `Upgrade` stays
/// (the forwarding step decides about upgrades and rewrites both), and so does `Host`, which
/// is the request's and no connection's.
pub fn strip_connection_named(h: &mut HeaderMap) {
    if !h.contains_key(header::CONNECTION) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| *n != header::UPGRADE && *n != header::HOST)
        .collect();
    for n in named {
        h.remove(n);
    }
    h.remove(header::CONNECTION);
}

/// Forwarding headers only a trusted proxy may send: lb sets some itself, middlewares set
/// others (`X-Forwarded-Prefix` by `strip_prefix`, `-Uri` by ForwardAuth), and an upstream
/// believes them all.
const FORWARDING: [HeaderName; 11] = [
    HeaderName::from_static("x-forwarded-tls-client-cert"),
    HeaderName::from_static("x-forwarded-tls-client-cert-info"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-uri"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("forwarded"),
];

/// The request as lb reads it: `Host` set to the one authority (or removed), the URI reduced
/// to its normalised path and query, connection-named headers gone, and, from an untrusted
/// client, no forwarding headers. Returns the host to route on (lowercase, without port).
pub fn request<B>(req: &mut Request<B>, trusted: bool) -> Result<String, Refused> {
    let authority = authority(req)?;
    let pq = req.uri().path_and_query().map(PathAndQuery::as_str);
    let (raw_path, query) = match pq {
        Some(pq) => pq.split_once('?').map_or((pq, None), |(p, q)| (p, Some(q))),
        None => ("/", None),
    };
    let normal = path(raw_path).map_err(|e| Refused(e.reason()))?;
    // Origin form always: no later step can read an authority other than `Host`.
    let rebuilt = req.uri().authority().is_some() || matches!(normal, Cow::Owned(_));
    if rebuilt {
        let text = match query {
            Some(q) => format!("{normal}?{q}"),
            None => normal.into_owned(),
        };
        let pq = PathAndQuery::from_maybe_shared(Bytes::from(text))
            .map_err(|_| Refused("bad request target"))?;
        *req.uri_mut() = Uri::from(pq);
    }
    let h = req.headers_mut();
    strip_connection_named(h);
    if !trusted {
        for n in &FORWARDING {
            h.remove(n);
        }
    }
    let Some(a) = authority else {
        h.remove(header::HOST);
        return Ok(String::new());
    };
    let mut host = a.host().to_string();
    host.make_ascii_lowercase();
    // Most requests name their host in `Host` already: it stays as it is. (An authority is
    // always a valid header value.)
    let same = h.get(header::HOST).map(HeaderValue::as_bytes) == Some(a.as_str().as_bytes());
    if !same {
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(a.as_str().as_bytes()))
        {
            h.insert(header::HOST, v);
        }
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        path(p).map(Cow::into_owned)
    }

    #[test]
    fn paths_are_normalised_as_traefik_does() {
        for (raw, want) in [
            ("/", "/"),
            ("/admin/x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("/%41%5a%7e%2D%2e%5F", "/AZ~-._"),
            ("/./admin/x", "/admin/x"),
            ("//admin/x", "/admin/x"),
            ("/x/../admin/x", "/admin/x"),
            ("/x/%2e%2e/admin/x", "/admin/x"),
            ("/x/%2E./admin", "/admin"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/.", "/a/"),
            ("/..", "/"),
            ("/.", "/"),
            ("//", "/"),
            ("/foo/bar//", "/foo/bar/"),
            ("/./foo/../bar//", "/bar/"),
            ("/a///b", "/a/b"),
            ("/a/...", "/a/..."),
            ("/a/..b/.c", "/a/..b/.c"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/sp%20ace", "/sp%20ace"),
            ("/%7e", "/~"),
            ("/a%3d1", "/a%3D1"),
            ("/a%3D1//b", "/a%3D1/b"),
        ] {
            assert_eq!(norm(raw), Ok(want.to_string()), "{raw}");
        }
    }

    #[test]
    fn paths_with_no_single_reading_are_refused() {
        for (raw, why) in [
            ("/a%2fb", PathError::Encoded(b'/')),
            ("/a%2Fb", PathError::Encoded(b'/')),
            ("/public/..%2fadmin", PathError::Encoded(b'/')),
            ("/a%5cb", PathError::Encoded(b'\\')),
            ("/a%00", PathError::Encoded(0)),
            ("/a%3b", PathError::Encoded(b';')),
            ("/a%25", PathError::Encoded(b'%')),
            ("/%252e%252e/admin", PathError::Encoded(b'%')),
            ("/a%3F", PathError::Encoded(b'?')),
            ("/a%23", PathError::Encoded(b'#')),
            ("/a%", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("/a%%41", PathError::BadEscape),
            ("/a\\..\\admin", PathError::Backslash),
            ("*", PathError::NotAbsolute),
            ("admin", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
        ] {
            assert_eq!(norm(raw), Err(why), "{raw}");
        }
    }

    #[test]
    fn a_normal_path_is_not_copied() {
        for p in [
            "/",
            "/a",
            "/a/b/",
            "/a/.b/c..",
            "/a-b_c~d",
            "/sp%20ace/caf%C3%A9",
        ] {
            assert!(matches!(path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        for p in ["/%c3%a9", "/%41", "/a//b", "/a/./b", "/%2F"] {
            assert!(!matches!(path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    /// Random paths from an alphabet rich in the characters that matter: whatever the input,
    /// the output (when there is one) is a fixed point, starts with `/`, has no dot segment, no
    /// empty segment but a trailing one, no decodable escape and only upper-case escapes.
    #[test]
    fn normalising_is_idempotent_and_leaves_nothing_to_reinterpret() {
        const ALPHABET: &[&str] = &[
            "/", "/", "/", ".", ".", "..", "a", "Z", "%2e", "%2E", "%61", "%2f", "%5c", "%25",
            "%c3%a9", "%", "%4", "~", "-", ";", "\\", "%20", "é",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            // xorshift64*: deterministic, so a failure repeats.
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for _ in 0..20_000 {
            let len = (next() % 12) as usize;
            let mut p = String::from("/");
            for _ in 0..len {
                p.push_str(ALPHABET[(next() % ALPHABET.len() as u64) as usize]);
            }
            let Ok(n) = norm(&p) else { continue };
            assert!(n.starts_with('/'), "{p} → {n}");
            assert_eq!(
                norm(&n).as_deref(),
                Ok(n.as_str()),
                "{p} → {n}: a fixed point"
            );
            assert!(matches!(path(&n), Ok(Cow::Borrowed(_))), "{p} → {n}");
            let segs: Vec<&str> = n[1..].split('/').collect();
            for (i, s) in segs.iter().enumerate() {
                assert!(*s != "." && *s != "..", "{p} → {n}");
                assert!(!s.is_empty() || i + 1 == segs.len(), "{p} → {n}");
            }
            let b = n.as_bytes();
            for (i, _) in n.match_indices('%') {
                let (hi, lo) = (b[i + 1], b[i + 2]);
                assert!(hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit(), "{n}");
                assert!(!hi.is_ascii_lowercase() && !lo.is_ascii_lowercase(), "{n}");
                let v = hex(hi).unwrap_or(0) << 4 | hex(lo).unwrap_or(0);
                assert!(!unreserved(v) && !REFUSED_ESCAPES.contains(&v), "{n}");
            }
        }
    }

    fn req(version: Version, target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(target).version(version);
        for h in hosts {
            b = b.header("host", *h);
        }
        b.body(()).expect("request")
    }

    fn host_of(r: &Request<()>) -> Option<&str> {
        r.headers().get("host").and_then(|v| v.to_str().ok())
    }

    #[test]
    fn the_target_authority_replaces_host() {
        let mut r = req(
            Version::HTTP_11,
            "http://Public.Test:8080/x?y",
            &["admin.test"],
        );
        assert_eq!(request(&mut r, false), Ok("public.test".to_string()));
        assert_eq!(host_of(&r), Some("Public.Test:8080"));
        assert_eq!(r.uri().to_string(), "/x?y", "origin form");
        assert!(r.uri().authority().is_none());

        let mut r = req(Version::HTTP_11, "/a/../b?q=%2f", &["Example.Test"]);
        assert_eq!(request(&mut r, false), Ok("example.test".to_string()));
        assert_eq!(r.uri().to_string(), "/b?q=%2f", "the query is not the path");

        let mut r = req(Version::HTTP_11, "/", &["[::1]:8080"]);
        assert_eq!(request(&mut r, false), Ok("[::1]".to_string()));

        let mut r = req(Version::HTTP_10, "/", &[]);
        assert_eq!(
            request(&mut r, false),
            Ok(String::new()),
            "HTTP/1.0 needs no Host"
        );
    }

    #[test]
    fn ambiguous_hosts_are_refused() {
        for (version, target, hosts) in [
            (Version::HTTP_11, "/", &["a.test", "b.test"][..]),
            (Version::HTTP_11, "/", &["a.test", "a.test"][..]),
            (Version::HTTP_11, "/", &[][..]),
            (
                Version::HTTP_11,
                "http://admin.test@public.test/",
                &["public.test"][..],
            ),
            (Version::HTTP_11, "/", &["admin.test@public.test"][..]),
            (Version::HTTP_11, "/", &["a.test/x"][..]),
            (Version::HTTP_11, "/", &["a.test:port"][..]),
            (Version::HTTP_11, "/", &["a.test:99999"][..]),
            (Version::HTTP_11, "/", &["a.test;for=1.2.3.4"][..]),
            (Version::HTTP_11, "/", &["a.test\"x"][..]),
            (Version::HTTP_11, "/", &["[::1"][..]),
            (Version::HTTP_11, "/", &["[zz]"][..]),
            (Version::HTTP_11, "/", &["a.test:80:80"][..]),
            (Version::HTTP_11, "ftp://a.test/", &[][..]),
            (Version::HTTP_2, "http://public.test/", &["admin.test"][..]),
            (Version::HTTP_2, "http://u@public.test/", &[][..]),
            (Version::HTTP_11, "/a%2fb", &["a.test"][..]),
        ] {
            let mut r = req(version, target, hosts);
            assert!(
                request(&mut r, false).is_err(),
                "{version:?} {target} {hosts:?}"
            );
        }
        // HTTP/2 with both, equal but for case: one authority.
        let mut r = req(Version::HTTP_2, "https://A.test/", &["a.TEST"]);
        assert_eq!(request(&mut r, false), Ok("a.test".to_string()));
        assert_eq!(host_of(&r), Some("A.test"));
    }

    #[test]
    fn connection_named_and_untrusted_forwarding_headers_go() {
        let mut r = Request::get("/")
            .header("host", "a.test")
            .header("connection", "keep-alive, X-User, upgrade, host")
            .header("connection", "x-other")
            .header("upgrade", "websocket")
            .header("x-user", "admin")
            .header("x-other", "1")
            .header("x-forwarded-prefix", "/evil")
            .header("x-forwarded-uri", "/evil")
            .header("x-forwarded-server", "evil")
            .header("forwarded", "for=6.6.6.6")
            .header("x-kept", "1")
            .body(())
            .expect("request");
        assert!(request(&mut r, false).is_ok());
        for gone in [
            "connection",
            "x-user",
            "x-other",
            "x-forwarded-prefix",
            "x-forwarded-uri",
            "x-forwarded-server",
            "forwarded",
        ] {
            assert!(r.headers().get(gone).is_none(), "{gone}");
        }
        for kept in ["upgrade", "host", "x-kept"] {
            assert!(r.headers().get(kept).is_some(), "{kept}");
        }
        let mut r = Request::get("/")
            .header("host", "a.test")
            .header("x-forwarded-prefix", "/p")
            .body(())
            .expect("request");
        assert!(request(&mut r, true).is_ok());
        assert!(r.headers().get("x-forwarded-prefix").is_some(), "trusted");
    }
}
