"""reid-extract throughput through the SavedModel against a plain forward pass of the network.

For each backbone (256x128, batch 64, PL-Net K=4, random initialisation: speed does not depend on
the weights): exports the network, then times
- `plain forward`: the Keras PartLossNet in a tf.function on a float batch already in memory;
- `reid-extract`: `extract_lib.extract` through the export's `serve_encoded` over a folder of JPEG
  files (reading, decoding and resizing included, as reid-extract runs);
- `keras.applications.MobileNetV2`: the stock Keras network at the same size and batch, for
  reference.
Images: --images (a folder), else 128x64 JPEGs written to a temporary folder. Each figure is the
best of --repeats timed runs over --batches batches (plain forward and reid-extract
timed in turns), after one warm-up run.

    python benchmarks/extract.py [--backbones=resnet50,mobilenet_v2] [--batches=5]

`--runner=DirectRunner`: instead, reid-extract as a Beam pipeline with 2 worker processes
(`--direct_num_workers=2 --direct_running_mode=multi_processing`) against single-process
reid-extract over the same folder of `--beam_images` JPEGs (mobilenet_v2 PL-Net K=4, 256x128);
both timed as whole commands (start-up, model loading and writing included), best of --repeats.
"""

import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from reid_tf import testing  # noqa: E402
from reid_tf import model as model_lib  # noqa: E402
from reid_tf.data import splits as splits_lib  # noqa: E402
from reid_tf.deploy import export as export_lib  # noqa: E402
from reid_tf.deploy import runtime  # noqa: E402
from reid_tf.evaluate import extract as extract_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("backbones", ["mobilenet_v2", "resnet50"], "Backbones to time.")
flags.DEFINE_integer("batches", 5, "Timed batches of 64.")
flags.DEFINE_integer("repeats", 3, "Timed runs (best kept).")
flags.DEFINE_string("images", None, "A folder of images (default: generated JPEGs).")
flags.DEFINE_string("runner", None, "Time the Beam pipeline on this runner (DirectRunner) "
                    "against single-process reid-extract instead.")
flags.DEFINE_integer("beam_images", 1280, "Images for --runner.")
flags.DEFINE_integer("beam_workers", 2, "DirectRunner worker processes for --runner.")

SIZE = (256, 128)
BATCH = 64


def best_rates(functions, images_per_call):
    """Best images/s of each function, timed in turns (A, B, A, B, ...) after one warm-up call
    each, so that a slow spell of the machine does not fall on one side only."""
    for function in functions:
        function()  # warm-up (tracing)
    times = [[] for _ in functions]
    for _ in range(FLAGS.repeats):
        for function, timings in zip(functions, times):
            start = time.perf_counter()
            function()
            timings.append(time.perf_counter() - start)
    return [images_per_call / min(timings) for timings in times]


def write_jpegs(folder, count):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        # Smooth random pictures (JPEG of pure noise is unusually slow to decode).
        small = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)
        image = tf.image.resize(small, (128, 64)).numpy().astype(np.uint8)
        tf.io.write_file(os.path.join(folder, f"{i:04d}_c1s1_{i:06d}_00.jpg"),
                         tf.io.encode_jpeg(image, quality=90))
    return folder


def command_seconds(command):
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return time.perf_counter() - start


def beam_against_single_process(scratch):
    count = FLAGS.beam_images
    folder = FLAGS.images or write_jpegs(os.path.join(scratch, "images"), count)
    count = len(splits_lib.folder_split(folder))
    net = model_lib.PartLossNet(num_classes=751, num_parts=4, backbone="mobilenet_v2",
                                image_size=SIZE)
    net.build()
    export = export_lib.export_model(net, os.path.join(scratch, "export"), 1)
    extract = [sys.executable, "-m", "reid_tf.cli.extract", f"--export={export}",
               f"--images={folder}", f"--batch_size={BATCH}"]
    single = extract + [f"--output={os.path.join(scratch, 'single.npz')}"]
    beam = extract + [f"--runner={FLAGS.runner}", f"--output={os.path.join(scratch, 'beam')}",
                      "--", f"--direct_num_workers={FLAGS.beam_workers}",
                      "--direct_running_mode=multi_processing"]
    times = {"single": [], "beam": []}
    for _ in range(FLAGS.repeats):  # in turns, so that a slow spell hits both
        times["single"].append(command_seconds(single))
        times["beam"].append(command_seconds(beam))
    single_rate, beam_rate = (count / min(times[k]) for k in ("single", "beam"))
    print(f"{count} images, mobilenet_v2 PL-Net K=4 {SIZE[0]}x{SIZE[1]}, whole commands, best "
          f"of {FLAGS.repeats}", flush=True)
    print(f"reid-extract (one process)             {single_rate:7.1f} images/s "
          f"({min(times['single']):.1f} s)", flush=True)
    print(f"reid-extract --runner={FLAGS.runner} ({FLAGS.beam_workers} workers) {beam_rate:7.1f} "
          f"images/s ({min(times['beam']):.1f} s; {beam_rate / single_rate:.2f}x)", flush=True)


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.WARNING)  # SavedModel writing logs at INFO
    count = FLAGS.batches * BATCH
    print(f"machine: {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}; {SIZE[0]}x{SIZE[1]},"
          f" batch {BATCH}, {count} images per timed run", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        if FLAGS.runner:
            return beam_against_single_process(scratch)
        if FLAGS.images:
            folder = FLAGS.images
        else:
            folder = os.path.join(scratch, "images")
            os.makedirs(folder)
            write_jpegs(folder, count)
        split = splits_lib.folder_split(folder)
        for field in ("images", "person_ids", "camera_ids", "file_names"):
            setattr(split, field, getattr(split, field)[:count])
        batch = tf.random.uniform([BATCH, *SIZE, 3], 0, 255)

        reference = keras.applications.MobileNetV2(input_shape=(*SIZE, 3), include_top=False,
                                                   weights=None, pooling="avg")
        forward = tf.function(lambda x: reference(x, training=False))
        (rate,) = best_rates([lambda: [forward(batch).numpy() for _ in range(FLAGS.batches)]],
                             count)
        print(f"keras.applications.MobileNetV2 forward       {rate:7.1f} images/s", flush=True)

        for backbone in FLAGS.backbones:
            net = model_lib.PartLossNet(num_classes=751, num_parts=4, backbone=backbone,
                                        image_size=SIZE)
            net.build()
            forward = tf.function(lambda x, net=net: net(x, training=False)["embedding"])
            path = export_lib.export_model(net, os.path.join(scratch, backbone), 1)
            export = runtime.SavedModelRuntime(path)
            plain, extract = best_rates(
                [lambda: [forward(batch).numpy() for _ in range(FLAGS.batches)],
                 lambda: extract_lib.extract(export, split, ["embedding"], BATCH, encoded=True)], count)
            print(f"{backbone:13s} PL-Net K=4 plain forward      {plain:7.1f} images/s", flush=True)
            print(f"{backbone:13s} reid-extract (SavedModel)  {extract:7.1f} images/s "
                  f"({100 * (extract / plain - 1):+.1f}% vs plain forward; target within -15%)",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
