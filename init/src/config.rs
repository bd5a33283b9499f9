//! Flags → typed configuration: port lists, CIDRs, and the checks that refuse
//! configurations which would silently do the wrong thing.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::log::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "tandem-init",
    version,
    about = "Redirects a pod's or host's TCP traffic through tandem-proxy with iptables or nftables",
    after_help = "Exit codes: 0 ok, 1 other error, 2 bad flags, 3 no usable firewall backend, \
                  4 applying rules failed (nothing applied), 95 validation failed. See init/README.md."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Install or replace the redirect rules (the default).
    Apply,
    /// Remove every rule and chain Tandem installed, and nothing else.
    Cleanup,
    /// Check with real connections that traffic is redirected; changes nothing.
    Validate,
}

#[derive(Debug, Clone, Args)]
pub struct Flags {
    /// Port the proxy accepts redirected inbound connections on.
    #[arg(long, global = true, default_value_t = 4143)]
    pub incoming_proxy_port: u16,
    /// Port the proxy accepts redirected outbound connections on.
    #[arg(long, global = true, default_value_t = 4140)]
    pub outgoing_proxy_port: u16,
    /// User id the proxy runs as; its own connections are never redirected. 0 is refused.
    #[arg(long, global = true, default_value_t = 2102)]
    pub proxy_uid: u32,
    /// Group id whose connections are never redirected either.
    #[arg(long, global = true)]
    pub proxy_gid: Option<u32>,
    /// Inbound destination ports left alone, e.g. `4190,4191,25000-25100`.
    #[arg(long, global = true, default_value = "")]
    pub inbound_ports_to_ignore: PortList,
    /// Outbound destination ports left alone, e.g. `443,6443`.
    #[arg(long, global = true, default_value = "")]
    pub outbound_ports_to_ignore: PortList,
    /// Redirect only these inbound ports instead of all of them.
    #[arg(long, global = true, default_value = "")]
    pub ports_to_redirect: PortList,
    /// Source CIDRs whose inbound connections are left alone (Linkerd's meaning).
    #[arg(long, global = true, value_delimiter = ',')]
    pub subnets_to_ignore: Vec<Cidr>,
    /// Destination CIDRs whose outbound connections are left alone.
    #[arg(long, global = true, value_delimiter = ',')]
    pub outbound_subnets_to_ignore: Vec<Cidr>,
    /// Also redirect IPv6 (`--ipv6=false` leaves IPv6 untouched).
    #[arg(long, global = true, default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", require_equals = false)]
    pub ipv6: bool,
    /// Which firewall to program.
    #[arg(long, global = true, value_enum, default_value_t = Firewall::Auto)]
    pub firewall: Firewall,
    /// Network namespace to act in (e.g. /var/run/netns/NAME or /proc/PID/ns/net).
    #[arg(long, global = true)]
    pub netns: Option<PathBuf>,
    /// Host mode, for a proxy beside a workload on a VM: only inbound connections
    /// addressed to this host are redirected (forwarded and container traffic is
    /// left alone), and SSH (22) and the proxy's admin port (4191) stay direct.
    #[arg(long, global = true, conflicts_with = "netns")]
    pub host: bool,
    /// Print exactly what would be applied (or removed) and change nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// After applying, check with real connections that redirection works.
    #[arg(long, global = true)]
    pub validate: bool,
    /// How long each validation connection may take, in milliseconds.
    #[arg(long, global = true, default_value_t = 3000)]
    pub validate_timeout_ms: u64,
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Firewall {
    /// Legacy xtables if the namespace already holds legacy rules, otherwise nftables.
    Auto,
    /// Native nftables: one `inet tandem` table applied with `nft -f`.
    Nft,
    /// iptables-restore through the nf_tables backend (`iptables-nft-restore`).
    IptablesNft,
    /// iptables-restore through the legacy xtables backend.
    IptablesLegacy,
}

/// What the rule model needs, after validation. Built only through [`Config::from_flags`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub inbound_ports_to_ignore: PortList,
    pub outbound_ports_to_ignore: PortList,
    pub ports_to_redirect: PortList,
    pub inbound_subnets_to_ignore: Vec<Cidr>,
    pub outbound_subnets_to_ignore: Vec<Cidr>,
    pub ipv6: bool,
    /// Host mode (see `--host`).
    pub host: bool,
}

