"""TFLite/LiteRT flatbuffers: `model.tflite` (float32), `model_fp16.tflite` (weights float16),
`model_int8_dynamic.tflite` (weights int8, activations quantised on the fly) and
`model_int8.tflite` (full-integer), written by TensorFlow's TFLite converter from the frozen
pixel function, read by LiteRT (`ai-edge-litert`). The training size is the size of the
file's first resize. Needs the `[tflite]` extra."""

import os
import tempfile
import threading

import numpy as np
import tensorflow as tf

from reid_tf.deploy.formats import common
from reid_tf.deploy.formats import spec
from reid_tf.extras import require

QUANTIZATIONS = ("float32", "float16", "dynamic_int8", "int8")


def write_tflite(model, path, quantization="float32", calibration=None):
    """The model as a TFLite flatbuffer; returns `path`.

    quantization: one of `QUANTIZATIONS`. `int8` is full-integer: weights and activations of
    the backbone and the embedding heads in int8, their ranges calibrated on `calibration`,
    uint8 `[n,H,W,3]` training images. In `int8` the part partition, the masked pooling and
    the L2 normalisations stay float (`float_kept_nodes`): quantised, the K-means' divisions
    hit a zero-point divisor and its comparisons move the parts; they are a few hundred numbers
    per image, so float costs nothing. So do the backbone's input normalisation and stem.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of "
                         f"{', '.join(QUANTIZATIONS)}.")
    if quantization == "int8" and (calibration is None or not len(calibration)):
        raise ValueError("int8 quantisation needs calibration images.")
    module = common.frozen_module(model)
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
            flatbuffer = full_integer(converter, tf.lite.TFLiteConverter.from_saved_model(
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


def full_integer(converter, float_flatbuffer, calibration):
    """The full-integer flatbuffer of `converter` (optimisations set), the ops of
    `float_kept_nodes(float_flatbuffer)` left float through TFLite's quantisation debugger (the
    documented way to keep chosen ops float), calibrated on `calibration`."""
    def representative():
        return ({"images": image[None]} for image in calibration)

    converter.representative_dataset = representative
    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=float_kept_nodes(float_flatbuffer))
    return tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative,
        debug_options=options).get_nondebug_quantized_model()


class TFLiteRuntime(common.PixelRuntime):
    """A `.tflite` file run by LiteRT, one call at a time (an interpreter is not thread-safe)."""

    def __init__(self, path, calibration=None, threads=None):
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


def _resize_size(interpreter):
    """The size a TFLite file resizes its input to (its first RESIZE_BILINEAR's constant size
    input), or None for a file of a fixed input size. `interpreter`: one of its own (the
    signature runner's would refuse `allocate_tensors`)."""
    interpreter.allocate_tensors()
    for op in interpreter._get_ops_details():  # in execution order
        if op["op_name"] == "RESIZE_BILINEAR":
            return tuple(int(side) for side in interpreter.get_tensor(op["inputs"][1]))
    return None


def _file(name, quantization):
    def write(model, path, calibration=None):
        return write_tflite(model, path, quantization, calibration)

    return spec.FileFormat(name, "tflite", quantization, write, TFLiteRuntime,
                           needs=("ai_edge_litert",))


FILES = (_file("model.tflite", "float32"), _file("model_fp16.tflite", "float16"),
         _file("model_int8_dynamic.tflite", "dynamic_int8"), _file("model_int8.tflite", "int8"))
