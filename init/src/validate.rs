//! Proving with real connections that the rules redirect traffic: connect to a
//! sentinel address outside the pod and check that the connection lands on the
//! proxy's outbound port carrying the sentinel as its `SO_ORIGINAL_DST`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use socket2::{Domain, SockRef, Socket, Type};

use crate::config::Config;
use crate::exit::{fail, Classify, ExitClass, Outcome};
use crate::inbound_probe;
use crate::log;
use crate::rules::Family;

/// Documentation prefixes: never a real service, and in a pod reachable through the
/// default route, which matters because a destination without a route fails with
/// ENETUNREACH before the nat OUTPUT hook can redirect it.
const V4_SENTINELS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(192, 0, 2, 254),
    Ipv4Addr::new(198, 51, 100, 254),
    Ipv4Addr::new(203, 0, 113, 254),
];
const V6_SENTINELS: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfffe),
    Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0xfffe),
];
const SENTINEL_PORT: u16 = 1404;

pub fn run(config: &Config, timeout: Duration) -> Outcome<()> {
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == config.proxy_uid || Some(gid) == config.proxy_gid {
        // The proxy's own connections are exempt by design, so a probe from the
        // proxy's identity would prove nothing.
        return fail(
            ExitClass::BadFlags,
            anyhow!("cannot validate as uid {uid}/gid {gid}: the proxy's own traffic is never redirected"),
        );
    }
    let families: &[Family] = if config.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    let mut validated = Vec::new();
    for family in families {
        let Some(sentinel) = sentinel(*family, config) else {
            log::warn(&format!(
                "validation: no routable {} sentinel address in this namespace; {} not checked",
                family.name(),
                family.name()
            ));
            continue;
        };
        check_outbound(config.outbound_port, sentinel, timeout)
            .with_context(|| format!("validation failed for {}", family.name()))
            .class(ExitClass::ValidationFailed)?;
        log::info(&format!(
            "validation: {} connection to {sentinel} was redirected to port {} with SO_ORIGINAL_DST {sentinel}",
            family.name(),
            config.outbound_port
        ));
        validated.push(family.name());
    }
    check_inbound(config, timeout)?;
    if validated.is_empty() {
        return fail(
            ExitClass::ValidationFailed,
            anyhow!("validation failed: no address family has a route to a sentinel address"),
        );
    }
    Ok(())
}

/// The inbound side, IPv4 only: the probe interface is configured with the classic
/// ioctls, which have no IPv6 equivalent short of netlink.
fn check_inbound(config: &Config, timeout: Duration) -> Outcome<()> {
    let peer = IpAddr::V4(inbound_probe::PEER);
    if config
        .inbound_subnets_to_ignore
        .iter()
        .any(|c| c.contains(peer))
    {
        log::warn(&format!(
            "validation: inbound not checked: the probe source {peer} is in an ignored subnet"
        ));
        return Ok(());
    }
    let port = if config.ports_to_redirect.is_empty() {
        (SENTINEL_PORT..u16::MAX).find(|p| !config.inbound_ports_to_ignore.contains(*p))
    } else {
        config
            .ports_to_redirect
            .0
            .iter()
            .flat_map(|r| r.first..=r.last)
            .find(|p| !config.inbound_ports_to_ignore.contains(*p))
    };
    let Some(port) = port else {
        log::warn("validation: inbound not checked: every candidate port is ignored");
        return Ok(());
    };
    let dialled = SocketAddr::new(IpAddr::V4(inbound_probe::LOCAL), port);
    match inbound_probe::check(config.inbound_port, port, timeout)
        .context("validation failed for inbound IPv4")
        .class(ExitClass::ValidationFailed)?
    {
        true => log::info(&format!(
            "validation: inbound IPv4 connection to {dialled} was redirected to port {} with SO_ORIGINAL_DST {dialled}",
            config.inbound_port
        )),
        false => log::warn("validation: inbound not checked: /dev/net/tun is not available"),
    }
    Ok(())
}

/// The first sentinel that is routed out of the namespace (not local, not via `lo`)
/// and not exempted by the operator's own ignore lists.
fn sentinel(family: Family, config: &Config) -> Option<SocketAddr> {
    let candidates: Vec<IpAddr> = match family {
        Family::V4 => V4_SENTINELS.iter().map(|a| IpAddr::V4(*a)).collect(),
        Family::V6 => V6_SENTINELS.iter().map(|a| IpAddr::V6(*a)).collect(),
    };
    let port = (SENTINEL_PORT..u16::MAX).find(|p| !config.outbound_ports_to_ignore.contains(*p))?;
    candidates
        .into_iter()
        .filter(|ip| {
            !config
                .outbound_subnets_to_ignore
                .iter()
                .any(|c| c.contains(*ip))
        })
        .map(|ip| SocketAddr::new(ip, port))
        .find(|addr| routed_off_host(*addr))
}

/// A UDP `connect` performs the route lookup without sending anything.
fn routed_off_host(addr: SocketAddr) -> bool {
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let Ok(socket) = UdpSocket::bind(bind) else {
        return false;
    };
    if socket.connect(addr).is_err() {
        return false;
    }
    match socket.local_addr() {
        Ok(local) => !local.ip().is_loopback() && local.ip() != addr.ip(),
        Err(_) => false,
    }
}

fn check_outbound(proxy_port: u16, sentinel: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let loopback: IpAddr = match sentinel {
        SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    };
    let listen_at = SocketAddr::new(loopback, proxy_port);
    let listener = listen(listen_at).with_context(|| {
        format!("cannot listen on {listen_at} (validate before the proxy starts)")
    })?;
    let client = Socket::new(Domain::for_address(sentinel), Type::STREAM, None)?;
    client
        .connect_timeout(&sentinel.into(), timeout)
        .with_context(|| format!("connection to {sentinel} was not redirected to {listen_at}"))?;
    let client_addr = client
        .local_addr()?
        .as_socket()
        .ok_or_else(|| anyhow!("client socket has no IP address"))?;
    let accepted = accept_from(&listener, client_addr, timeout).with_context(|| {
        format!("connection to {sentinel} succeeded but did not arrive at {listen_at}: it was not redirected")
    })?;
    let sock = SockRef::from(&accepted);
    let original = match sentinel {
        SocketAddr::V4(_) => sock.original_dst(),
        SocketAddr::V6(_) => sock.original_dst_ipv6(),
    }
    .context("cannot read SO_ORIGINAL_DST")?
    .as_socket();
    if original != Some(sentinel) {
        bail!("redirected connection reports SO_ORIGINAL_DST {original:?}, expected {sentinel}");
    }
    Ok(())
}

fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(16)?;
    // accept(2) honours SO_RCVTIMEO, which bounds the wait without polling.
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(socket.into())
}

fn accept_from(
    listener: &TcpListener,
    peer: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, from)) if from == peer => return Ok(stream),
            // Someone else dialled the port; keep waiting for our own probe.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
        if std::time::Instant::now() >= deadline {
            bail!("nothing arrived within {timeout:?}");
        }
    }
}
