"""Hyper-parameter search on validation identities (issue 37): Optuna studies over reid-train.

    .venv/bin/python experiments/search.py --studies=plnet,baseline --trials=20
    .venv/bin/python experiments/search.py --studies=plnet --confirm --top=3 --seeds=0,1,2
    .venv/bin/python experiments/search.py --studies=plnet,baseline --export_only
    .venv/bin/python experiments/search.py --studies=plnet,baseline --write_recipes

Each trial is one `reid-train` run of the labeled CUHK03 pair-1 recipe on
`--validation_identities=0.2` of the training identities, `--nofinal_eval`: the run never
opens the test split (`train.loop.build_data` then lists the training folder only). It is
evaluated on validation at every tenth of its schedule; each point is reported to the trial
(step = percent of the schedule, so trials of different lengths are compared at the same
point of their own schedule) and a median pruner stops the trials below the median of the
finished ones. The objective is the validation mAP at the *end* of the schedule: a recipe that
peaks and collapses scores what it collapses to.

Why Optuna (not KerasTuner): a trial here is a whole `reid-train` process with its own
distribution strategy, resume and evaluation hooks, not a `model.fit`; Optuna's define-by-run
space takes the conditional parameters (the triplet settings only with a triplet weight, each
optimizer with its own learning-rate range), its SQLite storage makes the study resumable
across sessions and auditable, and its pruners take any reported metric.

Resuming. The study lives in SQLite (`--storage`); every trial's workdir is named by a hash of
its flags. A driver that is killed leaves its trial RUNNING; its heartbeat stops, and the next
driver marks it failed and enqueues it again with the same parameters
(`RetryHeartbeatStaleTrialCallback`, no limit on retries: a dead driver is never the trial's
fault), so the retry finds the same workdir and reid-train resumes from its checkpoint. After
every trial the study is exported to `--export_dir/<study>.json` (every trial's flags,
validation curve, state and value) and the database is copied there: commit both. To stop a
driver without cutting a trial off (to re-pin its clone), `touch runs/PAUSE` (`--pause_file`):
it waits before its next trial or confirmation run until the file is gone; stop it then.

`--confirm` reruns the `--top` best finished configurations of each study at `--seeds`
(the trial itself is seed 0) on validation and writes `<study>_confirm.json` after each run
(commit it as it grows: a fresh machine takes the runs it holds from there): the recipe is
chosen by the mean over seeds, never by one run. `--write_recipes` then writes each study's
winner as a flagfile, `experiments/cuhk03_pair1_<labeled|detected>_tuned_<study>.flags`: the
base recipe with the winner's values, its header the search and the confirmation.
"""

import collections
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings

from absl import app
from absl import flags

import optuna

RECIPE = "experiments/cuhk03_pair1_labeled_mobilenetv2_128x64.flags"
STUDIES = ("plnet", "baseline")
STUDY_PREFIX = "cuhk03_pair1_labeled_"
EVALUATIONS = 10  # validation points per trial: one every tenth of the schedule
VALIDATION_IDENTITIES = 0.2  # of the labeled training identities (the test split is never read)

FLAGS = flags.FLAGS
flags.DEFINE_list("studies", ["plnet", "baseline"], f"Studies to run, from {STUDIES}; one "
                  "trial of each in turn until each has --trials finished trials.")
flags.DEFINE_integer("trials", 20, "Finished (complete or pruned) trials wanted per study "
                     "(20 + 20: the issue's 40 in all).")
flags.DEFINE_string("storage", "sqlite:///runs/search/search.db", "Optuna storage URL.")
flags.DEFINE_string("recipe", RECIPE, "The flagfile every trial starts from.")
flags.DEFINE_string("runs_dir", "runs/search", "Trials' workdirs: <runs_dir>/<study>/<key>.")
flags.DEFINE_string("export_dir", "experiments/search", "Where the study's record goes.")
flags.DEFINE_list("train_command", [sys.executable, "-m", "reid_tf.cli.train"],
                  "The reid-train command (tests put a stand-in here).")
flags.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch of the validation-carved "
                     "training split (0: computed from --recipe's dataset; tests: it also "
                     "stands for the whole split's in --write_recipes).")
