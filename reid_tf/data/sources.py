"""ReID datasets as their users download them: plain parsers returning records, with checks.

Each parser returns `{split: [Record, ...]}` for splits `train`, `query`, `gallery`. The TFDS
builders in `datasets/` (package `reid_datasets`) and the direct folder reader of
`data.splits` both stand on these functions, so a folder and a prepared TFDS dataset give the
same records. Camera ids are as in the file names (Market's `c1` is camera 1); person ids are as in
the files too (training relabels them to 0..N-1 later).
"""

import concurrent.futures
import dataclasses
import os
import re

import numpy as np

SPLITS = ("train", "query", "gallery")
# Every kind TensorFlow's decoder (and so reid-serve) reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

MARKET_LAYOUT = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MARKET_PATTERN = re.compile(r"^(-?\d+)_c(\d+)")
MARKET_LAYOUT_HELP = (
    "expected a Market-1501 layout: bounding_box_train/, query/, bounding_box_test/ holding "
    "images named PPPP_cC..., e.g. 0002_c1s1_000451_03.jpg (person 0002, camera 1)"
)


@dataclasses.dataclass(frozen=True)
class Record:
    """One image: `image` is a file path or a decoded uint8 array `[H,W,3]`."""

    image: object
    person_id: int
    camera_id: int
    file_name: str


