//! What installs the product: every YAML document under `manifests/` (plain, chart CRDs and
//! rendered) and `examples/` parses into its Kubernetes type with no field dropped or changed;
//! the CRDs are structural, keep Istio's names, groups and versions, accept the examples of
//! Istio's documentation and refuse invalid objects (a small structural-schema validator below
//! applies them as the API server would); the ztunnel DaemonSet, the CA and the waypoint have
//! the privileges, probes and settings they need and no more, and only read what the proxies
//! watch; the rendered YAML is in sync with the charts; the kind e2e script is valid bash and
//! skips cleanly where Docker or kind are missing.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Pod, PodSpec, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Loading

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// One YAML document and where it came from.
#[derive(Debug, Clone)]
struct Doc {
    /// `file#index`, for messages.
    origin: String,
    value: Value,
}

impl Doc {
    fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or("")
    }
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    fn typed<T: DeserializeOwned + Serialize>(&self) -> T {
        roundtrip(&self.value).unwrap_or_else(|e| panic!("{}: {e}", self.origin))
    }
}

/// Every non-empty document of a YAML file (anchors and aliases resolved, as the API server's
/// YAML reader does), as JSON.
fn load(path: &Path) -> Vec<Doc> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rel = path
        .strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string();
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let yaml = <serde_yaml::Value as serde::Deserialize>::deserialize(de)
            .unwrap_or_else(|e| panic!("{rel}: document {i}: {e}"));
        if yaml.is_null() {
            continue;
        }
        // Via serde_yaml::Value, so integer map keys (`portLevelMtls: {8080: ...}`) become
        // strings, as in JSON.
        let value = serde_json::to_value(&yaml).unwrap_or_else(|e| panic!("{rel}#{i}: {e}"));
        docs.push(Doc {
            origin: format!("{rel}#{i}"),
            value,
        });
    }
    docs
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            // Chart templates are not YAML until rendered; their rendering is checked instead.
            if name != "templates" {
                yaml_files(&path, out);
            }
        } else if (name.ends_with(".yaml") || name.ends_with(".yaml.off"))
            && name != "Chart.yaml"
            && name != "values.yaml"
        {
            out.push(path);
        }
    }
}

fn docs_under(dir: &str) -> Vec<Doc> {
    let mut files = Vec::new();
    yaml_files(&root().join(dir), &mut files);
    assert!(!files.is_empty(), "no YAML under {dir}");
    files.iter().flat_map(|f| load(f)).collect()
}

fn rendered(chart: &str) -> Vec<Doc> {
    load(&root().join(format!("manifests/rendered/{chart}.yaml")))
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

// ---------------------------------------------------------------------------------------------
// Kubernetes types with nothing dropped

/// Deserializes into `T` (k8s-openapi ignores unknown fields), serializes again and compares with
/// the original: any field the type does not have, or reads differently, is an error.
fn roundtrip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, String> {
    let typed: T = serde_path_to_error::deserialize(value.clone())
        .map_err(|e| format!("at {}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut diffs = Vec::new();
    diff("", value, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "not a faithful {}: {}",
            std::any::type_name::<T>(),
            diffs.join("; ")
        ))
    }
}

fn diff(path: &str, original: &Value, back: &Value, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    None if va.is_null() => {}
                    None => out.push(format!("{p} is not a field of the type (dropped)")),
                    Some(vb) => diff(&p, va, vb, out),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                if !b[k].is_null() {
                    out.push(format!("{path}.{k} appeared"));
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// The Gateway API kinds come from upstream CRDs that are not shipped here; these schemas only
/// cover what the manifests and examples write, so a typo there is still caught.
fn gateway_api_schema(kind: &str) -> Option<Value> {
    let yaml = match kind {
        "GatewayClass" => {
            r#"
type: object
required: [spec]
properties:
  spec:
    type: object
    required: [controllerName]
    properties:
      controllerName: {type: string, minLength: 1}
      description: {type: string}
      parametersRef: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#
        }
        "Gateway" => {
            r#"
type: object
required: [spec]
properties:
  spec:
    type: object
    required: [gatewayClassName, listeners]
    properties:
      gatewayClassName: {type: string, minLength: 1}
      addresses: {type: array, items: {type: object, x-kubernetes-preserve-unknown-fields: true}}
      infrastructure: {type: object, x-kubernetes-preserve-unknown-fields: true}
      listeners:
        type: array
        minItems: 1
        items:
          type: object
          required: [name, port, protocol]
          properties:
            name: {type: string}
            hostname: {type: string}
            port: {type: integer, minimum: 1, maximum: 65535}
            protocol: {type: string}
            tls: {type: object, x-kubernetes-preserve-unknown-fields: true}
            allowedRoutes: {type: object, x-kubernetes-preserve-unknown-fields: true}
  status: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#
        }
        _ => return None,
    };
    Some(serde_yaml::from_str(yaml).unwrap())
}

/// Checks one document: a built-in kind through its k8s-openapi type, a custom resource
/// against its CRD. Returns the errors.
fn check_document(doc: &Doc, crds: &Crds) -> Vec<String> {
    let v = &doc.value;
    let typed = match (doc.api_version(), doc.kind()) {
        ("v1", "Namespace") => roundtrip::<Namespace>(v).map(drop),
        ("v1", "ServiceAccount") => roundtrip::<ServiceAccount>(v).map(drop),
        ("v1", "ConfigMap") => roundtrip::<ConfigMap>(v).map(drop),
        ("v1", "Secret") => roundtrip::<Secret>(v).map(drop),
        ("v1", "Service") => roundtrip::<Service>(v).map(drop),
        ("v1", "Pod") => roundtrip::<Pod>(v).map(drop),
        ("apps/v1", "DaemonSet") => roundtrip::<DaemonSet>(v).map(drop),
        ("apps/v1", "Deployment") => roundtrip::<Deployment>(v).map(drop),
        ("discovery.k8s.io/v1", "EndpointSlice") => roundtrip::<EndpointSlice>(v).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => roundtrip::<ClusterRole>(v).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            roundtrip::<ClusterRoleBinding>(v).map(drop)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => roundtrip::<Role>(v).map(drop),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => roundtrip::<RoleBinding>(v).map(drop),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            roundtrip::<CustomResourceDefinition>(v).and_then(|crd| {
                let mut errors = Vec::new();
                check_crd(&crd, v, &mut errors);
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(errors.join("; "))
                }
            })
        }
        (api_version, kind) => {
            let group = api_version.split('/').next().unwrap_or("");
            let schema = if group == "gateway.networking.k8s.io" {
                gateway_api_schema(kind)
            } else {
                crds.schema(api_version, kind).cloned()
            };
            let Some(schema) = schema else {
                return vec![format!(
                    "{}: {api_version} {kind} is neither a known Kubernetes type nor a custom \
                     resource of the CRDs in manifests/crds",
                    doc.origin
                )];
            };
            return validate_custom(&schema, v)
                .into_iter()
                .map(|e| format!("{}: {e}", doc.origin))
                .collect();
        }
    };
    match typed {
        Ok(()) => Vec::new(),
        Err(e) => vec![format!("{}: {e}", doc.origin)],
    }
}

fn assert_documents_valid(docs: &[Doc], crds: &Crds) {
    let errors: Vec<String> = docs.iter().flat_map(|d| check_document(d, crds)).collect();
    assert!(
        errors.is_empty(),
        "invalid documents:\n{}",
        errors.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// CRDs and a structural-schema validator

/// The CRDs of manifests/crds by (group, version, kind): the schema of each served version.
#[derive(Debug)]
struct Crds {
    schemas: BTreeMap<(String, String, String), Value>,
    crds: Vec<Doc>,
}

impl Crds {
    fn load() -> Crds {
        let crds = docs_under("manifests/crds");
        let mut schemas = BTreeMap::new();
        for doc in &crds {
            let spec = &doc.value["spec"];
            let group = spec["group"].as_str().unwrap().to_owned();
            let kind = spec["names"]["kind"].as_str().unwrap().to_owned();
            for version in spec["versions"].as_array().unwrap() {
                if version["served"] == json!(true) {
                    schemas.insert(
                        (
                            group.clone(),
                            version["name"].as_str().unwrap().to_owned(),
                            kind.clone(),
                        ),
                        version["schema"]["openAPIV3Schema"].clone(),
                    );
                }
            }
        }
        Crds { schemas, crds }
    }

    fn schema(&self, api_version: &str, kind: &str) -> Option<&Value> {
        let (group, version) = api_version.split_once('/')?;
        self.schemas
            .get(&(group.to_owned(), version.to_owned(), kind.to_owned()))
    }

    fn versions(&self, kind: &str) -> Vec<String> {
        self.schemas
            .keys()
            .filter(|(_, _, k)| k == kind)
            .map(|(g, v, _)| format!("{g}/{v}"))
            .collect()
    }

    /// Validates a custom resource written in YAML; the errors.
    fn check(&self, yaml: &str) -> Vec<String> {
        let value: Value = serde_yaml::from_str(yaml).unwrap();
        let api_version = value["apiVersion"].as_str().unwrap();
        let kind = value["kind"].as_str().unwrap();
        let schema = self
            .schema(api_version, kind)
            .unwrap_or_else(|| panic!("no CRD serves {api_version} {kind}"));
        validate_custom(schema, &value)
    }
}

/// A custom resource against its version's schema: apiVersion, kind and metadata are the API
/// server's (metadata must be an ObjectMeta), everything else the schema's.
fn validate_custom(schema: &Value, object: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let mut rest = object.clone();
    let map = rest.as_object_mut().unwrap();
    map.remove("apiVersion");
    map.remove("kind");
    if let Some(metadata) = map.remove("metadata")
        && let Err(e) = roundtrip::<ObjectMeta>(&metadata)
    {
        errors.push(format!("metadata: {e}"));
    }
    validate(schema, &rest, "", &mut errors);
    errors
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The subset of OpenAPI v3 that structural Kubernetes schemas use, applied as the API server
/// applies it with `kubectl apply`'s strict field validation: type, enum, pattern, lengths,
/// bounds, int32, required, properties (unknown fields refused unless
/// `x-kubernetes-preserve-unknown-fields`), additionalProperties, items, nullable,
/// `x-kubernetes-int-or-string`, oneOf/anyOf/allOf/not. A null is pruned, as the API server
/// prunes it, unless the field is nullable.
fn validate(schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    let at = if path.is_empty() { "." } else { path };
    if v.is_null() {
        return;
    }
    if schema["x-kubernetes-int-or-string"] == json!(true) {
        if !matches!(type_of(v), "integer" | "string") {
            errors.push(format!("{at}: must be an integer or a string, not {v}"));
        }
        return;
    }
    if let Some(ty) = schema["type"].as_str() {
        let actual = type_of(v);
        if actual != ty && !(ty == "number" && actual == "integer") {
            errors.push(format!("{at}: must be of type {ty}, not {actual} ({v})"));
            return;
        }
    }
    if let Some(values) = schema["enum"].as_array()
        && !values.contains(v)
    {
        let allowed: Vec<String> = values.iter().map(Value::to_string).collect();
        errors.push(format!(
            "{at}: unsupported value {v}: supported values: {}",
            allowed.join(", ")
        ));
    }
    if let Some(s) = v.as_str() {
        if let Some(pattern) = schema["pattern"].as_str()
            && !regex::Regex::new(pattern).unwrap().is_match(s)
        {
            errors.push(format!("{at}: {s:?} does not match {pattern}"));
        }
        let len = s.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|m| len < m) {
            errors.push(format!("{at}: shorter than {}", schema["minLength"]));
        }
        if schema["maxLength"].as_u64().is_some_and(|m| len > m) {
            errors.push(format!("{at}: longer than {}", schema["maxLength"]));
        }
    }
    if let Some(n) = v.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| n < m) {
            errors.push(format!(
                "{at}: {v} is less than the minimum {}",
                schema["minimum"]
            ));
        }
        if schema["maximum"].as_f64().is_some_and(|m| n > m) {
            errors.push(format!(
                "{at}: {v} is more than the maximum {}",
                schema["maximum"]
            ));
        }
        if schema["format"] == json!("int32")
            && !(f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&n)
        {
            errors.push(format!("{at}: {v} is not an int32"));
        }
    }
    if let Some(object) = v.as_object() {
        let properties = schema["properties"].as_object();
        let additional = &schema["additionalProperties"];
        let preserve = schema["x-kubernetes-preserve-unknown-fields"] == json!(true);
        for (key, value) in object {
            let p = format!("{path}.{key}");
            if let Some(property) = properties.and_then(|ps| ps.get(key)) {
                validate(property, value, &p, errors);
            } else if additional.is_object() {
                validate(additional, value, &p, errors);
            } else if !(preserve || *additional == json!(true)) && schema["type"] == json!("object")
            {
                errors.push(format!("{p}: unknown field {key:?}"));
            }
        }
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap();
            if object.get(key).is_none_or(Value::is_null) {
                errors.push(format!("{path}.{key}: Required value"));
            }
        }
        let count = object.len() as u64;
        if schema["minProperties"].as_u64().is_some_and(|m| count < m) {
            errors.push(format!(
                "{at}: fewer than {} properties",
                schema["minProperties"]
            ));
        }
        if schema["maxProperties"].as_u64().is_some_and(|m| count > m) {
            errors.push(format!(
                "{at}: more than {} properties",
                schema["maxProperties"]
            ));
        }
    }
    if let Some(items) = v.as_array() {
        if schema["items"].is_object() {
            for (i, item) in items.iter().enumerate() {
                validate(&schema["items"], item, &format!("{path}[{i}]"), errors);
            }
        }
        let count = items.len() as u64;
        if schema["minItems"].as_u64().is_some_and(|m| count < m) {
            errors.push(format!("{at}: fewer than {} items", schema["minItems"]));
        }
        if schema["maxItems"].as_u64().is_some_and(|m| count > m) {
            errors.push(format!("{at}: more than {} items", schema["maxItems"]));
        }
    }
    let passes = |s: &Value| {
        let mut e = Vec::new();
        validate(s, v, path, &mut e);
        e.is_empty()
    };
    if let Some(branches) = schema["oneOf"].as_array() {
        let matching = branches.iter().filter(|b| passes(b)).count();
        if matching != 1 {
            let fields: Vec<String> = branches
                .iter()
                .filter_map(|b| b["required"].as_array())
                .flatten()
                .map(|f| f.as_str().unwrap_or("").to_owned())
                .collect();
            errors.push(format!(
                "{at}: must match exactly one schema of oneOf (at most one of {} may be set)",
                fields.join(", ")
            ));
        }
    }
    if let Some(branches) = schema["anyOf"].as_array()
        && !branches.iter().any(passes)
    {
        errors.push(format!("{at}: must match a schema of anyOf"));
    }
    for branch in schema["allOf"].as_array().into_iter().flatten() {
        validate(branch, v, path, errors);
    }
    if schema["not"].is_object() && passes(&schema["not"]) {
        errors.push(format!("{at}: must not match {}", schema["not"]));
    }
}

