"""ReID evaluation: distances, CMC and mAP under the Market-1501 protocol (torchreid, fast-reid).

Per query, gallery images of the same person AND the same camera are left out; a query left with
no true match is skipped (and counted); CMC is the cumulative hit indicator clipped at 1; AP is
non-interpolated (the mean of the precision at each true match); mINP is the mean of
(number of true matches / rank of the hardest one); averages are over valid queries. Ranks break
distance ties by gallery order (a stable sort).
"""

import numba
import numpy as np

from reid_tf.model.descriptors import unit_rows

METRICS = ("cosine", "euclidean", "sqeuclidean")


def _check_features(name, features):
    features = np.asarray(features, np.float32)
    if features.ndim != 2:
        raise ValueError(f"{name}: expected a [N, D] feature matrix, got shape {features.shape}.")
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        raise ValueError(f"{name}: {bad} row(s) hold NaN or infinite values.")
    return features


def _check_feature_pair(query, gallery, metric):
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS}.")
    query = _check_features("query features", query)
    gallery = _check_features("gallery features", gallery)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query features have dimension {query.shape[1]} but gallery features "
                         f"{gallery.shape[1]}.")
    return query, gallery


def _prepare(features, metric):
    """Features as the distance blocks use them (unit rows for cosine) and their squared norms."""
    if metric == "cosine":
        features = unit_rows(features)
    return features, (features ** 2).sum(axis=1)


def _distance_block(query, query_norms, gallery, gallery_norms, metric):
    products = query @ gallery.T
    if metric == "cosine":
        return 1.0 - products
    squared = np.maximum(query_norms[:, None] + gallery_norms[None] - 2 * products, 0)
    return squared if metric == "sqeuclidean" else np.sqrt(squared)


def pairwise_distances(query, gallery, metric="cosine", chunk_size=1024):
    """Distances `[Q, G]` (float32), computed `chunk_size` queries at a time.

    `cosine` is 1 - cosine similarity; `euclidean` and `sqeuclidean` as named.
    """
    query, gallery = _check_feature_pair(query, gallery, metric)
    query, query_norms = _prepare(query, metric)
    gallery, gallery_norms = _prepare(gallery, metric)
    distances = np.empty((len(query), len(gallery)), np.float32)
    for start in range(0, len(query), chunk_size):
        block = slice(start, start + chunk_size)
        distances[block] = _distance_block(query[block], query_norms[block], gallery,
                                           gallery_norms, metric)
    return distances


@numba.njit(parallel=True, cache=True)
def _rank_matches(distances, query_ids, gallery_ids, query_cameras, gallery_cameras, offsets):
    """Ranks (1-based, among kept images, ordered by distance then gallery index) of each
    query's true matches, ascending, written at `offsets[q]:offsets[q + 1]` of the result.

    One pass over a row finds its true matches (same id, other camera) and sorts them; a second
    pass drops each kept image into the gap between consecutive matches that it falls in and
    counts; a match's rank is the running count up to its gap. No row is sorted.
    """
    num_query, num_gallery = distances.shape
    ranks = np.empty(offsets[-1], np.int64)
    finite = np.ones(num_query, np.bool_)
    for q in numba.prange(num_query):
        count = offsets[q + 1] - offsets[q]
        if count == 0:
            finite[q] = np.isfinite(distances[q]).all()
            continue
        match_index = np.empty(count, np.int64)
        n = 0
        for g in range(num_gallery):
            if gallery_ids[g] == query_ids[q] and gallery_cameras[g] != query_cameras[q]:
                match_index[n] = g
                n += 1
        match_distance = distances[q, match_index]
        order = np.argsort(match_distance, kind="mergesort")  # stable: ties by gallery index
        match_index, match_distance = match_index[order], match_distance[order]
        gaps = np.zeros(count + 1, np.int64)
        query_id, query_camera = query_ids[q], query_cameras[q]
        for g in range(num_gallery):
            if gallery_ids[g] == query_id and gallery_cameras[g] == query_camera:
                continue  # removed: same person, same camera
            value = distances[q, g]
            if not np.isfinite(value):
                finite[q] = False
            # Matches before image g (by distance, then gallery index). A branch-free count over
            # the few matches vectorises; a binary search would mispredict on every image.
            before, equal = 0, 0
            for k in range(count):
                before += match_distance[k] < value
                equal += match_distance[k] == value
            if equal:  # rare: equal distances are ordered by gallery index
                for k in range(count):
                    before += (match_distance[k] == value) & (match_index[k] < g)
            gaps[before] += 1
        running = 0
        for k in range(count):
            running += gaps[k]
            ranks[offsets[q] + k] = running  # kept images up to and including match k
        for g in match_index:  # matches are skipped above only if removed: check them too
            finite[q] &= np.isfinite(distances[q, g])
    return ranks, finite


