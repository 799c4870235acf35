"""Pictures for people: part masks over input crops."""

import numpy as np
import tensorflow as tf

PART_COLOURS = np.array([  # distinct, in part order (top to bottom)
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
], np.float32)


def overlay_part_masks(images, part_masks, alpha=0.45):
    """Blends each part's colour over the crop: images `[B,H,W,3]` 0..255, masks `[B,h,w,K]`.

    Returns float32 `[B,H,W,3]` in [0, 1] (for `tf.summary.image`). With K=0 the crops are
    returned unchanged.
    """
    images = tf.cast(images, tf.float32) / 255.0
    num_parts = part_masks.shape[-1]
    if not num_parts:
        return images
    masks = tf.image.resize(tf.cast(part_masks, tf.float32), tf.shape(images)[1:3],
                            method="nearest")
    colours = np.resize(PART_COLOURS, (num_parts, 3)) / 255.0
    colour = tf.einsum("bhwk,kc->bhwc", masks, tf.constant(colours, tf.float32))
    return (1 - alpha) * images + alpha * colour
