//! `lb status`: VIPs, backends with health and live rates, routers, providers and their last
//! errors, in a terminal — from the admin API, as an operator would read it.
//!
//! Rates need two samples: [`fetch`] reads the API, [`render`] compares a sample with the one
//! before it (pure, so it is tested without an agent).

use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use anyhow::Result;
use serde_json::Value;

use super::client::ApiClient;

/// What one look at the API returns.
pub struct Sample {
    pub at: Instant,
    pub vips: Value,
    pub services: Value,
    pub status: Value,
    pub routers: Value,
}

/// Reads the four views the status needs (blocking).
pub fn fetch(api: &ApiClient) -> Result<Sample> {
    Ok(Sample {
        vips: api.get_json("/api/v1/vips")?,
        services: api.get_json("/api/v1/services")?,
        status: api.get_json("/api/v1/status")?,
        routers: api.get_json("/api/v1/routers")?,
        at: crate::clock::now(),
    })
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn host_port(addr: &str, port: u64) -> String {
    match (addr.contains(':'), port) {
        (_, 0) => addr.to_string(),
        (true, p) => format!("[{addr}]:{p}"),
        (false, p) => format!("{addr}:{p}"),
    }
}

fn rate(now: u64, before: Option<u64>, dt: f64) -> String {
    match before {
        Some(b) if dt > 0.0 && now >= b => human((now - b) as f64 / dt),
        _ => "-".into(),
    }
}

fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.1}")
    }
}

/// Counters of one sample, keyed for the next one's rates.
fn counters(sample: &Sample) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for v in sample.vips["vips"].as_array().into_iter().flatten() {
        let name = s(&v["name"]);
        out.insert(format!("vip/{name}/p"), u(&v["counters"]["packets"]));
        out.insert(format!("vip/{name}/b"), u(&v["counters"]["bytes"]));
        for b in v["backends"].as_array().into_iter().flatten() {
            let key = host_port(s(&b["address"]), u(&b["port"]));
            out.insert(format!("be/{name}/{key}"), u(&b["counters"]["packets"]));
        }
    }
    for r in sample.routers["routers"].as_array().into_iter().flatten() {
        out.insert(format!("rt/{}", s(&r["name"])), u(&r["requests"]["total"]));
    }
    out
}

