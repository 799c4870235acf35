"""Evaluation of a runtime on a query/gallery pair: every descriptor's rank-1 / mAP / mINP, and
how consistent the parts are; and the scoring options of reid-eval (re-ranking, CUHK03's
single-gallery-shot CMC, the AP definition)."""

import numpy as np

from reid_tf.evaluate import calibration
from reid_tf.evaluate import contract
from reid_tf.evaluate import metrics as metrics_lib
from reid_tf.evaluate import reranking
from reid_tf.evaluate.extract import extract
from reid_tf.model import descriptors
from reid_tf.model import parts


def labels_of(query, gallery):
    """`(query ids, gallery ids, query cameras, gallery cameras)` of two splits."""
    return query.person_ids, gallery.person_ids, query.camera_ids, gallery.camera_ids


def evaluate_runtime(runtime, query, gallery, batch_size=64):
    """rank-1 / mAP / mINP / CMC of `runtime` (cosine, test descriptor `embedding`).

    Also `descriptors`: `{name: {rank1, mAP, mINP}}` for every descriptor the model has, and
    `part_consistency` (`parts.part_consistency` over the query and gallery masks) with parts,
    and `part_fallback` (the share of query and gallery images whose clustering fell back to
    stripes) where the runtime reports it (an in-memory model).
    """
    names = [n for n in descriptors.DESCRIPTORS if n != "part_embeddings" or runtime.num_parts]
    fallback = runtime.num_parts and "part_fallback" in getattr(runtime, "extra_outputs", ())
    names.append("part_masks")
    if fallback:
        names.append("part_fallback")
    query_outputs = extract(runtime, query, names, batch_size)
    gallery_outputs = extract(runtime, gallery, names, batch_size)
    scores = {}
    for name in [n for n in names if n not in contract.RAW_OUTPUTS]:
        distances = metrics_lib.pairwise_distances(query_outputs[name], gallery_outputs[name],
                                                   "cosine")
        scores[name] = metrics_lib.evaluate(distances, *labels_of(query, gallery))
    result = dict(scores["embedding"])
    result["descriptors"] = {name: {"rank1": m["rank1"], "mAP": m["mAP"], "mINP": m["mINP"]}
                             for name, m in scores.items()}
    if runtime.num_parts:
        result["part_consistency"] = parts.part_consistency(
            np.concatenate([query_outputs["part_masks"], gallery_outputs["part_masks"]]))
    if fallback:
        result["part_fallback"] = float(np.mean(np.concatenate(
            [query_outputs["part_fallback"], gallery_outputs["part_fallback"]])))
    return result


def score(query_features, gallery_features, query, gallery, metric="cosine", rerank=False,
          k1=20, k2=6, lambda_value=0.3, rerank_dense_max_gallery=20000,
          single_gallery_shot=False, average_precision="noninterpolated", keep_distances=False,
          log=print):
    """reid-eval's metrics of features: `(metrics, distances)`.

    Re-ranking of a gallery larger than `rerank_dense_max_gallery` (cosine) works from the
    features chunk by chunk (the dense path holds gallery x gallery distances: 27 GB at
    MSMT17's 82,161); `distances` is then None. `keep_distances` forces the dense path (ranked
    pictures need the distances).
    """
    labels = labels_of(query, gallery)
    streamed = (rerank and metric == "cosine" and not single_gallery_shot
                and not keep_distances and len(gallery) > rerank_dense_max_gallery)
    if streamed:
        log(f"re-ranking {len(query)} x {len(gallery)} from the features, chunk by chunk")
        chunks = reranking.re_rank_features(query_features, gallery_features, k1, k2,
                                            lambda_value)
        return metrics_lib.evaluate_chunked(chunks, *labels,
                                            average_precision=average_precision), None
    distances = metrics_lib.pairwise_distances(query_features, gallery_features, metric)
    if rerank:
        distances = reranking.re_rank(
            distances, metrics_lib.pairwise_distances(query_features, query_features, metric),
            metrics_lib.pairwise_distances(gallery_features, gallery_features, metric),
            k1, k2, lambda_value)
    if single_gallery_shot:
        return metrics_lib.evaluate_single_gallery_shot(distances, *labels), distances
    return metrics_lib.evaluate(distances, *labels, average_precision=average_precision), distances


def calibrate(runtime, query, gallery, fars=calibration.FARS, batch_size=64, measured_on=None,
              progress=False):
    """The decision calibration (`calibration.fit`) of `runtime` on labelled query/gallery
    splits of identities it did not train on (validation identities, or a labelled folder);
    `progress`: progress bars while extracting (reid-eval's)."""
    query_embeddings, gallery_embeddings = (
        extract(runtime, split, ["embedding"], batch_size,
                description=name if progress else None)["embedding"]
        for name, split in (("calibration query", query), ("calibration gallery", gallery)))
    return calibration.fit(query_embeddings, query, gallery_embeddings, gallery, fars,
                           measured_on=measured_on)
