"""experiments/run_cuhk03_pair1.sh's phases on the tuned recipes (issue 37), listed with DRY=1:
which runs, on which recipe, with which flags, each a valid reid-train command."""

import os
import shutil
import subprocess

import pytest

from reid_tf import options
from reid_tf.train.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = "cuhk03_pair1_labeled_mobilenetv2_128x64"
LEARNED = "--part_strategy=learned --part_teacher=stripes --part_induction=1"  # a pick for (i)


@pytest.fixture
def checkout(tmp_path):
    """A copy of the script and the old recipes, with tuned recipes as --write_recipes would
    leave them: PL-Net's with K=6, 36 epochs and a soft-margin triplet loss, the baseline's
    with 18 epochs and none."""
    (tmp_path / "experiments").mkdir()
    shutil.copy(os.path.join(ROOT, "experiments", "run_cuhk03_pair1.sh"), tmp_path / "experiments")
    for data in ("labeled", "detected"):
        old = open(os.path.join(ROOT, "experiments", OLD.replace("labeled", data) + ".flags")).read()
        (tmp_path / "experiments" / f"{OLD.replace('labeled', data)}.flags").write_text(old)
        tuned = {"plnet": "--num_parts=6\n--epochs=36\n--triplet_weight=0.17\n--triplet_margin=0\n",
                 "baseline": "--epochs=18\n--triplet_weight=0.0\n"}
        for study, values in tuned.items():
            (tmp_path / "experiments" / f"cuhk03_pair1_{data}_tuned_{study}.flags").write_text(
                old + values)
    return tmp_path


def phase(checkout, which, **env):
    result = subprocess.run(["bash", str(checkout / "experiments" / "run_cuhk03_pair1.sh"), which],
                            env={**os.environ, "DRY": "1", **env}, capture_output=True, text=True,
                            timeout=60)
    runs = {}
    for line in result.stdout.splitlines():
        name, recipe, extra = line.split("|")
        runs[name] = (recipe, config_of(checkout, recipe, extra))
    return result, runs


def config_of(checkout, recipe, extra):
    """The TrainConfig reid-train builds from the run's recipe and flags."""
    config = options.parse(TrainConfig, [f"--flagfile={checkout}/experiments/{recipe}.flags",
                                         *extra.split()])
    config.validate()
    return config


def test_tuned_phases_stop_before_the_recipes_are_written(checkout):
    (checkout / "experiments" / "cuhk03_pair1_detected_tuned_plnet.flags").unlink()
    for which in ("tuned", "tuned_openset"):
        result, runs = phase(checkout, which, LEARNED=LEARNED)
        assert result.returncode == 2 and not runs
        assert "cuhk03_pair1_detected_tuned_plnet.flags is not written yet" in result.stderr


def test_tuned_rows_a_b_h_i_three_seeds_both_box_types(checkout):
    result, runs = phase(checkout, "tuned")  # row (i) not picked yet: nothing runs
    assert result.returncode == 2 and not runs and "set LEARNED" in result.stderr
    result, runs = phase(checkout, "tuned", LEARNED=LEARNED)
    assert result.returncode == 0, result.stderr
    assert len(runs) == 4 * 3 * 2
    for data in ("labeled", "detected"):
        for seed in (0, 1, 2):
            base_recipe, a = runs[f"cuhk03_pair1_{data}_baseline_tuned_s{seed}"]
            _, b = runs[f"cuhk03_pair1_{data}_plnet_tuned_s{seed}"]
            _, h = runs[f"cuhk03_pair1_{data}_stripes_tuned_s{seed}"]
            recipe, i = runs[f"cuhk03_pair1_{data}_learned_tuned_s{seed}"]
            assert base_recipe == f"cuhk03_pair1_{data}_tuned_baseline"
            assert recipe == f"cuhk03_pair1_{data}_tuned_plnet"
            assert (a.num_parts, a.epochs, a.triplet_weight) == (0, 18, 0.0)
            assert [(c.part_strategy, c.num_parts, c.epochs, c.triplet_weight) for c in (b, h, i)
                    ] == [(s, 6, 36, 0.17) for s in ("bands", "stripes", "learned")]
            assert (i.part_teacher, i.part_induction) == ("stripes", 1.0)
            for config in (a, b, h, i):
                assert config.seed == seed and config.validation_identities == 0
                assert data in config.dataset and config.final_eval
                assert config.also_evaluate_on == (
                    ("folder:../shared/data/cuhk03_pair1_detected",) if data == "labeled" else ())


