//! The rule model: what to redirect and what to leave alone, independent of how a
//! backend spells it. Pure data, no I/O.
//!
//! Semantics follow linkerd2-proxy-init: inbound TCP is redirected in the nat
//! PREROUTING hook, outbound TCP in the nat OUTPUT hook; the proxy's own sockets
//! (by uid, and gid if given) and anything leaving through `lo` are exempt.

use std::net::IpAddr;

use crate::config::{Cidr, Config, PortList};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// The one condition a rule tests. Rules never combine conditions, which keeps every
/// rule's purpose (and comment) obvious and the renderers trivial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    SourceIn(Cidr),
    DestinationIn(Cidr),
    LeavesThrough(&'static str),
    OwnerUid(u32),
    OwnerGid(u32),
    /// The destination is not one of this host's own addresses (host mode: the
    /// connection is being forwarded, e.g. to a container).
    NotAddressedToHost,
    TcpDestinationPort(PortList),
    AnyTcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave the connection alone (stop evaluating our chain).
    Return,
    /// Send the connection to this local port, keeping its original destination
    /// readable through `SO_ORIGINAL_DST`.
    RedirectTo(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub condition: Condition,
    pub action: Action,
    /// Names the rule's purpose; rendered as the rule's comment (`tandem/<purpose>`).
    pub purpose: String,
}

impl Rule {
    fn new(condition: Condition, action: Action, purpose: impl Into<String>) -> Rule {
        Rule {
            condition,
            action,
            purpose: purpose.into(),
        }
    }

    /// The address family the rule is limited to, if any: a CIDR belongs to exactly
    /// one family and must never reach the other family's payload.
    pub fn family(&self) -> Option<Family> {
        match &self.condition {
            Condition::SourceIn(c) | Condition::DestinationIn(c) => Some(Family::of(c.addr)),
            _ => None,
        }
    }

    pub fn comment(&self) -> String {
        format!("tandem/{}", self.purpose)
    }
}

/// Everything Tandem installs, for both families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub inbound: Vec<Rule>,
    pub outbound: Vec<Rule>,
    /// When false, IPv6 traffic must pass untouched.
    pub ipv6: bool,
}

impl RuleSet {
    pub fn build(config: &Config) -> RuleSet {
        let mut inbound = Vec::new();
        if config.host {
            inbound.push(Rule::new(
                Condition::NotAddressedToHost,
                Action::Return,
                "ignore-forwarded",
            ));
        }
        for cidr in &config.inbound_subnets_to_ignore {
            inbound.push(Rule::new(
                Condition::SourceIn(*cidr),
                Action::Return,
                format!("ignore-inbound-subnet-{cidr}"),
            ));
        }
        if !config.inbound_ports_to_ignore.is_empty() {
            inbound.push(Rule::new(
                Condition::TcpDestinationPort(config.inbound_ports_to_ignore.clone()),
                Action::Return,
                "ignore-inbound-ports",
            ));
        }
        if config.ports_to_redirect.is_empty() {
            inbound.push(Rule::new(
                Condition::AnyTcp,
                Action::RedirectTo(config.inbound_port),
                "redirect-inbound-to-proxy",
            ));
        } else {
            inbound.push(Rule::new(
                Condition::TcpDestinationPort(config.ports_to_redirect.clone()),
                Action::RedirectTo(config.inbound_port),
                "redirect-listed-inbound-to-proxy",
            ));
        }

        let mut outbound = vec![Rule::new(
            Condition::OwnerUid(config.proxy_uid),
            Action::Return,
            "ignore-proxy-uid",
        )];
        if let Some(gid) = config.proxy_gid {
            outbound.push(Rule::new(
                Condition::OwnerGid(gid),
                Action::Return,
                "ignore-proxy-gid",
            ));
        }
        // Also covers an app dialling its own pod IP: that goes through `lo` too, so it
        // reaches the app directly, as with Linkerd.
        outbound.push(Rule::new(
            Condition::LeavesThrough("lo"),
            Action::Return,
            "ignore-loopback",
        ));
        for cidr in &config.outbound_subnets_to_ignore {
            outbound.push(Rule::new(
                Condition::DestinationIn(*cidr),
                Action::Return,
                format!("ignore-outbound-subnet-{cidr}"),
            ));
        }
        if !config.outbound_ports_to_ignore.is_empty() {
            outbound.push(Rule::new(
                Condition::TcpDestinationPort(config.outbound_ports_to_ignore.clone()),
                Action::Return,
                "ignore-outbound-ports",
            ));
        }
        outbound.push(Rule::new(
            Condition::AnyTcp,
            Action::RedirectTo(config.outbound_port),
            "redirect-outbound-to-proxy",
        ));

        RuleSet {
            inbound,
            outbound,
            ipv6: config.ipv6,
        }
    }

