//! Identity without the issuer, as on a VM: X.509-SVIDs streamed by a SPIFFE Workload
//! API server (a stand-in for the SPIRE agent, speaking the real protocol on a Unix
//! socket), and certificates written to files by something else.
//!
//! What a proxy presents is observed the way a peer sees it: a TLS handshake to the
//! pod's app port with the proxy's SNI, comparing the leaf with the exact certificate
//! expected.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_tests::apps::serve_echo;
use tandem_tests::mesh::TrustDomain;
use tandem_tests::probe::metric;
use tandem_tests::proxy::redirect;
use tandem_tests::spiffe::{bundle, mint, response, tls_connect, Names, TlsStream, WorkloadApi};
use tandem_tests::{wait_for, Mesh, Proxy, PATIENCE, PROXY_UID};

const VM_ID: &str = "spiffe://root.linkerd.cluster.local/vm";
const VM_NAME: &str = "vm.tandem-test.local";
const HOUR: Duration = Duration::from_secs(3600);

/// A directory only this test uses, removed on drop; `memory` puts it on tmpfs.
struct TestDir(PathBuf);

impl TestDir {
    fn new(label: &str, memory: bool) -> TestDir {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let parent = if memory { "/dev/shm" } else { "/tmp" };
        let dir = Path::new(parent).join(format!(
            "tandem-vm-{}-{}-{label}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("test directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// Sends `data` on an open connection and expects it echoed.
fn exchange(stream: &mut TlsStream, data: &[u8]) {
    stream.write_all(data).expect("write");
    stream.flush().expect("flush");
    let mut echoed = vec![0u8; data.len()];
    stream.read_exact(&mut echoed).expect("read the echo");
    assert_eq!(echoed, data);
}

fn counter(proxy: &Proxy<'_>, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&proxy.metrics(), name, labels).unwrap_or(0.0)
}

#[test]
fn svids_from_the_workload_api_are_used_rotated_and_kept_without_the_agent() {
    let mesh = Mesh::new(2);
    let (vm, peer) = (mesh.pod(0), mesh.pod(1));
    redirect(vm);
    serve_echo(vm, any(7000));
    let vm_app = SocketAddr::from((vm.ipv4, 7000));
    let domain = TrustDomain::new();
    let bundle = bundle(&domain);
    let dir = TestDir::new("spire", false);
    let socket = dir.0.join("api.sock");
    let api = WorkloadApi::start(&socket);

    let address = format!("unix://{}", socket.display());
    let env = [
        (
            "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS",
            address.as_str(),
        ),
        ("LINKERD2_PROXY_IDENTITY_SERVER_ID", VM_ID),
        ("LINKERD2_PROXY_IDENTITY_SERVER_NAME", VM_NAME),
    ];
    let mut proxy = Proxy::launch(vm, &env);

    // Connected, with the security header, but no SVID yet: not ready.
    wait_for("the proxy to call FetchX509SVID", PATIENCE, || {
        (api.calls() >= 1).then_some(())
    });
    let status = proxy
        .admin_request("GET", "/ready", "")
        .map(|(code, _)| code);
    assert!(
        matches!(status, Ok(code) if code != 200),
        "ready without an SVID: {status:?}"
    );

    let first = mint(&domain, Names::Spiffe(VM_ID), HOUR);
    api.push(response(first.svid(VM_ID, &bundle)));
    proxy.wait_ready();
    let (mut long_lived, leaf) = tls_connect(peer, vm_app, VM_NAME);
    assert_eq!(leaf, first.leaf, "the first SVID is served");
    exchange(&mut long_lived, b"before rotation");

    // Updates that do not check out are skipped: an SVID for another workload only,
    // and one for us from a CA outside the bundle.
    let other_id = "spiffe://root.linkerd.cluster.local/other";
    let other = mint(&domain, Names::Spiffe(other_id), HOUR);
    api.push(response(other.svid(other_id, &bundle)));
    let stranger = TrustDomain::new();
    let foreign = mint(&stranger, Names::Spiffe(VM_ID), HOUR);
    api.push(response(foreign.svid(VM_ID, &bundle)));
    proxy.wait_metric("identity_cert_refresh_total", &[("result", "failure")], 2.0);
    let (_, leaf) = tls_connect(peer, vm_app, VM_NAME);
    assert_eq!(leaf, first.leaf, "a bad update replaced the SVID");

    // Rotation is pushed: new handshakes get the new SVID, open connections carry on.
    let second = mint(&domain, Names::Spiffe(VM_ID), 2 * HOUR);
    api.push(response(second.svid(VM_ID, &bundle)));
    wait_for(
        "new handshakes to present the rotated SVID",
        PATIENCE,
        || {
            let (_, leaf) = tls_connect(peer, vm_app, VM_NAME);
            (leaf == second.leaf).then_some(())
        },
    );
    exchange(
        &mut long_lived,
        b"after rotation, on the first SVID's connection",
    );
    let expiry = second
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert_eq!(
        metric(
            &proxy.metrics(),
            "identity_cert_expiration_timestamp_seconds",
            &[]
        ),
        Some(expiry)
    );

    // The agent goes away: the proxy keeps serving on its SVID and keeps retrying.
    let failures = counter(
        &proxy,
        "identity_cert_refresh_total",
        &[("result", "failure")],
    );
    drop(api);
    assert!(!socket.exists());
    wait_for("the proxy to notice the agent is gone", PATIENCE, || {
        (counter(
            &proxy,
            "identity_cert_refresh_total",
            &[("result", "failure")],
        ) > failures)
            .then_some(())
    });
    assert!(matches!(
        proxy.admin_request("GET", "/ready", ""),
        Ok((200, _))
    ));
    let (mut fresh, leaf) = tls_connect(peer, vm_app, VM_NAME);
    assert_eq!(leaf, second.leaf);
    exchange(&mut fresh, b"without the agent");
    exchange(&mut long_lived, b"still open");

    // The agent comes back: the next SVID is picked up without a restart.
    let api = WorkloadApi::start(&socket);
    let third = mint(&domain, Names::Spiffe(VM_ID), 3 * HOUR);
    api.push(response(third.svid(VM_ID, &bundle)));
    wait_for("the SVID from the restarted agent", PATIENCE, || {
        let (_, leaf) = tls_connect(peer, vm_app, VM_NAME);
        (leaf == third.leaf).then_some(())
    });
    assert!(proxy.process.try_exit().is_none(), "the proxy exited");
}

#[test]
fn certificate_files_are_used_and_reloaded_when_they_change() {
    let mesh = Mesh::new(2);
    let (host, peer) = (mesh.pod(0), mesh.pod(1));
    redirect(host);
    serve_echo(host, any(7000));
    let app = SocketAddr::from((host.ipv4, 7000));
    let domain = TrustDomain::new();
    let dir = TestDir::new("files", true);
    let (cert, key, anchors) = (
        dir.0.join("tls.crt"),
        dir.0.join("tls.key"),
        dir.0.join("ca.crt"),
    );
    let write = |path: &Path, text: &str| {
        use std::os::unix::fs::PermissionsExt;
        // Replaced by rename, as cert-manager's CSI driver and Vault agent do.
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).expect("write");
        std::os::unix::fs::chown(&tmp, Some(PROXY_UID), Some(PROXY_UID)).expect("chown");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::rename(&tmp, path).expect("rename");
    };
    let name = "files.tandem-test.local";
    let first = mint(&domain, Names::Dns(name), HOUR);
    write(&anchors, &domain.anchor_pem);
    write(&cert, &first.chain_pem());
    write(&key, &first.key_pem());

    let paths = [&cert, &key, &anchors].map(|p| p.to_string_lossy().into_owned());
    let env = [
        ("TANDEM_IDENTITY_CERT_FILE", paths[0].as_str()),
        ("TANDEM_IDENTITY_KEY_FILE", paths[1].as_str()),
        ("TANDEM_IDENTITY_TRUST_ANCHORS_FILE", paths[2].as_str()),
        ("TANDEM_IDENTITY_FILES_POLL_INTERVAL", "100ms"),
        ("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", name),
    ];
    let proxy = Proxy::start(host, &env);
    let (mut long_lived, leaf) = tls_connect(peer, app, name);
    assert_eq!(leaf, first.leaf);
    exchange(&mut long_lived, b"first certificate");

    // A writer that replaces the key before the certificate: the mismatch is skipped
    // and the current certificate stays in use.
    let second = mint(&domain, Names::Dns(name), 2 * HOUR);
    write(&key, &second.key_pem());
    proxy.wait_metric("identity_cert_refresh_total", &[("result", "failure")], 1.0);
    let (_, leaf) = tls_connect(peer, app, name);
    assert_eq!(leaf, first.leaf, "a key without its certificate was used");

    write(&cert, &second.chain_pem());
    wait_for(
        "new handshakes to present the new certificate",
        PATIENCE,
        || {
            let (_, leaf) = tls_connect(peer, app, name);
            (leaf == second.leaf).then_some(())
        },
    );
    exchange(&mut long_lived, b"open across the reload");
    proxy.wait_metric("identity_cert_refresh_total", &[("result", "ok")], 2.0);
}
