"""Optional packages (setup.py's extras): imported on use, with one line saying what to install
when missing. Imports nothing heavy, so a command-line tool can name `MissingPackage` early."""

import importlib

# module -> the extra that installs it
EXTRAS = {"onnxruntime": "onnx", "tf2onnx": "onnx", "ai_edge_litert": "tflite", "pymilvus": "milvus",
          "apache_beam": "beam", "openvino": "openvino",
          "nncf": "openvino"}


class MissingPackage(ImportError):
    """An optional runtime or converter is not installed (the message says what to install)."""


def require(module):
    """Imports an optional package's `module`, or raises `MissingPackage` naming the extra."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"{package} is not installed; install it with "
                             f"pip install 'reid-tf[{EXTRAS[package]}]'.") from None
