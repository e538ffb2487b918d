//! Reading a TLS ClientHello from bytes a client sent, without a TLS library: a TCP router must
//! choose where a connection goes *before* anything answers it, and a passthrough router must
//! hand the upstream the very bytes the client sent, so the hello is parsed from a copy and
//! replayed afterwards.
//!
//! Only what routing needs is extracted (the server name and the ALPN protocols); everything
//! else is checked for shape, not meaning — the upstream or lb's own TLS stack judges the rest.
//! Every length is checked against what is actually there: a lie or a truncation is either
//! "need more bytes" (the client may still be sending) or "malformed" (it cannot become valid),
//! never a panic. A hello split over several records is reassembled.

/// Record payloads are at most 2^14 bytes (RFC 8446 §5.1).
const MAX_RECORD: usize = 16 * 1024;

/// The largest ClientHello (handshake message body) accepted: more than any real client sends
/// (a few KiB with post-quantum key shares), and bounded so a connection cannot make lb buffer
/// much before it has chosen a route.
pub const MAX_HELLO: usize = 16 * 1024 - 64;

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// What routing needs of a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The `host_name` of the server_name extension, lowercase, without a trailing dot.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// So far a plausible ClientHello: read more.
    NeedMore,
    /// The first byte is not a TLS handshake record: plain bytes (HTTP, another protocol).
    NotTls,
    Hello(ClientHello),
    /// A TLS record that can never become a valid ClientHello.
    Malformed(&'static str),
}

/// Parses the ClientHello at the start of `buf` (what a client sent so far).
pub fn parse(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => return Parsed::NeedMore,
        Some(&b) if b != HANDSHAKE => return Parsed::NotTls,
        Some(_) => {}
    }
    // The handshake message, reassembled from the records' payloads.
    let mut msg: Vec<u8> = Vec::new();
    let mut rest = buf;
    loop {
        if rest.first().is_some_and(|&t| t != HANDSHAKE) {
            return Parsed::Malformed("a non-handshake record before the ClientHello ended");
        }
        if rest.get(1).is_some_and(|&major| major != 3) {
            return Parsed::Malformed("not a TLS record version");
        }
        if rest.len() < 5 {
            return Parsed::NeedMore;
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || len > MAX_RECORD {
            return Parsed::Malformed("record length out of range");
        }
        let Some(payload) = rest.get(5..5 + len) else {
            // The record is still arriving: what there is of it may already be hopeless.
            return early(&msg, &rest[5..]);
        };
        msg.extend_from_slice(payload);
        rest = &rest[5 + len..];
        if let Some(parsed) = complete(&msg) {
            return parsed;
        }
    }
}

/// The handshake header, once four bytes of it are there: the message type and a length bound.
fn header(msg: &[u8]) -> Result<Option<usize>, &'static str> {
    if msg.first().is_some_and(|&t| t != CLIENT_HELLO) {
        return Err("the first handshake message is not a ClientHello");
    }
    if msg.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, msg[1], msg[2], msg[3]]) as usize;
    if len > MAX_HELLO {
        return Err("ClientHello larger than 16 KiB");
    }
    Ok(Some(len))
}

/// Incomplete data: malformed already, or wait for more.
fn early(msg: &[u8], partial: &[u8]) -> Parsed {
    let mut head = msg.get(..4).unwrap_or(msg).to_vec();
    head.extend(partial.iter().take(4 - head.len()));
    match header(&head) {
        Err(why) => Parsed::Malformed(why),
        Ok(_) => Parsed::NeedMore,
    }
}

/// The message, if all of it arrived.
fn complete(msg: &[u8]) -> Option<Parsed> {
    match header(msg) {
        Err(why) => Some(Parsed::Malformed(why)),
        Ok(None) => None,
        Ok(Some(len)) => {
            let body = msg.get(4..4 + len)?;
            Some(match body_of(body) {
                Ok(h) => Parsed::Hello(h),
                Err(why) => Parsed::Malformed(why),
            })
        }
    }
}

