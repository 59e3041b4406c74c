//! The ingress front door (`waypoint gateway`): traffic from outside the mesh into it, the
//! counterpart of Istio's ingress gateway. It listens on the ports of the Istio `Gateway`s
//! whose `selector` matches this gateway's pod labels ([`plan`]), terminates TLS with the
//! servers' Secrets ([`tls`]), and hands every request to the same [`Engine`] the waypoint
//! uses, with a [`Downstream`] whose [`ServerScope`] names the Gateway servers the connection
//! came in on: the VirtualServices bound to those Gateways (`gateways: [ns/name]`) route it by
//! `Host`. A TCP server's connections, a TLS server's terminated ones and a PASSTHROUGH
//! server's untouched ones (the SNI read from the ClientHello, which is then replayed) go to
//! the engine as opaque bytes, routed by those VirtualServices' `tcp` and `tls` routes.
//! Upstream, the engine's connector reaches mesh endpoints over HBONE with this gateway's own
//! identity, so destination policies see it.
//!
//! Listeners follow the state: a port appears when a Gateway needs it and closes (open
//! connections stay) when none does; a changed Secret or server applies to new connections.
//! A server that cannot be served (missing Secret, bad PEM, key/certificate mismatch, a port or
//! host conflict, a port that cannot be bound) is logged once with what to check and counted in
//! `gateway_server_problems{gateway,server,secret,reason}` while it lasts; every other server
//! keeps working.

