"""experiments/RESULTS.md's tables hold the committed records: every line that
experiments/summarize.py prints from experiments/results/ (table rows, paired gains, verdicts,
fits) is in it verbatim, and the search's
trial table (issue 37, written by hand as the trials land) has each trial's figures from
experiments/search/*.json, rounded as printed. A mistyped learning rate or mAP fails here, and
so does a run whose JSON is committed without its row."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STUDIES = {"PL-Net": "cuhk03_pair1_labeled_plnet", "baseline": "cuhk03_pair1_labeled_baseline"}


def table_rows():
    """The trial table's rows under "## Hyper-parameter search" (the table headed `| study |
    trial | outcome |`; the confirmation's table is summarize.py's), as lists of cells."""
    text = open(os.path.join(ROOT, "experiments", "RESULTS.md"), encoding="utf-8").read()
    section = text.split("## Hyper-parameter search", 1)[1].split("\n## ", 1)[0]
    table = section.split("| study | trial | outcome |", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip("|").split("|") for line in table.splitlines()
            if line.startswith(tuple(f"| {study} |" for study in STUDIES))]
    return [[cell.strip() for cell in row] for row in rows]


def records():
    out = {}
    for study, name in STUDIES.items():
        with open(os.path.join(ROOT, "experiments", "search", f"{name}.json")) as f:
            out[study] = {t["number"]: t for t in json.load(f)["trials"]}
    return out


def number(text):
    return float(re.match(r"[-0-9.]+", text).group())


def check_row(row, trial):
    study, label, outcome, optimizer, lr, epochs, erasing, triplet, k_lambda, maps = row
    p, curve = trial["params"], [point["mAP"] for point in trial["validation_curve"]]
    if outcome == "complete":
        assert trial["state"] == "COMPLETE"
    else:
        assert trial["state"] == "PRUNED"
        reached = max(int(step) for step in trial["intermediate_values"])
        assert outcome == f"pruned at {reached} %"
    assert optimizer.lower() == p["optimizer"]
    rate = p[f"{p['optimizer']}_learning_rate"]
    assert number(lr) == float(f"{rate:.2g}"), (lr, rate)
    factor = re.search(r"backbone × ([0-9.]+)", lr)
    if factor:
        assert factor.group(1) == f"{p['backbone_lr_multiplier']:.2f}"
    assert int(epochs) == p["epochs"] and erasing == f"{p['random_erasing']:.2f}"
    if not p["triplet"]:
        assert triplet == "–"
    else:
        margin = "soft margin" if p["soft_margin"] else f"margin {p['triplet_margin']:.2f}"
        expected = f"{p['triplet_weight']:.2f}, {margin}"
        assert triplet == expected + (", normalised" if p["triplet_normalize"] else "")
    parts = ("–, –" if "num_parts" not in p
             else f"{p['num_parts']}, {p['part_loss_weight']:.2f}")
    assert k_lambda == parts
    end, best = re.fullmatch(r"\**([0-9.]+)\** \(([0-9.]+)\)", maps).groups()
    assert end == f"{100 * curve[-1]:.1f}" and best == f"{100 * max(curve):.1f}"


def test_every_trial_in_the_results_table_is_the_committed_records():
    rows, by_study = table_rows(), records()
    assert len(rows) >= 30  # the table was found (34 trials on 2026-12-07)
    shown = set()
    for row in rows:
        assert len(row) == 10, row
        number_ = int(re.match(r"\d+", row[1]).group())
        shown.add((row[0], number_))
        try:
            check_row(row, by_study[row[0]][number_])
        except AssertionError as error:
            pytest.fail(f"RESULTS.md, {row[0]} trial {number_}: {error!r}")
    finished = {(study, n) for study, trials in by_study.items() for n, t in trials.items()
                if t["state"] in ("COMPLETE", "PRUNED") and "duplicate_of" not in t}
    assert shown == finished  # every finished trial is in the table, and only those


def test_every_row_summarize_prints_is_in_results_md_verbatim():
    printed = subprocess.run([sys.executable, os.path.join("experiments", "summarize.py")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    # Every line but the headings: table rows, curves, paired gains, verdicts and fits.
    rows = [line.rstrip() for line in printed.stdout.splitlines()
            if line.strip() and not line.startswith("#")]
    assert len(rows) > 150  # the tables were printed (126 rows, 66 other lines on 2026-12-08)
    assert any(line.startswith("- labeled, (b) PL-Net") for line in rows)  # a paired gain
    text = open(os.path.join(ROOT, "experiments", "RESULTS.md"), encoding="utf-8").read()
    written = {line.rstrip() for line in text.splitlines()}
    missing = [row for row in rows if row not in written]
    assert not missing, "not in RESULTS.md as summarize.py prints it:\n" + "\n".join(missing)
