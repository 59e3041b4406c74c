//! The route table: for every Service, the VirtualService routes that apply, and the pick of one
//! route (and one weighted destination) per request or connection.
//!
//! Built whole from a [`State`] on every config change; lookups are by service key
//! (`<namespace>/<name>`). A service without a VirtualService gets Istio's default route: one
//! catch-all route to itself with the default retry policy and no timeout.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use mesh::model::{
    Destination, DirectResponse, HeaderOperations, HttpAction, HttpMatch, HttpRoute, Redirect,
    RouteDestination, ServerHost, Service, State, TcpRoute, TlsRoute, VirtualService,
};

use super::filters::{self, FilterError};
use super::matcher::{RequestContext, RequestView, l4_match_holds};
use super::retry::default_retry_policy;
use crate::request::SourceInfo;

/// The name Istio gives the route it generates for a service without a VirtualService.
pub const DEFAULT_ROUTE_NAME: &str = "default";

/// Every service's routes, compiled from one [`State`].
#[derive(Debug, Default)]
pub struct RouteTable {
    services: HashMap<String, ServiceRoutes>,
    conflicts: Vec<Conflict>,
    /// Ingress `Gateway` key (`ns/name`) -> its VirtualServices, oldest first.
    gateways: HashMap<String, Vec<GatewayVirtualService>>,
}

/// A VirtualService bound to an ingress Gateway, compiled.
#[derive(Debug)]
struct GatewayVirtualService {
    key: String,
    namespace: String,
    hosts: Vec<String>,
    http: Arc<[CompiledHttpRoute]>,
    tcp: Arc<[TcpRoute]>,
    tls: Vec<TlsRoute>,
}

impl GatewayVirtualService {
    /// Whether `server` takes this VirtualService's routes for `host`: the server's hosts cover
    /// it and allow the VirtualService's namespace.
    fn admitted_for(&self, server: &ScopedServer, host: &str) -> bool {
        server
            .hosts
            .iter()
            .any(|h| self.namespace_allowed(h) && host_matches(&h.host, host))
    }

    /// Whether `server` takes this VirtualService at all (TCP, where there is no host to go
    /// by): one of its hosts and one of the server's meet, in a namespace the server allows.
    fn admitted_anywhere(&self, server: &ScopedServer) -> bool {
        server.hosts.iter().any(|h| {
            self.namespace_allowed(h)
                && self
                    .hosts
                    .iter()
                    .any(|mine| host_matches(&h.host, mine) || host_matches(mine, &h.host))
        })
    }

    fn namespace_allowed(&self, h: &ServerHost) -> bool {
        h.namespace.as_ref().is_none_or(|ns| *ns == self.namespace)
    }
}

/// The Gateway servers a connection was accepted for (the ingress front door works it out
/// from the port and the SNI): the VirtualServices of these Gateways whose hosts meet these
/// servers' hosts are its routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerScope {
    pub servers: Vec<ScopedServer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedServer {
    /// The key its routes are under: the Gateway's `namespace/name`, or
    /// `namespace/name:listener` for a Gateway API listener ([`mesh::model::GatewayServer::routes`]).
    pub gateway: String,
    pub hosts: Vec<mesh::model::ServerHost>,
    /// `tls.httpsRedirect`: requests this server takes are answered 301 to `https://`.
    pub https_redirect: bool,
    /// TLS passed through unterminated (`PASSTHROUGH`): connections are routed by the
    /// VirtualServices' `tls` routes on their SNI. Otherwise a connection carried as opaque
    /// bytes (TCP, TLS terminated into TCP) takes their `tcp` routes.
    pub passthrough: bool,
}

