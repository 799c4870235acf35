"""OpenVINO IR: `model.xml` (its weights in `model.bin`), converted by OpenVINO's TensorFlow
frontend from the frozen pixel function, weights kept float32, and `model_int8.xml`
(`model_int8.bin`), the same quantised to int8 by NNCF's post-training quantisation. Compiled
for the CPU at the precision `REID_TF_OPENVINO_PRECISION` asks (f32 or bf16). The training size
is the rt_info entry `IMAGE_SIZE_PATH`. Needs the `[openvino]` extra (openvino, nncf).

(OpenVINO's ONNX frontend refuses tf2onnx's file: a Transpose of the part partition whose
order does not match its input's rank; ONNX Runtime runs it.)"""

import logging
import os
import threading

import numpy as np

from reid_tf.deploy.formats import common
from reid_tf.deploy.formats import spec
from reid_tf.extras import require

IMAGE_SIZE_PATH = ["reid_tf", "image_size"]  # rt_info: the training size, "<height>x<width>"
COMPANIONS = (".bin",)  # the weights beside model.xml


def write_openvino(model, path, calibration=None):
    """The model as OpenVINO IR (`path` = model.xml, model.bin beside it); returns `path`."""
    del calibration  # float32 weights; the precision is chosen when the file is compiled
    ov = require("openvino")
    ov.save_model(_converted(model), path, compress_to_fp16=False)
    return path


def write_openvino_int8(model, path, calibration=None, stem_convolutions=2):
    """The model as int8 OpenVINO IR, quantised by NNCF (`nncf.quantize`, its default preset)
    with activation ranges from `calibration` (uint8 `[n,H,W,3]` training images); returns
    `path`. As in the full-integer TFLite file (`tflite.float_kept_nodes`), the part partition
    and pooling stay float (quantised, they move part boundaries) and so do the first
    `stem_convolutions` convolutions, which see the image's full 8-bit range."""
    if calibration is None or not len(calibration):
        raise ValueError("int8 quantisation needs calibration images.")
    ov, nncf = require("openvino"), require("nncf")
    logging.getLogger("nncf").setLevel(logging.WARNING)  # a line per op left float
    converted = _converted(model)
    convolutions = [op.get_friendly_name() for op in converted.get_ordered_ops()
                    if op.get_type_name() in ("Convolution", "GroupConvolution")]
    float_kept = nncf.IgnoredScope(names=convolutions[:stem_convolutions],
                                   patterns=[".*/partition[^/]*/.*", ".*/part_pooling[^/]*/.*"],
                                   validate=False)
    quantized = nncf.quantize(converted, nncf.Dataset(list(calibration), lambda x: x[None]),
                              subset_size=len(calibration), ignored_scope=float_kept)
    ov.save_model(quantized, path, compress_to_fp16=False)
    return path


def _converted(model):
    """The frozen pixel function as an OpenVINO model, its training size in rt_info."""
    ov = require("openvino")
    converted = ov.convert_model(common.frozen_module(model).pixels.get_concrete_function())
    height, width = model.image_size
    converted.set_rt_info(f"{height}x{width}", IMAGE_SIZE_PATH)
    return converted


class OpenVinoRuntime(common.PixelRuntime):
    """An OpenVINO IR compiled for the CPU by OpenVINO, at `precision` (default: the variable
    `REID_TF_OPENVINO_PRECISION`, else `f32`; `bf16` where the CPU has it: AVX512-BF16 or
    AMX)."""

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
        # What the CPU runs: a bf16 hint falls back to f32 on a CPU without bfloat16 units.
        self.inference_precision = self.compiled.get_property(
            "INFERENCE_PRECISION_HINT").get_type_name()
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
                         size and tuple(int(side) for side in size.split("x")), calibration,
                         COMPANIONS)

    def _run(self, images):
        with self._lock:  # one inference request at a time
            outputs = self.compiled(images)
            return {name: np.array(outputs[output]) for name, output in self.outputs.items()}


FILES = (spec.FileFormat("model.xml", "openvino", "float32", write_openvino, OpenVinoRuntime,
                         needs=("openvino",), companions=COMPANIONS),
         spec.FileFormat("model_int8.xml", "openvino", "int8", write_openvino_int8,
                         OpenVinoRuntime, needs=("openvino", "nncf"), companions=COMPANIONS))
