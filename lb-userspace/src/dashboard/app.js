// lb dashboard: reads the admin API with the token the operator typed (kept in this tab's
// sessionStorage only) and redraws every POLL_MS. Every value goes into the page as text
// (textContent), never as markup.
"use strict";

const POLL_MS = 2000;
const KEY = "lb-admin-token";
let timer = null;
let paused = false;
let previous = null; // { at, vips: {vip: counters}, backends: {vip|addr: counters}, routers: {name: total} }

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function fmtNum(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  const a = Math.abs(n);
  if (a >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (n / 1e3).toFixed(1) + "k";
  if (Number.isInteger(n)) return String(n);
  return n.toFixed(a < 10 ? 1 : 0);
}

function fmtBits(bytesPerSec) {
  if (bytesPerSec === null || bytesPerSec === undefined) return "–";
  const b = bytesPerSec * 8;
  if (b >= 1e9) return (b / 1e9).toFixed(2) + " Gb/s";
  if (b >= 1e6) return (b / 1e6).toFixed(2) + " Mb/s";
  if (b >= 1e3) return (b / 1e3).toFixed(1) + " kb/s";
  return b.toFixed(0) + " b/s";
}

function ago(unix) {
  if (!unix) return "never";
  const s = Math.max(0, Date.now() / 1000 - unix);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function hostPort(addr, port) {
  const a = addr.includes(":") ? "[" + addr + "]" : addr;
  return port ? a + ":" + port : addr;
}

class Unauthorized extends Error {}

async function api(path, token) {
  const r = await fetch(path, {
    headers: { Authorization: "Bearer " + token },
    cache: "no-store",
    credentials: "omit",
  });
  if (r.status === 401) throw new Unauthorized();
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

function showLogin(message) {
  if (timer) clearTimeout(timer);
  timer = null;
  previous = null;
  $("app").hidden = true;
  $("meta").hidden = true;
  // Nothing of a previous session stays in the page.
  for (const id of ["alerts", "tiles", "vips", "routers", "services", "providers", "verdicts"]) {
    $(id).replaceChildren();
  }
  $("login").hidden = false;
  const err = $("login-error");
  err.hidden = !message;
  err.textContent = message || "";
  $("token").focus();
}

function showApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("meta").hidden = false;
}

function rate(now, before, dt) {
  if (before === undefined || dt <= 0 || now < before) return null;
  return (now - before) / dt;
}

function badge(text, cls) {
  return el("span", { class: "badge " + (cls || text) }, text);
}

function renderTiles(d, r) {
  const backends = d.vips.flatMap((v) => v.backends);
  const count = (s) => backends.filter((b) => b.state === s).length;
  const tile = (k, v, s) => el("div", { class: "tile" }, el("div", { class: "k" }, k), el("div", { class: "v" }, v), el("div", { class: "s" }, s || ""));
  const reqRate = r.reqRate === null ? "–" : fmtNum(r.reqRate);
  $("tiles").replaceChildren(
    tile("VIPs", d.vips.length, d.vips.map((v) => v.name).join(", ")),
    tile("Backends", backends.length, `${count("active")} active · ${count("draining")} draining · ${count("down")} down`),
    tile("Packets/s", r.pps === null ? "–" : fmtNum(r.pps), fmtBits(r.bps)),
    tile("Requests/s", reqRate, `${d.routers.routers.length} routers`),
    tile("Tracked flows", fmtNum(d.stats.tracked_flows), "connection tracking"),
    tile("Generation", d.status.apply.generation, `${d.status.apply.applies} applies · last ${(d.status.apply.last_change_to_map_us / 1000).toFixed(1)} ms`),
  );
}

function renderAlerts(d) {
  const out = [];
  const cfgErr = d.status.apply.last_config_error;
  if (cfgErr) {
    out.push(el("div", { class: "alert bad", id: "config-error" }, el("b", {}, "Config rejected"), cfgErr, el("span", { class: "muted" }, " — the last good configuration stays in force.")));
  }
  for (const [name, p] of Object.entries(d.status.providers)) {
    if (p.last_error) {
      out.push(el("div", { class: "alert warn" }, el("b", {}, "Provider " + name), p.last_error));
    }
    // Broken routers, services, middlewares: each kept at its last good version or left out.
    for (const b of p.broken || []) {
      out.push(el("div", { class: "alert warn", "data-broken": name }, el("b", {}, "Provider " + name + ": broken item"), b));
    }
  }
  $("alerts").replaceChildren(...out);
}

function renderVips(d, dt) {
  const cards = d.vips.map((v) => {
    const prevV = previous && previous.vips[v.name];
    const pps = prevV ? rate(v.counters.packets, prevV.packets, dt) : null;
    const bps = prevV ? rate(v.counters.bytes, prevV.bytes, dt) : null;
    const fps = prevV ? rate(v.counters.new_flows, prevV.new_flows, dt) : null;
    const slotsTotal = v.backends.reduce((a, b) => a + b.slots, 0) || 1;
    const health = d.health[v.name] || {};
    const rows = v.backends.map((b) => {
      const key = v.name + "|" + b.address + "|" + b.port;
      const pb = previous && previous.backends[key];
      const bpps = pb ? rate(b.counters.packets, pb.packets, dt) : null;
      const addr = hostPort(b.address, b.port);
      const h = health[addr];
      const share = (100 * b.slots) / slotsTotal;
      return el("tr", { "data-backend": b.address, "data-state": b.state },
        el("td", { class: "mono" }, addr),
        el("td", {}, badge(b.state)),
        el("td", {}, h === undefined ? el("span", { class: "muted" }, "–") : badge(h ? "up" : "down")),
        el("td", { class: "num" }, b.weight),
        el("td", {}, el("div", { class: "bar", title: `${b.slots} Maglev slots (${share.toFixed(1)}%)` }, el("i", { style: `width:${share.toFixed(1)}%` }))),
        el("td", { class: "num" }, bpps === null ? "–" : fmtNum(bpps)),
        el("td", { class: "num" }, fmtNum(b.counters.packets)),
        el("td", { class: "num" }, fmtNum(b.counters.new_flows)),
      );
    });
    const table = el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "Backend"), el("th", {}, "State"), el("th", {}, "Health"), el("th", { class: "num" }, "Weight"), el("th", {}, "Maglev share"), el("th", { class: "num" }, "pkt/s"), el("th", { class: "num" }, "Packets"), el("th", { class: "num" }, "Flows"))),
      el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 8, class: "empty" }, "no backends"))),
    );
    return el("div", { class: "card vip", "data-vip": v.name },
      el("div", { class: "vip-head" },
        el("div", {},
          el("div", { class: "vip-name" }, v.name, " ", badge(v.mode, "mode")),
          el("div", { class: "vip-addr" }, `${hostPort(v.address, v.port)}/${v.protocol} → service ${v.service}`)),
        el("div", { class: "rates" },
          el("div", {}, el("b", {}, pps === null ? "–" : fmtNum(pps)), el("span", {}, "pkt/s")),
          el("div", {}, el("b", {}, fmtBits(bps)), el("span", {}, "traffic")),
          el("div", {}, el("b", {}, fps === null ? "–" : fmtNum(fps)), el("span", {}, "new flows/s")))),
      table);
  });
  $("vips").replaceChildren(...(cards.length ? cards : [el("div", { class: "card empty" }, "no VIPs configured")]));
}

