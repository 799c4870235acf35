"""tf.data pipelines: P×K identity batches for training, stable-order batches for evaluation.

Both read a `splits.Split` by index (`encoded_reader`), decode and resize with
`preprocessing.decode`, and emit float32 RGB in [0, 255] at the model's size.
"""

import dataclasses

import os

import numpy as np
import tensorflow as tf

from reid_tf.data.preprocessing import decode
from reid_tf.data.splits import relabel


ERASING_FILL = (123.675, 116.28, 103.53)  # ImageNet mean pixel, as torchreid's random erasing


def pk_epoch(labels, identities_per_batch, images_per_identity, rng):
    """One epoch of P×K batches as a flat index array (length a multiple of P*K).

    Every image appears at least once; each batch holds P distinct identities with K images
    each, grouped by identity. An identity's images are shuffled and cut into chunks of K; a
    short chunk is filled with other images of the same identity. Extra chunks (re-drawn images)
    are added only when the chunks cannot fill whole batches of P distinct identities; the
    schedule takes, for each batch, the P identities with the most chunks left (ties at random),
    which always completes.
    """
    P, K = identities_per_batch, images_per_identity
    identities = np.unique(labels)
    if len(identities) < P:
        raise ValueError(f"P={P} identities per batch, but the split has only {len(identities)}.")
    chunks = []
    for identity in identities:
        images = rng.permutation(np.flatnonzero(labels == identity))
        short = -len(images) % K
        if short:
            images = np.concatenate([images, rng.choice(images, short, replace=len(images) < short)])
        chunks.append(list(images.reshape(-1, K)))
    counts = np.array([len(c) for c in chunks])
    num_batches = max(-(-counts.sum() // P), counts.max())
    while counts.sum() < num_batches * P:  # top up the identities with the fewest chunks
        candidates = np.flatnonzero(counts == counts.min())
        identity = rng.choice(candidates)
        pool = np.flatnonzero(labels == identities[identity])
        chunks[identity].append(rng.choice(pool, K, replace=len(pool) < K))
        counts[identity] += 1
    batches = []
    for _ in range(num_batches):
        order = np.lexsort((rng.random(len(counts)), -counts))
        chosen = rng.permutation(order[:P])
        counts[chosen] -= 1
        batches.extend(chunks[i].pop() for i in chosen)
    return np.concatenate(batches).astype(np.int64)


def encoded_reader(split):
    """`index (int64 scalar tensor) -> encoded image bytes (string tensor)` for `split`, for
    tf.data maps: files are read by TensorFlow; bytes in memory and `RecordImages` are looked
    up in Python. Nothing is captured as a graph constant, which would hold every image twice
    and fail past protobuf's 2 GB."""
    if split.are_paths:
        paths = split.images

        def path(index):  # the file system's bytes of the name: any name the OS gave us
            return np.asarray(os.fsencode(paths[index]), dtype=object)

        return lambda index: tf.io.read_file(tf.ensure_shape(
            tf.numpy_function(path, [index], tf.string, stateful=False), []))
    images = split.images

    def encoded(index):
        return np.asarray(images[int(index)], dtype=object).astype(bytes)

    return lambda index: tf.ensure_shape(
        tf.numpy_function(encoded, [index], tf.string, stateful=False), [])


def _random_erasing(image, seed, probability, image_size):
    """Random erasing (Zhong et al., AAAI 2020): area 2-40 %, aspect 0.3-3.3, mean-pixel fill."""
    height, width = image_size
    u = tf.random.stateless_uniform([6], seed)
    area = (0.02 + u[0] * 0.38) * height * width
    log_aspect = tf.math.log(0.3) + u[1] * (tf.math.log(1 / 0.3) - tf.math.log(0.3))
    aspect = tf.exp(log_aspect)
    box_h = tf.minimum(tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32), height)
    box_w = tf.minimum(tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32), width)
    top = tf.cast(u[2] * tf.cast(height - box_h + 1, tf.float32), tf.int32)
    left = tf.cast(u[3] * tf.cast(width - box_w + 1, tf.float32), tf.int32)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    inside &= u[4] < probability
    return tf.where(inside[..., None], tf.constant(ERASING_FILL, tf.float32), image)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    flip: bool = True
    pad: int = 10  # pixels of zero padding before a random crop back to size; 0 = off
    erasing: float = 0.5  # random-erasing probability; 0 = off


