"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), the definition of the authors' reference code, with bounded memory.

The reference builds dense N×N matrices (N = queries + gallery): the squared distances, a full
argsort and the encoding V. Only the k1+1 nearest neighbours of each image are ever read, and V
has a few dozen non-zeros per row, so here: the neighbours come from a chunked argpartition,
V is a sparse matrix, and the Jaccard distance is accumulated only for query × gallery pairs
sharing a non-zero. The result equals the reference's (up to float32 rounding; ties between
exactly equal distances may order neighbours differently, as the reference's unstable argsort
does itself).
"""

import numba
import numpy as np
from scipy import sparse

from reid_tf.model.descriptors import unit_rows


def _blocks(query_gallery, query_query, gallery_gallery, rows):
    """Rows `rows` (a slice of 0..N) of the full matrix [[q_q, q_g], [q_g^T, g_g]]."""
    num_query = query_query.shape[0]
    start, stop = rows.start, rows.stop
    parts = []
    if start < num_query:
        top = slice(start, min(stop, num_query))
        parts.append(np.hstack([query_query[top], query_gallery[top]]))
    if stop > num_query:
        bottom = slice(max(start, num_query) - num_query, stop - num_query)
        parts.append(np.hstack([query_gallery[:, bottom].T, gallery_gallery[bottom]]))
    return np.vstack(parts).astype(np.float32)


def _gather(query_gallery, query_query, gallery_gallery, rows, cols):
    """Entries (rows[i], cols[i]) of the full matrix, without building it."""
    num_query = query_query.shape[0]
    values = np.empty(len(rows), np.float32)
    row_query, col_query = rows < num_query, cols < num_query
    for mask, matrix, row_offset, col_offset, transpose in [
        (row_query & col_query, query_query, 0, 0, False),
        (row_query & ~col_query, query_gallery, 0, num_query, False),
        (~row_query & col_query, query_gallery, num_query, 0, True),
        (~row_query & ~col_query, gallery_gallery, num_query, num_query, False),
    ]:
        r, c = rows[mask] - row_offset, cols[mask] - col_offset
        values[mask] = matrix[c, r] if transpose else matrix[r, c]
    return values


def _reciprocal(neighbours):
    """Mask [N, k]: neighbour j of i has i among its own first k neighbours."""
    back = neighbours[neighbours]  # [N, k, k]
    return (back == np.arange(len(neighbours))[:, None, None]).any(axis=-1)


def check_parameters(k1, k2, lambda_value):
    """ValueError naming the parameter, for values re-ranking cannot use: k1 >= 1,
    1 <= k2 <= k1 + 1 (k2 averages over the k1+1 nearest neighbours), 0 <= lambda <= 1."""
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"re-ranking {name}={value!r}: expected an integer >= 1.")
    if k2 > k1 + 1:
        raise ValueError(f"re-ranking k2={k2} with k1={k1}: k2 averages over the k1+1 nearest "
                         f"neighbours, so it must be at most {k1 + 1} (lower --k2 or raise --k1).")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"re-ranking lambda_value={lambda_value!r}: expected 0..1.")


def re_rank(query_gallery, query_query, gallery_gallery, k1=20, k2=6, lambda_value=0.3,
            chunk_size=1024):
    """Re-ranked query × gallery distances `[Q, G]` (float32).

    Args:
        query_gallery, query_query, gallery_gallery: distance matrices `[Q,G]`, `[Q,Q]`, `[G,G]`
            (as the reference, they are squared before use).
        k1, k2, lambda_value: the paper's k1, k2 and lambda (defaults 20, 6, 0.3).
        chunk_size: rows of the N×N distances held at once.
    """
    query_gallery = np.asarray(query_gallery, np.float32)
    num_query, num_gallery = query_gallery.shape
    if np.shape(query_query) != (num_query, num_query) or np.shape(gallery_gallery) != (
            num_gallery, num_gallery):
        raise ValueError(f"re_rank: query_query must be [{num_query},{num_query}] and "
                         f"gallery_gallery [{num_gallery},{num_gallery}]; got "
                         f"{np.shape(query_query)} and {np.shape(gallery_gallery)}.")
    total = num_query + num_gallery

    def rows_of(rows):
        return _blocks(query_gallery, query_query, gallery_gallery, rows)

    def gather(rows, cols):
        return _gather(query_gallery, query_query, gallery_gallery, rows, cols)

    final = np.empty((num_query, num_gallery), np.float32)
    for rows, block in _re_rank_chunks(total, num_query, rows_of, gather,
                                       lambda rows: query_gallery[rows], k1, k2, lambda_value,
                                       chunk_size):
        final[rows] = block
    return final


def re_rank_features(query_features, gallery_features, k1=20, k2=6, lambda_value=0.3,
                     chunk_size=1024, query_chunk=256):
    """k-reciprocal re-ranking straight from L2-normalisable features, cosine distance; yields
    `(query rows slice, re-ranked distances [rows, G])` chunk by chunk.

    The same definition and figures as `re_rank` on `metrics.pairwise_distances(...,
    "cosine")` matrices, but never holds an N×N (or gallery×gallery) matrix: one pass of
    `chunk_size` rows × N products gives each image's k1+1 nearest neighbours (an exact k-NN
    list, ties ordered by index) and its largest distance; the few distances the encoding needs
    are recomputed from the features; the output comes `query_chunk` queries at a time (feed it
    to `metrics.evaluate_chunked`). Memory: O(N·k1²) plus one chunk.
    """
    query = np.asarray(query_features, np.float32)
    gallery = np.asarray(gallery_features, np.float32)
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"re_rank_features: features [Q,D] and [G,D]; got {query.shape} and "
                         f"{gallery.shape}.")
    features = np.concatenate([query, gallery])
    features = unit_rows(features)
    num_query = len(query)
    gallery_part = features[num_query:]

    def rows_of(rows):  # cosine distances of these rows to every image, as pairwise_distances
        return 1.0 - features[rows] @ features.T

    def gather(rows, cols):  # in pieces: millions of pairs x D floats would not fit
        out = np.empty(len(rows), np.float32)
        for start in range(0, len(rows), 16384):
            part = slice(start, start + 16384)
            out[part] = 1.0 - np.einsum("ij,ij->i", features[rows[part]], features[cols[part]])
        return out

    def query_gallery(rows):
        return 1.0 - features[rows] @ gallery_part.T

    yield from _re_rank_chunks(len(features), num_query, rows_of, gather, query_gallery, k1, k2,
                               lambda_value, chunk_size, query_chunk)


@numba.njit(parallel=True, cache=True)
def _shared_minima(query_indptr, query_indices, query_data, column_indptr, gallery_rows,
                   gallery_data, num_gallery):
    """sum_c min(V[q, c], V[g, c]) for the CSR query rows and every gallery row (the gallery's
    encodings by column: for each of a query's non-zeros, the gallery rows sharing it). A loop
    rather than numpy: the (query non-zero, gallery row) pairs run to billions at MSMT17 scale
    (hub images are in many neighbour lists), and as arrays they took 24 GB."""
    num_rows = len(query_indptr) - 1
    out = np.zeros((num_rows, num_gallery), np.float64)
    for i in numba.prange(num_rows):
        for p in range(query_indptr[i], query_indptr[i + 1]):
            column, value = query_indices[p], query_data[p]
            for e in range(column_indptr[column], column_indptr[column + 1]):
                out[i, gallery_rows[e]] += min(value, gallery_data[e])
    return out


def _re_rank_chunks(total, num_query, rows_of, gather, query_gallery, k1, k2, lambda_value,
                    chunk_size, query_chunk=256):
    """The re-ranking over distances given by functions: `rows_of(slice)` -> `[rows, N]`,
    `gather(rows, cols)` -> `[n]`, `query_gallery(slice)` -> `[rows, G]`. Yields
    `(query rows, final distances)`."""
    num_gallery = total - num_query
    check_parameters(k1, k2, lambda_value)
    k1 = min(k1, total - 1)
    k2 = min(k2, k1 + 1)  # the expansion averages over the k1+1 nearest neighbours at most
    half = int(np.around(k1 / 2.0))
    # Pass 1: squared distances row by row -> row maxima and the k1+1 nearest neighbours.
    # The reference divides by column maxima and transposes; for symmetric inputs that is the
    # row maximum.
    row_max = np.empty(total, np.float32)
    neighbours = np.empty((total, k1 + 1), np.int32)
    for start in range(0, total, chunk_size):
        rows = slice(start, min(start + chunk_size, total))
        block = np.square(rows_of(rows).astype(np.float32))
        row_max[rows] = block.max(axis=1)
        nearest = np.argpartition(block, k1, axis=1)[:, :k1 + 1]
        order = np.lexsort((nearest, np.take_along_axis(block, nearest, axis=1)), axis=1)
        neighbours[rows] = np.take_along_axis(nearest, order, axis=1)
    row_max = np.maximum(row_max, np.finfo(np.float32).tiny)

    # k-reciprocal sets and their expansion with the k1/2-reciprocal sets of their members.
    reciprocal = _reciprocal(neighbours)  # [N, k1+1]
    half_neighbours = neighbours[:, :half + 1]
    half_reciprocal = _reciprocal(half_neighbours)  # [N, half+1]
    own = np.where(reciprocal, neighbours, -1)  # [N, k1+1], -1 = not in the set
    candidates = np.where(reciprocal, neighbours, 0)  # candidate c = member of i's set
    candidate_sets = np.where(half_reciprocal[candidates], half_neighbours[candidates], -2)
    shared = np.zeros(candidates.shape, np.int64)
    for start in range(0, total, 4096):  # bounded: [4096, k1+1, half+1, k1+1] booleans
        part = slice(start, start + 4096)
        shared[part] = (candidate_sets[part][..., None]
                        == own[part][:, None, None, :]).any(-1).sum(-1)
    sizes = half_reciprocal[candidates].sum(-1)
    accepted = reciprocal & (shared > 2.0 / 3.0 * sizes)
    expansion = np.concatenate([own, np.where(accepted[..., None], candidate_sets, -1)
                                .reshape(total, -1)], axis=1)
    expansion = np.sort(expansion, axis=1)
    unique = (expansion >= 0) & np.r_["1", np.ones((total, 1), bool),
                                      expansion[:, 1:] != expansion[:, :-1]]
    rows, slots = np.nonzero(unique)
    cols = expansion[rows, slots]
    weights = np.exp(-gather(rows, cols).astype(np.float32) ** 2 / row_max[rows])
    weights /= np.bincount(rows, weights, minlength=total)[rows]
    encoding = sparse.csr_matrix((weights, (rows, cols)), shape=(total, total), dtype=np.float32)
    if k2 != 1:  # local query expansion: mean of the encodings of the k2 nearest neighbours
        expand = sparse.csr_matrix(
            (np.full(total * k2, 1.0 / k2, np.float32),
             (np.repeat(np.arange(total), k2), neighbours[:, :k2].ravel())),
            shape=(total, total))
        encoding = (expand @ encoding).tocsr()
    encoding.sort_indices()

    # Jaccard distance between each query and each gallery image, over shared non-zeros.
    gallery_columns = encoding[num_query:].tocsc()
    gallery_columns.sort_indices()
    for start in range(0, num_query, query_chunk):
        block = encoding[start:min(start + query_chunk, num_query)]
        numerator = _shared_minima(block.indptr, block.indices, block.data,
                                   gallery_columns.indptr, gallery_columns.indices,
                                   gallery_columns.data, num_gallery).astype(np.float32)
        jaccard = 1.0 - numerator / (2.0 - numerator)
        rows = slice(start, start + block.shape[0])
        original = np.square(np.asarray(query_gallery(rows), np.float32)) / row_max[rows, None]
        yield rows, jaccard * (1.0 - lambda_value) + original * lambda_value
