"""Every TFDS builder on its dummy data, read back through the input pipeline's loader."""

import os

import numpy as np
import pytest

from reid_tf.data import pipeline
from reid_tf.data import splits as splits_lib

DATASETS = os.path.join(os.path.dirname(__file__), "..", "datasets")

# name: (expected {split: (images, identities)}, person id range, camera range)
EXPECTED = {
    "market1501": ({"train": (6, 3), "query": (2, 2), "gallery": (3, 3)}, (0, 1501), (1, 6)),
    "dukemtmc_reid": ({"train": (4, 2), "query": (1, 1), "gallery": (2, 2)}, (0, 9999), (1, 8)),
    "msmt17": ({"train": (3, 2), "query": (1, 1), "gallery": (2, 2)}, (0, 4100), (1, 15)),
    "viper/split0_a2b": ({"train": (4, 2), "query": (2, 2), "gallery": (2, 2)}, (0, 631), (1, 2)),
    "cuhk03/detected": ({"train": (8, 2), "query": (6, 3), "gallery": (6, 3)}, (1, 9999), (1, 2)),
    "synthetic_persons/small": ({"train": (160, 20), "query": (40, 20), "gallery": (120, 20)},
                                (1, 40), (1, 4)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builder_counts_ranges_and_decodable_images(name, tmp_path):
    counts, (low_id, high_id), (low_cam, high_cam) = EXPECTED[name]
    manual_dir = os.path.join(DATASETS, name.split("/")[0], "dummy_data")
    splits = splits_lib.load_splits(name, data_dir=str(tmp_path), manual_dir=manual_dir)
    assert {s: (len(v), len(v.identities)) for s, v in splits.items()} == counts
    for split in splits.values():
        assert low_id <= split.person_ids.min() and split.person_ids.max() <= high_id
        assert low_cam <= split.camera_ids.min() and split.camera_ids.max() <= high_cam
        batch = next(iter(pipeline.eval_dataset(split, (32, 16), 4)))
        assert batch["image"].shape[1:] == (32, 16, 3)
    if name != "synthetic_persons/small":
        test_ids = set(splits["query"].person_ids) | set(splits["gallery"].person_ids)
        assert not set(splits["train"].person_ids) & (test_ids - {0})


def test_market1501_drops_junk_and_keeps_distractors(tmp_path):
    splits = splits_lib.load_splits(
        "market1501", data_dir=str(tmp_path),
        manual_dir=os.path.join(DATASETS, "market1501/dummy_data"))
    assert -1 not in np.concatenate([s.person_ids for s in splits.values()])
    assert 0 in splits["gallery"].person_ids


def test_builder_fails_on_a_corrupt_image_unless_told_to_skip(tmp_path):
    import shutil

    manual = tmp_path / "manual"
    shutil.copytree(os.path.join(DATASETS, "market1501/dummy_data"), manual)
    bad = manual / "Market-1501-v15.09.15" / "query" / "0005_c1s1_001351_00.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"(?s)1 corrupt or unreadable image.*0005_c1s1_001351_00"):
        splits_lib.load_splits("market1501", data_dir=str(tmp_path / "a"),
                                   manual_dir=str(manual))
    splits = splits_lib.load_splits("market1501", data_dir=str(tmp_path / "b"),
                                        manual_dir=str(manual), skip_corrupt=True)
    assert len(splits["query"]) == 1
