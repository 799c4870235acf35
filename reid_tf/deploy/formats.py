"""Deploy formats beside the SavedModel: TFLite/LiteRT (float32, float16, dynamic-range int8,
full-integer int8) and ONNX, written by the converters made for them (TensorFlow's TFLite
converter, tf2onnx) from one function, and the runtimes that read them back.

Every format file takes what the SavedModel's `serving_default` takes: uint8 RGB `[N,H,W,3]`,
any N, any H and W. The preprocessing is inside: the cast to float, the model's own bilinear
resize to the training size, in float (`data.preprocessing`; the identity at the training size),
and the backbone's ImageNet normalisation, its first layer (`model.backbones.ImageNormalization`).
The training size is in the file: ONNX metadata `IMAGE_SIZE_KEY`, the size of the TFLite
resize. Files of earlier versions took the training size only; their runtimes still resize
outside (and round to uint8) for them. The outputs are those
of the SavedModel (`evaluate.contract.EXPORT_KEYS`, float32): `embedding` L2-normalised, `global_embedding`,
`part_embeddings` and `part_masks`.

Why these converters rather than Keras 3's `Model.export(format=...)`: Keras' LiteRT path keeps
the weights as resource variables, which TF 2.21's converter leaves uninitialised (the file runs
and answers NaN), and its ONNX path is tf2onnx with fewer of its options. Here the function's
variables are frozen to constants by TensorFlow's own `convert_variables_to_constants_v2`, and
both converters read the frozen function with the named signature `serving_default`.

The runtimes (`OnnxRuntime`, `TFLiteRuntime`) give the members of `runtime.SavedModelRuntime`,
so reid-extract, reid-eval and reid-serve read any format through the one extraction path. Their
packages are optional extras: `pip install 'reid-tf[onnx]'`, `'reid-tf[tflite]'`.
"""

import hashlib
import json
import logging
import os
import tempfile
import threading

import numpy as np
import tensorflow as tf

from reid_tf.data import preprocessing
from reid_tf.evaluate.contract import EXPORT_KEYS
from reid_tf.evaluate.contract import select
from reid_tf.extras import require

# file name -> (format, quantization)
FILES = {
    "model.tflite": ("tflite", "float32"),
    "model_fp16.tflite": ("tflite", "float16"),
    "model_int8_dynamic.tflite": ("tflite", "dynamic_int8"),
    "model_int8.tflite": ("tflite", "int8"),
    "model.onnx": ("onnx", "float32"),
    "model.xml": ("openvino", "float32"),  # OpenVINO IR: model.xml + model.bin
}
FORMATS = ("saved_model", "tflite", "onnx", "openvino")
ONNX_OPSET = 17
IMAGE_SIZE_KEY = "reid_tf.image_size"  # ONNX metadata: the training size, "<height>x<width>"
# What writing a format needs: its converter and the runtime that checks its parity.
NEEDS = {"onnx": ("tf2onnx", "onnxruntime"), "tflite": ("ai_edge_litert",),
         "openvino": ("openvino",)}
IMAGE_SIZE_PATH = ["reid_tf", "image_size"]  # OpenVINO rt_info: the training size


def format_outputs(model):
    """The outputs of a format file (.tflite, .onnx): the export's four, or for a baseline (K=0)
    `embedding` and `global_embedding` (TFLite cannot return the empty part outputs)."""
    return EXPORT_KEYS if model.num_parts else ("embedding", "global_embedding")


def files_of(formats):
    """The format files that `formats` (names from `FORMATS`) write, in `FILES` order.
    ValueError for an unknown format, `MissingPackage` when its packages are not installed."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"--format: {', '.join(sorted(unknown))} unknown; expected some of "
                         f"{', '.join(FORMATS)}.")
    for kind in formats:
        for module in NEEDS.get(kind, ()):
            require(module)
    return [name for name, (kind, _) in FILES.items() if kind in formats]


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
    with its variables as constants (what both converters need)."""
    from tensorflow.python.framework import convert_to_constants

    function = function or pixel_function(model)
    concrete = function.get_concrete_function()
    constants = convert_to_constants.convert_variables_to_constants_v2(concrete)
    module = tf.Module()
    module.pixels = tf.function(
        lambda images: tf.nest.pack_sequence_as(concrete.structured_outputs, constants(images)),
        input_signature=function.input_signature)
    return module


