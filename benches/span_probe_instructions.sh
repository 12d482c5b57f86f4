#!/usr/bin/env bash
# Instructions per call of an `#[instrument(ret)]` function with and without the agent,
# idle and with a span (function) probe on it, counted by callgrind on the calling
# thread only (`--toggle-collect`): the difference between runs of 2N and N calls, so
# start-up cancels out. Repeatable on a shared, noisy machine, unlike wall time.
#
# Run: bash benches/span_probe_instructions.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
cargo build --release -q -p periscope-benches --example span_probe_cost
bin=target/release/examples/span_probe_cost
count() {
  local out total
  out=$(mktemp)
  valgrind --tool=callgrind --toggle-collect="span_probe_cost::call" --callgrind-out-file="$out" "$bin" "$1" "$2" >/dev/null 2>&1
  total=$(grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}')
  rm -f "$out"
  echo "$total"
}
printf '%-12s %14s\n' mode 'instr/call'
for mode in none idle probe_fast probe_hit; do
  a=$(count "$mode" "$n")
  b=$(count "$mode" $((2 * n)))
  echo "$mode $a $b $n" | awk '{ printf "%-12s %14.1f\n", $1, ($3 - $2) / $4 }'
done
