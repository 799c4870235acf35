#!/usr/bin/env bash
# Every run behind experiments/RESULTS.md, one after the other, each in runs/<name>/ with its log
# (train.log) and wall time (wall_seconds). A finished run (results.json) is skipped; an
# interrupted one resumes from its last checkpoint (reid-train does that). `touch runs/PAUSE`
# holds the queue between runs. After each run, its results and flags are copied to
# experiments/results/<name>.json (what summarize.py reads; commit those). A run whose JSON is
# already there is skipped too: a fresh checkout does not rerun the committed runs.
# Long queues run from a pinned clone of one commit (git worktree add ../reid-tf-queue <commit>,
# its own `make install`), so that later changes to main cannot change a table halfway; each
# results.json records the commit it ran (summarize.py checks a row's runs share one).
#
#   bash experiments/run_cuhk03_pair1.sh validation   # budget: curves on held-out training ids
#   bash experiments/run_cuhk03_pair1.sh strategies   # part strategy, on the same held-out ids
#   bash experiments/run_cuhk03_pair1.sh main         # rows (a)-(d), 3 seeds, labeled + detected
#   bash experiments/run_cuhk03_pair1.sh wide         # row (e): baseline with PL-Net's width
#   bash experiments/run_cuhk03_pair1.sh short        # the 2.5-epoch appendix
#   bash experiments/run_cuhk03_pair1.sh peer         # the PyTorch peer (experiments/peers)
#   bash experiments/run_cuhk03_pair1.sh grid         # K x lambda for PL-Net (bands), validation
#   bash experiments/run_cuhk03_pair1.sh triplet_validation  # triplet weight 0 vs 1, validation
#   KL="K lambda" bash experiments/run_cuhk03_pair1.sh strong  # rows (f)-(h), 3 seeds, both data
#   bash experiments/run_cuhk03_pair1.sh rerun        # (a), (b) labeled again, also on detected
#   PEER_TRIPLET=1 bash experiments/run_cuhk03_pair1.sh peer  # the peer of (f)
#   bash experiments/run_cuhk03_pair1.sh openset      # thresholds on validation ids, DIR@FAR
#   bash experiments/run_cuhk03_pair1.sh triplet_probe  # triplet weight 0.1, soft margin (val)
#   bash experiments/run_cuhk03_pair1.sh search       # the Optuna studies (issue 37), resumable
#   bash experiments/run_cuhk03_pair1.sh search_confirm  # their best 3 configurations, 3 seeds
#   bash experiments/run_cuhk03_pair1.sh search_recipes  # the tuned flagfiles from the confirmation
#   bash experiments/run_cuhk03_pair1.sh learned_validation  # issue 38: the learned partition's
#                                                     # variant and teacher, on validation
#   bash experiments/run_cuhk03_pair1.sh learned_seeds  # its pick against stripes and bands,
#                                                     # seeds 1 and 2 (validation)
#   bash experiments/run_cuhk03_pair1.sh paper_protocol  # (a), (b) again, labeled, 3 seeds, and
#                                                 # CUHK03's classic protocol (RECIPE=tuned)
#   bash experiments/run_cuhk03_pair1.sh paper_identities  # (b), (a) on 1/2, 1/4, 1/8 of the training
#                                                 # identities, classic protocol (RECIPE=tuned)
#   (after `search.py --confirm` and `--write_recipes`, issue 37 on the tuned recipes:)
#   bash experiments/run_cuhk03_pair1.sh tuned_health   # twice the budget; the triplet flipped;
#                                                     # the baseline on PL-Net's recipe
#   LEARNED="..." bash experiments/run_cuhk03_pair1.sh tuned  # rows (a), (b), (h), (i), 3 seeds
#   bash experiments/run_cuhk03_pair1.sh tuned_openset  # DIR@FAR on the tuned (a), (b)
#   bash experiments/run_cuhk03_pair1.sh round4   # round four's queue, all of the above in
#                                                 # order (search ... paper_identities tuned)
#   .venv/bin/python experiments/summarize.py         # the tables of RESULTS.md
#   ONLY=_s0 bash experiments/run_cuhk03_pair1.sh wide # only runs whose name matches (regex)
#   DRY=1 bash experiments/run_cuhk03_pair1.sh tuned   # the phase's runs, listed, not run
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
TRAIN=${TRAIN:-.venv/bin/reid-train}
PYTHON=${PYTHON:-.venv/bin/python}
WHICH=${1:-main}
ONLY=${ONLY:-}  # a regular expression: run only the runs whose names match it
DRY=${DRY:-}  # DRY=1: print each run of the phase as name|recipe|flags, run nothing
RUNS=()
R=cuhk03_pair1
# Validation: labeled boxes, 20 % of the training identities held out, evaluated every 50 steps
# (~0.8 epoch). `validation`: the budget (30 and 12 epochs, baseline and PL-Net with bands);
# `strategies`: part strategies at the recipe's budget.
V="--validation_identities=0.2 --eval_every=50 --seed=0"
# The hyper-parameter search (experiments/search.py): one trial of each study in turn until each
# has TRIALS finished; the study is resumed from runs/search/search.db, or from the committed
# experiments/search/search.db on a fresh checkout. Commit experiments/search/ as it grows.
# search_recipes: the tuned flagfiles from each study's confirmation (--write_recipes).
if [[ $WHICH == search || $WHICH == search_confirm || $WHICH == search_recipes ]]; then
  what=$([[ $WHICH == search_confirm ]] && echo "--confirm" || echo "")
  what=$([[ $WHICH == search_recipes ]] && echo "--write_recipes" || echo "$what")
  command=("$PYTHON" experiments/search.py --studies="${STUDIES:-plnet,baseline}"
           --trials="${TRIALS:-20}" $what)
  [[ -n $DRY ]] && { echo "$WHICH: ${command[*]}" >&2; exit 0; }
  exec "${command[@]}"
