//! Fuzzes the discovery file parser (YAML and TOML): any text gives a table or an
//! error naming the problem, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tandem_proxy::discover::file::Table;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for name in ["d.yaml", "d.toml"] {
        if let Ok(table) = Table::parse(text, Path::new(name)) {
            let _ = table.lookup("192.0.2.1:80".parse().unwrap());
            let _ = table.lookup("[2001:db8::1]:443".parse().unwrap());
        }
    }
});
