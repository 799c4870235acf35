"""ONNX (`model.onnx`, opset `ONNX_OPSET`): written by tf2onnx from the frozen pixel function,
read by ONNX Runtime (CPU). The training size is the metadata entry `IMAGE_SIZE_KEY`.
Needs the `[onnx]` extra."""

import logging

from reid_tf.deploy.formats import common
from reid_tf.deploy.formats import spec
from reid_tf.extras import require

ONNX_OPSET = 17
IMAGE_SIZE_KEY = "reid_tf.image_size"  # metadata: the training size, "<height>x<width>"


def write_onnx(model, path, calibration=None):
    """The model as ONNX, through tf2onnx; returns `path`."""
    del calibration  # float32 only
    tf2onnx = require("tf2onnx")
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its passes log hundreds of lines
    onnx = require("onnx")
    module = common.frozen_module(model)
    proto, _ = tf2onnx.convert.from_function(
        module.pixels, input_signature=module.pixels.input_signature, opset=ONNX_OPSET)
    height, width = model.image_size
    proto.metadata_props.add(key=IMAGE_SIZE_KEY, value=f"{height}x{width}")
    onnx.save(proto, path)
    return path


class OnnxRuntime(common.PixelRuntime):
    """A `model.onnx` run by ONNX Runtime (CPU)."""

    def __init__(self, path, calibration=None, threads=0):
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


FILES = (spec.FileFormat("model.onnx", "onnx", "float32", write_onnx, OnnxRuntime,
                         needs=("tf2onnx", "onnxruntime")),)
