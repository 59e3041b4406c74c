//! L7 authorization as Istio applies it in a waypoint: a pure function of one HTTP request and
//! the AuthorizationPolicies attached to this waypoint or to the destination service, so every
//! decision can be explained in the access log and table-tested.
//!
//! Order: any matching DENY rule denies; then, if any ALLOW policy applies, one of its rules
//! must match; otherwise the request is allowed. What the waypoint cannot evaluate
//! (`requestPrincipals`, which need JWT validation; `when` keys it does not know; a source
//! address it was not told) fails closed the way Istio's policy generator does: an ALLOW rule
//! using it matches nothing, and a DENY rule ignores that part and applies the rest, so it denies
//! more than written, never less. The handler answers a denial 403 with [`ACCESS_DENIED_BODY`].

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use mesh::model::{
    IpBlock, L7AuthorizationPolicy, L7Condition, L7ConditionKey, L7Operation, L7Rule, L7Source,
    L7Target, PolicyAction, StringMatch,
};

/// The body of a denied request's 403, as Envoy's RBAC filter writes it.
pub const ACCESS_DENIED_BODY: &str = "RBAC: access denied";

/// Where the request is going: which policies are attached is decided by this.
#[derive(Debug, Clone, Copy)]
pub struct AuthzTarget<'a> {
    /// This waypoint's Gateway (`targetRefs` kind `Gateway`).
    pub gateway_namespace: &'a str,
    pub gateway_name: &'a str,
    /// The destination service (`targetRefs` kind `Service`; its namespace also selects the
    /// namespace-wide policies).
    pub service_namespace: &'a str,
    pub service_name: &'a str,
    /// Its hostname; no policy field matches on it, it is carried for the caller's logs.
    pub service_hostname: &'a str,
    /// Istio's root namespace: namespace-wide policies there apply to every service.
    pub root_namespace: &'a str,
}

/// What authorization sees of one request.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The client's verified identity without `spiffe://` (`cluster.local/ns/default/sa/sleep`);
    /// `None` when it has none.
    pub source_principal: Option<&'a str>,
    /// The client's namespace, from that identity (Istio reads it from the principal; a namespace
    /// guessed from the address would let an unauthenticated client claim one).
    pub source_namespace: Option<&'a str>,
    /// The original client address (HBONE `forwarded`); `None` when not known, which fails
    /// closed for `ipBlocks` and `source.ip`.
    pub source_ip: Option<IpAddr>,
    /// Envoy's `remote.ip`, for `remoteIpBlocks`: the client address from `X-Forwarded-For`
    /// when the caller trusts it; `None` means the same as `source_ip`.
    pub remote_ip: Option<IpAddr>,
    /// The address the client dialled (the service VIP and port): Istio's waypoint matches
    /// `ports` and `destination.port` against the service port.
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub method: &'a str,
    /// The `:authority` (or `Host`) as the client sent it, port included when present: Istio
    /// matches `hosts` against the whole value, ignoring case, so `hosts: [web]` does not match
    /// `web:8080` (write `web:*` for that).
    pub host: &'a str,
    /// The `:path` as received; the query string and fragment are removed before matching
    /// `paths` (Envoy's `url_path`).
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// An opaque TCP connection (a TCP route through the waypoint): the HTTP fields of a rule
    /// (`hosts`, `methods`, `paths` and their `not` forms, `when: request.headers[..]`) cannot
    /// be evaluated, so, as Istio builds TCP filters, an ALLOW rule using them matches nothing
    /// and a DENY rule applies without them (denies more).
    pub tcp: bool,
}

/// The outcome, with what decided it for the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `<namespace>/<name>` of the policy that decided: the DENY policy that matched, the ALLOW
    /// policy whose rule allowed, or, when no ALLOW rule matched, the only ALLOW policy that
    /// applied (`None` if there were several). `None` when no policy applied.
    pub policy: Option<String>,
    /// Index of the matching rule in that policy; `None` when no rule matched.
    pub rule: Option<usize>,
}

