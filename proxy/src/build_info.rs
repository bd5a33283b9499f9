// What `build.rs` embeds in `proxy_build_info`. Included by the build script and
// compiled into the crate's tests only, so the rule it follows is tested.

/// The cargo profile a build script runs under, read from its `OUT_DIR`
/// (`<target>/<profile>/build/<package>-<hash>/out`). Cargo tells build scripts only
/// `debug` or `release` in `PROFILE`, even for a custom profile such as
/// `production`; the directory is named after the real one (`debug` for `dev`).
pub fn profile_from_out_dir(out_dir: &std::path::Path) -> Option<String> {
    let profile = out_dir.parent()?.parent()?.parent()?.file_name()?;
    Some(profile.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_profile_is_the_directory_cargo_builds_into() {
        let table = [
            (
                "/w/target/production/build/tandem-proxy-1a2b/out",
                Some("production"),
            ),
            (
                "/w/target/release/build/tandem-proxy-1a2b/out",
                Some("release"),
            ),
            ("/w/target/debug/build/tandem-proxy-1a2b/out", Some("debug")),
            (
                "/w/target/x86_64-unknown-linux-gnu/production/build/tandem-proxy-9/out",
                Some("production"),
            ),
            ("out", None),
        ];
        for (out_dir, expected) in table {
            assert_eq!(
                profile_from_out_dir(Path::new(out_dir)).as_deref(),
                expected,
                "{out_dir}"
            );
        }
    }
}
