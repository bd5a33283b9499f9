//! Golden tests: the rendered nft script and iptables-restore payloads for a set of
//! flag combinations must equal the files in `tests/golden/`.
//!
//! After an intended change, regenerate them with `TANDEM_BLESS=1 cargo test -p
//! tandem-init --test golden` and review the diff like code.

use std::path::PathBuf;

use clap::Parser;
use tandem_init::config::{Cli, Config};
use tandem_init::render::{self, ExistingJumps};
use tandem_init::rules::{Family, RuleSet};

const CASES: &[(&str, &[&str])] = &[
    ("defaults", &[]),
    // What Linkerd's injector passes today.
    (
        "linkerd-chart",
        &[
            "--ipv6=false",
            "--incoming-proxy-port",
            "4143",
            "--outgoing-proxy-port",
            "4140",
            "--proxy-uid",
            "2102",
            "--inbound-ports-to-ignore",
            "4190,4191,4567,4568",
            "--outbound-ports-to-ignore",
            "4567,4568",
        ],
    ),
    // More than 15 ports and several ranges: several multiport rules, one nft set.
    (
        "many-ports",
        &[
            "--inbound-ports-to-ignore",
            "4190,4191,25000-25100,1,3,5,7,9,11,13,15,17,19,21,23,25,27,29,31,33,30000-30010",
            "--outbound-ports-to-ignore",
            "443,6443,9000-9100,9200-9300,9400-9500,9600-9700,9800-9900,10000-10100,10200-10300,11000",
        ],
    ),
    // Mixed-family subnet lists in both directions: each CIDR only in its family.
    (
        "dual-stack-subnets",
        &[
            "--subnets-to-ignore",
            "10.0.0.0/8,fd00::/8,172.17.0.1",
            "--outbound-subnets-to-ignore",
            "169.254.169.254/32,2001:db8::/32,100.64.0.0/10",
        ],
    ),
    // Host mode on a VM: forwarded traffic, SSH and the admin port stay direct.
    (
        "host",
        &["--host", "--proxy-uid", "998", "--outbound-ports-to-ignore", "443"],
    ),
    (
        "listed-ports-and-gid",
        &[
            "--ports-to-redirect",
            "8080,9090-9099",
            "--inbound-ports-to-ignore",
            "9091",
            "--proxy-uid",
            "1337",
            "--proxy-gid",
            "1337",
            "--incoming-proxy-port",
            "15006",
            "--outgoing-proxy-port",
            "15001",
        ],
    ),
];

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn rules_for(args: &[&str]) -> RuleSet {
    let mut argv = vec!["tandem-init"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).expect("golden case flags parse");
    RuleSet::build(&Config::from_flags(&cli.flags).expect("golden case flags are valid"))
}

/// Every rendering of every case, as (file name, contents).
fn renderings() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, args) in CASES {
        let rules = rules_for(args);
        out.push((format!("{name}.nft"), render::nft_script(&rules)));
        for family in rules.families() {
            let suffix = match family {
                Family::V4 => "v4",
                Family::V6 => "v6",
            };
            let payload = render::iptables_payload(&rules, family, &ExistingJumps::default());
            out.push((format!("{name}.{suffix}.rules"), payload));
        }
    }
    out
}

#[test]
fn renderings_match_golden_files() {
    let dir = golden_dir();
    let bless = std::env::var_os("TANDEM_BLESS").is_some();
    let mut mismatches = Vec::new();
    for (file, actual) in renderings() {
        let path = dir.join(&file);
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &actual).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run with TANDEM_BLESS=1 to create it",
                path.display()
            )
        });
        if expected != actual {
            mismatches.push(format!(
                "--- {file} expected\n{expected}--- {file} actual\n{actual}"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "renderings differ (TANDEM_BLESS=1 to accept):\n{}",
        mismatches.join("\n")
    );
}

/// A golden file nobody renders any more would silently stop being checked.
#[test]
fn no_stale_golden_files() {
    let expected: Vec<String> = renderings().into_iter().map(|(f, _)| f).collect();
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(expected.contains(&name), "stale golden file {name}");
    }
}

/// The golden payloads are also accepted by the real tool (`--test` parses and builds
/// without committing). Needs root and iptables; the namespace tests in
/// `tests/tests/init_netns.rs` apply them for real, so here a missing tool is no failure.
#[test]
fn golden_payloads_parse_with_the_real_tools() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0
        || !std::path::Path::new("/usr/sbin/iptables-legacy-restore").exists()
    {
        return;
    }
    for (file, text) in renderings() {
        let tool = if file.ends_with(".v4.rules") {
            "iptables-legacy-restore"
        } else if file.ends_with(".v6.rules") {
            "ip6tables-legacy-restore"
        } else {
            continue;
        };
        let mut child = std::process::Command::new(tool)
            .arg("--test")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{tool} --test rejects {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
