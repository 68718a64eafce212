#!/usr/bin/env bash
# The paper's three claims at small scale, as paired benchmarks (README.md in this folder).
# Resumable: every finished run leaves a record under docs/results/<preset>/, and rerunning this
# script continues from them (and from the latest checkpoint of an interrupted run). Seeds are
# added one round at a time, so a stop leaves complete pairs; the cheap budgets go first.
#   bash studies/paper-claims/run.sh [LAST_SEED] [STRATEGIES]
#   SMOKE=1 bash studies/paper-claims/run.sh 0   # each command validated and planned, none run
set -euo pipefail
cd "$(dirname "$0")/../.."
last=${1:-4}
strategies=${2:-random,attmask_high}
# SMOKE=1 (tests/test_scripts.py): every command checked and planned (--dry-run), none run
dry=(); [[ ${SMOKE:-0} == 1 ]] && dry=(--dry-run)
for presets in "claims-150 claims-300" "claims-600" "claims-robustness"; do
  for seed in $(seq 0 "$last"); do
    for preset in $presets; do
      python run_pipeline.py benchmark --preset "$preset" --reports docs/results \
        --seeds "0-$seed" --strategies "$strategies" "${dry[@]}"
    done
  done
done
