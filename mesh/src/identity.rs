//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! This is the only identity form the mesh issues or accepts. Parsing is strict (Istio's shape,
//! Kubernetes' naming rules) so that a certificate with a surprising URI SAN is rejected instead
//! of being compared loosely.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Why a string is not a valid identity. Each variant names what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    MissingScheme(String),
    #[error(
        "identity {0:?} does not have the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    WrongShape(String),
    #[error("identity {value:?}: trust domain {domain:?} is invalid: {why}")]
    TrustDomain {
        value: String,
        domain: String,
        why: &'static str,
    },
    #[error("identity {value:?}: {part} {name:?} is not a valid Kubernetes name: {why}")]
    Name {
        value: String,
        part: &'static str,
        name: String,
        why: &'static str,
    },
}

/// A workload identity. Cheap to clone (the parts are shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: Arc<str>,
    namespace: Arc<str>,
    service_account: Arc<str>,
}

const SCHEME: &str = "spiffe://";

impl Identity {
    /// Builds an identity from its parts, validating each as [`Identity::from_str`] would.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let rest = value
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::MissingScheme(value.to_owned()))?;
        let mut parts = rest.split('/');
        let (Some(domain), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(IdentityError::WrongShape(value.to_owned()));
        };
        validate_trust_domain(domain).map_err(|why| IdentityError::TrustDomain {
            value: value.to_owned(),
            domain: domain.to_owned(),
            why,
        })?;
        for (part, name) in [("namespace", ns), ("service account", sa)] {
            validate_name(name).map_err(|why| IdentityError::Name {
                value: value.to_owned(),
                part,
                name: name.to_owned(),
                why,
            })?;
        }
        Ok(Identity {
            trust_domain: domain.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`, at most 255 bytes.
pub fn validate_trust_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() {
        return Err("it is empty");
    }
    if domain.len() > 255 {
        return Err("it is longer than 255 characters");
    }
    if !domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("only lowercase letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

/// Kubernetes namespace and service-account names: DNS-1123 subdomains (lowercase alphanumerics,
/// `-` and `.`, starting and ending with an alphanumeric, at most 253 characters).
fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    let bytes = name.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes.iter().all(|&b| alnum(b) || b == b'-' || b == b'.') {
        return Err("only lowercase letters, digits, '-' and '.' are allowed");
    }
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-ratings");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
        );
        assert_eq!(
            Identity::new("cluster.local", "default", "bookinfo-ratings").unwrap(),
            id
        );
    }

    #[test]
    fn rejects_malformed_with_reason() {
        let cases: &[(&str, &str)] = &[
            ("http://cluster.local/ns/a/sa/b", "does not start with"),
            ("spiffe://cluster.local/ns/a", "does not have the form"),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                "does not have the form",
            ),
            (
                "spiffe://cluster.local/namespace/a/sa/b",
                "does not have the form",
            ),
            (
                "spiffe:///ns/a/sa/b",
                "trust domain \"\" is invalid: it is empty",
            ),
            ("spiffe://Cluster.Local/ns/a/sa/b", "only lowercase"),
            ("spiffe://cluster.local/ns//sa/b", "namespace \"\""),
            ("spiffe://cluster.local/ns/a/sa/B", "service account \"B\""),
            ("spiffe://cluster.local/ns/-a/sa/b", "start and end"),
            (
                "spiffe://cluster.local/ns/a b/sa/b",
                "only lowercase letters",
            ),
        ];
        for (input, expected) in cases {
            let err = input.parse::<Identity>().unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{input}: error {err:?} should contain {expected:?}"
            );
            assert!(
                err.contains(input),
                "{input}: error {err:?} should quote the input"
            );
        }
    }
}
