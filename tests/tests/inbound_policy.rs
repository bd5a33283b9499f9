//! The inbound policy of a pod's ports from Linkerd's policy controller
//! (`InboundServerPolicies.WatchPort`, served by the test control plane on the
//! server pod's loopback): which clients may connect and which requests are
//! allowed, as linkerd2-proxy enforces it. Alpha is a meshed client (it knows beta
//! from its discovery file), pod 2 an unmeshed one; beta's proxy is under the
//! control plane with `LINKERD2_PROXY_INBOUND_PORTS`.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use tandem_tests::apps::{connect, http_app, read_all, send_and_finish};
use tandem_tests::control::{authz, server, Admit, ControlPlane, ServerProtocol};
use tandem_tests::mesh::{env_refs, identity_of, MeshedPair};
use tandem_tests::probe::metric;
use tandem_tests::{wait_for, Pod, Proxy, PATIENCE};

const CONTROL: &str = "127.0.0.1:8090";
const WEB: u16 = 8080;
/// Opaque by Linkerd's defaults on both sides.
const DB: u16 = 3306;

/// An HTTP server (HTTP/1 and HTTP/2) answering `ok` on every path, counting requests.
fn web_app(pod: &Pod, port: u16) -> Arc<AtomicUsize> {
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    http_app(pod, port, move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Bytes::from_static(b"ok\n")
    });
    requests
}

/// An echo server counting the connections it accepted.
fn echo_app(pod: &Pod, port: u16) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let listener = pod
        .run(|| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))
        .expect("bind the echo server");
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = std::io::Read::read(&mut conn, &mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    accepted
}

/// Sends `data` and reads until the connection ends (a reset ends it too): what
/// came back.
fn exchange(pod: &Pod, addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut conn = connect(pod, addr);
    let _ = conn.write_all(data);
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut back = Vec::new();
    let _ = std::io::Read::read_to_end(&mut conn, &mut back);
    back
}

/// Beta's proxy under the control plane, watching `ports` from start-up.
fn beta_proxy<'a>(pair: &'a MeshedPair, ports: &str, extra: &[(&str, &str)]) -> Proxy<'a> {
    let mut settings = vec![
        ("LINKERD2_PROXY_DESTINATION_SVC_ADDR", CONTROL),
        ("LINKERD2_PROXY_POLICY_SVC_ADDR", CONTROL),
        (
            "LINKERD2_PROXY_POLICY_WORKLOAD",
            "{\"ns\":\"default\",\"pod\":\"beta\"}",
        ),
        ("LINKERD2_PROXY_INBOUND_PORTS", ports),
        ("LINKERD2_PROXY_OUTBOUND_CONNECT_EXP_BACKOFF_MAX", "1s"),
    ];
    settings.extend_from_slice(extra);
    let env = pair.env(1, true, &settings);
    Proxy::start(pair.b(), &env_refs(&env))
}

/// `curl` from `pod`: the status code and the `l5d-proxy-error` header, if any.
fn status_of(pod: &Pod, url: &str) -> (String, Option<String>) {
    let out = pod.must(
        "curl",
        &["-s", "-D", "-", "-o", "/dev/null", "--max-time", "30", url],
    );
    let status = out
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string();
    let error = out.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("l5d-proxy-error")
            .then(|| value.trim().to_string())
    });
    (status, error)
}

/// HTTP: the server lets in only alpha's identity; a probe route lets anyone reach
/// `/ready`. Alpha is served; the unmeshed client is refused with 403 except on
/// `/ready`; each decision is counted under Linkerd's
/// names and the server's, route's and authorization's names. A new policy applies
/// to the next request.
#[test]
fn requests_are_authorized_by_the_ports_policy() {
    let pair = MeshedPair::new();
    let _issuer = pair.start_issuer(&[]);
    let control = ControlPlane::start(pair.b(), CONTROL.parse().unwrap());
    let alpha_id = identity_of("alpha");
    control.set_server(
        WEB,
        server(
            "web-http",
            ServerProtocol::Detect(vec![(
                "probe".into(),
                "/ready".into(),
                vec![authz("probe", &["0.0.0.0/0"], Admit::Anyone)],
            )]),
            vec![authz(
                "alpha-only",
                &["0.0.0.0/0", "::/0"],
                Admit::Identities(vec![alpha_id.clone()]),
            )],
        ),
    );
    let requests = web_app(pair.b(), WEB);
    let beta = beta_proxy(&pair, &WEB.to_string(), &[]);
    // The listed port is watched from start-up, before any connection to it.
    wait_for("beta watches its port", PATIENCE, || {
        control
            .calls()
            .contains(&format!("watch-port {WEB}"))
            .then_some(())
    });
    let alpha_env = pair.env(0, true, &[]);
    let _alpha = Proxy::start(pair.a(), &env_refs(&alpha_env));

    let url = format!("http://{}/", pair.b_addr(WEB));
    let unmeshed = pair.mesh.pod(2);
    // The policy reaches beta's proxy on its own time; until then the default
    // (all-unauthenticated) lets everyone in.
    let (status, error) = wait_for("the policy refuses the unmeshed client", PATIENCE, || {
        let (status, error) = status_of(unmeshed, &url);
        (status == "403").then_some((status, error))
    });
    assert_eq!(status, "403");
    // As linkerd2-proxy: the inbound side explains its refusals to meshed clients'
    // proxies only.
    assert_eq!(error, None);
    let served_before = requests.load(Ordering::SeqCst);
    let (status, _) = status_of(unmeshed, &url);
    assert_eq!(status, "403");
    assert_eq!(
        requests.load(Ordering::SeqCst),
        served_before,
        "a refused request never reaches the application"
    );
    let ready = format!("http://{}/ready", pair.b_addr(WEB));
    assert_eq!(
        status_of(unmeshed, &ready).0,
        "200",
        "the probe route is open"
    );
    assert_eq!(status_of(pair.a(), &url).0, "200", "alpha is authorized");

    let text = beta.metrics();
    let web = [
        ("srv_name", "web-http"),
        ("srv_kind", "server"),
        ("target_port", "8080"),
    ];
    let allowed_alpha = [
        &web[..],
        &[
            ("route_name", "default"),
            ("authz_name", "alpha-only"),
            ("authz_kind", "authorizationpolicy"),
            ("tls", "true"),
            ("client_id", alpha_id.as_str()),
        ],
    ]
    .concat();
    assert_eq!(
        metric(&text, "inbound_http_authz_allow_total", &allowed_alpha),
        Some(1.0),
        "{text}"
    );
    let probe = [
        &web[..],
        &[
            ("route_name", "probe"),
            ("authz_name", "probe"),
            ("tls", "no_identity"),
        ],
    ]
    .concat();
    assert_eq!(
        metric(&text, "inbound_http_authz_allow_total", &probe),
        Some(1.0),
        "{text}"
    );
    let denied = [
        &web[..],
        &[("route_name", "default"), ("tls", "no_identity")],
    ]
    .concat();
    assert!(
        metric(&text, "inbound_http_authz_deny_total", &denied).is_some_and(|n| n >= 2.0),
        "{text}"
    );

    // Opened to everyone: the next request passes.
    control.set_server(
        WEB,
        server(
            "web-http",
            ServerProtocol::Detect(vec![]),
            vec![authz("everyone", &["0.0.0.0/0"], Admit::Anyone)],
        ),
    );
    wait_for(
        "the new policy lets the unmeshed client in",
        PATIENCE,
        || (status_of(unmeshed, &url).0 == "200").then_some(()),
    );
}

