//! Mutual TLS as HBONE needs it: TLS 1.3 only, AES-GCM suites, ALPN `h2`, client certificates
//! required, and peers recognised by the SPIFFE identity in their certificate's URI SAN rather
//! than by a DNS name.
//!
//! [`WorkloadCertificate`] is one identity's key and chain; it builds the rustls server and client
//! configurations. The two verifiers here are the only places that decide whether a peer's
//! certificate is acceptable.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::Identity;

/// ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: invalid PEM: {source}")]
    Pem {
        what: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what}: certificate is not valid X.509: {why}")]
    X509 { what: String, why: String },
    #[error("{what}: certificate has no spiffe:// URI SAN naming a workload identity")]
    NoIdentity { what: String },
    #[error("{what}: the certificate's identity is {found}, expected {expected}")]
    WrongIdentity {
        what: String,
        found: Identity,
        expected: Identity,
    },
    #[error("{what}: private key does not match the certificate's public key")]
    KeyMismatch { what: String },
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
}

mod x25519mlkem768;
pub use x25519mlkem768::X25519MLKEM768;

/// The crypto provider HBONE uses: ring, TLS 1.3 AES-GCM suites only; key exchange
/// X25519MLKEM768 (hybrid post-quantum, preferred), X25519 and P-256, in the order Istio's
/// ztunnel offers them, so either side can be ours or theirs, an Istio restricted to
/// post-quantum key exchange included. A client sends both the hybrid and the X25519 share, so
/// a peer without ML-KEM costs no extra round trip.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::kx_group;
            provider_with_groups(vec![X25519MLKEM768, kx_group::X25519, kx_group::SECP256R1])
        })
        .clone()
}

/// HBONE's provider (suites, signatures) with other key-exchange groups.
fn provider_with_groups(
    kx_groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> Arc<CryptoProvider> {
    use rustls::crypto::ring as r;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            r::cipher_suite::TLS13_AES_256_GCM_SHA384,
            r::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        kx_groups,
        ..r::default_provider()
    })
}

/// Parses every certificate in a PEM text. `what` names the source in errors.
pub fn parse_pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_owned(),
        });
    }
    for cert in &certs {
        X509Certificate::from_der(cert).map_err(|e| TlsError::X509 {
            what: what.to_owned(),
            why: e.to_string(),
        })?;
    }
    Ok(certs)
}

/// Facts read from a leaf certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Every URI SAN that is a valid workload identity.
    pub identities: Vec<Identity>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub subject_public_key_info: Vec<u8>,
}

/// Reads identities, validity and serial from a DER certificate.
pub fn cert_info(der: &[u8], what: &str) -> Result<CertInfo, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::X509 {
        what: what.to_owned(),
        why: e.to_string(),
    })?;
    let mut identities = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Ok(id) = uri.parse::<Identity>()
            {
                identities.push(id);
            }
        }
    }
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok(CertInfo {
        identities,
        not_before: to_system(cert.validity().not_before),
        not_after: to_system(cert.validity().not_after),
        serial: cert.raw_serial_as_string().replace(':', ""),
        subject_public_key_info: cert.public_key().raw.to_vec(),
    })
}

/// The identity a peer proved, read from its (already verified) leaf certificate.
pub fn peer_identity(leaf: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    cert_info(leaf, "peer certificate")?
        .identities
        .into_iter()
        .next()
        .ok_or_else(|| TlsError::NoIdentity {
            what: "peer certificate".into(),
        })
}

