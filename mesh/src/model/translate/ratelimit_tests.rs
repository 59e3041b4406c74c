//! Tables for `RateLimitPolicy` (`mesh.ambient.dev/v1alpha1`): the domain form with defaults
//! applied, every rejection naming the object and field, last good versions, and target
//! resolution at assembly.

use super::tests::{messages, parse, translate};
use super::*;

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: mesh.ambient.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

fn service(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{ports: [{{port: 9080, name: http}}]}}\n---\n"
    )
}

fn waypoint(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{gatewayClassName: istio-waypoint}}\n---\n"
    )
}

const TO_REVIEWS: &str = "  targetRefs: [{kind: Service, group: '', name: reviews}]\n";

/// A policy on `reviews` with one rule whose body is `rule` (YAML block at rule level).
fn one_rule(rule: &str) -> String {
    let spec = format!("{TO_REVIEWS}  rules:\n  - {}", rule.trim_start());
    format!(
        "{}{}",
        service("demo", "reviews"),
        policy("demo", "limits", &spec)
    )
}

fn only_policy(t: &Translation) -> &RateLimitPolicy {
    assert!(t.rejections.is_empty(), "{:?}", messages(t));
    assert_eq!(t.state.rate_limit_policies.len(), 1);
    &t.state.rate_limit_policies[0]
}

#[test]
fn the_documented_example_with_defaults_applied() {
    let t = translate(&format!(
        "{}{}{}",
        service("demo", "reviews"),
        waypoint("demo", "waypoint"),
        policy(
            "demo",
            "reviews-limits",
            r#"
  targetRefs:
  - {group: "", kind: Service, name: reviews}
  - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}
  rules:
  - name: per-user
    match:
      pathPrefix: /api
      method: POST
      headers: {X-Tier: free}
    limit: {requests: 10, unit: second, burst: 5}
    key: {type: Header, header: X-User}
  - limit: {requests: 100, unit: minute}
  - name: per-client
    limit: {requests: 1, unit: hour}
    key: {type: SourcePrincipal}
"#
        )
    ));
    let p = only_policy(&t);
    assert_eq!(p.key(), "demo/reviews-limits");
    let reviews = RateLimitTarget::Service {
        namespace: "demo".into(),
        name: "reviews".into(),
    };
    let gateway = RateLimitTarget::Gateway {
        namespace: "demo".into(),
        name: "waypoint".into(),
    };
    assert_eq!(p.targets, vec![reviews.clone(), gateway.clone()]);
    assert!(p.unresolved_targets.is_empty());
    assert!(p.enforced_for(&reviews) && p.enforced_for(&gateway));
    assert_eq!(
        p.rules,
        vec![
            RateLimitRule {
                name: "per-user".into(),
                matches: RateLimitMatch {
                    path_prefix: Some("/api".into()),
                    method: Some("POST".into()),
                    headers: vec![("x-tier".into(), "free".into())],
                },
                limit: TokenBucketLimit {
                    requests: 10,
                    unit: RateUnit::Second,
                    burst: 5
                },
                key: RateLimitKey::Header("x-user".into()),
            },
            // Unnamed: called by its index; burst defaults to requests; key to Global.
            RateLimitRule {
                name: "1".into(),
                matches: RateLimitMatch::default(),
                limit: TokenBucketLimit {
                    requests: 100,
                    unit: RateUnit::Minute,
                    burst: 100
                },
                key: RateLimitKey::Global,
            },
            RateLimitRule {
                name: "per-client".into(),
                matches: RateLimitMatch::default(),
                limit: TokenBucketLimit {
                    requests: 1,
                    unit: RateUnit::Hour,
                    burst: 1
                },
                key: RateLimitKey::SourcePrincipal,
            },
        ]
    );
    assert_eq!(t.in_force[&Kind::RateLimitPolicy], 1);
}

