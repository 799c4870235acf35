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

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A reid-train workdir: evaluates its latest checkpoint.")
flags.DEFINE_string("export", None, "A SavedModel export folder (<export_dir>/<version>).")
flags.DEFINE_string("dataset", None, "Dataset (default: the workdir's).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
flags.DEFINE_string("manual_dir", None, "TFDS manual_dir.")
flags.DEFINE_bool("skip_corrupt", False, "Leave out images that do not decode (else fail).")
flags.DEFINE_integer("image_height", None, "Input height for an --export that does not record "
                     "its training size (exports do since this flag's help says so); else unused.")
flags.DEFINE_integer("image_width", None, "Input width, as --image_height.")
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
flags.DEFINE_integer("batch_size", 64, "Feature extraction batch size.")
flags.DEFINE_integer("plot_ranked", 0, "Write ranked-list pictures of this many queries.")
flags.DEFINE_string("output_dir", None, "Where results.json and pictures go.")


def _embedder(image_size):
    """A function float32 images [B,h,w,3] 0..255 -> embeddings, and the image size."""
    import tensorflow as tf

    from reid_tf import model as model_lib

    if FLAGS.export:
        from reid_tf import features

        export = features.Export(FLAGS.export)
        serving = export.signatures["serving_default"]
        if export.image_size is not None:  # the size it was trained at, recorded in the export
            given = (FLAGS.image_height, FLAGS.image_width)
            if any(given) and given != export.image_size:
                raise ValueError(f"--image_height/--image_width={given}: the export was trained "
                                 f"at {export.image_size}; leave them out.")
            image_size = export.image_size
        elif not all(image_size):
            raise ValueError(f"{FLAGS.export} does not record its training size: give "
                             "--image_height and --image_width.")

        def embed(images):
            outputs = serving(images=tf.cast(tf.round(images), tf.uint8))
            return model_lib.select_descriptor(outputs, FLAGS.descriptor)

        return embed, image_size
    from reid_tf import workdir as workdir_lib

    net, checkpoint = workdir_lib.load_trained_model(FLAGS.workdir)
    if FLAGS.descriptor == "part_embeddings" and not net.num_parts:
        raise ValueError("--descriptor=part_embeddings: this model has no parts (num_parts=0).")
    print(f"evaluating {checkpoint}")
    return tf.function(lambda images: model_lib.select_descriptor(
        net(images, training=False), FLAGS.descriptor)), net.image_size


def extract(embed, split, image_size, flip, description):
    import numpy as np
    import tensorflow as tf
    from tqdm import tqdm

    from reid_tf import input_pipeline

    features = []
    batches = input_pipeline.eval_dataset(split, image_size, FLAGS.batch_size)
    with tqdm(total=len(split), desc=description, unit="img") as progress:
        for batch in batches:
            embedding = embed(batch["image"])
            if flip:
                embedding = tf.math.l2_normalize(embedding + embed(batch["image"][:, :, ::-1]), -1)
            features.append(embedding.numpy())
            progress.update(len(embedding))
    return np.concatenate(features)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    try:
        results = run_eval()
    except (ValueError, OSError, KeyError) as error:  # OSError: names its path
        print(f"reid-eval: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps({k: results[k] for k in ("rank1", "mAP", "mINP")}))


def run_eval():
    import tensorflow as tf

    from reid_tf import evaluation
    from reid_tf import input_pipeline
    from reid_tf import reranking
    from reid_tf import visualize

    tf.get_logger().setLevel("ERROR")
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
    embed, image_size = _embedder((FLAGS.image_height, FLAGS.image_width))
    splits = input_pipeline.load_splits(dataset, FLAGS.data_dir, FLAGS.manual_dir,
                                        FLAGS.skip_corrupt)
    query, gallery = splits["query"], splits["gallery"]
    query_features = extract(embed, query, image_size, FLAGS.flip, "query")
    gallery_features = extract(embed, gallery, image_size, FLAGS.flip, "gallery")
    labels = (query.person_ids, gallery.person_ids, query.camera_ids, gallery.camera_ids)
    # A large gallery is re-ranked from the features, chunk by chunk: the dense path holds
    # gallery x gallery distances (27 GB at MSMT17's 82,161).
    streamed = (FLAGS.rerank and FLAGS.metric == "cosine" and not FLAGS.single_gallery_shot
                and not FLAGS.plot_ranked and len(gallery) > FLAGS.rerank_dense_max_gallery)
    distances = None
    if streamed:
        print(f"re-ranking {len(query)} x {len(gallery)} from the features, chunk by chunk")
        metrics = evaluation.evaluate_chunked(
            reranking.re_rank_features(query_features, gallery_features, FLAGS.k1, FLAGS.k2,
                                       FLAGS.lambda_value), *labels,
            average_precision=FLAGS.average_precision)
    else:
        distances = evaluation.pairwise_distances(query_features, gallery_features,
                                                  FLAGS.metric)
        if FLAGS.rerank:
            distances = reranking.re_rank(
                distances,
                evaluation.pairwise_distances(query_features, query_features, FLAGS.metric),
                evaluation.pairwise_distances(gallery_features, gallery_features, FLAGS.metric),
                FLAGS.k1, FLAGS.k2, FLAGS.lambda_value)
        if FLAGS.single_gallery_shot:
            metrics = evaluation.evaluate_single_gallery_shot(distances, *labels)
        else:
            metrics = evaluation.evaluate(distances, *labels,
                                          average_precision=FLAGS.average_precision)
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
