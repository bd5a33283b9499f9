//! `tandem-proxy inject`: adds Tandem to Kubernetes workloads, as `linkerd inject`
//! does, working on the YAML itself so that fields this code does not know (newer
//! Kubernetes fields, CRD extensions, comments aside) pass through untouched.
//!
//! What an injected pod gets, and why:
//! - `tandem-init` as the first init container: it installs the redirect rules, so
//!   it must run before anything that uses the network. It alone runs as root, with
//!   NET_ADMIN and NET_RAW only.
//! - The proxy, either as the first app container with a `postStart` hook that
//!   waits for `/ready` (kubelet starts the next container only after the hook),
//!   or, in native-sidecar mode, as the second init container with
//!   `restartPolicy: Always` and a `startupProbe` on `/ready` (kubelet starts the
//!   later init containers and the app only once the probe passes, and stops the
//!   proxy only after the app has exited).
//! - The identity directory on a memory-backed volume (keys never touch disk) and
//!   a projected service-account token for the issuer.
//! - A shutdown budget that fits the pod's grace period: in classic mode the proxy
//!   keeps serving for `config.tandem.io/shutdown-delay` after SIGTERM while the app
//!   drains, then drains itself, and the two together end a second before kubelet
//!   would kill it.
//!
//! Injection is idempotent: a pod that already has a `tandem-proxy` container is
//! left exactly as it is.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};

pub const PROXY_CONTAINER: &str = "tandem-proxy";
pub const INIT_CONTAINER: &str = "tandem-init";
pub const PROXY_UID: i64 = 2102;
pub const IDENTITY_DIR: &str = "/var/run/tandem/identity/end-entity";
const IDENTITY_VOLUME: &str = "tandem-identity-end-entity";
const TOKEN_VOLUME: &str = "tandem-identity-token";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const DISCOVERY_VOLUME: &str = "tandem-discovery";
const DISCOVERY_DIR: &str = "/var/run/tandem/discovery";
const XTABLES_LOCK_VOLUME: &str = "tandem-init-xtables-lock";
/// The audience Linkerd's identity service expects, so either issuer accepts the token.
const TOKEN_AUDIENCE: &str = "identity.l5d.io";
const DEFAULT_GRACE_SECONDS: u64 = 30;
const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);
/// Ports kubelet and Prometheus reach directly; never redirected inbound.
const ADMIN_PORTS: &str = "4190,4191";

pub const ANNOTATION_PROXY_VERSION: &str = "tandem.io/proxy-version";
const SAFE_TO_EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";
const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// Where injected proxies find the control plane and which images they run.
#[derive(Clone, Debug)]
pub struct InjectOptions {
    pub native_sidecar: bool,
    pub ha: bool,
    pub proxy_image: String,
    pub init_image: String,
    /// PEM of the trust anchors, put in every proxy's environment as Linkerd does.
    pub trust_anchors_pem: String,
    /// Namespace of the issuer (`tandem-identity`), as Linkerd's `linkerd` namespace.
    pub control_plane_namespace: String,
    pub trust_domain: String,
    /// The cluster's DNS domain, for the issuer's address.
    pub cluster_domain: String,
    /// Run under Linkerd's control plane instead of Tandem's issuer and the
    /// discovery file alone.
    pub linkerd: Option<LinkerdControlPlane>,
}

/// Linkerd's control plane, as Linkerd's injector points linkerd2-proxy at it.
#[derive(Clone, Debug)]
pub struct LinkerdControlPlane {
    /// Its namespace (`linkerd`), which names its services and identities.
    pub namespace: String,
    /// The Destination API, `host:port`; `None`: Linkerd's
    /// `linkerd-dst-headless.<namespace>.svc.<cluster domain>.:8086`.
    pub destination_addr: Option<String>,
    /// The policy API; `None`: `linkerd-policy.<namespace>.svc.<cluster domain>.:8090`.
    pub policy_addr: Option<String>,
    /// The pod networks (Linkerd's `clusterNetworks`), whose addresses are asked
    /// for profiles.
    pub cluster_networks: String,
}

impl InjectOptions {
    /// The issuer's TLS identity: Tandem's (which `deploy/` serves under), or
    /// Linkerd's identity service.
    pub fn issuer_identity(&self) -> String {
        let (service, ns) = match &self.linkerd {
            Some(linkerd) => ("linkerd-identity", &linkerd.namespace),
            None => ("tandem-identity", &self.control_plane_namespace),
        };
        format!(
            "{service}.{ns}.serviceaccount.identity.{ns}.{td}",
            td = self.trust_domain
        )
    }

    /// The issuer's address.
    fn issuer_addr(&self) -> String {
        let (service, ns) = match &self.linkerd {
            Some(linkerd) => ("linkerd-identity-headless", &linkerd.namespace),
            None => ("tandem-identity-headless", &self.control_plane_namespace),
        };
        format!("{service}.{ns}.svc.{}.:8080", self.cluster_domain)
    }