#[test]
fn the_kind_is_recognised_by_group_and_version() {
    assert_eq!(
        Kind::from_type("mesh.ambient.dev/v1alpha1", "RateLimitPolicy"),
        Some(Kind::RateLimitPolicy)
    );
    assert_eq!(
        Kind::from_type("networking.istio.io/v1", "RateLimitPolicy"),
        None
    );
    // A version we do not read is an error naming the object, not a silent skip.
    let parsed = parse(&policy("demo", "x", TO_REVIEWS).replace("v1alpha1", "v9"));
    assert_eq!(
        parsed[0].as_ref().unwrap_err().to_string(),
        r#"RateLimitPolicy demo/x: apiVersion: "mesh.ambient.dev/v9" is not one of mesh.ambient.dev/v1alpha1"#
    );
}

#[test]
fn bad_input_is_rejected_naming_the_object_and_field() {
    let limit = "limit: {requests: 10, unit: second}";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "zero rate",
            one_rule("limit: {requests: 0, unit: second}"),
            "RateLimitPolicy demo/limits: spec.rules[0].limit.requests: 0 is not a rate: it must be a whole number from 1 to 4294967295",
        ),
        (
            "negative rate",
            one_rule("limit: {requests: -5, unit: minute}"),
            "RateLimitPolicy demo/limits: spec.rules[0].limit.requests: -5 is not a rate: it must be a whole number from 1 to 4294967295",
        ),
        (
            "unknown unit",
            one_rule("limit: {requests: 10, unit: fortnight}"),
            r#"RateLimitPolicy demo/limits: spec.rules[0].limit.unit: "fortnight" is not one of second, minute, hour"#,
        ),
        (
            "unit spelt like Envoy",
            one_rule("limit: {requests: 10, unit: SECOND}"),
            r#"RateLimitPolicy demo/limits: spec.rules[0].limit.unit: "SECOND" is not one of second, minute, hour"#,
        ),
        (
            "missing unit",
            one_rule("limit: {requests: 10}"),
            "RateLimitPolicy demo/limits: spec.rules[0].limit.unit: a unit (second, minute or hour) is required",
        ),
        (
            "missing requests",
            one_rule("limit: {unit: second}"),
            "RateLimitPolicy demo/limits: spec.rules[0].limit.requests: the number of requests per unit is required",
        ),
        (
            "zero burst",
            one_rule("limit: {requests: 10, unit: second, burst: 0}"),
            "RateLimitPolicy demo/limits: spec.rules[0].limit.burst: 0 is not a bucket size: it must be a whole number from 1 to 4294967295",
        ),
        (
            "fractional rate",
            one_rule("limit: {requests: 0.5, unit: second}"),
            "RateLimitPolicy demo/limits: spec.rules[0].limit.requests: invalid type: floating point `0.5`, expected i64",
        ),
        (
            "no limit",
            one_rule("match: {pathPrefix: /x}"),
            "RateLimitPolicy demo/limits: spec.rules[0].limit: a limit ({requests, unit, burst}) is required",
        ),
        (
            "unknown key type",
            one_rule(&format!("{limit}\n    key: {{type: SourceIP}}")),
            r#"RateLimitPolicy demo/limits: spec.rules[0].key.type: "SourceIP" is not one of Global, SourcePrincipal, Header"#,
        ),
        (
            "header key without a header",
            one_rule(&format!("{limit}\n    key: {{type: Header}}")),
            "RateLimitPolicy demo/limits: spec.rules[0].key.header: type Header needs the header's name",
        ),
        (
            "header with another key type",
            one_rule(&format!(
                "{limit}\n    key: {{type: Global, header: x-user}}"
            )),
            "RateLimitPolicy demo/limits: spec.rules[0].key.header: only used with type Header",
        ),
        (
            "bad header key",
            one_rule(&format!(
                "{limit}\n    key: {{type: Header, header: 'x user'}}"
            )),
            r#"RateLimitPolicy demo/limits: spec.rules[0].key.header: "x user" is not a valid header name"#,
        ),
        (
            "relative path prefix",
            one_rule(&format!("{limit}\n    match: {{pathPrefix: api}}")),
            r#"RateLimitPolicy demo/limits: spec.rules[0].match.pathPrefix: "api" does not start with "/""#,
        ),
        (
            "lower-case method",
            one_rule(&format!("{limit}\n    match: {{method: get}}")),
            r#"RateLimitPolicy demo/limits: spec.rules[0].match.method: "get" is not an HTTP method as sent on the wire (methods are case-sensitive: GET, POST, ...)"#,
        ),
        (
            "bad match header",
            one_rule(&format!("{limit}\n    match: {{headers: {{'a b': c}}}}")),
            r#"RateLimitPolicy demo/limits: spec.rules[0].match.headers.a b: "a b" is not a valid header name"#,
        ),
        (
            "misspelt field",
            one_rule(&format!("{limit}\n    match: {{pathprefix: /api}}")),
            "RateLimitPolicy demo/limits: spec.rules[0].match.pathprefix: unknown field `pathprefix`, expected one of `pathPrefix`, `method`, `headers`",
        ),
        (
            "empty rule name",
            one_rule(&format!("name: ''\n    {limit}")),
            "RateLimitPolicy demo/limits: spec.rules[0].name: an empty name; leave the field out to call the rule by its index",
        ),
        (
            "duplicate rule names",
            policy(
                "demo",
                "limits",
                &format!(
                    "{TO_REVIEWS}  rules:\n  - {{name: a, {limit}}}\n  - {{name: a, {limit}}}"
                ),
            ),
            r#"RateLimitPolicy demo/limits: spec.rules[1].name: "a" is also the name of spec.rules[0]; rule names must be unique (an unnamed rule is called by its index)"#,
        ),
        (
            "a name that clashes with an index",
            policy(
                "demo",
                "limits",
                &format!("{TO_REVIEWS}  rules:\n  - {{{limit}}}\n  - {{name: '0', {limit}}}"),
            ),
            r#"RateLimitPolicy demo/limits: spec.rules[1].name: "0" is also the name of spec.rules[0]; rule names must be unique (an unnamed rule is called by its index)"#,
        ),
        (
            "no rules",
            policy("demo", "limits", TO_REVIEWS),
            "RateLimitPolicy demo/limits: spec.rules: at least one rule is required",
        ),
        (
            "no targets",
            policy("demo", "limits", &format!("  rules:\n  - {{{limit}}}")),
            "RateLimitPolicy demo/limits: spec.targetRefs: at least one target (a Service or the waypoint's Gateway) is required",
        ),
        (
            "a Deployment target",
            policy(
                "demo",
                "limits",
                &format!(
                    "  targetRefs: [{{group: apps, kind: Deployment, name: reviews}}]\n  rules:\n  - {{{limit}}}"
                ),
            ),
            r#"RateLimitPolicy demo/limits: spec.targetRefs[0].kind: "Deployment" is not one of Service, Gateway"#,
        ),
        (
            "a Gateway without its group",
            policy(
                "demo",
                "limits",
                &format!(
                    "  targetRefs: [{{kind: Gateway, name: waypoint}}]\n  rules:\n  - {{{limit}}}"
                ),
            ),
            r#"RateLimitPolicy demo/limits: spec.targetRefs[0].group: "" is not one of gateway.networking.k8s.io for kind Gateway"#,
        ),
        (
            "another namespace",
            policy(
                "demo",
                "limits",
                &format!(
                    "  targetRefs: [{{kind: Service, name: reviews, namespace: prod}}]\n  rules:\n  - {{{limit}}}"
                ),
            ),
            r#"RateLimitPolicy demo/limits: spec.targetRefs[0].namespace: "prod" is another namespace; a RateLimitPolicy targets objects of its own namespace"#,
        ),
        (
            "a target without a name",
            policy(
                "demo",
                "limits",
                &format!("  targetRefs: [{{kind: Service}}]\n  rules:\n  - {{{limit}}}"),
            ),
            "RateLimitPolicy demo/limits: spec.targetRefs[0].name: a name is required",
        ),
    ];
    for (what, yaml, expected) in cases {
        let t = translate(&yaml);
        assert_eq!(messages(&t), vec![expected.to_owned()], "{what}");
        assert!(t.state.rate_limit_policies.is_empty(), "{what}");
        assert!(!t.rejections[0].kept_last_good, "{what}");
    }
}

