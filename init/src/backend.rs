//! Choosing a firewall backend, applying and removing rule sets. The only module that
//! runs external commands; everything it feeds them comes from [`crate::render`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context};

use crate::config::Firewall;
use crate::exit::{fail, Classify, ExitClass, Outcome};
use crate::log;
use crate::render::{self, ExistingJumps};
use crate::rules::{Family, RuleSet};

/// Hidden test hook: a line appended to every payload (before `COMMIT` for
/// iptables-restore). Lets tests prove that a payload failing part-way applies nothing.
pub const TEST_EXTRA_LINE_ENV: &str = "TANDEM_INIT_TEST_EXTRA_LINE";

/// Seconds iptables-restore waits for the xtables lock (shared by all namespaces on a
/// host with legacy iptables) instead of failing at once.
const XTABLES_LOCK_WAIT_SECS: &str = "10";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Nft,
    Legacy,
}

impl Flavour {
    fn suffix(self) -> &'static str {
        match self {
            Flavour::Nft => "nft",
            Flavour::Legacy => "legacy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Native nftables through the `nft` binary.
    Nft(PathBuf),
    /// `iptables-restore` through one of the two xtables flavours.
    Iptables(Flavour),
}

impl Backend {
    pub fn name(&self) -> String {
        match self {
            Backend::Nft(_) => "nft".to_string(),
            Backend::Iptables(flavour) => format!("iptables-{}", flavour.suffix()),
        }
    }
}

/// The save/restore pair for one flavour and family, e.g. `ip6tables-legacy-restore`.
fn xtables_tool(flavour: Flavour, family: Family, tool: &str) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    format!("{base}-{}-{tool}", flavour.suffix())
}

/// Picks the backend and says why in one log line.
///
/// `read_only` (dry runs) limits the iptables probes to listing rules: probing the nat
/// table by name would instantiate an empty legacy nat table in the namespace.
pub fn choose(firewall: Firewall, families: &[Family], read_only: bool) -> Outcome<Backend> {
    let (backend, reason) = match firewall {
        Firewall::Nft => (
            Backend::Nft(probe_nft().class(ExitClass::BackendMissing)?),
            "requested with --firewall nft".to_string(),
        ),
        Firewall::IptablesNft => {
            probe_iptables(Flavour::Nft, families, read_only).class(ExitClass::BackendMissing)?;
            (
                Backend::Iptables(Flavour::Nft),
                "requested with --firewall iptables-nft".to_string(),
            )
        }
        Firewall::IptablesLegacy => {
            probe_iptables(Flavour::Legacy, families, read_only)
                .class(ExitClass::BackendMissing)?;
            (
                Backend::Iptables(Flavour::Legacy),
                "requested with --firewall iptables-legacy".to_string(),
            )
        }
        Firewall::Auto => auto_detect(read_only)?,
    };
    log::info(&format!("firewall backend {}: {reason}", backend.name()));
    Ok(backend)
}

/// Legacy when the namespace already holds legacy rules (so ours sit next to them
/// and stay visible to the same tools), otherwise nftables, probing each candidate.
fn auto_detect(read_only: bool) -> Outcome<(Backend, String)> {
    let legacy_rules: Vec<&str> = [Family::V4, Family::V6]
        .into_iter()
        .filter(|family| {
            let save = xtables_tool(Flavour::Legacy, *family, "save");
            find_binary(&save)
                .and_then(|path| run(&path, &[], None).ok())
                .is_some_and(|out| out.lines().any(|l| l.starts_with("-A ")))
        })
        .map(Family::name)
        .collect();
    let families = [Family::V4, Family::V6];
    if !legacy_rules.is_empty() {
        return match probe_iptables(Flavour::Legacy, &families[..1], read_only) {
            Ok(()) => Ok((
                Backend::Iptables(Flavour::Legacy),
                format!(
                    "the namespace already holds legacy xtables rules ({})",
                    legacy_rules.join(", ")
                ),
            )),
            Err(e) => fail(
                ExitClass::BackendMissing,
                e.context(
                    "the namespace holds legacy xtables rules but legacy iptables does not work",
                ),
            ),
        };
    }
    let mut refusals = Vec::new();
    match probe_nft() {
        Ok(nft) => {
            return Ok((
                Backend::Nft(nft),
                "no legacy rules in the namespace and `nft list tables` works".to_string(),
            ))
        }
        Err(e) => refusals.push(format!("nft: {e:#}")),
    }
    match probe_iptables(Flavour::Nft, &families[..1], read_only) {
        Ok(()) => {
            return Ok((
                Backend::Iptables(Flavour::Nft),
                format!(
                    "no legacy rules, the nft binary is unusable ({}), iptables-nft works",
                    refusals[0]
                ),
            ))
        }
        Err(e) => refusals.push(format!("iptables-nft: {e:#}")),
    }
    match probe_iptables(Flavour::Legacy, &families[..1], read_only) {
        Ok(()) => Ok((
            Backend::Iptables(Flavour::Legacy),
            format!(
                "no nftables backend works ({}), legacy iptables does",
                refusals.join("; ")
            ),
        )),
        Err(e) => {
            refusals.push(format!("iptables-legacy: {e:#}"));
            fail(
                ExitClass::BackendMissing,
                anyhow!("no usable firewall backend: {}", refusals.join("; ")),
            )
        }
    }
}