    /// The namespace that names identities (`<sa>.<ns>.serviceaccount.identity.<this>.<domain>`).
    fn identity_namespace(&self) -> &str {
        match &self.linkerd {
            Some(linkerd) => &linkerd.namespace,
            None => &self.control_plane_namespace,
        }
    }
}

/// The variables of Linkerd's injector that point a proxy at its control plane
/// (`$(…)` names are the pod's own, from the downward API).
fn linkerd_env(linkerd: &LinkerdControlPlane, options: &InjectOptions) -> Vec<(String, String)> {
    let ns = &linkerd.namespace;
    let domain = &options.cluster_domain;
    let controller = format!(
        "linkerd-destination.{ns}.serviceaccount.identity.{ns}.{}",
        options.trust_domain
    );
    let destination = linkerd
        .destination_addr
        .clone()
        .unwrap_or_else(|| format!("linkerd-dst-headless.{ns}.svc.{domain}.:8086"));
    let policy = linkerd
        .policy_addr
        .clone()
        .unwrap_or_else(|| format!("linkerd-policy.{ns}.svc.{domain}.:8090"));
    [
        ("LINKERD2_PROXY_DESTINATION_SVC_ADDR", destination),
        ("LINKERD2_PROXY_DESTINATION_SVC_NAME", controller.clone()),
        ("LINKERD2_PROXY_POLICY_SVC_ADDR", policy),
        ("LINKERD2_PROXY_POLICY_SVC_NAME", controller),
        (
            "LINKERD2_PROXY_POLICY_WORKLOAD",
            r#"{"ns":"$(_pod_ns)","pod":"$(_pod_name)"}"#.to_string(),
        ),
        (
            "LINKERD2_PROXY_DESTINATION_CONTEXT",
            r#"{"ns":"$(_pod_ns)","nodeName":"$(_pod_nodeName)","pod":"$(_pod_name)"}"#.to_string(),
        ),
        (
            "LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS",
            linkerd.cluster_networks.clone(),
        ),
        ("LINKERD2_PROXY_CONTROL_STREAM_INITIAL_TIMEOUT", "3s".into()),
        ("LINKERD2_PROXY_CONTROL_STREAM_IDLE_TIMEOUT", "5m".into()),
        ("LINKERD2_PROXY_CONTROL_STREAM_LIFETIME", "1h".into()),
        ("LINKERD2_PROXY_INBOUND_IPS", "$(_pod_ips)".into()),
        (
            "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY",
            "all-unauthenticated".into(),
        ),
        (
            "LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS",
            linkerd.cluster_networks.clone(),
        ),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value))
    .collect()
}

/// What happened to one object, for the report on stderr.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    AlreadyInjected,
    Skipped(String),
    NotAWorkload,
}

/// Injects every workload in a multi-document YAML stream. Returns the new stream
/// and one report line per workload.
pub fn inject_stream(
    input: &str,
    options: &InjectOptions,
) -> Result<(String, Vec<String>), String> {
    use serde::Deserialize;
    let mut documents = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let value = Value::deserialize(document)
            .map_err(|e| format!("document {}: not valid YAML: {e}", index + 1))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    let disabled_namespaces = disabled_namespaces(&documents);
    let mut report = Vec::new();
    for document in &mut documents {
        let is_list =
            kind(document) == "List" && document.get("items").is_some_and(Value::is_sequence);
        let items: &mut [Value] = match document.get_mut("items") {
            Some(Value::Sequence(items)) if is_list => items,
            _ => std::slice::from_mut(document),
        };
        for object in items.iter_mut() {
            let name = describe(object);
            match inject_object(object, options, &disabled_namespaces)
                .map_err(|e| format!("{name}: {e}"))?
            {
                Outcome::Injected => report.push(format!("{name} injected")),
                Outcome::AlreadyInjected => report.push(format!("{name} already injected")),
                Outcome::Skipped(why) => report.push(format!("{name} skipped: {why}")),
                Outcome::NotAWorkload => {}
            }
        }
    }
    let mut output = String::new();
    for (index, document) in documents.iter().enumerate() {
        if index > 0 {
            output.push_str("---\n");
        }
        output.push_str(&to_yaml(document)?);
    }
    Ok((output, report))
}

/// The YAML emitter writes YAML 1.2, which leaves strings like `on`, `yes` or
/// `1_000` unquoted; kubectl's YAML 1.1 parser would read those as booleans or
/// numbers and the API server would refuse the object. Such a document is written
/// as JSON instead (valid YAML in every version); all others stay readable YAML.
fn to_yaml(document: &Value) -> Result<String, String> {
    if has_yaml11_ambiguity(document) {
        let mut json = serde_json::to_string_pretty(document).map_err(|e| e.to_string())?;
        json.push('\n');
        Ok(json)
    } else {
        serde_yaml_ng::to_string(document).map_err(|e| e.to_string())
    }
}

