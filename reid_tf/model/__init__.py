"""Stage 2, the model: backbones -> feature map -> global branch and the part partition -> K part
branches (`PartLossNet`), the descriptors ranked at test time, and the losses.

    from reid_tf.model import PartLossNet

Names load on first use, so `reid_tf.model.descriptors` (numpy helpers too) does not build Keras.
"""

import importlib

_NAMES = {"PartLossNet": "plnet", "OUTPUT_KEYS": "plnet", "DESCRIPTORS": "descriptors",
          "descriptor": "descriptors", "select_descriptor": "descriptors"}
__all__ = sorted(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module 'reid_tf.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"reid_tf.model.{_NAMES[name]}"), name)
