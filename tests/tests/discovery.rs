//! Discovery and balancing in a cluster's topology: a node that DNATs a Service's
//! address to its pods as kube-proxy does, a client pod that dials the Service,
//! meshed server pods with identities of their own, and the test control plane
//! (Linkerd's Destination and OutboundPolicies APIs) answering what each test tells
//! it at run time. Real proxies, real clients (curl, h2load, sockets).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tandem_tests::apps::{connect, read_all, read_some, send_and_finish};
use tandem_tests::cluster::Cluster;
use tandem_tests::control::{endpoint, pod_profile, service_policy, ControlPlane, Hint};
use tandem_tests::mesh::{env_refs, identity_of, TrustDomain};
use tandem_tests::probe::metric;
use tandem_tests::proxy::redirect;
use tandem_tests::world::*;
use tandem_tests::{wait_for, Pod, Proxy, PATIENCE};

/// 300 HTTP/1 requests over one client connection, then 300 HTTP/2 requests over
/// one, to a three-pod Service: the proxy balances them request by request, each
/// pod gets a fair share, and each pod is reached over mTLS with its own identity.
#[test]
fn requests_to_a_service_are_balanced_over_its_pods_each_with_its_identity() {
    let world = World::new(0);
    let (_servers, apps) = world.servers();
    world.describe_service(&[0, 1, 2]);
    let client = world.client_proxy(&[]);

    let bodies = curl_many(world.client(), "http://10.96.0.10/", 300);
    assert_eq!(bodies.lines().count(), 300, "every request answered");
    let http1 = counts(&apps);
    assert_eq!(http1.iter().sum::<usize>(), 300);
    // A fair share is 100; peak-EWMA follows each pod's latency, which a busy
    // machine makes uneven, so the bound only proves every pod takes a real share.
    for (name, count) in SERVERS.iter().zip(&http1) {
        assert!(*count >= 45, "{name} served {count} of 300: {http1:?}");
    }
    let text = client.metrics();
    // One client connection, balanced per request.
    let accepted = [("direction", "outbound"), ("peer", "src")];
    assert_eq!(
        metric(&text, "tcp_open_total", &accepted),
        Some(1.0),
        "{text}"
    );
    for (name, count) in SERVERS.iter().zip(&http1) {
        let identity = identity_of(name);
        let labels = [
            ("direction", "outbound"),
            ("tls", "true"),
            ("server_id", identity.as_str()),
            ("status_code", "200"),
        ];
        assert_eq!(
            metric(&text, "response_total", &labels),
            Some(*count as f64),
            "{name} over mTLS with its identity: {text}"
        );
    }

    reset(&apps);
    let out = world.client().must(
        "h2load",
        &["-n", "300", "-c", "1", "-m", "1", "http://10.96.0.10:80/"],
    );
    assert!(out.contains("300 succeeded"), "{out}");
    let http2 = counts(&apps);
    assert_eq!(http2.iter().sum::<usize>(), 300, "{http2:?}");
    for (name, count) in SERVERS.iter().zip(&http2) {
        assert!(
            *count >= 45,
            "{name} served {count} of 300 HTTP/2 requests: {http2:?}"
        );
    }
    let text = client.metrics();
    assert_eq!(
        metric(&text, "tcp_open_total", &accepted),
        Some(2.0),
        "{text}"
    );
    // The balancer's endpoints, with Linkerd's labels.
    let ready = [
        ("parent_kind", "Service"),
        ("parent_name", "web"),
        ("endpoint_state", "ready"),
    ];
    assert_eq!(
        metric(&text, "outbound_http_balancer_endpoints", &ready),
        Some(3.0),
        "{text}"
    );
    // dst_* labels come from the endpoints' metric labels.
    assert!(
        metric(&text, "response_total", &[("dst_pod", "web-b")]).unwrap_or(0.0) > 0.0,
        "{text}"
    );
    // Discovery asked what linkerd2-proxy asks.
    let calls = world.control.calls();
    assert!(
        calls.contains(&"watch 10.96.0.10:80".to_string()),
        "{calls:?}"
    );
    assert!(
        calls.contains(&"profile 10.96.0.10:80".to_string()),
        "{calls:?}"
    );
    assert!(calls.contains(&format!("get {PATH}")), "{calls:?}");
    assert!(world
        .control
        .workloads()
        .iter()
        .all(|w| w.contains("\"pod\":\"client\"")));
}

