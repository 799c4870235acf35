"""Evaluation of a runtime on a query/gallery pair: every descriptor's rank-1 / mAP / mINP, and
how consistent the parts are; and the scoring options of reid-eval (re-ranking, CUHK03's
single-gallery-shot CMC, the AP definition)."""

import dataclasses

import numpy as np

from reid_tf.data import splits as splits_lib
from reid_tf.evaluate import calibration
from reid_tf.evaluate import contract
from reid_tf.evaluate import metrics as metrics_lib
from reid_tf.evaluate import reranking
from reid_tf.evaluate.extract import extract
from reid_tf.model import descriptors
from reid_tf.model import parts
from reid_tf.options import Option


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


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How features are scored (reid-eval's scoring options, each declared once)."""

    metric: str = Option("cosine", "Distance.",
                         choices=("cosine", "euclidean", "sqeuclidean")).field()
    rerank: bool = Option(False, "k-reciprocal re-ranking (Zhong et al. 2017).").field()
    rerank_dense_max_gallery: int = Option(
        20000, "Above this gallery size (cosine), --rerank works from the features chunk by "
        "chunk instead of dense gallery x gallery distances.", minimum=0).field()
    k1: int = Option(20, "Re-ranking k1.").field()
    k2: int = Option(6, "Re-ranking k2.").field()
    lambda_value: float = Option(0.3, "Re-ranking lambda.").field()
    average_precision: str = Option(
        "noninterpolated", "AP definition (trapezoid: the official Market-1501 code).",
        choices=("noninterpolated", "trapezoid")).field()
    single_gallery_shot: bool = Option(
        False, "CUHK03's classic CMC: one random gallery image per identity, 10 repeats (mAP "
        "unchanged).").field()
    classic_identities: int = Option(
        0, "CUHK03's classic protocol (the paper era's figures): this many test identities "
        "(100 in the papers), each with one probe and one gallery image from another camera, "
        "drawn --classic_trials times (seeded); CMC averaged, mAP the standard one's. 0: off.",
        minimum=0).field()
    classic_trials: int = Option(20, "Draws of the classic protocol.", minimum=1).field()


def score(query_features, gallery_features, query, gallery, scoring=Scoring(),
          keep_distances=False, log=print):
    """reid-eval's metrics of features: `(metrics, distances)`; `scoring`: a `Scoring` (or any
    config with its fields).

    Re-ranking of a gallery larger than `rerank_dense_max_gallery` (cosine) works from the
    features chunk by chunk (the dense path holds gallery x gallery distances: 27 GB at
    MSMT17's 82,161); `distances` is then None. `keep_distances` forces the dense path (ranked
    pictures need the distances).
    """
    labels = labels_of(query, gallery)
    s = scoring
    if s.single_gallery_shot and s.classic_identities:
        raise ValueError("--single_gallery_shot and --classic_identities are two protocols; "
                         "choose one.")
    rerank = (s.k1, s.k2, s.lambda_value)
    streamed = (s.rerank and s.metric == "cosine" and not s.single_gallery_shot
                and not s.classic_identities
                and not keep_distances and len(gallery) > s.rerank_dense_max_gallery)
    if streamed:
        log(f"re-ranking {len(query)} x {len(gallery)} from the features, chunk by chunk")
        chunks = reranking.re_rank_features(query_features, gallery_features, *rerank)
        return metrics_lib.evaluate_chunked(chunks, *labels,
                                            average_precision=s.average_precision), None
    distances = metrics_lib.pairwise_distances(query_features, gallery_features, s.metric)
    if s.rerank:
        distances = reranking.re_rank(
            distances, metrics_lib.pairwise_distances(query_features, query_features, s.metric),
            metrics_lib.pairwise_distances(gallery_features, gallery_features, s.metric),
            *rerank)
    if s.single_gallery_shot:
        return metrics_lib.evaluate_single_gallery_shot(distances, *labels), distances
    if s.classic_identities:
        return metrics_lib.evaluate_classic(distances, *labels, identities=s.classic_identities,
                                            trials=s.classic_trials), distances
    return (metrics_lib.evaluate(distances, *labels, average_precision=s.average_precision),
            distances)


def results_record(metrics, **about):
    """results.json of an evaluation: `about` (what was evaluated, how) and the metrics."""
    cmc = metrics["cmc"]
    return {**about, "rank1": metrics["rank1"], "rank5": float(cmc[4]),
            "rank10": float(cmc[9]), "rank20": float(cmc[19]), "mAP": metrics["mAP"],
            "mINP": metrics["mINP"], "cmc": cmc.tolist(), "num_queries": metrics["num_valid"],
            "skipped_queries": metrics["num_skipped"],
            **({"classic_protocol": metrics["classic"]} if "classic" in metrics else {})}


def calibration_splits(dataset, labelled=None, validation_identities=0.0, validation_seed=0,
                       **reading):
    """`(query, gallery, measured_on)`: what a calibration is fitted on. `labelled`: a labelled
    dataset's query/gallery; else `validation_identities` of `dataset`'s training split, carved
    as reid-train carves them (`validation_seed`). `reading`: `splits.load_splits`'s data_dir,
    manual_dir, skip_corrupt."""
    if labelled:
        data = splits_lib.load_splits(labelled, splits=("query", "gallery"), **reading)
        return data["query"], data["gallery"], {"dataset": labelled, "split": "query/gallery"}
    data = splits_lib.load_splits(dataset, validation_identities=validation_identities,
                                  validation_seed=validation_seed, splits=("train",), **reading)
    return data["val_query"], data["val_gallery"], {
        "dataset": dataset, "split": "validation identities",
        "validation_identities": validation_identities}


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
