//! Router rules, Traefik's language: matchers combined with `&&`, `||`, `!` and parentheses.
//!
//! ```text
//! Host(`example.com`) && (PathPrefix(`/api`) || Header(`X-Api`, `1`)) && !Method(`DELETE`)
//! ```
//! Matchers: `Host`, `HostRegexp`, `Path`, `PathPrefix`, `PathRegexp`, `Method`, `Header`,
//! `HeaderRegexp`, `Query`, `QueryRegexp` (the query decoded as Go's `url.ParseQuery` decodes it,
//! which is what Traefik matches), `ClientIP` (an address or CIDR). lb's own rules match a regex
//! against the whole value; a Traefik file's match it anywhere, as Traefik v3 does
//! ([`Rule::parse_traefik`]). Arguments are in backticks or double quotes; `Host`, `Method`
//! and `ClientIP` accept several (any may match). A rule is compiled once per configuration —
//! regexes included — into a [`Rule`] evaluated per request without allocating. Errors give the
//! column (1-based) where the rule stops making sense.
//!
//! TCP routers use the same language with other matchers ([`TcpRule`]): `HostSNI` (names, a
//! `*.suffix` wildcard of one label, or `*` for everything), `HostSNIRegexp`, `ALPN` and
//! `ClientIP`. One parser serves both, so operators, quoting and error columns behave the same; a
//! matcher of the other kind is refused where it could never be evaluated (a `Path` on a TCP
//! router, a server name on a router that sees no TLS).

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;

/// What a rule sees of a request.
pub struct RequestView<'a> {
    /// Host without port, lowercase.
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a hyper::HeaderMap,
    pub client_ip: IpAddr,
}

#[derive(Debug, Clone)]
enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Host(Vec<String>),
    HostRegexp(Regex),
    Path(String),
    PathPrefix(String),
    PathRegexp(Regex),
    Method(Vec<String>),
    Header(String, String),
    HeaderRegexp(String, Regex),
    /// A query parameter (percent-decoded, `+` a space, as Go's `url.ParseQuery`) and a value.
    Query(String, String),
    QueryRegexp(String, Regex),
    ClientIp(Vec<IpNet>),
    /// TCP: server names (lowercase), `*.suffix` wildcards and `*`.
    HostSni(Vec<String>),
    HostSniRegexp(Regex),
    Alpn(Vec<String>),
}

/// Which matchers a rule may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Http,
    /// `tls`: the router sees TLS ClientHellos (a server name, ALPN); without, only plain bytes.
    Tcp {
        tls: bool,
    },
}

/// What a TCP rule sees of a connection: the ClientHello's name and protocols (if it was TLS),
/// and the client's address.
pub struct ConnView<'a> {
    /// Lowercase; `None` for plain TCP or a ClientHello without SNI.
    pub sni: Option<&'a str>,
    pub alpn: &'a [Vec<u8>],
    pub client_ip: IpAddr,
}

/// A compiled TCP router rule.
#[derive(Debug, Clone)]
pub struct TcpRule {
    expr: Expr,
    /// As for [`Rule`]: the rule's length.
    pub default_priority: i64,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    expr: Expr,
    /// The rule's text length: Traefik's default priority (the longer rule wins).
    pub default_priority: i64,
}

