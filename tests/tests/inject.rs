//! `tandem-proxy inject`, run as users run it, against golden files.
//!
//! Every input in `tests/golden/inject/input/` is injected in four variants
//! (classic or native sidecar, with or without `--ha`) and compared with
//! `tests/golden/inject/<input>.<variant>.yaml`. Regenerate after an intended
//! change with `TANDEM_UPDATE_GOLDEN=1 cargo test -p tandem-tests --test inject`
//! and review the diff. Beyond the bytes, each output is checked by deserialising
//! it into the Kubernetes API types (k8s-openapi) and back: a misspelt or
//! mistyped field would not survive the round trip. The properties that matter
//! (ordering, security contexts, probes, volumes) are asserted on those types, and
//! injecting the output again must change nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, PodTemplateSpec, Service};
use serde_json::Value as Json;
use tandem_tests::bin_path;
use tandem_tests::kube::{round_trip, yaml_documents};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/inject")
}

struct Run {
    stdout: String,
    stderr: String,
}

/// `tandem-proxy inject` with the golden images and `anchors`; the input is added by the caller.
fn inject_command(anchors: &Path, flags: &[&str]) -> Command {
    let mut command = Command::new(bin_path("tandem-proxy"));
    command
        .arg("inject")
        .arg("--trust-anchors")
        .arg(anchors)
        .args(["--proxy-image", "tandem-proxy:golden"])
        .args(["--init-image", "tandem-init:golden"])
        .args(flags);
    command
}

/// Runs `command` with `stdin` as its standard input.
fn run_with_stdin(mut command: Command, stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tandem-proxy inject");
    let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    // Bad input may end the injector before it has read everything; its exit status
    // and output are what the tests judge, so a closed pipe is not a failure here.
    if let Err(error) = written {
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
    }
    child.wait_with_output().unwrap()
}

fn successful(out: std::process::Output, what: &str) -> Run {
    let run = Run {
        stdout: String::from_utf8(out.stdout).expect("utf-8 output"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 errors"),
    };
    assert!(out.status.success(), "inject {what} failed: {}", run.stderr);
    run
}

fn inject(input: &Path, flags: &[&str]) -> Run {
    let mut command = inject_command(&golden_dir().join("anchors.pem"), flags);
    let out = command
        .arg(input)
        .output()
        .expect("run tandem-proxy inject");
    successful(out, &format!("{input:?} {flags:?}"))
}

fn inject_text(text: &str, flags: &[&str]) -> Run {
    let mut command = inject_command(&golden_dir().join("anchors.pem"), flags);
    command.arg("-");
    successful(run_with_stdin(command, text), &format!("(stdin) {flags:?}"))
}

fn documents(text: &str) -> Vec<Json> {
    yaml_documents(text)
}

/// Checks `object` against its Kubernetes type (see [`round_trip`]); returns the
/// pod template's spec for workloads.
fn validate(object: &Json) -> Option<PodSpec> {
    let template = |t: Option<PodTemplateSpec>| t.and_then(|t| t.spec);
    match object["kind"].as_str().expect("every object has a kind") {
        "Pod" => round_trip::<Pod>(object).spec,
        "Deployment" => template(round_trip::<Deployment>(object).spec.map(|s| s.template)),
        "StatefulSet" => template(round_trip::<StatefulSet>(object).spec.map(|s| s.template)),
        "DaemonSet" => template(round_trip::<DaemonSet>(object).spec.map(|s| s.template)),
        "Job" => template(round_trip::<Job>(object).spec.map(|s| s.template)),
        "CronJob" => round_trip::<CronJob>(object)
            .spec
            .and_then(|s| s.job_template.spec)
            .and_then(|s| s.template.spec),
        "Service" => {
            round_trip::<Service>(object);
            None
        }
        "Namespace" => {
            round_trip::<Namespace>(object);
            None
        }
        "ConfigMap" => {
            round_trip::<k8s_openapi::api::core::v1::ConfigMap>(object);
            None
        }
        "List" => {
            for item in object["items"].as_array().expect("a List has items") {
                validate(item);
            }
            None
        }
        other => panic!("the golden inputs have no {other}"),
    }
}

/// Pod specs of all workloads in a stream, flattening Lists.
fn pod_specs(stream: &str) -> Vec<PodSpec> {
    let mut specs = Vec::new();
    for document in documents(stream) {
        if document["kind"] == "List" {
            validate(&document);
            for item in document["items"].as_array().unwrap() {
                specs.extend(validate(item));
            }
        } else {
            specs.extend(validate(&document));
        }
    }
    specs
}

fn env_of<'c>(container: &'c Container, name: &str) -> Option<&'c str> {
    container
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

