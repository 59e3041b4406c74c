//! HBONE's TLS key exchange against peers that offer or accept one group only, as an Istio
//! restricted to post-quantum key exchange (or an older one without it) would: handshakes run
//! in memory between real rustls connections built from our configurations.

#![allow(clippy::unwrap_used)]

use rustls::crypto::ring::kx_group;
use rustls::{ClientConnection, Connection, HandshakeKind, NamedGroup, ServerConnection};

use super::*;
use crate::ca::{CaKeySource, CertificateAuthority};

struct Pki {
    ca: CertificateAuthority,
    _dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            CertificateAuthority::load(&CaKeySource::Directory(dir.path().into()), "cluster.local")
                .unwrap();
        Self { ca, _dir: dir }
    }

    fn cert(&self, sa: &str) -> WorkloadCertificate {
        let identity = Identity::new("cluster.local", "demo", sa).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            identity.to_string().try_into().unwrap(),
        )];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let csr = self.ca.validate_csr(&csr).unwrap();
        let chain = self.ca.sign(&csr, None).unwrap();
        WorkloadCertificate::new(identity, key.serialize_der(), &chain).unwrap()
    }
}

/// Runs a handshake to the end in memory; the first error either side reports.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<(Connection, Connection), rustls::Error> {
    let mut client = Connection::Client(ClientConnection::new(
        Arc::new(client),
        unused_server_name(),
    )?);
    let mut server = Connection::Server(ServerConnection::new(Arc::new(server))?);
    fn pass(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }
    for _ in 0..8 {
        pass(&mut client, &mut server)?;
        pass(&mut server, &mut client)?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok((client, server));
        }
    }
    panic!("handshake did not finish in 8 flights");
}

fn group(conn: &Connection) -> Option<NamedGroup> {
    conn.negotiated_key_exchange_group().map(|g| g.name())
}

fn only(group: &'static dyn rustls::crypto::SupportedKxGroup) -> Arc<CryptoProvider> {
    provider_with_groups(vec![group])
}

#[test]
fn our_client_reaches_a_server_that_accepts_only_x25519mlkem768() {
    let pki = Pki::new();
    let (client_cert, server_cert) = (pki.cert("sleep"), pki.cert("web"));
    let server = build_server_config(
        server_cert.identity(),
        server_cert.roots(),
        &server_cert.key,
        only(X25519MLKEM768),
    )
    .unwrap();
    let client =
        Arc::unwrap_or_clone(client_cert.client_config(vec![server_cert.identity().clone()]));
    let (client, server) = handshake(client, server).expect("handshake");
    assert_eq!(group(&client), Some(NamedGroup::X25519MLKEM768));
    assert_eq!(group(&server), Some(NamedGroup::X25519MLKEM768));
    assert_eq!(
        client.handshake_kind(),
        Some(HandshakeKind::Full),
        "no HelloRetryRequest"
    );
    // HBONE's other properties hold.
    assert_eq!(
        client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert!(matches!(
        client.negotiated_cipher_suite().map(|s| s.suite()),
        Some(
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                | rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        )
    ));
    assert_eq!(client.alpn_protocol(), Some(ALPN_H2));
}

#[test]
fn our_server_negotiates_x25519mlkem768_with_a_client_that_offers_only_it() {
    let pki = Pki::new();
    let (client_cert, server_cert) = (pki.cert("sleep"), pki.cert("web"));
    let client =
        client_cert.build_client_config(vec![server_cert.identity().clone()], only(X25519MLKEM768));
    let server = Arc::unwrap_or_clone(server_cert.server_config());
    let (client, server) = handshake(client, server).expect("handshake");
    assert_eq!(group(&client), Some(NamedGroup::X25519MLKEM768));
    assert_eq!(group(&server), Some(NamedGroup::X25519MLKEM768));
}

/// Ours on both ends prefer the hybrid group; a peer without ML-KEM gets X25519 from the share
/// sent alongside (no extra round trip), one with only P-256 still connects.
#[test]
fn the_hybrid_group_is_preferred_and_classical_peers_still_connect() {
    let pki = Pki::new();
    let (client_cert, server_cert) = (pki.cert("sleep"), pki.cert("web"));
    let expected = vec![server_cert.identity().clone()];
    let ours = || Arc::unwrap_or_clone(client_cert.client_config(expected.clone()));
    let server_with = |p| {
        build_server_config(
            server_cert.identity(),
            server_cert.roots(),
            &server_cert.key,
            p,
        )
        .unwrap()
    };

    let (client, _) = handshake(ours(), Arc::unwrap_or_clone(server_cert.server_config())).unwrap();
    assert_eq!(group(&client), Some(NamedGroup::X25519MLKEM768));

    let (client, server) = handshake(ours(), server_with(only(kx_group::X25519))).unwrap();
    assert_eq!(group(&server), Some(NamedGroup::X25519));
    assert_eq!(
        client.handshake_kind(),
        Some(HandshakeKind::Full),
        "no HelloRetryRequest"
    );

    let (_, server) = handshake(ours(), server_with(only(kx_group::SECP256R1))).unwrap();
    assert_eq!(group(&server), Some(NamedGroup::secp256r1));

    let client = client_cert.build_client_config(expected.clone(), only(kx_group::SECP256R1));
    let (_, server) = handshake(client, Arc::unwrap_or_clone(server_cert.server_config())).unwrap();
    assert_eq!(group(&server), Some(NamedGroup::secp256r1));
}
