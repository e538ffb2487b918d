//! bird2 as lb drives it: the include file lb writes (static routes for the VIPs, one BGP
//! session per neighbour) and bird's control socket, spoken directly (the protocol `birdc`
//! speaks: a command line out, reply lines `NNNN-text` until one `NNNN text`).

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::model::bgp::{Announce, BgpSpec, Session};

/// Every command is answered within this, or bird is taken as unreachable.
const TIMEOUT: Duration = Duration::from_secs(5);
/// A reply longer than this is not one lb asked for.
const MAX_REPLY: usize = 1 << 20;

pub const STATIC4: &str = "lb_vips4";
pub const STATIC6: &str = "lb_vips6";

/// The name of the session with neighbour `i`.
pub fn session_name(i: usize) -> String {
    format!("lb_n{i}")
}

/// The include file for `announce`: whole, so bird's state after `configure` depends on it
/// alone. Static routes are bound to the interface: when the link goes, bird withdraws them
/// itself, agent or no agent.
pub fn render(spec: &BgpSpec, node: &str, announce: &Announce) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by lb for node {node}: rewritten on every change, do not edit.\n\
         # bird.conf needs a router id, `protocol device {{}}` and `include \"{}\";`.\n",
        spec.include.display()
    );
    for (name, v6) in [(STATIC4, false), (STATIC6, true)] {
        let _ = writeln!(
            out,
            "protocol static {name} {{\n    {};",
            if v6 { "ipv6" } else { "ipv4" }
        );
        for a in announce.iter().filter(|a| a.is_ipv6() == v6) {
            let len = if v6 { 128 } else { 32 };
            let _ = writeln!(out, "    route {a}/{len} via \"{}\";", spec.interface);
        }
        let _ = writeln!(out, "}}\n");
    }
    let _ = writeln!(
        out,
        "filter lb_export {{\n    if proto != \"{STATIC4}\" && proto != \"{STATIC6}\" then reject;"
    );
    if let Some(med) = spec.med {
        let _ = writeln!(out, "    bgp_med = {med};");
    }
    for (a, b) in &spec.communities {
        let _ = writeln!(out, "    bgp_community.add(({a}, {b}));");
    }
    for (a, b, c) in &spec.large_communities {
        let _ = writeln!(out, "    bgp_large_community.add(({a}, {b}, {c}));");
    }
    let _ = writeln!(out, "    accept;\n}}\n");
    let hold = spec.hold_time.as_secs().max(3);
    for (i, n) in spec.neighbors.iter().enumerate() {
        let family = if n.address.is_ipv6() { "ipv6" } else { "ipv4" };
        let _ = writeln!(
            out,
            "protocol bgp {} {{\n    local as {};\n    neighbor {} port {} as {};\n    \
             hold time {hold};\n    keepalive time {};\n    \
             {family} {{ import none; export filter lb_export; next hop self; }};\n}}\n",
            session_name(i),
            spec.local_as,
            n.address,
            n.port,
            n.asn,
            (hold / 3).max(1),
        );
    }
    out
}

/// The addresses a written include announces (to tell what bird was last told).
pub fn announced_in(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("route "))
        .filter_map(|r| r.split('/').next())
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// One reply line: its code (the last code seen, for continuation lines) and text.
fn split_line(line: &str, last: u16) -> (u16, bool, &str) {
    let b = line.as_bytes();
    if b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && (b[4] == b'-' || b[4] == b' ') {
        let code = line[..4].parse().unwrap_or(0);
        return (code, b[4] == b' ', &line[5..]);
    }
    (last, false, line.strip_prefix(' ').unwrap_or(line))
}

/// A command's reply as (code, text) lines; an error reply (8xxx, 9xxx) is an error with its text.
pub fn parse_reply(text: &str) -> Result<Vec<(u16, String)>> {
    let mut out = Vec::new();
    let mut last = 0;
    for line in text.lines() {
        let (code, _, rest) = split_line(line, last);
        last = code;
        out.push((code, rest.to_string()));
    }
    if let Some((code, t)) = out.iter().find(|(c, _)| *c >= 8000) {
        bail!("bird: {t} ({code})");
    }
    Ok(out)
}

/// bird's control socket.
pub struct Bird<'a> {
    pub socket: &'a Path,
}

