"""What every format file shares: the one function both converters read (`pixel_function`,
frozen by `frozen_module`), and `PixelRuntime`, the runtime members over a function of uint8
pixels that each format's reader fills in with its `_run`.

Every format file takes what the SavedModel's `serving_default` takes: uint8 RGB `[N,H,W,3]`,
any N, any H and W. The preprocessing is inside: the cast to float, the model's own bilinear
resize to the training size, in float (`data.preprocessing`; the identity at the training size),
and the backbone's ImageNet normalisation, its first layer (`model.backbones.ImageNormalization`).
The training size is in the file (each format's metadata). Files of earlier versions took the
training size only; their runtimes still resize outside (and round to uint8) for them. The
outputs are those of the SavedModel (`evaluate.contract.EXPORT_KEYS`, float32): `embedding`
L2-normalised, `global_embedding`, `part_embeddings` and `part_masks`.

Why TensorFlow's converters rather than Keras 3's `Model.export(format=...)`: Keras' LiteRT path
keeps the weights as resource variables, which TF 2.21's converter leaves uninitialised (the
file runs and answers NaN), and its ONNX path is tf2onnx with fewer of its options. Here the
function's variables are frozen to constants by TensorFlow's own
`convert_variables_to_constants_v2`, and each converter reads the frozen function.
"""

import json
import os

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import convert_to_constants

from reid_tf.data import preprocessing
from reid_tf.deploy.formats import spec
from reid_tf.evaluate.contract import EXPORT_KEYS
from reid_tf.evaluate.contract import select


def format_outputs(model):
    """The outputs of a format file: the export's four, or for a baseline (K=0) `embedding`
    and `global_embedding` (TFLite cannot return the empty part outputs)."""
    return EXPORT_KEYS if model.num_parts else ("embedding", "global_embedding")


def pixel_function(model):
    """`images` uint8 `[None,None,None,3]` -> `format_outputs(model)` (float32), resized
    inside to the training size as the SavedModel resizes (`PartLossNet.preprocess`)."""
    keys = format_outputs(model)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                name="images")])
    def pixels(images):
        outputs = {key: tf.cast(value, tf.float32) for key, value in
                   model(model.preprocess(images), training=False).items()}
        # The concatenation's width is static: a reshape says so in every format (TFLite has no
        # EnsureShape, and without it records the width as -1).
        outputs["embedding"] = tf.reshape(
            outputs["embedding"], [-1, (model.num_parts + 1) * model.embedding_dim])
        # Named identities: the outputs of the ONNX graph carry these names.
        return {key: tf.identity(outputs[key], name=key) for key in keys}

    return pixels


def frozen_module(model, function=None):
    """A `tf.Module` whose `pixels` signature is `function` (default `pixel_function(model)`)
    with its variables as constants (what the converters need)."""
    function = function or pixel_function(model)
    concrete = function.get_concrete_function()
    constants = convert_to_constants.convert_variables_to_constants_v2(concrete)
    module = tf.Module()
    module.pixels = tf.function(
        lambda images: tf.nest.pack_sequence_as(concrete.structured_outputs, constants(images)),
        input_signature=function.input_signature)
    return module


