//! The signing half of the CA: where its key comes from and how a CSR becomes a chain.
//!
//! The key is either generated once (ECDSA P-256) and kept in a directory, or loaded from PEM
//! files the user supplies (a root, or an intermediate with the chain above it), so that a user
//! can plug the mesh into their own PKI. Loading checks everything that would otherwise fail
//! later and far away: the key matches the certificate, the certificate may sign, the chain links.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::identity::Identity;

/// File names inside a CA directory, as Istio's plug-in CA secret names them.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// Default certificate lifetime when the caller does not ask for one.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Istio's default upper bound on a requested workload certificate lifetime (90 days).
pub const DEFAULT_MAX_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Issued certificates start this far in the past, so a peer whose clock lags a little still
/// accepts them.
const BACKDATE: Duration = Duration::from_secs(60);
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA file {path}: {why}")]
    BadFile { path: PathBuf, why: String },
    #[error("CA certificate {path} cannot sign: {why}")]
    NotACa { path: PathBuf, why: String },
    #[error("generating the CA root: {0}")]
    Generate(rcgen::Error),
    #[error("CSR is not valid: {0}")]
    BadCsr(String),
    #[error("CSR asks for {requested} but trust domain is {trust_domain:?}")]
    WrongTrustDomain {
        requested: Identity,
        trust_domain: String,
    },
    #[error("requested validity {requested:?} exceeds the maximum {max:?}")]
    TtlTooLong { requested: Duration, max: Duration },
    #[error("signing certificate for {identity}: {source}")]
    Sign {
        identity: Identity,
        source: rcgen::Error,
    },
}

/// Where the CA's signing key and certificate come from.
#[derive(Debug, Clone)]
pub enum CaKeySource {
    /// Load `root-cert.pem` and `root-key.pem` from the directory, generating and saving them on
    /// first start.
    Directory(PathBuf),
    /// User-supplied PEM files: the signing certificate, its PKCS#8 private key and, when the
    /// signing certificate is an intermediate, the chain above it with the root last.
    Files {
        cert: PathBuf,
        key: PathBuf,
        chain: Option<PathBuf>,
    },
}

/// A CSR that passed validation: the identity it asks for and its public key.
#[derive(Debug)]
pub struct ValidCsr {
    pub identity: Identity,
    public_key: rcgen::SubjectPublicKeyInfo,
}