/// Inbound ports host mode never redirects: SSH, so that a rule mistake cannot lock
/// the operator out, and the proxy's admin port, which probes reach directly.
pub const HOST_PORTS_KEPT_DIRECT: &str = "22,4191";

impl Config {
    pub fn from_flags(flags: &Flags) -> anyhow::Result<Config> {
        if flags.proxy_uid == 0 {
            // An owner exemption for uid 0 would exempt every root process, and no
            // exemption at all (Linkerd's behaviour) loops the proxy into itself.
            bail!("--proxy-uid 0 is refused: run the proxy as a dedicated non-root user");
        }
        if flags.proxy_gid == Some(0) {
            bail!("--proxy-gid 0 is refused: it would exempt every process in group root");
        }
        for (name, port) in [
            ("--incoming-proxy-port", flags.incoming_proxy_port),
            ("--outgoing-proxy-port", flags.outgoing_proxy_port),
        ] {
            if port == 0 {
                bail!("{name} must be between 1 and 65535");
            }
        }
        if !flags.ipv6 {
            if let Some(v6) = flags
                .subnets_to_ignore
                .iter()
                .chain(&flags.outbound_subnets_to_ignore)
                .find(|c| c.is_ipv6())
            {
                bail!("subnet {v6} is IPv6 but --ipv6=false");
            }
        }
        let mut inbound_ports_to_ignore = flags.inbound_ports_to_ignore.clone();
        if flags.host {
            let kept: PortList = HOST_PORTS_KEPT_DIRECT.parse()?;
            inbound_ports_to_ignore = inbound_ports_to_ignore.union(&kept);
        }
        Ok(Config {
            inbound_port: flags.incoming_proxy_port,
            outbound_port: flags.outgoing_proxy_port,
            proxy_uid: flags.proxy_uid,
            proxy_gid: flags.proxy_gid,
            inbound_ports_to_ignore,
            outbound_ports_to_ignore: flags.outbound_ports_to_ignore.clone(),
            ports_to_redirect: flags.ports_to_redirect.clone(),
            inbound_subnets_to_ignore: dedup(&flags.subnets_to_ignore),
            outbound_subnets_to_ignore: dedup(&flags.outbound_subnets_to_ignore),
            ipv6: flags.ipv6,
            host: flags.host,
        })
    }
}

fn dedup(cidrs: &[Cidr]) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = Vec::new();
    for c in cidrs {
        if !out.contains(c) {
            out.push(*c);
        }
    }
    out
}

/// An inclusive port range; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn is_single(&self) -> bool {
        self.first == self.last
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// A set of ports, kept sorted with overlapping and adjacent ranges merged, so that
/// both renderers see a canonical list (nft rejects overlapping set intervals).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<PortRange>);

impl PortList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }

    /// Both lists' ports.
    pub fn union(&self, other: &PortList) -> PortList {
        PortList::normalised(self.0.iter().chain(&other.0).copied().collect())
    }

    fn normalised(mut ranges: Vec<PortRange>) -> PortList {
        ranges.sort();
        let mut merged: Vec<PortRange> = Vec::new();
        for r in ranges {
            match merged.last_mut() {
                Some(prev) if u32::from(r.first) <= u32::from(prev.last) + 1 => {
                    prev.last = prev.last.max(r.last);
                }
                _ => merged.push(r),
            }
        }
        PortList(merged)
    }
}

impl FromStr for PortList {
    type Err = anyhow::Error;

    /// Parses `4190,4191,25000-25100`. Unlike Linkerd, a bad entry is an error rather
    /// than a logged skip: a silently dropped exclusion redirects traffic the operator
    /// meant to keep direct.
    fn from_str(text: &str) -> anyhow::Result<PortList> {
        let mut ranges = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let range = match item.split_once('-') {
                Some((a, b)) => {
                    let (first, last) = (parse_port(a)?, parse_port(b)?);
                    if first > last {
                        bail!("port range {item:?} runs backwards");
                    }
                    PortRange { first, last }
                }
                None => {
                    let port = parse_port(item)?;
                    PortRange {
                        first: port,
                        last: port,
                    }
                }
            };
            ranges.push(range);
        }
        Ok(PortList::normalised(ranges))
    }
}

