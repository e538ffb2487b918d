//! The `redis` provider: service instances registered in Redis, alive while their key is.
//!
//! # Key layout
//!
//! ```text
//! <prefix>services/<service>/<address:port>  →  instance JSON, with a TTL
//! ```
//!
//! e.g. (prefix `lb/`, the default):
//!
//! ```text
//! SET lb/services/web/10.0.0.11:80 '{"address":"10.0.0.11","port":80,"weight":1}' EX 10
//! ```
//!
//! The value and the rules a key must follow are described in [`super::kv`]. Liveness is the key's
//! TTL: an instance that stops re-setting its key before it expires disappears (`lb register
//! --ttl` does the SET; `--keep-alive` repeats it). A key without a TTL stays until deleted.
//!
//! # Watching
//!
//! Changes are seen through keyspace notifications: on connecting, the provider adds `K$gxe` to
//! the server's `notify-keyspace-events` (`CONFIG SET`; keyspace events for SET, DEL/EXPIRE/
//! RENAME, expirations and evictions). Where CONFIG is not allowed it logs a warning, and changes
//! are seen at the next resync only. It subscribes to `__keyspace@<db>__:<prefix>services/*` on a
//! pub/sub connection *before* reading, so nothing changed between the read and the subscription
//! is missed. A notification only says "something changed": after each burst (debounced 20 ms,
//! at most 200 ms) and every `resync_secs` regardless, the provider re-reads the whole prefix
//! (SCAN + MGET) and sends a complete snapshot, so a lost notification costs one resync period.
//!
//! # Failures
//!
//! Invalid entries are rejected one by one (the others count). When Redis cannot be reached, or a
//! read fails half-way, the provider reports an error and sends no snapshot — the registry keeps
//! the last good one — and retries with backoff (200 ms doubling to 5 s); once back, it sends a
//! fresh snapshot. A Redis without persistence restarts empty: its instances return as they
//! refresh their keys.

use std::{collections::BTreeSet, time::Duration, time::Instant};

use anyhow::{anyhow, bail, Result};
use futures_util::StreamExt as _;
use redis::{aio::MultiplexedConnection, AsyncConnectionConfig, Client};
use tokio::{sync::mpsc, time::timeout};
use tracing::{debug, info, warn};

use super::{
    kv::{self, Backoff, KeyError},
    Event, Rank,
};
use crate::{
    model::instance::{Instance, InstanceKey, Services},
    model::RedisSpec,
};

/// The provider's name in the registry, the API and the logs.
pub const NAME: &str = "redis";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const DEBOUNCE: Duration = Duration::from_millis(20);
const MAX_DELAY: Duration = Duration::from_millis(200);
const SCAN_COUNT: usize = 1000;
const MGET_CHUNK: usize = 256;
/// Notification classes the provider needs (see the module doc).
const NEEDED_FLAGS: &str = "K$gxe";

fn client(spec: &RedisSpec) -> Result<Client> {
    // The URL may hold a password: it stays out of the message.
    Client::open(spec.url.as_str()).map_err(|e| anyhow!("providers.redis.url: {e}"))
}

async fn connect(client: &Client) -> Result<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(IO_TIMEOUT);
    timeout(
        CONNECT_TIMEOUT + IO_TIMEOUT,
        client.get_multiplexed_async_connection_with_config(&cfg),
    )
    .await
    .map_err(|_| anyhow!("connecting to Redis: timed out"))?
    .map_err(failed("connecting to Redis"))
}

/// A Redis error with what failed. (Its Display already includes its I/O cause, which anyhow's
/// chain would print a second time.)
fn failed(what: impl std::fmt::Display) -> impl FnOnce(redis::RedisError) -> anyhow::Error {
    move |e| anyhow!("{what}: {e}")
}

/// Escapes Redis glob metacharacters, so a prefix is matched literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `current` plus what the provider needs (`A` already stands for `g$lshzxetd`).
fn merged_flags(current: &str) -> String {
    let mut out = current.to_string();
    for c in NEEDED_FLAGS.chars() {
        let covered = out.contains(c) || (c != 'K' && out.contains('A'));
        if !covered {
            out.push(c);
        }
    }
    out
}

