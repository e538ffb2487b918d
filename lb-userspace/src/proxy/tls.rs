//! TLS termination for entry points: rustls (ring), TLS 1.2 and 1.3 only with rustls's modern
//! cipher suites, certificates chosen by SNI among the configured ones (each certificate serves
//! the names it is valid for, wildcards included, as webpki checks them), a default certificate
//! for clients that send no or an unknown name, ALPN `h2` / `http/1.1`, and optional client
//! certificate verification (mTLS) per entry point.
//!
//! Certificate sources, in the order a name is looked up: the `[[certificate]]` files (an operator
//! who configured a file for a name meant it), then certificates issued by ACME (see
//! [`super::acme`]), then the development CA, then the default certificate. A client offering
//! only ALPN `acme-tls/1` is an ACME validator and gets nothing but a pending TLS-ALPN-01
//! challenge certificate.
//!
//! [`CertFilesWatch`] follows the `[[certificate]]` files themselves: certificates are renewed by
//! tools outside the agent (certbot, cert-manager, a deploy script), which replace the files
//! without touching lb.toml.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::model::l7::{CertSpec, TlsOptions};
use anyhow::{anyhow, Context as _, Result};
use rustls::{
    crypto::ring::{default_provider, sign::any_supported_type},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    RootCertStore, ServerConfig,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

struct Entry {
    leaf: CertificateDer<'static>,
    key: Arc<CertifiedKey>,
}

/// The loaded certificates, and the SNI choice among them.
pub struct Certs {
    entries: Vec<Entry>,
    default: Option<Arc<CertifiedKey>>,
    dev_ca: Option<DevCa>,
    acme: Option<Arc<super::acme::Store>>,
}

/// A development CA (`[tls] dev_ca = true`): certificates for any name a client asks for, signed
/// by a CA kept in the state directory (`dev-ca.crt`, `dev-ca.key`) so developers trust it once.
/// Never for production: it signs whatever name arrives.
///
/// The names come from clients, so the certificates kept for them are bounded
/// ([`DEV_CA_CACHE`]): past it, the least recently used goes, and is issued again if asked.
pub struct DevCa {
    issuer: rcgen::Certificate,
    key: rcgen::KeyPair,
    issued: std::sync::Mutex<Issued>,
    cap: usize,
}

/// How many development certificates are kept (about 1.5 KiB each): more names than a developer
/// uses, few enough that a client making up names cannot grow the agent.
pub const DEV_CA_CACHE: usize = 1024;

/// Issued certificates by name, each with when it was last used (a counter, not a clock).
#[derive(Default)]
struct Issued {
    by_name: std::collections::HashMap<String, (Arc<CertifiedKey>, u64)>,
    tick: u64,
}

impl Issued {
    fn get(&mut self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.tick += 1;
        let tick = self.tick;
        self.by_name.get_mut(name).map(|(k, used)| {
            *used = tick;
            k.clone()
        })
    }

    /// Keeps `key` for `name`, first making room: evicting is a scan, but it happens only next to
    /// a key generation and a signature, which cost far more.
    fn insert(&mut self, name: String, key: Arc<CertifiedKey>, cap: usize) {
        while self.by_name.len() >= cap.max(1) {
            let Some(oldest) = self
                .by_name
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(n, _)| n.clone())
            else {
                break;
            };
            self.by_name.remove(&oldest);
        }
        self.tick += 1;
        self.by_name.insert(name, (key, self.tick));
    }
}

fn dev_ca_params() -> Result<rcgen::CertificateParams> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "lb development CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    Ok(p)
}