fn has_yaml11_ambiguity(value: &Value) -> bool {
    match value {
        Value::String(text) => yaml11_reads_as_non_string(text),
        Value::Sequence(items) => items.iter().any(has_yaml11_ambiguity),
        Value::Mapping(map) => map
            .iter()
            .any(|(k, v)| has_yaml11_ambiguity(k) || has_yaml11_ambiguity(v)),
        Value::Tagged(tagged) => has_yaml11_ambiguity(&tagged.value),
        _ => false,
    }
}

/// YAML 1.1's booleans and its numbers with `_`, `:` (base 60), `0b` that YAML
/// 1.2 reads as strings.
/// Over-matching only costs readability (JSON output), never correctness.
fn yaml11_reads_as_non_string(text: &str) -> bool {
    // `true`, `false`, `null` and `~` are YAML 1.2 too, so the emitter quotes them.
    const WORDS: [&str; 6] = ["y", "n", "yes", "no", "on", "off"];
    if WORDS.iter().any(|w| text.eq_ignore_ascii_case(w)) {
        return true;
    }
    yaml11_number(text.strip_prefix(['-', '+']).unwrap_or(text))
}

fn yaml11_number(text: &str) -> bool {
    let digits = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_digit())
            && s.chars().all(|c| c.is_ascii_digit() || c == '_')
    };
    let fraction =
        |f: Option<&str>| f.is_none_or(|f| f.chars().all(|c| c.is_ascii_digit() || c == '_'));
    if let Some(binary) = text.strip_prefix("0b") {
        return !binary.is_empty() && binary.chars().all(|c| matches!(c, '0' | '1' | '_'));
    }
    if let Some(hex) = text.strip_prefix("0x") {
        return hex.contains('_') && hex.chars().all(|c| c.is_ascii_hexdigit() || c == '_');
    }
    match text.split_once(':') {
        // Base 60: `190:20:30` or `190:20:30.15`.
        Some((head, rest)) => {
            let sixty =
                |p: &str| (1..=2).contains(&p.len()) && p.parse::<u8>().is_ok_and(|n| n < 60);
            let (groups, last) = rest.rsplit_once(':').map_or(("", rest), |(g, l)| (g, l));
            let (last, frac) = last
                .split_once('.')
                .map_or((last, None), |(a, b)| (a, Some(b)));
            digits(head)
                && (groups.is_empty() || groups.split(':').all(sixty))
                && sixty(last)
                && fraction(frac)
        }
        // `1_000`, `1_000.5`, `.5_0`.
        None => {
            let (int, frac) = text
                .split_once('.')
                .map_or((text, None), |(a, b)| (a, Some(b)));
            text.contains('_') && (int.is_empty() || digits(int)) && fraction(frac)
        }
    }
}

fn kind(object: &Value) -> &str {
    object.get("kind").and_then(Value::as_str).unwrap_or("")
}

fn describe(object: &Value) -> String {
    let name = object
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    format!("{}/{name}", kind(object).to_ascii_lowercase())
}

/// Namespaces in the same input that opt out with an inject annotation.
fn disabled_namespaces(documents: &[Value]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut visit = |object: &Value| {
        if kind(object) == "Namespace" && inject_disabled(annotations(object)) {
            if let Some(name) = object
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
            {
                names.insert(name.to_string());
            }
        }
    };
    for document in documents {
        match document.get("items") {
            Some(Value::Sequence(items)) if kind(document) == "List" => {
                items.iter().for_each(&mut visit)
            }
            _ => visit(document),
        }
    }
    names
}

fn annotations(object: &Value) -> Option<&Mapping> {
    object.get("metadata")?.get("annotations")?.as_mapping()
}

fn inject_disabled(annotations: Option<&Mapping>) -> bool {
    let Some(annotations) = annotations else {
        return false;
    };
    ["linkerd.io/inject", "tandem.io/inject"]
        .iter()
        .any(|key| annotations.get(*key).and_then(Value::as_str) == Some("disabled"))
}