/// Turns keyspace notifications on; false (and a warning) when the server does not allow it.
async fn enable_notifications(con: &mut MultiplexedConnection, resync: Duration) -> bool {
    let r: Result<()> = async {
        let got: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(con)
            .await?;
        let current = got.get(1).cloned().unwrap_or_default();
        let want = merged_flags(&current);
        if want != current {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg(&want)
                .query_async::<()>(con)
                .await?;
            info!(
                provider = NAME,
                flags = want,
                "keyspace notifications enabled"
            );
        }
        Ok(())
    }
    .await;
    match r {
        Ok(()) => true,
        Err(e) => {
            warn!(
                provider = NAME,
                "cannot enable keyspace notifications ({e:#}); set notify-keyspace-events to \
                 include {NEEDED_FLAGS} on the server, else changes are seen only every {resync:?}"
            );
            false
        }
    }
}

/// Reads every entry under the prefix: the valid instances and the rejected keys.
async fn read_all(
    con: &mut MultiplexedConnection,
    prefix: &str,
) -> Result<(Services, Vec<KeyError>)> {
    let (entries, mut errors) = read_range(con, &kv::services_prefix(prefix)).await?;
    let (services, bad) = kv::snapshot(
        prefix,
        entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
    );
    errors.extend(bad);
    Ok((services, errors))
}

/// Reads every string key starting with `key_prefix`, and the keys that are not strings. Any
/// failed command fails the whole read (a partial read must never become a snapshot).
async fn read_range(
    con: &mut MultiplexedConnection,
    key_prefix: &str,
) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, Vec<KeyError>)> {
    let pattern = format!("{}*", glob_escape(key_prefix));
    let mut keys = BTreeSet::<Vec<u8>>::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(con)
            .await
            .map_err(failed("SCAN"))?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let keys: Vec<Vec<u8>> = keys.into_iter().collect();
    let mut entries = Vec::with_capacity(keys.len());
    let mut missing = Vec::new();
    for chunk in keys.chunks(MGET_CHUNK) {
        let mut cmd = redis::cmd("MGET");
        for k in chunk {
            cmd.arg(k.as_slice());
        }
        let values: Vec<Option<Vec<u8>>> = cmd.query_async(con).await.map_err(failed("MGET"))?;
        if values.len() != chunk.len() {
            bail!(
                "MGET answered {} values for {} keys",
                values.len(),
                chunk.len()
            );
        }
        for (k, v) in chunk.iter().zip(values) {
            match v {
                Some(v) => entries.push((k.clone(), v)),
                None => missing.push(k.clone()),
            }
        }
    }
    let mut errors = Vec::new();
    // MGET answers nil both for a key gone since the SCAN and for a key that is not a string.
    for k in missing {
        let kind: String = redis::cmd("TYPE")
            .arg(k.as_slice())
            .query_async(con)
            .await
            .map_err(failed("TYPE"))?;
        if kind != "none" {
            errors.push(KeyError {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: format!("a Redis {kind}, not a string"),
            });
        }
    }
    Ok((entries, errors))
}

/// One read of the prefix, for the agent's first apply.
pub async fn read_once(spec: &RedisSpec) -> Result<(Services, Vec<KeyError>)> {
    let mut con = connect(&client(spec)?).await?;
    read_all(&mut con, &spec.prefix).await
}

/// One connection's life: subscribe, read, then re-read on notifications and every resync.
/// Ok: the control loop is gone. Err: the connection failed (the caller reports and retries).
async fn session(
    client: &Client,
    spec: &RedisSpec,
    layout: &kv::Layout,
    channel: &str,
    events: &mpsc::Sender<Event>,
    backoff: &mut Backoff,
) -> Result<()> {
    let name = layout.provider(NAME);
    let key_prefix = layout.key_prefix();
    let mut con = connect(client).await?;
    enable_notifications(&mut con, spec.resync).await;
    let mut pubsub = timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| anyhow!("pub/sub connection: timed out"))?
        .map_err(failed("pub/sub connection"))?;
    timeout(IO_TIMEOUT, pubsub.psubscribe(channel))
        .await
        .map_err(|_| anyhow!("PSUBSCRIBE: timed out"))?
        .map_err(failed("PSUBSCRIBE"))?;
    let mut messages = pubsub.into_on_message();
    let at = crate::clock::now();
    let (entries, errors) = read_range(&mut con, &key_prefix).await?;
    info!(
        provider = name,
        keys = entries.len(),
        "connected; watching {channel}"
    );
    if !report(events, layout, &entries, errors, at).await {
        return Ok(());
    }
    backoff.reset();
    let mut resync = tokio::time::interval_at(crate::clock::timer_now() + spec.resync, spec.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let at = tokio::select! {
            m = messages.next() => {
                if m.is_none() {
                    bail!("the pub/sub connection closed");
                }
                let at = crate::clock::now();
                // Debounce: a burst of changes costs one read.
                let deadline = crate::clock::timer_now() + MAX_DELAY;
                loop {
                    let quiet = (crate::clock::timer_now() + DEBOUNCE).min(deadline);
                    match tokio::time::timeout_at(quiet, messages.next()).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => bail!("the pub/sub connection closed"),
                        Err(_) => break,
                    }
                }
                at
            }
            _ = resync.tick() => {
                debug!(provider = name, "resync");
                crate::clock::now()
            }
        };
        let (entries, errors) = read_range(&mut con, &key_prefix).await?;
        if !report(events, layout, &entries, errors, at).await {
            return Ok(());
        }
    }
}

