//! The README must list every environment variable the proxy reads.

use std::path::Path;

fn quoted_variables(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for piece in source.split('"').skip(1).step_by(2) {
        let is_var = (piece.starts_with("LINKERD2_PROXY_") || piece.starts_with("TANDEM_"))
            && piece
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if is_var && !found.iter().any(|f| f == piece) {
            found.push(piece.to_string());
        }
    }
    found
}

#[test]
fn readme_lists_every_proxy_variable() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = std::fs::read_to_string(root.join("proxy/src/config.rs")).unwrap()
        + &std::fs::read_to_string(root.join("identity/src/client.rs")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let variables = quoted_variables(&config);
    assert!(variables.len() > 20, "found only {variables:?}");
    let missing: Vec<_> = variables
        .iter()
        .filter(|v| !readme.contains(&format!("`{v}`")))
        .collect();
    assert!(missing.is_empty(), "README.md does not list {missing:?}");
}
