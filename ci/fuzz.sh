#!/usr/bin/env bash
# Run every fuzz target (fuzz/fuzz_targets/*.rs) for a while, one after the other, and print
# per target the executions, the corpus size and whether it found a crash. Not run by CI (it is
# long); the figures go to docs/BENCHMARKS.md ("Fuzzing").
#
#   ci/fuzz.sh                    # every target, 600 s each
#   BORG_FUZZ_SECONDS=60 ci/fuzz.sh frame_decode tree_msg_decode   # some targets, 60 s each
# Targets: envelope_decode tree_msg_decode reach_msg_decode frame_decode time_msg_decode
#
# Needs the nightly toolchain (rustup toolchain install nightly) and cargo-fuzz
# (cargo install cargo-fuzz); both are installed here if missing. Crashes land in
# fuzz/artifacts/<target>/, the corpus in fuzz/corpus/<target>/ (both git-ignored).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT/fuzz"
SECONDS_EACH=${BORG_FUZZ_SECONDS:-600}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
if [ "$#" -gt 0 ]; then targets=("$@"); else
  mapfile -t targets < <(ls fuzz_targets/*.rs | xargs -n1 basename | sed 's/\.rs$//')
fi
summary=()
status=0
for t in "${targets[@]}"; do
  log=$(mktemp)
  mkdir -p "corpus/$t"
  echo "== $t: ${SECONDS_EACH}s"
  if cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$SECONDS_EACH" -print_final_stats=1 \
      >"$log" 2>&1; then verdict="no crash"; else verdict="CRASH (see fuzz/artifacts/$t/)"; status=1; fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  rate=$(grep -o 'exec/s: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo "?")
  corpus=$(ls "corpus/$t" | wc -l)
  tail -5 "$log"
  summary+=("$t: ${SECONDS_EACH}s, $execs executions (~$rate/s at the end), coverage $cov, corpus $corpus inputs, $verdict")
  rm -f "$log"
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$status"