def test_tuned_health_doubles_the_budget_and_flips_the_triplet_loss(checkout):
    result, runs = phase(checkout, "tuned_health")
    assert result.returncode == 0, result.stderr
    assert len(runs) == 12
    for seed in (0, 1, 2):
        recipe, crossed = runs[f"cuhk03_pair1_labeled_val_tuned_baseline_on_plnet_recipe_s{seed}"]
        assert recipe == "cuhk03_pair1_labeled_tuned_plnet"
        assert (crossed.num_parts, crossed.epochs, crossed.triplet_weight) == (0, 36, 0.17)
        _, doubled = runs[f"cuhk03_pair1_labeled_val_tuned_plnet_x2_s{seed}"]
        _, plnet = runs[f"cuhk03_pair1_labeled_val_tuned_plnet_triplet_flipped_s{seed}"]
        _, base = runs[f"cuhk03_pair1_labeled_val_tuned_baseline_triplet_flipped_s{seed}"]
        assert (doubled.epochs, doubled.num_parts, doubled.triplet_weight) == (72, 6, 0.17)
        assert (plnet.epochs, plnet.triplet_weight) == (36, 0.0)  # the search chose one: off
        assert (base.epochs, base.triplet_weight, base.triplet_margin) == (18, 1.0, 0.3)
        for config in (doubled, plnet, base):
            assert config.validation_identities == 0.2 and config.seed == seed


def test_paper_protocol_scores_the_tuned_rows_or_trains_the_old_ones(checkout):
    _, tuned = phase(checkout, "paper_protocol", RECIPE="tuned")
    _, rows = phase(checkout, "tuned", LEARNED=LEARNED)
    assert sorted(tuned) == sorted(name for name in rows if "labeled_baseline" in name
                                   or "labeled_plnet" in name)
    assert all(tuned[name][0] == rows[name][0] for name in tuned)  # the same runs, reused
    _, old = phase(checkout, "paper_protocol")
    assert sorted(old) == sorted(f"cuhk03_pair1_labeled_{row}_paper_old_s{seed}"
                                 for row in ("baseline", "plnet") for seed in (0, 1, 2))
    assert {recipe for recipe, _ in old.values()} == {OLD}


@pytest.mark.parametrize("recipe", ["old", "tuned"])
def test_paper_identities_trains_rows_a_and_b_on_a_half_a_quarter_and_an_eighth_of_the_identities(
        checkout, recipe):
    _, runs = phase(checkout, "paper_identities", RECIPE=recipe)
    tag = "paper_old" if recipe == "old" else "tuned"
    expected = {f"cuhk03_pair1_labeled_{key}_{tag}_ids{kept}_s{seed}": (key, held_out, seed)
                for key in ("baseline", "plnet")
                for kept, held_out in ((50, 0.5), (25, 0.75), (12, 0.875)) for seed in (0, 1, 2)}
    assert sorted(runs) == sorted(expected)
    for name, (key, held_out, seed) in expected.items():
        recipe_name, config = runs[name]
        assert recipe_name == (OLD if recipe == "old" else f"cuhk03_pair1_labeled_tuned_{key}")
        assert config.validation_identities == held_out
        # A new draw of identities per seed, the same for (a) and (b): their gain is paired.
        assert config.seed == config.validation_seed == seed
        assert config.final_eval
        if key == "plnet":
            assert config.part_strategy == "bands"
            assert config.num_parts == (6 if recipe == "tuned" else 4)
        else:
            assert config.num_parts == 0


