#!/usr/bin/env bash
# Instructions per hit frame in the broker before the action book (budgets, rules,
# findings, decode, redaction, limits), as before issue 9 and now, counted by callgrind:
# the difference between a run of 2N and a run of N frames cancels start-up costs.
#
# Run: bash benches/ingest_instructions.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2000}"
cargo build --release -q -p periscope-benches --example ingest_cost
bin=target/release/examples/ingest_cost
count() {
  local out
  out=$(mktemp)
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "$1" "$2" >/dev/null 2>&1
  grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}'
  rm -f "$out"
}
printf '%-8s %14s\n' mode 'instr/frame'
for mode in before after; do
  a=$(count "$mode" "$n")
  b=$(count "$mode" $((2 * n)))
  echo "$mode $a $b $n" | awk '{ printf "%-8s %14.1f\n", $1, ($3 - $2) / $4 }'
done
