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
    """Encoded JPEG/PNG/BMP/GIF bytes -> preprocessed float32 `[h, w, 3]`, a JPEG turned upright
    by its EXIF orientation first (as a photo viewer shows it)."""
    return preprocess(decode_upright(encoded), image_size)


def decode_upright(encoded):
    """Encoded bytes -> uint8 `[H, W, 3]` at their own size, upright by EXIF orientation."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = upright(image, exif_orientation(encoded))
    image.set_shape([None, None, 3])
    return image


# Where the EXIF segment is looked for: the first 2 KiB (EXIF's APP1 comes first, or after
# JFIF's APP0 of 18 bytes; its first directory, which holds the orientation, is at its start).
_HEAD = 2048
_MAX_TAGS = 32
_ORIENTATION_TAG = 0x0112


def exif_orientation(encoded):
    """The EXIF orientation (1-8) of a JPEG's bytes: int32 scalar, 1 when there is none or it
    cannot be read (any other format, a damaged segment). TensorFlow ops only, so it runs in
    tf.data and inside the SavedModel. A file without "Exif" in its head costs a substring and
    a split (the reading is a branch not taken: a handful of ops, so that a lowered branch's
    untaken ops cost little); every read is bounds-safe, garbage gives 1."""
    head = tf.strings.substr(encoded, 0, _HEAD)
    parts = tf.strings.split(head, "Exif\0\0", maxsplit=1)
    found = tf.equal(tf.size(parts), 2) & tf.equal(tf.strings.substr(head, 0, 2), b"\xff\xd8")
    return tf.cond(found, lambda: _read_orientation(head, tf.strings.length(parts[0])),
                   lambda: tf.constant(1))


def _read_orientation(head, exif):
    """The orientation tag of the TIFF block after "Exif\0\0" at `exif` in `head` (the APP1
    marker 4 bytes before it), or 1."""
    padded = tf.strings.join([head, b"\0" * (_HEAD + 16 + 12 * _MAX_TAGS)])
    tiff = exif + 6
    # The TIFF header: byte order, 42, the first directory's offset; both readings, one kept.
    header = tf.strings.substr(padded, tiff, 8)
    little = tf.equal(tf.strings.substr(header, 0, 2), b"II")
    offset = tf.where(little, tf.io.decode_raw(tf.strings.substr(header, 4, 4), tf.int32)[0],
                      tf.io.decode_raw(tf.strings.substr(header, 4, 4), tf.int32,
                                       little_endian=False)[0])
    # The directory: a count, then 12-byte entries (tag, type, count, value).
    directory = tf.strings.substr(padded, tiff + tf.clip_by_value(offset, 0, _HEAD),
                                  2 + 12 * _MAX_TAGS)
    words = tf.where(little, tf.io.decode_raw(directory, tf.uint16),
                     tf.io.decode_raw(directory, tf.uint16, little_endian=False))
    words = tf.cast(words, tf.int32)
    entries = tf.reshape(words[1:], [_MAX_TAGS, 6])
    listed = tf.range(_MAX_TAGS) < words[0]
    value = tf.reduce_max(tf.where(listed & tf.equal(entries[:, 0], _ORIENTATION_TAG),
                                   entries[:, 4], 0))
    app1 = tf.equal(tf.strings.substr(padded, tf.maximum(exif - 4, 0), 2), b"\xff\xe1")
    return tf.where(app1 & (exif >= 4) & (value >= 1) & (value <= 8), value, 1)


def upright(image, orientation):
    """`image` `[H,W,C]` as EXIF `orientation` (1-8) says to show it (Pillow's
    `ImageOps.exif_transpose`): each orientation is a transpose (5-8) followed by a left-right
    flip (2, 3, 6, 7) and an upside-down flip (3, 4, 7, 8); three ops, no branch."""
    transposed = orientation >= 5
    flip_left_right = tf.reduce_any(tf.equal(orientation, [2, 3, 6, 7]))
    flip_up_down = tf.reduce_any(tf.equal(orientation, [3, 4, 7, 8]))
    image = tf.transpose(image, tf.where(transposed, [1, 0, 2], [0, 1, 2]))
    return tf.reverse(image, tf.boolean_mask([0, 1], tf.stack([flip_up_down, flip_left_right])))