const TRUNCATED: &str = "a length runs past the end of the ClientHello";

/// A cursor over a byte slice whose every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err(TRUNCATED);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The ClientHello body (RFC 8446 §4.1.2; TLS 1.0–1.2 have the same layout).
fn body_of(body: &[u8]) -> Result<ClientHello, &'static str> {
    let mut r = Reader(body);
    if r.u16()? >> 8 != 3 {
        return Err("not a TLS ClientHello version");
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err("session id longer than 32 bytes");
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("bad cipher suite list");
    }
    if r.vec8()?.is_empty() {
        return Err("no compression method");
    }
    let mut hello = ClientHello::default();
    if r.is_empty() {
        return Ok(hello); // no extensions at all (TLS ≤ 1.2)
    }
    let mut exts = Reader(r.vec16()?);
    if !r.is_empty() {
        return Err("bytes after the extensions");
    }
    let (mut seen_sni, mut seen_alpn) = (false, false);
    while !exts.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        match ty {
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err("two server_name extensions");
                }
                hello.sni = server_name(data)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err("two ALPN extensions");
                }
                hello.alpn = alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(hello)
}

/// The server_name extension (RFC 6066 §3): at most one `host_name`.
fn server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut outer = Reader(data);
    let mut list = Reader(outer.vec16()?);
    if !outer.is_empty() {
        return Err("bytes after the server name list");
    }
    if list.is_empty() {
        return Err("empty server name list");
    }
    let mut host = None;
    while !list.is_empty() {
        let ty = list.u8()?;
        let name = list.vec16()?;
        if ty != 0 {
            continue; // no other name type is defined; skip what a future one would be
        }
        if host.is_some() {
            return Err("two host names");
        }
        host = Some(host_name(name)?);
    }
    Ok(host)
}

/// A DNS name as sent: letters, digits, `-`, `_`, dots between non-empty labels; one trailing
/// dot tolerated. Returned lowercase so rules compare it exactly.
fn host_name(name: &[u8]) -> Result<String, &'static str> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err("the server name is not a DNS name");
    }
    // ASCII only, checked above: the conversion cannot fail, but is not unwrapped.
    std::str::from_utf8(name)
        .map(str::to_ascii_lowercase)
        .map_err(|_| "the server name is not a DNS name")
}

