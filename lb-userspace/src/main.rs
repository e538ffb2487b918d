use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use lb_userspace::{
    config,
    model::{EtcdSpec, Mac, RedisSpec},
    providers::{etcd, redis},
    registry::{Instance, InstanceKey},
};
use tracing::warn;

/// lb: an eBPF (XDP) L4 load balancer with Maglev hashing and connection tracking.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as text for people ("human") or one JSON object per line ("json"). Filter
    /// with RUST_LOG (e.g. `info,lb_userspace::proxy=debug`).
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
        #[arg(long, short, default_value = "lb.toml")]
        config: PathBuf,
    },
    /// Check a config file and print what is wrong (file:line: field: reason).
    CheckConfig {
        #[arg(long, short, default_value = "lb.toml")]
        config: PathBuf,
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
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=lb_userspace::api::MAX_TTL_SECS))]
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
    },
    /// Detach the program and remove the pinned maps of an instance.
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
fn main() -> std::process::ExitCode {
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr: stdout is the access log's when it has no file.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    match cli.cmd {
        Cmd::Run { config } => {
            require_privileges("run")?;
            tokio::runtime::Runtime::new()?.block_on(lb_userspace::agent::run(&config))
        }
        Cmd::CheckConfig { config } => {
            let c = lb_userspace::config::load(&config)?;
            println!("{}: ok ({} VIPs)", config.display(), c.vips.len());
            Ok(())
        }
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
            use lb_userspace::model::AttachMode;
            let mode = match mode {
                XdpModeArg::Auto => AttachMode::Auto,
                XdpModeArg::Native => AttachMode::Native,
                XdpModeArg::Generic => AttachMode::Generic,
            };
            require_privileges("decap")?;
            let _attached = lb_userspace::dataplane::attach_decap(&iface, mode)?;
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
        } => status(&config, api, token, interval, watch),
        Cmd::Detach { config } => {
            require_privileges("detach")?;
            let c = lb_userspace::config::load(&config)?;
            let removed = lb_userspace::dataplane::detach(&c.pin_root, &c.instance)?;
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

/// `lb status`: two samples `interval` apart (rates), or a redraw every interval with `--watch`.
fn status(
    config: &std::path::Path,
    api: Option<String>,
    token: Option<String>,
    interval: f64,
    watch: bool,
) -> Result<()> {
    use lb_userspace::status::{fetch, render};
    let cfg = match std::fs::metadata(config) {
        Ok(_) => Some(lb_userspace::config::load(config)?),
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
    if !(interval > 0.0 && interval <= 3600.0) {
        bail!("--interval must be in (0, 3600] seconds");
    }
    let period = Duration::from_secs_f64(interval);
    let mut prev = fetch(&api, &token)?;
    std::thread::sleep(period);
    loop {
        let cur = fetch(&api, &token)?;
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

/// Where `register` / `deregister` go, and how to reach the admin API otherwise.
#[derive(Args)]
struct Target {
    /// The agent's config, read only to find [providers.etcd] / [providers.redis].
    #[arg(long, short, default_value = "lb.toml")]
    config: PathBuf,
    /// The admin API, when the config has neither provider (or does not exist).
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    api: String,
    /// The admin API's bearer token; defaults to $LB_API_TOKEN.
    #[arg(long, env = "LB_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

enum Dest {
    Etcd(EtcdSpec),
    Redis(RedisSpec),
    Api { api: String, token: String },
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Etcd(s) => write!(f, "etcd {}", s.endpoints.join(",")),
            Dest::Redis(_) => write!(f, "redis"),
            Dest::Api { api, .. } => write!(f, "admin API {api}"),
        }
    }
}

fn destination(t: Target) -> Result<Dest> {
    match std::fs::metadata(&t.config) {
        Ok(_) => {
            let c = config::load(&t.config)?;
            if let Some(e) = c.providers.etcd {
                return Ok(Dest::Etcd(e));
            }
            if let Some(r) = c.providers.redis {
                return Ok(Dest::Redis(r));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", t.config.display())),
    }
    let token = t.token.filter(|t| !t.is_empty()).ok_or_else(|| {
        anyhow!(
            "no [providers.etcd] or [providers.redis] in {}: the admin API needs --token or \
             $LB_API_TOKEN",
            t.config.display()
        )
    })?;
    Ok(Dest::Api { api: t.api, token })
}

/// One admin API request (blocking, off the runtime): its status, or `Err((status, answer))`.
async fn api_call(
    method: &'static str,
    url: String,
    token: &str,
    body: Option<serde_json::Value>,
) -> Result<Result<u16, (u16, String)>> {
    let auth = format!("Bearer {token}");
    tokio::task::spawn_blocking(move || {
        let req = ureq::request(method, &url).set("Authorization", &auth);
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(r) => Ok(Ok(r.status())),
            Err(ureq::Error::Status(code, r)) => {
                Ok(Err((code, r.into_string().unwrap_or_default())))
            }
            // ureq names the URL itself.
            Err(e) => Err(anyhow!("{method} {e}")),
        }
    })
    .await?
}

/// One registration. Returns the etcd lease it made, if any.
async fn register_once(
    dest: &Dest,
    service: &str,
    instance: &Instance,
    ttl: Option<Duration>,
) -> Result<Option<i64>> {
    match dest {
        Dest::Etcd(spec) => etcd::register(spec, service, instance, ttl).await,
        Dest::Redis(spec) => redis::register(spec, service, instance, ttl)
            .await
            .map(|()| None),
        Dest::Api { api, token } => {
            let url = format!(
                "{}/api/v1/services/{service}/instances",
                api.trim_end_matches('/')
            );
            let body = serde_json::json!({
                "address": instance.address, "port": instance.port, "weight": instance.weight,
                "zone": instance.zone, "metadata": instance.metadata,
                "ttl_secs": ttl.map(|t| t.as_secs().max(1)),
            });
            match api_call("POST", url.clone(), token, Some(body)).await? {
                Ok(_) => Ok(None),
                Err((code, answer)) => bail!("POST {url}: {code} {answer}"),
            }
        }
    }
}

async fn deregister(dest: &Dest, service: &str, key: InstanceKey) -> Result<bool> {
    match dest {
        Dest::Etcd(spec) => etcd::deregister(spec, service, key).await,
        Dest::Redis(spec) => redis::deregister(spec, service, key).await,
        Dest::Api { api, token } => {
            // `[v6]:port` in a path: the brackets are percent-encoded.
            let addr = key.to_string().replace('[', "%5B").replace(']', "%5D");
            let url = format!(
                "{}/api/v1/services/{service}/instances/{addr}",
                api.trim_end_matches('/')
            );
            match api_call("DELETE", url.clone(), token, None).await? {
                Ok(_) => Ok(true),
                Err((404, _)) => Ok(false),
                Err((code, answer)) => bail!("DELETE {url}: {code} {answer}"),
            }
        }
    }
}

/// `lb register`: once, or (`--keep-alive`) refreshing every ttl/3 until a signal, then
/// deregistering.
async fn register(
    dest: &Dest,
    service: &str,
    instance: &Instance,
    ttl: Option<Duration>,
    keep_alive: bool,
) -> Result<()> {
    let addr = instance.key();
    let mut lease = register_once(dest, service, instance, ttl).await?;
    match lease {
        Some(id) => println!("registered {addr} in {service} ({dest}, lease {id:x})"),
        None => println!("registered {addr} in {service} ({dest})"),
    }
    let Some(ttl) = ttl.filter(|_| keep_alive) else {
        return Ok(());
    };
    let period = (ttl / 3).max(Duration::from_millis(500));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        let refreshed = match (dest, lease) {
            (Dest::Etcd(spec), Some(id)) => match etcd::keep_alive(spec, id).await {
                Ok(true) => Ok(()),
                Ok(false) => {
                    warn!("lease {id:x} is gone; registering again");
                    register_once(dest, service, instance, Some(ttl))
                        .await
                        .map(|l| lease = l)
                }
                Err(e) => Err(e),
            },
            _ => register_once(dest, service, instance, Some(ttl))
                .await
                .map(|l| lease = l),
        };
        if let Err(e) = refreshed {
            warn!("refreshing {addr} in {service}: {e:#}; retrying in {period:?}");
        }
    }
    match deregister(dest, service, addr).await {
        Ok(_) => println!("deregistered {addr} from {service} ({dest})"),
        Err(e) => warn!("deregistering {addr} from {service}: {e:#} (it expires with its TTL)"),
    }
    Ok(())
}
