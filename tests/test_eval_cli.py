"""reid-eval on a tiny trained workdir (subprocesses)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from reid_tf import input_pipeline

TRAIN_FLAGS = ["--dataset=synthetic_persons/small", "--backbone=tiny", "--image_height=64",
               "--image_width=32", "--embedding_dim=16", "--num_parts=3", "--identities_per_batch=4", "--images_per_identity=4",
               "--optimizer=adam", "--learning_rate=0.001", "--train_steps=20",
               "--log_every=10", "--checkpoint_every=10", "--image_summary_every=0"]


def run(module, *flags, check=True):
    result = subprocess.run([sys.executable, "-m", module, *flags], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.load_splits("synthetic_persons/small", data_dir=data_dir)
    workdir = str(tmp_path_factory.mktemp("run"))
    run("reid_tf.train", f"--workdir={workdir}", f"--data_dir={data_dir}", *TRAIN_FLAGS)
    return workdir, data_dir


def test_reid_eval_reproduces_the_training_evaluation(trained):
    workdir, data_dir = trained
    logged = json.load(open(os.path.join(workdir, "results.json")))
    result = run("reid_tf.eval", f"--workdir={workdir}", f"--data_dir={data_dir}",
                 "--plot_ranked=3")
    assert "| rank-1 | rank-5 | rank-10 | rank-20 | mAP | mINP |" in result.stdout
    evaluated = json.load(open(os.path.join(workdir, "eval", "results.json")))
    assert evaluated["rank1"] == pytest.approx(logged["rank1"], abs=1e-9)
    assert evaluated["mAP"] == pytest.approx(logged["mAP"], abs=1e-6)
    pictures = sorted(os.listdir(os.path.join(workdir, "eval", "ranked")))
    assert len(pictures) == 3
    picture = np.asarray(Image.open(os.path.join(workdir, "eval", "ranked", pictures[0])))
    corner = picture[1, 76 + 6 + 1]  # border of the first gallery image (after the query cell)
    assert tuple(corner) in {(40, 170, 60), (210, 40, 40)}
    assert os.listdir(os.path.join(workdir, "eval", "tensorboard"))


@pytest.mark.parametrize("descriptor", ["global_embedding", "part_embeddings"])
def test_reid_eval_descriptor_reproduces_the_training_row(trained, tmp_path, descriptor):
    workdir, data_dir = trained
    logged = json.load(open(os.path.join(workdir, "results.json")))["descriptors"]
    result = run("reid_tf.eval", f"--workdir={workdir}", f"--data_dir={data_dir}",
                 f"--descriptor={descriptor}", f"--output_dir={tmp_path}")
    evaluated = json.load(open(os.path.join(tmp_path, "results.json")))
    assert evaluated["descriptor"] == descriptor and f"descriptor={descriptor}" in result.stdout
    assert evaluated["mAP"] == pytest.approx(logged[descriptor]["mAP"], abs=1e-6)
    assert evaluated["rank1"] == pytest.approx(logged[descriptor]["rank1"], abs=1e-9)
    # A different descriptor ranks differently: the flag is not ignored.
    assert evaluated["mAP"] != pytest.approx(logged["embedding"]["mAP"], abs=1e-9)


def test_reid_eval_on_the_export_with_flip_and_rerank(trained, tmp_path):
    workdir, data_dir = trained
    export = os.path.join(workdir, "export", "20")
    result = run("reid_tf.eval", f"--export={export}", "--dataset=synthetic_persons/small",
                 f"--data_dir={data_dir}", "--image_height=64", "--image_width=32", "--flip",
                 "--rerank", f"--output_dir={tmp_path}")
    evaluated = json.load(open(os.path.join(tmp_path, "results.json")))
    assert evaluated["flip"] and evaluated["rerank"] and 0 < evaluated["mAP"] <= 1
    assert "rerank=True" in result.stdout


def test_reid_eval_bad_input_is_one_line(tmp_path):
    result = run("reid_tf.eval", f"--workdir={tmp_path}", check=False)
    assert result.returncode == 1
    assert "reid-eval: error:" in result.stderr and "model.json: not found" in result.stderr
    result = run("reid_tf.eval", f"--workdir={tmp_path}", f"--export={tmp_path}", check=False)
    assert "give exactly one of --workdir or --export" in result.stderr