/// The ALPN extension (RFC 7301 §3.1): a non-empty list of non-empty protocol names.
fn alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    let mut outer = Reader(data);
    let mut list = Reader(outer.vec16()?);
    if !outer.is_empty() {
        return Err("bytes after the ALPN list");
    }
    if list.is_empty() {
        return Err("empty ALPN list");
    }
    let mut out = Vec::new();
    while !list.is_empty() {
        let p = list.vec8()?;
        if p.is_empty() {
            return Err("empty ALPN protocol name");
        }
        out.push(p.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn v16(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }

    fn sni_ext(names: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (ty, n) in names {
            list.push(*ty);
            list.extend(v16(n));
        }
        (0, v16(&list))
    }

    fn alpn_ext(protos: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for p in protos {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        (16, v16(&list))
    }

    /// A ClientHello body with these extensions.
    fn body(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend([7u8; 32]); // random
        b.push(32);
        b.extend([9u8; 32]); // session id
        b.extend(v16(&[0x13, 0x01, 0x13, 0x02])); // cipher suites
        b.extend([1, 0]); // compression: null
        let mut e = Vec::new();
        for (ty, data) in exts {
            e.extend(ty.to_be_bytes());
            e.extend(v16(data));
        }
        b.extend(v16(&e));
        b
    }

    /// The handshake message for a body.
    fn message(body: &[u8]) -> Vec<u8> {
        let mut m = vec![CLIENT_HELLO];
        m.extend(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend_from_slice(body);
        m
    }

    /// The message in records of at most `chunk` payload bytes.
    fn records(msg: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in msg.chunks(chunk) {
            out.extend([HANDSHAKE, 3, 1]);
            out.extend(v16(part));
        }
        out
    }

    fn hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        records(&message(&body(exts)), MAX_RECORD)
    }

    /// What rustls itself sends as a client: the parser must read real hellos.
    fn rustls_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn reads_a_real_client_hello() {
        let bytes = rustls_hello("Svc.Example.com", &[b"h2", b"http/1.1"]);
        assert_eq!(
            parse(&bytes),
            Parsed::Hello(ClientHello {
                sni: Some("svc.example.com".into()),
                alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            })
        );
        // Trailing bytes (a client that already sent more) do not matter.
        let mut more = bytes.clone();
        more.extend([23, 3, 3, 0, 1, 0]);
        assert!(matches!(parse(&more), Parsed::Hello(_)));
    }

    #[test]
    fn reads_crafted_hellos() {
        let h = hello(&[
            (0xff01, vec![0]),
            sni_ext(&[(0, b"a.example.")]),
            alpn_ext(&[b"imap"]),
        ]);
        assert_eq!(
            parse(&h),
            Parsed::Hello(ClientHello {
                sni: Some("a.example".into()),
                alpn: vec![b"imap".to_vec()],
            })
        );
        // No extensions at all, or no SNI: a hello without a name.
        let mut bare = body(&[]);
        bare.truncate(bare.len() - 2);
        assert_eq!(
            parse(&records(&message(&bare), MAX_RECORD)),
            Parsed::Hello(ClientHello::default())
        );
        assert_eq!(
            parse(&hello(&[alpn_ext(&[b"h2"])])),
            Parsed::Hello(ClientHello {
                sni: None,
                alpn: vec![b"h2".to_vec()]
            })
        );
        // An unknown name type is skipped.
        assert_eq!(
            parse(&hello(&[sni_ext(&[(7, b"\xff\x00"), (0, b"b.example")])])),
            Parsed::Hello(ClientHello {
                sni: Some("b.example".into()),
                alpn: vec![]
            })
        );
    }

    #[test]
    fn plain_bytes_are_not_tls() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::NotTls);
        assert_eq!(parse(b"\x80\x2e\x01"), Parsed::NotTls, "an SSLv2 hello");
        assert_eq!(parse(b""), Parsed::NeedMore);
    }

    #[test]
    fn a_hello_split_over_records_is_reassembled() {
        let msg = message(&body(&[sni_ext(&[(0, b"split.example")])]));
        for chunk in [1, 2, 3, 4, 5, 50, 100] {
            assert_eq!(
                parse(&records(&msg, chunk)),
                Parsed::Hello(ClientHello {
                    sni: Some("split.example".into()),
                    alpn: vec![]
                }),
                "{chunk}-byte records"
            );
        }
    }

    #[test]
    fn every_truncation_asks_for_more() {
        let real = rustls_hello("t.example", &[b"h2"]);
        let msg = message(&body(&[sni_ext(&[(0, b"t.example")])]));
        for bytes in [real, records(&msg, MAX_RECORD), records(&msg, 7)] {
            for n in 0..bytes.len() {
                assert_eq!(parse(&bytes[..n]), Parsed::NeedMore, "first {n} bytes");
            }
            assert!(matches!(parse(&bytes), Parsed::Hello(_)));
        }
    }

    #[test]
    fn bad_lengths_and_shapes_are_malformed() {
        let mal = |b: &[u8]| matches!(parse(b), Parsed::Malformed(_));
        // Record layer.
        assert!(mal(&[22, 3, 1, 0, 0]), "empty record");
        assert!(mal(&[22, 3, 1, 0x40, 0x01]), "record over 2^14");
        assert!(mal(&[22, 2, 0, 0, 4]), "not TLS 1.x");
        // Handshake header, judged before the record is complete.
        assert!(mal(&[22, 3, 1, 0, 200, 2, 0]), "not a ClientHello");
        assert!(mal(&[22, 3, 1, 0, 200, 1, 0, 0x40, 0x00]), "too large");
        assert!(mal(&[22, 3, 1, 0, 200, 1, 0xff, 0xff, 0xff]), "absurd");
        // A second record that is not a handshake.
        let msg = message(&body(&[sni_ext(&[(0, b"x.example")])]));
        let mut two = records(&msg, 40);
        two[45] = 23;
        assert!(mal(&two));

        // Lengths inside the message that run past it, or leave bytes over.
        let good = body(&[sni_ext(&[(0, b"x.example")]), alpn_ext(&[b"h2"])]);
        // Offsets of the length fields in `good`.
        let sid = 34;
        let suites = sid + 1 + 32;
        let comp = suites + 2 + 4;
        let exts = comp + 2;
        let sni_ext_len = exts + 2 + 2;
        let sni_list = sni_ext_len + 2;
        let name_len = sni_list + 2 + 1;
        let check = |at: usize, delta: i32, what: &str| {
            let mut b = good.clone();
            if at == sid || at == comp {
                b[at] = (b[at] as i32 + delta) as u8;
            } else {
                let v = u16::from_be_bytes([b[at], b[at + 1]]) as i32 + delta;
                b[at..at + 2].copy_from_slice(&(v as u16).to_be_bytes());
            }
            let p = parse(&records(&message(&b), MAX_RECORD));
            assert!(matches!(p, Parsed::Malformed(_)), "{what} {delta:+}: {p:?}");
        };
        for delta in [1, -1, 100] {
            check(suites, delta, "cipher suites length");
            check(exts, delta, "extensions length");
            check(sni_ext_len, delta, "server_name extension length");
            check(sni_list, delta, "server name list length");
            check(name_len, delta, "host name length");
        }
        check(sid, 1, "session id length");
        check(sid, 100, "session id length");
        check(comp, 1, "compression length");
        check(comp, -1, "no compression method");
        // A message length shorter than the body: the body is cut inside.
        let mut m = message(&good);
        m[3] -= 3;
        assert!(mal(&records(&m, MAX_RECORD)));

        // Shapes.
        assert!(mal(&hello(&[sni_ext(&[(0, b"a")]), sni_ext(&[(0, b"b")])])));
        assert!(mal(&hello(&[sni_ext(&[(0, b"a"), (0, b"b")])])));
        assert!(mal(&hello(&[sni_ext(&[])])));
        assert!(mal(&hello(&[(0, vec![])])));
        assert!(mal(&hello(&[sni_ext(&[(0, b"")])])));
        assert!(mal(&hello(&[sni_ext(&[(0, b"a..b")])])));
        assert!(mal(&hello(&[sni_ext(&[(0, b"a b")])])));
        assert!(mal(&hello(&[sni_ext(&[(0, b"\xc3\xa9.example")])])));
        assert!(mal(&hello(&[alpn_ext(&[])])));
        assert!(mal(&hello(&[alpn_ext(&[b""])])));
        assert!(mal(&hello(&[alpn_ext(&[b"h2"]), alpn_ext(&[b"h2"])])));
        let mut v = body(&[]);
        v[0] = 2;
        assert!(mal(&records(&message(&v), MAX_RECORD)), "version 2.x");
    }

    #[test]
    fn mutations_never_panic() {
        let base = rustls_hello("fuzz.example", &[b"h2", b"http/1.1"]);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut b = base.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = next() as u8;
            }
            let cut = (next() % (b.len() as u64 + 1)) as usize;
            // Any verdict will do; a panic or a hang will not.
            let _ = parse(&b[..cut]);
            let _ = parse(&b);
        }
        // Every single byte set to every interesting value.
        for i in 0..base.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = base.clone();
                b[i] = v;
                let _ = parse(&b);
            }
        }
    }
}
