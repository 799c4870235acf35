"""experiments/search.py: the search space, the pruned and resumable study, its record, the
3-seed confirmation, and one real reid-train trial that never opens the test split."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest

from reid_tf import options
from reid_tf import testing
from reid_tf.data import synthetic
from reid_tf.train.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "search.py")
STAND_IN = os.path.join(ROOT, "tests", "search_stand_in.py")
search = testing.load_script(SCRIPT)


def parse_trial(command_flags):
    """The TrainConfig reid-train would build from the recipe plus a trial's flags."""
    config = options.parse(TrainConfig, [f"--flagfile={os.path.join(ROOT, search.RECIPE)}",
                                         *command_flags])
    config.validate()
    return config


@pytest.mark.parametrize("kind", search.STUDIES)
def test_every_point_of_the_space_is_a_valid_validation_only_reid_train_run(kind):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3),
                                direction="maximize")
    seen = {"optimizer": set(), "triplet": set(), "margin0": set(), "normalize": set()}
    for _ in range(60):
        trial = study.ask()
        values = search.suggest(trial, kind)
        config = parse_trial(search.trial_flags(values, steps_per_epoch=62))
        total = config.epochs * 62
        # Validation only: the held-out identities, no test evaluation, no export.
        assert config.validation_identities == 0.2 and not config.final_eval
        assert not config.export and config.also_evaluate_on == ()
        assert config.eval_every == -(-total // 10) and 12 <= config.epochs <= 60
        assert 0 <= config.warmup_steps <= 0.2 * total + 1
        assert config.num_parts == (0 if kind == "baseline" else values["num_parts"])
        assert config.learning_rate == values["learning_rate"]  # the recipe's value overridden
        assert config.random_erasing == values["random_erasing"]
        if config.triplet_weight == 0:
            assert "triplet_margin" not in trial.params
        seen["optimizer"].add(config.optimizer)
        seen["triplet"].add(config.triplet_weight > 0)
        seen["margin0"].add(config.triplet_margin == 0)
        seen["normalize"].add(config.triplet_normalize)
        study.tell(trial, 0.0)
    assert all(len(values) == 2 for values in seen.values()), seen


def test_every_trial_length_reports_the_same_tenths_of_its_schedule():
    for epochs in range(12, 61, 6):
        for steps_per_epoch in (3, 51, 62, 97):
            total = epochs * steps_per_epoch
            every = -(-total // search.EVALUATIONS)
            steps = [search.percent(k * every, total) for k in range(1, 11) if k * every < total]
            assert steps == list(range(10, 10 * len(steps) + 1, 10)), (epochs, steps_per_epoch)
            assert len(steps) >= 8
            assert search.percent(total, total) == 100


def driver(tmp_path, *extra, env=None, **popen):
    command = [sys.executable, SCRIPT, f"--storage=sqlite:///{tmp_path}/study.db",
               f"--runs_dir={tmp_path}/runs", f"--export_dir={tmp_path}/export",
               f"--train_command={sys.executable},{STAND_IN}", "--steps_per_epoch=10",
               "--poll_seconds=0.05", "--startup_trials=3", "--prune_after=3", *extra]
    environment = {**os.environ, **(env or {})}
    if popen:
        return subprocess.Popen(command, env=environment, cwd=ROOT, text=True, **popen)
    result = subprocess.run(command, env=environment, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_study_prunes_records_every_trial_and_resumes_to_more_trials(tmp_path):
    # Learning rates above 10^-1.5 diverge in the stand-in: such trials end pruned, "diverged".
    env = {"DIVERGE_ABOVE": "0.03"}
    driver(tmp_path, "--studies=baseline", "--trials=10", env=env)
    record = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_baseline.json"))
    trials = record["trials"]
    assert record["finished"] == 10 and len(trials) == 10
    states = [t["state"] for t in trials]
    assert states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 3, states
    for t in trials:
        assert t["flags"] and os.path.basename(t["workdir"]) in os.listdir(
            tmp_path / "runs" / "cuhk03_pair1_labeled_baseline")
        curve = json.load(open(os.path.join(t["workdir"], "validation_curve.json"))) \
            if os.path.exists(os.path.join(t["workdir"], "validation_curve.json")) else []
        assert t["validation_curve"] == curve  # the record holds the whole curve
        learning_rate = t["params"][f"{t['params']['optimizer']}_learning_rate"]
        if learning_rate > 0.03:
            assert t["state"] == "PRUNED" and t["outcome"] == "diverged"
        elif t["state"] == "COMPLETE":
            # The objective is the last validation point, reported at 10 %, 20 %, ... before.
            expected = 1 / (1 + abs(np.log10(learning_rate) + 2.5))
            assert t["value"] == pytest.approx(expected) == curve[-1]["mAP"]
            assert list(t["intermediate_values"]) == [str(p) for p in range(10, 100, 10)]
        elif t["outcome"] == "pruned":  # stopped by the pruner, never before 30 %
            assert min(map(int, t["intermediate_values"])) == 10
            assert max(map(int, t["intermediate_values"])) >= 30  # n_warmup_steps
    best = max((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: t["value"])
    assert record["best"]["number"] == best["number"]
    # The copied database is the study: it loads in Optuna and resumes to more trials.
    copy = optuna.load_study(study_name="cuhk03_pair1_labeled_baseline",
                             storage=f"sqlite:///{tmp_path}/export/search.db")
    assert len(copy.trials) == 10
    driver(tmp_path, "--studies=baseline", "--trials=12", env=env)
    record = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_baseline.json"))
    assert record["finished"] == 12 and [t["number"] for t in record["trials"]] == list(range(12))


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_killed_driver_leaves_no_trainer_and_its_trial_resumes_from_its_checkpoint(tmp_path):
    env = {"STAND_IN_SECONDS": "0.5"}
    first = driver(tmp_path, "--studies=plnet", "--trials=1", "--heartbeat_seconds=1",
                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    runs = tmp_path / "runs" / "cuhk03_pair1_labeled_plnet"
    deadline = time.time() + 120
    curve = []
    while time.time() < deadline and len(curve) < 3:
        time.sleep(0.2)
        for path in runs.glob("*/validation_curve.json") if runs.exists() else []:
            curve = json.load(open(path))
    assert len(curve) >= 3, first.stdout.read() if first.poll() is not None else "timeout"
    workdir = path.parent
    first.send_signal(signal.SIGKILL)  # as a stopped session: no handler runs
    first.wait()
    # The trainer died with the driver (PR_SET_PDEATHSIG): its curve stops growing.
    time.sleep(1.5)
    stopped = len(json.load(open(path)))
    time.sleep(1.5)
    assert len(json.load(open(path))) == stopped
    time.sleep(1.0)  # the heartbeat's grace period (2 s) has passed
    result = driver(tmp_path, "--studies=plnet", "--trials=1", "--heartbeat_seconds=1",
                    env={"STAND_IN_SECONDS": "0.01"})
    record = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_plnet.json"))
    states = {t["number"]: t for t in record["trials"]}
    assert states[0]["state"] == "FAIL" and states[1]["state"] == "COMPLETE", result.stdout
    assert states[1]["retry_of"] == 0 and states[1]["params"] == states[0]["params"]
    assert states[1]["workdir"] == states[0]["workdir"] == str(workdir)
    starts = [line for line in open(workdir / "train.log") if line.startswith("started at")]
    assert starts[0] == "started at step 0\n"
    assert int(starts[1].split()[-1]) >= 2 * (states[0]["params"]["epochs"] * 10 // 10)
    # The resumed curve is whole: every tenth once, ending at the schedule's end.
    steps = [point["step"] for point in states[1]["validation_curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == states[1]["params"]["epochs"] * 10


@pytest.mark.slow  # trains, or runs a tool in a process
def test_confirmation_reruns_the_best_configurations_at_more_seeds(tmp_path):
    driver(tmp_path, "--studies=baseline", "--trials=5", "--prune_after=100")
    driver(tmp_path, "--studies=baseline", "--confirm", "--top=2", "--seeds=0,1")
    study = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_baseline.json"))
    record = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_baseline_confirm.json"))
    best = sorted((t for t in study["trials"] if t["state"] == "COMPLETE"),
                  key=lambda t: -t["value"])[:2]
    assert sorted(row["trial"] for row in record["configurations"]) == sorted(
        t["number"] for t in best)
    for row in record["configurations"]:
        trial = next(t for t in best if t["number"] == row["trial"])
        assert row["runs"]["0"]["mAP"] == trial["value"]  # seed 0 is the trial itself
        # Seed 1 ran with the trial's flags and --seed=1 (the stand-in ignores the seed).
        assert row["runs"]["1"]["mAP"] == pytest.approx(trial["value"])
        assert row["mean_mAP"] == pytest.approx(trial["value"])
    assert record["chosen"] == record["configurations"][0]["trial"]
    confirm_runs = os.listdir(tmp_path / "runs" / "cuhk03_pair1_labeled_baseline_confirm")
    assert len(confirm_runs) == 2


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_killed_confirmation_leaves_no_trainer_and_resumes_its_run(tmp_path):
    # The confirmation's runs are hours each: a driver killed by a session's end or a re-pin
    # must take its trainer with it (one left training would train beside the next driver's
    # run of the same workdir), and the next driver resumes the run from its checkpoint.
    driver(tmp_path, "--studies=baseline", "--trials=3", "--prune_after=100")
    first = driver(tmp_path, "--studies=baseline", "--confirm", "--top=1", "--seeds=0,1",
                   env={"STAND_IN_SECONDS": "0.5"}, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT)
    runs = tmp_path / "runs" / "cuhk03_pair1_labeled_baseline_confirm"
    deadline, curve = time.time() + 120, []
    while time.time() < deadline and len(curve) < 3:
        time.sleep(0.2)
        for path in runs.glob("*/validation_curve.json") if runs.exists() else []:
            curve = json.load(open(path))
    assert len(curve) >= 3, first.stdout.read() if first.poll() is not None else "timeout"
    first.send_signal(signal.SIGKILL)  # as a stopped session: no handler runs
    first.wait()
    time.sleep(1.5)
    stopped = len(json.load(open(path)))
    time.sleep(1.5)
    assert len(json.load(open(path))) == stopped  # the trainer died with its driver
    driver(tmp_path, "--studies=baseline", "--confirm", "--top=1", "--seeds=0,1",
           env={"STAND_IN_SECONDS": "0.01"})
    starts = [line for line in open(path.parent / "train.log") if line.startswith("started")]
    assert starts[0] == "started at step 0\n" and int(starts[1].split()[-1]) >= 30
    record = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_baseline_confirm.json"))
    assert sorted(record["configurations"][0]["runs"]) == ["0", "1"]


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_fresh_machine_keeps_the_confirmation_runs_the_committed_record_holds(tmp_path):
    # The confirmation is hours of training per run: each finished run goes into the committed
    # record at once, and a fresh machine (no runs/) takes it from there instead of training
    # it again. A record cut off halfway chooses nothing yet.
    driver(tmp_path, "--studies=baseline", "--trials=3", "--prune_after=100")
    driver(tmp_path, "--studies=baseline", "--confirm", "--top=2", "--seeds=0,1,2")
    path = tmp_path / "export" / "cuhk03_pair1_labeled_baseline_confirm.json"
    whole = json.load(open(path))
    assert whole["complete"] and whole["chosen"] is not None
    # Cut off after the first configuration's seed 1: the record as the driver left it then.
    first = whole["configurations"][0] if whole["configurations"][0]["trial"] == min(
        row["trial"] for row in whole["configurations"]) else whole["configurations"][1]
    partial = dict(whole, complete=False, chosen=None, configurations=[
        {"trial": first["trial"], "flags": first["flags"],
         "runs": {k: v for k, v in first["runs"].items() if k in ("0", "1")}}])
    shutil.rmtree(tmp_path / "runs")
    json.dump(partial, open(path, "w"))
    result = driver(tmp_path, "--studies=baseline", "--confirm", "--top=2", "--seeds=0,1,2")
    trained = [line for line in result.stdout.splitlines()
               if "confirm trial" in line and "from the record" not in line]
    assert len(trained) == 3, trained  # seed 2 of the first, seeds 1 and 2 of the other
    assert f"confirm trial {first['trial']} seed 1: from the record" in result.stdout
    again = json.load(open(path))
    assert again["chosen"] == whole["chosen"] and again["complete"]
    assert again["configurations"] == whole["configurations"]


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_pause_file_holds_the_driver_between_trials(tmp_path):
    # `touch runs/PAUSE` holds the queue between runs (run_cuhk03_pair1.sh); the search driver
    # honours it too, before each trial and each confirmation run, so that a clone can be
    # re-pinned with nothing running (stopping a trial halfway leaves a failed trial behind).
    pause = tmp_path / "PAUSE"
    pause.touch()
    held = driver(tmp_path, "--studies=baseline", "--trials=2", f"--pause_file={pause}",
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    line = held.stdout.readline()
    while line and "paused" not in line:
        line = held.stdout.readline()
    assert f"search: paused ({pause} exists)" in line
    time.sleep(1.0)
    study = optuna.load_study(study_name="cuhk03_pair1_labeled_baseline",
                              storage=f"sqlite:///{tmp_path}/study.db")
    assert study.trials == [] and held.poll() is None  # waiting, nothing started
    pause.unlink()
    assert held.wait(timeout=120) == 0
    study = optuna.load_study(study_name="cuhk03_pair1_labeled_baseline",
                              storage=f"sqlite:///{tmp_path}/study.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


def parse_recipe(path):
    return options.parse(TrainConfig, [f"--flagfile={path}"])


@pytest.mark.slow  # trains, or runs a tool in a process
def test_the_confirmed_winner_is_written_as_a_tuned_recipe_per_box_type(tmp_path):
    recipes = tmp_path / "recipes"
    written = [sys.executable, SCRIPT, f"--storage=sqlite:///{tmp_path}/study.db",
               f"--export_dir={tmp_path}/export", "--steps_per_epoch=10", "--studies=plnet",
               "--write_recipes", f"--recipes_dir={recipes}"]
    driver(tmp_path, "--studies=plnet", "--trials=4", "--prune_after=100")
    missing = subprocess.run(written, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "run --confirm first" in missing.stderr
    driver(tmp_path, "--studies=plnet", "--confirm", "--top=2", "--seeds=0,1")
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.load_study(study_name="cuhk03_pair1_labeled_plnet", storage=storage)
    repeat = study.trials[0]  # a repeated draw, failed at once: no interrupted trial here
    study.add_trial(optuna.create_trial(
        state=optuna.trial.TrialState.FAIL, params=repeat.params,
        distributions=repeat.distributions, user_attrs={"outcome": "duplicate"}))
    subprocess.run(written, cwd=ROOT, check=True, capture_output=True, timeout=300)
    confirmation = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_plnet_confirm.json"))
    study = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_plnet.json"))
    winner = next(t for t in study["trials"] if t["number"] == confirmation["chosen"])
    trial = parse_trial(winner["flags"])
    labeled = parse_recipe(recipes / "cuhk03_pair1_labeled_tuned_plnet.flags")
    detected = parse_recipe(recipes / "cuhk03_pair1_detected_tuned_plnet.flags")
    base = parse_recipe(os.path.join(ROOT, search.RECIPE))
    # The winner's searched values, on every training identity, tested, as the base recipe
    # evaluates and checkpoints; its warm-up the same share of this (stand-in) schedule.
    for name in ("learning_rate", "optimizer", "epochs", "weight_decay", "random_erasing",
                 "label_smoothing", "num_parts", "part_loss_weight", "triplet_weight", "pad",
                 "schedule", "backbone_lr_multiplier", "triplet_normalize"):
        assert getattr(labeled, name) == getattr(trial, name), name
    assert (labeled.validation_identities, labeled.final_eval, labeled.seed) == (0.0, True, 0)
    assert (labeled.eval_every, labeled.checkpoint_every) == (base.eval_every,
                                                              base.checkpoint_every)
    warmup = winner["params"]["warmup_fraction"] * labeled.epochs * 10
    assert labeled.warmup_steps == round(warmup) and trial.warmup_steps == round(warmup)
    assert detected.dataset == base.dataset.replace("labeled", "detected")
    assert dataclasses.replace(detected, dataset=labeled.dataset) == labeled
    text = (recipes / "cuhk03_pair1_labeled_tuned_plnet.flags").read_text()
    names = [line.split("=")[0] for line in text.splitlines() if line.startswith("--")]
    assert len(names) == len(set(names))  # every flag once
    mean = next(row for row in confirmation["configurations"]
                if row["trial"] == confirmation["chosen"])["mean_mAP"]
    assert f"trial {confirmation['chosen']}: {100 * mean:.1f} ± 0.0" in text
    assert "<- chosen: the best mean" in text and "4 finished trials" in text
    header = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    assert "1 a repeat of an earlier draw, stopped at once" in header
    assert "interrupted" not in header
    # `--no<name>` is read as a boolean's negation: no reid-train option is itself named no...
    assert not [f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("no")]


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_real_trial_trains_on_validation_without_a_test_split(tmp_path):
    """reid-train itself, tiny: the data folder has no query or gallery at all, so a trial that
    opened the test split would fail."""
    data = tmp_path / "data"
    synthetic.write_market_folder(synthetic.generate(synthetic.SyntheticConfig(
        num_train_ids=10, num_test_ids=2, images_per_id=6, height=64, width=32)), str(data))
    for folder in ("query", "bounding_box_test"):
        shutil.rmtree(data / folder)
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="cuhk03_pair1_labeled_plnet", storage=storage,
                                direction="maximize")
    study.enqueue_trial({"optimizer": "adam", "adam_learning_rate": 1e-3,
                         "adam_weight_decay": 1e-3, "backbone_lr_multiplier": 0.5,
                         "epochs": 12, "schedule": "cosine", "label_smoothing": 0.1,
                         "random_erasing": 0.5, "pad": 5, "warmup_fraction": 0.1,
                         "triplet": True, "triplet_weight": 0.5, "soft_margin": True,
                         "triplet_normalize": True, "num_parts": 2, "part_loss_weight": 1.0})
    tiny = [f"--dataset=folder:{data}", "--backbone=tiny", "--weights=", "--image_height=64",
            "--image_width=32", "--embedding_dim=16", "--identities_per_batch=4",
            "--images_per_identity=4", "--eval_batch_size=16"]
    result = subprocess.run(
        [sys.executable, SCRIPT, "--studies=plnet", "--trials=1", f"--storage={storage}",
         f"--runs_dir={tmp_path}/runs", f"--export_dir={tmp_path}/export", "--poll_seconds=1",
         f"--extra_flags={','.join(tiny)}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    trial = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_plnet.json"))["trials"][0]
    assert trial["state"] == "COMPLETE", trial
    results = json.load(open(os.path.join(trial["workdir"], "results.json")))
    assert "rank1" not in results and "calibration" not in results  # no test evaluation
    assert 0.0 < trial["value"] <= 1.0 and trial["value"] == results["validation"]["mAP"]
    total = results["step"]  # 12 epochs; a point every tenth of it, and the end
    every = -(-total // 10)
    assert total % 12 == 0 and total >= 36
    assert [p["step"] for p in trial["validation_curve"]] == list(range(every, total, every)) + [
        total]
    assert trial["code"]["commit"]  # the code of the trial is recorded
    config = json.load(open(os.path.join(trial["workdir"], "config.json")))
    assert config["triplet_normalize"] and config["triplet_margin"] == 0.0
    assert config["warmup_steps"] == round(0.1 * total)
    assert not os.path.exists(os.path.join(trial["workdir"], "checkpoints"))  # removed after


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_fresh_checkout_resumes_the_committed_study(tmp_path):
    driver(tmp_path, "--studies=baseline", "--trials=3")
    # A new machine: no runs/ and no working database, only the committed export.
    shutil.rmtree(tmp_path / "runs")
    os.remove(tmp_path / "study.db")
    result = driver(tmp_path, "--studies=baseline", "--trials=4")
    assert "resuming the study committed in" in result.stdout
    record = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_baseline.json"))
    assert [t["number"] for t in record["trials"]] == [0, 1, 2, 3]


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_restarted_driver_draws_new_configurations(tmp_path):
    driver(tmp_path, "--studies=plnet", "--trials=2", "--prune_after=100")
    driver(tmp_path, "--studies=plnet", "--trials=4", "--prune_after=100")
    record = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_plnet.json"))
    assert [t["state"] for t in record["trials"]] == ["COMPLETE"] * 4
    assert len({json.dumps(t["params"], sort_keys=True) for t in record["trials"]}) == 4


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_trial_whose_driver_died_again_and_again_is_retried_not_dropped(tmp_path):
    # Session ends killed one 60-epoch trial four times (the study's trials 14 to 17): a dead
    # driver is never the trial's fault, so its retries have no limit, and a chain that an older
    # driver cut off (its last trial failed by a stale heartbeat, no retry after it) is queued
    # again. A trial whose reid-train failed (outcome "error") stays failed.
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5),
                                  direction="maximize")
    drawn = []
    for _ in range(2):
        trial = scratch.ask()
        search.suggest(trial, "plnet")
        drawn.append(scratch.tell(trial, state=optuna.trial.TrialState.FAIL))
    study = optuna.create_study(study_name="cuhk03_pair1_labeled_plnet", direction="maximize",
                                storage=f"sqlite:///{tmp_path}/study.db")
    for number in range(4):  # trial 0 and its three retries, each left by a dead driver
        retried = {"failed_trial": 0, "retry_history": list(range(number))} if number else {}
        study.add_trial(optuna.create_trial(
            state=optuna.trial.TrialState.FAIL, params=drawn[0].params,
            distributions=drawn[0].distributions, system_attrs=retried,
            user_attrs={"flags": ["--seed=0"]}))
    study.add_trial(optuna.create_trial(  # trial 4: reid-train itself failed
        state=optuna.trial.TrialState.FAIL, params=drawn[1].params,
        distributions=drawn[1].distributions, user_attrs={"outcome": "error"}))
    result = driver(tmp_path, "--studies=plnet", "--trials=1", env={"STAND_IN_SECONDS": "0"})
    record = json.load(open(tmp_path / "export" / "cuhk03_pair1_labeled_plnet.json"))
    trials = record["trials"]
    assert len(trials) == 6 and trials[5]["state"] == "COMPLETE", result.stdout
    assert trials[5]["retry_of"] == 0 and trials[5]["params"] == drawn[0].params
    assert [t["state"] for t in trials[:5]] == ["FAIL"] * 5
    # Retries have no limit: this one's retry history is already four long.
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/study.db")
    frozen = optuna.load_study(study_name=study.study_name, storage=storage).trials[5]
    assert frozen.system_attrs["retry_history"] == [0, 1, 2, 3]