def write_onnx(model, path):
    """The model as ONNX (opset `ONNX_OPSET`), through tf2onnx; returns `path`."""
    tf2onnx = require("tf2onnx")
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its passes log hundreds of lines
    onnx = require("onnx")
    module = frozen_module(model)
    proto, _ = tf2onnx.convert.from_function(
        module.pixels, input_signature=module.pixels.input_signature, opset=ONNX_OPSET)
    height, width = model.image_size
    proto.metadata_props.add(key=IMAGE_SIZE_KEY, value=f"{height}x{width}")
    onnx.save(proto, path)
    return path


def write_openvino(model, path):
    """The model as OpenVINO IR (`path` = model.xml, weights in model.bin beside it), converted
    by OpenVINO's TensorFlow frontend from the frozen function, weights kept float32. (Its ONNX
    frontend refuses tf2onnx's file: a Transpose of the part partition whose order does not
    match its input's rank; ONNX Runtime runs it.) Returns `path`."""
    ov = require("openvino")
    converted = ov.convert_model(frozen_module(model).pixels.get_concrete_function())
    height, width = model.image_size
    converted.set_rt_info(f"{height}x{width}", IMAGE_SIZE_PATH)
    ov.save_model(converted, path, compress_to_fp16=False)
    return path


def write_tflite(model, path, quantization="float32", calibration=None):
    """The model as a TFLite flatbuffer; returns `path`.

    quantization: `float32`; `float16` (weights stored as float16); `dynamic_int8` (weights
    int8, activations quantised on the fly); `int8` (full-integer: weights and activations of
    the backbone and the embedding heads in int8, their ranges calibrated on `calibration`,
    uint8 `[n,H,W,3]` training images). In `int8` the part partition, the masked pooling and
    the L2 normalisations stay float (`float_kept_nodes`): quantised, the K-means' divisions
    hit a zero-point divisor and its comparisons move the parts; they are a few hundred numbers
    per image, so float costs nothing. So do the backbone's input normalisation and stem.
    """
    if quantization not in ("float32", "float16", "dynamic_int8", "int8"):
        raise ValueError(f"quantization={quantization!r}: expected one of float32, float16, "
                         "dynamic_int8, int8.")
    if quantization == "int8" and (calibration is None or not len(calibration)):
        raise ValueError("int8 quantisation needs calibration images.")
    module = frozen_module(model)
    # Beside the file (inside the export's temporary folder), not in /tmp: a killed export then
    # leaves nothing that the next export's clean-up does not remove.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path)),
                                     prefix=".converting-") as folder:
        tf.saved_model.save(module, folder, signatures={"serving_default": module.pixels})
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        if quantization == "float32":
            flatbuffer = converter.convert()
        else:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantization in ("float16", "dynamic_int8"):
            flatbuffer = converter.convert()
        if quantization == "int8":
            flatbuffer = _full_integer(converter, tf.lite.TFLiteConverter.from_saved_model(
                folder).convert(), calibration)
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return path


def float_kept_nodes(float_flatbuffer, stem_convolutions=2):
    """Output tensor names of the ops that full-integer quantisation leaves float.

    All but the backbone's and the heads' (layers named `*backbone*`, `global_head`,
    `part_head`), and of the backbone its input normalisation and first `stem_convolutions`
    convolutions. Measured on the converged CUHK03 PL-Net (64 training images): with the whole
    backbone int8, the mean cosine with the SavedModel is 0.982 and 4.3 % of feature cells change
    part; with the normalisation and the stem conv + first depthwise conv float, 0.993 and 2.5 %
    (those layers see the image's full 8-bit range and pass their error to every later layer).
    """
    litert = require("ai_edge_litert.interpreter")
    interpreter = litert.Interpreter(model_content=float_flatbuffer)
    names = {tensor["index"]: tensor["name"] for tensor in interpreter.get_tensor_details()}
    kept, convolutions = [], 0
    for op in interpreter._get_ops_details():  # in execution order
        name = names[op["outputs"][0]]
        if "backbone" in name:
            if convolutions < stem_convolutions:
                kept.append(name)
                convolutions += op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")
        elif "_head" not in name:
            kept.append(name)
    return sorted(set(kept))


def _debugger(converter, float_flatbuffer, calibration):
    """TFLite's quantisation debugger set for selective quantisation (the documented way to
    keep chosen ops float), calibrated on `calibration`."""
    def representative():
        return ({"images": image[None]} for image in calibration)

    converter.representative_dataset = representative
    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=float_kept_nodes(float_flatbuffer))
    return tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative, debug_options=options)


def _full_integer(converter, float_flatbuffer, calibration):
    return _debugger(converter, float_flatbuffer, calibration).get_nondebug_quantized_model()