/// Signs workload certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// PEM of the signing certificate and every certificate above it; the root is last.
    chain_above_leaf: Vec<String>,
    signing_not_after: SystemTime,
    trust_domain: String,
    max_ttl: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("chain_len", &self.chain_above_leaf.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads (or on first start generates) the signing key described by `source`.
    pub fn load(source: &CaKeySource, trust_domain: &str) -> Result<Self, CaError> {
        match source {
            CaKeySource::Directory(dir) => Self::load_or_generate(dir, trust_domain),
            CaKeySource::Files { cert, key, chain } => {
                Self::from_files(cert, key, chain.as_deref(), trust_domain)
            }
        }
    }

    fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => return Self::from_files(&cert_path, &key_path, None, trust_domain),
            (false, false) => {}
            (true, false) | (false, true) => {
                return Err(CaError::BadFile {
                    path: dir.to_owned(),
                    why: format!(
                        "only one of {ROOT_CERT_FILE} and {ROOT_KEY_FILE} exists; restore the \
                         other or remove both to generate a new root"
                    ),
                });
            }
        }
        let (cert_pem, key_pem) = generate_root(trust_domain)?;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        write_private(&key_path, key_pem.as_bytes()).map_err(io(&key_path))?;
        std::fs::write(&cert_path, cert_pem.as_bytes()).map_err(io(&cert_path))?;
        tracing::info!(dir = %dir.display(), trust_domain, "generated a new CA root");
        Self::from_files(&cert_path, &key_path, None, trust_domain)
    }

    /// Loads a signing certificate, its key and the chain above it, checking that they fit.
    pub fn from_files(
        cert_path: &Path,
        key_path: &Path,
        chain_path: Option<&Path>,
        trust_domain: &str,
    ) -> Result<Self, CaError> {
        crate::identity::validate_trust_domain(trust_domain).map_err(|why| CaError::BadFile {
            path: cert_path.to_owned(),
            why: format!("trust domain {trust_domain:?} is invalid: {why}"),
        })?;
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Io {
                path: path.to_owned(),
                source,
            })
        };
        let bad = |path: &Path, why: String| CaError::BadFile {
            path: path.to_owned(),
            why,
        };
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let certs = crate::tls::parse_pem_certs(&cert_pem, &cert_path.display().to_string())
            .map_err(|e| bad(cert_path, e.to_string()))?;
        if certs.len() != 1 {
            return Err(bad(
                cert_path,
                format!(
                    "holds {} certificates; put only the signing certificate here and the \
                     certificates above it in the chain file",
                    certs.len()
                ),
            ));
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            bad(
                key_path,
                format!(
                    "not a PKCS#8 private key ({e}); convert with \
                     `openssl pkcs8 -topk8 -nocrypt -in key.pem`"
                ),
            )
        })?;
        let (_, signing) = X509Certificate::from_der(&certs[0])
            .map_err(|e| bad(cert_path, format!("not valid X.509: {e}")))?;
        if signing.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad(
                key_path,
                format!(
                    "private key does not belong to the certificate in {}",
                    cert_path.display()
                ),
            ));
        }
        check_can_sign(&signing).map_err(|why| CaError::NotACa {
            path: cert_path.to_owned(),
            why,
        })?;

        let mut chain_above_leaf = vec![pem_of(&certs[0])];
        let self_signed =
            signing.subject() == signing.issuer() && signing.verify_signature(None).is_ok();
        match (chain_path, self_signed) {
            (None, true) => {}
            (None, false) => {
                return Err(bad(
                    cert_path,
                    "is an intermediate (not self-signed): give the chain file with the \
                     certificates above it, root last"
                        .into(),
                ));
            }
            (Some(path), _) => {
                let chain_pem = read(path)?;
                let chain = crate::tls::parse_pem_certs(&chain_pem, &path.display().to_string())
                    .map_err(|e| bad(path, e.to_string()))?;
                // Istio's cert-chain.pem starts with the signing certificate itself; accept both.
                let skip = usize::from(chain[0] == certs[0]);
                let mut child = certs[0].clone();
                for parent in &chain[skip..] {
                    let (_, c) = X509Certificate::from_der(&child)
                        .map_err(|e| bad(path, format!("not valid X.509: {e}")))?;
                    let (_, p) = X509Certificate::from_der(parent)
                        .map_err(|e| bad(path, format!("not valid X.509: {e}")))?;
                    c.verify_signature(Some(p.public_key())).map_err(|_| {
                        bad(
                            path,
                            format!(
                                "{} is not signed by {}: the chain must go from the signing \
                                 certificate up to the root, in order",
                                c.subject(),
                                p.subject()
                            ),
                        )
                    })?;
                    chain_above_leaf.push(pem_of(parent));
                    child = parent.clone();
                }
                let (_, root) = X509Certificate::from_der(&child)
                    .map_err(|e| bad(path, format!("not valid X.509: {e}")))?;
                if root.verify_signature(None).is_err() {
                    return Err(bad(
                        path,
                        format!(
                            "the last certificate ({}) is not a self-signed root",
                            root.subject()
                        ),
                    ));
                }
            }
        }
        let signing_not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(signing.validity().not_after.timestamp().max(0) as u64);
        let issuer = Issuer::from_ca_cert_der(&certs[0], key)
            .map_err(|e| bad(cert_path, format!("cannot be used as issuer: {e}")))?;
        Ok(CertificateAuthority {
            issuer,
            chain_above_leaf,
            signing_not_after,
            trust_domain: trust_domain.to_owned(),
            max_ttl: DEFAULT_MAX_WORKLOAD_TTL,
        })
    }

    /// Changes the longest lifetime a caller may ask for.
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> Self {
        self.max_ttl = max_ttl;
        self
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, PEM: what workloads trust.
    pub fn root_pem(&self) -> &str {
        self.chain_above_leaf
            .last()
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// Parses a PEM CSR, checks its signature and that it asks for exactly one workload identity
    /// in this CA's trust domain.
    pub fn validate_csr(&self, csr_pem: &str) -> Result<ValidCsr, CaError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| CaError::BadCsr(format!("not a PEM CERTIFICATE REQUEST: {e}")))?;
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
            .map_err(|e| CaError::BadCsr(format!("not a PKCS#10 request: {e}")))?;
        csr.verify_signature()
            .map_err(|_| CaError::BadCsr("its signature does not verify".into()))?;
        let mut identities = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => identities.push(
                            uri.parse::<Identity>()
                                .map_err(|e| CaError::BadCsr(e.to_string()))?,
                        ),
                        other => {
                            return Err(CaError::BadCsr(format!(
                                "SAN {other} is not allowed: only a spiffe:// URI may be asked for"
                            )));
                        }
                    }
                }
            }
        }
        let identity = match identities.len() {
            1 => identities.remove(0),
            0 => return Err(CaError::BadCsr("it has no spiffe:// URI SAN".into())),
            n => {
                return Err(CaError::BadCsr(format!(
                    "it asks for {n} identities; ask for exactly one"
                )));
            }
        };
        if identity.trust_domain() != self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                requested: identity,
                trust_domain: self.trust_domain.clone(),
            });
        }
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| CaError::BadCsr(format!("unsupported public key: {e}")))?;
        Ok(ValidCsr {
            identity,
            public_key,
        })
    }

    /// Issues a certificate for a validated CSR. `requested` of `None` means the default
    /// lifetime; longer than the maximum is refused, as Istio refuses it. The lifetime never
    /// outlasts the signing certificate. Returns the PEM chain, leaf first and root last.
    pub fn sign(
        &self,
        csr: &ValidCsr,
        requested: Option<Duration>,
    ) -> Result<Vec<String>, CaError> {
        let ttl = requested.unwrap_or(DEFAULT_WORKLOAD_TTL);
        if ttl > self.max_ttl {
            return Err(CaError::TtlTooLong {
                requested: ttl,
                max: self.max_ttl,
            });
        }
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.signing_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.subject_alt_names =
            vec![SanType::URI(csr.identity.to_string().try_into().map_err(
                |source| CaError::Sign {
                    identity: csr.identity.clone(),
                    source,
                },
            )?)];
        params.is_ca = IsCa::NoCa;
        params.custom_extensions = end_entity_extensions(&csr.public_key);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| CaError::Sign {
                identity: csr.identity.clone(),
                source,
            })?;
        let mut chain = Vec::with_capacity(1 + self.chain_above_leaf.len());
        chain.push(cert.pem());
        chain.extend(self.chain_above_leaf.iter().cloned());
        Ok(chain)
    }
}

