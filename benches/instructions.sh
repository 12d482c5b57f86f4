#!/usr/bin/env bash
# Instructions per event, with and without the agent, counted by callgrind: the
# difference between a run of 2N and a run of N events cancels start-up costs.
# Repeatable on a shared, noisy machine, unlike wall time. Only instructions run inside
# the function that emits the event are counted (`--toggle-collect`), so the figure is
# the cost on the application's thread; the agent's own thread (which parses, redacts
# and sends captured hits, scheduled differently from run to run) is left out.
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
  valgrind --tool=callgrind --toggle-collect="idle_cost::$3" --callgrind-out-file="$out" "$bin" "$1" "$2" "$3" >/dev/null 2>&1
  local total
  total=$(grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}')
  rm -f "$out"
  echo "$total"
}
printf '%-10s %-14s %14s\n' event agent 'instr/event'
row() {
  local a b
  a=$(count "$2" "$n" "$1")
  b=$(count "$2" $((2 * n)) "$1")
  echo "$1 $2 $a $b $n" | awk '{ printf "%-10s %-14s %14.1f\n", $1, $2, ($4 - $3) / $5 }'
}
for which in filtered logged; do
  for mode in none idle; do
    row "$which" "$mode"
  done
done
row logged capture
# A live error capture while no error happens (ERROR callsites only; spans recorded).
row filtered errors
row logged errors
row spanned idle
row spanned errors
# A false condition: on a plain field, and on a field that redaction hides.
row logged cond_plain
row login idle
row login cond_plain
row login cond_redacted