pub mod plan;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use mesh::discovery::Store;
use mesh::model::{PortClass, ServerProtocol, Service, ServicePort, State, TargetPort, TlsMode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::IngressConfig;
use crate::engine::{Downstream, Engine};
use crate::http_front::{Edge, serve_http};
use crate::live::Live;
use crate::request::SourceInfo;
use crate::rewind::Rewind;
use crate::route::{ScopedServer, ServerScope, host_matches, host_specificity};
use plan::{PlannedServer, Problem};

/// How long a TLS client may take to finish its handshake (or, passed through, to send its
/// ClientHello).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a ClientHello may take before a PASSTHROUGH port gives up on finding its SNI
/// (rustls's own bound on a handshake message is 64 KiB too).
const MAX_CLIENT_HELLO: usize = 64 * 1024;
/// How soon a port that could not be bound is tried again.
const BIND_RETRY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProblemLabels {
    gateway: String,
    server: String,
    secret: String,
    reason: String,
}

/// The ingress gateway: its listeners and what they serve.
#[derive(Debug)]
pub struct Ingress {
    engine: Arc<Engine>,
    store: Store,
    config: IngressConfig,
    /// This gateway's namespace (its Secrets) and name (its Service).
    namespace: String,
    name: String,
    cluster_domain: String,
    live: Arc<Live>,
    problems: Family<ProblemLabels, Gauge>,
    status: ArcSwap<IngressStatus>,
}

/// What `/config_dump` shows under `ingress`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IngressStatus {
    pub listeners: Vec<ListenerStatus>,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ListenerStatus {
    pub address: SocketAddr,
    pub class: PortClass,
    pub servers: Vec<ServerStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerStatus {
    pub gateway: String,
    pub server: String,
    pub hosts: Vec<String>,
    pub mode: Option<String>,
    pub https_redirect: bool,
    pub certificate: Option<tls::CertificateInfo>,
}

/// One port's configuration, swapped whole when the state changes.
#[derive(Debug)]
struct PortRuntime {
    service: Arc<Service>,
    service_port: ServicePort,
    kind: PortKind,
}

#[derive(Debug)]
enum PortKind {
    /// Plain HTTP: every server of the port routes by `Host`.
    Plain(Arc<ServerScope>),
    /// TLS: the server is chosen by SNI. `peek`: some server passes TLS through, so the
    /// ClientHello is read (and replayed) before anything is decided.
    Tls { servers: Vec<TlsServer>, peek: bool },
    /// Opaque TCP: the `tcp` routes of every server of the port.
    Tcp(Arc<ServerScope>),
}

#[derive(Debug)]
struct TlsServer {
    hosts: Vec<String>,
    scope: Arc<ServerScope>,
    action: TlsAction,
    describe: String,
}

#[derive(Debug)]
enum TlsAction {
    /// HTTPS: terminated, then HTTP (ALPN h2 / http/1.1).
    Http(Arc<tls::ServerTls>),
    /// TLS SIMPLE / MUTUAL: terminated, then opaque TCP.
    Tcp(Arc<tls::ServerTls>),
    /// PASSTHROUGH: the client's TLS goes to the backend as it is, by SNI.
    Passthrough,
}

impl TlsAction {
    fn terminated(&self) -> Option<&Arc<tls::ServerTls>> {
        match self {
            TlsAction::Http(t) | TlsAction::Tcp(t) => Some(t),
            TlsAction::Passthrough => None,
        }
    }
}

/// A bound port.
#[derive(Debug)]
struct Listener {
    runtime: Arc<ArcSwap<PortRuntime>>,
    stop: CancellationToken,
}

/// Built TLS configs by what they were built from, so an unchanged server keeps its config
/// (and its session tickets) across state changes.
type TlsCache = HashMap<String, Arc<tls::ServerTls>>;

impl Ingress {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Arc<Engine>,
        store: Store,
        config: IngressConfig,
        namespace: String,
        name: String,
        cluster_domain: String,
        live: Arc<Live>,
        registry: &mut Registry,
    ) -> Self {
        let problems = Family::<ProblemLabels, Gauge>::default();
        registry.register(
            "gateway_server_problems",
            "Gateway servers not served (1 while it lasts), by Gateway, server, Secret and reason",
            problems.clone(),
        );
        Self {
            engine,
            store,
            config,
            namespace,
            name,
            cluster_domain,
            live,
            problems,
            status: ArcSwap::from_pointee(IngressStatus::default()),
        }
    }

    /// What is served now (for `/config_dump`).
    pub fn status(&self) -> Arc<IngressStatus> {
        self.status.load_full()
    }

    /// Follows the state until `accepting` is cancelled (drain): then every listener stops
    /// accepting; open connections finish on their own.
    pub async fn run(self: Arc<Self>, accepting: CancellationToken) {
        let mut changes = self.store.subscribe();
        let mut listeners: BTreeMap<SocketAddr, Listener> = BTreeMap::new();
        let mut cache = TlsCache::new();
        let mut reported: BTreeSet<Problem> = BTreeSet::new();
        loop {
            let state = self.store.snapshot();
            let retry = self
                .apply(&state, &mut listeners, &mut cache, &mut reported)
                .await;
            let wait_retry = async {
                if retry {
                    tokio::time::sleep(BIND_RETRY).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = accepting.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
                _ = wait_retry => {}
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (_, listener) in listeners {
            listener.stop.cancel();
        }
    }

    /// Puts one state in force. Returns whether a port could not be bound (retry soon).
    async fn apply(
        self: &Arc<Self>,
        state: &Arc<State>,
        listeners: &mut BTreeMap<SocketAddr, Listener>,
        cache: &mut TlsCache,
        reported: &mut BTreeSet<Problem>,
    ) -> bool {
        let plan = plan::plan(
            state,
            &self.config.labels,
            &self.namespace,
            self.config.bind,
        );
        let mut problems = plan.problems.clone();
        let mut status = IngressStatus::default();
        let mut fresh_cache = TlsCache::new();
        let mut wanted = BTreeMap::new();
        for (addr, port) in &plan.ports {
            let (runtime, listener_status) =
                self.port_runtime(state, *addr, port, cache, &mut fresh_cache, &mut problems);
            if let Some(runtime) = runtime {
                wanted.insert(*addr, runtime);
                status.listeners.push(listener_status);
            }
        }
        *cache = fresh_cache;

        listeners.retain(|addr, listener| {
            let keep = wanted.contains_key(addr);
            if !keep {
                tracing::info!(address = %addr, "no Gateway server needs this port any more: stopped listening (open connections stay)");
                listener.stop.cancel();
            }
            keep
        });
        let mut bind_failed = false;
        for (addr, runtime) in wanted {
            let runtime = Arc::new(runtime);
            if let Some(listener) = listeners.get(&addr) {
                listener.runtime.store(runtime);
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(socket) => {
                    tracing::info!(address = %addr, "listening for Gateway servers");
                    let shared = Arc::new(ArcSwap::new(runtime));
                    let stop = CancellationToken::new();
                    tokio::spawn(self.clone().accept(socket, shared.clone(), stop.clone()));
                    listeners.insert(
                        addr,
                        Listener {
                            runtime: shared,
                            stop,
                        },
                    );
                }
                Err(e) => {
                    bind_failed = true;
                    status.listeners.retain(|l| l.address != addr);
                    for server in plan.ports.get(&addr).into_iter().flat_map(|p| &p.servers) {
                        problems.push(Problem {
                            gateway: server.gateway.clone(),
                            server: server.server.name.clone(),
                            port: addr.port(),
                            secret: String::new(),
                            reason: plan::BIND_FAILED,
                            message: format!(
                                "cannot listen on {addr}: {e} (a port below 1024 needs CAP_NET_BIND_SERVICE or net.ipv4.ip_unprivileged_port_start; is another process on it?); retrying every {}s",
                                BIND_RETRY.as_secs()
                            ),
                        });
                    }
                }
            }
        }

        problems.sort();
        problems.dedup();
        self.problems.clear();
        for p in &problems {
            self.problems
                .get_or_create(&ProblemLabels {
                    gateway: p.gateway.clone(),
                    server: p.server.clone(),
                    secret: p.secret.clone(),
                    reason: p.reason.to_owned(),
                })
                .set(1);
            if !reported.contains(p) {
                tracing::warn!(
                    gateway = %p.gateway,
                    server = %p.server,
                    port = p.port,
                    secret = %p.secret,
                    reason = p.reason,
                    "Gateway server not served: {}",
                    p.message
                );
            }
        }
        for gone in reported.iter().filter(|p| !problems.contains(p)) {
            tracing::info!(gateway = %gone.gateway, server = %gone.server, reason = gone.reason, "Gateway server problem resolved");
        }
        status.problems = problems.clone();
        *reported = problems.into_iter().collect();
        self.status.store(Arc::new(status));
        bind_failed
    }

    /// The runtime of one port; `None` when none of its servers could be built.
    fn port_runtime(
        &self,
        state: &State,
        addr: SocketAddr,
        port: &plan::PortPlan,
        cache: &TlsCache,
        fresh_cache: &mut TlsCache,
        problems: &mut Vec<Problem>,
    ) -> (Option<PortRuntime>, ListenerStatus) {
        let app_protocol = match port.class {
            PortClass::Http => "http",
            PortClass::Tls => "tls",
            PortClass::Tcp => "tcp",
        };
        let service_port = ServicePort {
            name: port.servers.first().map(|s| s.server.name.clone()),
            port: addr.port(),
            target: TargetPort::Number(addr.port()),
            protocol: "TCP".into(),
            app_protocol: Some(app_protocol.to_owned()),
        };
        let service = self.own_service(state, &service_port);
        let mut listener_status = ListenerStatus {
            address: addr,
            class: port.class,
            servers: Vec::new(),
        };
        let server_status =
            |s: &PlannedServer, certificate: Option<tls::CertificateInfo>| ServerStatus {
                gateway: s.gateway.clone(),
                server: s.server.name.clone(),
                hosts: s.server.hosts.iter().map(ToString::to_string).collect(),
                mode: s.server.tls.as_ref().map(|t| format!("{:?}", t.mode)),
                https_redirect: s.server.https_redirect,
                certificate,
            };
        let kind = match port.class {
            PortClass::Tls => {
                let mut servers = Vec::new();
                for s in &port.servers {
                    let passthrough = s
                        .server
                        .tls
                        .as_ref()
                        .is_some_and(|t| t.mode == TlsMode::Passthrough);
                    let action = if passthrough {
                        listener_status.servers.push(server_status(s, None));
                        TlsAction::Passthrough
                    } else {
                        let cache_key = tls_cache_key(s);
                        let built = match cache.get(&cache_key) {
                            Some(built) => Ok(built.clone()),
                            None => tls::build(s).map(Arc::new),
                        };
                        let built = match built {
                            Ok(built) => built,
                            Err(message) => {
                                problems.push(Problem {
                                    gateway: s.gateway.clone(),
                                    server: s.server.name.clone(),
                                    port: s.server.port,
                                    secret: s
                                        .credential
                                        .as_ref()
                                        .map(|c| c.key())
                                        .unwrap_or_default(),
                                    reason: plan::INVALID_CREDENTIAL,
                                    message,
                                });
                                continue;
                            }
                        };
                        fresh_cache.insert(cache_key, built.clone());
                        listener_status
                            .servers
                            .push(server_status(s, Some(built.certificate.clone())));
                        if s.server.protocol == ServerProtocol::Https {
                            TlsAction::Http(built)
                        } else {
                            TlsAction::Tcp(built)
                        }
                    };
                    servers.push(TlsServer {
                        hosts: s.server.hosts.iter().map(|h| h.host.clone()).collect(),
                        scope: Arc::new(ServerScope {
                            servers: vec![scoped(s)],
                        }),
                        action,
                        describe: s.describe(),
                    });
                }
                if servers.is_empty() {
                    return (None, listener_status);
                }
                let peek = servers
                    .iter()
                    .any(|s| matches!(s.action, TlsAction::Passthrough));
                PortKind::Tls { servers, peek }
            }
            PortClass::Http | PortClass::Tcp => {
                for s in &port.servers {
                    listener_status.servers.push(server_status(s, None));
                }
                let scope = Arc::new(ServerScope {
                    servers: port.servers.iter().map(scoped).collect(),
                });
                if port.class == PortClass::Http {
                    PortKind::Plain(scope)
                } else {
                    PortKind::Tcp(scope)
                }
            }
        };
        (
            Some(PortRuntime {
                service,
                service_port,
                kind,
            }),
            listener_status,
        )
    }

    /// The gateway's own Service (what policies and metrics name as the destination the client
    /// dialled): the real one from the state when it exists, else one made from the name.
    fn own_service(&self, state: &State, port: &ServicePort) -> Arc<Service> {
        let key = format!("{}/{}", self.namespace, self.name);
        if let Some(service) = state.services.get(&key) {
            return service.clone();
        }
        Arc::new(Service {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            hostname: format!(
                "{}.{}.svc.{}",
                self.name, self.namespace, self.cluster_domain
            ),
            vips: Vec::new(),
            ports: vec![port.clone()],
            endpoints: Vec::new(),
            labels: Default::default(),
            waypoint: None,
        })
    }

    async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        runtime: Arc<ArcSwap<PortRuntime>>,
        stop: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let runtime = runtime.load_full();
                    tokio::spawn(self.clone().connection(runtime, stream, peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed on a Gateway port");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        runtime: Arc<PortRuntime>,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) {
        let _live = self.live.enter();
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
        let connection = Connection {
            ingress: &self,
            runtime: &runtime,
            peer,
            local,
        };
        match &runtime.kind {
            PortKind::Plain(scope) => connection.http(scope, stream, "http").await,
            PortKind::Tcp(scope) => connection.tcp(scope, None, stream).await,
            PortKind::Tls {
                servers,
                peek: false,
            } => connection.terminate(servers, stream).await,
            PortKind::Tls {
                servers,
                peek: true,
            } => {
                let hello =
                    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, read_client_hello(&mut stream))
                        .await;
                let (hello, sni) = match hello {
                    Ok(Ok(read)) => read,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer, error = %e, "no TLS ClientHello");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %peer, "timed out waiting for a TLS ClientHello");
                        return;
                    }
                };
                let Some(server) = choose_server(servers, sni.as_deref()) else {
                    tracing::debug!(peer = %peer, ?sni, "closed: no server of this port takes the SNI");
                    return;
                };
                let stream = Rewind::new(hello, stream);
                match &server.action {
                    TlsAction::Passthrough => connection.tcp(&server.scope, sni, stream).await,
                    TlsAction::Http(_) | TlsAction::Tcp(_) => {
                        connection.terminate(servers, stream).await
                    }
                }
            }
        }
    }
}

/// One accepted connection on its way to the engine.
struct Connection<'a> {
    ingress: &'a Arc<Ingress>,
    runtime: &'a PortRuntime,
    peer: SocketAddr,
    local: SocketAddr,
}

