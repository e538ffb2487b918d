//! The `lb` command line: its subcommands, each parsed by clap and run here. `main.rs` only
//! calls [`main`].

pub mod client;
pub mod register;
pub mod status;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

use crate::{
    model::instance::{Instance, InstanceKey},
    model::Mac,
};
use register::{deregister, destination, register, Target};

/// lb: an eBPF (XDP) L4 load balancer with Maglev hashing and connection tracking.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as text for people ("human") or one JSON object per line ("json"). Filter
    /// with RUST_LOG (e.g. `info,crate::proxy=debug`).
    #[arg(
        long,
        global = true,
        env = "LB_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the program, program the maps from the config, attach, serve the admin API.
    Run {
        /// lb's configuration (default: lb.toml, unless --traefik is given alone).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A Traefik install configuration (traefik.yml or .toml): its entry points,
        /// providers and ACME resolver, beside --config's or on lb's defaults.
        #[arg(long)]
        traefik: Option<PathBuf>,
    },
    /// Check a config file (and a Traefik install configuration) and the provider files they
    /// name; print what is wrong (file:line: field: reason) and exit non-zero on any error.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        traefik: Option<PathBuf>,
    },
    /// Announce a service instance: into etcd if the config has [providers.etcd], else Redis if it
    /// has [providers.redis], else (or when the config file does not exist) the admin API.
    Register {
        #[arg(long)]
        service: String,
        /// The instance's address:port (`[v6]:port` for IPv6).
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        #[arg(long)]
        zone: Option<String>,
        /// DSR: the instance's MAC, when the balancer cannot resolve it.
        #[arg(long)]
        mac: Option<Mac>,
        /// Expire unless refreshed within this many seconds: re-run the command from a timer, or
        /// add --keep-alive (Redis: key TTL; etcd: a lease, at least ~2 s; API: store expiry).
        /// At most a year, as the API allows.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=crate::api::MAX_TTL_SECS))]
        ttl: Option<u64>,
        /// Stay in the foreground refreshing the registration every ttl/3 until SIGINT/SIGTERM,
        /// then deregister.
        #[arg(long, requires = "ttl")]
        keep_alive: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Withdraw a service instance (from where `register` would put it).
    Deregister {
        #[arg(long)]
        service: String,
        #[arg(long)]
        addr: SocketAddr,
        #[command(flatten)]
        target: Target,
    },
    /// On an `ipip` backend: strip the balancer's outer header on IFACE until stopped (SIGTERM).
    Decap {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value = "auto")]
        mode: XdpModeArg,
    },
    /// VIPs, backends with health and live rates, routers, providers and their last errors.
    Status {
        /// Read the API's address and the token from this config, when it exists.
        #[arg(long, short, default_value = "lb.toml")]
        config: PathBuf,
        /// The admin API (default: the config's [api] listen, else http://127.0.0.1:9090).
        #[arg(long)]
        api: Option<String>,
        /// The admin token (default: the config's, else <state_dir>/api-token).
        #[arg(long, env = "LB_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Seconds between the two samples that rates are computed from.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Redraw every interval until interrupted.
        #[arg(long)]
        watch: bool,
        /// Every node of the cluster (from its etcd), and whether their tables agree.
        #[arg(long)]
        cluster: bool,
    },
    /// Leave the fleet: withdraw every VIP through bird, wait until bird exports nothing,
    /// drain ([bgp] drain_secs) and stop the agent.
    Leave {
        #[arg(long, short, default_value = "lb.toml")]
        config: PathBuf,
        #[arg(long)]
        api: Option<String>,
        #[arg(long, env = "LB_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Detach the program and remove the pinned maps of an instance (with [bgp], withdraw its
    /// VIPs first: with no program, nothing may be announced).
    Detach {
        #[arg(long, short, default_value = "lb.toml")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum XdpModeArg {
    Auto,
    Native,
    Generic,
}

/// An expected failure (a bad config, a port in use, missing privileges) is one `error:` line with
/// its causes and exit status 1, whatever RUST_BACKTRACE says: a backtrace is for panics.
pub fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The capabilities loading and attaching XDP programs, pinning maps and entering namespaces
/// take. Checked first, so a user without them is told so rather than shown the first syscall
/// that failed.
fn require_privileges(what: &str) -> Result<()> {
    const CAPS: [(u32, &str); 3] = [
        (39, "CAP_BPF"),
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
    ];
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = CAPS
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        bail!(
            "`lb {what}` needs {} (loading XDP programs and pinning maps): run it as root, e.g. with sudo",
            missing.join(", ")
        );
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    // `lb check-config` prints what it finds itself: the agent's log lines (a weak hash's
    // warning, say) would say it twice.
    let quiet = matches!(cli.cmd, Cmd::CheckConfig { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if quiet { "error" } else { "info" })
    });
    // Logs go to stderr: stdout is the access log's when it has no file.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    match cli.cmd {
        Cmd::Run { config, traefik } => {
            let source = source(config, traefik);
            require_privileges("run")?;
            // Capabilities are per thread: before the runtime starts any.
            crate::agent::drop_capabilities();
            tokio::runtime::Runtime::new()?.block_on(crate::agent::run(&source))
        }
        Cmd::CheckConfig { config, traefik } => check_config(&source(config, traefik)),
        Cmd::Register {
            service,
            addr,
            weight,
            zone,
            mac,
            ttl,
            keep_alive,
            target,
        } => {
            let mut metadata = std::collections::BTreeMap::new();
            if let Some(mac) = mac {
                metadata.insert("mac".to_string(), mac.to_string());
            }
            let instance = Instance {
                address: addr.ip(),
                port: addr.port(),
                weight,
                zone,
                metadata,
            };
            let dest = destination(target)?;
            let ttl = ttl.map(Duration::from_secs);
            tokio::runtime::Runtime::new()?
                .block_on(register(&dest, &service, &instance, ttl, keep_alive))
        }
        Cmd::Deregister {
            service,
            addr,
            target,
        } => {
            let dest = destination(target)?;
            let key = InstanceKey {
                address: addr.ip(),
                port: addr.port(),
            };
            let found =
                tokio::runtime::Runtime::new()?.block_on(deregister(&dest, &service, key))?;
            if found {
                println!("deregistered {addr} from {service} ({dest})");
            } else {
                println!("{addr} was not registered in {service} ({dest})");
            }
            Ok(())
        }
        Cmd::Decap { iface, mode } => {
            use crate::model::AttachMode;
            let mode = match mode {
                XdpModeArg::Auto => AttachMode::Auto,
                XdpModeArg::Native => AttachMode::Native,
                XdpModeArg::Generic => AttachMode::Generic,
            };
            require_privileges("decap")?;
            let _attached = crate::l4::dataplane::attach_decap(&iface, mode)?;
            tracing::info!(iface, "decapsulating IP-in-IP until SIGTERM/SIGINT");
            tokio::runtime::Runtime::new()?.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                anyhow::Ok(())
            })?;
            Ok(())
        }
        Cmd::Status {
            config,
            api,
            token,
            interval,
            watch,
            cluster,
        } => status(&config, api, token, interval, watch, cluster),
        Cmd::Leave { config, api, token } => leave(&config, api, token),
        Cmd::Detach { config } => {
            require_privileges("detach")?;
            let c = crate::sources::config::load(&config)?;
            if let Some(spec) = &c.bgp {
                let node = c
                    .cluster
                    .as_ref()
                    .map_or(c.instance.as_str(), |x| x.node.as_str());
                match crate::bgp::withdraw_all(spec, node) {
                    Ok(()) => println!("withdrawn: bird announces nothing for this node"),
                    Err(e) => eprintln!(
                        "warning: bird did not take the withdrawal ({e:#}); {} announces nothing, bird reads it when it answers",
                        spec.include.display()
                    ),
                }
            }
            let removed = crate::l4::dataplane::detach(&c.pin_root, &c.instance)?;
            println!(
                "{}",
                if removed {
                    "detached and removed pins"
                } else {
                    "nothing pinned"
                }
            );
            Ok(())
        }
    }
}