/// What makes a schema structural for the API server (it refuses a CRD otherwise): a type on
/// every node outside logical junctors (unless int-or-string or preserve-unknown-fields),
/// `properties` only on objects, `items` on every array, never `properties` with
/// `additionalProperties`, and nothing but validation (no type, description, nullable or
/// default) inside oneOf/anyOf/allOf/not. Patterns must compile, enum values fit the type.
fn check_structural(schema: &Value, path: &str, in_junctor: bool, errors: &mut Vec<String>) {
    let Some(node) = schema.as_object() else {
        errors.push(format!("{path}: a schema must be an object"));
        return;
    };
    let junctor_allowed = ["required", "not", "anyOf", "oneOf", "allOf"];
    if in_junctor {
        for key in node
            .keys()
            .filter(|k| !junctor_allowed.contains(&k.as_str()))
        {
            errors.push(format!(
                "{path}: {key} is not allowed inside a logical junctor"
            ));
        }
    } else {
        let typed = node.contains_key("type")
            || node.contains_key("x-kubernetes-int-or-string")
            || node.contains_key("x-kubernetes-preserve-unknown-fields");
        if !typed {
            errors.push(format!("{path}: type is required"));
        }
    }
    let ty = node.get("type").and_then(Value::as_str).unwrap_or("");
    if let Some(properties) = node.get("properties").and_then(Value::as_object) {
        if !in_junctor && ty != "object" {
            errors.push(format!("{path}: properties on a {ty:?}"));
        }
        if node.contains_key("additionalProperties") {
            errors.push(format!(
                "{path}: properties and additionalProperties together"
            ));
        }
        for (k, s) in properties {
            check_structural(s, &format!("{path}.{k}"), in_junctor, errors);
        }
    }
    if let Some(additional) = node.get("additionalProperties").filter(|a| a.is_object()) {
        check_structural(additional, &format!("{path}.*"), in_junctor, errors);
    }
    if ty == "array" {
        match node.get("items") {
            Some(items) => check_structural(items, &format!("{path}[]"), in_junctor, errors),
            None => errors.push(format!("{path}: an array needs items")),
        }
    }
    for junctor in ["oneOf", "anyOf", "allOf"] {
        for (i, s) in node
            .get(junctor)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            check_structural(s, &format!("{path}.{junctor}[{i}]"), true, errors);
        }
    }
    if let Some(not) = node.get("not") {
        check_structural(not, &format!("{path}.not"), true, errors);
    }
    if let Some(pattern) = node.get("pattern").and_then(Value::as_str)
        && let Err(e) = regex::Regex::new(pattern)
    {
        errors.push(format!("{path}: pattern does not compile: {e}"));
    }
    for value in node
        .get("enum")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if !ty.is_empty() && type_of(value) != ty {
            errors.push(format!("{path}: enum value {value} is not a {ty}"));
        }
    }
}