def write(model, folder, file_name, calibration=None):
    """Writes one of `FILES` into `folder`; returns its path."""
    kind, quantization = FILES[file_name]
    path = os.path.join(folder, file_name)
    if kind == "onnx":
        return write_onnx(model, path)
    if kind == "openvino":
        return write_openvino(model, path)
    return write_tflite(model, path, quantization, calibration)


def parity(reference, candidate):
    """How closely a format's outputs follow the SavedModel's on the same images.

    Both: `{key: np.ndarray}` with `embedding` `[n,E]` and `part_masks` `[n,h,w,K]`. Returns
    the cosine of each image's two embeddings (min, mean), their largest absolute difference,
    and the share of feature cells given the same part.
    """
    a = np.asarray(reference["embedding"], np.float64)
    b = np.asarray(candidate["embedding"], np.float64)
    cosine = np.sum(a * b, 1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    if "part_masks" not in candidate or np.shape(reference["part_masks"])[-1] == 0:
        same_part = None  # a baseline: no parts, no figure
    else:
        same_part = float(np.mean(np.argmax(reference["part_masks"], -1)
                                  == np.argmax(candidate["part_masks"], -1)))
    return {"images": int(len(a)), "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
            "max_abs_difference": float(np.abs(a - b).max()), "same_part_cells": same_part}


# What a format file must reach on the parity images, or the export refuses it. float32 files
# differ from the SavedModel by rounding only: the smallest cosine of an image's two embeddings.
# Reduced precision moves features by ~1e-4 (float16) or ~1e-2 (int8), and where two rows of an
# image nearly tie in the part clustering, that moves a part boundary: the image's part
# embeddings jump (a discontinuity, not an error that grows with the precision lost; seen on the
# converged CUHK03 model: float16, one image of 64 at cosine 0.9945, the others above 0.9999).
# So those are held to the mean cosine; the benchmark measures what they do to rank-1 and mAP.
PARITY_FLOORS = {"float32": ("cosine_min", 0.9999), "float16": ("cosine_mean", 0.999),
                 "dynamic_int8": ("cosine_mean", 0.99), "int8": ("cosine_mean", 0.99)}


def check_parity(file_name, figures):
    """Raises ValueError when a format file's parity figures are under its floor."""
    measure, floor = PARITY_FLOORS[FILES[file_name][1]]
    if not figures[measure] >= floor:
        raise ValueError(
            f"{file_name}: {measure.replace('_', ' ')} with the SavedModel {figures[measure]:.6f} "
            f"< {floor} on {figures['images']} images; the file would not rank as the "
            "SavedModel does, so it is not written.")


def file_digest(path):
    """sha256 of the file, and for OpenVINO's model.xml of its model.bin too."""
    digest = hashlib.sha256()
    for part in [path] + [p for p in [_weights_of(path)] if p]:
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _weights_of(path):
    """The weights file beside an OpenVINO model.xml (None for other formats)."""
    return path[:-len(".xml")] + ".bin" if path.endswith(".xml") else None


def file_bytes(path):
    """The bytes of a format file, with OpenVINO's weights file."""
    weights = _weights_of(path)
    return os.path.getsize(path) + (os.path.getsize(weights) if weights else 0)


class PixelRuntime:
    """The members of `runtime.SavedModelRuntime` over a function of uint8 pixels.

    A file resizes inside (`image_size` given: the training size it records), so it takes uint8
    images of any size as the SavedModel's `serving_default` does, and encoded images are
    decoded to uint8 and run one size at a time. A file of an earlier version (a fixed input
    size, `image_size` None) gets images resized outside with the model's own resize and
    rounded to uint8.
    """

    version = 1

    def __init__(self, path, input_shape, output_shapes, image_size=None, calibration=None):
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
        self.model_id = _model_id(path)

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


class OnnxRuntime(PixelRuntime):
    """A `model.onnx` run by ONNX Runtime (CPU)."""

    def __init__(self, path, threads=0, calibration=None):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own (not exported) error types
            raise ValueError(f"{path}: not a readable ONNX model ({str(error).splitlines()[0]})."
                             ) from None
        (model_input,) = self.session.get_inputs()
        self.input_name = model_input.name
        outputs = {output.name: output.shape for output in self.session.get_outputs()}
        size = self.session.get_modelmeta().custom_metadata_map.get(IMAGE_SIZE_KEY)
        super().__init__(path, model_input.shape, outputs,
                         size and tuple(int(side) for side in size.split("x")), calibration)

    def _run(self, images):
        names = list(self.output_shapes)
        values = self.session.run(names, {self.input_name: images})
        return dict(zip(names, values))


class TFLiteRuntime(PixelRuntime):
    """A `.tflite` file run by LiteRT (`ai-edge-litert`), one call at a time (an interpreter is
    not thread-safe)."""

    def __init__(self, path, threads=None, calibration=None):
        litert = require("ai_edge_litert.interpreter")
        try:
            self.interpreter = litert.Interpreter(model_path=path, num_threads=threads)
            self.runner = self.interpreter.get_signature_runner("serving_default")
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"{path}: not a readable reid-tf TFLite model "
                             f"({str(error).splitlines()[0]}).") from None
        self._lock = threading.Lock()
        details = self.runner.get_input_details()
        if set(details) != {"images"}:
            raise ValueError(f"{path}: inputs {sorted(details)}; expected 'images'.")
        shape = details["images"]["shape_signature"]
        outputs = {key: [int(size) for size in value["shape_signature"]]
                   for key, value in self.runner.get_output_details().items()}
        super().__init__(path, [int(size) for size in shape], outputs,
                         _resize_size(litert.Interpreter(model_path=path)), calibration)

    def _run(self, images):
        with self._lock:
            outputs = self.runner(images=images)
            return {key: np.array(value) for key, value in outputs.items()}


