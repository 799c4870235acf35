"""Training throughput (images/s) of PL-Net against its global-loss baseline.

resnet50 and mobilenet_v2 at 256x128, batch 32 (P=8, K=4), K=4 (peaks) and K=0, on 1 replica
and on 2 logical CPU replicas (MirroredStrategy). Random pixels, one cached batch (times the
model, not the input pipeline); SGD with momentum; median of --calls timed calls of --steps
steps after one warm-up call. Prints one line per configuration and PL-Net's overhead.

    python benchmarks/train_throughput.py [--backbones=resnet50,mobilenet_v2] [--steps=3]
"""

import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from reid_tf import testing  # noqa: E402
from reid_tf import model as model_lib  # noqa: E402
from reid_tf.train import distribute  # noqa: E402
from reid_tf.train import step as step_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("backbones", ["resnet50", "mobilenet_v2"], "Backbones to time.")
flags.DEFINE_list("replicas", ["1", "2"], "Replica counts (2 = two logical CPU devices).")
flags.DEFINE_list("num_parts", ["4", "0"], "K values (0 = baseline).")
flags.DEFINE_integer("steps", 3, "Steps per timed call.")
flags.DEFINE_integer("calls", 2, "Timed calls (median kept).")
flags.DEFINE_integer("height", 256, "Image height.")
flags.DEFINE_integer("child_replicas", 0, "Internal: measure this replica count in this process.")
flags.DEFINE_integer("width", 128, "Image width.")


def images_per_second(backbone, num_parts, replicas):
    strategy = (distribute.make_strategy("mirrored") if replicas > 1
                else tf.distribute.get_strategy())  # what --strategy=default trains with
    batch = {"image": tf.random.uniform([32, FLAGS.height, FLAGS.width, 3], 0, 255),
             "label": tf.repeat(tf.range(8), 4)}
    with strategy.scope():
        net = model_lib.PartLossNet(num_classes=751, num_parts=num_parts, backbone=backbone,
                                    image_size=(FLAGS.height, FLAGS.width))
        net.build()
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        optimizer.build(net.trainable_variables)
    dataset = tf.data.Dataset.from_tensors(batch).unbatch().batch(32).cache().repeat()
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    step = step_lib.make_train_step(net, optimizer, strategy, global_batch_size=32)
    step(iterator, tf.constant(1))["loss"].numpy()
    rates = []
    for _ in range(FLAGS.calls):
        start = time.perf_counter()
        step(iterator, tf.constant(FLAGS.steps))["loss"].numpy()
        rates.append(FLAGS.steps * 32 / (time.perf_counter() - start))
    return sorted(rates)[len(rates) // 2]


def measure(replicas):
    """One replica count per process: splitting the CPU into logical devices (needed for 2
    replicas) must happen before TensorFlow starts, and halves one device's threads."""
    if replicas > 1:
        distribute.split_cpu(replicas)
    for backbone in FLAGS.backbones:
        rates = {}
        for num_parts in map(int, FLAGS.num_parts):
            rates[num_parts] = images_per_second(backbone, num_parts, replicas)
            print(f"{backbone:13s} replicas={replicas} K={num_parts}: "
                  f"{rates[num_parts]:7.2f} images/s", flush=True)
        for num_parts, rate in rates.items():
            if num_parts and 0 in rates:
                print(f"{backbone:13s} replicas={replicas} PL-Net K={num_parts} overhead over "
                      f"baseline: {100 * (rates[0] / rate - 1):+.1f}%", flush=True)


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    tf.get_logger().setLevel("ERROR")
    if FLAGS.child_replicas:
        return measure(FLAGS.child_replicas)
    print(f"machine: {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, "
          f"{FLAGS.height}x{FLAGS.width}, batch 32 (P=8, K=4)", flush=True)
    for replicas in map(int, FLAGS.replicas):
        subprocess.run([sys.executable, __file__, f"--child_replicas={replicas}",
                        *[a for a in sys.argv[1:] if not a.startswith("--child_replicas")]],
                       check=True)


if __name__ == "__main__":
    app.run(main)
