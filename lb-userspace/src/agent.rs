//! `lb run`: wires config → dataplane → balancer → control loop (providers, health) → API, then
//! waits for a signal.
//!
//! Stopping leaves the pinned program and maps forwarding: the data path does not depend on the
//! agent being alive, only changes do. A restarted agent adopts the pinned maps and ids and swaps
//! its program into the pinned links.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::fcntl::{Flock, FlockArg};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    api::{self, ApiState},
    control::health,
    control::{self, Control},
    l4::dataplane::Dataplane,
    l4::Balancer,
    model::VipSpec,
    sources::config::{self, Config},
    sources::{self, store::Store},
};

/// The state directory (the API store, a generated token, the development CA's and ACME's
/// keys): created 0700 when missing, and refused when it exists open to others or owned by
/// another user, because whoever can read or write in it can take over the admin API or the
/// TLS keys. Fail closed: the fix is one `chmod`, said in the error.
fn secure_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
    }
    let m =
        std::fs::metadata(dir).with_context(|| format!("the state directory {}", dir.display()))?;
    if !m.is_dir() {
        bail!("the state directory {} is not a directory", dir.display());
    }
    let uid = nix::unistd::geteuid().as_raw();
    if m.uid() != uid {
        bail!(
            "the state directory {} belongs to uid {}, not to this agent's uid {uid}: `chown {uid} {}`",
            dir.display(),
            m.uid(),
            dir.display()
        );
    }
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "the state directory {} has mode {mode:03o}: others could read or change the API token, \
             the API store and TLS keys; run `chmod 700 {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// The admin token: from the config (checked there), else `env` (`LB_API_TOKEN`, held to the
/// same rules), else a random one written to `<state_dir>/api-token` (mode 0600) so local tools
/// can read it. The API never runs open, nor behind a token that can be guessed.
///
/// A token file found with another mode or owner is refused, not silently fixed: its token may
/// already have been read, and the operator should know (the error says the `chmod` to run).
fn api_token(cfg: &Config, env: Option<String>) -> Result<String> {
    if let Some(t) = &cfg.api_token {
        return Ok(t.clone());
    }
    if let Some(t) = env {
        config::check_token(&t)
            .map_err(|why| anyhow!("LB_API_TOKEN: {why} (unset it to have a token generated)"))?;
        return Ok(t);
    }
    use rand::Rng as _;
    let token: String = crate::clock::rng()
        .sample_iter(rand::distributions::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    secure_state_dir(&cfg.state_dir)?;
    let path = cfg.state_dir.join("api-token");
    let owner_only = |m: &std::fs::Metadata| -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = m.permissions().mode() & 0o777;
        let uid = nix::unistd::geteuid().as_raw();
        if !m.is_file() || m.uid() != uid || mode & 0o077 != 0 {
            bail!(
                "{} has mode {mode:03o} and owner uid {} (want a file of uid {uid}, mode 600): \
                 its token may have been read; run `chmod 600 {}` (and `chown {uid}`), or remove it",
                path.display(),
                m.uid(),
                path.display()
            );
        }
        Ok(())
    };
    match std::fs::symlink_metadata(&path) {
        Ok(m) => owner_only(&m)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        // Checked again on what was opened: nothing swapped the file in between.
        owner_only(&f.metadata()?)?;
        f.write_all(token.as_bytes())?;
    }
    info!(path = %path.display(), "no api.token or LB_API_TOKEN: generated a token");
    Ok(token)
}

/// One agent per interface and per pin directory: exclusive locks under /run/lb, keyed by the
/// network namespace (interface names repeat across namespaces). Held for the agent's life.
fn take_locks(cfg: &Config, pin_dir: &Path) -> Result<Vec<Flock<File>>> {
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    std::fs::create_dir_all("/run/lb").context("creating /run/lb")?;
    let pin_hash = xxhash_rust::xxh3::xxh3_64(pin_dir.as_os_str().as_encoded_bytes());
    let mut names: Vec<(String, String)> = cfg
        .interfaces
        .iter()
        .map(|i| {
            (
                format!("/run/lb/{netns}-{i}.lock"),
                format!("interface {i}"),
            )
        })
        .collect();
    names.push((
        format!("/run/lb/pins-{pin_hash:016x}.lock"),
        format!("pin directory {}", pin_dir.display()),
    ));
    let mut locks = Vec::new();
    for (path, what) in names {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {path}"))?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(mut l) => {
                use std::io::{Seek as _, Write as _};
                l.set_len(0)?;
                l.seek(std::io::SeekFrom::Start(0))?;
                write!(l, "{}", std::process::id())?;
                locks.push(l);
            }
            Err((_, _)) => {
                let pid = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "another lb agent (pid {}) already runs on {what}; stop it first",
                    pid.trim()
                );
            }
        }
    }
    Ok(locks)
}

