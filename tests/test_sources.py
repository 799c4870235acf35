import os
import shutil

import numpy as np
import pytest
from PIL import Image

from reid_tf.data import sources

DATASETS = os.path.join(os.path.dirname(__file__), "..", "datasets")


def write_image(path, size=(16, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((*size, 3), 128, np.uint8)).save(path)


def market_folder(root, names):
    for folder, files in names.items():
        for name in files:
            write_image(os.path.join(root, folder, name))
    return str(root)


def test_market_layout_drops_junk_keeps_distractors():
    root = os.path.join(DATASETS, "market1501/dummy_data/Market-1501-v15.09.15")
    splits = sources.parse_market_layout(root, max_person_id=1501, max_camera_id=6)
    assert sources.summarize(splits) == {"train": (6, 3, 5), "query": (2, 2, 2),
                                         "gallery": (3, 3, 3)}
    assert all(r.person_id != -1 for records in splits.values() for r in records)
    gallery = {r.file_name: (r.person_id, r.camera_id) for r in splits["gallery"]}
    assert gallery["0000_c1s1_000001_01.jpg"] == (0, 1)  # distractor kept, camera as in the name
    assert splits["train"][0].image.endswith("0002_c1s1_000451_03.jpg")


def test_market_layout_errors_name_the_path_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: folder not found; expected a Market"):
        sources.parse_market_layout(str(tmp_path / "nowhere"))
    root = market_folder(tmp_path / "m", {"bounding_box_train": ["0001_c1_a.jpg"],
                                          "query": ["0002_c1_a.jpg"],
                                          "bounding_box_test": ["person7.jpg"]})
    with pytest.raises(ValueError, match=r"person7.jpg: file name does not match the pattern"):
        sources.parse_market_layout(root)
    os.remove(os.path.join(root, "bounding_box_test", "person7.jpg"))
    with pytest.raises(ValueError, match=r"split 'gallery' has no images"):
        sources.parse_market_layout(root)
    shutil.rmtree(os.path.join(root, "query"))
    with pytest.raises(FileNotFoundError, match=r"query: folder not found"):
        sources.parse_market_layout(root)
    write_image(os.path.join(root, "query", "0002_c9_a.jpg"))
    write_image(os.path.join(root, "bounding_box_test", "0002_c2_a.jpg"))
    with pytest.raises(ValueError, match=r"0002_c9_a.jpg: camera id 9 outside 1..6"):
        sources.parse_market_layout(root, max_camera_id=6)


def test_corrupt_images_fail_with_their_list_or_are_skipped(tmp_path):
    root = market_folder(tmp_path, {"bounding_box_train": ["0001_c1_a.jpg", "0001_c2_b.jpg"],
                                    "query": ["0002_c1_a.jpg"],
                                    "bounding_box_test": ["0002_c2_a.jpg"]})
    good = os.path.join(root, "bounding_box_train", "0001_c1_a.jpg")
    bad = os.path.join(root, "bounding_box_train", "0001_c2_b.jpg")
    with open(good, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated JPEG
    splits = sources.parse_market_layout(root)
    with pytest.raises(ValueError, match=r"1 corrupt or unreadable image.*\n.*0001_c2_b.jpg"):
        sources.check_images(splits)
    logged = []
    kept = sources.check_images(splits, skip_corrupt=True, log=logged.append)
    assert [r.file_name for r in kept["train"]] == ["0001_c1_a.jpg"]
    assert logged == ["skipped 1 corrupt image(s)"]


def test_identity_folders(tmp_path):
    for person, count in [("alice", 2), ("bob", 3)]:
        for i in range(count):
            write_image(str(tmp_path / "train" / person / f"{i}.png"))
    write_image(str(tmp_path / "query" / "7" / "q.png"))
    write_image(str(tmp_path / "gallery" / "7" / "g.png"))
    splits = sources.parse_identity_folder_dataset(str(tmp_path / "train"),
                                                   str(tmp_path / "query"),
                                                   str(tmp_path / "gallery"))
    assert [(r.person_id, r.file_name) for r in splits["train"]][:3] == [
        (0, "alice/0.png"), (0, "alice/1.png"), (1, "bob/0.png")]
    assert (splits["query"][0].person_id, splits["query"][0].camera_id) == (7, 1)
    assert splits["gallery"][0].camera_id == 2  # query and gallery count as different cameras


def test_msmt17_lists():
    root = os.path.join(DATASETS, "msmt17/dummy_data/MSMT17_V1")
    splits = sources.parse_msmt17(root)
    assert [(r.person_id, r.camera_id) for r in splits["train"]] == [(0, 1), (1, 14), (1, 7)]
    assert [(r.person_id, r.camera_id) for r in splits["gallery"]] == [(0, 15), (2, 2)]


def test_viper_splits_are_disjoint_seeded_and_both_directions():
    root = os.path.join(DATASETS, "viper/dummy_data/VIPeR")
    a2b = sources.parse_viper(root, 3, "a2b")
    b2a = sources.parse_viper(root, 3, "b2a")
    train_ids = {r.person_id for r in a2b["train"]}
    test_ids = {r.person_id for r in a2b["query"]}
    assert len(train_ids) == len(test_ids) == 2 and not train_ids & test_ids
    assert {r.camera_id for r in a2b["query"]} == {1} and {r.camera_id for r in b2a["query"]} == {2}
    assert [r.file_name for r in a2b["query"]] == [r.file_name for r in b2a["gallery"]]
    assert a2b == sources.parse_viper(root, 3, "a2b")
    splits = {frozenset(r.person_id for r in sources.parse_viper(root, i)["train"])
              for i in range(10)}
    assert len(splits) > 1  # the 10 splits differ


def test_cuhk03_new_protocol_from_mat_files():
    root = os.path.join(DATASETS, "cuhk03/dummy_data")
    splits = sources.parse_cuhk03(root, "labeled")
    assert sources.summarize(splits) == {"train": (8, 2, 2), "query": (6, 3, 2),
                                         "gallery": (6, 3, 2)}
    first = splits["train"][0]
    assert first.file_name == "1_001_1_01.png" and first.image.shape == (32, 16, 3)
    assert first.image.dtype == np.uint8
    with pytest.raises(FileNotFoundError, match=r"cuhk-03.mat: file not found; expected CUHK03"):
        sources.parse_cuhk03(DATASETS, "labeled")


def test_real_cuhk03_pair1_counts(shared_dir):
    for kind in ("labeled", "detected"):
        splits = sources.parse_market_layout(os.path.join(shared_dir, "data",
                                                          f"cuhk03_pair1_{kind}"))
        assert sources.summarize(splits) == {"train": (4081, 421, 2), "query": (844, 422, 2),
                                             "gallery": (3252, 422, 2)}
        train_ids = {r.person_id for r in splits["train"]}
        assert not train_ids & {r.person_id for r in splits["query"]}