impl Decision {
    fn no_policy() -> Self {
        Self {
            allowed: true,
            policy: None,
            rule: None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let policy = self.policy.as_deref().unwrap_or("-");
        match (self.allowed, self.rule) {
            (true, None) => write!(f, "allowed: no policy applies"),
            (true, Some(rule)) => write!(f, "allowed by ALLOW policy {policy} rule {rule}"),
            (false, Some(rule)) => write!(f, "denied by DENY policy {policy} rule {rule}"),
            (false, None) => match &self.policy {
                Some(p) => write!(f, "denied: no rule of ALLOW policy {p} matched"),
                None => write!(f, "denied: no rule of the ALLOW policies matched"),
            },
        }
    }
}

/// Evaluates the policies of `policies` attached to `target`, in Istio's order.
pub fn authorize(
    policies: &[Arc<L7AuthorizationPolicy>],
    target: &AuthzTarget<'_>,
    request: &AuthzRequest<'_>,
) -> Decision {
    let applicable = || policies.iter().filter(|p| applies(p, target));
    for policy in applicable().filter(|p| p.action == PolicyAction::Deny) {
        if let Some(rule) = matching_rule(policy, request) {
            return Decision {
                allowed: false,
                policy: Some(policy.key()),
                rule: Some(rule),
            };
        }
    }
    let mut allow_policies = 0;
    let mut only_allow = None;
    for policy in applicable().filter(|p| p.action == PolicyAction::Allow) {
        if let Some(rule) = matching_rule(policy, request) {
            return Decision {
                allowed: true,
                policy: Some(policy.key()),
                rule: Some(rule),
            };
        }
        allow_policies += 1;
        only_allow = Some(policy.key());
    }
    if allow_policies == 0 {
        return Decision::no_policy();
    }
    Decision {
        allowed: false,
        policy: only_allow.filter(|_| allow_policies == 1),
        rule: None,
    }
}

/// Is `policy` attached to this waypoint or to the destination service? Namespace-wide targets
/// apply here as the model defines them; note that Istio's own waypoints attach only policies
/// with `targetRefs` (Gateway, Service, or GatewayClass `istio-waypoint` from the root
/// namespace), so whether to produce `Namespace` targets for a waypoint is the translation's
/// decision.
fn applies(policy: &L7AuthorizationPolicy, target: &AuthzTarget<'_>) -> bool {
    policy.targets.iter().any(|t| match t {
        L7Target::Gateway { namespace, name } => {
            namespace == target.gateway_namespace && name == target.gateway_name
        }
        L7Target::Service { namespace, name } => {
            namespace == target.service_namespace && name == target.service_name
        }
        L7Target::Namespace(ns) => ns == target.service_namespace || ns == target.root_namespace,
    })
}

/// The first rule of `policy` that matches (an empty rule list matches nothing).
fn matching_rule(policy: &L7AuthorizationPolicy, request: &AuthzRequest<'_>) -> Option<usize> {
    policy
        .rules
        .iter()
        .position(|rule| rule_matches(rule, request, policy.action))
}

fn rule_matches(rule: &L7Rule, req: &AuthzRequest<'_>, action: PolicyAction) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, req, action)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, req, action)))
        && rule.when.iter().all(|c| condition_matches(c, req, action))
}

/// What a part the waypoint cannot evaluate counts as: no match in an ALLOW policy, a match in
/// a DENY policy (Istio drops the rule from an ALLOW policy and the field from a DENY rule).
fn unknown(action: PolicyAction) -> bool {
    action == PolicyAction::Deny
}

/// A positive list matches when empty or when any entry matches; with no value (a plaintext
/// client has no principal) a non-empty positive list cannot match.
fn positive<T>(list: &[T], value: Option<&str>, m: impl Fn(&T, &str) -> bool) -> bool {
    list.is_empty() || value.is_some_and(|v| list.iter().any(|e| m(e, v)))
}

/// A negative list matches when no entry matches; a missing value matches no entry.
fn negative<T>(list: &[T], value: Option<&str>, m: impl Fn(&T, &str) -> bool) -> bool {
    value.is_none_or(|v| !list.iter().any(|e| m(e, v)))
}

/// Istio writes principals without the scheme; accept patterns written with it too.
fn principal_matches(m: &StringMatch, principal: &str) -> bool {
    match m {
        StringMatch::Exact(s) => s.strip_prefix("spiffe://").unwrap_or(s) == principal,
        StringMatch::Prefix(p) => principal.starts_with(p.strip_prefix("spiffe://").unwrap_or(p)),
        other => other.matches(principal),
    }
}

/// `hosts` ignore ASCII case (Istio's fix for CVE-2021-39155).
fn host_matches(m: &StringMatch, host: &str) -> bool {
    let h = host.as_bytes();
    match m {
        StringMatch::Exact(s) => host.eq_ignore_ascii_case(s),
        StringMatch::Prefix(p) => h
            .get(..p.len())
            .is_some_and(|x| x.eq_ignore_ascii_case(p.as_bytes())),
        StringMatch::Suffix(s) => h
            .len()
            .checked_sub(s.len())
            .and_then(|start| h.get(start..))
            .is_some_and(|x| x.eq_ignore_ascii_case(s.as_bytes())),
        StringMatch::Any => true,
    }
}

fn ip_in(blocks: &[IpBlock], ip: IpAddr) -> bool {
    blocks.iter().any(|b| b.contains(ip))
}

fn source_matches(s: &L7Source, req: &AuthzRequest<'_>, action: PolicyAction) -> bool {
    let remote_ip = req.remote_ip.or(req.source_ip);
    // requestPrincipals need a validated JWT, which the waypoint does not do.
    (!s.request_principals || unknown(action))
        && positive(&s.principals, req.source_principal, principal_matches)
        && negative(&s.not_principals, req.source_principal, principal_matches)
        && positive(&s.namespaces, req.source_namespace, StringMatch::matches)
        && negative(
            &s.not_namespaces,
            req.source_namespace,
            StringMatch::matches,
        )
        && ip_blocks_match(&s.ip_blocks, &s.not_ip_blocks, req.source_ip, action)
        && ip_blocks_match(
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            remote_ip,
            action,
        )
}

/// `blocks`: the address is in one (or none given); `not_blocks`: in none. An address the
/// waypoint was not told fails closed.
fn ip_blocks_match(
    blocks: &[IpBlock],
    not_blocks: &[IpBlock],
    ip: Option<IpAddr>,
    action: PolicyAction,
) -> bool {
    match ip {
        Some(ip) => (blocks.is_empty() || ip_in(blocks, ip)) && !ip_in(not_blocks, ip),
        None => (blocks.is_empty() && not_blocks.is_empty()) || unknown(action),
    }
}

/// The path without query string and fragment, as Envoy's `url_path` matcher sees it.
fn url_path(path: &str) -> &str {
    path.find(['?', '#']).map_or(path, |end| &path[..end])
}

fn operation_matches(o: &L7Operation, req: &AuthzRequest<'_>, action: PolicyAction) -> bool {
    if req.tcp {
        let http_fields = !(o.hosts.is_empty()
            && o.not_hosts.is_empty()
            && o.methods.is_empty()
            && o.not_methods.is_empty()
            && o.paths.is_empty()
            && o.not_paths.is_empty());
        let port = req.destination_port;
        return (!http_fields || unknown(action))
            && (o.ports.is_empty() || o.ports.contains(&port))
            && !o.not_ports.contains(&port);
    }
    let host = Some(req.host).filter(|h| !h.is_empty());
    let method = Some(req.method).filter(|m| !m.is_empty());
    let path = Some(url_path(req.path));
    let port = req.destination_port;
    positive(&o.hosts, host, host_matches)
        && negative(&o.not_hosts, host, host_matches)
        && (o.ports.is_empty() || o.ports.contains(&port))
        && !o.not_ports.contains(&port)
        // Methods compare case-sensitively, as Envoy's `:method` header matcher does.
        && positive(&o.methods, method, StringMatch::matches)
        && negative(&o.not_methods, method, StringMatch::matches)
        && positive(&o.paths, path, StringMatch::matches)
        && negative(&o.not_paths, path, StringMatch::matches)
}

/// A header's value as Envoy's header matcher sees it: several values joined with `,`;
/// `host` and the pseudo-headers read from the request line.
fn header_value(req: &AuthzRequest<'_>, name: &str) -> Option<String> {
    match name {
        ":authority" | "host" => return Some(req.host.to_owned()).filter(|h| !h.is_empty()),
        ":method" => return Some(req.method.to_owned()),
        ":path" => return Some(req.path.to_owned()),
        _ => {}
    }
    let mut values = req.headers.get_all(name).iter();
    let mut joined = String::from_utf8_lossy(values.next()?.as_bytes()).into_owned();
    for v in values {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(joined)
}

/// `values`: any matches (or none given); `not_values`: none matches. `value: None` is an
/// absent header or a client without identity: no value matches it.
fn condition_values_match(c: &L7Condition, value: Option<&dyn Fn(&StringMatch) -> bool>) -> bool {
    match value {
        Some(m) => (c.values.is_empty() || c.values.iter().any(m)) && !c.not_values.iter().any(m),
        None => c.values.is_empty(),
    }
}

fn condition_matches(c: &L7Condition, req: &AuthzRequest<'_>, action: PolicyAction) -> bool {
    match &c.key {
        L7ConditionKey::Unsupported(_) => unknown(action),
        L7ConditionKey::RequestHeader(_) if req.tcp => unknown(action),
        L7ConditionKey::RequestHeader(name) => {
            let value = header_value(req, name);
            match value.as_deref() {
                Some(v) => condition_values_match(c, Some(&|m| m.matches(v))),
                None => condition_values_match(c, None),
            }
        }
        L7ConditionKey::SourceIp => match req.source_ip {
            Some(ip) => condition_values_match(c, Some(&|m| ip_value_matches(m, ip))),
            None => unknown(action),
        },
        L7ConditionKey::DestinationIp => {
            let ip = req.destination_ip;
            condition_values_match(c, Some(&|m| ip_value_matches(m, ip)))
        }
        L7ConditionKey::DestinationPort => {
            let port = req.destination_port;
            condition_values_match(c, Some(&|m| port_value_matches(m, port)))
        }
        L7ConditionKey::SourceNamespace => match req.source_namespace {
            Some(ns) => condition_values_match(c, Some(&|m| m.matches(ns))),
            None => condition_values_match(c, None),
        },
        L7ConditionKey::SourcePrincipal => match req.source_principal {
            Some(p) => condition_values_match(c, Some(&|m| principal_matches(m, p))),
            None => condition_values_match(c, None),
        },
    }
}

/// An address or CIDR (`10.0.0.0/8`); a wildcard form is matched against the printed address.
fn ip_value_matches(m: &StringMatch, ip: IpAddr) -> bool {
    let StringMatch::Exact(value) = m else {
        return m.matches(&ip.to_string());
    };
    match value.split_once('/') {
        Some((addr, prefix)) => match (addr.parse::<IpAddr>(), prefix.parse::<u8>()) {
            (Ok(addr), Ok(prefix)) => IpBlock { addr, prefix }.contains(ip),
            _ => false,
        },
        None => value.parse::<IpAddr>().is_ok_and(|v| v == ip),
    }
}

fn port_value_matches(m: &StringMatch, port: u16) -> bool {
    match m {
        StringMatch::Exact(value) => value.parse::<u16>().is_ok_and(|v| v == port),
        other => other.matches(&port.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "istio-system";

    fn target() -> AuthzTarget<'static> {
        AuthzTarget {
            gateway_namespace: "demo",
            gateway_name: "waypoint",
            service_namespace: "demo",
            service_name: "web",
            service_hostname: "web.demo.svc.cluster.local",
            root_namespace: ROOT,
        }
    }

    fn service(ns: &str, name: &str) -> L7Target {
        L7Target::Service {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn policy(
        ns: &str,
        name: &str,
        targets: Vec<L7Target>,
        action: PolicyAction,
        rules: Vec<L7Rule>,
    ) -> Arc<L7AuthorizationPolicy> {
        Arc::new(L7AuthorizationPolicy {
            name: name.into(),
            namespace: ns.into(),
            targets,
            action,
            rules,
        })
    }

    fn allow(rules: Vec<L7Rule>) -> Arc<L7AuthorizationPolicy> {
        policy(
            "demo",
            "allow",
            vec![service("demo", "web")],
            PolicyAction::Allow,
            rules,
        )
    }

    fn deny(rules: Vec<L7Rule>) -> Arc<L7AuthorizationPolicy> {
        policy(
            "demo",
            "deny",
            vec![service("demo", "web")],
            PolicyAction::Deny,
            rules,
        )
    }

    fn sm(values: &[&str]) -> Vec<StringMatch> {
        values.iter().map(|v| StringMatch::parse(v)).collect()
    }

    fn to(op: L7Operation) -> L7Rule {
        L7Rule {
            to: vec![op],
            ..L7Rule::default()
        }
    }

    fn from(source: L7Source) -> L7Rule {
        L7Rule {
            from: vec![source],
            ..L7Rule::default()
        }
    }

    fn when(key: L7ConditionKey, values: &[&str], not_values: &[&str]) -> L7Rule {
        L7Rule {
            when: vec![L7Condition {
                key,
                values: sm(values),
                not_values: sm(not_values),
            }],
            ..L7Rule::default()
        }
    }

    fn block(s: &str) -> IpBlock {
        let (addr, prefix) = s.split_once('/').unwrap();
        IpBlock {
            addr: addr.parse().unwrap(),
            prefix: prefix.parse().unwrap(),
        }
    }

    /// An owned request; `as_request` borrows it.
    #[derive(Debug, Clone)]
    struct Req {
        principal: Option<&'static str>,
        namespace: Option<&'static str>,
        source_ip: Option<IpAddr>,
        remote_ip: Option<IpAddr>,
        destination_ip: IpAddr,
        port: u16,
        method: &'static str,
        host: &'static str,
        path: &'static str,
        headers: HeaderMap,
        tcp: bool,
    }

    impl Default for Req {
        fn default() -> Self {
            Self {
                principal: Some("cluster.local/ns/demo/sa/sleep"),
                namespace: Some("demo"),
                source_ip: Some("10.1.0.5".parse().unwrap()),
                remote_ip: None,
                destination_ip: "10.96.0.10".parse().unwrap(),
                port: 8080,
                method: "GET",
                host: "web.demo.svc.cluster.local",
                path: "/",
                headers: HeaderMap::new(),
                tcp: false,
            }
        }
    }

    impl Req {
        fn as_request(&self) -> AuthzRequest<'_> {
            AuthzRequest {
                source_principal: self.principal,
                source_namespace: self.namespace,
                source_ip: self.source_ip,
                remote_ip: self.remote_ip,
                destination_ip: self.destination_ip,
                destination_port: self.port,
                method: self.method,
                host: self.host,
                path: self.path,
                headers: &self.headers,
                tcp: self.tcp,
            }
        }

        fn path(path: &'static str) -> Self {
            Self {
                path,
                ..Self::default()
            }
        }

        fn plaintext() -> Self {
            Self {
                principal: None,
                namespace: None,
                ..Self::default()
            }
        }

        fn header(mut self, name: &'static str, value: &'static str) -> Self {
            self.headers
                .append(name, http::HeaderValue::from_static(value));
            self
        }
    }

    fn check(policies: &[Arc<L7AuthorizationPolicy>], req: &Req) -> Decision {
        authorize(policies, &target(), &req.as_request())
    }

    fn allowed(policies: &[Arc<L7AuthorizationPolicy>], req: &Req) -> bool {
        check(policies, req).allowed
    }

    #[test]
    fn no_policy_allows() {
        let d = check(&[], &Req::default());
        assert_eq!(d, Decision::no_policy());
        assert_eq!(d.to_string(), "allowed: no policy applies");
    }

    #[test]
    fn allow_without_rules_allows_nothing_and_deny_without_rules_denies_nothing() {
        let d = check(&[allow(vec![])], &Req::default());
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("demo/allow"));
        assert_eq!(d.rule, None);
        assert_eq!(
            d.to_string(),
            "denied: no rule of ALLOW policy demo/allow matched"
        );

        assert_eq!(
            check(&[deny(vec![])], &Req::default()),
            Decision::no_policy()
        );
    }

    #[test]
    fn empty_rule_matches_everything() {
        let d = check(&[allow(vec![L7Rule::default()])], &Req::plaintext());
        assert!(d.allowed);
        assert_eq!((d.policy.as_deref(), d.rule), (Some("demo/allow"), Some(0)));
        assert_eq!(d.to_string(), "allowed by ALLOW policy demo/allow rule 0");
    }

    #[test]
    fn deny_wins_over_allow() {
        let policies = [
            allow(vec![L7Rule::default()]),
            deny(vec![
                to(L7Operation {
                    methods: sm(&["DELETE"]),
                    ..L7Operation::default()
                }),
                to(L7Operation {
                    paths: sm(&["/admin*"]),
                    ..L7Operation::default()
                }),
            ]),
        ];
        let d = check(&policies, &Req::path("/admin/users"));
        assert_eq!(
            d,
            Decision {
                allowed: false,
                policy: Some("demo/deny".into()),
                rule: Some(1),
            }
        );
        assert_eq!(d.to_string(), "denied by DENY policy demo/deny rule 1");
        let d = check(&policies, &Req::path("/public"));
        assert!(d.allowed);
        assert_eq!(d.policy.as_deref(), Some("demo/allow"));
    }

    #[test]
    fn some_allow_policy_must_match() {
        let only_admin = policy(
            "demo",
            "admin",
            vec![service("demo", "web")],
            PolicyAction::Allow,
            vec![to(L7Operation {
                paths: sm(&["/admin"]),
                ..L7Operation::default()
            })],
        );
        let only_public = allow(vec![to(L7Operation {
            paths: sm(&["/public"]),
            ..L7Operation::default()
        })]);
        let both = [only_admin.clone(), only_public];
        assert!(allowed(&both, &Req::path("/admin")));
        assert!(allowed(&both, &Req::path("/public")));
        let d = check(&both, &Req::path("/other"));
        assert_eq!(
            (d.allowed, d.policy.as_deref(), d.rule),
            (false, None, None)
        );
        assert_eq!(
            d.to_string(),
            "denied: no rule of the ALLOW policies matched"
        );
        assert!(!allowed(&[only_admin], &Req::path("/public")));
    }

    #[test]
    fn targets() {
        let deny_all = |targets: Vec<L7Target>| {
            vec![policy(
                "demo",
                "p",
                targets,
                PolicyAction::Deny,
                vec![L7Rule::default()],
            )]
        };
        let gateway = |ns: &str, name: &str| L7Target::Gateway {
            namespace: ns.into(),
            name: name.into(),
        };
        let req = Req::default();
        let cases: Vec<(&str, Vec<L7Target>, bool)> = vec![
            ("this waypoint", vec![gateway("demo", "waypoint")], true),
            ("another waypoint", vec![gateway("demo", "other")], false),
            (
                "same name elsewhere",
                vec![gateway("prod", "waypoint")],
                false,
            ),
            ("this service", vec![service("demo", "web")], true),
            ("another service", vec![service("demo", "api")], false),
            (
                "same service name elsewhere",
                vec![service("prod", "web")],
                false,
            ),
            (
                "service namespace",
                vec![L7Target::Namespace("demo".into())],
                true,
            ),
            (
                "other namespace",
                vec![L7Target::Namespace("prod".into())],
                false,
            ),
            (
                "root namespace",
                vec![L7Target::Namespace(ROOT.into())],
                true,
            ),
            (
                "any of several",
                vec![service("demo", "api"), gateway("demo", "waypoint")],
                true,
            ),
            ("none", vec![], false),
        ];
        for (name, targets, applies) in cases {
            assert_eq!(allowed(&deny_all(targets), &req), !applies, "{name}");
        }
    }

    #[test]
    fn root_namespace_is_a_parameter() {
        let p = [policy(
            "mesh-root",
            "deny-all",
            vec![L7Target::Namespace("mesh-root".into())],
            PolicyAction::Deny,
            vec![L7Rule::default()],
        )];
        let req = Req::default();
        assert!(authorize(&p, &target(), &req.as_request()).allowed);
        let t = AuthzTarget {
            root_namespace: "mesh-root",
            ..target()
        };
        let d = authorize(&p, &t, &req.as_request());
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("mesh-root/deny-all"));
    }

    #[test]
    fn principals() {
        let by = |values: &[&str], not_values: &[&str]| {
            [allow(vec![from(L7Source {
                principals: sm(values),
                not_principals: sm(not_values),
                ..L7Source::default()
            })])]
        };
        let sleep = Req::default();
        let plaintext = Req::plaintext();
        assert!(allowed(
            &by(&["cluster.local/ns/demo/sa/sleep"], &[]),
            &sleep
        ));
        assert!(allowed(
            &by(&["spiffe://cluster.local/ns/demo/sa/sleep"], &[]),
            &sleep
        ));
        assert!(!allowed(
            &by(&["cluster.local/ns/demo/sa/other"], &[]),
            &sleep
        ));
        assert!(allowed(&by(&["cluster.local/ns/demo/*"], &[]), &sleep));
        assert!(allowed(&by(&["*/sa/sleep"], &[]), &sleep));
        // `*` means "any authenticated client".
        assert!(allowed(&by(&["*"], &[]), &sleep));
        assert!(!allowed(&by(&["*"], &[]), &plaintext));
        assert!(!allowed(&by(&[], &["*/sa/sleep"]), &sleep));
        assert!(allowed(&by(&[], &["*/sa/other"]), &sleep));
        // Istio's "deny plaintext": notPrincipals: ["*"] matches only clients without identity.
        assert!(allowed(&by(&[], &["*"]), &plaintext));
        assert!(!allowed(&by(&[], &["*"]), &sleep));
    }

    #[test]
    fn namespaces() {
        let by = |values: &[&str], not_values: &[&str]| {
            [allow(vec![from(L7Source {
                namespaces: sm(values),
                not_namespaces: sm(not_values),
                ..L7Source::default()
            })])]
        };
        let req = Req::default();
        assert!(allowed(&by(&["demo"], &[]), &req));
        assert!(allowed(&by(&["prod", "de*"], &[]), &req));
        assert!(!allowed(&by(&["prod"], &[]), &req));
        assert!(!allowed(&by(&["demo"], &[]), &Req::plaintext()));
        assert!(!allowed(&by(&[], &["demo"]), &req));
        assert!(allowed(&by(&[], &["prod"]), &req));
    }

    #[test]
    fn ip_blocks() {
        let by = |blocks: &[&str], not_blocks: &[&str], action| {
            let source = L7Source {
                ip_blocks: blocks.iter().map(|b| block(b)).collect(),
                not_ip_blocks: not_blocks.iter().map(|b| block(b)).collect(),
                ..L7Source::default()
            };
            let rules = vec![from(source)];
            match action {
                PolicyAction::Allow => [allow(rules)],
                PolicyAction::Deny => [deny(rules)],
            }
        };
        let req = Req::default(); // from 10.1.0.5
        assert!(allowed(
            &by(&["10.1.0.0/16"], &[], PolicyAction::Allow),
            &req
        ));
        assert!(allowed(
            &by(&["10.1.0.5/32"], &[], PolicyAction::Allow),
            &req
        ));
        assert!(!allowed(
            &by(&["10.2.0.0/16"], &[], PolicyAction::Allow),
            &req
        ));
        assert!(!allowed(
            &by(&["10.0.0.0/8"], &["10.1.0.0/24"], PolicyAction::Allow),
            &req
        ));
        assert!(!allowed(
            &by(&["10.1.0.0/16"], &[], PolicyAction::Deny),
            &req
        ));
        // Source address unknown: fail closed both ways.
        let unknown = Req {
            source_ip: None,
            ..Req::default()
        };
        assert!(!allowed(
            &by(&["10.0.0.0/8"], &[], PolicyAction::Allow),
            &unknown
        ));
        assert!(!allowed(
            &by(&["10.0.0.0/8"], &[], PolicyAction::Deny),
            &unknown
        ));
        assert!(!allowed(
            &by(&[], &["10.0.0.0/8"], PolicyAction::Deny),
            &unknown
        ));
    }

    #[test]
    fn remote_ip_blocks() {
        let by = |blocks: &[&str], not_blocks: &[&str]| {
            [allow(vec![from(L7Source {
                remote_ip_blocks: blocks.iter().map(|b| block(b)).collect(),
                not_remote_ip_blocks: not_blocks.iter().map(|b| block(b)).collect(),
                ..L7Source::default()
            })])]
        };
        // Without a forwarded address, remote.ip is the source address (10.1.0.5).
        assert!(allowed(&by(&["10.1.0.0/16"], &[]), &Req::default()));
        let forwarded = Req {
            remote_ip: Some("203.0.113.7".parse().unwrap()),
            ..Req::default()
        };
        assert!(!allowed(&by(&["10.1.0.0/16"], &[]), &forwarded));
        assert!(allowed(&by(&["203.0.113.0/24"], &[]), &forwarded));
        assert!(!allowed(&by(&[], &["203.0.113.0/24"]), &forwarded));
        let unknown = Req {
            source_ip: None,
            ..Req::default()
        };
        assert!(!allowed(&by(&["10.0.0.0/8"], &[]), &unknown));
    }

    #[test]
    fn hosts_ignore_case_and_include_the_port() {
        let by = |values: &[&str], not_values: &[&str]| {
            [allow(vec![to(L7Operation {
                hosts: sm(values),
                not_hosts: sm(not_values),
                ..L7Operation::default()
            })])]
        };
        let host = |host: &'static str| Req {
            host,
            ..Req::default()
        };
        let exact = by(&["web.demo.svc.cluster.local"], &[]);
        assert!(allowed(&exact, &host("web.demo.svc.cluster.local")));
        assert!(allowed(&exact, &host("Web.Demo.SVC.cluster.local")));
        assert!(!allowed(&exact, &host("web.demo.svc.cluster.local:8080")));
        assert!(!allowed(&exact, &host("")));
        let with_port = by(&["web.demo.svc.cluster.local:*"], &[]);
        assert!(allowed(
            &with_port,
            &host("WEB.demo.svc.cluster.local:8080")
        ));
        assert!(!allowed(&with_port, &host("web.demo.svc.cluster.local")));
        assert!(allowed(
            &by(&["*.cluster.LOCAL"], &[]),
            &host("web.demo.svc.cluster.local")
        ));
        assert!(allowed(&by(&["*"], &[]), &host("anything")));
        assert!(!allowed(&by(&["*"], &[]), &host("")));
        assert!(!allowed(&by(&[], &["web.*"]), &host("WEB.demo")));
        assert!(allowed(&by(&[], &["api.*"]), &host("web.demo")));
    }

    #[test]
    fn ports() {
        let by = |ports: &[u16], not_ports: &[u16]| {
            [allow(vec![to(L7Operation {
                ports: ports.to_vec(),
                not_ports: not_ports.to_vec(),
                ..L7Operation::default()
            })])]
        };
        let req = Req::default(); // port 8080
        assert!(allowed(&by(&[80, 8080], &[]), &req));
        assert!(!allowed(&by(&[80], &[]), &req));
        assert!(!allowed(&by(&[], &[8080]), &req));
        assert!(allowed(&by(&[], &[80]), &req));
    }

    #[test]
    fn methods_are_case_sensitive() {
        let by = |values: &[&str], not_values: &[&str]| {
            [allow(vec![to(L7Operation {
                methods: sm(values),
                not_methods: sm(not_values),
                ..L7Operation::default()
            })])]
        };
        let method = |method: &'static str| Req {
            method,
            ..Req::default()
        };
        assert!(allowed(&by(&["GET", "HEAD"], &[]), &method("GET")));
        assert!(!allowed(&by(&["get"], &[]), &method("GET")));
        assert!(!allowed(&by(&["GET"], &[]), &method("POST")));
        assert!(!allowed(&by(&[], &["POST"]), &method("POST")));
        assert!(allowed(&by(&[], &["POST"]), &method("GET")));
    }