impl Connection<'_> {
    fn downstream(&self, scope: &Arc<ServerScope>, sni: Option<String>) -> Arc<Downstream> {
        let state = self.ingress.store.snapshot();
        let ip = self.peer.ip();
        Arc::new(Downstream {
            service: self.runtime.service.clone(),
            port: self.runtime.service_port.clone(),
            vip: self.local,
            source: SourceInfo::new(None, Some(ip), state.workload_by_ip(ip).cloned()),
            peer_addr: self.peer,
            mutual_tls: false,
            scope: Some(scope.clone()),
            sni,
        })
    }

    async fn http<S>(&self, scope: &Arc<ServerScope>, io: S, scheme: &'static str)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let edge = Edge {
            peer: self.peer.ip(),
            scheme,
        };
        let downstream = self.downstream(scope, None);
        serve_http(self.ingress.engine.clone(), downstream, io, Some(edge)).await;
    }

    async fn tcp<S>(&self, scope: &Arc<ServerScope>, sni: Option<String>, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let downstream = self.downstream(scope, sni);
        self.ingress.engine.tcp(&downstream, io).await;
    }

    /// Terminates TLS with the server the SNI chooses, then serves HTTP or opaque TCP.
    async fn terminate<S>(&self, servers: &[TlsServer], stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let handshake = async {
            let start = acceptor.await?;
            let sni = start
                .client_hello()
                .server_name()
                .map(str::to_ascii_lowercase);
            let chosen = choose_server(servers, sni.as_deref())
                .and_then(|s| s.action.terminated().map(|tls| (s, tls)));
            let Some((server, tls)) = chosen else {
                return Err(std::io::Error::other(format!(
                    "no server of this port terminates TLS for SNI {sni:?}"
                )));
            };
            let stream = start.into_stream(tls.config.clone()).await?;
            Ok((server, tls, stream))
        };
        let (server, tls, tls_stream) =
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer, "TLS handshake timed out");
                    return;
                }
            };
        if !tls.client_sans.is_empty() {
            let allowed = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .is_some_and(|c| tls::client_san_allowed(c, &tls.client_sans));
            if !allowed {
                tracing::info!(peer = %peer, server = %server.describe, "refused: the client certificate has none of the server's subjectAltNames");
                return;
            }
        }
        match server.action {
            TlsAction::Http(_) => self.http(&server.scope, tls_stream, "https").await,
            TlsAction::Tcp(_) | TlsAction::Passthrough => {
                self.tcp(&server.scope, None, tls_stream).await
            }
        }
    }
}

