"""features.npz: what reid-extract writes and the gallery imports.

`embeddings` float32 `[N, E]` (L2-normalised), `file_names` str `[N]`, and where every file name
carries them (Market's `PPPP_cC...`), `person_ids` and `camera_ids` int64 `[N]`.
"""

import os
import zipfile
import zlib

import numpy as np

from reid_tf.files import check_can_create
from reid_tf.files import save_npz_atomically


FEATURE_KEYS = ("embeddings", "file_names", "person_ids", "camera_ids")


def feature_arrays(embeddings, file_names, person_ids=None, camera_ids=None):
    """The arrays of a features.npz. Person ids and cameras are left out when a camera is -1
    (a name that did not carry them)."""
    arrays = {"embeddings": np.asarray(embeddings, np.float32),
              "file_names": np.asarray(file_names, dtype=str)}
    if person_ids is not None and camera_ids is not None and np.all(np.asarray(camera_ids) >= 0):
        arrays["person_ids"] = np.asarray(person_ids, np.int64)
        arrays["camera_ids"] = np.asarray(camera_ids, np.int64)
    return arrays


def save_features(path, embeddings, file_names, person_ids=None, camera_ids=None):
    """Writes features.npz (`feature_arrays`) atomically (a temporary file renamed when
    complete)."""
    arrays = feature_arrays(embeddings, file_names, person_ids, camera_ids)
    check_output_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_npz_atomically(path, arrays)
    return arrays


def check_output_path(path):
    """Refuses, before any work, an output path that cannot become a file: ValueError."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise ValueError(f"--output={path}: is a folder; give a file name (e.g. "
                         f"{os.path.join(path, 'features.npz')}).")
    check_can_create(os.path.dirname(path), "--output")


def load_features(path):
    """features.npz -> dict of arrays; ValueError names a missing or inconsistent array."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("one array, not an .npz archive")
            arrays = {key: data[key] for key in FEATURE_KEYS if key in data}
    except FileNotFoundError:
        raise ValueError(f"{path}: not found.") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error):  # a truncated or
        # damaged file; numpy's pickle message names no file
        raise ValueError(f"{path}: not a features .npz (reid-extract's output).") from None
    for key in ("embeddings", "file_names"):
        if key not in arrays:
            raise ValueError(f"{path}: array {key!r} missing; expected a reid-extract "
                             "features.npz.")
    embeddings = arrays["embeddings"]
    if embeddings.ndim != 2:
        raise ValueError(f"{path}: 'embeddings' has shape {embeddings.shape}; expected [N, E].")
    for key, array in arrays.items():
        if len(array) != len(embeddings):
            raise ValueError(f"{path}: {key!r} has {len(array)} rows, 'embeddings' "
                             f"{len(embeddings)}.")
    return arrays
