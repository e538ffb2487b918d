//! Traefik's `grpcWeb`: browsers cannot read HTTP/2 trailers, so gRPC-Web carries gRPC over
//! HTTP/1.1 or HTTP/2 with the trailers moved into the body (the gRPC-Web protocol,
//! github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md). This middleware turns such a request
//! into plain gRPC for the upstream (which must speak HTTP/2: an `h2c://` server or `http2`), and
//! the answer back: its trailers become the body's last frame (flag 0x80, then `name: value`
//! lines). The `-text` variants are base64 both ways. Requests that are not gRPC-Web pass as
//! they are. CORS preflights of allowed origins are answered here, as Traefik does.
//!
//! What arrives is hostile: base64 is decoded four characters at a time as it streams (padding
//! may end any group, as each message may be encoded alone), and anything that is not base64
//! ends the request body with an error rather than passing garbage on.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use hyper::{
    body::Frame,
    header::{self, HeaderValue},
    Method, Response, StatusCode,
};

use super::{Ctx, Flow, Middleware, Req};
use crate::proxy::{Body, BoxError};

pub struct GrpcWeb {
    /// Origins whose pages may call; `*` any.
    pub allow_origins: Vec<String>,
}

/// What the request half leaves for the response half.
#[derive(Clone)]
struct Converted {
    text: bool,
    origin: Option<HeaderValue>,
    credentials: bool,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

impl GrpcWeb {
    fn allowed(&self, origin: &HeaderValue) -> bool {
        self.allow_origins
            .iter()
            .any(|o| o == "*" || origin.as_bytes() == o.as_bytes())
    }

    /// Whether the page's credentials (cookies) may go with its calls: for origins named,
    /// never for `*` (any site would call with the user's cookies).
    fn credentials(&self, origin: &HeaderValue) -> bool {
        self.allow_origins
            .iter()
            .any(|o| o != "*" && origin.as_bytes() == o.as_bytes())
    }
}

/// `application/grpc-web[-text][+suffix]`: whether it is text, and the suffix (`+proto`).
fn web_kind(ct: &str) -> Option<(bool, &str)> {
    let rest = ct.strip_prefix("application/grpc-web")?;
    let (text, rest) = match rest.strip_prefix("-text") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    // `;` parameters aside, only a `+suffix` may follow.
    let rest = rest.split(';').next().unwrap_or("").trim();
    if rest.is_empty() || rest.starts_with('+') {
        Some((text, rest))
    } else {
        None
    }
}

impl Middleware for GrpcWeb {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let origin = req.headers().get(header::ORIGIN).cloned();
        // A browser asking whether it may call: answered for an allowed origin.
        if req.method() == Method::OPTIONS {
            let asks_grpc_web = req
                .headers()
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|h| h.to_ascii_lowercase().contains("x-grpc-web"));
            if let (true, Some(o)) = (asks_grpc_web, origin.as_ref()) {
                let mut r = Response::new(super::full(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                if self.allowed(o) {
                    let h = r.headers_mut();
                    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
                    h.insert(
                        header::ACCESS_CONTROL_ALLOW_METHODS,
                        HeaderValue::from_static("POST"),
                    );
                    if let Some(asked) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
                        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
                    }
                    if self.credentials(o) {
                        h.insert(
                            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                            HeaderValue::from_static("true"),
                        );
                    }
                    h.insert(
                        header::ACCESS_CONTROL_MAX_AGE,
                        HeaderValue::from_static("600"),
                    );
                }
                r.headers_mut()
                    .insert(header::VARY, HeaderValue::from_static("Origin"));
                return Flow::Answer(r);
            }
            return Flow::Next;
        }
        let kind = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|ct| web_kind(&ct.to_ascii_lowercase()).map(|(t, s)| (t, s.to_string())));
        let Some((text, suffix)) = kind else {
            return Flow::Next;
        };
        if req.method() != Method::POST {
            return Flow::Answer(super::answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "gRPC-Web calls are POSTs",
            ));
        }
        let h = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&format!("application/grpc{suffix}")) {
            h.insert(header::CONTENT_TYPE, v);
        }
        // The length changes with base64, and HTTP/2 frames the body anyway.
        h.remove(header::CONTENT_LENGTH);
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.remove("x-grpc-web");
        if text {
            let body = std::mem::replace(req.body_mut(), super::full(Bytes::new()));
            *req.body_mut() = Decode {
                inner: body,
                pending: BytesMut::new(),
            }
            .boxed();
        }
        // (HTTP/2 to the upstream is the service's to speak: an `h2c://` server or `http2`.)
        ctx.notes.insert(Converted {
            text,
            credentials: origin.as_ref().is_some_and(|o| self.credentials(o)),
            origin: origin.filter(|o| self.allowed(o)),
        });
        Flow::Next
    }

    fn response<'a>(
        &'a self,
        ctx: &'a Ctx,
        resp: &'a mut Response<Body>,
    ) -> Option<BoxFuture<'a, ()>> {
        let c = ctx.notes.get::<Converted>()?.clone();
        let h = resp.headers_mut();
        if let Some(o) = c.origin {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
            if c.credentials {
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
            h.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("grpc-status, grpc-message, grpc-status-details-bin"),
            );
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        let ct = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        // Not a gRPC answer (lb's own error page, a proxy's 502, an upstream answering in
        // gRPC-Web already): as it is.
        let suffix = ct
            .as_deref()
            .and_then(|ct| ct.strip_prefix("application/grpc"))
            .filter(|s| s.is_empty() || s.starts_with('+') || s.starts_with(';'))?;
        let web = format!(
            "application/grpc-web{}{suffix}",
            if c.text { "-text" } else { "" }
        );
        if let Ok(v) = HeaderValue::from_str(&web) {
            h.insert(header::CONTENT_TYPE, v);
        }
        h.remove(header::CONTENT_LENGTH);
        let body = std::mem::replace(resp.body_mut(), super::full(Bytes::new()));
        *resp.body_mut() = Encode {
            inner: Some(body),
            text: c.text,
            carry: BytesMut::new(),
        }
        .boxed();
        None
    }
}

