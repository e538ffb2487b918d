//! Router rules, Traefik's language: matchers combined with `&&`, `||`, `!` and parentheses.
//!
//! ```text
//! Host(`example.com`) && (PathPrefix(`/api`) || Header(`X-Api`, `1`)) && !Method(`DELETE`)
//! ```
//! Matchers: `Host`, `HostRegexp`, `Path`, `PathPrefix`, `PathRegexp`, `Method`, `Header`, `Query`,
//! `ClientIP` (an address or CIDR). Arguments are in backticks or double quotes; `Host`, `Method`
//! and `ClientIP` accept several (any may match). A rule is compiled once per configuration —
//! regexes included — into a [`Rule`] evaluated per request without allocating. Errors give the
//! column (1-based) where the rule stops making sense.

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
    Query(String, String),
    ClientIp(Vec<IpNet>),
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    expr: Expr,
    /// The rule's text length: Traefik's default priority (the longer rule wins).
    pub default_priority: i64,
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
            _ => self.fail("expected a matcher such as Host(`…`), `!` or `(`"),
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
        let regex = |(col, s): &(usize, String)| {
            Regex::new(&format!("^(?:{s})$")).map_err(|e| RuleError {
                column: *col,
                message: format!("bad regex: {e}"),
            })
        };
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
            "Query" => {
                arity(2)?;
                Expr::Query(args[0].1.clone(), args[1].1.clone())
            }
            "ClientIP" => {
                let mut nets = Vec::new();
                for (col, a) in &args {
                    let net = a
                        .parse::<IpNet>()
                        .or_else(|_| a.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| RuleError {
                            column: *col,
                            message: format!("{a:?} is not an address or CIDR"),
                        })?;
                    nets.push(net);
                }
                Expr::ClientIp(nets)
            }
            other => {
                return Err(RuleError {
                    column: name_col,
                    message: format!("unknown matcher {other:?}"),
                });
            }
        })
    }
}

impl Rule {
    pub fn parse(src: &str) -> Result<Rule, RuleError> {
        let toks = lex(src)?;
        let mut p = Parser {
            toks: &toks,
            pos: 0,
            end_col: src.chars().count() + 1,
        };
        let expr = p.or()?;
        if p.pos != toks.len() {
            return p.fail("expected `&&`, `||` or the end of the rule");
        }
        Ok(Rule {
            expr,
            default_priority: src.len() as i64,
        })
    }

    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        eval(&self.expr, r)
    }
}

fn eval(e: &Expr, r: &RequestView<'_>) -> bool {
    match e {
        Expr::And(a, b) => eval(a, r) && eval(b, r),
        Expr::Or(a, b) => eval(a, r) || eval(b, r),
        Expr::Not(a) => !eval(a, r),
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
        Expr::Query(k, v) => r.query.is_some_and(|q| {
            q.split('&').any(|kv| {
                kv.split_once('=').map_or((kv, ""), |(a, b)| (a, b)) == (k.as_str(), v.as_str())
            })
        }),
        Expr::ClientIp(nets) => nets.iter().any(|n| n.contains(&r.client_ip)),
    }
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
}
