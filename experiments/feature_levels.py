"""Test-split rank-1 and mAP of a trained model's global branch at three depths: the backbone's
pooled feature map, the embedding before its BatchNorm, and after it (the global descriptor).

    .venv/bin/python experiments/feature_levels.py --workdir=runs/cuhk03_pair1_labeled_baseline_s0 \
        --workdir=runs/cuhk03_pair1_labeled_baseline1280_s0

Tells a head problem (pooled backbone features fine, embedding worse) from a backbone problem
(both worse). Cosine distance, Market protocol, no flip, as
`reid-eval --descriptor=global_embedding`.
Writes `experiments/results/feature_levels/<run>.json` per workdir (summarize.py's table).
"""

import argparse
import json
import os

import tensorflow as tf

from reid_tf.data import pipeline
from reid_tf.data import splits as splits_lib
from reid_tf.evaluate import metrics as metrics_lib
from reid_tf.train import workdir as workdir_lib


def levels(model):
    head = model.global_head

    @tf.function
    def features(images):
        pooled = tf.reduce_mean(model.backbone(images, training=False), axis=[1, 2])
        before = head.embedding(pooled[:, None, :])[:, 0]
        return {"backbone pooled": pooled, "embedding before BatchNorm": before,
                "embedding after BatchNorm": head.batch_norm(before, training=False)}
    return features


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", required=True)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--output_dir", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "feature_levels"))
    args = parser.parse_args()
    for directory in args.workdir:
        config = workdir_lib.read_json(directory, "config.json")
        splits = splits_lib.load_splits(config["dataset"], log=lambda line: None)
        model, _ = workdir_lib.load_trained_model(directory, log=lambda line: None)
        features = levels(model)
        outputs = {}
        for name in ("query", "gallery"):
            batches = [features(batch["image"]) for batch in pipeline.eval_dataset(
                splits[name], model.image_size, args.batch_size)]
            outputs[name] = {key: tf.concat([b[key] for b in batches], 0).numpy()
                             for key in batches[0]}
        query, gallery = splits["query"], splits["gallery"]
        record = {"name": os.path.basename(os.path.normpath(directory)),
                  "seed": config["seed"], "num_parts": config["num_parts"],
                  "embedding_dim": config["embedding_dim"], "levels": {}}
        for key in outputs["query"]:
            result = metrics_lib.evaluate_features(
                outputs["query"][key], outputs["gallery"][key], query.person_ids,
                gallery.person_ids, query.camera_ids, gallery.camera_ids)
            print(f"{directory}: {key} ({outputs['query'][key].shape[1]}-d): rank-1 "
                  f"{100 * result['rank1']:.1f}  mAP {100 * result['mAP']:.1f}", flush=True)
            record["levels"][key] = {"rank1": result["rank1"], "mAP": result["mAP"],
                                     "dim": int(outputs["query"][key].shape[1])}
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, record["name"] + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
