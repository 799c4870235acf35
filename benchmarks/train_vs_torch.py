"""reid-train's baseline recipe against the independent PyTorch peer, one after the other.

The recipe of experiments/cuhk03_pair1_labeled_mobilenetv2_128x64.flags with --num_parts=0
(and, for comparison, PL-Net K=4): torchvision's ImageNet MobileNetV2 imported, 128x64, batches of
16 x 4, Adam with the backbone at 0.35x, flip and pad-crop, label smoothing 0.1, on the real
CUHK03 pair-1 labeled images through each framework's own input pipeline. Each measurement: 5
warm-up steps, then --steps timed steps (images/s). Then experiments/peers/torch_baseline.py
--benchmark_steps in its own virtual environment (experiments/peers/.venv), same machine, same
data, right after.

    REID_TF_SHARED_DIR=../shared python benchmarks/train_vs_torch.py [--steps=40]
"""

import os
import subprocess
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from reid_tf import testing  # noqa: E402
from reid_tf import model as model_lib  # noqa: E402
from reid_tf.data import pipeline  # noqa: E402
from reid_tf.data import splits as splits_lib  # noqa: E402
from reid_tf.train import optim  # noqa: E402
from reid_tf.train import step as step_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 40, "Timed training steps.")
flags.DEFINE_list("num_parts", ["0", "4"], "Our models to time (0 = the baseline).")
flags.DEFINE_string("peer_python", "experiments/peers/.venv/bin/python",
                    "The PyTorch peer's interpreter ('' to skip it).")

HERE = os.path.dirname(os.path.abspath(__file__))


def ours(shared, num_parts):
    data = os.path.join(shared, "data", "cuhk03_pair1_labeled")
    weights = os.path.join(shared, "weights", "mobilenet_v2-b0353104.pth")
    splits = splits_lib.load_splits(f"folder:{data}", log=lambda line: None)
    _, num_classes = splits_lib.relabel(splits["train"].person_ids)
    net = model_lib.PartLossNet(num_classes=num_classes, num_parts=num_parts,
                                backbone="mobilenet_v2", image_size=(128, 64),
                                backbone_weights=weights, last_stride=1)
    net.build()
    optimizer = optim.build_optimizer("adam", 1e-3, 5e-4, optim.parameter_groups(net, 0.35))
    optimizer.build(net.trainable_variables)
    dataset = pipeline.train_dataset(
        splits["train"], (128, 64), 16, 4, seed=0,
        augmentation=pipeline.Augmentation(flip=True, pad=10, erasing=0.0))
    iterator = iter(dataset)
    step = step_lib.make_train_step(net, optimizer, tf.distribute.get_strategy(), 64,
                                    label_smoothing=0.1)
    step(iterator, tf.constant(5))["loss"].numpy()
    start = time.perf_counter()
    step(iterator, tf.constant(FLAGS.steps))["loss"].numpy()
    return FLAGS.steps * 64 / (time.perf_counter() - start)


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(0)
    shared = os.environ.get("REID_TF_SHARED_DIR", os.path.join(HERE, "..", "..", "shared"))
    print(f"machine: {os.cpu_count()} CPU cores; TensorFlow {tf.__version__}; MobileNetV2 "
          f"128x64, batch 64 (16 x 4), {FLAGS.steps} timed steps", flush=True)
    rates = {}
    for num_parts in map(int, FLAGS.num_parts):
        rates[num_parts] = ours(shared, num_parts)
        print(f"reid-tf {'baseline' if num_parts == 0 else f'PL-Net K={num_parts}'}: "
              f"{rates[num_parts]:.1f} images/s", flush=True)
    if FLAGS.peer_python:
        result = subprocess.run(
            [FLAGS.peer_python, os.path.join(HERE, "..", "experiments", "peers",
                                             "torch_baseline.py"),
             f"--data={os.path.join(shared, 'data', 'cuhk03_pair1_labeled')}",
             f"--weights={os.path.join(shared, 'weights', 'mobilenet_v2-b0353104.pth')}",
             f"--benchmark_steps={FLAGS.steps}"], capture_output=True, text=True, check=True)
        line = result.stdout.strip().splitlines()[-1]
        peer = float(line.split(":")[1].split()[0])
        print(line, flush=True)
        if 0 in rates:
            print(f"reid-tf baseline / PyTorch peer: {rates[0] / peer:.2f}x", flush=True)


if __name__ == "__main__":
    app.run(main)
