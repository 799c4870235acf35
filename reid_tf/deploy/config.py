"""`ExportConfig`: every option of reid-export, each declared once (`options.Option`); the tool
(`cli/export.py`) derives its flags and checks from it."""

import dataclasses

from reid_tf.options import Option


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Every option of reid-export."""

    workdir: str = Option(None, "A reid-train workdir; its latest checkpoint is "
                          "exported.").field()
    export_dir: str = Option(None, "Where `<version>/` goes (default "
                             "<workdir>/export).").field()
    version: int = Option(None, "Integer version (default: the checkpoint's step).",
                          minimum=0).field()
    format: tuple = Option(("saved_model",), "Formats to write, comma-separated: saved_model "
                           "(always written), tflite (float32, float16, dynamic-range int8, "
                           "full-integer int8), onnx, openvino (OpenVINO IR: model.xml + "
                           "model.bin).", item=str).field()
    calibration_images: int = Option(300, "Training images that calibrate full-integer int8 "
                                     "quantisation (drawn at random from the training split "
                                     "only).", minimum=1).field()
    parity_images: int = Option(64, "Other training images on which each format file is "
                                "compared with the SavedModel (the model card's parity "
                                "figures).", minimum=1).field()
    calibration: str = Option(None, "A calibration.json (reid-eval --calibrate) to carry "
                              "instead of the workdir's own.").field()