/// The pod template's path inside each workload kind.
fn pod_template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "ReplicaSet"
        | "StatefulSet"
        | "DaemonSet"
        | "Job"
        | "ReplicationController" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn inject_object(
    object: &mut Value,
    options: &InjectOptions,
    disabled_namespaces: &BTreeSet<String>,
) -> Result<Outcome, String> {
    let kind = kind(object).to_string();
    let Some(path) = pod_template_path(&kind) else {
        return Ok(Outcome::NotAWorkload);
    };
    let namespace = object
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if namespace == "kube-system" {
        return Ok(Outcome::Skipped("kube-system is never injected".into()));
    }
    if disabled_namespaces.contains(namespace) {
        return Ok(Outcome::Skipped(format!(
            "namespace {namespace} is annotated inject: disabled"
        )));
    }
    let workload_annotations = annotations(object).cloned().unwrap_or_default();
    let mut pod = &mut *object;
    for key in path {
        pod = pod
            .get_mut(*key)
            .ok_or_else(|| format!("has no {}", path.join(".")))?;
    }
    // The pod template's annotations win over the workload's, as in Linkerd.
    let mut settings = workload_annotations;
    if let Some(own) = annotations(pod) {
        for (key, value) in own {
            settings.insert(key.clone(), value.clone());
        }
    }
    if inject_disabled(Some(&settings)) {
        return Ok(Outcome::Skipped("annotated inject: disabled".into()));
    }
    let spec = pod
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or("has no pod spec")?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(
            "uses the host's network, where redirect rules would capture the node's traffic".into(),
        ));
    }
    if has_container(spec, "containers", PROXY_CONTAINER)
        || has_container(spec, "initContainers", PROXY_CONTAINER)
    {
        return Ok(Outcome::AlreadyInjected);
    }
    // Two proxies and two sets of redirect rules in one pod would fight.
    if has_container(spec, "containers", "linkerd-proxy")
        || has_container(spec, "initContainers", "linkerd-proxy")
    {
        return Ok(Outcome::Skipped(
            "already meshed by Linkerd (linkerd-proxy)".into(),
        ));
    }
    let native = match native_sidecar_annotation(&settings) {
        Some(value) => value,
        None => options.native_sidecar,
    };
    let job = kind == "Job" || kind == "CronJob";
    let plan = Plan::new(options, &settings, spec, native, job)?;
    let first_app_container = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .and_then(|c| c.first())
        .and_then(|c| c.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);

    let init = init_container(options, &plan);
    let proxy = proxy_container(options, &plan);
    let init_containers = sequence_entry(spec, "initContainers");
    init_containers.insert(0, init);
    if native {
        init_containers.insert(1, proxy);
    } else {
        sequence_entry(spec, "containers").insert(0, proxy);
    }
    let volumes = sequence_entry(spec, "volumes");
    volumes.push(yaml(&format!(
        "name: {IDENTITY_VOLUME}\nemptyDir:\n  medium: Memory\n"
    )));
    volumes.push(yaml(&format!(
        "name: {TOKEN_VOLUME}\nprojected:\n  sources:\n  - serviceAccountToken:\n      audience: {TOKEN_AUDIENCE}\n      expirationSeconds: 86400\n      path: {TOKEN_VOLUME}\n"
    )));
    volumes.push(yaml(&format!(
        "name: {DISCOVERY_VOLUME}\nconfigMap:\n  name: {DISCOVERY_VOLUME}\n  optional: true\n"
    )));
    volumes.push(yaml(&format!(
        "name: {XTABLES_LOCK_VOLUME}\nemptyDir: {{}}\n"
    )));

    let pod_annotations = mapping_entry(
        pod.as_mapping_mut()
            .ok_or("pod template is not a mapping")?,
        "metadata",
    );
    let pod_annotations = mapping_entry(pod_annotations, "annotations");
    pod_annotations.insert(
        ANNOTATION_PROXY_VERSION.into(),
        env!("CARGO_PKG_VERSION").into(),
    );
    // The memory-backed identity volume otherwise stops the cluster autoscaler
    // from draining the node (Linkerd #4067).
    if !pod_annotations.contains_key(SAFE_TO_EVICT) {
        pod_annotations.insert(SAFE_TO_EVICT.into(), "true".into());
    }
    // `kubectl logs/exec` keep going to the app, not to the proxy put first.
    if let Some(app) = first_app_container {
        if !pod_annotations.contains_key(DEFAULT_CONTAINER) {
            pod_annotations.insert(DEFAULT_CONTAINER.into(), app.into());
        }
    }
    Ok(Outcome::Injected)
}

/// Linkerd's three spellings of the switch (GA, beta, alpha), then Tandem's.
fn native_sidecar_annotation(settings: &Mapping) -> Option<bool> {
    [
        "config.tandem.io/native-sidecar",
        "config.linkerd.io/proxy-enable-native-sidecar",
        "config.beta.linkerd.io/proxy-enable-native-sidecar",
        "config.alpha.linkerd.io/proxy-enable-native-sidecar",
    ]
    .iter()
    .find_map(|key| match settings.get(*key)?.as_str()?.trim() {
        "true" | "enabled" => Some(true),
        "false" | "disabled" => Some(false),
        _ => None,
    })
}

fn has_container(spec: &Mapping, list: &str, name: &str) -> bool {
    spec.get(list)
        .and_then(Value::as_sequence)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
        })
}

fn sequence_entry<'m>(map: &'m mut Mapping, key: &str) -> &'m mut Vec<Value> {
    let entry = map
        .entry(key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if !entry.is_sequence() {
        *entry = Value::Sequence(Vec::new());
    }
    entry.as_sequence_mut().expect("just made a sequence")
}

fn mapping_entry<'m>(map: &'m mut Mapping, key: &str) -> &'m mut Mapping {
    let entry = map
        .entry(key.into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if !entry.is_mapping() {
        *entry = Value::Mapping(Mapping::new());
    }
    entry.as_mapping_mut().expect("just made a mapping")
}

