"""Evaluation and re-ranking at Market-1501 scale: time, peak memory, agreement.

Random features (3,368 queries, 15,913 gallery, 2,048-d, 751 identities + distractors id 0,
6 cameras), squared-euclidean distances precomputed (not timed). Prints:
- `evaluate` from the distance matrix (after a 2-query warm-up call that compiles or loads the
  numba kernel): seconds, peak memory of its own allocations
  (tracemalloc), and the largest difference to a plain per-query reference of the protocol
  (stable argsort per query, as torchreid's Python evaluator);
- `re_rank` (k1=20, k2=6, lambda=0.3): seconds and peak memory; agreement with the dense
  reference (tests/test_reranking.py) is checked on a 400 x 1,600 subset, since the dense
  version needs O(N^2) Python work.

    python benchmarks/metrics_lib.py [--rerank=false]
"""

import os
import sys
import time
import tracemalloc

from absl import app
from absl import flags
import numpy as np

from reid_tf import testing  # noqa: E402
from reid_tf.evaluate import metrics as metrics_lib
from reid_tf.evaluate import reranking

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_query", 3368, "Queries.")
flags.DEFINE_integer("num_gallery", 15913, "Gallery images.")
flags.DEFINE_integer("dim", 2048, "Feature dimension.")
flags.DEFINE_bool("rerank", True, "Also time re-ranking.")
flags.DEFINE_bool("reference", True, "Also run the per-query reference evaluator.")
flags.DEFINE_bool("large", True, "Also evaluate 3,000 queries x 100,000 gallery from features.")
flags.DEFINE_bool("rerank_features", True, "Also re-rank from the features at Market scale and "
                  "compare with re_rank on the dense matrices.")
flags.DEFINE_bool("msmt", False, "Also re-ranked evaluation from features at MSMT17 scale "
                  "(11,659 x 82,161; minutes and several GB).")
flags.DEFINE_bool("msmt_only", False, "Only the MSMT17-scale re-ranked evaluation.")


def market_like(rng):
    ids = np.arange(1, 752)
    query_ids = rng.choice(ids, FLAGS.num_query)
    gallery_ids = np.where(rng.random(FLAGS.num_gallery) < 0.15, 0,
                           rng.choice(ids, FLAGS.num_gallery))
    return (query_ids, gallery_ids, rng.integers(1, 7, FLAGS.num_query),
            rng.integers(1, 7, FLAGS.num_gallery))


