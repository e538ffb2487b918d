//! ACME (RFC 8555) certificates for the proxy's TLS entry points, so a public name needs no
//! certificate file and no renewal cron job.
//!
//! Why it is built this way:
//! - The proxy answers the challenges itself (HTTP-01 on its plain-HTTP entry points, TLS-ALPN-01
//!   on its TLS ones), because the CA validates against the very address the proxy listens on:
//!   nothing else could answer there. [`Store`] is what the listeners and the client share;
//!   the listeners only read it, so a request never waits on the ACME client.
//! - Each configured domain gets a certificate of its own: one failing name (DNS not pointed
//!   here yet, a rate limit) never holds back the others, and renewals are independent.
//! - Account and certificates live in `<state_dir>/acme/<directory-hash>/` and are loaded before
//!   the listeners open: a restart serves at once and orders nothing it already has (CAs rate
//!   limit orders), and switching the directory (staging → production) starts afresh instead of
//!   serving the other CA's certificates. Files are written to a temporary name and renamed, so
//!   a crash never leaves half a key; keys are mode 0600.
//! - Renewal is due when less than `renew_before` of the certificate's life remains, or less
//!   than a third of it (short-lived certificates), but never before half of its life has passed
//!   (a `renew_before` longer than the lifetime would otherwise renew in a loop). Failures are
//!   logged and retried with exponential backoff (30 s doubling to 1 h): the current certificate
//!   keeps serving meanwhile, and the agent never stops for a CA's sake.
//! - In a cluster ([`Shared`], the cluster's etcd), the account and the certificates are the
//!   cluster's: a node orders or renews a name only while it holds that name's lock (an etcd key
//!   under a lease, so a writer that dies lets go when its lease ends), and every node installs
//!   what the writer stored. The challenges' answers are shared too, under the writer's lease:
//!   the CA's validation may reach any node behind the router.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::model::l7::{AcmeSpec, ChallengeKind};
use anyhow::{anyhow, bail, Context as _, Result};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{header, Method, Request, Response};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::{crypto::ring::sign::any_supported_type, sign::CertifiedKey};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

/// The ALPN protocol of TLS-ALPN-01 validators (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";
const FIRST_RETRY: Duration = Duration::from_secs(30);
const LAST_RETRY: Duration = Duration::from_secs(3600);
/// The longest the client sleeps between checks (a changed clock is noticed within it).
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// One order, from creation to the certificate, must finish within this.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);

/// A future as the [`Shared`] store returns it.
pub type SharedFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>>;

/// The cluster's store for ACME (the agent gives an etcd-backed one): keys are relative to the
/// cluster's ACME root.
pub trait Shared: Send + Sync {
    /// Reads every key at one revision (a certificate and its key are never torn apart).
    fn read(&self, keys: Vec<String>) -> SharedFuture<'_, Vec<Option<Vec<u8>>>>;
    /// Writes every pair at once (one transaction).
    fn write(&self, pairs: Vec<(String, Vec<u8>)>) -> SharedFuture<'_, ()>;
    /// Takes `key` for this node unless another node holds it: `None` then.
    fn try_lock(&self, key: String) -> SharedFuture<'_, Option<Box<dyn Held>>>;
}

/// A lock held: kept alive until released, or until its holder dies (then its lease ends).
pub trait Held: Send + Sync {
    /// Writes pairs that live only as long as the lock (the challenges' answers).
    fn write(&self, pairs: Vec<(String, Vec<u8>)>) -> SharedFuture<'_, ()>;
    fn release(self: Box<Self>) -> SharedFuture<'static, ()>;
}

/// A shared challenge's key, relative to the ACME root: `<dir>/challenges/http01/<token>` (the
/// key authorization) or `<dir>/challenges/alpn/<name>` (the digest, hex).
pub enum SharedChallenge<'a> {
    Http01 { token: &'a str },
    Alpn { name: &'a str },
}

impl SharedChallenge<'_> {
    /// Which challenge a key under the ACME root names, if any.
    pub fn parse(key: &str) -> Option<SharedChallenge<'_>> {
        let (_, rest) = key.split_once("/challenges/")?;
        // Tokens are base64url (RFC 8555 §8.3), names DNS names: nothing else is answered.
        let fits = |s: &str, max: usize, ok: fn(u8) -> bool| {
            !s.is_empty() && s.len() <= max && s.bytes().all(ok)
        };
        match rest.split_once('/')? {
            ("http01", token)
                if fits(token, 128, |b| {
                    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
                }) =>
            {
                Some(SharedChallenge::Http01 { token })
            }
            ("alpn", name)
                if fits(name, 253, |b| {
                    b.is_ascii_alphanumeric() || b == b'-' || b == b'.'
                }) =>
            {
                Some(SharedChallenge::Alpn { name })
            }
            _ => None,
        }
    }
}

/// What the ACME client shares with the listeners: pending challenges and issued certificates.
#[derive(Default)]
pub struct Store {
    /// HTTP-01: token → key authorization.
    http01: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: name → the self-signed certificate carrying the acmeIdentifier.
    tls_alpn01: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// Issued certificates in the configured order of their names.
    issued: ArcSwap<Vec<(String, Arc<CertifiedKey>)>>,
}