/// A `-text` request body, base64 decoded as it arrives.
struct Decode {
    inner: Body,
    /// Characters of a group not complete yet (fewer than 4).
    pending: BytesMut,
}

impl hyper::body::Body for Decode {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if self.pending.iter().any(|b| !b.is_ascii_whitespace()) {
                        return Poll::Ready(Some(Err("gRPC-Web text: base64 cut short".into())));
                    }
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                // A request's trailers are not part of gRPC-Web: dropped.
                continue;
            };
            let this = &mut *self;
            this.pending
                .extend(data.iter().copied().filter(|b| !b.is_ascii_whitespace()));
            let whole = this.pending.len() / 4 * 4;
            if whole == 0 {
                continue;
            }
            let groups = this.pending.split_to(whole);
            let mut out = Vec::with_capacity(whole / 4 * 3);
            // Group by group: padding may close any of them.
            for g in groups.chunks(4) {
                if B64.decode_vec(g, &mut out).is_err() {
                    return Poll::Ready(Some(Err("gRPC-Web text: not base64".into())));
                }
            }
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
        }
    }
}

/// An answer's body in gRPC-Web: data as it comes (base64 for `-text`), then the trailers as one
/// last frame.
struct Encode {
    inner: Option<Body>,
    text: bool,
    /// `-text`: bytes not yet encoded (fewer than 3), so chunks join without padding between.
    carry: BytesMut,
}

impl Encode {
    fn out(&mut self, bytes: &[u8], last: bool) -> Bytes {
        if !self.text {
            return Bytes::copy_from_slice(bytes);
        }
        self.carry.extend_from_slice(bytes);
        let n = if last {
            self.carry.len()
        } else {
            self.carry.len() / 3 * 3
        };
        let chunk = self.carry.split_to(n);
        Bytes::from(B64.encode(&chunk))
    }
}

/// The trailers as gRPC-Web's last frame: 0x80, the length, then `name: value\r\n` lines with
/// lowercase names.
fn trailer_frame(trailers: &hyper::HeaderMap) -> Bytes {
    let mut block = BytesMut::new();
    for (name, value) in trailers {
        block.extend_from_slice(name.as_str().as_bytes());
        block.extend_from_slice(b": ");
        block.extend_from_slice(value.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    let mut frame = BytesMut::with_capacity(5 + block.len());
    frame.put_u8(0x80);
    frame.put_u32(block.len() as u32);
    frame.extend_from_slice(&block);
    frame.freeze()
}

impl hyper::body::Body for Encode {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(inner) = self.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    // Trailers-only answers carry their status in the head; what is left of
                    // the text is flushed.
                    self.inner = None;
                    let rest = self.out(&[], true);
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => {
                        let out = self.out(&d, false);
                        if out.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    Err(f) => {
                        let Ok(trailers) = f.into_trailers() else {
                            continue;
                        };
                        self.inner = None;
                        let frame = trailer_frame(&trailers);
                        let out = self.out(&frame, true);
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `*` lets any page call, never with the user's cookies; a named origin may send them.
    #[test]
    fn any_origin_calls_without_credentials() {
        let any = GrpcWeb {
            allow_origins: vec!["*".into()],
        };
        let named = GrpcWeb {
            allow_origins: vec!["https://app.test".into()],
        };
        let app = HeaderValue::from_static("https://app.test");
        let evil = HeaderValue::from_static("https://evil.test");
        assert!(any.allowed(&evil) && !any.credentials(&evil));
        assert!(named.allowed(&app) && named.credentials(&app));
        assert!(!named.allowed(&evil) && !named.credentials(&evil));
    }

    #[test]
    fn content_types_are_read_strictly() {
        assert_eq!(web_kind("application/grpc-web"), Some((false, "")));
        assert_eq!(
            web_kind("application/grpc-web+proto"),
            Some((false, "+proto"))
        );
        assert_eq!(
            web_kind("application/grpc-web-text+proto"),
            Some((true, "+proto"))
        );
        assert_eq!(
            web_kind("application/grpc-web-text; charset=x"),
            Some((true, ""))
        );
        assert_eq!(web_kind("application/grpc-webx"), None);
        assert_eq!(web_kind("application/grpc"), None);
    }

    #[tokio::test]
    async fn text_bodies_decode_across_chunks_and_padding() {
        // Two messages each encoded alone (padding between), cut at odd places.
        let whole = format!(
            "{}{}",
            B64.encode(b"\x00\x00\x00\x00\x01A"),
            B64.encode(b"xyz")
        );
        let cuts: Vec<Result<Frame<Bytes>, BoxError>> = whole
            .as_bytes()
            .chunks(3)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(cuts)).boxed();
        let got = Decode {
            inner: body,
            pending: BytesMut::new(),
        }
        .collect()
        .await
        .expect("decodes")
        .to_bytes();
        assert_eq!(&got[..], b"\x00\x00\x00\x00\x01Axyz");
        let bad =
            http_body_util::StreamBody::new(futures_util::stream::iter(vec![Ok::<_, BoxError>(
                Frame::data(Bytes::from_static(b"!!!!")),
            )]))
            .boxed();
        assert!(Decode {
            inner: bad,
            pending: BytesMut::new()
        }
        .collect()
        .await
        .is_err());
    }
}
