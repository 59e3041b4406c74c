//! Typos a person makes in YAML, caught before they change what the mesh does: fields a kind's
//! schema does not have (`podIp:` for `podIP:`), and documents whose kind or apiVersion is a near
//! miss of one the proxies read (`AuthorisationPolicy`, `Virtualservice`, an AuthorizationPolicy
//! under `networking.istio.io`). Pure functions; the file source decides what to do with them.

use std::fmt;

use super::Kind;

/// Writes a serde_ignored path the way the translation's errors name fields:
/// `spec.containers[0].ports[1].name`.
pub(super) fn field_path(path: &serde_ignored::Path<'_>) -> String {
    fn walk(path: &serde_ignored::Path<'_>, out: &mut String) {
        match path {
            serde_ignored::Path::Root => {}
            serde_ignored::Path::Seq { parent, index } => {
                walk(parent, out);
                out.push_str(&format!("[{index}]"));
            }
            serde_ignored::Path::Map { parent, key } => {
                walk(parent, out);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => walk(parent, out),
        }
    }
    let mut out = String::new();
    walk(path, &mut out);
    out
}

/// Fields of the core kinds whose misspelling changes what the mesh does (enrolment, identity,
/// addresses, ports, endpoints): an unknown field close to one of these gets a "did you mean".
const FIELDS_READ: &[&str] = &[
    "apiVersion",
    "metadata",
    "namespace",
    "labels",
    "ownerReferences",
    "creationTimestamp",
    "nodeName",
    "serviceAccountName",
    "serviceAccount",
    "hostNetwork",
    "containers",
    "containerPort",
    "podIP",
    "podIPs",
    "clusterIP",
    "clusterIPs",
    "targetPort",
    "appProtocol",
    "protocol",
    "addressType",
    "endpoints",
    "addresses",
    "conditions",
    "targetRef",
    "ready",
    "phase",
    "status",
    "spec",
    "kind",
    "name",
    "port",
    "ports",
];

/// A read field that `unknown` (the last segment of an unknown field's path) probably meant:
/// the same name in another case (`podIp`), one edit away (`lables`, `sepc`), or two for names
/// of 8 letters or more (`serviceAcountName`). A read field's own name found where it does not
/// belong gets none: it is misplaced, not misspelt.
pub(super) fn suggest_field(unknown: &str) -> Option<&'static str> {
    if FIELDS_READ.contains(&unknown) {
        return None;
    }
    FIELDS_READ
        .iter()
        .copied()
        .map(|known| {
            (
                distance(&known.to_lowercase(), &unknown.to_lowercase()),
                known,
            )
        })
        .filter(|(d, known)| match known.len() {
            0..4 => *d == 0,
            4..8 => *d <= 1,
            _ => *d <= 2,
        })
        .min()
        .map(|(_, known)| known)
}

/// What a document of an unread type probably meant to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindSuggestion {
    pub kind: Kind,
    pub api_version: String,
}

impl fmt::Display for KindSuggestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "apiVersion: {}, kind: {}", self.api_version, self.kind)
    }
}

