"""SavedModel export in TF Serving layout: `<export_dir>/<version>/`.

Signatures:
- `serving_default`: `images` uint8 `[N,H,W,3]`, any H and W (resized inside);
- `serve_encoded`: `images` tf.string `[N]` of JPEG/PNG bytes.
Both return `embedding [N,(K+1)·D]` (L2-normalised), `global_embedding [N,D]`,
`part_embeddings [N,K,D]`, `part_masks [N,h,w,K]`, with the model's own preprocessing
(`PartLossNet.preprocess`/`decode`, the resize of evaluation). The export loads with plain
`tf.saved_model.load`; it needs no reid_tf code. It computes in the model's dtype policy: the
exports reid-train and reid-export write are of a float32 model, whatever training used.
"""

import os
import shutil
import time

import tensorflow as tf

EXPORT_KEYS = ("embedding", "global_embedding", "part_embeddings", "part_masks")


class ServingModule(tf.Module):
    """Wraps a `PartLossNet` with the serving signatures."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.image_size = tuple(model.image_size)
        # Saved with the model, so a loader knows the training size:
        # `tf.saved_model.load(path).image_size_variable` -> [height, width].
        self.image_size_variable = tf.Variable(self.image_size, trainable=False, dtype=tf.int32,
                                               name="image_size")

    def _embed(self, images):
        outputs = {key: tf.cast(value, tf.float32)
                   for key, value in self.model(images, training=False).items()
                   if key in EXPORT_KEYS}
        # The concatenation's width is static: say so in the signature (saved_model_cli, TF
        # Serving metadata) rather than -1.
        _, parts, dim = outputs["part_embeddings"].shape
        outputs["embedding"] = tf.ensure_shape(
            outputs["embedding"], [None, outputs["global_embedding"].shape[-1] + parts * dim])
        return outputs

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        return self._embed(self.model.preprocess(images))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_encoded(self, images):
        decoded = tf.map_fn(self.model.decode, images,
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
