"""Splits of a dataset: `load_splits(name)` -> `{split: Split}` (labels in memory, images read
on demand), the validation identities carved from training, and the images a folder holds.

Data comes from a TFDS builder (`"market1501"`, `"cuhk03/labeled"`, `"synthetic_persons"`, ...)
or straight from a folder (`"folder:/data/my_market_layout"`, `"identity_folders:/data/mine"`);
both give the same `Split`.
"""

import dataclasses
import io
import os
import zipfile

import numpy as np
from PIL import Image

from reid_tf import files
from reid_tf.data import sources


FOLDER_PREFIX = "folder:"


IDENTITY_FOLDERS_PREFIX = "identity_folders:"


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
                validation_identities=0.0, validation_seed=0, cache_in_memory=False,
                splits=None):
    """Loads `{split: Split}` for `dataset` (a TFDS name, `folder:PATH` or `identity_folders:PATH`).

    TFDS datasets are prepared on first use (from `manual_dir` for real datasets; generated for
    `synthetic_persons`) into `data_dir`, as ArrayRecord files, and their images are read by
    index while training (`RecordImages`); only labels and names are held in memory. With
    `cache_in_memory`, every encoded image is read into memory at start instead (a dataset
    prepared by an older reid-tf as TFRecord files is always loaded that way). Folders are read
    file by file either way. With `validation_identities > 0`, that share (< 1) or number (>= 1)
    of the *training* identities is held out as `val_query`/`val_gallery` (see
    `carve_validation`) and `train` keeps the rest. `splits`: the splits a caller needs, for a
    `folder:` dataset the only sub-folders read (None: all three).
    """
    splits = _load_splits(dataset, data_dir, manual_dir, skip_corrupt, log, cache_in_memory,
                          splits)
    if validation_identities:
        if "train" not in splits:
            raise ValueError(f"--dataset={dataset}: has no 'train' split to hold validation "
                             "identities out of.")
        splits.update(carve_validation(splits["train"], validation_identities, validation_seed))
    return splits


def subset(split, indices):
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
    return {"train": subset(train, np.flatnonzero(~is_held_out)),
            "val_query": subset(train, query), "val_gallery": subset(train, gallery)}


def _load_splits(dataset, data_dir, manual_dir, skip_corrupt, log, cache_in_memory,
                 needed=None):
    if dataset.startswith(FOLDER_PREFIX):
        records = sources.parse_market_layout(os.path.expanduser(dataset[len(FOLDER_PREFIX):]),
                                              splits=needed or tuple(sources.MARKET_LAYOUT))
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
        if not cache_in_memory:
            index = os.path.join(builder.data_dir, LABEL_INDEX.format(split=split))
            splits[split] = Split(images=RecordImages(source), are_paths=False,
                                  **_label_columns(source, index, f"{dataset} {split}", log))
            continue
        columns = _columns(_rows(source), ("image",) + LABEL_KEYS)
        splits[split] = _tfds_split(np.array(columns["image"], dtype=object), columns)
    return splits


LABEL_KEYS = ("person_id", "camera_id", "file_name")


def _rows(source):
    """Every row of a TFDS data source, read 4,096 at a time."""
    for start in range(0, len(source), 4096):
        yield from source.__getitems__(list(range(start, min(start + 4096, len(source)))))


def _columns(rows, keys):
    """{key: [each row's value]} over `rows`."""
    columns = {key: [] for key in keys}
    for row in rows:
        for key in keys:
            columns[key].append(row[key])
    return columns


def _label_arrays(columns):
    """A Split's `person_ids`, `camera_ids` and `file_names` from TFDS rows' columns (lists)."""
    return {"person_ids": np.array(columns["person_id"], np.int64),
            "camera_ids": np.array(columns["camera_id"], np.int64),
            "file_names": np.array([n.decode() for n in columns["file_name"]], dtype=object)}


# A streamed split's labels and names, kept beside its records after the first load, so that
# later loads read one small file instead of every record (28 s for 2.6 GB of JPEG records).
LABEL_INDEX = "reid_tf_labels.{split}.npz"


