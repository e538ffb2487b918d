//! gRPC through the proxy to a real gRPC server (tonic's, without TLS: an `h2c` service):
//! unary calls, a server stream, a client stream, and the status a call ends with (carried in
//! HTTP/2 trailers, which lb must pass on). The messages are prost types declared here, so the
//! test needs no protoc.
#![allow(clippy::disallowed_methods)] // tests drive real time

mod common;

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, pin::Pin, sync::Arc};

use common::{router, services, start_with};
use futures_util::{Stream, StreamExt as _};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_userspace::model::l7::ServiceSpec;
use tonic::{Request, Response, Status};

#[derive(Clone, PartialEq, prost::Message)]
struct Ping {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint32, tag = "2")]
    count: u32,
}

type Codec = tonic_prost::ProstCodec<Ping, Ping>;
type Answer<T> = Pin<Box<dyn std::future::Future<Output = Result<Response<T>, Status>> + Send>>;
type Pings = Pin<Box<dyn Stream<Item = Result<Ping, Status>> + Send>>;

/// `Say`: the text back, or the status the text names.
struct Say;

impl tonic::server::UnaryService<Ping> for Say {
    type Response = Ping;
    type Future = Answer<Ping>;
    fn call(&mut self, req: Request<Ping>) -> Self::Future {
        let p = req.into_inner();
        Box::pin(async move {
            match p.text.as_str() {
                "refuse" => Err(Status::permission_denied("not you")),
                _ => Ok(Response::new(Ping {
                    text: format!("said {}", p.text),
                    count: p.count,
                })),
            }
        })
    }
}

/// `Count`: `count` messages, then the end (or, for "boom", an error after them).
struct Count;

impl tonic::server::ServerStreamingService<Ping> for Count {
    type Response = Ping;
    type ResponseStream = Pings;
    type Future = Answer<Pings>;
    fn call(&mut self, req: Request<Ping>) -> Self::Future {
        let p = req.into_inner();
        Box::pin(async move {
            let boom = p.text == "boom";
            let items = (0..p.count).map(move |i| {
                Ok(Ping {
                    text: format!("{} {i}", p.text),
                    count: i,
                })
            });
            let tail = boom.then(|| Err(Status::aborted("boom after the messages")));
            let s = futures_util::stream::iter(items.chain(tail));
            Ok(Response::new(Box::pin(s) as Pings))
        })
    }
}

/// `Sum`: a client stream, answered once it ends.
struct Sum;

impl tonic::server::ClientStreamingService<Ping> for Sum {
    type Response = Ping;
    type Future = Answer<Ping>;
    fn call(&mut self, req: Request<tonic::Streaming<Ping>>) -> Self::Future {
        let mut s = req.into_inner();
        Box::pin(async move {
            let (mut n, mut total) = (0u32, 0u32);
            while let Some(p) = s.message().await? {
                n += 1;
                total += p.count;
            }
            Ok(Response::new(Ping {
                text: format!("{n} messages"),
                count: total,
            }))
        })
    }
}

