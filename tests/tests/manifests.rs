//! The issuer's deploy manifests (`identity/deploy/`): every object parses as its
//! Kubernetes type with nothing lost, the HA settings are there, the names line up
//! with what `tandem-proxy inject` gives proxies, and the real `tandem-identity`
//! accepts the Deployment's arguments.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value as Json;
use tandem_tests::bin_path;
use tandem_tests::kube::{round_trip as typed, yaml_documents};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../identity/deploy")
}

fn documents(file: &str) -> Vec<Json> {
    yaml_documents(&std::fs::read_to_string(deploy_dir().join(file)).expect("manifest"))
}

#[test]
fn the_issuer_deployment_is_highly_available() {
    let docs = documents("tandem-identity.yaml");
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    for doc in &docs {
        match doc["kind"].as_str().unwrap() {
            "Namespace" => drop(typed::<Namespace>(doc)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(doc)),
            "ClusterRole" => drop(typed::<ClusterRole>(doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc)),
            "Deployment" => drop(typed::<Deployment>(doc)),
            "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(doc)),
            "Service" => drop(typed::<Service>(doc)),
            other => panic!("unexpected {other}"),
        }
    }

    let namespace: Namespace = typed(find("Namespace", "tandem"));
    let annotations = namespace.metadata.annotations.unwrap();
    assert_eq!(
        annotations.get("tandem.io/inject").map(String::as_str),
        Some("disabled"),
        "the control plane is not injected"
    );

    let deployment: Deployment = typed(find("Deployment", "tandem-identity"));
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let labels = spec.selector.match_labels.clone().unwrap();
    let pod = spec.template.spec.unwrap();
    let anti = pod.affinity.unwrap().pod_anti_affinity.unwrap();
    let required = anti
        .required_during_scheduling_ignored_during_execution
        .unwrap();
    assert_eq!(required.len(), 1);
    assert_eq!(required[0].topology_key, "kubernetes.io/hostname");
    assert_eq!(
        required[0].label_selector.as_ref().unwrap().match_labels,
        Some(labels.clone()),
        "anti-affinity must select the issuer's own pods"
    );
    let preferred = anti
        .preferred_during_scheduling_ignored_during_execution
        .unwrap();
    assert_eq!(
        preferred[0].pod_affinity_term.topology_key,
        "topology.kubernetes.io/zone"
    );
    let container = &pod.containers[0];
    let requests = container
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let args = container.args.clone().unwrap();
    let arg_after = |flag: &str| {
        let at = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("no {flag}"));
        args[at + 1].clone()
    };
    // The names proxies are injected with (see `tandem-proxy inject`).
    assert_eq!(
        arg_after("--tls-name"),
        "tandem-identity.tandem.serviceaccount.identity.tandem.cluster.local"
    );
    assert_eq!(
        arg_after("--identity-suffix"),
        "serviceaccount.identity.tandem.cluster.local"
    );
    assert!(args.contains(&"--kubernetes-token-review".to_string()));

    let budget: PodDisruptionBudget = typed(find("PodDisruptionBudget", "tandem-identity"));
    let budget = budget.spec.unwrap();
    assert_eq!(budget.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(budget.selector.unwrap().match_labels, Some(labels.clone()));

    let headless: Service = typed(find("Service", "tandem-identity-headless"));
    let headless = headless.spec.unwrap();
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.selector, Some(labels));
    assert_eq!(headless.ports.unwrap()[0].port, 8080);

    let role: ClusterRole = typed(find("ClusterRole", "tandem-identity"));
    let rule = &role.rules.unwrap()[0];
    assert_eq!(
        rule.resources.as_deref(),
        Some(&["tokenreviews".to_string()][..])
    );
    assert_eq!(rule.verbs, ["create"]);
}

#[test]
fn the_deployments_arguments_are_accepted_by_tandem_identity() {
    let docs = documents("tandem-identity.yaml");
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let args: Vec<String> = serde_json::from_value(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
    )
    .unwrap();
    // Outside a pod the files are missing: the run must fail on them, not on a flag.
    let out = Command::new(bin_path("tandem-identity"))
        .args(&args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(2), "a usage error: {stderr}");
    assert!(!out.status.success());
    assert!(
        stderr.contains("tandem-identity: ") && !stderr.contains("unexpected argument"),
        "{stderr}"
    );
}

#[test]
fn cert_manager_writes_the_secret_the_issuer_mounts() {
    let docs = documents("cert-manager.yaml");
    let certificate = docs
        .iter()
        .find(|d| d["kind"] == "Certificate")
        .expect("a Certificate");
    let spec = &certificate["spec"];
    assert_eq!(spec["isCA"], true);
    assert_eq!(spec["privateKey"]["algorithm"], "ECDSA");
    assert_eq!(spec["privateKey"]["size"], 256);
    let issuer = docs
        .iter()
        .find(|d| d["kind"] == "Issuer")
        .expect("an Issuer");
    assert_eq!(spec["issuerRef"]["name"], issuer["metadata"]["name"]);

    let deployment = documents("tandem-identity.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let deployment: Deployment = typed(&deployment);
    let volumes = deployment
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .volumes
        .unwrap();
    let secrets: Vec<_> = volumes
        .iter()
        .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
        .collect();
    assert!(
        secrets
            .iter()
            .any(|s| s == spec["secretName"].as_str().unwrap()),
        "{secrets:?}"
    );
}