/// One identity's private key and certificate chain, with the TLS configurations built from it.
pub struct WorkloadCertificate {
    identity: Identity,
    info: CertInfo,
    /// Leaf first, then intermediates; the root is not sent.
    chain: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    key: Arc<rustls::sign::CertifiedKey>,
    server_config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity)
            .field("serial", &self.info.serial)
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCertificate {
    /// Builds from a PKCS#8 key and a PEM chain as a CA returns it (leaf first, root last).
    /// Checks that the leaf names `identity` and matches the key.
    pub fn new(
        identity: Identity,
        key_pkcs8_der: Vec<u8>,
        chain_pem: &[String],
    ) -> Result<Self, TlsError> {
        let what = format!("certificate for {identity}");
        let mut certs = Vec::new();
        for pem in chain_pem {
            certs.extend(parse_pem_certs(pem, &what)?);
        }
        let root = if certs.len() > 1 { certs.pop() } else { None }.ok_or_else(|| {
            TlsError::NoCertificate {
                what: format!("{what}: chain has no root after the leaf"),
            }
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(root).map_err(|source| TlsError::Rustls {
            what: format!("{what}: root"),
            source,
        })?;
        Self::with_roots(identity, key_pkcs8_der, certs, Arc::new(roots))
    }

    /// Builds from a key, a chain without the root (leaf first) and the trusted roots.
    pub fn with_roots(
        identity: Identity,
        key_pkcs8_der: Vec<u8>,
        chain: Vec<CertificateDer<'static>>,
        roots: Arc<RootCertStore>,
    ) -> Result<Self, TlsError> {
        let what = format!("certificate for {identity}");
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::NoCertificate { what: what.clone() })?;
        let info = cert_info(leaf, &what)?;
        if !info.identities.contains(&identity) {
            return match info.identities.first() {
                Some(found) => Err(TlsError::WrongIdentity {
                    what,
                    found: found.clone(),
                    expected: identity,
                }),
                None => Err(TlsError::NoIdentity { what }),
            };
        }
        let provider = provider();
        let key_der = PrivateKeyDer::Pkcs8(key_pkcs8_der.into());
        let signing_key = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|source| TlsError::Rustls {
                what: format!("{what}: private key"),
                source,
            })?;
        if signing_key.public_key().as_deref() != Some(&info.subject_public_key_info[..]) {
            return Err(TlsError::KeyMismatch { what });
        }
        let key = Arc::new(rustls::sign::CertifiedKey::new(chain.clone(), signing_key));
        let server_config =
            build_server_config(&identity, &roots, &key, provider).map_err(|source| {
                TlsError::Rustls {
                    what: what.clone(),
                    source,
                }
            })?;
        Ok(WorkloadCertificate {
            identity,
            info,
            chain,
            roots,
            key,
            server_config: Arc::new(server_config),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// True once `now` is past the certificate's notAfter.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.info.not_after
    }

    /// Server configuration presenting this certificate and requiring a client certificate from
    /// the same trust domain.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.clone()
    }

    /// Client configuration presenting this certificate and accepting only a server that proves
    /// one of `expected` identities.
    pub fn client_config(&self, expected: Vec<Identity>) -> Arc<rustls::ClientConfig> {
        Arc::new(self.build_client_config(expected, provider()))
    }

    fn build_client_config(
        &self,
        expected: Vec<Identity>,
        provider: Arc<CryptoProvider>,
    ) -> rustls::ClientConfig {
        let verifier = IdentityServerVerifier {
            roots: self.roots.clone(),
            expected,
            provider: provider.clone(),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the provider offers TLS 1.3 suites");
        let mut config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(FixedCert(self.key.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // HBONE peers are addressed by IP and identified by SAN; no SNI is needed or sent.
        config.enable_sni = false;
        config
    }
}

/// The server side of HBONE for `identity`: TLS 1.3, a client certificate from `identity`'s
/// trust domain required, ALPN `h2`.
fn build_server_config(
    identity: &Identity,
    roots: &Arc<RootCertStore>,
    key: &Arc<rustls::sign::CertifiedKey>,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let client_verifier =
        TrustDomainClientVerifier::new(roots.clone(), identity.trust_domain().to_owned())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(client_verifier))
        .with_cert_resolver(Arc::new(FixedCert(key.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The server name rustls needs for a client connection. It is not sent (SNI is off) and not
/// checked (the verifier checks identities), so any valid value does.
pub fn unused_server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side: requires a client certificate chaining to our roots whose identity is in our
/// trust domain. Which identities may do what is decided later, by authorization.
#[derive(Debug)]
struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl TrustDomainClientVerifier {
    fn new(roots: Arc<RootCertStore>, trust_domain: String) -> Result<Self, rustls::Error> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
        Ok(Self {
            inner,
            trust_domain,
        })
    }
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Istio's ztunnel sends no hints; sending none keeps the handshake small.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = peer_identity(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if id.trust_domain() != self.trust_domain {
            return Err(rustls::Error::General(format!(
                "client identity {id} is not in trust domain {:?}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server's chain must lead to our roots and its certificate must carry one of
/// the identities we expect for this destination.
#[derive(Debug)]
struct IdentityServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let info = cert_info(end_entity, "server certificate")
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if info.identities.iter().any(|id| self.expected.contains(id)) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::General(format!(
            "server identity {:?} is not the expected {:?}",
            info.identities, self.expected
        )))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests;