impl ServerScope {
    /// Whether a request for `host` must be redirected to HTTPS: the server whose hosts cover
    /// it most specifically says `httpsRedirect` (Envoy's virtual host `require_tls`).
    pub fn redirects_to_https(&self, host: &str) -> bool {
        self.servers
            .iter()
            .filter_map(|s| {
                let best = s
                    .hosts
                    .iter()
                    .filter(|h| host_matches(&h.host, host))
                    .map(|h| host_specificity(&h.host))
                    .max()?;
                Some((best, s.https_redirect))
            })
            .fold(None::<((u8, usize), bool)>, |acc, item| match acc {
                Some(a) if a.0 >= item.0 => Some(a),
                _ => Some(item),
            })
            .is_some_and(|(_, redirect)| redirect)
    }
}

/// Whether `pattern` (`*`, `*.example.com`, `example.com`) covers `host` (lower case, no
/// port). A wildcard covers one or more labels in front of its suffix, as Envoy's domains.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// How specific a host pattern is, for Envoy's virtual host choice: an exact name beats any
/// wildcard, a longer wildcard suffix beats a shorter one, `*` comes last.
pub fn host_specificity(pattern: &str) -> (u8, usize) {
    if pattern == "*" {
        (0, 0)
    } else if pattern.starts_with('*') {
        (1, pattern.len())
    } else {
        (2, pattern.len())
    }
}

/// Two VirtualServices claim the same host: the earlier one in the state's order (the oldest)
/// applies and `shadowed` is ignored for that host. For the caller to log and count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub host: String,
    /// Key (`ns/name`) of the VirtualService that applies (for HTTPRoutes, their Service's).
    pub winner: String,
    /// Key of the VirtualService ignored for `host`.
    pub shadowed: String,
    /// What each is, for the log: `VirtualService ns/name` or `HTTPRoute ... (Service ...)`.
    pub winner_is: String,
    pub shadowed_is: String,
}

/// One service's routes.
#[derive(Debug)]
pub struct ServiceRoutes {
    pub service: Arc<Service>,
    /// Key of the VirtualService in force; `None` when the service has the default route.
    pub virtual_service: Option<String>,
    http: Arc<[CompiledHttpRoute]>,
    tcp: Arc<[TcpRoute]>,
    /// Where TCP goes when no `tcp` route matches (or there is none): the service itself.
    default_tcp: RouteDestination,
}

impl ServiceRoutes {
    /// The HTTP routes in match order.
    pub fn http_routes(&self) -> impl ExactSizeIterator<Item = &HttpRoute> {
        self.http.iter().map(|r| &r.route)
    }

    /// The VirtualService's TCP routes (empty: all TCP goes to the service itself).
    pub fn tcp_routes(&self) -> &[TcpRoute] {
        &self.tcp
    }
}

/// A route plus what is compiled once for it.
#[derive(Debug)]
struct CompiledHttpRoute {
    /// Position in the VirtualService's `http` list.
    index: usize,
    route: HttpRoute,
    /// `uriRegexRewrite`, unanchored (it replaces every match in the path), with the
    /// substitution in the regex crate's syntax.
    uri_regex_rewrite: Option<(regex::Regex, String)>,
}

impl CompiledHttpRoute {
    fn new(index: usize, route: HttpRoute) -> Self {
        let uri_regex_rewrite = route
            .rewrite
            .as_ref()
            .and_then(|r| r.uri_regex.as_ref())
            .map(|(re, substitution)| {
                // The translation compiles the pattern anchored (for matching); a rewrite finds
                // matches anywhere, as Envoy's `regex_rewrite`. Group numbers are the same.
                let unanchored =
                    regex::Regex::new(&re.pattern).unwrap_or_else(|_| re.compiled.clone());
                (unanchored, filters::translate_substitution(substitution))
            });
        Self {
            index,
            route,
            uri_regex_rewrite,
        }
    }
}