/// A listener, or an error that says what to change when the address is taken or not allowed.
async fn bind(
    addr: std::net::SocketAddr,
    what: &str,
    field: &str,
) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                format!(": another process listens there; stop it, or change {field}")
            }
            std::io::ErrorKind::AddrNotAvailable => {
                format!(": no interface of this host has that address; change {field}")
            }
            std::io::ErrorKind::PermissionDenied => {
                format!(": ports below 1024 need root or CAP_NET_BIND_SERVICE; change {field}")
            }
            _ => String::new(),
        };
        anyhow!("{what}: binding {addr}: {e}{hint}")
    })
}

/// What the running agent uses, for as long as it runs: loading, attaching and replacing XDP
/// programs and writing maps (BPF, PERFMON, NET_ADMIN, SYS_ADMIN for bpffs pins, SYS_RESOURCE
/// and IPC_LOCK for locked map memory on kernels that still count it), binding entry points
/// below 1024 when a reload opens one (NET_BIND_SERVICE), `ip` for neighbours (NET_ADMIN,
/// NET_RAW), and reading operators' files and keeping its state directory (DAC_OVERRIDE,
/// DAC_READ_SEARCH, FOWNER, CHOWN).
const KEPT_CAPABILITIES: [caps::Capability; 13] = {
    use caps::Capability::*;
    [
        CAP_BPF,
        CAP_PERFMON,
        CAP_NET_ADMIN,
        CAP_NET_RAW,
        CAP_NET_BIND_SERVICE,
        CAP_SYS_ADMIN,
        CAP_SYS_RESOURCE,
        CAP_IPC_LOCK,
        CAP_DAC_OVERRIDE,
        CAP_DAC_READ_SEARCH,
        CAP_FOWNER,
        CAP_CHOWN,
        // Also what lets this process give up the others.
        CAP_SETPCAP,
    ]
};

/// Gives up every capability the agent never uses (modules, ptrace, raw I/O, setuid, the
/// clock, …), from the bounding set too, so neither a compromised agent nor a program it runs
/// (`ip`) can take them back. A root in a container that may not drop them keeps them, with a
/// warning: that is no weaker than before.
pub fn drop_capabilities() {
    use caps::CapSet;
    let keep: caps::CapsHashSet = KEPT_CAPABILITIES.into_iter().collect();
    let mut failed = Vec::new();
    // A capability this kernel does not know is not there to drop.
    let known = caps::runtime::procfs_all_supported(None).unwrap_or_else(|_| caps::all());
    for c in known.iter().filter(|c| !keep.contains(c)) {
        if let Err(e) = caps::drop(None, CapSet::Bounding, *c) {
            failed.push(format!("{c}: {e}"));
        }
    }
    let permitted = caps::read(None, CapSet::Permitted).unwrap_or_default();
    let kept: caps::CapsHashSet = permitted.intersection(&keep).copied().collect();
    for (set, value) in [
        (CapSet::Ambient, caps::CapsHashSet::new()),
        (CapSet::Inheritable, caps::CapsHashSet::new()),
        (CapSet::Effective, kept.clone()),
        (CapSet::Permitted, kept),
    ] {
        if let Err(e) = caps::set(None, set, &value) {
            failed.push(format!("{set:?}: {e}"));
        }
    }
    if !failed.is_empty() {
        warn!(
            "could not give up the capabilities lb does not use ({}); running with them",
            failed.join(", ")
        );
    }
}

/// What the proxy would leave out of one provider's routing (a middleware whose values do not
/// build, and its routers), in the words the agent logs: `lb check-config` prints them without
/// starting a proxy. Returns the routers that would be served, and the problems.
pub fn proxy_check(
    cfg: &Config,
    provider: &str,
    dynamic: crate::model::l7::Dynamic,
) -> (usize, usize, Vec<String>) {
    let (built, mut problems) = crate::proxy::dynamic::Built::new(dynamic, None);
    // Joined with lb.toml's part, as the agent does: name clashes, and routers whose TLS
    // options no handshake on these entry points would be made under.
    let base = l7_config(cfg, Default::default());
    let theirs: Vec<String> = built
        .dynamic
        .routers
        .iter()
        .map(|r| r.name.clone())
        .collect();
    let tcp_theirs: Vec<String> = built
        .dynamic
        .tcp_routers
        .iter()
        .map(|r| r.name.clone())
        .collect();
    // The key-value providers lb runs take part, empty: what a router names there is read
    // only when the agent runs, and is not an error here.
    let mut parts = std::collections::BTreeMap::from([(provider.to_string(), built)]);
    let p = &cfg.providers;
    let remote: Vec<String> = [
        p.redis
            .as_ref()
            .and_then(|r| r.traefik_root.as_ref())
            .map(|_| "redis:traefik"),
        p.etcd
            .as_ref()
            .and_then(|e| e.traefik_root.as_ref())
            .map(|_| "etcd:traefik"),
    ]
    .into_iter()
    .flatten()
    .map(str::to_string)
    .collect();
    for key in &remote {
        parts.insert(
            key.clone(),
            crate::proxy::dynamic::Built::new(Default::default(), None).0,
        );
    }
    let (merged, clashes) = crate::proxy::dynamic::merge(&base, &parts);
    let elsewhere = |c: &String| remote.iter().any(|k| c.contains(&format!("@{k}")));
    problems.extend(clashes.into_iter().filter(|c| !elsewhere(c)));
    let served = merged
        .routers
        .iter()
        .filter(|r| theirs.contains(&r.name) && !base.routers.iter().any(|b| b.name == r.name))
        .count();
    let tcp_served = merged
        .tcp_routers
        .iter()
        .filter(|r| {
            tcp_theirs.contains(&r.name) && !base.tcp_routers.iter().any(|b| b.name == r.name)
        })
        .count();
    (served, tcp_served, problems)
}