    #[test]
    fn paths_exact_prefix_suffix_and_not() {
        let by = |values: &[&str], not_values: &[&str]| {
            [allow(vec![to(L7Operation {
                paths: sm(values),
                not_paths: sm(not_values),
                ..L7Operation::default()
            })])]
        };
        let exact = by(&["/api"], &[]);
        assert!(allowed(&exact, &Req::path("/api")));
        assert!(allowed(&exact, &Req::path("/api?user=admin")));
        assert!(allowed(&exact, &Req::path("/api#top")));
        assert!(!allowed(&exact, &Req::path("/api/")));
        assert!(!allowed(&exact, &Req::path("/API")));
        let prefix = by(&["/api/*"], &[]);
        assert!(allowed(&prefix, &Req::path("/api/users?x=1")));
        assert!(!allowed(&prefix, &Req::path("/apiv2")));
        let suffix = by(&["*.png"], &[]);
        assert!(allowed(&suffix, &Req::path("/img/logo.png")));
        // The query string is not part of the path: this is not a .png.
        assert!(!allowed(&suffix, &Req::path("/download?f=logo.png")));
        let not_admin = by(&[], &["/admin*"]);
        assert!(!allowed(&not_admin, &Req::path("/admin/users")));
        assert!(allowed(&not_admin, &Req::path("/public?next=/admin")));
        let both = by(&["/api/*"], &["/api/internal*"]);
        assert!(allowed(&both, &Req::path("/api/users")));
        assert!(!allowed(&both, &Req::path("/api/internal/x")));
    }