/// lb.toml when nothing else is named; with only --traefik, lb's defaults and that file.
fn source(config: Option<PathBuf>, traefik: Option<PathBuf>) -> crate::sources::Source {
    let lb = match (&config, &traefik) {
        (None, None) => Some(PathBuf::from("lb.toml")),
        _ => config,
    };
    crate::sources::Source { lb, traefik }
}

/// The admin API's address and token: `--api`/`--token` (or `$LB_API_TOKEN`), else the
/// config's `[api]`, else `<state_dir>/api-token`.
fn api_access(
    config: &std::path::Path,
    api: Option<String>,
    token: Option<String>,
) -> Result<(String, String)> {
    let cfg = match std::fs::metadata(config) {
        Ok(_) => Some(crate::sources::config::load(config)?),
        Err(_) => None,
    };
    let api = api.unwrap_or_else(|| {
        let listen = cfg.as_ref().map(|c| c.api_listen);
        match listen {
            // A wildcard listener is reached on loopback.
            Some(a) if a.ip().is_unspecified() => format!("http://127.0.0.1:{}", a.port()),
            Some(a) => format!("http://{a}"),
            None => "http://127.0.0.1:9090".into(),
        }
    });
    let token = match token.filter(|t| !t.is_empty()) {
        Some(t) => t,
        None => {
            let from_cfg = cfg.as_ref().and_then(|c| c.api_token.clone());
            match from_cfg {
                Some(t) => t,
                None => {
                    let dir = cfg
                        .as_ref()
                        .map(|c| c.state_dir.clone())
                        .unwrap_or_else(|| PathBuf::from("/var/lib/lb"));
                    let path = dir.join("api-token");
                    std::fs::read_to_string(&path)
                        .map(|t| t.trim().to_string())
                        .with_context(|| {
                            format!(
                                "no --token or $LB_API_TOKEN, and {} is unreadable",
                                path.display()
                            )
                        })?
                }
            }
        }
    };
    Ok((api, token))
}

