#!/usr/bin/env bash
# The Python agent's benchmark (BENCHMARKS.md, "Python agent"): builds the release wheel,
# then runs agent-python/bench/bench.py under this machine's CPython (bytecode injection
# up to 3.11) and under CPython 3.13 (sys.monitoring) in the root scripts/test prepares.
#
#   agent-python/bench/run.sh
#   agent-python/bench/run.sh --instructions   # idle cost in instructions (callgrind), 3.11 only
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
wheel="$(scripts/build-python-agent --release)"
site="$target/python-bench/site"
rm -rf "$site" && mkdir -p "$site"
.venv/bin/python -m zipfile -e "$wheel" "$site"
if [ "${1:-}" = "--instructions" ]; then
  # The main thread's instructions per call of `hot`, without the agent and with it
  # idle: each case run at N and 2N calls under callgrind, the difference divided by N
  # (start-up and the agent's own threads cancel out or are counted apart).
  out="$(mktemp -d)"
  n=100000
  for mode in base idle; do
    for calls in $n $((2 * n)); do
      PYTHONPATH="$site" valgrind --tool=callgrind --separate-threads=yes \
        --callgrind-out-file="$out/$mode-$calls.%p" .venv/bin/python agent-python/bench/bench.py loop $mode $calls 2>/dev/null
    done
  done
  for mode in base idle; do
    main_thread() { grep -h '^totals:' "$out/$mode-$1".*-01 | awk '{print $2}'; }
    a="$(main_thread $n)"; b="$(main_thread $((2 * n)))"
    echo "{\"case\": \"$mode\", \"main_thread_instructions_per_call\": $(( (b - a) / n ))}"
  done
  rm -rf "$out"
  exit 0
fi
PYTHONPATH="$site" .venv/bin/python agent-python/bench/bench.py
py313="$target/python-root/trixie-py313"
if [ -f "$py313/.periscope-stamp" ]; then
  rm -rf "$py313/periscope-bench" && mkdir -p "$py313/periscope-bench/site"
  .venv/bin/python -m zipfile -e "$wheel" "$py313/periscope-bench/site"
  cp agent-python/bench/bench.py "$py313/periscope-bench/"
  chroot "$py313" env PYTHONPATH=/periscope-bench/site python3.13 /periscope-bench/bench.py
else
  echo "no CPython 3.13 root (run scripts/test once to prepare it)" >&2
fi
