//! The generated Rust under `src/generated/` is checked in so that building needs no `protoc`.
//! This test regenerates it with pure-Rust tools (protox + tonic-prost-build) and fails if the
//! checked-in copy differs. To refresh after editing a .proto file:
//! `UPDATE_GENERATED=1 cargo test -p proto --test generated_up_to_date`.

#![allow(clippy::unwrap_used)]

use std::path::Path;

#[test]
fn generated_code_matches_proto_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(
        [root.join("proto/istio/v1/auth/ca.proto")],
        [root.join("proto")],
    )
    .expect("compile .proto files");
    let out = tempfile::tempdir().expect("temp dir");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out.path())
        .compile_fds(fds)
        .expect("generate Rust");

    let file = "istio.v1.auth.rs";
    let fresh = std::fs::read_to_string(out.path().join(file)).expect("read generated file");
    let checked_in_path = root.join("src/generated").join(file);
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&checked_in_path, &fresh).expect("write generated file");
        return;
    }
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "{} is stale: run `UPDATE_GENERATED=1 cargo test -p proto --test generated_up_to_date`",
        checked_in_path.display()
    );
}