    #[test]
    fn header_conditions() {
        let key = || L7ConditionKey::RequestHeader("x-user".into());
        let alice = [allow(vec![when(key(), &["alice"], &[])])];
        assert!(allowed(&alice, &Req::default().header("x-user", "alice")));
        assert!(!allowed(&alice, &Req::default().header("x-user", "bob")));
        assert!(!allowed(&alice, &Req::default()));
        // Several values are joined with `,`, as Envoy matches them.
        let two = Req::default()
            .header("x-user", "alice")
            .header("x-user", "bob");
        assert!(!allowed(&alice, &two));
        assert!(allowed(
            &[allow(vec![when(key(), &["alice,bob"], &[])])],
            &two
        ));
        let present = [allow(vec![when(key(), &["*"], &[])])];
        assert!(allowed(&present, &Req::default().header("x-user", "")));
        assert!(!allowed(&present, &Req::default()));
        let not_bob = [allow(vec![when(key(), &[], &["bob"])])];
        assert!(allowed(&not_bob, &Req::default().header("x-user", "alice")));
        assert!(allowed(&not_bob, &Req::default()));
        assert!(!allowed(&not_bob, &Req::default().header("x-user", "bob")));
        let prefix = [allow(vec![when(key(), &["adm*"], &[])])];
        assert!(allowed(&prefix, &Req::default().header("x-user", "admin")));
        let host = [allow(vec![when(
            L7ConditionKey::RequestHeader("host".into()),
            &["web.demo*"],
            &[],
        )])];
        assert!(allowed(&host, &Req::default()));
    }

