"""SavedModel export in TF Serving layout: `<export_dir>/<version>/`.

Signatures:
- `serving_default`: `images` uint8 `[N,H,W,3]`, any H and W (resized inside);
- `serve_encoded`: `images` tf.string `[N]` of JPEG/PNG bytes.
Both return `embedding [N,(K+1)·D]` (L2-normalised), `global_embedding [N,D]`,
`part_embeddings [N,K,D]`, `part_masks [N,h,w,K]`, with the preprocessing of evaluation
(`input_pipeline.preprocess`). The export loads with plain `tf.saved_model.load`; it needs no
reid_tf code.
"""

import os
import shutil
import time

import tensorflow as tf

from reid_tf import input_pipeline

EXPORT_KEYS = ("embedding", "global_embedding", "part_embeddings", "part_masks")


class ServingModule(tf.Module):
    """Wraps a `PartLossNet` with the serving signatures."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.image_size = tuple(model.image_size)

    def _embed(self, images):
        outputs = self.model(images, training=False)
        return {key: tf.cast(outputs[key], tf.float32) for key in EXPORT_KEYS}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        return self._embed(input_pipeline.preprocess(images, self.image_size))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_encoded(self, images):
        decoded = tf.map_fn(lambda data: input_pipeline.decode(data, self.image_size), images,
                            fn_output_signature=tf.TensorSpec([*self.image_size, 3], tf.float32))
        return self._embed(decoded)


def export_model(model, export_dir, version=None):
    """Writes `<export_dir>/<version>/` atomically and returns its path.

    The SavedModel is written under a temporary name in `export_dir` and renamed when complete,
    so a half-written export never appears under a version number. `version` defaults to the
    current Unix time (TF Serving serves the largest).
    """
    version = int(version if version is not None else time.time())
    final = os.path.join(export_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"{final}: an export with this version already exists.")
    os.makedirs(export_dir, exist_ok=True)
    temporary = os.path.join(export_dir, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    module = ServingModule(model)
    tf.saved_model.save(module, temporary, signatures={
        "serving_default": module.serve, "serve_encoded": module.serve_encoded})
    os.replace(temporary, final)
    return final