pub async fn run(source: &sources::Source) -> Result<()> {
    let cfg = source.load()?;
    // Before any provider reads a file: Traefik servers' names are resolved this way.
    sources::dns::configure(&cfg.providers.dns);
    for n in &cfg.notes {
        warn!("{n}");
    }
    secure_state_dir(&cfg.state_dir)?;
    let env = match std::env::var("LB_API_TOKEN") {
        Ok(t) => Some(t),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => bail!("LB_API_TOKEN: not UTF-8"),
    };
    let token = api_token(&cfg, env)?;
    let pin_dir = crate::l4::dataplane::pin_dir(&cfg.pin_root, &cfg.instance);
    let _locks = take_locks(&cfg, &pin_dir)?;
    // Bound before the dataplane is touched: a port in use must not leave a half-started agent.
    let listener = bind(cfg.api_listen, "the admin API", "[api] listen").await?;
    let cluster = cfg
        .cluster
        .clone()
        .map(|spec| Arc::new(sources::cluster::Shared::new(spec)));
    let store = match &cluster {
        None => Store::open(
            &cfg.state_dir
                .join(format!("api-store-{}.json", cfg.instance)),
        )?,
        Some(shared) => {
            let copy = cfg.state_dir.join(format!(
                "cluster-store-{}-{}.json",
                shared.spec.name, cfg.instance
            ));
            info!(cluster = %shared.spec.name, node = %shared.spec.node, "joining the cluster");
            Store::open_cluster(shared.clone(), &copy).await?
        }
    };
    let started = crate::clock::now();
    // Redis and etcd are read once before the first apply too (bounded: an unreachable store
    // only delays its instances until its provider connects).
    let kv_first = initial_kv_reads(&cfg).await;
    let control = tokio::task::block_in_place(|| -> Result<Control> {
        let dp = Dataplane::open(&cfg.pin_root, &cfg.instance, &cfg.limits, cfg.debug)?;
        info!(pins = %dp.pin_dir().display(), "maps ready");
        // Program the maps before attaching anywhere new (an adopted link keeps forwarding).
        let balancer = Balancer::new(dp, &cfg.vips)?;
        let mut c = Control::new(balancer, store, cfg.vips.clone());
        // Files are read once before the first apply, so a restart does not flap their backends.
        for f in &cfg.providers.files {
            let mut src = sources::file::FileSource::new(&f.path);
            let (services, errors) = src.reload();
            let name = format!("file:{}", f.path.display());
            c.registry
                .update(&name, sources::Rank::FILE, services, crate::clock::wall());
            for e in errors {
                warn!(provider = name, "rejected: {e}");
                c.registry.fail(&name, sources::Rank::FILE, e.to_string());
            }
        }
        for (name, rank, read) in kv_first {
            match read {
                Ok((services, errors)) => {
                    c.registry
                        .update(name, rank, services, crate::clock::wall());
                    for e in errors {
                        warn!(provider = name, "rejected: {e}");
                        c.registry.fail(name, rank, format!("rejected {e}"));
                    }
                }
                Err(e) => {
                    warn!(provider = name, "first read: {e:#}");
                    c.registry.fail(name, rank, format!("{e:#}"));
                }
            }
        }
        c.apply(started)?;
        // Backends that need a MAC join their tables before the program attaches, as far as
        // their neighbours answer within a second; the rest are the neighbour task's.
        let pending = c.balancer.unresolved();
        if !pending.is_empty() {
            for (addr, mac) in crate::l4::neighbor::resolve_many(&pending) {
                c.balancer.learn_neighbour(addr, mac);
            }
            c.apply(started)?;
        }
        for iface in &cfg.interfaces {
            c.balancer.dataplane().attach(iface, cfg.xdp_mode)?;
        }
        Ok(c)
    })?;
    let mut control = control;
    let kernel_logs = control.balancer.dataplane().take_kernel_logs();
    // The proxy always exists (it may have no entry point yet): a reload can add some.
    let base = l7_config(&cfg, build_middlewares(&cfg)?);
    let proxy = Arc::new(crate::proxy::Proxy::new(
        base.entrypoints.clone(),
        base.routers.clone(),
        base.specs.clone(),
        base.middlewares.clone(),
        &Default::default(),
    ));
    // From here on the proxy builds its table from what control publishes; the first
    // publication is in force before any listener opens.
    let (feed, l7_rx) = control::L7Feed::new(base);
    control.l7 = Some(feed);
    control.publish_l7();
    proxy.install(&l7_rx.borrow().clone());
    let metrics = Arc::new(crate::observe::metrics::Metrics::new(
        proxy.obs().clone(),
        &control.obs,
    )?);
    proxy.obs().set_certificate_files(&cfg.certificates);
    if let Some(spec) = cfg.access_log.clone() {
        proxy
            .obs()
            .set_access_log(Some(crate::observe::access_log::AccessLog::start(spec)?));
    }
    // What routers ask ACME resolvers for (`tls.certResolver`), followed by the client.
    let (wishes_tx, wishes) = tokio::sync::watch::channel(Vec::new());
    let acme_inputs = AcmeInputs {
        // In a cluster, the ACME account and certificates are the cluster's.
        shared: cluster.clone().map(|c| {
            Arc::new(control::cluster::AcmeShared::new(c)) as Arc<dyn crate::proxy::acme::Shared>
        }),
        wishes,
    };
    // Stored ACME certificates are installed before the listeners open; orders (validated on
    // those listeners) start after.
    let acme = cfg
        .acme
        .clone()
        .map(|spec| acme_client(spec, &cfg.state_dir, &proxy, &acme_inputs));
    let mut listeners = Listeners::default();
    listeners.reconcile(&proxy, &cfg).await?;
    // Shared with the shutdown below, which drains the entry points.
    let listeners = Arc::new(tokio::sync::Mutex::new(listeners));
    let acme = acme.map(AcmeTask::spawn);
    let control = Arc::new(Mutex::new(control));
    let (events, rx) = mpsc::channel(1024);
    let mut tasks = vec![tokio::spawn(control::run(control.clone(), rx))];
    for f in cfg.providers.files.clone() {
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = sources::file::run(f, events).await {
                warn!("file provider stopped: {e:#}");
            }
        }));
    }
    if let Some(spec) = cfg.providers.redis.clone() {
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = sources::redis::run(spec, events).await {
                warn!("redis provider stopped: {e:#}");
            }
        }));
    }
    if let Some(spec) = cfg.providers.etcd.clone() {
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = sources::etcd::run(spec, events).await {
                warn!("etcd provider stopped: {e:#}");
            }
        }));
    }
    if let Some(spec) = cfg.bgp.clone() {
        let node = cfg
            .cluster
            .as_ref()
            .map(|c| c.node.clone())
            .unwrap_or_else(|| cfg.instance.clone());
        let (want, want_rx) = tokio::sync::watch::channel(Default::default());
        let (status_tx, status_rx) = tokio::sync::watch::channel(Default::default());
        {
            let mut c = control::lock(&control);
            c.interfaces = cfg.interfaces.clone();
            c.announce = Some(want);
            c.bgp_status = Some(status_rx);
            c.announce();
        }
        info!(include = %spec.include.display(), socket = %spec.socket.display(), "bgp: announcing through bird");
        tasks.push(tokio::spawn(crate::bgp::run(
            spec, node, want_rx, status_tx,
        )));
    }
    let api_proxy_store = proxy.acme_store();
    let (stop_status, stop_rx) = tokio::sync::watch::channel(false);
    // `lb leave`: set once the node has withdrawn and drained.
    let (leave, mut left) = tokio::sync::watch::channel(false);
    let leave = Arc::new(leave);
    let mut status_task = None;
    if let Some(shared) = cluster.clone() {
        tasks.push(tokio::spawn(sources::cluster::watch(
            shared.clone(),
            events.clone(),
        )));
        tasks.push(tokio::spawn(control::cluster::follow_challenges(
            shared.clone(),
            api_proxy_store.clone(),
        )));
        status_task = Some(tokio::spawn(control::cluster::publish(
            shared,
            control.clone(),
            stop_rx,
        )));
    }
    let health_table: health::Table = Default::default();
    for v in cfg.vips.iter().filter(|v| v.health.is_some()) {
        let (vip, spec) = (
            v.name.clone(),
            v.health.clone().ok_or_else(|| anyhow!("checked above"))?,
        );
        let c = control.clone();
        let name = vip.clone();
        let targets = move || control::lock(&c).health_targets(&name);
        tasks.push(tokio::spawn(health::monitor(
            vip,
            spec,
            targets,
            health_table.clone(),
            events.clone(),
        )));
    }
    let (wanted, wanted_rx) = tokio::sync::watch::channel(Default::default());
    control::lock(&control).balancer.want_neighbours(wanted);
    let found = events.clone();
    tasks.push(tokio::spawn(crate::l4::neighbor::run(
        wanted_rx,
        move |address, mac| {
            // A full queue loses nothing: the address stays wanted and is tried again.
            let _ = found.try_send(sources::Event::Neighbour {
                address,
                mac,
                at: crate::clock::now(),
            });
        },
    )));
    if let Some(logs) = kernel_logs {
        info!("debug: forwarding the XDP program's log messages");
        tasks.push(tokio::spawn(crate::l4::dataplane::forward_kernel_logs(
            logs,
        )));
    }
    tasks.push(tokio::spawn(follow_acme_wishes(l7_rx.clone(), wishes_tx)));
    tasks.push(tokio::spawn(proxy.clone().follow(l7_rx)));
    tasks.push(tokio::spawn(reopen_on_hangup(proxy.clone())?));
    let api_proxy = proxy.clone();
    tasks.push(tokio::spawn(watch_config(
        source.clone(),
        cfg.clone(),
        control.clone(),
        proxy,
        listeners.clone(),
        acme,
        acme_inputs,
    )));

    info!(listen = %cfg.api_listen, "admin API up");
    let app = api::router(ApiState {
        proxy: Some(api_proxy),
        control: control.clone(),
        health: health_table,
        token: token.into(),
        metrics,
        cluster,
        bgp: cfg.bgp.clone().map(|spec| api::Leave {
            spec: Arc::new(spec),
            stop: leave.clone(),
        }),
    });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
            _ = left.wait_for(|l| *l) => info!("left the fleet"),
        }
    };
    api::serve(listener, app, api::ApiLimits::default(), shutdown).await;
    // The entry points stop accepting; requests in progress get DRAIN to finish.
    listeners.lock().await.close_all().await;
    // The node leaves the cluster's view now rather than a TTL later.
    let _ = stop_status.send(true);
    if let Some(t) = status_task {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
    for t in tasks {
        t.abort();
    }
    info!("agent stopped; the pinned program keeps forwarding (`lb detach` removes it)");
    Ok(())
}

