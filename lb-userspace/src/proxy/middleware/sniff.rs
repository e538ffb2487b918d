//! Traefik's `contentType` middleware: an answer the upstream sent without `Content-Type` gets
//! the type its first bytes show, as Go's `net/http` server would write it (Traefik turns that
//! off everywhere else, and so does lb). The rules are Go's `http.DetectContentType`, which
//! implements the WHATWG MIME Sniffing Standard's subset: what a Traefik user's upstreams were
//! answered with before, byte for byte.
//!
//! Like Go, only the first chunk of the body is looked at (at most 512 bytes of it), so a
//! streamed answer is not held back waiting for more; an answer with a `Content-Encoding`, or
//! whose status has no body, gets nothing.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use hyper::{header, Response, StatusCode};

use super::{Ctx, Flow, Middleware, Req};
use crate::proxy::Body;

/// Go's `sniffLen`: the most bytes that decide.
const SNIFF_LEN: usize = 512;

pub struct ContentType;

impl Middleware for ContentType {
    fn request<'a>(&'a self, _: &'a mut Ctx, _: &'a mut Req) -> Flow<'a> {
        Flow::Next
    }

    fn response<'a>(
        &'a self,
        _ctx: &'a Ctx,
        resp: &'a mut Response<Body>,
    ) -> Option<BoxFuture<'a, ()>> {
        let h = resp.headers();
        let bodiless = resp.status().is_informational()
            || resp.status() == StatusCode::NO_CONTENT
            || resp.status() == StatusCode::NOT_MODIFIED;
        // An upstream that says `nosniff` is taken at its word (Go would sniff anyway): raw
        // user content it serves is not labelled `text/html`.
        let nosniff = h
            .get("x-content-type-options")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"nosniff"));
        if h.contains_key(header::CONTENT_TYPE)
            || nosniff
            || h.get(header::CONTENT_ENCODING)
                .is_some_and(|v| !v.is_empty())
            || bodiless
            || hyper::body::Body::is_end_stream(resp.body())
        {
            return None;
        }
        Some(Box::pin(async move {
            let body = std::mem::replace(resp.body_mut(), super::full(Bytes::new()));
            let (first, rest) = first_frame(body).await;
            let kind = first
                .as_ref()
                .and_then(|f| f.data_ref())
                .filter(|d| !d.is_empty())
                .map(|d| detect(&d[..d.len().min(SNIFF_LEN)]));
            if let Some(kind) = kind {
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
            }
            *resp.body_mut() = match first {
                None => rest,
                Some(f) => {
                    let head = http_body_util::StreamBody::new(futures_util::stream::once(
                        std::future::ready(Ok::<_, crate::proxy::BoxError>(f)),
                    ));
                    Chain {
                        head: Some(head.boxed()),
                        rest,
                    }
                    .boxed()
                }
            };
        }))
    }
}

/// The body's first frame and the body after it. An error in the first frame is kept for the
/// client to see where it would have.
async fn first_frame(mut body: Body) -> (Option<hyper::body::Frame<Bytes>>, Body) {
    match body.frame().await {
        None => (None, body),
        Some(Ok(f)) => (Some(f), body),
        Some(Err(e)) => {
            let failed = http_body_util::StreamBody::new(futures_util::stream::once(
                std::future::ready(Err::<hyper::body::Frame<Bytes>, _>(e)),
            ));
            (None, failed.boxed())
        }
    }
}

/// One body, then another.
struct Chain {
    head: Option<Body>,
    rest: Body,
}

impl hyper::body::Body for Chain {
    type Data = Bytes;
    type Error = crate::proxy::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        if let Some(h) = self.head.as_mut() {
            match std::pin::Pin::new(h).poll_frame(cx) {
                Poll::Ready(None) => self.head = None,
                other => return other,
            }
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }
}