@numba.njit(parallel=True, cache=True)
def _count_matches(query_ids, gallery_ids, query_cameras, gallery_cameras):
    """True matches (same id, other camera) of each query."""
    counts = np.zeros(len(query_ids), np.int64)
    for q in numba.prange(len(query_ids)):
        for g in range(len(gallery_ids)):
            counts[q] += (gallery_ids[g] == query_ids[q]) & (gallery_cameras[g] != query_cameras[q])
    return counts


def _match_ranks(distances, query_ids, gallery_ids, query_cameras, gallery_cameras):
    """(rows, ranks) of every true match of a block of queries, by row then rank."""
    query_ids, gallery_ids, query_cameras, gallery_cameras = (
        np.asarray(a, np.int64) for a in (query_ids, gallery_ids, query_cameras, gallery_cameras))
    counts = _count_matches(query_ids, gallery_ids, query_cameras, gallery_cameras)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ranks, finite = _rank_matches(distances, query_ids, gallery_ids, query_cameras,
                                  gallery_cameras, offsets)
    if not finite.all():
        raise ValueError("distances hold NaN or infinite values.")
    return np.repeat(np.arange(len(counts)), counts), ranks


AVERAGE_PRECISION = ("noninterpolated", "trapezoid")


def evaluate(distances, query_ids, gallery_ids, query_cameras, gallery_cameras, max_rank=50,
             chunk_size=128, average_precision="noninterpolated"):
    """CMC, mAP and mINP from a distance matrix `[Q, G]` (smaller is closer).

    Exactly the protocol of the module docstring, computed `chunk_size` queries at a time;
    `distances` may be any array-like supporting row slices (a memory-mapped file, say).
    `average_precision="trapezoid"` is the official Market-1501 code's AP: at each true match,
    the recall step times the mean of the precision there and one rank earlier (1 before the
    first rank).

    Returns a dict: `cmc` (float array of ranks 1..max_rank; past the gallery size it stays at
    its last value), `rank1`, `mAP`, `mINP`, `num_valid`, `num_skipped`.
    """
    if average_precision not in AVERAGE_PRECISION:
        raise ValueError(f"average_precision={average_precision!r}: expected one of "
                         f"{AVERAGE_PRECISION}.")
    if not hasattr(distances, "shape"):  # a list of rows; memory-mapped arrays stay as they are
        distances = np.asarray(distances, np.float32)
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    query_cameras, gallery_cameras = np.asarray(query_cameras), np.asarray(gallery_cameras)
    if len(distances.shape) != 2:
        raise ValueError(f"distances: expected a [Q, G] matrix, got shape {distances.shape}.")
    num_query, num_gallery = distances.shape
    if num_gallery == 0:
        raise ValueError("gallery is empty: nothing to rank.")
    for name, array, size in [("query_ids", query_ids, num_query),
                              ("query_cameras", query_cameras, num_query),
                              ("gallery_ids", gallery_ids, num_gallery),
                              ("gallery_cameras", gallery_cameras, num_gallery)]:
        if array.shape != (size,):
            raise ValueError(f"{name}: expected {size} entries to match the distance matrix, got "
                             f"shape {array.shape}.")
    if max_rank < 1:
        raise ValueError(f"max_rank={max_rank}: expected >= 1.")
    chunks = ((slice(start, start + chunk_size), distances[start:start + chunk_size])
              for start in range(0, num_query, chunk_size))
    return _evaluate_chunks(chunks, num_query, query_ids, gallery_ids, query_cameras,
                            gallery_cameras, max_rank, average_precision)