/// lb.toml's part of the proxy's configuration.
fn l7_config(
    cfg: &Config,
    middlewares: std::collections::HashMap<String, Arc<dyn crate::proxy::middleware::Middleware>>,
) -> crate::proxy::L7Config {
    crate::proxy::L7Config {
        entrypoints: cfg.entrypoints.clone(),
        routers: cfg.routers.clone(),
        specs: cfg.http_services.clone(),
        middlewares,
        tcp_routers: cfg.tcp_routers.clone(),
        tls_options: Default::default(),
        tls_default_broken: None,
    }
}

type KvRead = Result<(crate::model::instance::Services, Vec<sources::kv::KeyError>)>;

/// The first read of each configured key-value provider, both at once, each bounded.
async fn initial_kv_reads(cfg: &Config) -> Vec<(&'static str, u8, KvRead)> {
    async fn bounded(f: impl std::future::Future<Output = KvRead>) -> KvRead {
        const FIRST_READ: Duration = Duration::from_secs(3);
        tokio::time::timeout(FIRST_READ, f)
            .await
            .unwrap_or_else(|_| Err(anyhow!("timed out after {FIRST_READ:?}")))
    }
    let redis = async {
        match &cfg.providers.redis {
            Some(spec) => Some(bounded(sources::redis::read_once(spec)).await),
            None => None,
        }
    };
    let etcd = async {
        match &cfg.providers.etcd {
            Some(spec) => Some(bounded(sources::etcd::read_once(spec)).await),
            None => None,
        }
    };
    let (redis, etcd) = tokio::join!(redis, etcd);
    let mut out = Vec::new();
    if let Some(r) = redis {
        out.push((sources::redis::NAME, sources::Rank::REDIS, r));
    }
    if let Some(r) = etcd {
        out.push((sources::etcd::NAME, sources::Rank::ETCD, r));
    }
    out
}