/// Fixed fragments are written as YAML text: easier to read than builder calls.
fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("built-in YAML fragment")
}

/// Everything decided from annotations and the pod before containers are built.
struct Plan {
    native: bool,
    skip_inbound: String,
    skip_outbound: String,
    opaque_ports: Option<String>,
    extra_opaque_ports: Option<String>,
    log_level: String,
    log_format: Option<String>,
    shutdown_delay: Option<Duration>,
    drain: Duration,
    shutdown_endpoint: bool,
    resources: Option<Value>,
    cores_min: Option<u64>,
    cores_max: Option<u64>,
    /// The pod's container ports (init containers too), sorted: the ports whose
    /// policies the proxy watches from start-up under Linkerd's control plane.
    inbound_ports: String,
}

impl Plan {
    fn new(
        options: &InjectOptions,
        settings: &Mapping,
        spec: &Mapping,
        native: bool,
        job: bool,
    ) -> Result<Plan, String> {
        let annotation = |key: &str| settings.get(key).and_then(Value::as_str).map(str::trim);
        let ports = |key: &str| -> Result<Option<String>, String> {
            match annotation(key) {
                None | Some("") => Ok(None),
                Some(text) => check_ports(text)
                    .map(Some)
                    .map_err(|e| format!("{key}: {e}")),
            }
        };
        let skip_inbound = match ports("config.linkerd.io/skip-inbound-ports")? {
            Some(extra) => format!("{ADMIN_PORTS},{extra}"),
            None => ADMIN_PORTS.to_string(),
        };
        let skip_outbound = ports("config.linkerd.io/skip-outbound-ports")?.unwrap_or_default();
        let duration = |key: &str| -> Result<Option<Duration>, String> {
            annotation(key)
                .map(|text| crate::config::parse_duration(text).map_err(|e| format!("{key}: {e}")))
                .transpose()
        };
        let grace = spec
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_GRACE_SECONDS);
        let grace = Duration::from_secs(grace);
        let asked_drain = duration("config.linkerd.io/shutdown-grace-period")?;
        // A second before kubelet's SIGKILL, so the proxy ends on its own terms.
        let budget = grace.saturating_sub(Duration::from_secs(1));
        let shutdown_delay = if native {
            None
        } else {
            match duration("config.tandem.io/shutdown-delay")? {
                Some(delay) if delay >= budget && !delay.is_zero() => {
                    return Err(format!(
                        "config.tandem.io/shutdown-delay {delay:?} leaves no time to drain within terminationGracePeriodSeconds {}",
                        grace.as_secs()
                    ));
                }
                Some(delay) => Some(delay),
                // Short grace periods get a share of it, so the drain keeps the rest.
                None => Some(DEFAULT_SHUTDOWN_DELAY.min(budget / 2)),
            }
        };
        let room = budget - shutdown_delay.unwrap_or_default();
        let drain = asked_drain.unwrap_or(room).min(room);

        let admin_shutdown = match annotation("config.linkerd.io/proxy-admin-shutdown") {
            Some("enabled") => true,
            Some("disabled") => false,
            _ => job && !native,
        };

        let quantity = |key: &str| -> Result<Option<String>, String> {
            match annotation(key) {
                None | Some("") => Ok(None),
                Some(text) => check_quantity(text)
                    .map(|_| Some(text.to_string()))
                    .map_err(|e| format!("{key}: {e}")),
            }
        };
        let cpu_request = quantity("config.linkerd.io/proxy-cpu-request")?;
        let cpu_limit = quantity("config.linkerd.io/proxy-cpu-limit")?;
        let memory_request = quantity("config.linkerd.io/proxy-memory-request")?;
        let memory_limit = quantity("config.linkerd.io/proxy-memory-limit")?;
        // Linkerd's HA values for the proxy: enough to schedule honestly, a memory
        // ceiling against leaks, no CPU limit (throttling only adds latency).
        let (default_cpu_request, default_memory_request, default_memory_limit) = if options.ha {
            (Some("100m"), Some("20Mi"), Some("250Mi"))
        } else {
            (None, None, None)
        };
        let pick = |own: &Option<String>, default: Option<&str>| {
            own.clone().or(default.map(str::to_string))
        };
        let requests = [
            ("cpu", pick(&cpu_request, default_cpu_request)),
            ("memory", pick(&memory_request, default_memory_request)),
        ];
        let limits = [
            ("cpu", cpu_limit.clone()),
            ("memory", pick(&memory_limit, default_memory_limit)),
        ];
        let section = |entries: &[(&str, Option<String>)]| {
            let map: Mapping = entries
                .iter()
                .filter_map(|(k, v)| Some(((*k).into(), v.clone()?.into())))
                .collect();
            (!map.is_empty()).then_some(Value::Mapping(map))
        };
        let mut resources = Mapping::new();
        if let Some(limits) = section(&limits) {
            resources.insert("limits".into(), limits);
        }
        if let Some(requests) = section(&requests) {
            resources.insert("requests".into(), requests);
        }