fn check_injected(spec: &PodSpec, native: bool, ha: bool) {
    let inits = spec.init_containers.as_ref().expect("init containers");
    let init = &inits[0];
    assert_eq!(
        init.name, "tandem-init",
        "the rules go in before anything else"
    );
    let init_security = init.security_context.as_ref().unwrap();
    assert_eq!(init_security.run_as_user, Some(0));
    let capabilities = init_security.capabilities.as_ref().unwrap();
    assert_eq!(
        capabilities.add.as_deref(),
        Some(&["NET_ADMIN".to_string(), "NET_RAW".to_string()][..])
    );
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_ne!(init_security.privileged, Some(true));

    let proxy = if native {
        let proxy = &inits[1];
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
        let startup = proxy.startup_probe.as_ref().expect("a startup probe");
        assert_eq!(
            startup.http_get.as_ref().unwrap().path.as_deref(),
            Some("/ready")
        );
        assert!(
            proxy.lifecycle.is_none(),
            "no postStart hook in native mode"
        );
        assert!(spec.containers.iter().all(|c| c.name != "tandem-proxy"));
        assert!(env_of(proxy, "TANDEM_SHUTDOWN_DELAY").is_none());
        proxy
    } else {
        let proxy = &spec.containers[0];
        let hook = proxy.lifecycle.as_ref().and_then(|l| l.post_start.as_ref());
        let command = hook
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone());
        assert_eq!(
            command.as_deref().map(|c| &c[..2]),
            Some(
                &[
                    "/usr/local/bin/tandem-proxy".to_string(),
                    "await".to_string()
                ][..]
            )
        );
        assert!(env_of(proxy, "TANDEM_SHUTDOWN_DELAY").is_some());
        proxy
    };
    assert_eq!(proxy.name, "tandem-proxy");
    let security = proxy.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_user, Some(2102));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert!(security.capabilities.as_ref().unwrap().add.is_none());
    for (probe, path) in [
        (&proxy.liveness_probe, "/live"),
        (&proxy.readiness_probe, "/ready"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(4191)
        );
    }
    assert!(env_of(proxy, "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS")
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert_eq!(
        env_of(proxy, "LINKERD2_PROXY_IDENTITY_TOKEN_FILE"),
        Some("/var/run/secrets/tokens/tandem-identity-token")
    );

    let volumes = spec.volumes.as_ref().unwrap();
    let identity = volumes
        .iter()
        .find(|v| v.name == "tandem-identity-end-entity")
        .unwrap();
    assert_eq!(
        identity.empty_dir.as_ref().unwrap().medium.as_deref(),
        Some("Memory"),
        "keys live only in memory"
    );
    let token = volumes
        .iter()
        .find(|v| v.name == "tandem-identity-token")
        .unwrap();
    let source = &token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0];
    assert_eq!(
        source
            .service_account_token
            .as_ref()
            .unwrap()
            .audience
            .as_deref(),
        Some("identity.l5d.io")
    );

    let resources = proxy.resources.as_ref();
    let quantity = |section: &str, name: &str| {
        let r = resources?;
        let map = if section == "requests" {
            r.requests.as_ref()
        } else {
            r.limits.as_ref()
        }?;
        map.get(name).map(|q| q.0.clone())
    };
    if ha {
        assert!(quantity("requests", "cpu").is_some());
        assert!(quantity("requests", "memory").is_some());
        assert!(quantity("limits", "memory").is_some());
    }

    // The drain budget fits in the pod's grace period.
    let grace = spec.termination_grace_period_seconds.unwrap_or(30) as u128;
    let millis =
        |name| env_of(proxy, name).map_or(0, |v| v.trim_end_matches("ms").parse::<u128>().unwrap());
    let total = millis("TANDEM_SHUTDOWN_DELAY") + millis("LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD");
    assert!(
        total < grace * 1000,
        "delay + drain {total} ms must end before the {grace} s grace period"
    );
}

const INPUTS: [&str; 7] = [
    "pod",
    "deployment",
    "statefulset",
    "daemonset",
    "job",
    "cronjob",
    "list",
];

