//! Rendering the rule model as text the kernel tools accept: an `nft -f` script, or
//! one `iptables-restore --noflush` payload per address family. Pure functions.

use std::fmt::Write;

use crate::config::{PortList, PortRange};
use crate::rules::{Action, Condition, Family, Rule, RuleSet};

pub const NFT_TABLE: &str = "tandem";
pub const INBOUND_CHAIN: &str = "TANDEM_INBOUND";
pub const OUTBOUND_CHAIN: &str = "TANDEM_OUTBOUND";
const OUR_CHAINS: [&str; 2] = [INBOUND_CHAIN, OUTBOUND_CHAIN];

/// xt_multiport refuses more than 15 "slots" per rule; a range takes two.
const MULTIPORT_SLOTS: usize = 15;

/// The nft script: one transaction that creates the table if missing, deletes it, and
/// declares it afresh. Applying it any number of times leaves exactly one copy, and
/// a failure anywhere leaves the previous state untouched.
pub fn nft_script(rules: &RuleSet) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "add table inet {NFT_TABLE}");
    let _ = writeln!(out, "delete table inet {NFT_TABLE}");
    let _ = writeln!(out, "table inet {NFT_TABLE} {{");
    for (name, hook, chain) in [
        ("prerouting", "prerouting", &rules.inbound),
        ("output", "output", &rules.outbound),
    ] {
        let _ = writeln!(out, "\tchain {name} {{");
        // -100 is the iptables nat priority (dstnat); the keyword is not accepted for
        // the output hook by the nft 1.0.x shipped with Debian bookworm.
        let _ = writeln!(
            out,
            "\t\ttype nat hook {hook} priority -100; policy accept;"
        );
        if !rules.ipv6 {
            let _ = writeln!(
                out,
                "\t\tmeta nfproto ipv6 return comment \"tandem/ipv6-disabled\""
            );
        }
        for rule in chain {
            let _ = writeln!(out, "\t\t{}", nft_rule(rule));
        }
        let _ = writeln!(out, "\t}}");
    }
    let _ = writeln!(out, "}}");
    out
}

/// Removes the table whether or not it exists, in one transaction.
pub fn nft_cleanup_script() -> String {
    format!("add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
}

fn nft_rule(rule: &Rule) -> String {
    let condition = match &rule.condition {
        Condition::SourceIn(c) => format!("{} saddr {c}", nft_family(c.is_ipv6())),
        Condition::DestinationIn(c) => format!("{} daddr {c}", nft_family(c.is_ipv6())),
        Condition::LeavesThrough(iface) => format!("oifname \"{iface}\""),
        Condition::OwnerUid(uid) => format!("meta skuid {uid}"),
        Condition::OwnerGid(gid) => format!("meta skgid {gid}"),
        Condition::NotAddressedToHost => "fib daddr type != local".to_string(),
        Condition::TcpDestinationPort(ports) => format!("tcp dport {}", nft_ports(ports)),
        Condition::AnyTcp => "meta l4proto tcp".to_string(),
    };
    let action = match rule.action {
        Action::Return => "return".to_string(),
        Action::RedirectTo(port) => format!("redirect to :{port}"),
    };
    format!("{condition} {action} comment \"{}\"", rule.comment())
}

fn nft_family(ipv6: bool) -> &'static str {
    if ipv6 {
        "ip6"
    } else {
        "ip"
    }
}

fn nft_ports(ports: &PortList) -> String {
    let items: Vec<String> = ports.0.iter().map(|r| port_range(r, "-")).collect();
    match items.as_slice() {
        [one] => one.clone(),
        _ => format!("{{ {} }}", items.join(", ")),
    }
}

fn port_range(range: &PortRange, separator: &str) -> String {
    if range.is_single() {
        range.first.to_string()
    } else {
        format!("{}{separator}{}", range.first, range.last)
    }
}

/// Jumps into our chains that already exist in the nat table, as `iptables-save`
/// printed them (`-A PREROUTING ... -j TANDEM_INBOUND`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExistingJumps {
    pub lines: Vec<String>,
}

impl ExistingJumps {
    /// Reads the `*nat` section of `iptables-save` output.
    pub fn from_save(save: &str) -> ExistingJumps {
        let lines = nat_section(save)
            .filter(|line| {
                let Some(rest) = line.strip_prefix("-A ") else {
                    return false;
                };
                let chain = rest.split_whitespace().next().unwrap_or("");
                !OUR_CHAINS.contains(&chain)
                    && OUR_CHAINS
                        .iter()
                        .any(|ours| line.ends_with(&format!("-j {ours}")))
            })
            .map(str::to_string)
            .collect();
        ExistingJumps { lines }
    }