/// Go's `http.DetectContentType` (net/http/sniff.go): the first signature that matches, else
/// `text/plain` when no byte is binary, else `application/octet-stream`.
pub fn detect(data: &[u8]) -> &'static str {
    let data = &data[..data.len().min(SNIFF_LEN)];
    // Whitespace as the standard counts it: where the tag and XML signatures may start.
    let first = data
        .iter()
        .position(|b| !matches!(b, b'\t' | b'\n' | 0x0c | b'\r' | b' '))
        .unwrap_or(data.len());
    let trimmed = &data[first..];
    for tag in HTML_TAGS {
        if html(trimmed, tag.as_bytes()) {
            return "text/html; charset=utf-8";
        }
    }
    if trimmed.starts_with(b"<?xml") {
        return "text/xml; charset=utf-8";
    }
    for sig in SIGNATURES {
        let hit = match sig {
            Sig::Exact(p, kind) => data.starts_with(p).then_some(*kind),
            Sig::Masked(p, m, kind) => masked(data, p, m).then_some(*kind),
            Sig::Mp4 => mp4(data).then_some("video/mp4"),
            // The Embedded OpenType signature: "LP" at offset 34.
            Sig::Eot => (data.len() >= 36 && &data[34..36] == b"LP")
                .then_some("application/vnd.ms-fontobject"),
        };
        if let Some(kind) = hit {
            return kind;
        }
    }
    let binary = |b: &u8| matches!(b, 0x00..=0x08 | 0x0b | 0x0e..=0x1a | 0x1c..=0x1f);
    if !data.iter().any(binary) {
        return "text/plain; charset=utf-8";
    }
    "application/octet-stream"
}

/// The tags that make a document HTML, matched without regard to case and followed by a space
/// or `>` (Go's `htmlSig`).
const HTML_TAGS: &[&str] = &[
    "<!DOCTYPE HTML",
    "<HTML",
    "<HEAD",
    "<SCRIPT",
    "<IFRAME",
    "<H1",
    "<DIV",
    "<FONT",
    "<TABLE",
    "<A",
    "<STYLE",
    "<TITLE",
    "<B",
    "<BODY",
    "<BR",
    "<P",
    "<!--",
];

fn html(data: &[u8], tag: &[u8]) -> bool {
    if data.len() < tag.len() + 1 {
        return false;
    }
    let same = data
        .iter()
        .zip(tag)
        .all(|(d, t)| d.to_ascii_uppercase() == *t);
    same && matches!(data[tag.len()], b' ' | b'>')
}

