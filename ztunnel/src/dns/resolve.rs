//! Which names the DNS proxy answers itself, decided from the state alone (pure: no I/O, no
//! DNS messages). A query for a mesh service's hostname, or a short form of it that the pod's
//! search path turns into one, is answered with the service's VIPs (a headless service's ready
//! endpoints); everything else goes to the upstream resolver.

use std::net::IpAddr;

use mesh::model::{Service, State};

/// kubelet writes `options ndots:5` into the resolv.conf of every pod with the `ClusterFirst`
/// DNS policy (the default).
pub const KUBELET_NDOTS: usize = 5;

/// Which address records a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `A`.
    V4,
    /// `AAAA`.
    V6,
}

impl Family {
    fn contains(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// A pod's resolver settings: its search domains and `ndots`.
///
/// Pods have no file system of their own here, so ztunnel cannot read the pod's resolv.conf as
/// Istio's sidecar agent does; it assumes what kubelet writes for `ClusterFirst` pods, exactly
/// what Istio's ztunnel assumes in its shared (node) mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchPath {
    /// In the order the stub resolver tries them.
    pub domains: Vec<String>,
    /// A name with at least this many dots is tried as is before the search domains.
    pub ndots: usize,
}

impl SearchPath {
    /// kubelet's search path for a pod in `namespace`: `<namespace>.svc.<cluster domain>`,
    /// `svc.<cluster domain>`, `<cluster domain>`, with `ndots:5`.
    pub fn kubelet(namespace: &str, cluster_domain: &str) -> Self {
        let cluster_domain = normalize(cluster_domain);
        Self {
            domains: vec![
                format!("{namespace}.svc.{cluster_domain}").to_ascii_lowercase(),
                format!("svc.{cluster_domain}"),
                cluster_domain,
            ],
            ndots: KUBELET_NDOTS,
        }
    }

    /// The absolute names (without the trailing dot) a stub resolver tries for `name`, in
    /// order, as resolv.conf(5) describes: a name with fewer than `ndots` dots gets the search
    /// domains appended first and is tried as is last; any other name is tried as is first.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        let name = normalize(name);
        if name.is_empty() {
            return Vec::new();
        }
        let searched = self.domains.iter().map(|domain| format!("{name}.{domain}"));
        let dots = name.matches('.').count();
        if dots >= self.ndots {
            std::iter::once(name.clone()).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(name.clone())).collect()
        }
    }
}

/// What the proxy does with an `A`/`AAAA` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The name is a mesh service's: answer it (authoritatively) from the state.
    Answer(MeshAnswer),
    /// Not a name of the mesh: ask the upstream resolver.
    Forward,
}

/// The answer to a query for a mesh service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshAnswer {
    /// The service that answered, `<namespace>/<name>`, for logs.
    pub service: String,
    /// Set when the name was found only after removing a search domain the client's resolver
    /// had appended (`reviews.demo.demo.svc.cluster.local` -> `reviews.demo`): the answer is
    /// then a CNAME from the queried name to this name, plus the addresses under this name, as
    /// Istio's ztunnel answers (it saves the client a round trip per search domain).
    pub alias_of: Option<String>,
    /// The VIPs of the asked family (a headless service: its ready endpoints' pod IPs). Empty
    /// means the name exists but has no address of that family (NODATA, not NXDOMAIN).
    pub addresses: Vec<IpAddr>,
}

/// Decides how to answer a query for `name` (as it came on the wire: absolute, any case) of
/// `family` from a pod whose resolver uses `search`.
///
/// Every name the pod's stub resolver would try is looked up first (so `reviews`,
/// `reviews.demo`, `reviews.demo.svc` and the full `reviews.demo.svc.<cluster domain>` all
/// find the service); then, as Istio's ztunnel does, the name with one of the pod's search
/// domains removed.
pub fn decide(
    state: &State,
    search: &SearchPath,
    cluster_domain: &str,
    name: &str,
    family: Family,
) -> Decision {
    let name = normalize(name);
    let cluster_domain = normalize(cluster_domain);
    let found = |candidate: &str, alias_of: Option<&str>| {
        service_for(state, &cluster_domain, candidate).and_then(|service| {
            let addresses = addresses(state, service, family)?;
            Some(MeshAnswer {
                service: service.key(),
                alias_of: alias_of.map(str::to_owned),
                addresses,
            })
        })
    };
    if let Some(answer) = search
        .candidates(&name)
        .iter()
        .find_map(|candidate| found(candidate, None))
    {
        return Decision::Answer(answer);
    }
    for domain in &search.domains {
        let Some(stripped) = name
            .strip_suffix(domain.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|rest| !rest.is_empty())
        else {
            continue;
        };
        if let Some(answer) = search
            .candidates(stripped)
            .iter()
            .find_map(|candidate| found(candidate, Some(stripped)))
        {
            return Decision::Answer(answer);
        }
    }
    Decision::Forward
}

/// The service whose hostname is `fqdn`: `<name>.<namespace>.svc.<cluster domain>`, with
/// exactly one label each for name and namespace (pod hostnames of headless services,
/// `<pod>.<service>.<namespace>.svc...`, are left to the upstream: the model does not carry
/// pods' `hostname`/`subdomain`).
fn service_for<'a>(state: &'a State, cluster_domain: &str, fqdn: &str) -> Option<&'a Service> {
    let prefix = fqdn.strip_suffix(cluster_domain)?.strip_suffix(".svc.")?;
    let (name, namespace) = prefix.split_once('.')?;
    if name.is_empty() || namespace.is_empty() || namespace.contains('.') {
        return None;
    }
    state
        .services
        .get(&format!("{namespace}/{name}"))
        .map(AsRef::as_ref)
        .filter(|service| service.hostname.eq_ignore_ascii_case(fqdn))
}

/// The addresses of `service` for `family`; `None` for a service without a VIP or any ready
/// endpoint (an `ExternalName` service, or a headless one with no ready pod), which the
/// upstream (kube-dns) knows how to answer.
fn addresses(state: &State, service: &Service, family: Family) -> Option<Vec<IpAddr>> {
    if !service.vips.is_empty() {
        return Some(
            service
                .vips
                .iter()
                .filter(|ip| family.contains(ip))
                .copied()
                .collect(),
        );
    }
    let ready: Vec<IpAddr> = service
        .endpoints
        .iter()
        .filter(|endpoint| endpoint.ready)
        .flat_map(|endpoint| match state.endpoint_workload(endpoint) {
            // A dual-stack pod behind a headless service answers with each of its IPs.
            Some(workload) => workload.ips.clone(),
            None => vec![endpoint.ip],
        })
        .collect();
    if ready.is_empty() {
        return None;
    }
    let mut addresses: Vec<IpAddr> = Vec::new();
    for ip in ready.into_iter().filter(|ip| family.contains(ip)) {
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    Some(addresses)
}

/// Lower case, without the trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}