fn check_crd(crd: &CustomResourceDefinition, raw: &Value, errors: &mut Vec<String>) {
    let spec = &crd.spec;
    let name = crd.metadata.name.clone().unwrap_or_default();
    if name != format!("{}.{}", spec.names.plural, spec.group) {
        errors.push(format!("{name}: the name must be <plural>.<group>"));
    }
    let storage = spec.versions.iter().filter(|v| v.storage).count();
    if storage != 1 {
        errors.push(format!(
            "{name}: {storage} storage versions, want exactly 1"
        ));
    }
    for (i, version) in spec.versions.iter().enumerate() {
        let schema = &raw["spec"]["versions"][i]["schema"]["openAPIV3Schema"];
        if schema.is_null() {
            errors.push(format!("{name} {}: no schema", version.name));
            continue;
        }
        if schema["type"] != json!("object") {
            errors.push(format!(
                "{name} {}: the root must be an object",
                version.name
            ));
        }
        check_structural(schema, &format!("{name} {}", version.name), false, errors);
    }
}

// ---------------------------------------------------------------------------------------------
// Every manifest and example

#[test]
fn every_manifest_document_is_its_kubernetes_type_or_a_valid_custom_resource() {
    let crds = Crds::load();
    let docs = docs_under("manifests");
    // Plain files, the chart's CRDs and both rendered installs are all here.
    for origin in [
        "manifests/namespace.yaml",
        "manifests/gatewayclass.yaml",
        "manifests/chart/ambient-mesh/crds/virtualservice.yaml",
        "manifests/rendered/ambient-mesh.yaml",
        "manifests/rendered/waypoint.yaml",
        "manifests/rendered/gateway.yaml",
    ] {
        assert!(
            docs.iter()
                .any(|d| d.origin.starts_with(&format!("{origin}#"))),
            "{origin} was not checked"
        );
    }
    assert_documents_valid(&docs, &crds);
}

#[test]
fn every_example_applies_against_the_crds() {
    let crds = Crds::load();
    let mut docs = docs_under("examples");
    docs.extend(load(&root().join("tests/e2e/kind/apps.yaml")));
    let kinds: BTreeSet<&str> = docs.iter().map(Doc::kind).collect();
    for kind in [
        "VirtualService",
        "DestinationRule",
        "AuthorizationPolicy",
        "Pod",
        "Gateway",
    ] {
        assert!(
            kinds.contains(kind),
            "the examples have no {kind}: {kinds:?}"
        );
    }
    assert_documents_valid(&docs, &crds);
}

#[test]
fn crds_keep_istios_names_groups_versions_and_storage() {
    let crds = Crds::load();
    let expected = [
        (
            "virtualservices.networking.istio.io",
            "VirtualService",
            &["v1", "v1alpha3", "v1beta1"][..],
            "v1alpha3",
        ),
        (
            "destinationrules.networking.istio.io",
            "DestinationRule",
            &["v1", "v1alpha3", "v1beta1"][..],
            "v1alpha3",
        ),
        (
            "authorizationpolicies.security.istio.io",
            "AuthorizationPolicy",
            &["v1", "v1beta1"][..],
            "v1beta1",
        ),
        (
            "gateways.networking.istio.io",
            "Gateway",
            &["v1", "v1alpha3", "v1beta1"][..],
            "v1alpha3",
        ),
        (
            "peerauthentications.security.istio.io",
            "PeerAuthentication",
            &["v1", "v1beta1"][..],
            "v1beta1",
        ),
    ];
    for (name, kind, versions, storage) in expected {
        let doc = crds
            .crds
            .iter()
            .find(|d| d.name() == name)
            .unwrap_or_else(|| panic!("no CRD {name}"));
        let crd: CustomResourceDefinition = doc.typed();
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.scope, "Namespaced");
        let served: Vec<&str> = crd
            .spec
            .versions
            .iter()
            .filter(|v| v.served)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(served, versions, "{name}");
        let stored: Vec<&str> = crd
            .spec
            .versions
            .iter()
            .filter(|v| v.storage)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(stored, [storage], "{name}: Istio stores {storage}");
        // The same schema under every version, as Istio's, so objects convert without loss.
        let schemas: BTreeSet<String> = doc.value["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["schema"].to_string())
            .collect();
        assert_eq!(schemas.len(), 1, "{name}: versions differ");
        // Free-form only where Istio has it: status.
        let schema = &doc.value["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut free = Vec::new();
        preserve_unknown_paths(schema, "", &mut free);
        assert_eq!(free, [".status"], "{name}");
        // Kept when the chart is uninstalled, as Istio's: deleting a CRD deletes every object.
        assert_eq!(
            crd.metadata
                .annotations
                .unwrap_or_default()
                .get("helm.sh/resource-policy")
                .map(String::as_str),
            Some("keep")
        );
    }
}

fn preserve_unknown_paths(schema: &Value, path: &str, out: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == json!(true) {
        out.push(path.to_owned());
    }
    for (k, s) in schema["properties"].as_object().into_iter().flatten() {
        preserve_unknown_paths(s, &format!("{path}.{k}"), out);
    }
    if schema["additionalProperties"].is_object() {
        preserve_unknown_paths(&schema["additionalProperties"], &format!("{path}.*"), out);
    }
    if schema["items"].is_object() {
        preserve_unknown_paths(&schema["items"], &format!("{path}[]"), out);
    }
}

#[test]
fn the_chart_ships_the_same_crds() {
    let mut source = Vec::new();
    yaml_files(&root().join("manifests/crds"), &mut source);
    let mut copies = Vec::new();
    yaml_files(
        &root().join("manifests/chart/ambient-mesh/crds"),
        &mut copies,
    );
    let names = |files: &[PathBuf]| -> Vec<String> {
        files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&source),
        names(&copies),
        "run python3 manifests/render.py"
    );
    for (a, b) in source.iter().zip(&copies) {
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{} differs from its copy in the chart: run python3 manifests/render.py",
            a.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Istio's documented examples against the CRDs

/// Istio's documentation examples (tasks: request routing, fault injection, traffic shifting,
/// request timeouts, circuit breaking; the reference pages' examples), in the shapes users copy.
const ISTIO_EXAMPLES: &[&str] = &[
    // Fault injection: a 7 s delay for jason.
    r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"#,
    // Fault injection: an HTTP abort for jason.
    r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      abort:
        percentage:
          value: 100.0
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"#,
    // Traffic shifting: 50% to v3.
    r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: 50
"#,
    // Request routing by header.
    r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts:
    - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
"#,
    // Request timeouts: a 0.5 s timeout on reviews, a 2 s delay on ratings.
    r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
    timeout: 0.5s
"#,
    r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts:
  - ratings
  http:
  - fault:
      delay:
        percentage:
          value: 100
        fixedDelay: 2s
    route:
    - destination:
        host: ratings
        subset: v1
"#,
    // Circuit breaking.
    r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"#,
    // Bookinfo's destination rules (subsets, a subset-level policy, mTLS origination).
    r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: RANDOM
    tls:
      mode: ISTIO_MUTUAL
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
  - name: v3
    labels:
      version: v3
"#,
    // The DestinationRule reference: consistent hashing, locality, port-level settings.
    r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: bookinfo-ratings-port}
spec:
  host: ratings.prod.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie:
          name: user
          ttl: 0s
      localityLbSetting:
        enabled: true
        failover:
        - from: us-east
          to: eu-west
    portLevelSettings:
    - port:
        number: 80
      loadBalancer:
        simple: LEAST_REQUEST
    - port:
        number: 9080
      loadBalancer:
        simple: ROUND_ROBIN
      connectionPool:
        http:
          h2UpgradePolicy: UPGRADE
          idleTimeout: 30s
"#,
    // The VirtualService reference: retries, rewrite, redirect, mirroring, CORS, headers,
    // direct response, TCP routes.
    r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews-route}
spec:
  hosts:
  - reviews.prod.svc.cluster.local
  http:
  - name: "reviews-v2-routes"
    match:
    - uri:
        prefix: "/wpcatalog"
    - uri:
        prefix: "/consumercatalog"
    rewrite:
      uri: "/newcatalog"
    route:
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v2
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream
  - match:
    - uri:
        exact: /v1/getProductRatings
    redirect:
      uri: /v1/bookRatings
      authority: newratings.default.svc.cluster.local
  - match:
    - uri:
        regex: "^/old/.*"
      ignoreUriCase: true
      queryParams:
        debug:
          exact: "1"
    directResponse:
      status: 503
      body:
        string: "unknown path"
  - route:
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v1
      headers:
        request:
          set:
            test: "true"
        response:
          remove:
          - foo
    mirror:
      host: reviews.prod.svc.cluster.local
      subset: v3
    mirrorPercentage:
      value: 50.0
    corsPolicy:
      allowOrigins:
      - exact: https://example.com
      allowMethods:
      - POST
      - GET
      allowCredentials: false
      allowHeaders:
      - X-Foo-Bar
      maxAge: "24h"
  tcp:
  - match:
    - port: 27017
    route:
    - destination:
        host: mongo.backup.svc.cluster.local
        port:
          number: 5555
"#,
    // AuthorizationPolicy: allow-nothing, an ALLOW with from/to/when, a DENY, an L4 port rule,
    // and a waypoint policy (targetRefs).
    r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {}
"#,
    r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["GET"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"#,
    r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-method-get, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        methods: ["GET"]
        notPorts: ["8080"]
    from:
    - source:
        notIpBlocks: ["10.0.0.0/8"]
"#,
    r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-viewer, namespace: default}
spec:
  targetRefs:
  - kind: Gateway
    group: gateway.networking.k8s.io
    name: waypoint
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/curl
    to:
    - operation:
        methods: ["GET"]
"#,
    // PeerAuthentication: mesh-wide STRICT, namespace PERMISSIVE, a port exception.
    r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls:
    mode: STRICT
"#,
    r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec:
  mtls:
    mode: PERMISSIVE
"#,
    r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: finance, namespace: foo}
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
"#,
    // Gateway: the reference page's servers (redirect, SIMPLE, MUTUAL, TCP, TLS passthrough).
    r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: my-gateway, namespace: some-config-namespace}