def augment(image, seed, image_size, augmentation):
    """Deterministic given `seed` (shape [2] int): flip, pad-and-crop, random erasing."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    if augmentation.flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    if augmentation.pad:
        padded = tf.pad(image, [[augmentation.pad] * 2, [augmentation.pad] * 2, [0, 0]])
        image = tf.image.stateless_random_crop(padded, [*image_size, 3], seeds[1])
    if augmentation.erasing:
        image = _random_erasing(image, seeds[2], augmentation.erasing, image_size)
    return image


def schedule(labels, identities_per_batch, images_per_identity, seed=0, input_context=None,
             start_batch=0):
    """The endless P×K schedule one input pipeline reads: `(position, index)` int64 pairs, where
    `position` counts images in the global stream (it seeds the image's augmentation) and
    `index` is the training image.

    Epoch e is `pk_epoch(labels, P, K, rng([seed, e]))`. With an `input_context`, pipeline w of
    W takes the w-th of W equal slices of every global batch of P*K, so within an epoch the W
    pipelines (one per worker) read disjoint positions that together cover the whole schedule,
    and therefore every training image. `start_batch` skips that many global batches before
    anything is read (a resumed run continues the same schedule).
    """
    global_batch = identities_per_batch * images_per_identity

    def epoch_indices(epoch):
        return pk_epoch(labels, identities_per_batch, images_per_identity,
                        np.random.default_rng([seed, int(epoch)]))

    stream = tf.data.Dataset.counter().map(
        lambda epoch: tf.ensure_shape(tf.numpy_function(epoch_indices, [epoch], tf.int64), [None])
    ).unbatch().enumerate()  # (position in the global stream, image index)
    stream = stream.skip(start_batch * global_batch)
    if input_context is None:
        return stream
    pipelines, pipeline = input_context.num_input_pipelines, input_context.input_pipeline_id
    if global_batch % input_context.num_replicas_in_sync:
        raise ValueError(f"batch P*K={global_batch} does not divide over "
                         f"{input_context.num_replicas_in_sync} replicas.")
    share = global_batch // pipelines
    return stream.batch(global_batch, drop_remainder=True).map(
        lambda positions, indices: (positions[pipeline * share:(pipeline + 1) * share],
                                    indices[pipeline * share:(pipeline + 1) * share])
    ).unbatch()


def train_dataset(split, image_size, identities_per_batch=8, images_per_identity=4, seed=0,
                  augmentation=Augmentation(), input_context=None, start_batch=0):
    """Endless P×K training batches: {"image" [b,H,W,3] float32 0..255, "label" [b] int32}.

    Person ids are relabelled to 0..N-1 (N = `relabel(split.person_ids)[1]`). The batch order
    and every augmentation are fixed by `seed`. With an `input_context` (from
    `strategy.distribute_datasets_from_function`), input pipeline w of W takes the w-th of W equal
    slices of each global P×K batch and batches it per replica: workers read disjoint slots of
    the same schedule, and each replica gets its share of every batch (whole identities when P
    divides evenly). `start_batch` skips that many global batches (cheaply, before any decoding),
    so a resumed run sees exactly the batches an uninterrupted run would have.
    """
    P, K = identities_per_batch, images_per_identity
    image_size = tuple(image_size)
    labels, _ = relabel(split.person_ids)
    stream = schedule(labels, P, K, seed, input_context, start_batch)
    batch_size = P * K
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(P * K)

    read = encoded_reader(split)
    label_table = tf.constant(labels)

    def load(position, index):
        image = decode(read(index), image_size)
        image = augment(image, tf.stack([tf.cast(seed, tf.int64), position]), image_size,
                        augmentation)
        return {"image": image, "label": tf.gather(label_table, index)}

    return (stream.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


def eval_dataset(split, image_size, batch_size=64):
    """Evaluation batches in the split's stable order, no augmentation:
    {"image", "person_id", "camera_id", "file_name"}."""
    image_size = tuple(image_size)
    read = encoded_reader(split)
    data = tf.data.Dataset.from_tensor_slices({
        "image": np.arange(len(split), dtype=np.int64), "person_id": split.person_ids,
        "camera_id": split.camera_ids, "file_name": split.file_names.tolist(),
    })

    def load(example):
        return {**example, "image": decode(read(example["image"]), image_size)}

    return (data.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def encoded_batches(split, batch_size):
    """tf.data batches of encoded image bytes `[B]` (files read in parallel)."""
    data = tf.data.Dataset.range(len(split)).map(encoded_reader(split),
                                                 num_parallel_calls=tf.data.AUTOTUNE,
                                                 deterministic=True)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)
