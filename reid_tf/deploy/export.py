"""SavedModel export in TF Serving layout: `<export_dir>/<version>/`.

Signatures:
- `serving_default`: `images` uint8 `[N,H,W,3]`, any H and W (resized inside);
- `serve_encoded`: `images` tf.string `[N]` of JPEG/PNG bytes.
Both return `embedding [N,(K+1)·D]` (L2-normalised), `global_embedding [N,D]`,
`part_embeddings [N,K,D]`, `part_masks [N,h,w,K]`, with the model's own preprocessing
(`PartLossNet.preprocess`/`decode`, the resize of evaluation). The export loads with plain
`tf.saved_model.load`; it needs no reid_tf code. It computes in the model's dtype policy: the
exports reid-train and reid-export write are of a float32 model, whatever training used.

Beside `saved_model.pb`, the version folder holds the other format files asked for
(`deploy.formats.FILES`: TFLite, ONNX, OpenVINO) and `model_card.json` (also in `assets/`): the input and
its preprocessing, the outputs, the model, the code, what the caller adds (training recipe,
evaluation), and for each format file its size, digest and parity with the SavedModel; and
`assets/calibration.json` when the run fitted its decision thresholds (`evaluate.calibration`).
"""

import json
import os
import re
import shutil
import time

import numpy as np
import tensorflow as tf

from reid_tf import version as version_lib
from reid_tf.deploy import formats
from reid_tf.deploy.runtime import CALIBRATION_FILE
from reid_tf.deploy.runtime import model_id as model_id_of
from reid_tf.evaluate import calibration as calibration_lib
from reid_tf.evaluate.contract import EXPORT_KEYS


