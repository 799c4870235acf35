"""reid-export: a workdir's latest checkpoint -> `<export_dir>/<version>/` (TF Serving layout),
with TFLite and ONNX files beside the SavedModel on request, and a model card.

    reid-export --workdir=runs/demo                     # -> runs/demo/export/<step>/
    reid-export --workdir=runs/demo --export_dir=/models/reid --version=3
    reid-export --workdir=runs/demo --format=saved_model,tflite,onnx
    saved_model_cli show --all --dir runs/demo/export/<step>

`--format=tflite` writes model.tflite (float32), model_fp16.tflite, model_int8_dynamic.tflite
and model_int8.tflite (full-integer, calibrated on `--calibration_images` training images);
`--format=onnx` writes model.onnx, `--format=openvino` model.xml + model.bin (OpenVINO IR). The SavedModel is always written: it is the reference every
other file is measured against (model_card.json: `files.<name>.parity_with_saved_model`).
Converters: `pip install 'reid-tf[onnx]'` (tf2onnx), `'reid-tf[tflite]'` (LiteRT, to check the
files). The export carries the decision thresholds (`assets/calibration.json`) of the run's
`calibration.json` (fitted at the end of a run with --validation_identities), or of
`--calibration=<file>` (reid-eval --calibrate).
"""

import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

from absl import app  # noqa: E402
from absl import logging  # noqa: E402
from absl import flags  # noqa: E402

from reid_tf import options  # noqa: E402
from reid_tf.deploy.config import ExportConfig  # noqa: E402
from reid_tf.extras import MissingPackage  # noqa: E402

options.define_flags(ExportConfig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    from reid_tf.deploy import formats
    from reid_tf.train import workdir as workdir_lib

    tf.get_logger().setLevel("ERROR")
    # TFDS, SavedModel and the converters log hundreds of INFO lines: only the export's own.
    logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # The int8 debugger runs TensorFlow's own tf.lite.Interpreter, which warns on every use.
    warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
    config = options.checked_from_flags(ExportConfig)
    try:
        files = formats.files_of(config.format)  # before any work: unknown or not installed
        path, checkpoint = workdir_lib.export_latest(
            os.path.expanduser(config.workdir),
            config.export_dir and os.path.expanduser(config.export_dir), config.version, files,
            config.calibration_images, config.parity_images, decisions=config.calibration)
    except (ValueError, FileNotFoundError, FileExistsError, MissingPackage) as error:
        print(f"reid-export: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"exported {checkpoint} -> {path}")


def run():
    flags.mark_flag_as_required("workdir")
    app.run(main)


if __name__ == "__main__":
    run()
