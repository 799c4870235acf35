#!/usr/bin/env bash
# Every run behind experiments/RESULTS.md, one after the other, each in runs/<name>/ with its log
# (train.log) and wall time (wall_seconds). A run whose results.json exists is skipped, so the
# script resumes after an interruption. `touch runs/PAUSE` holds the queue between runs.
#
#   bash experiments/run_cuhk03_pair1.sh            # all runs
#   bash experiments/run_cuhk03_pair1.sh main       # only the main table (or: ablation, synthetic)
#   .venv/bin/python experiments/summarize.py       # the tables of RESULTS.md from runs/
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=${TRAIN:-.venv/bin/reid-train}
WHICH=${1:-all}
RUNS=()
if [[ $WHICH == all || $WHICH == main ]]; then
  for seed in 0 1 2; do
    for data in labeled detected; do
      RUNS+=("cuhk03_pair1_${data}_baseline_s${seed}|cuhk03_pair1_${data}_plnet_mobilenetv2_128x64|--num_parts=0 --seed=${seed}")
      RUNS+=("cuhk03_pair1_${data}_plnet_s${seed}|cuhk03_pair1_${data}_plnet_mobilenetv2_128x64|--seed=${seed}")
    done
  done
fi
if [[ $WHICH == all || $WHICH == synthetic ]]; then
  RUNS+=("synthetic_baseline_s0|synthetic_persons_pair_tiny_128x64|--num_parts=0 --seed=0")
  RUNS+=("synthetic_plnet_s0|synthetic_persons_pair_tiny_128x64|--seed=0")
fi
if [[ $WHICH == all || $WHICH == ablation ]]; then
  L=cuhk03_pair1_labeled_plnet_mobilenetv2_128x64
  RUNS+=("cuhk03_pair1_labeled_peaks_k2_s0|$L|--num_parts=2 --seed=0")
  RUNS+=("cuhk03_pair1_labeled_peaks_k6_s0|$L|--num_parts=6 --seed=0")
  RUNS+=("cuhk03_pair1_labeled_activation_k4_s0|$L|--part_strategy=activation --seed=0")
  RUNS+=("cuhk03_pair1_labeled_stripes_k4_s0|$L|--part_strategy=stripes --seed=0")
fi
for run in "${RUNS[@]}"; do
  IFS='|' read -r name recipe extra <<<"$run"
  dir=runs/$name
  [[ -f $dir/results.json ]] && { echo "== $name: done, skipped"; continue; }
  while [[ -f runs/PAUSE ]]; do sleep 10; done
  mkdir -p "$dir"
  echo "== $name: $TRAIN --flagfile=experiments/$recipe.flags --workdir=$dir $extra"
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$TRAIN" --flagfile="experiments/$recipe.flags" --workdir="$dir" $extra >"$dir/train.log" 2>&1 \
    || { echo "!! $name failed, see $dir/train.log"; continue; }
  echo $(( $(date +%s) - start )) >"$dir/wall_seconds"
  echo "   $(cat "$dir/wall_seconds") s"
done
