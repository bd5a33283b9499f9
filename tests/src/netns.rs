//! Pods as network namespaces joined by veth pairs.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::proc::Proc;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// One pod: a network namespace with an IPv4 and an IPv6 address on its veth.
pub struct Pod {
    /// Name of the namespace under `/var/run/netns`.
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    /// The pod's address in the family of `like`.
    pub fn ip_like(&self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => IpAddr::V4(self.ipv4),
            IpAddr::V6(_) => IpAddr::V6(self.ipv6),
        }
    }

    /// Runs `f` on a thread that has entered this pod's network namespace.
    ///
    /// Sockets opened by `f` stay in the pod even if they are later used elsewhere.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(format!("/var/run/netns/{}", self.name))
            .unwrap_or_else(|e| panic!("cannot open namespace {}: {e}", self.name));
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: `ns` is an open namespace file; setns only affects this thread.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `cmd` inside the pod; the process is killed when the guard drops.
    pub fn spawn(&self, label: &str, cmd: Command) -> Proc {
        self.run(move || Proc::spawn(label, cmd))
    }

    /// Runs `program args…` inside the pod to completion, as root.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.exec_with_input(program, args, None)
    }

    /// Like [`Pod::exec`], feeding `input` on standard input.
    pub fn exec_with_input(&self, program: &str, args: &[&str], input: Option<&[u8]>) -> Output {
        self.run(|| {
            use std::io::Write;
            use std::process::Stdio;
            let mut child = Command::new(program)
                .args(args)
                .stdin(if input.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
            if let Some(input) = input {
                child
                    .stdin
                    .take()
                    .expect("piped stdin")
                    .write_all(input)
                    .unwrap_or_else(|e| panic!("cannot feed {program}: {e}"));
            }
            child.wait_with_output().expect("wait for command")
        })
    }

    /// Runs a command that must succeed, failing the test with its stderr otherwise.
    pub fn must(&self, program: &str, args: &[&str]) -> String {
        let out = self.exec(program, args);
        assert!(
            out.status.success(),
            "`{program} {}` failed in pod {}: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A set of pods on one link, deleted (with every process inside) when dropped.
///
/// Pods are numbered from 1: pod `i` has `192.0.2.i` and `2001:db8::i`, documentation
/// ranges that never leave the namespaces. Every mesh has its own namespaces, so
/// parallel tests can reuse these addresses.
pub struct Mesh {
    pub pods: Vec<Pod>,
    bridge: Option<String>,
}

impl Mesh {
    /// Creates `count` pods joined to each other (a veth pair for two, a bridge in a
    /// hub namespace for more).
    pub fn new(count: usize) -> Mesh {
        crate::require_root();
        assert!((1..=200).contains(&count), "between 1 and 200 pods");
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_namespaces_of_dead_runs);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("tdm{}x{id}", std::process::id());
        let mut mesh = Mesh {
            pods: Vec::new(),
            bridge: None,
        };
        for i in 1..=count {
            let name = format!("{prefix}p{i}");
            run_ip(&["netns", "add", &name]);
            // No duplicate address detection: addresses (link-local ones too, which an
            // IPv6 REDIRECT may pick) are usable at once instead of "tentative".
            run_ip(&[
                "netns",
                "exec",
                &name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ]);
            // Push first so that a failure below still deletes this namespace.
            mesh.pods.push(Pod {
                name,
                ipv4: Ipv4Addr::new(192, 0, 2, i as u8),
                ipv6: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16),
            });
        }
        match count {
            1 => {}
            2 => {
                let (a, b) = (&mesh.pods[0].name, &mesh.pods[1].name);
                run_ip(&[
                    "link", "add", "veth0", "netns", a, "type", "veth", "peer", "name", "veth0",
                    "netns", b,
                ]);
            }
            _ => {
                let hub = format!("{prefix}hub");
                run_ip(&["netns", "add", &hub]);
                mesh.bridge = Some(hub.clone());
                run_ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
                run_ip(&["-n", &hub, "link", "set", "br0", "up"]);
                for (i, pod) in mesh.pods.iter().enumerate() {
                    let leg = format!("leg{i}");
                    run_ip(&[
                        "link", "add", "veth0", "netns", &pod.name, "type", "veth", "peer", "name",
                        &leg, "netns", &hub,
                    ]);
                    run_ip(&["-n", &hub, "link", "set", &leg, "master", "br0", "up"]);
                }
            }
        }
        for pod in &mesh.pods {
            let n = pod.name.as_str();
            run_ip(&["-n", n, "link", "set", "lo", "up"]);
            if count > 1 {
                run_ip(&[
                    "-n",
                    n,
                    "addr",
                    "add",
                    &format!("{}/24", pod.ipv4),
                    "dev",
                    "veth0",
                ]);
                // nodad: the address is usable at once instead of after duplicate detection.
                let v6 = format!("{}/64", pod.ipv6);
                run_ip(&["-n", n, "addr", "add", &v6, "dev", "veth0", "nodad"]);
                run_ip(&["-n", n, "link", "set", "veth0", "up"]);
            }
        }
        mesh.wait_until_links_carry_traffic();
        mesh
    }

    /// A freshly raised link drops the first neighbour discovery, which would cost
    /// the first connection a one-second retransmit. A refused connection to a closed
    /// port proves the path (and neighbour entry) works, in each family and each
    /// direction between every two pods.
    fn wait_until_links_carry_traffic(&self) {
        for from in &self.pods {
            for to in self.pods.iter().filter(|to| to.name != from.name) {
                for ip in [IpAddr::V4(to.ipv4), IpAddr::V6(to.ipv6)] {
                    let closed_port = SocketAddr::new(ip, 9);
                    crate::wait_for(
                        &format!("{} to reach {ip}", from.name),
                        crate::PATIENCE,
                        || {
                            let attempt = from.run(|| {
                                TcpStream::connect_timeout(&closed_port, Duration::from_millis(200))
                            });
                            matches!(attempt, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused).then_some(())
                        },
                    );
                }
            }
        }
    }

    pub fn pod(&self, index: usize) -> &Pod {
        &self.pods[index]
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth legs too. Errors are ignored: a half-built
        // mesh must still be cleaned as far as possible.
        for name in self.pods.iter().map(|p| &p.name).chain(self.bridge.iter()) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// Deletes namespaces left by test processes that died without running `Drop`
/// (killed by a timeout, say), so they cannot pile up across runs.
pub(crate) fn sweep_namespaces_of_dead_runs() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix("tdm")
            .and_then(|rest| rest.split_once('x'))
            .map(|(pid, _)| pid);
        if let Some(pid) = owner.filter(|pid| pid.parse::<u32>().is_ok()) {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
            }
        }
    }
}

pub(crate) fn run_ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
