#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 25) from its committed
# seeds (fuzz/seeds/<target>), with new inputs going to a scratch corpus under target/.
# .ci/run calls it with the default; a longer soak: `fuzz/run.sh 1800`, or one target:
# `fuzz/run.sh 600 expr`. A crash stops the run with its input under
# target/fuzz/artifacts/<target>/ and the command that reproduces it.
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
# No sanitizer: the workspace forbids unsafe code, so what is left to find is panics,
# broken invariants (debug assertions and overflow checks are on) and runaway time or
# memory, which libFuzzer reports itself; ASan would double the build and halve the speed.
cargo fuzz build --sanitizer none --target-dir "$target_dir" "${FUZZ_BUILD_FLAGS[@]:-}"
profile=release
if [[ " ${FUZZ_BUILD_FLAGS:-} " == *" --dev "* ]]; then profile=debug; fi
bin="$target_dir/x86_64-unknown-linux-gnu/$profile"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
for t in "${targets[@]}"; do
  scratch="$target_dir/corpus/$t"
  artifacts="$target_dir/artifacts/$t"
  mkdir -p "$scratch" "$artifacts"
  echo "fuzz: $t for ${secs}s"
  if ! "$bin/$t" "$scratch" "seeds/$t" -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
      -artifact_prefix="$artifacts/" -print_final_stats=1 2> "$target_dir/$t.log"; then
    tail -n 40 "$target_dir/$t.log"
    echo "fuzz: $t failed; reproduce with: $bin/$t $artifacts/<crash file>" >&2
    exit 1
  fi
  grep -E "^stat::number_of_executed_units|^Done|cov:" "$target_dir/$t.log" | tail -n 2
done
