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
    /// Detach the program and remove the pinned maps of an instance.
    Detach {
        #[arg(long, short, default_value = "lb.toml")]
        config: PathBuf,
    },
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
