//! TLS material read from files: PEM certificates and keys, and the rustls client configuration
//! built from them for an upstream.
//!
//! Its own unit because two layers need it: the proxy connects with it, and lb.toml's validation
//! must know at load time that an upstream's TLS files load (and say which line asked for them),
//! without the config layer depending on the proxy.

use std::{path::PathBuf, sync::Arc};

use anyhow::{anyhow, Context as _, Result};
use rustls::{crypto::ring::default_provider, ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

use crate::model::l7::UpstreamTls;

/// Debian's bundle of system roots.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The client side of TLS to an upstream: its roots (the configured CA, else the system's) and
/// lb's client certificate when one is configured.
pub fn upstream_client_config(tls: &UpstreamTls) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let ca = tls
        .ca_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(SYSTEM_ROOTS));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca)
        .with_context(|| format!("{}", ca.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}", ca.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(anyhow!("{}: no CA certificate", ca.display()));
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    Ok(match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(c)
                .with_context(|| format!("{}", c.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}", c.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(k).with_context(|| format!("{}", k.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("client certificate")?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(anyhow!("cert_file and key_file go together")),
    })
}

/// Whether an upstream TLS setting can be honoured: its files load and its server name is one.
pub fn check_upstream(tls: &UpstreamTls) -> Result<()> {
    upstream_client_config(tls)?;
    if let Some(name) = &tls.server_name {
        ServerName::try_from(name.clone())
            .map_err(|_| anyhow!("server_name {name:?} is not a DNS name or address"))?;
    }
    Ok(())
}