/// An opaque port that admits meshed clients only: alpha's connection (through
/// beta's inbound port with the transport header) reaches the application and is
/// counted as allowed under the real port; the unmeshed client's connection is
/// closed without a byte and never reaches the application.
#[test]
fn an_opaque_port_admits_meshed_clients_and_closes_on_the_others() {
    let pair = MeshedPair::new();
    let _issuer = pair.start_issuer(&[]);
    let control = ControlPlane::start(pair.b(), CONTROL.parse().unwrap());
    control.set_server(
        DB,
        server(
            "db",
            ServerProtocol::Opaque,
            vec![authz("meshed", &["0.0.0.0/0"], Admit::Meshed)],
        ),
    );
    let accepted = echo_app(pair.b(), DB);
    let beta = beta_proxy(&pair, &DB.to_string(), &[]);
    wait_for("beta watches its port", PATIENCE, || {
        control
            .calls()
            .contains(&format!("watch-port {DB}"))
            .then_some(())
    });
    let alpha_env = pair.env(0, true, &[]);
    let _alpha = Proxy::start(pair.a(), &env_refs(&alpha_env));

    let unmeshed = pair.mesh.pod(2);
    // Until the policy arrives the default lets everyone in; wait until it refuses.
    wait_for("the policy closes on the unmeshed client", PATIENCE, || {
        exchange(unmeshed, pair.b_addr(DB), b"hello")
            .is_empty()
            .then_some(())
    });
    let before = accepted.load(Ordering::SeqCst);
    assert_eq!(
        exchange(unmeshed, pair.b_addr(DB), b"hello"),
        b"",
        "nothing comes back"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before,
        "a refused connection never reaches the application"
    );

    let mut conn = connect(pair.a(), pair.b_addr(DB));
    send_and_finish(&mut conn, b"from alpha");
    assert_eq!(read_all(&mut conn), b"from alpha");

    let alpha_id = identity_of("alpha");
    let allowed = [
        ("srv_name", "db"),
        ("authz_name", "meshed"),
        ("target_port", "3306"),
        ("tls", "true"),
        ("client_id", alpha_id.as_str()),
    ];
    beta.wait_metric("inbound_tcp_authz_allow_total", &allowed, 1.0);
    let text = beta.metrics();
    let denied = [
        ("srv_name", "db"),
        ("target_port", "3306"),
        ("tls", "no_identity"),
    ];
    assert!(
        metric(&text, "inbound_tcp_authz_deny_total", &denied).is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

/// The default policy holds until the controller answers, and the proxy never
/// waits for it: with the control plane away from the start and
/// `all-authenticated`, the unmeshed client is refused with 403 and alpha is served.
#[test]
fn the_default_policy_holds_while_the_controller_is_away() {
    let pair = MeshedPair::new();
    let _issuer = pair.start_issuer(&[]);
    let control = ControlPlane::start(pair.b(), CONTROL.parse().unwrap());
    control.stop();
    let _requests = web_app(pair.b(), WEB);
    let _beta = beta_proxy(
        &pair,
        &WEB.to_string(),
        &[("LINKERD2_PROXY_INBOUND_DEFAULT_POLICY", "all-authenticated")],
    );
    let alpha_env = pair.env(0, true, &[]);
    let _alpha = Proxy::start(pair.a(), &env_refs(&alpha_env));
    let url = format!("http://{}/", pair.b_addr(WEB));
    let (status, error) = status_of(pair.mesh.pod(2), &url);
    assert_eq!(status, "403");
    assert_eq!(error, None);
    assert_eq!(status_of(pair.a(), &url).0, "200");
}