        Ok(Plan {
            native,
            skip_inbound,
            skip_outbound,
            opaque_ports: ports("config.linkerd.io/opaque-ports")?,
            extra_opaque_ports: ports("config.tandem.io/extra-opaque-ports")?,
            log_level: annotation("config.linkerd.io/proxy-log-level")
                .unwrap_or("warn,tandem=info")
                .to_string(),
            log_format: annotation("config.linkerd.io/proxy-log-format").map(str::to_string),
            shutdown_delay,
            drain,
            shutdown_endpoint: admin_shutdown,
            resources: (!resources.is_empty()).then_some(Value::Mapping(resources)),
            // Threads follow the CPU request and limit, rounded up, as Linkerd's injector.
            cores_min: cpu_request.as_deref().map(whole_cpus).transpose()?,
            cores_max: cpu_limit.as_deref().map(whole_cpus).transpose()?,
            inbound_ports: container_ports(spec),
        })
    }
}

/// Every `containerPort` of the pod's containers and init containers, sorted and
/// without repeats, as Linkerd's injector lists them in `LINKERD2_PROXY_INBOUND_PORTS`.
fn container_ports(spec: &Mapping) -> String {
    let mut ports = BTreeSet::new();
    for list in ["containers", "initContainers"] {
        let containers = spec.get(list).and_then(Value::as_sequence);
        for container in containers.into_iter().flatten() {
            let declared = container.get("ports").and_then(Value::as_sequence);
            for port in declared.into_iter().flatten() {
                if let Some(number) = port.get("containerPort").and_then(Value::as_u64) {
                    ports.insert(number);
                }
            }
        }
    }
    ports
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn check_ports(text: &str) -> Result<String, String> {
    crate::config::PortSet::parse(text)?;
    Ok(text.split(',').map(str::trim).collect::<Vec<_>>().join(","))
}

/// Accepts the Kubernetes quantities people write for CPU and memory.
fn check_quantity(text: &str) -> Result<(), String> {
    const SUFFIXES: [&str; 14] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E", "",
    ];
    let number = SUFFIXES
        .iter()
        .find_map(|s| text.strip_suffix(s).filter(|n| !n.is_empty()))
        .unwrap_or(text);
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Ok(()),
        _ => Err(format!("{text:?} is not a Kubernetes quantity")),
    }
}

fn whole_cpus(text: &str) -> Result<u64, String> {
    let cores = match text.strip_suffix('m') {
        Some(millis) => millis.parse::<f64>().map(|m| m / 1000.0),
        None => text.parse::<f64>(),
    }
    .map_err(|_| format!("{text:?} is not a CPU quantity"))?;
    Ok((cores.ceil() as u64).max(1))
}

fn init_container(options: &InjectOptions, plan: &Plan) -> Value {
    let mut args = format!(
        "- --incoming-proxy-port\n- \"4143\"\n- --outgoing-proxy-port\n- \"4140\"\n- --proxy-uid\n- \"{PROXY_UID}\"\n- --inbound-ports-to-ignore\n- \"{}\"\n",
        plan.skip_inbound
    );
    if !plan.skip_outbound.is_empty() {
        let _ = writeln!(
            args,
            "- --outbound-ports-to-ignore\n- \"{}\"",
            plan.skip_outbound
        );
    }
    let mut init = yaml(&format!(
        r#"
name: {INIT_CONTAINER}
image: {image}
imagePullPolicy: IfNotPresent
securityContext:
  allowPrivilegeEscalation: false
  capabilities:
    add: [NET_ADMIN, NET_RAW]
    drop: [ALL]
  privileged: false
  readOnlyRootFilesystem: true
  runAsNonRoot: false
  runAsUser: 0
  seccompProfile:
    type: RuntimeDefault
terminationMessagePolicy: FallbackToLogsOnError
volumeMounts:
- name: {XTABLES_LOCK_VOLUME}
  mountPath: /run
"#,
        image = quoted(&options.init_image),
    ));
    init.as_mapping_mut()
        .expect("fragment is a mapping")
        .insert("args".into(), yaml(&args));
    init
}