/// Reads a TLS ClientHello whole (and nothing after it on its own account) and returns the
/// bytes read, to be replayed, with its SNI (lower case).
async fn read_client_hello(stream: &mut TcpStream) -> std::io::Result<(Bytes, Option<String>)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut buf = BytesMut::with_capacity(2048);
    loop {
        if buf.len() >= MAX_CLIENT_HELLO {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no complete ClientHello in {MAX_CLIENT_HELLO} bytes"),
            ));
        }
        let before = buf.len();
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before its ClientHello",
            ));
        }
        let mut fresh = &buf[before..];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh)?;
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let sni = accepted
                        .client_hello()
                        .server_name()
                        .map(str::to_ascii_lowercase);
                    return Ok((buf.freeze(), sni));
                }
                Ok(None) => {}
                Err((e, _)) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                }
            }
        }
    }
}

fn scoped(s: &PlannedServer) -> ScopedServer {
    ScopedServer {
        gateway: s.server.routes.clone(),
        hosts: s.server.hosts.clone(),
        https_redirect: s.server.https_redirect,
        passthrough: s
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == TlsMode::Passthrough),
    }
}

/// What a server's TLS is built from: its settings and the versions of its Secrets.
fn tls_cache_key(s: &PlannedServer) -> String {
    format!(
        "{}|{}|{:?}|{}|{}",
        s.gateway,
        s.server.index,
        s.server.tls,
        s.credential
            .as_ref()
            .map(|c| c.version.as_str())
            .unwrap_or(""),
        s.client_ca
            .as_ref()
            .map(|c| c.version.as_str())
            .unwrap_or("")
    )
}

/// The server for a client's SNI: the one whose host covers it most specifically (an exact
/// name, then the longest wildcard, then `*`; of equals the older). Without SNI: a server for
/// `*`, else the first (the oldest Gateway's).
fn choose_server<'s>(servers: &'s [TlsServer], sni: Option<&str>) -> Option<&'s TlsServer> {
    let Some(sni) = sni else {
        return servers
            .iter()
            .find(|s| s.hosts.iter().any(|h| h == "*"))
            .or_else(|| servers.first());
    };
    let mut best: Option<((u8, usize), &TlsServer)> = None;
    for server in servers {
        if let Some(s) = server
            .hosts
            .iter()
            .filter(|h| host_matches(h, sni))
            .map(|h| host_specificity(h))
            .max()
            && best.is_none_or(|(b, _)| s > b)
        {
            best = Some((s, server));
        }
    }
    best.map(|(_, s)| s)
}

#[cfg(test)]
mod tests;