spec:
  selector:
    app: my-gateway-controller
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [uk.bookinfo.com, eu.bookinfo.com]
    tls:
      httpsRedirect: true
  - port: {number: 443, name: https-443, protocol: HTTPS}
    hosts: [uk.bookinfo.com, eu.bookinfo.com]
    tls:
      mode: SIMPLE
      credentialName: bookinfo-secret
  - port: {number: 9443, name: https-9443, protocol: HTTPS}
    hosts: ["bookinfo-namespace/*.bookinfo.com"]
    tls:
      mode: SIMPLE
      credentialName: bookinfo-secret
  - port: {number: 9080, name: http-wildcard, protocol: HTTP}
    hosts: ["ns1/*", "ns2/foo.bar.com"]
  - port: {number: 2379, name: mongo, protocol: MONGO}
    hosts: ["*"]
  - port: {number: 8443, name: tls, protocol: TLS}
    hosts: ["*.example.com"]
    tls:
      mode: PASSTHROUGH
  - port: {number: 443, name: https-mutual, protocol: HTTPS}
    hosts: [httpbin.example.com]
    tls:
      mode: MUTUAL
      credentialName: httpbin-credential
      subjectAltNames: [spiffe://cluster.local/ns/default/sa/client]
      minProtocolVersion: TLSV1_2
"#,
    // The ingress task's Gateway, as the seed applies it to `helm install istio-ingress`.
    r#"
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {name: httpbin-gateway}
spec:
  selector:
    istio: ingress
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - "httpbin.example.com"
"#,
];

#[test]
fn istios_documented_examples_apply_under_every_version() {
    let crds = Crds::load();
    for example in ISTIO_EXAMPLES {
        let value: Value = serde_yaml::from_str(example).unwrap();
        let kind = value["kind"].as_str().unwrap();
        let versions = crds.versions(kind);
        assert!(versions.len() >= 2, "{kind}: {versions:?}");
        for api_version in versions {
            let mut object = value.clone();
            object["apiVersion"] = json!(api_version);
            let errors = validate_custom(crds.schema(&api_version, kind).unwrap(), &object);
            assert!(
                errors.is_empty(),
                "{api_version} {kind} refused {example}: {errors:?}"
            );
        }
    }
}

#[test]
fn invalid_istio_objects_are_refused_with_the_field_named() {
    let crds = Crds::load();
    let vs = |http: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\n\
             spec:\n  hosts: [reviews]\n  http:\n{http}"
        )
    };
    let dr = |spec: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r}}\n\
             spec:\n{spec}"
        )
    };
    let ap = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\n\
             spec:\n{spec}"
        )
    };
    let gw = |servers: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g}}\n\
             spec:\n  selector: {{istio: ingress}}\n  servers:\n{servers}"
        )
    };
    let pa = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p}}\n\
             spec:\n{spec}"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        // VirtualService
        (vs("  - route: [{destination: {subset: v1}}]\n"), ".spec.http[0].route[0].destination.host: Required value"),
        (vs("  - route: [{destination: {host: reviews}, weight: \"50\"}]\n"), ".spec.http[0].route[0].weight: must be of type integer"),
        (vs("  - fault: {delay: {fixedDelay: 7 seconds}}\n    route: [{destination: {host: reviews}}]\n"), ".spec.http[0].fault.delay.fixedDelay: \"7 seconds\" does not match"),
        (vs("  - fault: {abort: {httpStatus: 500, grpcStatus: UNAVAILABLE}}\n    route: [{destination: {host: reviews}}]\n"), ".spec.http[0].fault.abort: must match exactly one schema of oneOf"),
        (vs("  - match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: reviews}}]\n"), ".spec.http[0].match[0].uri: must match exactly one schema of oneOf"),
        (vs("  - timeout: 10\n    route: [{destination: {host: reviews}}]\n"), ".spec.http[0].timeout: must be of type string"),
        (vs("  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 3, retryon: 5xx}\n"), ".spec.http[0].retries.retryon: unknown field"),
        (vs("  - redirect: {derivePort: FROM_SOMEWHERE}\n"), ".spec.http[0].redirect.derivePort: unsupported value \"FROM_SOMEWHERE\""),
        (vs("  - route: [{destination: {host: reviews, port: {number: 99999999999}}}]\n"), "is more than the maximum"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  htpp: []\n".into(), ".spec.htpp: unknown field"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n".into(), ".spec: Required value"),
        // DestinationRule
        (dr("  host: reviews\n  trafficPolicy: {loadBalancer: {simple: ROUNDROBIN}}\n"), ".spec.trafficPolicy.loadBalancer.simple: unsupported value \"ROUNDROBIN\""),
        (dr("  subsets: [{name: v1, labels: {version: v1}}]\n"), ".spec.host: Required value"),
        (dr("  host: reviews\n  subsets: [{labels: {version: v1}}]\n"), ".spec.subsets[0].name: Required value"),
        (dr("  host: reviews\n  trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}\n"), ".spec.trafficPolicy.loadBalancer: must match exactly one schema of oneOf"),
        (dr("  host: reviews\n  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: ALWAYS}}}\n"), "h2UpgradePolicy: unsupported value"),
        (dr("  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: \"1\"}}}\n"), ".spec.trafficPolicy.connectionPool.tcp.maxConnections: must be of type integer"),
        (dr("  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 3000000000}}}\n"), "maxConnections: 3000000000 is more than the maximum"),
        (dr("  host: reviews\n  subsets: [{name: v1, trafficPolicy: {tls: {mode: MTLS}}}]\n"), ".spec.subsets[0].trafficPolicy.tls.mode: unsupported value \"MTLS\""),
        (dr("  host: reviews\n  trafficPolicy: {outlierDetection: {consecutive5xxErrors: -1}}\n"), "consecutive5xxErrors: -1 is less than the minimum"),
        // AuthorizationPolicy
        (ap("  action: REJECT\n"), ".spec.action: unsupported value \"REJECT\": supported values: \"ALLOW\", \"DENY\", \"AUDIT\", \"CUSTOM\""),
        (ap("  rules: [{from: [{source: {principal: [a]}}]}]\n"), ".spec.rules[0].from[0].source.principal: unknown field"),
        (ap("  rules: [{to: [{operation: {ports: [8080]}}]}]\n"), ".spec.rules[0].to[0].operation.ports[0]: must be of type string"),
        (ap("  rules: [{when: [{values: [a]}]}]\n"), ".spec.rules[0].when[0].key: Required value"),
        (ap("  targetRefs: [{kind: Gateway}]\n"), ".spec.targetRefs[0].name: Required value"),
        // Gateway
        (gw("  - port: {number: 80, name: http, protocol: HTTP}\n"), ".spec.servers[0].hosts: Required value"),
        (gw("  - port: {number: 80, protocol: HTTP}\n    hosts: [\"*\"]\n"), ".spec.servers[0].port.name: Required value"),
        (gw("  - port: {number: \"80\", name: http, protocol: HTTP}\n    hosts: [\"*\"]\n"), ".spec.servers[0].port.number: must be of type integer"),
        (gw("  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, credentialname: c}\n"), ".spec.servers[0].tls.credentialname: unknown field"),
        (gw("  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: STRICT}\n"), ".spec.servers[0].tls.mode: unsupported value \"STRICT\""),
        (gw("  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {credentialNames: [a, b, c]}\n"), ".spec.servers[0].tls.credentialNames: more than 2 items"),
        // PeerAuthentication
        (pa("  mtls: {mode: STRICT_ONLY}\n"), ".spec.mtls.mode: unsupported value \"STRICT_ONLY\""),
        (pa("  selector: {matchLabels: {app: a}}\n  portLevelMtls: {8080: {mode: OFF}}\n"), ".spec.portLevelMtls.8080.mode: unsupported value"),
        (pa("  mtls: {mode: STRICT}\n  selectors: {}\n"), ".spec.selectors: unknown field"),
    ];
    for (yaml, want) in &cases {
        let errors = crds.check(yaml);
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{yaml}\nwanted an error containing {want:?}, got {errors:?}"
        );
    }
    // Metadata is the API server's: a misspelt field there is refused too.
    let errors = crds.check(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, label: {}}\nspec: {}\n",
    );
    assert!(
        errors.iter().any(|e| e.starts_with("metadata:")),
        "{errors:?}"
    );
}

