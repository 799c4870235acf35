import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from reid_tf.data import pipeline
from reid_tf.data import splits as splits_lib
from reid_tf.data import synthetic
from reid_tf.train import distribute

DATASETS = os.path.join(os.path.dirname(__file__), "..", "datasets")
SMALL = synthetic.SyntheticConfig(num_train_ids=10, num_test_ids=6, images_per_id=6,
                                  height=64, width=32, seed=1)


@pytest.fixture(scope="module")
def splits():
    return {s: splits_lib.Split.from_records(r) for s, r in synthetic.generate(SMALL).items()}


@pytest.mark.parametrize("sizes", [[6] * 10, [1, 2, 3, 4, 5, 9, 13, 4, 4, 4], [20, 1, 1, 1]])
def test_pk_epoch_batches_and_coverage(sizes):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    P, K = 3, 4
    epoch = pipeline.pk_epoch(labels, P, K, np.random.default_rng(0))
    assert len(epoch) % (P * K) == 0
    assert set(epoch) == set(range(len(labels)))  # every image appears
    for batch in epoch.reshape(-1, P * K):
        groups = labels[batch].reshape(P, K)
        assert (groups == groups[:, :1]).all()  # K images of one identity, grouped
        assert len(set(groups[:, 0])) == P  # P distinct identities


def test_pk_epoch_needs_p_identities():
    with pytest.raises(ValueError, match="P=4 identities per batch, but the split has only 2"):
        pipeline.pk_epoch(np.array([0, 0, 1, 1]), 4, 2, np.random.default_rng(0))


def take(dataset, n):
    return [{k: v.numpy() for k, v in b.items()} for b in dataset.take(n)]


@pytest.mark.slow  # trains, or runs a tool in a process
def test_train_batches_relabel_resize_and_are_deterministic(splits):
    make = lambda seed: pipeline.train_dataset(splits["train"], (48, 24), 4, 3, seed=seed)
    first, again, other = take(make(0), 3), take(make(0), 3), take(make(1), 3)
    for batch in first:
        assert batch["image"].shape == (12, 48, 24, 3) and batch["image"].dtype == np.float32
        assert 0 <= batch["image"].min() and batch["image"].max() <= 255
        groups = batch["label"].reshape(4, 3)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 4
        assert set(batch["label"]) <= set(range(10))  # person ids 1..10 -> labels 0..9
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_an_epoch_covers_every_training_image(splits):
    split = splits["train"]
    labels, _ = splits_lib.relabel(split.person_ids)
    epoch = pipeline.pk_epoch(labels, 4, 3, np.random.default_rng([0, 0]))
    dataset = pipeline.train_dataset(split, (48, 24), 4, 3, seed=0,
                                           augmentation=pipeline.Augmentation(0, 0, 0))
    batches = take(dataset, len(epoch) // 12)
    seen = np.concatenate([b["image"] for b in batches])
    reference = [b["image"][0] for b in take(pipeline.eval_dataset(split, (48, 24), 1),
                                              len(split))]
    found = {int(np.argmin([np.abs(r - image).sum() for r in reference])) for image in seen}
    assert found == set(range(len(split)))


def test_augmentation_flips_pads_and_erases():
    image = tf.reshape(tf.range(8 * 4 * 3, dtype=tf.float32), [8, 4, 3])
    flips = [pipeline.augment(image, tf.constant([0, s], tf.int64), (8, 4),
                                    pipeline.Augmentation(True, 0, 0)) for s in range(20)]
    flipped = [f for f in flips if not np.array_equal(f, image)]
    assert flipped and all(np.array_equal(f, image[:, ::-1]) for f in flipped)
    erased = [pipeline.augment(image, tf.constant([0, s], tf.int64), (8, 4),
                                     pipeline.Augmentation(False, 0, 1.0)) for s in range(5)]
    for e in erased:
        changed = np.any(e.numpy() != image.numpy(), axis=-1)
        assert changed.any()
        np.testing.assert_allclose(e.numpy()[changed], np.broadcast_to(
            pipeline.ERASING_FILL, (changed.sum(), 3)))
    shifted = pipeline.augment(image, tf.constant([0, 3], tf.int64), (8, 4),
                                     pipeline.Augmentation(False, 2, 0))
    assert shifted.shape == (8, 4, 3) and (shifted.numpy() == 0).any()  # padding came in


def test_two_replicas_each_get_half_of_every_batch(splits):
    strategy = distribute.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    args = (splits["train"], (48, 24), 4, 3)
    plain = take(pipeline.train_dataset(*args, seed=5), 2)
    distributed = strategy.distribute_datasets_from_function(
        lambda context: pipeline.train_dataset(*args, seed=5, input_context=context))
    iterator = iter(distributed)
    for expected in plain:
        per_replica = strategy.experimental_local_results(next(iterator)["label"])
        assert [p.shape[0] for p in per_replica] == [6, 6]
        np.testing.assert_array_equal(np.concatenate(per_replica), expected["label"])


def test_workers_read_disjoint_slots_of_the_same_schedule(splits):
    class Context:  # what tf.distribute.InputContext tells one worker of two
        def __init__(self, worker):
            self.num_input_pipelines, self.input_pipeline_id = 2, worker
            self.num_replicas_in_sync = 2

        def get_per_replica_batch_size(self, global_batch):
            return global_batch // 2

    args = (splits["train"], (48, 24), 4, 3)
    full = take(pipeline.train_dataset(*args, seed=2), 4)
    workers = [take(pipeline.train_dataset(*args, seed=2, input_context=Context(w)), 4)
               for w in (0, 1)]
    for step, batch in enumerate(full):
        halves = [workers[w][step] for w in (0, 1)]
        np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), batch["label"])
        np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), batch["image"])
        assert not set(halves[0]["label"]) & set(halves[1]["label"])


