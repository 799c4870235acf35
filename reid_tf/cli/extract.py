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

from reid_tf import options  # noqa: E402
from reid_tf.evaluate.config import ExtractConfig  # noqa: E402
from reid_tf.extras import MissingPackage  # noqa: E402

options.define_flags(ExtractConfig)


def main(argv):
    config = options.checked_from_flags(ExtractConfig)
    if len(argv) > 1 and not config.runner:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if config.runner:
        return run_beam(config, argv[1:])
    from reid_tf.data import splits
    from reid_tf.deploy import runtime
    from reid_tf.evaluate import features_npz
    from reid_tf.evaluate.extract import UndecodableImage
    from reid_tf.evaluate.extract import extract

    runtime.enable_memory_growth()
    try:
        features_npz.check_output_path(config.output)  # before any work
        export = runtime.open_runtime(config.export)
        split = splits.load_split(config.images, config.dataset, config.split, config.data_dir,
                                  config.skip_corrupt)
        try:
            embeddings = extract(export, split, ["embedding"], config.batch_size, encoded=True,
                                 description="extracting")["embedding"]
        except UndecodableImage as error:
            raise ValueError(f"{error} (--skip_corrupt leaves such files out)") from None
        arrays = features_npz.save_features(config.output, embeddings, split.file_names,
                                            split.person_ids, split.camera_ids)
    except (ValueError, OSError, MissingPackage) as error:  # OSError: names its path
        print(f"reid-extract: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    labelled = "with" if "person_ids" in arrays else "without"
    print(f"wrote {config.output}: {len(embeddings)} embeddings of {embeddings.shape[1]}, "
          f"{labelled} person ids and cameras")


def run_beam(config, pipeline_args):
    from reid_tf.deploy import beam
    if config.images is None:
        raise app.UsageError("--runner reads files: give --images (a folder or a glob); a TFDS "
                             "--dataset is extracted without --runner.")
    try:
        beam.run(config.export, config.images, config.output, config.split, config.batch_size,
                 config.num_shards, [f"--runner={config.runner}", *pipeline_args])
    except (ValueError, OSError, MissingPackage) as error:
        print(f"reid-extract: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


def run():
    flags.mark_flag_as_required("export")
    app.run(main)


if __name__ == "__main__":
    run()
