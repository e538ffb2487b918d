//! End to end for the L7 tier: a `local` VIP's packets pass the XDP program to this host, where
//! the proxy routes them to the registry's instances. Run one at a time (`--test-threads=1`).

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use lb_tests::{
    lab::{lb_bin, Lab, Mode},
    server::http,
};

#[test]
fn local_vip_reaches_the_proxy_through_xdp() -> Result<()> {
    let mut lab = Lab::new("lbt", "l7", Mode::Local, 3, false)?;
    lab.start_servers()?;
    let proxy = "\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:80\"\n\n\
                 [[router]]\nname = \"all\"\nrule = \"PathPrefix(`/`)\"\nservice = \"web\"\n\n\
                 [[router]]\nname = \"none\"\nrule = \"Path(`/nowhere`)\"\nservice = \"empty\"\n";
    lab.start_agent_with(&[1, 1, 1], proxy, &lb_bin())?;
    lab.assert_native()?;
    let vip = lab.vip();
    let (answers, failed, unrouted) = lab.client.run(move || {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed = 0;
        for _ in 0..90 {
            match http(vip, "GET", "/hello", None, None) {
                Ok((200, body)) => *seen.entry(body.trim().to_string()).or_insert(0) += 1,
                _ => failed += 1,
            }
        }
        let unrouted = http(vip, "GET", "/nowhere", None, None)
            .map(|r| r.0)
            .unwrap_or(0);
        (seen, failed, unrouted)
    })?;
    println!("l7: {answers:?}, {failed} failed");
    ensure!(
        failed == 0,
        "{failed} requests through the local VIP failed"
    );
    // Smooth round robin over three equal upstreams: exactly a third each.
    ensure!(
        answers.len() == 3 && answers.values().all(|n| *n == 30),
        "{answers:?}"
    );
    ensure!(
        unrouted == 503,
        "a router whose service has no instances answers 503, got {unrouted}"
    );
    let (code, stats) = lab.api("GET", "/api/v1/stats", None)?;
    ensure!(code == 200, "stats: {code}");
    let v: serde_json::Value = serde_json::from_str(&stats)?;
    let local = v["verdicts"]["pass_local"].as_u64().unwrap_or(0);
    ensure!(
        local >= 91,
        "the program passed only {local} packets as local for 91 requests"
    );
    Ok(())
}
