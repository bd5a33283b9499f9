//! Proving that inbound redirection works from inside the namespace itself.
//!
//! A connection opened inside the pod never passes the nat PREROUTING hook (its
//! conntrack entry is made in OUTPUT), so the probe arrives from "outside" instead: a
//! throw-away TUN interface into which we write a hand-made TCP SYN from a fake peer.
//! The kernel receives it like any inbound packet; if it answers with a SYN-ACK we
//! complete the handshake, and the connection must then appear on the inbound
//! listener with `SO_ORIGINAL_DST` equal to the address the fake peer dialled. The
//! interface disappears when its descriptor is closed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use socket2::{Domain, SockRef, Socket, Type};

/// Benchmarking range (RFC 2544): never a real peer, and a /30 of our own.
pub const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const RST: u8 = 0x04;

/// Returns `Ok(false)` when the namespace has no TUN support, so the caller can say the
/// inbound side was not checked rather than fail a correct pod.
pub fn check(inbound_port: u16, dialled_port: u16, timeout: Duration) -> anyhow::Result<bool> {
    let Ok(tun) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    else {
        return Ok(false);
    };
    let name = attach(&tun).context("cannot create the probe TUN interface")?;
    configure(&name).with_context(|| format!("cannot configure probe interface {name}"))?;
    let listener = listen(inbound_port)?;
    let dialled = SocketAddrV4::new(LOCAL, dialled_port);
    let mut tun = tun;

    // A fresh source port per run: a conntrack entry left by an earlier probe with the
    // same addresses would swallow the new SYN.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let peer_port = 20000 + ((nanos ^ std::process::id()) % 40000) as u16;
    let our_seq: u32 = 0x7a4d_0001;
    tun.write_all(&tcp_packet(
        PEER,
        LOCAL,
        peer_port,
        dialled_port,
        our_seq,
        0,
        SYN,
    ))
    .context("cannot send the probe SYN")?;
    let their_seq = await_syn_ack(&mut tun, dialled_port, timeout)?;
    tun.write_all(&tcp_packet(
        PEER,
        LOCAL,
        peer_port,
        dialled_port,
        our_seq.wrapping_add(1),
        their_seq.wrapping_add(1),
        ACK,
    ))
    .context("cannot send the probe ACK")?;

    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, SocketAddr::V4(from))) if *from.ip() == PEER => {
                let original = SockRef::from(&stream).original_dst()?.as_socket();
                if original != Some(SocketAddr::V4(dialled)) {
                    bail!("redirected inbound connection reports SO_ORIGINAL_DST {original:?}, expected {dialled}");
                }
                return Ok(true);
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
        if Instant::now() >= deadline {
            bail!("the inbound connection to {dialled} was accepted by the kernel but never reached port {inbound_port}: it was not redirected");
        }
    }
}

fn listen(port: u16) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr} (validate before the proxy starts)"))?;
    socket.listen(16)?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(socket.into())
}

fn await_syn_ack(tun: &mut File, dialled_port: u16, timeout: Duration) -> anyhow::Result<u32> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer to an inbound SYN for {LOCAL}:{dialled_port} within {timeout:?}");
        }
        let mut poll = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, bounded timeout.
        let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis().min(1000) as i32) };
        if ready <= 0 {
            continue;
        }
        let n = tun.read(&mut buf)?;
        let packet = &buf[..n];
        // Only IPv4 TCP addressed to our fake peer is an answer; the kernel also sends
        // unrelated packets (e.g. IPv6 router solicitations) out of a fresh interface.
        if n < 40 || packet[0] >> 4 != 4 || packet[9] != 6 || packet[16..20] != PEER.octets() {
            continue;
        }
        let tcp = &packet[usize::from(packet[0] & 0x0f) * 4..];
        let flags = tcp[13];
        if flags & RST != 0 {
            bail!("inbound connection to {LOCAL}:{dialled_port} was refused: it was not redirected to the inbound port");
        }
        if flags & (SYN | ACK) == SYN | ACK {
            return Ok(u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]));
        }
    }
}

fn attach(tun: &File) -> anyhow::Result<String> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"tdmprobe%d") {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and fills the ifreq we own.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8(name).map_err(|_| anyhow!("interface name is not UTF-8"))
}

fn configure(name: &str) -> anyhow::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    let fd = socket.as_raw_fd();
    let request =
        |code: libc::c_ulong, fill: &dyn Fn(&mut libc::ifreq)| -> anyhow::Result<libc::ifreq> {
            // SAFETY: ifreq is plain data; all-zero is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
                *dst = *src as libc::c_char;
            }
            fill(&mut req);
            // SAFETY: the interface ioctls read and write only the ifreq we own.
            if unsafe { libc::ioctl(fd, code as _, &mut req) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            Ok(req)
        };
    let sockaddr = |ip: Ipv4Addr| {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in fits in sockaddr and both are plain data.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    };
    request(libc::SIOCSIFADDR, &|r| {
        r.ifr_ifru.ifru_addr = sockaddr(LOCAL)
    })?;
    request(libc::SIOCSIFNETMASK, &|r| {
        r.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::new(255, 255, 255, 252))
    })?;
    let current = request(libc::SIOCGIFFLAGS, &|_| {})?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { current.ifr_ifru.ifru_flags } | libc::IFF_UP as libc::c_short;
    request(libc::SIOCSIFFLAGS, &|r| r.ifr_ifru.ifru_flags = flags)?;
    Ok(())
}

fn tcp_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());

    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let packet = tcp_packet(PEER, LOCAL, 1, 2, 3, 4, SYN);
        assert_eq!(checksum(&packet[..20]), 0);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&PEER.octets());
        pseudo.extend_from_slice(&LOCAL.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&packet[20..]);
        assert_eq!(checksum(&pseudo), 0);
    }
}