    #[test]
    fn connection_conditions() {
        let check_when = |key: L7ConditionKey, values: &[&str], not_values: &[&str]| {
            allowed(
                &[allow(vec![when(key, values, not_values)])],
                &Req::default(),
            )
        };
        use L7ConditionKey::*;
        assert!(check_when(SourceIp, &["10.1.0.0/16"], &[]));
        assert!(check_when(SourceIp, &["10.1.0.5"], &[]));
        assert!(!check_when(SourceIp, &["10.2.0.0/16"], &[]));
        assert!(!check_when(SourceIp, &[], &["10.1.0.5"]));
        assert!(check_when(DestinationIp, &["10.96.0.0/12"], &[]));
        assert!(!check_when(DestinationIp, &["10.1.0.0/16"], &[]));
        assert!(check_when(DestinationPort, &["8080"], &[]));
        assert!(!check_when(DestinationPort, &["80"], &[]));
        assert!(!check_when(DestinationPort, &[], &["8080"]));
        assert!(check_when(SourceNamespace, &["demo"], &[]));
        assert!(!check_when(SourceNamespace, &[], &["demo"]));
        assert!(check_when(
            SourcePrincipal,
            &["cluster.local/ns/demo/sa/sleep"],
            &[]
        ));
        assert!(check_when(SourcePrincipal, &["*/sa/sleep"], &[]));
        assert!(!check_when(
            SourcePrincipal,
            &["cluster.local/ns/demo/sa/other"],
            &[]
        ));
        let plaintext = |key, values: &[&str], not_values: &[&str]| {
            allowed(
                &[allow(vec![when(key, values, not_values)])],
                &Req::plaintext(),
            )
        };
        assert!(!plaintext(SourcePrincipal, &["*"], &[]));
        assert!(plaintext(SourcePrincipal, &[], &["*"]));
        assert!(!plaintext(SourceNamespace, &["demo"], &[]));
    }