#[test]
fn a_bad_update_keeps_the_last_good_version_and_others_keep_working() {
    let mut translator = Translator::new(TranslateConfig::default());
    let good = |requests: i64| {
        policy(
            "demo",
            "limits",
            &format!("{TO_REVIEWS}  rules:\n  - limit: {{requests: {requests}, unit: second}}"),
        )
    };
    let other = policy(
        "demo",
        "other",
        &format!("{TO_REVIEWS}  rules:\n  - limit: {{requests: 7, unit: minute}}"),
    );
    let first = translator.translate(parse(&format!(
        "{}{}{other}",
        service("demo", "reviews"),
        good(10)
    )));
    assert!(first.rejections.is_empty(), "{:?}", messages(&first));

    let second = translator.translate(parse(&format!(
        "{}{}{}",
        service("demo", "reviews"),
        good(0),
        other.replace("requests: 7", "requests: 8")
    )));
    assert_eq!(
        messages(&second),
        vec![
            "RateLimitPolicy demo/limits: spec.rules[0].limit.requests: 0 is not a rate: it must be a whole number from 1 to 4294967295"
        ]
    );
    assert!(second.rejections[0].kept_last_good);
    let requests: Vec<(String, u32)> = second
        .state
        .rate_limit_policies
        .iter()
        .map(|p| (p.key(), p.rules[0].limit.requests))
        .collect();
    assert_eq!(
        requests,
        vec![("demo/limits".into(), 10), ("demo/other".into(), 8)]
    );
}