/// The status screen for `cur`, with rates against `prev` when given.
pub fn render(prev: Option<&Sample>, cur: &Sample) -> String {
    let before = prev.map(counters).unwrap_or_default();
    let dt = prev.map_or(0.0, |p| cur.at.duration_since(p.at).as_secs_f64());
    let was = |k: String| before.get(&k).copied();
    let mut o = String::new();
    let apply = &cur.status["apply"];
    let _ = writeln!(
        o,
        "lb status   generation {}   {} applies   last change→maps {:.1} ms",
        u(&apply["generation"]),
        u(&apply["applies"]),
        u(&apply["last_change_to_map_us"]) as f64 / 1000.0
    );
    if let Some(e) = apply["last_config_error"].as_str() {
        let _ = writeln!(o, "CONFIG REJECTED (the last good one stays): {e}");
    }
    // Health by (VIP, backend) from the services view.
    let mut health: BTreeMap<(String, String), bool> = BTreeMap::new();
    if let Some(svcs) = cur.services["services"].as_object() {
        for list in svcs.values() {
            for i in list.as_array().into_iter().flatten() {
                let addr = host_port(s(&i["instance"]["address"]), u(&i["instance"]["port"]));
                for (vip, up) in i["health_up"].as_object().into_iter().flatten() {
                    health.insert((vip.clone(), addr.clone()), up.as_bool().unwrap_or(false));
                }
            }
        }
    }
    let _ = writeln!(o, "\nVIPS");
    let vips = cur.vips["vips"].as_array().cloned().unwrap_or_default();
    if vips.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    for v in &vips {
        let name = s(&v["name"]);
        let c = &v["counters"];
        let bytes_rate = match was(format!("vip/{name}/b")) {
            Some(b) if dt > 0.0 && u(&c["bytes"]) >= b => {
                format!("{:.2} Mb/s", (u(&c["bytes"]) - b) as f64 * 8.0 / dt / 1e6)
            }
            _ => "-".into(),
        };
        let _ = writeln!(
            o,
            "  {name:<12} {:<24} {:<6} service {:<12} {:>9} pkt/s  {:>12}  {} packets",
            format!(
                "{}/{}",
                host_port(s(&v["address"]), u(&v["port"])),
                s(&v["protocol"])
            ),
            s(&v["mode"]),
            s(&v["service"]),
            rate(u(&c["packets"]), was(format!("vip/{name}/p")), dt),
            bytes_rate,
            u(&c["packets"]),
        );
        let _ = writeln!(
            o,
            "    {:<26} {:<9} {:<7} {:>6} {:>7} {:>9} {:>10} {:>8}",
            "BACKEND", "STATE", "HEALTH", "WEIGHT", "SLOTS", "PKT/S", "PACKETS", "FLOWS"
        );
        for b in v["backends"].as_array().into_iter().flatten() {
            let addr = host_port(s(&b["address"]), u(&b["port"]));
            let h = match health.get(&(name.to_string(), addr.clone())) {
                Some(true) => "up",
                Some(false) => "down",
                None => "-",
            };
            let _ = writeln!(
                o,
                "    {addr:<26} {:<9} {h:<7} {:>6} {:>7} {:>9} {:>10} {:>8}",
                s(&b["state"]),
                u(&b["weight"]),
                u(&b["slots"]),
                rate(
                    u(&b["counters"]["packets"]),
                    was(format!("be/{name}/{addr}")),
                    dt
                ),
                u(&b["counters"]["packets"]),
                u(&b["counters"]["new_flows"]),
            );
        }
    }
    let routers = cur.routers["routers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !routers.is_empty() {
        let _ = writeln!(o, "\nROUTERS");
        let _ = writeln!(
            o,
            "  {:<16} {:<14} {:>9} {:>10} {:>7}  RULE",
            "NAME", "SERVICE", "REQ/S", "REQUESTS", "5XX"
        );
        for r in &routers {
            let name = s(&r["name"]);
            let _ = writeln!(
                o,
                "  {name:<16} {:<14} {:>9} {:>10} {:>7}  {}",
                s(&r["service"]),
                rate(u(&r["requests"]["total"]), was(format!("rt/{name}")), dt),
                u(&r["requests"]["total"]),
                u(&r["requests"]["5xx"]),
                s(&r["rule"]),
            );
        }
    }
    let _ = writeln!(o, "\nPROVIDERS");
    let _ = writeln!(
        o,
        "  {:<28} {:<8} {:>9} {:>14} {:>7}  LAST ERROR",
        "NAME", "STATUS", "INSTANCES", "LAST SUCCESS", "ERRORS"
    );
    let now = crate::clock::wall()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for (name, p) in cur.status["providers"].as_object().into_iter().flatten() {
        let last = match p["last_success_unix"].as_u64() {
            Some(t) => format!("{}s ago", now.saturating_sub(t)),
            None => "never".into(),
        };
        let err = p["last_error"].as_str();
        let _ = writeln!(
            o,
            "  {name:<28} {:<8} {:>9} {last:>14} {:>7}  {}",
            if err.is_some() { "FAILING" } else { "ok" },
            u(&p["instances"]),
            u(&p["errors"]),
            err.unwrap_or("-"),
        );
    }
    let bgp = &cur.status["bgp"];
    if bgp.is_object() {
        let announced: Vec<&str> = bgp["announced"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let _ = writeln!(
            o,
            "\nBGP   announcing {}",
            if announced.is_empty() {
                "nothing".to_string()
            } else {
                announced.join(", ")
            }
        );
        if let Some(e) = bgp["error"].as_str() {
            let _ = writeln!(o, "  error: {e}");
        }
        for x in bgp["sessions"].as_array().into_iter().flatten() {
            let _ = writeln!(
                o,
                "  {:<8} {:<28} {:<6} {:>4} exported  {}",
                s(&x["name"]),
                s(&x["neighbor"]),
                s(&x["state"]),
                x["exported"]
                    .as_u64()
                    .map_or("-".to_string(), |n| n.to_string()),
                s(&x["info"]),
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(at: Instant, packets: u64, requests: u64) -> Sample {
        Sample {
            at,
            vips: json!({"vips": [{
                "name": "web", "address": "10.0.0.100", "port": 80, "protocol": "tcp",
                "mode": "dsr", "service": "web",
                "counters": {"packets": packets, "bytes": packets * 100, "new_flows": 3},
                "backends": [
                    {"address": "10.0.0.11", "port": 0, "weight": 1, "state": "active", "slots": 100,
                     "counters": {"packets": packets, "bytes": 0, "new_flows": 3}},
                    {"address": "10.0.0.12", "port": 0, "weight": 1, "state": "draining", "slots": 0,
                     "counters": {"packets": 0, "bytes": 0, "new_flows": 0}}]}]}),
            services: json!({"services": {"web": [
                {"instance": {"address": "10.0.0.11", "port": 0, "weight": 1}, "health_up": {"web": true}},
                {"instance": {"address": "10.0.0.12", "port": 0, "weight": 1}, "health_up": {"web": false}}]}}),
            status: json!({"providers": {"redis": {"instances": 2, "errors": 4, "last_error": "connection refused"}},
                           "apply": {"generation": 7, "applies": 3, "last_change_to_map_us": 1500,
                                     "last_config_error": "lb.toml:3: vip[0].port: bad"}}),
            routers: json!({"routers": [{"name": "all", "service": "web", "rule": "PathPrefix(`/`)",
                                         "requests": {"total": requests, "5xx": 1}}]}),
        }
    }

    #[test]
    fn shows_states_health_rates_and_errors() {
        let t0 = crate::clock::now();
        let a = sample(t0, 1000, 10);
        let b = sample(t0 + std::time::Duration::from_secs(2), 3000, 30);
        let out = render(Some(&a), &b);
        let line = |needle: &str| {
            out.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no line with {needle:?} in\n{out}"))
                .to_string()
        };
        // 2,000 packets in 2 s; 20 requests in 2 s.
        assert!(line("10.0.0.100:80/tcp").contains("1000.0 pkt/s"), "{out}");
        let b11 = line("10.0.0.11 ");
        assert!(
            b11.contains("active") && b11.contains(" up ") && b11.contains("1000.0"),
            "{b11}"
        );
        let b12 = line("10.0.0.12 ");
        assert!(b12.contains("draining") && b12.contains("down"), "{b12}");
        assert!(line("PathPrefix").contains("10.0"), "{out}");
        assert!(line("redis").contains("FAILING") && line("redis").contains("connection refused"));
        assert!(out.contains("CONFIG REJECTED") && out.contains("generation 7"));
        // Without a previous sample there are no rates.
        let first = render(None, &b);
        assert!(
            !first.contains("1000.0 pkt/s") && first.contains("10.0.0.11"),
            "{first}"
        );
    }
}

/// `lb status --cluster`: one line per node, one per VIP with each node's table digest, and the
/// nodes that part from the majority marked `!` (pure: tested on a recorded answer).
pub fn render_cluster(v: &Value) -> String {
    let mut out = String::new();
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "cluster {} (answered by {}): {} node{}, {}",
        s(&v["cluster"]),
        s(&v["node"]),
        nodes.len(),
        if nodes.len() == 1 { "" } else { "s" },
        if v["agree"].as_bool() == Some(true) {
            "tables agree"
        } else {
            "TABLES DISAGREE"
        }
    );
    let _ = writeln!(
        out,
        "\n{:<20} {:>10} {:>10}  version",
        "node", "store rev", "generation"
    );
    for n in &nodes {
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:>10}  {}",
            s(&n["node"]),
            n["store_revision"].as_i64().unwrap_or(0),
            u(&n["generation"]),
            s(&n["version"])
        );
    }
    let flagged: Vec<(String, String)> = v["disagreements"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|x| (s(&x["node"]).to_string(), s(&x["vip"]).to_string()))
                .collect()
        })
        .unwrap_or_default();
    let mut vips: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
    for n in &nodes {
        for x in n["vips"].as_array().into_iter().flatten() {
            vips.entry(s(&x["name"]).to_string()).or_default().push((
                s(&n["node"]).to_string(),
                x["table_digest"].as_str().unwrap_or("-").to_string(),
                format!("{}/{}", u(&x["active"]), u(&x["backends"])),
            ));
        }
    }
    for (vip, seen) in &vips {
        let _ = writeln!(out, "\nvip {vip}");
        for (node, digest, active) in seen {
            let mark = if flagged.iter().any(|(n, v)| n == node && v == vip) {
                "!"
            } else {
                " "
            };
            let _ = writeln!(
                out,
                " {mark} {node:<18} table {digest:<16}  active {active}"
            );
        }
    }
    for (node, vip) in &flagged {
        if !vips
            .get(vip)
            .is_some_and(|s| s.iter().any(|(n, _, _)| n == node))
        {
            let _ = writeln!(out, "\n! {node} has no VIP {vip}");
        }
    }
    for r in v["rejected"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "rejected status record {}", s(r));
    }
    out
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    #[test]
    fn a_node_with_another_table_is_marked() {
        let v = serde_json::json!({
            "cluster": "edge", "node": "a", "agree": false,
            "nodes": [
                {"node": "a", "store_revision": 7, "generation": 3, "version": "0.1.0",
                 "vips": [{"name": "web", "table_digest": "00aa", "active": 2, "backends": 2}]},
                {"node": "b", "store_revision": 7, "generation": 5, "version": "0.1.0",
                 "vips": [{"name": "web", "table_digest": "00bb", "active": 1, "backends": 2}]},
                {"node": "c", "store_revision": 7, "generation": 4, "version": "0.1.0",
                 "vips": [{"name": "web", "table_digest": "00aa", "active": 2, "backends": 2}]}
            ],
            "disagreements": [{"node": "b", "vip": "web", "digest": "00bb", "majority": "00aa"}],
            "rejected": []
        });
        let out = render_cluster(&v);
        assert!(out.contains("3 nodes, TABLES DISAGREE"), "{out}");
        assert!(out.contains(" ! b                  table 00bb"), "{out}");
        assert!(out.contains("   a                  table 00aa"), "{out}");
    }
}
