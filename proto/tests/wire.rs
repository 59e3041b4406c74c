//! The wire format must be Istio's: field numbers and the gRPC method path are checked against
//! the values Istio's `security/v1alpha1/ca.proto` uses.

#![allow(clippy::unwrap_used)]

use prost::Message;
use proto::{IstioCertificateRequest, IstioCertificateResponse};

#[test]
fn request_fields_use_istio_numbers() {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "ImpersonatedIdentity".to_owned(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("x".into())),
        },
    );
    let req = IstioCertificateRequest {
        csr: "C".into(),
        validity_duration: 7,
        metadata: Some(prost_types::Struct { fields }),
    };
    let bytes = req.encode_to_vec();
    // csr = 1, length-delimited: tag 0x0a, len 1, 'C'
    assert_eq!(&bytes[..3], &[0x0a, 0x01, b'C']);
    // validity_duration = 3, varint: tag 0x18, 7
    assert_eq!(&bytes[3..5], &[0x18, 0x07]);
    // metadata = 4, length-delimited: tag 0x22
    assert_eq!(bytes[5], 0x22);
    assert_eq!(IstioCertificateRequest::decode(&bytes[..]).unwrap(), req);
}

#[test]
fn response_chain_is_field_one() {
    let resp = IstioCertificateResponse {
        cert_chain: vec!["L".into(), "R".into()],
    };
    assert_eq!(resp.encode_to_vec(), vec![0x0a, 1, b'L', 0x0a, 1, b'R']);
}

#[test]
fn method_path_is_istios() {
    let generated = include_str!("../src/generated/istio.v1.auth.rs");
    assert!(generated.contains("\"/istio.v1.auth.IstioCertificateService/CreateCertificate\""));
}