impl Rule {
    /// The host names the rule's `Host` matchers name, outside a `!` (Traefik reads a router's
    /// ACME names so when it gives no `tls.domains`).
    pub fn hosts(&self) -> Vec<String> {
        fn walk(e: &Expr, out: &mut Vec<String>) {
            match e {
                Expr::And(a, b) | Expr::Or(a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
                Expr::Host(h) => {
                    for n in h {
                        if !out.contains(n) {
                            out.push(n.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&self.expr, &mut out);
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// 1-based column in the rule text.
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "column {}: {}", self.column, self.message)
    }
}

impl std::error::Error for RuleError {}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    LParen,
    RParen,
    Comma,
    And,
    Or,
    Not,
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, RuleError> {
    let err = |column: usize, message: String| RuleError { column, message };
    let chars: Vec<(usize, char)> = src.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (pos, c) = chars[i];
        let col = src[..pos].chars().count() + 1;
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => {
                out.push((col, Tok::LParen));
                i += 1;
            }
            ')' => {
                out.push((col, Tok::RParen));
                i += 1;
            }
            ',' => {
                out.push((col, Tok::Comma));
                i += 1;
            }
            '!' => {
                out.push((col, Tok::Not));
                i += 1;
            }
            '&' | '|' => {
                if chars.get(i + 1).map(|x| x.1) != Some(c) {
                    return Err(err(col, format!("expected `{c}{c}`")));
                }
                out.push((col, if c == '&' { Tok::And } else { Tok::Or }));
                i += 2;
            }
            '`' | '"' => {
                let mut j = i + 1;
                let mut s = String::new();
                while j < chars.len() && chars[j].1 != c {
                    s.push(chars[j].1);
                    j += 1;
                }
                if j >= chars.len() {
                    return Err(err(
                        col,
                        format!("unterminated string (missing closing {c})"),
                    ));
                }
                out.push((col, Tok::Str(s)));
                i = j + 1;
            }
            c if c.is_ascii_alphabetic() => {
                let mut j = i;
                let mut s = String::new();
                while j < chars.len() && chars[j].1.is_ascii_alphanumeric() {
                    s.push(chars[j].1);
                    j += 1;
                }
                out.push((col, Tok::Ident(s)));
                i = j;
            }
            other => return Err(err(col, format!("unexpected {other:?}"))),
        }
    }
    Ok(out)
}

struct Parser<'a> {
    toks: &'a [(usize, Tok)],
    pos: usize,
    end_col: usize,
    dialect: Dialect,
    /// lb's own rules match a regex against the whole value; Traefik's (v3) anywhere in it.
    anchored: bool,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.1)
    }
    fn col(&self) -> usize {
        self.toks.get(self.pos).map(|t| t.0).unwrap_or(self.end_col)
    }
    fn fail<T>(&self, message: impl Into<String>) -> Result<T, RuleError> {
        Err(RuleError {
            column: self.col(),
            message: message.into(),
        })
    }

