//! `tandem-init` in real network namespaces with real traffic, for every backend.
//!
//! Pod 1 is the meshed pod: tandem-init programs its namespace (entering it with
//! `--netns`, as a CNI plugin would), and plain listeners stand in for the proxy
//! (outbound on loopback :4140, inbound on the wildcard :4143, which REDIRECT needs)
//! and for the app. Pod 2 is a peer with its own servers. Every server answers with
//! its name and the `SO_ORIGINAL_DST` of the connection, so each assertion shows both
//! where a connection landed and which address the client dialled.
//!
//! Needs root and `cargo build -p tandem-init` first.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::Output;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tandem_tests::{bin_path, Mesh, Pod, PROXY_UID};

const OUTBOUND_PORT: u16 = 4140;
const INBOUND_PORT: u16 = 4143;
const APP_PORT: u16 = 8080;
/// A second address on the peer, used as the ignored subnet in both directions.
const PEER_EXTRA_V4: &str = "192.0.2.102";
const PEER_EXTRA_V6: &str = "2001:db8::102";

const BACKENDS: [&str; 3] = ["nft", "iptables-nft", "iptables-legacy"];

fn netns_path(pod: &Pod) -> String {
    format!("/var/run/netns/{}", pod.name)
}

/// Runs tandem-init from the test's own namespace, pointing it at `pod`.
fn tandem_init(pod: &Pod, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(bin_path("tandem-init"));
    cmd.args(args).arg("--netns").arg(netns_path(pod));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tandem-init")
}

fn tandem_init_ok(pod: &Pod, args: &[&str]) -> Output {
    let out = tandem_init(pod, args, &[]);
    assert!(
        out.status.success(),
        "tandem-init {} failed ({:?}): {}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts a server in `pod` that answers every connection with "`tag` `orig-dst`".
fn serve(pod: &Pod, addr: SocketAddr, tag: &'static str) {
    let listener: TcpListener = pod.run(move || {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        if addr.is_ipv6() {
            // So that the IPv4 and IPv6 wildcard listeners can share a port.
            socket.set_only_v6(true).unwrap();
        }
        socket.set_reuse_address(true).unwrap();
        socket
            .bind(&addr.into())
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        socket.listen(64).unwrap();
        socket.into()
    });
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let sock = SockRef::from(&stream);
            let orig = if addr.is_ipv6() {
                sock.original_dst_ipv6()
            } else {
                sock.original_dst()
            };
            // Without conntrack in the namespace (the peer has no NAT rules) there is no
            // original destination; the connection then was not rewritten, so the local
            // address is the dialled one. A redirected connection can never pass this
            // way: its local address is the proxy's port, not the dialled one.
            let orig = orig
                .ok()
                .and_then(|a| a.as_socket())
                .or_else(|| stream.local_addr().ok());
            let orig = orig.map_or("none".to_string(), |a| a.to_string());
            use std::io::Write;
            let _ = write!(stream, "{tag} {orig}");
        }
    });
}

