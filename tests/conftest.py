"""Test set-up: two logical CPU devices, so MirroredStrategy tests run real replicas on a CPU."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from reid_tf import train_lib  # noqa: E402

train_lib.split_cpu(2)


@pytest.fixture(autouse=True)
def _seed():
    tf.keras.utils.set_random_seed(0)
    np.random.seed(0)