/// SIGHUP reopens the access log (log rotation: rename the file, then send SIGHUP).
fn reopen_on_hangup(
    proxy: Arc<crate::proxy::Proxy>,
) -> Result<impl std::future::Future<Output = ()>> {
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        while hup.recv().await.is_some() {
            match proxy.obs().access_log() {
                Some(log) => {
                    log.reopen();
                    info!("SIGHUP: access log reopened");
                }
                None => info!("SIGHUP: no access log to reopen"),
            }
        }
    })
}

fn build_middlewares(
    cfg: &Config,
) -> Result<std::collections::HashMap<String, Arc<dyn crate::proxy::middleware::Middleware>>> {
    cfg.middlewares
        .iter()
        .map(|(n, m)| {
            m.build_named(n)
                .map(|b| (n.clone(), b))
                .map_err(|e| anyhow!("middleware {n}: {e}"))
        })
        .collect()
}

/// What every ACME client of this agent is given: the cluster's store (with `[cluster]`) and
/// the names the routers ask for.
struct AcmeInputs {
    shared: Option<Arc<dyn crate::proxy::acme::Shared>>,
    wishes: tokio::sync::watch::Receiver<Vec<crate::model::l7::AcmeWish>>,
}

/// The ACME client for `spec`, its stored certificates already serving.
fn acme_client(
    spec: crate::model::l7::AcmeSpec,
    state_dir: &Path,
    proxy: &crate::proxy::Proxy,
    inputs: &AcmeInputs,
) -> crate::proxy::acme::Acme {
    let mut client = crate::proxy::acme::Acme::new(spec, state_dir, proxy.acme_store())
        .with_names(inputs.wishes.clone());
    if let Some(shared) = inputs.shared.clone() {
        client = client.with_shared(shared);
    }
    let stored = client.load_stored();
    info!(stored, dir = %client.dir().display(), "ACME certificates loaded");
    client
}