impl CertificateAuthority {
    /// A certificate for the CA's own TLS listener, naming the DNS names and IPs clients dial.
    /// Returns (chain PEM without the root, PKCS#8 key PEM).
    pub fn serving_certificate(
        &self,
        names: &super::server::CaServingNames,
    ) -> Result<(String, String), CaError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ambient mesh CA");
        params.distinguished_name = dn;
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + Duration::from_secs(365 * 24 * 3600))
            .min(self.signing_not_after)
            .into();
        params.serial_number = Some(random_serial());
        for dns in &names.dns {
            params.subject_alt_names.push(SanType::DnsName(
                dns.clone().try_into().map_err(CaError::Generate)?,
            ));
        }
        for ip in &names.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::NoCa;
        params.custom_extensions = end_entity_extensions(&key);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Generate)?;
        let mut chain = cert.pem();
        let above = &self.chain_above_leaf;
        for pem in &above[..above.len().saturating_sub(1)] {
            chain.push_str(pem);
        }
        Ok((chain, key.serialize_pem()))
    }
}

/// The extensions that mark a certificate as an end entity, in DER as X.690 requires: a
/// critical basicConstraints that is an empty SEQUENCE (`cA` is `DEFAULT FALSE`, so DER omits
/// it: `30 00`, what Go's crypto/x509 writes for Istio's workload certificates) and the subject
/// key identifier (SHA-256 of the SubjectPublicKeyInfo, first 160 bits, as rcgen derives it for
/// CAs). rcgen's `IsCa::ExplicitNoCa` writes `cA FALSE` explicitly (`30 03 01 01 00`), which
/// strict parsers (pyca/cryptography >= 48: `EncodedDefault`) reject; `IsCa::NoCa` writes neither.
fn end_entity_extensions(public_key: &impl PublicKeyData) -> Vec<CustomExtension> {
    const BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
    const SUBJECT_KEY_IDENTIFIER: &[u64] = &[2, 5, 29, 14];
    let mut basic_constraints = CustomExtension::from_oid_content(BASIC_CONSTRAINTS, vec![0x30, 0]);
    basic_constraints.set_criticality(true);
    let digest = ring::digest::digest(&ring::digest::SHA256, &public_key.subject_public_key_info());
    let mut key_id = vec![0x04, 20];
    key_id.extend_from_slice(&digest.as_ref()[..20]);
    vec![
        basic_constraints,
        CustomExtension::from_oid_content(SUBJECT_KEY_IDENTIFIER, key_id),
    ]
}