def _model_id(path):
    """The SavedModel's id when the model card beside the file lists the file with this
    digest (its parity with the SavedModel proven at export), else the file's own digest."""
    digest = file_digest(path)
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "model_card.json")) as f:
            card = json.load(f)
        listed = card["files"][os.path.basename(path)]["sha256"]
        if listed == digest and isinstance(card.get("model_id"), str):
            return card["model_id"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return digest[:16]


class OpenVinoRuntime(PixelRuntime):
    """An OpenVINO IR (`model.xml` + `model.bin`) compiled for the CPU by OpenVINO, at the
    precision `REID_TF_OPENVINO_PRECISION` asks (`f32`, the default; `bf16` where the CPU has
    it: AVX512-BF16 or AMX)."""

    def __init__(self, path, calibration=None, precision=None):
        ov = require("openvino")
        self.precision = precision or os.environ.get("REID_TF_OPENVINO_PRECISION", "f32")
        try:
            model = ov.Core().read_model(path)
            self.compiled = ov.Core().compile_model(
                model, "CPU", {"INFERENCE_PRECISION_HINT": self.precision})
        except RuntimeError as error:
            raise ValueError(f"{path}: not a readable OpenVINO model "
                             f"({str(error).strip().splitlines()[0]}).") from None
        self._lock = threading.Lock()
        (model_input,) = model.inputs
        shape = [dim.get_length() if dim.is_static else None
                 for dim in model_input.get_partial_shape()]
        self.outputs = {next(iter(sorted(output.get_names()))): output
                        for output in self.compiled.outputs}
        shapes = {name: [dim.get_length() if dim.is_static else None
                         for dim in output.get_partial_shape()]
                  for name, output in self.outputs.items()}
        size = (model.get_rt_info(IMAGE_SIZE_PATH).astype(str)
                if model.has_rt_info(IMAGE_SIZE_PATH) else None)
        super().__init__(path, shape, shapes,
                         size and tuple(int(side) for side in size.split("x")), calibration)

    def _run(self, images):
        with self._lock:  # one inference request at a time
            outputs = self.compiled(images)
            return {name: np.array(outputs[output]) for name, output in self.outputs.items()}


def _resize_size(interpreter):
    """The size a TFLite file resizes its input to (its first RESIZE_BILINEAR's constant size
    input), or None for a file of a fixed input size. `interpreter`: one of its own (the
    signature runner's would refuse `allocate_tensors`)."""
    interpreter.allocate_tensors()
    for op in interpreter._get_ops_details():  # in execution order
        if op["op_name"] == "RESIZE_BILINEAR":
            return tuple(int(side) for side in interpreter.get_tensor(op["inputs"][1]))
    return None


def _rounded(images):
    return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)


def open_file(path, calibration=None):
    """The runtime of a `.onnx`, `.tflite` or OpenVINO `.xml` file."""
    if path.endswith(".onnx"):
        return OnnxRuntime(path, calibration=calibration)
    if path.endswith(".tflite"):
        return TFLiteRuntime(path, calibration=calibration)
    if path.endswith(".xml"):
        return OpenVinoRuntime(path, calibration=calibration)
    raise ValueError(f"{path}: neither .onnx nor .tflite.")
