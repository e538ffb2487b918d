//! Connections to upstreams: pooled keep-alive HTTP/1.1 over plain TCP or TLS (rustls), or
//! HTTP/2 where the service asks for it (`http2`): negotiated by ALPN over TLS, spoken from the
//! first byte without (h2c), one connection carrying many requests at once.
//!
//! With TLS the upstream's certificate is verified against a configured CA (or the system's
//! roots), optionally under a fixed server name (upstreams are reached by address), and lb can
//! present its own client certificate: traffic between services is then mutually authenticated
//! end to end. One client per distinct TLS setting, kept across table swaps so pooled
//! connections survive reconfiguration.
//!
//! ```toml
//! [[http_service]]
//! name = "payments"
//! tls = { ca_file = "/etc/lb/mesh-ca.pem", cert_file = "/etc/lb/lb.pem", key_file = "/etc/lb/lb.key", server_name = "payments.internal" }
//! ```

use std::time::Duration;

use anyhow::{anyhow, Result};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client, ResponseFuture},
    rt::TokioExecutor,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;

use super::Body;
use crate::model::l7::UpstreamTls;

/// What distinguishes one upstream client from another: its TLS and its timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub tls: Option<UpstreamTls>,
    /// Connecting (TCP, and the TLS handshake) must finish within this.
    pub connect_timeout: Duration,
    /// A pooled keep-alive connection unused this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2: offered by ALPN with TLS, prior knowledge (h2c) without.
    pub http2: bool,
}

impl Default for ClientKey {
    fn default() -> Self {
        ClientKey {
            tls: None,
            connect_timeout: crate::model::l7::DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: crate::model::l7::DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            http2: false,
        }
    }
}

/// A connector with one deadline over the TCP connect and the TLS handshake together (hyper's
/// own connect timeout covers only the first): an upstream that accepts and then stalls fails
/// the attempt as never connected, so it can be retried elsewhere.
#[derive(Clone)]
struct Deadline<C> {
    inner: C,
    within: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower_service::Service<hyper::Uri> for Deadline<C>
where
    C: tower_service::Service<hyper::Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let (connecting, within) = (self.inner.call(uri), self.within);
        Box::pin(async move {
            match tokio::time::timeout(within, connecting).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(format!("connecting took longer than {within:?}").into()),
            }
        })
    }
}

/// A pooled client for plain and TLS upstreams.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Client<Deadline<HttpsConnector<HttpConnector>>, Body>,
    /// Whether requests go as `https://`.
    pub tls: bool,
    /// Whether HTTP/2 may be spoken (requests keep `TE: trailers`, which gRPC needs).
    pub http2: bool,
}

impl UpstreamClient {
    /// `tls: None`: plain HTTP (an `https://` URI still works, against the system's roots).
    pub fn new(key: &ClientKey) -> Result<UpstreamClient> {
        let tls = key.tls.as_ref();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(key.connect_timeout));
        http.enforce_http(false);
        let config = match tls {
            Some(t) => crate::tls_files::upstream_client_config(t)?,
            // No system bundle: plain HTTP still works; an https:// URI then fails to verify.
            None => crate::tls_files::upstream_client_config(&UpstreamTls::default())
                .unwrap_or_else(|_| {
                    ClientConfig::builder()
                        .with_root_certificates(RootCertStore::empty())
                        .with_no_client_auth()
                }),
        };
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http();
        let builder = match tls.and_then(|t| t.server_name.clone()) {
            Some(name) => {
                let name = ServerName::try_from(name.clone())
                    .map_err(|_| anyhow!("server_name {name:?} is not a DNS name or address"))?;
                builder.with_server_name_resolver(FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        // With TLS and HTTP/2, ALPN offers h2 and http/1.1 and the pool follows the upstream's
        // choice; without TLS nothing can be negotiated, so HTTP/2 is all the client speaks.
        let connector = Deadline {
            inner: match (key.http2, tls.is_some()) {
                (true, true) => builder.enable_all_versions().wrap_connector(http),
                _ => builder.enable_http1().wrap_connector(http),
            },
            within: key.connect_timeout,
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_max_idle_per_host(64)
            .pool_idle_timeout(key.idle_timeout)
            // Without a timer idle connections are only found stale when next taken.
            .pool_timer(hyper_util::rt::TokioTimer::new())
            // HTTP/2: one connection carries every client's streams, and its window is given
            // back only as lb reads. A stream may hold 4 MiB and the connection 1 GiB (Go's,
            // so Traefik's, sizes): a client that stops reading stalls its own stream, never
            // the others. A dead peer is found by PING.
            .http2_initial_stream_window_size(4 << 20)
            .http2_initial_connection_window_size(1 << 30)
            .http2_keep_alive_interval(Some(Duration::from_secs(30)))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .timer(hyper_util::rt::TokioTimer::new());
        if key.http2 && tls.is_none() {
            b.http2_only(true);
        }
        Ok(UpstreamClient {
            inner: b.build(connector),
            tls: tls.is_some(),
            http2: key.http2,
        })
    }

    pub fn request(&self, req: hyper::Request<Body>) -> ResponseFuture {
        self.inner.request(req)
    }
}