/// What the routers of the published L7 state ask ACME resolvers for, as it changes.
async fn follow_acme_wishes(
    mut l7: tokio::sync::watch::Receiver<Arc<crate::proxy::L7State>>,
    wishes: tokio::sync::watch::Sender<Vec<crate::model::l7::AcmeWish>>,
) {
    loop {
        let now: Vec<crate::model::l7::AcmeWish> = l7
            .borrow_and_update()
            .dynamic
            .values()
            .flat_map(|d| d.acme.iter().cloned())
            .collect();
        wishes.send_if_modified(|cur| {
            let changed = *cur != now;
            if changed {
                *cur = now;
            }
            changed
        });
        if l7.changed().await.is_err() {
            return;
        }
    }
}

/// The ACME client's task (orders and renewals); it stops with its owner.
struct AcmeTask(tokio::task::JoinHandle<()>);

impl AcmeTask {
    fn spawn(client: crate::proxy::acme::Acme) -> AcmeTask {
        AcmeTask(tokio::spawn(client.run()))
    }
}

impl Drop for AcmeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The certificates of `cfg` as the resolver sees them: files, then ACME, then the dev CA.
fn certificates(
    proxy: &crate::proxy::Proxy,
    cfg: &Config,
) -> Result<Arc<crate::proxy::tls::Certs>> {
    // The providers' certificates (Traefik's tls.certificates) after lb.toml's, each on its
    // own: one that does not load is left out alone, and lb.toml's must all load.
    let (mut certs, left_out) =
        crate::proxy::tls::Certs::load_with(&cfg.certificates, &proxy.dynamic_certificates())?;
    for e in left_out {
        warn!("provider certificate left out: {e:#}");
    }
    if cfg.acme.is_some() {
        certs = certs.with_acme(proxy.acme_store());
    }
    if cfg.tls_dev_ca {
        certs = certs.with_dev_ca(crate::proxy::tls::DevCa::open(&cfg.state_dir)?);
    }
    Ok(Arc::new(certs))
}

/// The proxy's open listeners, by entry point. A changed entry point is closed and reopened; a
/// removed one stops accepting (connections in progress finish); TLS configurations are swapped
/// in place, so certificates reload without closing anything.
#[derive(Default)]
pub struct Listeners {
    open: std::collections::HashMap<
        String,
        (
            crate::model::l7::EntryPointSpec,
            Serving,
            Option<crate::proxy::TlsConfig>,
            std::net::SocketAddr,
        ),
    >,
}

/// How long a closed entry point's connections get to finish their requests (at a reload that
/// removes it, and when the agent stops).
pub const DRAIN: Duration = Duration::from_secs(30);

/// An entry point's accept loop, and how to stop it.
struct Serving {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<crate::proxy::Drain>,
}

impl Serving {
    /// Stops accepting (the port is free when this returns) and hands back the connections.
    async fn close(self) -> Option<crate::proxy::Drain> {
        self.stop.cancel();
        self.task.await.ok()
    }
}

impl Listeners {
    /// The address entry point `name` listens on (its port when configured as 0).
    pub fn local_addr(&self, name: &str) -> Option<std::net::SocketAddr> {
        self.open.get(name).map(|o| o.3)
    }