fn proxy_container(options: &InjectOptions, plan: &Plan) -> Value {
    let mut env: Vec<(String, String)> = vec![
        ("LINKERD2_PROXY_LOG".into(), plan.log_level.clone()),
        (
            "LINKERD2_PROXY_ADMIN_LISTEN_ADDR".into(),
            "0.0.0.0:4191".into(),
        ),
        (
            "LINKERD2_PROXY_INBOUND_LISTEN_ADDR".into(),
            "0.0.0.0:4143".into(),
        ),
        (
            "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR".into(),
            "127.0.0.1:4140".into(),
        ),
    ];
    if let Some(format) = &plan.log_format {
        env.push(("LINKERD2_PROXY_LOG_FORMAT".into(), format.clone()));
    }
    if let Some(ports) = &plan.opaque_ports {
        env.push((
            "LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION".into(),
            ports.clone(),
        ));
    }
    if let Some(ports) = &plan.extra_opaque_ports {
        env.push(("TANDEM_EXTRA_OPAQUE_PORTS".into(), ports.clone()));
    }
    if let Some(min) = plan.cores_min {
        env.push(("LINKERD2_PROXY_CORES_MIN".into(), min.to_string()));
    }
    if let Some(max) = plan.cores_max {
        env.push(("LINKERD2_PROXY_CORES_MAX".into(), max.to_string()));
    }
    env.push((
        "LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD".into(),
        format!("{}ms", plan.drain.as_millis()),
    ));
    if let Some(delay) = plan.shutdown_delay {
        env.push((
            "TANDEM_SHUTDOWN_DELAY".into(),
            format!("{}ms", delay.as_millis()),
        ));
    }
    if plan.shutdown_endpoint {
        env.push((
            "LINKERD2_PROXY_SHUTDOWN_ENDPOINT_ENABLED".into(),
            "true".into(),
        ));
    }
    let cp = options.identity_namespace();
    env.extend([
        ("LINKERD2_PROXY_IDENTITY_DIR".into(), IDENTITY_DIR.into()),
        (
            "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS".into(),
            options.trust_anchors_pem.clone(),
        ),
        (
            "LINKERD2_PROXY_IDENTITY_TOKEN_FILE".into(),
            format!("{TOKEN_DIR}/{TOKEN_VOLUME}"),
        ),
        (
            "LINKERD2_PROXY_IDENTITY_SVC_ADDR".into(),
            options.issuer_addr(),
        ),
        (
            "LINKERD2_PROXY_IDENTITY_SVC_NAME".into(),
            options.issuer_identity(),
        ),
        (
            "LINKERD2_PROXY_IDENTITY_LOCAL_NAME".into(),
            format!(
                "$(_pod_sa).$(_pod_ns).serviceaccount.identity.{cp}.{}",
                options.trust_domain
            ),
        ),
        (
            "TANDEM_DISCOVERY_FILE".into(),
            format!("{DISCOVERY_DIR}/discovery.yaml"),
        ),
    ]);
    // The pod's own service account and namespace come from the downward API; the
    // identity name refers to them with Kubernetes' $(VAR) expansion.
    let mut env_list = vec![
        yaml("name: _pod_ns\nvalueFrom:\n  fieldRef:\n    fieldPath: metadata.namespace\n"),
        yaml("name: _pod_sa\nvalueFrom:\n  fieldRef:\n    fieldPath: spec.serviceAccountName\n"),
    ];
    if let Some(linkerd) = &options.linkerd {
        env_list.extend([
            yaml("name: _pod_name\nvalueFrom:\n  fieldRef:\n    fieldPath: metadata.name\n"),
            yaml("name: _pod_nodeName\nvalueFrom:\n  fieldRef:\n    fieldPath: spec.nodeName\n"),
            yaml("name: _pod_ips\nvalueFrom:\n  fieldRef:\n    fieldPath: status.podIPs\n"),
        ]);
        env.extend(linkerd_env(linkerd, options));
        if !plan.inbound_ports.is_empty() {
            env.push((
                "LINKERD2_PROXY_INBOUND_PORTS".into(),
                plan.inbound_ports.clone(),
            ));
        }
    }
    for (name, value) in env {
        let mut entry = Mapping::new();
        entry.insert("name".into(), name.into());
        entry.insert("value".into(), value.into());
        env_list.push(Value::Mapping(entry));
    }

    let mut proxy = yaml(&format!(
        r#"
name: {PROXY_CONTAINER}
image: {image}
imagePullPolicy: IfNotPresent
ports:
- name: tandem-proxy
  containerPort: 4143
- name: tandem-admin
  containerPort: 4191
livenessProbe:
  httpGet:
    path: /live
    port: 4191
  initialDelaySeconds: 10
  timeoutSeconds: 1
readinessProbe:
  httpGet:
    path: /ready
    port: 4191
  initialDelaySeconds: 2
  timeoutSeconds: 1
securityContext:
  allowPrivilegeEscalation: false
  capabilities:
    drop: [ALL]
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  runAsUser: {PROXY_UID}
  runAsGroup: {PROXY_UID}
  seccompProfile:
    type: RuntimeDefault
terminationMessagePolicy: FallbackToLogsOnError
volumeMounts:
- name: {IDENTITY_VOLUME}
  mountPath: {IDENTITY_DIR}
- name: {TOKEN_VOLUME}
  mountPath: {TOKEN_DIR}
  readOnly: true
- name: {DISCOVERY_VOLUME}
  mountPath: {DISCOVERY_DIR}
  readOnly: true
"#,
        image = quoted(&options.proxy_image),
    ));
    let container = proxy.as_mapping_mut().expect("fragment is a mapping");
    container.insert("env".into(), Value::Sequence(env_list));
    if let Some(resources) = &plan.resources {
        container.insert("resources".into(), resources.clone());
    }
    if plan.native {
        container.insert("restartPolicy".into(), "Always".into());
        container.insert(
            "startupProbe".into(),
            yaml("httpGet:\n  path: /ready\n  port: 4191\ninitialDelaySeconds: 0\nperiodSeconds: 1\nfailureThreshold: 120\ntimeoutSeconds: 1\n"),
        );
    } else {
        container.insert(
            "lifecycle".into(),
            yaml("postStart:\n  exec:\n    command: [/usr/local/bin/tandem-proxy, await, --timeout, 2m]\n"),
        );
    }
    proxy
}

