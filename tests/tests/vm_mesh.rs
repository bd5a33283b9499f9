//! A VM and a pod in one mesh. The "VM" is a network namespace run the way a host is:
//! `tandem-init --host` rules (no `--netns`), and a proxy whose identity is an
//! X.509-SVID from a SPIFFE Workload API. The "pod" has the usual pod rules and a
//! certificate from the issuer. Both chain to one trust anchor; each side's discovery
//! file names the other (the VM by SPIFFE ID and server name, the pod by DNS name).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tandem_tests::apps::{connect, read_all, read_until, send_and_finish, Server};
use tandem_tests::mesh::{env_refs, identity_of, TrustDomain};
use tandem_tests::proxy::redirect;
use tandem_tests::spiffe::{bundle, mint, response, Names, WorkloadApi};
use tandem_tests::{bin_path, Mesh, Pod, Proxy, PROXY_UID};

const VM_ID: &str = "spiffe://root.linkerd.cluster.local/vm/billing";
const VM_NAME: &str = "billing.vm.tandem-test.local";

fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// Applies host-mode rules from inside `vm`, as `ExecStartPre` does on a real host.
fn host_rules(vm: &Pod) {
    let init = bin_path("tandem-init");
    let uid = PROXY_UID.to_string();
    vm.must(&init.to_string_lossy(), &["--host", "--proxy-uid", &uid]);
}

/// One HTTP exchange from `client` to `server_addr`; returns the request the server's
/// app received (with the headers the proxies added).
fn http_exchange(client: &Pod, server: &Pod, port: u16) -> String {
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    let app = Server::start(server, any(port), move |mut conn| {
        let got = read_until(&mut conn, b"\r\n\r\n");
        conn.write_all(response).unwrap();
        got
    });
    let mut stream = connect(client, SocketAddr::from((server.ipv4, port)));
    stream
        .write_all(b"GET /invoices HTTP/1.1\r\nHost: billing\r\n\r\n")
        .unwrap();
    let mut got = vec![0; response.len()];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(got, response);
    String::from_utf8_lossy(&app.join()).into_owned()
}

/// One opaque exchange on `port` (an opaque port on both sides' discovery).
fn opaque_exchange(client: &Pod, server: &Pod, port: u16, tag: &str) {
    let reply = format!("reply-from-{tag}");
    let app = {
        let reply = reply.clone();
        Server::start(server, any(port), move |mut conn| {
            let got = read_all(&mut conn);
            conn.write_all(reply.as_bytes()).unwrap();
            got
        })
    };
    let mut stream = connect(client, SocketAddr::from((server.ipv4, port)));
    let request = format!("request-from-{tag}");
    send_and_finish(&mut stream, request.as_bytes());
    assert_eq!(read_all(&mut stream), reply.as_bytes());
    assert_eq!(app.join(), request.as_bytes());
}

fn write_discovery(domain: &TrustDomain, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = domain.dir.join(format!("{name}.vm-discovery.yaml"));
    std::fs::write(&path, text).expect("discovery file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

#[test]
fn a_vm_with_a_spiffe_identity_and_a_pod_mesh_both_ways() {
    let mesh = Mesh::new(3);
    let (vm, pod, issuer_pod) = (mesh.pod(0), mesh.pod(1), mesh.pod(2));
    host_rules(vm);
    redirect(pod);
    let domain = TrustDomain::new();
    let _issuer = domain.start_issuer(issuer_pod, &[]);
    let beta = identity_of("beta");
    // Also makes the domain's directory readable to the proxies' uid.
    let mut pod_env = domain.proxy_env("beta", SocketAddr::from((issuer_pod.ipv4, 8080)), &[]);

    // The VM: its SVID comes from the Workload API, signed under the same anchor.
    let socket = domain.dir.join("spire-agent.sock");
    let api = WorkloadApi::start(&socket);
    let svid = mint(&domain, Names::Spiffe(VM_ID), Duration::from_secs(3600));
    api.push(response(svid.svid(VM_ID, &bundle(&domain))));
    let vm_discovery = write_discovery(
        &domain,
        "vm",
        &format!(
            "destinations:\n\
             \x20 - addr: {pod}\n    ports: 5432\n    identity: {beta}\n    opaque: true\n\
             \x20 - addr: {pod}\n    identity: {beta}\n",
            pod = pod.ipv4,
        ),
    );
    let address = format!("unix://{}", socket.display());
    let vm_env = [
        (
            "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS",
            address.as_str(),
        ),
        ("LINKERD2_PROXY_IDENTITY_SERVER_ID", VM_ID),
        ("LINKERD2_PROXY_IDENTITY_SERVER_NAME", VM_NAME),
        ("TANDEM_DISCOVERY_FILE", &vm_discovery.to_string_lossy()),
    ];
    let vm_proxy = Proxy::start(vm, &vm_env);

    // The pod: certified by the issuer; its discovery names the VM by SPIFFE ID.
    let pod_discovery = write_discovery(
        &domain,
        "pod",
        &format!(
            "destinations:\n\
             \x20 - addr: {vm}\n    ports: 5432\n    identity: {VM_ID}\n    server_name: {VM_NAME}\n    opaque: true\n\
             \x20 - addr: {vm}\n    identity: {VM_ID}\n    server_name: {VM_NAME}\n",
            vm = vm.ipv4,
        ),
    );
    pod_env.retain(|(k, _)| k != "TANDEM_DISCOVERY_FILE");
    pod_env.push((
        "TANDEM_DISCOVERY_FILE".into(),
        pod_discovery.to_string_lossy().into_owned(),
    ));
    let pod_proxy = Proxy::start(pod, &env_refs(&pod_env));

    // VM → pod: the pod's app learns the VM's SPIFFE identity from its proxy.
    let request = http_exchange(vm, pod, 8080);
    assert!(
        request.contains(&format!("l5d-client-id: {VM_ID}\r\n")),
        "{request}"
    );
    opaque_exchange(vm, pod, 5432, "vm");

    // Pod → VM: the VM's app learns the pod's DNS identity.
    let request = http_exchange(pod, vm, 8080);
    assert!(
        request.contains(&format!("l5d-client-id: {beta}\r\n")),
        "{request}"
    );
    opaque_exchange(pod, vm, 5432, "pod");

    // Each side counts the other's identity, in both directions.
    let inbound_from = |id| {
        [
            ("direction", "inbound"),
            ("peer", "src"),
            ("tls", "true"),
            ("client_id", id),
        ]
    };
    let outbound_to = |id| {
        [
            ("direction", "outbound"),
            ("peer", "dst"),
            ("tls", "true"),
            ("server_id", id),
        ]
    };
    pod_proxy.wait_metric("tcp_open_total", &inbound_from(VM_ID), 2.0);
    pod_proxy.wait_metric("tcp_open_total", &outbound_to(VM_ID), 2.0);
    vm_proxy.wait_metric("tcp_open_total", &inbound_from(&beta), 2.0);
    vm_proxy.wait_metric("tcp_open_total", &outbound_to(&beta), 2.0);
}