class WorkerContext:  # what tf.distribute.InputContext tells worker w of W (one replica each)
    def __init__(self, worker, workers=2):
        self.num_input_pipelines, self.input_pipeline_id = workers, worker
        self.num_replicas_in_sync = workers


def epoch_of_each_worker(labels, P, K, seed, workers, epoch=0):
    """(positions, indices) that each worker's `pipeline.schedule` reads in epoch `epoch`."""
    length = len(pipeline.pk_epoch(labels, P, K, np.random.default_rng([seed, epoch])))
    before = sum(len(pipeline.pk_epoch(labels, P, K, np.random.default_rng([seed, e])))
                 for e in range(epoch))
    read = []
    for worker in range(workers):
        stream = pipeline.schedule(labels, P, K, seed, WorkerContext(worker, workers),
                                   start_batch=before // (P * K))
        pairs = np.array([(int(p), int(i)) for p, i in stream.take(length // workers)])
        read.append((pairs[:, 0], pairs[:, 1]))
    return read, before, length


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_share_out_each_epoch_without_overlap_and_use_every_image(workers):
    # 12 identities of 6 images, K=3: the schedule draws each image exactly once per epoch.
    labels = np.repeat(np.arange(12), 6)
    for epoch in (0, 1):
        read, before, length = epoch_of_each_worker(labels, 6, 3, 7, workers, epoch)
        positions = np.concatenate([p for p, _ in read])
        assert sorted(positions) == list(range(before, before + length))  # each slot once
        indices = [set(i) for _, i in read]
        for a in range(workers):
            for b in range(a + 1, workers):
                assert not indices[a] & indices[b], (epoch, a, b)  # no image on two workers
        assert set().union(*indices) == set(range(len(labels)))  # every image used
        assert sum(len(i) for _, i in read) == len(labels)


def test_with_uneven_identities_only_images_the_sampler_redraws_reach_two_workers():
    labels = np.repeat(np.arange(8), [1, 2, 3, 4, 5, 7, 9, 13])  # P×K pads short identities
    read, before, length = epoch_of_each_worker(labels, 4, 4, 3, 2)
    schedule = pipeline.pk_epoch(labels, 4, 4, np.random.default_rng([3, 0]))
    positions = np.concatenate([p for p, _ in read])
    assert sorted(positions) == list(range(length))  # each slot of the epoch read once
    assert set(read[0][1]) | set(read[1][1]) == set(range(len(labels)))
    drawn = np.bincount(schedule, minlength=len(labels))
    for image in set(read[0][1]) & set(read[1][1]):
        assert drawn[image] > 1  # a re-drawn image, never an image's only draw


def test_eval_dataset_keeps_order_and_labels(splits):
    batches = take(pipeline.eval_dataset(splits["gallery"], (64, 32), 7), 100)
    names = np.concatenate([b["file_name"] for b in batches]).astype(str)
    assert list(names) == list(splits["gallery"].file_names)
    np.testing.assert_array_equal(np.concatenate([b["person_id"] for b in batches]),
                                  splits["gallery"].person_ids)
    assert batches[0]["image"].shape == (7, 64, 32, 3)


def test_folder_and_tfds_sources_agree(tmp_path):
    root = synthetic.write_market_folder(synthetic.generate(
        synthetic.SyntheticConfig(num_train_ids=3, num_test_ids=3, images_per_id=4, height=32,
                                  width=16)), str(tmp_path / "market"))
    folder = splits_lib.load_splits(f"folder:{root}")
    assert len(folder["train"]) == 12 and len(folder["query"]) + len(folder["gallery"]) == 12
    assert folder["train"].are_paths and set(folder["train"].person_ids) == {1, 2, 3}
    market = splits_lib.load_splits("market1501", data_dir=str(tmp_path / "tfds"),
                                        manual_dir=os.path.join(DATASETS, "market1501/dummy_data"))
    assert sorted(market["train"].file_names) == sorted(
        n for n in os.listdir(os.path.join(DATASETS, "market1501/dummy_data",
                                           "Market-1501-v15.09.15", "bounding_box_train"))
        if not n.startswith("-1"))
    batch = next(iter(pipeline.eval_dataset(market["query"], (32, 16), 2)))
    assert batch["image"].shape == (2, 32, 16, 3)


@pytest.mark.slow  # trains, or runs a tool in a process
def test_streamed_tfds_images_give_the_same_batches_as_images_held_in_memory(tmp_path):
    streamed = splits_lib.load_splits("synthetic_persons/small", data_dir=str(tmp_path))
    cached = splits_lib.load_splits("synthetic_persons/small", data_dir=str(tmp_path),
                                        cache_in_memory=True)
    assert isinstance(streamed["train"].images, splits_lib.RecordImages)
    assert isinstance(cached["train"].images, np.ndarray)
    for name in ("train", "query", "gallery"):
        np.testing.assert_array_equal(streamed[name].person_ids, cached[name].person_ids)
        np.testing.assert_array_equal(streamed[name].file_names, cached[name].file_names)
    assert streamed["train"].images[5] == cached["train"].images[5]
    for a, b in zip(take(pipeline.train_dataset(streamed["train"], (64, 32), 4, 2, seed=3,
                                                      start_batch=2), 3),
                    take(pipeline.train_dataset(cached["train"], (64, 32), 4, 2, seed=3,
                                                      start_batch=2), 3)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # Subsets (validation identities) are views that read the right records.
    held = splits_lib.carve_validation(streamed["train"], 4, seed=1)
    held_cached = splits_lib.carve_validation(cached["train"], 4, seed=1)
    first = next(iter(pipeline.eval_dataset(held["val_gallery"], (64, 32), 8)))
    first_cached = next(iter(pipeline.eval_dataset(held_cached["val_gallery"], (64, 32), 8)))
    np.testing.assert_array_equal(first["image"], first_cached["image"])
    np.testing.assert_array_equal(first["file_name"], first_cached["file_name"])


def test_a_streamed_split_keeps_its_labels_in_an_index_that_must_match_the_records(
        tmp_path, monkeypatch):
    lines = []
    first = splits_lib.load_splits("synthetic_persons/small", data_dir=str(tmp_path),
                                   log=lines.append)
    assert sum("reading the labels of 160 records" in line for line in lines) == 1, lines
    index = next(tmp_path.rglob("reid_tf_labels.train.npz"))
    source_type = type(first["train"].images.source)
    batch_reads = []
    original = source_type.__getitems__
    monkeypatch.setattr(source_type, "__getitems__",
                        lambda self, keys: batch_reads.append(len(keys)) or original(self, keys))

    def load():
        lines.clear()
        return splits_lib.load_splits("synthetic_persons/small", data_dir=str(tmp_path),
                                      log=lines.append)

    def assert_same_columns(loaded):
        for name in ("train", "query", "gallery"):
            for column in ("person_ids", "camera_ids", "file_names"):
                np.testing.assert_array_equal(getattr(loaded[name], column),
                                              getattr(first[name], column))
            assert loaded[name].file_names.dtype == object
            assert isinstance(loaded[name].file_names[0], str)

    # Loaded again: from the index, not one batch read of the records.
    again = load()
    assert batch_reads == [] and lines == [], (batch_reads, lines)
    assert_same_columns(again)
    assert again["train"].images[7] == first["train"].images[7]

    # An index that does not match its records is read from the records again, and rewritten.
    with np.load(index) as kept:
        columns = {key: kept[key] for key in kept.files}
    columns["person_ids"] = columns["person_ids"][::-1].copy()
    np.savez(index, **columns)
    assert_same_columns(load())
    assert any("does not match record 0, rebuilt" in line for line in lines), lines
    assert batch_reads and sum(batch_reads) == 160
    batch_reads.clear()
    load()
    assert batch_reads == [] and lines == []
    np.savez(index, **{key: value[:-1] for key, value in columns.items()})
    assert_same_columns(load())
    assert any("of 159 rows for 160 records, rebuilt" in line for line in lines), lines
    index.write_bytes(b"not an npz file")
    assert_same_columns(load())
    assert any("unreadable label index" in line for line in lines), lines

    # A folder that cannot be written: the labels still load, and say the next load reads again.
    index.unlink()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(splits_lib.files.tempfile, "NamedTemporaryFile", refuse)
    assert_same_columns(load())
    assert any("could not keep the label index" in line for line in lines), lines
    assert not index.exists() and not list(tmp_path.rglob("*.npz.tmp"))


@pytest.mark.slow  # trains, or runs a tool in a process
def test_a_tfds_dataset_prepared_as_tfrecord_is_loaded_into_memory(tmp_path):
    import reid_datasets
    import tensorflow_datasets as tfds

    reid_datasets.register("synthetic_persons/small")
    tfds.builder("synthetic_persons/small", data_dir=str(tmp_path),
                 file_format="tfrecord").download_and_prepare()
    lines = []
    old = splits_lib.load_splits("synthetic_persons/small", data_dir=str(tmp_path),
                                     log=lines.append)
    assert isinstance(old["train"].images, np.ndarray) and len(old["train"]) == 160
    assert len(lines) == 1 and "prepared as tfrecord" in lines[0], lines
    assert next(iter(pipeline.train_dataset(old["train"], (64, 32), 4, 2)))[
        "image"].shape == (8, 64, 32, 3)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"dataset 'market1502'.*'cuhk03'.*folder:PATH"):
        splits_lib.load_splits("market1502")


def test_carve_validation_is_market_style_and_disjoint(splits):
    train = splits["train"]
    carved = splits_lib.carve_validation(train, 0.3, seed=4)
    query, gallery, rest = carved["val_query"], carved["val_gallery"], carved["train"]
    held_out = set(query.person_ids)
    assert len(held_out) == 3  # round(0.3 x 10 identities)
    assert held_out == set(gallery.person_ids)
    assert not held_out & set(rest.person_ids)
    assert len(query) + len(gallery) + len(rest) == len(train)
    names = [*query.file_names, *gallery.file_names, *rest.file_names]
    assert sorted(names) == sorted(train.file_names)  # every image exactly once
    for person in held_out:  # one query per camera of that person, the rest in the gallery
        cameras = train.camera_ids[train.person_ids == person]
        assert sorted(query.camera_ids[query.person_ids == person]) == sorted(set(cameras))
    again = splits_lib.carve_validation(train, 3, seed=4)  # a count: the same identities
    np.testing.assert_array_equal(again["val_query"].file_names, query.file_names)
    other = splits_lib.carve_validation(train, 3, seed=5)
    assert list(other["val_query"].file_names) != list(query.file_names)


@pytest.mark.parametrize("bad", [10, 0.0, 1.0 + 1e-9 + 9, -0.2, 2.5])
def test_carve_validation_rejects_bad_counts(splits, bad):
    with pytest.raises(ValueError, match="--validation_identities"):
        splits_lib.carve_validation(splits["train"], bad)


def test_load_splits_with_validation(tmp_path):
    root = tmp_path / "market"
    for split, folder in (("train", "bounding_box_train"), ("query", "query"),
                          ("gallery", "bounding_box_test")):
        (root / folder).mkdir(parents=True)
    records = synthetic.generate(SMALL)
    from PIL import Image
    for split, folder in (("train", "bounding_box_train"), ("query", "query"),
                          ("gallery", "bounding_box_test")):
        for i, r in enumerate(records[split]):
            Image.fromarray(r.image).save(
                root / folder / f"{r.person_id:04d}_c{r.camera_id}s1_{i:06d}_00.jpg")
    loaded = splits_lib.load_splits(f"folder:{root}", validation_identities=2,
                                        log=lambda line: None)
    assert set(loaded) == {"train", "query", "gallery", "val_query", "val_gallery"}
    assert len(set(loaded["train"].person_ids)) == 8
    assert len(loaded["query"]) == len(records["query"])  # the test split is untouched


def test_a_folder_without_bounding_box_train_serves_the_tools_that_only_evaluate(tmp_path):
    root = synthetic.write_market_folder(synthetic.generate(
        synthetic.SyntheticConfig(num_train_ids=2, num_test_ids=3, images_per_id=4, height=32,
                                  width=16)), str(tmp_path / "market"))
    shutil.rmtree(os.path.join(root, "bounding_box_train"))
    found = splits_lib.load_splits(f"folder:{root}", splits=("query", "gallery"))
    assert sorted(found) == ["gallery", "query"] and len(found["query"]) > 0
    assert len(splits_lib.load_split(images=root, split="gallery")) == len(found["gallery"])
    with pytest.raises(FileNotFoundError, match="bounding_box_train"):
        splits_lib.load_splits(f"folder:{root}")  # training still needs it