/// An endpoint that answers slowly gets clearly fewer requests than the others.
#[test]
fn a_slow_endpoint_gets_fewer_requests() {
    let world = World::new(0);
    let (_servers, apps) = world.servers();
    apps[2].delay_ms.store(100, Ordering::SeqCst);
    world.describe_service(&[0, 1, 2]);
    let _client = world.client_proxy(&[]);
    let out = world.client().must(
        "h2load",
        &["-n", "200", "-c", "2", "-m", "2", "http://10.96.0.10:80/"],
    );
    assert!(out.contains("200 succeeded"), "{out}");
    let served = counts(&apps);
    assert!(
        served[2] * 4 < served[0] && served[2] * 4 < served[1],
        "the slow endpoint should get clearly fewer: {served:?}"
    );
}

/// An endpoint the control plane removes gets no new request, while a long one it
/// is serving completes; an endpoint it adds starts receiving requests.
#[test]
fn removed_endpoints_finish_what_they_have_and_added_ones_take_new_requests() {
    let world = World::new(0);
    let (_servers, apps) = world.servers();
    // Only web-c at first, so the long request lands there.
    world.describe_service(&[2]);
    let client = world.client_proxy(&[]);
    let long = {
        let pod_name = world.client().name.clone();
        let cluster_pod = Pod {
            name: pod_name,
            ipv4: world.client().ipv4,
            ipv6: world.client().ipv6,
        };
        std::thread::spawn(move || {
            cluster_pod.must(
                "curl",
                &["-s", "--max-time", "60", "http://10.96.0.10/hold"],
            )
        })
    };
    wait_for("the long request to reach web-c", PATIENCE, || {
        (apps[2].requests.load(Ordering::SeqCst) == 1).then_some(())
    });
    // web-c goes; web-a and web-b come.
    world
        .control
        .set_endpoints(PATH, world.endpoints(&[0, 1], Hint::H2, APP_PORT));
    wait_for("the balancer to drop web-c", PATIENCE, || {
        let text = client.metrics();
        (metric(
            &text,
            "outbound_http_balancer_endpoints",
            &[("endpoint_state", "ready")],
        ) == Some(2.0))
        .then_some(())
    });
    let bodies = curl_many(world.client(), "http://10.96.0.10/", 60);
    assert_eq!(bodies.lines().count(), 60);
    assert_eq!(
        apps[2].requests.load(Ordering::SeqCst),
        1,
        "no new request to web-c"
    );
    assert!(
        counts(&apps)[..2].iter().all(|n| *n > 0),
        "{:?}",
        counts(&apps)
    );
    // The long request on the removed endpoint completes.
    apps[2].release.store(true, Ordering::SeqCst);
    assert_eq!(long.join().unwrap(), "web-c\n");

    // web-c comes back and gets requests again.
    world
        .control
        .set_endpoints(PATH, world.endpoints(&[0, 1, 2], Hint::H2, APP_PORT));
    wait_for("web-c to receive requests again", PATIENCE, || {
        curl_many(world.client(), "http://10.96.0.10/", 10);
        (apps[2].requests.load(Ordering::SeqCst) > 1).then_some(())
    });
}

