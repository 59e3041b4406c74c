//! The hybrid post-quantum key exchange `X25519MLKEM768` (draft-ietf-tls-ecdhe-mlkem, TLS
//! group 0x11EC, the one Istio's ztunnel offers first) as a rustls [`SupportedKxGroup`]:
//! ML-KEM-768 from RustCrypto's pure-Rust `ml-kem` (FIPS 203, with its encapsulation-key check),
//! X25519 from rustls' ring provider, which HBONE uses for everything else.
//!
//! The layout puts the post-quantum part first (SecP256r1MLKEM768 does the opposite):
//! client share = ML-KEM-768 encapsulation key (1184 bytes) || X25519 public key (32);
//! server share = ML-KEM-768 ciphertext (1088) || X25519 public key (32);
//! shared secret = ML-KEM shared key (32) || X25519 shared secret (32).

use ml_kem::{
    Ciphertext, Decapsulate, DecapsulationKey, Encapsulate, EncapsulationKey, Generate, Key,
    KeyExport, MlKem768,
};
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::ffdhe_groups::FfdheGroup;
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};

/// `X25519MLKEM768`, for [`rustls::crypto::CryptoProvider::kx_groups`].
pub static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

const ENCAPSULATION_KEY_LEN: usize = 1184;
const CIPHERTEXT_LEN: usize = 1088;
const X25519_LEN: usize = 32;

fn x25519() -> &'static dyn SupportedKxGroup {
    rustls::crypto::ring::kx_group::X25519
}

fn invalid_share() -> Error {
    Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare)
}

#[derive(Debug)]
struct X25519MlKem768;

impl SupportedKxGroup for X25519MlKem768 {
    /// Client: a fresh ML-KEM-768 key pair and X25519 key pair; the share is both public keys.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let classical = x25519().start()?;
        let decapsulation = DecapsulationKey::<MlKem768>::try_generate()
            .map_err(|_| Error::FailedToGetRandomBytes)?;
        let encapsulation = decapsulation.encapsulation_key().to_bytes();
        let pub_key = [encapsulation.as_slice(), classical.pub_key()].concat();
        Ok(Box::new(Active {
            classical,
            decapsulation,
            pub_key,
        }))
    }

    /// Server: encapsulate to the client's ML-KEM key and complete X25519 with its share; a
    /// share of the wrong length or an encapsulation key that fails FIPS 203's check is the
    /// peer's error, never a panic.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != ENCAPSULATION_KEY_LEN + X25519_LEN {
            return Err(invalid_share());
        }
        let (encapsulation, classical_share) = client_share.split_at(ENCAPSULATION_KEY_LEN);
        let encapsulation = Key::<EncapsulationKey<MlKem768>>::try_from(encapsulation)
            .map_err(|_| invalid_share())?;
        let encapsulation =
            EncapsulationKey::<MlKem768>::new(&encapsulation).map_err(|_| invalid_share())?;
        // The OS random source (getrandom) failing is not something a peer can cause.
        let (ciphertext, post_quantum_secret) = encapsulation.encapsulate();
        let classical = x25519().start_and_complete(classical_share)?;
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key: [ciphertext.as_slice(), &classical.pub_key].concat(),
            secret: SharedSecret::from(
                [
                    post_quantum_secret.as_slice(),
                    classical.secret.secret_bytes(),
                ]
                .concat(),
            ),
        })
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// The client's half-done exchange.
struct Active {
    classical: Box<dyn ActiveKeyExchange>,
    decapsulation: DecapsulationKey<MlKem768>,
    pub_key: Vec<u8>,
}

impl ActiveKeyExchange for Active {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != CIPHERTEXT_LEN + X25519_LEN {
            return Err(invalid_share());
        }
        let (ciphertext, classical_share) = server_share.split_at(CIPHERTEXT_LEN);
        let ciphertext =
            Ciphertext::<MlKem768>::try_from(ciphertext).map_err(|_| invalid_share())?;
        // ML-KEM decapsulation never fails: a forged ciphertext yields an unrelated key
        // (implicit rejection), and the handshake then fails on the Finished message.
        let post_quantum_secret = self.decapsulation.decapsulate(&ciphertext);
        let classical = self.classical.complete(classical_share)?;
        Ok(SharedSecret::from(
            [post_quantum_secret.as_slice(), classical.secret_bytes()].concat(),
        ))
    }

    /// Lets rustls also send the X25519 share alone in the same ClientHello (X25519 is in our
    /// groups), so a server without ML-KEM (an older Istio) completes without a
    /// HelloRetryRequest, on the same X25519 key.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((self.classical.group(), self.classical.pub_key()))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        server_share: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.classical.complete(server_share)
    }

    fn pub_key(&self) -> &[u8] {
        &self.pub_key
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn both_sides_agree_on_a_secret_and_the_wire_layout_is_the_drafts() {
        let client = X25519MLKEM768.start().unwrap();
        assert_eq!(client.pub_key().len(), 1184 + 32);
        let server = X25519MLKEM768.start_and_complete(client.pub_key()).unwrap();
        assert_eq!(server.group, NamedGroup::X25519MLKEM768);
        assert_eq!(server.pub_key.len(), 1088 + 32);
        let (hybrid_x25519_group, hybrid_x25519) = client.hybrid_component().unwrap();
        assert_eq!(hybrid_x25519_group, NamedGroup::X25519);
        assert_eq!(
            hybrid_x25519,
            &client.pub_key()[1184..],
            "the X25519 key is the last 32 bytes of the client share"
        );
        let server_secret = server.secret.secret_bytes().to_vec();
        let client_secret = client.complete(&server.pub_key).unwrap();
        assert_eq!(client_secret.secret_bytes(), &server_secret[..]);
        assert_eq!(server_secret.len(), 64);
    }

    #[test]
    fn malformed_shares_are_the_peers_error() {
        for len in [0, 32, 1184, 1184 + 31, 1184 + 33] {
            assert!(
                X25519MLKEM768.start_and_complete(&vec![0u8; len]).is_err(),
                "client share of {len} bytes"
            );
        }
        // An encapsulation key whose coefficients are not reduced mod q fails FIPS 203's check.
        assert!(
            X25519MLKEM768
                .start_and_complete(&[0xffu8; 1184 + 32])
                .is_err()
        );
        for len in [0, 32, 1088, 1088 + 33] {
            let client = X25519MLKEM768.start().unwrap();
            assert!(
                client.complete(&vec![1u8; len]).is_err(),
                "server share of {len} bytes"
            );
        }
    }
}