def _label_columns(source, path, name, log):
    """`person_ids`, `camera_ids` and `file_names` of a TFDS data source: from the label index
    at `path` when it matches the records (its length, and its first and last rows read back),
    else read from every record and written there for the next load (atomically; a folder that
    cannot be written only costs the next load the same read)."""
    columns = _read_label_index(path, source, log)
    if columns is not None:
        return columns
    log(f"{name}: reading the labels of {len(source)} records (once: kept in {path})")
    columns = _label_arrays(_columns(_rows(source), LABEL_KEYS))
    try:
        names = columns["file_names"].astype(str)  # no pickled objects in the file
        files.save_npz_atomically(path, {**columns, "file_names": names}, compressed=True)
    except OSError as error:
        log(f"{name}: could not keep the label index ({error}); the next load reads the "
            "records again")
    return columns


def _read_label_index(path, source, log):
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as index:
            columns = {"person_ids": index["person_ids"].astype(np.int64),
                       "camera_ids": index["camera_ids"].astype(np.int64),
                       "file_names": index["file_names"].astype(object)}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        log(f"{path}: unreadable label index ({type(error).__name__}: {error}), rebuilt")
        return None
    if any(len(column) != len(source) for column in columns.values()):
        log(f"{path}: label index of {len(columns['person_ids'])} rows for {len(source)} "
            "records, rebuilt")
        return None
    for i in {0, len(source) - 1} if len(source) else ():
        row = source[i]
        if (row["person_id"], row["camera_id"], row["file_name"].decode()) != (
                columns["person_ids"][i], columns["camera_ids"][i], columns["file_names"][i]):
            log(f"{path}: label index does not match record {i}, rebuilt")
            return None
    return columns


def _tfds_split(images, columns):
    """A Split from TFDS rows' label columns (lists) and its images."""
    return Split(images=images, are_paths=False, **_label_arrays(columns))


def _load_tfds_in_memory(builder):
    import tensorflow_datasets as tfds

    splits = {}
    for split in builder.info.splits:
        rows = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False,
                                                decoders={"image": tfds.decode.SkipDecoding()}))
        columns = _columns(rows, ("image",) + LABEL_KEYS)
        splits[split] = _tfds_split(np.array(columns["image"], dtype=object), columns)
    return splits


def relabel(person_ids):
    """Person ids -> contiguous labels 0..N-1 (sorted id order), and N."""
    identities, labels = np.unique(person_ids, return_inverse=True)
    return labels.astype(np.int32), len(identities)


def folder_split(folder, skip_corrupt=False, log=print):
    """Every image under `folder` (recursively, sorted) as a `Split`.

    Person id and camera are parsed from Market-style names; -1 where a name does not carry them.
    With `skip_corrupt`, every file is decoded once first and those that do not decode are left
    out (logged); else a bad file fails the extraction that reads it, naming it.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: folder not found.")
    paths = sorted(
        os.path.join(directory, sources.check_file_name(directory, name))
        for directory, _, names in os.walk(folder)
        for name in names if name.lower().endswith(sources.IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(sources.IMAGE_EXTENSIONS)}) in it.")
    if skip_corrupt:
        bad = {path for path, _ in sources.image_problems(paths)}
        if bad:
            log(f"skipped {len(bad)} corrupt image(s)")
            paths = [path for path in paths if path not in bad]
        if not paths:
            raise ValueError(f"{folder}: none of its images decodes.")
    labels = []
    for path in paths:
        match = sources.MARKET_PATTERN.match(os.path.basename(path))
        labels.append((int(match.group(1)), int(match.group(2))) if match else (-1, -1))
    labels = np.array(labels, np.int64)
    return Split(
        images=np.array(paths, dtype=object), are_paths=True, person_ids=labels[:, 0],
        camera_ids=labels[:, 1],
        file_names=np.array([os.path.relpath(p, folder) for p in paths], dtype=object))


def load_split(images=None, dataset=None, split="gallery", data_dir=None, skip_corrupt=False):
    """The images to extract: a folder (a Market layout root: its `split`; else every image in
    it), or a TFDS dataset's `split`."""
    if (images is None) == (dataset is None):
        raise ValueError("give exactly one of --images (a folder) and --dataset (a TFDS name).")
    if images is not None:
        images = os.path.expanduser(images)
        if os.path.isdir(os.path.join(images, sources.MARKET_LAYOUT["gallery"])):
            dataset = FOLDER_PREFIX + images
        else:
            return folder_split(images, skip_corrupt)
    splits = load_splits(dataset, data_dir=data_dir, skip_corrupt=skip_corrupt,
                         splits=(split,) if split in sources.MARKET_LAYOUT else None)
    if split not in splits:
        raise ValueError(f"--split={split}: {dataset} has splits {sorted(splits)}.")
    return splits[split]
