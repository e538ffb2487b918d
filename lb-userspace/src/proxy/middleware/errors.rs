//! Traefik's `errors` middleware: custom error pages. An answer whose status is in the ranges
//! is replaced by what another service of the table answers a GET to `query` — `{status}` the
//! status, `{url}` the request's path and query (escaped) — with the client's headers. The
//! client gets the original status and the page's body and content headers; an error service
//! that cannot answer leaves the status's reason phrase.
//!
//! ```toml
//! [[middleware]]
//! name = "pages"
//! errors = { status = ["500-599", "404"], service = "error-pages", query = "/{status}.html" }
//! ```

use bytes::Bytes;
use hyper::{header, HeaderMap, Response};

use super::{full, BoxFuture, BuildError, Ctx, Flow, Middleware, Req};
use crate::model::middleware::ErrorsConfig;
use crate::observe::access_log::StatusRange;
use crate::proxy::Body;

/// The most of an error page lb holds (it is read whole, once).
const MAX_PAGE: usize = 1 << 20;

impl ErrorsConfig {
    pub fn build(&self) -> Result<Errors, BuildError> {
        let ranges = self
            .status
            .iter()
            .map(|s| {
                s.parse::<StatusRange>().map_err(|_| BuildError::Expected {
                    field: "status",
                    value: s.clone(),
                    expected: "a status (404), a class (5xx) or a range (500-599)",
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if ranges.is_empty() {
            return Err(BuildError::Empty("status"));
        }
        if !self.query.starts_with('/') {
            return Err(BuildError::NotRooted {
                field: "query",
                value: self.query.clone(),
            });
        }
        if !crate::model::valid_name(&self.service) {
            return Err(BuildError::Expected {
                field: "service",
                value: self.service.clone(),
                expected: "a service name",
            });
        }
        Ok(Errors {
            ranges,
            service: self.service.clone(),
            query: self.query.clone(),
        })
    }
}

pub struct Errors {
    ranges: Vec<StatusRange>,
    service: String,
    query: String,
}

/// What the response half needs of the request.
#[derive(Clone)]
struct Asked {
    headers: HeaderMap,
    url: String,
}

impl Middleware for Errors {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let url = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        ctx.notes.insert(Asked {
            headers: req.headers().clone(),
            url,
        });
        Flow::Next
    }

    fn response<'a>(
        &'a self,
        ctx: &'a Ctx,
        resp: &'a mut Response<Body>,
    ) -> Option<BoxFuture<'a, ()>> {
        let code = resp.status();
        if !self
            .ranges
            .iter()
            .any(|r| (r.lo..=r.hi).contains(&code.as_u16()))
        {
            return None;
        }
        let asked = ctx.notes.get::<Asked>()?.clone();
        let fetch = ctx.fetch.clone()?;
        Some(Box::pin(async move {
            let target = self
                .query
                .replace("{status}", code.as_str())
                .replace("{url}", &crate::model::escape_unreserved(&asked.url));
            let mut headers = asked.headers;
            for h in [
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::CONTENT_TYPE,
                header::EXPECT,
            ] {
                headers.remove(h);
            }
            let page = fetch.get(&self.service, &target, headers, MAX_PAGE).await;
            let body = page
                .filter(|(parts, _)| parts.status.is_success())
                .map(|(parts, bytes)| (parts.headers, bytes));
            let h = resp.headers_mut();
            for n in [
                header::CONTENT_LENGTH,
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
                header::TRANSFER_ENCODING,
                header::ETAG,
                header::LAST_MODIFIED,
            ] {
                h.remove(n);
            }
            match body {
                Some((page_headers, bytes)) => {
                    for n in [header::CONTENT_TYPE, header::CONTENT_ENCODING] {
                        if let Some(v) = page_headers.get(&n) {
                            h.insert(n, v.clone());
                        }
                    }
                    *resp.body_mut() = full(bytes);
                }
                None => {
                    let text = code.canonical_reason().unwrap_or("error");
                    h.insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    *resp.body_mut() = full(Bytes::from(format!("{text}\n")));
                }
            }
        }))
    }

    fn service(&self) -> Option<&str> {
        Some(&self.service)
    }
}