class PixelRuntime:
    """The members of `runtime.SavedModelRuntime` over a function of uint8 pixels (`_run`).

    A file resizes inside (`image_size` given: the training size it records), so it takes uint8
    images of any size as the SavedModel's `serving_default` does, and encoded images are
    decoded to uint8 and run one size at a time. A file of an earlier version (a fixed input
    size, `image_size` None) gets images resized outside with the model's own resize and
    rounded to uint8. `companions`: suffixes of the files beside it that belong to it (its
    digest covers them).
    """

    def __init__(self, path, input_shape, output_shapes, image_size=None, calibration=None,
                 companions=()):
        self.calibration = calibration
        self.path = path
        self.file = os.path.basename(path)
        # The version is the export folder's (`<export_dir>/<version>/model.onnx`), as the
        # SavedModel beside it reports.
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        self.version = int(folder) if folder.isdigit() else 1
        _, height, width, channels = input_shape
        fixed = isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
        if channels != 3 or not (fixed or image_size):
            raise ValueError(f"{path}: input shape {input_shape} and no training size recorded "
                             "(not a reid-tf export?).")
        self.resizes_inside = not fixed
        missing = {"embedding", "global_embedding"} - set(output_shapes)
        if "part_embeddings" in output_shapes:
            missing |= set(EXPORT_KEYS) - set(output_shapes)
        if missing:
            raise ValueError(f"{path}: outputs {sorted(missing)} missing; not a reid-tf export.")
        self.image_size = tuple(int(size) for size in (image_size or (height, width)))
        self.output_shapes = output_shapes
        dim = int(output_shapes["global_embedding"][-1])
        self.num_parts = (int(output_shapes["part_embeddings"][1])
                          if "part_embeddings" in output_shapes else 0)
        self.embedding_width = (self.num_parts + 1) * dim
        self.model_id = _model_id(path, spec.with_companions(path, companions))

    def _run(self, images):
        """uint8 `[N,H,W,3]` at `image_size` -> `{key: np.ndarray}`."""
        raise NotImplementedError

    def _pixels(self, images):
        images = tf.convert_to_tensor(images)
        if images.shape.rank != 4 or images.shape[-1] != 3:
            raise ValueError(f"images of shape {list(images.shape)}: expected [N,H,W,3] RGB.")
        if self.resizes_inside:
            if images.dtype != tf.uint8:  # as the SavedModel's uint8 signature is fed
                images = _rounded(images)
        elif tuple(images.shape[1:3]) != self.image_size or images.dtype != tf.uint8:
            images = _rounded(preprocessing.preprocess(images, self.image_size))
        return images.numpy()

    def predict_images(self, images):
        if len(images) == 0:
            return {key: np.zeros([0, *shape[1:]], np.float32)
                    for key, shape in self.output_shapes.items()}
        return self._run(self._pixels(images))

    def predict_encoded(self, images):
        if self.resizes_inside:
            return self._predict_each_size(
                [preprocessing.decode_upright(data).numpy() for data in images])
        decoded = tf.map_fn(lambda data: preprocessing.decode(data, self.image_size),
                            tf.constant(images, tf.string),
                            fn_output_signature=tf.TensorSpec([*self.image_size, 3], tf.float32))
        return self.predict_images(decoded)

    def _predict_each_size(self, images):
        """Decoded uint8 images of several sizes: one call per size, outputs in their order."""
        if not images:
            return self.predict_images(np.zeros([0, *self.image_size, 3], np.uint8))
        sizes = {}
        for index, image in enumerate(images):
            sizes.setdefault(image.shape, []).append(index)
        outputs = {}
        for indices in sizes.values():
            for key, value in self.predict_images(np.stack([images[i] for i in indices])).items():
                outputs.setdefault(key, np.zeros([len(images), *value.shape[1:]], value.dtype))
                outputs[key][indices] = value
        return outputs

    def embed(self, images, names):
        return select(self.predict_images(images), names)

    def embed_encoded(self, encoded, names):
        return select(self.predict_encoded(encoded.numpy().tolist()), names)

    def signature_def(self):
        """TF Serving's metadata JSON, as for a SavedModel (one signature, its shapes)."""
        def tensor_info(shape, name, dtype):
            dims = [{"size": str(-1 if not size else size)} for size in shape]
            return {"dtype": dtype, "tensor_shape": {"dim": dims}, "name": name}

        size = [None, None] if self.resizes_inside else list(self.image_size)
        inputs = {"images": tensor_info([None, *size, 3], "images", "DT_UINT8")}
        outputs = {key: tensor_info([None, *shape[1:]], key, "DT_FLOAT")
                   for key, shape in sorted(self.output_shapes.items())}
        return {"signature_def": {"signature_def": {"serving_default": {
            "inputs": inputs, "outputs": outputs, "method_name": "tensorflow/serving/predict"}}}}


def _model_id(path, paths):
    """The SavedModel's id when the model card beside the file lists the file with this
    digest (its parity with the SavedModel proven at export), else the file's own digest."""
    digest = spec.digest(paths)
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "model_card.json")) as f:
            card = json.load(f)
        listed = card["files"][os.path.basename(path)]["sha256"]
        if listed == digest and isinstance(card.get("model_id"), str):
            return card["model_id"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return digest[:16]


def _rounded(images):
    return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