    /// Opens, closes and updates the listeners to match `cfg`.
    pub async fn reconcile(
        &mut self,
        proxy: &Arc<crate::proxy::Proxy>,
        cfg: &Config,
    ) -> Result<()> {
        let certs = certificates(proxy, cfg)?;
        let gone: Vec<String> = self
            .open
            .iter()
            .filter(|(_, (spec, _, _, _))| !cfg.entrypoints.contains(spec))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            if let Some((spec, serving, _, _)) = self.open.remove(&name) {
                // The port is released now; the requests in progress finish in the background.
                if let Some(drain) = serving.close().await {
                    tokio::spawn(drain.finish(DRAIN));
                }
                info!(entrypoint = name, address = %spec.address, "entry point closed");
            }
        }
        for ep in &cfg.entrypoints {
            let tls = match ep.tls {
                true => Some(crate::proxy::tls::server_config(
                    certs.clone(),
                    ep.client_ca_file.as_deref(),
                )?),
                false => None,
            };
            if let Some((_, _, current, _)) = self.open.get(&ep.name) {
                if let (Some(cur), Some(new)) = (current, tls) {
                    cur.store(new);
                }
                continue;
            }
            let listener = bind(
                ep.address,
                &format!("entrypoint {}", ep.name),
                "its address",
            )
            .await?;
            let local = listener.local_addr().unwrap_or(ep.address);
            let tls = tls.map(|t| Arc::new(arc_swap::ArcSwap::new(t)));
            info!(entrypoint = ep.name, address = %local, tls = ep.tls, plain_too = ep.tls && ep.also_plain, "proxy listening");
            let stop = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(proxy.clone().serve_until(
                ep.name.clone(),
                listener,
                tls.clone(),
                stop.clone(),
            ));
            self.open.insert(
                ep.name.clone(),
                (ep.clone(), Serving { stop, task }, tls, local),
            );
        }
        Ok(())
    }

    /// Closes every entry point and lets their requests in progress finish, within [`DRAIN`].
    pub async fn close_all(&mut self) {
        let mut drains = Vec::new();
        for (_, (_, serving, _, _)) in self.open.drain() {
            if let Some(d) = serving.close().await {
                drains.push(d.finish(DRAIN));
            }
        }
        futures_util::future::join_all(drains).await;
    }

    /// The certificate files changed: every TLS entry point gets them for its next handshakes.
    /// A pair that does not load (half written, garbage, a key of another certificate) changes
    /// nothing: the error is returned and the previous certificates keep serving.
    pub fn reload_certificates(&self, proxy: &crate::proxy::Proxy, cfg: &Config) -> Result<()> {
        let certs = certificates(proxy, cfg)?;
        let mut swaps = Vec::new();
        for (spec, _, tls, _) in self.open.values() {
            if let Some(current) = tls {
                let new = crate::proxy::tls::server_config(
                    certs.clone(),
                    spec.client_ca_file.as_deref(),
                )?;
                swaps.push((current, new));
            }
        }
        for (current, new) in swaps {
            current.store(new);
        }
        Ok(())
    }
}