def evaluate_features(query_features, gallery_features, query_ids, gallery_ids, query_cameras,
                      gallery_cameras, metric="cosine", max_rank=50, chunk_size=512,
                      average_precision="noninterpolated"):
    """`evaluate` straight from features, never holding more than `chunk_size` distance rows:
    memory stays bounded for any gallery size."""
    query_features, gallery_features = _check_feature_pair(query_features, gallery_features,
                                                           metric)
    if len(gallery_features) == 0:
        raise ValueError("gallery is empty: nothing to rank.")
    for name, array, size in [("query_ids", query_ids, len(query_features)),
                              ("query_cameras", query_cameras, len(query_features)),
                              ("gallery_ids", gallery_ids, len(gallery_features)),
                              ("gallery_cameras", gallery_cameras, len(gallery_features))]:
        if np.shape(array) != (size,):
            raise ValueError(f"{name}: expected {size} entries to match the features, got "
                             f"shape {np.shape(array)}.")
    query_features, query_norms = _prepare(query_features, metric)
    gallery_features, gallery_norms = _prepare(gallery_features, metric)
    chunks = ((slice(start, start + chunk_size),
               _distance_block(query_features[start:start + chunk_size],
                               query_norms[start:start + chunk_size], gallery_features,
                               gallery_norms, metric))
              for start in range(0, len(query_features), chunk_size))
    return _evaluate_chunks(chunks, len(query_features), *map(np.asarray, (
        query_ids, gallery_ids, query_cameras, gallery_cameras)), max_rank, average_precision)


def evaluate_chunked(chunks, query_ids, gallery_ids, query_cameras, gallery_cameras,
                     max_rank=50, average_precision="noninterpolated"):
    """`evaluate` over distance rows that arrive in chunks: `(query rows slice, [rows, G])`,
    e.g. from `reranking.re_rank_features`, so no [Q, G] matrix is ever held."""
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    query_cameras, gallery_cameras = np.asarray(query_cameras), np.asarray(gallery_cameras)
    if average_precision not in AVERAGE_PRECISION:
        raise ValueError(f"average_precision={average_precision!r}: expected one of "
                         f"{AVERAGE_PRECISION}.")
    return _evaluate_chunks(chunks, len(query_ids), query_ids, gallery_ids, query_cameras,
                            gallery_cameras, max_rank, average_precision)


def _evaluate_chunks(chunks, num_query, query_ids, gallery_ids, query_cameras, gallery_cameras,
                     max_rank, average_precision):
    hits_at = np.zeros(max_rank)
    average_precisions, inverse_negative_penalties = [], []
    for block, chunk in chunks:
        chunk = np.ascontiguousarray(chunk, np.float32)
        rows, ranks = _match_ranks(chunk, query_ids[block], gallery_ids, query_cameras[block],
                                   gallery_cameras)
        if len(rows) == 0:
            continue
        first = np.r_[True, rows[1:] != rows[:-1]]
        last = np.r_[rows[1:] != rows[:-1], True]
        match_number = np.arange(len(rows)) - np.flatnonzero(first).repeat(np.diff(np.r_[
            np.flatnonzero(first), len(rows)])) + 1
        num_matches = match_number[last]
        hits_at += (ranks[first][:, None] <= np.arange(1, max_rank + 1)[None]).sum(axis=0)
        precision = match_number / ranks
        if average_precision == "trapezoid":
            # The official code averages with the precision one rank earlier (1 at rank 0).
            previous = np.where(ranks > 1, (match_number - 1) / np.maximum(ranks - 1, 1), 1.0)
            precision = (previous + precision) / 2
        precision_sums = np.add.reduceat(precision, np.flatnonzero(first))
        average_precisions.append(precision_sums / num_matches)
        inverse_negative_penalties.append(num_matches / ranks[last])
    num_valid = int(sum(len(a) for a in average_precisions))
    if num_valid == 0:
        raise ValueError("no query has a true match in the gallery (after removing same-camera "
                         "images of the same person).")
    cmc = hits_at / num_valid
    return {
        "cmc": cmc,
        "rank1": float(cmc[0]),
        "mAP": float(np.concatenate(average_precisions).mean()),
        "mINP": float(np.concatenate(inverse_negative_penalties).mean()),
        "num_valid": num_valid,
        "num_skipped": int(num_query - num_valid),
    }


