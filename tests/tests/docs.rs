//! The README must list every environment variable the proxy reads.

use std::path::Path;

fn quoted_variables(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for piece in source.split('"').skip(1).step_by(2) {
        let is_var = (piece.starts_with("LINKERD2_PROXY_") || piece.starts_with("TANDEM_"))
            && !piece.ends_with('_')
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
    // Where variables are named: the proxy's configuration, and the identity
    // sources' own settings (read with the same reader).
    let config: String = [
        "proxy/src/config.rs",
        "identity/src/client.rs",
        "identity/src/files.rs",
        "identity/src/spiffe.rs",
        "identity/src/source.rs",
    ]
    .iter()
    .map(|file| std::fs::read_to_string(root.join(file)).unwrap())
    .collect();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let variables = quoted_variables(&config);
    assert!(variables.len() > 20, "found only {variables:?}");
    let missing: Vec<_> = variables
        .iter()
        .filter(|v| !readme.contains(&format!("`{v}`")))
        .collect();
    assert!(missing.is_empty(), "README.md does not list {missing:?}");
}

/// The Dockerfile's stages: each image has its binary where the injected pod
/// specs expect it, and the proxy runs as the uid tandem-init exempts.
#[test]
fn dockerfile_builds_the_images_inject_refers_to() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let stages: Vec<(&str, &str)> = dockerfile
        .split("\nFROM ")
        .skip(1)
        .map(|stage| {
            let name = stage.lines().next().unwrap().rsplit(" AS ").next().unwrap();
            (name.trim(), stage)
        })
        .collect();
    let stage = |name: &str| {
        stages
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no `{name}` stage"))
            .1
    };
    for (name, binary) in [
        ("proxy", "tandem-proxy"),
        ("init", "tandem-init"),
        ("identity", "tandem-identity"),
    ] {
        let text = stage(name);
        let entrypoint = format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]");
        assert!(text.contains(&entrypoint), "{name}: {entrypoint}");
        assert!(
            text.contains(&format!("/out/{binary} /usr/local/bin/{binary}")),
            "{name} copies {binary}"
        );
    }
    assert!(stage("proxy").contains("USER 2102:2102"));
    assert_eq!(
        stages.last().unwrap().0,
        "proxy",
        "plain `docker build` gives the proxy"
    );
    // The classic sidecar's postStart hook runs this path.
    let inject = std::fs::read_to_string(root.join("proxy/src/k8s/inject.rs")).unwrap();
    assert!(inject.contains("command: [/usr/local/bin/tandem-proxy, await"));
}
