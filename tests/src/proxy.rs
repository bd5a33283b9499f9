//! Running `tandem-proxy` in a pod, the way a sidecar runs: as uid 2102, behind
//! redirect rules, with its admin server on the pod's loopback.

use std::net::SocketAddr;
use std::process::Command;

use crate::netns::Pod;
use crate::proc::Proc;
use crate::{bin_path, probe, wait_for, PATIENCE, PROXY_UID};

/// Ports that reach the pod without the inbound redirect, as Linkerd's injector sets.
pub const INBOUND_PORTS_TO_IGNORE: &str = "4190,4191";

/// A proxy process in a pod.
pub struct Proxy<'p> {
    pub pod: &'p Pod,
    pub process: Proc,
    pub admin: SocketAddr,
}

impl<'p> Proxy<'p> {
    /// Starts the proxy in `pod` with `env` added to its environment and waits for
    /// `/ready`. The admin server listens on all addresses so tests can also reach it
    /// from another pod.
    pub fn start(pod: &'p Pod, env: &[(&str, &str)]) -> Proxy<'p> {
        let mut proxy = Proxy::launch(pod, env);
        proxy.wait_ready();
        proxy
    }

    /// Starts the proxy without waiting for it to become ready.
    pub fn launch(pod: &'p Pod, env: &[(&str, &str)]) -> Proxy<'p> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(bin_path("tandem-proxy"));
        cmd.env_clear()
            .env("LINKERD2_PROXY_LOG", "warn,tandem=debug")
            .env("LINKERD2_PROXY_ADMIN_LISTEN_ADDR", "0.0.0.0:4191")
            .envs(env.iter().copied())
            .uid(PROXY_UID)
            .gid(PROXY_UID);
        let process = pod.spawn("tandem-proxy", cmd);
        Proxy {
            pod,
            process,
            admin: SocketAddr::from(([127, 0, 0, 1], 4191)),
        }
    }

    /// Waits until `/ready` answers 200, failing the test if the proxy exits first.
    pub fn wait_ready(&mut self) {
        wait_for("the proxy to become ready", PATIENCE, || {
            if let Some(status) = self.process.try_exit() {
                panic!(
                    "the proxy exited with {status} before becoming ready:\n{}",
                    self.process.output()
                );
            }
            matches!(self.admin_request("GET", "/ready", ""), Ok((200, _))).then_some(())
        });
    }

    /// One request to the admin server from inside the pod.
    pub fn admin_request(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> std::io::Result<(u16, String)> {
        let admin = self.admin;
        self.pod.run(|| probe::http(admin, method, path, body))
    }

    /// The current `/metrics` text.
    pub fn metrics(&self) -> String {
        match self.admin_request("GET", "/metrics", "") {
            Ok((200, text)) => text,
            other => panic!("cannot scrape metrics: {other:?}"),
        }
    }

    /// Waits until metric `name` with `labels` reaches `value`, then returns the text.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) -> String {
        let what = format!("{name}{labels:?} to reach {value}");
        let mut last = String::new();
        let found = crate::wait_for_or(PATIENCE, || {
            last = self.metrics();
            (probe::metric(&last, name, labels) == Some(value)).then(|| last.clone())
        });
        found.unwrap_or_else(|| panic!("{what}; last scrape:\n{last}"))
    }
}

/// Installs the pod's redirect rules with `tandem-init`, as the init container of an
/// injected pod does: inbound TCP to 4143 except the admin ports, outbound TCP to 4140
/// except the proxy's uid and loopback, IPv4 and IPv6.
pub fn redirect(pod: &Pod) {
    redirect_except(pod, &[]);
}

/// [`redirect`], leaving `direct_ports` alone in both directions: the benchmark's
/// no-proxy baseline runs between the same two pods on these ports.
pub fn redirect_except(pod: &Pod, direct_ports: &[u16]) {
    let netns = format!("/var/run/netns/{}", pod.name);
    let direct: Vec<String> = direct_ports.iter().map(u16::to_string).collect();
    let mut inbound = INBOUND_PORTS_TO_IGNORE.to_string();
    for port in &direct {
        inbound.push(',');
        inbound.push_str(port);
    }
    let mut cmd = Command::new(bin_path("tandem-init"));
    cmd.args(["--netns", &netns, "--inbound-ports-to-ignore", &inbound]);
    if !direct.is_empty() {
        cmd.args(["--outbound-ports-to-ignore", &direct.join(",")]);
    }
    let out = cmd.output().expect("run tandem-init");
    assert!(
        out.status.success(),
        "tandem-init failed in pod {} ({}): {}",
        pod.name,
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