/// What the matched route does with the request.
#[derive(Debug, Clone, Copy)]
pub enum SelectedAction<'t> {
    /// Forward to this destination (one picked by weight).
    Route(&'t RouteDestination),
    /// Answer with a redirect ([`filters::redirect_response`]).
    Redirect(&'t Redirect),
    /// Answer directly ([`filters::direct_response`]).
    DirectResponse(&'t DirectResponse),
}

/// The route chosen for one request.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'t> {
    /// Position of the route in its VirtualService's `http` list (0 for the default route).
    pub index: usize,
    /// Key of the VirtualService the route came from; `None` for the default route.
    pub virtual_service: Option<&'t str>,
    /// The route: timeout, retries, fault, mirrors, CORS.
    pub route: &'t HttpRoute,
    /// The `match` entry that held; `None` when the route has no conditions.
    pub matched: Option<&'t HttpMatch>,
    pub action: SelectedAction<'t>,
    compiled: &'t CompiledHttpRoute,
}

impl<'t> Selected<'t> {
    /// The route's `name`, if it has one.
    pub fn name(&self) -> Option<&'t str> {
        self.route.name.as_deref()
    }

    /// The route name as Istio names the Envoy route (for access logs): the route's name, plus
    /// `.` and the match's name when the match has one.
    pub fn route_name(&self) -> String {
        let name = self.route.name.as_deref().unwrap_or("");
        match self.matched.and_then(|m| m.name.as_deref()) {
            Some(match_name) => format!("{name}.{match_name}"),
            None => name.to_owned(),
        }
    }

    /// The destination picked, for [`SelectedAction::Route`].
    pub fn destination(&self) -> Option<&'t RouteDestination> {
        match self.action {
            SelectedAction::Route(d) => Some(d),
            _ => None,
        }
    }

    /// The path and query after the route's `rewrite` (`uriRegexRewrite`, else `uri`), or
    /// `None` when the route does not rewrite the path.
    pub fn rewritten_path(&self, path_and_query: &str) -> Option<String> {
        if let Some((re, substitution)) = &self.compiled.uri_regex_rewrite {
            return Some(filters::regex_rewrite_path(
                path_and_query,
                re,
                substitution,
            ));
        }
        let uri = self.route.rewrite.as_ref()?.uri.as_deref()?;
        Some(filters::rewrite_path(path_and_query, uri, self.matched))
    }

    /// Everything the route does to the request before forwarding: the path rewrite, the
    /// header edits of the route then of the destination, and the authority (from
    /// `rewrite.authority`, else a `host`/`:authority` header edit of the route, else of the
    /// destination, as Istio resolves them).
    pub fn apply_request_filters(
        &self,
        parts: &mut http::request::Parts,
    ) -> Result<(), FilterError> {
        if let Some(path) = parts
            .uri
            .path_and_query()
            .and_then(|pq| self.rewritten_path(pq.as_str()))
        {
            filters::set_path_and_query(parts, &path)?;
        }
        let route_edits = &self.route.headers.request;
        let destination_edits = self.destination().map(|d| &d.headers.request);
        let layers: Vec<_> = std::iter::once(route_edits)
            .chain(destination_edits)
            .collect();
        filters::apply_header_edits(&mut parts.headers, &layers);
        let authority = self
            .route
            .rewrite
            .as_ref()
            .and_then(|r| r.authority.as_deref())
            .or_else(|| filters::edited_authority(route_edits))
            .or_else(|| destination_edits.and_then(filters::edited_authority));
        if let Some(authority) = authority {
            filters::set_authority(parts, authority)?;
        }
        Ok(())
    }

    /// The response header edits of the route then of the destination.
    pub fn apply_response_headers(&self, headers: &mut HeaderMap) {
        let layers: Vec<_> = std::iter::once(&self.route.headers.response)
            .chain(self.destination().map(|d| &d.headers.response))
            .collect();
        filters::apply_header_edits(headers, &layers);
    }
}

