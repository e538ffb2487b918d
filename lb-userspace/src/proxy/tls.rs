//! TLS termination for entry points: rustls (ring), TLS 1.2 and 1.3 only with rustls's modern
//! cipher suites, certificates chosen by SNI among the configured ones (each certificate serves
//! the names it is valid for, wildcards included, as webpki checks them), a default certificate
//! for clients that send no or an unknown name, ALPN `h2` / `http/1.1`, and optional client
//! certificate verification (mTLS) per entry point.

use std::{fmt, path::Path, sync::Arc};

use anyhow::{anyhow, Context as _, Result};
use rustls::{
    crypto::ring::{default_provider, sign::any_supported_type},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    RootCertStore, ServerConfig,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

/// A certificate as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    /// Served when the client's name matches no certificate (or it sends none).
    pub default: bool,
}

struct Entry {
    leaf: CertificateDer<'static>,
    key: Arc<CertifiedKey>,
}

/// The loaded certificates, and the SNI choice among them.
pub struct Certs {
    entries: Vec<Entry>,
    default: Option<Arc<CertifiedKey>>,
    dev_ca: Option<DevCa>,
}

/// A development CA (`[tls] dev_ca = true`): certificates for any name a client asks for, signed
/// by a CA kept in the state directory (`dev-ca.crt`, `dev-ca.key`) so developers trust it once.
/// Never for production: it signs whatever name arrives.
pub struct DevCa {
    issuer: rcgen::Certificate,
    key: rcgen::KeyPair,
    issued: std::sync::Mutex<std::collections::HashMap<String, Arc<CertifiedKey>>>,
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
        })
    }

    fn issue(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(k) = self.issued.lock().ok()?.get(name) {
            return Some(k.clone());
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
        self.issued
            .lock()
            .ok()?
            .insert(name.to_string(), certified.clone());
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

impl Certs {
    /// With a development CA: names no configured certificate covers get one from it.
    pub fn with_dev_ca(mut self, ca: DevCa) -> Certs {
        self.dev_ca = Some(ca);
        self
    }

    pub fn load(specs: &[CertSpec]) -> Result<Certs> {
        let mut entries = Vec::new();
        let mut default = None;
        for s in specs {
            let chain = read_chain(&s.cert_file)?;
            let pem = std::fs::read(&s.key_file)
                .with_context(|| format!("reading key {}", s.key_file.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| anyhow!("{}: {e:?}", s.key_file.display()))?;
            let signer =
                any_supported_type(&key).map_err(|e| anyhow!("{}: {e}", s.key_file.display()))?;
            let certified = Arc::new(CertifiedKey::new(chain.clone(), signer));
            certified.keys_match().map_err(|e| {
                anyhow!(
                    "{} does not match {}: {e}",
                    s.key_file.display(),
                    s.cert_file.display()
                )
            })?;
            if s.default || default.is_none() && specs.iter().all(|x| !x.default) {
                default = Some(certified.clone());
            }
            entries.push(Entry {
                leaf: chain[0].clone(),
                key: certified,
            });
        }
        Ok(Certs {
            entries,
            default,
            dev_ca: None,
        })
    }

    /// The certificate for `name`: the first valid for it, else the default.
    pub fn for_name(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(n) = name.and_then(|n| ServerName::try_from(n.to_string()).ok()) {
            for e in &self.entries {
                let Ok(cert) = webpki::EndEntityCert::try_from(&e.leaf) else {
                    continue;
                };
                if cert.verify_is_valid_for_subject_name(&n).is_ok() {
                    return Some(e.key.clone());
                }
            }
            if let (Some(ca), Some(name)) = (&self.dev_ca, name) {
                return ca.issue(&name.to_ascii_lowercase());
            }
        }
        self.default.clone()
    }
}

#[derive(Debug)]
struct Sni(Arc<Certs>);

impl ResolvesServerCert for Sni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.for_name(hello.server_name())
    }
}

/// The server side of one TLS entry point. With `client_ca`, clients must present a certificate
/// signed by it.
pub fn server_config(certs: Arc<Certs>, client_ca: Option<&Path>) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let builder = match client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for c in read_chain(path)? {
                roots
                    .add(c)
                    .with_context(|| format!("{}: not a CA certificate", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Sni(certs)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
