#!/usr/bin/env bash
# The Python agent's benchmark (BENCHMARKS.md, "Python agent"): builds the release wheel,
# then runs agent-python/bench/bench.py under this machine's CPython (bytecode injection
# up to 3.11) and under CPython 3.13 (sys.monitoring) in the root scripts/test prepares.
#
#   agent-python/bench/run.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
wheel="$(scripts/build-python-agent --release)"
site="$target/python-bench/site"
rm -rf "$site" && mkdir -p "$site"
.venv/bin/python -m zipfile -e "$wheel" "$site"
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