def test_round_four_chains_every_phase_in_order_with_row_i_picked(checkout):
    """`round4` is the whole queue a fresh machine restarts with one command: the search, its
    confirmation, the tuned recipes, then every tuned phase; each step skips what finished."""
    result = subprocess.run(["bash", str(checkout / "experiments" / "run_cuhk03_pair1.sh"),
                             "round4"], env={**os.environ, "DRY": "1"}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    steps = [line.split("|") for line in result.stdout.splitlines() if line.startswith("step|")]
    assert [(phase, recipe) for _, phase, recipe, _ in steps] == [
        ("search", ""), ("search_confirm", ""), ("search_recipes", ""), ("tuned_health", ""),
        ("tuned", ""), ("tuned_openset", ""), ("paper_protocol", "tuned"),
        ("paper_identities", "tuned")]
    assert {learned for *_, learned in steps} == {LEARNED}  # row (i)'s pick (RESULTS.md)
    for which, what in (("search", ""), ("search_confirm", " --confirm"),
                        ("search_recipes", " --write_recipes")):  # listed, never started
        listed, runs = phase(checkout, which)
        assert listed.returncode == 0 and not runs
        command = f"search.py --studies=plnet,baseline --trials=20{what}"
        assert listed.stderr.strip().endswith(command)
    # Each tuned step lists its runs (the recipes are there): the same as the phase alone.
    _, rows = phase(checkout, "tuned", LEARNED=LEARNED)
    assert set(rows) <= {line.split("|")[0] for line in result.stdout.splitlines()}


FAKE_TRAIN = """#!/usr/bin/env bash
for a; do [[ $a == --workdir=* ]] && w=${a#*=}; done
mkdir -p "$w/checkpoints" && echo '{}' > "$w/results.json"
"""
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> calls.log
for a; do
  [[ $1 == -m && $a == --output_dir=* ]] && mkdir -p "${a#*=}" && echo '{}' > "${a#*=}/results.json"
  [[ $1 == experiments/summarize.py && $a == --collect=* ]] && mkdir -p experiments/results \\
    && cp "${a#*=}/results.json" "experiments/results/$(basename "${a#*=}").json"
done
exit 0
"""


def test_tuned_rows_a_and_b_get_their_classic_score_as_soon_as_they_are_trained(checkout):
    # The classic protocol (paper_protocol) scores the tuned (a) and (b) from their checkpoints,
    # which a fresh machine no longer has: the tuned phase scores each right after training it.
    for name, text in (("train", FAKE_TRAIN), ("python", FAKE_PYTHON)):
        (checkout / name).write_text(text)
        (checkout / name).chmod(0o755)
    result = subprocess.run(
        ["bash", "experiments/run_cuhk03_pair1.sh", "tuned"], cwd=checkout, capture_output=True,
        text=True, timeout=120, env={**os.environ, "LEARNED": LEARNED, "ONLY": "_s0$",
                                     "TRAIN": str(checkout / "train"),
                                     "PYTHON": str(checkout / "python")})
    assert result.returncode == 0, result.stderr
    trained = sorted(os.listdir(checkout / "experiments" / "results"))
    assert len(trained) == 1 + 8  # classic/ and the 8 seed-0 runs
    scored = sorted(os.listdir(checkout / "experiments" / "results" / "classic"))
    assert scored == ["cuhk03_pair1_labeled_baseline_tuned_s0.json",
                      "cuhk03_pair1_labeled_plnet_tuned_s0.json"]
    # paper_protocol finds them scored: nothing trained or scored again.
    calls = (checkout / "calls.log").read_text()
    result = subprocess.run(
        ["bash", "experiments/run_cuhk03_pair1.sh", "paper_protocol"], cwd=checkout,
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "RECIPE": "tuned", "ONLY": "_s0$", "PYTHON": str(checkout / "python")})
    assert result.returncode == 0 and (checkout / "calls.log").read_text() == calls
    assert result.stdout.count("(classic protocol): done, skipped") == 2
