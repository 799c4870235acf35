"""Embeddings through a SavedModel export, and the features.npz files that hold them.

    reid-extract --export=runs/demo/export/1140 --images=../shared/data/cuhk03_pair1_labeled \
        --split=gallery --output=gallery.npz          # Market layout: one split
    reid-extract --export=runs/demo/export/1140 --images=photos/ --output=photos.npz
    reid-extract --export=runs/demo/export/1140 --dataset=synthetic_persons --split=gallery \
        --output=gallery.npz                          # a TFDS dataset

features.npz: `embeddings` float32 `[N, E]` (L2-normalised), `file_names` str `[N]`, and where
every file name carries them (Market's `PPPP_cC...`), `person_ids` and `camera_ids` int64 `[N]`.
The export runs through its `serve_encoded` signature, so decoding and resizing are the graph's
own, identical to evaluation's.
"""

import os
import sys
import tempfile

import numpy as np

from reid_tf import sources

FEATURE_KEYS = ("embeddings", "file_names", "person_ids", "camera_ids")


class Export:
    """A SavedModel export loaded with plain `tf.saved_model.load` (no reid_tf model code).

    `embed_images(uint8 [N,H,W,3])` and `embed_encoded(list of JPEG/PNG bytes)` return the
    signature's outputs as numpy arrays.
    """

    def __init__(self, path):
        import tensorflow as tf

        path = os.path.normpath(os.path.expanduser(path))
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise FileNotFoundError(f"{path}: no saved_model.pb; expected a SavedModel export "
                                    "folder, <export_dir>/<version> as reid-train writes it.")
        self.path = path
        self.version = int(os.path.basename(path)) if os.path.basename(path).isdigit() else 1
        self.module = tf.saved_model.load(path)
        self.signatures = dict(self.module.signatures)
        missing = {"serving_default", "serve_encoded"} - set(self.signatures)
        if missing:
            raise ValueError(f"{path}: signatures {sorted(missing)} missing; not a reid-tf export.")
        # The size the model was trained at (None for exports older than this attribute).
        size = getattr(self.module, "image_size_variable", None)
        self.image_size = tuple(int(v) for v in size.numpy()) if size is not None else None

    def embed_images(self, images):
        outputs = self.signatures["serving_default"](images=images)
        return {key: value.numpy() for key, value in outputs.items()}

    def embed_encoded(self, images):
        import tensorflow as tf

        outputs = self.signatures["serve_encoded"](images=tf.constant(images, tf.string))
        return {key: value.numpy() for key, value in outputs.items()}

    def signature_def(self):
        """TF Serving's `signature_def` JSON of GET /v1/models/<name>/metadata."""
        def tensor_info(spec, name):
            dims = [{"size": str(-1 if size is None else size)} for size in spec.shape]
            return {"dtype": "DT_" + spec.dtype.name.upper(), "tensor_shape": {"dim": dims},
                    "name": name}

        signature_def = {}
        for key, function in self.signatures.items():
            inputs = function.structured_input_signature[1]
            outputs = function.structured_outputs
            signature_def[key] = {
                "inputs": {name: tensor_info(spec, f"{key}_{name}:0")
                           for name, spec in inputs.items()},
                "outputs": {name: tensor_info(tensor, f"StatefulPartitionedCall:{index}")
                            for index, (name, tensor) in enumerate(sorted(outputs.items()))},
                "method_name": "tensorflow/serving/predict",
            }
        return {"signature_def": {"signature_def": signature_def}}


def enable_memory_growth():
    """GPU memory on demand (TensorFlow otherwise takes nearly all of it at start), so a server
    or an extraction can share the GPU. Call before TensorFlow touches a GPU; no GPU: no-op."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def folder_split(folder):
    """Every image under `folder` (recursively, sorted) as an `input_pipeline.Split`.

    Person id and camera are parsed from Market-style names; -1 where a name does not carry them.
    """
    from reid_tf import input_pipeline

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: folder not found.")
    paths = sorted(
        os.path.join(directory, sources.check_file_name(directory, name))
        for directory, _, names in os.walk(folder)
        for name in names if name.lower().endswith(sources.IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(sources.IMAGE_EXTENSIONS)}) in it.")
    labels = []
    for path in paths:
        match = sources.MARKET_PATTERN.match(os.path.basename(path))
        labels.append((int(match.group(1)), int(match.group(2))) if match else (-1, -1))
    labels = np.array(labels, np.int64)
    return input_pipeline.Split(
        images=np.array(paths, dtype=object), are_paths=True, person_ids=labels[:, 0],
        camera_ids=labels[:, 1],
        file_names=np.array([os.path.relpath(p, folder) for p in paths], dtype=object))


def load_split(images=None, dataset=None, split="gallery", data_dir=None, skip_corrupt=False):
    """The images to extract: a folder (a Market layout root: its `split`; else every image in
    it), or a TFDS dataset's `split`."""
    from reid_tf import input_pipeline

    if (images is None) == (dataset is None):
        raise ValueError("give exactly one of --images (a folder) and --dataset (a TFDS name).")
    if images is not None:
        images = os.path.expanduser(images)
        if os.path.isdir(os.path.join(images, sources.MARKET_LAYOUT["gallery"])):
            dataset = input_pipeline.FOLDER_PREFIX + images
        else:
            return folder_split(images)
    splits = input_pipeline.load_splits(dataset, data_dir=data_dir, skip_corrupt=skip_corrupt)
    if split not in splits:
        raise ValueError(f"--split={split}: {dataset} has splits {sorted(splits)}.")
    return splits[split]