fi
# Round four's whole queue in order, one command on a fresh machine (from the pinned clone's
# root, after its `make install`): each step skips what finished and resumes what was cut off,
# so after any interruption run it again. Row (i) is the learned partition picked on validation
# (RESULTS.md, "Learned parts on validation"); LEARNED overrides it. DRY=1: the steps (step|
# phase|RECIPE|LEARNED) and each tuned step's runs, nothing run.
if [[ $WHICH == round4 ]]; then
  LEARNED=${LEARNED:---part_strategy=learned --part_teacher=stripes --part_induction=1}
  for step in search search_confirm search_recipes tuned_health tuned tuned_openset \
      paper_protocol:tuned paper_identities:tuned; do
    phase=${step%%:*}; recipe=$([[ $step == *:* ]] && echo "${step#*:}" || echo "")
    echo "step|$phase|$recipe|$LEARNED"
    [[ -n $DRY && $phase == search* ]] && continue
    echo "$(date +%H:%M:%S) round4: $phase ${recipe:+(RECIPE=$recipe)}" >&2
    RECIPE=${recipe:-old} LEARNED=$LEARNED bash "$SELF" "$phase" || [[ -n $DRY ]]
  done
  exit 0
fi
L=${R}_labeled_mobilenetv2_128x64
if [[ $WHICH == validation ]]; then
  RUNS+=("${R}_labeled_val_baseline|$L|--num_parts=0 --epochs=30 $V")
  RUNS+=("${R}_labeled_val_baseline_e12|$L|--num_parts=0 --epochs=12 $V")
  RUNS+=("${R}_labeled_val_bands_e12|$L|--part_strategy=bands --epochs=12 $V")
  RUNS+=("${R}_labeled_val_bands|$L|--part_strategy=bands --epochs=30 $V")
  # Row (e)'s 1280-d baseline on validation: does a wider embedding need another budget?
  RUNS+=("${R}_labeled_val_baseline1280_e12|$L|--num_parts=0 --embedding_dim=1280 --epochs=12 $V")
fi
if [[ $WHICH == strategies ]]; then
  E=$(sed -n 's/^--epochs=//p' "experiments/$L.flags")  # the recipe's budget
  S=$([[ $E == 30 ]] && echo "" || echo "_e$E")         # the 30-epoch runs carry no suffix
  for strategy in bands peaks stripes; do
    RUNS+=("${R}_labeled_val_${strategy}${S}|$L|--part_strategy=$strategy --epochs=$E $V")
  done
