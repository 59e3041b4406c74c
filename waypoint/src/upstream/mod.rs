//! Upstream clusters (to be written).