impl DevCa {
    /// Loads the CA from `dir`, or creates it there.
    pub fn open(dir: &Path) -> Result<DevCa> {
        let (crt, keyf) = (dir.join("dev-ca.crt"), dir.join("dev-ca.key"));
        let key = match std::fs::read_to_string(&keyf) {
            Ok(pem) => {
                rcgen::KeyPair::from_pem(&pem).with_context(|| format!("{}", keyf.display()))?
            }
            Err(_) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let key = rcgen::KeyPair::generate()?;
                use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&keyf)?;
                f.write_all(key.serialize_pem().as_bytes())?;
                key
            }
        };
        // Same name and key every time: certificates issued after a restart chain to the
        // dev-ca.crt a developer already trusts.
        let issuer = dev_ca_params()?.self_signed(&key)?;
        if !crt.exists() {
            std::fs::write(&crt, issuer.pem())
                .with_context(|| format!("writing {}", crt.display()))?;
        }
        Ok(DevCa {
            issuer,
            key,
            issued: Default::default(),
            cap: DEV_CA_CACHE,
        })
    }

    /// How many certificates are kept now (at most [`DEV_CA_CACHE`]).
    pub fn cached(&self) -> usize {
        self.lock().by_name.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Issued> {
        self.issued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn issue(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(k) = self.lock().get(name) {
            return Some(k);
        }
        let leaf_key = rcgen::KeyPair::generate().ok()?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).ok()?;
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let cert = params.signed_by(&leaf_key, &self.issuer, &self.key).ok()?;
        let der = PrivateKeyDer::try_from(leaf_key.serialize_der()).ok()?;
        let signer = any_supported_type(&der).ok()?;
        let certified = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.issuer.der().clone()],
            signer,
        ));
        self.lock()
            .insert(name.to_string(), certified.clone(), self.cap);
        tracing::info!(name, "issued a development certificate");
        Some(certified)
    }
}

impl fmt::Debug for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Certs({} certificates)", self.entries.len())
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading certificate {}", path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: {e:?}", path.display()))?;
    if chain.is_empty() {
        return Err(anyhow!("{}: no certificate in the file", path.display()));
    }
    Ok(chain)
}