def evaluate_single_gallery_shot(distances, query_ids, gallery_ids, query_cameras,
                                 gallery_cameras, max_rank=50, repeats=10, seed=0):
    """CUHK03's classic protocol: CMC with one random gallery image per identity, averaged over
    `repeats` draws (after removing the query's same-camera images); mAP as in `evaluate`."""
    distances = np.asarray(distances, np.float32)
    standard = evaluate(distances, query_ids, gallery_ids, query_cameras, gallery_cameras,
                        max_rank)
    gallery_ids, gallery_cameras = np.asarray(gallery_ids), np.asarray(gallery_cameras)
    rng = np.random.default_rng(seed)
    hits_at, valid = np.zeros(max_rank), 0
    for q in range(len(distances)):
        kept = ~((gallery_ids == query_ids[q]) & (gallery_cameras == query_cameras[q]))
        if not (kept & (gallery_ids == query_ids[q])).any():
            continue
        valid += 1
        order = np.flatnonzero(kept)[np.argsort(distances[q, kept], kind="stable")]
        ids = gallery_ids[order]
        for _ in range(repeats):
            # One image per identity: the first occurrence in a random permutation.
            permutation = rng.permutation(len(order))
            _, first = np.unique(ids[permutation], return_index=True)
            sampled = np.sort(permutation[first])  # positions in distance order
            rank = np.flatnonzero(ids[sampled] == query_ids[q])[0] + 1
            hits_at += (rank <= np.arange(1, max_rank + 1)) / repeats
    cmc = hits_at / valid
    return {**standard, "cmc": cmc, "rank1": float(cmc[0])}


def evaluate_classic(distances, query_ids, gallery_ids, query_cameras, gallery_cameras,
                     identities=100, trials=20, seed=0, max_rank=20):
    """CUHK03's classic protocol (Li et al. 2014; the paper era's figures): in each of `trials`
    seeded draws, `identities` test identities, each with one probe image (from the queries)
    and one gallery image from another camera than its probe; every probe ranked against those
    `identities` gallery images (ties by the draw's order), CMC averaged over probes and draws.
    mAP and mINP stay the standard protocol's (`evaluate`); with one true match per probe the
    classic protocol has no mAP of its own."""
    gallery_ids, gallery_cameras = np.asarray(gallery_ids), np.asarray(gallery_cameras)
    candidates = {}  # identity -> [(probe index, its other-camera gallery indexes)]
    for q, (identity, camera) in enumerate(zip(query_ids, query_cameras)):
        other = np.flatnonzero((gallery_ids == identity) & (gallery_cameras != camera))
        if len(other):
            candidates.setdefault(int(identity), []).append((q, other))
    eligible = np.array(sorted(candidates))
    if len(eligible) < identities:
        raise ValueError(f"classic protocol: {identities} identities asked, but only "
                         f"{len(eligible)} have a query and a gallery image from another camera.")
    distances = np.asarray(distances, np.float32)
    hits = np.zeros(max_rank)
    for trial in range(trials):
        rng = np.random.default_rng([seed, trial])
        probes, gallery = [], []
        for identity in rng.choice(eligible, identities, replace=False):
            q, other = candidates[int(identity)][rng.integers(len(candidates[int(identity)]))]
            probes.append(q)
            gallery.append(other[rng.integers(len(other))])
        block = distances[np.ix_(probes, gallery)]
        true = np.diag(block)[:, None]
        earlier = np.arange(identities)[None, :] < np.arange(identities)[:, None]
        ranks = 1 + ((block < true) | ((block == true) & earlier)).sum(axis=1)
        hits += (ranks[:, None] <= np.arange(1, max_rank + 1)[None, :]).sum(axis=0)
    cmc = hits / (trials * identities)
    standard = evaluate(distances, query_ids, gallery_ids, query_cameras, gallery_cameras,
                        max(max_rank, 20))
    return {**standard, "cmc": cmc, "rank1": float(cmc[0]),
            "classic": {"identities": identities, "trials": trials, "seed": seed}}


def mean_over_splits(results):
    """Mean CMC, mAP and mINP over evaluations of several splits (VIPeR's 10 x 2 protocol)."""
    if not results:
        raise ValueError("mean_over_splits: no results to average.")
    cmc = np.mean([r["cmc"] for r in results], axis=0)
    return {"cmc": cmc, "rank1": float(cmc[0]),
            "mAP": float(np.mean([r["mAP"] for r in results])),
            "mINP": float(np.mean([r["mINP"] for r in results])),
            "num_valid": int(sum(r["num_valid"] for r in results)),
            "num_skipped": int(sum(r["num_skipped"] for r in results)),
            "num_splits": len(results)}