impl Store {
    /// The issued certificate for `name`.
    pub fn certificate(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.issued
            .load()
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, k)| k.clone())
    }

    /// Every issued certificate with its name (for the expiry metric).
    pub fn issued(&self) -> Vec<(String, Arc<CertifiedKey>)> {
        self.issued.load().as_ref().clone()
    }

    /// The certificate of the first configured name that has one.
    pub fn fallback(&self) -> Option<Arc<CertifiedKey>> {
        self.issued.load().first().map(|(_, k)| k.clone())
    }

    /// The TLS-ALPN-01 certificate for a pending challenge on `name`.
    pub fn challenge_certificate(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.tls_alpn01
            .lock()
            .ok()?
            .get(&name.to_ascii_lowercase())
            .cloned()
    }

    /// The HTTP-01 answer, when `req` (on a plain-HTTP entry point) asks for a pending token;
    /// anything else under the challenge path goes on to routing (an upstream may answer its own).
    pub fn http01_response<B>(
        &self,
        scheme: &str,
        req: &Request<B>,
    ) -> Option<Response<super::Body>> {
        if scheme != "http" || !matches!(*req.method(), Method::GET | Method::HEAD) {
            return None;
        }
        let token = req.uri().path().strip_prefix(CHALLENGE_PATH)?;
        let answer = self.http01.lock().ok()?.get(token)?.clone();
        let mut resp = Response::new(
            Full::new(Bytes::from(answer))
                .map_err(|never| match never {})
                .boxed(),
        );
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/octet-stream"),
        );
        Some(resp)
    }

    fn set_issued(&self, order: &[String], name: &str, key: Arc<CertifiedKey>) {
        self.issued.rcu(|cur| {
            let mut next: Vec<(String, Arc<CertifiedKey>)> =
                cur.iter().filter(|(n, _)| n != name).cloned().collect();
            next.push((name.to_string(), key.clone()));
            next.sort_by_key(|(n, _)| order.iter().position(|o| o == n).unwrap_or(usize::MAX));
            next
        });
    }

    /// Forgets the issued certificates (the `[acme]` section changed or went away).
    pub fn clear(&self) {
        self.issued.store(Arc::new(Vec::new()));
    }

    /// Another node's challenge, seen in the cluster's store: answered here too, since the
    /// CA's validation may reach this node. `value` is the key authorization (HTTP-01) or the
    /// digest in hex (TLS-ALPN-01); bounded, as anything from outside.
    pub fn share_challenge(&self, c: &SharedChallenge<'_>, value: &[u8]) -> Result<()> {
        if value.len() > 512 {
            bail!("a challenge's answer is at most 512 bytes");
        }
        match c {
            SharedChallenge::Http01 { token } => {
                let answer = std::str::from_utf8(value).context("not UTF-8")?;
                self.http01
                    .lock()
                    .map_err(|_| anyhow!("challenge store poisoned"))?
                    .insert(token.to_string(), answer.to_string());
            }
            SharedChallenge::Alpn { name } => {
                let text = std::str::from_utf8(value).context("not UTF-8")?;
                let digest = (0..text.len())
                    .step_by(2)
                    .map(|i| {
                        text.get(i..i + 2)
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                    })
                    .collect::<Option<Vec<u8>>>()
                    .filter(|d| d.len() == 32)
                    .ok_or_else(|| anyhow!("not a SHA-256 digest in hex"))?;
                let cert = alpn_certificate(name, &digest)?;
                self.tls_alpn01
                    .lock()
                    .map_err(|_| anyhow!("challenge store poisoned"))?
                    .insert(name.to_ascii_lowercase(), cert);
            }
        }
        Ok(())
    }

    /// The challenge is over (its key went from the cluster's store).
    pub fn unshare_challenge(&self, c: &SharedChallenge<'_>) {
        match c {
            SharedChallenge::Http01 { token } => {
                if let Ok(mut m) = self.http01.lock() {
                    m.remove(*token);
                }
            }
            SharedChallenge::Alpn { name } => {
                if let Ok(mut m) = self.tls_alpn01.lock() {
                    m.remove(&name.to_ascii_lowercase());
                }
            }
        }
    }
}

/// True when the handshake was a TLS-ALPN-01 validation: the connection has served its purpose
/// and carries no HTTP.
pub fn is_validation(conn: &rustls::ServerConnection) -> bool {
    conn.alpn_protocol() == Some(ACME_TLS_ALPN)
}

/// Counters, for tests and the log.
#[derive(Debug, Default)]
pub struct Stats {
    /// Orders created at the CA.
    pub orders: AtomicU64,
    /// Certificates obtained and installed.
    pub issued: AtomicU64,
    /// Of those, certificates another node of the cluster ordered.
    pub adopted: AtomicU64,
    /// Failed attempts (each one retried later).
    pub failures: AtomicU64,
}

#[derive(Default)]
struct Domain {
    /// notBefore, notAfter of the certificate in use.
    validity: Option<(SystemTime, SystemTime)>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// The ACME client of one `[acme]` section: loads what is stored, orders what is missing or due,
/// installs the results in the [`Store`].
pub struct Acme {
    spec: AcmeSpec,
    dir: PathBuf,
    store: Arc<Store>,
    stats: Arc<Stats>,
    account: Option<Account>,
    domains: HashMap<String, Domain>,
    /// `[cluster]`: the account and certificates are the cluster's.
    shared: Option<Arc<dyn Shared>>,
    /// `<directory hash>`: this directory's keys in the shared store start with it.
    root: String,
    /// The names the configuration lists; `spec.domains` is these and the routers' wishes.
    configured: Vec<String>,
    /// What routers ask resolvers for (their `tls.certResolver`), as it changes.
    wanted: Option<tokio::sync::watch::Receiver<Vec<crate::model::l7::AcmeWish>>>,
}

/// The most names routers may add to the configured ones (each is an order at the CA, whose
/// limits are the account's).
pub const MAX_ROUTER_NAMES: usize = 100;

/// While another node holds a name's lock, this node looks for its result this often.
const OTHERS_POLL: Duration = Duration::from_secs(2);
/// The other nodes see a shared challenge within this (a watch), before the CA is told to look.
const SHARE_DELAY: Duration = Duration::from_secs(1);

/// How a due name was dealt with on one pass.
enum Got {
    /// This node ordered it: notBefore, notAfter.
    Ordered((SystemTime, SystemTime)),
    /// Another node of the cluster ordered and stored it.
    Adopted((SystemTime, SystemTime)),
    /// Another node holds the name's lock.
    Busy,
}

/// When a certificate valid from `not_before` to `not_after` is due for renewal.
pub fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: Duration,
) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let window = renew_before.max(life / 3).min(life / 2);
    not_after - window
}

fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow!("unreadable certificate: {e}"))?;
    let at = |t: i64| {
        u64::try_from(t)
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .unwrap_or(UNIX_EPOCH)
    };
    let v = cert.validity();
    Ok((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("writing {}: {e}", path.display())
    })
}

/// The certificate a TLS-ALPN-01 validator must see for `name`: self-signed, for exactly that
/// name, with the critical acmeIdentifier extension holding SHA-256 of the key authorization.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| anyhow!("{e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        any_supported_type(&der)?,
    )))
}

/// The HTTPS client for the directory: the system's roots, plus `ca_file`'s.
fn http_client(ca_file: Option<&Path>) -> Result<Box<dyn instant_acme::HttpClient>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| anyhow!("{}: {e:?}", path.display()))?;
            roots
                .add(c)
                .with_context(|| format!("{}: not a CA certificate", path.display()))?;
            n += 1;
        }
        if n == 0 {
            bail!("{}: no certificate in the file", path.display());
        }
    }
    if roots.is_empty() {
        bail!("no trusted roots for the ACME directory (install ca-certificates or set ca_file)");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let client: hyper_util::client::legacy::Client<_, instant_acme::BodyWrapper<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    Ok(Box::new(client))
}

/// Removes a challenge's answers from the store however the order ends.
struct Pending<'a> {
    store: &'a Store,
    tokens: Vec<String>,
    names: Vec<String>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.store.http01.lock() {
            for t in &self.tokens {
                m.remove(t);
            }
        }
        if let Ok(mut m) = self.store.tls_alpn01.lock() {
            for n in &self.names {
                m.remove(n);
            }
        }
    }
}

impl Acme {
    /// A client for `spec`, keeping its files under `state_dir/acme/`, installing into `store`.
    pub fn new(spec: AcmeSpec, state_dir: &Path, store: Arc<Store>) -> Acme {
        let hash = xxhash_rust::xxh3::xxh3_64(spec.directory.as_bytes());
        Acme {
            root: format!("{hash:016x}"),
            shared: None,
            dir: state_dir.join("acme").join(format!("{hash:016x}")),
            domains: spec
                .domains
                .iter()
                .map(|d| (d.clone(), Domain::default()))
                .collect(),
            configured: spec.domains.clone(),
            spec,
            store,
            stats: Default::default(),
            account: None,
            wanted: None,
        }
    }

    /// Also orders the names routers ask this resolver for (all that name one, for lb.toml's
    /// `[acme]`, which has no name), following their changes: a new name is ordered at once,
    /// one no longer wanted is not renewed.
    pub fn with_names(
        mut self,
        wanted: tokio::sync::watch::Receiver<Vec<crate::model::l7::AcmeWish>>,
    ) -> Acme {
        self.wanted = Some(wanted);
        self.follow_names();
        self
    }

    /// Takes in the routers' names as they are now; true when the list changed.
    fn follow_names(&mut self) -> bool {
        let Some(w) = self.wanted.as_mut() else {
            return false;
        };
        let ours = |r: &str| self.spec.resolver.as_deref().is_none_or(|n| n == r);
        let mut all = self.configured.clone();
        let mut over = 0;
        for wish in w.borrow_and_update().iter().filter(|w| ours(&w.resolver)) {
            for n in &wish.names {
                if all.contains(n) {
                    continue;
                }
                // Routers may come from a store others write: a bounded number of orders.
                if all.len() >= self.configured.len() + MAX_ROUTER_NAMES {
                    over += 1;
                    continue;
                }
                all.push(n.clone());
            }
        }
        if over > 0 {
            warn!(
                over,
                max = MAX_ROUTER_NAMES,
                "ACME: routers ask for more names than lb orders; the rest are not ordered"
            );
        }
        if all == self.spec.domains {
            return false;
        }
        // A name no longer wanted keeps its state (a failure's back-off holds if it comes back)
        // but is not renewed; past a bound, only the wanted ones' state is kept.
        if self.domains.len() > 4 * (self.configured.len() + MAX_ROUTER_NAMES) {
            self.domains.retain(|n, _| all.contains(n));
        }
        for n in &all {
            self.domains.entry(n.clone()).or_default();
        }
        info!(names = ?all, "ACME: the names to order changed");
        self.spec.domains = all;
        true
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Makes the account and certificates the cluster's (see the module's notes).
    pub fn with_shared(mut self, shared: Arc<dyn Shared>) -> Acme {
        self.shared = Some(shared);
        self
    }

    fn shared_key(&self, what: &str) -> String {
        format!("{}/{what}", self.root)
    }