/// A certificate chain and its private key, read from PEM files; the key must belong to the
/// chain's first certificate.
pub(crate) fn load_pair(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>> {
    let chain = read_chain(cert_file)?;
    let pem =
        std::fs::read(key_file).with_context(|| format!("reading key {}", key_file.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| anyhow!("{}: {e:?}", key_file.display()))?;
    let signer = any_supported_type(&key).map_err(|e| anyhow!("{}: {e}", key_file.display()))?;
    let certified = Arc::new(CertifiedKey::new(chain, signer));
    certified.keys_match().map_err(|e| {
        anyhow!(
            "{} does not match {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(certified)
}

/// Whether `key`'s certificate is valid for `name` (wildcards included).
pub(crate) fn covers(key: &CertifiedKey, name: &str) -> bool {
    let (Some(leaf), Ok(n)) = (key.cert.first(), ServerName::try_from(name.to_string())) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&n).is_ok())
}

impl Certs {
    /// With a development CA: names no configured certificate covers get one from it.
    pub fn with_dev_ca(mut self, ca: DevCa) -> Certs {
        self.dev_ca = Some(ca);
        self
    }

    /// With ACME: its issued certificates serve their names (after the configured files), and
    /// its pending TLS-ALPN-01 challenges are answered.
    pub fn with_acme(mut self, store: Arc<super::acme::Store>) -> Certs {
        self.acme = Some(store);
        self
    }

    pub fn load(specs: &[CertSpec]) -> Result<Certs> {
        let mut entries = Vec::new();
        let mut default = None;
        for s in specs {
            let certified = load_pair(&s.cert_file, &s.key_file)?;
            if s.default || default.is_none() && specs.iter().all(|x| !x.default) {
                default = Some(certified.clone());
            }
            entries.push(Entry {
                leaf: certified.cert[0].clone(),
                key: certified,
            });
        }
        Ok(Certs {
            entries,
            default,
            dev_ca: None,
            acme: None,
        })
    }

    /// [`Certs::load`] of `specs`, then each of `extra` that loads (the providers'); the others
    /// are returned, each with its error. A failure in `specs` fails it all.
    pub fn load_with(
        specs: &[CertSpec],
        extra: &[CertSpec],
    ) -> Result<(Certs, Vec<anyhow::Error>)> {
        let mut certs = Certs::load(specs)?;
        let mut left_out = Vec::new();
        let any_default = specs.iter().chain(extra).any(|s| s.default);
        for s in extra {
            match load_pair(&s.cert_file, &s.key_file) {
                Ok(certified) => {
                    if s.default || certs.default.is_none() && !any_default {
                        certs.default = Some(certified.clone());
                    }
                    certs.entries.push(Entry {
                        leaf: certified.cert[0].clone(),
                        key: certified,
                    });
                }
                Err(e) => left_out.push(e),
            }
        }
        Ok((certs, left_out))
    }

    /// The certificate for `name`: the first configured one valid for it, else ACME's, else the
    /// development CA's, else the default (without any `[[certificate]]`: ACME's first domain).
    pub fn for_name(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        self.named(name).or_else(|| {
            self.default
                .clone()
                .or_else(|| self.acme.as_ref()?.fallback())
        })
    }

    /// A certificate for `name` itself, never the default one.
    fn named(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let name = name?;
        let n = ServerName::try_from(name.to_string()).ok()?;
        for e in &self.entries {
            let Ok(cert) = webpki::EndEntityCert::try_from(&e.leaf) else {
                continue;
            };
            if cert.verify_is_valid_for_subject_name(&n).is_ok() {
                return Some(e.key.clone());
            }
        }
        if let Some(k) = self.acme.as_ref().and_then(|a| a.certificate(name)) {
            return Some(k);
        }
        self.dev_ca
            .as_ref()
            .and_then(|ca| ca.issue(&name.to_ascii_lowercase()))
    }
}

#[derive(Debug)]
struct Sni {
    certs: Arc<Certs>,
    /// `sniStrict`: no default certificate for a name lb has none for, or for no name.
    strict: bool,
}

impl ResolvesServerCert for Sni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let validator = hello
            .alpn()
            .is_some_and(|mut p| p.any(|p| p == super::acme::ACME_TLS_ALPN));
        if validator {
            // RFC 8737: a validator gets the challenge certificate or no handshake at all.
            let store = self.certs.acme.as_ref()?;
            return store.challenge_certificate(hello.server_name()?);
        }
        match self.strict {
            true => self.certs.named(hello.server_name()),
            false => self.certs.for_name(hello.server_name()),
        }
    }
}

/// What a TLS entry point's handshakes are made from: its certificates and client CA, and a
/// server configuration per [`TlsOptions`] its routers ask for, built on first use and kept
/// while the options stay the same. A new certificate set is a new `TlsBase`.
pub struct TlsBase {
    default: Arc<ServerConfig>,
    certs: Arc<Certs>,
    client_ca: Option<PathBuf>,
    derived: std::sync::Mutex<HashMap<String, (TlsOptions, Arc<ServerConfig>)>>,
}

/// How many option sets' configurations are kept: names come from configuration, never from
/// clients, so this only bounds what renamed options leave behind.
const DERIVED_CAP: usize = 256;

impl TlsBase {
    /// The configuration of handshakes no router's options claim, when no `default` options
    /// are defined: lb's policy and the entry point's client CA.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.default.clone()
    }

    /// The configuration for the options called `name`. An error (a CA file that no longer
    /// reads, options the entry point's own client CA contradicts) means no handshake.
    pub fn config_for(&self, name: &str, options: &TlsOptions) -> Result<Arc<ServerConfig>> {
        let mut derived = self.derived.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((o, c)) = derived.get(name) {
            if o == options {
                return Ok(c.clone());
            }
        }
        let config = build(self.certs.clone(), self.client_ca.as_deref(), Some(options))
            .with_context(|| format!("tls.options {name:?}"))?;
        if derived.len() >= DERIVED_CAP {
            derived.clear();
        }
        derived.insert(name.to_string(), (options.clone(), config.clone()));
        Ok(config)
    }
}

/// The server side of one TLS entry point. With `client_ca`, clients must present a certificate
/// signed by it.
pub fn server_config(certs: Arc<Certs>, client_ca: Option<&Path>) -> Result<Arc<TlsBase>> {
    Ok(Arc::new(TlsBase {
        default: build(certs.clone(), client_ca, None)?,
        certs,
        client_ca: client_ca.map(Path::to_path_buf),
        derived: Default::default(),
    }))
}

/// The TLS 1.2 suites and key exchange groups lb may offer, by rustls's names: the ring
/// provider's, which [`crate::model::l7::TLS12_SUITES`] and [`crate::model::l7::KX_GROUPS`]
/// list for the configuration's readers.
fn suites_and_groups(options: Option<&TlsOptions>) -> Result<rustls::crypto::CryptoProvider> {
    let mut provider = default_provider();
    let Some(o) = options else {
        return Ok(provider);
    };
    if !o.cipher_suites.is_empty() {
        let mut chosen: Vec<rustls::SupportedCipherSuite> = provider
            .cipher_suites
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS13)
            .copied()
            .collect();
        for name in &o.cipher_suites {
            let s = provider
                .cipher_suites
                .iter()
                .find(|s| format!("{:?}", s.suite()) == *name)
                .ok_or_else(|| anyhow!("cipher suite {name} is not one lb has"))?;
            chosen.push(*s);
        }
        provider.cipher_suites = chosen;
    }
    if !o.curves.is_empty() {
        let mut chosen = Vec::new();
        for name in &o.curves {
            let g = provider
                .kx_groups
                .iter()
                .find(|g| format!("{:?}", g.name()) == *name)
                .ok_or_else(|| anyhow!("key exchange group {name} is not one lb has"))?;
            chosen.push(*g);
        }
        provider.kx_groups = chosen;
    }
    Ok(provider)
}

