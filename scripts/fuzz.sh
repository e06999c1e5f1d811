#!/usr/bin/env bash
# Fuzzes the parsers that take outside input (issue #23) with cargo-fuzz's libFuzzer
# harness on the stable toolchain (`-s none`: no sanitizer, so it finds panics,
# aborts, integer overflow and debug assertions; cargo-fuzz's sanitizers need nightly).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default: 600 s, every target)
#
# The corpus of each target is fuzz/corpus/<target> (kept in the repository and grown
# by each run); crashes land in fuzz/artifacts/<target>/ and each becomes a regression
# test. scripts/test.sh runs a short pass (FUZZ_SECONDS, default 10 s per target).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/ensure-tools.sh)"
cache="${GPUSCALE_CACHE:-$HOME/.cache/gpuscale}"
if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$cache/cargo-fuzz/bin/cargo-fuzz" ]; then
  cargo install --locked cargo-fuzz --version 0.13.2 --root "$cache/cargo-fuzz" >&2
fi
export PATH="$cache/cargo-fuzz/bin:$PATH"
seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(gguf_header tokenizer chat_template openai_request trace_csv crd_admission)
fi
# FUZZ_BUILD=release (the default) builds the targets optimised with debug assertions
# and overflow checks (`-a`, cargo-fuzz's own default; its `--release`, used here until
# a dev build found a GGUF overflow, turns them off, and the overflow wrapped unseen).
# FUZZ_BUILD=dev builds them unoptimised, checks on: half the build time, for fewer
# executions a second; scripts/test.sh's 10 s pass uses it.
case "${FUZZ_BUILD:-release}" in
  release) build=--debug-assertions ;;
  dev) build=--dev ;;
  *) echo "FUZZ_BUILD must be release or dev, not ${FUZZ_BUILD}" >&2; exit 2 ;;
esac
cd fuzz
# The targets build against fuzz/Cargo.lock as committed, as scripts/test.sh's cargo
# commands do with --locked: a lock that the workspace's dependencies have outgrown
# fails here, instead of being rewritten in the checkout (it was, unseen, for a while).
if ! cargo fetch --locked --target "$(rustc -vV | sed -n 's/^host: //p')" >/dev/null; then
  echo "fuzz/Cargo.lock is out of date: run 'cargo update --workspace' in fuzz/ and commit it" >&2
  exit 1
fi
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "=== fuzz $t for ${seconds} s" >&2
  cargo fuzz run -s none "$build" "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
    | grep -E "^(#[0-9]+ +DONE|Done|stat::number_of_executed_units|stat::average_exec_per_sec|==|SUMMARY|thread .* panicked|Running|INFO: Seed)" || true
  # A crash leaves an artifact and a non-zero exit above; fail here on either.
  if ls "artifacts/$t"/crash-* "artifacts/$t"/timeout-* "artifacts/$t"/oom-* >/dev/null 2>&1; then
    echo "fuzz $t: found a failing input in fuzz/artifacts/$t" >&2
    exit 1
  fi
done
