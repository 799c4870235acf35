"""reid-extract: an export over a folder or a dataset split -> features.npz.

    reid-extract --export=runs/demo/export/1140 --images=../shared/data/cuhk03_pair1_labeled \
        --split=gallery --output=gallery.npz          # Market layout: one split
    reid-extract --export=runs/demo/export/1140 --images=photos/ --output=photos.npz
    reid-extract --export=runs/demo/export/1140 --dataset=synthetic_persons --split=gallery \
        --output=gallery.npz                          # a TFDS dataset

    reid-extract --runner=DirectRunner --export=runs/demo/export/1140 --images=/data/cams \
        --output=features/ -- --direct_num_workers=2 --direct_running_mode=multi_processing
                                                      # Apache Beam: sharded Parquet + dead letters

The export runs through its `serve_encoded` signature, so decoding and resizing are the graph's
own, identical to evaluation's (`evaluate.features_npz` says what the file holds).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from reid_tf.extras import MissingPackage  # noqa: E402

from reid_tf import options  # noqa: E402
from reid_tf.data import sources  # noqa: E402

FLAGS = flags.FLAGS
options.define("export", str, options.EXPORT)
flags.DEFINE_string("images", None, "A folder of images: a Market layout root (then --split "
                    "picks the sub-folder) or any folder (every image in it, recursively).")
options.define("dataset", str, options.DATASET.replace(
    default=None, help="Or a TFDS dataset name (synthetic_persons, ...)."))
flags.DEFINE_enum("split", "gallery", list(sources.SPLITS), "Split of a Market layout or "
                  "dataset.")
options.define("data_dir", str, options.DATA_DIR)
flags.DEFINE_string("output", "features.npz", "Where features.npz goes; with --runner, the "
                    "folder (or bucket path) of the Parquet shards and dead letters.")
flags.DEFINE_string("runner", None, "Run the extraction as an Apache Beam pipeline on this "
                    "runner (DirectRunner, FlinkRunner, SparkRunner, DataflowRunner; needs "
                    "reid-tf[beam]); Beam's own options follow a `--`. --images may then also "
                    "be a glob.")
flags.DEFINE_integer("num_shards", 0, "With --runner: Parquet shards (0: the runner decides).")
options.define("batch_size", int, options.BATCH_SIZE.replace(help="Images per batch."))
options.define("skip_corrupt", bool, options.SKIP_CORRUPT.replace(
    help="Leave out images that do not decode (else fail, naming them)."))


def main(argv):
    if len(argv) > 1 and not FLAGS.runner:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.batch_size < 1:
        raise app.UsageError("--batch_size: expected a positive integer.")
    if FLAGS.runner:
        return run_beam(argv[1:])
    from reid_tf.data import splits
    from reid_tf.deploy import runtime
    from reid_tf.evaluate import features_npz
    from reid_tf.evaluate.extract import UndecodableImage
    from reid_tf.evaluate.extract import extract

    runtime.enable_memory_growth()
    try:
        features_npz.check_output_path(FLAGS.output)  # before any work
        export = runtime.open_runtime(FLAGS.export)
        split = splits.load_split(FLAGS.images, FLAGS.dataset, FLAGS.split, FLAGS.data_dir,
                                  FLAGS.skip_corrupt)
        try:
            embeddings = extract(export, split, ["embedding"], FLAGS.batch_size, encoded=True,
                                 description="extracting")["embedding"]
        except UndecodableImage as error:
            raise ValueError(f"{error} (--skip_corrupt leaves such files out)") from None
        arrays = features_npz.save_features(FLAGS.output, embeddings, split.file_names,
                                            split.person_ids, split.camera_ids)
    except (ValueError, OSError, MissingPackage) as error:  # OSError: names its path
        print(f"reid-extract: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    labelled = "with" if "person_ids" in arrays else "without"
    print(f"wrote {FLAGS.output}: {len(embeddings)} embeddings of {embeddings.shape[1]}, "
          f"{labelled} person ids and cameras")


def run_beam(pipeline_args):
    from reid_tf.deploy import beam
    if FLAGS.images is None:
        raise app.UsageError("--runner reads files: give --images (a folder or a glob); a TFDS "
                             "--dataset is extracted without --runner.")
    try:
        beam.run(FLAGS.export, FLAGS.images, FLAGS.output, FLAGS.split, FLAGS.batch_size,
                 FLAGS.num_shards, [f"--runner={FLAGS.runner}", *pipeline_args])
    except (ValueError, OSError, MissingPackage) as error:
        print(f"reid-extract: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


def run():
    flags.mark_flag_as_required("export")
    app.run(main)


if __name__ == "__main__":
    run()