fn probe_nft() -> anyhow::Result<PathBuf> {
    let nft = find_binary("nft").ok_or_else(|| anyhow!("`nft` not found in PATH"))?;
    run(&nft, &["list", "tables"], None)?;
    Ok(nft)
}

/// `save -t nat` is harmless yet fails exactly when the kernel lacks this flavour or
/// its nat table ("Table does not exist (do you need to insmod?)").
fn probe_iptables(flavour: Flavour, families: &[Family], read_only: bool) -> anyhow::Result<()> {
    for family in families {
        for tool in ["save", "restore"] {
            let name = xtables_tool(flavour, *family, tool);
            let path = find_binary(&name).ok_or_else(|| anyhow!("`{name}` not found in PATH"))?;
            if tool == "save" {
                let args: &[&str] = if read_only { &[] } else { &["-t", "nat"] };
                run(&path, args, None)
                    .with_context(|| format!("{} nat table unusable", family.name()))?;
            }
        }
    }
    Ok(())
}

/// One payload for one tool, as it will be (or would be) applied.
pub struct Payload {
    pub tool: String,
    pub args: Vec<&'static str>,
    pub what: String,
    pub text: String,
}

impl Payload {
    pub fn header(&self) -> String {
        format!(
            "# tandem-init: {} {} ({})",
            self.tool,
            self.args.join(" "),
            self.what
        )
    }
}

/// Builds every payload needed to install `rules`, reading the current state where
/// the payload depends on it (existing iptables jumps).
pub fn apply_payloads(backend: &Backend, rules: &RuleSet) -> Outcome<Vec<Payload>> {
    let extra = std::env::var(TEST_EXTRA_LINE_ENV).ok();
    match backend {
        Backend::Nft(nft) => {
            let mut text = render::nft_script(rules);
            if let Some(line) = &extra {
                text.push_str(line);
                text.push('\n');
            }
            Ok(vec![Payload {
                tool: nft.display().to_string(),
                args: vec!["-f", "-"],
                what: format!("table inet {}", render::NFT_TABLE),
                text,
            }])
        }
        Backend::Iptables(flavour) => {
            let mut payloads = Vec::new();
            for family in rules.families() {
                let save = saved_rules(*flavour, family).class(ExitClass::ApplyFailed)?;
                let existing = ExistingJumps::from_save(&save);
                let mut text = render::iptables_payload(rules, family, &existing);
                if let Some(line) = &extra {
                    inject_before_commit(&mut text, line);
                }
                payloads.push(
                    iptables_payload(*flavour, family, text).class(ExitClass::BackendMissing)?,
                );
            }
            Ok(payloads)
        }
    }
}

/// Builds the payloads that remove what Tandem installed. With `--firewall auto`
/// every backend present is searched, since an earlier run may have used another.
pub fn cleanup_payloads(firewall: Firewall) -> Outcome<Vec<Payload>> {
    let (nft, flavours) = match firewall {
        Firewall::Auto => (find_binary("nft"), vec![Flavour::Nft, Flavour::Legacy]),
        Firewall::Nft => (Some(probe_nft().class(ExitClass::BackendMissing)?), vec![]),
        Firewall::IptablesNft => (None, vec![Flavour::Nft]),
        Firewall::IptablesLegacy => (None, vec![Flavour::Legacy]),
    };
    let mut payloads = Vec::new();
    if let Some(nft) = nft {
        let ours = format!("inet {}", render::NFT_TABLE);
        let tables = run(&nft, &["list", "tables"], None);
        let present = match tables {
            Ok(text) => text.lines().any(|l| l.trim() == format!("table {ours}")),
            Err(e) if firewall == Firewall::Nft => return fail(ExitClass::BackendMissing, e),
            Err(_) => false,
        };
        if present {
            payloads.push(Payload {
                tool: nft.display().to_string(),
                args: vec!["-f", "-"],
                what: format!("table {ours}"),
                text: render::nft_cleanup_script(),
            });
        }
    }
    for flavour in flavours {
        for family in [Family::V4, Family::V6] {
            let save = match saved_rules(flavour, family) {
                Ok(save) => save,
                // In auto mode an absent or kernel-refused flavour simply holds nothing of ours.
                Err(_) if firewall == Firewall::Auto => continue,
                Err(e) => return fail(ExitClass::BackendMissing, e),
            };
            if let Some(text) = render::iptables_cleanup_payload(&save) {
                payloads.push(
                    iptables_payload(flavour, family, text).class(ExitClass::BackendMissing)?,
                );
            }
        }
    }
    Ok(payloads)
}

