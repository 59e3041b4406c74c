//! TLS termination for HTTPS servers: a rustls `ServerConfig` per server, built from its
//! Secret and kept until the Secret (or the server's TLS settings) change, and the choice of a
//! server by the client's SNI.
//!
//! Versions: TLS 1.2 and 1.3 (rustls has no 1.0/1.1; a `minProtocolVersion` below 1.2 means
//! 1.2). `cipherSuites` restricts the TLS 1.2 suites, as Envoy's `cipher_suites` does (TLS 1.3
//! suites are not configurable there either). ALPN offers `h2` and `http/1.1`. MUTUAL requires
//! a client certificate chaining to the CA bundle; OPTIONAL_MUTUAL verifies one when sent;
//! `subjectAltNames` is checked after the handshake. Key material stays in the config; only
//! [`CertificateInfo`] (serial, SANs, expiry) is ever shown.

use std::sync::Arc;

use mesh::model::{ServerProtocol, TlsMode, TlsVersion};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::plan::PlannedServer;

/// A server's terminated TLS, ready for connections.
#[derive(Debug)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub certificate: CertificateInfo,
    /// MUTUAL / OPTIONAL_MUTUAL: SANs a client certificate must have one of (empty: any).
    pub client_sans: Vec<String>,
}

/// What `/config_dump` shows of a served certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateInfo {
    /// `namespace/name` and the data's version.
    pub secret: String,
    pub secret_version: String,
    pub serial: String,
    pub subject_alt_names: Vec<String>,
    /// RFC 2822.
    pub not_after: String,
}

/// The names Istio (BoringSSL) gives the TLS 1.2 suites rustls implements.
const TLS12_SUITES: [(&str, rustls::CipherSuite); 6] = [
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// Builds the server's TLS. `Err` says what is wrong with the Secret or the settings, naming
/// the Secret and the key in it, never its content.
pub fn build(server: &PlannedServer) -> Result<ServerTls, String> {
    let tls = server
        .server
        .tls
        .as_ref()
        .ok_or_else(|| "the server has no tls settings".to_owned())?;
    let secret = server
        .credential
        .as_ref()
        .ok_or_else(|| "the server has no credentialName Secret".to_owned())?;
    let name = secret.key();
    let chain_pem = secret.cert_chain.as_deref().unwrap_or_default();
    let key_pem = secret.private_key.as_deref().unwrap_or_default();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("Secret {name}: tls.crt is not PEM certificates: {e}"))?;
    if chain.is_empty() {
        return Err(format!("Secret {name}: tls.crt holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("Secret {name}: tls.key is not a PEM private key: {e}"))?;
    let certificate = certificate_info(&chain[0], &name, &secret.version)?;

    let provider = provider(&tls.cipher_suites).map_err(|e| format!("tls.cipherSuites: {e}"))?;
    let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        format!("Secret {name}: the private key does not fit the certificate (or is not a supported key type): {e}")
    })?;
    let versions = versions(tls.min_version, tls.max_version)?;
    let provider = Arc::new(provider);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls.minProtocolVersion/maxProtocolVersion/cipherSuites: {e}"))?;
    let builder = match tls.mode {
        TlsMode::Mutual | TlsMode::OptionalMutual => {
            let ca = server
                .client_ca
                .as_ref()
                .and_then(|s| s.ca_bundle.as_deref().map(|b| (s.key(), b)))
                .ok_or_else(|| format!("mode {:?} needs a CA bundle (ca.crt)", tls.mode))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.1) {
                let cert = cert.map_err(|e| format!("Secret {}: ca.crt is not PEM: {e}", ca.0))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("Secret {}: ca.crt: {e}", ca.0))?;
            }
            if roots.is_empty() {
                return Err(format!("Secret {}: ca.crt holds no certificate", ca.0));
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = if tls.mode == TlsMode::OptionalMutual {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("Secret {}: ca.crt: {e}", ca.0))?;
            builder.with_client_cert_verifier(verifier)
        }
        TlsMode::Simple | TlsMode::Passthrough => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
    // HTTPS offers HTTP/2 and HTTP/1.1; a TLS server terminated into opaque TCP offers no
    // ALPN (its clients speak whatever they speak).
    if server.server.protocol == ServerProtocol::Https {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok(ServerTls {
        config: Arc::new(config),
        certificate,
        client_sans: match tls.mode {
            TlsMode::Mutual | TlsMode::OptionalMutual => tls.subject_alt_names.clone(),
            _ => Vec::new(),
        },
    })
}

/// ring with every TLS 1.3 suite and the TLS 1.2 suites named (all when none are).
fn provider(cipher_suites: &[String]) -> Result<CryptoProvider, String> {
    let mut provider = rustls::crypto::ring::default_provider();
    if cipher_suites.is_empty() {
        return Ok(provider);
    }
    let mut wanted = Vec::new();
    for name in cipher_suites {
        let Some((_, suite)) = TLS12_SUITES.iter().find(|(n, _)| n == name) else {
            let known: Vec<&str> = TLS12_SUITES.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "{name:?} is not a supported suite (supported: {})",
                known.join(", ")
            ));
        };
        wanted.push(*suite);
    }
    provider
        .cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13 || wanted.contains(&s.suite()));
    Ok(provider)
}

fn versions(
    min: Option<TlsVersion>,
    max: Option<TlsVersion>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let min = min.unwrap_or(TlsVersion::V1_2).max(TlsVersion::V1_2);
    let max = max.unwrap_or(TlsVersion::V1_3);
    if max < TlsVersion::V1_2 {
        return Err(
            "tls.maxProtocolVersion: TLS 1.0 and 1.1 are not supported (they are insecure); use TLSV1_2 or above".to_owned(),
        );
    }
    let mut out = Vec::new();
    if min <= TlsVersion::V1_2 {
        out.push(&rustls::version::TLS12);
    }
    if max >= TlsVersion::V1_3 {
        out.push(&rustls::version::TLS13);
    }
    Ok(out)
}

fn certificate_info(
    cert: &CertificateDer<'_>,
    secret: &str,
    version: &str,
) -> Result<CertificateInfo, String> {
    let (_, parsed) = X509Certificate::from_der(cert)
        .map_err(|e| format!("Secret {secret}: tls.crt: not an X.509 certificate: {e}"))?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = parsed.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                GeneralName::IPAddress(ip) => sans.push(format!("IP:{ip:?}")),
                _ => {}
            }
        }
    }
    Ok(CertificateInfo {
        secret: secret.to_owned(),
        secret_version: version.to_owned(),
        serial: parsed.raw_serial_as_string(),
        subject_alt_names: sans,
        not_after: parsed
            .validity()
            .not_after
            .to_rfc2822()
            .unwrap_or_else(|_| parsed.validity().not_after.to_string()),
    })
}

/// Whether a verified client certificate carries one of `wanted` (DNS or URI SANs, exact).
pub fn client_san_allowed(cert: &CertificateDer<'_>, wanted: &[String]) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let Ok((_, parsed)) = X509Certificate::from_der(cert) else {
        return false;
    };
    let Ok(Some(ext)) = parsed.subject_alternative_name() else {
        return false;
    };
    ext.value.general_names.iter().any(|name| {
        let value = match name {
            GeneralName::DNSName(d) => *d,
            GeneralName::URI(u) => *u,
            _ => return false,
        };
        wanted.iter().any(|w| w == value)
    })
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}
