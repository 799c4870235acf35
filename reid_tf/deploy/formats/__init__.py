"""Deploy formats beside the SavedModel, one module each: `tflite` (float32, float16,
dynamic-range int8, full-integer int8), `onnx` and `openvino`. Each module declares its files
(`spec.FileFormat`: writer, reader, parity floor, the packages it needs); `FILES` lists them.
Adding a format is one module and one line in `FILES`.

Everything here takes a file name (`model.onnx`) or a path, and finds its `FileFormat` in
`FILES`: `files_of` (what `--format` writes), `write`, `open_file` (by suffix), `check_parity`,
`file_digest`, `file_bytes`. The file formats' runtimes give the members of
`runtime.SavedModelRuntime`, so reid-extract, reid-eval and reid-serve read any format through
the one extraction path.
"""

import os

from reid_tf.deploy.formats import onnx
from reid_tf.deploy.formats import openvino
from reid_tf.deploy.formats import spec
from reid_tf.deploy.formats import tflite
from reid_tf.deploy.formats.common import format_outputs
from reid_tf.deploy.formats.common import frozen_module
from reid_tf.deploy.formats.common import pixel_function
from reid_tf.deploy.formats.spec import parity
from reid_tf.extras import require

__all__ = ["FILES", "get", "format_names", "files_of", "write", "of_path", "suffixes",
           "open_file", "check_parity", "file_digest", "file_bytes", "format_outputs",
           "frozen_module", "pixel_function", "parity", "require"]

# file name -> its FileFormat, in the order an export writes them.
FILES = {file_format.file: file_format
         for file_format in (*tflite.FILES, *onnx.FILES, *openvino.FILES)}


def get(file_name):
    """The `FileFormat` of a format file's name; ValueError listing the names otherwise."""
    if file_name not in FILES:
        raise ValueError(f"{file_name}: not a format file; expected one of "
                         f"{', '.join(FILES)}.")
    return FILES[file_name]


def format_names():
    """What `--format` takes: `saved_model` and each format of `FILES`, in order."""
    return ("saved_model", *dict.fromkeys(file.format for file in FILES.values()))


def files_of(formats):
    """The format files that `formats` (names from `format_names()`) write, in `FILES` order.
    ValueError for an unknown format, `MissingPackage` when its packages are not installed."""
    unknown = set(formats) - set(format_names())
    if unknown:
        raise ValueError(f"--format: {', '.join(sorted(unknown))} unknown; expected some of "
                         f"{', '.join(format_names())}.")
    files = [file for file in FILES.values() if file.format in formats]
    for file in files:
        for module in file.needs:
            require(module)
    return [file.file for file in files]


def write(model, folder, file_name, calibration=None):
    """Writes one of `FILES` into `folder`; returns its path."""
    return get(file_name).write(model, os.path.join(folder, file_name), calibration)


def of_path(path):
    """The `FileFormat` that reads `path` (the first in `FILES` with its name, else with its
    suffix), or None."""
    name = os.path.basename(path)
    if name in FILES:
        return FILES[name]
    return next((file for file in FILES.values() if path.endswith(file.suffix)), None)


def suffixes():
    return tuple(dict.fromkeys(file.suffix for file in FILES.values()))


def open_file(path, calibration=None):
    """The runtime of a format file (`model.onnx`, `*.tflite`, `model.xml`, ...)."""
    file_format = of_path(path)
    if file_format is None:
        raise ValueError(f"{path}: not a format file; expected a name ending "
                         f"{', '.join(suffixes())}.")
    return file_format.open(path, calibration)


def check_parity(file_name, figures):
    """Raises ValueError when a format file's parity figures are under its floor."""
    spec.check_parity(get(file_name), figures)


def _paths(path):
    file_format = of_path(path)
    return file_format.paths(path) if file_format else [path]


def file_digest(path):
    """sha256 of the file and its companions (OpenVINO's model.bin)."""
    return spec.digest(_paths(path))


def file_bytes(path):
    """The bytes of a format file and its companions."""
    return sum(os.path.getsize(part) for part in _paths(path))
