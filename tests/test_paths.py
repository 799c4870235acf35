"""Every path a user has (issue 39): data, workdirs and outputs under names outside ASCII work
in every tool, and `~` is expanded in --export_dir as in the other path flags."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from reid_tf.data import pipeline
from reid_tf.data import splits as splits_lib
from reid_tf.data import synthetic

pytestmark = pytest.mark.slow  # every test here trains, serves or runs a tool

TINY = ["--backbone=tiny", "--image_height=64", "--image_width=32", "--embedding_dim=16",
        "--num_parts=2", "--identities_per_batch=4", "--images_per_identity=4",
        "--optimizer=adam", "--learning_rate=0.001", "--log_every=2", "--checkpoint_every=2",
        "--image_summary_every=0", "--train_steps=2", "--eval_batch_size=8"]


@pytest.fixture(scope="module")
def unicode_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths") / "dätä ü" / "市場"
    synthetic.write_market_folder(synthetic.generate(synthetic.SyntheticConfig(
        num_train_ids=6, num_test_ids=3, images_per_id=4, height=64, width=32)), str(root))
    return root


def run(module, *flags, env=None):
    result = subprocess.run([sys.executable, "-m", module, *flags], capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def test_a_split_under_a_unicode_folder_reads_and_decodes(unicode_data):
    splits = splits_lib.load_splits(f"folder:{unicode_data}")
    images = next(iter(pipeline.eval_dataset(splits["query"], (64, 32), 4)))["image"]
    assert images.shape == (4, 64, 32, 3) and float(np.asarray(images).std()) > 1.0


def test_train_eval_extract_and_export_under_unicode_names_and_a_tilde(unicode_data, tmp_path):
    workdir = tmp_path / "rün ö"
    run("reid_tf.cli.train", f"--workdir={workdir}", f"--dataset=folder:{unicode_data}", *TINY)
    results = json.load(open(workdir / "results.json"))
    assert results["step"] == 2 and 0.0 <= results["mAP"] <= 1.0
    export = results["export"]
    assert os.path.isdir(export)
    evaluated = run("reid_tf.cli.eval", f"--workdir={workdir}",
                    f"--dataset=folder:{unicode_data}", f"--output_dir={tmp_path / 'évals'}")
    assert "rank-1" in evaluated.stdout
    with open(tmp_path / "évals" / "results.json") as f:
        assert json.load(f)["mAP"] == pytest.approx(results["mAP"], abs=1e-6)
    output = tmp_path / "fëatures ü.npz"
    run("reid_tf.cli.extract", f"--export={export}", f"--images={unicode_data}",
        "--split=query", f"--output={output}")
    with np.load(output, allow_pickle=False) as features:
        query = splits_lib.load_splits(f"folder:{unicode_data}")["query"]
        assert sorted(features["file_names"]) == sorted(query.file_names)
    # ~ in --export_dir is the user's home, as in --workdir and --output.
    home = tmp_path / "hömé"
    home.mkdir()
    run("reid_tf.cli.export", f"--workdir={workdir}", "--export_dir=~/models", "--version=7",
        env={"HOME": str(home)})
    assert os.path.isfile(home / "models" / "7" / "saved_model.pb")
    assert not os.path.exists(os.path.join(os.getcwd(), "~"))


def test_gif_and_webp_files_are_read_like_the_server_reads_them(tmp_path):
    from PIL import Image

    image = (np.random.default_rng(0).uniform(0, 255, size=(64, 32, 3))).astype(np.uint8)
    for name, kind in (("0001_c1s1_000001_00.gif", "GIF"), ("0001_c2s1_000002_00.webp", "WEBP"),
                       ("0002_c1s1_000003_00.png", "PNG")):
        Image.fromarray(image).save(tmp_path / name, kind, **({"lossless": True}
                                                              if kind == "WEBP" else {}))
    split = splits_lib.load_split(images=str(tmp_path))
    assert sorted(split.file_names) == ["0001_c1s1_000001_00.gif", "0001_c2s1_000002_00.webp",
                                        "0002_c1s1_000003_00.png"]
    batch = next(iter(pipeline.eval_dataset(split, (64, 32), 3)))["image"].numpy()
    png = batch[list(split.file_names).index("0002_c1s1_000003_00.png")]
    webp = batch[list(split.file_names).index("0001_c2s1_000002_00.webp")]
    np.testing.assert_allclose(webp, png)  # lossless: the same pixels