impl RouteTable {
    /// Compiles the routes of every service in `state`. For each service, the first
    /// VirtualService in `state.virtual_services` whose `hosts` contain the service's hostname
    /// applies; later ones for the same host are recorded in [`RouteTable::conflicts`]. A
    /// VirtualService without `http` routes leaves HTTP on the default route (as Istio skips it
    /// for HTTP ports); likewise for `tcp`.
    pub fn build(state: &State) -> RouteTable {
        let mut by_host: HashMap<&str, usize> = HashMap::new();
        let mut conflicts = Vec::new();
        for (i, vs) in state.virtual_services.iter().enumerate() {
            for host in &vs.hosts {
                match by_host.get(host.as_str()) {
                    Some(&winner) if winner != i => conflicts.push(Conflict {
                        host: host.clone(),
                        winner: state.virtual_services[winner].key(),
                        shadowed: vs.key(),
                        winner_is: state.virtual_services[winner].describe(),
                        shadowed_is: vs.describe(),
                    }),
                    Some(_) => {}
                    None => {
                        by_host.insert(host, i);
                    }
                }
            }
        }

        let mut compiled: HashMap<usize, CompiledVirtualService> = HashMap::new();
        let mut services = HashMap::with_capacity(state.services.len());
        for (key, service) in &state.services {
            let vs_index = by_host.get(service.hostname.as_str()).copied();
            let (http, tcp, vs_key) = match vs_index {
                Some(i) => {
                    let vs = &state.virtual_services[i];
                    let CompiledVirtualService { http, tcp } = compiled
                        .entry(i)
                        .or_insert_with(|| CompiledVirtualService::new(vs))
                        .clone();
                    let http = if http.is_empty() {
                        default_http_routes(service)
                    } else {
                        http
                    };
                    (http, tcp, Some(vs.key()))
                }
                None => (default_http_routes(service), Arc::from([]), None),
            };
            services.insert(
                key.clone(),
                ServiceRoutes {
                    service: service.clone(),
                    virtual_service: vs_key,
                    http,
                    tcp,
                    default_tcp: self_destination(service),
                },
            );
        }
        let gateways = state
            .gateway_virtual_services
            .iter()
            .map(|(gateway, list)| {
                let compiled = list
                    .iter()
                    .map(|vs| {
                        let CompiledVirtualService { http, tcp } = CompiledVirtualService::new(vs);
                        GatewayVirtualService {
                            key: vs.key(),
                            namespace: vs.namespace.clone(),
                            hosts: vs.hosts.clone(),
                            http,
                            tcp,
                            tls: vs.tls.clone(),
                        }
                    })
                    .collect();
                (gateway.clone(), compiled)
            })
            .collect();
        RouteTable {
            services,
            conflicts,
            gateways,
        }
    }

    /// The VirtualService of an ingress connection (`scope`) for a request to `host` (lower
    /// case, without port), by Envoy's virtual host choice: among the VirtualServices of the
    /// scope's Gateways that a server admits (its hosts cover `host` and allow the
    /// VirtualService's namespace), the one whose matching host is the most specific; of
    /// equals, the oldest. Returns its key and its routes.
    fn gateway_virtual_service(
        &self,
        scope: &ServerScope,
        host: &str,
    ) -> Option<&GatewayVirtualService> {
        let mut best: Option<((u8, usize), &GatewayVirtualService)> = None;
        for server in &scope.servers {
            for vs in self.gateways.get(&server.gateway).into_iter().flatten() {
                let Some(score) = vs
                    .hosts
                    .iter()
                    .filter(|h| host_matches(h, host))
                    .map(|h| host_specificity(h))
                    .max()
                else {
                    continue;
                };
                if best.is_none_or(|(b, _)| score > b) && vs.admitted_for(server, host) {
                    best = Some((score, vs));
                }
            }
        }
        best.map(|(_, vs)| vs)
    }