def encoded_batches(split, batch_size):
    """tf.data batches of encoded image bytes `[B]` (files read in parallel)."""
    import tensorflow as tf

    from reid_tf import input_pipeline

    data = tf.data.Dataset.range(len(split)).map(input_pipeline.encoded_reader(split),
                                                 num_parallel_calls=tf.data.AUTOTUNE,
                                                 deterministic=True)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def extract(export, split, batch_size=64, progress=True):
    """Embeddings `[N, E]` of every image of `split` through `export`'s `serve_encoded`.

    An image that does not decode raises ValueError naming its file.
    """
    import tensorflow as tf
    from tqdm import tqdm

    signature = export.signatures["serve_encoded"]
    embeddings = []
    with tqdm(total=len(split), unit="img", desc="extracting", disable=not progress,
              file=sys.stderr) as bar:
        for batch in encoded_batches(split, batch_size):
            try:
                embeddings.append(signature(images=batch)["embedding"].numpy())
            except tf.errors.InvalidArgumentError:
                start = sum(len(e) for e in embeddings)
                index = first_undecodable(batch.numpy())
                name = split.file_names[start + (index or 0)]
                raise ValueError(f"{name}: not a decodable JPEG/PNG/BMP image." if index is not None
                                 else f"{name}...: a batch failed to decode.") from None
            bar.update(len(embeddings[-1]))
    return np.concatenate(embeddings).astype(np.float32)


def first_undecodable(images):
    """The index of the first encoded image that does not decode, or None (after a batch
    failed inside a signature, to name the culprit)."""
    import tensorflow as tf

    for index, data in enumerate(images):
        try:
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            return index
    return None


def feature_arrays(embeddings, file_names, person_ids=None, camera_ids=None):
    """The arrays of a features.npz. Person ids and cameras are left out when a camera is -1
    (a name that did not carry them)."""
    arrays = {"embeddings": np.asarray(embeddings, np.float32),
              "file_names": np.asarray(file_names, dtype=str)}
    if person_ids is not None and camera_ids is not None and np.all(np.asarray(camera_ids) >= 0):
        arrays["person_ids"] = np.asarray(person_ids, np.int64)
        arrays["camera_ids"] = np.asarray(camera_ids, np.int64)
    return arrays


def save_features(path, embeddings, file_names, person_ids=None, camera_ids=None):
    """Writes features.npz (`feature_arrays`) atomically (a temporary file renamed when
    complete)."""
    arrays = feature_arrays(embeddings, file_names, person_ids, camera_ids)
    check_output_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz.tmp", delete=False) as file:
        try:
            np.savez(file, **arrays)
            file.close()
            os.replace(file.name, path)
        except BaseException:
            os.unlink(file.name)  # never an orphan temporary file
            raise
    return arrays


def check_output_path(path):
    """Refuses, before any work, an output path that cannot become a file: ValueError."""
    from reid_tf import workdir

    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise ValueError(f"--output={path}: is a folder; give a file name (e.g. "
                         f"{os.path.join(path, 'features.npz')}).")
    workdir.check_can_create(os.path.dirname(path), "--output")


def load_features(path):
    """features.npz -> dict of arrays; ValueError names a missing or inconsistent array."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in FEATURE_KEYS if key in data}
    for key in ("embeddings", "file_names"):
        if key not in arrays:
            raise ValueError(f"{path}: array {key!r} missing; expected a reid-extract "
                             "features.npz.")
    embeddings = arrays["embeddings"]
    if embeddings.ndim != 2:
        raise ValueError(f"{path}: 'embeddings' has shape {embeddings.shape}; expected [N, E].")
    for key, array in arrays.items():
        if len(array) != len(embeddings):
            raise ValueError(f"{path}: {key!r} has {len(array)} rows, 'embeddings' "
                             f"{len(embeddings)}.")
    return arrays


def run():
    """reid-extract: an export over a folder or a dataset split -> features.npz."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app
    from absl import flags

    flags.DEFINE_string("export", None, "A SavedModel export folder (<export_dir>/<version>).")
    flags.DEFINE_string("images", None, "A folder of images: a Market layout root (then --split "
                        "picks the sub-folder) or any folder (every image in it, recursively).")
    flags.DEFINE_string("dataset", None, "Or a TFDS dataset name (synthetic_persons, ...).")
    flags.DEFINE_enum("split", "gallery", list(sources.SPLITS), "Split of a Market layout or "
                      "dataset.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
    flags.DEFINE_string("output", "features.npz", "Where features.npz goes.")
    flags.DEFINE_integer("batch_size", 64, "Images per batch.")
    flags.DEFINE_bool("skip_corrupt", False, "Leave out images of a Market layout or dataset "
                      "that do not decode (else fail, naming them).")
    flags.mark_flag_as_required("export")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        options = flags.FLAGS
        if options.batch_size < 1:
            raise app.UsageError("--batch_size: expected a positive integer.")
        enable_memory_growth()
        try:
            check_output_path(options.output)  # before any work
            export = Export(options.export)
            split = load_split(options.images, options.dataset, options.split, options.data_dir,
                               options.skip_corrupt)
            embeddings = extract(export, split, options.batch_size)
            arrays = save_features(options.output, embeddings, split.file_names,
                                   split.person_ids, split.camera_ids)
        except (ValueError, OSError) as error:  # OSError: names its path
            print(f"reid-extract: error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)
        labelled = "with" if "person_ids" in arrays else "without"
        print(f"wrote {options.output}: {len(embeddings)} embeddings of {embeddings.shape[1]}, "
              f"{labelled} person ids and cameras")

    app.run(main)


if __name__ == "__main__":
    run()
