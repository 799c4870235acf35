"""reid-eval: evaluate a training workdir (its latest checkpoint) or a SavedModel export.

    reid-eval --workdir=runs/demo                       # dataset and sizes from the workdir
    reid-eval --export=runs/demo/export/1140 --dataset=synthetic_persons --flip --rerank
    reid-eval --workdir=runs/demo --plot_ranked=8       # PNGs of ranked lists (+ TensorBoard)
    reid-eval --workdir=runs/val --calibrate --open_set # thresholds on validation ids, DIR@FAR
    reid-eval --export=x/1 --dataset=folder:test --calibrate --calibration_data=folder:labelled

Prints rank-1/5/10/20, mAP and mINP, and writes results.json to --output_dir (default
<workdir>/eval, or ./reid_eval for an export). `--calibrate` fits the decision thresholds
(`evaluate.calibration`) on identities the model did not train on: the workdir's validation
identities (its --validation_identities, or this flag's), or the query/gallery of
--calibration_data; it writes calibration.json to --output_dir (give it to reid-export or
reid-serve with --calibration). `--open_set` scores open-set identification on the test split
with those thresholds (or --calibration's, or the export's): a third of the test identities
leave the gallery; DIR and the measured FAR at each fitted FAR.
"""

import json
import math
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
flags.DEFINE_bool("calibrate", False, "Fit the decision thresholds (match / in gallery at each "
                  "FAR) on identities the model did not train on; writes calibration.json.")
flags.DEFINE_string("calibration_data", None, "--calibrate on this labelled dataset's "
                    "query/gallery (a folder: or TFDS name) instead of validation identities.")
flags.DEFINE_float("validation_identities", None, "With --export: --calibrate on this share "
                   "(or number) of the training identities, as reid-train carved them (valid "
                   "only if the export's run held them out). A workdir uses its own.")
flags.DEFINE_list("fars", ["0.1", "0.01", "0.001"], "False-accept rates to fit thresholds at.")
flags.DEFINE_bool("open_set", False, "Open-set identification on the test split: a third of "
                  "the test identities (seeded) leave the gallery; DIR and FAR at each "
                  "fitted FAR.")
flags.DEFINE_string("calibration", None, "A calibration.json for --open_set and for "
                    "--plot_ranked's match colours (default: the one --calibrate fits, or the "
                    "export's).")
flags.DEFINE_integer("open_set_seed", 0, "Which identities leave the gallery for --open_set.")


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
    from reid_tf.evaluate import calibration as calibration_lib
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
    decisions = calibrate(dataset, runtime) if FLAGS.calibrate else None
    if decisions is None and FLAGS.calibration:
        decisions = calibration_lib.load(FLAGS.calibration)
    if decisions is None:
        decisions = getattr(runtime, "calibration", None)
    if FLAGS.open_set and decisions is None:
        raise ValueError("--open_set needs thresholds: --calibrate, --calibration=<file> or an "
                         "export that carries assets/calibration.json.")
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
    if FLAGS.calibrate:
        path = os.path.join(output_dir, "calibration.json")
        with open(path, "w") as f:
            json.dump(decisions, f, indent=2)
        results["calibration"] = {key: decisions[key] for key in ("verification", "open_set",
                                                                  "measured_on")}
        print_calibration(decisions)
        print(f"wrote {path}")
    if FLAGS.open_set:
        if FLAGS.descriptor != "embedding" or FLAGS.flip or FLAGS.rerank:
            raise ValueError("--open_set scores the served descriptor: --descriptor=embedding "
                             "without --flip or --rerank (the thresholds are the gallery's).")
        results["open_set"] = calibration_lib.evaluate_open_set(
            *features[:1], query, features[1], gallery, decisions, seed=FLAGS.open_set_seed)
        print_open_set(results["open_set"])
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if FLAGS.plot_ranked:
        threshold = (calibration_lib.threshold(decisions, "open_set", 0.01)
                     if decisions is not None and 0.01 in calibration_lib.fars_of(decisions)
                     else None)
        paths = visualize.plot_ranked_lists(distances, query, gallery, FLAGS.plot_ranked,
                                            output_dir, threshold=threshold)
        print(f"wrote {len(paths)} ranked-list pictures to {output_dir}/ranked "
              f"(and {output_dir}/tensorboard)")
    return results