#[test]
fn every_kind_in_every_mode_matches_its_golden_file() {
    let update = std::env::var_os("TANDEM_UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for input in INPUTS {
        let input_path = golden_dir().join("input").join(format!("{input}.yaml"));
        for (variant, flags) in [
            ("classic", &[][..]),
            ("classic-ha", &["--ha"][..]),
            ("native", &["--native-sidecar"][..]),
            ("native-ha", &["--native-sidecar", "--ha"][..]),
        ] {
            let run = inject(&input_path, flags);
            let golden = golden_dir().join(format!("{input}.{variant}.yaml"));
            if update {
                std::fs::write(&golden, &run.stdout).unwrap();
            } else {
                let expected = std::fs::read_to_string(&golden).unwrap_or_default();
                if expected != run.stdout {
                    mismatches.push(golden.display().to_string());
                }
            }

            // The CronJob opts into native sidecars by annotation, in every variant.
            let native = flags.contains(&"--native-sidecar") || input == "cronjob";
            let specs = pod_specs(&run.stdout);
            assert_eq!(specs.len(), 1, "{input}: one workload");
            check_injected(&specs[0], native, flags.contains(&"--ha"));
            assert!(
                run.stderr.contains(" injected"),
                "{input}: reported: {}",
                run.stderr
            );

            let again = inject_text(&run.stdout, flags);
            assert_eq!(
                again.stdout, run.stdout,
                "{input} {variant}: re-injection changed it"
            );
            assert!(
                again.stderr.contains("already injected"),
                "{}",
                again.stderr
            );
        }
    }
    assert!(
        mismatches.is_empty(),
        "output differs from the golden files (TANDEM_UPDATE_GOLDEN=1 rewrites them; review the diff): {mismatches:?}"
    );
}

#[test]
fn annotations_reach_the_rules_and_the_proxy() {
    let run = inject(&golden_dir().join("input/deployment.yaml"), &[]);
    let spec = &pod_specs(&run.stdout)[0];
    let init = &spec.init_containers.as_ref().unwrap()[0];
    let args = init.args.as_ref().unwrap().join(" ");
    assert!(
        args.contains("--inbound-ports-to-ignore 4190,4191,9000"),
        "{args}"
    );
    assert!(
        args.contains("--outbound-ports-to-ignore 443,6443"),
        "{args}"
    );
    let proxy = &spec.containers[0];
    assert_eq!(
        env_of(
            proxy,
            "LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION"
        ),
        Some("5432,6379")
    );
    assert_eq!(env_of(proxy, "TANDEM_EXTRA_OPAQUE_PORTS"), Some("4222"));
    assert_eq!(
        env_of(proxy, "LINKERD2_PROXY_LOG"),
        Some("warn,tandem=debug")
    );
    // terminationGracePeriodSeconds 60: 5 s of serving on, then 54 s to drain.
    assert_eq!(env_of(proxy, "TANDEM_SHUTDOWN_DELAY"), Some("5000ms"));
    assert_eq!(
        env_of(proxy, "LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD"),
        Some("54000ms")
    );
    // The app stays the default container for kubectl logs/exec.
    let deployment = &documents(&run.stdout)[0];
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        annotations["kubectl.kubernetes.io/default-container"],
        "web"
    );
    assert_eq!(
        annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"],
        "true"
    );

    let run = inject(&golden_dir().join("input/statefulset.yaml"), &["--ha"]);
    let specs = pod_specs(&run.stdout);
    let proxy = &specs[0].containers[0];
    let resources = proxy.resources.as_ref().unwrap();
    let get = |m: &Option<std::collections::BTreeMap<String, _>>, k: &str| {
        m.as_ref()
            .and_then(|m| m.get(k))
            .map(|q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| q.0.clone())
    };
    assert_eq!(get(&resources.requests, "cpu").as_deref(), Some("500m"));
    assert_eq!(get(&resources.requests, "memory").as_deref(), Some("20Mi"));
    assert_eq!(get(&resources.limits, "cpu").as_deref(), Some("2"));
    assert_eq!(get(&resources.limits, "memory").as_deref(), Some("128Mi"));
    assert_eq!(env_of(proxy, "LINKERD2_PROXY_CORES_MIN"), Some("1"));
    assert_eq!(env_of(proxy, "LINKERD2_PROXY_CORES_MAX"), Some("2"));
    assert_eq!(
        env_of(proxy, "LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD"),
        Some("10000ms")
    );

    // A user's explicit safe-to-evict is kept.
    let run = inject(&golden_dir().join("input/daemonset.yaml"), &[]);
    let daemonset = &documents(&run.stdout)[0];
    assert_eq!(
        daemonset["spec"]["template"]["metadata"]["annotations"]
            ["cluster-autoscaler.kubernetes.io/safe-to-evict"],
        "false"
    );

    // Jobs in classic mode can stop their proxy with `await --shutdown`.
    let run = inject(&golden_dir().join("input/job.yaml"), &[]);
    let specs = pod_specs(&run.stdout);
    let proxy = &specs[0].containers[0];
    assert_eq!(
        env_of(proxy, "LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED"),
        Some("true")
    );
    let run = inject(&golden_dir().join("input/job.yaml"), &["--native-sidecar"]);
    let specs = pod_specs(&run.stdout);
    let proxy = &specs[0].init_containers.as_ref().unwrap()[1];
    assert_eq!(
        env_of(proxy, "LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED"),
        None,
        "native sidecars stop with the Job by themselves"
    );
}

