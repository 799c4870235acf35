"""The one extraction path: a split's images through a runtime, in the split's order.

Batching, flip test-time augmentation, descriptor choice and normalisation happen here and only
here; training-time evaluation, reid-eval, reid-extract and the gallery's seeding all call
`extract`. A runtime (`deploy.runtime`: the in-memory model, a SavedModel, and next an ONNX or
TFLite file) only turns a batch of images into outputs.
"""

import sys

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from reid_tf.data import pipeline
from reid_tf.evaluate import contract
from reid_tf.model import descriptors


def extract(runtime, split, names=("embedding",), batch_size=64, flip=False, encoded=False,
            description=None):
    """`{name: np.ndarray [N, ...]}` for every image of `split`, in its order.

    Args:
        runtime: has `image_size`, `embed(images, names)` and `embed_encoded(encoded, names)`
            (see `deploy.runtime`).
        split: a `data.splits.Split`.
        names: descriptors (`model.descriptors.DESCRIPTORS`), each L2-normalised, and/or
            `part_masks`.
        batch_size: images per runtime call.
        flip: test-time augmentation: each descriptor is the normalised sum of the image's and
            its mirror's.
        encoded: feed the runtime the encoded bytes (it decodes and resizes inside, as a served
            model does) instead of images decoded by the evaluation pipeline.
        description: a progress bar with this label (on stderr); None: no bar.

    An encoded image that does not decode raises `UndecodableImage` (a ValueError) naming its
    file.
    """
    names = tuple(names)
    if encoded and flip:
        raise ValueError("flip needs decoded images: give encoded=False.")
    if encoded:
        batches = pipeline.encoded_batches(split, batch_size)
    else:
        batches = pipeline.eval_dataset(split, runtime.image_size, batch_size)
    results = {name: [] for name in names}
    done = 0
    with tqdm(total=len(split), desc=description, unit="img", disable=description is None,
              file=sys.stderr) as bar:
        for batch in batches:
            if encoded:
                outputs = _embed_encoded(runtime, batch, names, split, done)
            else:
                outputs = runtime.embed(batch["image"], names)
                if flip:
                    mirrored = runtime.embed(batch["image"][:, :, ::-1], names)
                    outputs = {name: value if name in contract.RAW_OUTPUTS
                               else descriptors.l2_normalize(value + mirrored[name])
                               for name, value in outputs.items()}
            for name in names:
                results[name].append(np.asarray(outputs[name]))
            count = len(results[names[0]][-1])
            done += count
            bar.update(count)
    return {name: np.concatenate(values) for name, values in results.items()}


class UndecodableImage(ValueError):
    """An image of the split does not decode (the message names it)."""


def _embed_encoded(runtime, batch, names, split, start):
    try:
        return runtime.embed_encoded(batch, names)
    except tf.errors.InvalidArgumentError:
        index = first_undecodable(batch.numpy())
        name = split.file_names[start + (index or 0)]
        raise UndecodableImage(f"{name}: not a decodable JPEG/PNG/BMP image." if index is not None
                               else f"{name}...: a batch failed to decode.") from None


def first_undecodable(images):
    """The index of the first encoded image that does not decode, or None (after a batch
    failed inside a runtime, to name the culprit)."""
    for index, data in enumerate(images):
        try:
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            return index
    return None
