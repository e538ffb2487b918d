//! The PROXY protocol (HAProxy's, versions 1 and 2) on entry points: a balancer in front of lb
//! (an L4 one, or a CDN) sends the client's address as the connection's first bytes.
//!
//! Only the sources an entry point trusts may send one (Traefik's `proxyProtocol.trustedIPs`):
//! from them the header is optional and its source becomes the client's address for everything
//! after (forwarded headers, allow lists, rate limits, the access log). From anyone else the
//! bytes are not looked for: they reach the HTTP or TLS parser as they are, which refuses them,
//! since believing them would let any client choose its address.
//! The header is read strictly and bounded (107 bytes for version 1 as the specification says,
//! 16 + 1024 for version 2) within the entry point's header timeout; the bytes after it are
//! handed on untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Version 2's signature.
const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1's longest line, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// Version 2's longest address block with its TLVs that lb accepts (TLVs are skipped).
const V2_MAX_BODY: usize = 1024;

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Too few bytes to tell.
    NeedMore,
    /// Not a PROXY header: the bytes are the client's own.
    NotProxy,
    /// A whole header of `len` bytes; `source` is the client's address (`None`: a health
    /// check of the balancer itself, `LOCAL` or `UNKNOWN`, which keeps the connection's own).
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
    Invalid(&'static str),
}

pub fn parse(buf: &[u8]) -> Parsed {
    let Some(&first) = buf.first() else {
        return Parsed::NeedMore;
    };
    match first {
        b'P' => v1(buf),
        b'\r' => v2(buf),
        _ => Parsed::NotProxy,
    }
}

fn v1(buf: &[u8]) -> Parsed {
    const START: &[u8] = b"PROXY ";
    let n = buf.len().min(START.len());
    if buf[..n] != START[..n] {
        return Parsed::NotProxy;
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("PROXY v1 line longer than 107 bytes")
        } else {
            Parsed::NeedMore
        };
    };
    if end + 2 > V1_MAX {
        return Parsed::Invalid("PROXY v1 line longer than 107 bytes");
    }
    let Ok(line) = std::str::from_utf8(&buf[START.len()..end]) else {
        return Parsed::Invalid("PROXY v1 line is not text");
    };
    let len = end + 2;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["UNKNOWN", ..] => Parsed::Header { len, source: None },
        [family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v6 = *family == "TCP6";
            let addr = |s: &str| -> Option<IpAddr> {
                if v6 {
                    s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
                } else {
                    s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
                }
            };
            // Decimal without a sign or leading zeros, as the specification writes them.
            let port = |s: &str| -> Option<u16> {
                let canonical = !s.is_empty()
                    && s.bytes().all(|b| b.is_ascii_digit())
                    && (s == "0" || !s.starts_with('0'));
                canonical.then(|| s.parse().ok()).flatten()
            };
            match (addr(src), addr(dst), port(sport), port(dport)) {
                (Some(ip), Some(_), Some(p), Some(_)) => Parsed::Header {
                    len,
                    source: Some(SocketAddr::new(ip, p)),
                },
                _ => Parsed::Invalid("PROXY v1 addresses or ports do not parse"),
            }
        }
        _ => Parsed::Invalid("PROXY v1 line is not TCP4, TCP6 or UNKNOWN"),
    }
}

fn v2(buf: &[u8]) -> Parsed {
    let n = buf.len().min(SIG.len());
    if buf[..n] != SIG[..n] {
        return Parsed::NotProxy;
    }
    if buf.len() < 16 {
        return Parsed::NeedMore;
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid("PROXY v2 header of another version");
    }
    if body > V2_MAX_BODY {
        return Parsed::Invalid("PROXY v2 header longer than 1 KiB");
    }
    let len = 16 + body;
    if buf.len() < len {
        return Parsed::NeedMore;
    }
    let b = &buf[16..len];
    match ver_cmd & 0x0f {
        // LOCAL: the balancer's own connection (a health check); its address stays.
        0 => return Parsed::Header { len, source: None },
        1 => {}
        _ => return Parsed::Invalid("PROXY v2 command is neither LOCAL nor PROXY"),
    }
    let port = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    match family {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 if b.len() >= 12 => {
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Parsed::Header {
                len,
                source: Some(SocketAddr::new(IpAddr::V4(ip), port(8))),
            }
        }
        0x21 if b.len() >= 36 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[..16]);
            Parsed::Header {
                len,
                source: Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port(32))),
            }
        }
        0x11 | 0x21 => Parsed::Invalid("PROXY v2 address block too short"),
        // UNSPEC: nothing to believe; the connection's own address stays.
        0x00 => Parsed::Header { len, source: None },
        _ => Parsed::Invalid("PROXY v2 family is not TCP over IPv4 or IPv6"),
    }
}

