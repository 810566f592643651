#!/usr/bin/env bash
# Runs every fuzz target for a bounded time from the committed seeds; exits non-zero on a crash.
# Usage: bash fuzz/run-ci.sh [seconds per target]   (default 40)
#
# Each target's libFuzzer output goes to a log; the script prints one summary line per target
# at the end and, for a target that failed, the end of its log (the crash report) and the
# crashing input in hex, so that the last lines of a CI log are enough to reproduce it.
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_PER_TARGET="${1:-40}"
TARGETS=(wire_decode sync_message forged_changes store_load converge presence converge_invariants http_auth)

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cargo +nightly fuzz build -O

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
status=0
summary=()
failed=()
for t in "${TARGETS[@]}"; do
    # Copy the seeds: libFuzzer writes new inputs into its first corpus dir.
    mkdir -p "$scratch/$t" "artifacts/$t"
    cp corpus-seed/"$t"/* "$scratch/$t"/ 2>/dev/null || true
    echo "== fuzz $t for ${SECONDS_PER_TARGET}s"
    log="$scratch/$t.log"
    if cargo +nightly fuzz run -O "$t" "$scratch/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=4096 -print_final_stats=1 \
        >"$log" 2>&1; then
        summary+=("$t: ok ($(grep -o 'Done [0-9]* runs' "$log" | tail -1))")
    else
        summary+=("$t: FAILED")
        failed+=("$t")
        status=1
        # keep the log beside the artifacts (the scratch directory is removed on exit)
        cp "$log" "artifacts/$t/run.log"
    fi
    tail -n 3 "$log"
done

for t in "${failed[@]}"; do
    echo
    echo "==== $t: end of the libFuzzer log (full log: fuzz/artifacts/$t/run.log)"
    grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)|NEW_FUNC' "artifacts/$t/run.log" | tail -n 60
    for a in artifacts/"$t"/crash-* artifacts/"$t"/oom-* artifacts/"$t"/timeout-* artifacts/"$t"/leak-*; do
        [ -f "$a" ] || continue
        echo "---- $a ($(wc -c <"$a") bytes), hex (first 4 KiB):"
        head -c 4096 "$a" | od -An -tx1 -v | tr -d ' \n' | fold -w 128
        echo
    done
    echo "reproduce: cargo +nightly fuzz run -O $t <artifact>; minimize with" \
        "cargo +nightly fuzz tmin $t <artifact> and commit it under fuzz/regressions/$t/"
done

echo
echo "==== fuzz summary (${SECONDS_PER_TARGET}s per target)"
printf '%s\n' "${summary[@]}"
exit "$status"