#[test]
fn the_validator_sees_what_it_claims() {
    // Guards against a validator that accepts everything: each keyword on its own.
    let schema: Value = serde_yaml::from_str(
        r#"
type: object
required: [a]
properties:
  a: {type: integer, format: int32, minimum: 1}
  b: {type: string, enum: [X, Y]}
  c: {type: array, maxItems: 1, items: {type: string, pattern: "^[a-z]+$"}}
  d: {type: object, additionalProperties: {type: boolean}}
  e: {type: object, x-kubernetes-preserve-unknown-fields: true}
  f: {x-kubernetes-int-or-string: true}
  g: {type: string, nullable: true}
"#,
    )
    .unwrap();
    let check = |v: Value| {
        let mut e = Vec::new();
        validate(&schema, &v, "", &mut e);
        e
    };
    assert!(check(json!({"a": 1, "b": "X", "c": ["ab"], "d": {"k": true}, "e": {"any": [1]}, "f": "50%", "g": null})).is_empty());
    for bad in [
        json!({}),
        json!({"a": 0}),
        json!({"a": 4_294_967_296_u64}),
        json!({"a": 1, "b": "Z"}),
        json!({"a": 1, "c": ["a", "b"]}),
        json!({"a": 1, "c": ["A"]}),
        json!({"a": 1, "d": {"k": "yes"}}),
        json!({"a": 1, "f": 1.5}),
        json!({"a": 1, "h": 1}),
        json!({"a": "1"}),
    ] {
        assert!(!check(bad.clone()).is_empty(), "accepted {bad}");
    }
    for (schema, want) in [
        (
            json!({"properties": {"a": {"type": "string"}}}),
            "s: type is required",
        ),
        (json!({"type": "array"}), "s: an array needs items"),
        (
            json!({"type": "object", "oneOf": [{"type": "object"}]}),
            "s.oneOf[0]: type is not allowed",
        ),
        (
            json!({"type": "string", "pattern": "("}),
            "s: pattern does not compile",
        ),
        (
            json!({"type": "string", "enum": [1]}),
            "s: enum value 1 is not a string",
        ),
    ] {
        let mut errors = Vec::new();
        check_structural(&schema, "s", false, &mut errors);
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "{schema}: {errors:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The installed components

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

fn env_field_ref(c: &Container, name: &str) -> Option<String> {
    let var = c.env.as_ref()?.iter().find(|e| e.name == name)?;
    Some(
        var.value_from
            .as_ref()?
            .field_ref
            .as_ref()?
            .field_path
            .clone(),
    )
}

fn env_names(c: &Container) -> BTreeSet<String> {
    c.env.iter().flatten().map(|e| e.name.clone()).collect()
}

/// The volume behind the mount that holds `file`.
fn volume_for<'a>(
    spec: &'a PodSpec,
    c: &Container,
    file: &str,
) -> &'a k8s_openapi::api::core::v1::Volume {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| file.starts_with(&format!("{}/", m.mount_path)))
        .unwrap_or_else(|| panic!("{}: nothing is mounted where {file} is", c.name));
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {}", mount.name))
}

/// The ConfigMap the CA keeps its root in, in every namespace (`MESH_CA_ROOT_CONFIGMAP`).
const ROOT_CONFIGMAP: &str = mesh::ca::root_configmap::DEFAULT_ROOT_CONFIGMAP;

/// `CA_ADDRESS` names the CA's Service, whose port it is, and a DNS name the CA's certificate
/// carries; `CA_ROOT_CERT` is the root's key in the root ConfigMap; `CA_TOKEN_FILE` a token for
/// the CA.
fn check_ca_client(spec: &PodSpec, c: &Container, ca_service: &Service, ca_dns_names: &[String]) {
    let address = env_value(c, "CA_ADDRESS").unwrap();
    let (host, port) = address.rsplit_once(':').unwrap();
    let svc_ns = ca_service.metadata.namespace.clone().unwrap();
    assert_eq!(host, format!("mesh-ca.{svc_ns}.svc"), "{}", c.name);
    let ports = ca_service.spec.as_ref().unwrap().ports.as_ref().unwrap();
    assert!(
        ports.iter().any(|p| p.port.to_string() == port),
        "{}: CA port {port}",
        c.name
    );
    assert!(
        ca_dns_names.iter().any(|n| n == host),
        "the CA's certificate does not name {host}"
    );
    let root = env_value(c, "CA_ROOT_CERT").unwrap();
    let volume = volume_for(spec, c, &root);
    let config_map = volume.config_map.as_ref().unwrap();
    assert_eq!(config_map.name, ROOT_CONFIGMAP);
    // Mounted whole (no `items`), so the file is named after the key the CA writes.
    assert!(config_map.items.is_none(), "{}", c.name);
    assert!(
        root.ends_with(&format!("/{}", mesh::ca::root_configmap::ROOT_CERT_KEY)),
        "{root}"
    );
    let token = env_value(c, "CA_TOKEN_FILE").unwrap();
    let projected = volume_for(spec, c, &token).projected.as_ref().unwrap();
    let sa_token = projected
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .unwrap();
    assert_eq!(
        sa_token.audience.as_deref(),
        Some(mesh::ca::kube_auth::ISTIO_CA_AUDIENCE)
    );
    assert!(token.ends_with(&format!("/{}", sa_token.path)));
}

fn image_ok(c: &Container) {
    assert_eq!(c.image.as_deref(), Some("ambient-mesh:0.1.0"), "{}", c.name);
    let binary = c.command.as_ref().unwrap()[0].as_str();
    assert!(
        ["ztunnel", "waypoint"].contains(&binary),
        "{}: {binary}",
        c.name
    );
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(&format!("/out/{binary}")),
        "the image lacks {binary}"
    );
}

fn ca_dns_names(docs: &[Doc]) -> Vec<String> {
    let ca: Deployment = find(docs, "Deployment", "mesh-ca").typed();
    let spec = ca.spec.unwrap().template.spec.unwrap();
    env_value(container(&spec, "ca"), "MESH_CA_DNS_NAMES")
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect()
}

#[test]
fn ztunnel_daemonset_has_the_privileges_it_needs_and_no_more() {
    let docs = rendered("ambient-mesh");
    let ds: DaemonSet = find(&docs, "DaemonSet", "ztunnel").typed();
    let spec = ds.spec.as_ref().unwrap();
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.host_pid,
        Some(true),
        "hostPID finds pods' network namespaces via /proc"
    );
    assert_ne!(pod.host_network, Some(true));
    assert_ne!(pod.host_ipc, Some(true));
    for volume in pod.volumes.iter().flatten() {
        assert!(
            volume.host_path.is_none(),
            "host path volume {}",
            volume.name
        );
    }
    assert_eq!(pod.containers.len(), 1);
    let c = container(pod, "ztunnel");
    image_ok(c);
    let security = c.security_context.as_ref().unwrap();
    let caps = security.capabilities.as_ref().unwrap();
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        added,
        BTreeSet::from(["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"])
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));

    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.port, IntOrString::Int(15021));
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    let drain: i64 = env_value(c, ztunnel::config::DRAIN_DEADLINE)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        pod.termination_grace_period_seconds.unwrap() > drain,
        "the kubelet would kill ztunnel before its drain deadline"
    );

    assert_eq!(
        env_field_ref(c, ztunnel::config::NODE_NAME).as_deref(),
        Some("spec.nodeName")
    );
    assert_eq!(
        env_field_ref(c, ztunnel::config::CAPTURE_PROBE_SOURCES).as_deref(),
        Some("status.hostIP")
    );
    assert_eq!(
        env_value(c, ztunnel::config::CAPTURE_MODE).as_deref(),
        Some("proc")
    );
    assert_eq!(
        env_value(c, mesh::discovery::CONFIG_SOURCE).as_deref(),
        Some("kubernetes")
    );
    // Istio's default cluster name, so metrics and baggage match an Istio install's.
    assert_eq!(
        env_value(c, ztunnel::config::CLUSTER_ID).as_deref(),
        Some(mesh::ops::DEFAULT_CLUSTER_ID)
    );
    // Every variable is one ztunnel reads (a typo would be silently ignored).
    let known: BTreeSet<String> = [
        ztunnel::config::NODE_NAME,
        ztunnel::config::TRUST_DOMAIN,
        ztunnel::config::CLUSTER_ID,
        ztunnel::config::CLUSTER_DOMAIN,
        ztunnel::config::ROOT_NAMESPACE,
        ztunnel::config::CONFIG_PATH,
        ztunnel::config::CA_ADDRESS,
        ztunnel::config::CA_ROOT_CERT,
        ztunnel::config::CA_SERVER_NAME,
        ztunnel::config::CA_TOKEN_FILE,
        ztunnel::config::CAPTURE_MODE,
        ztunnel::config::CAPTURE_PROBE_SOURCES,
        ztunnel::config::DRAIN_DEADLINE,
        ztunnel::config::WORKLOAD_CERT_TTL,
        ztunnel::config::WORKER_THREADS,
        mesh::discovery::CONFIG_SOURCE,
        "RUST_LOG",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let unknown: Vec<_> = env_names(c).difference(&known).cloned().collect();
    assert!(unknown.is_empty(), "ztunnel does not read {unknown:?}");

    let ca_service: Service = find(&docs, "Service", "mesh-ca").typed();
    check_ca_client(pod, c, &ca_service, &ca_dns_names(&docs));
    assert_eq!(pod.service_account_name.as_deref(), Some("ztunnel"));
}