/// A scalar as YAML text that cannot be misread (e.g. an image tag like `1.10`).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> InjectOptions {
        InjectOptions {
            native_sidecar: false,
            ha: false,
            proxy_image: "tandem-proxy:test".into(),
            init_image: "tandem-init:test".into(),
            trust_anchors_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                .into(),
            control_plane_namespace: "tandem".into(),
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            linkerd: None,
        }
    }

    const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  template:\n    spec:\n      containers:\n      - name: app\n        image: nginx\n";

    #[test]
    fn reinjecting_changes_nothing() {
        let (once, report) = inject_stream(DEPLOYMENT, &options()).unwrap();
        assert_eq!(report, ["deployment/web injected"]);
        let (twice, report) = inject_stream(&once, &options()).unwrap();
        assert_eq!(report, ["deployment/web already injected"]);
        assert_eq!(once, twice);
    }

    #[test]
    fn shutdown_budget_fits_the_grace_period() {
        let input = DEPLOYMENT.replace(
            "    spec:\n      containers:",
            "    spec:\n      terminationGracePeriodSeconds: 20\n      containers:",
        );
        let (out, _) = inject_stream(&input, &options()).unwrap();
        assert!(out.contains("value: 5000ms"), "{out}");
        assert!(
            out.contains("value: 14000ms"),
            "5 s delay + 14 s drain + 1 s margin: {out}"
        );
        let too_long = input.replace(
            "  template:\n",
            "  template:\n    metadata:\n      annotations:\n        config.tandem.io/shutdown-delay: 19s\n",
        );
        let err = inject_stream(&too_long, &options()).unwrap_err();
        assert!(
            err.contains("shutdown-delay") && err.contains("deployment/web"),
            "{err}"
        );
    }

    #[test]
    fn strings_yaml_1_1_would_misread_stay_strings() {
        let input = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: \"on\"\n  b: \"1_000\"\n";
        let (out, _) = inject_stream(input, &options()).unwrap();
        assert!(out.contains("\"a\": \"on\""), "{out}");
        assert!(out.contains("\"b\": \"1_000\""), "{out}");
        let plain = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: online\n";
        let (out, _) = inject_stream(plain, &options()).unwrap();
        assert!(
            out.contains("a: online"),
            "ordinary documents stay YAML: {out}"
        );
        for word in [
            "Yes",
            "OFF",
            "y",
            "12:30",
            "190:20:30.15",
            "1_000",
            "0b101",
            "-1_0",
            "0x_1F",
        ] {
            assert!(yaml11_reads_as_non_string(word), "{word}");
        }
        for word in [
            "yesterday",
            "4190,4191",
            "10s",
            "1.10",
            "nginx",
            "0.0.0.0:4191",
            "10:4191",
            "a_b",
        ] {
            assert!(!yaml11_reads_as_non_string(word), "{word}");
        }
    }

    #[test]
    fn a_tiny_grace_period_still_injects() {
        let input = DEPLOYMENT.replace(
            "    spec:\n      containers:",
            "    spec:\n      terminationGracePeriodSeconds: 0\n      containers:",
        );
        let (out, _) = inject_stream(&input, &options()).unwrap();
        assert!(
            out.contains("name: TANDEM_SHUTDOWN_DELAY\n          value: 0ms"),
            "{out}"
        );
    }

    #[test]
    fn bad_annotations_name_themselves() {
        let input = DEPLOYMENT.replace(
            "metadata:\n  name: web\n",
            "metadata:\n  name: web\n  annotations:\n    config.linkerd.io/skip-inbound-ports: http\n",
        );
        let err = inject_stream(&input, &options()).unwrap_err();
        assert!(
            err.contains("config.linkerd.io/skip-inbound-ports"),
            "{err}"
        );
    }

    #[test]
    fn cpu_quantities_round_up_to_threads() {
        assert_eq!(whole_cpus("100m"), Ok(1));
        assert_eq!(whole_cpus("1500m"), Ok(2));
        assert_eq!(whole_cpus("2"), Ok(2));
        assert!(whole_cpus("lots").is_err());
        assert!(check_quantity("20Mi").is_ok());
        assert!(check_quantity("Mi").is_err());
        assert!(check_quantity("inf").is_err());
        assert!(check_quantity("NaN").is_err());
    }
}
