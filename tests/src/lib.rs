//! Shared test support: a throw-away PKI backed by the real CA code, certificate sources,
//! an in-process gRPC CA, HBONE servers that forward like ztunnel's inbound does, and TCP echo
//! and checksum servers. Integration tests in `tests/` and the demo use these.

#![allow(missing_debug_implementations)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use mesh::ca::{
    Authenticator, CaMetrics, CaServer, CaService, CaServingNames, CertificateAuthority,
};
use mesh::cert_manager::{CertError, CertificateSource};
use mesh::hbone::{HboneServer, InboundTunnel, ServerConfig};
use mesh::identity::Identity;
use mesh::tls::WorkloadCertificate;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub mod load;
pub mod vcluster;

pub const TRUST_DOMAIN: &str = "cluster.local";

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
}

/// `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
pub fn id(trust_domain: &str, ns: &str, sa: &str) -> Identity {
    Identity::new(trust_domain, ns, sa).expect("valid test identity")
}

/// A CA root in a temporary directory, used through the real [`CertificateAuthority`].
pub struct TestPki {
    _dir: tempfile::TempDir,
    pub ca: Arc<CertificateAuthority>,
    pub trust_domain: String,
    root_key_pem: String,
    root_cert_pem: String,
}

impl TestPki {
    pub fn new(trust_domain: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = CertificateAuthority::load(
            &mesh::ca::CaKeySource::Directory(dir.path().to_owned()),
            trust_domain,
        )
        .expect("generate CA");
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).expect("read CA file");
        Self {
            root_key_pem: read(mesh::ca::authority::ROOT_KEY_FILE),
            root_cert_pem: read(mesh::ca::authority::ROOT_CERT_FILE),
            ca: Arc::new(ca),
            trust_domain: trust_domain.to_owned(),
            _dir: dir,
        }
    }

    pub fn root_pem(&self) -> &str {
        &self.root_cert_pem
    }

    pub fn id(&self, ns: &str, sa: &str) -> Identity {
        id(&self.trust_domain, ns, sa)
    }

    /// A certificate for `identity`, issued through the CA's CSR path.
    pub fn cert(&self, identity: &Identity) -> Arc<WorkloadCertificate> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = csr_for(identity, &key);
        let valid = self.ca.validate_csr(&csr).expect("valid CSR");
        let chain = self.ca.sign(&valid, None).expect("sign");
        Arc::new(
            WorkloadCertificate::new(identity.clone(), key.serialize_der(), &chain)
                .expect("usable certificate"),
        )
    }

    /// A certificate signed by this root with chosen validity (for expired certificates), which
    /// the CA itself would never issue.
    pub fn cert_with_validity(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Arc<WorkloadCertificate> {
        self.cert_trusting(identity, not_before, not_after, self)
    }

    /// Like [`TestPki::cert_with_validity`], but the holder trusts `trust`'s root instead of this
    /// one: a client from a foreign PKI that still accepts our servers.
    pub fn cert_trusting(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
        trust: &TestPki,
    ) -> Arc<WorkloadCertificate> {
        let root_key = rcgen::KeyPair::from_pem(&self.root_key_pem).expect("root key");
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&self.root_cert_pem, root_key).expect("issuer");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            identity.to_string().try_into().expect("uri"),
        )];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let chain = vec![cert.pem(), trust.root_cert_pem.clone()];
        Arc::new(
            WorkloadCertificate::new(identity.clone(), key.serialize_der(), &chain)
                .expect("usable certificate"),
        )
    }
}

/// A PEM CSR asking for `identity`, signed by `key`.
pub fn csr_for(identity: &Identity, key: &rcgen::KeyPair) -> String {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity.to_string().try_into().expect("uri"),
    )];
    params
        .serialize_request(key)
        .and_then(|c| c.pem())
        .expect("CSR")
}

/// A fixed set of certificates, by identity.
#[derive(Default, Clone)]
pub struct StaticCerts(HashMap<Identity, Arc<WorkloadCertificate>>);

impl StaticCerts {
    pub fn with(mut self, cert: Arc<WorkloadCertificate>) -> Self {
        self.0.insert(cert.identity().clone(), cert);
        self
    }
}

impl CertificateSource for StaticCerts {
    fn certificate<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<Arc<WorkloadCertificate>, CertError>> {
        let found = self.0.get(identity).cloned();
        Box::pin(async move {
            found.ok_or_else(|| CertError::Unavailable {
                identity: identity.clone(),
                reason: "not in the test's certificate set".into(),
            })
        })
    }
}