def check_file_name(folder, name):
    """Returns `name`; ValueError naming the file if it is not valid UTF-8 (tf.data and JSON
    need text names; undecodable bytes come back from os.listdir as surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{os.path.join(ascii(folder)[1:-1], ascii(name)[1:-1])}: the file name "
                         f"is not valid UTF-8 (bytes {os.fsencode(name)!r}); rename it.") from None
    return name


def _listdir_images(folder):
    return sorted(check_file_name(folder, name) for name in os.listdir(folder)
                  if name.lower().endswith(IMAGE_EXTENSIONS))


def _require_folder(path, layout_help):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: folder not found; {layout_help}.")


def _require_nonempty(split_records, root):
    for split, records in split_records.items():
        if not records:
            raise ValueError(f"{root}: split {split!r} has no images; an empty split is an error.")
    return split_records


def parse_market_name(file_name, pattern=MARKET_PATTERN):
    """(person_id, camera_id) from a Market-1501/DukeMTMC-reID file name; ValueError names it."""
    match = pattern.match(file_name)
    if not match:
        raise ValueError(
            f"{file_name}: file name does not match the pattern {pattern.pattern!r} "
            "(person id, '_c', camera id, as in 0002_c1s1_000451_03.jpg)."
        )
    return int(match.group(1)), int(match.group(2))


def parse_market_layout(root, max_person_id=None, max_camera_id=None,
                        splits=tuple(MARKET_LAYOUT)):
    """Market-1501 layout (also DukeMTMC-reID and any folder laid out the same way).

    Market-1501 (Zheng et al., ICCV 2015): train 12,936 images / 751 ids; query 3,368 / 750;
    gallery 15,913 / 751 ids incl. distractors (id 0); 6 cameras. DukeMTMC-reID (Ristani et al.
    2016; Zheng et al. 2017): train 16,522; query 2,228; gallery 17,661; 8 cameras.

    Person -1 ("junk") is dropped; person 0 (distractors) is kept.

    Args:
        root: folder holding bounding_box_train/, query/, bounding_box_test/.
        max_person_id, max_camera_id: optional range checks.
        splits: the splits to read (a tool that only evaluates needs no bounding_box_train/).
    """
    _require_folder(root, MARKET_LAYOUT_HELP)
    wanted, splits = splits, {}
    for split, sub_folder in MARKET_LAYOUT.items():
        if split not in wanted:
            continue
        folder = os.path.join(root, sub_folder)
        _require_folder(folder, MARKET_LAYOUT_HELP)
        records = []
        for name in _listdir_images(folder):
            person_id, camera_id = parse_market_name(name)
            if person_id == -1:
                continue
            if person_id < 0 or (max_person_id is not None and person_id > max_person_id):
                raise ValueError(f"{os.path.join(folder, name)}: person id {person_id} outside "
                                 f"0..{max_person_id}.")
            if camera_id < 1 or (max_camera_id is not None and camera_id > max_camera_id):
                raise ValueError(f"{os.path.join(folder, name)}: camera id {camera_id} outside "
                                 f"1..{max_camera_id}.")
            records.append(Record(os.path.join(folder, name), person_id, camera_id, name))
        splits[split] = records
    return _require_nonempty(splits, root)


def parse_identity_folders(root, camera_id=0):
    """A folder with one sub-folder per identity (no camera ids): records of one split.

    Person ids are the sub-folder names when all are integers, else their sorted order.
    """
    _require_folder(root, "expected one sub-folder per identity, each holding that person's images")
    names = sorted(check_file_name(root, n) for n in os.listdir(root)
                   if os.path.isdir(os.path.join(root, n)))
    numeric = all(n.lstrip("-").isdigit() for n in names)
    records = []
    for index, name in enumerate(names):
        person_id = int(name) if numeric else index
        for file_name in _listdir_images(os.path.join(root, name)):
            records.append(Record(os.path.join(root, name, file_name), person_id, camera_id,
                                  f"{name}/{file_name}"))
    if not records:
        raise ValueError(f"{root}: no images in identity sub-folders; an empty split is an error.")
    return records


def parse_identity_folder_dataset(train_dir=None, query_dir=None, gallery_dir=None):
    """Identity-folder data: query and gallery count as cameras 1 and 2 (so no match is removed)."""
    splits = {}
    if train_dir:
        splits["train"] = parse_identity_folders(train_dir)
    if query_dir:
        splits["query"] = parse_identity_folders(query_dir, camera_id=1)
    if gallery_dir:
        splits["gallery"] = parse_identity_folders(gallery_dir, camera_id=2)
    return splits


def first_existing_folder(root, names):
    """`root/name` for the first of `names` that exists, else `root/names[0]` (errors name it)."""
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return os.path.join(root, names[0])


def parse_msmt17(root):
    """MSMT17 (Wei et al., CVPR 2018): list_{train,val,query,gallery}.txt with train/ and test/.

    Statistics: train 32,621 images (train + val lists) / 1,041 ids; query 11,659 and gallery
    82,161 / 3,060 ids; 15 cameras. List lines are `<id folder>/<file> <person id>`; the camera is
    the third `_` field of the file name (`0000_000_01_0303morning_0015_0.jpg` is camera 1).
    """
    help_text = ("expected MSMT17: train/, test/ and list_train.txt, list_val.txt, "
                 "list_query.txt, list_gallery.txt")
    _require_folder(root, help_text)
    lists = {"train": [("train", "list_train.txt"), ("train", "list_val.txt")],
             "query": [("test", "list_query.txt")], "gallery": [("test", "list_gallery.txt")]}
    splits = {}
    for split, sources in lists.items():
        records = []
        for image_folder, list_name in sources:
            list_path = os.path.join(root, list_name)
            if not os.path.isfile(list_path):
                raise FileNotFoundError(f"{list_path}: file not found; {help_text}.")
            with open(list_path) as f:
                for line_number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        relative, person_id = line.split()
                        camera_id = int(os.path.basename(relative).split("_")[2])
                        person_id = int(person_id)
                    except (ValueError, IndexError):
                        raise ValueError(
                            f"{list_path}:{line_number}: {line.strip()!r} does not match "
                            "'<pid>/<pid>_<n>_<camera>_..._.jpg <pid>'."
                        ) from None
                    records.append(Record(os.path.join(root, image_folder, relative), person_id,
                                          camera_id, relative))
        splits[split] = records
    return _require_nonempty(splits, root)


VIPER_NUM_SPLITS = 10


def parse_viper(root, split_index=0, direction="a2b", seed=0):
    """VIPeR (Gray et al., PETS 2007): 632 identities, one image in cam_a/ and one in cam_b/.

    Identity i is the i-th file of each folder in sorted order (as in torchreid). Each of the
    `VIPER_NUM_SPLITS` seeded splits draws 316 training and 316 test identities; `direction`
    `"a2b"` queries camera A (camera 1) against camera B (camera 2), `"b2a"` the reverse.
    """
    help_text = "expected VIPeR: cam_a/ and cam_b/ with one image per person each, same order"
    if direction not in ("a2b", "b2a"):
        raise ValueError(f"direction={direction!r}: expected 'a2b' or 'b2a'.")
    if not 0 <= split_index < VIPER_NUM_SPLITS:
        raise ValueError(f"split_index={split_index}: expected 0..{VIPER_NUM_SPLITS - 1}.")
    cameras = []
    for camera in ("cam_a", "cam_b"):
        folder = os.path.join(root, camera)
        _require_folder(folder, help_text)
        cameras.append([os.path.join(folder, n) for n in _listdir_images(folder)])
    if len(cameras[0]) != len(cameras[1]) or not cameras[0]:
        raise ValueError(f"{root}: cam_a has {len(cameras[0])} images and cam_b "
                         f"{len(cameras[1])}; {help_text}.")
    num_ids = len(cameras[0])
    order = np.random.default_rng([seed, split_index]).permutation(num_ids)
    train_ids, test_ids = sorted(order[: num_ids // 2]), sorted(order[num_ids // 2:])

    def records(ids, camera_index):
        return [Record(cameras[camera_index][i], int(i), camera_index + 1,
                       os.path.basename(cameras[camera_index][i])) for i in ids]

    query_camera = 0 if direction == "a2b" else 1
    return {
        "train": records(train_ids, 0) + records(train_ids, 1),
        "query": records(test_ids, query_camera),
        "gallery": records(test_ids, 1 - query_camera),
    }


CUHK03_HELP = ("expected CUHK03: cuhk03_release/cuhk-03.mat (or cuhk-03.mat) and "
               "cuhk03_new_protocol_config_{labeled,detected}.mat")


def _find_file(root, candidates):
    for candidate in candidates:
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{os.path.join(root, candidates[0])}: file not found; {CUHK03_HELP}.")


def read_cuhk03_images(mat_path, kind):
    """Images of cuhk-03.mat (MATLAB v7.3) as {torchreid file name: uint8 [H,W,3]}.

    Names follow torchreid: `{camera pair}_{person:03d}_{view}_{image:02d}.png`, view 1 for the
    first five images of a person and 2 for the rest; empty cells are skipped.
    """
    import h5py  # only CUHK03 needs it

    images = {}
    with h5py.File(mat_path, "r") as mat:
        for pair_index, pair_ref in enumerate(mat[kind][0]):
            pair = mat[pair_ref][:].T  # [persons, 10] references
            for person_index in range(pair.shape[0]):
                for image_index, image_ref in enumerate(pair[person_index]):
                    image = mat[image_ref][:].T
                    if image.size == 0 or image.ndim < 3:
                        continue
                    view = 1 if image_index < 5 else 2
                    name = f"{pair_index + 1}_{person_index + 1:03d}_{view}_{image_index + 1:02d}.png"
                    images[name] = np.ascontiguousarray(image, dtype=np.uint8)
    return images


def parse_cuhk03(root, kind="labeled"):
    """CUHK03 (Li et al., CVPR 2014), new protocol (Zhong et al., CVPR 2017): 767 training and
    700 test identities; labeled: 7,368 train / 1,400 query / 5,328 gallery images; detected:
    7,365 / 1,400 / 5,332; 2 cameras per pair.
    """
    if kind not in ("labeled", "detected"):
        raise ValueError(f"kind={kind!r}: expected 'labeled' or 'detected'.")
    from scipy import io as scipy_io

    mat_path = _find_file(root, ["cuhk03_release/cuhk-03.mat", "cuhk-03.mat"])
    config_path = _find_file(root, [f"cuhk03_new_protocol_config_{kind}.mat"])
    config = scipy_io.loadmat(config_path)
    images = read_cuhk03_images(mat_path, kind)
    file_list = [str(np.ravel(entry)[0]) for entry in config["filelist"].flatten()]
    labels = config["labels"].flatten()
    splits = {}
    for split, key in [("train", "train_idx"), ("query", "query_idx"), ("gallery", "gallery_idx")]:
        records = []
        for index in config[key].flatten() - 1:
            name = file_list[index]
            if name not in images:
                raise ValueError(f"{config_path}: {name} is listed but not in {mat_path}.")
            records.append(Record(images[name], int(labels[index]), int(name.split("_")[2]), name))
        splits[split] = records
    return _require_nonempty(splits, root)


def _image_problem(path):
    """None if TensorFlow's decoder (the one training and the export use) reads the file whole,
    else `(path, reason)`. Pillow is not the judge: it reads formats (TIFF, WebP, ...) that
    `tf.io.decode_image` refuses, and those would pass a Pillow check and fail mid-training."""
    import tensorflow as tf

    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        if image.shape[0] == 0 or image.shape[1] == 0:
            return path, "decodes to an empty image"
        return None
    except (tf.errors.OpError, OSError) as error:
        message = getattr(error, "message", None) or str(error)
        return path, message.strip().splitlines()[0] if message.strip() else type(error).__name__


def image_problems(paths):
    """`[(path, reason)]` for the files of `paths` that TensorFlow's decoder does not read whole
    (decoded in parallel threads)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return [p for p in pool.map(_image_problem, paths) if p]


def check_images(split_records, skip_corrupt=False, log=print):
    """Decodes every image file once; bad files fail with their list, or are skipped if asked.

    Returns the records that decode. Records holding arrays are kept as they are.
    """
    paths = sorted({r.image for records in split_records.values() for r in records
                    if isinstance(r.image, str)})
    problems = image_problems(paths)
    if not problems:
        return split_records
    if not skip_corrupt:
        listing = "\n  ".join(f"{path}: {error}" for path, error in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ValueError(f"{len(problems)} corrupt or unreadable image(s) (--skip_corrupt "
                         f"leaves them out):\n  {listing}{more}")
    bad = {path for path, _ in problems}
    log(f"skipped {len(bad)} corrupt image(s)")
    kept = {split: [r for r in records if not (isinstance(r.image, str) and r.image in bad)]
            for split, records in split_records.items()}
    return _require_nonempty(kept, "after skipping corrupt images")


def summarize(split_records):
    """{split: (images, identities, cameras)} for logs, tests and READMEs."""
    return {split: (len(records), len({r.person_id for r in records}),
                    len({r.camera_id for r in records}))
            for split, records in split_records.items()}
