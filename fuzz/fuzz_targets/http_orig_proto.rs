//! Fuzzes the inbound HTTP rewrite path with arbitrary HTTP/1 requests: whatever a
//! client sends, the `l5d-orig-proto` upgrade followed by the inbound downgrade must
//! not panic and must give back the request line the client sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_proxy::http::orig_proto::{downgrade, upgrade};
use tandem_proxy::net::detect::{classify, Classification, Protocol};

fuzz_target!(|data: &[u8]| {
    // Only what detection calls HTTP/1 reaches the HTTP path.
    if classify(data) != Classification::Found(Protocol::Http1) {
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return;
    };
    let mut builder = hyper::Request::builder().method(method).uri(path);
    for header in parsed.headers.iter() {
        builder = builder.header(header.name, header.value);
    }
    let Ok(mut request) = builder.body(()) else {
        return;
    };
    let original_uri = request.uri().clone();
    let fallback = hyper::http::uri::Authority::from_static("192.0.2.1:80");
    upgrade(&mut request, &fallback);
    if downgrade(&mut request).is_some() && original_uri.path_and_query().is_some() {
        assert_eq!(
            request.uri().path_and_query(),
            original_uri.path_and_query()
        );
    }
});