/// A running in-process CA over TLS gRPC.
pub struct RunningCa {
    pub addr: SocketAddr,
    pub root_pem: String,
    pub metrics: prometheus_client::registry::Registry,
    stop: CancellationToken,
}

impl Drop for RunningCa {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RunningCa {
    pub fn client_config(&self) -> mesh::ca::CaClientConfig {
        mesh::ca::CaClientConfig {
            address: self.addr.to_string(),
            root_cert_pem: self.root_pem.clone(),
            server_name: Some("localhost".into()),
            token: mesh::ca::TokenSource::None,
            impersonate: false,
            timeout: Duration::from_secs(5),
        }
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Starts the CA's gRPC server on `addr` (port 0 for any).
pub async fn start_ca(
    pki: &TestPki,
    authenticator: Arc<dyn Authenticator>,
    addr: SocketAddr,
) -> RunningCa {
    let mut metrics = prometheus_client::registry::Registry::default();
    let service = CaService::new(pki.ca.clone(), authenticator, CaMetrics::new(&mut metrics));
    let server = CaServer::bind(addr, service, &CaServingNames::default())
        .await
        .expect("bind CA");
    let addr = server.local_addr();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { server.run(s.cancelled_owned()).await });
    RunningCa {
        addr,
        root_pem: pki.root_pem().to_owned(),
        metrics,
        stop,
    }
}

/// A server that accepts TCP connections and never answers, keeping each open: a CA that hung
/// (or something else listening on its port). Stops when dropped.
pub struct SilentServer {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a [`SilentServer`] on loopback.
pub async fn start_silent_server() -> SilentServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (count, s) = (accepted.clone(), stop.clone());
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            tokio::select! {
                _ = s.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((conn, _)) => {
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        held.push(conn);
                    }
                    Err(_) => return,
                },
            }
        }
    });
    SilentServer {
        addr,
        accepted,
        stop,
    }
}

/// What an HBONE server saw of one tunnel request.
#[derive(Debug, Clone)]
pub struct SeenTunnel {
    pub peer_identity: Identity,
    pub authority: SocketAddr,
    pub headers: http::HeaderMap,
}

/// An HBONE server on loopback that forwards each tunnel to its `:authority`, answering 503 when
/// nothing listens there, the way ztunnel's inbound does. Every request is reported on the
/// returned channel.
pub async fn start_forwarding_hbone(
    cert: Arc<WorkloadCertificate>,
    config: ServerConfig,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<SeenTunnel>,
    CancellationToken,
) {
    let server = HboneServer::bind("127.0.0.1:0".parse().expect("addr"), config, Arc::new(cert))
        .await
        .expect("bind HBONE");
    let addr = server.local_addr();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone(), move |tunnel: InboundTunnel| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(SeenTunnel {
                peer_identity: tunnel.peer_identity.clone(),
                authority: tunnel.authority.0,
                headers: tunnel.headers.clone(),
            });
            forward(tunnel).await;
        }
    }));
    (addr, rx, stop)
}

/// Connects a tunnel to its authority and copies until both sides end.
pub async fn forward(tunnel: InboundTunnel) {
    let upstream = match TcpStream::connect(tunnel.authority.0).await {
        Ok(s) => s,
        Err(_) => {
            tunnel.reject(http::StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let Ok(stream) = tunnel.accept() else {
        return;
    };
    let counts = mesh::copy::ByteCounts::default();
    let _ = mesh::copy::copy_bidirectional(stream, upstream, &counts).await;
}

/// A TCP echo server on loopback: writes back what it reads, then half-closes after EOF.
pub async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Deterministic pseudo-random bytes (xorshift), cheap enough to generate at GiB/s.
pub struct PatternSource(u64);

impl PatternSource {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            let bytes = x.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Writes `len` pattern bytes from `seed` and half-closes; returns their SHA-256.
pub async fn send_pattern<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    len: u64,
    seed: u64,
) -> std::io::Result<[u8; 32]> {
    let mut src = PatternSource::new(seed);
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    w.shutdown().await?;
    Ok(hash.finalize().into())
}

/// Reads to EOF; returns (bytes read, SHA-256).
pub async fn receive_hash<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(u64, [u8; 32])> {
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

/// A TCP server that, per connection, reads to EOF while sending `len` pattern bytes from
/// `seed`, then reports (received count, received hash, sent hash).
pub async fn start_checksum_server(
    len: u64,
    seed: u64,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u64, [u8; 32], [u8; 32])>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let (recv, sent) =
                    tokio::join!(receive_hash(&mut r), send_pattern(&mut w, len, seed));
                if let (Ok((n, rh)), Ok(sh)) = (recv, sent) {
                    let _ = tx.send((n, rh, sh));
                }
            });
        }
    });
    (addr, rx)
}

