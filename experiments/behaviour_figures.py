"""The figures a refactor must not move, from finished reid-train workdirs: every logged loss,
the final rank-1 / mAP, and the first 10 embedding values of the first query (through the
workdir's export, loaded with plain TensorFlow).

    python experiments/behaviour_figures.py runs/a.log:runs/a runs/b.log:runs/b ...

Each argument is `<training log>:<workdir>` (the log is reid-train's stdout). Prints JSON.
"""

import json
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from reid_tf.data import splits as splits_lib  # noqa: E402

STEP_LINE = re.compile(r"^step (\d+)/\d+  loss ([0-9.]+)")


def figures(log_path, workdir):
    with open(log_path) as f:
        losses = {int(m.group(1)): float(m.group(2)) for m in map(STEP_LINE.match, f) if m}
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    query = splits_lib.load_splits(config["dataset"], config["data_dir"], log=lambda _: None,
                                   skip_corrupt=config["skip_corrupt"])["query"]
    export = tf.saved_model.load(results["export"])
    first = query.images[0]
    encoded = tf.io.read_file(first) if query.are_paths else tf.constant(first)
    embedding = export.signatures["serve_encoded"](images=encoded[None])["embedding"].numpy()
    return {"losses": losses, "rank1": results["rank1"], "mAP": results["mAP"],
            "first_query": str(query.file_names[0]),
            "first_embedding_values": np.round(embedding[0, :10].astype(float), 7).tolist()}


def main(arguments):
    print(json.dumps({pair: figures(*pair.split(":", 1)) for pair in arguments}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