flags.DEFINE_integer("startup_trials", 10, "Random trials before TPE models the space.")
flags.DEFINE_integer("prune_after", 8, "Finished trials before the pruner may prune.")
flags.DEFINE_integer("sampler_seed", 0, "TPE's seed.")
flags.DEFINE_float("poll_seconds", 10.0, "How often a running trial's curve is read.")
flags.DEFINE_integer("heartbeat_seconds", 60, "Optuna heartbeat of a running trial.")
flags.DEFINE_list("extra_flags", [], "Flags added to every trial (tests: tiny shapes).")
flags.DEFINE_string("pause_file", "runs/PAUSE", "While it exists the driver waits before each "
                    "trial and confirmation run (as run_cuhk03_pair1.sh does between runs).")
flags.DEFINE_bool("keep_checkpoints", False, "Keep finished trials' checkpoints.")
flags.DEFINE_bool("confirm", False, "Rerun the --top configurations at --seeds.")
flags.DEFINE_integer("top", 3, "Configurations --confirm reruns.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of --confirm (0: the trial itself).")
flags.DEFINE_bool("export_only", False, "Only write the record of the studies.")
flags.DEFINE_bool("write_recipes", False, "Write each study's tuned flagfiles from its "
                  "confirmation (<study>_confirm.json): <recipes_dir>/cuhk03_pair1_<data>_tuned_"
                  "<study>.flags for each of --recipe_data.")
flags.DEFINE_string("recipes_dir", "experiments", "Where --write_recipes writes.")
flags.DEFINE_list("recipe_data", ["labeled", "detected"], "Box types --write_recipes writes "
                  "a recipe for (the search ran on labeled boxes; the others take its values).")


def suggest(trial, kind):
    """The search space: `{reid-train option: value}` for one trial of study `kind`."""
    optimizer = trial.suggest_categorical("optimizer", ["adam", "sgd"])
    # Keras's Adam with weight_decay already decays decoupled (AdamW): "adamw" would search the
    # same optimizer twice. Each optimizer has its own learning-rate and decay range.
    learning_rates = {"adam": (1e-4, 3e-3), "sgd": (3e-3, 0.1)}[optimizer]
    decays = {"adam": (1e-4, 0.1), "sgd": (1e-5, 5e-3)}[optimizer]
    values = {
        "optimizer": optimizer,
        "learning_rate": trial.suggest_float(f"{optimizer}_learning_rate", *learning_rates,
                                             log=True),
        "weight_decay": trial.suggest_float(f"{optimizer}_weight_decay", *decays, log=True),
        "backbone_lr_multiplier": trial.suggest_float("backbone_lr_multiplier", 0.05, 1.0,
                                                      log=True),
        "epochs": trial.suggest_int("epochs", 12, 60, step=6),
        "schedule": trial.suggest_categorical("schedule", ["cosine", "step"]),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.3),
        "random_erasing": trial.suggest_float("random_erasing", 0.0, 0.8),
        "pad": trial.suggest_categorical("pad", [0, 5, 10]),
        "warmup_fraction": trial.suggest_float("warmup_fraction", 0.0, 0.2),
        "triplet_weight": 0.0,
    }
    if trial.suggest_categorical("triplet", [False, True]):
        values["triplet_weight"] = trial.suggest_float("triplet_weight", 0.1, 2.0, log=True)
        soft = trial.suggest_categorical("soft_margin", [False, True])
        values["triplet_margin"] = 0.0 if soft else trial.suggest_float("triplet_margin",
                                                                        0.1, 0.6)
        values["triplet_normalize"] = trial.suggest_categorical("triplet_normalize",
                                                                [False, True])
    if kind == "plnet":
        values["num_parts"] = trial.suggest_categorical("num_parts", [2, 3, 4, 6])
        values["part_loss_weight"] = trial.suggest_float("part_loss_weight", 0.25, 4.0, log=True)
    else:
        values["num_parts"] = 0
    return values


def trial_flags(values, steps_per_epoch, seed=0, extra=()):
    """reid-train's flags for `values` (from `suggest`): the recipe's settings overridden,
    validation only, an evaluation every tenth of the schedule."""
    values = dict(values)
    total = values["epochs"] * steps_per_epoch
    values["warmup_steps"] = int(round(values.pop("warmup_fraction") * total))
    every = math.ceil(total / EVALUATIONS)
    command = [f"--{name}={_flag_value(value)}" if not isinstance(value, bool)
               else f"--{'' if value else 'no'}{name}" for name, value in sorted(values.items())]
    return command + [f"--validation_identities={VALIDATION_IDENTITIES}",
                      "--validation_seed=0", f"--seed={seed}", "--nofinal_eval", "--noexport",
                      "--also_evaluate_on=", f"--eval_every={every}",
                      f"--checkpoint_every={every}", "--image_summary_every=0",
                      "--log_every=50", *extra]