/// An endpoint that refuses connections (no proxy, nothing listening) is backed off,
/// and requests go to the others without failing.
#[test]
fn an_endpoint_that_refuses_connections_is_avoided_without_failing_requests() {
    let world = World::new(1);
    let (_servers, apps) = world.servers();
    let dead = world.cluster.addr(4, APP_PORT);
    let mut endpoints = world.endpoints(&[0, 1], Hint::H2, APP_PORT);
    endpoints.push(endpoint(dead, Some(&identity_of("gone")), Hint::H2, "gone"));
    world
        .control
        .set_policy(vip(80), service_policy("web", 80, PATH, false));
    world.control.set_endpoints(PATH, endpoints);
    let client = world.client_proxy(&[]);
    let bodies = curl_many(world.client(), "http://10.96.0.10/", 100);
    assert_eq!(bodies.lines().count(), 100);
    assert!(
        bodies.lines().all(|b| b == "web-a" || b == "web-b"),
        "{bodies}"
    );
    assert_eq!(counts(&apps)[..2].iter().sum::<usize>(), 100);
    // Backed off: seen as pending while requests flow (between two backoffs, when
    // the endpoint is tried again, it can read as ready for a moment).
    let pending = [("endpoint_state", "pending")];
    wait_for(
        "the refusing endpoint to read as backed off",
        PATIENCE,
        || {
            let text = client.metrics();
            if metric(&text, "outbound_http_balancer_endpoints", &pending) == Some(1.0) {
                return Some(());
            }
            let bodies = curl_many(world.client(), "http://10.96.0.10/", 5);
            assert!(
                bodies.lines().all(|b| b == "web-a" || b == "web-b"),
                "{bodies}"
            );
            None
        },
    );
    let text = client.metrics();
    assert!(
        metric(
            &text,
            "outbound_tcp_errors_total",
            &[("error", "connect_refused")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
}

/// A TCP server in `pod` on `port` that greets first (when `banner`) or echoes,
/// counting its connections.
fn tcp_app(pod: &Pod, port: u16, name: &'static str, banner: bool) -> Arc<AtomicUsize> {
    let listener = pod
        .run(|| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))
        .expect("bind");
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                if banner {
                    let _ = stream.write_all(format!("220 {name} ready\r\n").as_bytes());
                }
                let mut buf = [0u8; 4096];
                loop {
                    match read_some(&mut stream, &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    connections
}

/// Opaque connections to the Service reach the pods through their proxies' inbound
/// port with a transport header (a Service VIP has no port 4143), server-first and
/// client-first protocols alike, counted under the real port on the server side.
#[test]
fn opaque_connections_to_a_service_reach_its_pods_through_their_proxies() {
    let world = World::new(0);
    let mut servers = Vec::new();
    let mut greeters = Vec::new();
    let mut echoes = Vec::new();
    for (i, name) in SERVERS.iter().enumerate() {
        let pod = world.cluster.pod(i + 1);
        let env = world.domain.identity_env(name, world.issuer());
        servers.push(Proxy::start(pod, &env_refs(&env)));
        greeters.push(tcp_app(pod, 2525, name, true));
        echoes.push(tcp_app(pod, 7000, name, false));
    }
    let banner_path = "mail.default.svc.cluster.local:25";
    let echo_path = "echo.default.svc.cluster.local:7000";
    world
        .cluster
        .service(VIP, 25, &[(1, 2525), (2, 2525), (3, 2525)]);
    world
        .control
        .set_policy(vip(25), service_policy("mail", 25, banner_path, true));
    world.control.set_endpoints(
        banner_path,
        world.endpoints(&[0, 1, 2], Hint::Opaque(4143), 2525),
    );
    world
        .control
        .set_policy(vip(7000), service_policy("echo", 7000, echo_path, true));
    world.control.set_endpoints(
        echo_path,
        world.endpoints(&[0, 1, 2], Hint::Opaque(4143), 7000),
    );
    let client = world.client_proxy(&[]);

    for _ in 0..9 {
        // Server-first: the greeting arrives before the client says anything.
        let mut conn = connect(world.client(), vip(25));
        let mut greeting = [0u8; 64];
        let n = read_some(&mut conn, &mut greeting).expect("greeting");
        let greeting = String::from_utf8_lossy(&greeting[..n]).to_string();
        assert!(greeting.starts_with("220 web-"), "{greeting}");
        send_and_finish(&mut conn, b"QUIT\r\n");
        assert_eq!(read_all(&mut conn), b"QUIT\r\n");
        // Client-first.
        let mut conn = connect(world.client(), vip(7000));
        send_and_finish(&mut conn, b"hello through the mesh");
        assert_eq!(read_all(&mut conn), b"hello through the mesh");
    }
    let greeted: usize = greeters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    let echoed: usize = echoes.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    assert_eq!((greeted, echoed), (9, 9));
    // Spread per connection over the pods.
    assert!(
        greeters
            .iter()
            .filter(|c| c.load(Ordering::SeqCst) > 0)
            .count()
            >= 2,
        "connections are balanced"
    );
    let text = client.metrics();
    let to_proxies = [
        ("direction", "outbound"),
        ("peer", "dst"),
        ("target_port", "4143"),
        ("tls", "true"),
    ];
    assert_eq!(
        metric(&text, "tcp_open_total", &to_proxies),
        Some(18.0),
        "{text}"
    );
    let mut inbound_total = 0.0;
    for server in &servers {
        let text = server.metrics();
        let real = |port| {
            metric(
                &text,
                "tcp_open_total",
                &[
                    ("direction", "inbound"),
                    ("peer", "src"),
                    ("tls", "true"),
                    ("target_port", port),
                ],
            )
            .unwrap_or(0.0)
        };
        inbound_total += real("2525") + real("7000");
        assert_eq!(
            metric(
                &text,
                "tcp_open_total",
                &[("direction", "inbound"), ("target_port", "4143")]
            ),
            None,
            "counted under the real port: {text}"
        );
    }
    assert_eq!(inbound_total, 18.0);
}

/// Failures of discovery: a Service without endpoints fails HTTP fast with 503 and
/// `l5d-proxy-error`; an address the control plane does not know is forwarded
/// unmeshed; an unreachable control plane at the first lookup gives 503 or a reset,
/// never plaintext.
#[test]
fn discovery_failures_fail_fast_and_unknown_addresses_go_unmeshed() {
    let world = World::new(1);
    let (_servers, _apps) = world.servers();
    // No endpoints: the destination controller sends nothing.
    world
        .control
        .set_policy(vip(80), service_policy("web", 80, PATH, false));
    let client =
        world.client_proxy(&[("LINKERD2_PROXY_OUTBOUND_HTTP_QUEUE_FAILFAST_TIMEOUT", "1s")]);
    let out = world.client().must(
        "curl",
        &[
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "30",
            "http://10.96.0.10/",
        ],
    );
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("l5d-proxy-error:"),
        "{out}"
    );

    // An address the control plane does not know: the policy API answers NotFound
    // and the profile names no endpoint. Forwarded unmeshed to the server in pod 4
    // (no proxy there).
    let unknown = world.cluster.addr(4, 9000);
    let echo = tcp_app(world.cluster.pod(4), 9000, "plain", false);
    let mut conn = connect(world.client(), unknown);
    send_and_finish(&mut conn, b"plain");
    assert_eq!(read_all(&mut conn), b"plain");
    assert_eq!(echo.load(Ordering::SeqCst), 1);
    let text = client.metrics();
    let plain = [
        ("direction", "outbound"),
        ("peer", "dst"),
        ("target_port", "9000"),
        ("tls", "no_identity"),
    ];
    assert_eq!(metric(&text, "tcp_open_total", &plain), Some(1.0), "{text}");

    // The control plane goes away before a destination was ever looked up.
    world.control.stop();
    let fresh = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 99), 80));
    let out = world.client().must(
        "curl",
        &[
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "30",
            "http://10.96.0.99/",
        ],
    );
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("control plane"), "{out}");
    let mut conn = connect(
        world.client(),
        SocketAddr::from((Ipv4Addr::new(10, 96, 0, 99), 7000)),
    );
    conn.write_all(b"must not go out in plaintext").unwrap();
    let mut buf = [0u8; 16];
    let read = conn.read(&mut buf);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a reset, not plaintext: {read:?}"
    );
    let text = client.metrics();
    assert!(
        metric(
            &text,
            "outbound_tcp_errors_total",
            &[("error", "discovery")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    let _ = fresh;
    world.control.restart(world.cluster.pod(0));
}

/// The control plane killed mid-run: traffic keeps flowing to the endpoints it
/// gave last; restarted, its updates reach the proxy again without a restart.
#[test]
fn the_last_endpoints_stay_while_the_control_plane_is_away() {
    let world = World::new(0);
    let (_servers, apps) = world.servers();
    world.describe_service(&[0, 1]);
    let client = world.client_proxy(&[]);
    let bodies = curl_many(world.client(), "http://10.96.0.10/", 20);
    assert_eq!(bodies.lines().count(), 20);

    world.control.stop();
    let bodies = curl_many(world.client(), "http://10.96.0.10/", 40);
    assert_eq!(
        bodies.lines().count(),
        40,
        "served while the control plane is away"
    );
    assert!(
        bodies.lines().all(|b| b == "web-a" || b == "web-b"),
        "{bodies}"
    );
    assert_eq!(apps[2].requests.load(Ordering::SeqCst), 0);

    // Back, with web-c added meanwhile.
    world
        .control
        .set_endpoints(PATH, world.endpoints(&[0, 1, 2], Hint::H2, APP_PORT));
    world.control.restart(world.cluster.pod(0));
    wait_for("web-c to receive requests", PATIENCE, || {
        curl_many(world.client(), "http://10.96.0.10/", 10);
        (apps[2].requests.load(Ordering::SeqCst) > 0).then_some(())
    });
    let text = client.metrics();
    assert!(
        metric(&text, "tandem_control_stream_errors_total", &[]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
}

/// A pod's own address: the policy API does not know it, the profile names the
/// pod as an endpoint; it is reached directly over mTLS.
#[test]
fn a_pod_address_is_reached_directly_over_mtls() {
    let world = World::new(0);
    let (servers, apps) = world.servers();
    let pod_addr = world.cluster.addr(1, APP_PORT);
    world.control.set_profile(
        pod_addr,
        pod_profile(endpoint(
            pod_addr,
            Some(&identity_of("web-a")),
            Hint::H2,
            "web-a",
        )),
    );
    let client = world.client_proxy(&[]);
    let url = format!("http://{pod_addr}/");
    let bodies = curl_many(world.client(), &url, 5);
    assert_eq!(bodies, "web-a\n".repeat(5));
    assert_eq!(apps[0].requests.load(Ordering::SeqCst), 5);
    let identity = identity_of("web-a");
    let text = client.metrics();
    assert_eq!(
        metric(
            &text,
            "response_total",
            &[
                ("direction", "outbound"),
                ("tls", "true"),
                ("server_id", identity.as_str())
            ]
        ),
        Some(5.0),
        "{text}"
    );
    let client_id = identity_of("client");
    servers[0].wait_metric(
        "request_total",
        &[("direction", "inbound"), ("client_id", client_id.as_str())],
        5.0,
    );
}

/// The control plane reached over mTLS: the proxy presents its own certificate and
/// requires the control plane's identity.
#[test]
fn control_plane_connections_are_mtls_with_the_proxy_identity() {
    let cluster = Cluster::new(2);
    for pod in &cluster.pods {
        redirect(pod);
    }
    let domain = TrustDomain::new();
    let _issuer = domain.start_issuer(&cluster.node, &[]);
    let name = "linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local";
    let (chain, key) = domain.leaf(name);
    let anchors = {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(domain.anchor_pem.as_bytes())
        {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(roots)
    };
    // As Linkerd's controllers: TLS 1.3, and the mesh's key exchanges.
    let provider = tandem_identity::tls::provider();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(anchors, provider.clone())
            .allow_unauthenticated()
            .build()
            .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let control_addr = cluster.node_addr(8086);
    let control = ControlPlane::start_with(&cluster.node, control_addr, Some(Arc::new(tls)));
    let server_addr = cluster.addr(1, APP_PORT);
    let server_env = domain.identity_env("web-a", cluster.node_addr(8080));
    let _server = Proxy::start(cluster.pod(1), &env_refs(&server_env));
    let app = web_app(cluster.pod(1), APP_PORT, "web-a");
    control.set_profile(
        server_addr,
        pod_profile(endpoint(
            server_addr,
            Some(&identity_of("web-a")),
            Hint::H2,
            "web-a",
        )),
    );
    let mut env = domain.identity_env("client", cluster.node_addr(8080));
    env.extend(control_env(&control_addr.to_string()));
    env.push(("LINKERD2_PROXY_DESTINATION_SVC_NAME".into(), name.into()));
    env.push(("LINKERD2_PROXY_POLICY_SVC_NAME".into(), name.into()));
    let _client = Proxy::start(cluster.pod(0), &env_refs(&env));
    let bodies = curl_many(cluster.pod(0), &format!("http://{server_addr}/"), 3);
    assert_eq!(bodies, "web-a\n".repeat(3));
    assert_eq!(app.requests.load(Ordering::SeqCst), 3);
    let identities = control.client_identities();
    assert!(!identities.is_empty());
    assert!(
        identities
            .iter()
            .all(|id| id.as_deref() == Some(identity_of("client").as_str())),
        "{identities:?}"
    );
}

/// The discovery file's `endpoints:` list balances the same way, without a control
/// plane.
#[test]
fn the_discovery_files_endpoints_are_balanced_too() {
    let world = World::new(0);
    let (_servers, apps) = world.servers();
    let mut file = String::from(
        "destinations:\n  - addr: 10.96.0.10\n    ports: 80\n    http2: true\n    labels: {service: web, namespace: default}\n    endpoints:\n",
    );
    for (i, name) in SERVERS.iter().enumerate() {
        file.push_str(&format!(
            "      - addr: {}\n        identity: {}\n        labels: {{pod: {name}}}\n",
            world.cluster.addr(i + 1, APP_PORT),
            identity_of(name)
        ));
    }
    let mut env = world.domain.identity_env("client", world.issuer());
    env.push(world.domain.discovery_file("client", &file));
    let client = Proxy::start(world.client(), &env_refs(&env));
    let bodies = curl_many(world.client(), "http://10.96.0.10/", 300);
    assert_eq!(bodies.lines().count(), 300);
    let served = counts(&apps);
    for (name, count) in SERVERS.iter().zip(&served) {
        assert!(*count >= 45, "{name} served {count} of 300: {served:?}");
    }
    let text = client.metrics();
    let per_pod: HashMap<&str, f64> = SERVERS
        .iter()
        .map(|name| {
            let value = metric(
                &text,
                "response_total",
                &[("dst_pod", *name), ("dst_service", "web"), ("tls", "true")],
            )
            .unwrap_or(0.0);
            (*name, value)
        })
        .collect();
    assert!(per_pod.values().all(|v| *v >= 60.0), "{per_pod:?}: {text}");
}

/// Narrows the policy's HTTP routes to paths under `prefix`, as an HTTPRoute with a
/// path match would.
fn only_under(policy: &mut linkerd2_proxy_api::outbound::OutboundPolicy, prefix: &str) {
    use linkerd2_proxy_api::http_route::{path_match, PathMatch};
    use linkerd2_proxy_api::outbound::proxy_protocol::Kind;
    let Some(Kind::Detect(detect)) = policy.protocol.as_mut().and_then(|p| p.kind.as_mut()) else {
        panic!("a Service policy detects its protocol");
    };
    let http1 = detect.http1.as_mut().map(|h| &mut h.routes);
    let http2 = detect.http2.as_mut().map(|h| &mut h.routes);
    for routes in [http1, http2].into_iter().flatten() {
        for rule in routes.iter_mut().flat_map(|route| &mut route.rules) {
            for matched in &mut rule.matches {
                matched.path = Some(PathMatch {
                    kind: Some(path_match::Kind::Prefix(prefix.into())),
                });
            }
        }
    }
}

/// A Service whose only route takes `/api`: requests under it reach the pods, any
/// other is answered 404 by the client-side proxy (Linkerd's "no route") and never
/// leaves the pod; HTTP/1 and HTTP/2 alike.
#[test]
fn a_request_no_route_takes_is_refused_with_404() {
    tandem_tests::require_root();
    let world = World::new(0);
    let (_server_proxies, apps) = world.servers();
    let mut policy = service_policy("web", 80, PATH, false);
    only_under(&mut policy, "/api");
    world.control.set_policy(vip(80), policy);
    world
        .control
        .set_endpoints(PATH, world.endpoints(&[0, 1, 2], Hint::H2, APP_PORT));
    let _client = world.client_proxy(&[]);

    for http in ["--http1.1", "--http2-prior-knowledge"] {
        reset(&apps);
        let status = |path: &str| {
            let url = format!("http://{VIP}/{path}");
            let args = [
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "60",
                http,
                &url,
            ];
            world.client().must("curl", &args)
        };
        assert_eq!(status("api/users"), "200", "{http}");
        assert_eq!(status("api"), "200", "{http}");
        assert_eq!(status("other"), "404", "{http}");
        assert_eq!(status("apis"), "404", "{http}: a prefix ends on a segment");
        assert_eq!(
            counts(&apps).iter().sum::<usize>(),
            2,
            "{http}: only the routed requests reach the pods"
        );
    }
}
