"""reid-eval: evaluate a training workdir (its latest checkpoint) or a SavedModel export.

    reid-eval --workdir=runs/demo                       # dataset and sizes from the workdir
    reid-eval --export=runs/demo/export/1140 --dataset=synthetic_persons --flip --rerank
    reid-eval --workdir=runs/demo --plot_ranked=8       # PNGs of ranked lists (+ TensorBoard)

Prints rank-1/5/10/20, mAP and mINP, and writes results.json to --output_dir (default
<workdir>/eval, or ./reid_eval for an export).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from reid_tf import options  # noqa: E402
from reid_tf.extras import MissingPackage  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A reid-train workdir: evaluates its latest checkpoint.")
options.define("export", str, options.EXPORT)
options.define("dataset", str, options.DATASET.replace(
    default=None, help="Dataset (default: the workdir's)."))
options.define("data_dir", str, options.DATA_DIR)
options.define("manual_dir", str, options.MANUAL_DIR)
options.define("skip_corrupt", bool, options.SKIP_CORRUPT)
options.define("image_height", int, options.IMAGE_HEIGHT.replace(
    default=None, help="Input height for an --export that does not record its training size "
    "(exports do since this flag's help says so); else unused."))
options.define("image_width", int, options.IMAGE_WIDTH.replace(
    default=None, help="Input width, as --image_height."))
flags.DEFINE_enum("descriptor", "embedding",
                  ["embedding", "global_embedding", "part_embeddings"],
                  "What to rank with: the test descriptor (global + parts), the global embedding "
                  "alone, or the part embeddings alone (each L2-normalised, concatenated).")
flags.DEFINE_enum("metric", "cosine", ["cosine", "euclidean", "sqeuclidean"], "Distance.")
flags.DEFINE_bool("flip", False, "Test-time augmentation: mean of the image's and its mirror's "
                  "embeddings.")
flags.DEFINE_bool("rerank", False, "k-reciprocal re-ranking (Zhong et al. 2017).")
flags.DEFINE_integer("rerank_dense_max_gallery", 20000, "Above this gallery size (cosine), "
                     "--rerank works from the features chunk by chunk instead of dense "
                     "gallery x gallery distances.")
flags.DEFINE_integer("k1", 20, "Re-ranking k1.")
flags.DEFINE_integer("k2", 6, "Re-ranking k2.")
flags.DEFINE_float("lambda_value", 0.3, "Re-ranking lambda.")
flags.DEFINE_enum("average_precision", "noninterpolated", ["noninterpolated", "trapezoid"],
                  "AP definition (trapezoid: the official Market-1501 code).")
flags.DEFINE_bool("single_gallery_shot", False, "CUHK03's classic CMC: one random gallery image "
                  "per identity, 10 repeats (mAP unchanged).")
options.define("batch_size", int, options.BATCH_SIZE)
flags.DEFINE_integer("plot_ranked", 0, "Write ranked-list pictures of this many queries.")
flags.DEFINE_string("output_dir", None, "Where results.json and pictures go.")


def open_runtime():
    """The runtime to evaluate (an export or the workdir's newest checkpoint) and its size."""
    from reid_tf.deploy import runtime

    if FLAGS.export:
        export = runtime.open_runtime(FLAGS.export)
        given = (FLAGS.image_height, FLAGS.image_width)
        if export.image_size is not None:  # the size it was trained at, recorded in the export
            if any(given) and given != export.image_size:
                raise ValueError(f"--image_height/--image_width={given}: the export was trained "
                                 f"at {export.image_size}; leave them out.")
        elif not all(given):
            raise ValueError(f"{FLAGS.export} does not record its training size: give "
                             "--image_height and --image_width.")
        else:
            export.image_size = given
        return export
    from reid_tf.train import workdir as workdir_lib

    net, checkpoint = workdir_lib.load_trained_model(FLAGS.workdir)
    if FLAGS.descriptor == "part_embeddings" and not net.num_parts:
        raise ValueError("--descriptor=part_embeddings: this model has no parts (num_parts=0).")
    print(f"evaluating {checkpoint}")
    return runtime.KerasRuntime(net)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    try:
        results = run_eval()
    except (ValueError, OSError, KeyError, MissingPackage) as error:  # OSError: names its path
        print(f"reid-eval: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps({k: results[k] for k in ("rank1", "mAP", "mINP")}))


def run_eval():
    import tensorflow as tf

    from reid_tf.data import splits as splits_lib
    from reid_tf.evaluate import evaluator
    from reid_tf.evaluate import visualize
    from reid_tf.evaluate.extract import extract

    tf.get_logger().setLevel("ERROR")
    if FLAGS.rerank:  # before any extraction: a bad k2 is known now
        from reid_tf.evaluate import reranking
        reranking.check_parameters(FLAGS.k1, FLAGS.k2, FLAGS.lambda_value)
    if bool(FLAGS.workdir) == bool(FLAGS.export):
        raise ValueError("give exactly one of --workdir or --export.")
    for name in ("model.json", "config.json"):
        if FLAGS.workdir and not os.path.exists(os.path.join(FLAGS.workdir, name)):
            raise FileNotFoundError(f"{os.path.join(FLAGS.workdir, name)}: not found; is "
                                    f"{FLAGS.workdir} a reid-train workdir?")
    dataset = FLAGS.dataset
    if FLAGS.workdir and not dataset:
        with open(os.path.join(FLAGS.workdir, "config.json")) as f:
            dataset = json.load(f)["dataset"]
    if not dataset:
        raise ValueError("--dataset is required with --export.")
    runtime = open_runtime()
    splits = splits_lib.load_splits(dataset, FLAGS.data_dir, FLAGS.manual_dir,
                                    FLAGS.skip_corrupt, splits=("query", "gallery"))
    query, gallery = splits["query"], splits["gallery"]
    features = [extract(runtime, split, [FLAGS.descriptor], FLAGS.batch_size, flip=FLAGS.flip,
                        description=name)[FLAGS.descriptor]
                for name, split in (("query", query), ("gallery", gallery))]
    metrics, distances = evaluator.score(
        *features, query, gallery, FLAGS.metric, FLAGS.rerank, FLAGS.k1, FLAGS.k2,
        FLAGS.lambda_value, FLAGS.rerank_dense_max_gallery, FLAGS.single_gallery_shot,
        FLAGS.average_precision, keep_distances=bool(FLAGS.plot_ranked))
    cmc = metrics["cmc"]
    print(f"\n{dataset}: {len(query)} queries ({metrics['num_skipped']} skipped), "
          f"{len(gallery)} gallery images; descriptor={FLAGS.descriptor} flip={FLAGS.flip} "
          f"rerank={FLAGS.rerank}")
    print("| rank-1 | rank-5 | rank-10 | rank-20 | mAP | mINP |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {cmc[0]:.4f} | {cmc[4]:.4f} | {cmc[9]:.4f} | {cmc[19]:.4f} | "
          f"{metrics['mAP']:.4f} | {metrics['mINP']:.4f} |")
    output_dir = FLAGS.output_dir or (os.path.join(FLAGS.workdir, "eval") if FLAGS.workdir
                                      else "reid_eval")
    os.makedirs(output_dir, exist_ok=True)
    results = {"dataset": dataset, "source": FLAGS.workdir or FLAGS.export,
               "descriptor": FLAGS.descriptor, "flip": FLAGS.flip,
               "rerank": FLAGS.rerank, "metric": FLAGS.metric, "rank1": metrics["rank1"],
               "rank5": float(cmc[4]), "rank10": float(cmc[9]), "rank20": float(cmc[19]),
               "mAP": metrics["mAP"], "mINP": metrics["mINP"], "cmc": cmc.tolist(),
               "num_queries": metrics["num_valid"], "skipped_queries": metrics["num_skipped"]}
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if FLAGS.plot_ranked:
        paths = visualize.plot_ranked_lists(distances, query, gallery, FLAGS.plot_ranked,
                                            output_dir)
        print(f"wrote {len(paths)} ranked-list pictures to {output_dir}/ranked "
              f"(and {output_dir}/tensorboard)")
    return results


def run():
    app.run(main)


if __name__ == "__main__":
    run()