    /// [`Self::select_http`] for an ingress connection: the routes of the VirtualService
    /// chosen for `host` (see [`Self::gateway_virtual_service`]). `None`: no VirtualService of
    /// the scope takes the host, or none of its routes matches (404, as Envoy's "route not
    /// found").
    pub fn select_gateway_http<'t>(
        &'t self,
        scope: &ServerScope,
        host: &str,
        request: &RequestView<'_>,
        source: &SourceInfo,
        rng: &mut fastrand::Rng,
    ) -> Option<Selected<'t>> {
        let vs = self.gateway_virtual_service(scope, host)?;
        select_among(&vs.http, Some(&vs.key), request, source, rng)
    }

    /// Where an ingress connection carried as opaque bytes goes, and the key of the
    /// VirtualService that sent it there. A server passing TLS through (`passthrough`) takes
    /// the `tls` route whose SNI name covers `sni` most specifically (of equals, the oldest
    /// VirtualService's first); any other takes the first `tcp` route whose conditions hold, of
    /// the oldest VirtualService it admits. `port` is the Gateway port, `destination` the
    /// address the client dialled. `None`: no route (the connection is closed, as Envoy does
    /// without a filter chain).
    pub fn select_gateway_tcp(
        &self,
        scope: &ServerScope,
        sni: Option<&str>,
        port: u16,
        source: &SourceInfo,
        destination: IpAddr,
        rng: &mut fastrand::Rng,
    ) -> Option<(&str, &RouteDestination)> {
        let mut best: Option<((u8, usize), &GatewayVirtualService, &TlsRoute)> = None;
        for server in &scope.servers {
            let virtual_services = self.gateways.get(&server.gateway).into_iter().flatten();
            if !server.passthrough {
                for vs in virtual_services.filter(|vs| vs.admitted_anywhere(server)) {
                    let picked = pick_tcp(&vs.tcp, port, destination, source, rng);
                    if let Some(d) = picked {
                        return Some((&vs.key, d));
                    }
                }
                continue;
            }
            let Some(sni) = sni else { continue };
            for vs in virtual_services.filter(|vs| vs.admitted_for(server, sni)) {
                for route in &vs.tls {
                    let score = route
                        .matches
                        .iter()
                        .filter(|m| l4_match_holds(&m.l4, port, destination, source))
                        .flat_map(|m| &m.sni_hosts)
                        .filter(|h| host_matches(h, sni))
                        .map(|h| host_specificity(h))
                        .max();
                    if let Some(score) = score
                        && best.is_none_or(|(b, _, _)| score > b)
                    {
                        best = Some((score, vs, route));
                    }
                }
            }
        }
        let (_, vs, route) = best?;
        pick_weighted(&route.route, rng).map(|d| (vs.key.as_str(), d))
    }

    /// The number of VirtualServices bound to ingress Gateways.
    pub fn gateway_virtual_services(&self) -> usize {
        self.gateways.values().map(Vec::len).sum()
    }

    /// The routes of the service `ns/name`.
    pub fn service(&self, service_key: &str) -> Option<&ServiceRoutes> {
        self.services.get(service_key)
    }

    /// VirtualServices shadowed by an older one for the same host.
    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    /// The first HTTP route of the service whose conditions hold (any of its `match` entries,
    /// or none given), with one destination picked by weight from `rng`. `None` when the
    /// service is unknown or no route matches (Envoy answers 404, "route not found").
    pub fn select_http<'t>(
        &'t self,
        service_key: &str,
        request: &RequestView<'_>,
        source: &SourceInfo,
        rng: &mut fastrand::Rng,
    ) -> Option<Selected<'t>> {
        let routes = self.services.get(service_key)?;
        select_among(
            &routes.http,
            routes.virtual_service.as_deref(),
            request,
            source,
            rng,
        )
    }

    /// Where a TCP connection to the service goes: the first `tcp` route whose conditions hold
    /// (one destination picked by weight), else the service itself. `None` only for an unknown
    /// service. `port` is the service port, `destination` the address the client dialled.
    pub fn select_tcp(
        &self,
        service_key: &str,
        port: u16,
        source: &SourceInfo,
        destination: IpAddr,
        rng: &mut fastrand::Rng,
    ) -> Option<&RouteDestination> {
        let routes = self.services.get(service_key)?;
        pick_tcp(&routes.tcp, port, destination, source, rng).or(Some(&routes.default_tcp))
    }
}