#[test]
fn the_ca_runs_unprivileged_and_serves_on_15012() {
    let docs = rendered("ambient-mesh");
    let ca: Deployment = find(&docs, "Deployment", "mesh-ca").typed();
    let pod = ca.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = container(pod, "ca");
    image_ok(c);
    assert_eq!(c.args.as_deref(), Some(&["ca".to_owned()][..]));
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let security = c.security_context.as_ref().unwrap();
    assert!(security.capabilities.as_ref().unwrap().add.is_none());
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_ne!(pod.host_pid, Some(true));
    // Every variable is one of `ztunnel ca`'s flags.
    let command = <ztunnel::ca_cmd::CaArgs as clap::Args>::augment_args(clap::Command::new("ca"));
    let mut known: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    known.insert("RUST_LOG".into());
    let unknown: Vec<_> = env_names(c).difference(&known).cloned().collect();
    assert!(
        unknown.is_empty(),
        "`ztunnel ca` has no flag for {unknown:?} (it has {known:?})"
    );
    let listen = env_value(c, "MESH_CA_LISTEN").unwrap();
    assert!(listen.ends_with(":15012"));
    let port = c.ports.as_ref().unwrap()[0].container_port;
    assert_eq!(port, 15012);
    // Kubernetes authentication, trusting the DaemonSet's ztunnels and the audience their
    // tokens are made for.
    let ns = ca.metadata.namespace.clone().unwrap();
    assert_eq!(
        env_value(c, "MESH_CA_KUBERNETES_AUTH").as_deref(),
        Some("true")
    );
    let ds: DaemonSet = find(&docs, "DaemonSet", "ztunnel").typed();
    let ztunnel_account = format!(
        "{}/{}",
        ds.metadata.namespace.unwrap(),
        ds.spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .service_account_name
            .unwrap()
    );
    assert_eq!(
        env_value(c, "MESH_CA_ZTUNNEL_SERVICE_ACCOUNTS"),
        Some(ztunnel_account)
    );
    assert_eq!(
        env_value(c, "MESH_CA_TOKEN_AUDIENCES").as_deref(),
        Some(mesh::ca::kube_auth::ISTIO_CA_AUDIENCE)
    );
    // The key: in the Secret the Role lets it read, written for loading to memory, since the
    // root filesystem is read-only.
    assert_eq!(
        env_value(c, "MESH_CA_SECRET"),
        Some(format!("{ns}/mesh-ca"))
    );
    // The root: kept in every namespace under the name ztunnel and the waypoints mount
    // (`check_ca_client`).
    assert_eq!(
        env_value(c, "MESH_CA_ROOT_CONFIGMAP").as_deref(),
        Some(ROOT_CONFIGMAP)
    );
    let dir = env_value(c, "MESH_CA_DIR").unwrap();
    let volume = volume_for(pod, c, &format!("{dir}/ca-key.pem"));
    assert_eq!(
        volume.empty_dir.as_ref().unwrap().medium.as_deref(),
        Some("Memory")
    );
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let service: Service = find(&docs, "Service", "mesh-ca").typed();
    let svc = service.spec.unwrap();
    let labels = ca.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    for (k, v) in svc.selector.unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "the CA Service selects {k}={v}");
    }
    let svc_port = &svc.ports.unwrap()[0];
    assert_eq!(
        (svc_port.port, svc_port.target_port.clone()),
        (15012, Some(IntOrString::Int(15012)))
    );
}

#[test]
fn the_waypoint_is_what_ztunnel_recognises_as_one() {
    let docs = rendered("waypoint");
    let deployment: Deployment = find(&docs, "Deployment", "waypoint").typed();
    let template = deployment.spec.as_ref().unwrap().template.clone();
    let labels = template.metadata.unwrap().labels.unwrap();
    use mesh::model::translate::{GATEWAY_MANAGED_LABEL, GATEWAY_NAME_LABEL, WAYPOINT_CONTROLLER};
    assert_eq!(
        labels.get(GATEWAY_MANAGED_LABEL).map(String::as_str),
        Some(WAYPOINT_CONTROLLER)
    );
    assert_eq!(
        labels.get(GATEWAY_NAME_LABEL).map(String::as_str),
        Some("waypoint")
    );
    let pod = template.spec.unwrap();
    let c = container(&pod, "waypoint");
    image_ok(c);
    assert_eq!(
        env_value(c, waypoint::config::WAYPOINT_NAME).as_deref(),
        Some("waypoint")
    );
    assert_eq!(
        env_value(c, mesh::discovery::CONFIG_SOURCE).as_deref(),
        Some("kubernetes")
    );
    assert_eq!(
        env_field_ref(c, waypoint::config::WAYPOINT_NAMESPACE).as_deref(),
        Some("metadata.namespace")
    );
    assert_eq!(
        env_field_ref(c, waypoint::config::SERVICE_ACCOUNT).as_deref(),
        Some("spec.serviceAccountName")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
    assert!(
        c.security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap()
            .add
            .is_none()
    );
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.port, IntOrString::Int(15021));
    let known = proxy_env(&[
        waypoint::config::WAYPOINT_NAME,
        waypoint::config::WAYPOINT_NAMESPACE,
        waypoint::config::CONFIG_PATH,
        waypoint::config::HBONE_ADDR,
    ]);
    let unknown: Vec<_> = env_names(c).difference(&known).cloned().collect();
    assert!(unknown.is_empty(), "the waypoint does not read {unknown:?}");
    // ztunnel sends the waypoint's traffic to its Service's port 15008.
    let service: Service = find(&docs, "Service", "waypoint").typed();
    let svc = service.spec.unwrap();
    assert!(
        svc.ports
            .unwrap()
            .iter()
            .any(|p| p.port == 15008 && p.target_port == Some(IntOrString::Int(15008)))
    );
    for (k, v) in svc.selector.unwrap() {
        assert_eq!(
            labels.get(&k),
            Some(&v),
            "the waypoint Service selects {k}={v}"
        );
    }
    assert!(c.ports.iter().flatten().any(|p| p.container_port == 15008));
    let mesh = rendered("ambient-mesh");
    let ca_service: Service = find(&mesh, "Service", "mesh-ca").typed();
    check_ca_client(&pod, c, &ca_service, &ca_dns_names(&mesh));
}

