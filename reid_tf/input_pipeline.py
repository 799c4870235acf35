"""tf.data pipelines: P×K identity batches for training, stable-order batches for evaluation.

Data comes from a TFDS builder (`"market1501"`, `"cuhk03/labeled"`, `"synthetic_persons"`, ...)
or straight from a folder (`"folder:/data/my_market_layout"`,
`"identity_folders:/data/mine"`); both give the same `Split` and the same pipeline.

Images leave the pipeline as float32 RGB in [0, 255] at the model's size; the backbone's own
normalisation layer (see `backbones.ImageNormalization`) maps them to what it was trained on, so
training, evaluation and the SavedModel share one normalisation.
"""

import dataclasses
import io
import os

import numpy as np
from PIL import Image
import tensorflow as tf

from reid_tf import sources

FOLDER_PREFIX = "folder:"
IDENTITY_FOLDERS_PREFIX = "identity_folders:"
ERASING_FILL = (123.675, 116.28, 103.53)  # ImageNet mean pixel, as torchreid's random erasing


class RecordImages:
    """Encoded images read one by one, by index, from a TFDS split prepared as ArrayRecord: the
    streaming counterpart of an in-memory object array of bytes. Indexing with an array gives a
    view (subsets, e.g. validation identities, cost nothing); with an integer, the bytes."""

    def __init__(self, source, indices=None):
        self.source = source  # tfds ArrayRecordDataSource, images left encoded
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.source[int(self.indices[index])]["image"]
        return RecordImages(self.source, self.indices[index])


@dataclasses.dataclass
class Split:
    """One split: its images (encoded bytes in memory, file paths, or `RecordImages` read on
    demand) and their labels, in a stable order."""

    images: object  # object array of bytes; of file paths if `are_paths`; or RecordImages
    are_paths: bool
    person_ids: np.ndarray  # int64
    camera_ids: np.ndarray  # int64
    file_names: np.ndarray  # object array of str

    def __len__(self):
        return len(self.person_ids)

    @property
    def identities(self):
        return np.unique(self.person_ids)

    @classmethod
    def from_records(cls, records):
        def encoded(image):
            if isinstance(image, str):
                return image
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            return buffer.getvalue()

        are_paths = all(isinstance(r.image, str) for r in records)
        return cls(
            images=np.array([r.image if are_paths else encoded(r.image) for r in records],
                            dtype=object),
            are_paths=are_paths,
            person_ids=np.array([r.person_id for r in records], np.int64),
            camera_ids=np.array([r.camera_id for r in records], np.int64),
            file_names=np.array([r.file_name for r in records], dtype=object),
        )


VALIDATION_SPLITS = ("val_query", "val_gallery")


def load_splits(dataset, data_dir=None, manual_dir=None, skip_corrupt=False, log=print,
                validation_identities=0.0, validation_seed=0, cache_in_memory=False):
    """Loads `{split: Split}` for `dataset` (a TFDS name, `folder:PATH` or `identity_folders:PATH`).

    TFDS datasets are prepared on first use (from `manual_dir` for real datasets; generated for
    `synthetic_persons`) into `data_dir`, as ArrayRecord files, and their images are read by
    index while training (`RecordImages`); only labels and names are held in memory. With
    `cache_in_memory`, every encoded image is read into memory at start instead (a dataset
    prepared by an older reid-tf as TFRecord files is always loaded that way). Folders are read
    file by file either way. With `validation_identities > 0`, that share (< 1) or number (>= 1)
    of the *training* identities is held out as `val_query`/`val_gallery` (see
    `carve_validation`) and `train` keeps the rest.
    """
    splits = _load_splits(dataset, data_dir, manual_dir, skip_corrupt, log, cache_in_memory)
    if validation_identities:
        if "train" not in splits:
            raise ValueError(f"--dataset={dataset}: has no 'train' split to hold validation "
                             "identities out of.")
        splits.update(carve_validation(splits["train"], validation_identities, validation_seed))
    return splits


def _subset(split, indices):
    return Split(images=split.images[indices], are_paths=split.are_paths,
                 person_ids=split.person_ids[indices], camera_ids=split.camera_ids[indices],
                 file_names=split.file_names[indices])


def carve_validation(train, identities, seed=0):
    """Holds training identities out as a validation query/gallery, Market-style.

    `identities`: a share of the training identities (0 < x < 1, rounded, at least 1) or a
    number of them (an integer >= 1). The held-out identities are drawn with
    `numpy.random.default_rng(seed)`; each gives one query per camera (a random image of that
    camera), its other images form the gallery, as in the test split.

    Returns `{"train": the rest, "val_query": ..., "val_gallery": ...}`.
    """
    all_ids = np.unique(train.person_ids)
    if not 0 < identities < len(all_ids):
        raise ValueError(f"--validation_identities={identities}: expected a share in (0, 1) or "
                         f"a number in 1..{len(all_ids) - 1} of the {len(all_ids)} training "
                         "identities.")
    count = identities if identities >= 1 else max(1, int(round(identities * len(all_ids))))
    if count != int(count):
        raise ValueError(f"--validation_identities={identities}: a number of identities (>= 1) "
                         "must be an integer.")
    rng = np.random.default_rng(seed)
    held_out = np.sort(rng.choice(all_ids, int(count), replace=False))
    is_held_out = np.isin(train.person_ids, held_out)
    query = []
    for person in held_out:
        for camera in np.unique(train.camera_ids[train.person_ids == person]):
            candidates = np.flatnonzero((train.person_ids == person) & (train.camera_ids == camera))
            query.append(rng.choice(candidates))
    query = np.sort(np.array(query, np.int64))
    gallery = np.setdiff1d(np.flatnonzero(is_held_out), query)
    return {"train": _subset(train, np.flatnonzero(~is_held_out)),
            "val_query": _subset(train, query), "val_gallery": _subset(train, gallery)}