#[test]
fn opted_out_objects_come_out_unchanged() {
    let input_path = golden_dir().join("input/skipped.yaml");
    let input = std::fs::read_to_string(&input_path).unwrap();
    for flags in [&[][..], &["--native-sidecar", "--ha"][..]] {
        let run = inject(&input_path, flags);
        let (before, after) = (documents(&input), documents(&run.stdout));
        assert_eq!(before, after, "nothing may change");
        for object in &after {
            validate(object);
        }
        for expected in [
            "deployment/old-app skipped: namespace legacy",
            "daemonset/kube-proxy skipped: kube-system",
            "pod/opted-out skipped: annotated inject: disabled",
            "pod/node-agent skipped: uses the host's network",
            "pod/linkerd-meshed skipped: already meshed by Linkerd",
        ] {
            assert!(run.stderr.contains(expected), "{expected}: {}", run.stderr);
        }
    }
}

/// Values as Kubernetes expands them: the downward API's fields, then `$(NAME)`
/// references to earlier variables.
fn expand(container: &Container, downward: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    for var in container.env.as_ref().expect("the proxy has variables") {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => {
                let mut value = value.clone();
                for (name, known) in &vars {
                    value = value.replace(&format!("$({name})"), known);
                }
                value
            }
            (None, Some(_)) => downward
                .iter()
                .find(|(name, _)| *name == var.name)
                .unwrap_or_else(|| panic!("no value for {} in the test", var.name))
                .1
                .to_string(),
            (None, None) => String::new(),
        };
        vars.insert(var.name.clone(), value);
    }
    vars
}

