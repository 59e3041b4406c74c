//! Entry points for the fuzz targets in `fuzz/` (not an API): internals that network or
//! configuration input reaches, made callable without a socket or a file.

use std::path::PathBuf;

use http::Request;

use crate::discovery::StoreWriter;
use crate::discovery::file::{FileSource, LoadReport};
use crate::hbone::HboneAuthority;

/// The HBONE server's check of a request (`CONNECT` to `ip:port`, else 400).
pub fn validate_connect<B>(request: &Request<B>) -> Result<HboneAuthority, String> {
    crate::hbone::server::validate(request)
}

/// One load of the file source from `(path, contents)` pairs instead of the disk: the parse of
/// the YAML stream, the last good versions kept across loads, the translation and the publish.
pub fn file_source_load(
    source: &mut FileSource,
    files: Vec<(PathBuf, String)>,
    store: &StoreWriter,
) -> LoadReport {
    source.apply_texts(files, store)
}