/// The ingress gateway chart as the seed installs Istio's (`helm install istio-ingress
/// istio/gateway -n istio-ingress`): `waypoint gateway`, configured by what its env says (parsed
/// here by the binary's own config code), unprivileged, its pods selected by the seed's
/// Gateway, every server port exposed by its Service.
#[test]
fn the_gateway_is_what_the_seeds_istio_gateway_selects() {
    let docs = rendered("gateway");
    let deployment: Deployment = find(&docs, "Deployment", "istio-ingress").typed();
    let namespace = deployment.metadata.namespace.clone().unwrap();
    assert_eq!(namespace, "istio-ingress");
    let spec = deployment.spec.as_ref().unwrap();
    let template = spec.template.clone();
    let labels = template.metadata.unwrap().labels.unwrap();
    let pod = template.spec.unwrap();
    let c = container(&pod, "gateway");
    image_ok(c);
    assert_eq!(c.command.as_deref(), Some(&["waypoint".to_owned()][..]));
    assert_eq!(c.args.as_deref(), Some(&["gateway".to_owned()][..]));

    // Every variable is one `waypoint gateway` reads (a typo would be silently ignored) ...
    let known = proxy_env(&[
        waypoint::config::GATEWAY_NAME,
        waypoint::config::GATEWAY_NAMESPACE,
        waypoint::config::GATEWAY_LABELS,
        waypoint::config::GATEWAY_CLASS,
        waypoint::config::GATEWAY_BIND_ADDRESS,
    ]);
    let unknown: Vec<_> = env_names(c).difference(&known).cloned().collect();
    assert!(unknown.is_empty(), "the gateway does not read {unknown:?}");
    // ... and the environment, with the downward API resolved as the kubelet does, is a valid
    // ingress configuration naming this pod.
    let service_account = pod.service_account_name.clone().unwrap();
    let mut env: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    for var in c.env.iter().flatten() {
        let value = match (&var.value, env_field_ref(c, &var.name).as_deref()) {
            (Some(value), _) => value.clone(),
            (None, Some("metadata.namespace")) => namespace.clone(),
            (None, Some("spec.serviceAccountName")) => service_account.clone(),
            (None, other) => panic!("{}: unexpected source {other:?}", var.name),
        };
        env.insert(known.get(&var.name).unwrap().as_str(), value);
    }
    let config =
        waypoint::config::Config::from_env_for(&env, waypoint::config::Role::Ingress).unwrap();
    assert_eq!(
        config.config_source(),
        mesh::discovery::SourceKind::Kubernetes
    );
    assert_eq!(
        config.identity.to_string(),
        "spiffe://cluster.local/ns/istio-ingress/sa/istio-ingress"
    );
    assert_eq!(config.waypoint.name, "istio-ingress");
    let ingress = config.ingress.unwrap();
    assert_eq!(
        ingress.labels, labels,
        "GATEWAY_LABELS must be the pod's own labels, which Gateways select"
    );
    assert!(ingress.bind.is_unspecified());
    assert!(
        find(&docs, "ServiceAccount", &service_account).value["metadata"]["namespace"]
            == namespace.as_str()
    );

    // Istio's labels for the release istio-ingress, so the seed's Gateway selects the pods;
    // ztunnel never captures them (the gateway speaks HBONE itself).
    assert_eq!(labels.get("app").map(String::as_str), Some("istio-ingress"));
    assert_eq!(labels.get("istio").map(String::as_str), Some("ingress"));
    assert_eq!(
        labels
            .get(mesh::model::DATAPLANE_MODE_LABEL)
            .map(String::as_str),
        Some(mesh::model::DATAPLANE_MODE_NONE)
    );
    let gateways: Vec<Doc> = load(&root().join("examples/ingress/gateway.yaml"));
    let gateway = find(&gateways, "Gateway", "httpbin-gateway");
    let selector = gateway.value["spec"]["selector"].as_object().unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            labels.get(k).map(String::as_str),
            v.as_str(),
            "the example Gateway selects {k}={v}"
        );
    }
    for (k, v) in spec.selector.match_labels.clone().unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "the Deployment selects {k}={v}");
    }

    // The Service: Istio's type and ports; each server port of the example goes to the same
    // port of the pod, which is what the gateway binds.
    let service: Service = find(&docs, "Service", "istio-ingress").typed();
    let svc = service.spec.unwrap();
    assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
    for (k, v) in svc.selector.clone().unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "the Service selects {k}={v}");
    }
    let ports = svc.ports.unwrap();
    let target = |port: i32| {
        ports
            .iter()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("the Service has no port {port}"))
            .target_port
            .clone()
    };
    for server in gateway.value["spec"]["servers"].as_array().unwrap() {
        let number = server["port"]["number"].as_i64().unwrap() as i32;
        assert_eq!(target(number), Some(IntOrString::Int(number)));
    }
    assert_eq!(target(80), Some(IntOrString::Int(80)));
    assert_eq!(target(443), Some(IntOrString::Int(443)));
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.port, IntOrString::Int(15021));
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(target(15021), Some(IntOrString::Int(15021)));

    // Unprivileged: non-root, no capability; ports below 1024 through the pod's sysctl.
    let pod_security = pod.security_context.as_ref().unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_ne!(pod_security.run_as_user, Some(0));
    let sysctls: BTreeMap<String, String> = pod_security
        .sysctls
        .iter()
        .flatten()
        .map(|s| (s.name.clone(), s.value.clone()))
        .collect();
    assert_eq!(
        sysctls,
        BTreeMap::from([(
            "net.ipv4.ip_unprivileged_port_start".to_owned(),
            "0".to_owned()
        )])
    );
    let security = c.security_context.as_ref().unwrap();
    let caps = security.capabilities.as_ref().unwrap();
    assert!(caps.add.is_none());
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_ne!(pod.host_network, Some(true));
    let drain: i64 = env[waypoint::config::DRAIN_DEADLINE].parse().unwrap();
    assert!(pod.termination_grace_period_seconds.unwrap() > drain);

    let mesh = rendered("ambient-mesh");
    let ca_service: Service = find(&mesh, "Service", "mesh-ca").typed();
    check_ca_client(&pod, c, &ca_service, &ca_dns_names(&mesh));
}

// ---------------------------------------------------------------------------------------------
// RBAC

fn rules(docs: &[Doc], kind: &str, name: &str) -> Vec<PolicyRule> {
    match kind {
        "ClusterRole" => find(docs, kind, name)
            .typed::<ClusterRole>()
            .rules
            .unwrap_or_default(),
        _ => find(docs, kind, name)
            .typed::<Role>()
            .rules
            .unwrap_or_default(),
    }
}

/// (group, resource) -> verbs; a verb narrowed to some objects is written `verb:name`.
fn grants(rules: &[PolicyRule]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none());
        let verbs: Vec<String> = match &rule.resource_names {
            None => rule.verbs.clone(),
            Some(names) => rule
                .verbs
                .iter()
                .flat_map(|v| names.iter().map(move |n| format!("{v}:{n}")))
                .collect(),
        };
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                out.entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(verbs.iter().cloned());
            }
        }
    }
    out
}