    /// The cluster's certificate for `name`, installed (and kept in the local copy) when it is
    /// good for the name and lasts longer than the one in use. True when it is in use now.
    async fn adopt_shared(&mut self, name: &str) -> Result<bool> {
        let Some(shared) = self.shared.clone() else {
            return Ok(false);
        };
        let mut got = shared
            .read(vec![
                self.shared_key(&format!("certs/{name}/crt")),
                self.shared_key(&format!("certs/{name}/key")),
            ])
            .await?
            .into_iter();
        let (Some(Some(chain)), Some(Some(key))) = (got.next(), got.next()) else {
            return Ok(false);
        };
        let cur = self.domains.get(name).and_then(|d| d.validity);
        // A pair that fails the checks is treated as absent, never as an error: an error here
        // would stop every node from ordering, so one bad record in etcd would let the name
        // expire cluster-wide. Absent, the lock holder orders and overwrites it.
        let checked =
            check_pair(name, &chain, &key).and_then(|c| validity(&c.cert[0]).map(|v| (c, v)));
        let (certified, v) = match checked {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(
                    domain = name,
                    "the cluster's stored certificate is not used: {e:#}"
                );
                return Ok(false);
            }
        };
        if v.1 <= crate::clock::wall() || cur.is_some_and(|c| c.1 >= v.1) {
            return Ok(false);
        }
        self.ensure_dir()?;
        write_atomic(&self.key_path(name), &key, 0o600)?;
        write_atomic(&self.cert_path(name), &chain, 0o644)?;
        self.store.set_issued(&self.spec.domains, name, certified);
        if let Some(d) = self.domains.get_mut(name) {
            d.validity = Some(v);
        }
        tracing::debug!(domain = name, "ACME certificate taken from the cluster");
        Ok(true)
    }

    /// The cluster's certificate for `name` when it is in use now and not due.
    async fn adopted(&mut self, name: &str) -> Result<Option<(SystemTime, SystemTime)>> {
        if !self.adopt_shared(name).await? {
            return Ok(None);
        }
        Ok(self
            .domains
            .get(name)
            .and_then(|d| d.validity)
            .filter(|v| renewal_time(v.0, v.1, self.spec.renew_before) > crate::clock::wall()))
    }

    /// What this node does for a name that is due: takes the certificate another node stored,
    /// or orders one under the name's lock, or waits while another node holds it.
    async fn obtain_shared(&mut self, name: &str) -> Result<Got> {
        let Some(shared) = self.shared.clone() else {
            return self.obtain(name, None).await.map(Got::Ordered);
        };
        if let Some(v) = self.adopted(name).await? {
            return Ok(Got::Adopted(v));
        }
        let Some(held) = shared
            .try_lock(self.shared_key(&format!("locks/{name}")))
            .await?
        else {
            return Ok(Got::Busy);
        };
        // Another node may have finished just before the lock was ours.
        let got = match self.adopted(name).await {
            Ok(Some(v)) => Ok(Got::Adopted(v)),
            _ => self
                .obtain(name, Some(held.as_ref()))
                .await
                .map(Got::Ordered),
        };
        held.release().await?;
        got
    }

    /// Where the account and certificates are kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn cert_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }

    fn key_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// Installs the stored certificates that are still good for their names; returns how many.
    /// The others (missing, unreadable, expired) are ordered by [`Acme::run`].
    pub fn load_stored(&mut self) -> usize {
        let now = crate::clock::wall();
        let mut loaded = 0;
        for name in self.spec.domains.clone() {
            let (crt, key) = (self.cert_path(&name), self.key_path(&name));
            if !crt.exists() {
                continue;
            }
            let found = super::tls::load_pair(&crt, &key).and_then(|k| {
                let v = validity(&k.cert[0])?;
                if !super::tls::covers(&k, &name) {
                    bail!("{} is not valid for {name}", crt.display());
                }
                if v.1 <= now {
                    bail!("{} has expired", crt.display());
                }
                Ok((k, v))
            });
            match found {
                Ok((k, v)) => {
                    self.store.set_issued(&self.spec.domains, &name, k);
                    if let Some(d) = self.domains.get_mut(&name) {
                        d.validity = Some(v);
                    }
                    loaded += 1;
                }
                Err(e) => warn!(domain = name, "stored ACME certificate not used: {e:#}"),
            }
        }
        loaded
    }

    /// Orders what is missing or due, then sleeps until the next renewal or retry; forever.
    pub async fn run(mut self) {
        loop {
            if self.follow_names() {
                // A name with a certificate stored from an earlier run is served at once.
                self.load_stored();
            }
            let mut wake = crate::clock::now() + MAX_SLEEP;
            for name in self.spec.domains.clone() {
                let now = crate::clock::now();
                let Some(d) = self.domains.get(&name) else {
                    continue;
                };
                if let Some(at) = d.retry_at.filter(|at| *at > now) {
                    wake = wake.min(at);
                    continue;
                }
                if let Some((nb, na)) = d.validity {
                    let due = renewal_time(nb, na, self.spec.renew_before);
                    if let Ok(wait) = due.duration_since(crate::clock::wall()) {
                        wake = wake.min(now + wait);
                        continue;
                    }
                }
                let renewal = d.validity.is_some();
                let got = tokio::time::timeout(ORDER_TIMEOUT, self.obtain_shared(&name))
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("no certificate within {ORDER_TIMEOUT:?}")));
                let adopted = matches!(got, Ok(Got::Adopted(_)));
                let Some(d) = self.domains.get_mut(&name) else {
                    continue;
                };
                match got {
                    Ok(Got::Busy) => {
                        // Another node is ordering: its result is looked for again shortly.
                        d.retry_at = Some(crate::clock::now() + OTHERS_POLL);
                        wake = wake.min(crate::clock::now() + OTHERS_POLL);
                    }
                    Ok(Got::Ordered(v) | Got::Adopted(v)) => {
                        self.stats.issued.fetch_add(1, Ordering::Relaxed);
                        if adopted {
                            self.stats.adopted.fetch_add(1, Ordering::Relaxed);
                        }
                        d.validity = Some(v);
                        d.failures = 0;
                        d.retry_at = None;
                        if renewal_time(v.0, v.1, self.spec.renew_before) <= crate::clock::wall() {
                            // Due the moment it arrives (a wrong clock, here or at the CA):
                            // ordering again at once would only repeat that.
                            warn!(domain = name, "the new certificate is already due for renewal; is the clock right?");
                            d.retry_at = Some(crate::clock::now() + LAST_RETRY);
                        }
                        let expires = v.1.duration_since(UNIX_EPOCH).unwrap_or_default();
                        info!(
                            domain = name,
                            renewal,
                            from_cluster = adopted,
                            expires_unix = expires.as_secs(),
                            "ACME certificate installed"
                        );
                        // Checked again on the next pass (its renewal time is in the future).
                        wake = crate::clock::now();
                    }
                    Err(e) => {
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        d.failures += 1;
                        let delay = FIRST_RETRY
                            .saturating_mul(1 << (d.failures - 1).min(10))
                            .min(LAST_RETRY);
                        d.retry_at = Some(crate::clock::now() + delay);
                        wake = wake.min(crate::clock::now() + delay);
                        warn!(
                            domain = name,
                            retry_in_secs = delay.as_secs(),
                            "ACME: {e:#}"
                        );
                    }
                }
            }
            match self.wanted.as_mut() {
                None => tokio::time::sleep_until(wake.into()).await,
                Some(w) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(wake.into()) => {}
                        // A closed channel (the agent stopping) leaves only the timer.
                        r = w.changed() => if r.is_err() {
                            self.wanted = None;
                        },
                    }
                }
            }
        }
    }

    /// The account: the stored one, else a new one (stored for next time).
    async fn account(&mut self) -> Result<Account> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let path = self.dir.join("account.json");
        let http = || http_client(self.spec.ca_file.as_deref());
        if let Some(shared) = self.shared.clone() {
            return self.shared_account(shared).await;
        }
        let stored = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice::<AccountCredentials>(&b) {
                Ok(c) => Some(c),
                Err(e) => {
                    let aside = path.with_extension("json.bad");
                    warn!(
                        "{}: unreadable ({e}); moved to {} and a new account is created",
                        path.display(),
                        aside.display()
                    );
                    let _ = std::fs::rename(&path, &aside);
                    None
                }
            },
            Err(_) => None,
        };
        let account = match stored {
            Some(creds) => Account::builder_with_http(http()?)
                .from_credentials(creds)
                .await
                .context("restoring the ACME account")?,
            None => {
                let (account, creds) = self.new_account().await?;
                self.ensure_dir()?;
                write_atomic(&path, &serde_json::to_vec(&creds)?, 0o600)?;
                info!(
                    directory = self.spec.directory,
                    id = account.id(),
                    "ACME account created"
                );
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    /// The cluster's account: stored, or created by the one node that holds the account's lock
    /// while the others wait for it (one account per directory for the whole cluster).
    async fn shared_account(&mut self, shared: Arc<dyn Shared>) -> Result<Account> {
        let key = self.shared_key("account.json");
        let http = || http_client(self.spec.ca_file.as_deref());
        let started = crate::clock::now();
        loop {
            if let Some(b) = read_one(shared.as_ref(), &key).await? {
                let creds: AccountCredentials =
                    serde_json::from_slice(&b).context("the cluster's ACME account")?;
                let account = Account::builder_with_http(http()?)
                    .from_credentials(creds)
                    .await
                    .context("restoring the cluster's ACME account")?;
                self.account = Some(account.clone());
                return Ok(account);
            }
            if let Some(held) = shared.try_lock(self.shared_key("locks/@account")).await? {
                if read_one(shared.as_ref(), &key).await?.is_some() {
                    held.release().await?;
                    continue;
                }
                let created = self.new_account().await;
                let stored = match &created {
                    Ok((_, creds)) => {
                        shared
                            .write(vec![(key.clone(), serde_json::to_vec(creds)?)])
                            .await
                    }
                    Err(_) => Ok(()),
                };
                held.release().await?;
                let (account, _) = created?;
                stored?;
                info!(
                    directory = self.spec.directory,
                    id = account.id(),
                    "ACME account created for the cluster"
                );
                self.account = Some(account.clone());
                return Ok(account);
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("another node holds the account's lock and stored no account in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A new account at the CA, with the configured contact.
    async fn new_account(&self) -> Result<(Account, AccountCredentials)> {
        let contact = self.spec.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        Account::builder_with_http(http_client(self.spec.ca_file.as_deref())?)
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.spec.directory.clone(),
                None,
            )
            .await
            .with_context(|| format!("creating an account at {}", self.spec.directory))
    }

    fn ensure_dir(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))
    }

    /// One order for `name`, through its challenge to the certificate, stored and installed.
    async fn obtain(
        &mut self,
        name: &str,
        held: Option<&dyn Held>,
    ) -> Result<(SystemTime, SystemTime)> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(name.to_string())];
        let mut order = match account.new_order(&NewOrder::new(&ids)).await {
            Ok(o) => o,
            // The CA forgot the account (a test CA restarted, an account deactivated): a new one,
            // and the same order again, rather than failing forever.
            Err(instant_acme::Error::Api(p))
                if p.r#type.as_deref()
                    == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
            {
                let path = self.dir.join("account.json");
                warn!(
                    "the CA does not know the stored account; {} is moved aside and a new account created",
                    path.display()
                );
                self.account = None;
                let _ = std::fs::rename(&path, path.with_extension("json.gone"));
                self.account()
                    .await?
                    .new_order(&NewOrder::new(&ids))
                    .await
                    .context("new order")?
            }
            Err(e) => return Err(anyhow::Error::new(e).context("new order")),
        };
        self.stats.orders.fetch_add(1, Ordering::Relaxed);
        let store = self.store.clone();
        let mut pending = Pending {
            store: &store,
            tokens: Vec::new(),
            names: Vec::new(),
        };
        let kind = match self.spec.challenge {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.context("authorization")?;
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => bail!("the authorization for {name} is {other:?}"),
            }
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| anyhow!("the CA offers no {kind:?} challenge for {name}"))?;
            let answer = challenge.key_authorization();
            let shared_pair = match self.spec.challenge {
                ChallengeKind::Http01 => {
                    let token = challenge.token.clone();
                    store
                        .http01
                        .lock()
                        .map_err(|_| anyhow!("challenge store poisoned"))?
                        .insert(token.clone(), answer.as_str().to_string());
                    pending.tokens.push(token.clone());
                    (
                        self.shared_key(&format!("challenges/http01/{token}")),
                        answer.as_str().as_bytes().to_vec(),
                    )
                }
                ChallengeKind::TlsAlpn01 => {
                    let digest = answer.digest();
                    let cert = alpn_certificate(name, digest.as_ref())?;
                    store
                        .tls_alpn01
                        .lock()
                        .map_err(|_| anyhow!("challenge store poisoned"))?
                        .insert(name.to_string(), cert);
                    pending.names.push(name.to_string());
                    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                    (
                        self.shared_key(&format!("challenges/alpn/{name}")),
                        hex.into_bytes(),
                    )
                }
            };
            // Every node answers: the CA's validation may reach any of them.
            if let Some(h) = held {
                h.write(vec![shared_pair])
                    .await
                    .context("sharing the challenge")?;
                tokio::time::sleep(SHARE_DELAY).await;
            }
            challenge.set_ready().await.context("challenge ready")?;
        }
        let polling = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(Duration::from_secs(90));
        let status = order.poll_ready(&polling).await.context("validation")?;
        if status != OrderStatus::Ready {
            // The reason is on the challenge.
            let mut reason = String::new();
            let mut authorizations = order.authorizations();
            while let Some(Ok(mut a)) = authorizations.next().await {
                if let Ok(state) = a.refresh().await {
                    for c in &state.challenges {
                        if let Some(e) = &c.error {
                            reason = format!(": {e}");
                        }
                    }
                }
            }
            bail!("validation of {name} failed ({status:?}){reason}");
        }
        drop(pending);
        let key_pem = order.finalize().await.context("finalize")?;
        let chain_pem = order
            .poll_certificate(&polling)
            .await
            .context("certificate")?;
        self.install(name, chain_pem.as_bytes(), key_pem.as_bytes())
            .await
    }

    /// Checks a new certificate, writes it (key first: a crash in between leaves a pair that does
    /// not match, which is ordered again; in a cluster both at once) and serves it.
    async fn install(
        &mut self,
        name: &str,
        chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<(SystemTime, SystemTime)> {
        let certified = check_pair(name, chain_pem, key_pem)?;
        let v = validity(&certified.cert[0])?;
        if let Some(shared) = &self.shared {
            shared
                .write(vec![
                    (
                        self.shared_key(&format!("certs/{name}/key")),
                        key_pem.to_vec(),
                    ),
                    (
                        self.shared_key(&format!("certs/{name}/crt")),
                        chain_pem.to_vec(),
                    ),
                ])
                .await
                .context("storing the certificate in the cluster")?;
        }
        self.ensure_dir()?;
        write_atomic(&self.key_path(name), key_pem, 0o600)?;
        write_atomic(&self.cert_path(name), chain_pem, 0o644)?;
        self.store.set_issued(&self.spec.domains, name, certified);
        Ok(v)
    }
}

