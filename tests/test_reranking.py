import numpy as np
import pytest

from reid_tf.evaluate import metrics as metrics_lib
from reid_tf.evaluate import reranking


def dense_reference(q_g, q_q, g_g, k1, k2, lambda_value):
    """The k-reciprocal re-ranking of Zhong et al. (CVPR 2017) written densely, step by step."""
    num_query = len(q_q)
    original = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
    original = (original / original.max(axis=0)).T
    total = len(original)
    rank = np.argsort(original, axis=1, kind="stable")
    encoding = np.zeros_like(original)

    def reciprocal_set(i, k):
        forward = rank[i, :k + 1]
        return np.array([j for j in forward if i in rank[j, :k + 1]], dtype=int)

    for i in range(total):
        own = reciprocal_set(i, k1)
        expansion = list(own)
        for candidate in own:
            candidate_set = reciprocal_set(candidate, int(np.around(k1 / 2)))
            if len(np.intersect1d(candidate_set, own)) > 2 / 3 * len(candidate_set):
                expansion.extend(candidate_set)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        encoding[i, expansion] = weight / weight.sum()
    if k2 != 1:
        encoding = np.stack([encoding[rank[i, :k2]].mean(axis=0) for i in range(total)])
    jaccard = np.zeros((num_query, total))
    for i in range(num_query):
        minima = np.minimum(encoding[i][None, :], encoding).sum(axis=1)
        jaccard[i] = 1 - minima / (2 - minima)
    final = jaccard * (1 - lambda_value) + original[:num_query] * lambda_value
    return final[:, num_query:]


def distances(seed, num_query=15, num_gallery=45, dim=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, dim))
    query = centres[rng.integers(0, 8, num_query)] + 0.5 * rng.normal(size=(num_query, dim))
    gallery = centres[rng.integers(0, 8, num_gallery)] + 0.5 * rng.normal(size=(num_gallery, dim))
    return [metrics_lib.pairwise_distances(a, b, "euclidean") for a, b in
            [(query, gallery), (query, query), (gallery, gallery)]]


@pytest.mark.parametrize("seed, k1, k2, lambda_value", [(0, 20, 6, 0.3), (1, 6, 3, 0.5),
                                                        (2, 10, 1, 0.0)])
@pytest.mark.slow  # trains, or runs a tool in a process
def test_re_rank_equals_the_dense_reference(seed, k1, k2, lambda_value):
    q_g, q_q, g_g = distances(seed)
    for matrix in (q_q, g_g):  # exact symmetry and zero diagonal, as real distance matrices
        matrix[:] = (matrix + matrix.T) / 2
        np.fill_diagonal(matrix, 0)
    got = reranking.re_rank(q_g, q_q, g_g, k1, k2, lambda_value, chunk_size=7)
    expected = dense_reference(q_g, q_q, g_g, k1, k2, lambda_value)
    assert got.shape == (15, 45) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_re_rank_rejects_mismatched_shapes():
    q_g, q_q, g_g = distances(0)
    with pytest.raises(ValueError, match=r"gallery_gallery \[45,45\]"):
        reranking.re_rank(q_g, q_q, g_g[:10, :10])


@pytest.mark.parametrize("seed", [0, 1])
def test_re_rank_from_features_equals_re_rank_on_the_dense_matrices(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(25, 32))
    query = (centres[rng.integers(0, 25, 60)] + 0.7 * rng.normal(size=(60, 32))).astype(np.float32)
    gallery = (centres[rng.integers(0, 25, 300)]
               + 0.7 * rng.normal(size=(300, 32))).astype(np.float32)
    query_ids, gallery_ids = rng.integers(0, 25, 60), rng.integers(0, 25, 300)
    dense = reranking.re_rank(metrics_lib.pairwise_distances(query, gallery),
                              metrics_lib.pairwise_distances(query, query),
                              metrics_lib.pairwise_distances(gallery, gallery))
    chunks = list(reranking.re_rank_features(query, gallery, chunk_size=50, query_chunk=16))
    assert [c[0].start for c in chunks] == list(range(0, 60, 16))
    np.testing.assert_allclose(np.concatenate([c[1] for c in chunks]), dense, atol=2e-6)
    cameras_q, cameras_g = np.zeros(60, int), np.ones(300, int)
    expected = metrics_lib.evaluate(dense, query_ids, gallery_ids, cameras_q, cameras_g)
    got = metrics_lib.evaluate_chunked(
        reranking.re_rank_features(query, gallery, chunk_size=64, query_chunk=7), query_ids,
        gallery_ids, cameras_q, cameras_g)
    np.testing.assert_allclose(got["cmc"], expected["cmc"], atol=1e-6)
    assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert got["mINP"] == pytest.approx(expected["mINP"], abs=1e-6)


def test_re_rank_refuses_a_k2_beyond_k1_plus_one_and_other_unusable_parameters():
    q_g, q_q, g_g = distances(0)
    with pytest.raises(ValueError, match=r"k2=8 with k1=3: .* at most 4 \(lower --k2 or raise "
                                         r"--k1\)"):
        reranking.re_rank(q_g, q_q, g_g, k1=3, k2=8)
    for bad, match in ((dict(k1=0), "k1=0"), (dict(k2=0), "k2=0"),
                       (dict(lambda_value=1.5), "lambda_value=1.5")):
        with pytest.raises(ValueError, match=match):
            reranking.re_rank(q_g, q_q, g_g, **bad)
    # k2 = k1 + 1, the largest it may be, runs; and k1 >= the gallery is clamped, as before.
    assert np.isfinite(reranking.re_rank(q_g, q_q, g_g, k1=3, k2=4)).all()
    assert np.isfinite(reranking.re_rank(q_g, q_q, g_g, k1=500, k2=6)).all()
