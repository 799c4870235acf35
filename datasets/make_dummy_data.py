"""Writes each builder's dummy_data (tiny rendered images, never real people).

    python datasets/make_dummy_data.py

The builder tests assert the counts this script produces; change both together.
"""

import os
import zlib

import numpy as np
from PIL import Image

from reid_tf.data import synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
IDENTITY = synthetic.sample_identity(np.random.default_rng(7))
CAMERA = synthetic.sample_camera(np.random.default_rng(8))


def tiny_image(seed):
    return synthetic.render_person(IDENTITY, CAMERA, np.random.default_rng(seed), 32, 16)


def write(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(tiny_image(seed)).save(path)


def market_like(root, names):
    for split_folder, files in names.items():
        for i, name in enumerate(files):
            write(os.path.join(root, split_folder, name), zlib.crc32(name.encode()) % 1000)


def main():
    # market1501: train 3 ids x 2 (+1 junk), query 2 (ids 5, 6), gallery 2 ids + 1 distractor (+ junk).
    market_like(os.path.join(HERE, "market1501/dummy_data/Market-1501-v15.09.15"), {
        "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg",
                               "0007_c3s1_001051_02.jpg", "0007_c6s2_001111_01.jpg",
                               "0010_c1s1_002301_01.jpg", "0010_c5s3_012345_04.jpg",
                               "-1_c1s1_000401_03.jpg"],
        "query": ["0005_c1s1_001351_00.jpg", "0006_c2s1_001401_00.jpg"],
        "bounding_box_test": ["0005_c4s1_002351_01.jpg", "0006_c3s1_003401_02.jpg",
                              "0000_c1s1_000001_01.jpg", "-1_c2s1_000002_01.jpg"],
    })
    # dukemtmc_reid: train 2 ids x 2, query 1, gallery 2 (8 cameras).
    market_like(os.path.join(HERE, "dukemtmc_reid/dummy_data/DukeMTMC-reID"), {
        "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg",
                               "0003_c1_f0044158.jpg", "0003_c8_f0045281.jpg"],
        "query": ["0005_c2_f0046985.jpg"],
        "bounding_box_test": ["0005_c7_f0101202.jpg", "0006_c3_f0094516.jpg"],
    })
    # msmt17: train 2 (+1 val), query 1, gallery 2.
    root = os.path.join(HERE, "msmt17/dummy_data/MSMT17_V1")
    lists = {
        "list_train.txt": ("train", [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                     ("0001/0001_001_14_0303noon_0101_1.jpg", 1)]),
        "list_val.txt": ("train", [("0001/0001_002_07_0303noon_0102_0.jpg", 1)]),
        "list_query.txt": ("test", [("0000/0000_000_03_0303morning_0015_0.jpg", 0)]),
        "list_gallery.txt": ("test", [("0000/0000_001_15_0303afternoon_0020_0.jpg", 0),
                                      ("0002/0002_000_02_0304morning_0030_1.jpg", 2)]),
    }
    for list_name, (folder, entries) in lists.items():
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, list_name), "w") as f:
            for i, (relative, person_id) in enumerate(entries):
                write(os.path.join(root, folder, relative), 100 + i)
                f.write(f"{relative} {person_id}\n")
    # viper: 4 identities, one image per camera.
    for camera in ("cam_a", "cam_b"):
        for person in range(4):
            angle = 0 if camera == "cam_a" else 90
            write(os.path.join(HERE, f"viper/dummy_data/VIPeR/{camera}/{person:03d}_{angle}.bmp"),
                  200 + person)
    write_cuhk03(os.path.join(HERE, "cuhk03/dummy_data"))


def write_cuhk03(root):
    """cuhk-03.mat in MATLAB v7.3 (HDF5) form, and the new-protocol config files.

    Two camera pairs; pair 1 has 3 persons, pair 2 has 2; 10 image slots per person, some empty.
    """
    import h5py
    from scipy import io as scipy_io

    os.makedirs(os.path.join(root, "cuhk03_release"), exist_ok=True)
    persons_per_pair = [3, 2]
    names = []
    with h5py.File(os.path.join(root, "cuhk03_release/cuhk-03.mat"), "w") as mat:
        refs_group = mat.create_group("#refs#")
        counter = iter(range(10_000))
        for kind in ("labeled", "detected"):
            pair_refs = []
            for pair, persons in enumerate(persons_per_pair):
                cells = np.empty((10, persons), dtype=h5py.ref_dtype)  # stored transposed
                for person in range(persons):
                    for slot in range(10):
                        filled = slot in (0, 1, 5, 6)  # two images per view
                        data = (tiny_image(slot + 10 * person).T if filled
                                else np.zeros(2, np.uint64))
                        dataset = refs_group.create_dataset(f"img{next(counter)}", data=data)
                        cells[slot, person] = dataset.ref
                        if filled and kind == "labeled":
                            view = 1 if slot < 5 else 2
                            names.append(f"{pair + 1}_{person + 1:03d}_{view}_{slot + 1:02d}.png")
                pair_refs.append(refs_group.create_dataset(f"pair{kind}{pair}", data=cells).ref)
            mat.create_dataset(kind, data=np.array([pair_refs], dtype=h5py.ref_dtype))
    # Protocol: pair 1 persons 1-2 train; pair 1 person 3 and pair 2 persons test.
    labels = [int(n[0]) * 100 + int(n[2:5]) for n in names]  # a global id per (pair, person)
    train = [i for i, n in enumerate(names) if n.startswith("1_") and int(n[2:5]) <= 2]
    test = [i for i in range(len(names)) if i not in train]
    query, seen = [], set()
    for i in test:  # one query per person per view
        key = (labels[i], names[i].split("_")[2])
        if key not in seen:
            seen.add(key)
            query.append(i)
    gallery = [i for i in test if i not in query]
    for kind in ("labeled", "detected"):
        scipy_io.savemat(os.path.join(root, f"cuhk03_new_protocol_config_{kind}.mat"), {
            "filelist": np.array([[n] for n in names], dtype=object),
            "labels": np.array(labels)[:, None],
            "train_idx": np.array(train)[:, None] + 1,
            "query_idx": np.array(query)[:, None] + 1,
            "gallery_idx": np.array(gallery)[:, None] + 1,
            "camId": np.array([int(n.split("_")[2]) for n in names])[:, None],
        })
    print("cuhk03 dummy:", len(train), "train,", len(query), "query,", len(gallery), "gallery")


if __name__ == "__main__":
    main()
