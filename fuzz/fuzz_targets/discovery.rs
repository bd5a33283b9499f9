//! Fuzzes the discovery file parser (YAML and TOML), routes included: any text gives
//! a table or an error naming the problem, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tandem_proxy::discover::file::Table;
use tandem_proxy::discover::outbound_routes::select;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in ["d.yaml", "d.toml"] {
        if let Ok(table) = Table::parse(text, Path::new(name)) {
            let _ = table.lookup("192.0.2.1:80".parse().unwrap());
            let _ = table.lookup("[2001:db8::1]:443".parse().unwrap());
            // Routes: the rule a request takes from what the file says.
            if let Some(routes) = table.routes_of("192.0.2.1:80".parse().unwrap()) {
                let uri = hyper::Uri::from_static("/api/v1/x?y=1");
                let headers = hyper::HeaderMap::new();
                let _ = select(routes, &hyper::Method::GET, &uri, &headers, Some("web"));
            }
        }
    }
});
