#!/usr/bin/env bash
# The whole test suite: installs its tools into ~/.cache/gpuscale (see ensure-tools.sh),
# then format check, clippy, CRD drift check, every test (through cargo-nextest), the
# chart checks, and a short fuzzing pass.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/ensure-tools.sh)"

# A run from a clean clone never reuses incremental state; writing it only costs disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# Each step says how long it took, so a slow run shows where the time went.
step() {
    local name=$1 t=$SECONDS
    echo; echo "=== $name"; shift
    "$@"
    echo "=== $name: $((SECONDS - t)) s"
}
start=$SECONDS
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
step "CRD YAML matches the types" cargo run -q --locked -p gpuscale-crds --bin crdgen -- --check
# The e2e scenarios run these as processes (a failover needs two operators).
step "cargo build (operator and worker binaries)" cargo build --locked -p gpuscale-operator -p gpuscale-inference-worker
# Every test through cargo-nextest (.config/nextest.toml: four at a time across all the
# test binaries, the long e2e tests first), then the doctests, which nextest does not run.
step "cargo nextest run" cargo nextest run --workspace --locked
step "cargo test --doc" cargo test --workspace --locked --doc
step "Helm chart" scripts/check-chart.sh
# A short pass of every fuzz target over its corpus (scripts/fuzz.sh runs them long),
# built unoptimised: the release build of the targets took about 600 of this step's
# 658 s on a clean clone here, the dev build 295.
step "fuzz (${FUZZ_SECONDS:-10} s per target)" env FUZZ_BUILD="${FUZZ_BUILD:-dev}" scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
echo; echo "all checks passed in $((SECONDS - start)) s (target/ holds $(du -sh target 2>/dev/null | cut -f1))"
