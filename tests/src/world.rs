//! A cluster for discovery and routing tests: a node that DNATs a Service's address
//! to its pods as kube-proxy does, a client pod that dials the Service, meshed server
//! pods with identities of their own and a test application each, and the test
//! control plane (Linkerd's Destination and OutboundPolicies APIs) in the client pod.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::cluster::Cluster;
use crate::control::{endpoint, service_policy, ControlPlane, Hint};
use crate::mesh::{env_refs, identity_of, TrustDomain};
use crate::proxy::redirect;
use crate::{Pod, Proc, Proxy};

/// The Service's address, as a ClusterIP.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Its discovery path, as the policy controller names it.
pub const PATH: &str = "web.default.svc.cluster.local:80";
pub const APP_PORT: u16 = 8080;
/// The control plane, on the client pod's loopback (plaintext, as Linkerd's own tests
/// run it).
pub const CONTROL: &str = "127.0.0.1:8086";
pub const SERVERS: [&str; 3] = ["web-a", "web-b", "web-c"];

pub fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((VIP, port))
}

/// What a test application saw, and how it answers.
#[derive(Default)]
pub struct AppState {
    pub requests: AtomicUsize,
    /// Requests to `/hold` wait until this is set.
    pub release: AtomicBool,
    /// Added to every answer, in milliseconds.
    pub delay_ms: AtomicUsize,
    /// How it fails: [`Fails::None`], every request, or every other one.
    pub fails: AtomicUsize,
    /// Requests abandoned before they were answered (their client, or a proxy,
    /// cancelled them).
    pub cancelled: AtomicUsize,
    /// The last request's body: its length and checksum.
    pub last_body: Mutex<Option<(usize, u64)>>,
    /// The last request's headers.
    pub last_headers: Mutex<Option<hyper::HeaderMap>>,
}

/// How a test application fails, set in [`AppState::fails`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fails {
    None = 0,
    /// Every request gets 503 (gRPC: UNAVAILABLE).
    All = 1,
    /// Every other request does, starting with the first.
    EveryOther = 2,
}

impl AppState {
    pub fn fail(&self, fails: Fails) {
        self.fails.store(fails as usize, Ordering::SeqCst);
    }
}

/// A checksum of a body's bytes (FNV-1a), to show a body arrived intact.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// Counts a request as cancelled unless it was answered.
struct Cancelled<'a>(&'a AtomicUsize, bool);

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// One answer of a test application: its `name` as the body; `/hold` waits for
/// [`AppState::release`], `/slow` for a minute; 503 (gRPC: status 14) as
/// [`AppState::fails`] says; gRPC requests get their status in trailers.
async fn answer(
    state: Arc<AppState>,
    name: &'static str,
    request: Request<hyper::body::Incoming>,
) -> Response<AppBody> {
    use http_body_util::BodyExt;
    let served = state.requests.fetch_add(1, Ordering::SeqCst);
    let mut guard = Cancelled(&state.cancelled, false);
    *state.last_headers.lock().unwrap() = Some(request.headers().clone());
    let grpc = request
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path = request.uri().path().to_string();
    let body = request.into_body().collect().await.map(|b| b.to_bytes());
    if let Ok(body) = &body {
        *state.last_body.lock().unwrap() = Some((body.len(), checksum(body)));
    }
    let delay = state.delay_ms.load(Ordering::SeqCst) as u64;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if path == "/hold" {
        while !state.release.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    guard.1 = true;
    let failing = match state.fails.load(Ordering::SeqCst) {
        1 => true,
        2 => served.is_multiple_of(2),
        _ => false,
    };
    let text = Bytes::from(format!("{name}\n"));
    if grpc {
        let status = if failing { "14" } else { "0" };
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", status.parse().unwrap());
        let frames = [
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(text)),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        let mut response = Response::new(body.boxed());
        response
            .headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return response;
    }
    let mut response = Response::new(Full::new(text).boxed());
    if failing {
        *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
    }
    response
}

/// An HTTP server (HTTP/1 and HTTP/2 by preface) in `pod` answering its `name`
/// (see [`answer`]).
pub fn web_app(pod: &Pod, port: u16, name: &'static str) -> Arc<AppState> {
    let state = Arc::new(AppState::default());
    let listener = pod
        .run(|| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))
        .expect("bind the test application");
    listener.set_nonblocking(true).unwrap();
    let shared = state.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                // As a production server would: without it, a response written in
                // pieces waits for a delayed ACK (40 ms) now and then, and the
                // balancer rightly avoids that pod for a while.
                let _ = stream.set_nodelay(true);
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    answer(state, name, request).await,
                                )
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    state
}