    /// The families that get rules at all.
    pub fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }
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
    fn exemptions_come_before_redirects() {
        let rules = build(&["--proxy-gid", "7", "--outbound-ports-to-ignore", "443"]);
        let last = rules.outbound.last().unwrap();
        assert_eq!(last.action, Action::RedirectTo(4140));
        assert!(rules.outbound[..rules.outbound.len() - 1]
            .iter()
            .all(|r| r.action == Action::Return));
        assert_eq!(rules.outbound[0].condition, Condition::OwnerUid(2102));
        assert_eq!(rules.outbound[1].condition, Condition::OwnerGid(7));
        assert_eq!(
            rules.inbound.last().unwrap().action,
            Action::RedirectTo(4143)
        );
    }

    #[test]
    fn subnets_keep_their_direction_and_family() {
        let rules = build(&[
            "--subnets-to-ignore",
            "10.0.0.0/8",
            "--outbound-subnets-to-ignore",
            "fd00::/8",
        ]);
        let inbound: Vec<_> = rules.inbound.iter().filter_map(Rule::family).collect();
        let outbound: Vec<_> = rules.outbound.iter().filter_map(Rule::family).collect();
        assert_eq!(inbound, [Family::V4]);
        assert_eq!(outbound, [Family::V6]);
        assert!(matches!(rules.inbound[0].condition, Condition::SourceIn(_)));
    }

    #[test]
    fn host_mode_leaves_forwarded_traffic_ssh_and_admin_alone() {
        let rules = build(&[
            "--host",
            "--proxy-uid",
            "998",
            "--inbound-ports-to-ignore",
            "8443",
        ]);
        assert_eq!(rules.inbound[0].condition, Condition::NotAddressedToHost);
        let ignored = rules
            .inbound
            .iter()
            .find_map(|r| match &r.condition {
                Condition::TcpDestinationPort(p) if r.action == Action::Return => Some(p.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(ignored.to_string(), "22,4191,8443");
        assert_eq!(rules.outbound[0].condition, Condition::OwnerUid(998));
        // Pod mode has neither.
        let pod = build(&[]);
        assert!(pod
            .inbound
            .iter()
            .all(|r| r.condition != Condition::NotAddressedToHost));
    }

    #[test]
    fn listed_ports_replace_redirect_all() {
        let rules = build(&["--ports-to-redirect", "8080,9000-9010"]);
        let last = rules.inbound.last().unwrap();
        assert_eq!(last.purpose, "redirect-listed-inbound-to-proxy");
        assert!(matches!(&last.condition, Condition::TcpDestinationPort(p) if p.contains(9005)));
    }

    #[test]
    fn every_rule_names_its_purpose() {
        let rules = build(&[
            "--subnets-to-ignore",
            "10.0.0.0/8",
            "--inbound-ports-to-ignore",
            "1",
        ]);
        for rule in rules.inbound.iter().chain(&rules.outbound) {
            assert!(rule.comment().starts_with("tandem/") && rule.comment().len() > 8);
        }
    }
}