function renderRouters(d, dt) {
  const rows = d.routers.routers.map((r) => {
    const before = previous && previous.routers[r.name];
    const rps = before === undefined ? null : rate(r.requests.total, before, dt);
    const errs = r.requests["5xx"];
    return el("tr", { "data-router": r.name },
      el("td", {}, el("b", {}, r.name), el("div", { class: "mono muted" }, r.rule)),
      el("td", {}, r.service),
      el("td", {}, (r.entrypoints.length ? r.entrypoints : ["all"]).map((e) => el("span", { class: "chip" }, e))),
      el("td", {}, r.middlewares.length ? r.middlewares.map((m) => el("span", { class: "chip" }, m)) : el("span", { class: "muted" }, "–")),
      el("td", { class: "num" }, rps === null ? "–" : fmtNum(rps)),
      el("td", { class: "num" }, fmtNum(r.requests.total)),
      el("td", { class: "num" }, errs ? badge(fmtNum(errs), "bad") : "0"),
    );
  });
  for (const t of d.routers.tcp_routers) {
    rows.push(el("tr", { "data-router": t.name },
      el("td", {}, el("b", {}, t.name), " ", badge("tcp " + t.tls, "mode"), el("div", { class: "mono muted" }, t.rule)),
      el("td", {}, t.service),
      el("td", {}, (t.entrypoints.length ? t.entrypoints : ["all"]).map((e) => el("span", { class: "chip" }, e))),
      el("td", {}, "–"), el("td", { class: "num" }, "–"), el("td", { class: "num" }, "–"), el("td", { class: "num" }, "–")));
  }
  $("routers").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, "Router"), el("th", {}, "Service"), el("th", {}, "Entry points"), el("th", {}, "Middlewares"), el("th", { class: "num" }, "req/s"), el("th", { class: "num" }, "Requests"), el("th", { class: "num" }, "5xx"))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 7, class: "empty" }, "no routers"))),
  );
}

