//! `lb register` and `lb deregister`: where an instance is announced (etcd, Redis or the admin
//! API, as the config says), once or kept alive.

use std::{path::PathBuf, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use tracing::warn;

use super::client::ApiClient;
use crate::{
    model::instance::{Instance, InstanceKey},
    model::{EtcdSpec, RedisSpec},
    sources::config,
    sources::{etcd, redis},
};

/// Where `register` / `deregister` go, and how to reach the admin API otherwise.
#[derive(Args)]
pub struct Target {
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

pub enum Dest {
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

pub fn destination(t: Target) -> Result<Dest> {
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
            let url = format!("/api/v1/services/{service}/instances");
            let body = serde_json::json!({
                "address": instance.address, "port": instance.port, "weight": instance.weight,
                "zone": instance.zone, "metadata": instance.metadata,
                "ttl_secs": ttl.map(|t| t.as_secs().max(1)),
            });
            let client = ApiClient::new(api, token);
            match client.send("POST", &url, Some(body)).await? {
                Ok(_) => Ok(None),
                Err((code, answer)) => bail!("POST {url}: {code} {answer}"),
            }
        }
    }
}

pub async fn deregister(dest: &Dest, service: &str, key: InstanceKey) -> Result<bool> {
    match dest {
        Dest::Etcd(spec) => etcd::deregister(spec, service, key).await,
        Dest::Redis(spec) => redis::deregister(spec, service, key).await,
        Dest::Api { api, token } => {
            // `[v6]:port` in a path: the brackets are percent-encoded.
            let addr = key.to_string().replace('[', "%5B").replace(']', "%5D");
            let url = format!("/api/v1/services/{service}/instances/{addr}");
            let client = ApiClient::new(api, token);
            match client.send("DELETE", &url, None).await? {
                Ok(_) => Ok(true),
                Err((404, _)) => Ok(false),
                Err((code, answer)) => bail!("DELETE {url}: {code} {answer}"),
            }
        }
    }
}

/// `lb register`: once, or (`--keep-alive`) refreshing every ttl/3 until a signal, then
/// deregistering.
pub async fn register(
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
