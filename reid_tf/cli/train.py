"""reid-train: train PL-Net (or its global-loss baseline), evaluate, export.

    reid-train --dataset=synthetic_persons --backbone=tiny --workdir=runs/demo
    reid-train --flagfile=experiments/market1501_plnet_resnet50_256x128.flags --workdir=runs/m

Running the same command again resumes from the workdir. Multi-worker: set TF_CONFIG on each
worker and pass --strategy=multi_worker. Every flag but --workdir is a `TrainConfig` option.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from reid_tf import options  # noqa: E402
from reid_tf.train.config import TrainConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder of this run (checkpoints, TensorBoard, export).")
options.define_flags(TrainConfig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    from reid_tf.train import loop

    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.WARNING)  # TFDS and SavedModel info lines drown the progress
    try:
        results = loop.train_and_evaluate(options.from_flags(TrainConfig),
                                          os.path.expanduser(FLAGS.workdir),
                                          log=lambda line: print(line, flush=True),
                                          flags_text=FLAGS.flags_into_string())
    except (ValueError, OSError, FloatingPointError, loop.LostWorker) as error:  # OSError: names
        # its path; LostWorker: exit 1, so that a supervisor restarts this worker
        print(f"reid-train: error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not sys.exit: once, the interpreter's shutdown after this line hung for good inside
        # TensorFlow, freeing the training input pipeline while it was still busy (the stack:
        # the map-and-batch iterator's destructor waiting for its calls). Everything
        # reid-train writes is complete by now (checkpoints; summaries flushed by the loop).
        os._exit(1)
    if "rank1" in results:
        print(f"final: rank-1 {results['rank1']:.4f}  mAP {results['mAP']:.4f}  "
              f"mINP {results['mINP']:.4f}  export {results.get('export')}")


def run():
    flags.mark_flag_as_required("workdir")
    app.run(main)


if __name__ == "__main__":
    run()
