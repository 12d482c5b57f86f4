#!/usr/bin/env bash
# Instructions per input byte of each redaction bench case, counted by callgrind inside
# the redaction calls only (`--toggle-collect`); the difference between 2R and R rounds
# cancels building the inputs and compiling the rules. Repeatable on a shared, noisy
# machine, unlike throughput.
#
# Run: bash benches/redaction_instructions.sh [R]
set -euo pipefail
cd "$(dirname "$0")/.."
r="${1:-2}"
cargo build --release -q -p periscope-benches --example redaction_cost
bin=target/release/examples/redaction_cost
count() {
  local out fn
  out=$(mktemp)
  fn=redaction_cost::redact_text
  [ "$1" = json_snapshot_value ] && fn=redaction_cost::redact_values
  valgrind --tool=callgrind --toggle-collect="$fn" --callgrind-out-file="$out" "$bin" "$1" "$2" >/dev/null 2>&1
  grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}'
  rm -f "$out"
}
printf '%-22s %14s\n' case 'instr/byte'
for case in clean_log_lines mixed_log_lines pii_dense_log_lines debug_output json_snapshot_value; do
  bytes=$("$bin" "$case" 0)
  a=$(count "$case" "$r")
  b=$(count "$case" $((2 * r)))
  echo "$case $a $b $r $bytes" | awk '{ printf "%-22s %14.2f\n", $1, ($3 - $2) / $4 / $5 }'
done
