//! The one admin-API client of every subcommand (`lb status`, `lb register` and `lb deregister`
//! through the API): blocking ureq calls with the bearer token, a bounded wait, and errors that
//! say which request failed and, for a `401`, where the token comes from.

use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use serde_json::Value;

/// How long one call may take.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    auth: String,
}

impl ApiClient {
    /// `base`: `http://127.0.0.1:9090`; `token`: the admin token.
    pub fn new(base: &str, token: &str) -> ApiClient {
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            auth: format!("Bearer {token}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path` as JSON (blocking).
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let url = self.url(path);
        let r = ureq::get(&url)
            .set("Authorization", &self.auth)
            .timeout(TIMEOUT)
            .call();
        match r {
            Ok(r) => r.into_json().with_context(|| format!("GET {url}: not JSON")),
            Err(ureq::Error::Status(401, _)) => Err(anyhow!(
                "GET {url}: 401: the token was refused (--token, $LB_API_TOKEN or <state_dir>/api-token)"
            )),
            Err(ureq::Error::Status(code, r)) => Err(anyhow!(
                "GET {url}: {code} {}",
                r.into_string().unwrap_or_default()
            )),
            Err(e) => Err(anyhow!("GET {url}: {e}")),
        }
    }

    /// `POST path` (no body) as JSON, waiting up to `within` (blocking).
    pub fn post_json(&self, path: &str, within: Duration) -> Result<Value> {
        let url = self.url(path);
        match ureq::post(&url)
            .set("Authorization", &self.auth)
            .timeout(within)
            .call()
        {
            Ok(r) => r
                .into_json()
                .with_context(|| format!("POST {url}: not JSON")),
            Err(ureq::Error::Status(code, r)) => Err(anyhow!(
                "POST {url}: {code} {}",
                r.into_string().unwrap_or_default()
            )),
            Err(e) => Err(anyhow!("POST {url}: {e}")),
        }
    }

    /// `method path` with an optional JSON body, off the runtime: its status, or
    /// `Err((status, answer))` when the API refused it.
    pub async fn send(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Result<u16, (u16, String)>> {
        let (url, auth) = (self.url(path), self.auth.clone());
        tokio::task::spawn_blocking(move || {
            let req = ureq::request(method, &url)
                .set("Authorization", &auth)
                .timeout(TIMEOUT);
            let r = match body {
                Some(b) => req.send_json(b),
                None => req.call(),
            };
            match r {
                Ok(r) => Ok(Ok(r.status())),
                Err(ureq::Error::Status(code, r)) => {
                    Ok(Err((code, r.into_string().unwrap_or_default())))
                }
                // ureq names the URL itself.
                Err(e) => Err(anyhow!("{method} {e}")),
            }
        })
        .await?
    }
}