/// A range's meaning, then the keys that were not strings. False: the control loop is gone.
async fn report(
    events: &mpsc::Sender<Event>,
    layout: &kv::Layout,
    entries: &[(Vec<u8>, Vec<u8>)],
    errors: Vec<KeyError>,
    at: Instant,
) -> bool {
    if !kv::report_range(events, NAME, Rank::REDIS, layout, entries, at).await {
        return false;
    }
    for e in errors {
        let ev = Event::Error {
            provider: layout.provider(NAME),
            rank: Rank::REDIS,
            error: format!("rejected {e}"),
        };
        if events.send(ev).await.is_err() {
            return false;
        }
    }
    true
}

/// Runs the provider until the control loop goes away: lb's instances, and with `traefik_root`
/// a Traefik configuration beside them (its own session, reported as `redis:traefik`). Fails
/// only on a URL it cannot use.
pub async fn run(spec: RedisSpec, events: mpsc::Sender<Event>) -> Result<()> {
    let client = client(&spec)?;
    if let Some(root) = spec.traefik_root.clone() {
        let file_dirs = spec.traefik_file_dirs.clone();
        let (client, spec, events) = (client.clone(), spec.clone(), events.clone());
        tokio::spawn(async move {
            run_range(
                client,
                spec,
                kv::Layout::Traefik {
                    root,
                    file_dirs,
                    kept: Default::default(),
                },
                events,
            )
            .await
        });
    }
    let layout = kv::Layout::Lb {
        prefix: spec.prefix.clone(),
    };
    run_range(client, spec, layout, events).await;
    Ok(())
}

async fn run_range(
    client: Client,
    spec: RedisSpec,
    layout: kv::Layout,
    events: mpsc::Sender<Event>,
) {
    let db = client.get_connection_info().redis.db;
    let channel = format!("__keyspace@{db}__:{}*", glob_escape(&layout.key_prefix()));
    let mut backoff = Backoff::new();
    loop {
        match session(&client, &spec, &layout, &channel, &events, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                let ev = Event::Error {
                    provider: layout.provider(NAME),
                    rank: Rank::REDIS,
                    error: format!("{e:#} (retrying in {delay:?})"),
                };
                if events.send(ev).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Writes an instance under its key; with `ttl`, it expires unless written again in time.
pub async fn register(
    spec: &RedisSpec,
    service: &str,
    instance: &Instance,
    ttl: Option<Duration>,
) -> Result<()> {
    kv::check_registration(service, instance)?;
    let key = kv::instance_key(&spec.prefix, service, instance.key());
    let value = kv::encode(instance)?;
    let mut con = connect(&client(spec)?).await?;
    let mut cmd = redis::cmd("SET");
    cmd.arg(&key).arg(&value);
    if let Some(ttl) = ttl {
        cmd.arg("EX")
            .arg(ttl.as_millis().div_ceil(1000).max(1) as u64);
    }
    cmd.query_async::<()>(&mut con)
        .await
        .map_err(failed(format!("SET {key}")))
}

/// Deletes an instance's key. Returns whether there was one.
pub async fn deregister(spec: &RedisSpec, service: &str, key: InstanceKey) -> Result<bool> {
    let key = kv::instance_key(&spec.prefix, service, key);
    let mut con = connect(&client(spec)?).await?;
    let n: u64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut con)
        .await
        .map_err(failed(format!("DEL {key}")))?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_globs() {
        assert_eq!(merged_flags(""), "K$gxe");
        assert_eq!(merged_flags("Ex"), "ExK$ge");
        assert_eq!(merged_flags("KA"), "KA");
        assert_eq!(merged_flags("AE"), "AEK");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