    /// or := and ("||" and)*
    fn or(&mut self) -> Result<Expr, RuleError> {
        let mut e = self.and()?;
        while self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    /// and := unary ("&&" unary)*
    fn and(&mut self) -> Result<Expr, RuleError> {
        let mut e = self.unary()?;
        while self.peek() == Some(&Tok::And) {
            self.pos += 1;
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    /// unary := "!" unary | "(" or ")" | matcher
    fn unary(&mut self) -> Result<Expr, RuleError> {
        match self.peek() {
            Some(Tok::Not) => {
                self.pos += 1;
                Ok(Expr::Not(Box::new(self.unary()?)))
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                let e = self.or()?;
                if self.peek() != Some(&Tok::RParen) {
                    return self.fail("expected `)`");
                }
                self.pos += 1;
                Ok(e)
            }
            Some(Tok::Ident(_)) => self.matcher(),
            _ => self.fail(match self.dialect {
                Dialect::Http => "expected a matcher such as Host(`…`), `!` or `(`",
                Dialect::Tcp { .. } => "expected a matcher such as HostSNI(`…`), `!` or `(`",
            }),
        }
    }

    fn matcher(&mut self) -> Result<Expr, RuleError> {
        let name_col = self.col();
        let Some(Tok::Ident(name)) = self.peek().cloned() else {
            return self.fail("expected a matcher");
        };
        self.pos += 1;
        if self.peek() != Some(&Tok::LParen) {
            return self.fail(format!("expected `(` after {name}"));
        }
        self.pos += 1;
        let mut args: Vec<(usize, String)> = Vec::new();
        loop {
            match self.peek().cloned() {
                Some(Tok::Str(s)) => {
                    args.push((self.col(), s));
                    self.pos += 1;
                }
                _ => return self.fail("expected a string in backticks"),
            }
            match self.peek() {
                Some(Tok::Comma) => self.pos += 1,
                Some(Tok::RParen) => {
                    self.pos += 1;
                    break;
                }
                _ => return self.fail("expected `,` or `)`"),
            }
        }
        let arity = |n: usize| -> Result<(), RuleError> {
            if args.len() != n {
                return Err(RuleError {
                    column: name_col,
                    message: format!("{name} takes {n} argument(s), got {}", args.len()),
                });
            }
            Ok(())
        };
        let anchored = self.anchored;
        let regex = |(col, s): &(usize, String)| {
            let re = if anchored {
                format!("^(?:{s})$")
            } else {
                s.clone()
            };
            Regex::new(&re).map_err(|e| RuleError {
                column: *col,
                message: format!("bad regex: {e}"),
            })
        };
        let tls_only = |what: &str| -> Result<(), RuleError> {
            if self.dialect == (Dialect::Tcp { tls: false }) {
                return Err(RuleError {
                    column: name_col,
                    message: format!(
                        "{what} needs tls = \"passthrough\" or \"terminate\" (plain TCP carries no ClientHello)"
                    ),
                });
            }
            Ok(())
        };
        if let Dialect::Tcp { tls } = self.dialect {
            return Ok(match name.as_str() {
                "HostSNI" => {
                    let mut names = Vec::new();
                    for (col, a) in &args {
                        let n = sni_pattern(*col, a)?;
                        if !tls && n != "*" {
                            return Err(RuleError {
                                column: *col,
                                message: "plain TCP carries no server name: without tls only HostSNI(`*`) matches".into(),
                            });
                        }
                        names.push(n);
                    }
                    Expr::HostSni(names)
                }
                "HostSNIRegexp" => {
                    tls_only("HostSNIRegexp")?;
                    arity(1)?;
                    Expr::HostSniRegexp(regex(&args[0])?)
                }
                "ALPN" => {
                    tls_only("ALPN")?;
                    for (col, a) in &args {
                        if a.is_empty() || a.len() > 255 {
                            return Err(RuleError {
                                column: *col,
                                message: "an ALPN protocol is 1 to 255 bytes".into(),
                            });
                        }
                        if a == "acme-tls/1" {
                            return Err(RuleError {
                                column: *col,
                                message: "acme-tls/1 is reserved for ACME challenges".into(),
                            });
                        }
                    }
                    Expr::Alpn(args.iter().map(|a| a.1.clone()).collect())
                }
                "ClientIP" => Expr::ClientIp(client_ips(&args)?),
                other => {
                    return Err(RuleError {
                        column: name_col,
                        message: format!(
                            "unknown matcher {other:?} (TCP routers have HostSNI, HostSNIRegexp, ALPN, ClientIP)"
                        ),
                    });
                }
            });
        }
        Ok(match name.as_str() {
            "Host" => Expr::Host(args.iter().map(|a| a.1.to_ascii_lowercase()).collect()),
            "HostRegexp" => {
                arity(1)?;
                Expr::HostRegexp(regex(&args[0])?)
            }
            "Path" => {
                arity(1)?;
                Expr::Path(args[0].1.clone())
            }
            "PathPrefix" => {
                arity(1)?;
                Expr::PathPrefix(args[0].1.clone())
            }
            "PathRegexp" => {
                arity(1)?;
                Expr::PathRegexp(regex(&args[0])?)
            }
            "Method" => Expr::Method(args.iter().map(|a| a.1.to_ascii_uppercase()).collect()),
            "Header" => {
                arity(2)?;
                Expr::Header(args[0].1.to_ascii_lowercase(), args[1].1.clone())
            }
            "HeaderRegexp" => {
                arity(2)?;
                Expr::HeaderRegexp(args[0].1.to_ascii_lowercase(), regex(&args[1])?)
            }
            // With one argument, the parameter is there with an empty value (`?debug`).
            "Query" | "QueryRegexp" if args.len() == 1 => {
                Expr::Query(args[0].1.clone(), String::new())
            }
            "Query" => {
                arity(2)?;
                Expr::Query(args[0].1.clone(), args[1].1.clone())
            }
            "QueryRegexp" => {
                arity(2)?;
                Expr::QueryRegexp(args[0].1.clone(), regex(&args[1])?)
            }
            "ClientIP" => Expr::ClientIp(client_ips(&args)?),
            other => {
                return Err(RuleError {
                    column: name_col,
                    message: format!("unknown matcher {other:?}"),
                });
            }
        })
    }
}

fn client_ips(args: &[(usize, String)]) -> Result<Vec<IpNet>, RuleError> {
    args.iter()
        .map(|(col, a)| {
            super::ip_net(a).ok_or_else(|| RuleError {
                column: *col,
                message: format!("{a:?} is not an address or CIDR"),
            })
        })
        .collect()
}

/// A `HostSNI` argument, checked and lowercased: `*`, a DNS name, or `*.` and a DNS name.
fn sni_pattern(col: usize, arg: &str) -> Result<String, RuleError> {
    let fail = |message: String| {
        Err(RuleError {
            column: col,
            message,
        })
    };
    let lower = arg.to_ascii_lowercase();
    if lower == "*" {
        return Ok(lower);
    }
    let name = lower.strip_prefix("*.").unwrap_or(&lower);
    if name.contains('*') {
        return fail(format!(
            "{arg:?}: a wildcard is only allowed as the whole first label (`*.example.com`)"
        ));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return fail(format!("{arg:?} is not a server name"));
    }
    Ok(lower)
}

/// Does `pattern` (from [`sni_pattern`]) match the ClientHello's name? A `*.suffix` wildcard
/// covers exactly one more label, as a wildcard certificate does.
fn sni_matches(pattern: &str, sni: Option<&str>) -> bool {
    if pattern == "*" {
        return true;
    }
    let Some(name) = sni else {
        return false;
    };
    match pattern.strip_prefix('*') {
        Some(dot_suffix) => name
            .strip_suffix(dot_suffix)
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => name == pattern,
    }
}

fn parse_expr(src: &str, dialect: Dialect, anchored: bool) -> Result<Expr, RuleError> {
    let toks = lex(src)?;
    let mut p = Parser {
        toks: &toks,
        pos: 0,
        end_col: src.chars().count() + 1,
        dialect,
        anchored,
    };
    let expr = p.or()?;
    if p.pos != toks.len() {
        return p.fail("expected `&&`, `||` or the end of the rule");
    }
    Ok(expr)
}

impl Rule {
    /// A rule of lb's own configuration: its regexes match whole values.
    pub fn parse(src: &str) -> Result<Rule, RuleError> {
        Ok(Rule {
            expr: parse_expr(src, Dialect::Http, true)?,
            default_priority: src.len() as i64,
        })
    }

    /// A rule from a Traefik file, as Traefik v3 reads it: a regex matches anywhere in the value
    /// unless it anchors itself (`^…$`), as Go's `regexp.MatchString` does.
    pub fn parse_traefik(src: &str) -> Result<Rule, RuleError> {
        Ok(Rule {
            expr: parse_expr(src, Dialect::Http, false)?,
            default_priority: src.len() as i64,
        })
    }

    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        eval(&self.expr, r)
    }
}

impl TcpRule {
    /// A TCP router's rule; `tls`: the router handles TLS connections (passthrough or
    /// termination), else plain TCP, where only `HostSNI(`*`)` and `ClientIP` can mean anything.
    pub fn parse(src: &str, tls: bool) -> Result<TcpRule, RuleError> {
        Ok(TcpRule {
            expr: parse_expr(src, Dialect::Tcp { tls }, true)?,
            default_priority: src.len() as i64,
        })
    }

    /// A TCP rule from a Traefik file: regexes unanchored, as in [`Rule::parse_traefik`].
    pub fn parse_traefik(src: &str, tls: bool) -> Result<TcpRule, RuleError> {
        Ok(TcpRule {
            expr: parse_expr(src, Dialect::Tcp { tls }, false)?,
            default_priority: src.len() as i64,
        })
    }

    pub fn matches(&self, c: &ConnView<'_>) -> bool {
        eval(&self.expr, c)
    }
}

/// What a rule's leaves are evaluated against: a request or a connection. The parser's dialect
/// guarantees a rule only holds leaves its subject knows.
trait Subject {
    fn leaf(&self, e: &Expr) -> bool;
}

fn eval(e: &Expr, s: &impl Subject) -> bool {
    match e {
        Expr::And(a, b) => eval(a, s) && eval(b, s),
        Expr::Or(a, b) => eval(a, s) || eval(b, s),
        Expr::Not(a) => !eval(a, s),
        leaf => s.leaf(leaf),
    }
}

impl Subject for ConnView<'_> {
    fn leaf(&self, e: &Expr) -> bool {
        match e {
            Expr::HostSni(names) => names.iter().any(|n| sni_matches(n, self.sni)),
            Expr::HostSniRegexp(re) => self.sni.is_some_and(|n| re.is_match(n)),
            Expr::Alpn(protos) => protos
                .iter()
                .any(|p| self.alpn.iter().any(|a| a.as_slice() == p.as_bytes())),
            Expr::ClientIp(nets) => nets.iter().any(|n| n.contains(&self.client_ip)),
            _ => false,
        }
    }
}

impl Subject for RequestView<'_> {
    fn leaf(&self, e: &Expr) -> bool {
        let r = self;
        match e {
            Expr::Host(hosts) => hosts.iter().any(|h| h == r.host),
            Expr::HostRegexp(re) => re.is_match(r.host),
            Expr::Path(p) => r.path == p,
            Expr::PathPrefix(p) => r.path.starts_with(p.as_str()),
            Expr::PathRegexp(re) => re.is_match(r.path),
            Expr::Method(ms) => ms.iter().any(|m| m == r.method),
            Expr::Header(k, v) => r
                .headers
                .get_all(k.as_str())
                .iter()
                .any(|x| x.as_bytes() == v.as_bytes()),
            Expr::HeaderRegexp(k, re) => r
                .headers
                .get_all(k.as_str())
                .iter()
                .any(|x| std::str::from_utf8(x.as_bytes()).is_ok_and(|x| re.is_match(x))),
            Expr::Query(k, v) => query_values(r.query, k).any(|x| x == v.as_str()),
            Expr::QueryRegexp(k, re) => query_values(r.query, k).any(|x| re.is_match(&x)),
            Expr::ClientIp(nets) => nets.iter().any(|n| n.contains(&r.client_ip)),
            _ => false,
        }
    }
}