/// For a document this proxy does not read (`Kind::from_type` is `None`): the kind it most likely
/// meant, when the kind is a near miss of one of ours (case, a plural, a letter or two) or is one
/// of ours under a related API group (another `*.istio.io` or `*.k8s.io` group, the core group,
/// a group one or two letters off). Real kinds of other groups (Knative's `Service`, Istio's
/// ingress `Gateway`, `ServiceEntry`, `Endpoints`) get none.
pub fn suggest_kind(api_version: &str, kind: &str) -> Option<KindSuggestion> {
    if Kind::from_type(api_version, kind).is_some() {
        return None;
    }
    let (group, version) = match api_version.rsplit_once('/') {
        Some(("core", version)) => ("", version),
        Some((group, version)) => (group, version),
        None => ("", api_version),
    };
    let (_, best) = Kind::ALL
        .into_iter()
        .filter_map(|candidate| {
            let kind_distance = if candidate.as_str() == kind {
                0
            } else {
                let d = distance(&candidate.as_str().to_lowercase(), &kind.to_lowercase());
                let allowed = match candidate.as_str().len() {
                    0..8 => 1,
                    8..12 => 2,
                    _ => 3,
                };
                (d <= allowed).then_some(d + 1)?
            };
            let group_distance = related_group(candidate.group(), group)?;
            Some(((kind_distance, group_distance), candidate))
        })
        .min()?;
    let same_version = format!("{}/{version}", best.group());
    let api_version = best
        .api_versions()
        .iter()
        .find(|v| **v == same_version || (best.group().is_empty() && **v == version))
        .or_else(|| best.api_versions().first())
        .map_or(same_version.clone(), |v| (*v).to_owned());
    Some(KindSuggestion {
        kind: best,
        api_version,
    })
}

/// How far `written` is from `expected` as API groups (0: the same), or `None` when unrelated.
fn related_group(expected: &str, written: &str) -> Option<usize> {
    if expected == written {
        return Some(0);
    }
    let family = |group: &str| -> Option<&'static str> {
        ["istio.io", "k8s.io"]
            .into_iter()
            .find(|suffix| group == *suffix || group.ends_with(&format!(".{suffix}")))
    };
    let related = match (expected, written) {
        // The core group and the Kubernetes groups are confused for each other
        // (`apiVersion: v1` on an EndpointSlice).
        ("", other) | (other, "") => family(other) == Some("k8s.io"),
        _ => {
            family(expected).is_some_and(|f| family(written) == Some(f))
                || distance(expected, written) <= 2
        }
    };
    related.then(|| distance(expected, written).max(1))
}