/// Reads a PROXY header from a trusted source (if it sends one), by `until`. Returns the
/// client's address and the bytes read after the header (the client's own, replayed), or why
/// the connection is closed.
pub async fn read(
    stream: &mut tokio::net::TcpStream,
    peer: SocketAddr,
    until: tokio::time::Instant,
) -> Result<(SocketAddr, Vec<u8>), &'static str> {
    use tokio::io::AsyncReadExt as _;
    let deadline = until;
    let mut buf = Vec::with_capacity(128);
    loop {
        match parse(&buf) {
            Parsed::NeedMore => {}
            Parsed::NotProxy => return Ok((peer, buf)),
            Parsed::Invalid(why) => return Err(why),
            Parsed::Header { len, source } => {
                let rest = buf.split_off(len);
                return Ok((source.unwrap_or(peer), rest));
            }
        }
        // Never more than the longest header: the client's bytes after it are few or none.
        let room = (16 + V2_MAX_BODY).saturating_sub(buf.len()).max(1);
        let mut chunk = vec![0u8; room.min(512)];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err("no PROXY header or request in time"),
            Ok(Err(_)) | Ok(Ok(0)) => return Err("closed before its first bytes"),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_lines() {
        let l = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET /";
        assert_eq!(
            parse(l),
            Parsed::Header {
                len: 45,
                source: Some("192.0.2.7:56324".parse().unwrap())
            }
        );
        let l = b"PROXY TCP6 2001:db8::7 2001:db8::1 1 80\r\n";
        assert_eq!(
            parse(l),
            Parsed::Header {
                len: l.len(),
                source: Some("[2001:db8::7]:1".parse().unwrap())
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header {
                len: 15,
                source: None
            }
        );
        for partial in [&b"P"[..], b"PROXY TCP4 192.0.2.7 198.5"] {
            assert_eq!(parse(partial), Parsed::NeedMore, "{partial:?}");
        }
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 056324 443\r\n"[..],
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n",
            b"PROXY TCP4 2001:db8::7 198.51.100.1 1 443\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",
            b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Parsed::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 100]].concat();
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
        for other in [&b"GET / HTTP/1.1\r\n"[..], b"\x16\x03\x01", b"POST /"] {
            assert_eq!(parse(other), Parsed::NotProxy);
        }
        assert_eq!(parse(b"PUT / HTTP/1.1"), Parsed::NotProxy);
    }

    fn v2_header(cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = SIG.to_vec();
        h.push(0x20 | cmd);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn version_2_headers() {
        let mut body = vec![192, 0, 2, 7, 198, 51, 100, 1];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        // A TLV after the addresses is skipped.
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xff]);
        let h = v2_header(1, 0x11, &body);
        let mut with_request = h.clone();
        with_request.extend_from_slice(b"GET /");
        assert_eq!(
            parse(&with_request),
            Parsed::Header {
                len: h.len(),
                source: Some("192.0.2.7:56324".parse().unwrap())
            }
        );
        for cut in [1, 12, 15, h.len() - 1] {
            assert_eq!(parse(&h[..cut]), Parsed::NeedMore, "cut at {cut}");
        }
        let mut b6 = Vec::new();
        b6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        b6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        b6.extend_from_slice(&[0, 9, 1, 187]);
        assert_eq!(
            parse(&v2_header(1, 0x21, &b6)),
            Parsed::Header {
                len: 16 + 36,
                source: Some("[2001:db8::7]:9".parse().unwrap())
            }
        );
        assert_eq!(
            parse(&v2_header(0, 0x00, &[])),
            Parsed::Header {
                len: 16,
                source: None
            }
        );
        for bad in [
            v2_header(1, 0x11, &body[..8]),
            v2_header(1, 0x31, &[0; 216]),
            v2_header(2, 0x11, &body),
            v2_header(1, 0x11, &vec![0; 2000]),
        ] {
            assert!(matches!(parse(&bad), Parsed::Invalid(_)), "{bad:?}");
        }
        let mut v1 = v2_header(1, 0x11, &body);
        v1[12] = 0x11;
        assert!(matches!(parse(&v1), Parsed::Invalid(_)));
    }
}
