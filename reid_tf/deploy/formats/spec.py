"""What makes an export format: `FileFormat`, one per file name (writer, reader, parity floor,
the packages it needs), and what every format shares: the parity figures and floors, and a
file's size and digest with its companion files.

Each format is one module of this package that declares its `FileFormat`s; `formats.FILES`
lists them (one line per module).
"""

import dataclasses
import hashlib
import os
from typing import Callable

import numpy as np

# What a format file must reach on the parity images, or the export refuses it. float32 files
# differ from the SavedModel by rounding only: the smallest cosine of an image's two embeddings.
# Reduced precision moves features by ~1e-4 (float16) or ~1e-2 (int8), and where two rows of an
# image nearly tie in the part clustering, that moves a part boundary: the image's part
# embeddings jump (a discontinuity, not an error that grows with the precision lost; seen on the
# converged CUHK03 model: float16, one image of 64 at cosine 0.9945, the others above 0.9999).
# So those are held to the mean cosine; the benchmark measures what they do to rank-1 and mAP.
PARITY_FLOORS = {"float32": ("cosine_min", 0.9999), "float16": ("cosine_mean", 0.999),
                 "dynamic_int8": ("cosine_mean", 0.99), "int8": ("cosine_mean", 0.99)}


@dataclasses.dataclass(frozen=True)
class FileFormat:
    """One format file of an export.

    Attributes:
        file: its name in the export's version folder (`model.onnx`); the suffix picks the
            reader of a path.
        format: the `--format` name that writes it (`onnx`).
        quantization: `float32`, `float16`, `dynamic_int8` or `int8`; sets the parity floor
            (`PARITY_FLOORS`), and `int8` gets calibration images.
        write: `(model, path, calibration) -> path`: writes the file (calibration: uint8
            `[n,H,W,3]` training images, or None).
        open: `(path, calibration) -> runtime` with the members of `evaluate.contract.Runtime`
            and `predict_images`/`predict_encoded` (a `common.PixelRuntime`).
        needs: modules that writing and checking it import (checked before any work).
        companions: suffixes of files written beside it (OpenVINO's `.bin` weights).
    """

    file: str
    format: str
    quantization: str
    write: Callable
    open: Callable
    needs: tuple = ()
    companions: tuple = ()

    @property
    def suffix(self):
        return os.path.splitext(self.file)[1]

    @property
    def parity_floor(self):
        """(measure, floor): the parity figure the file must reach."""
        return PARITY_FLOORS[self.quantization]

    @property
    def calibrated(self):
        """Whether writing it needs calibration images (full-integer quantisation)."""
        return self.quantization == "int8"

    def paths(self, path):
        """The file at `path` and its companions."""
        return with_companions(path, self.companions)


def with_companions(path, companions):
    """`path` and the files beside it named for it with the suffixes `companions`
    (`model.xml` -> `model.bin`)."""
    stem = os.path.splitext(path)[0]
    return [path] + [stem + suffix for suffix in companions]


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


def check_parity(file_format, figures):
    """Raises ValueError when a format file's parity figures are under its floor."""
    measure, floor = file_format.parity_floor
    if not figures[measure] >= floor:
        raise ValueError(
            f"{file_format.file}: {measure.replace('_', ' ')} with the SavedModel "
            f"{figures[measure]:.6f} < {floor} on {figures['images']} images; the file would "
            "not rank as the SavedModel does, so it is not written.")


def digest(paths):
    """sha256 over the files `paths`, in order."""
    hashed = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                hashed.update(block)
    return hashed.hexdigest()
