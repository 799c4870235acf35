"""Runtimes: what turns images into a model's outputs, for the one extraction path
(`evaluate.extract`). `KerasRuntime` runs an in-memory `PartLossNet`; `SavedModelRuntime` a
SavedModel export loaded with plain TensorFlow (no reid_tf model code); `deploy.formats` has
the runtimes of the format files (ONNX, TFLite, OpenVINO), with the same members. `open_runtime(path)` picks one by the path.

Every runtime has the members of `evaluate.contract.Runtime`; its decision calibration comes in
through its constructor (`open_runtime` reads the one an export carries).
"""

import os

import tensorflow as tf

from reid_tf.deploy import formats
from reid_tf.evaluate import calibration as calibration_lib
from reid_tf.evaluate.contract import select


CALIBRATION_FILE = os.path.join("assets", "calibration.json")


def calibration_of(path):
    """The decision calibration an export carries (`assets/calibration.json` of the version
    folder; for a .onnx/.tflite file, of the folder holding it), or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(folder, CALIBRATION_FILE)
    return calibration_lib.load(file) if os.path.exists(file) else None


class KerasRuntime:
    """An in-memory `PartLossNet` as a runtime (training-time evaluation, reid-eval of a
    workdir). One `tf.function` per set of names: model and descriptor selection in one graph."""

    extra_outputs = ("part_fallback",)  # beyond the export's outputs

    model_id = None  # weights in memory, not an export

    def __init__(self, model, calibration=None):
        self.model = model
        self.image_size = tuple(model.image_size)
        self.num_parts = model.num_parts
        self.calibration = calibration
        self._functions = {}

    def embed(self, images, names):
        names = tuple(names)
        if names not in self._functions:
            self._functions[names] = tf.function(
                lambda batch: select(self.model(batch, training=False), names))
        return self._functions[names](images)

    def embed_encoded(self, encoded, names):
        decoded = tf.map_fn(self.model.decode, encoded,
                            fn_output_signature=tf.TensorSpec([*self.image_size, 3], tf.float32))
        return self.embed(decoded, names)


def model_id(path):
    """The identity of an export's weights: TensorFlow's fingerprint checkpoint hash as 16 hex
    digits (the same for every export of one checkpoint), or None for an export without
    fingerprint.pb."""
    if not os.path.exists(os.path.join(path, "fingerprint.pb")):
        return None
    return f"{tf.saved_model.experimental.read_fingerprint(path).checkpoint_hash:016x}"


class SavedModelRuntime:
    """A SavedModel export loaded with plain `tf.saved_model.load` (no reid_tf model code).

    `embed`/`embed_encoded` serve the extraction path (`serving_default` takes uint8, so
    decoded float images are rounded first); `predict_images(uint8 [N,H,W,3])` and
    `predict_encoded(list of JPEG/PNG bytes)` return every output of the signature as numpy
    arrays (reid-serve).
    """

    def __init__(self, path, calibration=None):
        self.calibration = calibration
        path = os.path.normpath(os.path.expanduser(path))
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise FileNotFoundError(f"{path}: no saved_model.pb; expected a SavedModel export "
                                    "folder, <export_dir>/<version> as reid-train writes it.")
        self.path = path
        self.version = int(os.path.basename(path)) if os.path.basename(path).isdigit() else 1
        try:
            self.module = tf.saved_model.load(path)
        except Exception as error:  # noqa: BLE001 - truncated variables.data: IndexError, OpError
            reason = str(getattr(error, "message", error)).strip().splitlines()
            raise ValueError(f"{path}: the SavedModel cannot be loaded ("
                             f"{reason[0] if reason else type(error).__name__}); is it damaged? "
                             "Export it again (reid-export).") from None
        self.signatures = dict(self.module.signatures)
        missing = {"serving_default", "serve_encoded"} - set(self.signatures)
        if missing:
            raise ValueError(f"{path}: signatures {sorted(missing)} missing; not a reid-tf export.")
        # The size the model was trained at (None for exports older than this attribute).
        size = getattr(self.module, "image_size_variable", None)
        self.image_size = tuple(int(v) for v in size.numpy()) if size is not None else None

        self.num_parts = int(
            self.signatures["serving_default"].structured_outputs["part_embeddings"].shape[1])
        self.model_id = model_id(path)

    @property
    def embedding_width(self):
        return self.signatures["serving_default"].structured_outputs["embedding"].shape[-1]

    def embed(self, images, names):
        outputs = self.signatures["serving_default"](images=tf.cast(tf.round(images), tf.uint8))
        return select(outputs, names)

    def embed_encoded(self, encoded, names):
        return select(self.signatures["serve_encoded"](images=encoded), names)

    def predict_images(self, images):
        outputs = self.signatures["serving_default"](images=images)
        return {key: value.numpy() for key, value in outputs.items()}

    def predict_encoded(self, images):
        outputs = self.signatures["serve_encoded"](images=tf.constant(images, tf.string))
        return {key: value.numpy() for key, value in outputs.items()}

    def signature_def(self):
        """TF Serving's `signature_def` JSON of GET /v1/models/<name>/metadata."""
        def tensor_info(spec, name):
            dims = [{"size": str(-1 if size is None else size)} for size in spec.shape]
            return {"dtype": "DT_" + spec.dtype.name.upper(), "tensor_shape": {"dim": dims},
                    "name": name}

        signature_def = {}
        for key, function in self.signatures.items():
            inputs = function.structured_input_signature[1]
            outputs = function.structured_outputs
            signature_def[key] = {
                "inputs": {name: tensor_info(spec, f"{key}_{name}:0")
                           for name, spec in inputs.items()},
                "outputs": {name: tensor_info(tensor, f"StatefulPartitionedCall:{index}")
                            for index, (name, tensor) in enumerate(sorted(outputs.items()))},
                "method_name": "tensorflow/serving/predict",
            }
        return {"signature_def": {"signature_def": signature_def}}


def open_runtime(path):
    """The runtime of an export: a SavedModel folder, a `.onnx` or a `.tflite` file.

    Its `calibration` is the decision calibration the export carries (None without one).
    Raises FileNotFoundError (nothing there), ValueError (a file of another kind) or
    `formats.MissingPackage` (the format's runtime is not installed), each with one line."""
    path = os.path.normpath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; expected a SavedModel export folder, a "
                                ".onnx or a .tflite file.")
    if os.path.isdir(path):
        return SavedModelRuntime(path, calibration_of(path))
    if formats.of_path(path) is not None:
        return formats.open_file(path, calibration_of(path))
    raise ValueError(f"{path}: not an export reid-tf reads; expected a SavedModel export "
                     "folder (<export_dir>/<version>) or a format file (a name ending "
                     f"{', '.join(formats.suffixes())}).")


def enable_memory_growth():
    """GPU memory on demand (TensorFlow otherwise takes nearly all of it at start), so a server
    or an extraction can share the GPU. Call before TensorFlow touches a GPU; no GPU: no-op."""
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
