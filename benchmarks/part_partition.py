"""Cost of the part partition relative to the backbone's forward pass.

Default: resnet50 (last_stride=1), 256x128, batch 32, K=4. Prints milliseconds per batch for the
backbone forward pass, for each partition strategy, and the ratio.

    python benchmarks/part_partition.py [--backbone=resnet50] [--batch=32] [--num_parts=4]
"""

import time

from absl import app
from absl import flags
import tensorflow as tf

from reid_tf import testing  # noqa: E402
from reid_tf.model import backbones
from reid_tf.model import parts

FLAGS = flags.FLAGS
flags.DEFINE_string("backbone", "resnet50", "Backbone name.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("height", 256, "Image height.")
flags.DEFINE_integer("width", 128, "Image width.")
flags.DEFINE_integer("num_parts", 4, "K.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions (after one warm-up); the median is kept.")


def median_ms(fn, *args):
    fn(*args)  # trace and warm up
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    net = backbones.build_backbone(FLAGS.backbone, (FLAGS.height, FLAGS.width, 3))
    images = tf.random.uniform([FLAGS.batch, FLAGS.height, FLAGS.width, 3], 0, 255)
    forward = tf.function(lambda x: net(x, training=False))
    backbone_ms = median_ms(forward, images)
    features = forward(images)
    print(f"backbone {FLAGS.backbone} {FLAGS.height}x{FLAGS.width} batch {FLAGS.batch}: "
          f"{backbone_ms:.1f} ms/batch, feature map {tuple(features.shape)}")
    for strategy in parts.PART_STRATEGIES:
        partition = parts.ActivationPartPartition(FLAGS.num_parts, strategy)
        partition_ms = median_ms(tf.function(partition), features)
        print(f"partition {strategy:10s} K={FLAGS.num_parts}: {partition_ms:7.2f} ms/batch "
              f"= {100 * partition_ms / backbone_ms:.2f}% of the backbone forward pass")


if __name__ == "__main__":
    app.run(main)
