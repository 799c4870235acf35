"""A quick look at PL-Net: build a PartLossNet and train it for a few steps on generated images.

    reid-demo --backbone=tiny --num_parts=4 --steps=20

Prints the output shapes (part masks included) and the global and part losses as they fall.
The images are random colour bands, one pattern per identity; the real training entry point is
`reid-train`.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: keep output readable

from absl import app
import keras
import numpy as np
import tensorflow as tf

from reid_tf import options
from reid_tf.model import PartLossNet
from reid_tf.train import distribute
from reid_tf.train.config import DemoConfig
from reid_tf.train.step import make_train_step

options.define_flags(DemoConfig)


def banded_people(num_identities, images_per_identity, height, width, seed):
    """Images made of four horizontal colour bands, one colour set per identity, plus noise."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0, 255, size=(num_identities, 4, 3))
    band = np.repeat(np.arange(4), -(-height // 4))[:height]
    labels = np.repeat(np.arange(num_identities), images_per_identity)
    images = colours[labels][:, band][:, :, None, :] * np.ones((1, 1, width, 1))
    images += rng.normal(0, 20, size=images.shape)
    return np.clip(images, 0, 255).astype(np.float32), labels.astype(np.int32)


def main(argv):
    del argv
    config = options.checked_from_flags(DemoConfig)
    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(config.seed)
    strategy = distribute.make_strategy("mirrored" if config.cpu_replicas else "default",
                                       config.cpu_replicas)
    images, labels = banded_people(config.num_identities, config.images_per_identity, config.height,
                                   config.width, config.seed)
    with strategy.scope():
        net = PartLossNet(
            num_classes=config.num_identities, num_parts=config.num_parts,
            part_strategy=config.part_strategy, embedding_dim=64, backbone=config.backbone,
            image_size=(config.height, config.width),
        )
        net.build()
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(net.trainable_variables)
    outputs = net(images[:2], training=False)
    print(f"PartLossNet: backbone={config.backbone}, K={config.num_parts} ({config.part_strategy}), "
          f"{net.count_params():,} parameters, {strategy.num_replicas_in_sync} replica(s)")
    for key, value in outputs.items():
        print(f"  {key:17s} {tuple(value.shape)}")
    if config.num_parts:
        cells = outputs["part_masks"].numpy()[0].sum(axis=(0, 1)).astype(int)
        print(f"  cells per part in image 0 (top to bottom): {cells.tolist()}")

    batch = {"image": images, "label": labels}
    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(
        dataset.unbatch().batch(len(labels), drop_remainder=True)))
    train_step = make_train_step(net, optimizer, strategy, global_batch_size=len(labels))
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        metrics = train_step(iterator, tf.constant(1))
        if step == 1 or step % 5 == 0 or step == config.steps:
            parts = " ".join(f"{v:.3f}" for v in metrics["part_losses"].numpy())
            print(f"step {step:4d}  loss {float(metrics['loss']):.4f}  "
                  f"global {float(metrics['global_loss']):.4f}  part {float(metrics['part_loss']):.4f}"
                  f" [{parts}]  global acc {float(metrics['global_accuracy']):.2f}  "
                  f"{step * len(labels) / (time.perf_counter() - start):.0f} img/s")
    if not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError(f"non-finite loss at step {config.steps}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