impl Bird<'_> {
    /// Runs one command on a fresh connection (bird serves each client in turn; a connection
    /// per command never holds its CLI).
    pub fn command(&self, cmd: &str) -> Result<Vec<(u16, String)>> {
        let s = UnixStream::connect(self.socket)
            .with_context(|| format!("bird's control socket {}", self.socket.display()))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut text = String::new();
        let mut last = 0;
        let mut greeted = false;
        let mut w = s;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).context("reading bird's reply")? == 0 {
                // An I/O error like the others of the connection: bird went away, it refused
                // nothing (see `configure`).
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "bird closed the control connection",
                )
                .into());
            }
            let (code, fin, _) = split_line(line.trim_end_matches('\n'), last);
            last = code;
            if !greeted {
                // The greeting, `0001 BIRD 2.x ready.`, then the command.
                if fin {
                    greeted = true;
                    w.write_all(format!("{cmd}\n").as_bytes())?;
                }
                continue;
            }
            text.push_str(&line);
            if text.len() > MAX_REPLY {
                bail!("bird's reply to {cmd:?} is longer than {MAX_REPLY} bytes");
            }
            if fin {
                break;
            }
        }
        parse_reply(&text)
    }

    /// Checks the configuration (ours included) and then applies it. A configuration bird
    /// refuses is not applied: the error says where. Only bird's answer is a refusal: a socket
    /// that is not there (bird not started yet) or a connection that breaks is "unreachable",
    /// and the include must then stay for bird to read when it starts.
    pub fn configure(&self) -> Result<()> {
        if let Err(e) = self.command("configure check") {
            if e.chain().any(|c| c.is::<std::io::Error>()) {
                return Err(e.context("bird is unreachable"));
            }
            return Err(e.context(REFUSED));
        }
        self.command("configure")?;
        Ok(())
    }

    /// lb's sessions as `show protocols` lists them.
    pub fn sessions(&self, spec: &BgpSpec) -> Result<Vec<Session>> {
        let reply = self.command("show protocols")?;
        Ok(spec
            .neighbors
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let name = session_name(i);
                let row = reply.iter().find_map(|(_, t)| {
                    let mut cols = t.split_whitespace();
                    (cols.next() == Some(name.as_str())).then(|| cols.collect::<Vec<_>>())
                });
                // Name Proto Table State Since Info…
                let (state, info) = match row {
                    Some(cols) if cols.len() >= 4 => (cols[2].to_string(), cols[4..].join(" ")),
                    _ => ("absent".to_string(), String::new()),
                };
                Session {
                    name,
                    neighbor: n.address.to_string(),
                    state,
                    info,
                    exported: None,
                }
            })
            .collect())
    }

    /// How many routes bird exports to session `name` now.
    pub fn exported(&self, name: &str) -> Result<usize> {
        let reply = match self.command(&format!("show route export {name} count")) {
            Ok(r) => r,
            // A session that is not up has no table to export to: it exports nothing.
            Err(e) if format!("{e}").contains("No valid tables") => return Ok(0),
            Err(e) => return Err(e),
        };
        reply
            .iter()
            .rev()
            .find_map(|(_, t)| t.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow!("bird: no count in {reply:?}"))
    }
}

/// What a configuration bird answered with an error is said as.
const REFUSED: &str = "bird refused the configuration";

