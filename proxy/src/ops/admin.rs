//! The admin server on `LINKERD2_PROXY_ADMIN_LISTEN_ADDR`: metrics, probes, the
//! proxy's own settings, the log level and an optional shutdown trigger.
//!
//! It runs on its own thread and runtime (as Linkerd's does), so a saturated data
//! path cannot make liveness probes fail.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::log::LogLevel;
use crate::metrics::Metrics;

/// What the admin server reads and controls.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// Set once the proxy serves traffic; later issues also wait for identity.
    pub ready: Arc<AtomicBool>,
    pub log_level: LogLevel,
    pub shutdown_endpoint_enabled: bool,
    pub shutdown: CancellationToken,
}

/// Serves admin requests until `stop` is cancelled, then lets requests in flight
/// finish (a `/shutdown` caller gets its answer before the process exits).
pub async fn serve(admin: Arc<Admin>, listener: TcpListener, stop: CancellationToken) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "admin accept failed");
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move {
                    Ok::<_, Infallible>(route(&admin, req, crate::net::socket::unmap(peer)).await)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection =
                hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                debug!(%error, "admin connection failed");
            }
        });
    }
    drop(listener);
    connections.close();
    // Bounded: a client that never reads its response must not hold up the exit.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), connections.wait()).await;
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn route(admin: &Admin, req: Request<Incoming>, peer: SocketAddr) -> Reply {
    let remote_client = !peer.ip().is_loopback();
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => metrics(admin, &req),
        // HEAD too: some load balancers and VM health checkers probe with it
        // (hyper leaves the body out).
        (&Method::GET | &Method::HEAD, "/ready") => {
            if admin.ready.load(Ordering::Acquire) {
                reply(StatusCode::OK, "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET | &Method::HEAD, "/live") => reply(StatusCode::OK, "live\n"),
        (&Method::GET, "/env.json") => {
            let query = req.uri().query();
            let (status, body) = match env_json(std::env::vars(), query) {
                Ok(json) => (StatusCode::OK, json),
                Err(error) => (StatusCode::BAD_REQUEST, error),
            };
            let mut response = reply(status, body);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        (_, "/proxy-log-level") if remote_client => {
            reply(StatusCode::FORBIDDEN, "loopback clients only\n")
        }
        (&Method::GET, "/proxy-log-level") => {
            reply(StatusCode::OK, format!("{}\n", admin.log_level.get()))
        }
        (&Method::PUT, "/proxy-log-level") => {
            let body = match Limited::new(req.into_body(), 4096).collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => return reply(StatusCode::BAD_REQUEST, "cannot read the body\n"),
            };
            match std::str::from_utf8(&body)
                .map_err(|e| e.to_string())
                .and_then(|d| admin.log_level.set(d.trim()))
            {
                Ok(()) => reply(StatusCode::NO_CONTENT, ""),
                Err(why) => reply(StatusCode::BAD_REQUEST, format!("{why}\n")),
            }
        }
        (_, "/shutdown") if !admin.shutdown_endpoint_enabled => {
            reply(StatusCode::NOT_FOUND, "not found\n")
        }
        (_, "/shutdown") if remote_client => {
            reply(StatusCode::FORBIDDEN, "loopback clients only\n")
        }
        (&Method::POST, "/shutdown") => {
            admin.shutdown.cancel();
            reply(StatusCode::OK, "shutdown\n")
        }
        (_, "/metrics" | "/ready" | "/live" | "/env.json" | "/proxy-log-level" | "/shutdown") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => reply(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn metrics(admin: &Admin, req: &Request<Incoming>) -> Reply {
    let text = admin.metrics.encode();
    let gzip = req
        .headers()
        .get_all(ACCEPT_ENCODING)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("gzip")));
    let mut response = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        // Writing into a Vec cannot fail.
        let _ = encoder.write_all(text.as_bytes());
        let mut response = reply(StatusCode::OK, encoder.finish().unwrap_or_default());
        response
            .headers_mut()
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        response
    } else {
        reply(StatusCode::OK, text)
    };
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// The proxy's own settings (`LINKERD2_PROXY_*` and `TANDEM_*` only, unlike Linkerd,
/// which dumps the whole environment), with anything secret-looking redacted.
///
/// `query` is Linkerd's filter, `?NAME&NAME`: only those names, each with its value or
/// `null` when unset or not a proxy setting (Linkerd would show any variable). A
/// `NAME=value` pair is refused, as Linkerd refuses it, with the error as JSON.
pub fn env_json(
    vars: impl Iterator<Item = (String, String)>,
    query: Option<&str>,
) -> Result<String, String> {
    let mut settings: serde_json::Map<String, serde_json::Value> = vars
        .filter(|(name, _)| name.starts_with("LINKERD2_PROXY_") || name.starts_with("TANDEM_"))
        .map(|(name, value)| {
            let value = if is_secret(&name) {
                "<redacted>".to_string()
            } else {
                value
            };
            (name, serde_json::Value::String(value))
        })
        .collect();
    if let Some(query) = query.filter(|q| !q.trim_matches('&').is_empty()) {
        if query.contains('=') {
            let error = "env.json takes variable names only, not NAME=value pairs";
            return Err(serde_json::json!({ "error": error }).to_string());
        }
        settings = query
            .split('&')
            .filter(|name| !name.is_empty())
            .map(|name| {
                let value = settings.get(name).cloned();
                (name.to_string(), value.unwrap_or(serde_json::Value::Null))
            })
            .collect();
    }
    Ok(serde_json::Value::Object(settings).to_string())
}

/// Names of secrets themselves; paths and addresses of secrets are not secret.
fn is_secret(name: &str) -> bool {
    let secret_word = ["TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL"]
        .iter()
        .any(|w| name.contains(w));
    let reference = ["_FILE", "_DIR", "_PATH", "_ADDR"]
        .iter()
        .any(|s| name.ends_with(s));
    secret_word && !reference
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_json_keeps_only_proxy_settings_and_redacts_secrets() {
        let vars = [
            ("LINKERD2_PROXY_LOG", "debug"),
            ("TANDEM_EXTRA_OPAQUE_PORTS", "8000"),
            ("TANDEM_IDENTITY_TOKEN", "s3cret"),
            ("LINKERD2_PROXY_IDENTITY_TOKEN_FILE", "/var/run/token"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let json = env_json(vars.clone().into_iter(), None).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json["LINKERD2_PROXY_LOG"], "debug");
        assert_eq!(json["TANDEM_EXTRA_OPAQUE_PORTS"], "8000");
        assert_eq!(json["TANDEM_IDENTITY_TOKEN"], "<redacted>");
        assert_eq!(json["LINKERD2_PROXY_IDENTITY_TOKEN_FILE"], "/var/run/token");
        assert!(json.get("HOME").is_none());

        let query = Some(
            "LINKERD2_PROXY_LOG&TANDEM_IDENTITY_TOKEN&HOME&LINKERD2_PROXY_UNSET&LINKERD2_PROXY_LOG",
        );
        let json = env_json(vars.clone().into_iter(), query).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        let expected = serde_json::json!({
            "LINKERD2_PROXY_LOG": "debug",
            "TANDEM_IDENTITY_TOKEN": "<redacted>",
            "HOME": null,
            "LINKERD2_PROXY_UNSET": null,
        });
        assert_eq!(json, expected);

        for everything in ["", "&"] {
            let json = env_json(vars.clone().into_iter(), Some(everything)).unwrap();
            let json: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(json["TANDEM_EXTRA_OPAQUE_PORTS"], "8000", "{everything:?}");
        }

        let refused = env_json(vars.into_iter(), Some("LINKERD2_PROXY_LOG=trace")).unwrap_err();
        let refused: serde_json::Value = serde_json::from_str(&refused).unwrap();
        assert!(refused["error"].as_str().unwrap().contains("NAME=value"));
    }
}