#[test]
fn a_missing_target_is_accepted_but_reported_until_it_appears() {
    let yaml = policy(
        "demo",
        "limits",
        r#"
  targetRefs:
  - {kind: Service, name: reviews}
  - {kind: Service, name: ratings}
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  rules:
  - limit: {requests: 1, unit: second}
"#,
    );
    let ratings = RateLimitTarget::Service {
        namespace: "demo".into(),
        name: "ratings".into(),
    };
    let gateway = RateLimitTarget::Gateway {
        namespace: "demo".into(),
        name: "waypoint".into(),
    };
    let mut translator = Translator::new(TranslateConfig::default());
    let t = translator.translate(parse(&format!("{}{yaml}", service("demo", "reviews"))));
    let p = only_policy(&t);
    assert_eq!(
        p.unresolved_targets,
        vec![
            UnresolvedTarget {
                field: "spec.targetRefs[1]".into(),
                target: ratings.clone(),
            },
            UnresolvedTarget {
                field: "spec.targetRefs[2]".into(),
                target: gateway.clone(),
            },
        ]
    );
    assert!(!p.enforced_for(&ratings) && !p.enforced_for(&gateway));
    assert!(p.enforced_for(&RateLimitTarget::Service {
        namespace: "demo".into(),
        name: "reviews".into(),
    }));

    // A Gateway of another class is not a waypoint.
    let other_class = waypoint("demo", "waypoint").replace("istio-waypoint", "example.com/other");
    let t = translator.translate(parse(&format!(
        "{}{}{other_class}{yaml}",
        service("demo", "reviews"),
        service("demo", "ratings"),
    )));
    assert_eq!(
        only_policy(&t).unresolved_targets,
        vec![UnresolvedTarget {
            field: "spec.targetRefs[2]".into(),
            target: gateway.clone(),
        }]
    );

    // Created later: enforced without touching the policy.
    let t = translator.translate(parse(&format!(
        "{}{}{}{yaml}",
        service("demo", "reviews"),
        service("demo", "ratings"),
        waypoint("demo", "waypoint"),
    )));
    let p = only_policy(&t);
    assert!(p.unresolved_targets.is_empty());
    assert!(p.enforced_for(&ratings) && p.enforced_for(&gateway));
}

