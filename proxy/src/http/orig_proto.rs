//! Carrying HTTP/1 requests between proxies over one HTTP/2 connection, with Linkerd's
//! `l5d-orig-proto` header, so a Tandem proxy and a linkerd2-proxy understand each
//! other in both directions.
//!
//! The outbound side turns an HTTP/1.x request into an HTTP/2 one and names the
//! original version in `l5d-orig-proto` (`HTTP/1.1`, plus `; absolute-form` when the
//! client sent an absolute URI); the peer's inbound side restores the HTTP/1 request
//! before it reaches the application, and marks its response so the outbound side
//! can restore the response's version.

use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, Uri, Version};

pub const L5D_ORIG_PROTO: HeaderName = HeaderName::from_static("l5d-orig-proto");
const ABSOLUTE_FORM: &str = "; absolute-form";

/// The `l5d-orig-proto` value for a request: its version, and whether its URI was in
/// absolute form.
fn orig_proto_value(version: Version, absolute: bool) -> HeaderValue {
    HeaderValue::from_static(match (version == Version::HTTP_10, absolute) {
        (true, false) => "HTTP/1.0",
        (true, true) => "HTTP/1.0; absolute-form",
        (false, false) => "HTTP/1.1",
        (false, true) => "HTTP/1.1; absolute-form",
    })
}

/// Rewrites an HTTP/1 request to go over HTTP/2. `fallback` is the authority to use
/// when the request names none (an HTTP/1.0 request without `Host`). Returns the
/// original version, to restore on the response.
pub fn upgrade<B>(request: &mut Request<B>, fallback: &Authority) -> Version {
    let version = request.version();
    let absolute = request.uri().authority().is_some();
    request
        .headers_mut()
        .insert(L5D_ORIG_PROTO, orig_proto_value(version, absolute));
    // `transfer-encoding` and the other headers HTTP/2 forbids go in the HTTP/2
    // client, which removes them from every request it sends.
    if !absolute {
        let authority = request
            .headers()
            .get(HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| fallback.clone());
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    *request.version_mut() = Version::HTTP_2;
    version
}

/// Restores the HTTP/1 version on the response to an upgraded request.
pub fn restore<B>(response: &mut Response<B>, version: Version) {
    response.headers_mut().remove(L5D_ORIG_PROTO);
    *response.version_mut() = version;
}

/// Whether [`downgrade`] would restore `request` (it carries an `l5d-orig-proto` this
/// side can interpret).
pub fn is_downgradable<B>(request: &Request<B>) -> bool {
    let Some(value) = request.headers().get(L5D_ORIG_PROTO) else {
        return false;
    };
    let text = value.to_str().unwrap_or_default();
    let name = text.strip_suffix(ABSOLUTE_FORM).unwrap_or(text);
    matches!(name.trim(), "HTTP/1.0" | "HTTP/1.1")
}

/// On the inbound side: turns an HTTP/2 request that carries `l5d-orig-proto` back
/// into the HTTP/1 request the client sent. Returns the header's value (to mark the
/// response with), or `None` for a request that was not upgraded.
pub fn downgrade<B>(request: &mut Request<B>) -> Option<HeaderValue> {
    let value = request.headers_mut().remove(L5D_ORIG_PROTO)?;
    let text = value.to_str().unwrap_or_default();
    let (name, absolute) = match text.strip_suffix(ABSOLUTE_FORM) {
        Some(name) => (name, true),
        None => (text, false),
    };
    let version = match name.trim() {
        "HTTP/1.0" => Version::HTTP_10,
        "HTTP/1.1" => Version::HTTP_11,
        _ => {
            // Not ours to interpret: leave the request as HTTP/2.
            request.headers_mut().insert(L5D_ORIG_PROTO, value);
            return None;
        }
    };
    if request.headers().get(HOST).is_none() {
        let host = request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        if let Some(host) = host {
            request.headers_mut().insert(HOST, host);
        }
    }
    if !absolute {
        let origin = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(origin);
    }
    *request.version_mut() = version;
    Some(orig_proto_value(version, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_then_downgrade_restores_the_request() {
        let fallback = Authority::from_static("192.0.2.1:80");
        for (uri, host) in [
            ("/a?b=c", "web:8080"),
            ("http://web:8080/a?b=c", "web:8080"),
        ] {
            let mut request = Request::builder()
                .uri(uri)
                .header(HOST, host)
                .body(())
                .unwrap();
            assert!(!is_downgradable(&request));
            let version = upgrade(&mut request, &fallback);
            assert!(is_downgradable(&request));
            assert_eq!(version, Version::HTTP_11);
            assert_eq!(request.version(), Version::HTTP_2);
            assert_eq!(request.uri().authority().unwrap().as_str(), "web:8080");
            let marked = downgrade(&mut request).unwrap();
            assert_eq!(marked, "HTTP/1.1");
            assert_eq!(request.version(), Version::HTTP_11);
            assert_eq!(request.uri().to_string(), uri);
            assert_eq!(request.headers()[HOST], host);
            assert!(request.headers().get(L5D_ORIG_PROTO).is_none());
        }
    }

    #[test]
    fn requests_without_the_header_are_left_alone() {
        let mut request = Request::builder().uri("http://a/b").body(()).unwrap();
        assert!(downgrade(&mut request).is_none());
        let mut request = Request::builder()
            .uri("http://a/b")
            .header(L5D_ORIG_PROTO, "SPDY/3")
            .body(())
            .unwrap();
        assert!(!is_downgradable(&request));
        assert!(downgrade(&mut request).is_none());
        assert_eq!(request.headers()[L5D_ORIG_PROTO], "SPDY/3");
    }
}
