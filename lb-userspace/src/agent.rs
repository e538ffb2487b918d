//! `lb run`: wires config → dataplane → balancer → API, then waits for a signal.
//!
//! Stopping leaves the pinned program and maps forwarding: the data path does not depend on the
//! agent being alive, only changes do.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{
    api::{self, ApiState},
    balancer::Balancer,
    config::{self, Config},
    dataplane::Dataplane,
};

/// The admin token: from the config, else `LB_API_TOKEN`, else a random one written to
/// `<state_dir>/api-token` (mode 0600) so local tools can read it. The API never runs open.
fn api_token(cfg: &Config) -> Result<String> {
    if let Some(t) = &cfg.api_token {
        return Ok(t.clone());
    }
    if let Ok(t) = std::env::var("LB_API_TOKEN") {
        if !t.is_empty() {
            return Ok(t);
        }
    }
    use rand::Rng as _;
    let token: String = rand::thread_rng()
        .sample_iter(rand::distributions::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let path = cfg.state_dir.join("api-token");
    {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(token.as_bytes())?;
    }
    info!(path = %path.display(), "no api.token or LB_API_TOKEN: generated a token");
    Ok(token)
}

pub async fn run(config_path: &Path) -> Result<()> {
    let cfg = config::load(config_path)?;
    let token = api_token(&cfg)?;
    let dp = Dataplane::open(&cfg.pin_root, &cfg.instance, &cfg.limits, cfg.debug)?;
    info!(pins = %dp.pin_dir().display(), "maps ready");
    let balancer = tokio::task::block_in_place(|| Balancer::new(dp, &cfg.vips))?;
    let balancer = Arc::new(Mutex::new(balancer));
    {
        let mut b = balancer
            .lock()
            .map_err(|_| anyhow::anyhow!("lock poisoned"))?;
        for iface in &cfg.interfaces {
            b.dataplane().attach(iface, cfg.xdp_mode)?;
        }
    }
    let listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .with_context(|| format!("binding the admin API on {}", cfg.api_listen))?;
    info!(listen = %cfg.api_listen, "admin API up");
    let state = ApiState {
        balancer: balancer.clone(),
        token: token.into(),
    };
    let app = api::router(state);

    let refresher = {
        let balancer = balancer.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let b = balancer.clone();
                let r = tokio::task::spawn_blocking(move || match b.lock() {
                    Ok(mut b) => b.refresh_neighbors(),
                    Err(_) => Err(anyhow::anyhow!("state lock poisoned")),
                })
                .await;
                if let Ok(Err(e)) = r {
                    warn!("neighbour refresh: {e:#}");
                }
            }
        })
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    refresher.abort();
    info!("agent stopped; the pinned program keeps forwarding (`lb detach` removes it)");
    Ok(())
}