#[test]
fn duplicate_targets_keep_their_field_index() {
    let t = translate(&policy(
        "demo",
        "limits",
        r#"
  targetRefs:
  - {kind: Service, name: nope}
  - {kind: Service, group: core, name: nope}
  rules:
  - limit: {requests: 1, unit: second}
"#,
    ));
    let fields: Vec<&str> = only_policy(&t)
        .unresolved_targets
        .iter()
        .map(|u| u.field.as_str())
        .collect();
    assert_eq!(fields, ["spec.targetRefs[0]", "spec.targetRefs[1]"]);
}

#[test]
fn an_empty_spec_is_rejected_not_a_policy_that_limits_nothing() {
    let t = translate(
        "apiVersion: mesh.ambient.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: x, namespace: demo}\nspec:\n",
    );
    assert_eq!(
        messages(&t),
        vec![
            "RateLimitPolicy demo/x: spec.targetRefs: at least one target (a Service or the waypoint's Gateway) is required"
        ]
    );
}

/// The CRD shipped in `manifests/` names the group, kind and version the translation reads,
/// and its enums are exactly the values the translation accepts; its example is valid.
#[test]
fn the_shipped_crd_agrees_with_the_translation() {
    let crd: serde_json::Value = serde_yaml::from_str(include_str!(
        "../../../../manifests/crds/ratelimitpolicy.yaml"
    ))
    .unwrap();
    let spec = &crd["spec"];
    let version = spec["versions"][0]["name"].as_str().unwrap();
    let api_version = format!("{}/{version}", spec["group"].as_str().unwrap());
    assert_eq!(
        Kind::from_type(&api_version, spec["names"]["kind"].as_str().unwrap()),
        Some(Kind::RateLimitPolicy)
    );
    assert_eq!(Kind::RateLimitPolicy.api_versions(), [api_version.as_str()]);
    let schema = &spec["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let rule = &schema["properties"]["rules"]["items"]["properties"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let units = strings(&rule["limit"]["properties"]["unit"]["enum"]);
    let key_types = strings(&rule["key"]["properties"]["type"]["enum"]);
    let kinds = strings(&schema["properties"]["targetRefs"]["items"]["properties"]["kind"]["enum"]);
    assert_eq!(units, ["second", "minute", "hour"]);
    assert_eq!(key_types, ["Global", "SourcePrincipal", "Header"]);
    assert_eq!(kinds, ["Service", "Gateway"]);
    // Every enum value translates.
    for (unit, key_type) in units.iter().zip(key_types.iter().cycle()) {
        let header = if key_type == "Header" {
            ", header: x-user"
        } else {
            ""
        };
        let t = translate(&one_rule(&format!(
            "limit: {{requests: 1, unit: {unit}}}\n    key: {{type: {key_type}{header}}}"
        )));
        assert!(
            t.rejections.is_empty(),
            "{unit} {key_type}: {:?}",
            messages(&t)
        );
    }

    // The example in the CRD's header comment.
    let example: String = include_str!("../../../../manifests/crds/ratelimitpolicy.yaml")
        .lines()
        .skip_while(|l| !l.starts_with("# Example:"))
        .skip(2)
        .map_while(|l| l.strip_prefix("#   "))
        .map(|l| format!("{l}\n"))
        .collect();
    let t = translate(&format!("{}{example}", service("demo", "reviews")));
    let p = only_policy(&t);
    assert_eq!(p.rules[0].key, RateLimitKey::Header("x-user".into()));
    assert_eq!(p.rules[0].limit.burst, 5);
}

/// The README's example translates as documented.
#[test]
fn the_readme_example_translates() {
    let readme = include_str!("../../../../README.md");
    let section = &readme[readme.find("### Rate limiting").unwrap()..];
    let start = section.find("```yaml\n").unwrap() + "```yaml\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let t = translate(&format!("{}{example}", service("demo", "reviews")));
    let rule = &only_policy(&t).rules[0];
    assert_eq!(rule.name, "per-user");
    assert_eq!(
        rule.matches.headers,
        vec![("x-tier".to_owned(), "free".to_owned())]
    );
    assert_eq!(
        (rule.limit.requests, rule.limit.unit, rule.limit.burst),
        (10, RateUnit::Second, 5)
    );
}
