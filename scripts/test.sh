#!/usr/bin/env bash
# Runs every check and test of the project: formatting, clippy, and the whole test suite.
# This is the README's test command and what CI runs (.ci/run). It installs what tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "cargo-nextest not found; installing it from crates.io" >&2
    cargo install --locked cargo-nextest
fi

# The virtual-cluster tests (tests/tests/vcluster.rs) build namespaces and links with `ip`.
if ! command -v ip >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "ip (iproute2) not found; installing it for the virtual-cluster tests" >&2
        apt-get update -qq && apt-get install -y -qq --no-install-recommends iproute2
    else
        echo "warning: ip (iproute2) not found and cannot be installed here; the virtual-cluster tests need it" >&2
    fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests (profile ci: optimised, with debug assertions)"
cargo nextest run --workspace --cargo-profile ci --locked --no-fail-fast
