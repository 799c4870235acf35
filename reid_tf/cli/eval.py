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
from absl import logging  # noqa: E402

from reid_tf import options  # noqa: E402
from reid_tf.evaluate.config import EvalConfig  # noqa: E402
from reid_tf.extras import MissingPackage  # noqa: E402
from reid_tf.files import write_atomically  # noqa: E402


options.define_flags(EvalConfig)


def open_runtime(config):
    """The runtime to evaluate (an export or the workdir's newest checkpoint) and its size."""
    from reid_tf.deploy import runtime

    if config.export:
        export = runtime.open_runtime(config.export)
        given = (config.image_height, config.image_width)
        if export.image_size is not None:  # the size it was trained at, recorded in the export
            if any(given) and given != export.image_size:
                raise ValueError(f"--image_height/--image_width={given}: the export was trained "
                                 f"at {export.image_size}; leave them out.")
        elif not all(given):
            raise ValueError(f"{config.export} does not record its training size: give "
                             "--image_height and --image_width.")
        else:
            export.image_size = given
        return export
    from reid_tf.train import workdir as workdir_lib

    net, checkpoint = workdir_lib.load_trained_model(config.workdir)
    if config.descriptor == "part_embeddings" and not net.num_parts:
        raise ValueError("--descriptor=part_embeddings: this model has no parts (num_parts=0).")
    print(f"evaluating {checkpoint}")
    return runtime.KerasRuntime(net)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    try:
        results = run_eval(options.from_flags(EvalConfig))
    except (ValueError, OSError, KeyError, MissingPackage) as error:  # OSError: names its path
        print(f"reid-eval: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps({k: results[k] for k in ("rank1", "mAP", "mINP")}))


def checked_dataset(config):
    """The dataset to evaluate on, once the request is known to be whole (ValueError else)."""
    options.check(config)
    if config.rerank:  # before any extraction: a bad k2 is known now
        from reid_tf.evaluate import reranking
        reranking.check_parameters(config.k1, config.k2, config.lambda_value)
    if bool(config.workdir) == bool(config.export):
        raise ValueError("give exactly one of --workdir or --export.")
    if config.open_set and (config.descriptor != "embedding" or config.flip or config.rerank):
        raise ValueError("--open_set scores the served descriptor: --descriptor=embedding "
                         "without --flip or --rerank (the thresholds are the gallery's).")
    if config.workdir:
        from reid_tf.train import workdir as workdir_lib

        workdir_lib.read_json(config.workdir, "model.json")  # a reid-train workdir, or one line
        return config.dataset or workdir_lib.read_config(config.workdir).dataset
    if not config.dataset:
        raise ValueError("--dataset is required with --export.")
    return config.dataset


def run_eval(config):
    """Evaluates, prints the table, writes results.json (and calibration.json, pictures)."""
    import tensorflow as tf

    from reid_tf.data import splits as splits_lib
    from reid_tf.evaluate import evaluator
    from reid_tf.evaluate.extract import extract

    tf.get_logger().setLevel("ERROR")
    dataset = checked_dataset(config)
    runtime = open_runtime(config)
    splits = splits_lib.load_splits(dataset, splits=("query", "gallery"), **config.reading)
    query, gallery = splits["query"], splits["gallery"]
    features = [extract(runtime, split, [config.descriptor], config.batch_size,
                        flip=config.flip, description=name)[config.descriptor]
                for name, split in (("query", query), ("gallery", gallery))]
    decisions = decisions_for(config, dataset, runtime)
    metrics, distances = evaluator.score(*features, query, gallery, config,
                                         keep_distances=bool(config.plot_ranked))
    print_metrics(config, dataset, metrics, len(query), len(gallery))
    os.makedirs(config.output_folder, exist_ok=True)
    results = evaluator.results_record(
        metrics, dataset=dataset, source=config.workdir or config.export,
        descriptor=config.descriptor, flip=config.flip, rerank=config.rerank,
        metric=config.metric)
    if config.calibrate:
        path = os.path.join(config.output_folder, "calibration.json")
        write_atomically(path, json.dumps(decisions, indent=2))
        results["calibration"] = {key: decisions[key] for key in ("verification", "open_set",
                                                                  "measured_on")}
        print_calibration(decisions)
        print(f"wrote {path}")
    if config.open_set:
        from reid_tf.evaluate import calibration as calibration_lib

        results["open_set"] = calibration_lib.evaluate_open_set(
            features[0], query, features[1], gallery, decisions, seed=config.open_set_seed)
        print_open_set(results["open_set"])
    write_atomically(os.path.join(config.output_folder, "results.json"),
                     json.dumps(results, indent=2))
    if config.plot_ranked:
        plot_ranked(config, decisions, distances, query, gallery)
    return results


def decisions_for(config, dataset, runtime):
    """The decision thresholds the run uses: fitted now (--calibrate), --calibration's, or the
    export's; None when none (refused with --open_set)."""
    from reid_tf.evaluate import calibration as calibration_lib

    decisions = calibrate(config, dataset, runtime) if config.calibrate else None
    if decisions is None and config.calibration:
        decisions = calibration_lib.load(config.calibration)
    if decisions is None:
        decisions = getattr(runtime, "calibration", None)
    if config.open_set and decisions is None:
        raise ValueError("--open_set needs thresholds: --calibrate, --calibration=<file> or an "
                         "export that carries assets/calibration.json.")
    return decisions


def plot_ranked(config, decisions, distances, query, gallery):
    from reid_tf.evaluate import calibration as calibration_lib
    from reid_tf.evaluate import visualize

    output_dir = config.output_folder
    threshold = (calibration_lib.threshold(decisions, "open_set", 0.01)
                 if decisions is not None and 0.01 in calibration_lib.fars_of(decisions)
                 else None)
    paths = visualize.plot_ranked_lists(distances, query, gallery, config.plot_ranked,
                                        output_dir, threshold=threshold)
    print(f"wrote {len(paths)} ranked-list pictures to {output_dir}/ranked "
          f"(and {output_dir}/tensorboard)")


def calibrate(config, dataset, runtime):
    """--calibrate: the thresholds of `runtime` on --calibration_data's query/gallery, or on
    validation identities of `dataset`'s training split."""
    from reid_tf.evaluate import evaluator

    share, seed = 0.0, 0
    if not config.calibration_data:
        if config.workdir:
            from reid_tf.train import workdir as workdir_lib

            trained = workdir_lib.read_config(config.workdir)
            share, seed = trained.validation_identities, trained.validation_seed
            if config.validation_identities not in (None, share):
                raise ValueError(f"--validation_identities={config.validation_identities}: "
                                 f"this workdir held out {share} of its training identities; "
                                 "only those were not trained on (leave the flag out).")
        else:
            share = config.validation_identities or 0.0
        if not share:
            raise ValueError("--calibrate needs identities the model did not train on: "
                             "--calibration_data=<labelled dataset>, or a workdir trained with "
                             "--validation_identities (this one held none out).")
    query, gallery, measured_on = evaluator.calibration_splits(
        dataset, config.calibration_data, share, seed, **config.reading)
    fitted = evaluator.calibrate(runtime, query, gallery, config.fars, config.batch_size,
                                 measured_on={**measured_on, "source": config.workdir or
                                              config.export}, progress=True)
    model_id = getattr(runtime, "model_id", None)  # an export's; a workdir's is stamped at export
    return {**fitted, "model_id": model_id} if model_id else fitted


def print_metrics(config, dataset, metrics, queries, gallery_size):
    cmc = metrics["cmc"]
    print(f"\n{dataset}: {queries} queries ({metrics['num_skipped']} skipped), "
          f"{gallery_size} gallery images; descriptor={config.descriptor} flip={config.flip} "
          f"rerank={config.rerank}")
    if "classic" in metrics:
        classic = metrics["classic"]
        print(f"classic protocol: CMC over {classic['trials']} draws of {classic['identities']} "
              "identities, one gallery image each; mAP and mINP of the standard protocol")
    print("| rank-1 | rank-5 | rank-10 | rank-20 | mAP | mINP |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {cmc[0]:.4f} | {cmc[4]:.4f} | {cmc[9]:.4f} | {cmc[19]:.4f} | "
          f"{metrics['mAP']:.4f} | {metrics['mINP']:.4f} |")


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