    #[test]
    fn every_when_must_hold() {
        let rule = L7Rule {
            when: vec![
                L7Condition {
                    key: L7ConditionKey::RequestHeader("x-user".into()),
                    values: sm(&["alice"]),
                    not_values: vec![],
                },
                L7Condition {
                    key: L7ConditionKey::SourceNamespace,
                    values: sm(&["demo"]),
                    not_values: vec![],
                },
            ],
            ..L7Rule::default()
        };
        let p = [allow(vec![rule])];
        assert!(allowed(&p, &Req::default().header("x-user", "alice")));
        assert!(!allowed(&p, &Req::default().header("x-user", "bob")));
        assert!(!allowed(&p, &Req::plaintext().header("x-user", "alice")));
    }

    #[test]
    fn any_from_and_any_to_within_a_rule() {
        let rule = L7Rule {
            from: vec![
                L7Source {
                    namespaces: sm(&["prod"]),
                    ..L7Source::default()
                },
                L7Source {
                    principals: sm(&["*/sa/sleep"]),
                    ..L7Source::default()
                },
            ],
            to: vec![
                L7Operation {
                    methods: sm(&["POST"]),
                    ..L7Operation::default()
                },
                L7Operation {
                    paths: sm(&["/health"]),
                    ..L7Operation::default()
                },
            ],
            when: vec![],
        };
        let p = [allow(vec![rule])];
        assert!(allowed(&p, &Req::path("/health")));
        assert!(!allowed(&p, &Req::path("/other")));
        assert!(!allowed(
            &p,
            &Req {
                principal: Some("cluster.local/ns/demo/sa/x"),
                ..Req::path("/health")
            }
        ));
    }