fi
# K x lambda for PL-Net with bands, on validation, at the recipe's budget; evaluated every 2
# epochs (124 steps) for a coarse curve. K=4, lambda=1 is the existing _val_bands_e12 run.
if [[ $WHICH == grid ]]; then
  for K in 2 3 4 6; do
    for lambda in 0.5 1 2; do
      [[ $K == 4 && $lambda == 1 ]] && continue
      RUNS+=("${R}_labeled_val_k${K}_l${lambda}_e12|$L|--part_strategy=bands --num_parts=$K --part_loss_weight=$lambda --epochs=12 --validation_identities=0.2 --eval_every=124 --seed=0")
    done
  done
fi
# The triplet weight, 0 (the existing runs) vs 1, on validation with the full curve. PL-Net's
# K and lambda come from the grid: KL="K lambda" (default the recipe's 4 1).
if [[ $WHICH == triplet_validation ]]; then
  read -r K lambda <<<"${KL:-4 1}"
  T="--triplet_weight=1 --triplet_margin=0.3 --epochs=12 $V"
  RUNS+=("${R}_labeled_val_baseline_triplet_e12|$L|--num_parts=0 $T")
  # Its 12-epoch curve still rose at the end (+1.4 mAP over the last 20 %): a longer budget.
  RUNS+=("${R}_labeled_val_baseline_triplet_e24|$L|--num_parts=0 ${T/--epochs=12/--epochs=24}")
  RUNS+=("${R}_labeled_val_k${K}_l${lambda}_triplet_e12|$L|--part_strategy=bands --num_parts=$K --part_loss_weight=$lambda $T")
fi
# Why the triplet loss lowers the baseline here (rows (f) < (a)): the baseline on validation
# with a lighter triplet term, and with the soft margin.
if [[ $WHICH == triplet_probe ]]; then
  T="--num_parts=0 --epochs=12 $V"
  RUNS+=("${R}_labeled_val_baseline_triplet_w0.1_e12|$L|--triplet_weight=0.1 --triplet_margin=0.3 $T")
  RUNS+=("${R}_labeled_val_baseline_triplet_soft_e12|$L|--triplet_weight=1 --triplet_margin=0 $T")
fi
# Issue 38's learned partition (--part_strategy=learned), on the held-out ids at the recipe's
# 12 epochs, against fixed stripes and bands on the same ids (the _val_stripes_e12 and
# _val_bands_e12 runs): the variant (ISP-style, its own masks from the start; RPP-style, the
# teacher's masks for the first 30 % of training; distilled, the teacher's masks throughout, so
# the head only learns to reproduce them and replaces K-means at inference) and the teacher
# (bands, stripes). One training at a time with the search; its 3-seed rows wait for the tuned
# recipe. (The first four ran 2026-12-07; added after them, because the ISP-style head left its
# teacher (experiments/RESULTS.md): the distilled pair, and the ISP-style head with a teacher
# loss ten times as heavy, bands as teacher.)
if [[ $WHICH == learned_validation ]]; then
  for teacher in bands stripes; do
    for induction in 0 0.3 1; do
      RUNS+=("${R}_labeled_val_learned_${teacher}_i${induction}_e12|$L|--part_strategy=learned --part_teacher=$teacher --part_induction=$induction --epochs=12 $V")
    done
  done
  RUNS+=("${R}_labeled_val_learned_bands_i0_w10_e12|$L|--part_strategy=learned --part_teacher=bands --part_induction=0 --part_assignment_weight=10 --epochs=12 $V")