/// Optimal string alignment distance: insertions, deletions, substitutions and transpositions
/// of adjacent characters each cost 1. Inputs are names of a few dozen bytes.
pub(super) fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_misses_of_our_kinds_get_a_suggestion_and_other_kinds_none() {
        /// The kind and apiVersion suggested.
        type Suggested = Option<(Kind, &'static str)>;
        let cases: &[(&str, &str, Suggested)] = &[
            // Misspelt kinds, right group.
            (
                "security.istio.io/v1",
                "AuthorisationPolicy",
                Some((Kind::AuthorizationPolicy, "security.istio.io/v1")),
            ),
            (
                "networking.istio.io/v1",
                "Virtualservice",
                Some((Kind::VirtualService, "networking.istio.io/v1")),
            ),
            (
                "networking.istio.io/v1beta1",
                "DestinationRules",
                Some((Kind::DestinationRule, "networking.istio.io/v1beta1")),
            ),
            (
                "security.istio.io/v1beta1",
                "PeerAuthenticaton",
                Some((Kind::PeerAuthentication, "security.istio.io/v1beta1")),
            ),
            ("v1", "Pods", Some((Kind::Pod, "v1"))),
            ("v1", "pod", Some((Kind::Pod, "v1"))),
            ("v1", "NameSpace", Some((Kind::Namespace, "v1"))),
            ("v1", "Servcie", Some((Kind::Service, "v1"))),
            (
                "discovery.k8s.io/v1",
                "EndpointSlices",
                Some((Kind::EndpointSlice, "discovery.k8s.io/v1")),
            ),
            // The right kind in the wrong group: the version is kept when the group has it.
            (
                "networking.istio.io/v1",
                "AuthorizationPolicy",
                Some((Kind::AuthorizationPolicy, "security.istio.io/v1")),
            ),
            (
                "networking.istio.io/v1alpha3",
                "PeerAuthentication",
                Some((Kind::PeerAuthentication, "security.istio.io/v1")),
            ),
            (
                "security.istio.io/v1beta1",
                "VirtualService",
                Some((Kind::VirtualService, "networking.istio.io/v1beta1")),
            ),
            (
                "networking.istio.io/v1",
                "AuthorisationPolicy",
                Some((Kind::AuthorizationPolicy, "security.istio.io/v1")),
            ),
            (
                "securty.istio.io/v1",
                "AuthorizationPolicy",
                Some((Kind::AuthorizationPolicy, "security.istio.io/v1")),
            ),
            (
                "v1",
                "EndpointSlice",
                Some((Kind::EndpointSlice, "discovery.k8s.io/v1")),
            ),
            (
                "networking.k8s.io/v1",
                "Gateway",
                Some((Kind::Gateway, "gateway.networking.k8s.io/v1")),
            ),
            ("core/v1", "Pod", Some((Kind::Pod, "v1"))),
            (
                "discovery.k8s.io/v1",
                "Service",
                Some((Kind::Service, "v1")),
            ),
            // Somebody else's real kinds: no suggestion.
            ("serving.knative.dev/v1", "Service", None),
            ("networking.istio.io/v1", "Gateway", None),
            ("networking.istio.io/v1", "ServiceEntry", None),
            ("security.istio.io/v1", "RequestAuthentication", None),
            ("v1", "Endpoints", None),
            ("v1", "ServiceAccount", None),
            ("v1", "Secret", None),
            ("v1", "Node", None),
            ("batch/v1", "Job", None),
            ("apps/v1", "Deployment", None),
            ("v1", "ConfigMap", None),
            ("gateway.networking.k8s.io/v1", "HTTPRoute", None),
            ("gateway.networking.k8s.io/v1", "GatewayClass", None),
            // Ours, spelt right: nothing to suggest.
            ("v1", "Pod", None),
            ("security.istio.io/v1", "AuthorizationPolicy", None),
        ];
        for (api_version, kind, expected) in cases {
            let got = suggest_kind(api_version, kind);
            let expected = expected.map(|(kind, api_version)| KindSuggestion {
                kind,
                api_version: api_version.to_owned(),
            });
            assert_eq!(got, expected, "{api_version} {kind}");
        }
        assert_eq!(
            suggest_kind("security.istio.io/v1", "AuthorisationPolicy")
                .unwrap()
                .to_string(),
            "apiVersion: security.istio.io/v1, kind: AuthorizationPolicy"
        );
    }

    #[test]
    fn unknown_fields_near_a_read_field_get_a_suggestion() {
        let cases = [
            ("podIp", Some("podIP")),
            ("podIps", Some("podIPs")),
            ("serviceAcountName", Some("serviceAccountName")),
            ("serviceaccountname", Some("serviceAccountName")),
            ("nodename", Some("nodeName")),
            ("clusterIp", Some("clusterIP")),
            ("containerport", Some("containerPort")),
            ("hostNetwrok", Some("hostNetwork")),
            ("targetport", Some("targetPort")),
            ("lables", Some("labels")),
            ("Labels", Some("labels")),
            ("sepc", Some("spec")),
            ("nmae", Some("name")),
            // Nothing close, or a read field misplaced rather than misspelt.
            ("image", None),
            ("somethingElse", None),
            ("port", None),
            ("podIP", None),
        ];
        for (unknown, expected) in cases {
            assert_eq!(suggest_field(unknown), expected, "{unknown}");
        }
    }

    #[test]
    fn distance_counts_edits_and_transpositions() {
        let cases = [
            ("", "", 0),
            ("pod", "pod", 0),
            ("pod", "pods", 1),
            ("pod", "pd", 1),
            ("pod", "pid", 1),
            ("pod", "opd", 1),
            ("authorizationpolicy", "authorisationpolicy", 1),
            ("node", "pod", 2),
            ("", "abc", 3),
        ];
        for (a, b, expected) in cases {
            assert_eq!(distance(a, b), expected, "{a} {b}");
            assert_eq!(distance(b, a), expected, "{b} {a}");
        }
    }
}