def measured(function, *args, **kwargs):
    tracemalloc.start()
    start = time.perf_counter()
    result = function(*args, **kwargs)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak / 2 ** 30


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    from test_evaluation import reference_evaluate
    from test_reranking import dense_reference

    rng = np.random.default_rng(0)
    if FLAGS.msmt_only:
        msmt(rng)
        return
    query = rng.normal(size=(FLAGS.num_query, FLAGS.dim)).astype(np.float32)
    gallery = rng.normal(size=(FLAGS.num_gallery, FLAGS.dim)).astype(np.float32)
    labels = market_like(rng)
    distances = metrics_lib.pairwise_distances(query, gallery, "sqeuclidean")
    print(f"machine: {os.cpu_count()} CPU cores; {FLAGS.num_query} x {FLAGS.num_gallery}, "
          f"{FLAGS.dim}-d", flush=True)
    start = time.perf_counter()
    metrics_lib.evaluate(distances[:2], labels[0][:2], labels[1], labels[2][:2], labels[3])
    print(f"first call (numba kernel compiled or loaded from its cache): "
          f"{time.perf_counter() - start:.2f} s", flush=True)
    result, seconds, peak = measured(metrics_lib.evaluate, distances, *labels)
    print(f"evaluate: {seconds:.3f} s, peak {peak:.2f} GiB; rank-1 {result['rank1']:.6f} "
          f"mAP {result['mAP']:.6f} mINP {result['mINP']:.6f} valid {result['num_valid']} "
          f"skipped {result['num_skipped']}", flush=True)
    if FLAGS.reference:
        start = time.perf_counter()
        cmc, mean_ap, minp, valid = reference_evaluate(distances, *labels, 50)
        print(f"reference (per-query stable argsort): {time.perf_counter() - start:.2f} s; "
              f"max |CMC diff| {np.abs(cmc - result['cmc']).max():.2e}, "
              f"|mAP diff| {abs(mean_ap - result['mAP']):.2e}, "
              f"|mINP diff| {abs(minp - result['mINP']):.2e}, "
              f"valid {valid == result['num_valid']}", flush=True)
    if FLAGS.large:
        large_query = rng.normal(size=(3000, FLAGS.dim)).astype(np.float32)
        large_gallery = rng.normal(size=(100_000, FLAGS.dim)).astype(np.float32)
        large_labels = (rng.integers(0, 5000, 3000), rng.integers(0, 5000, 100_000),
                        rng.integers(1, 7, 3000), rng.integers(1, 7, 100_000))
        result, seconds, peak = measured(metrics_lib.evaluate_features, large_query,
                                         large_gallery, *large_labels)
        inputs = (large_query.nbytes + large_gallery.nbytes) / 2 ** 30
        print(f"evaluate_features 3000 x 100000 ({FLAGS.dim}-d, cosine): {seconds:.1f} s, peak "
              f"{peak:.2f} GiB of its own allocations (+ {inputs:.2f} GiB features); "
              f"valid {result['num_valid']}", flush=True)
        del large_query, large_gallery
    if FLAGS.msmt:
        msmt(rng)
    if not FLAGS.rerank:
        return
    query_query = metrics_lib.pairwise_distances(query, query, "sqeuclidean")
    gallery_gallery = metrics_lib.pairwise_distances(gallery, gallery, "sqeuclidean")
    for matrix in (query_query, gallery_gallery):
        np.fill_diagonal(matrix, 0)
    reranked, seconds, peak = measured(reranking.re_rank, distances, query_query,
                                       gallery_gallery)
    after = metrics_lib.evaluate(reranked, *labels)
    print(f"re_rank: {seconds:.2f} s, peak {peak:.2f} GiB (inputs not counted: "
          f"{(distances.nbytes + query_query.nbytes + gallery_gallery.nbytes) / 2**30:.2f} GiB);"
          f" mAP after {after['mAP']:.6f}", flush=True)
    small = (slice(0, 400), slice(0, 1600))
    q_g, q_q = distances[small], query_query[small[0], small[0]]
    g_g = gallery_gallery[small[1], small[1]]
    q_q, g_g = (q_q + q_q.T) / 2, (g_g + g_g.T) / 2
    difference = np.abs(reranking.re_rank(q_g, q_q, g_g) - dense_reference(q_g, q_q, g_g, 20, 6,
                                                                           0.3)).max()
    print(f"re_rank vs dense reference on 400 x 1600: max |difference| {difference:.2e}")
    if FLAGS.rerank_features:
        # Market scale: from the features against the dense matrices (cosine here).
        dense = reranking.re_rank(metrics_lib.pairwise_distances(query, gallery),
                                  metrics_lib.pairwise_distances(query, query),
                                  metrics_lib.pairwise_distances(gallery, gallery))
        expected = metrics_lib.evaluate(dense, *labels)
        del dense
        got, seconds, peak = measured(lambda: metrics_lib.evaluate_chunked(
            reranking.re_rank_features(query, gallery), *labels))
        print(f"re_rank_features (Market scale, cosine): {seconds:.1f} s, peak {peak:.2f} GiB; "
              f"vs re_rank on dense matrices: max |CMC diff| "
              f"{np.abs(got['cmc'] - expected['cmc']).max():.2e}, |mAP diff| "
              f"{abs(got['mAP'] - expected['mAP']):.2e}", flush=True)


def msmt(rng):
    """Re-ranked evaluation from features at MSMT17 scale: 11,659 x 82,161, 2,048-d; only the
    feature path fits (a dense gallery x gallery matrix alone would be 27 GB)."""
    msmt_query = rng.normal(size=(11_659, FLAGS.dim)).astype(np.float32)
    msmt_gallery = rng.normal(size=(82_161, FLAGS.dim)).astype(np.float32)
    msmt_labels = (rng.integers(0, 3060, 11_659), rng.integers(0, 3060, 82_161),
                   rng.integers(1, 16, 11_659), rng.integers(1, 16, 82_161))
    got, seconds, peak = measured(lambda: metrics_lib.evaluate_chunked(
        reranking.re_rank_features(msmt_query, msmt_gallery), *msmt_labels))
    inputs = (msmt_query.nbytes + msmt_gallery.nbytes) / 2 ** 30
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20
    print(f"re-ranked evaluation at MSMT17 scale (11659 x 82161, {FLAGS.dim}-d): "
          f"{seconds:.0f} s, peak {peak:.2f} GiB of its own allocations (+ {inputs:.2f} GiB "
          f"features); process peak RSS {hwm:.2f} GiB; mAP {got['mAP']:.4f}", flush=True)


if __name__ == "__main__":
    app.run(main)
