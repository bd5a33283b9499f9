//! The admin server: probes, metrics, settings, log level and shutdown.

use std::io::Read;
use std::net::SocketAddr;

use tandem_tests::probe::{http, raw};
use tandem_tests::proxy::redirect;
use tandem_tests::{Mesh, Proxy, PATIENCE};

#[test]
fn probes_env_and_gzip_metrics() {
    let mesh = Mesh::new(1);
    let proxy = Proxy::start(
        mesh.pod(0),
        &[
            ("TANDEM_TEST_TOKEN", "hunter2"),
            ("TANDEM_EXTRA_OPAQUE_PORTS", "7777"),
        ],
    );
    assert_eq!(
        proxy.admin_request("GET", "/ready", "").unwrap(),
        (200, "ready\n".into())
    );
    assert_eq!(
        proxy.admin_request("GET", "/live", "").unwrap(),
        (200, "live\n".into())
    );
    assert_eq!(proxy.admin_request("GET", "/nope", "").unwrap().0, 404);
    for probe in ["/ready", "/live"] {
        let admin = proxy.admin;
        let request = format!("HEAD {probe} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let response = mesh.pod(0).run(|| raw(admin, request.as_bytes())).unwrap();
        let response = String::from_utf8_lossy(&response);
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "HEAD {probe}: {response}"
        );
        assert!(
            response.ends_with("\r\n\r\n"),
            "HEAD has no body: {response}"
        );
    }

    let (status, body) = proxy.admin_request("GET", "/env.json", "").unwrap();
    assert_eq!(status, 200);
    let env: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(env["TANDEM_EXTRA_OPAQUE_PORTS"], "7777");
    assert_eq!(env["TANDEM_TEST_TOKEN"], "<redacted>", "{body}");
    assert!(!body.contains("hunter2"));
    // Linkerd's filter: the names asked for, null when unset.
    let query = "/env.json?TANDEM_EXTRA_OPAQUE_PORTS&TANDEM_NOT_SET";
    let (status, body) = proxy.admin_request("GET", query, "").unwrap();
    assert_eq!(status, 200);
    let env: serde_json::Value = serde_json::from_str(&body).unwrap();
    let expected = serde_json::json!({"TANDEM_EXTRA_OPAQUE_PORTS": "7777", "TANDEM_NOT_SET": null});
    assert_eq!(env, expected, "{body}");
    let (status, _) = proxy
        .admin_request("GET", "/env.json?TANDEM_EXTRA_OPAQUE_PORTS=1", "")
        .unwrap();
    assert_eq!(status, 400);

    let admin = proxy.admin;
    let response = mesh
        .pod(0)
        .run(|| raw(admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"))
        .unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&response[split + 4..])
        .read_to_string(&mut text)
        .unwrap();
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
    assert!(text.ends_with("# EOF\n"));
}

#[test]
fn log_level_is_read_and_changed_from_loopback_only() {
    let mesh = Mesh::new(2);
    let (a, b) = (mesh.pod(0), mesh.pod(1));
    redirect(a);
    redirect(b);
    let _proxy_a = Proxy::start(a, &[]);
    let proxy_b = Proxy::start(b, &[]);
    assert_eq!(
        proxy_b
            .admin_request("GET", "/proxy-log-level", "")
            .unwrap(),
        (200, "warn,tandem=debug\n".into())
    );
    assert_eq!(
        proxy_b
            .admin_request("PUT", "/proxy-log-level", "info")
            .unwrap()
            .0,
        204
    );
    assert_eq!(
        proxy_b
            .admin_request("GET", "/proxy-log-level", "")
            .unwrap(),
        (200, "info\n".into())
    );
    assert_eq!(
        proxy_b
            .admin_request("PUT", "/proxy-log-level", "=[")
            .unwrap()
            .0,
        400
    );
    assert_eq!(
        proxy_b
            .admin_request("GET", "/proxy-log-level", "")
            .unwrap()
            .1,
        "info\n"
    );

    // From pod A the admin port of B is reachable (its inbound rules skip 4191), but
    // not for changing anything.
    let remote_admin = SocketAddr::from((b.ipv4, 4191));
    let from_a = a
        .run(|| http(remote_admin, "PUT", "/proxy-log-level", "trace"))
        .unwrap();
    assert_eq!(from_a.0, 403);
    assert_eq!(
        a.run(|| http(remote_admin, "GET", "/ready", "")).unwrap().0,
        200
    );
    assert_eq!(
        proxy_b
            .admin_request("GET", "/proxy-log-level", "")
            .unwrap()
            .1,
        "info\n"
    );
}

#[test]
fn shutdown_endpoint_is_off_by_default() {
    let mesh = Mesh::new(1);
    let mut proxy = Proxy::start(mesh.pod(0), &[]);
    assert_eq!(proxy.admin_request("POST", "/shutdown", "").unwrap().0, 404);
    assert!(proxy.process.try_exit().is_none());
}

#[test]
fn shutdown_endpoint_when_enabled_stops_the_proxy_for_loopback_clients_only() {
    let mesh = Mesh::new(2);
    let (a, b) = (mesh.pod(0), mesh.pod(1));
    redirect(a);
    redirect(b);
    let env = [("LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED", "true")];
    let _proxy_a = Proxy::start(a, &env);
    let mut proxy_b = Proxy::start(b, &env);
    let remote_admin = SocketAddr::from((b.ipv4, 4191));
    assert_eq!(
        a.run(|| http(remote_admin, "POST", "/shutdown", ""))
            .unwrap()
            .0,
        403
    );
    assert!(proxy_b.process.try_exit().is_none());
    assert_eq!(
        proxy_b.admin_request("POST", "/shutdown", "").unwrap().0,
        200
    );
    let status = proxy_b.process.wait_exit(PATIENCE);
    assert!(status.success(), "{status}");
}
