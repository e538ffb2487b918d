use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// lb: an eBPF (XDP) L4 load balancer with Maglev hashing and connection tracking.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
    /// Announce a service instance to the agent's registry (through its admin API).
    Register {
        #[arg(long)]
        service: String,
        /// The instance's address:port (`[v6]:port` for IPv6).
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Expire unless registered again within this many seconds (run it from a timer).
        #[arg(long)]
        ttl: Option<u64>,
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        api: String,
        /// Bearer token; defaults to $LB_API_TOKEN.
        #[arg(long, env = "LB_API_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// On an `ipip` backend: strip the balancer's outer header on IFACE until stopped (SIGTERM).
    Decap {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value = "auto")]
        mode: XdpModeArg,
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

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().cmd {
        Cmd::Run { config } => {
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
            ttl,
            api,
            token,
        } => {
            let url = format!(
                "{}/api/v1/services/{service}/instances",
                api.trim_end_matches('/')
            );
            let body = serde_json::json!({
                "address": addr.ip(), "port": addr.port(), "weight": weight, "ttl_secs": ttl,
            });
            match ureq::post(&url)
                .set("Authorization", &format!("Bearer {token}"))
                .send_json(body)
            {
                Ok(r) => {
                    println!("registered {addr} in {service} ({})", r.status());
                    Ok(())
                }
                Err(ureq::Error::Status(code, r)) => {
                    anyhow::bail!("{url}: {code} {}", r.into_string().unwrap_or_default())
                }
                Err(e) => anyhow::bail!("{url}: {e}"),
            }
        }
        Cmd::Decap { iface, mode } => {
            use lb_userspace::dataplane::AttachMode;
            let mode = match mode {
                XdpModeArg::Auto => AttachMode::Auto,
                XdpModeArg::Native => AttachMode::Native,
                XdpModeArg::Generic => AttachMode::Generic,
            };
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
        Cmd::Detach { config } => {
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