/// A cluster: the client in pod 0, servers `web-a`, `web-b`, `web-c` in pods 1-3
/// (plus `extra` more pods, unmeshed), the issuer on the node, the control plane in the
/// client pod, and a Service `VIP:80` to the servers' `APP_PORT`.
pub struct World {
    pub cluster: Cluster,
    pub domain: TrustDomain,
    pub control: ControlPlane,
    _issuer: Proc,
}

impl World {
    pub fn new(extra: usize) -> World {
        let cluster = Cluster::new(1 + SERVERS.len() + extra);
        // The extra pods stay unmeshed: no rules, no proxy.
        for pod in &cluster.pods[..=SERVERS.len()] {
            redirect(pod);
        }
        let domain = TrustDomain::new();
        let issuer = domain.start_issuer(&cluster.node, &[]);
        let control = ControlPlane::start(cluster.pod(0), CONTROL.parse().unwrap());
        let backends: Vec<(usize, u16)> = (1..=SERVERS.len()).map(|i| (i, APP_PORT)).collect();
        cluster.service(VIP, 80, &backends);
        World {
            cluster,
            domain,
            control,
            _issuer: issuer,
        }
    }

    pub fn issuer(&self) -> SocketAddr {
        self.cluster.node_addr(8080)
    }

    pub fn client(&self) -> &Pod {
        self.cluster.pod(0)
    }

    /// Starts the meshed servers' proxies and applications.
    pub fn servers(&self) -> (Vec<Proxy<'_>>, Vec<Arc<AppState>>) {
        let mut proxies = Vec::new();
        let mut apps = Vec::new();
        for (i, name) in SERVERS.iter().enumerate() {
            let pod = self.cluster.pod(i + 1);
            let env = self.domain.identity_env(name, self.issuer());
            proxies.push(Proxy::start(pod, &env_refs(&env)));
            apps.push(web_app(pod, APP_PORT, name));
        }
        (proxies, apps)
    }

    /// The client's proxy, under the control plane, with `extra` settings.
    pub fn client_proxy(&self, extra: &[(&str, &str)]) -> Proxy<'_> {
        let mut env = self.domain.identity_env("client", self.issuer());
        for (k, v) in control_env(CONTROL)
            .into_iter()
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        {
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        }
        Proxy::start(self.client(), &env_refs(&env))
    }

    /// The Service's policy and endpoints: every server, meshed, HTTP/2 between
    /// proxies.
    pub fn describe_service(&self, servers: &[usize]) {
        self.control
            .set_policy(vip(80), service_policy("web", 80, PATH, false));
        self.control
            .set_endpoints(PATH, self.endpoints(servers, Hint::H2, APP_PORT));
    }

    pub fn endpoints(
        &self,
        servers: &[usize],
        hint: Hint,
        port: u16,
    ) -> Vec<linkerd2_proxy_api::destination::WeightedAddr> {
        servers
            .iter()
            .map(|i| {
                let name = SERVERS[*i];
                endpoint(
                    self.cluster.addr(i + 1, port),
                    Some(&identity_of(name)),
                    hint,
                    name,
                )
            })
            .collect()
    }
}

/// What Linkerd's injector gives a proxy to reach its control plane at `addr`.
pub fn control_env(addr: &str) -> Vec<(String, String)> {
    [
        ("LINKERD2_PROXY_DESTINATION_SVC_ADDR", addr),
        ("LINKERD2_PROXY_POLICY_SVC_ADDR", addr),
        (
            "LINKERD2_PROXY_POLICY_WORKLOAD",
            "{\"ns\":\"default\",\"pod\":\"client\"}",
        ),
        (
            "LINKERD2_PROXY_DESTINATION_CONTEXT",
            "{\"ns\":\"default\",\"nodeName\":\"node\",\"pod\":\"client\"}",
        ),
        ("LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS", "10.0.0.0/8"),
        ("LINKERD2_PROXY_CONTROL_STREAM_INITIAL_TIMEOUT", "3s"),
        ("LINKERD2_PROXY_CONTROL_STREAM_IDLE_TIMEOUT", "5m"),
        ("LINKERD2_PROXY_CONTROL_STREAM_LIFETIME", "1h"),
        // Short retries, so a restarted control plane is found quickly.
        ("LINKERD2_PROXY_OUTBOUND_CONNECT_EXP_BACKOFF_MAX", "1s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `count` HTTP/1 requests from the client pod over one connection (curl reuses it
/// for the same host); returns the bodies.
pub fn curl_many(pod: &Pod, url: &str, count: usize) -> String {
    let mut args = vec!["-s", "--max-time", "60"];
    args.extend(std::iter::repeat_n(url, count));
    pod.must("curl", &args)
}

pub fn counts(apps: &[Arc<AppState>]) -> Vec<usize> {
    apps.iter()
        .map(|a| a.requests.load(Ordering::SeqCst))
        .collect()
}

pub fn reset(apps: &[Arc<AppState>]) {
    for app in apps {
        app.requests.store(0, Ordering::SeqCst);
    }
}