fn check_can_sign(cert: &X509Certificate<'_>) -> Result<(), String> {
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => return Err("basicConstraints does not say CA:TRUE".into()),
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err("keyUsage lacks keyCertSign".into());
    }
    if !cert.validity().is_valid() {
        return Err(format!(
            "not valid now (valid from {} to {})",
            cert.validity().not_before,
            cert.validity().not_after
        ));
    }
    Ok(())
}

/// A new self-signed ECDSA P-256 root for `trust_domain`: (certificate PEM, PKCS#8 key PEM).
pub fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "ambient mesh root CA");
    params.distinguished_name = dn;
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_TTL).into();
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(CaError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// 128 random bits, positive as DER requires.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source is available");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn pem_of(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Writes a file readable by its owner only (a private key).
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn csr(sans: Vec<SanType>) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.to_string().try_into().unwrap())
    }

    fn ca(dir: &Path) -> CertificateAuthority {
        CertificateAuthority::load(&CaKeySource::Directory(dir.to_owned()), TD).unwrap()
    }

    #[test]
    fn root_is_generated_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = ca(dir.path()).root_pem().to_owned();
        let second = ca(dir.path()).root_pem().to_owned();
        assert_eq!(first, second, "second start reuses the persisted root");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(ROOT_KEY_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "root key is private to its owner");
        let info = crate::tls::cert_info(
            &crate::tls::parse_pem_certs(&first, "root").unwrap()[0],
            "root",
        )
        .unwrap();
        assert!(info.not_after > SystemTime::now() + Duration::from_secs(365 * 24 * 3600));
    }

    #[test]
    fn half_present_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        std::fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let err = CertificateAuthority::load(&CaKeySource::Directory(dir.path().into()), TD)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only one of"), "{err}");
    }

    #[test]
    fn signs_a_workload_chain_that_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        let (key, pem) = csr(vec![uri(&id.to_string())]);
        let valid = ca.validate_csr(&pem).unwrap();
        assert_eq!(valid.identity, id);
        let chain = ca.sign(&valid, Some(Duration::from_secs(3600))).unwrap();
        assert_eq!(chain.len(), 2, "leaf and root");
        assert_eq!(chain[1], ca.root_pem());
        let cert = crate::tls::WorkloadCertificate::new(id.clone(), key.serialize_der(), &chain)
            .expect("chain, key and identity fit together");
        let info = cert.info();
        let lifetime = info.not_after.duration_since(info.not_before).unwrap();
        assert_eq!(lifetime, Duration::from_secs(3600) + BACKDATE);
        // The leaf verifies against the root with rustls' own verifier.
        let leaf = &cert.chain()[0];
        let parsed = rustls::server::ParsedCertificate::try_from(leaf).unwrap();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            cert.roots(),
            &[],
            rustls_pki_types::UnixTime::now(),
            crate::tls::provider().signature_verification_algorithms.all,
        )
        .expect("leaf chains to the root");
    }

    #[test]
    fn default_ttl_and_max_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path()).with_max_ttl(Duration::from_secs(48 * 3600));
        let (_, pem) = csr(vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
        let valid = ca.validate_csr(&pem).unwrap();
        let chain = ca.sign(&valid, None).unwrap();
        let leaf = crate::tls::parse_pem_certs(&chain[0], "leaf").unwrap();
        let info = crate::tls::cert_info(&leaf[0], "leaf").unwrap();
        let lifetime = info.not_after.duration_since(info.not_before).unwrap();
        assert_eq!(lifetime, DEFAULT_WORKLOAD_TTL + BACKDATE);
        let err = ca
            .sign(&valid, Some(Duration::from_secs(49 * 3600)))
            .unwrap_err();
        assert!(matches!(err, CaError::TtlTooLong { .. }), "{err}");
    }

    #[test]
    fn rejects_bad_csrs_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let cases: Vec<(String, &str)> = vec![
            ("not a pem".into(), "not a PEM CERTIFICATE REQUEST"),
            (
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
                "not a PKCS#10 request",
            ),
            (csr(vec![]).1, "no spiffe:// URI SAN"),
            (
                csr(vec![SanType::DnsName("evil.example".try_into().unwrap())]).1,
                "only a spiffe:// URI",
            ),
            (
                csr(vec![
                    uri("spiffe://cluster.local/ns/a/sa/b"),
                    uri("spiffe://cluster.local/ns/a/sa/c"),
                ])
                .1,
                "asks for 2 identities",
            ),
            (
                csr(vec![uri("spiffe://other.domain/ns/a/sa/b")]).1,
                "trust domain is \"cluster.local\"",
            ),
            (
                csr(vec![uri("spiffe://cluster.local/namespace/a")]).1,
                "does not have the form",
            ),
        ];
        for (pem, expected) in cases {
            let err = ca.validate_csr(&pem).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn rejects_csr_with_bad_signature() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let (_, pem) = csr(vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
        let mut der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x55; // corrupt the signature
        let bad = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let err = ca.validate_csr(&bad).unwrap_err().to_string();
        assert!(
            err.contains("signature does not verify") || err.contains("PKCS#10"),
            "{err}"
        );
    }

    /// Writes a root, an intermediate signed by it, and returns their paths.
    fn plug_in_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf, String) {
        let (root_pem, root_key_pem) = generate_root(TD).unwrap();
        let root_key = KeyPair::from_pem(&root_key_pem).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + Duration::from_secs(86400 * 30)).into();
        let inter = params.signed_by(&key, &issuer).unwrap();
        let cert = dir.join("ca-cert.pem");
        let keyp = dir.join("ca-key.pem");
        let chain = dir.join("cert-chain.pem");
        std::fs::write(&cert, inter.pem()).unwrap();
        std::fs::write(&keyp, key.serialize_pem()).unwrap();
        std::fs::write(&chain, format!("{}{}", inter.pem(), root_pem)).unwrap();
        (cert, keyp, chain, root_pem)
    }

    #[test]
    fn plugged_in_intermediate_signs_full_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, chain, root_pem) = plug_in_pki(dir.path());
        let ca = CertificateAuthority::load(
            &CaKeySource::Files {
                cert,
                key,
                chain: Some(chain),
            },
            TD,
        )
        .unwrap();
        assert_eq!(
            ca.root_pem(),
            pem_of(&crate::tls::parse_pem_certs(&root_pem, "r").unwrap()[0])
        );
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        let (k, pem) = csr(vec![uri(&id.to_string())]);
        let out = ca.sign(&ca.validate_csr(&pem).unwrap(), None).unwrap();
        assert_eq!(out.len(), 3, "leaf, intermediate, root");
        crate::tls::WorkloadCertificate::new(id, k.serialize_der(), &out)
            .expect("three-level chain is usable");
    }

    /// Walks DER `input` and records every violation of the DER rules a strict X.509 parser
    /// checks: non-minimal lengths, BOOLEANs other than `00`/`FF`, and BOOLEAN FALSE at all
    /// (every BOOLEAN of a certificate, `critical` and `cA`, is `DEFAULT FALSE`, which DER
    /// omits). Extension values (the OCTET STRING of an Extension) are DER and walked too.
    /// Returns false when `input` is not a sequence of well-formed TLVs.
    fn der_violations(input: &[u8], path: &str, out: &mut Vec<String>) -> bool {
        let mut rest = input;
        while !rest.is_empty() {
            let [tag, first, ..] = *rest else {
                return false;
            };
            let (len, header) = match (first, rest.get(2), rest.get(3)) {
                (n, _, _) if n < 0x80 => (usize::from(n), 2),
                (0x81, Some(&n), _) => {
                    if n < 0x80 {
                        out.push(format!("{path}/{tag:02x}: non-minimal length"));
                    }
                    (usize::from(n), 3)
                }
                (0x82, Some(&hi), Some(&lo)) => {
                    if hi == 0 {
                        out.push(format!("{path}/{tag:02x}: non-minimal length"));
                    }
                    (usize::from(hi) << 8 | usize::from(lo), 4)
                }
                _ => return false,
            };
            let Some(content) = rest.get(header..header + len) else {
                return false;
            };
            let here = format!("{path}/{tag:02x}");
            if tag == 0x01 {
                match content {
                    [0xff] => {}
                    [0x00] => out.push(format!(
                        "{here}: BOOLEAN FALSE encoded (a DEFAULT value, which DER omits)"
                    )),
                    other => out.push(format!("{here}: BOOLEAN {other:02x?} is not DER")),
                }
            }
            // Constructed values, and extension values (extensions [3] > SEQUENCE OF >
            // Extension > extnValue), hold DER themselves.
            let nested = match tag {
                0x04 if path.ends_with("/a3/30/30") => Some("extension value is not DER"),
                t if t & 0x20 != 0 => Some("malformed contents"),
                _ => None,
            };
            if let Some(why) = nested
                && !der_violations(content, &here, out)
            {
                out.push(format!("{here}: {why}"));
            }
            rest = &rest[header + len..];
        }
        true
    }

    /// Every certificate the CA makes: its root, a workload leaf, its serving certificate, and
    /// with a plugged-in intermediate the intermediate and a leaf under it.
    fn issued(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
        let der = |pem: &str| crate::tls::parse_pem_certs(pem, "issued").unwrap();
        let leaf_of = |ca: &CertificateAuthority| {
            let (_, pem) = csr(vec![uri("spiffe://cluster.local/ns/demo/sa/web")]);
            ca.sign(&ca.validate_csr(&pem).unwrap(), None).unwrap()
        };
        let root_ca = ca(&dir.join("root"));
        let leaf = leaf_of(&root_ca);
        let (serving, _) = root_ca
            .serving_certificate(&super::super::server::CaServingNames::default())
            .unwrap();
        std::fs::create_dir(dir.join("inter")).unwrap();
        let (cert, key, chain, _) = plug_in_pki(&dir.join("inter"));
        let inter_ca = CertificateAuthority::from_files(&cert, &key, Some(&chain), TD).unwrap();
        let inter_leaf = leaf_of(&inter_ca);
        let (inter_serving, _) = inter_ca
            .serving_certificate(&super::super::server::CaServingNames::default())
            .unwrap();
        vec![
            ("root", der(root_ca.root_pem())[0].to_vec()),
            ("workload leaf", der(&leaf[0])[0].to_vec()),
            ("CA serving certificate", der(&serving)[0].to_vec()),
            ("intermediate", der(&inter_leaf[1])[0].to_vec()),
            (
                "workload leaf under an intermediate",
                der(&inter_leaf[0])[0].to_vec(),
            ),
            (
                "CA serving certificate under an intermediate",
                der(&inter_serving)[0].to_vec(),
            ),
        ]
    }

    #[test]
    fn issued_certificates_are_strict_der() {
        let dir = tempfile::tempdir().unwrap();
        for (what, der) in issued(dir.path()) {
            let mut violations = Vec::new();
            assert!(der_violations(&der, "", &mut violations), "{what}: not DER");
            assert!(violations.is_empty(), "{what}: {violations:?}");
            let (rest, cert) = X509Certificate::from_der(&der).unwrap();
            assert!(rest.is_empty(), "{what}: trailing bytes");
            for ext in cert.extensions() {
                assert!(
                    !matches!(
                        ext.parsed_extension(),
                        ParsedExtension::UnsupportedExtension { .. }
                            | ParsedExtension::ParseError { .. }
                    ),
                    "{what}: extension {} does not parse: {:?}",
                    ext.oid,
                    ext.parsed_extension()
                );
            }
            let bc = cert
                .basic_constraints()
                .unwrap()
                .unwrap_or_else(|| panic!("{what}: basicConstraints present"));
            assert!(bc.critical, "{what}: basicConstraints is critical");
            let is_ca = matches!(what, "root" | "intermediate");
            assert_eq!(bc.value.ca, is_ca, "{what}: cA");
            assert!(
                cert.extensions().iter().any(|e| matches!(
                    e.parsed_extension(),
                    ParsedExtension::SubjectKeyIdentifier(_)
                )),
                "{what}: subjectKeyIdentifier present"
            );
            if !is_ca {
                // Go's encoding of an end entity, as in Istio's workload certificates.
                let ext = cert
                    .extensions()
                    .iter()
                    .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_BASIC_CONSTRAINTS)
                    .unwrap();
                assert_eq!(ext.value, [0x30, 0x00], "{what}: empty SEQUENCE");
            }
        }
    }

    #[test]
    fn plugged_in_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, chain, _) = plug_in_pki(dir.path());
        let load = |cert: &Path, key: &Path, chain: Option<&Path>| {
            CertificateAuthority::from_files(cert, key, chain, TD)
                .unwrap_err()
                .to_string()
        };
        // Intermediate without its chain.
        assert!(load(&cert, &key, None).contains("give the chain file"));
        // Key of another certificate.
        let other = dir.path().join("other-key.pem");
        std::fs::write(
            &other,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .unwrap()
                .serialize_pem(),
        )
        .unwrap();
        assert!(load(&cert, &other, Some(&chain)).contains("does not belong"));
        // Garbage key.
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a key").unwrap();
        assert!(load(&cert, &junk, Some(&chain)).contains("PKCS#8"));
        // A chain that does not link.
        let (unrelated_root, _) = generate_root(TD).unwrap();
        let bad_chain = dir.path().join("bad-chain.pem");
        std::fs::write(&bad_chain, unrelated_root).unwrap();
        assert!(load(&cert, &key, Some(&bad_chain)).contains("is not signed by"));
        // A leaf is not a CA.
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["x.example".to_string()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        let leaf_path = dir.path().join("leaf.pem");
        let leaf_key_path = dir.path().join("leaf-key.pem");
        std::fs::write(&leaf_path, leaf.pem()).unwrap();
        std::fs::write(&leaf_key_path, leaf_key.serialize_pem()).unwrap();
        assert!(load(&leaf_path, &leaf_key_path, None).contains("CA:TRUE"));
        // Missing file.
        assert!(load(&dir.path().join("nope.pem"), &key, None).contains("nope.pem"));
    }
}
