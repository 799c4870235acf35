"""reid-export on small runs and on places it cannot write (issue 39, point 5): what there is
is used, refusals come in one line before the model loads, and an interrupted export leaves
nothing that the next one does not clean up."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from reid_tf import files
from reid_tf.train import workdir as workdir_lib

pytestmark = pytest.mark.slow  # every test here trains, serves or runs a tool


def export(*flags):
    return subprocess.run([sys.executable, "-m", "reid_tf.cli.export", *flags],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def one_line_error(result):
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("reid-export: error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def test_a_run_smaller_than_calibration_plus_parity_exports_int8_with_what_it_has(trained,
                                                                                 tmp_path):
    # The tiny run trains on 112 images (160, less 30 % validation identities): fewer than the
    # 300 calibration + 64 parity images asked for. Before: the parity set was empty and the
    # SavedModel was called on an empty batch.
    result = export(f"--workdir={trained['workdir']}", f"--export_dir={tmp_path}",
                    "--format=tflite", "--version=1")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "calibrate int8 (asked 300)" in result.stdout
    # Only the export's own lines: no INFO lines of TFDS, SavedModel or the converters.
    chatter = [line for line in (result.stdout + result.stderr).splitlines()
               if (re.match(r"[IW]\d{4} \d\d:", line) and not line.startswith("I0000"))
               or "deprecat" in line.lower()]  # (I0000: TensorFlow's one start-up notice)
    assert not chatter, chatter[:5]
    card = json.load(open(tmp_path / "1" / "model_card.json"))
    parities = {name: entry["parity_with_saved_model"]["images"]
                for name, entry in card["files"].items()}
    assert set(parities) == {"model.tflite", "model_fp16.tflite", "model_int8_dynamic.tflite",
                             "model_int8.tflite"}
    assert len(set(parities.values())) == 1 and 1 <= parities["model.tflite"] <= 64
    calibrated = card["files"]["model_int8.tflite"]["calibration_images"]
    assert calibrated >= 1 and calibrated + parities["model.tflite"] <= 112


def test_split_images_uses_every_image_and_never_the_same_one_twice():
    images = np.arange(1000)
    for available, calibration, parity in ((364, 300, 64), (112, 300, 64), (2, 300, 64),
                                           (10, 0, 64), (70, 10, 64), (1000, 300, 64)):
        used_for_calibration, used_for_parity = workdir_lib.split_images(
            images[:available], calibration, parity, log=lambda line: None)
        assert not set(used_for_calibration) & set(used_for_parity)
        assert 1 <= len(used_for_parity) <= parity and len(used_for_calibration) <= calibration
        assert len(used_for_calibration) + len(used_for_parity) == min(available,
                                                                        calibration + parity)
    with pytest.raises(ValueError, match="too few"):
        workdir_lib.split_images(images[:1], 300, 64)


def test_an_export_folder_that_cannot_be_written_is_refused_before_the_model_loads(trained,
                                                                                  tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = one_line_error(export(f"--workdir={trained['workdir']}",
                                 f"--export_dir={blocker}/models"))
    assert "--export_dir=" in line and "is a file, not a folder" in line


def test_a_disk_without_room_is_refused_in_one_line(tmp_path, monkeypatch):
    files.check_free_space(str(tmp_path / "new" / "dir"), 1, "--export_dir")  # room enough
    monkeypatch.setattr(files.shutil, "disk_usage",
                        lambda path: type("usage", (), {"free": 10 << 20})())
    with pytest.raises(ValueError, match=r"--export_dir=.*10\.0 MiB free.*about 20\.0 MiB"):
        files.check_free_space(str(tmp_path), 20 << 20, "--export_dir")


def test_an_interrupted_exports_leftovers_are_removed_by_the_next_one(trained, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    abandoned = tmp_path / f".tmp-5-{dead.pid}"
    (abandoned / ".converting-x").mkdir(parents=True)
    (abandoned / "saved_model.pb").write_bytes(b"half")
    running = tmp_path / f".tmp-6-{os.getpid()}"  # an export still in progress: kept
    running.mkdir()
    result = export(f"--workdir={trained['workdir']}", f"--export_dir={tmp_path}",
                    "--version=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not abandoned.exists() and running.exists()
    assert "left by an interrupted export" in result.stdout
    assert sorted(os.listdir(tmp_path)) == sorted(["8", running.name])
