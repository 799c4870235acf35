"""Suite-wide test set-up: two logical CPU devices, so MirroredStrategy tests run real replicas."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from reid_tf.train import distribute  # noqa: E402

distribute.split_cpu(2)


@pytest.fixture(autouse=True)
def _seed():
    tf.keras.utils.set_random_seed(0)
    np.random.seed(0)


SHARED_DIR_VARIABLE = "REID_TF_SHARED_DIR"


@pytest.fixture
def shared_dir():
    """../shared (real CUHK03 data, weights) from REID_TF_SHARED_DIR; skips only when unset.

    When the variable is set (as .ci/run does) and the folder is missing, the test fails.
    """
    path = os.environ.get(SHARED_DIR_VARIABLE)
    if not path:
        pytest.skip(f"{SHARED_DIR_VARIABLE} is not set")
    assert os.path.isdir(path), f"{SHARED_DIR_VARIABLE}={path}: folder not found"
    return path
