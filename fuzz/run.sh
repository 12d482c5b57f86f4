#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 25) from its committed
# seeds (fuzz/seeds/<target>), with new inputs going to a scratch corpus under
# target/fuzz. `fuzz/run.sh 1800` soaks every target for 30 minutes; `fuzz/run.sh 600
# expr redaction` runs two. FUZZ_PROFILE=dev builds unoptimized (a quicker build, slower
# runs: what .ci/run uses). A crash stops the run with its input under
# target/fuzz/artifacts/<target>/ and the command that reproduces it. See fuzz/README.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"
secs="${1:-25}"
shift || true
version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$version"; then
  cargo install --locked --quiet cargo-fuzz --version "$version"
fi
# libFuzzer's instrumentation flags are unstable options of this stable toolchain.
export RUSTC_BOOTSTRAP=1
target_dir="$root/target/fuzz"
profile=release
flags=()
if [ "${FUZZ_PROFILE:-release}" = dev ]; then
  profile=debug
  flags+=(--dev)
fi
# No sanitizer: the workspace forbids unsafe code, so what is left to find is panics,
# broken invariants (debug assertions and overflow checks are on) and runaway time or
# memory, which libFuzzer reports itself; ASan would double the build and halve the speed.
cargo fuzz build "${flags[@]}" --sanitizer none --features broker --target-dir "$target_dir"
bin="$target_dir/x86_64-unknown-linux-gnu/$profile"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
for t in "${targets[@]}"; do
  scratch="$target_dir/corpus/$t"
  artifacts="$target_dir/artifacts/$t"
  mkdir -p "$scratch" "$artifacts"
  log="$target_dir/$t.log"
  if ! "$bin/$t" "$scratch" "seeds/$t" -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
      -artifact_prefix="$artifacts/" -print_final_stats=1 2> "$log"; then
    tail -n 40 "$log"
    echo "fuzz: $t failed; reproduce with: $bin/$t $artifacts/<crash file>" >&2
    exit 1
  fi
  runs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
  echo "fuzz: $t ${secs}s, ${runs} runs, ${cov}, no crash"
done