def _load_splits(dataset, data_dir, manual_dir, skip_corrupt, log, cache_in_memory):
    if dataset.startswith(FOLDER_PREFIX):
        records = sources.parse_market_layout(os.path.expanduser(dataset[len(FOLDER_PREFIX):]))
    elif dataset.startswith(IDENTITY_FOLDERS_PREFIX):
        root = os.path.expanduser(dataset[len(IDENTITY_FOLDERS_PREFIX):])
        records = sources.parse_identity_folder_dataset(
            *[os.path.join(root, s) if os.path.isdir(os.path.join(root, s)) else None
              for s in sources.SPLITS])
        if not records:
            raise FileNotFoundError(f"{root}: expected train/, query/ and/or gallery/ folders, "
                                    "each with one sub-folder per identity.")
    else:
        return _load_tfds(dataset, data_dir, manual_dir, skip_corrupt, log, cache_in_memory)
    records = sources.check_images(records, skip_corrupt, log)
    return {split: Split.from_records(r) for split, r in records.items()}


def _load_tfds(dataset, data_dir, manual_dir, skip_corrupt, log, cache_in_memory):
    import reid_datasets
    import tensorflow_datasets as tfds

    try:
        reid_datasets.register(dataset)
    except KeyError as error:
        raise ValueError(f"{error.args[0]} Or use folder:PATH / identity_folders:PATH.") from None
    try:
        builder = tfds.builder(dataset, data_dir=data_dir, skip_corrupt=skip_corrupt,
                               file_format="array_record")
    except ValueError as error:  # prepared before, in another format: read it as it is
        if "File format is already set" not in str(error):
            raise
        builder = tfds.builder(dataset, data_dir=data_dir, skip_corrupt=skip_corrupt)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        log(f"{dataset}: prepared as {builder.info.file_format.value} in {builder.data_dir}, "
            "which cannot be read by index: loading every image into memory (delete that folder "
            "to prepare it again for streaming)")
        return _load_tfds_in_memory(builder)
    splits = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split,
                                        decoders={"image": tfds.decode.SkipDecoding()})
        columns = {key: [] for key in ("person_id", "camera_id", "file_name")}
        images = []
        for start in range(0, len(source), 4096):  # labels and names; images too if caching
            for row in source.__getitems__(list(range(start, min(start + 4096, len(source))))):
                for key in columns:
                    columns[key].append(row[key])
                if cache_in_memory:
                    images.append(row["image"])
        splits[split] = _tfds_split(
            np.array(images, dtype=object) if cache_in_memory else RecordImages(source), columns)
    return splits


def _tfds_split(images, columns):
    """A Split from TFDS rows' label columns (lists) and its images."""
    return Split(images=images, are_paths=False,
                 person_ids=np.array(columns["person_id"], np.int64),
                 camera_ids=np.array(columns["camera_id"], np.int64),
                 file_names=np.array([n.decode() for n in columns["file_name"]], dtype=object))


def _load_tfds_in_memory(builder):
    import tensorflow_datasets as tfds

    splits = {}
    for split in builder.info.splits:
        rows = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False,
                                                decoders={"image": tfds.decode.SkipDecoding()}))
        columns = {key: [] for key in ("image", "person_id", "camera_id", "file_name")}
        for row in rows:
            for key in columns:
                columns[key].append(row[key])
        splits[split] = _tfds_split(np.array(columns["image"], dtype=object), columns)
    return splits


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


def relabel(person_ids):
    """Person ids -> contiguous labels 0..N-1 (sorted id order), and N."""
    identities, labels = np.unique(person_ids, return_inverse=True)
    return labels.astype(np.int32), len(identities)


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


def encoded_reader(split):
    """`index (int64 scalar tensor) -> encoded image bytes (string tensor)` for `split`, for
    tf.data maps: files are read by TensorFlow; bytes in memory and `RecordImages` are looked
    up in Python. Nothing is captured as a graph constant, which would hold every image twice
    and fail past protobuf's 2 GB."""
    if split.are_paths:
        paths = split.images

        def path(index):
            return np.asarray(paths[index], dtype=object).astype(bytes)

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
    global_batch = P * K
    image_size = tuple(image_size)
    labels, _ = relabel(split.person_ids)

    def epoch_indices(epoch):
        return pk_epoch(labels, P, K, np.random.default_rng([seed, int(epoch)]))

    stream = tf.data.Dataset.counter().map(
        lambda epoch: tf.ensure_shape(tf.numpy_function(epoch_indices, [epoch], tf.int64), [None])
    ).unbatch().enumerate()  # (position in the global stream, image index)
    stream = stream.skip(start_batch * global_batch)
    batch_size = global_batch
    if input_context is not None:
        pipelines, pipeline = input_context.num_input_pipelines, input_context.input_pipeline_id
        if global_batch % input_context.num_replicas_in_sync:
            raise ValueError(f"batch P*K={global_batch} does not divide over "
                             f"{input_context.num_replicas_in_sync} replicas.")
        share = global_batch // pipelines
        stream = stream.batch(global_batch, drop_remainder=True).map(
            lambda positions, indices: (positions[pipeline * share:(pipeline + 1) * share],
                                        indices[pipeline * share:(pipeline + 1) * share])
        ).unbatch()
        batch_size = input_context.get_per_replica_batch_size(global_batch)

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
