#!/usr/bin/env bash
# Instructions per refused key lookup (what a 401 costs the key directory), counted by
# callgrind as the difference between a run of 2N and a run of N lookups, so start-up
# (opening the database, creating 50 keys) cancels out.
#
# Run: bash benches/unauthorized.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
cargo build --release -q -p periscope-benches --example unauthorized
bin=target/release/examples/unauthorized
count() {
  local out
  out=$(mktemp)
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "$1" "$2" >/dev/null 2>&1
  local total
  total=$(grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}')
  rm -f "$out"
  echo "$total"
}
printf '%-10s %14s\n' mode 'instr/lookup'
for mode in lookup refresh; do
  a=$(count "$mode" "$n")
  b=$(count "$mode" $((2 * n)))
  echo "$mode $a $b $n" | awk '{ printf "%-10s %14.1f\n", $1, ($3 - $2) / $4 }'
done
