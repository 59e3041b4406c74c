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

# tests/tests/manifests.rs lints the Helm charts and checks that manifests/rendered/ is what they
# render, with Helm's own Go SDK through the PyPI package helm-python-sdk (manifests/render.py).
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import helm_python' >/dev/null 2>&1; then
    echo "helm-python-sdk not found; installing it for the chart checks" >&2
    python3 -m pip install --quiet helm-python-sdk==0.2.2 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages helm-python-sdk==0.2.2 2>/dev/null \
        || echo "warning: helm-python-sdk cannot be installed here; the chart lint and render check need it" >&2
fi

# tests/tests/ca.rs reads the CA's certificates with pyca/cryptography, a strict DER parser.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import cryptography' >/dev/null 2>&1; then
    echo "pyca/cryptography not found; installing it for the certificate encoding check" >&2
    python3 -m pip install --quiet cryptography 2>/dev/null \
        || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
             && apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-cryptography; } \
        || echo "warning: pyca/cryptography cannot be installed here; the certificate encoding check needs it" >&2
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== binaries (the virtual-cluster tests run the real ztunnel and waypoint processes)"
# Cargo builds a package's binary only for that package's own integration tests; the waypoint
# has none, so every binary is built here, with the profile the tests use.
cargo build --workspace --bins --profile ci --locked

echo "== fuzz targets: a short run of each (README.md, \"Fuzzing\")"
# cargo-fuzz drives libFuzzer through rustc flags that are unstable; RUSTC_BOOTSTRAP=1 lets this
# stable toolchain take them, for this step only. No sanitizer: the code is safe Rust, and a
# panic, an overflow (debug assertions are on) or a failed check is what the targets look for.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found; installing it from crates.io" >&2
    cargo install --locked cargo-fuzz
fi
FUZZ_SECONDS="${FUZZ_SECONDS:-15}"
RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer none
fuzz_work="$(mktemp -d)"
trap 'rm -rf "$fuzz_work"' EXIT
for target in $(cargo fuzz list); do
    # New inputs go to a scratch directory; the committed seeds are only read.
    mkdir -p "$fuzz_work/$target"
    RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" \
        "$fuzz_work/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=10 -print_final_stats=1 2>"$fuzz_work/$target.log" \
        || { grep -m1 -A3 'panicked at' "$fuzz_work/$target.log" || true
             tail -n 60 "$fuzz_work/$target.log"; echo "fuzz target $target failed" >&2; exit 1; }
    echo "$target: $(grep -E '^stat::number_of_executed_units' "$fuzz_work/$target.log" | awk '{print $2}') inputs in ${FUZZ_SECONDS}s, $(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$fuzz_work/$target.log" | tail -n 1)"
done

echo "== tests (profile ci: optimised, with debug assertions)"
cargo nextest run --workspace --cargo-profile ci --locked --no-fail-fast