#[test]
fn under_linkerds_control_plane_the_proxy_gets_linkerds_variables() {
    for native in [false, true] {
        let mut flags = vec!["--linkerd-namespace", "linkerd"];
        if native {
            flags.push("--native-sidecar");
        }
        let run = inject(&golden_dir().join("input/deployment.yaml"), &flags);
        let spec = &pod_specs(&run.stdout)[0];
        let proxy = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == "tandem-proxy")
            .expect("a proxy container");
        let downward = [
            ("_pod_ns", "shop"),
            ("_pod_sa", "web"),
            ("_pod_name", "web-5d8f7c9b64-x2x9z"),
            ("_pod_nodeName", "node-a"),
            ("_pod_ips", "10.42.0.5,fd00::5"),
        ];
        let vars = expand(proxy, &downward);
        let var = |name: &str| vars.get(name).map(String::as_str);
        assert_eq!(
            var("LINKERD2_PROXY_IDENTITY_LOCAL_NAME"),
            Some("web.shop.serviceaccount.identity.linkerd.cluster.local")
        );
        assert_eq!(
            var("LINKERD2_PROXY_IDENTITY_SVC_ADDR"),
            Some("linkerd-identity-headless.linkerd.svc.cluster.local.:8080")
        );
        assert_eq!(
            var("LINKERD2_PROXY_IDENTITY_SVC_NAME"),
            Some("linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local")
        );
        assert_eq!(
            var("LINKERD2_PROXY_DESTINATION_CONTEXT"),
            Some(r#"{"ns":"shop","nodeName":"node-a","pod":"web-5d8f7c9b64-x2x9z"}"#)
        );
        assert_eq!(var("LINKERD2_PROXY_INBOUND_IPS"), Some("10.42.0.5,fd00::5"));
        // The container's ports, whose policies are watched from start-up.
        assert_eq!(var("LINKERD2_PROXY_INBOUND_PORTS"), Some("8080"));
        assert_eq!(
            var("LINKERD2_PROXY_INBOUND_DEFAULT_POLICY"),
            Some("all-unauthenticated")
        );

        // What the proxy reads from them, as it will read them in the pod.
        let config = tandem_proxy::config::Config::from_vars(&vars)
            .unwrap_or_else(|e| panic!("the injected variables do not read: {e}"));
        let control = config
            .control_plane
            .as_ref()
            .expect("discovery from the control plane");
        let controller =
            "linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local";
        assert_eq!(
            control.destination.addr,
            "linkerd-dst-headless.linkerd.svc.cluster.local.:8086"
        );
        assert_eq!(control.destination.name.as_deref(), Some(controller));
        assert_eq!(
            control.policy.addr,
            "linkerd-policy.linkerd.svc.cluster.local.:8090"
        );
        assert_eq!(control.policy.name.as_deref(), Some(controller));
        assert_eq!(
            control.workload,
            r#"{"ns":"shop","pod":"web-5d8f7c9b64-x2x9z"}"#
        );
        assert_eq!(control.profile_networks.len(), 5);
        assert_eq!(config.inbound_policy.ports, [8080]);
        assert_eq!(config.inbound_policy.cluster_networks.len(), 5);
        assert!(
            config.warnings.is_empty(),
            "every variable is read: {:?}",
            config.warnings
        );
    }

    // Other addresses replace Linkerd's; they mean nothing without the namespace.
    let run = inject(
        &golden_dir().join("input/deployment.yaml"),
        &[
            "--linkerd-namespace",
            "linkerd",
            "--destination-addr",
            "dst.example:8086",
            "--policy-addr",
            "policy.example:8090",
        ],
    );
    let spec = &pod_specs(&run.stdout)[0];
    let proxy = &spec.containers[0];
    assert_eq!(
        env_of(proxy, "LINKERD2_PROXY_DESTINATION_SVC_ADDR"),
        Some("dst.example:8086")
    );
    assert_eq!(
        env_of(proxy, "LINKERD2_PROXY_POLICY_SVC_ADDR"),
        Some("policy.example:8090")
    );
    let alone = inject_command(
        &golden_dir().join("anchors.pem"),
        &["--destination-addr", "dst.example:8086"],
    )
    .arg(golden_dir().join("input/deployment.yaml"))
    .output()
    .expect("run tandem-proxy inject");
    assert!(!alone.status.success());
    assert!(
        String::from_utf8_lossy(&alone.stderr).contains("--linkerd-namespace"),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );

    // Without the flag, nothing of Linkerd's control plane is set.
    let run = inject(&golden_dir().join("input/deployment.yaml"), &[]);
    let proxy = &pod_specs(&run.stdout)[0].containers[0];
    assert_eq!(env_of(proxy, "LINKERD2_PROXY_DESTINATION_SVC_ADDR"), None);
}

#[test]
fn bad_input_fails_with_one_line() {
    let anchors = golden_dir().join("anchors.pem");
    let fail = |stdin: &str, anchors: &Path| {
        let out = run_with_stdin(inject_command(anchors, &[]), stdin);
        assert!(!out.status.success(), "{stdin:?} should fail");
        assert!(out.stdout.is_empty(), "no partial output");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("tandem-proxy inject: "), "{err}");
        err
    };
    let err = fail("kind: Pod\nspec: [unclosed\n", &anchors);
    assert!(err.contains("not valid YAML"), "{err}");
    let err = fail(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    config.linkerd.io/opaque-ports: lots\nspec:\n  containers: []\n",
        &anchors,
    );
    assert!(
        err.contains("pod/p") && err.contains("opaque-ports"),
        "{err}"
    );
    let err = fail("kind: Pod\n", Path::new("/nonexistent/ca.crt"));
    assert!(err.contains("/nonexistent/ca.crt"), "{err}");
}

#[test]
fn the_type_check_catches_a_misspelt_field() {
    let pod: Json = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "image": "x", "restartPolicyy": "Always"}]}
    });
    let caught = std::panic::catch_unwind(|| validate(&pod));
    assert!(
        caught.is_err(),
        "a field Kubernetes does not know must fail"
    );
    let mut good = pod.clone();
    good["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("restartPolicyy");
    assert!(validate(&good).is_some());
}