/// Watches the config file (its directory, so atomic renames count) and applies what can change
/// at runtime: the proxy's entry points, routers, middlewares, balancing and certificates, and the
/// VIPs' inline backends. A file that does not validate is rejected with file, line and field,
/// and the last good configuration stays in force. VIP addresses, modes and health checks, and
/// the dataplane's sizes, need a restart (said in the log).
async fn watch_config(
    source: sources::Source,
    mut current: Config,
    control: Arc<Mutex<Control>>,
    proxy: Arc<crate::proxy::Proxy>,
    listeners: Arc<tokio::sync::Mutex<Listeners>>,
    mut acme: Option<AcmeTask>,
    acme_inputs: AcmeInputs,
) {
    use notify::Watcher as _;
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let files = source.files();
    let watched: Vec<_> = files
        .iter()
        .filter_map(|p| p.file_name().map(|f| f.to_os_string()))
        .collect();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            let ours = ev
                .paths
                .iter()
                .filter_map(|p| p.file_name())
                .any(|f| watched.iter().any(|w| w == f));
            if ours && !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(());
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => return warn!("config watch unavailable: {e}"),
    };
    let mut dirs: Vec<std::path::PathBuf> = files
        .iter()
        .map(|path| {
            path.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf()
        })
        .collect();
    dirs.dedup();
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            return warn!("config watch unavailable on {}: {e}", dir.display());
        }
    }
    let watched = |cfg: &Config| {
        let mut all = cfg.certificates.clone();
        all.extend(proxy.dynamic_certificates());
        crate::proxy::tls::CertFilesWatch::new(&all)
    };
    let mut cert_files = watched(&current);
    loop {
        tokio::select! {
            got = rx.recv() => if got.is_none() { break },
            () = proxy.certificates_changed() => {
                match listeners.lock().await.reload_certificates(&proxy, &current) {
                    Ok(()) => info!("provider certificates changed: reloaded"),
                    Err(e) => warn!("provider certificates: {e:#}"),
                }
                cert_files = watched(&current);
                continue;
            }
            () = cert_files.changed() => {
                match listeners.lock().await.reload_certificates(&proxy, &current) {
                    Ok(()) => {
                        proxy.obs().set_certificate_files(&current.certificates);
                        info!("certificate files changed: reloaded")
                    }
                    Err(e) => warn!(
                        "certificate files changed but do not load, the previous certificates stay: {e:#}"
                    ),
                }
                continue;
            }
        }
        // Debounce: editors write in several steps.
        while tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_ok_and(|x| x.is_some())
        {}
        let started = crate::clock::now();
        let new = match source.load() {
            Ok(c) => {
                if c.notes != current.notes {
                    for n in &c.notes {
                        warn!("{n}");
                    }
                }
                c
            }
            Err(e) => {
                warn!("config rejected, the last good one stays: {e}");
                control::lock(&control).stats.last_config_error = Some(e.to_string());
                continue;
            }
        };
        if new
            .vips
            .iter()
            .map(|v| {
                (
                    &v.name, v.address, v.port, v.protocol, v.mode, &v.service, &v.health,
                )
            })
            .ne(current.vips.iter().map(|v| {
                (
                    &v.name, v.address, v.port, v.protocol, v.mode, &v.service, &v.health,
                )
            }))
            || new.limits != current.limits
            || new.interfaces != current.interfaces
        {
            warn!("VIP definitions, interfaces or dataplane sizes changed: they take effect at the next restart");
        }
        if new.cluster != current.cluster {
            warn!("[cluster] changed: it takes effect at the next restart");
        }
        let middlewares = match build_middlewares(&new) {
            Ok(m) => m,
            Err(e) => {
                warn!("config rejected: {e:#}");
                continue;
            }
        };
        // A changed [acme] starts a new client (its stored certificates first, orders after the
        // listeners are reconciled); the old one stops and its certificates leave the resolver.
        let acme_next = if new.acme != current.acme || new.state_dir != current.state_dir {
            drop(acme.take());
            proxy.acme_store().clear();
            new.acme
                .clone()
                .map(|spec| acme_client(spec, &new.state_dir, &proxy, &acme_inputs))
        } else {
            None
        };
        // One apply takes the new inline backends to the maps and the new routing (with the
        // instances it names) to the proxy: each is built once. The listeners follow once the
        // proxy has it.
        let c = control.clone();
        let vips = new.vips.clone();
        let base = l7_config(&new, middlewares);
        let r = tokio::task::spawn_blocking(move || -> Result<u64> {
            let mut c = control::lock(&c);
            let known: Vec<VipSpec> = vips
                .into_iter()
                .filter(|v| c.vips.iter().any(|o| o.name == v.name))
                .collect();
            c.set_config_backends(&known);
            c.set_l7_config(base);
            c.stats.last_config_error = None;
            let applied = c.apply(started);
            let generation = c.publish_l7();
            applied.map(|_| generation)
        })
        .await;
        match r {
            Ok(Ok(generation)) => {
                proxy.installed(generation).await;
                info!(
                    reload_us = started.elapsed().as_micros() as u64,
                    "config reloaded"
                )
            }
            Ok(Err(e)) => warn!("config reload: {e:#}"),
            Err(e) => warn!("config reload: {e}"),
        }
        if let Err(e) = listeners.lock().await.reconcile(&proxy, &new).await {
            warn!("entry points: {e:#}");
        }
        proxy.obs().set_certificate_files(&new.certificates);
        if new.access_log != current.access_log {
            match new
                .access_log
                .clone()
                .map(crate::observe::access_log::AccessLog::start)
            {
                None => proxy.obs().set_access_log(None),
                Some(Ok(log)) => proxy.obs().set_access_log(Some(log)),
                Some(Err(e)) => warn!("access log: {e:#}; the previous one stays"),
            }
        }
        if let Some(client) = acme_next {
            acme = Some(AcmeTask::spawn(client));
        }
        if new.certificates != current.certificates {
            cert_files = watched(&new);
        }
        current = new;
    }
    drop(watcher);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(state: &Path) -> Config {
        let text = format!("[agent]\nstate_dir = \"{}\"\n", state.display());
        config::parse(Path::new("lb.toml"), &text).expect("config")
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn token_file_and_state_dir_are_checked_on_every_start() {
        let root = Dir(std::env::temp_dir().join(format!("lb-agent-token-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&root.0);
        let state = root.0.join("state");
        let c = cfg(&state);
        // First start: the directory is made 0700, the token file 0600.
        let t = api_token(&c, None).expect("generated");
        assert!(t.len() >= config::MIN_TOKEN_LEN);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        let file = state.join("api-token");
        assert_eq!(mode(&file), 0o600);
        api_token(&c, None).expect("a second start");
        // A token file someone opened up is refused, with the chmod to run.
        chmod(&file, 0o644);
        let e = format!("{:#}", api_token(&c, None).expect_err("0644 token file"));
        assert!(e.contains("chmod 600"), "{e}");
        chmod(&file, 0o600);
        // So is a state directory others can enter.
        chmod(&state, 0o755);
        let e = format!("{:#}", api_token(&c, None).expect_err("0755 state dir"));
        assert!(e.contains("chmod 700"), "{e}");
        chmod(&state, 0o700);
        api_token(&c, None).expect("fixed");
    }

    #[test]
    fn lb_api_token_obeys_the_configs_rules() {
        let root = Dir(std::env::temp_dir().join(format!("lb-agent-env-{}", std::process::id())));
        let c = cfg(&root.0);
        for bad in ["", "short", "0123456789 abcdef"] {
            assert!(api_token(&c, Some(bad.into())).is_err(), "{bad:?}");
        }
        assert_eq!(
            api_token(&c, Some("0123456789abcdef".into())).expect("16 characters"),
            "0123456789abcdef"
        );
    }
}