fn want_grants(list: &[((&str, &str), &[&str])]) -> BTreeMap<(String, String), BTreeSet<String>> {
    list.iter()
        .map(|((g, r), verbs)| {
            (
                (g.to_string(), r.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

fn read_only_grants(
    kinds: &[mesh::model::translate::Kind],
) -> BTreeMap<(String, String), BTreeSet<String>> {
    let verbs: BTreeSet<String> = ["get", "list", "watch"].map(str::to_owned).into();
    mesh::discovery::kube::required_resources(kinds)
        .into_iter()
        .map(|gr| (gr, verbs.clone()))
        .collect()
}

#[test]
fn rbac_is_least_privilege() {
    let mut docs = rendered("ambient-mesh");
    docs.extend(rendered("waypoint"));
    docs.extend(rendered("gateway"));
    for doc in docs
        .iter()
        .filter(|d| matches!(d.kind(), "ClusterRole" | "Role"))
    {
        for rule in rules(&docs, doc.kind(), doc.name()) {
            let words = rule
                .verbs
                .iter()
                .chain(rule.resources.iter().flatten())
                .chain(rule.api_groups.iter().flatten());
            for word in words {
                assert!(word != "*", "{}: a wildcard", doc.origin);
            }
        }
    }
    // The proxies read exactly what they watch.
    assert_eq!(
        grants(&rules(&docs, "ClusterRole", "mesh-ztunnel")),
        read_only_grants(&mesh::discovery::kube::ZTUNNEL_KINDS)
    );
    assert_eq!(
        grants(&rules(&docs, "ClusterRole", "mesh-waypoint")),
        read_only_grants(mesh::model::translate::Kind::WAYPOINT)
    );
    // The ingress gateway: what it watches cluster-wide in its ClusterRole, what it watches in
    // one namespace (Secrets) in a Role of that namespace, bound to its own account there.
    let ingress = mesh::discovery::kube::KubeSourceConfig::ingress(
        mesh::model::translate::TranslateConfig::default(),
        "istio-ingress",
    );
    let (namespaced, cluster_wide): (Vec<_>, Vec<_>) = ingress
        .kinds
        .iter()
        .partition(|kind| ingress.namespaced.contains_key(kind));
    assert_eq!(
        grants(&rules(&docs, "ClusterRole", "mesh-gateway")),
        read_only_grants(&cluster_wide)
    );
    assert!(
        !grants(&rules(&docs, "ClusterRole", "mesh-gateway"))
            .contains_key(&(String::new(), "secrets".to_owned())),
        "the gateway must not read Secrets cluster-wide"
    );
    let gateway_role = find(&docs, "Role", "istio-ingress");
    assert_eq!(
        gateway_role.value["metadata"]["namespace"], "istio-ingress",
        "the gateway's Secrets are read in its namespace only"
    );
    assert_eq!(
        grants(&rules(&docs, "Role", "istio-ingress")),
        read_only_grants(&namespaced)
    );
    assert_eq!(
        read_only_grants(&namespaced),
        want_grants(&[(("", "secrets"), &["get", "list", "watch"])])
    );
    let binding: RoleBinding = find(&docs, "RoleBinding", "istio-ingress").typed();
    assert_eq!(binding.metadata.namespace.as_deref(), Some("istio-ingress"));
    assert_eq!(
        (
            binding.role_ref.kind.as_str(),
            binding.role_ref.name.as_str()
        ),
        ("Role", "istio-ingress")
    );
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].name, "istio-ingress");
    // The CA: TokenReviews, reading pods to check a ztunnel asks only for its node's pods, and
    // what its root publisher does (watch namespaces and the root ConfigMaps, apply them).
    let mut ca_needs = want_grants(&[
        (("authentication.k8s.io", "tokenreviews"), &["create"]),
        (("", "pods"), &["get", "list"]),
    ]);
    for (group, resource, verbs) in mesh::ca::root_configmap::REQUIRED_PERMISSIONS {
        ca_needs
            .entry((group.to_owned(), resource.to_owned()))
            .or_default()
            .extend(verbs.iter().map(|v| (*v).to_owned()));
    }
    assert_eq!(grants(&rules(&docs, "ClusterRole", "mesh-ca")), ca_needs);
    assert_eq!(
        ca_needs[&(String::new(), "configmaps".to_owned())],
        BTreeSet::from(["create", "list", "patch", "watch"].map(str::to_owned)),
        "server-side apply creating a ConfigMap is authorized as create and patch"
    );
    // ... and its own Secret, in its namespace only: no secret anywhere else is readable.
    assert_eq!(
        grants(&rules(&docs, "Role", "mesh-ca")),
        want_grants(&[(("", "secrets"), &["get:mesh-ca", "create"])])
    );
    let roles: Vec<&str> = docs
        .iter()
        .filter(|d| matches!(d.kind(), "ClusterRole" | "Role"))
        .map(Doc::name)
        .collect();
    assert_eq!(
        roles,
        [
            "mesh-ca",
            "mesh-ca",
            "mesh-gateway",
            "mesh-waypoint",
            "mesh-ztunnel",
            "istio-ingress"
        ],
        "a new role needs a check here"
    );
    // Every binding names a role defined here and a service account that exists.
    let accounts: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|d| d.kind() == "ServiceAccount")
        .map(|d| {
            (
                d.value["metadata"]["namespace"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                d.name().to_owned(),
            )
        })
        .collect();
    for doc in docs
        .iter()
        .filter(|d| matches!(d.kind(), "ClusterRoleBinding" | "RoleBinding"))
    {
        let binding: ClusterRoleBinding = if doc.kind() == "ClusterRoleBinding" {
            doc.typed()
        } else {
            let rb: RoleBinding = doc.typed();
            ClusterRoleBinding {
                metadata: rb.metadata,
                role_ref: rb.role_ref,
                subjects: rb.subjects,
            }
        };
        find(&docs, &binding.role_ref.kind, &binding.role_ref.name);
        for subject in binding.subjects.iter().flatten() {
            assert_eq!(subject.kind, "ServiceAccount", "{}", doc.origin);
            let key = (subject.namespace.clone().unwrap(), subject.name.clone());
            assert!(
                accounts.contains(&key),
                "{}: no service account {key:?}",
                doc.origin
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The rendered YAML and the scripts

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn skip_or_fail(why: &str) {
    assert!(!ci(), "{why} (CI=true: this check must run)");
    println!("skipped: {why}");
}

#[test]
fn rendered_yaml_is_in_sync_with_the_charts() {
    let has_helm = Command::new("python3")
        .args(["-c", "import helm_python"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_helm {
        return skip_or_fail(
            "python3 with helm-python-sdk (Helm's SDK) not found; manifests/render.py needs it: \
             pip install helm-python-sdk",
        );
    }
    // helm lint --strict of every chart, and the rendered files are what Helm renders.
    let out = Command::new("python3")
        .arg(root().join("manifests/render.py"))
        .arg("--check")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("helm lint --strict: 3 charts, no warnings"),
        "{stderr}"
    );
    let render = |args: &[&str]| -> Vec<Value> {
        let out = Command::new("python3")
            .arg(root().join("manifests/render.py"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| {
                serde_json::to_value(
                    <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap(),
                )
                .unwrap()
            })
            .filter(|v: &Value| !v.is_null())
            .collect()
    };
    // A gateway of another name in another namespace, with its own labels: names, namespaces
    // and selectors follow, as with Istio's chart (`istio` from the name without `istio-`).
    let docs = render(&[
        "gateway",
        "--namespace",
        "edge",
        "--name",
        "istio-edge",
        "--set",
        "labels.tier=public",
        "--set",
        "service.type=ClusterIP",
    ]);
    for doc in &docs {
        if doc["kind"] != "ClusterRoleBinding" {
            assert_eq!(doc["metadata"]["namespace"], "edge", "{doc}");
            assert_eq!(doc["metadata"]["name"], "istio-edge", "{doc}");
        } else {
            assert_eq!(doc["metadata"]["name"], "mesh-gateway-edge-istio-edge");
            assert_eq!(doc["subjects"][0]["namespace"], "edge");
        }
    }
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["istio"], "edge");
    assert_eq!(labels["app"], "istio-edge");
    assert_eq!(labels["tier"], "public");
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let gateway_labels = env.iter().find(|e| e["name"] == "GATEWAY_LABELS").unwrap()["value"]
        .as_str()
        .unwrap();
    assert!(
        gateway_labels.contains("istio=edge") && gateway_labels.contains("tier=public"),
        "{gateway_labels}"
    );
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert_eq!(service["spec"]["selector"]["istio"], "edge");
    // `labels.istio` wins over the name, as in Istio's chart.
    let docs = render(&["gateway", "--set", "labels.istio=ingressgateway"]);
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    assert_eq!(service["spec"]["selector"]["istio"], "ingressgateway");

    // A waypoint for another namespace renders with that namespace everywhere.
    let docs = render(&[
        "waypoint",
        "--namespace",
        "demo",
        "--set",
        "name=reviews-wp",
        "--set",
        "gateway=true",
    ]);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "Gateway"
        ]
    );
    for doc in &docs {
        if doc["kind"] != "ClusterRoleBinding" {
            assert_eq!(doc["metadata"]["namespace"], "demo");
            assert_eq!(doc["metadata"]["name"], "reviews-wp");
        }
    }
    assert_eq!(docs[1]["subjects"][0]["namespace"], "demo");
}

fn bash() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("bash"))
        .find(|p| p.is_file())
        .expect("bash")
}

#[test]
fn scripts_are_valid_bash_and_shellcheck_clean() {
    let scripts = [root().join("tests/e2e/kind/run.sh")];
    for script in &scripts {
        let out = Command::new(bash()).arg("-n").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    match Command::new("shellcheck").args(&scripts).output() {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => println!("skipped shellcheck: not installed"),
    }
}

#[test]
fn kind_e2e_skips_cleanly_without_docker_or_kind() {
    let script = root().join("tests/e2e/kind/run.sh");
    let run = |path: &Path| {
        Command::new(bash())
            .arg(&script)
            .env_clear()
            .env("PATH", path)
            .output()
            .unwrap()
    };
    let empty = tempfile::tempdir().unwrap();
    let out = run(empty.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("skipped: docker not found"), "{stdout}");

    // Docker answering, kind missing.
    let with_docker = tempfile::tempdir().unwrap();
    let docker = with_docker.path().join("docker");
    std::fs::write(&docker, format!("#!{}\nexit 0\n", bash().display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(with_docker.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("skipped: kind not found"), "{stdout}");
}

/// The variables the `waypoint` binary reads in either role, plus `own` (the role's).
fn proxy_env(own: &[&str]) -> BTreeSet<String> {
    [
        waypoint::config::SERVICE_ACCOUNT,
        waypoint::config::TRUST_DOMAIN,
        waypoint::config::CLUSTER_ID,
        waypoint::config::CLUSTER_DOMAIN,
        waypoint::config::ROOT_NAMESPACE,
        waypoint::config::DRAIN_DEADLINE,
        waypoint::config::WORKLOAD_CERT_TTL,
        waypoint::config::PROTOCOL_DETECTION_TIMEOUT_MS,
        waypoint::config::WORKER_THREADS,
        mesh::ops::CA_ADDRESS,
        mesh::ops::CA_ROOT_CERT,
        mesh::ops::CA_SERVER_NAME,
        mesh::ops::CA_TOKEN_FILE,
        mesh::discovery::CONFIG_SOURCE,
        "RUST_LOG",
    ]
    .into_iter()
    .chain(own.iter().copied())
    .map(str::to_owned)
    .collect()
}