fn iptables_payload(flavour: Flavour, family: Family, text: String) -> anyhow::Result<Payload> {
    let name = xtables_tool(flavour, family, "restore");
    let tool = find_binary(&name).ok_or_else(|| anyhow!("`{name}` not found in PATH"))?;
    Ok(Payload {
        tool: tool.display().to_string(),
        args: vec!["--noflush", "--wait", XTABLES_LOCK_WAIT_SECS],
        what: format!("{} nat table", family.name()),
        text,
    })
}

fn inject_before_commit(payload: &mut String, line: &str) {
    let at = payload.rfind("COMMIT").unwrap_or(payload.len());
    payload.insert_str(at, &format!("{line}\n"));
}

/// The current rule set of one flavour and family, all tables (the legacy tools list
/// only tables already in use, so reading never instantiates one).
pub fn saved_rules(flavour: Flavour, family: Family) -> anyhow::Result<String> {
    let name = xtables_tool(flavour, family, "save");
    let path = find_binary(&name).ok_or_else(|| anyhow!("`{name}` not found in PATH"))?;
    run(&path, &[], None)
}

/// Applies the payloads. iptables payloads are first checked with `--test` so that a
/// payload rejected for one family does not leave the other family half-changed.
pub fn commit(payloads: &[Payload]) -> Outcome<()> {
    for payload in payloads.iter().filter(|p| p.args.contains(&"--noflush")) {
        let mut args = payload.args.clone();
        args.push("--test");
        run(Path::new(&payload.tool), &args, Some(&payload.text))
            .with_context(|| format!("cannot apply rules ({})", payload.what))
            .class(ExitClass::ApplyFailed)?;
    }
    for payload in payloads {
        run(Path::new(&payload.tool), &payload.args, Some(&payload.text))
            .with_context(|| format!("cannot apply rules ({})", payload.what))
            .class(ExitClass::ApplyFailed)?;
    }
    Ok(())
}

/// Looks in PATH and then in the sbin directories a minimal container's PATH may omit.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs a tool to completion, returning its stdout, or an error of one line such as
/// "iptables-restore exited 2: line 4 failed".
fn run(program: &Path, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let name = program.file_name().map_or_else(
        || program.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {name}"))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("cannot feed {name}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("cannot wait for {name}"))?;
    if !out.status.success() {
        let stderr = log::one_line(&String::from_utf8_lossy(&out.stderr));
        let status = out
            .status
            .code()
            .map_or_else(|| "was killed".to_string(), |c| format!("exited {c}"));
        bail!(
            "{name} {status}: {}",
            if stderr.is_empty() {
                "no error output"
            } else {
                &stderr
            }
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names_follow_the_xtables_convention() {
        assert_eq!(
            xtables_tool(Flavour::Legacy, Family::V6, "restore"),
            "ip6tables-legacy-restore"
        );
        assert_eq!(
            xtables_tool(Flavour::Nft, Family::V4, "save"),
            "iptables-nft-save"
        );
    }

    #[test]
    fn injected_lines_land_inside_the_commit() {
        let mut payload = "*nat\n-A X -j RETURN\nCOMMIT\n".to_string();
        inject_before_commit(&mut payload, "-A BAD");
        assert_eq!(payload, "*nat\n-A X -j RETURN\n-A BAD\nCOMMIT\n");
    }

    #[test]
    fn failing_tools_report_one_line() {
        let err = run(
            Path::new("/bin/sh"),
            &["-c", "echo one >&2; echo two >&2; exit 3"],
            None,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "sh exited 3: one; two");
    }
}