fn parse_port(text: &str) -> anyhow::Result<u16> {
    match text.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(anyhow!("{text:?} is not a port between 1 and 65535")),
    }
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.is_single() {
                write!(f, "{}", r.first)?;
            } else {
                write!(f, "{}-{}", r.first, r.last)?;
            }
        }
        Ok(())
    }
}

/// An IPv4 or IPv6 network. Host bits are cleared on parse so the rendered rule is
/// exactly what `iptables-save` / `nft list` print back, which keeps re-runs comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_v4(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_v6(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_v4(bits: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - u32::from(prefix)))
    }
}

fn mask_v6(bits: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - u32::from(prefix)))
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Cidr> {
        let text = text.trim();
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .with_context(|| format!("{text:?} is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| anyhow!("{text:?} has an invalid prefix length"))?,
            None => max,
        };
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(mask_v4(u32::from(a), prefix).into()),
            IpAddr::V6(a) => IpAddr::V6(mask_v6(u128::from(a), prefix).into()),
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut argv = vec!["tandem-init"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("flags parse").flags
    }

    #[test]
    fn port_lists_merge_ranges_and_sort() {
        let list: PortList = "25000-25100,4191, 4190,25050-25200,80".parse().unwrap();
        assert_eq!(list.to_string(), "80,4190-4191,25000-25200");
        assert!(list.contains(25150));
        assert!(!list.contains(81));
    }

    #[test]
    fn port_lists_reject_garbage() {
        for bad in ["0", "65536", "20-10", "http", "1-", "-5"] {
            assert!(bad.parse::<PortList>().is_err(), "{bad} accepted");
        }
        assert!("".parse::<PortList>().unwrap().is_empty());
    }

    #[test]
    fn cidrs_clear_host_bits_and_default_to_host_prefix() {
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(
            "2001:db8::1/32".parse::<Cidr>().unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0/8".parse::<Cidr>().is_err());
        let net: Cidr = "192.0.2.0/24".parse().unwrap();
        assert!(net.contains("192.0.2.200".parse().unwrap()));
        assert!(!net.contains("192.0.3.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
    }

    #[test]
    fn defaults_match_linkerd() {
        let config = Config::from_flags(&flags(&[])).unwrap();
        assert_eq!(
            (config.inbound_port, config.outbound_port, config.proxy_uid),
            (4143, 4140, 2102)
        );
        assert!(config.ipv6);
        assert_eq!(config.proxy_gid, None);
    }

    #[test]
    fn ipv6_flag_takes_linkerd_spelling() {
        assert!(!flags(&["--ipv6=false"]).ipv6);
        assert!(!flags(&["--ipv6", "false"]).ipv6);
        assert!(flags(&["--ipv6"]).ipv6);
    }

    #[test]
    fn refuses_root_proxy_and_v6_subnets_without_v6() {
        let err = Config::from_flags(&flags(&["--proxy-uid", "0"])).unwrap_err();
        assert!(err.to_string().contains("--proxy-uid 0"), "{err}");
        assert!(Config::from_flags(&flags(&["--proxy-gid", "0"])).is_err());
        assert!(
            Config::from_flags(&flags(&["--ipv6=false", "--subnets-to-ignore", "fd00::/8"]))
                .is_err()
        );
        assert!(Config::from_flags(&flags(&["--incoming-proxy-port", "0"])).is_err());
    }

    #[test]
    fn subnet_lists_accept_commas_and_mixed_families() {
        let f = flags(&[
            "--subnets-to-ignore",
            "10.0.0.0/8,fd00::/8",
            "--subnets-to-ignore",
            "10.0.0.0/8",
        ]);
        let config = Config::from_flags(&f).unwrap();
        assert_eq!(config.inbound_subnets_to_ignore.len(), 2);
    }

    #[test]
    fn subcommands_take_the_same_flags() {
        let cli = Cli::try_parse_from(["tandem-init", "cleanup", "--firewall", "iptables-legacy"])
            .unwrap();
        assert_eq!(cli.command, Some(Command::Cleanup));
        assert_eq!(cli.flags.firewall, Firewall::IptablesLegacy);
    }
}