def calibrate(dataset, runtime):
    """--calibrate: the thresholds of `runtime` on --calibration_data's query/gallery, or on
    validation identities of `dataset`'s training split."""
    from reid_tf.data import splits as splits_lib
    from reid_tf.evaluate import evaluator

    fars = [float(far) for far in FLAGS.fars]
    if FLAGS.calibration_data:
        data = splits_lib.load_splits(FLAGS.calibration_data, FLAGS.data_dir, FLAGS.manual_dir,
                                      FLAGS.skip_corrupt, splits=("query", "gallery"))
        query, gallery = data["query"], data["gallery"]
        measured_on = {"dataset": FLAGS.calibration_data, "split": "query/gallery"}
    else:
        config = {}
        if FLAGS.workdir:
            with open(os.path.join(FLAGS.workdir, "config.json")) as f:
                config = json.load(f)
        share = config.get("validation_identities", 0.0)
        if FLAGS.workdir and FLAGS.validation_identities not in (None, share):
            raise ValueError(f"--validation_identities={FLAGS.validation_identities}: this "
                             f"workdir held out {share} of its training identities; only those "
                             "were not trained on (leave the flag out).")
        if FLAGS.export:
            share = FLAGS.validation_identities or 0.0
        if not share:
            raise ValueError("--calibrate needs identities the model did not train on: "
                             "--calibration_data=<labelled dataset>, or a workdir trained with "
                             "--validation_identities (this one held none out).")
        data = splits_lib.load_splits(dataset, FLAGS.data_dir, FLAGS.manual_dir,
                                      FLAGS.skip_corrupt, validation_identities=share,
                                      validation_seed=config.get("validation_seed", 0),
                                      splits=("train",))
        query, gallery = data["val_query"], data["val_gallery"]
        measured_on = {"dataset": dataset, "split": "validation identities",
                       "validation_identities": share}
    fitted = evaluator.calibrate(runtime, query, gallery, fars, FLAGS.batch_size,
                                 measured_on={**measured_on, "source": FLAGS.workdir or
                                              FLAGS.export}, progress=True)
    model_id = getattr(runtime, "model_id", None)  # an export's; a workdir's is stamped at export
    return {**fitted, "model_id": model_id} if model_id else fitted


def print_calibration(decisions):
    on = decisions["measured_on"]
    print(f"\ncalibration on {on['dataset']} ({on['split']}): {on['queries']} queries, "
          f"{on['gallery']} gallery images, {on['genuine_pairs']} genuine and "
          f"{on['impostor_pairs']} impostor pairs")
    print("| FAR | pair threshold | TAR | search threshold | DIR | search FAR measured "
          "(95 % interval) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for pair, search in zip(decisions["verification"], decisions["open_set"]):
        low, high = search.get("far_interval", [math.nan, math.nan])
        print(f"| {pair['far']:g} | {pair['threshold']:.4f} | {pair['tar']:.4f} | "
              f"{search['threshold']:.4f} | {search['dir']:.4f} | "
              f"{search['measured_far']:.4f} ({low:.4f}-{high:.4f}) |")


def print_open_set(report):
    print(f"\nopen set: {report['unknown_identities']} identities out of the gallery "
          f"({report['gallery']} images left); {report['known_queries']} known and "
          f"{report['unknown_queries']} unknown queries; closed-set rank-1 "
          f"{report['closed_set_rank1']:.4f}")
    print("| FAR asked | DIR | FAR measured | pair FAR measured | pair TAR |")
    print("| --- | --- | --- | --- | --- |")
    for point in report["points"]:
        print(f"| {point['far']:g} | {point['dir']:.4f} | {point['measured_far']:.4f} | "
              f"{point['pair_far']:.5f} | {point['pair_tar']:.4f} |")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