/// A configuration from lb's policy narrowed by `options` (Traefik's `tls.options`).
fn build(
    certs: Arc<Certs>,
    client_ca: Option<&Path>,
    options: Option<&TlsOptions>,
) -> Result<Arc<ServerConfig>> {
    use crate::model::l7::{ClientAuth, TlsVersion};
    let provider = Arc::new(suites_and_groups(options)?);
    let (min, max) = options.map_or((TlsVersion::Tls12, TlsVersion::Tls13), |o| {
        (o.min_version, o.max_version.unwrap_or(TlsVersion::Tls13))
    });
    if min > max {
        return Err(anyhow!("minVersion is above maxVersion"));
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (TlsVersion::Tls13, &rustls::version::TLS13),
        (TlsVersion::Tls12, &rustls::version::TLS12),
    ]
    .into_iter()
    .filter(|(v, _)| (min..=max).contains(v))
    .map(|(_, p)| p)
    .collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .context("TLS versions")?;
    let auth = options.map_or(ClientAuth::None, |o| o.client_auth);
    let builder = match (client_ca, auth) {
        (Some(_), a) if a != ClientAuth::None => {
            return Err(anyhow!(
                "its clientAuth contradicts the entry point's client_ca_file, which verifies every client of it"
            ))
        }
        (Some(path), _) => {
            let roots = roots(&std::fs::read(path).with_context(|| format!("{}", path.display()))?)
                .with_context(|| format!("{}", path.display()))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        (None, ClientAuth::None) => builder.with_no_client_auth(),
        (None, ClientAuth::Request | ClientAuth::RequireAny) => {
            builder.with_client_cert_verifier(Arc::new(Unverified {
                mandatory: auth == ClientAuth::RequireAny,
                provider,
            }))
        }
        (None, ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify) => {
            let pem = options.map(|o| &o.client_ca_pem[..]).unwrap_or_default();
            let roots = roots(pem).context("clientAuth.caFiles")?;
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if auth == ClientAuth::VerifyIfGiven {
                v = v.allow_unauthenticated();
            }
            builder.with_client_cert_verifier(v.build().context("client certificate verifier")?)
        }
    };
    let acme = certs.acme.is_some();
    let strict = options.is_some_and(|o| o.sni_strict);
    let mut config = builder.with_cert_resolver(Arc::new(Sni { certs, strict }));
    // The server's order of cipher suites (rustls's: AEADs with forward secrecy, strongest first,
    // or the options' order), not the client's: a client that lists a weaker suite first does
    // not get it.
    config.ignore_client_order = true;
    config.alpn_protocols = match options.and_then(|o| o.alpn.as_ref()) {
        Some(list) => list.iter().map(|p| p.as_bytes().to_vec()).collect(),
        None => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    if acme {
        // Last: only a validator, which offers nothing else, ever selects it.
        config
            .alpn_protocols
            .push(super::acme::ACME_TLS_ALPN.to_vec());
    }
    if options.is_some_and(|o| o.disable_session_tickets) {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// The CA certificates of a PEM text; at least one.
fn roots(pem: &[u8]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        let c = c.map_err(|e| anyhow!("{e:?}"))?;
        roots.add(c).context("not a CA certificate")?;
    }
    if roots.is_empty() {
        return Err(anyhow!("no CA certificate"));
    }
    Ok(roots)
}

/// Go's `RequestClientCert` and `RequireAnyClientCert`: a client certificate is asked for and
/// not verified (only the handshake's signature with its key is). Nothing is trusted on it; it
/// is what `passTLSClientCert` passes on, as the client sent it.
#[derive(Debug)]
struct Unverified {
    mandatory: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::server::danger::ClientCertVerifier for Unverified {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Follows the `[[certificate]]` files: [`CertFilesWatch::changed`] returns after they changed
/// (a burst of writes settles for 200 ms first). Their directories are watched, not the files,
/// so a replacement by rename — how careful tools write — is seen, and so is the `..data`
/// symlink swap of Kubernetes secret volumes.
pub struct CertFilesWatch {
    _watcher: Option<notify::RecommendedWatcher>,
    rx: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl CertFilesWatch {
    /// Watches the files of `specs`; when watching is impossible that is logged, and
    /// [`CertFilesWatch::changed`] never returns (certificates still reload with lb.toml).
    pub fn new(specs: &[CertSpec]) -> CertFilesWatch {
        use notify::Watcher as _;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut files = std::collections::HashSet::new();
        let mut dirs = std::collections::BTreeSet::new();
        for f in specs.iter().flat_map(|s| [&s.cert_file, &s.key_file]) {
            let dir = f
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            if let Some(name) = f.file_name() {
                files.insert(dir.join(name));
            }
            dirs.insert(dir);
        }
        if dirs.is_empty() {
            return CertFilesWatch { _watcher: None, rx };
        }
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(ev) = res else { return };
            use notify::event::{AccessKind, AccessMode, EventKind};
            let relevant = match ev.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                _ => true,
            };
            let ours = ev.paths.iter().any(|p| {
                files.contains(p)
                    || p.file_name()
                        .is_some_and(|n| n.as_encoded_bytes().starts_with(b".."))
            });
            if relevant && ours {
                let _ = tx.send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("certificate files cannot be watched: {e}");
                return CertFilesWatch { _watcher: None, rx };
            }
        };
        for d in &dirs {
            if let Err(e) = watcher.watch(d, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(
                    "certificate files in {} cannot be watched: {e}",
                    d.display()
                );
            }
        }
        CertFilesWatch {
            _watcher: Some(watcher),
            rx,
        }
    }

    /// Returns once the files changed and the writes settled.
    pub async fn changed(&mut self) {
        if self.rx.recv().await.is_none() {
            return std::future::pending().await;
        }
        while tokio::time::timeout(std::time::Duration::from_millis(200), self.rx.recv())
            .await
            .is_ok_and(|x| x.is_some())
        {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every suite and group the configuration readers accept is one the provider has: a name
    /// that drifted would make its options' handshakes fail rather than be said when read.
    #[test]
    fn every_suite_and_group_the_readers_accept_is_offered() {
        use crate::model::l7::{KX_GROUPS, TLS12_SUITES};
        for (_, ours) in TLS12_SUITES {
            let o = TlsOptions {
                cipher_suites: vec![ours.to_string()],
                ..Default::default()
            };
            let p = suites_and_groups(Some(&o)).expect(ours);
            assert!(p
                .cipher_suites
                .iter()
                .any(|s| format!("{:?}", s.suite()) == *ours));
        }
        for (_, ours) in KX_GROUPS {
            let o = TlsOptions {
                curves: vec![ours.to_string()],
                ..Default::default()
            };
            let p = suites_and_groups(Some(&o)).expect(ours);
            assert_eq!(p.kx_groups.len(), 1, "{ours}");
        }
        let bad = TlsOptions {
            cipher_suites: vec!["TLS_RSA_WITH_RC4_128_SHA".into()],
            ..Default::default()
        };
        assert!(suites_and_groups(Some(&bad)).is_err());
    }

    #[test]
    fn development_certificates_are_kept_within_the_cap() {
        let dir = std::env::temp_dir().join(format!("lb-devca-cap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = Certs::load(&[])
            .unwrap()
            .with_dev_ca(DevCa::open(&dir).unwrap());
        let ca = certs.dev_ca.as_ref().unwrap();
        let first = certs.for_name(Some("n0.test")).unwrap();
        let kept = certs.for_name(Some("kept.test")).unwrap();
        for i in 1..10_000 {
            certs.for_name(Some(&format!("n{i}.test"))).unwrap();
            if i % 512 == 0 {
                // In use all along: never the least recently used.
                assert!(Arc::ptr_eq(
                    &kept,
                    &certs.for_name(Some("kept.test")).unwrap()
                ));
            }
        }
        assert_eq!(
            ca.cached(),
            DEV_CA_CACHE,
            "10,000 names, the cache at its cap"
        );
        let again = certs.for_name(Some("n0.test")).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &again),
            "the oldest went and is issued anew"
        );
        assert!(covers(&again, "n0.test"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
