//! Response compression by the client's `Accept-Encoding`: zstd, brotli or gzip, streamed (the
//! body is never held whole).
//!
//! ```toml
//! [[middleware]]
//! name = "compress"
//! compress = { encodings = ["zstd", "br", "gzip"], min_response_body_bytes = 1024, excluded_content_types = ["image/png"] }
//! ```
//! The client's q-values decide; ties go to the order of `encodings`. Left alone: responses that
//! are already encoded, smaller than the minimum (when their length is known), `Cache-Control:
//! no-transform`, partial (206), bodiless (HEAD, 204, 304), event streams and gRPC (whose
//! framing must not be buffered), and excluded content types. A strong `ETag` becomes weak.

use bytes::Bytes;
use futures_util::TryStreamExt as _;
use http_body_util::{BodyDataStream, BodyExt, StreamBody};
use hyper::{
    body::Frame,
    header::{self, HeaderValue},
    Method, Response, StatusCode,
};

use super::{BoxFuture, BuildError, Ctx, Flow, Middleware, Req};
use crate::model::middleware::CompressConfig;
use crate::proxy::Body;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Zstd,
    Brotli,
    Gzip,
}

impl Encoding {
    fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Brotli => "br",
            Encoding::Gzip => "gzip",
        }
    }

    fn parse(s: &str) -> Option<Encoding> {
        match s {
            "zstd" => Some(Encoding::Zstd),
            "br" => Some(Encoding::Brotli),
            "gzip" => Some(Encoding::Gzip),
            _ => None,
        }
    }
}

/// The encoding to use for this `Accept-Encoding`: the highest q among those offered (`*`
/// stands for any not named), ties in `order`; none when the client accepts none of them.
pub fn negotiate(accept: &str, order: &[Encoding]) -> Option<Encoding> {
    let mut named: Vec<(String, f32)> = Vec::new();
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let token = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        if token.is_empty() {
            continue;
        }
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        named.push((
            if token == "x-gzip" {
                "gzip".into()
            } else {
                token
            },
            q,
        ));
    }
    let star = named.iter().find(|(t, _)| t == "*").map(|(_, q)| *q);
    let mut best: Option<(Encoding, f32)> = None;
    for e in order {
        let q = named
            .iter()
            .find(|(t, _)| t == e.token())
            .map(|(_, q)| *q)
            .or(star)
            .unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((*e, q));
        }
    }
    best.map(|(e, _)| e)
}

impl CompressConfig {
    pub fn build(&self) -> Result<Compress, BuildError> {
        let order = self
            .encodings
            .iter()
            .map(|e| {
                Encoding::parse(e).ok_or_else(|| BuildError::Expected {
                    field: "encodings",
                    value: e.clone(),
                    expected: "zstd, br or gzip",
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if order.is_empty() {
            return Err(BuildError::Empty("encodings"));
        }
        let mut excluded: Vec<String> = self
            .excluded_content_types
            .iter()
            .map(|t| t.to_ascii_lowercase())
            .collect();
        excluded.extend(["text/event-stream".into(), "application/grpc".into()]);
        Ok(Compress {
            order,
            min: self.min_response_body_bytes,
            excluded,
        })
    }
}

pub struct Compress {
    order: Vec<Encoding>,
    min: u64,
    /// Content-type prefixes left alone.
    excluded: Vec<String>,
}

#[derive(Clone, Copy)]
struct Chosen(Encoding);

impl Compress {
    fn eligible(&self, resp: &Response<Body>) -> bool {
        let s = resp.status();
        if s.is_informational()
            || s == StatusCode::NO_CONTENT
            || s == StatusCode::NOT_MODIFIED
            || s == StatusCode::PARTIAL_CONTENT
        {
            return false;
        }
        let h = resp.headers();
        if h.contains_key(header::CONTENT_ENCODING) || h.contains_key(header::CONTENT_RANGE) {
            return false;
        }
        let text = |n| h.get(n).and_then(|v: &HeaderValue| v.to_str().ok());
        if text(header::CACHE_CONTROL)
            .is_some_and(|c| c.to_ascii_lowercase().contains("no-transform"))
        {
            return false;
        }
        if let Some(ct) = text(header::CONTENT_TYPE) {
            let ct = ct.to_ascii_lowercase();
            if self.excluded.iter().any(|x| ct.starts_with(x.as_str())) {
                return false;
            }
        }
        let len = text(header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        len.is_none_or(|n| n >= self.min.max(1))
    }
}

fn encode(body: Body, e: Encoding) -> Body {
    use async_compression::{
        tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder},
        Level,
    };
    use tokio_util::io::{ReaderStream, StreamReader};
    let data = BodyDataStream::new(body).map_err(std::io::Error::other);
    let reader = StreamReader::new(data);
    let out: Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin> = match e {
        Encoding::Zstd => Box::new(ZstdEncoder::new(reader)),
        // Brotli's default (11) costs far more CPU than it saves bytes for a proxy.
        Encoding::Brotli => Box::new(BrotliEncoder::with_quality(reader, Level::Precise(4))),
        Encoding::Gzip => Box::new(GzipEncoder::new(reader)),
    };
    let frames = ReaderStream::new(out)
        .map_ok(Frame::data)
        .map_err(|e| Box::new(e) as crate::proxy::BoxError);
    StreamBody::new(frames).boxed()
}

impl Middleware for Compress {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        if req.method() == Method::HEAD {
            return Flow::Next;
        }
        let chosen = req
            .headers()
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        if let Some(e) = negotiate(&chosen, &self.order) {
            ctx.notes.insert(Chosen(e));
        }
        Flow::Next
    }

    fn response<'a>(
        &'a self,
        ctx: &'a Ctx,
        resp: &'a mut Response<Body>,
    ) -> Option<BoxFuture<'a, ()>> {
        let Chosen(e) = ctx.notes.get::<Chosen>().copied()?;
        if !self.eligible(resp) {
            return None;
        }
        let h = resp.headers_mut();
        h.remove(header::CONTENT_LENGTH);
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(e.token()),
        );
        h.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        if let Some(tag) = h.get(header::ETAG).and_then(|t| t.to_str().ok()) {
            if !tag.starts_with("W/") {
                if let Ok(weak) = HeaderValue::from_str(&format!("W/{tag}")) {
                    h.insert(header::ETAG, weak);
                }
            }
        }
        let body = std::mem::replace(resp.body_mut(), super::full(Bytes::new()));
        *resp.body_mut() = encode(body, e);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Encoding::*;

    #[test]
    fn negotiation_follows_q_values_then_server_order() {
        let order = [Zstd, Brotli, Gzip];
        assert_eq!(negotiate("gzip, deflate, br", &order), Some(Brotli));
        assert_eq!(negotiate("gzip;q=1.0, br;q=0.5", &order), Some(Gzip));
        assert_eq!(negotiate("zstd, br, gzip", &order), Some(Zstd));
        assert_eq!(negotiate("identity", &order), None);
        assert_eq!(negotiate("*", &order), Some(Zstd));
        assert_eq!(negotiate("*;q=0.1, gzip", &order), Some(Gzip));
        assert_eq!(negotiate("br;q=0, gzip;q=0", &order), None);
        assert_eq!(negotiate("", &order), None);
        assert_eq!(negotiate("GZIP", &[Gzip]), Some(Gzip));
        assert_eq!(negotiate("x-gzip", &[Gzip]), Some(Gzip));
    }
}
