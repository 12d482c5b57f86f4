#!/usr/bin/env bash
# Instructions per event, with and without the agent, counted by callgrind: the
# difference between a run of 2N and a run of N events cancels start-up costs.
# Repeatable on a shared, noisy machine, unlike wall time.
#
# Run: bash benches/instructions.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
cargo build --release -q -p periscope-benches --example idle_cost
bin=target/release/examples/idle_cost
count() {
  local out
  out=$(mktemp)
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "$1" "$2" "$3" >/dev/null 2>&1
  local total
  total=$(grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}')
  rm -f "$out"
  echo "$total"
}
printf '%-10s %-8s %14s\n' event agent 'instr/event'
for which in filtered logged; do
  for mode in none idle; do
    a=$(count "$mode" "$n" "$which")
    b=$(count "$mode" $((2 * n)) "$which")
    echo "$which $mode $a $b $n" | awk '{ printf "%-10s %-8s %14.1f\n", $1, $2, ($4 - $3) / $5 }'
  done
done
a=$(count capture "$n" logged)
b=$(count capture $((2 * n)) logged)
echo "logged capture $a $b $n" | awk '{ printf "%-10s %-8s %14.1f\n", $1, $2, ($4 - $3) / $5 }'