class ServingModule(tf.Module):
    """Wraps a `PartLossNet` with the serving signatures."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.image_size = tuple(model.image_size)
        # Saved with the model, so a loader knows the training size:
        # `tf.saved_model.load(path).image_size_variable` -> [height, width].
        self.image_size_variable = tf.Variable(self.image_size, trainable=False, dtype=tf.int32,
                                               name="image_size")

    def _embed(self, images):
        outputs = {key: tf.cast(value, tf.float32)
                   for key, value in self.model(images, training=False).items()
                   if key in EXPORT_KEYS}
        # The concatenation's width is static: say so in the signature (saved_model_cli, TF
        # Serving metadata) rather than -1.
        _, parts, dim = outputs["part_embeddings"].shape
        outputs["embedding"] = tf.ensure_shape(
            outputs["embedding"], [None, outputs["global_embedding"].shape[-1] + parts * dim])
        return outputs

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        return self._embed(self.model.preprocess(images))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_encoded(self, images):
        decoded = tf.map_fn(self.model.decode, images,
                            fn_output_signature=tf.TensorSpec([*self.image_size, 3], tf.float32))
        return self._embed(decoded)


def model_card(model):
    """What a caller of the export needs to know and should not have to guess."""
    height, width = model.image_size
    parts, dim = model.num_parts, model.embedding_dim
    grid_height, grid_width = model.grid_size
    return {
        "reid_tf": version_lib.code(),
        "input": {
            "name": "images", "dtype": "uint8", "shape": [None, height, width, 3],
            "channel_order": "RGB", "value_range": [0, 255],
            "preprocessing": (
                "inside the model: cast to float32, then the backbone's ImageNet normalisation "
                "(its first layer). Feed RGB pixels of any size: the SavedModel and the "
                ".tflite/.onnx files resize to the training size (bilinear, in float) first."),
        },
        "outputs": {
            "embedding": {"shape": [None, (parts + 1) * dim], "meaning": (
                "the test descriptor: L2(concat(L2(global), L2(part_1..K))); compare by "
                "Euclidean or cosine distance")},
            "global_embedding": {"shape": [None, dim], "meaning": "the global branch"},
            "part_embeddings": {"shape": [None, parts, dim], "meaning": "each part's branch"},
            "part_masks": {"shape": [None, grid_height, grid_width, parts], "meaning": (
                "one-hot part of each feature cell, parts top to bottom")},
        },
        "format_file_outputs": list(formats.format_outputs(model)),
        "model": {"backbone": model.backbone_name, "num_parts": parts,
                  "part_strategy": model.part_strategy, "embedding_dim": dim,
                  "image_size": [height, width], "last_stride": model.last_stride},
        "files": {},
    }


def export_model(model, export_dir, version=None, files=(), calibration=None,
                 parity_images=None, card=None, log=print, decisions=None):
    """Writes `<export_dir>/<version>/` atomically and returns its path.

    The SavedModel, the format files (`files`, names from `deploy.formats.FILES`) and the model
    card are written under a temporary name in `export_dir` and renamed when complete, so a
    half-written export never appears under a version number. `version` defaults to the
    current Unix time (TF Serving serves the largest).

    Args:
        calibration: uint8 `[n,H,W,3]` training images for full-integer quantisation.
        parity_images: uint8 `[m,H,W,3]` images on which each format file is compared with the
            SavedModel (its figures go in the card); None: random pixels.
        card: more for the model card (e.g. `training`, `evaluation`).
        decisions: the decision calibration (`evaluate.calibration.fit`: thresholds at each
            FAR), written as `assets/calibration.json` and summarised in the card; reid-serve
            decides `match`/`in_gallery` with it.
    """
    version = int(version if version is not None else time.time())
    final = os.path.join(export_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"{final}: an export with this version already exists.")
    os.makedirs(export_dir, exist_ok=True)
    remove_abandoned(export_dir, log)
    temporary = os.path.join(export_dir, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        module = ServingModule(model)
        tf.saved_model.save(module, temporary, signatures={
            "serving_default": module.serve, "serve_encoded": module.serve_encoded})
        # The weights' id: the SavedModel's and, parity proven, each format file's.
        model_id = model_id_of(temporary)
        card = {**model_card(model), "model_id": model_id, **(card or {})}
        if files:
            card["files"] = _write_formats(module, temporary, files, calibration,
                                           parity_images, log)
        os.makedirs(os.path.join(temporary, "assets"), exist_ok=True)
        if decisions is not None:
            calibration_lib.check_model(calibration_lib.check(decisions), model_id)
            decisions = {**decisions, "model_id": model_id}  # names the model it decides for
            with open(os.path.join(temporary, CALIBRATION_FILE), "w") as f:
                json.dump(decisions, f, indent=2)
            card["calibration"] = {"file": CALIBRATION_FILE, **{
                key: decisions[key] for key in ("distance", "rule", "verification", "open_set",
                                                "measured_on")}}
        text = json.dumps(card, indent=2) + "\n"
        for name in ("model_card.json", os.path.join("assets", "model_card.json")):
            with open(os.path.join(temporary, name), "w") as f:
                f.write(text)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def remove_abandoned(export_dir, log=print):
    """Removes the `.tmp-<version>-<pid>/` folders of exports whose process is gone (killed
    mid-export); an export still running keeps its own."""
    for name in os.listdir(export_dir):
        match = re.fullmatch(r"\.tmp-\d+-(\d+)", name)
        if match is None or _alive(int(match.group(1))):
            continue
        shutil.rmtree(os.path.join(export_dir, name), ignore_errors=True)
        log(f"removed {os.path.join(export_dir, name)}, left by an interrupted export")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write_formats(module, folder, files, calibration, parity_images, log):
    """Writes each format file and measures it against the SavedModel's function (ValueError,
    and no export, for one under its parity floor: `formats.check_parity`); returns the card's
    `files`."""
    if parity_images is None:
        parity_images = np.random.default_rng(0).integers(
            0, 256, (16, *module.image_size, 3), dtype=np.uint8)
    reference = {key: value.numpy() for key, value in module.serve(parity_images).items()}
    entries = {}
    for name in files:
        started = time.perf_counter()
        entries[name] = write_format_file(module.model, folder, name, calibration,
                                          parity_images, reference)
        figures = entries[name]["parity_with_saved_model"]
        formats.check_parity(name, figures)
        log(f"wrote {name} ({entries[name]['bytes'] / 1e6:.1f} MB, "
            f"{time.perf_counter() - started:.0f} s): cosine with the SavedModel >= "
            f"{figures['cosine_min']:.6f} on {figures['images']} images"
            + ("" if figures["same_part_cells"] is None else
               f", same part in {100 * figures['same_part_cells']:.1f} % of cells"))
    return entries


def write_format_file(model, folder, name, calibration, parity_images, reference):
    """Writes the format file `name` into `folder` and compares its outputs on `parity_images`
    with the SavedModel's (`reference`); returns its model-card entry, not yet checked against
    its floor (`formats.check_parity`)."""
    path = formats.write(model, folder, name, calibration)
    file_format = formats.get(name)
    entry = {"format": file_format.format, "quantization": file_format.quantization,
             "bytes": formats.file_bytes(path), "sha256": formats.file_digest(path),
             "parity_with_saved_model": formats.parity(
                 reference, formats.open_file(path).predict_images(parity_images))}
    if file_format.calibrated:
        entry["calibration_images"] = int(len(calibration))
    return entry