    #[test]
    fn unsupported_keys_fail_closed() {
        let claims = || L7ConditionKey::Unsupported("request.auth.claims[groups]".into());
        assert!(!allowed(
            &[allow(vec![when(claims(), &["admin"], &[])])],
            &Req::default()
        ));
        // In a DENY rule the condition is ignored and the rest of the rule applies.
        let d = check(
            &[deny(vec![when(claims(), &["admin"], &[])])],
            &Req::default(),
        );
        assert_eq!((d.allowed, d.rule), (false, Some(0)));
        let narrowed = L7Rule {
            when: vec![L7Condition {
                key: claims(),
                values: sm(&["admin"]),
                not_values: vec![],
            }],
            ..to(L7Operation {
                paths: sm(&["/admin"]),
                ..L7Operation::default()
            })
        };
        let p = [deny(vec![narrowed])];
        assert!(!allowed(&p, &Req::path("/admin")));
        assert!(allowed(&p, &Req::path("/public")));
    }

    #[test]
    fn request_principals_fail_closed() {
        let jwt = |namespaces: &[&str]| L7Source {
            request_principals: true,
            namespaces: sm(namespaces),
            ..L7Source::default()
        };
        assert!(!allowed(&[allow(vec![from(jwt(&[]))])], &Req::default()));
        // DENY: the JWT part is ignored, the source's other fields still narrow the rule.
        let p = [deny(vec![from(jwt(&["prod"]))])];
        assert!(allowed(&p, &Req::default()));
        let from_prod = Req {
            principal: Some("cluster.local/ns/prod/sa/x"),
            namespace: Some("prod"),
            ..Req::default()
        };
        assert!(!allowed(&p, &from_prod));
    }

