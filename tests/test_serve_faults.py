"""Damaged inputs to reid-serve (issue 39, point 6): each is refused at start-up in one line,
never with a traceback or with every search answering 500 later."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from reid_tf.deploy import runtime
from reid_tf.evaluate import calibration

pytestmark = pytest.mark.slow  # every test here trains, serves or runs a tool


def serve(*flags):
    return subprocess.run([sys.executable, "-m", "reid_tf.cli.serve", "--port=1", *flags],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def one_line_error(result, *needles):
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("reid-serve: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_a_truncated_export_is_one_line(trained, tmp_path):
    export = tmp_path / "export" / "20"
    shutil.copytree(trained["export"], export)
    data = next((export / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])
    one_line_error(serve(f"--export={export}"), str(export), "cannot be loaded",
                   "reid-export")


def test_a_truncated_gallery_npz_is_one_line(trained, tmp_path):
    npz = tmp_path / "gallery.npz"
    npz.write_bytes(open(trained["gallery_npz"], "rb").read()[:2000])
    one_line_error(serve(f"--export={trained['export']}", f"--gallery={npz}"), str(npz),
                   "not a features .npz")


def fitted(trained):
    """The export's calibration, with a p_same of the right sign (the tiny model's own fit
    may have been refused as inverted)."""
    with open(os.path.join(trained["export"], "assets", "calibration.json")) as f:
        fit = json.load(f)
    fit["p_same"] = {"kind": "logistic", "intercept": 2.0, "coef": -4.0, "prior": 0.5}
    return calibration.check(fit)


DAMAGES = [
    # The served FAR (--far=0.1) fitted for open set but not for verification.
    (lambda c: c.update(verification=[p for p in c["verification"] if p["far"] != 0.1]),
     ["FAR 0.1", "not fitted"]),
    (lambda c: c["open_set"][0].update(threshold="0.3"), ["open_set[0].threshold", "'0.3'"]),
    (lambda c: c["verification"][1].update(far="0.01"), ["verification[1].far"]),
    (lambda c: c["p_same"].update(coef="-3"), ["p_same needs numbers"]),
    (lambda c: c["p_same"].update(coef=abs(c["p_same"]["coef"])), ["p_same is inverted"]),
]


def test_every_damage_is_refused_by_the_calibration_check(trained):
    """The check reid-serve runs at start (`calibration.check`, then each kind's threshold at
    the served FAR), on each damage; the next test runs two of them through reid-serve."""
    for damage, needles in DAMAGES:
        damaged = fitted(trained)
        damage(damaged)
        with pytest.raises(ValueError) as refused:
            calibration.check(damaged)
            for kind in calibration.KINDS:
                calibration.threshold(damaged, kind, 0.1)
        for needle in needles:
            assert needle in str(refused.value), (needle, str(refused.value))


@pytest.mark.parametrize("damage, needles", [DAMAGES[0], DAMAGES[1]])
def test_a_damaged_calibration_is_one_line(trained, tmp_path, damage, needles):
    damaged = fitted(trained)
    damage(damaged)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(damaged))
    one_line_error(serve(f"--export={trained['export']}", f"--calibration={path}", "--far=0.1"),
                   *needles)


def test_a_calibration_of_another_model_is_refused_in_one_line(trained, tmp_path):
    """Issue 39: calibration.json names the model it was fitted for (the export's id, stamped
    at export), and reid-serve refuses it with another model."""
    fit = fitted(trained)
    model = runtime.SavedModelRuntime(trained["export"]).model_id
    assert fit["model_id"] == model
    fit["model_id"] = "0123456789abcdef"
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(fit))
    one_line_error(serve(f"--export={trained['export']}", f"--calibration={path}"),
                   "fitted for model 0123456789abcdef", f"is model {model}",
                   "reid-eval --export=... --calibrate")