fi
# Issue 38's pick at more than one seed: the ISP-style head with bands as teacher (the best
# validation mAP at seed 0, 59.0) against fixed stripes (58.0) and bands (56.8), seeds 1 and 2
# (seed 0 is the run without a suffix); summarize.py's "Validation runs at several seeds".
# Then (added once the first pick fell to 55.8 over three seeds) the next three learned
# variants by their seed-0 mAP: ISP-style with stripes (57.2), distilled with stripes (56.7)
# and with bands (56.2); the pick is the best mean over the three seeds.
if [[ $WHICH == learned_seeds ]]; then
  for seed in 1 2; do
    S="${V/--seed=0/--seed=$seed}"
    RUNS+=("${R}_labeled_val_learned_bands_i0_e12_s${seed}|$L|--part_strategy=learned --part_teacher=bands --part_induction=0 --epochs=12 $S")
    RUNS+=("${R}_labeled_val_stripes_e12_s${seed}|$L|--part_strategy=stripes --epochs=12 $S")
    RUNS+=("${R}_labeled_val_bands_e12_s${seed}|$L|--part_strategy=bands --epochs=12 $S")
  done
  for seed in 1 2; do
    S="${V/--seed=0/--seed=$seed}"
    for variant in stripes:0 stripes:1 bands:1; do
      teacher=${variant%:*}; induction=${variant#*:}
      RUNS+=("${R}_labeled_val_learned_${teacher}_i${induction}_e12_s${seed}|$L|--part_strategy=learned --part_teacher=$teacher --part_induction=$induction --epochs=12 $S")
    done
  done
fi
# Issue 37 on the tuned recipes: experiments/cuhk03_pair1_<data>_tuned_<study>.flags, written
# by `search.py --write_recipes` from each study's 3-seed confirmation (the baseline study's for
# row (a), PL-Net's for (b), (h) and (i), with their K and lambda). A tuned phase stops before
# they exist. Runs are named ..._tuned_s<seed> (test) and ..._val_tuned_* (validation).
tuned_recipe() {  # tuned_recipe <data> <study>: the recipe's name, or exit if not written yet
  local name=${R}_$1_tuned_$2
  [[ -f experiments/$name.flags ]] || {
    echo "$WHICH: experiments/$name.flags is not written yet (search.py --confirm, then --write_recipes)" >&2
    exit 2; }
  echo "$name"
}
flag_of() {  # flag_of <recipe> <name>: its value; the last one, as reid-train reads it
  sed -n "s/^--$2=//p" "experiments/$1.flags" | tail -n 1
}
# Row (i)'s learned partition, as picked on validation (experiments/RESULTS.md, "Learned parts
# on validation"), e.g. LEARNED="--part_strategy=learned --part_teacher=stripes
# --part_induction=1": required by `tuned`, so that (i) cannot run before the pick.
LEARNED=${LEARNED:-}
ALSO="--also_evaluate_on=folder:../shared/data/${R}_detected"
# The recipe's health on validation, seeds 0-2 (the search's own runs at seeds 0-2 of the
# chosen configuration are the reference, experiments/search/*_confirm.json): twice the chosen
# budget (PL-Net), and the triplet loss flipped (weight 0 if the search chose one, else the
# batch-hard loss of rows (f)/(g): TRIPLET) for each study; and the baseline on PL-Net's recipe
# (--num_parts=0), against the baseline's own (does one recipe serve both?).
if [[ $WHICH == tuned_health ]]; then
  for study in plnet baseline; do
    recipe=$(tuned_recipe labeled $study)
    weight=$(flag_of "$recipe" triplet_weight)
    flip=$([[ ${weight:-0} != 0 && ${weight:-0} != 0.0 ]] && echo "--triplet_weight=0" \
           || echo "${TRIPLET:---triplet_weight=1 --triplet_margin=0.3}")
    for seed in 0 1 2; do
      S="${V/--seed=0/--seed=$seed}"
      if [[ $study == plnet ]]; then
        epochs=$(flag_of "$recipe" epochs)
        RUNS+=("${R}_labeled_val_tuned_plnet_x2_s${seed}|$recipe|--epochs=$((2 * epochs)) $S")
        RUNS+=("${R}_labeled_val_tuned_baseline_on_plnet_recipe_s${seed}|$recipe|--num_parts=0 $S")
      fi
      RUNS+=("${R}_labeled_val_tuned_${study}_triplet_flipped_s${seed}|$recipe|$flip $S")
    done
  done
fi
# Rows (a), (b), (h), (i) on the tuned recipes, 3 seeds, both box types; labeled runs are also
# tested on the detected test split (the robustness table).
if [[ $WHICH == tuned ]]; then
  [[ $LEARNED == *--part_strategy=learned* ]] || {
    echo "tuned: set LEARNED to row (i)'s partition as picked on validation (RESULTS.md)" >&2; exit 2; }
  for seed in 0 1 2; do
    for data in labeled detected; do
      also=$([[ $data == labeled ]] && echo "$ALSO" || echo "")
      base=$(tuned_recipe $data baseline); plnet=$(tuned_recipe $data plnet)
      RUNS+=("${R}_${data}_baseline_tuned_s${seed}|$base|--num_parts=0 --seed=${seed} $also")
      RUNS+=("${R}_${data}_plnet_tuned_s${seed}|$plnet|--part_strategy=bands --seed=${seed} $also")
      RUNS+=("${R}_${data}_stripes_tuned_s${seed}|$plnet|--part_strategy=stripes --seed=${seed} $also")
      RUNS+=("${R}_${data}_learned_tuned_s${seed}|$plnet|$LEARNED --seed=${seed} $also")
    done
  done
fi
# The open-set table on the tuned (a) and (b): thresholds fitted on 20 % validation identities.
if [[ $WHICH == tuned_openset ]]; then
  for data in labeled detected; do
    RUNS+=("${R}_${data}_openset_baseline_tuned_s0|$(tuned_recipe $data baseline)|--num_parts=0 --validation_identities=0.2 --seed=0")
    RUNS+=("${R}_${data}_openset_plnet_tuned_s0|$(tuned_recipe $data plnet)|--validation_identities=0.2 --seed=0")
  done
fi
# Issue 37's paper-protocol table: rows (a) and (b) on labeled boxes, 3 seeds, scored by
# reid-eval on CUHK03's classic protocol (--classic_identities=100: 100 test identities, one
# gallery image each, 20 draws) beside their standard figures; results/classic/<run>.json.
# RECIPE=old (default): the old recipe's (a) and (b) trained again (their checkpoints were not
# kept) as ..._paper_old_s<seed>; RECIPE=tuned: the tuned phase's runs (trained if missing).
if [[ $WHICH == paper_protocol ]]; then
  for seed in 0 1 2; do
    if [[ ${RECIPE:-old} == tuned ]]; then
      RUNS+=("${R}_labeled_baseline_tuned_s${seed}|$(tuned_recipe labeled baseline)|--num_parts=0 --seed=${seed} $ALSO")
      RUNS+=("${R}_labeled_plnet_tuned_s${seed}|$(tuned_recipe labeled plnet)|--part_strategy=bands --seed=${seed} $ALSO")
    else
      RUNS+=("${R}_labeled_baseline_paper_old_s${seed}|$L|--num_parts=0 --seed=${seed}")
      RUNS+=("${R}_labeled_plnet_paper_old_s${seed}|$L|--seed=${seed}")
    fi
  done
fi
# The paper gap in numbers (issue 37): rows (b) and (a), labeled, trained on 1/2, 1/4 and 1/8
# of the training identities (the rest held out with --validation_identities, a new draw per
# seed, the same for both rows), scored on the same classic protocol; with paper_protocol's
# runs on all of them, classic rank-1 against the number of training identities, and the part
# loss's gain at each (summarize.py). RECIPE=old|tuned.
if [[ $WHICH == paper_identities ]]; then
  for key in plnet baseline; do
    if [[ $key == baseline ]]; then row="--num_parts=0 "; else row="--part_strategy=bands "; fi
    if [[ ${RECIPE:-old} == tuned ]]; then
      tag=tuned; recipe=$(tuned_recipe labeled $key)
    else
      tag=paper_old; recipe=$L; [[ $key == plnet ]] && row=""
    fi
    for seed in 0 1 2; do
      for kept in 50:0.5 25:0.75 12:0.875; do
        RUNS+=("${R}_labeled_${key}_${tag}_ids${kept%:*}_s${seed}|$recipe|${row}--seed=${seed} --validation_identities=${kept#*:} --validation_seed=${seed}")
      done
    done
  done
fi
if [[ $WHICH == main ]]; then
  for seed in 0 1 2; do
    for data in labeled detected; do
      RUNS+=("${R}_${data}_baseline_s${seed}|${R}_${data}_mobilenetv2_128x64|--num_parts=0 --seed=${seed}")
      RUNS+=("${R}_${data}_plnet_s${seed}|${R}_${data}_mobilenetv2_128x64|--seed=${seed}")
    done
  done
fi
# Rows (f)-(h). Labeled runs are also tested on the detected test split (the same people in
# detector boxes): the robustness table. (g) takes K and lambda from the validation grid:
# KL="K lambda" (required: no default, so that (g) cannot run before the choice).
if [[ $WHICH == strong ]]; then
  [[ -n ${KL:-} ]] || { echo "strong: set KL=\"K lambda\" from the validation grid" >&2; exit 2; }
  read -r K lambda <<<"$KL"
  for seed in 0 1 2; do
    for data in labeled detected; do
      also=$([[ $data == labeled ]] && echo "$ALSO" || echo "")
      RUNS+=("${R}_${data}_baseline_triplet_s${seed}|${R}_${data}_mobilenetv2_128x64|--num_parts=0 --triplet_weight=1 --seed=${seed} $also")
      RUNS+=("${R}_${data}_plnet_triplet_s${seed}|${R}_${data}_mobilenetv2_128x64|--num_parts=$K --part_loss_weight=$lambda --triplet_weight=1 --seed=${seed} $also")
      RUNS+=("${R}_${data}_stripes_s${seed}|${R}_${data}_mobilenetv2_128x64|--part_strategy=stripes --seed=${seed} $also")
    done
  done
fi
# (a) and (b) trained on labeled boxes once more, to test them on detector boxes (the first
# runs' checkpoints were not kept); their labeled figures repeat (a) and (b).
if [[ $WHICH == rerun ]]; then
  for seed in 0 1 2; do
    RUNS+=("${R}_labeled_baseline_rerun_s${seed}|${R}_labeled_mobilenetv2_128x64|--num_parts=0 --seed=${seed} $ALSO")
    RUNS+=("${R}_labeled_plnet_rerun_s${seed}|${R}_labeled_mobilenetv2_128x64|--seed=${seed} $ALSO")
  done
fi
# Open-set identification (issue 27): the baseline and PL-Net trained with 20 % of the
# training identities held out; the run fits its decision thresholds on them and scores the
# test split open set with them (results.json `calibration`, `open_set`).
if [[ $WHICH == openset ]]; then
  for data in labeled detected; do
    RUNS+=("${R}_${data}_openset_baseline_s0|${R}_${data}_mobilenetv2_128x64|--num_parts=0 --validation_identities=0.2 --seed=0")
    RUNS+=("${R}_${data}_openset_plnet_s0|${R}_${data}_mobilenetv2_128x64|--validation_identities=0.2 --seed=0")
  done
fi
if [[ $WHICH == wide ]]; then
  # (e): the baseline with a descriptor as wide as PL-Net's (K+1)*256 = 1280.
  for seed in 0 1 2; do
    RUNS+=("${R}_labeled_baseline1280_s${seed}|${R}_labeled_mobilenetv2_128x64|--num_parts=0 --embedding_dim=1280 --seed=${seed}")
  done
fi
if [[ $WHICH == short ]]; then
  for seed in 0 1 2; do
    for data in labeled detected; do
      RUNS+=("${R}_${data}_short_baseline_s${seed}|${R}_${data}_short_mobilenetv2_128x64|--num_parts=0 --seed=${seed}")
      RUNS+=("${R}_${data}_short_plnet_s${seed}|${R}_${data}_short_mobilenetv2_128x64|--seed=${seed}")
    done
  done
fi
if [[ $WHICH == peer ]]; then
  # The independent PyTorch baseline (experiments/peers), at the recipe's budget in steps.
  # PEER_TRIPLET=1: the peer of (f), with the batch-hard triplet loss (weight 1, margin 0.3).
  PEER=${PEER:-experiments/peers/.venv/bin/python}
  suffix=$([[ -n ${PEER_TRIPLET:-} ]] && echo _triplet || echo "")
  peer_flags=$([[ -n ${PEER_TRIPLET:-} ]] && echo "--triplet_weight=1 --triplet_margin=0.3" || echo "")
  for job in labeled:0 labeled:1 labeled:2 detected:0 detected:1 detected:2; do
    data=${job%:*}; seed=${job#*:}
    run=peer_${data}_baseline${suffix}_s${seed}
    out=experiments/results/$run.json
    [[ $run =~ $ONLY ]] || continue
    [[ -f $out ]] && { echo "== $run: done, skipped"; continue; }
    while [[ -f runs/PAUSE ]]; do sleep 10; done
    flagfile=experiments/${R}_${data}_mobilenetv2_128x64.flags
    epochs=$(sed -n 's/^--epochs=//p' "$flagfile")
    steps=$("$PYTHON" -c "import numpy as np; from reid_tf.data import pipeline, splits
s = splits.load_splits('folder:../shared/data/${R}_${data}', log=lambda line: None)['train']
labels, _ = splits.relabel(s.person_ids)
print($epochs * (len(pipeline.pk_epoch(labels, 16, 4, np.random.default_rng([0, 0]))) // 64))")
    mkdir -p "runs/$run"
    echo "== $run: $steps steps ($epochs epochs of reid-train's schedule) $peer_flags"
    # shellcheck disable=SC2086
    "$PEER" experiments/peers/torch_baseline.py --data="../shared/data/${R}_${data}" \
      --weights=../shared/weights/mobilenet_v2-b0353104.pth --steps="$steps" --seed="$seed" \
      --output="$out" --checkpoint="runs/$run/checkpoint.pt" $peer_flags \
      >>"runs/$run/train.log" 2>&1 || echo "!! $run failed, see runs/$run/train.log"
  done
fi
# CUHK03's classic protocol (reid-eval --classic_identities=100) scores a run from its
# checkpoints, which only the machine that trained it has: each run that paper_protocol or
# paper_identities scores is scored as soon as it is trained (the tuned phase's labeled (a) and
# (b) too), and again at the end of those phases for any trained here but not yet scored.
CLASSIC='^$'
[[ $WHICH == paper_protocol || $WHICH == paper_identities ]] && CLASSIC='.'
[[ $WHICH == tuned ]] && CLASSIC="^${R}_labeled_(baseline|plnet)_tuned_s[0-9]+$"
classic_score() {  # classic_score <run>: experiments/results/classic/<run>.json
  local name=$1 out=experiments/results/classic/$1.json
  [[ -f $out ]] && { echo "== $name (classic protocol): done, skipped"; return; }
  [[ -d runs/$name/checkpoints ]] || { echo "!! $name: not trained here, no classic score"; return; }
  echo "== $name: reid-eval --classic_identities=100"
  "$PYTHON" -m reid_tf.cli.eval --workdir="runs/$name" --classic_identities=100 \
    --output_dir="runs/$name/classic" >>"runs/$name/classic.log" 2>&1 \
    && mkdir -p experiments/results/classic && cp "runs/$name/classic/results.json" "$out" \
    || echo "!! $name: classic scoring failed, see runs/$name/classic.log"
}
for run in "${RUNS[@]}"; do
  IFS='|' read -r name recipe extra <<<"$run"
  dir=runs/$name
  [[ $name =~ $ONLY ]] || continue
  [[ -n $DRY ]] && { echo "$name|$recipe|$extra"; continue; }
  [[ -f $dir/results.json || -f experiments/results/$name.json ]] \
    && { echo "== $name: done, skipped"; continue; }
  while [[ -f runs/PAUSE ]]; do sleep 10; done
  mkdir -p "$dir"
  echo "== $name: $TRAIN --flagfile=experiments/$recipe.flags --workdir=$dir $extra"
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$TRAIN" --flagfile="experiments/$recipe.flags" --workdir="$dir" $extra >>"$dir/train.log" 2>&1 \
    || { echo "!! $name failed, see $dir/train.log"; continue; }
  echo $(( $(date +%s) - start + $(cat "$dir/wall_seconds" 2>/dev/null || echo 0) )) >"$dir/wall_seconds.new"
  mv "$dir/wall_seconds.new" "$dir/wall_seconds"
  echo "   $(cat "$dir/wall_seconds") s"
  "$PYTHON" experiments/summarize.py --collect="$dir" --recipe="$recipe" --extra="$extra"
  [[ $name =~ $CLASSIC ]] && classic_score "$name"
done
if [[ $CLASSIC != '^$' && -z $DRY ]]; then
  for run in "${RUNS[@]}"; do
    name=${run%%|*}
    [[ $name =~ $ONLY && $name =~ $CLASSIC ]] && classic_score "$name"
  done
fi
exit 0
