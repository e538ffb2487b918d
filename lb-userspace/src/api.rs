//! Admin HTTP API: list VIPs, add / remove / drain backends, verdict counters, flow table.
//!
//! Every route but `/healthz` needs `Authorization: Bearer <token>`; the listener is loopback
//! unless configured otherwise. The API never touches maps itself: it asks the [`Balancer`].

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Path, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use serde_json::json;

use crate::{
    balancer::{Balancer, ChangeError},
    config::BackendSpec,
};

#[derive(Clone)]
pub struct ApiState {
    pub balancer: Arc<Mutex<Balancer>>,
    pub token: Arc<str>,
}

pub fn router(state: ApiState) -> Router {
    let authed = Router::new()
        .route("/api/v1/vips", get(list_vips))
        .route("/api/v1/vips/{vip}/backends", post(add_backend))
        .route(
            "/api/v1/vips/{vip}/backends/{backend}",
            delete(remove_backend),
        )
        .route(
            "/api/v1/vips/{vip}/backends/{backend}/drain",
            post(drain_backend),
        )
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/flows/clear", post(clear_flows))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(authed)
        .with_state(state)
}

/// Compares in time independent of where the first difference is.
fn token_matches(given: &[u8], want: &[u8]) -> bool {
    given.len() == want.len()
        && given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn require_token(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if token_matches(t.as_bytes(), s.token.as_bytes()) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": "missing or wrong bearer token"})),
        )
            .into_response(),
    }
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let code = match e {
            ChangeError::NoSuchVip(_) | ChangeError::NoSuchBackend { .. } => StatusCode::NOT_FOUND,
            ChangeError::Invalid(_) => StatusCode::BAD_REQUEST,
            ChangeError::Dataplane(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, format!("{e:#}"))
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

/// Runs a balancer operation off the async workers: map updates are blocking syscalls.
async fn with_balancer<T: Send + 'static>(
    s: &ApiState,
    f: impl FnOnce(&mut Balancer) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let b = s.balancer.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = b.lock().map_err(|_| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "state lock poisoned".into(),
            )
        })?;
        f(&mut guard)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// A backend in a path: `10.0.0.1`, `10.0.0.1:8080`, `fd00::1` or `[fd00::1]:8080`.
fn parse_backend(s: &str) -> Result<(IpAddr, Option<u16>), ApiError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    s.parse::<SocketAddr>()
        .map(|sa| (sa.ip(), Some(sa.port())))
        .map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("{s:?} is not an address or address:port"),
            )
        })
}

async fn list_vips(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let vips = with_balancer(&s, |b| Ok(b.list()?)).await?;
    Ok(Json(json!({ "vips": vips })))
}

async fn add_backend(
    State(s): State<ApiState>,
    Path(vip): Path<String>,
    body: Result<Json<BackendSpec>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(spec) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let created = with_balancer(&s, move |b| Ok(b.add_backend(&vip, spec)?)).await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(json!({ "created": created }))))
}

async fn remove_backend(
    State(s): State<ApiState>,
    Path((vip, backend)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let (addr, port) = parse_backend(&backend)?;
    with_balancer(&s, move |b| Ok(b.remove_backend(&vip, addr, port)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn drain_backend(
    State(s): State<ApiState>,
    Path((vip, backend)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let (addr, port) = parse_backend(&backend)?;
    with_balancer(&s, move |b| Ok(b.drain_backend(&vip, addr, port)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stats(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let (reasons, flows) = with_balancer(&s, |b| {
        let dp = b.dataplane();
        Ok((dp.reason_counters()?, dp.flow_count()))
    })
    .await?;
    let verdicts: serde_json::Map<String, serde_json::Value> = reasons
        .into_iter()
        .map(|(r, n)| (r.name().to_string(), json!(n)))
        .collect();
    Ok(Json(
        json!({ "verdicts": verdicts, "tracked_flows": flows }),
    ))
}

async fn clear_flows(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let n = with_balancer(&s, |b| Ok(b.clear_flows()?)).await?;
    Ok(Json(json!({ "cleared": n })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
        assert!(!token_matches(b"", b"abc"));
    }

    #[test]
    fn backend_paths() {
        assert_eq!(parse_backend("10.0.0.1").ok().map(|x| x.1), Some(None));
        assert_eq!(
            parse_backend("10.0.0.1:80").ok().map(|x| x.1),
            Some(Some(80))
        );
        assert_eq!(
            parse_backend("[fd00::1]:80").ok().map(|x| x.1),
            Some(Some(80))
        );
        assert!(parse_backend("fd00::1").is_ok());
        assert!(parse_backend("nope").is_err());
    }
}
