"""The one decode's cost: CUHK03 JPEGs decoded and resized to 256x128 in tf.data (2 parallel
calls), with `data.preprocessing.decode` (EXIF orientation read and applied, issue 39) against
a bare `tf.io.decode_image` + the same resize. Best of 3 passes each, interleaved.

    REID_TF_SHARED_DIR=../shared python benchmarks/decode.py [--images=6000]
"""

import glob
import os
import time

from absl import app
from absl import flags
import tensorflow as tf

from reid_tf import testing
from reid_tf.data import preprocessing

flags.DEFINE_integer("images", 6000, "CUHK03 JPEGs to decode per pass.")
FLAGS = flags.FLAGS
SIZE = (256, 128)


def bare(encoded):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return preprocessing.preprocess(image, SIZE)


def main(_):
    print(testing.cpu_line())
    shared = os.environ.get("REID_TF_SHARED_DIR", "../shared")
    files = sorted(glob.glob(os.path.join(shared, "data", "**", "*.jpg"), recursive=True))
    data = []
    for path in files[:FLAGS.images]:
        with open(path, "rb") as f:
            data.append(f.read())
    variants = {"decode_image + resize": bare,
                "preprocessing.decode (EXIF)": lambda e: preprocessing.decode(e, SIZE)}
    best = {}
    for _ in range(3):
        for name, function in variants.items():
            dataset = tf.data.Dataset.from_tensor_slices(data).map(
                function, num_parallel_calls=2).batch(64)
            start = time.perf_counter()
            count = sum(int(batch.shape[0]) for batch in dataset)
            best[name] = max(best.get(name, 0), count / (time.perf_counter() - start))
    for name, rate in best.items():
        print(f"{name}: {rate:,.0f} images/s ({len(data)} JPEGs, best of 3)")


if __name__ == "__main__":
    app.run(main)