/// Dials `target` from inside `pod` and returns the server's answer, or the error.
/// `as_uid` switches only the dialling thread's credentials: the raw syscall is
/// per-thread on Linux (unlike glibc's setresuid, which changes every thread).
fn dial(pod: &Pod, target: SocketAddr, as_uid: Option<u32>, from: Option<IpAddr>) -> String {
    pod.run(move || {
        if let Some(uid) = as_uid {
            // SAFETY: changes the credentials of this short-lived thread only.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
            assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
        }
        let socket = Socket::new(Domain::for_address(target), Type::STREAM, None).unwrap();
        if let Some(from) = from {
            socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
        }
        if let Err(e) = socket.connect_timeout(&target.into(), Duration::from_secs(5)) {
            return format!("connect error: {e}");
        }
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = String::new();
        let mut stream: std::net::TcpStream = socket.into();
        match stream.read_to_string(&mut answer) {
            Ok(_) => answer,
            Err(e) => format!("read error: {e}"),
        }
    })
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn loopback(v6: bool) -> IpAddr {
    if v6 {
        "::1".parse().unwrap()
    } else {
        "127.0.0.1".parse().unwrap()
    }
}

fn wildcard(v6: bool) -> IpAddr {
    if v6 {
        "::".parse().unwrap()
    } else {
        "0.0.0.0".parse().unwrap()
    }
}

fn ports(list: impl Iterator<Item = u16>) -> String {
    list.map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

/// Everything Tandem-relevant a backend holds, without timestamps, for comparisons.
fn snapshot(pod: &Pod, firewall: &str) -> String {
    let tools: &[&str] = match firewall {
        "nft" => return pod.must("nft", &["list", "ruleset"]),
        "iptables-nft" => &["iptables-nft-save", "ip6tables-nft-save"],
        "iptables-legacy" => &["iptables-legacy-save", "ip6tables-legacy-save"],
        other => panic!("unknown backend {other}"),
    };
    tools
        .iter()
        .map(|tool| pod.must(tool, &[]))
        .flat_map(|text| {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Installs a rule that is not Tandem's, so "prior state" is not just "empty".
fn add_foreign_rule(pod: &Pod, firewall: &str) {
    match firewall {
        "nft" => {
            pod.must("nft", &["add", "table", "ip", "operator"]);
            pod.must(
                "nft",
                &[
                    "add",
                    "chain",
                    "ip",
                    "operator",
                    "out",
                    "{ type nat hook output priority 0; }",
                ],
            );
            pod.must(
                "nft",
                &[
                    "add", "rule", "ip", "operator", "out", "udp", "dport", "9", "return",
                ],
            );
        }
        flavour => {
            for base in ["iptables", "ip6tables"] {
                let tool = format!("{base}-{}", flavour.trim_start_matches("iptables-"));
                pod.must(
                    &tool,
                    &[
                        "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "RETURN",
                    ],
                );
            }
        }
    }
}

fn redirection_scenario(firewall: &str) {
    let mesh = Mesh::new(2);
    let (app, peer) = (mesh.pod(0), mesh.pod(1));
    peer.must(
        "ip",
        &[
            "addr",
            "add",
            &format!("{PEER_EXTRA_V4}/24"),
            "dev",
            "veth0",
        ],
    );
    peer.must(
        "ip",
        &[
            "addr",
            "add",
            &format!("{PEER_EXTRA_V6}/64"),
            "dev",
            "veth0",
            "nodad",
        ],
    );

    // 21 single ports plus a range: more than xt_multiport's 15 per rule.
    let inbound_ignored = format!("{},6000-6010", ports((5000..=5040).step_by(2)));
    let outbound_ignored = format!("{},8000-8010", ports((7000..=7040).step_by(2)));
    let subnets = format!("{PEER_EXTRA_V4}/32,{PEER_EXTRA_V6}/128");
    tandem_init_ok(
        app,
        &[
            "--firewall",
            firewall,
            "--inbound-ports-to-ignore",
            &inbound_ignored,
            "--outbound-ports-to-ignore",
            &outbound_ignored,
            "--subnets-to-ignore",
            &subnets,
            "--outbound-subnets-to-ignore",
            &subnets,
        ],
    );

    for v6 in [false, true] {
        let any = wildcard(v6);
        let app_ip = app.ip_like(any);
        let peer_ip = peer.ip_like(any);
        let peer_extra: IpAddr = if v6 {
            PEER_EXTRA_V6.parse().unwrap()
        } else {
            PEER_EXTRA_V4.parse().unwrap()
        };
        serve(app, sa(loopback(v6), OUTBOUND_PORT), "outbound-proxy");
        serve(app, sa(any, INBOUND_PORT), "inbound-proxy");
        for port in [APP_PORT, 5040, 6005, 5041] {
            serve(app, sa(any, port), "app");
        }
        for port in [APP_PORT, 7040, 8005] {
            serve(peer, sa(any, port), "peer");
        }
        let family = if v6 { "IPv6" } else { "IPv4" };
        let check = |what: &str, got: String, want: String| {
            assert_eq!(got, want, "{firewall} {family}: {what}");
        };

        let to_peer = sa(peer_ip, APP_PORT);
        check(
            "outbound is redirected",
            dial(app, to_peer, None, None),
            format!("outbound-proxy {to_peer}"),
        );
        check(
            "an app uid is redirected",
            dial(app, to_peer, Some(65534), None),
            format!("outbound-proxy {to_peer}"),
        );
        check(
            "the proxy uid is not redirected",
            dial(app, to_peer, Some(PROXY_UID), None),
            format!("peer {to_peer}"),
        );
        let lo = sa(loopback(v6), APP_PORT);
        check(
            "loopback is not redirected",
            dial(app, lo, None, None),
            format!("app {lo}"),
        );
        let own = sa(app_ip, APP_PORT);
        check(
            "the pod's own address is not redirected",
            dial(app, own, None, None),
            format!("app {own}"),
        );
        for port in [7040, 8005] {
            let to = sa(peer_ip, port);
            check(
                "an ignored outbound port is not redirected",
                dial(app, to, None, None),
                format!("peer {to}"),
            );
        }
        let to = sa(peer_ip, 7041);
        check(
            "a port next to ignored ones is redirected",
            dial(app, to, None, None),
            format!("outbound-proxy {to}"),
        );
        let to = sa(peer_extra, APP_PORT);
        check(
            "an ignored outbound subnet is not redirected",
            dial(app, to, None, None),
            format!("peer {to}"),
        );

        // The peer's own address, explicitly: with a second address on its link the
        // kernel may pick that one (the ignored subnet) as the source.
        let from_peer = Some(peer_ip);
        let to_app = sa(app_ip, APP_PORT);
        check(
            "inbound is redirected",
            dial(peer, to_app, None, from_peer),
            format!("inbound-proxy {to_app}"),
        );
        for port in [5040, 6005] {
            let to = sa(app_ip, port);
            check(
                "an ignored inbound port is not redirected",
                dial(peer, to, None, from_peer),
                format!("app {to}"),
            );
        }
        let to = sa(app_ip, 5041);
        check(
            "a port next to ignored ones is redirected",
            dial(peer, to, None, from_peer),
            format!("inbound-proxy {to}"),
        );
        check(
            "an ignored inbound source subnet is not redirected",
            dial(peer, to_app, None, Some(peer_extra)),
            format!("app {to_app}"),
        );
    }
}

#[test]
fn nft_redirects_as_configured() {
    redirection_scenario("nft");
}

#[test]
fn iptables_nft_redirects_as_configured() {
    redirection_scenario("iptables-nft");
}

#[test]
fn iptables_legacy_redirects_as_configured() {
    redirection_scenario("iptables-legacy");
}

#[test]
fn rerun_converges_and_cleanup_restores_prior_state() {
    for firewall in BACKENDS {
        let mesh = Mesh::new(1);
        let pod = mesh.pod(0);
        add_foreign_rule(pod, firewall);
        let before = snapshot(pod, firewall);
        let args = [
            "--firewall",
            firewall,
            "--outbound-ports-to-ignore",
            "443,25000-25100",
        ];
        tandem_init_ok(pod, &args);
        let once = snapshot(pod, firewall);
        assert_ne!(once, before, "{firewall}: apply changed nothing");
        assert!(
            once.contains("tandem/redirect-outbound-to-proxy"),
            "{firewall}: {once}"
        );
        tandem_init_ok(pod, &args);
        tandem_init_ok(pod, &args);
        let thrice = snapshot(pod, firewall);
        assert_eq!(thrice, once, "{firewall}: re-running changed the rule set");
        if firewall != "nft" {
            assert_eq!(
                thrice.matches("-j TANDEM_OUTBOUND").count(),
                2,
                "{firewall}: one jump per family\n{thrice}"
            );
        }
        tandem_init_ok(pod, &["cleanup", "--firewall", firewall]);
        assert_eq!(
            snapshot(pod, firewall),
            before,
            "{firewall}: cleanup left something behind"
        );
        // A second cleanup finds nothing and still succeeds, as a CNI DEL retried would.
        tandem_init_ok(pod, &["cleanup"]);
        assert_eq!(
            snapshot(pod, firewall),
            before,
            "{firewall}: second cleanup changed state"
        );
    }
}

#[test]
fn a_payload_failing_part_way_applies_nothing() {
    for firewall in BACKENDS {
        let bad_line = if firewall == "nft" {
            "add rule inet tandem output tcp dport 70000 return"
        } else {
            "-A TANDEM_OUTBOUND -p tcp --dport 70000 -j RETURN"
        };
        let mesh = Mesh::new(1);
        let pod = mesh.pod(0);
        add_foreign_rule(pod, firewall);
        let before = snapshot(pod, firewall);
        let out = tandem_init(
            pod,
            &["--firewall", firewall],
            &[("TANDEM_INIT_TEST_EXTRA_LINE", bad_line)],
        );
        assert_eq!(
            out.status.code(),
            Some(4),
            "{firewall}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("");
        assert!(
            last.starts_with("tandem-init: cannot apply rules"),
            "{firewall}: {stderr}"
        );
        assert_eq!(
            snapshot(pod, firewall),
            before,
            "{firewall}: a failed apply left rules behind"
        );

        // A failed re-apply keeps the previous good rules rather than a mixture.
        tandem_init_ok(pod, &["--firewall", firewall]);
        let good = snapshot(pod, firewall);
        let out = tandem_init(
            pod,
            &["--firewall", firewall, "--outbound-ports-to-ignore", "443"],
            &[("TANDEM_INIT_TEST_EXTRA_LINE", bad_line)],
        );
        assert_eq!(out.status.code(), Some(4), "{firewall}");
        assert_eq!(
            snapshot(pod, firewall),
            good,
            "{firewall}: a failed re-apply changed the rules"
        );
    }
}

#[test]
fn dry_run_changes_nothing_and_prints_the_payload() {
    for firewall in BACKENDS {
        let mesh = Mesh::new(1);
        let pod = mesh.pod(0);
        add_foreign_rule(pod, firewall);
        let before = snapshot(pod, firewall);
        let out = tandem_init_ok(pod, &["--dry-run", "--firewall", firewall]);
        let printed = String::from_utf8_lossy(&out.stdout);
        let marker = if firewall == "nft" {
            "table inet tandem {"
        } else {
            "-A OUTPUT -m comment --comment \"tandem/install-outbound\""
        };
        assert!(printed.contains(marker), "{firewall}: {printed}");
        assert_eq!(
            snapshot(pod, firewall),
            before,
            "{firewall}: --dry-run changed the rules"
        );
        // After a real apply, a dry-run cleanup prints the removal and removes nothing.
        tandem_init_ok(pod, &["--firewall", firewall]);
        let applied = snapshot(pod, firewall);
        let out = tandem_init_ok(pod, &["cleanup", "--dry-run", "--firewall", firewall]);
        assert!(
            !out.stdout.is_empty(),
            "{firewall}: dry-run cleanup printed nothing"
        );
        assert_eq!(
            snapshot(pod, firewall),
            applied,
            "{firewall}: dry-run cleanup removed rules"
        );
    }
}

#[test]
fn validate_passes_with_rules_and_fails_without() {
    for firewall in BACKENDS {
        let mesh = Mesh::new(2);
        let pod = mesh.pod(0);
        let fast = ["--validate-timeout-ms", "1500"];
        let out = tandem_init(pod, &[&["validate"][..], &fast].concat(), &[]);
        assert_eq!(
            out.status.code(),
            Some(95),
            "{firewall} without rules: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("validation failed"));

        let out = tandem_init_ok(
            pod,
            &[&["--firewall", firewall, "--validate"][..], &fast].concat(),
        );
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            log.contains("IPv4 connection to 192.0.2.254:1404 was redirected"),
            "{firewall}: {log}"
        );
        assert!(
            log.contains("IPv6 connection to [2001:db8::fffe]:1404 was redirected"),
            "{firewall}: {log}"
        );
        tandem_init_ok(pod, &[&["validate"][..], &fast].concat());

        tandem_init_ok(pod, &["cleanup"]);
        let out = tandem_init(pod, &[&["validate"][..], &fast].concat(), &[]);
        assert_eq!(out.status.code(), Some(95), "{firewall} after cleanup");
    }
}

#[test]
fn auto_uses_legacy_when_the_namespace_already_has_legacy_rules() {
    let mesh = Mesh::new(1);
    let pod = mesh.pod(0);
    let out = tandem_init_ok(pod, &["--dry-run"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("firewall backend nft:"));

    pod.must(
        "iptables-legacy",
        &[
            "-t", "filter", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT",
        ],
    );
    let out = tandem_init_ok(pod, &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("firewall backend iptables-legacy: the namespace already holds legacy"),
        "{log}"
    );
    assert!(pod
        .must("iptables-legacy-save", &[])
        .contains("TANDEM_OUTBOUND"));
    assert!(!pod.must("nft", &["list", "ruleset"]).contains("tandem"));
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    let mesh = Mesh::new(1);
    let pod = mesh.pod(0);
    for args in [
        &["--proxy-uid", "0"][..],
        &["--inbound-ports-to-ignore", "80,70000"],
        &["--firewall", "pf"],
    ] {
        let out = tandem_init(pod, args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("tandem-init: "), "{stderr}");
    }
    assert_eq!(
        snapshot(pod, "nft"),
        "",
        "bad flags must not touch the namespace"
    );
}

/// Host mode on a host that also forwards (a VM with containers, a router): a
/// connection addressed to the host goes to the proxy, one the host only forwards
/// reaches its destination untouched, and SSH stays direct. Pod 2 is the host; it
/// routes 198.51.100.3 (on pod 3's loopback) for pod 1. tandem-init runs inside the
/// host's namespace without `--netns`, as on a real host.
fn host_mode_scenario(firewall: &str) {
    let mesh = Mesh::new(3);
    let (client, host, server) = (mesh.pod(0), mesh.pod(1), mesh.pod(2));
    let behind: IpAddr = "198.51.100.3".parse().unwrap();
    server.must("ip", &["addr", "add", "198.51.100.3/32", "dev", "lo"]);
    let via_host = host.ipv4.to_string();
    client.must("ip", &["route", "add", "198.51.100.3/32", "via", &via_host]);
    server.must(
        "ip",
        &[
            "route",
            "add",
            &format!("{}/32", client.ipv4),
            "via",
            &via_host,
        ],
    );
    host.must(
        "ip",
        &[
            "route",
            "add",
            "198.51.100.3/32",
            "via",
            &server.ipv4.to_string(),
        ],
    );
    host.must("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);

    let uid = PROXY_UID.to_string();
    let init = bin_path("tandem-init");
    host.must(
        &init.to_string_lossy(),
        &[
            "--host",
            "--proxy-uid",
            &uid,
            "--firewall",
            firewall,
            "--ipv6=false",
        ],
    );
    serve(host, sa(wildcard(false), INBOUND_PORT), "proxy");
    serve(host, sa(wildcard(false), 22), "sshd");
    serve(server, sa(behind, APP_PORT), "behind");

    let to_host = sa(IpAddr::V4(host.ipv4), APP_PORT);
    assert_eq!(
        dial(client, to_host, None, None),
        format!("proxy {to_host}"),
        "{firewall}: a connection to the host is redirected"
    );
    let forwarded = sa(behind, APP_PORT);
    assert_eq!(
        dial(client, forwarded, None, None),
        format!("behind {forwarded}"),
        "{firewall}: a forwarded connection is left alone"
    );
    let ssh = sa(IpAddr::V4(host.ipv4), 22);
    assert_eq!(
        dial(client, ssh, None, None),
        format!("sshd {ssh}"),
        "{firewall}: SSH stays direct"
    );
}

#[test]
fn host_mode_redirects_only_what_is_addressed_to_the_host() {
    for firewall in BACKENDS {
        host_mode_scenario(firewall);
    }
}
