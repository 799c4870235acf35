"""Descriptors: what an image is ranked by, from a model's (or an export's) outputs.

The one place where embeddings are L2-normalised: the model's `embedding` output, every
extraction (training-time evaluation, reid-eval, reid-extract, any runtime) and the gallery.
"""

import numpy as np
import tensorflow as tf


def l2_normalize(tensor):
    """Float32 unit vectors along the last axis (TensorFlow; zero stays zero)."""
    return tf.math.l2_normalize(tf.cast(tensor, tf.float32), axis=-1)


def unit_rows(array):
    """Float32 unit rows of a numpy `[N, D]` array (zero rows stay zero)."""
    array = np.ascontiguousarray(array, np.float32)
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def descriptor(global_embedding, part_embeddings):
    """Test descriptor: each of the K+1 embeddings L2-normalised, concatenated, renormalised.

    Normalising each piece first gives the global feature and every part the same weight in a
    cosine distance, whatever their raw scales. `[B,D]`, `[B,K,D]` -> `[B,(K+1)*D]`.
    """
    pieces = tf.concat([global_embedding[:, None, :], part_embeddings], axis=1)
    pieces = l2_normalize(pieces)
    return l2_normalize(tf.reshape(pieces, [tf.shape(pieces)[0], -1]))


DESCRIPTORS = ("embedding", "global_embedding", "part_embeddings")


def select_descriptor(outputs, name="embedding"):
    """The descriptor called `name` from a model's (or an export's) outputs, L2-normalised.

    - `embedding`: the test descriptor, global + parts (see `descriptor`).
    - `global_embedding`: the global embedding alone `[B,D]`.
    - `part_embeddings`: the K part embeddings alone, each normalised, concatenated `[B,K*D]`.
    """
    if name not in DESCRIPTORS:
        raise ValueError(f"descriptor={name!r}: expected one of {DESCRIPTORS}.")
    if name != "part_embeddings":
        return l2_normalize(outputs[name])
    parts = outputs["part_embeddings"]
    if parts.shape[1] == 0:
        raise ValueError("descriptor='part_embeddings': this model has no parts (num_parts=0).")
    parts = l2_normalize(parts)
    return l2_normalize(tf.reshape(parts, [tf.shape(parts)[0], -1]))