/// One of Go's signatures after the HTML and XML ones.
enum Sig {
    Exact(&'static [u8], &'static str),
    /// Pattern, mask: the bytes where the mask is set must match.
    Masked(&'static [u8], &'static [u8], &'static str),
    Mp4,
    Eot,
}

/// Go's `sniffSignatures` after the HTML and XML ones, in its order (the first match wins).
const SIGNATURES: &[Sig] = &[
    Sig::Exact(b"%PDF-", "application/pdf"),
    Sig::Exact(b"%!PS-Adobe-", "application/postscript"),
    Sig::Masked(
        b"\xFE\xFF\x00\x00",
        b"\xFF\xFF\x00\x00",
        "text/plain; charset=utf-16be",
    ),
    Sig::Masked(
        b"\xFF\xFE\x00\x00",
        b"\xFF\xFF\x00\x00",
        "text/plain; charset=utf-16le",
    ),
    Sig::Masked(
        b"\xEF\xBB\xBF\x00",
        b"\xFF\xFF\xFF\x00",
        "text/plain; charset=utf-8",
    ),
    Sig::Exact(b"\x00\x00\x01\x00", "image/x-icon"),
    Sig::Exact(b"\x00\x00\x02\x00", "image/x-icon"),
    Sig::Exact(b"BM", "image/bmp"),
    Sig::Exact(b"GIF87a", "image/gif"),
    Sig::Exact(b"GIF89a", "image/gif"),
    Sig::Masked(
        b"RIFF\x00\x00\x00\x00WEBPVP",
        b"\xFF\xFF\xFF\xFF\x00\x00\x00\x00\xFF\xFF\xFF\xFF\xFF\xFF",
        "image/webp",
    ),
    Sig::Exact(b"\x89PNG\x0D\x0A\x1A\x0A", "image/png"),
    Sig::Exact(b"\xFF\xD8\xFF", "image/jpeg"),
    Sig::Masked(
        b"FORM\x00\x00\x00\x00AIFF",
        b"\xFF\xFF\xFF\xFF\x00\x00\x00\x00\xFF\xFF\xFF\xFF",
        "audio/aiff",
    ),
    Sig::Exact(b"ID3", "audio/mpeg"),
    Sig::Exact(b"OggS\x00", "application/ogg"),
    Sig::Exact(b"MThd\x00\x00\x00\x06", "audio/midi"),
    Sig::Masked(
        b"RIFF\x00\x00\x00\x00AVI ",
        b"\xFF\xFF\xFF\xFF\x00\x00\x00\x00\xFF\xFF\xFF\xFF",
        "video/avi",
    ),
    Sig::Masked(
        b"RIFF\x00\x00\x00\x00WAVE",
        b"\xFF\xFF\xFF\xFF\x00\x00\x00\x00\xFF\xFF\xFF\xFF",
        "audio/wave",
    ),
    Sig::Mp4,
    Sig::Exact(b"\x1A\x45\xDF\xA3", "video/webm"),
    Sig::Eot,
    Sig::Exact(b"\x00\x01\x00\x00", "font/ttf"),
    Sig::Exact(b"OTTO", "font/otf"),
    Sig::Exact(b"ttcf", "font/collection"),
    Sig::Exact(b"wOFF", "font/woff"),
    Sig::Exact(b"wOF2", "font/woff2"),
    Sig::Exact(b"\x1F\x8B\x08", "application/x-gzip"),
    Sig::Exact(b"PK\x03\x04", "application/zip"),
    Sig::Exact(b"Rar!\x1A\x07\x00", "application/x-rar-compressed"),
    Sig::Exact(b"Rar!\x1A\x07\x01\x00", "application/x-rar-compressed"),
    Sig::Exact(b"\x00\x61\x73\x6D", "application/wasm"),
];

fn masked(data: &[u8], pattern: &[u8], mask: &[u8]) -> bool {
    data.len() >= pattern.len()
        && data
            .iter()
            .zip(pattern.iter().zip(mask))
            .all(|(d, (p, m))| d & m == *p)
}

/// An ISO base media file whose `ftyp` box names an `mp4` brand (Go's `mp4Sig`).
fn mp4(data: &[u8]) -> bool {
    if data.len() < 12 {
        return false;
    }
    let size = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    if data.len() < size || !size.is_multiple_of(4) || &data[4..8] != b"ftyp" {
        return false;
    }
    (8..size)
        .step_by(4)
        .filter(|&at| at != 12) // the minor version, not a brand
        .any(|at| data.get(at..at + 3) == Some(b"mp4"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases from Go's net/http/sniff_test.go, by their expectations there.
    #[test]
    fn types_are_the_ones_go_would_give() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "text/plain; charset=utf-8"),
            (b"\x01\x02\x03", "application/octet-stream"),
            (
                b"<HtMl><bOdY>blah blah blah</body></html>",
                "text/html; charset=utf-8",
            ),
            (b"\n<html>blah</html>", "text/html; charset=utf-8"),
            (b"   <!DOCTYPE HTML>...", "text/html; charset=utf-8"),
            (b"<html", "text/plain; charset=utf-8"), // no byte after the tag
            (b"<?xml version='1.0'?><x/>", "text/xml; charset=utf-8"),
            (b"%PDF-1.4", "application/pdf"),
            (b"\x89PNG\x0D\x0A\x1A\x0A\x00", "image/png"),
            (b"GIF89a...", "image/gif"),
            (b"\xFF\xD8\xFF\xE0", "image/jpeg"),
            (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "image/webp"),
            (b"\xFE\xFF\x00\x41", "text/plain; charset=utf-16be"),
            (b"\xEF\xBB\xBFhello", "text/plain; charset=utf-8"),
            (b"\x1F\x8B\x08\x00", "application/x-gzip"),
            (b"PK\x03\x04rest", "application/zip"),
            (b"\x00\x61\x73\x6D\x01", "application/wasm"),
            (b"wOF2....", "font/woff2"),
            (b"OggS\x00\x02", "application/ogg"),
            (
                b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom",
                "video/mp4",
            ),
            (b"{\"json\": true}", "text/plain; charset=utf-8"),
            (b"plain text\twith tabs\r\n", "text/plain; charset=utf-8"),
        ];
        for (data, want) in cases {
            assert_eq!(detect(data), *want, "{data:?}");
        }
    }
}