function renderServices(d) {
  const rows = [];
  for (const [name, list] of Object.entries(d.services.services)) {
    for (const i of list) {
      const addr = hostPort(i.instance.address, i.instance.port);
      const checks = Object.entries(i.health_up || {});
      const health = checks.length ? checks.map(([vip, up]) => badge(up ? "up" : "down")) : el("span", { class: "muted" }, "not checked");
      rows.push(el("tr", { "data-service": name, "data-instance": addr },
        el("td", {}, name),
        el("td", { class: "mono" }, addr),
        el("td", { class: "num" }, i.instance.weight),
        el("td", {}, i.override ? badge(i.override, i.override === "drained" ? "draining" : "down") : el("span", { class: "muted" }, "–")),
        el("td", {}, health)));
    }
  }
  $("services").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, "Service"), el("th", {}, "Instance"), el("th", { class: "num" }, "Weight"), el("th", {}, "Override"), el("th", {}, "Health"))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 5, class: "empty" }, "no services"))),
  );
}

function renderProviders(d) {
  const rows = Object.entries(d.status.providers).map(([name, p]) =>
    el("tr", { "data-provider": name },
      el("td", {}, name),
      el("td", {}, badge(p.last_error ? "failing" : "ok", p.last_error ? "bad" : "ok")),
      el("td", { class: "num" }, p.instances),
      el("td", {}, ago(p.last_success_unix)),
      el("td", { class: "num" }, p.errors),
      el("td", { class: "mono" }, p.last_error || "–")));
  $("providers").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, "Provider"), el("th", {}, "Status"), el("th", { class: "num" }, "Instances"), el("th", {}, "Last success"), el("th", { class: "num" }, "Errors"), el("th", {}, "Last error"))),
    el("tbody", {}, rows),
  );
}

// One row per node, one column per VIP with the node's table digest; a digest that parts from
// the majority is flagged (that node would send some flows elsewhere after an ECMP rehash).
function renderCluster(d) {
  const c = d.cluster;
  $("cluster-box").hidden = !c;
  if (!c) return;
  $("cluster-name").textContent = c.cluster + (c.agree ? "" : " — nodes disagree");
  const vips = [...new Set(c.nodes.flatMap(n => n.vips.map(v => v.name)))].sort();
  const off = new Set(c.disagreements.map(x => x.node + "|" + x.vip));
  const rows = c.nodes.map(n =>
    el("tr", { "data-node": n.node },
      el("td", {}, n.node + (n.node === c.node ? " (this node)" : "")),
      el("td", { class: "num" }, n.store_revision),
      el("td", {}, ago(n.updated_unix)),
      ...vips.map(name => {
        const v = n.vips.find(x => x.name === name);
        const bad = off.has(n.node + "|" + name);
        return el("td", { class: "mono" }, v ? (v.table_digest || "–") + " " : "absent ",
          bad ? badge("differs", "bad") : badge(v ? v.active + "/" + v.backends : "", "ok"));
      })));
  $("cluster").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, "Node"), el("th", { class: "num" }, "Store rev"), el("th", {}, "Updated"), ...vips.map(v => el("th", {}, v)))),
    el("tbody", {}, rows),
  );
}

