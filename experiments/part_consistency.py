"""Part consistency of every part strategy on one trained network's own feature maps.

Loads a reid-train workdir, computes the backbone's feature maps of its evaluation images
(validation query + gallery when the run held validation identities out, else the test split),
and partitions the same maps with each strategy (`bands`, `peaks`, `activation`, `stripes`) at the
run's K: `parts.part_consistency` (mean IoU with the population's mean part mask, share of
images whose parts are strictly ordered top to bottom) for each. A run with learned parts adds
its head's own soft masks (`learned`), the share of cells where the head's most likely part is
its teacher's, and where each part's mass lies, row by row of the feature map (does part k still
mean a region?). Prints tables and writes
experiments/results/consistency/part_consistency_<run>.json (numbers only).

    .venv/bin/python experiments/part_consistency.py --workdir=runs/cuhk03_pair1_labeled_val_bands_e12
"""

import argparse
import json
import os

import numpy as np
import tensorflow as tf

from reid_tf.data import pipeline
from reid_tf.data import splits as splits_lib
from reid_tf.model import parts
from reid_tf.train import workdir as workdir_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def learned_head(model, maps):
    """The learned partition's own masks on `maps`: consistency, agreement with its teacher and
    the mean mass of each part by feature-map row (printed and returned)."""
    masks, agreement = [], []
    for i in range(0, len(maps), 256):
        batch = tf.constant(maps[i:i + 256])
        head = model.partition(batch)["masks"]
        teacher = model.partition.teacher(batch)
        masks.append(head.numpy())
        agreement.append((tf.argmax(head, -1) == tf.argmax(teacher, -1)).numpy())
    masks = np.concatenate(masks)
    consistency = parts.part_consistency(masks)
    rows = masks.mean(axis=(0, 2))  # [h, K]
    result = {**consistency, "teacher_agreement": float(np.concatenate(agreement).mean()),
              "teacher": model.partition.teacher_strategy, "mass_by_row": rows.round(4).tolist()}
    print(f"| learned (the run's head) | {consistency['mean_iou']:.3f} | "
          f"{consistency['ordered_fraction']:.3f} |")
    print(f"cells where the head's most likely part is its teacher's ({result['teacher']}): "
          f"{100 * result['teacher_agreement']:.1f} %")
    print("| row | " + " | ".join(f"part {k}" for k in range(rows.shape[1])) + " |")
    print("| --- " * (rows.shape[1] + 1) + "|")
    for row, shares in enumerate(rows):
        print(f"| {row} | " + " | ".join(f"{share:.2f}" for share in shares) + " |")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results", "consistency"))
    args = parser.parse_args()
    config = workdir_lib.read_json(args.workdir, "config.json")
    model, checkpoint = workdir_lib.load_trained_model(args.workdir, log=lambda line: None)
    if not model.num_parts:
        raise SystemExit(f"{args.workdir}: a baseline (num_parts=0) has no parts.")
    splits = splits_lib.load_splits(
        config["dataset"], config.get("data_dir"), config.get("manual_dir"),
        validation_identities=config.get("validation_identities", 0.0),
        validation_seed=config.get("validation_seed", 0), log=lambda line: None)
    names = (("val_query", "val_gallery") if "val_query" in splits else ("query", "gallery"))
    backbone = tf.function(lambda images: model.backbone(images, training=False))
    maps = np.concatenate([
        backbone(batch["image"]).numpy() for name in names
        for batch in pipeline.eval_dataset(splits[name], model.image_size, 64)])
    results = {"workdir": os.path.basename(os.path.normpath(args.workdir)),
               "checkpoint": os.path.basename(checkpoint), "images": len(maps),
               "evaluated_on": "+".join(names), "num_parts": model.num_parts,
               "trained_with": model.part_strategy, "strategies": {}}
    print(f"{results['workdir']} ({results['checkpoint']}, trained with {model.part_strategy}, "
          f"K={model.num_parts}): {len(maps)} images of {results['evaluated_on']}, grid "
          f"{maps.shape[1]}x{maps.shape[2]}")
    print("| strategy | mean part IoU | parts strictly ordered |\n| --- | --- | --- |")
    for strategy in parts.PART_STRATEGIES:
        partition = parts.ActivationPartPartition(model.num_parts, strategy,
                                                   model.kmeans_iterations)
        masks = np.concatenate([partition(tf.constant(maps[i:i + 256])).numpy()
                                for i in range(0, len(maps), 256)])
        consistency = parts.part_consistency(masks)
        results["strategies"][strategy] = consistency
        print(f"| {strategy} | {consistency['mean_iou']:.3f} | "
              f"{consistency['ordered_fraction']:.3f} |")
    if model.part_strategy == "learned":
        results["learned"] = learned_head(model, maps)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"part_consistency_{results['workdir']}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(path)


if __name__ == "__main__":
    main()
