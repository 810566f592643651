#!/usr/bin/env bash
# Runs every fuzz target for a bounded time from the committed seeds; exits non-zero on a crash.
# Usage: bash fuzz/run-ci.sh [seconds per target]   (default 40)
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_PER_TARGET="${1:-40}"
TARGETS=(wire_decode sync_message store_load converge presence converge_invariants)

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cargo +nightly fuzz build -O

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
status=0
for t in "${TARGETS[@]}"; do
    # Copy the seeds: libFuzzer writes new inputs into its first corpus dir.
    mkdir -p "$scratch/$t"
    cp corpus-seed/"$t"/* "$scratch/$t"/ 2>/dev/null || true
    echo "== fuzz $t for ${SECONDS_PER_TARGET}s"
    if ! cargo +nightly fuzz run -O "$t" "$scratch/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=4096 -print_final_stats=1; then
        echo "fuzz target $t FAILED: see fuzz/artifacts/$t/; minimize with" \
            "cargo +nightly fuzz tmin $t <artifact> and commit it under fuzz/regressions/$t/" >&2
        status=1
    fi
done
exit "$status"
