"""The part-mask picture of RESULTS.md: a trained workdir's parts over synthetic test images.

    .venv/bin/python experiments/part_masks_picture.py --workdir=runs/synthetic_plnet_s0 \
        --output=experiments/figures/synthetic_part_masks.png

Two rows of --count unseen query images: the crops, then the same crops with each cell coloured
by its part (part 1 red, 2 green, 3 yellow, 4 blue: top to bottom). Only synthetic datasets are
accepted: no picture of a real person goes into the repository.
"""

import argparse
import json
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from reid_tf.data import preprocessing
from reid_tf.data import splits as splits_lib
from reid_tf.evaluate import visualize
from reid_tf.train import workdir as workdir_lib


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--count", type=int, default=10)
    options = parser.parse_args()
    with open(os.path.join(options.workdir, "config.json")) as f:
        config = json.load(f)
    dataset = config["dataset"]
    if not dataset.startswith("synthetic_persons"):
        raise SystemExit(f"{options.workdir}: trained on {dataset}; this picture is drawn from "
                         "synthetic data only (no real person's image goes into the repository).")
    model, _ = workdir_lib.load_trained_model(options.workdir)
    query = splits_lib.load_splits(dataset, data_dir=config.get("data_dir"))["query"]
    # One image each of `count` different identities, spread over the split.
    _, first = np.unique(query.person_ids, return_index=True)
    chosen = np.sort(first)[np.linspace(0, len(first) - 1, options.count).astype(int)]
    images = tf.stack([preprocessing.decode(query.images[i], model.image_size) for i in chosen])
    masks = model(images, training=False)["part_masks"]
    overlaid = visualize.overlay_part_masks(images, masks).numpy()
    rows = [np.concatenate(list(images.numpy() / 255.0), axis=1),
            np.concatenate(list(overlaid), axis=1)]
    picture = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)
    Image.fromarray(picture).save(options.output)
    print(f"wrote {options.output}: {picture.shape[1]}x{picture.shape[0]}, identities "
          f"{', '.join(str(query.person_ids[i]) for i in chosen)}")


if __name__ == "__main__":
    main()
