#!/usr/bin/env bash
# Runs every check and test of the project: formatting, clippy, and the whole test suite.
# This is the README's test command and what CI runs (.ci/run). It installs what tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "cargo-nextest not found; installing it from crates.io" >&2
    cargo install --locked cargo-nextest
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests (profile ci: optimised, with debug assertions)"
cargo nextest run --workspace --cargo-profile ci --locked --no-fail-fast
