"""The runtime contract: what the one extraction loop (`evaluate.extract`) and the server call,
declared where they can see it without importing upward.

A runtime turns images into a model's outputs. `deploy.runtime` has the in-memory model
(`KerasRuntime`) and the SavedModel (`SavedModelRuntime`), `deploy.formats` the format
files (`OnnxRuntime`, `TFLiteRuntime`, `OpenVinoRuntime`); each has the members of `Runtime`, and its decision
calibration comes in through its constructor.
"""

from typing import Protocol

from reid_tf.model import descriptors

# The outputs of an export (its `serving_default`), and of a format file with parts.
EXPORT_KEYS = ("embedding", "global_embedding", "part_embeddings", "part_masks")
# Outputs taken as they are, not L2-normalised descriptors.
RAW_OUTPUTS = ("part_masks", "part_fallback")


def select(outputs, names):
    """`names` from a model's outputs: descriptors selected and L2-normalised, `RAW_OUTPUTS` as
    they are."""
    return {name: outputs[name] if name in RAW_OUTPUTS
            else descriptors.select_descriptor(outputs, name) for name in names}


class Runtime(Protocol):
    """What every runtime has.

    image_size: the model's `(height, width)` (None for an export older than the attribute).
    num_parts: K (0 for a baseline).
    calibration: the decision calibration it carries (`evaluate.calibration`), or None.
    model_id: the weights' identity (16 hex digits), or None for an in-memory model.
    """

    image_size: tuple
    num_parts: int
    calibration: dict
    model_id: str

    def embed(self, images, names):
        """float32 `[B,h,w,3]` in [0, 255] at `image_size` -> `{name: [B, ...]}` (`select`)."""

    def embed_encoded(self, encoded, names):
        """string `[B]` of JPEG/PNG/BMP/GIF bytes, decoded and resized inside -> as `embed`."""
