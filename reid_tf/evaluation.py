"""ReID evaluation: distances, CMC and mAP under the Market-1501 protocol (torchreid, fast-reid).

Per query, gallery images of the same person AND the same camera are left out; a query left with
no true match is skipped (and counted); CMC is the cumulative hit indicator clipped at 1; AP is
non-interpolated (the mean of the precision at each true match); mINP is the mean of
(number of true matches / rank of the hardest one); averages are over valid queries. Ranks break
distance ties by gallery order (a stable sort).
"""

import numpy as np

METRICS = ("cosine", "euclidean", "sqeuclidean")


def _check_features(name, features):
    features = np.asarray(features, np.float32)
    if features.ndim != 2:
        raise ValueError(f"{name}: expected a [N, D] feature matrix, got shape {features.shape}.")
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        raise ValueError(f"{name}: {bad} row(s) hold NaN or infinite values.")
    return features


def pairwise_distances(query, gallery, metric="cosine", chunk_size=1024):
    """Distances `[Q, G]` (float32), computed `chunk_size` queries at a time.

    `cosine` is 1 - cosine similarity; `euclidean` and `sqeuclidean` as named.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS}.")
    query = _check_features("query features", query)
    gallery = _check_features("gallery features", gallery)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query features have dimension {query.shape[1]} but gallery features "
                         f"{gallery.shape[1]}.")
    if metric == "cosine":
        query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
        gallery = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    gallery_norms = (gallery ** 2).sum(axis=1)
    distances = np.empty((len(query), len(gallery)), np.float32)
    for start in range(0, len(query), chunk_size):
        block = query[start:start + chunk_size]
        products = block @ gallery.T
        if metric == "cosine":
            distances[start:start + chunk_size] = 1.0 - products
            continue
        squared = np.maximum((block ** 2).sum(axis=1)[:, None] + gallery_norms[None] - 2 * products, 0)
        distances[start:start + chunk_size] = squared if metric == "sqeuclidean" else np.sqrt(squared)
    return distances


def evaluate(distances, query_ids, gallery_ids, query_cameras, gallery_cameras, max_rank=50,
             chunk_size=256):
    """CMC, mAP and mINP from a distance matrix `[Q, G]` (smaller is closer).

    Returns a dict: `cmc` (float array of ranks 1..max_rank, padded with its last value when the
    gallery is smaller), `rank1`, `mAP`, `mINP`, `num_valid`, `num_skipped`.
    """
    distances = np.asarray(distances)
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    query_cameras, gallery_cameras = np.asarray(query_cameras), np.asarray(gallery_cameras)
    num_query, num_gallery = distances.shape if distances.ndim == 2 else (None, None)
    if distances.ndim != 2:
        raise ValueError(f"distances: expected a [Q, G] matrix, got shape {distances.shape}.")
    if num_gallery == 0:
        raise ValueError("gallery is empty: nothing to rank.")
    for name, array, size in [("query_ids", query_ids, num_query),
                              ("query_cameras", query_cameras, num_query),
                              ("gallery_ids", gallery_ids, num_gallery),
                              ("gallery_cameras", gallery_cameras, num_gallery)]:
        if array.shape != (size,):
            raise ValueError(f"{name}: expected {size} entries to match the distance matrix, got "
                             f"shape {array.shape}.")
    if not np.isfinite(distances).all():
        raise ValueError("distances hold NaN or infinite values.")
    hits_at = np.zeros(max_rank)
    average_precisions, inverse_negative_penalties = [], []
    for start in range(0, num_query, chunk_size):
        block = slice(start, start + chunk_size)
        order = np.argsort(distances[block], axis=1, kind="stable")
        same_id = gallery_ids[order] == query_ids[block, None]
        removed = same_id & (gallery_cameras[order] == query_cameras[block, None])
        kept = ~removed
        matches = same_id & kept
        valid = matches.any(axis=1)
        if not valid.any():
            continue
        matches, kept = matches[valid], kept[valid]
        rank_of = np.cumsum(kept, axis=1)  # 1-based rank among kept images
        first = np.argmax(matches, axis=1)
        first_rank = rank_of[np.arange(len(first)), first]
        hits_at += (first_rank[:, None] <= np.arange(1, max_rank + 1)[None]).sum(axis=0)
        match_count = np.cumsum(matches, axis=1)
        precision = np.where(matches, match_count / np.maximum(rank_of, 1), 0.0)
        num_matches = matches.sum(axis=1)
        average_precisions.append(precision.sum(axis=1) / num_matches)
        last = matches.shape[1] - 1 - np.argmax(matches[:, ::-1], axis=1)
        inverse_negative_penalties.append(num_matches / rank_of[np.arange(len(last)), last])
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
