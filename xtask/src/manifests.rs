//! A strict parse of the Kubernetes manifests in `deploy/kubernetes/` (test-only: the
//! `k8s-openapi` types are dev-dependencies, so `cargo xtask` itself never compiles them).
//!
//! `k8s-openapi` ignores unknown fields when it deserializes, so a typo such as
//! `readOnlyRootFileSystem` would parse and then be dropped silently by the API server too
//! (it prunes unknown fields, with a warning at best). Each document is deserialized into
//! its type, serialized back, and every field of the YAML must come back with its value:
//! what does not was not understood.

use std::path::Path;

use k8s_openapi::{
    api::{apps::v1::DaemonSet, core::v1::Namespace},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The Prometheus Operator's PodMonitor, as much of it as podmonitor.yaml uses; the CRD's
/// types are not in k8s-openapi.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    selector: LabelSelector,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace_selector: Option<NamespaceSelector>,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMetricsEndpoint {
    port: String,
    path: String,
    interval: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    relabelings: Vec<Relabeling>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Relabeling {
    source_labels: Vec<String>,
    target_label: String,
}

/// The fields of `original` that `round_trip` lacks or holds another value for, as paths.
fn lost(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let here = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => lost(v, w, &here, out),
                    None => out.push(here),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path} ({a} became {b})")),
    }
}

/// Parses every document of `text` as the type its `kind` names; the fields not understood.
fn check(text: &str) -> Result<Vec<String>, String> {
    let mut problems = Vec::new();
    let mut docs = 0;
    for doc in serde_yaml::Deserializer::from_str(text) {
        let original = Value::deserialize(doc).map_err(|e| e.to_string())?;
        if original.is_null() {
            continue;
        }
        docs += 1;
        let kind = original["kind"].as_str().unwrap_or_default().to_owned();
        let back = match kind.as_str() {
            "DaemonSet" => round_trip::<DaemonSet>(&original),
            "Namespace" => round_trip::<Namespace>(&original),
            "PodMonitor" => round_trip::<PodMonitor>(&original),
            other => return Err(format!("no type for kind {other:?}")),
        }
        .map_err(|e| format!("{kind}: {e}"))?;
        lost(&original, &back, &kind, &mut problems);
    }
    if docs == 0 {
        return Err("no document".into());
    }
    Ok(problems)
}

fn round_trip<T: serde::de::DeserializeOwned + Serialize>(v: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

fn manifests() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_manifest_parses_strictly() {
    let files = manifests();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "daemonset.yaml",
        "daemonset-privileged.yaml",
        "namespace.yaml",
        "podmonitor.yaml",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for (name, text) in &files {
        assert_eq!(check(text), Ok(vec![]), "{name}");
    }
}

#[test]
fn a_misspelt_field_fails_the_parse() {
    let files = manifests();
    let (_, daemonset) = files
        .iter()
        .find(|(n, _)| n == "daemonset.yaml")
        .expect("daemonset.yaml");
    for (right, wrong, path) in [
        (
            "readOnlyRootFilesystem",
            "readOnlyRootFileSystem",
            "securityContext.readOnlyRootFileSystem",
        ),
        ("hostPID", "hostPid", "spec.hostPid"),
        (
            "readOnly: true",
            "readonly: true",
            "volumeMounts[0].readonly",
        ),
    ] {
        let typo = daemonset.replacen(right, wrong, 1);
        assert_ne!(&typo, daemonset, "{right} not in daemonset.yaml");
        let problems = check(&typo).unwrap();
        assert!(
            problems.iter().any(|p| p.contains(path)),
            "{wrong}: {problems:?}"
        );
    }
    let (_, monitor) = files
        .iter()
        .find(|(n, _)| n == "podmonitor.yaml")
        .expect("podmonitor.yaml");
    let typo = monitor.replacen("podMetricsEndpoints", "podMetricEndpoints", 1);
    assert!(check(&typo).is_err(), "a misspelt PodMonitor field parsed");
}

#[test]
fn a_changed_value_is_reported_too() {
    let mut out = Vec::new();
    let a: Value = serde_json::json!({"a": {"b": 1, "c": [1, 2]}});
    let b: Value = serde_json::json!({"a": {"b": 2, "c": [1, 2]}});
    lost(&a, &b, "x", &mut out);
    assert_eq!(out, ["x.a.b (1 became 2)"]);
}

#[test]
fn the_privileged_variant_differs_only_in_its_security_context() {
    let files = manifests();
    let doc = |name: &str| -> Value {
        let (_, text) = files
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let mut v: Value = serde_yaml::from_str(text).unwrap();
        let container = &mut v["spec"]["template"]["spec"]["containers"][0];
        assert!(
            container["securityContext"].is_object(),
            "{name}: no securityContext"
        );
        container["securityContext"] = Value::Null;
        v
    };
    assert_eq!(
        doc("daemonset.yaml"),
        doc("daemonset-privileged.yaml"),
        "the privileged variant drifted from daemonset.yaml"
    );
}
