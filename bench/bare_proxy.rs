//! The "one proxy hop" floor for bench/run.sh: a reverse proxy that does
//! nothing but forward. hyper 1 HTTP/1.1 server in front of the hyper-util
//! legacy pooled client, request and response bodies streamed through, no
//! header work beyond pointing the URI at the upstream.
//!
//! ```text
//! TOKIO_WORKER_THREADS=1 bare_proxy LISTEN_ADDR UPSTREAM_ADDR [SPIN_NS]
//! ```
//! e.g. `bare_proxy 127.0.0.1:47002 127.0.0.1:47001`. The runtime is
//! `new_multi_thread()` like toastgate's, so `TOKIO_WORKER_THREADS` sets the
//! worker count of both the same way.
//!
//! `SPIN_NS` (bench/spin.sh only; absent or 0 everywhere else): the proxy
//! busy-waits that long in user space on every request before forwarding
//! it, work that touches no socket, to see what user-space time alone
//! costs a proxy on this machine (and whether it costs kernel time too).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type ProxyClient = Client<HttpConnector, Incoming>;
type ProxyBody = Either<Incoming, Full<Bytes>>;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_proxy LISTEN_ADDR UPSTREAM_ADDR [SPIN_NS]");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR is host:port");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM_ADDR is host:port");
    let spin = Duration::from_nanos(args.next().map_or(0, |n| {
        n.parse().expect("SPIN_NS is a whole number of nanoseconds")
    }));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(serve(listen, upstream, spin));
}

async fn serve(listen: SocketAddr, upstream: SocketAddr, spin: Duration) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    let client: ProxyClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector);
    let authority = upstream.to_string();

    let listener = TcpListener::bind(listen).await.expect("bind LISTEN_ADDR");
    eprintln!(
        "bare_proxy listening on {listen}, forwarding to {upstream}, spinning {} ns per request",
        spin.as_nanos()
    );
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            let service =
                service_fn(move |req| forward(client.clone(), authority.clone(), spin, req));
            // Errors here are the caller hanging up; nothing to report.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    client: ProxyClient,
    authority: String,
    spin: Duration,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if !spin.is_zero() {
        spin_for(spin);
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = match Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
    {
        Ok(uri) => uri,
        Err(_) => return Ok(error(StatusCode::BAD_REQUEST)),
    };
    *req.uri_mut() = uri;
    Ok(match client.request(req).await {
        Ok(resp) => resp.map(Either::Left),
        Err(_) => error(StatusCode::BAD_GATEWAY),
    })
}

/// Busy-waits in user space (the clock is the vDSO's: no system call).
fn spin_for(spin: Duration) {
    let start = Instant::now();
    while start.elapsed() < spin {
        std::hint::spin_loop();
    }
}

fn error(status: StatusCode) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        b"bare_proxy: upstream request failed\n",
    ))));
    *resp.status_mut() = status;
    resp
}
