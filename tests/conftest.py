"""Fixtures shared by the serving and the page's tests."""

import os

import pytest

from reid_tf import testing
from reid_tf.data import splits as splits_lib

SERVED_TRAIN_FLAGS = [
    "--dataset=synthetic_persons/small", "--backbone=tiny", "--image_height=64",
    "--image_width=32", "--embedding_dim=16", "--num_parts=3", "--identities_per_batch=4",
    "--images_per_identity=4", "--optimizer=adam", "--learning_rate=0.001", "--train_steps=20",
    "--log_every=10", "--checkpoint_every=10", "--image_summary_every=0", "--noexport",
    # Identities held out of training: the run fits its decision thresholds on them, and the
    # export carries them (assets/calibration.json).
    "--validation_identities=0.3"]


def pytest_collection_modifyitems(items):
    """A test that uses the trained run (`trained`, directly or through another fixture) is
    `slow`: the fast lane (make test-fast) leaves it out."""
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny trained run, its reid-export (with a calibration) and a features.npz of the test
    gallery: `{workdir, data_dir, splits, export, gallery_npz}`."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    splits = splits_lib.load_splits("synthetic_persons/small", data_dir=data_dir)
    workdir = str(tmp_path_factory.mktemp("run"))
    testing.run_module("reid_tf.cli.train", f"--workdir={workdir}", f"--data_dir={data_dir}",
                       *SERVED_TRAIN_FLAGS)
    result = testing.run_module("reid_tf.cli.export", f"--workdir={workdir}")
    export = os.path.join(workdir, "export", "20")
    assert f"-> {export}" in result.stdout
    assert os.path.exists(os.path.join(export, "assets", "calibration.json"))
    gallery_npz = os.path.join(workdir, "gallery.npz")
    testing.run_module("reid_tf.cli.extract", f"--export={export}",
                       "--dataset=synthetic_persons/small", f"--data_dir={data_dir}",
                       "--split=gallery", f"--output={gallery_npz}")
    return {"workdir": workdir, "data_dir": data_dir, "splits": splits, "export": export,
            "gallery_npz": gallery_npz}