    fn count(&self, builtin: &str, target: &str) -> Vec<&String> {
        self.lines
            .iter()
            .filter(|l| {
                l.starts_with(&format!("-A {builtin} ")) && l.ends_with(&format!("-j {target}"))
            })
            .collect()
    }
}

fn nat_section(save: &str) -> impl Iterator<Item = &str> {
    let mut in_nat = false;
    save.lines().filter(move |line| {
        if line.starts_with('*') {
            in_nat = *line == "*nat";
        }
        in_nat
    })
}

/// Whether the saved nat table declares any of our chains.
pub fn declares_our_chains(save: &str) -> Vec<&'static str> {
    OUR_CHAINS
        .iter()
        .copied()
        .filter(|chain| nat_section(save).any(|l| l.starts_with(&format!(":{chain} "))))
        .collect()
}

/// The `iptables-restore --noflush` payload for one family.
///
/// Declaring our chains with `:CHAIN - [0:0]` flushes them if they exist (and creates
/// them otherwise) inside the same commit that refills them, so a re-run replaces
/// rather than duplicates. Restore has no "append if absent", so the jump from the
/// built-in chain is added only when `existing` shows none, and surplus copies left
/// by older tools are deleted; that keeps the whole change one atomic commit.
pub fn iptables_payload(rules: &RuleSet, family: Family, existing: &ExistingJumps) -> String {
    let mut out = String::from("*nat\n");
    for chain in OUR_CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for (chain, list) in [
        (INBOUND_CHAIN, &rules.inbound),
        (OUTBOUND_CHAIN, &rules.outbound),
    ] {
        for rule in list
            .iter()
            .filter(|r| r.family().is_none_or(|f| f == family))
        {
            for spec in iptables_specs(rule) {
                let _ = writeln!(out, "-A {chain} {spec}");
            }
        }
    }
    for (builtin, chain, purpose) in [
        ("PREROUTING", INBOUND_CHAIN, "install-inbound"),
        ("OUTPUT", OUTBOUND_CHAIN, "install-outbound"),
    ] {
        let present = existing.count(builtin, chain);
        if present.is_empty() {
            let _ = writeln!(
                out,
                "-A {builtin} -m comment --comment \"tandem/{purpose}\" -j {chain}"
            );
        }
        for surplus in present.iter().skip(1) {
            let _ = writeln!(out, "-D{}", &surplus[2..]);
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The payload that removes our jumps and chains, or `None` when there is nothing of
/// ours in this family's nat table (so cleanup never even creates the table).
pub fn iptables_cleanup_payload(save: &str) -> Option<String> {
    let jumps = ExistingJumps::from_save(save);
    let chains = declares_our_chains(save);
    if jumps.lines.is_empty() && chains.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for jump in &jumps.lines {
        let _ = writeln!(out, "-D{}", &jump[2..]);
    }
    for chain in &chains {
        let _ = writeln!(out, "-F {chain}");
    }
    for chain in &chains {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// One rule becomes one or more iptables rule specs (port lists are chunked), written
/// in the order `iptables-save` prints options so saved rule sets read back identically.
fn iptables_specs(rule: &Rule) -> Vec<String> {
    let comment = format!("-m comment --comment \"{}\"", rule.comment());
    let target = match rule.action {
        Action::Return => "-j RETURN".to_string(),
        Action::RedirectTo(port) => format!("-j REDIRECT --to-ports {port}"),
    };
    let matches: Vec<String> = match &rule.condition {
        Condition::SourceIn(c) => vec![format!("-s {c}")],
        Condition::DestinationIn(c) => vec![format!("-d {c}")],
        Condition::LeavesThrough(iface) => vec![format!("-o {iface}")],
        Condition::OwnerUid(uid) => vec![format!("-m owner --uid-owner {uid}")],
        Condition::OwnerGid(gid) => vec![format!("-m owner --gid-owner {gid}")],
        Condition::NotAddressedToHost => vec!["-m addrtype ! --dst-type LOCAL".to_string()],
        Condition::TcpDestinationPort(ports) => multiport_chunks(ports)
            .into_iter()
            .map(|chunk| format!("-p tcp -m multiport --dports {chunk}"))
            .collect(),
        Condition::AnyTcp => vec!["-p tcp".to_string()],
    };
    matches
        .into_iter()
        .map(|m| format!("{m} {comment} {target}"))
        .collect()
}

fn multiport_chunks(ports: &PortList) -> Vec<String> {
    let mut chunks: Vec<Vec<String>> = vec![Vec::new()];
    let mut used = 0;
    for range in &ports.0 {
        let cost = if range.is_single() { 1 } else { 2 };
        if used + cost > MULTIPORT_SLOTS {
            chunks.push(Vec::new());
            used = 0;
        }
        used += cost;
        chunks
            .last_mut()
            .expect("at least one chunk")
            .push(port_range(range, ":"));
    }
    chunks.into_iter().map(|c| c.join(",")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Config};
    use clap::Parser;

    fn build(args: &[&str]) -> RuleSet {
        let mut argv = vec!["tandem-init"];
        argv.extend_from_slice(args);
        RuleSet::build(&Config::from_flags(&Cli::parse_from(argv).flags).unwrap())
    }

    #[test]
    fn multiport_chunks_never_exceed_fifteen_slots() {
        let many: String = (1..=40)
            .map(|p| (p * 2).to_string())
            .collect::<Vec<_>>()
            .join(",");
        let list: PortList = format!("{many},1000-1010,2000-2010").parse().unwrap();
        let chunks = multiport_chunks(&list);
        let mut seen = 0;
        for chunk in &chunks {
            let slots: usize = chunk
                .split(',')
                .map(|p| if p.contains(':') { 2 } else { 1 })
                .sum();
            assert!(slots <= MULTIPORT_SLOTS, "{chunk}");
            seen += chunk.split(',').count();
        }
        assert_eq!(seen, 42);
    }

    #[test]
    fn each_cidr_reaches_only_its_own_family() {
        let rules = build(&[
            "--subnets-to-ignore",
            "10.0.0.0/8,fd00::/8",
            "--outbound-subnets-to-ignore",
            "192.168.0.0/16,2001:db8::/32",
        ]);
        let v4 = iptables_payload(&rules, Family::V4, &ExistingJumps::default());
        let v6 = iptables_payload(&rules, Family::V6, &ExistingJumps::default());
        assert!(v4.contains("-s 10.0.0.0/8") && v4.contains("-d 192.168.0.0/16"));
        assert!(!v4.contains("fd00") && !v4.contains("2001:db8"));
        assert!(v6.contains("-s fd00::/8") && v6.contains("-d 2001:db8::/32"));
        assert!(!v6.contains("10.0.0.0") && !v6.contains("192.168"));
    }

    #[test]
    fn jumps_are_added_once_and_duplicates_removed() {
        let rules = build(&[]);
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:TANDEM_INBOUND - [0:0]\n\
            -A PREROUTING -m comment --comment \"tandem/install-inbound\" -j TANDEM_INBOUND\n\
            -A OUTPUT -m comment --comment \"tandem/install-outbound\" -j TANDEM_OUTBOUND\n\
            -A OUTPUT -m comment --comment \"tandem/install-outbound\" -j TANDEM_OUTBOUND\n\
            -A TANDEM_INBOUND -p tcp -j RETURN\nCOMMIT\n";
        let existing = ExistingJumps::from_save(save);
        assert_eq!(existing.lines.len(), 3);
        let payload = iptables_payload(&rules, Family::V4, &existing);
        assert!(!payload.contains("-A PREROUTING"), "{payload}");
        assert!(!payload.contains("-A OUTPUT"), "{payload}");
        assert_eq!(payload.matches("-D OUTPUT").count(), 1, "{payload}");
        let fresh = iptables_payload(&rules, Family::V4, &ExistingJumps::default());
        assert!(fresh.contains(
            "-A PREROUTING -m comment --comment \"tandem/install-inbound\" -j TANDEM_INBOUND"
        ));
    }

    #[test]
    fn cleanup_touches_only_our_chains() {
        assert_eq!(
            iptables_cleanup_payload("*nat\n:PREROUTING ACCEPT [0:0]\n-A OUTPUT -j FOO\nCOMMIT\n"),
            None
        );
        let save = "*filter\n-A INPUT -j TANDEM_INBOUND\nCOMMIT\n*nat\n:TANDEM_OUTBOUND - [0:0]\n\
            -A OUTPUT -j KEEP_ME\n-A OUTPUT -m comment --comment \"tandem/install-outbound\" -j TANDEM_OUTBOUND\nCOMMIT\n";
        let payload = iptables_cleanup_payload(save).unwrap();
        assert_eq!(
            payload,
            "*nat\n-D OUTPUT -m comment --comment \"tandem/install-outbound\" -j TANDEM_OUTBOUND\n\
             -F TANDEM_OUTBOUND\n-X TANDEM_OUTBOUND\nCOMMIT\n"
        );
    }

    #[test]
    fn nft_disables_ipv6_explicitly() {
        let script = nft_script(&build(&["--ipv6=false"]));
        assert_eq!(script.matches("meta nfproto ipv6 return").count(), 2);
        assert!(!nft_script(&build(&[])).contains("nfproto"));
    }
}
