"""The one resize and decode of reid-tf: training, evaluation, the export and every runtime.

Images are float32 RGB in [0, 255] at the model's size; the backbone's own normalisation layer
(`model.backbones.ImageNormalization`) maps them to what it was trained on. `PartLossNet.preprocess`
and `PartLossNet.decode` call these with the model's own size, so a deployed model owns its
preprocessing.
"""

import tensorflow as tf


def preprocess(images, image_size):
    """uint8 (or float) RGB `[..., H, W, 3]` of any size -> float32 `[..., h, w, 3]` in [0, 255].

    The one resize shared by training, evaluation and the SavedModel (bilinear).
    """
    return tf.image.resize(tf.cast(images, tf.float32), image_size)


def decode(encoded, image_size):
    """Encoded JPEG/PNG/BMP bytes -> preprocessed float32 `[h, w, 3]`."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return preprocess(image, image_size)