function renderVerdicts(d) {
  const rows = Object.entries(d.stats.verdicts)
    .filter(([, n]) => n > 0)
    .sort((a, b) => b[1] - a[1])
    .map(([name, n]) => el("tr", {}, el("td", { class: "mono" }, name), el("td", {}, badge(name.startsWith("drop") ? "drop" : name.split("_")[0], name.startsWith("drop") ? "bad" : "mode")), el("td", { class: "num" }, fmtNum(n))));
  $("verdicts").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, "Reason"), el("th", {}, "Action"), el("th", { class: "num" }, "Packets"))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 3, class: "empty" }, "no packets yet"))),
  );
}

async function refresh() {
  const token = sessionStorage.getItem(KEY);
  if (!token) return showLogin("");
  let d;
  try {
    const [v, services, status, stats, routers] = await Promise.all([
      api("/api/v1/vips", token), api("/api/v1/services", token), api("/api/v1/status", token),
      api("/api/v1/stats", token), api("/api/v1/routers", token),
    ]);
    // Not in a cluster: 404, and the panel stays hidden.
    const cluster = await api("/api/v1/cluster", token).catch(e => {
      if (e instanceof Unauthorized) throw e;
      return null;
    });
    d = { vips: v.vips, services, status, stats, routers, cluster, health: {} };
  } catch (e) {
    if (e instanceof Unauthorized) {
      sessionStorage.removeItem(KEY);
      return showLogin("The token was refused.");
    }
    $("updated").textContent = "update failed: " + e.message;
    schedule();
    return;
  }
  // Health verdicts by VIP and backend, from the services view.
  for (const list of Object.values(d.services.services)) {
    for (const i of list) {
      for (const [vip, up] of Object.entries(i.health_up || {})) {
        (d.health[vip] = d.health[vip] || {})[hostPort(i.instance.address, i.instance.port)] = up;
      }
    }
  }
  const now = performance.now();
  const dt = previous ? (now - previous.at) / 1000 : 0;
  let pps = null, bps = null, reqRate = null;
  if (previous) {
    pps = 0; bps = 0; reqRate = 0;
    for (const v of d.vips) {
      const p = previous.vips[v.name];
      if (p) { pps += rate(v.counters.packets, p.packets, dt) || 0; bps += rate(v.counters.bytes, p.bytes, dt) || 0; }
    }
    for (const r of d.routers.routers) {
      const p = previous.routers[r.name];
      if (p !== undefined) reqRate += rate(r.requests.total, p, dt) || 0;
    }
  }
  showApp();
  renderAlerts(d);
  renderTiles(d, { pps, bps, reqRate });
  renderVips(d, dt);
  renderRouters(d, dt);
  renderServices(d);
  renderProviders(d);
  renderCluster(d);
  renderVerdicts(d);
  previous = { at: now, vips: {}, backends: {}, routers: {} };
  for (const v of d.vips) {
    previous.vips[v.name] = v.counters;
    for (const b of v.backends) previous.backends[v.name + "|" + b.address + "|" + b.port] = b.counters;
  }
  for (const r of d.routers.routers) previous.routers[r.name] = r.requests.total;
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  schedule();
}

function schedule() {
  if (timer) clearTimeout(timer);
  timer = paused ? null : setTimeout(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    try {
      await api("/api/v1/status", token);
    } catch (e) {
      return showLogin(e instanceof Unauthorized ? "The token was refused." : "The agent did not answer: " + e.message);
    }
    sessionStorage.setItem(KEY, token);
    $("token").value = "";
    refresh();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showLogin("");
  });
  $("pause").addEventListener("click", () => {
    paused = !paused;
    $("pause").textContent = paused ? "Resume" : "Pause";
    if (!paused) refresh(); else schedule();
  });
  if (sessionStorage.getItem(KEY)) refresh(); else showLogin("");
});