/// Waits until `check` is true, polling every 20 ms, for at most `limit`.
pub async fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where a SOCKS5 CONNECT goes: an address, or a hostname the proxy resolves.
#[derive(Debug, Clone, Copy)]
pub enum Socks5Target<'a> {
    Addr(SocketAddr),
    Name(&'a str, u16),
}

/// Opens a SOCKS5 CONNECT through `proxy` from a socket bound to `source` (the client pod's IP,
/// by which ztunnel recognises it). Returns the stream and the reply code (0 = connected).
pub async fn socks5_connect(
    proxy: SocketAddr,
    source: std::net::IpAddr,
    target: Socks5Target<'_>,
) -> std::io::Result<(TcpStream, u8)> {
    let socket = match source {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let mut s = socket.connect(proxy).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut method = [0u8; 2];
    s.read_exact(&mut method).await?;
    if method != [5, 0] {
        return Err(std::io::Error::other(format!(
            "proxy refused 'no authentication': {method:?}"
        )));
    }
    let mut req = vec![5, 1, 0];
    let port = match target {
        Socks5Target::Addr(SocketAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Socks5Target::Addr(SocketAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
            a.port()
        }
        Socks5Target::Name(name, port) => {
            let len = u8::try_from(name.len())
                .map_err(|_| std::io::Error::other("hostname longer than 255 bytes"))?;
            req.extend_from_slice(&[3, len]);
            req.extend_from_slice(name.as_bytes());
            port
        }
    };
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await?;
    Ok((s, reply[1]))
}

/// A web PKI for ingress tests and the demo: a CA and the server and client certificates it
/// signs, as a user would make with `openssl` for Istio's ingress tasks (`credentialName`
/// Secrets).
pub struct WebPki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate (PEM): what clients trust, and a MUTUAL server's `ca.crt`.
    pub ca_pem: String,
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct IssuedPem {
    pub cert: String,
    pub key: String,
}

impl WebPki {
    pub fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self {
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate for `hosts` (DNS SANs).
    pub fn server(&self, hosts: &[&str]) -> IssuedPem {
        self.issue(hosts, rcgen::ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with DNS SAN `name` (for MUTUAL servers).
    pub fn client(&self, name: &str) -> IssuedPem {
        self.issue(&[name], rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, names: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) -> IssuedPem {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("names");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        IssuedPem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A `kubernetes.io/tls` Secret holding `issued` (and `ca.crt` when given), as YAML.
    pub fn secret_yaml(
        namespace: &str,
        name: &str,
        issued: &IssuedPem,
        ca: Option<&str>,
    ) -> String {
        let mut data = serde_json::json!({"tls.crt": issued.cert, "tls.key": issued.key});
        if let Some(ca) = ca {
            data["ca.crt"] = serde_json::Value::String(ca.to_owned());
        }
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "type": "kubernetes.io/tls",
            "stringData": data,
        })
        .to_string()
    }

    /// A rustls server presenting `issued` (a backend that terminates its own TLS).
    pub fn server_config(issued: &IssuedPem) -> Arc<rustls::ServerConfig> {
        use rustls_pki_types::pem::PemObject;
        let chain = rustls_pki_types::CertificateDer::pem_slice_iter(issued.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("server cert");
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server cert and key");
        Arc::new(config)
    }

    /// A rustls client trusting this CA, offering ALPN `alpn`, with `client` as its
    /// certificate when given.
    pub fn client_config(
        &self,
        alpn: &[&[u8]],
        client: Option<&IssuedPem>,
    ) -> Arc<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some(issued) => {
                let chain =
                    rustls_pki_types::CertificateDer::pem_slice_iter(issued.cert.as_bytes())
                        .collect::<Result<Vec<_>, _>>()
                        .expect("client cert");
                let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key.as_bytes())
                    .expect("client key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client auth")
            }
        };
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(config)
    }
}