async fn read_one(shared: &dyn Shared, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(shared.read(vec![key.to_string()]).await?.pop().flatten())
}

/// A certificate chain and its key, as the CA sent them or the cluster stored them: parsed,
/// matching, and valid for `name`.
fn check_pair(name: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("certificate: {e:?}"))?;
    if chain.is_empty() {
        bail!("no certificate");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| anyhow!("key: {e:?}"))?;
    let certified = Arc::new(CertifiedKey::new(chain, any_supported_type(&key)?));
    certified
        .keys_match()
        .map_err(|e| anyhow!("the certificate does not match its key: {e}"))?;
    if !super::tls::covers(&certified, name) {
        bail!("the certificate is not valid for {name}");
    }
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn renewal_window() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // 90 days, renew 30 days before: at day 60.
        assert_eq!(renewal_time(t0, t0 + 90 * DAY, 30 * DAY), t0 + 60 * DAY);
        // 90 days, renew 7 days before: a third of the life still wins (day 60).
        assert_eq!(renewal_time(t0, t0 + 90 * DAY, 7 * DAY), t0 + 60 * DAY);
        // A year, 30 days: the third (day ~243) comes first.
        assert_eq!(renewal_time(t0, t0 + 360 * DAY, 30 * DAY), t0 + 240 * DAY);
        // 6 days with 30 days before: not before half its life (day 3), never a loop.
        assert_eq!(renewal_time(t0, t0 + 6 * DAY, 30 * DAY), t0 + 3 * DAY);
        // 30 s test certificates with 0 days before: at 20 s.
        let s = Duration::from_secs(1);
        assert_eq!(renewal_time(t0, t0 + 30 * s, Duration::ZERO), t0 + 20 * s);
    }

    #[test]
    fn http01_answers_pending_tokens_only() {
        let store = Store::default();
        store
            .http01
            .lock()
            .unwrap()
            .insert("tok".into(), "tok.thumb".into());
        let req = |m: Method, p: &str| Request::builder().method(m).uri(p).body(()).unwrap();
        let r = store
            .http01_response("http", &req(Method::GET, "/.well-known/acme-challenge/tok"))
            .expect("answered");
        assert_eq!(r.status(), 200);
        assert!(store
            .http01_response(
                "http",
                &req(Method::GET, "/.well-known/acme-challenge/other")
            )
            .is_none());
        assert!(store
            .http01_response(
                "https",
                &req(Method::GET, "/.well-known/acme-challenge/tok")
            )
            .is_none());
        assert!(store
            .http01_response(
                "http",
                &req(Method::POST, "/.well-known/acme-challenge/tok")
            )
            .is_none());
    }

    #[test]
    fn shared_challenges_are_parsed_strictly_and_answered() {
        let p = |k| SharedChallenge::parse(k);
        assert!(matches!(
            p("lb/acme/0a/challenges/http01/Ab-_9"),
            Some(SharedChallenge::Http01 { token: "Ab-_9" })
        ));
        assert!(matches!(
            p("0a/challenges/alpn/a.example.test"),
            Some(SharedChallenge::Alpn {
                name: "a.example.test"
            })
        ));
        for bad in [
            "0a/challenges/http01/",
            "0a/challenges/http01/a/b",
            "0a/challenges/http01/a.b",
            "0a/challenges/alpn/a b",
            "0a/challenges/alpn/",
            "0a/challenges/dns01/x",
            "0a/certs/a.example.test/crt",
        ] {
            assert!(p(bad).is_none(), "{bad}");
        }
        let long = format!("0a/challenges/http01/{}", "a".repeat(129));
        assert!(p(&long).is_none());

        let store = Store::default();
        let tok = SharedChallenge::Http01 { token: "tok" };
        store.share_challenge(&tok, b"tok.thumb").unwrap();
        let req = Request::get("/.well-known/acme-challenge/tok")
            .body(())
            .unwrap();
        assert!(store.http01_response("http", &req).is_some());
        store.unshare_challenge(&tok);
        assert!(store.http01_response("http", &req).is_none());
        assert!(store.share_challenge(&tok, &[b'a'; 513]).is_err());
        assert!(store.share_challenge(&tok, &[0xff, 0xfe]).is_err());

        let name = SharedChallenge::Alpn {
            name: "A.example.test",
        };
        let hex: String = [7u8; 32].iter().map(|b| format!("{b:02x}")).collect();
        store.share_challenge(&name, hex.as_bytes()).unwrap();
        let k = store
            .challenge_certificate("a.example.test")
            .expect("answered");
        let (critical, value) = acme_identifier(&k);
        assert!(critical);
        assert_eq!(&value[2..], &[7u8; 32]);
        store.unshare_challenge(&name);
        assert!(store.challenge_certificate("a.example.test").is_none());
        for bad in [
            &hex[..62],
            "zz",
            &format!("{hex}00"),
            &hex.replace('0', "g"),
        ] {
            assert!(
                store.share_challenge(&name, bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
    }

    /// The acmeIdentifier extension of a TLS-ALPN-01 certificate: (critical, value).
    fn acme_identifier(k: &CertifiedKey) -> (bool, Vec<u8>) {
        let (_, cert) = x509_parser::parse_x509_certificate(k.cert[0].as_ref()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        (ext.critical, ext.value.to_vec())
    }

    #[test]
    fn alpn_certificate_carries_the_critical_acme_identifier() {
        let digest = [7u8; 32];
        let k = alpn_certificate("a.example.test", &digest).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(k.cert[0].as_ref()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(&ext.value[..2], &[0x04, 32]);
        assert_eq!(&ext.value[2..], &digest);
        // Exactly the name being validated.
        let san = cert.subject_alternative_name().unwrap().expect("SAN");
        assert_eq!(
            san.value.general_names,
            vec![x509_parser::extensions::GeneralName::DNSName(
                "a.example.test"
            )]
        );
    }

    /// The cluster's store as a map: enough for what `adopt_shared` reads.
    #[derive(Default)]
    struct MemShared(Mutex<HashMap<String, Vec<u8>>>);

    impl Shared for MemShared {
        fn read(&self, keys: Vec<String>) -> SharedFuture<'_, Vec<Option<Vec<u8>>>> {
            let m = self.0.lock().unwrap();
            let got = keys.iter().map(|k| m.get(k).cloned()).collect();
            Box::pin(async move { Ok(got) })
        }
        fn write(&self, pairs: Vec<(String, Vec<u8>)>) -> SharedFuture<'_, ()> {
            self.0.lock().unwrap().extend(pairs);
            Box::pin(async { Ok(()) })
        }
        fn try_lock(&self, _key: String) -> SharedFuture<'_, Option<Box<dyn Held>>> {
            Box::pin(async { Ok(None) })
        }
    }

    /// A certificate for `names` (PEM) and its key (PEM), valid until `until` (year).
    fn pair(names: &[&str], until: i32) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = rcgen::date_time_ymd(1999, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }

    /// Routers' names come from stores others may write: this resolver's only, at most
    /// MAX_ROUTER_NAMES of them beside the configured ones, and a name that goes keeps its
    /// state (a back-off holds when it comes back).
    #[test]
    fn names_from_routers_are_this_resolvers_and_bounded() {
        use crate::model::l7::AcmeWish;
        let spec = AcmeSpec {
            resolver: Some("le".into()),
            directory: "https://ca.example.test/dir".into(),
            email: None,
            challenge: ChallengeKind::Http01,
            domains: vec!["configured.example.test".into()],
            ca_file: None,
            renew_before: 30 * DAY,
        };
        let wish = |resolver: &str, names: Vec<String>| AcmeWish {
            resolver: resolver.into(),
            names,
        };
        let many: Vec<String> = (0..150).map(|i| format!("n{i}.example.test")).collect();
        let (tx, rx) = tokio::sync::watch::channel(vec![
            wish("le", many.clone()),
            wish("other", vec!["theirs.example.test".into()]),
        ]);
        let dir = std::env::temp_dir().join(format!("lb-acme-names-{}", std::process::id()));
        let mut acme = Acme::new(spec, &dir, Arc::new(Store::default())).with_names(rx);
        assert_eq!(acme.spec.domains.len(), 1 + MAX_ROUTER_NAMES);
        assert_eq!(acme.spec.domains[0], "configured.example.test");
        assert!(!acme.spec.domains.iter().any(|n| n == "theirs.example.test"));
        if let Some(d) = acme.domains.get_mut("n0.example.test") {
            d.failures = 3;
        }
        tx.send(vec![wish("le", vec!["n1.example.test".into()])])
            .unwrap();
        assert!(acme.follow_names());
        assert_eq!(
            acme.spec.domains,
            ["configured.example.test", "n1.example.test"]
        );
        tx.send(vec![wish("le", vec!["n0.example.test".into()])])
            .unwrap();
        assert!(acme.follow_names());
        assert_eq!(
            acme.domains["n0.example.test"].failures, 3,
            "the back-off is kept"
        );
    }

    /// What another node (or anyone with write access to etcd) stored is checked like a CA's
    /// answer: a bad pair is refused, counts as absent, and the certificate in use stays.
    #[tokio::test]
    async fn a_bad_certificate_in_the_cluster_is_refused_and_the_served_one_stays() {
        let name = "a.example.test";
        let dir = std::env::temp_dir().join(format!("lb-acme-adopt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = AcmeSpec {
            resolver: None,
            directory: "https://ca.example.test/dir".into(),
            email: None,
            challenge: ChallengeKind::Http01,
            domains: vec![name.into()],
            ca_file: None,
            renew_before: 30 * DAY,
        };
        let store = Arc::new(Store::default());
        let shared = Arc::new(MemShared::default());
        let mut acme = Acme::new(spec, &dir, store.clone()).with_shared(shared.clone());
        let (c, k) = (acme_key(&acme, name, "crt"), acme_key(&acme, name, "key"));
        let put = |crt: &[u8], key: &[u8]| {
            let pairs = [(c.clone(), crt.to_vec()), (k.clone(), key.to_vec())];
            shared.0.lock().unwrap().extend(pairs);
        };

        // Nothing stored: nothing adopted.
        assert!(!acme.adopt_shared(name).await.unwrap());
        // A good pair is adopted, served and kept in the local copy.
        let (good_crt, good_key) = pair(&[name], 2090);
        put(&good_crt, &good_key);
        assert!(acme.adopt_shared(name).await.unwrap());
        let served = store.certificate(name).expect("served").cert[0].clone();
        assert_eq!(std::fs::read(acme.cert_path(name)).unwrap(), good_crt);

        // Each bad pair lasts longer than the one in use, so only the checks stop it.
        let (other_crt, other_key) = pair(&["b.example.test"], 2095);
        let (crt2, _) = pair(&[name], 2095);
        let (_, key3) = pair(&[name], 2095);
        let (old_crt, old_key) = pair(&[name], 2001);
        let cases: [(&str, &[u8], &[u8]); 6] = [
            ("another name's certificate", &other_crt, &other_key),
            ("a key that does not match", &crt2, &key3),
            ("not PEM", b"garbage", &good_key),
            ("no certificate in the PEM", b"", &good_key),
            (
                "a key that is not a key",
                &crt2,
                b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            ),
            ("an expired certificate", &old_crt, &old_key),
        ];
        for (what, crt, key) in cases {
            put(crt, key);
            assert!(!acme.adopt_shared(name).await.unwrap(), "{what}");
            assert_eq!(
                store.certificate(name).expect("still served").cert[0],
                served,
                "{what}"
            );
            assert_eq!(
                std::fs::read(acme.cert_path(name)).unwrap(),
                good_crt,
                "{what}"
            );
        }
        // A shorter-lived good one is not taken over the longer one in use; a longer one is.
        let (short_crt, short_key) = pair(&[name], 2080);
        put(&short_crt, &short_key);
        assert!(!acme.adopt_shared(name).await.unwrap());
        let (long_crt, long_key) = pair(&[name], 2099);
        put(&long_crt, &long_key);
        assert!(acme.adopt_shared(name).await.unwrap());
        assert_ne!(store.certificate(name).unwrap().cert[0], served);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn acme_key(acme: &Acme, name: &str, what: &str) -> String {
        acme.shared_key(&format!("certs/{name}/{what}"))
    }
}
