//! The file source's path from YAML text to the published state: the YAML stream (documents,
//! `kind: List`), the Kubernetes/Istio object schemas, the translation, the last good version
//! of each object and file across loads, and the config dump of the result.
//!
//! The input is one or more loads separated by NUL bytes (which YAML text cannot contain);
//! within a load, files are separated by `\x01`. Beyond not panicking: the state serializes
//! (what `/config_dump` shows), loading the same files twice in a row changes nothing, and a
//! load that rejects nothing gives the state a fresh source would build from it (no history
//! leaks into a clean configuration).
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use mesh::discovery::StoreWriter;
use mesh::discovery::file::{FileSource, FileSourceConfig};
use mesh::fuzzing::file_source_load;
use prometheus_client::registry::Registry;

fn new_source() -> FileSource {
    FileSource::new(FileSourceConfig::new("/fuzz"), &mut Registry::default())
}

fn files(load: &[u8]) -> Vec<(PathBuf, String)> {
    load.split(|&b| b == 1)
        .enumerate()
        .map(|(i, text)| {
            (
                PathBuf::from(format!("/fuzz/{i}.yaml")),
                String::from_utf8_lossy(text).into_owned(),
            )
        })
        .collect()
}

/// The published state as `/config_dump` renders it.
fn dump(store: &StoreWriter) -> String {
    serde_json::to_string(&*store.store().snapshot()).expect("the state serializes")
}

fuzz_target!(|data: &[u8]| {
    let loads: Vec<&[u8]> = data.split(|&b| b == 0).take(4).collect();
    let mut source = new_source();
    let store = StoreWriter::new();
    let mut last = None;
    for load in &loads {
        let report = file_source_load(&mut source, files(load), &store);
        last = Some((dump(&store), report.rejected.is_empty()));
    }
    let Some((state, clean)) = last else {
        return;
    };
    let Some(final_load) = loads.last() else {
        return;
    };

    let again = file_source_load(&mut source, files(final_load), &store);
    assert_eq!(
        dump(&store),
        state,
        "the same files loaded again changed the state"
    );
    assert_eq!(again.rejected.is_empty(), clean);

    if clean && loads.len() > 1 {
        let mut fresh = new_source();
        let fresh_store = StoreWriter::new();
        let report = file_source_load(&mut fresh, files(final_load), &fresh_store);
        assert!(
            report.rejected.is_empty(),
            "clean after history, rejected when fresh"
        );
        assert_eq!(
            dump(&fresh_store),
            state,
            "a clean load depends on what came before"
        );
    }
});