/// A gRPC server speaking HTTP/2 without TLS, as tonic's examples serve; with `tls`, over TLS
/// with ALPN `h2` (and HTTP/2 only: an upstream that could not negotiate it fails the test).
async fn grpc_server(tls: Option<Arc<rustls::ServerConfig>>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let mut grpc = tonic::server::Grpc::new(Codec::default());
                        // gRPC clients send `TE: trailers`; lb passes it on (the one TE that
                        // crosses HTTP/2): a call without it fails here, and the test with it.
                        let te = req.headers().get("te").and_then(|v| v.to_str().ok());
                        if te != Some("trailers") {
                            return Ok::<_, Infallible>(
                                Status::failed_precondition("no TE: trailers").into_http(),
                            );
                        }
                        let resp = match req.uri().path() {
                            "/lb.test.Echo/Say" => grpc.unary(Say, req).await,
                            "/lb.test.Echo/Count" => grpc.server_streaming(Count, req).await,
                            "/lb.test.Echo/Sum" => grpc.client_streaming(Sum, req).await,
                            _ => Status::unimplemented("no such method").into_http(),
                        };
                        Ok::<_, Infallible>(resp)
                    },
                );
                let h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                match tls {
                    None => {
                        let _ = h2.serve_connection(TokioIo::new(s), svc).await;
                    }
                    Some(config) => {
                        let Ok(s) = tokio_rustls::TlsAcceptor::from(config).accept(s).await else {
                            return;
                        };
                        if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                            let _ = h2.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn client(proxy: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .connect()
        .await
        .expect("a channel to the proxy");
    tonic::client::Grpc::new(channel)
}

fn path(method: &str) -> hyper::http::uri::PathAndQuery {
    format!("/lb.test.Echo/{method}").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_of_every_kind_pass_through_an_h2c_service() {
    let up = grpc_server(None).await;
    calls_of_every_kind(
        up,
        ServiceSpec {
            http2: true,
            ..Default::default()
        },
    )
    .await;
}

/// The same calls to a gRPC server behind TLS: lb offers `h2` by ALPN and verifies the
/// server's certificate against the service's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_pass_through_a_tls_service_by_alpn() {
    let dir = std::env::temp_dir().join(format!("lb-grpc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lb grpc test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["grpc.test".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let up = grpc_server(Some(Arc::new(config))).await;
    calls_of_every_kind(
        up,
        ServiceSpec {
            http2: true,
            tls: Some(lb_userspace::model::l7::UpstreamTls {
                ca_file: Some(dir.join("ca.pem")),
                server_name: Some("grpc.test".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn calls_of_every_kind(up: SocketAddr, spec: ServiceSpec) {
    let svcs = services(&[("grpc", &[(up, 1)])]);
    let specs = HashMap::from([("grpc".to_string(), spec)]);
    let (_p, addr) = start_with(
        vec![router("grpc", "PathPrefix(`/lb.test.Echo/`)", "grpc", None)],
        &svcs,
        specs,
    )
    .await;
    let mut c = client(addr).await;

    // Unary, many times on one channel (streams multiplexed on the proxy's connections).
    for i in 0..20 {
        c.ready().await.unwrap();
        let r = c
            .unary(
                Request::new(Ping {
                    text: format!("hello {i}"),
                    count: i,
                }),
                path("Say"),
                Codec::default(),
            )
            .await
            .expect("a unary call through lb");
        assert_eq!(
            r.into_inner(),
            Ping {
                text: format!("said hello {i}"),
                count: i
            }
        );
    }
    // A status other than OK arrives as the server sent it.
    c.ready().await.unwrap();
    let e = c
        .unary(
            Request::new(Ping {
                text: "refuse".into(),
                count: 0,
            }),
            path("Say"),
            Codec::default(),
        )
        .await
        .expect_err("the server refused");
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::PermissionDenied, "not you")
    );

    // A server stream: every message, in order, then the end.
    c.ready().await.unwrap();
    let mut s = c
        .server_streaming(
            Request::new(Ping {
                text: "n".into(),
                count: 500,
            }),
            path("Count"),
            Codec::default(),
        )
        .await
        .expect("a server stream")
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await.expect("a message") {
        got.push(m.count);
    }
    assert_eq!(got, (0..500).collect::<Vec<_>>());
    // The status after the messages is in the trailers: lb passes them on.
    c.ready().await.unwrap();
    let mut s = c
        .server_streaming(
            Request::new(Ping {
                text: "boom".into(),
                count: 3,
            }),
            path("Count"),
            Codec::default(),
        )
        .await
        .expect("a server stream")
        .into_inner();
    let mut n = 0;
    let end = loop {
        match s.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    assert_eq!(n, 3);
    let end = end.expect("the stream ends in the server's error, from its trailers");
    assert_eq!(
        (end.code(), end.message()),
        (tonic::Code::Aborted, "boom after the messages")
    );

    // A client stream, answered at its end.
    c.ready().await.unwrap();
    let pings = futures_util::stream::iter((1..=100u32).map(|i| Ping {
        text: String::new(),
        count: i,
    }));
    let r = c
        .client_streaming(Request::new(pings.boxed()), path("Sum"), Codec::default())
        .await
        .expect("a client stream");
    assert_eq!(
        r.into_inner(),
        Ping {
            text: "100 messages".into(),
            count: 5050
        }
    );
}

/// One gRPC-Web call over HTTP/1.1 (`text`: the `-text` form): the status, the head's content
/// type and the body as it came.
async fn grpc_web_call(
    proxy: SocketAddr,
    method: &str,
    ping: &Ping,
    text: bool,
) -> (u16, String, Vec<u8>, hyper::HeaderMap) {
    use http_body_util::BodyExt as _;
    use prost::Message as _;
    let msg = ping.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    use base64::Engine as _;
    let (ct, body) = match text {
        true => (
            "application/grpc-web-text+proto",
            base64::engine::general_purpose::STANDARD
                .encode(&framed)
                .into_bytes(),
        ),
        false => ("application/grpc-web+proto", framed),
    };
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post(format!("/lb.test.Echo/{method}"))
        .header("host", "grpc.test")
        .header("content-type", ct)
        .header("x-grpc-web", "1")
        .header("origin", "https://app.test")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.expect("an answer");
    let code = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let head = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (code, ct, body, head)
}

/// gRPC-Web frames: (flag, payload) in order.
fn web_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        out.push((b[0], b[5..5 + len].to_vec()));
        b = &b[5 + len..];
    }
    assert!(b.is_empty(), "whole frames");
    out
}

/// Traefik's `grpcWeb` (middlewares/http/grpcweb): a browser's gRPC-Web call over HTTP/1.1,
/// binary and text, becomes gRPC to the h2c server; the answer's trailers come back as the
/// body's last frame; a failed call's status is in it; an allowed origin's preflight is
/// answered and another origin's is not granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_calls_reach_a_grpc_server() {
    use prost::Message as _;
    let up = grpc_server(None).await;
    let svcs = services(&[("grpc", &[(up, 1)])]);
    let specs = HashMap::from([(
        "grpc".to_string(),
        ServiceSpec {
            http2: true,
            ..Default::default()
        },
    )]);
    let web = lb_userspace::model::middleware::MiddlewareConfig::GrpcWeb(
        lb_userspace::model::middleware::GrpcWebConfig {
            allow_origins: vec!["https://app.test".into()],
        },
    )
    .build()
    .unwrap();
    let mut r = router("grpc", "PathPrefix(`/lb.test.Echo/`)", "grpc", None);
    r.middlewares = vec!["web".into()];
    let (_p, addr) = common::start_full(
        vec![r],
        &svcs,
        specs,
        HashMap::from([("web".to_string(), web)]),
    )
    .await;
    for text in [false, true] {
        let ping = Ping {
            text: "browser".into(),
            count: 7,
        };
        let (code, ct, body, _) = grpc_web_call(addr, "Say", &ping, text).await;
        assert_eq!(code, 200);
        let body = match text {
            true => {
                use base64::Engine as _;
                // The server's type (tonic's `application/grpc`), made gRPC-Web's.
                assert_eq!(ct, "application/grpc-web-text");
                base64::engine::general_purpose::STANDARD
                    .decode(&body)
                    .expect("base64")
            }
            false => {
                assert_eq!(ct, "application/grpc-web");
                body
            }
        };
        let frames = web_frames(&body);
        assert_eq!(frames.len(), 2, "a message and the trailers: {frames:?}");
        let answer = Ping::decode(&frames[0].1[..]).unwrap();
        assert_eq!((answer.text.as_str(), answer.count), ("said browser", 7));
        assert_eq!(frames[1].0, 0x80);
        let trailers = String::from_utf8(frames[1].1.clone()).unwrap();
        assert!(trailers.contains("grpc-status: 0\r\n"), "{trailers:?}");
    }
    // A server stream: every message, then the status.
    let (_, _, body, _) = grpc_web_call(
        addr,
        "Count",
        &Ping {
            text: "n".into(),
            count: 50,
        },
        false,
    )
    .await;
    let frames = web_frames(&body);
    assert_eq!(frames.len(), 51);
    assert!(frames[..50].iter().all(|(f, _)| *f == 0));
    // A refused call: its status, whether in the head (trailers-only) or the last frame.
    let tcp_status = grpc_web_call(
        addr,
        "Say",
        &Ping {
            text: "refuse".into(),
            count: 0,
        },
        false,
    )
    .await;
    let said = String::from_utf8_lossy(&tcp_status.2).into_owned();
    let in_head = tcp_status
        .3
        .get("grpc-status")
        .map(|v| v.as_bytes().to_vec());
    assert!(
        said.contains("grpc-status: 7\r\n") || in_head.as_deref() == Some(&b"7"[..]),
        "{said:?} {:?}",
        tcp_status.3
    );
    // The browser may read the status: an allowed origin's answer exposes it.
    assert_eq!(
        tcp_status
            .3
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(&b"https://app.test"[..])
    );
    // CORS preflights.
    for (origin, granted) in [("https://app.test", true), ("https://evil.test", false)] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = send
            .send_request(
                hyper::Request::builder()
                    .method("OPTIONS")
                    .uri("/lb.test.Echo/Say")
                    .header("host", "grpc.test")
                    .header("origin", origin)
                    .header("access-control-request-method", "POST")
                    .header("access-control-request-headers", "content-type,x-grpc-web")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 204);
        assert_eq!(
            resp.headers().get("access-control-allow-origin").is_some(),
            granted,
            "{origin}"
        );
    }
}