    #[test]
    fn unknown_source_ip_condition_fails_closed() {
        let unknown = Req {
            source_ip: None,
            ..Req::default()
        };
        let ip = || L7ConditionKey::SourceIp;
        assert!(!allowed(
            &[allow(vec![when(ip(), &["10.0.0.0/8"], &[])])],
            &unknown
        ));
        assert!(!allowed(
            &[deny(vec![when(ip(), &["192.168.0.0/16"], &[])])],
            &unknown
        ));
    }

    #[test]
    fn url_path_strips_query_and_fragment() {
        assert_eq!(url_path("/a/b?c=d#e"), "/a/b");
        assert_eq!(url_path("/a#b?c"), "/a");
        assert_eq!(url_path("/plain"), "/plain");
        assert_eq!(url_path("?q"), "");
    }

    #[test]
    fn tcp_connections_fail_closed_on_http_fields() {
        use mesh::model::{L7Operation, L7Rule};
        let tcp = Req {
            tcp: true,
            method: "",
            path: "",
            host: "",
            ..Req::default()
        };
        let with_paths = |action| {
            Arc::new(L7AuthorizationPolicy {
                name: "p".into(),
                namespace: "demo".into(),
                targets: vec![L7Target::Namespace("demo".into())],
                action,
                rules: vec![L7Rule {
                    to: vec![L7Operation {
                        paths: vec![StringMatch::Exact("/admin".into())],
                        ..L7Operation::default()
                    }],
                    ..L7Rule::default()
                }],
            })
        };
        let target = AuthzTarget {
            gateway_namespace: "demo",
            gateway_name: "waypoint",
            service_namespace: "demo",
            service_name: "web",
            service_hostname: "web.demo.svc.cluster.local",
            root_namespace: "istio-system",
        };
        // DENY on a path: for TCP the rule applies without its path, so it denies.
        let deny = authorize(
            &[with_paths(PolicyAction::Deny)],
            &target,
            &tcp.as_request(),
        );
        assert!(!deny.allowed);
        // ALLOW only on a path: matches nothing for TCP.
        let allow = authorize(
            &[with_paths(PolicyAction::Allow)],
            &target,
            &tcp.as_request(),
        );
        assert!(!allow.allowed);
        // The same policies over HTTP judge the path.
        let http = Req::default();
        assert!(
            authorize(
                &[with_paths(PolicyAction::Deny)],
                &target,
                &http.as_request()
            )
            .allowed
        );
    }
}
