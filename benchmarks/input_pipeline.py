"""Training input pipeline throughput against what a training step consumes.

Prints images/s for: the P×K training pipeline (decode + flip + pad/crop + random erasing to
256x128) on the shared CUHK03 data (files read one by one), and on a TFDS dataset
(--tfds_dataset, prepared into --data_dir) both streamed by index from its ArrayRecord files (the
default) and held in memory (--cache_in_memory), with the time and RSS of loading each (streamed:
the first load, which reads every record's labels and keeps them in a label index, and a later
load from that index);
synthetic_persons generation; and one PL-Net training step (--backbone, resnet50 by default) at
256x128, batch 32 (P=8, K=4). Target: pipeline >= 3x the training step.

    REID_TF_SHARED_DIR=../shared python benchmarks/input_pipeline.py [--tfds_dataset=...]
"""

import os
import time

from absl import app
from absl import flags
import keras
import tensorflow as tf

from reid_tf import testing  # noqa: E402
from reid_tf import model as model_lib
from reid_tf.data import pipeline
from reid_tf.data import splits as splits_lib
from reid_tf.data import synthetic
from reid_tf.train import step as step_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "Market-layout folder; default: "
                    "$REID_TF_SHARED_DIR/data/cuhk03_pair1_labeled.")
flags.DEFINE_integer("batches", 60, "Pipeline batches to time (after 5 warm-up batches).")
flags.DEFINE_string("backbone", "resnet50", "Backbone of the timed training step.")
flags.DEFINE_integer("train_steps", 3, "Training steps to time (after one warm-up).")
flags.DEFINE_bool("train_step", True, "Also time the training step.")
flags.DEFINE_string("tfds_dataset", "synthetic_persons", "TFDS dataset timed streamed and in "
                    "memory ('' to skip).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: a temporary folder).")


def rss_gib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 2**20


def tfds_rates():
    """[(how, pipeline images/s or None, RSS added by loading, loading seconds, train images)] on
    --tfds_dataset: streamed with no label index yet (every record read once for the labels; no
    pipeline timed), streamed from its label index, and held in memory."""
    import glob
    import tempfile

    data_dir = FLAGS.data_dir or tempfile.mkdtemp(prefix="tfds_")
    splits_lib.load_splits(FLAGS.tfds_dataset, data_dir=data_dir)  # prepare
    results = []
    for how, cache, first_load in (
            ("streamed, first load (labels read from every record)", False, True),
            ("streamed by index (labels from the label index)", False, False),
            ("held in memory", True, False)):
        if first_load:
            for index in glob.glob(os.path.join(data_dir, "**", splits_lib.LABEL_INDEX.format(
                    split="*")), recursive=True):
                os.remove(index)
        before = rss_gib()
        start = time.perf_counter()
        split = splits_lib.load_splits(FLAGS.tfds_dataset, data_dir=data_dir,
                                       cache_in_memory=cache, log=lambda line: None)["train"]
        loading = time.perf_counter() - start
        rate = None if first_load else pipeline_rate(split)
        results.append((how, rate, rss_gib() - before, loading, len(split)))
        del split
    return results


def pipeline_rate(split):
    iterator = iter(pipeline.train_dataset(split, (256, 128), 8, 4, seed=0))
    for _ in range(5):
        next(iterator)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(iterator)["image"].numpy()
    return FLAGS.batches * 32 / (time.perf_counter() - start)


def synthetic_rate():
    config = synthetic.SyntheticConfig(num_train_ids=100, num_test_ids=0)
    start = time.perf_counter()
    records = synthetic.generate(config)
    return len(records["train"]) / (time.perf_counter() - start)


def train_step_rate(split):
    strategy = tf.distribute.get_strategy()
    _, num_classes = splits_lib.relabel(split.person_ids)
    net = model_lib.PartLossNet(num_classes=num_classes, num_parts=4, backbone=FLAGS.backbone,
                                image_size=(256, 128))
    net.build()
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(net.trainable_variables)
    step = step_lib.make_train_step(net, optimizer, strategy, global_batch_size=32)
    # One cached batch, repeated: times the model alone.
    iterator = iter(pipeline.train_dataset(split, (256, 128), 8, 4).take(1).cache().repeat())
    step(iterator, tf.constant(1))
    start = time.perf_counter()
    step(iterator, tf.constant(FLAGS.train_steps))["loss"].numpy()
    return FLAGS.train_steps * 32 / (time.perf_counter() - start)


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    folder = FLAGS.data or os.path.join(os.environ["REID_TF_SHARED_DIR"], "data",
                                        "cuhk03_pair1_labeled")
    split = splits_lib.load_splits(f"folder:{folder}")["train"]
    print(f"machine: {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}")
    pipeline = pipeline_rate(split)
    print(f"training pipeline (decode+augment to 256x128, P=8 K=4): {pipeline:8.1f} images/s "
          "(folder, files read one by one)")
    if FLAGS.tfds_dataset:
        for how, rate, rss, loading, count in tfds_rates():
            speed = "" if rate is None else f"{rate:8.1f} images/s; "
            print(f"training pipeline, {FLAGS.tfds_dataset} ({count} train images) {how}: "
                  f"{speed}loading {loading:.2f} s, +{rss:.2f} GiB RSS")
    print(f"synthetic_persons generation (128x64):                 {synthetic_rate():8.1f} images/s")
    if FLAGS.train_step:
        consumed = train_step_rate(split)
        print(f"{FLAGS.backbone} PL-Net training step (256x128, batch 32): {consumed:8.1f} "
              "images/s")
        print(f"pipeline / training step: {pipeline / consumed:.1f}x (target >= 3x)")


if __name__ == "__main__":
    app.run(main)
