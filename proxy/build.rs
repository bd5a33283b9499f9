//! Embeds what `proxy_build_info` reports: the commit the proxy was built from
//! (`TANDEM_GIT_SHA` from the environment when set, as an image build without the
//! repository passes it; else `git rev-parse HEAD`; else `unknown`) and the cargo
//! profile it was built with.

use std::path::PathBuf;
use std::process::Command;

include!("src/build_info.rs");

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=TANDEM_GIT_SHA");
    let sha = std::env::var("TANDEM_GIT_SHA")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| git(&["rev-parse", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TANDEM_GIT_SHA={sha}");
    // Rebuild when HEAD moves: the files git rewrites on a commit or a checkout.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = PathBuf::from(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    println!("cargo:rerun-if-changed=src/build_info.rs");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
    let profile = profile_from_out_dir(&out_dir).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TANDEM_BUILD_PROFILE={profile}");
}