/// Replaces `path` with `text` (write, fsync, rename), so bird never reads half of it.
pub fn write_include(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("lb-tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Writes `announce` and has bird apply it; a refused configuration puts the previous file
/// back (bird keeps running on it) and is the error.
pub fn apply(spec: &BgpSpec, node: &str, announce: &Announce) -> Result<()> {
    let text = render(spec, node, announce);
    let before = std::fs::read_to_string(&spec.include).ok();
    write_include(&spec.include, &text)?;
    let bird = Bird {
        socket: &spec.socket,
    };
    match bird.configure() {
        Ok(()) => Ok(()),
        Err(e) => {
            let refused = format!("{e:#}").contains(REFUSED);
            if refused {
                match &before {
                    Some(old) => write_include(&spec.include, old)?,
                    None => {
                        let _ = std::fs::remove_file(&spec.include);
                    }
                }
            }
            // Unreachable: the file stays, and bird reads it when it starts.
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::bgp::Neighbor;

    fn spec() -> BgpSpec {
        BgpSpec {
            socket: "/run/bird/bird.ctl".into(),
            include: "/etc/bird/lb.conf".into(),
            local_as: 65001,
            neighbors: vec![
                Neighbor {
                    address: "10.20.0.1".parse().unwrap(),
                    asn: 65000,
                    port: 179,
                },
                Neighbor {
                    address: "fd20::1".parse().unwrap(),
                    asn: 65000,
                    port: 1179,
                },
            ],
            hold_time: Duration::from_secs(9),
            med: Some(50),
            communities: vec![(65001, 100)],
            large_communities: vec![(65001, 1, 2)],
            interface: "eth0".into(),
            drain: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_include_names_each_vip_once_per_family_and_each_session() {
        let announce: Announce = ["10.0.0.100", "fd00::100", "10.0.0.101"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let text = render(&spec(), "lb-a", &announce);
        assert!(text.contains("protocol static lb_vips4 {\n    ipv4;\n    route 10.0.0.100/32 via \"eth0\";\n    route 10.0.0.101/32 via \"eth0\";\n}"), "{text}");
        assert!(text.contains("route fd00::100/128 via \"eth0\";"), "{text}");
        assert!(text.contains("neighbor 10.20.0.1 port 179 as 65000;\n    hold time 9;\n    keepalive time 3;\n    ipv4 {"), "{text}");
        assert!(
            text.contains("neighbor fd20::1 port 1179 as 65000;"),
            "{text}"
        );
        assert!(
            text.contains("bgp_med = 50;") && text.contains("bgp_community.add((65001, 100));")
        );
        assert!(text.contains("bgp_large_community.add((65001, 1, 2));"));
        let mut back = announced_in(&text);
        back.sort();
        assert_eq!(back, announce.iter().copied().collect::<Vec<_>>());
        let empty = render(&spec(), "lb-a", &Announce::new());
        assert!(announced_in(&empty).is_empty());
        assert!(
            empty.contains("protocol static lb_vips4 {\n    ipv4;\n}"),
            "{empty}"
        );
    }

    #[test]
    fn replies_are_split_by_code_and_errors_are_errors() {
        let ok = "2002-Name       Proto      Table      State  Since         Info\n\
                  1002-device1    Device     ---        up     12:00:00.000  \n \
                  lb_n0      BGP        ---        up     12:00:01.000  Established   \n\
                  0000 \n";
        let r = parse_reply(ok).unwrap();
        assert_eq!(r[2].0, 1002, "a continuation line keeps the code");
        assert!(r[2].1.starts_with("lb_n0"));
        let bad = "0002-Reading configuration from /etc/bird/bird.conf\n\
                   8002 /etc/bird/lb.conf:4:5 syntax error, unexpected CF_SYM_UNDEFINED\n";
        let e = parse_reply(bad).unwrap_err().to_string();
        assert!(e.contains("lb.conf:4:5 syntax error"), "{e}");
    }

    /// bird not started yet (its socket absent, or nobody listening on it): the include is
    /// written and stays, for bird to read when it starts. CI saw the opposite once: the file
    /// taken back, and the bird started next refusing to start without it.
    #[test]
    fn an_unreachable_bird_keeps_the_include() {
        let dir = std::env::temp_dir().join(format!("lb-bird-absent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut spec = spec();
        spec.include = dir.join("lb.conf");
        let announce: Announce = ["10.0.0.100".parse().unwrap()].into_iter().collect();
        // No socket at all.
        spec.socket = dir.join("absent.ctl");
        let e = apply(&spec, "lb-a", &announce).expect_err("no bird");
        assert!(format!("{e:#}").contains("unreachable"), "{e:#}");
        assert_eq!(
            std::fs::read_to_string(&spec.include).unwrap(),
            render(&spec, "lb-a", &announce)
        );
        // A socket file nobody listens on (bird died): the same.
        spec.socket = dir.join("dead.ctl");
        drop(std::os::unix::net::UnixListener::bind(&spec.socket).unwrap());
        let more: Announce = ["10.0.0.101".parse().unwrap()].into_iter().collect();
        let e = apply(&spec, "lb-a", &more).expect_err("no bird");
        assert!(format!("{e:#}").contains("unreachable"), "{e:#}");
        assert_eq!(
            std::fs::read_to_string(&spec.include).unwrap(),
            render(&spec, "lb-a", &more)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
