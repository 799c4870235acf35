"""reid-tf: person re-identification with PL-Net (part loss) in TensorFlow/Keras.

Folders follow the path an image takes (WORKSPACE.md has the map): `data/` -> `model/` ->
`evaluate/` -> `deploy/`, with `train/` driving training and `cli/` the console scripts.
`from reid_tf import losses, evaluation, reranking` keep working: they load the modules
that now hold them (`model.losses`, `evaluate.metrics`, `evaluate.reranking`).
"""

import importlib

__version__ = "0.1.0"

_MOVED = {"losses": "reid_tf.model.losses", "evaluation": "reid_tf.evaluate.metrics",
          "reranking": "reid_tf.evaluate.reranking"}


def __getattr__(name):
    if name not in _MOVED:
        raise AttributeError(f"module 'reid_tf' has no attribute {name!r}")
    return importlib.import_module(_MOVED[name])
