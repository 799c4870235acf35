"""reid-train: train PL-Net (or its global-loss baseline), evaluate, export.

    reid-train --dataset=synthetic_persons --backbone=tiny --workdir=runs/demo
    reid-train --flagfile=experiments/market1501_plnet_resnet50_256x128.flags --workdir=runs/m

Running the same command again resumes from the workdir. Multi-worker: set TF_CONFIG on each
worker and pass --strategy=multi_worker.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from reid_tf import backbones  # noqa: E402
from reid_tf import layers  # noqa: E402
from reid_tf import train_lib  # noqa: E402

_DEFAULTS = train_lib.TrainConfig()
FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Folder of this run (checkpoints, TensorBoard, export).")
# Data.
flags.DEFINE_string("dataset", _DEFAULTS.dataset, "A TFDS name (synthetic_persons, market1501, "
                    "cuhk03/labeled, ...), folder:PATH (Market layout) or identity_folders:PATH.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default ~/tensorflow_datasets).")
flags.DEFINE_string("manual_dir", None, "Folder holding the downloaded dataset (TFDS manual_dir).")
flags.DEFINE_bool("skip_corrupt", False, "Leave out images that do not decode (else fail).")
flags.DEFINE_bool("cache_in_memory", False, "TFDS data: read every encoded image into memory "
                  "at start (default: read each by index from the prepared files as training "
                  "needs it; folders are always read file by file).")
flags.DEFINE_float("validation_identities", _DEFAULTS.validation_identities,
                   "Hold out this share (< 1) or number (>= 1) of the training identities as a "
                   "validation query/gallery; --eval_every then evaluates on it, and the test "
                   "split only once, at the end. 0: no validation.")
flags.DEFINE_integer("validation_seed", _DEFAULTS.validation_seed,
                     "Seed of the validation identities and queries.")
# Model.
flags.DEFINE_enum("backbone", _DEFAULTS.backbone, sorted(backbones.BACKBONES),
                  "Backbone (torchvision_mobilenet_v2: torchvision's layout, for --weights=*.pth).")
flags.DEFINE_string("weights", None, "Backbone initialisation: empty (random), imagenet (Keras "
                    "download) or the path of a torchvision checkpoint (.pth; mobilenet_v2 then uses torchvision's layout).")
flags.DEFINE_integer("num_parts", _DEFAULTS.num_parts, "K parts; 0 = global-loss baseline.")
flags.DEFINE_enum("part_strategy", _DEFAULTS.part_strategy, list(layers.PART_STRATEGIES),
                  "How parts are found.")
flags.DEFINE_integer("embedding_dim", _DEFAULTS.embedding_dim, "Size of each embedding.")
flags.DEFINE_integer("image_height", _DEFAULTS.image_height, "Input height.")
flags.DEFINE_integer("image_width", _DEFAULTS.image_width, "Input width.")
flags.DEFINE_integer("last_stride", _DEFAULTS.last_stride, "Backbone last-stage stride (1 or 2).")
# Loss.
flags.DEFINE_float("part_loss_weight", _DEFAULTS.part_loss_weight, "lambda of the part loss.")
flags.DEFINE_float("label_smoothing", _DEFAULTS.label_smoothing, "Label smoothing epsilon.")
# Optimisation.
flags.DEFINE_enum("optimizer", _DEFAULTS.optimizer, list(train_lib.OPTIMIZERS), "Optimizer.")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Peak learning rate.")
flags.DEFINE_float("backbone_lr_multiplier", _DEFAULTS.backbone_lr_multiplier,
                   "Backbone learning rate = learning_rate x this (e.g. 0.1 when pretrained).")
flags.DEFINE_float("weight_decay", _DEFAULTS.weight_decay, "Decoupled weight decay.")
flags.DEFINE_integer("warmup_steps", _DEFAULTS.warmup_steps, "Linear warm-up steps.")
flags.DEFINE_enum("schedule", _DEFAULTS.schedule, list(train_lib.SCHEDULES), "Decay after warm-up.")
flags.DEFINE_list("lr_decay_steps", [], "Step schedule boundaries (default 60%, 85% of training).")
flags.DEFINE_float("lr_decay_factor", _DEFAULTS.lr_decay_factor, "Step schedule factor.")
flags.DEFINE_integer("train_steps", _DEFAULTS.train_steps, "Training steps (0: use --epochs).")
flags.DEFINE_integer("epochs", _DEFAULTS.epochs, "Epochs, when --train_steps=0.")
flags.DEFINE_integer("identities_per_batch", _DEFAULTS.identities_per_batch,
                     "P: identities in each training batch.")
flags.DEFINE_integer("images_per_identity", _DEFAULTS.images_per_identity,
                     "Images of each identity in a training batch (batch = P x this).")
flags.DEFINE_bool("flip", _DEFAULTS.flip, "Random horizontal flip.")
flags.DEFINE_integer("pad", _DEFAULTS.pad, "Pad-and-crop pixels (0: off).")
flags.DEFINE_float("random_erasing", _DEFAULTS.random_erasing, "Random erasing probability.")
# Distribution and numerics.
flags.DEFINE_enum("strategy", _DEFAULTS.strategy, list(train_lib.STRATEGIES), "tf.distribute.")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into N logical devices (with mirrored).")
flags.DEFINE_enum("mixed_precision", "none", list(train_lib.PRECISIONS),
                  "Compute in bfloat16 (no loss scaling needed) or float16 (T4, V100: with "
                  "Keras dynamic loss scaling); variables stay float32.")
flags.DEFINE_bool("jit_compile", False, "Compile the training step with XLA (for GPUs; on CPU "
                  "it was measured several times slower).")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of initialisation, batches, augmentation.")
# Cadence.
flags.DEFINE_integer("log_every", _DEFAULTS.log_every, "Steps between progress lines.")
flags.DEFINE_integer("checkpoint_every", _DEFAULTS.checkpoint_every, "Steps between checkpoints.")
flags.DEFINE_integer("eval_every", _DEFAULTS.eval_every, "Steps between evaluations (0: at end).")
flags.DEFINE_integer("image_summary_every", _DEFAULTS.image_summary_every,
                     "Steps between part-mask pictures in TensorBoard.")
flags.DEFINE_integer("max_steps_per_call", _DEFAULTS.max_steps_per_call,
                     "Most training steps run in one tf.function call.")
flags.DEFINE_integer("eval_batch_size", _DEFAULTS.eval_batch_size,
                     "Images per batch when evaluating.")
flags.DEFINE_bool("export", True, "Export a SavedModel at the end.")
flags.DEFINE_bool("final_eval", True, "Evaluate on the test split at the end (false: a run that "
                  "only measures training, e.g. on a large synthetic set).")


def config_from_flags():
    return train_lib.TrainConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
        skip_corrupt=FLAGS.skip_corrupt, cache_in_memory=FLAGS.cache_in_memory,
        validation_identities=FLAGS.validation_identities,
        validation_seed=FLAGS.validation_seed, backbone=FLAGS.backbone, weights=FLAGS.weights or None,
        num_parts=FLAGS.num_parts, part_strategy=FLAGS.part_strategy,
        embedding_dim=FLAGS.embedding_dim, image_height=FLAGS.image_height,
        image_width=FLAGS.image_width, last_stride=FLAGS.last_stride,
        part_loss_weight=FLAGS.part_loss_weight, label_smoothing=FLAGS.label_smoothing,
        optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
        backbone_lr_multiplier=FLAGS.backbone_lr_multiplier, weight_decay=FLAGS.weight_decay,
        warmup_steps=FLAGS.warmup_steps, schedule=FLAGS.schedule,
        lr_decay_steps=tuple(int(s) for s in FLAGS.lr_decay_steps),
        lr_decay_factor=FLAGS.lr_decay_factor, train_steps=FLAGS.train_steps, epochs=FLAGS.epochs,
        identities_per_batch=FLAGS.identities_per_batch,
        images_per_identity=FLAGS.images_per_identity, flip=FLAGS.flip, pad=FLAGS.pad,
        random_erasing=FLAGS.random_erasing, strategy=FLAGS.strategy,
        cpu_replicas=FLAGS.cpu_replicas, mixed_precision=FLAGS.mixed_precision,
        jit_compile=FLAGS.jit_compile, seed=FLAGS.seed,
        log_every=FLAGS.log_every, checkpoint_every=FLAGS.checkpoint_every,
        eval_every=FLAGS.eval_every, image_summary_every=FLAGS.image_summary_every,
        max_steps_per_call=FLAGS.max_steps_per_call, eval_batch_size=FLAGS.eval_batch_size,
        export=FLAGS.export, final_eval=FLAGS.final_eval,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.WARNING)  # TFDS and SavedModel info lines drown the progress
    config = config_from_flags()
    workdir = os.path.expanduser(FLAGS.workdir)
    try:
        results = train_lib.train_and_evaluate(config, workdir,
                                               log=lambda line: print(line, flush=True),
                                               flags_text=FLAGS.flags_into_string())
    except (ValueError, OSError, FloatingPointError) as error:  # OSError: names its path
        print(f"reid-train: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    if "rank1" in results:
        print(f"final: rank-1 {results['rank1']:.4f}  mAP {results['mAP']:.4f}  "
              f"mINP {results['mINP']:.4f}  export {results.get('export')}")


def run():
    flags.mark_flag_as_required("workdir")
    app.run(main)


if __name__ == "__main__":
    run()