/// `lb leave`: the agent withdraws every VIP, waits until bird exports nothing, drains and
/// exits; this waits for that exit.
fn leave(config: &std::path::Path, api: Option<String>, token: Option<String>) -> Result<()> {
    let (api, token) = api_access(config, api, token)?;
    let client = client::ApiClient::new(&api, &token);
    let done = client.post_json("/api/v1/leave", Duration::from_secs(30))?;
    let drain = done["drain_secs"].as_u64().unwrap_or(0);
    println!(
        "withdrawn: bird exported nothing after {} ms; draining for {drain} s",
        done["withdrawn_ms"].as_u64().unwrap_or(0)
    );
    let deadline = crate::clock::now() + Duration::from_secs(drain + 30);
    while client.get_json("/healthz").is_ok() {
        if crate::clock::now() > deadline {
            bail!("the agent still answers {} s after its drain", drain + 30);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("left: the agent has stopped (bird announces nothing for it)");
    Ok(())
}

/// `lb status`: two samples `interval` apart (rates), or a redraw every interval with `--watch`.
fn status(
    config: &std::path::Path,
    api: Option<String>,
    token: Option<String>,
    interval: f64,
    watch: bool,
    cluster: bool,
) -> Result<()> {
    use status::{fetch, render};
    let (api, token) = api_access(config, api, token)?;
    if !(interval > 0.0 && interval <= 3600.0) {
        bail!("--interval must be in (0, 3600] seconds");
    }
    let period = Duration::from_secs_f64(interval);
    let client = client::ApiClient::new(&api, &token);
    if cluster {
        let view = client.get_json("/api/v1/cluster")?;
        print!("{}", status::render_cluster(&view));
        // Disagreeing nodes are a failed check, for scripts.
        if view["agree"].as_bool() != Some(true) {
            std::process::exit(2);
        }
        return Ok(());
    }
    let mut prev = fetch(&client)?;
    std::thread::sleep(period);
    loop {
        let cur = fetch(&client)?;
        let screen = render(Some(&prev), &cur);
        if watch {
            // Clear the screen and home the cursor, then draw.
            print!("\x1b[2J\x1b[H{screen}");
        } else {
            print!("{screen}");
        }
        use std::io::Write as _;
        std::io::stdout().flush()?;
        if !watch {
            return Ok(());
        }
        prev = cur;
        std::thread::sleep(period);
    }
}

/// `lb check-config`: lb.toml, then every file provider's files read as the agent reads them
/// (Traefik directories merged, item by item), with the agent's messages. Redis and etcd are not
/// reached: their records are checked when the agent reads them.
fn check_config(source: &crate::sources::Source) -> Result<()> {
    let c = source.load()?;
    // Server names are resolved as the agent would resolve them.
    crate::sources::dns::configure(&c.providers.dns);
    for f in source.files() {
        println!("{}: read", f.display());
    }
    println!(
        "ok: {} VIPs, {} entry points, {} file providers",
        c.vips.len(),
        c.entrypoints.len(),
        c.providers.files.len()
    );
    // A finding that leaves something out is an error; the others are warnings.
    let report = |findings: &[String]| -> usize {
        let mut left_out = 0;
        for u in findings {
            if u.contains(": left out") {
                left_out += 1;
                println!("error: {u}");
            } else {
                println!("warning: {u}");
            }
        }
        left_out
    };
    let mut errors = report(&c.notes);
    for f in &c.providers.files {
        let mut src = crate::sources::file::FileSource::new(&f.path);
        let (services, routing, rejected) = src.reload_all();
        for e in &rejected {
            println!("error: {e}");
        }
        for b in &routing.broken {
            println!("error: {b}");
        }
        // What the proxy would refuse to build (a middleware's values), as the agent says it.
        let (routers, tcp_routers, problems) =
            crate::agent::proxy_check(&c, "file", routing.dynamic);
        for p in &problems {
            println!("error: {}: {p}", f.path.display());
        }
        let left_out = report(&routing.unsupported);
        errors += rejected.len() + routing.broken.len() + problems.len() + left_out;
        let tcp = match tcp_routers {
            0 => String::new(),
            n => format!(", {n} TCP routers"),
        };
        println!(
            "{}: {} services, {} routers{tcp}{}",
            f.path.display(),
            services.len(),
            routers,
            if rejected.is_empty() && routing.broken.is_empty() {
                ""
            } else {
                " (after what is above)"
            }
        );
    }
    if errors > 0 {
        bail!("{errors} errors (above); the agent would leave out what they name");
    }
    Ok(())
}