/// The first of `routes` whose conditions hold (any of its matches, or none given), with one
/// destination picked by weight.
fn pick_tcp<'r>(
    routes: &'r [TcpRoute],
    port: u16,
    destination: IpAddr,
    source: &SourceInfo,
    rng: &mut fastrand::Rng,
) -> Option<&'r RouteDestination> {
    routes
        .iter()
        .filter(|r| {
            r.matches.is_empty()
                || r.matches
                    .iter()
                    .any(|m| l4_match_holds(m, port, destination, source))
        })
        .find_map(|r| pick_weighted(&r.route, rng))
}

/// One destination by relative weight. A single destination gets everything whatever its
/// weight; with several, zero-weight ones are never picked (if all are zero, the first is).
pub fn pick_weighted<'d>(
    destinations: &'d [RouteDestination],
    rng: &mut fastrand::Rng,
) -> Option<&'d RouteDestination> {
    if destinations.len() <= 1 {
        return destinations.first();
    }
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return destinations.first();
    }
    let mut ticket = rng.u64(0..total);
    for d in destinations {
        let weight = u64::from(d.weight);
        if ticket < weight {
            return Some(d);
        }
        ticket -= weight;
    }
    destinations.last()
}

/// A VirtualService's routes, compiled once and shared by all of its hosts.
/// The first of `routes` whose conditions hold, with one destination picked by weight.
fn select_among<'t>(
    routes: &'t [CompiledHttpRoute],
    virtual_service: Option<&'t str>,
    request: &RequestView<'_>,
    source: &SourceInfo,
    rng: &mut fastrand::Rng,
) -> Option<Selected<'t>> {
    let context = RequestContext::new(*request);
    routes.iter().find_map(|compiled| {
        let route = &compiled.route;
        let matched = if route.matches.is_empty() {
            None
        } else {
            Some(route.matches.iter().find(|m| context.holds(m, source))?)
        };
        let action = match &route.action {
            HttpAction::Route(destinations) => {
                SelectedAction::Route(pick_weighted(destinations, rng)?)
            }
            HttpAction::Redirect(r) => SelectedAction::Redirect(r),
            HttpAction::DirectResponse(d) => SelectedAction::DirectResponse(d),
        };
        Some(Selected {
            index: compiled.index,
            virtual_service,
            route,
            matched,
            action,
            compiled,
        })
    })
}

#[derive(Debug, Clone)]
struct CompiledVirtualService {
    http: Arc<[CompiledHttpRoute]>,
    tcp: Arc<[TcpRoute]>,
}

impl CompiledVirtualService {
    fn new(vs: &VirtualService) -> Self {
        Self {
            http: vs
                .http
                .iter()
                .enumerate()
                .map(|(i, r)| CompiledHttpRoute::new(i, r.clone()))
                .collect(),
            tcp: vs.tcp.clone().into(),
        }
    }
}

fn self_destination(service: &Service) -> RouteDestination {
    RouteDestination {
        destination: Destination {
            host: service.hostname.clone(),
            subset: None,
            port: None,
        },
        weight: 100,
        headers: HeaderOperations::default(),
    }
}

/// Istio's route for a service without a VirtualService.
pub fn default_http_route(service: &Service) -> HttpRoute {
    HttpRoute {
        name: Some(DEFAULT_ROUTE_NAME.to_owned()),
        matches: Vec::new(),
        action: HttpAction::Route(vec![self_destination(service)]),
        rewrite: None,
        timeout: None,
        retries: default_retry_policy(),
        fault: None,
        mirrors: Vec::new(),
        cors: None,
        headers: HeaderOperations::default(),
    }
}

fn default_http_routes(service: &Service) -> Arc<[CompiledHttpRoute]> {
    Arc::from([CompiledHttpRoute::new(0, default_http_route(service))])
}