def _flag_value(value):
    return repr(value) if isinstance(value, float) else str(value)


def percent(step, total):
    """The step a trial reports for its validation point at `step` of `total`: 10 × the
    point's number (reid-train evaluates every `ceil(total / 10)` steps), 100 at the end; so
    every trial length reports the same tenths of its own schedule."""
    return 100 if step >= total else 10 * (step // math.ceil(total / EVALUATIONS))


def workdir_of(runs_dir, study_name, flags_list):
    """A trial's workdir, named by its flags: a retried trial finds its own checkpoints."""
    key = hashlib.sha1(" ".join(flags_list).encode()).hexdigest()[:12]
    return os.path.join(runs_dir, study_name, key)


class TrialFailed(RuntimeError):
    """reid-train ended with an error that is not a divergence."""


def run_trial(trial, command, workdir, total, log=print):
    """Runs reid-train, reports its validation points to `trial` as they appear, stops it when
    the pruner says so. Returns `(final validation metrics, curve, outcome)`."""
    os.makedirs(workdir, exist_ok=True)
    curve_path = os.path.join(workdir, "validation_curve.json")
    reported = set()
    with open(os.path.join(workdir, "train.log"), "a") as train_log, \
            _trainer(command, train_log) as process:
        while True:
            finished = process.poll() is not None
            curve = _read_json(curve_path) or []
            for point in curve:
                step = percent(point["step"], total)
                if step in reported or point["step"] >= total:
                    continue  # the last point is the objective, told at completion
                reported.add(step)
                trial.report(point["mAP"], step)
                log(f"  trial {trial.number} at {step}% (epoch {point['epoch']:.1f}): "
                    f"validation mAP {point['mAP']:.4f} rank-1 {point['rank1']:.4f}")
                if not finished and trial.should_prune():
                    stopped = _stop(process)
                    if stopped:  # else it ended on its own meanwhile: a complete trial
                        # The curve as it stands on disk, for the record.
                        return point, _read_json(curve_path) or curve, "pruned"
            if finished:
                break
            time.sleep(FLAGS.poll_seconds)
    results = _read_json(os.path.join(workdir, "results.json"))
    if process.returncode == 0 and results and "validation" in results:
        return results["validation"], results.get("validation_curve", curve), "complete"
    with open(os.path.join(workdir, "train.log"), errors="replace") as train_log:
        tail = train_log.read()[-2000:]
    if "non-finite loss" in tail:
        return None, curve, "diverged"
    raise TrialFailed(f"reid-train exited {process.returncode} in {workdir}: "
                      f"{tail.strip().splitlines()[-1] if tail.strip() else '(no output)'}")


_RUNNING = set()  # the reid-train processes of this driver


@contextlib.contextmanager
def _trainer(command, train_log):
    """reid-train in its own process group, killed with the driver, stopped by its signals,
    and stopped when the block ends, however it ends."""
    process = subprocess.Popen(command, stdout=train_log, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=_die_with_parent)
    _RUNNING.add(process)
    try:
        yield process
    finally:
        _stop(process)
        _RUNNING.discard(process)


def _train(command, workdir):
    """One confirmation run to its end (it resumes from the workdir's checkpoint)."""
    with open(os.path.join(_made(workdir), "train.log"), "a") as train_log, \
            _trainer(command, train_log) as process:
        process.wait()
    if process.returncode != 0:
        raise TrialFailed(f"reid-train exited {process.returncode} in {workdir}")


def wait_while_paused(log=print):
    """Holds the driver while `--pause_file` exists: nothing runs, so the driver can be stopped
    (a clone re-pinned) without cutting a trial off."""
    if not os.path.exists(FLAGS.pause_file):
        return
    log(f"search: paused ({FLAGS.pause_file} exists); remove it to go on")
    while os.path.exists(FLAGS.pause_file):
        time.sleep(FLAGS.poll_seconds)
    log("search: going on")


def _die_with_parent():
    """In the child before exec: SIGKILL when the driver dies (PR_SET_PDEATHSIG), so a killed
    driver never leaves a trial training on that a retry would then train beside."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _stop_and_exit(*_):
    """SIGTERM/SIGINT: stop reid-train, leave the trial RUNNING (no FAIL is written), exit. Its
    heartbeat then goes stale and the next driver retries it from its checkpoint."""
    for process in list(_RUNNING):
        _stop(process)
    print("search: stopped; the running trial is retried from its checkpoint next time",
          flush=True)
    os._exit(1)


def _stop(process):
    """Stops reid-train; True when it was still running (False: it had ended by itself)."""
    if process.poll() is not None:
        return False
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return True


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # not written yet (writes are atomic, so never half)


def objective(kind, steps_per_epoch, log=print):
    def run(trial):
        values = suggest(trial, kind)
        command_flags = trial_flags(values, steps_per_epoch, extra=FLAGS.extra_flags)
        workdir = workdir_of(FLAGS.runs_dir, trial.study.study_name, command_flags)
        total = values["epochs"] * steps_per_epoch
        if (os.path.exists(os.path.join(workdir, "results.json"))
                and "failed_trial" not in trial.system_attrs):
            trial.set_user_attr("outcome", "duplicate")  # failed: neither counted nor learned
            raise TrialFailed(f"trial {trial.number} repeats the flags of a finished trial "
                              f"({workdir})")
        trial.set_user_attr("flags", command_flags)
        trial.set_user_attr("workdir", workdir)
        log(f"trial {trial.number} of {trial.study.study_name}: {' '.join(command_flags)}")
        started = time.time()
        command = FLAGS.train_command + [f"--flagfile={FLAGS.recipe}", f"--workdir={workdir}",
                                         *command_flags]
        try:
            final, curve, outcome = run_trial(trial, command, workdir, total, log)
        except TrialFailed:
            trial.set_user_attr("outcome", "error")  # failed by itself: not retried
            raise
        trial.set_user_attr("outcome", outcome)
        trial.set_user_attr("wall_seconds", round(time.time() - started))
        trial.set_user_attr("validation_curve", [
            {k: point[k] for k in ("step", "epoch", "rank1", "mAP")} for point in curve])
        results = _read_json(os.path.join(workdir, "results.json")) or {}
        for key in ("code", "train_images_per_second"):
            if key in results:
                trial.set_user_attr(key, results[key])
        if not FLAGS.keep_checkpoints:
            shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
        if outcome != "complete":
            log(f"trial {trial.number}: {outcome}")
            raise optuna.TrialPruned()
        trial.set_user_attr("rank1", final["rank1"])
        log(f"trial {trial.number}: validation mAP {final['mAP']:.4f} rank-1 "
            f"{final['rank1']:.4f} at the end ({outcome}, {trial.user_attrs['wall_seconds']} s)")
        return final["mAP"]
    return run


# A trial whose heartbeat went stale had its driver killed (a session's end, a re-pin): never
# the trial's fault, so its retries have no limit. A trial whose reid-train failed is told
# FAIL by its own driver (outcome "error") and is not retried.
with warnings.catch_warnings():  # "experimental" since Optuna 2.8
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)


def open_study(kind):
    with warnings.catch_warnings():  # heartbeats and multivariate TPE are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            FLAGS.storage, heartbeat_interval=FLAGS.heartbeat_seconds,
            grace_period=2 * FLAGS.heartbeat_seconds,
            heartbeat_stale_trial_callback=RETRY)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=FLAGS.prune_after,
                                         n_warmup_steps=30)
    study = optuna.create_study(study_name=STUDY_PREFIX + kind, storage=storage,
                                direction="maximize", pruner=pruner, load_if_exists=True)
    requeue_cut_off(study)
    # Seeded by the trials already there: a sampler seeded the same in every driver would
    # draw, after each restart, the configurations it drew after the first start again.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(
            n_startup_trials=FLAGS.startup_trials, multivariate=True, group=True,
            seed=FLAGS.sampler_seed + len(study.get_trials(deepcopy=False)))
    return study


def requeue_cut_off(study):
    """Queues again each retry chain that ends failed by a dead driver with no retry after it:
    the chains an older driver cut off at three retries (the study's trials 14 to 17)."""
    chains = {}
    for t in study.get_trials(deepcopy=False):
        chains[t.system_attrs.get("failed_trial", t.number)] = t  # in number order: the last
    for last in chains.values():
        if last.state == optuna.trial.TrialState.FAIL and "outcome" not in last.user_attrs:
            RETRY(study, last)


def finished(study):
    """Finished (complete or pruned) trials of distinct flags: a repeat counts once (before
    the sampler was seeded by the trial count, a restarted driver could redraw a trial)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len({json.dumps(t.user_attrs.get("flags", t.number))
                for t in study.get_trials(deepcopy=False, states=states)})


def export(study):
    """`<export_dir>/<study>.json`: every trial, and a consistent copy of the database."""
    os.makedirs(FLAGS.export_dir, exist_ok=True)
    trials = [{"number": t.number, "state": t.state.name, "value": t.value,
               "params": t.params, "intermediate_values": {str(k): v for k, v in
                                                           sorted(t.intermediate_values.items())},
               "retry_of": t.system_attrs.get("failed_trial"),
               "started": t.datetime_start.isoformat() if t.datetime_start else None,
               "finished": t.datetime_complete.isoformat() if t.datetime_complete else None,
               **t.user_attrs} for t in study.get_trials(deepcopy=False)]
    seen = {}
    for t in trials:  # a finished trial whose flags an earlier finished one had
        key = json.dumps(t.get("flags"))
        if t["state"] in ("COMPLETE", "PRUNED") and t.get("flags"):
            if key in seen:
                t["duplicate_of"] = seen[key]
            else:
                seen[key] = t["number"]
    complete = [t for t in trials if t["state"] == "COMPLETE" and "duplicate_of" not in t]
    best = max(complete, key=lambda t: t["value"]) if complete else None
    record = {"study": study.study_name, "direction": "maximize",
              "objective": "validation mAP at the end of the schedule",
              "finished": finished(study), "best": best and {k: best[k] for k in
                                                              ("number", "value", "flags")},
              "trials": trials}
    _write_json(os.path.join(FLAGS.export_dir, f"{study.study_name}.json"), record)
    if FLAGS.storage.startswith("sqlite:///"):  # sqlite's backup: consistent while in use
        target = os.path.join(FLAGS.export_dir, "search.db")
        source = sqlite3.connect(FLAGS.storage[len("sqlite:///"):])
        copy = sqlite3.connect(target + ".tmp")
        with copy:
            source.backup(copy)
        copy.close()
        source.close()
        os.replace(target + ".tmp", target)
    return record


def table(record):
    """A study's trials as a markdown table (what experiments/RESULTS.md shows)."""
    rows = ["| trial | state | optimizer | lr | backbone × | epochs | schedule | erasing | "
            "smoothing | triplet | K | λ | last val mAP | best val mAP |",
            "| --- " * 14 + "|"]
    for t in record["trials"]:
        p, curve = t["params"], t.get("validation_curve") or []
        if not p:
            continue
        optimizer = p["optimizer"]
        triplet = "–" if not p.get("triplet") else (
            f"{p['triplet_weight']:.2f}, " + ("soft" if p.get("soft_margin") else
                                              f"m {p.get('triplet_margin', 0):.2f}")
            + (", norm" if p.get("triplet_normalize") else ""))
        last = curve[-1]["mAP"] if curve else None
        best = max(point["mAP"] for point in curve) if curve else None
        outcome = t.get("outcome", t["state"].lower())
        if "duplicate_of" in t:
            outcome = f"repeat of {t['duplicate_of']}"
        rows.append(
            f"| {t['number']} | {outcome} | {optimizer} | {p[optimizer + '_learning_rate']:.2g} "
            f"| {p['backbone_lr_multiplier']:.2f} | {p['epochs']} | {p['schedule']} | "
            f"{p['random_erasing']:.2f} | {p['label_smoothing']:.2f} | {triplet} | "
            f"{p.get('num_parts', 0)} | "
            + (f"{p['part_loss_weight']:.2f}" if "part_loss_weight" in p else "–")
            + " | " + (f"{100 * last:.1f}" if last is not None else "–") + " | "
            + (f"{100 * best:.1f}" if best is not None else "–") + " |")
    return "\n".join(rows)


def steps_per_epoch_of_recipe(recipe=None, validation_identities=VALIDATION_IDENTITIES):
    """Steps per epoch of a recipe's training split (by default `--recipe` with the validation
    identities carved out, what a trial's reid-train computes), read with the library's own
    `build_data`."""
    from reid_tf import options
    from reid_tf.train.config import TrainConfig
    from reid_tf.train.loop import build_data

    config = options.parse(TrainConfig, [f"--flagfile={recipe or FLAGS.recipe}",
                                         f"--validation_identities={validation_identities}",
                                         "--nofinal_eval", *FLAGS.extra_flags])
    return build_data(config, log=lambda line: None).steps_per_epoch


def confirm(study, steps_per_epoch, log=print):
    """Reruns the `--top` best complete trials at `--seeds` (0: the trial's own run). Each
    finished run goes into `<study>_confirm.json` at once (commit it): a fresh machine takes
    the runs it holds from there instead of training them again."""
    ranked = sorted(study.get_trials(deepcopy=False,
                                     states=(optuna.trial.TrialState.COMPLETE,)),
                    key=lambda t: -t.value)
    distinct = {}  # best first, each configuration once
    for trial in ranked:
        distinct.setdefault(json.dumps(trial.user_attrs.get("flags")), trial)
    complete = list(distinct.values())[:FLAGS.top]
    path = os.path.join(_made(FLAGS.export_dir), f"{study.study_name}_confirm.json")
    recorded = {(json.dumps(row["flags"]), seed): run
                for row in (_read_json(path) or {}).get("configurations", [])
                for seed, run in row["runs"].items()}
    rows = []
    for trial in complete:
        row = {"trial": trial.number, "flags": trial.user_attrs["flags"], "runs": {}}
        rows.append(row)
        for seed in map(int, FLAGS.seeds):
            key = (json.dumps(row["flags"]), str(seed))
            if seed == 0:  # the trial itself
                run = {"mAP": trial.value, "rank1": trial.user_attrs.get("rank1")}
            elif key in recorded:
                run = recorded[key]
                log(f"confirm trial {trial.number} seed {seed}: from the record")
            else:
                run = confirmation_run(study, trial, seed, log)
            row["runs"][str(seed)] = run
            _write_confirmation(path, study, rows, done=False)
        maps = [run["mAP"] for run in row["runs"].values()]
        row["mean_mAP"] = sum(maps) / len(maps)
        row["std_mAP"] = math.sqrt(sum((m - row["mean_mAP"]) ** 2 for m in maps)
                                   / max(1, len(maps) - 1))
        log(f"trial {trial.number}: validation mAP {row['mean_mAP']:.4f} +- "
            f"{row['std_mAP']:.4f} over seeds {sorted(map(int, row['runs']))}")
    rows.sort(key=lambda row: -row["mean_mAP"])
    return _write_confirmation(path, study, rows, done=True)


def confirmation_run(study, trial, seed, log=print):
    """`trial`'s flags at `seed`, trained (or resumed) in its own workdir: its validation
    mAP and rank-1, and the commit that ran it."""
    command_flags = [f for f in trial.user_attrs["flags"] if not f.startswith("--seed=")]
    command_flags.append(f"--seed={seed}")
    workdir = workdir_of(FLAGS.runs_dir, study.study_name + "_confirm", command_flags)
    results = _read_json(os.path.join(workdir, "results.json"))
    if not results:
        wait_while_paused(log)
        log(f"confirm trial {trial.number} seed {seed}: {' '.join(command_flags)}")
        _train(FLAGS.train_command + [f"--flagfile={FLAGS.recipe}", f"--workdir={workdir}",
                                      *command_flags], workdir)
        results = _read_json(os.path.join(workdir, "results.json"))
    return {**{k: results["validation"][k] for k in ("mAP", "rank1")},
            "commit": (results.get("code") or {}).get("commit")}


def _write_confirmation(path, study, rows, done):
    """The confirmation's record; `chosen` (the best mean) only once every run is in."""
    record = {"study": study.study_name, "seeds": sorted(map(int, FLAGS.seeds)),
              "complete": done, "chosen": rows[0]["trial"] if done and rows else None,
              "configurations": rows}
    _write_json(path, record)
    return record


def _write_json(path, value):
    """Whole or not at all: a reader never sees half a record."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


# A trial's flags that only a validation trial has: the tuned recipe trains on every training
# identity, is tested, exports, evaluates and checkpoints as the base recipe does, and takes its
# warm-up as the same share of its own schedule.
VALIDATION_ONLY = ("validation_identities", "validation_seed", "seed", "final_eval", "export",
                   "also_evaluate_on", "eval_every", "checkpoint_every", "image_summary_every",
                   "log_every", "warmup_steps")


def _flag_name(flag):
    name = flag[2:].split("=", 1)[0]
    return name[2:] if "=" not in flag and name.startswith("no") else name


def base_recipe(data):
    """The recipe the search started from, for `data` boxes (labeled or detected)."""
    return FLAGS.recipe.replace("_labeled_", f"_{data}_")


def tuned_recipe(base_lines, trial_flags, warmup_fraction, steps_per_epoch, header):
    """A tuned flagfile's text: `header` (comment lines), then the base recipe's flag lines
    with the trial's values in their place (new flags appended), without the validation-only
    flags, and `--warmup_steps` as `warmup_fraction` of this data's schedule."""
    tuned = [f for f in trial_flags if _flag_name(f) not in VALIDATION_ONLY]
    epochs = int(next(f for f in tuned if _flag_name(f) == "epochs").split("=")[1])
    tuned.append(f"--warmup_steps={int(round(warmup_fraction * epochs * steps_per_epoch))}")
    names = {_flag_name(f): f for f in tuned}
    lines = []
    for line in base_lines:
        if line.startswith("--"):
            line = names.pop(_flag_name(line), line)
        if line.strip() and not line.startswith("#"):
            lines.append(line)
    lines += [names[name] for name in sorted(names)]
    wrapped = [part for line in header  # indented lines (the confirmation's rows) as they are
               for part in ([line] if line.startswith(" ") else textwrap.wrap(line, 94) or [""])]
    return "\n".join(["# " + line if line else "#" for line in wrapped] + lines) + "\n"


# How a failed trial failed, by its outcome (none: its driver died, and it was retried).
FAILED_AS = {None: "interrupted and retried", "duplicate": "a repeat of an earlier draw, "
             "stopped at once", "error": "failed in reid-train"}


def failed_trials(trials):
    """'; 3 interrupted and retried; 1 a repeat ...' for a study's failed trials, or ''."""
    outcomes = collections.Counter(t.user_attrs.get("outcome") for t in trials
                                   if t.state == optuna.trial.TrialState.FAIL)
    return "".join(f"; {n} {FAILED_AS.get(outcome, outcome)}"
                   for outcome, n in sorted(outcomes.items(), key=lambda item: str(item[0])))


def recipe_header(study, record, data, steps_per_epoch):
    """The comment lines heading a tuned flagfile: the search, its 3-seed confirmation and the
    winner."""
    kind = study.study_name[len(STUDY_PREFIX):]
    trials = study.get_trials(deepcopy=False)
    count = {state: sum(t.state == state for t in trials) for state in optuna.trial.TrialState}
    commits = sorted({t.user_attrs["code"]["commit"][:7] for t in trials
                      if t.user_attrs.get("code", {}).get("commit")})
    chosen = study.trials[record["chosen"]]
    name = f"cuhk03_pair1_{data}_tuned_{kind}"
    lines = [
        f"Tuned recipe (issue 37): {'PL-Net' if kind == 'plnet' else 'the global-loss baseline'}"
        f" on CUHK03 camera pair 1, {data} boxes. Written by `experiments/search.py "
        f"--write_recipes` on {time.strftime('%Y-%m-%d')} from the study in experiments/search/"
        f" ({study.study_name}.json, _confirm.json, search.db).", "",
        f"The search: Optuna, TPE sampler and median pruner, {finished(study)} finished trials "
        f"({count[optuna.trial.TrialState.COMPLETE]} complete, "
        f"{count[optuna.trial.TrialState.PRUNED]} pruned{failed_trials(trials)}), each "
        "reid-train on "
        f"the labeled training identities with {VALIDATION_IDENTITIES:.0%} held out "
        "(validation_seed 0); objective: validation mAP at the end of the schedule. The test "
        f"split was never read. Trials ran at commits {', '.join(commits) or 'unknown'}.",
        f"The {len(record['seeds'])}-seed confirmation on validation (mAP %, seed 0 is the "
        "trial itself):"]
    for row in record["configurations"]:
        runs = ", ".join(f"{100 * row['runs'][seed]['mAP']:.1f}" for seed in sorted(row["runs"]))
        lines.append(f"  trial {row['trial']}: {100 * row['mean_mAP']:.1f} ± "
                     f"{100 * row['std_mAP']:.1f} ({runs})"
                     + ("  <- chosen: the best mean" if row["trial"] == record["chosen"] else ""))
    lines += [
        f"--warmup_steps is the trial's warm-up share ({chosen.params['warmup_fraction']:.1%}) of"
        f" this schedule ({steps_per_epoch} steps per epoch on every training identity).",
        *([] if data == "labeled" else [
            "The search ran on labeled boxes only; these are its values on detected boxes."]), "",
        f"  reid-train --flagfile=experiments/{name}.flags --workdir=runs/<run> --seed=0"]
    return lines


def write_recipes(study, log=print):
    """The tuned flagfiles of `study`'s confirmed winner, one per `--recipe_data`."""
    path = os.path.join(FLAGS.export_dir, f"{study.study_name}_confirm.json")
    record = _read_json(path)
    if not record or record.get("chosen") is None:
        raise SystemExit(f"search: no confirmation in {path}: run --confirm first")
    chosen = next(row for row in record["configurations"] if row["trial"] == record["chosen"])
    warmup = study.trials[record["chosen"]].params["warmup_fraction"]
    for data in FLAGS.recipe_data:
        base = base_recipe(data)
        steps = FLAGS.steps_per_epoch or steps_per_epoch_of_recipe(base, 0.0)
        with open(base) as f:
            text = tuned_recipe(f.read().splitlines(), chosen["flags"], warmup, steps,
                                recipe_header(study, record, data, steps))
        out = os.path.join(_made(FLAGS.recipes_dir), f"cuhk03_pair1_{data}_tuned_"
                           f"{study.study_name[len(STUDY_PREFIX):]}.flags")
        with open(out + ".tmp", "w") as f:
            f.write(text)
        os.replace(out + ".tmp", out)
        log(f"{study.study_name}: trial {record['chosen']} written to {out}")


def _made(folder):
    os.makedirs(folder, exist_ok=True)
    return folder


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.studies) - set(STUDIES))
    if unknown:
        raise app.UsageError(f"--studies: {unknown} not in {STUDIES}")
    if FLAGS.storage.startswith("sqlite:///"):
        database = FLAGS.storage[len("sqlite:///"):]
        _made(os.path.dirname(os.path.abspath(database)))
        committed = os.path.join(FLAGS.export_dir, "search.db")
        if not os.path.exists(database) and os.path.exists(committed):
            shutil.copyfile(committed, database)  # a fresh checkout resumes the committed study
            print(f"search: resuming the study committed in {committed}", flush=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = lambda line: print(time.strftime("%H:%M:%S ") + line, flush=True)  # noqa: E731
    studies = {kind: open_study(kind) for kind in FLAGS.studies}
    if FLAGS.export_only:
        for study in studies.values():
            record = export(study)
            log(f"{study.study_name}: {record['finished']} finished trials exported")
            print(table(record), flush=True)
        return
    if FLAGS.write_recipes:
        for study in studies.values():
            write_recipes(study, log)
        return
    steps_per_epoch = FLAGS.steps_per_epoch or steps_per_epoch_of_recipe()
    log(f"{steps_per_epoch} steps per epoch on the validation-carved training split")
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, _stop_and_exit)
    if FLAGS.confirm:
        for study in studies.values():
            confirm(study, steps_per_epoch, log)
        return
    failures = 0
    while any(finished(study) < FLAGS.trials for study in studies.values()):
        for kind, study in studies.items():
            if finished(study) >= FLAGS.trials:
                continue
            wait_while_paused(log)
            before = len(study.get_trials(deepcopy=False,
                                          states=(optuna.trial.TrialState.FAIL,)))
            study.optimize(objective(kind, steps_per_epoch, log), n_trials=1,
                           catch=(TrialFailed,))
            export(study)
            failed = len(study.get_trials(deepcopy=False,
                                          states=(optuna.trial.TrialState.FAIL,))) > before
            failures = failures + 1 if failed else 0
            if failures >= 3:
                raise SystemExit("search: 3 trials in a row failed; see their train.log")
            log(f"{study.study_name}: {finished(study)}/{FLAGS.trials} finished")


if __name__ == "__main__":
    app.run(main)