/// The values of parameter `key` in a query, decoded as Go's `url.ParseQuery` decodes them
/// (what Traefik matches): `+` is a space, `%XX` a byte; a pair with a `;` or a bad escape is
/// skipped, and so is one that does not decode to UTF-8.
fn query_values<'a>(
    query: Option<&'a str>,
    key: &'a str,
) -> impl Iterator<Item = std::borrow::Cow<'a, str>> + 'a {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.contains(';'))
        .filter_map(move |kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (unescape(k)? == key).then(|| unescape(v)).flatten()
        })
}

/// `application/x-www-form-urlencoded` decoding; `None` for a bad escape or bytes that are not
/// UTF-8. Borrows when there is nothing to decode (the usual case).
fn unescape(s: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !s.contains(['%', '+']) {
        return Some(std::borrow::Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let hi = hex(*b.get(i + 1)?)?;
                let lo = hex(*b.get(i + 2)?)?;
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(std::borrow::Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(
        host: &'a str,
        path: &'a str,
        method: &'a str,
        query: Option<&'a str>,
        headers: &'a hyper::HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            host,
            path,
            method,
            query,
            headers,
            client_ip: "10.1.2.3".parse().unwrap(),
        }
    }

    #[test]
    fn hosts_are_those_a_rule_matches_outside_a_negation() {
        let hosts = |r: &str| Rule::parse(r).unwrap().hosts();
        assert_eq!(
            hosts("Host(`a.test`, `B.test`) && PathPrefix(`/`) || (Host(`c.test`) && !Host(`d.test`))"),
            ["a.test", "b.test", "c.test"]
        );
        assert!(hosts("PathPrefix(`/`)").is_empty());
        assert_eq!(hosts("Host(`a.test`) || Host(`a.test`)"), ["a.test"]);
    }

    #[test]
    fn every_matcher_kind() {
        let mut h = hyper::HeaderMap::new();
        h.insert("x-api", "1".parse().unwrap());
        let r = view(
            "example.com",
            "/api/users",
            "GET",
            Some("a=1&debug=true"),
            &h,
        );
        let table: &[(&str, bool)] = &[
            ("Host(`example.com`)", true),
            ("Host(`EXAMPLE.com`)", true),
            ("Host(`other.com`, `example.com`)", true),
            ("Host(`other.com`)", false),
            ("HostRegexp(`^.+\\.com$`)", true),
            ("HostRegexp(`[a-z]+\\.org`)", false),
            ("Path(`/api/users`)", true),
            ("Path(`/api`)", false),
            ("PathPrefix(`/api`)", true),
            ("PathPrefix(`/web`)", false),
            ("PathRegexp(`/api/[a-z]+`)", true),
            ("PathRegexp(`/api/[0-9]+`)", false),
            ("Method(`GET`)", true),
            ("Method(`post`, `get`)", true),
            ("Method(`POST`)", false),
            ("Header(`X-Api`, `1`)", true),
            ("Header(`X-Api`, `2`)", false),
            ("Query(`debug`, `true`)", true),
            ("Query(`debug`, `false`)", false),
            ("ClientIP(`10.0.0.0/8`)", true),
            ("ClientIP(`10.1.2.3`)", true),
            ("ClientIP(`192.168.0.0/16`)", false),
            ("Host(`example.com`) && PathPrefix(`/api`)", true),
            ("Host(`example.com`) && PathPrefix(`/web`)", false),
            ("Host(`x.com`) || PathPrefix(`/api`)", true),
            ("!Method(`POST`)", true),
            ("!(Method(`GET`) || Method(`HEAD`))", false),
            (
                "Host(`x.com`) || Host(`example.com`) && Method(`GET`)",
                true,
            ),
            (
                "(Host(`x.com`) || Host(`example.com`)) && Method(`POST`)",
                false,
            ),
            ("Host(\"example.com\")", true),
        ];
        for (rule, want) in table {
            let r2 = Rule::parse(rule).unwrap_or_else(|e| panic!("{rule}: {e}"));
            assert_eq!(r2.matches(&r), *want, "{rule}");
        }
    }

    /// Traefik v3's `HeaderRegexp`, `QueryRegexp` and `Query` (its reference: routing/routers,
    /// "Rules"): header values and decoded query values, regexes unanchored in a Traefik rule and
    /// whole-value in lb's own.
    #[test]
    fn header_and_query_matchers_read_as_traefik_reads_them() {
        let mut h = hyper::HeaderMap::new();
        h.append("x-version", "v2.1".parse().unwrap());
        h.append("x-version", "beta".parse().unwrap());
        let r = view(
            "example.com",
            "/api/v2/users",
            "GET",
            Some("name=J%C3%BCrgen+M&flag&debug=&bad=%zz&a;b=1&tag=x1&tag=y22"),
            &h,
        );
        let both: &[(&str, bool)] = &[
            ("HeaderRegexp(`X-Version`, `^v[0-9]+\\.[0-9]+$`)", true),
            ("HeaderRegexp(`X-Version`, `^gamma$`)", false),
            ("HeaderRegexp(`X-Other`, `.*`)", false),
            ("Query(`name`, `Jürgen M`)", true),
            ("Query(`name`, `J%C3%BCrgen+M`)", false),
            ("Query(`flag`)", true),
            ("Query(`debug`)", true),
            ("Query(`missing`)", false),
            ("Query(`bad`, `%zz`)", false),
            ("Query(`b`, `1`)", false),
            ("QueryRegexp(`tag`, `^y[0-9]+$`)", true),
            ("QueryRegexp(`tag`, `^z`)", false),
            ("QueryRegexp(`flag`)", true),
        ];
        for (rule, want) in both {
            for parse in [Rule::parse, Rule::parse_traefik] {
                let got = parse(rule)
                    .unwrap_or_else(|e| panic!("{rule}: {e}"))
                    .matches(&r);
                assert_eq!(got, *want, "{rule}");
            }
        }
        // A regex that does not anchor itself: anywhere in a Traefik rule, the whole value in lb's.
        for (rule, traefik, lb) in [
            ("PathRegexp(`/v[0-9]+/`)", true, false),
            ("PathRegexp(`^/api/v[0-9]+/users$`)", true, true),
            ("HostRegexp(`example`)", true, false),
            ("HeaderRegexp(`X-Version`, `et`)", true, false),
            ("QueryRegexp(`tag`, `2`)", true, false),
        ] {
            assert_eq!(
                Rule::parse_traefik(rule).unwrap().matches(&r),
                traefik,
                "{rule}"
            );
            assert_eq!(Rule::parse(rule).unwrap().matches(&r), lb, "{rule}");
        }
        assert!(Rule::parse("HeaderRegexp(`X-A`)").is_err());
        assert!(Rule::parse("QueryRegexp(`a`, `(`)").is_err());
    }

    #[test]
    fn errors_point_at_the_column() {
        let cases: &[(&str, usize, &str)] = &[
            ("Host(`a`) && ", 14, "expected a matcher"),
            ("Host(`a`) & Path(`/`)", 11, "`&&`"),
            ("Hots(`a`)", 1, "unknown matcher"),
            ("Host(`a`", 9, "`,` or `)`"),
            ("Host(`a)", 6, "unterminated"),
            ("Path(`/a`, `/b`)", 1, "takes 1"),
            ("PathRegexp(`(`)", 12, "bad regex"),
            ("ClientIP(`10.0.0.0/33`)", 10, "not an address"),
            ("(Host(`a`)", 11, "expected `)`"),
            ("Host(`a`) Path(`/`)", 11, "end of the rule"),
            ("Host(a)", 6, "backticks"),
        ];
        for (rule, col, msg) in cases {
            let e = Rule::parse(rule).expect_err(rule);
            assert_eq!(e.column, *col, "{rule}: {e}");
            assert!(e.message.contains(msg), "{rule}: {e}");
        }
    }

    #[test]
    fn default_priority_is_the_rule_length() {
        let short = Rule::parse("PathPrefix(`/`)").unwrap();
        let long = Rule::parse("PathPrefix(`/api`)").unwrap();
        assert!(long.default_priority > short.default_priority);
    }

    #[test]
    fn tcp_matchers() {
        let h2 = [b"h2".to_vec(), b"http/1.1".to_vec()];
        let conn = |sni: Option<&'static str>| ConnView {
            sni,
            alpn: &h2,
            client_ip: "10.1.2.3".parse().unwrap(),
        };
        let table: &[(&str, Option<&str>, bool)] = &[
            ("HostSNI(`a.example`)", Some("a.example"), true),
            ("HostSNI(`A.Example`)", Some("a.example"), true),
            ("HostSNI(`a.example`)", Some("b.example"), false),
            ("HostSNI(`a.example`)", None, false),
            ("HostSNI(`x`, `b.example`)", Some("b.example"), true),
            ("HostSNI(`*.example`)", Some("b.example"), true),
            ("HostSNI(`*.example`)", Some("example"), false),
            ("HostSNI(`*.example`)", Some("a.b.example"), false),
            ("HostSNI(`*.example`)", Some("bexample"), false),
            ("HostSNI(`*.example`)", Some(".example"), false),
            ("HostSNI(`*`)", None, true),
            ("HostSNI(`*`)", Some("anything"), true),
            ("HostSNIRegexp(`^.+\\.example$`)", Some("a.b.example"), true),
            ("HostSNIRegexp(`.+`)", None, false),
            ("ALPN(`h2`)", Some("a"), true),
            ("ALPN(`imap`, `http/1.1`)", Some("a"), true),
            ("ALPN(`imap`)", Some("a"), false),
            ("ClientIP(`10.0.0.0/8`)", None, true),
            (
                "HostSNI(`a`) && ClientIP(`192.168.0.0/16`)",
                Some("a"),
                false,
            ),
            (
                "HostSNI(`a`) || ClientIP(`192.168.0.0/16`)",
                Some("a"),
                true,
            ),
            (
                "!HostSNI(`a`) && (HostSNI(`b`) || ALPN(`h2`))",
                Some("c"),
                true,
            ),
        ];
        for (rule, sni, want) in table {
            let r = TcpRule::parse(rule, true).unwrap_or_else(|e| panic!("{rule}: {e}"));
            assert_eq!(r.matches(&conn(*sni)), *want, "{rule} on {sni:?}");
        }
        // Plain TCP: the catch-all and addresses only.
        assert!(TcpRule::parse("HostSNI(`*`)", false)
            .unwrap()
            .matches(&conn(None)));
        assert!(
            TcpRule::parse("HostSNI(`*`) && !ClientIP(`10.0.0.0/8`)", false)
                .unwrap()
                .matches(&conn(None))
                .eq(&false)
        );
    }

    #[test]
    fn tcp_rule_errors_point_at_the_column() {
        let cases: &[(&str, bool, usize, &str)] = &[
            ("HostSNI(`a.example`)", false, 9, "only HostSNI(`*`)"),
            ("HostSNI(`*`, `a`)", false, 14, "only HostSNI(`*`)"),
            ("ALPN(`h2`)", false, 1, "needs tls"),
            ("HostSNIRegexp(`.*`)", false, 1, "needs tls"),
            ("Host(`a`)", true, 1, "TCP routers have"),
            ("PathPrefix(`/`)", false, 1, "unknown matcher"),
            ("HostSNI(`a.*.example`)", true, 9, "wildcard"),
            ("HostSNI(`a..example`)", true, 9, "not a server name"),
            ("HostSNI(`a b`)", true, 9, "not a server name"),
            ("HostSNI(`a`) && ", true, 17, "HostSNI(`…`)"),
            ("ALPN(`acme-tls/1`)", true, 6, "reserved"),
            ("ClientIP(`300.0.0.1`)", true, 10, "not an address"),
        ];
        for (rule, tls, col, msg) in cases {
            let e = TcpRule::parse(rule, *tls).expect_err(rule);
            assert_eq!(e.column, *col, "{rule}: {e}");
            assert!(e.message.contains(msg), "{rule}: {e}");
        }
        // And HTTP rules do not know the TCP matchers.
        assert!(Rule::parse("HostSNI(`a`)").is_err());
    }
}
